"""The lab's sample service: a progress sensor, a memory level, and a numbered byte stream.

    python -m backdoors.lab.service --name svc-n0 --port 7000

It ticks a progress sensor from its main loop (every --tick seconds), keeps a level sensor
of its own resident memory, counts errors in a pressure sensor, and serves every TCP client
the stream of `backdoors.lab.stream` at --rate bytes/s. SIGUSR1 makes the main loop stop
(a synthetic deadlock: alive, not progressing); SIGUSR2 resumes it. When the environment
names an agent socket (BACKDOORS_AGENT_SOCKET), the Sensor Box is registered with it.
Writes a JSON status line on stdout once ready: {"pid", "box_fd", "port"}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

from backdoors.common.runtime import AGENT_SOCKET_ENV, register_box
from backdoors.lab import stream
from backdoors.sensors import SensorBox

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def serve_client(conn: socket.socket, rate: int, errors) -> None:
    chunk = 1024
    interval = chunk / rate
    offset = 0
    try:
        next_at = time.monotonic()
        while True:
            conn.sendall(stream.expected(offset, chunk))
            offset += chunk
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except OSError:
        with _errors_lock:  # one read-modify-write of the box at a time
            errors.event()
    finally:
        conn.close()


_errors_lock = threading.Lock()


def accept_loop(listener: socket.socket, rate: int, errors) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # EMFILE, ECONNABORTED: the service accepts on
            if listener.fileno() < 0:
                return
            time.sleep(0.05)
            continue
        threading.Thread(target=serve_client, args=(conn, rate, errors), daemon=True).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backdoors.lab.service", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="service")
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--tick", type=float, default=0.01, help="seconds between progress ticks")
    ap.add_argument("--deadline", type=float, default=0.2, help="progress deadline (s)")
    ap.add_argument("--rss-max-mb", type=float, default=256.0)
    ap.add_argument("--rate", type=int, default=64 * 1024, help="stream bytes/s per client")
    a = ap.parse_args(argv)

    box = SensorBox.create(a.name)
    progress = box.progress("progress", deadline=a.deadline, stamped=True)
    rss = box.level("rss_mb", max=a.rss_max_mb, initial=rss_mb())
    errors = box.pressure("errors", max_events=50, window=1.0)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)

    listener = socket.create_server(("0.0.0.0", a.port), backlog=128, reuse_port=False)
    threading.Thread(target=accept_loop, args=(listener, a.rate, errors), daemon=True).start()

    resume = threading.Event()
    stalled = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: (resume.clear(), stalled.set()))
    signal.signal(signal.SIGUSR2, lambda *_: (stalled.clear(), resume.set()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    print(json.dumps({"pid": os.getpid(), "box_fd": box.fd, "port": a.port}), flush=True)
    last_rss = 0.0
    while True:
        if stalled.is_set():
            resume.wait()  # the synthetic deadlock
        progress.tick()
        now = time.monotonic()
        if now - last_rss >= 0.1:
            rss.set(rss_mb())
            last_rss = now
        time.sleep(a.tick)


if __name__ == "__main__":
    sys.exit(main())

"""The lab's recoverable service: the numbered stream, with Continuation Boxes.

    python -m backdoors.lab.recoverable --name rsvc-n0 --port 7100

Every client session receives the stream of `backdoors.lab.stream`, paced at --rate
bytes/s, from offset 0 (or from where a recovered session left off). The state of a
session is its offset; it is exported every --export-every bytes. A heartbeat thread ticks
a progress sensor every 10 ms while the process runs; its Sensor Box, the sessions' boxes
and sockets are registered with the node's agent, and recovered sessions arrive on the
node's adoption socket (BACKDOORS_AGENT_SOCKET, BACKDOORS_ADOPT_DIR). Prints one JSON
line when ready: {"pid", "port", "box_fd"}. SIGUSR1 makes it leak memory (a service that
is itself the memory hog: not repairable by killing it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time

import msgspec

from ..common.runtime import AGENT_SOCKET_ENV, register_box
from ..continuations import Listener, create_cb
from ..sensors import SensorBox
from . import stream


class StreamState(msgspec.Struct):
    offset: int = 0


def serve(conn, rate: int, chunk: int, export_every: int) -> None:
    try:
        with create_cb(conn) as cb:
            state = cb.import_state(StreamState) or StreamState()
            interval = chunk / rate
            next_at = time.monotonic()
            while True:
                # a chunk ends on a multiple of `chunk`, whatever offset a recovery resumed at
                n = chunk - state.offset % chunk
                cb.conn.sendall(stream.expected(state.offset, n))
                state.offset += n
                if state.offset % export_every == 0:
                    cb.export(state)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
    except OSError:
        pass  # the client went away


def heartbeat(progress, stop: threading.Event, leak: threading.Event, leak_mb_s: float) -> None:
    """Tick progress every 10 ms; once `leak` is set (SIGUSR1), also leak memory."""
    leaked = []
    while not stop.wait(0.01):
        progress.tick()
        if leak.is_set():
            leaked.append(bytearray(b"\3") * int(leak_mb_s * 2**20 / 100))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backdoors.lab.recoverable", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="rsvc")
    ap.add_argument("--port", type=int, default=7100)
    ap.add_argument("--rate", type=int, default=16 * 1024, help="bytes/s per session")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--export-every", type=int, default=8 * 1024, help="a multiple of --chunk")
    ap.add_argument("--deadline", type=float, default=0.2, help="progress deadline (s)")
    ap.add_argument("--leak-mb-s", type=float, default=50.0,
                    help="after SIGUSR1, leak this many MB/s (the service itself as memory hog)")
    a = ap.parse_args(argv)
    if a.export_every % a.chunk:
        ap.error("--export-every must be a multiple of --chunk")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(256 * 1024)  # many sessions, one thread each

    box = SensorBox.create(a.name)
    progress = box.progress("progress", deadline=a.deadline)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)
    stop, leak = threading.Event(), threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: leak.set())  # the lab's "the service leaks" fault
    threading.Thread(target=heartbeat, args=(progress, stop, leak, a.leak_mb_s), daemon=True).start()

    with Listener.tcp("0.0.0.0", a.port, backlog=1024) as listener:
        signal.signal(signal.SIGTERM, lambda *_: listener.close())
        print(json.dumps({"pid": os.getpid(), "port": a.port, "box_fd": box.fd}), flush=True)
        while (conn := listener.accept()) is not None:
            threading.Thread(target=serve, args=(conn, a.rate, a.chunk, a.export_every),
                             daemon=True).start()
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())

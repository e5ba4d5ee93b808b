"""A recoverable server outlives a flood of connections that takes all its descriptors.

A server process (AsyncListener or the threaded Listener, with an adoption socket) runs
with a low RLIMIT_NOFILE; the test opens more connections than it has descriptors for.
accept(2) then fails with EMFILE: the listener stops accepting for a moment at a time
(common.accepting) instead of ending the accept loop (the server stopped serving for
good) or spinning on the readable socket. Once connections end, the waiting ones are
served, new ones too, and the adoption socket takes its connections again.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import pytest

from backdoors.common import ipc
from backdoors.common.accepting import PAUSE_S
from backdoors.continuations.adoption import HandoverVerdicts

HEADROOM = 12  # descriptors the server may open beyond those it has when it starts

SERVER = r"""
import asyncio, logging, os, resource, socket, sys, threading
from backdoors.continuations import AsyncListener, Listener, run

kind, adopt, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

def limit(port):
    used, free, soft = {int(fd) for fd in os.listdir("/proc/self/fd")}, 0, 0
    while free < headroom:  # exactly `headroom` numbers free under the limit
        free += soft not in used
        soft += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(port, flush=True)

def echo(conn):
    with conn:
        try:
            while data := conn.recv(100):
                conn.sendall(data)
        except OSError:
            pass

async def echo_async(conn):
    loop = asyncio.get_running_loop()
    with conn:
        while data := await loop.sock_recv(conn, 100):
            await loop.sock_sendall(conn, data)

async def main_async():
    with AsyncListener.tcp("127.0.0.1", 0, adopt=adopt) as listener:
        limit(listener.address[1])
        await listener.serve(echo_async)

if kind == "async":
    run(main_async())
else:
    with Listener.tcp("127.0.0.1", 0, adopt=adopt) as listener:
        limit(listener.address[1])
        for conn in listener:
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="bdt-acc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _echoed(sock: socket.socket, word: bytes, timeout: float = 20.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == word
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["async", "threaded"])
def test_a_listener_out_of_descriptors_pauses_and_serves_again(short_tmp, kind):
    adopt = os.path.join(short_tmp, "adopt.sock")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, adopt, str(HEADROOM)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    err: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            err.append(line)
            lines.put(line)

    def logged(what: str) -> None:
        end = time.monotonic() + 20
        while (left := end - time.monotonic()) > 0:
            try:
                if what in lines.get(timeout=left):
                    return
            except queue.Empty:
                break
        raise AssertionError(f"the server did not log {what!r}: {''.join(err)}")

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    clients: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for i in range(2 * HEADROOM):  # twice what it can hold: the later ones wait
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"%02d" % i)
            clients.append(c)
        logged(f"listening socket 127.0.0.1:{port}: cannot accept (Too many open files)")
        # the first connections are served (whatever else it opened, HEADROOM // 2 fit)
        assert all(_echoed(c, b"%02d" % i) for i, c in enumerate(clients[:HEADROOM // 2]))
        # the adoption socket is out of descriptors too: its connection waits
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent.connect(adopt)
        agent.sendall(ipc.pack(HandoverVerdicts(error="not a batch")))  # refused, answered
        logged(f"adoption socket {adopt}: cannot accept (Too many open files)")
        time.sleep(5 * PAUSE_S)  # a few pauses while full
        assert proc.poll() is None, "".join(err)
        for c in clients[:-HEADROOM // 2]:  # connections end: room for the waiting ones
            c.close()
        waiting = clients[-HEADROOM // 2:]
        assert all(_echoed(c, b"%02d" % (len(clients) - len(waiting) + i))
                   for i, c in enumerate(waiting)), "a waiting connection was not served"
        agent.settimeout(20)
        reply = ipc.recv(agent, max_bytes=65536)
        verdict = msgspec.msgpack.decode(reply.payload, type=HandoverVerdicts)
        assert "does not decode" in verdict.error  # taken after the pause, and answered
        agent.close()
        fresh = socket.create_connection(("127.0.0.1", port), timeout=10)
        fresh.sendall(b"ok")
        assert _echoed(fresh, b"ok")
        fresh.close()
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)
    err_text = "".join(err)
    again = re.findall(r"accepting again after ([\d.]+) s \((\d+) retries\)", err_text)
    assert len(again) == 2, err_text  # the listening socket and the adoption socket
    # a pause between retries, no spinning on the readable socket: at most one retry per
    # PAUSE_S of the time it could not accept (+2: the first failure, rounding)
    for seconds, retries in again:
        assert int(retries) <= float(seconds) / PAUSE_S + 2, err_text

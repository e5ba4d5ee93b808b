"""The recoverable ASGI server: any ASGI application (here a Starlette one) served over
HTTP/1.1 keep-alive, and its sessions moved byte-exact with the application's own
per-session state."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import asgi_app  # noqa: E402 - tests/asgi_app.py
from test_continuations_support import (  # noqa: E402,F401 - rlab is a fixture
    Background,
    rlab,
    wait_for,
)

from backdoors import asgi  # noqa: E402
from backdoors.continuations import AsyncListener  # noqa: E402
from backdoors.continuations.cbformat import MAX_STATE_CAPACITY  # noqa: E402
from backdoors.tcprepair import kernel  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def serving(app=None, **options):
    """The ASGI server with `app` (default: the test app) on 127.0.0.1, its lifespan run
    first (`options` for asgi.serve); its address."""
    app = app or asgi_app.app
    started = threading.Event()
    box: dict = {}

    def main() -> None:
        async def go() -> None:
            life = asgi.Lifespan(app)
            await life.startup()
            listener = AsyncListener.tcp("127.0.0.1", 0, adopt=None)
            box["listener"], box["loop"] = listener, asyncio.get_running_loop()
            started.set()
            with listener:
                await asgi.serve(app, listener, state=life.state, **options)
            await life.shutdown()
        asyncio.run(go())

    t = threading.Thread(target=main, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield box["listener"].address
    finally:
        box["loop"].call_soon_threadsafe(box["listener"].close)
        t.join(10)


@pytest.fixture
def server(monkeypatch):
    """The ASGI server with the test app on 127.0.0.1 (no agent: boxes unregistered)."""
    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)
    with serving() as address:
        yield address


def test_a_starlette_app_keeps_its_session_state_over_keep_alive(server):
    c = http.client.HTTPConnection(*server, timeout=10)
    keys = []
    for i in range(1, 4):
        c.request("GET", "/count?size=100")
        r = c.getresponse()
        body = r.read()
        assert r.status == 200 and len(body) > 100
        head = body.split(b"\n")[0].decode()
        assert head.startswith(f"n={i} seq={i - 1} ")
        keys.append(head.split("key=")[1])
    assert len(set(keys)) == 3 and all(k.endswith(f"-{i}") for i, k in enumerate(keys))
    c.request("POST", "/echo", body=b"bid 42")
    r = c.getresponse()
    assert (r.status, r.read()) == (200, b"BID 42")
    c.request("GET", "/fail")
    r = c.getresponse()
    assert r.status == 500 and r.read()
    c.request("GET", "/count")  # the session survived the application's failure
    assert c.getresponse().read().startswith(b"n=4 seq=5 ")
    c.close()
    # another connection is another session
    c2 = http.client.HTTPConnection(*server, timeout=10)
    c2.request("GET", "/count")
    assert c2.getresponse().read().startswith(b"n=1 seq=0 ")
    c2.close()


def test_pipelined_requests_are_answered_in_order_and_garbage_gets_400(server):
    s = socket.create_connection(server, timeout=10)
    s.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    got = b""
    while got.count(b"n=") < 3:
        got += s.recv(65536)
    assert re.findall(rb"n=(\d) seq=(\d)", got) == [(b"1", b"0"), (b"2", b"1"), (b"3", b"2")]
    s.close()
    bad = socket.create_connection(server, timeout=10)
    bad.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    reply = b""
    while chunk := bad.recv(65536):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")
    assert reply.endswith(b"\r\n\r\nillegal request line\n")  # the input not echoed back
    bad.close()


@pytest.mark.parametrize("request_", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2 preface
                                      b"GET /count HTTP/3.0\r\nHost: x\r\n\r\n"])
def test_a_request_of_another_http_version_gets_505_not_the_app(server, request_):
    """h11 reads any HTTP/x.y as 1.1: an HTTP/2 client's preface was handed to the
    application as a request for "*" with method PRI, answered 200 (found with curl
    --http2-prior-knowledge); an HTTP/3.0 GET was served."""
    s = socket.create_connection(server, timeout=10)
    s.sendall(request_)
    status, body = _response(s)
    assert status.startswith(b"HTTP/1.1 505 HTTP Version Not Supported"), status
    assert b"is not supported" in body
    assert s.recv(1) == b""  # closed
    s.close()


def _head(f) -> tuple[bytes, int]:
    """(status line, Content-Length) of the response head read from file `f`."""
    status = f.readline()
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, length


def _response(s: socket.socket) -> tuple[bytes, bytes]:
    """(status line, body) of one Content-Length response read from `s`."""
    f = s.makefile("rb")
    status, length = _head(f)
    return status, f.read(length)


def test_a_request_must_fit_the_sessions_receive_log(server):
    """A request stays in the session's receive log until answered: a body that fits
    (up to the log's size less the head) is served; one that does not is refused with
    413 naming the limit, by its Content-Length before it is read (no 100 Continue
    asked for) or, chunked, once the log is full; the client reads the refusal even
    while it is still sending (the server reads and drops the rest before closing)."""
    capacity = asgi.LOG_CAPACITY
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    fits = capacity - len(head % capacity)
    s = socket.create_connection(server, timeout=10)
    for size in (fits, fits):  # the second on the same connection: the log starts again
        s.sendall(head % size + b"a" * size)
        status, body = _response(s)
        assert (status, body) == (b"HTTP/1.1 200 OK\r\n", b"A" * size)
    s.sendall(head % (fits + 1) + b"a" * (fits + 1))
    status, body = _response(s)
    assert status == b"HTTP/1.1 413 Request Entity Too Large\r\n"
    assert f"receive log of {capacity} bytes".encode() in body
    assert s.recv(1) == b""  # and the connection ends
    s.close()

    s = socket.create_connection(server, timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 10000000\r\n\r\n")
    status, body = _response(s)  # at once: the body is not sent, nor asked for
    assert status.startswith(b"HTTP/1.1 413 ") and b"--log-capacity" in body
    s.close()

    s = socket.create_connection(server, timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (4096, b"b" * 4096)
    for _ in range(2 * capacity // 4096):  # twice what the log holds, sent whole
        s.sendall(chunk)
    status, body = _response(s)
    assert status.startswith(b"HTTP/1.1 413 ") and b"too large" in body
    s.close()


def test_a_silent_client_is_closed_and_a_slow_one_is_not(monkeypatch):
    """A client that sends nothing for idle_s while a request is awaited (before its
    first, or within one) is closed without an answer; one that sends its request slowly,
    but whole within idle_s, is served (one slower than that: test_asgi_clients)."""
    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)
    idle = 3.0
    with serving(idle_s=idle) as address:
        silent = socket.create_connection(address, timeout=30)
        partial = socket.create_connection(address, timeout=30)
        partial.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nab")
        slow = socket.create_connection(address, timeout=30)
        body = b"c" * 20
        slow.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        for i in range(20):  # 1.5 s in all, half idle_s, a byte every idle_s / 40
            time.sleep(idle / 40)
            slow.sendall(body[i:i + 1])
        time.sleep(idle)  # the silent ones are closed by now
        status, got = _response(slow)
        assert (status, got) == (b"HTTP/1.1 200 OK\r\n", b"C" * 20)
        assert silent.recv(100) == b""  # closed long since, nothing sent
        assert partial.recv(100) == b""
        slow.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")  # still served
        status, _ = _response(slow)
        assert status == b"HTTP/1.1 200 OK\r\n"
        for s in (silent, partial, slow):
            s.close()


def _get(address, path: str = "/count") -> tuple[bytes, bytes, socket.socket]:
    s = socket.create_connection(address, timeout=30)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return *_response(s), s


def test_new_connections_past_the_limit_are_answered_503(monkeypatch):
    """While `limit` client sessions are served, a new connection is answered 503 (and
    closed, its request read and dropped: no reset); once one of them ends, a new
    connection is served again."""
    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)
    with serving(limit=2) as address:
        held = [_get(address)[2] for _ in range(2)]
        status, body, third = _get(address)
        assert status == b"HTTP/1.1 503 Service Unavailable\r\n", (status, body)
        assert b"its limit of 2 sessions" in body
        assert third.recv(100) == b""  # closed
        third.close()
        held.pop().close()
        deadline = time.monotonic() + 20
        while True:  # the server sees the end of that session soon
            status, _, s = _get(address)
            s.close()
            if status == b"HTTP/1.1 200 OK\r\n" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == b"HTTP/1.1 200 OK\r\n"
        for s in held:
            s.close()


def test_refused_connections_read_before_they_close_are_capped(monkeypatch):
    """A refusal is read for LINGER_S before its socket closes, but at most MAX_REFUSING
    of them at once: a flood of refusals must not hold the descriptors kept for
    recovered sessions. Each client gets its 503 either way."""
    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)
    monkeypatch.setattr(asgi, "MAX_REFUSING", 2)
    monkeypatch.setattr(asgi, "LINGER_S", 60.0)  # they linger throughout the test
    with serving(limit=1) as address:
        held = _get(address)[2]
        refused = []
        for _ in range(6):
            status, _, s = _get(address)
            assert status == b"HTTP/1.1 503 Service Unavailable\r\n"
            refused.append(s)
        port = address[1]
        ss = subprocess.run(["ss", "-Htanp", f"sport = :{port}"], capture_output=True,
                            text=True, check=True).stdout
        # the lingering ones: sent their FIN, still this process's (read on); the others
        # were closed at once (gone, or the kernel's alone while their FIN goes out)
        lingering = [line for line in ss.splitlines()
                     if line.startswith("FIN-WAIT") and f"pid={os.getpid()}," in line]
        assert len(lingering) == 2, ss
        for s in (held, *refused):
            s.close()


def test_a_server_at_its_limit_still_takes_the_sessions_a_recovery_hands_over(rlab):
    """The limit is on new clients only: a server with a limit of 1 takes the two
    sessions a recovery hands it and serves both; a new client is answered 503."""
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args, "--limit-concurrency", "1")
    clients = [rlab.connect() for _ in range(2)]
    for c in clients:
        c.sendall(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert _response(c)[1].startswith(b"n=1 seq=0 ")
    a.freeze()
    rlab.recover_all(a.sessions(), b)  # the service address moves to b's node with them
    for c in clients:
        c.sendall(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert _response(c)[1].startswith(b"n=2 seq=1 "), rlab.logs()
    third = rlab.connect()
    third.sendall(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert _response(third)[0] == b"HTTP/1.1 503 Service Unavailable\r\n", rlab.logs()


def test_a_request_sent_while_the_server_was_stopped_is_answered():
    """The idle clock is the server's: a server stopped (SIGSTOP, a freeze) for longer
    than idle_s finds, when it runs again, the request its client sent meanwhile, and
    answers it instead of closing the session as silent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKDOORS_")}
    proc = subprocess.Popen([sys.executable, "-m", "backdoors.asgi", "--app-dir", TESTS,
                             "asgi_app:app", "--host", "127.0.0.1", "--port", "0",
                             "--timeout-idle", "1"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)$", line.strip()).group(1))
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        c.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(c)[0] == b"HTTP/1.1 200 OK\r\n"  # its session is waiting now
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        c.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.5)  # past its idle_s, by its clock too
        proc.send_signal(signal.SIGCONT)
        assert _response(c)[0] == b"HTTP/1.1 200 OK\r\n"
        c.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_100_continue_is_sent_for_a_request_that_expects_it(server):
    s = socket.create_connection(server, timeout=10)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 3\r\n\r\n")
    f = s.makefile("rb")
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
    s.sendall(b"bid")
    status, body = _response(s)
    assert status == b"HTTP/1.1 200 OK\r\n" and body == b"BID"
    s.close()


def test_empty_lines_before_a_request_are_ignored(server):
    """RFC 9112 2.2: a server ignores empty lines before a request line (some clients send
    a CRLF after a POST's body): alone, in their own segments, or read ahead with the
    request before them."""
    s = socket.create_connection(server, timeout=10)
    s.sendall(b"\r\n")
    time.sleep(0.1)  # (a segment of its own)
    s.sendall(b"\r\n\nGET /count HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _response(s)[1].startswith(b"n=1 seq=0 ")
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nbid\r\n"
              b"\r\nGET /count HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")  # (one reader for the two answers)
    status, length = _head(f)
    assert (status, f.read(length)) == (b"HTTP/1.1 200 OK\r\n", b"BID")
    status, length = _head(f)
    assert f.read(length).startswith(b"n=2 seq=2 ")
    s.sendall(b"\r\n\r\nNOT HTTP\r\n\r\n")  # what follows them is still checked
    assert _head(f)[0].startswith(b"HTTP/1.1 400")
    s.close()


def test_a_session_moves_after_empty_lines_read_ahead(rlab):
    """A POST's body followed by a CRLF, then the session moves: on the node it moves to,
    the next request is answered once, and the session goes on with its state."""
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect()
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nbid\r\n")
    assert _response(sock) == (b"HTTP/1.1 200 OK\r\n", b"BID")
    a.freeze()
    rlab.recover(a.sessions()[0], b)
    sock.sendall(b"\r\nGET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert _response(sock)[1].startswith(b"n=1 seq=1 "), rlab.logs()


def test_a_session_moves_between_100_continue_and_the_body(rlab):
    """The server answers the head with 100 Continue and is frozen before the body
    comes: on the node the session moves to, the replayed head makes the same 100
    Continue (the client has it: skipped, checked to match), the body is read there and
    answered, and the session goes on with its state."""
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect()
    sock.sendall(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, body = _response(sock)
    assert body.startswith(b"n=1 seq=0 ")
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 6\r\n\r\n")
    f = sock.makefile("rb")
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
    a.freeze()
    rlab.recover(a.sessions()[0], b)
    sock.sendall(b"bid 42")
    status, body = _response(sock)
    assert (status, body) == (b"HTTP/1.1 200 OK\r\n", b"BID 42"), rlab.logs()
    sock.sendall(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert _response(sock)[1].startswith(b"n=2 seq=2 "), rlab.logs()


def test_pipelined_requests_move_with_the_session_none_lost_none_twice(rlab):
    """A client pipelines 10,000 requests and reads no answer: the server reads ahead
    (its parser holds requests not answered yet), answers until its send buffer is full
    and waits there. What it read ahead stays in the receive log at each export, not in
    the state (which overflowed the state's 64 KiB and ended the session, found with a
    pipelining client). Frozen there, its session moves; the client then gets every
    answer once, in order, and the session's count goes on."""
    import fcntl
    import termios

    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect(timeout=30)
    sock.settimeout(30)
    total = 10_000
    sender = threading.Thread(target=sock.sendall, daemon=True,
                              args=(b"GET /count HTTP/1.1\r\nHost: svc\r\n\r\n" * total,))
    sender.start()

    def answered() -> int:  # bytes of answers waiting at the client
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4), "little")

    seen, end = -1, time.monotonic() + 30  # until it answered some and waits to send more
    while (now := answered()) == 0 or now != seen:
        assert time.monotonic() < end, f"{now} bytes answered in 30 s: {rlab.logs()}"
        seen = now
        time.sleep(0.3)
    a.freeze()
    before = sock.recv(seen, socket.MSG_PEEK).count(b" seq=")
    rlab.recover(a.sessions()[0], b)
    got = b""
    while got.count(b" seq=") < total and (chunk := sock.recv(1 << 16)):
        got += chunk
    sender.join(10)
    numbers = [tuple(map(int, m)) for m in re.findall(rb"n=(\d+) seq=(\d+)", got)]
    assert numbers[:total] == [(i + 1, i) for i in range(total)], rlab.logs()
    assert 0 < before < total  # the move came in the middle of the pipeline


def test_a_session_moves_while_the_server_lingers_after_a_refusal(rlab):
    """The server refused a request too large for the session (413), shut its writing
    down and reads the rest of the body, dropped, before it closes (its linger: the
    socket in FIN_WAIT2): the session moves (before, its dump was refused), the client
    keeps the whole refusal and its end, and what it still sends reaches the new node's
    server, which reads it and ends the session; no reset."""
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect()
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 10000000\r\n\r\n"
                 + b"x" * 1000)
    status, body = _response(sock)
    assert status.startswith(b"HTTP/1.1 413 ") and b"--log-capacity" in body
    assert sock.recv(1) == b""
    (held,) = a.sessions()
    deadline = time.monotonic() + 5  # the server's FIN acknowledged
    while kernel.tcp_info(held.sock).state != kernel.FIN_WAIT2:
        assert time.monotonic() < deadline, kernel.tcp_info(held.sock).state_name
        time.sleep(0.01)
    a.freeze()
    (move,) = rlab.recover_all([held], b)
    assert move.state.our_fin and not move.state.peer_fin
    sock.sendall(b"y" * 2000)  # more of the body: read and dropped on the new node
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(10)
    assert sock.recv(1) == b"", rlab.logs()  # the end again, not a reset


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "too-big-to-keep"])
def test_a_session_moves_mid_response_with_the_app_state(rlab, kept):
    """Freeze the server after 1 MiB of a 14 MiB response (more than the sockets' buffers
    hold, so the rest is sent again from the exported state); the session moves to another
    node's ASGI server, the rest of the response arrives exactly, and the next request on
    the same connection sees the application's state (its counter) carried over. A
    response too big for the session's state ends the connection at the recovery: the
    client has a correct prefix and then sees the end, never a wrong byte."""
    size = 14 << 20
    capacity = MAX_STATE_CAPACITY if kept else (1 << 20)
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS, "--state-capacity",
            str(capacity))
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect()
    reached = threading.Event()

    def get(path: str) -> tuple[bytes, int, bytes]:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
        f = sock.makefile("rb")
        status, length = _head(f)
        body = bytearray()
        while len(body) < length:
            chunk = f.read1(min(65536, length - len(body)))
            if not chunk:
                break
            body += chunk
            if len(body) >= 1 << 20 and not reached.is_set():
                a.freeze()
                reached.set()
        return status, length, bytes(body)

    status, _, body = get("/count?size=10")
    assert status.startswith(b"HTTP/1.1 200") and body.startswith(b"n=1 seq=0 ")
    client = Background(get, f"/count?size={size}")
    wait_for(reached, "1 MiB of the big response", client=client)
    rlab.recover(a.sessions()[0], b)
    status, length, body = client.result()
    head, _, rest = body.partition(b"\n")
    assert head.startswith(b"n=2 seq=1 ")
    want = asgi_app.numbered(size)
    if not kept:
        assert len(body) < length and want.startswith(rest), "a prefix, then the end"
        return
    assert rest == want, "the moved response is not byte-exact"
    after = Background(get, "/count")
    status, _, body = after.result(timeout=30)
    assert body.startswith(b"n=3 seq=2 "), rlab.logs()


@pytest.mark.parametrize("stop", ["sent", "read"])
def test_a_session_moves_with_its_channel_to_a_backend(rlab, monkeypatch, stop):
    """The application calls a backend (another ASGI server, in node d) on the session's
    channel. The server stops once the call is sent (its answer not read yet), or once
    the answer is read (the client's response not exported yet). Both sockets move to
    node b: the replayed request makes the same call on the moved channel -- not sent
    again, its answer read from the socket or replayed from the channel's log -- so the
    backend counts one hit, on the one connection it ever had, and the session goes on
    over it."""
    from test_continuations_support import NODE_IPS, PORT

    monkeypatch.setenv("ASGI_BACKEND", f"{NODE_IPS['d']}:{PORT}")
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS)
    rlab.server("d", "backdoors.asgi", "asgi_app:backend", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)
    sock = rlab.connect()
    f = sock.makefile("rb")

    def get(path: str) -> str:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
        assert f.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return f.read(length).decode()

    first = get("/relay")
    conn = re.search(r"conn=(\w+)", first).group(1)
    assert first.startswith("calls=1 recovered=False hits=1 "), first
    client = Background(get, f"/relay?stop={stop}")
    os.waitid(os.P_PID, a.pid, os.WSTOPPED)  # stopped where the test asked
    held = a.sessions()
    assert len(held) == 2, "the client's connection and its channel"
    rlab.recover_all(held, b)
    assert client.result(timeout=30) == f"calls=2 recovered=True hits=2 conn={conn}", rlab.logs()
    assert get("/relay") == f"calls=3 recovered=True hits=3 conn={conn}", rlab.logs()


def test_spare_channels_the_peer_closed_are_passed_over_and_idle_ones_closed(monkeypatch):
    """Spares (--spare-channels) are connections held open ahead: one the peer has
    closed meanwhile (its own idle timeout) is not handed to a session, which opens a
    new channel instead; and spares no session took for SPARE_IDLE_S are closed."""
    import psutil

    from backdoors.continuations import channels
    from backdoors.scenarios.labkit import wait_until

    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)

    def channels_to(port: int) -> int:  # this process's open connections to the peer
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")

    clients = []  # (their sessions, and so their channels, stay open)

    def relay(address) -> str:
        clients.append(c := http.client.HTTPConnection(*address, timeout=10))
        c.request("GET", "/relay")
        r = c.getresponse()
        assert r.status == 200
        return r.read().decode()

    with serving(asgi_app.backend, idle_s=1.0) as closing, \
            serving(asgi_app.backend, idle_s=None) as keeping, \
            serving(spares=2) as front:
        monkeypatch.setenv("ASGI_BACKEND", "%s:%d" % closing)
        assert relay(front).startswith("calls=1 recovered=False hits=1 ")
        wait_until(lambda: channels_to(closing[1]) == 3, 30, "a channel and two spares")
        wait_until(lambda: channels_to(closing[1]) == 0, 30, "the peer closing them, idle")
        assert relay(front).startswith("calls=1 recovered=False hits=1 ")  # a new one
        monkeypatch.setattr(channels, "SPARE_IDLE_S", 2.0)
        monkeypatch.setenv("ASGI_BACKEND", "%s:%d" % keeping)
        assert relay(front).startswith("calls=1 recovered=False hits=1 ")
        wait_until(lambda: channels_to(keeping[1]) == 3, 30, "a channel and two spares")
        wait_until(lambda: channels_to(keeping[1]) == 1, 30, "the spares closed, untaken")
        for c in clients:
            c.close()


def test_a_new_session_takes_a_spare_channel_and_moves_with_it(rlab, monkeypatch):
    """With --spare-channels 2: once a session has opened a channel to the backend, the
    server opens two more, so the next session's first call goes on a connection the
    backend already held (no connect, no registration on its path). The spare it took
    moves with its session like any channel; the spares no session took are closed on
    the node they move to."""
    from test_continuations_support import NODE_IPS, PORT

    from backdoors.scenarios.labkit import wait_until

    monkeypatch.setenv("ASGI_BACKEND", f"{NODE_IPS['d']}:{PORT}")
    args = ("backdoors.asgi", "asgi_app:app", "--app-dir", TESTS, "--spare-channels", "2")
    d = rlab.server("d", "backdoors.asgi", "asgi_app:backend", "--app-dir", TESTS)
    a = rlab.server("a", *args)
    b = rlab.server("b", *args)

    def held(server) -> set[str]:
        sessions = server.sessions()
        for h in sessions:
            h.close()
        return {h.session for h in sessions}

    def relay(sock: socket.socket) -> str:
        sock.sendall(b"GET /relay HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, body = _response(sock)
        assert status.startswith(b"HTTP/1.1 200"), (status, body)
        return body.decode()

    first = rlab.connect()
    one = relay(first)
    assert one.startswith("calls=1 recovered=False hits=1 "), one
    wait_until(lambda: len(held(d)) == 3, 30, "the backend holding 2 spares")
    spares = held(d) - {re.search(r"conn=(\w+)", one).group(1)}
    second = rlab.connect()
    two = relay(second)
    conn = re.search(r"conn=(\w+)", two).group(1)
    assert two.startswith("calls=1 recovered=False hits=1 ") and conn in spares, (two, spares)
    a.freeze()
    rlab.recover_all(a.sessions(), b)
    assert relay(second) == f"calls=2 recovered=True hits=2 conn={conn}", rlab.logs()
    # the spares left at a came to b with no session: closed there, so the backend ends
    # up holding the two sessions' channels only
    wait_until(lambda: len(held(d)) == 2, 30, "the moved spares closed")
    assert relay(first).startswith("calls=2 recovered=True hits=2 "), rlab.logs()

"""The recoverable connection, log-based rollback, adoption and the agent seam, without
root: Unix socket pairs and loopback TCP.

The rollback property test crashes a deterministic server at arbitrary points (in the
middle of a send, a receive or between them), rebuilds it from its box and the byte
counts the kernel would report, and checks the client's stream is the uncrashed one.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
import threading
import types

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backdoors.common import runtime
from backdoors.continuations import (
    AdoptionClient,
    AdoptionError,
    AgentRegistrar,
    ContinuationError,
    Handover,
    Listener,
    LogFullError,
    NullRegistrar,
    Recovered,
    RecoveryError,
    create_cb,
    default_registrar,
    hand_over,
    read_cb,
)
from backdoors.continuations.adoption import cb_memfd
from backdoors.errors import AgentError
from backdoors.tcprepair import bytes_handed, bytes_received

NULL = NullRegistrar()


def pair(log_capacity=64 * 1024, state_capacity=1024):
    a, b = socket.socketpair()
    return create_cb(a, log_capacity=log_capacity, state_capacity=state_capacity, registrar=NULL), b


# ---------------------------------------------------------------- reading and the log


def test_reads_are_counted_and_logged_across_ring_wraps():
    cb, peer = pair(log_capacity=32)
    with cb:
        lines = [b"%02d-abcdefghij\n" % i for i in range(20)]  # 14 bytes each, ring of 32
        got = []
        for line in lines:
            peer.sendall(line)
            got.append(cb.conn.readline())
            cb.export(b"%d" % len(got))
        assert got == lines
        assert cb.conn.received == 14 * 20
        image = read_cb(cb.fd)
        assert image.export.received == image.log_end == 14 * 20
    peer.close()


def test_recv_read_recv_into_and_makefile():
    cb, peer = pair()
    with cb:
        peer.sendall(b"abcdefghij" * 3 + b"\nrest")
        assert cb.conn.recv(4) == b"abcd"
        buf = bytearray(6)
        assert cb.conn.recv_into(buf) == 6 and buf == b"efghij"
        assert cb.conn.read(5) == b"abcde"
        f = cb.conn.makefile("rwb")
        assert f.readline() == b"fghijabcdefghij\n"
        f.write(b"out")
        peer.shutdown(socket.SHUT_WR)
        assert f.read() == b"rest"
        assert cb.conn.recv(10) == b""
        assert peer.recv(10) == b"out" and cb.conn.sent == 3
    peer.close()


def test_readline_limit_and_partial_line_at_eof():
    cb, peer = pair()
    with cb:
        peer.sendall(b"x" * 100 + b"\nlast")
        peer.shutdown(socket.SHUT_WR)
        assert cb.conn.readline(40) == b"x" * 40
        assert cb.conn.readline() == b"x" * 60 + b"\n"
        assert cb.conn.readline() == b"last" and cb.conn.readline() == b""
    peer.close()


def test_a_full_receive_log_demands_an_export():
    cb, peer = pair(log_capacity=16)
    with cb:
        peer.sendall(b"0123456789abcdefXYZ")
        assert cb.conn.read(16) == b"0123456789abcdef"
        with pytest.raises(LogFullError, match="call cb.export"):
            cb.conn.recv(1)
        cb.export(b"s")
        assert cb.conn.log_room == 16 and cb.conn.recv(3) == b"XYZ"
    peer.close()


def test_create_cb_refuses_a_tcp_connection_that_already_carried_data():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        client.sendall(b"hi\n")
        conn.recv(3)
        with pytest.raises(ContinuationError, match="right after accept"):
            create_cb(conn, registrar=NULL)
        conn.close()
        client.close()


def test_a_sessions_urgent_data_is_a_logged_byte_of_its_stream():
    """MSG_OOB: in the stream the box logs (out of line, a move lost it: tcprepair)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        client.send(b"!", socket.MSG_OOB)  # before the box: a client does not wait
        with create_cb(conn, registrar=NULL) as cb:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
            client.sendall(b"ab")
            client.send(b"U", socket.MSG_OOB)
            client.sendall(b"cd")
            got = b""
            while len(got) < 6:
                got += cb.conn.recv(6 - len(got))
            assert got == b"!abUcd"
        client.close()


# ---------------------------------------------------------------- rollback


class Crash(Exception):
    """The server 'dies' here."""


class Budgeted:
    """A socket that lets `budget` more bytes through (each way together), then crashes
    in the middle of a call, and counts what the kernel would: bytes handed and read."""

    def __init__(self, sock: socket.socket, budget: float, counts: dict):
        self.sock, self.budget, self.counts = sock, budget, counts

    def _allow(self, n: int) -> int:
        if self.budget <= 0:
            raise Crash
        k = int(min(n, self.budget))
        self.budget -= k
        return k

    def send(self, data) -> int:
        k = self.sock.send(memoryview(data)[:self._allow(len(data))])
        self.counts["handed"] += k
        self.counts["sent_bytes"] += bytes(memoryview(data)[:k])
        if self.budget <= 0:
            raise Crash  # after the kernel took the bytes, before the caller counted them
        return k

    def recv_into(self, buffer, nbytes=0) -> int:
        k = self.sock.recv_into(buffer, self._allow(nbytes or len(buffer)))
        self.counts["read"] += k
        if self.budget <= 0 and k:
            raise Crash  # the bytes are in the log's ring, log_end not yet advanced
        return k

    def __getattr__(self, name):
        return getattr(self.sock, name)


class Tally(msgspec.Struct):
    lines: int = 0
    total: int = 0


def toy_server(cb, export_every: int) -> None:
    """Deterministic: each line 'n' is answered with a reply of n%37+1 bytes."""
    tally = cb.import_state(Tally) or Tally()
    while line := cb.conn.readline(100):
        n = int(line)
        tally.lines += 1
        tally.total += n
        cb.conn.sendall(b"%d:%d:" % (tally.lines, tally.total) + b"#" * (n % 37) + b"\n")
        if tally.lines % export_every == 0:
            cb.export(tally)
    cb.conn.sendall(b"END %d\n" % tally.total)


def expected_output(numbers) -> bytes:
    out, total = [], 0
    for i, n in enumerate(numbers, 1):
        total += n
        out.append(b"%d:%d:" % (i, total) + b"#" * (n % 37) + b"\n")
    return b"".join(out) + b"END %d\n" % total


def run_with_crashes(numbers, export_every, budgets, log_capacity=4096):
    """Serve `numbers` over one socket pair, crashing after each budget in turn; every
    crash is recovered from the box and the kernel-style counts. Returns the client's
    bytes."""
    server_end, client = socket.socketpair()
    client.sendall(b"".join(b"%d\n" % n for n in numbers))
    client.shutdown(socket.SHUT_WR)
    received = bytearray()
    drain = threading.Thread(target=lambda: received.extend(b"".join(_read_all(client))), daemon=True)
    drain.start()
    counts = {"handed": 0, "read": 0, "sent_bytes": bytearray()}
    cb = create_cb(server_end, log_capacity=log_capacity, registrar=NULL)
    cb.conn.sock = Budgeted(server_end, budgets[0] if budgets else float("inf"), counts)
    for i in range(len(budgets) + 1):
        try:
            toy_server(cb, export_every)
            break
        except Crash:
            image = read_cb(cb.fd)  # the box as the dead server left it
            plan = image.plan(counts["handed"], counts["read"], bytes(counts["sent_bytes"][-64:]))
            cb.region.close()  # the dead server's mapping
            budget = budgets[i + 1] if i + 1 < len(budgets) else float("inf")
            recovered = Recovered(Budgeted(server_end, budget, counts), image, plan)
            cb = create_cb(recovered, log_capacity=log_capacity, registrar=NULL)
            assert cb.recovered and cb.import_state(Tally) == image.state(Tally)
    cb.conn.sock = server_end
    cb.close()
    drain.join(10)
    client.close()
    return bytes(received)


def _read_all(sock):
    while chunk := sock.recv(65536):
        yield chunk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numbers=st.lists(st.integers(0, 10**6), min_size=1, max_size=60),
    export_every=st.integers(1, 9),
    budgets=st.lists(st.integers(0, 3000), max_size=4),
)
def test_rollback_gives_the_uncrashed_stream(numbers, export_every, budgets):
    got = run_with_crashes(numbers, export_every, budgets)
    assert got == expected_output(numbers)


def test_rollback_with_a_small_log_and_many_crashes():
    numbers = list(range(200))
    budgets = [97, 13, 500, 1, 0, 2000, 333]
    assert run_with_crashes(numbers, 3, budgets, log_capacity=256) == expected_output(numbers)


def test_input_read_ahead_is_left_out_of_an_export_and_replayed():
    """A parser that read ahead exports with `unread`: those bytes stay in the log (the
    state need not hold them) and a recovery serves them again; more than was consumed
    since the last export is refused, nothing changed."""
    cb, peer = pair(log_capacity=64)
    peer.sendall(b"REQ1REQ2REQ3")
    assert cb.conn.recv(12) == b"REQ1REQ2REQ3"  # all of it, REQ1 answered
    cb.export(b"after REQ1", unread=8)
    assert cb.conn.log_room == 64 - 8 and cb.conn.log_consumed == 8
    with pytest.raises(ValueError, match="only 8 were consumed since the last export"):
        cb.export(b"x", unread=9)
    assert cb.version == 1 and cb.conn.log_consumed == 8
    image = read_cb(cb.fd)
    a2, b2 = socket.socketpair()
    new = create_cb(Recovered(a2, image, image.plan(handed=0, read=12, tail=b"")),
                    registrar=NULL)
    assert new.import_state() == b"after REQ1"
    assert new.conn.recv(100) == b"REQ2REQ3"
    for c in (cb, new):
        c.close()
    for sock in (peer, b2):
        sock.close()


def test_a_nondeterministic_recovering_server_is_caught():
    cb, peer = pair()
    cb.conn.sendall(b"AAAA")
    cb.export(b"s")
    cb.conn.sendall(b"BBBB")
    image = read_cb(cb.fd)
    plan = image.plan(handed=8, read=0, tail=b"AABBBB")
    a2, b2 = socket.socketpair()
    new = create_cb(Recovered(a2, image, plan), registrar=NULL)
    with pytest.raises(RecoveryError, match="not deterministic"):
        new.conn.sendall(b"BBXB")
    cb.close()
    new.close()
    for s in (peer, b2):
        s.close()


def test_sendfile_skips_and_checks_what_the_client_has(tmp_path):
    path = tmp_path / "f.bin"
    content = os.urandom(300_000)
    path.write_bytes(content)
    cb, peer = pair()
    cb.export(b"at 0")
    with open(path, "rb") as f:
        cb.conn.sendfile(f, 0, 100_000)
    image = read_cb(cb.fd)
    first = peer.recv(100_000, socket.MSG_WAITALL)
    assert len(first) == 100_000
    plan = image.plan(handed=100_000, read=0, tail=content[100_000 - 500:100_000])
    a2, b2 = socket.socketpair()
    new = create_cb(Recovered(a2, image, plan), registrar=NULL)
    with open(path, "rb") as f:
        assert new.conn.sendfile(f, 0, None) == 300_000  # regenerated from the export
    new.close()
    rest = b"".join(_read_all(b2))
    assert first + rest == content
    cb.close()
    for s in (peer, b2):
        s.close()


# ---------------------------------------------------------------- adoption


@pytest.fixture
def short_tmp():
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="bdt-cb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tcp_session(short_tmp):
    """A loopback TCP session with a box, the client side, and an adoption path."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    cb = create_cb(conn, registrar=NULL)
    yield cb, client, os.path.join(short_tmp, "adopt.sock")
    cb.close()
    client.close()
    server.close()


def live_handover(cb) -> Handover:
    """The hand-over of a live loopback session (no dump: its kernel counts as they are)."""
    sock = cb.conn.sock
    return Handover(cb.session, bytes_handed(sock), bytes_received(sock))


def test_listener_yields_new_connections_and_recovered_sessions(tcp_session):
    cb, client, path = tcp_session
    client.sendall(b"request\nnext\n")
    assert cb.conn.readline() == b"request\n"
    cb.conn.sendall(b"reply-1 ")
    cb.export({"step": 1})
    cb.conn.sendall(b"reply-2 ")  # sent after the export: regenerated, then skipped
    assert cb.conn.readline() == b"next\n"  # read after the export: replayed

    with Listener.tcp("127.0.0.1", 0, adopt=path) as listener:
        got = []
        server = threading.Thread(target=lambda: got.append(listener.accept(timeout=5)))
        server.start()
        hand_over(path, cb.conn.sock, cb.fd, live_handover(cb))  # answered by accept() above
        server.join(5)
        recovered = got[0]
        assert isinstance(recovered, Recovered) and recovered.session == cb.session
        new = create_cb(recovered, registrar=NULL)
        assert new.import_state() == {"step": 1} and new.recovered
        assert new.conn.readline() == b"next\n"
        new.conn.sendall(b"reply-2 ")
        new.conn.sendall(b"reply-3")
        assert client.recv(23, socket.MSG_WAITALL) == b"reply-1 reply-2 reply-3"
        assert read_cb(new.fd).recoveries == 1

        fresh = socket.create_connection(listener.address)
        accepted = listener.accept(timeout=5)
        assert isinstance(accepted, socket.socket)
        accepted.close()
        fresh.close()
        new.close()


def _handed(path: str, sock, cb_fd: int, handover: Handover) -> Recovered:
    """Hand one session to a Listener at `path` and return what its accept() gives."""
    with Listener.tcp("127.0.0.1", 0, adopt=path) as listener:
        got = []
        server = threading.Thread(target=lambda: got.append(listener.accept(timeout=5)))
        server.start()
        hand_over(path, sock, cb_fd, handover)
        server.join(5)
    assert isinstance(got[0], Recovered), got
    return got[0]


def _opened(fd: int) -> int:
    """How many of this process's descriptors refer to the file of `fd`."""
    st, n = os.fstat(fd), 0
    for name in os.listdir("/proc/self/fd"):
        try:
            other = os.fstat(int(name))
        except OSError:
            continue
        n += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    return n


def test_a_recovered_box_is_the_copy_handed_over_taken_over(tcp_session):
    """The copy the agent made for the hand-over becomes the box: the same file, with
    this process's pid, one more recovery and the log's end; its exports land there (the
    agent holds that file as the session's stand-in)."""
    cb, client, path = tcp_session
    client.sendall(b"request\nnext\n")
    assert cb.conn.readline() == b"request\n"
    cb.conn.sendall(b"reply-1 ")
    cb.export({"step": 1})
    assert cb.conn.readline() == b"next\n"  # read after the export: replayed
    copy = cb_memfd(cb.name, os.pread(cb.fd, os.fstat(cb.fd).st_size, 0))
    try:
        recovered = _handed(path, cb.conn.sock, copy, live_handover(cb))
        new = create_cb(recovered, registrar=NULL)
        assert recovered.cb_fd == -1  # taken
        assert os.fstat(new.fd).st_ino == os.fstat(copy).st_ino
        image = read_cb(copy)
        assert (image.owner_pid, image.recoveries, image.log_end) == (os.getpid(), 1, 13)
        assert image.local == cb.conn.sock.getsockname()[:2]  # the header kept as it was
        assert new.import_state() == {"step": 1} and new.conn.readline() == b"next\n"
        new.conn.sendall(b"reply-2")
        assert client.recv(15, socket.MSG_WAITALL) == b"reply-1 reply-2"
        new.export({"step": 2})
        assert read_cb(copy).export.version == 2
        new.close()
    finally:
        os.close(copy)


def test_a_box_not_made_for_the_hand_over_or_too_small_is_copied(tcp_session):
    """A server's own region (not a hand-over copy) is never written by the recovering
    server, nor is a copy smaller than the capacities it asks for: each is copied into a
    new box, and the copy's duplicate is closed."""
    cb, client, path = tcp_session
    cb.export({"step": 1})
    copy = cb_memfd(cb.name, os.pread(cb.fd, os.fstat(cb.fd).st_size, 0))
    try:
        for fd, capacity in ((cb.fd, 4096), (copy, 8192)):
            before = _opened(fd)
            recovered = _handed(path, cb.conn.sock, fd, live_handover(cb))
            new = create_cb(recovered, state_capacity=capacity, registrar=NULL)
            assert os.fstat(new.fd).st_ino not in (os.fstat(cb.fd).st_ino,
                                                    os.fstat(copy).st_ino)
            assert read_cb(fd).recoveries == 0 and read_cb(new.fd).recoveries == 1
            assert new.import_state() == {"step": 1}
            new.close()
            assert _opened(fd) == before  # the duplicate the server got went too
    finally:
        os.close(copy)


def test_a_recovered_session_dropped_unopened_closes_its_copy(tcp_session):
    cb, client, path = tcp_session
    copy = cb_memfd(cb.name, os.pread(cb.fd, os.fstat(cb.fd).st_size, 0))
    try:
        recovered = _handed(path, cb.conn.sock, copy, live_handover(cb))
        assert recovered.cb_fd >= 0 and _opened(copy) == 2
        recovered.close()
        assert recovered.cb_fd == -1 and _opened(copy) == 1
        recovered = _handed(path, cb.conn.sock, copy, live_handover(cb))
        assert _opened(copy) == 2
        del recovered  # never opened nor closed: the copy goes with it
        gc.collect()
        assert _opened(copy) == 1
    finally:
        os.close(copy)


@pytest.mark.parametrize("spoil, match", [
    (lambda h: msgspec.structs.replace(h, session="00" * 16), "names session"),
    (lambda h: msgspec.structs.replace(h, handed=0), "newer than the socket"),
])  # a batch of another hand-over version: test_adoption_fuzz
def test_a_bad_handover_is_refused_with_its_reason(tcp_session, spoil, match):
    cb, client, path = tcp_session
    cb.conn.sendall(b"x")
    cb.export(b"s")
    with Listener(adopt=path) as listener:
        got = []
        server = threading.Thread(target=lambda: got.append(listener.accept(timeout=5)))
        server.start()
        with AdoptionClient(path) as agent:
            with pytest.raises(AdoptionError, match=match):
                agent.hand_over(cb.conn.sock, cb.fd, spoil(live_handover(cb)))
            # the server goes on: a good hand-over on the same connection is accepted
            agent.hand_over(cb.conn.sock, cb.fd, live_handover(cb))
        server.join(5)
        assert isinstance(got[0], Recovered)
        got[0].close()


def test_garbage_on_the_adoption_socket_is_refused(tcp_session):
    _, _, path = tcp_session
    with Listener(adopt=path) as listener:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(path)
        raw.send(len(b"\x93garbage").to_bytes(4, "big") + b"\x93garbage")
        assert listener.accept(timeout=0.5) is None  # refused, nothing yielded
        assert b"does not decode" in raw.recv(4096)
        raw.close()


def test_adoption_path_in_use_and_stale(short_tmp):
    path = os.path.join(short_tmp, "a.sock")
    with Listener(adopt=path):
        with pytest.raises(AdoptionError, match="another recovery server"):
            Listener(adopt=path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a dead server's file
    with Listener(adopt=path):
        pass
    assert not os.path.exists(path)
    with pytest.raises(AdoptionError, match="no recovery server"):
        AdoptionClient(path)


def test_listener_close_ends_a_blocked_accept():
    listener = Listener.tcp("127.0.0.1", 0)
    result = []
    t = threading.Thread(target=lambda: result.append(listener.accept()))
    t.start()
    listener.close()
    t.join(5)
    assert result == [None]
    listener.release()


# ---------------------------------------------------------------- the agent seam


class FakeAgent:
    def __init__(self, fail: str = ""):
        self.calls, self.fail = [], fail

    def register_region(self, fd, *, name, kind):
        self._call("register_region", os.fstat(fd).st_size, name, kind)

    def hold_socket(self, fd, *, name):
        self._call("hold_socket", socket.socket(fileno=os.dup(fd)).type, name)

    def release(self, name):
        self._call("release", name)

    def _call(self, op, *args):
        self.calls.append((op, *args))
        if op == self.fail:
            raise AgentError(f"{op} refused")


def test_agent_registrar_hands_over_region_and_socket():
    agent = FakeAgent()
    a, b = socket.socketpair()
    cb = create_cb(a, registrar=AgentRegistrar(agent))
    assert cb.registered
    size = os.fstat(cb.fd).st_size
    cb.close()
    assert agent.calls == [("register_region", size, cb.name, "cb"),
                           ("hold_socket", socket.SOCK_STREAM, cb.name),
                           ("release", cb.name)]
    b.close()


@pytest.mark.parametrize("fail", ["register_region", "hold_socket"])
def test_a_refusing_agent_leaves_the_session_served_unregistered(fail):
    agent = FakeAgent(fail)
    a, b = socket.socketpair()
    with create_cb(a, registrar=AgentRegistrar(agent)) as cb:
        assert not cb.registered
        cb.conn.sendall(b"still served")
        assert b.recv(100) == b"still served"
    if fail == "hold_socket":
        assert agent.calls[-1] == ("release", cb.name)
    b.close()


def test_default_registrar_follows_the_environment():
    assert isinstance(default_registrar({}), NullRegistrar)
    registrar = default_registrar({"BACKDOORS_AGENT_SOCKET": "/run/x/agent.sock"})
    assert isinstance(registrar, AgentRegistrar) and registrar.client is runtime
    with pytest.raises(ContinuationError, match="lacks hold_socket, release"):
        AgentRegistrar(types.SimpleNamespace(register_region=print))

"""Transparent session recovery end to end, on the real kernel, without an agent.

Example servers run as processes in network namespaces; the harness (see
test_continuations_support) freezes or kills the server, locks, dumps, moves and restores
the session, and hands it to a recovery server. The clients check every byte: the
stream must be exactly the one they would have received without the failure.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from test_continuations_support import (  # noqa: F401 - rlab is a fixture
    NODE_IPS,
    PORT,
    Background,
    assert_exact,
    numbered,
    rlab,
    wait_for,
)

from backdoors.examples import file_client, line_client, line_server
from backdoors.net import netns

FILE_SIZE = 24 << 20
FREEZE_AT = 3 << 20


@pytest.fixture
def files(rlab):
    """A numbered file served by the file servers, and its content."""
    data = numbered(FILE_SIZE)
    root = os.path.join(rlab.tmp, "files")
    os.mkdir(root)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(data)
    return root, data


def fetch_with_fault(rlab, server, fault: str, at: int = FREEZE_AT, half_close: bool = False):
    """Start a download of big.bin; when `at` bytes have arrived, freeze or crash `server`
    (holding its session first, as the agent does). Returns (client, held session)."""
    sock = rlab.connect()
    reached = threading.Event()
    held: list = []

    def progress(total: int) -> None:
        if total >= at and not reached.is_set():
            if fault == "crash":
                held.extend(server.sessions())  # the agent's duplicates, taken beforehand
                server.kill()
            else:
                server.freeze()
            reached.set()

    client = Background(file_client.fetch, sock, "big.bin", progress, half_close)
    wait_for(reached, f"{at} bytes at the client", client=client)
    if fault != "crash":
        held.extend(server.sessions())  # pidfd_getfd on the frozen process
    assert len(held) == 1, f"expected one session, found {len(held)}"
    return client, held[0]


@pytest.mark.parametrize("fault", ["freeze", "crash"])
def test_file_server_recovers_mid_stream(rlab, files, fault):
    """The client gets the whole file once: skipped what it had, nothing missing."""
    root, data = files
    a = rlab.server("a", "file_server", "--root", root)
    b = rlab.server("b", "file_server", "--root", root)
    client, held = fetch_with_fault(rlab, a, fault)

    move = rlab.recover(held, b)
    assert FREEZE_AT <= move.state.handed < FILE_SIZE, "the fault must hit mid-stream"
    assert move.image.export.version >= 1
    assert 0 <= move.skip <= 256 * 1024  # at most one export interval regenerated
    assert move.replay == 0  # the file name was consumed before the first export

    assert_exact(client.result(), data)


@pytest.mark.parametrize("fault", ["freeze", "crash"])
def test_file_server_recovers_a_client_that_half_closed(rlab, files, fault):
    """The client shut its writing side down after the file's name (nc -N): the session
    is half-closed (CLOSE_WAIT at the server) when it moves, and still gets the whole
    file once, then the end."""
    root, data = files
    a = rlab.server("a", "file_server", "--root", root)
    b = rlab.server("b", "file_server", "--root", root)
    client, held = fetch_with_fault(rlab, a, fault, half_close=True)

    move = rlab.recover(held, b)
    assert move.state.peer_fin, "the client's FIN must have reached the server"
    assert FREEZE_AT <= move.state.handed < FILE_SIZE
    assert_exact(client.result(), data)


def test_file_server_recovers_twice(rlab, files):
    """A session recovered from a recovered server: byte counts chain through since=."""
    root, data = files
    a = rlab.server("a", "file_server", "--root", root)
    b = rlab.server("b", "file_server", "--root", root)
    d = rlab.server("d", "file_server", "--root", root)
    sock = rlab.connect()
    first, second = threading.Event(), threading.Event()
    second_at = [FILE_SIZE]  # set once the first recovery tells what A had handed

    def progress(total: int) -> None:
        if total >= FREEZE_AT and not first.is_set():
            a.freeze()
            first.set()
        elif total >= second_at[0] and not second.is_set():
            b.freeze()  # B is serving: the client has bytes only B can have sent
            second.set()

    client = Background(file_client.fetch, sock, "big.bin", progress)
    wait_for(first, "the first fault", client=client)
    (held,) = a.sessions()
    move1 = rlab.recover(held, b)
    second_at[0] = move1.state.handed + (1 << 20)
    wait_for(second, "the second fault", client=client)
    (held,) = b.sessions()
    assert held.session == move1.image.session_id
    move2 = rlab.recover(held, d, since=move1.state)

    assert move2.image.recoveries == 1 and move2.image.export.version > move1.image.export.version
    assert move1.state.handed < move2.state.handed < FILE_SIZE
    assert 0 <= move2.skip <= 256 * 1024
    assert_exact(client.result(), data)


def test_file_server_recovers_several_sessions(rlab, files):
    """Three downloads at different points move together, each byte-exact."""
    root, data = files
    a = rlab.server("a", "file_server", "--root", root)
    b = rlab.server("b", "file_server", "--root", root)
    gates = [threading.Event() for _ in range(3)]
    frozen = threading.Event()
    clients = []
    for i, gate in enumerate(gates):
        def progress(total: int, gate=gate, at=(i + 1) << 20) -> None:
            if total >= at:
                gate.set()
                frozen.wait()  # this client pauses until the server is frozen
        clients.append(Background(file_client.fetch, rlab.connect(), "big.bin", progress))
    for gate in gates:
        wait_for(gate, "every download under way")
    a.freeze()
    frozen.set()
    held = a.sessions()
    assert len(held) == 3
    moves = rlab.recover_all(held, b)
    assert len({m.image.session_id for m in moves}) == 3
    for client in clients:
        assert_exact(client.result(), data)


@pytest.mark.parametrize("fault", ["freeze", "crash"])
def test_line_server_replays_the_receive_log(rlab, fault):
    """The client keeps sending; commands read since the last export are replayed from
    the log, so every answer (a running total) stays right."""
    a = rlab.server("a", "line_server")
    b = rlab.server("b", "line_server")
    sock = rlab.connect()
    reached = threading.Event()
    held: list = []
    count = 60_000
    # The server exports after every 16th command. The fault comes at answer 20,007, and
    # the client sends nothing past command 20,015 until then: the server has read
    # commands 20,001..20,007 at least (it answered them) after its export at 20,000, and
    # cannot have reached the next export (20,016). So there is input to replay whatever
    # the scheduling.
    fault_at = 20_007
    next_export = fault_at - fault_at % line_server.EXPORT_EVERY + line_server.EXPORT_EVERY

    def pace(i: int) -> None:
        if i == next_export:
            reached.wait(60)

    def progress(i: int) -> None:
        if i == fault_at and not reached.is_set():
            if fault == "crash":
                held.extend(a.sessions())
                a.kill()
            else:
                a.freeze()
            reached.set()

    client = Background(line_client.run, sock, count, progress, pace)
    wait_for(reached, "the fault", client=client)
    if fault != "crash":
        held.extend(a.sessions())
    move = rlab.recover(held[0], b)
    assert move.replay > 0, "input read after the last export must be replayed"
    assert move.image.log_end <= move.state.read
    assert client.result() == count * (count + 1) // 2, rlab.logs()


def test_a_flooded_server_still_takes_the_sessions_a_recovery_hands_it(rlab):
    """A recovery server flooded with more connections than it has descriptors for
    (RLIMIT_NOFILE 400) accepts new ones up to its limit only (half its descriptors past
    its own 256: 24 sessions of 3), so the sessions a recovery then hands it arrive whole
    and carry on.
    Without the limit it ran out of descriptors and the hand-over was refused."""
    a = rlab.server("a", "line_server")
    b = rlab.server("b", "line_server", nofile=400)
    clients = [rlab.connect() for _ in range(3)]
    for i, c in enumerate(clients, 1):
        c.sendall(b"ADD %d\n" % i)
        assert c.recv(100) == b"TOTAL %d\n" % i
    flood = []
    for _ in range(600):
        f = netns.socket_in(rlab.ns["c"])
        f.setblocking(False)
        f.connect_ex((NODE_IPS["b"], PORT))  # the backlog's connect at once, the rest retry
        flood.append(f)
    rlab.held.extend(flood)
    end = time.monotonic() + 30
    while "serving its limit of 24 sessions" not in b.log():
        assert time.monotonic() < end, f"b did not reach its limit:\n{b.log()}"
        time.sleep(0.1)
    time.sleep(1.5)  # the first SYNs dropped are sent again (1 s): more connections wait
    a.freeze()
    rlab.recover_all(a.sessions(), b)  # every session accepted (asserted there)
    for i, c in enumerate(clients, 1):
        c.sendall(b"ADD 10\n")
        assert c.recv(100) == b"TOTAL %d\n" % (i + 10), rlab.logs()
    assert "Too many open files" not in b.log()

"""The agent client's time bound: a call's timeout covers all of it, a reconnect included.

Against a stand-in agent on loopback (no lab): it answers one frame, then closes the
connection in the middle of the next exchange, while its listening socket's backlog is
full, so that the client's second connect hangs (the kernel drops its SYNs)."""

import socket
import threading
import time

import pytest

from backdoors.agent import AgentClient
from backdoors.agent.errors import TransportError
from backdoors.agent.keys import new_identity
from backdoors.agent.protocol import frame

TIMEOUT_S = 2.0
HOLD_S = 1.2  # the stand-in holds the second request this long, then closes


def _read_frame(conn: socket.socket) -> bytes:
    head = conn.recv(4, socket.MSG_WAITALL)
    return conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)


def _stand_in(listener: socket.socket, answered: threading.Event) -> None:
    conn, _ = listener.accept()
    with conn:
        _read_frame(conn)
        conn.sendall(frame(b"pong"))
        answered.set()
        _read_frame(conn)
        time.sleep(HOLD_S)


def test_a_reconnect_gets_only_what_is_left_of_the_calls_time():
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    answered = threading.Event()
    server = threading.Thread(target=_stand_in, args=(listener, answered), daemon=True)
    server.start()
    fillers = []
    client = AgentClient(listener.getsockname(), new_identity("m1"), "h1",
                         new_identity("h1").public, timeout=TIMEOUT_S)
    try:
        assert client.exchange(b"ping") == b"pong"
        assert answered.wait(5)
        # fill the accept queue (not accepted from now on): a new connect hangs
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        start = time.monotonic()
        with pytest.raises(TransportError, match="cannot connect"):
            client.exchange(b"ping")
        elapsed = time.monotonic() - start
        # the old client gave the second connect the whole timeout: HOLD_S + TIMEOUT_S
        assert HOLD_S <= elapsed < TIMEOUT_S + 0.6, f"the call took {elapsed:.3f} s"
    finally:
        client.close()
        for s in fillers:
            s.close()
        listener.close()
        server.join(5)


def test_request_times_never_go_back_when_the_wall_clock_does(monkeypatch):
    """Outside review: an agent refuses a lock or unlock signed before the latest it took
    from the signer (stale_request); a monitor whose wall clock NTP stepped back would
    have had its locks and fences refused for as long as the step. Request times never
    go back."""
    from backdoors.agent import client

    wall = iter([1000.0, 1000.5, 990.0, 990.1, 1001.0])
    monkeypatch.setattr(client.time, "time", lambda: next(wall))
    clock = client._SigningClock()
    times = [clock() for _ in range(5)]
    assert times == sorted(times) and len(set(times)) == 5 and times[-1] == 1001.0

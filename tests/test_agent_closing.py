"""The agent's Closer: a close a node stalls (its SO_LINGER set again after the agent
cleared it, as a node that wins that race does) is left to its thread and the others go
on; at most MAX_STALLED threads are left so."""

import os
import select
import socket
import struct

import pytest
from test_nodes_support import wait_for

from backdoors.agent import closing
from backdoors.agent.closing import Closer


@pytest.fixture
def lingering(monkeypatch):
    """Sockets whose close waits for their linger time (600 s): a full send queue towards a
    client that reads nothing, SO_LINGER set after the Closer's defuse (here: none). Each
    is (its fd, the agent's last reference; its client, whose close resets it)."""
    monkeypatch.setattr(closing, "defuse", lambda fd: None)  # the node won the race
    clients = []

    def make() -> tuple[int, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as lst:
            client = socket.create_connection(lst.getsockname())
            server, _ = lst.accept()
        clients.append(client)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                server.send(b"x" * 65536)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 600))
        return server.detach(), client

    yield make
    for client in clients:
        client.close()  # (with unread input: a reset, which ends any linger)


def _closed(closer: Closer, timeout: float) -> bool:
    """Queue a pipe's write end on `closer`: whether its reader saw it closed in time."""
    r, w = os.pipe()
    try:
        closer.close(w)
        return bool(select.select([r], [], [], timeout)[0]) and os.read(r, 1) == b""
    finally:
        os.close(r)


def test_a_stalled_close_is_left_to_its_thread_and_the_others_go_on(lingering):
    closer = Closer()
    closer.start()
    try:
        fd, client = lingering()
        closer.close(fd)
        assert _closed(closer, 30)  # not after the 600 s of the stalled one
        assert closer.stalled >= 1  # (2 if the pipe's close was slow enough to look stalled)
        client.close()  # the reset ends the linger: the stalled thread is back, and ends
        wait_for(lambda: closer.stalled == 0, 30, "the stalled thread back")
        assert _closed(closer, 30)
    finally:
        closer.stop()


def test_past_max_stalled_the_next_close_waits_for_one_to_be_back(lingering, monkeypatch):
    monkeypatch.setattr(closing, "MAX_STALLED", 1)
    closer = Closer()
    closer.start()
    try:
        (fd1, client1), (fd2, _) = lingering(), lingering()
        closer.close(fd1)
        wait_for(lambda: closer.stalled == 1, 30, "the first close left stalled")
        closer.close(fd2)  # stalls the thread that replaced the first: none replaces it
        assert not _closed(closer, 2 * closing.STALL_S + 1)
        client1.close()  # the first is back: the second is left in its turn
        assert _closed(closer, 30) and closer.stalled >= 1
    finally:
        closer.stop()


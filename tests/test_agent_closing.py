"""The agent's Closer: a close a node stalls (its SO_LINGER set again after the agent
cleared it, as a node that wins that race does) is left to its thread and the others go
on; at most MAX_STALLED_PER_NODE threads are left so per node, MAX_STALLED in all, and past
either only that node's closes wait: another node's never do."""

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


def _closed(closer: Closer, timeout: float, node: str = "n0") -> bool:
    """Queue a pipe's write end on `closer` as `node`'s: whether its reader saw it closed
    in time."""
    r, w = os.pipe()
    try:
        closer.close(node, w)
        return bool(select.select([r], [], [], timeout)[0]) and os.read(r, 1) == b""
    finally:
        os.close(r)


def test_a_stalled_close_is_left_to_its_thread_and_the_others_go_on(lingering):
    closer = Closer()
    closer.start()
    try:
        fd, client = lingering()
        closer.close("n0", fd)
        assert _closed(closer, 30)  # not after the 600 s of the stalled one
        assert closer.stalled >= 1  # (2 if the pipe's close was slow enough to look stalled)
        client.close()  # the reset ends the linger: the stalled thread is back, and ends
        wait_for(lambda: closer.stalled == 0, 30, "the stalled thread back")
        assert _closed(closer, 30)
    finally:
        closer.stop()


@pytest.mark.parametrize("cap", ["MAX_STALLED_PER_NODE", "MAX_STALLED"])
def test_past_a_cap_the_nodes_next_close_waits_for_one_back_and_no_other_nodes(
        lingering, monkeypatch, cap):
    monkeypatch.setattr(closing, cap, 1)
    closer = Closer()
    closer.start()
    try:
        (fd1, client1), (fd2, _) = lingering(), lingering()
        closer.close("n0", fd1)
        wait_for(lambda: closer.stalled_of("n0") == 1, 30, "the first close left stalled")
        closer.close("n0", fd2)  # stalls the thread that replaced the first: none replaces it
        assert not _closed(closer, 2 * closing.STALL_S + 1)
        for _ in range(3):  # another node's closes go on, on a thread of their own
            assert _closed(closer, 30, node="n1")
        assert closer.stalled_of("n1") == 0
        client1.close()  # the first is back: the second is left in its turn
        assert _closed(closer, 30) and closer.stalled_of("n0") >= 1
    finally:
        closer.stop()


def test_nodes_that_each_stall_their_closes_hold_up_no_other_node(lingering):
    """As many stalling nodes as MAX_STALLED takes, each past its own cap: the threads left
    stay within MAX_STALLED, and a quiet node's closes are not held up by any."""
    closer = Closer()
    closer.start()
    stallers = closing.MAX_STALLED // closing.MAX_STALLED_PER_NODE + 1
    try:
        for i in range(stallers):
            for _ in range(closing.MAX_STALLED_PER_NODE + 1):
                closer.close(f"bad{i}", lingering()[0])
        wait_for(lambda: closer.stalled == closing.MAX_STALLED, 60,
                 "every stall the cap allows left to its thread")
        assert _closed(closer, 30, node="quiet")
        assert closer.stalled == closing.MAX_STALLED
    finally:
        closer.stop()


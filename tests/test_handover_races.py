"""Hand-overs of recovered sessions racing the recovery server (agent side).

A recovery server answers a hand-over, then serves the session and registers its box on
its own thread; the agent goes on after the verdicts. These tests fix each order of
events (no timing decides them) with real sockets, memfds and the agent's real tables:

- after `adopt`, the agent holds a handed-over session's box as a stand-in until the
  server registers its own; a stand-in coming after the server's registration must not
  replace it (the copy holds an older export: a later recovery would resume from there);
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from backdoors.agent.protocol import MovedSession
from backdoors.agent.recovery import Started, _hold
from backdoors.agent.regions import RegionTable
from backdoors.agent.sessions import SessionTable
from backdoors.continuations import cbformat
from backdoors.continuations.image import parse_cb
from backdoors.continuations.region import CbRegion

NODE = "n0"


def _tables():
    regions = RegionTable([NODE], max_regions=8, max_region_bytes=1 << 20,
                          max_node_bytes=1 << 22)
    return regions, SessionTable([NODE], max_per_node=8)


@pytest.fixture
def tcp_pair():
    """A connected loopback TCP pair (server side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname())
        server, _ = lst.accept()
    yield server, client
    server.close()
    client.close()


def _box(session: bytes, version: int, sent: int) -> CbRegion:
    """A Continuation Box whose last export is `version`, taken after `sent` bytes."""
    region = CbRegion.create(session, state_capacity=64, log_capacity=64)
    region.write_export(version, sent, 0, cbformat.Encoding.RAW, b"%d" % sent)
    return region


def _export_held(regions: RegionTable, name: str) -> int:
    with regions.use(NODE, name) as entry:
        return parse_cb(entry.region.read(0, entry.size)).export.version


def test_stand_in_box_never_replaces_the_servers_own(tcp_pair):
    """The server registered its box (export 7) before the agent's `_hold` of the copy it
    handed over (export 3): the agent keeps the server's, and the socket is held."""
    regions, sessions = _tables()
    session = os.urandom(cbformat.SESSION_SIZE)
    name, pid = f"cb-{session.hex()}", os.getpid()  # this process plays the server
    handed_copy, own = _box(session, 3, 3000), _box(session, 7, 7000)
    call = SimpleNamespace(node=SimpleNamespace(name=NODE),
                           agent=SimpleNamespace(sessions=sessions, regions=regions))
    try:
        regions.keep(NODE, name, "cb", own.fd, pid)  # the server's attach won the race
        sessions.hold(NODE, name, tcp_pair[0].fileno(), pid)
        item = Started(MovedSession(name, b"", b""), None, tcp_pair[0], handed_copy.fd)
        _hold(call, item, pid)
        assert _export_held(regions, name) == 7
        assert [s.name for s in sessions.list(NODE)] == [name]
        # the other order: the stand-in first, then the server's own replaces it
        regions.remove(NODE, name)
        _hold(call, item, pid)
        assert _export_held(regions, name) == 3
        regions.keep(NODE, name, "cb", own.fd, pid)
        assert _export_held(regions, name) == 7
    finally:
        handed_copy.close()
        own.close()
        sessions.close()
        for entry in regions.entries(NODE):
            regions.remove(NODE, entry.name)

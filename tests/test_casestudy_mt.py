"""The case study's middle tier as a process: a real MT in a lab node against a real
PostgreSQL node, called over its wire, and a channel moved to a second MT node by the
agents (fence, evacuate) with a bid in flight: the bid is replayed there and applied once."""

from __future__ import annotations

import socket
import struct

import msgspec
import pytest

import psycopg  # noqa: E402

from backdoors.casestudy.rubis import middle, wire  # noqa: E402
from backdoors.casestudy.rubis.dataset import Scale  # noqa: E402
from backdoors.casestudy.rubis.wire import Answer, Call  # noqa: E402
from test_casestudy_support import rubis_lab  # noqa: E402

SMALL = Scale(users=100, items=100, bids=500, comments=50, seed=3)
SECRET = "mt-test-secret"


@pytest.fixture(scope="module")
def mts():
    """A lab of 2 hosts: MT a in n0 (h0), MT b in n1 (h1), PostgreSQL in n2 (h0)."""
    from backdoors.casestudy.rubis import site

    with rubis_lab("mt", hosts=2, nodes=3, db_node="n2", scale=SMALL) as (lab, pg):
        a = site.start_mt(lab, "n0", pg, secret=SECRET)
        b = site.start_mt(lab, "n1", pg, secret=SECRET)
        yield lab, pg, a, b


def _recv(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "the middle tier closed the channel"
        got += chunk
    return got


class Channel:
    """A front end's side of one channel, blocking (the test plays the front end)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.id = sock, 0

    def send(self, op: str, key: str = "", **args) -> int:
        self.id += 1
        self.sock.sendall(wire.frame(Call(self.id, op, args, key)))
        return self.id

    def answer(self) -> Answer:
        (n,) = struct.unpack(">I", _recv(self.sock, 4))
        return msgspec.msgpack.decode(_recv(self.sock, n), type=Answer)

    def call(self, op: str, key: str = "", **args) -> Answer:
        sent = self.send(op, key, **args)
        got = self.answer()
        assert got.id == sent
        return got


def _count(pg, sql: str, *args):
    with psycopg.connect(pg.local_dsn()) as c:
        return c.execute(sql, args).fetchone()[0]


def test_calls_over_the_wire_to_a_real_middle_tier(mts):
    lab, pg, a, _ = mts
    from backdoors.casestudy.rubis import site

    ch = Channel(site.connect(lab, a))
    assert len(ch.call("categories").result) == 20
    assert ch.call("resume", user=4, proof=wire.proof(SECRET.encode(), 4)).result == {
        "ok": True, "user": 4}
    # anyone who reaches the port is not a front end: no proof, no login (outside review)
    for bad in ({}, {"proof": wire.proof(b"guess", 5)}, {"proof": wire.proof(SECRET.encode(), 4)}):
        refused = ch.call("resume", user=5, **bad)
        assert not refused.ok and "resume refused" in refused.error, refused
    first = ch.call("bid", key="mt-proc-bid-01", item=3, bid="99999")
    assert first.ok and first.result["ok"], first
    assert ch.call("bid", key="mt-proc-bid-01", item=3, bid="99999").result == first.result
    assert not ch.call("bid", item=3, bid="1").ok  # no key: refused
    assert _count(pg, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                  site.mt_name("n0")) >= 1  # its pool, by name (what a fence terminates)
    # a peer that sends half a frame is closed once CALL_S has passed (outside review: it
    # held its session, and the listener's room, for good)
    half = site.connect(lab, a)
    half.sendall(b"\x00\x10")
    half.settimeout(middle.CALL_S + 20)
    assert half.recv(1) == b""
    half.close()
    assert len(ch.call("categories").result) == 20  # the others are served on
    ch.sock.close()


def test_a_channel_moves_to_another_middle_tier_and_its_bid_applies_once(mts):
    """The bid is read by MT a and waits in its transaction (the item's row is locked by
    the test) when node n0 fails: n0 is fenced, its database connections terminated (its
    transaction, holding the bid's key, rolls back), the channel evacuated to n1. MT b
    replays the bid from the receive log: applied once, answered on the same channel,
    and the channel's login carried over."""
    lab, pg, a, b = mts
    from backdoors.casestudy.rubis import site
    from backdoors.scenarios.labkit import wait_until

    item = 11
    ch = Channel(site.connect(lab, a))
    assert ch.call("login", nickname="user9", password="password9").result["user"] == 9
    with lab.agent_client("h0") as c0:
        wait_until(lambda: len(c0.sessions("n0")) == 1, 10, "the channel held by n0's agent")
        bids_before = _count(pg, "SELECT nb_of_bids FROM items WHERE id = %s", item)
        with psycopg.connect(pg.local_dsn()) as lock:  # the item's row, locked
            lock.execute("SELECT 1 FROM items WHERE id = %s FOR UPDATE", (item,))
            sent = ch.send("bid", key="mt-move-bid-01", item=item, bid="88888")
            wait_until(lambda: _count(
                pg, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND "
                    "wait_event_type = 'Lock'", site.mt_name("n0")) == 1, 10,
                "MT a's bid waiting on the item's lock")
            c0.fence("n0")
            assert pg.terminate(site.mt_name("n0")) >= 1
            ev = c0.evacuate("n0", lab.agent_address("h1"), "h1", "n1", timeout=30)
            assert (ev.sessions, ev.moved, ev.failed) == (1, 1, {}), ev
            # MT b replays the bid; it waits for the item's lock, which goes now
            lock.rollback()
        ch.sock.settimeout(30)
        got = ch.answer()
        assert got.id == sent and got.ok and got.result["ok"], got
        assert _count(pg, "SELECT nb_of_bids FROM items WHERE id = %s", item) == bids_before + 1
        assert _count(pg, "SELECT count(*) FROM bids WHERE item_id = %s AND bid = 88888",
                      item) == 1
        # the same channel goes on at MT b, logged in as before; a replay of the key
        # answers the recorded result
        again = ch.call("bid", key="mt-move-bid-01", item=item, bid="88888")
        assert again.result == got.result
        higher = ch.call("bid", key="mt-move-bid-02", item=item, bid="88889")
        assert higher.ok and higher.result["ok"], higher
        assert _count(pg, "SELECT count(*) FROM bids WHERE item_id = %s AND user_id = 9",
                      item) == 2
        assert b.proc.poll() is None
        ch.sock.close()

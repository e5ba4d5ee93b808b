"""The agent's event stream (agent.events): signed frames, in order, once, across a
reconnect; a subscriber that does not read never blocks the agent."""

import time

import pytest
import msgspec

from test_agent_support import agent_lab, prefix, wait_for  # noqa: F401 - fixtures

from backdoors.agent.events import EventFrame
from backdoors.agent.keys import verify
from backdoors.agent.protocol import EVENT_DOMAIN, Envelope

pytestmark = pytest.mark.root


def _subscribe(lab, monitor: str | None = None, **args):
    c = lab.client() if monitor is None else lab.client(monitor)
    reply = c.call("subscribe", **args)
    sock = c.take_socket()
    sock.settimeout(10)
    return reply, sock


def _frames(sock, key, want: int, timeout: float = 60) -> list[EventFrame]:
    out = []
    end = time.monotonic() + timeout
    while len(out) < want:
        assert time.monotonic() < end, f"{len(out)} of {want} events within {timeout} s"
        size = int.from_bytes(_exactly(sock, 4), "big")
        env = msgspec.msgpack.decode(_exactly(sock, size), type=Envelope)
        assert verify([key], EVENT_DOMAIN, env.body, env.sig)  # the agent's signature
        ev = msgspec.msgpack.decode(env.body, type=EventFrame)
        assert ev.kind != "gap", f"{ev.gap} events lost after {len(out)}"
        if ev.kind != "heartbeat":
            out.append(ev)
    return out


def _exactly(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the agent closed the event stream"
        buf += chunk
    return buf


def test_events_arrive_once_in_order_and_survive_a_reconnect(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    bus, key = lab.agent.agent.events, lab.agent_key.public
    reply, sock = _subscribe(lab)
    for i in range(50):
        bus.publish("test", f"n{i % 2}", i=i)
    got = _frames(sock, key, 50)
    assert [e.seq for e in got] == list(range(reply["last_seq"] + 1, reply["last_seq"] + 51))
    assert [e.data["i"] for e in got] == list(range(50))
    last = got[-1].seq
    sock.close()  # the monitor goes away; events go on
    for i in range(50, 80):
        bus.publish("test", f"n{i % 2}", i=i)
    _, sock = _subscribe(lab, epoch=reply["epoch"], since=last)
    bus.publish("test", "n0", i=80)
    again = _frames(sock, key, 31)
    assert [e.data["i"] for e in again] == list(range(50, 81))  # once each, in order
    assert all(e.gap == 0 for e in again)
    sock.close()


def test_a_subscriber_that_does_not_read_blocks_nobody(agent_lab):
    lab = agent_lab()
    bus, key = lab.agent.agent.events, lab.agent_key.public
    from backdoors.agent import events
    _, stuck = _subscribe(lab)  # never reads: its queue overflows, its socket fills
    reply, sock = _subscribe(lab)
    batch, got = events.QUEUE_MAX // 2, []
    for start in range(0, 3 * events.QUEUE_MAX, batch):  # within what a reader may queue
        for i in range(start, start + batch):
            bus.publish("test", "n0", pad="x" * 400, i=i)
        got += _frames(sock, key, batch)
    assert [e.data["i"] for e in got] == list(range(3 * events.QUEUE_MAX))
    assert lab.client().ping()  # the agent answers
    stuck.close()
    sock.close()


def test_events_lost_beyond_the_history_are_announced_as_a_gap(agent_lab):
    from backdoors.agent import events
    lab = agent_lab()
    bus, key = lab.agent.agent.events, lab.agent_key.public
    reply, sock = _subscribe(lab)
    sock.close()
    for i in range(events.HISTORY + 10):
        bus.publish("test", "n0", i=i)
    _, sock = _subscribe(lab, epoch=reply["epoch"], since=reply["last_seq"])
    size = int.from_bytes(_exactly(sock, 4), "big")
    first = msgspec.msgpack.decode(msgspec.msgpack.decode(_exactly(sock, size), type=Envelope).body,
                                   type=EventFrame)
    assert first.kind == "gap" and first.gap == 10
    sock.close()


def _until(sock, key, kinds: set[str], timeout: float = 20) -> EventFrame:
    """The next frame of one of `kinds` (others are skipped: heartbeats)."""
    (ev,) = _frames(sock, key, 1, timeout)
    assert ev.kind in kinds, ev
    return ev


def test_a_stopped_service_is_one_violation_then_one_cleared_across_a_reconnect(agent_lab):
    """The agent's watcher (agent/watch.py) judges a progress deadline itself: a SIGSTOPped
    service gives exactly one `violation` (not repeated while it lasts), and one `cleared`
    once it runs again, in order; a subscriber that reconnects from its last seq gets the
    rest once, none again."""
    import os
    import signal
    lab = agent_lab()
    key = lab.agent_key.public
    app, _ = lab.start_app("n0", box="svc")  # a progress counter, deadline 1 s
    kinds = ["violation", "cleared"]
    reply, sock = _subscribe(lab, kinds=kinds)
    time.sleep(0.3)
    stopped = time.monotonic()
    os.kill(app.pid, signal.SIGSTOP)
    try:
        v = _until(sock, key, {"violation"})
        # not before the deadline, counted from the last tick the agent saw, which comes at
        # most one tick of the app (10 ms) before the stop
        assert time.monotonic() - stopped >= 0.99
        assert v.node == "n0" and v.seq > reply["last_seq"]
        d = v.data
        assert (d["detector"], d["condition"], d["box"], d["sensor"]) == \
            ("progress_stalled", "progress_stalled", "svc", "tick")
        assert d["deadline_ms"] == 1000 and d["unchanged_ms"] > 1000
        assert v.at - 1.2 <= d["onset"] <= v.at - 1.0
        sock.close()  # the monitor goes away while the stall lasts
        time.sleep(0.5)  # nothing new: a stall is said once
    finally:
        os.kill(app.pid, signal.SIGCONT)
    _, sock = _subscribe(lab, epoch=reply["epoch"], since=v.seq, kinds=kinds)
    c = _until(sock, key, {"cleared"})
    assert c.seq > v.seq and c.node == "n0" and c.gap == 0
    assert (c.data["box"], c.data["sensor"]) == ("svc", "tick") and c.data["stalled_ms"] > 1000
    sock.settimeout(1.5)
    import socket as _socket
    with pytest.raises((_socket.timeout, AssertionError)):  # nothing more but heartbeats
        _frames(sock, key, 1, timeout=1.2)
    sock.close()
    # polls see the stall the watcher saw: the sensors reply's unchanged time
    sensors = lab.client().sensors("n0")
    assert sensors.progress_unchanged_s["svc"]["tick"] < 0.5


def test_a_killed_service_is_one_violation_at_its_death_not_at_its_deadline(agent_lab):
    """The watcher follows the process that registered a Sensor Box through a pidfd: its
    death is pushed at once as a stall of each of its progress counters (`reason`
    "died"), long before the deadline, and the deadline passing adds nothing."""
    import os
    import signal
    import socket as _socket
    lab = agent_lab()
    key = lab.agent_key.public
    app, _ = lab.start_app("n0", box="svc")  # a progress counter, deadline 1 s
    reply, sock = _subscribe(lab, kinds=["violation", "cleared"])
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(app.pid, signal.SIGKILL)
    v = _until(sock, key, {"violation"})
    assert time.monotonic() - killed < 1.0  # before the deadline: at the death
    d = v.data
    assert (d["detector"], d["box"], d["sensor"], d["reason"], d["owner_pid"]) == \
        ("progress_stalled", "svc", "tick", "died", app.pid)
    assert d["deadline_ms"] == 1000 and d["unchanged_ms"] < 1000 and v.seq > reply["last_seq"]
    sock.settimeout(2.0)
    extra = []  # nothing more: not at the deadline, and no "cleared" for a late last tick
    try:
        extra = _frames(sock, key, 1, timeout=1.5)
    except (_socket.timeout, AssertionError):
        pass
    assert not extra, [(e.kind, e.data) for e in extra]
    sock.close()


OOM_LOOP = """
import os
while True:
    pid = os.fork()
    if pid == 0:
        chunks = []
        while True:
            chunks.append(bytearray(1 << 20))
    os.waitpid(pid, 0)
"""


def test_oom_kills_in_a_node_are_one_violation_while_they_go_on(agent_lab):
    """The watcher hears OOMs from the memory controller: the first OOM kill is pushed at once as
    a violation of the kernel box's oom_kills pressure sensor (by default any kill in
    its 10 s window violates), and further kills in the window add nothing. (The hog's
    climb past the high mark is pushed before it, condition memory_high.)"""
    import signal
    import socket as _socket
    lab = agent_lab(nodes={"n0": {"memory_limit": 64 << 20}})
    key = lab.agent_key.public
    _, sock = _subscribe(lab, kinds=["violation"])
    hog = lab.run("n0", OOM_LOOP)
    try:
        first = _until(sock, key, {"violation"}, timeout=30)
        assert (first.data["condition"], first.data["sensor"]) == ("memory_high", "memory_mb")
        v = _until(sock, key, {"violation"}, timeout=30)
        d = v.data
        assert (d["detector"], d["condition"], d["box"], d["sensor"]) == \
            ("pressure_over_rate", "oom_kill", "kernel", "oom_kills")
        assert d["value"] >= 1 and d["events"] >= 1 and d["max_events"] == 0.5
        assert d["window_s"] == 10.0
        end = time.monotonic() + 10
        kernel = lambda: lab.client().sensors("n0").pressure_events["kernel"]["oom_kills"]  # noqa: E731
        while kernel() < d["events"] + 1:  # more kills, in the same window
            assert time.monotonic() < end, "no second OOM kill"
            time.sleep(0.05)
        sock.settimeout(1.0)
        end = time.monotonic() + 0.8
        while (left := end - time.monotonic()) > 0:
            try:
                (again,) = _frames(sock, key, 1, timeout=left)
            except (_socket.timeout, AssertionError):
                break
            # the OOM kill said once; the hog, killed and started again, crosses the mark again
            assert again.data["condition"] == "memory_high", again
    finally:
        hog.send_signal(signal.SIGKILL)
    sock.close()


def test_a_reconnect_gets_every_event_the_history_still_holds(agent_lab):
    """Outside review: the replay went through the subscriber's live queue (QUEUE_MAX),
    so a monitor that missed 2,000 events got 1,024 and a gap though the agent kept all
    of them (HISTORY)."""
    from backdoors.agent.events import HISTORY, QUEUE_MAX
    lab = agent_lab(nodes={"n0": {}})
    bus, key = lab.agent.agent.events, lab.agent_key.public
    missed = (QUEUE_MAX + HISTORY) // 2
    reply, sock = _subscribe(lab)
    sock.close()
    for i in range(missed):
        bus.publish("test", "n0", i=i)
    _, sock = _subscribe(lab, epoch=reply["epoch"], since=reply["last_seq"])
    got = _frames(sock, key, missed)  # (a gap frame fails it)
    sock.close()
    assert [e.data["i"] for e in got] == list(range(missed))


def test_one_key_cannot_take_every_subscription_slot(agent_lab):
    """Outside review: 16 streams of one monitor key, never read, held every slot and
    another monitor was refused. A key's next stream beyond MAX_PER_SIGNER now replaces
    its oldest (which the agent closes)."""
    from backdoors.agent.events import MAX_PER_SIGNER, MAX_SUBSCRIBERS
    lab = agent_lab(nodes={"n0": {}})
    bus = lab.agent.agent.events
    mine = [_subscribe(lab, monitor="m1")[1] for _ in range(MAX_SUBSCRIBERS)]
    try:
        wait_for(lambda: bus.subscribers == MAX_PER_SIGNER, timeout=10,
                 what=f"m1's streams cut to {MAX_PER_SIGNER}")
        for sock in mine[:-MAX_PER_SIGNER]:  # the replaced ones end
            sock.settimeout(10)
            while sock.recv(65536):
                pass
        _, theirs = _subscribe(lab, monitor="m2")
        theirs.close()
    finally:
        for sock in mine:
            sock.close()

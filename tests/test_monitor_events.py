"""The monitor's event follower against an agent's signed frames (monitor/events.py)."""

import socket
import threading
from types import SimpleNamespace

import msgspec

from backdoors.agent.events import EventFrame
from backdoors.agent.keys import new_identity
from backdoors.agent.protocol import EVENT_DOMAIN, Envelope, frame
from backdoors.monitor.events import EventFollower

_encode = msgspec.msgpack.Encoder().encode


def test_suppressed_owner_deaths_make_the_monitor_ask_for_the_orphans():
    """Outside review: a node's flood of owner_died events is now cut at the agent, which
    says so ("events_suppressed", events "owner_died"): the follower then asks each node's
    orphans (as after a gap), so no server's death goes unanswered. A suppressed
    progress event is left to the polls."""
    agent = new_identity("h0")
    asked, judged = [], []

    class Client:
        def call(self, op, **args):
            asked.append((op, args))
            return [{"pid": 42, "sessions": ["cb-1"], "died": 1.0}] if args["node"] == "n0" else []

        def close(self):
            pass

    poller = SimpleNamespace(entry=SimpleNamespace(host="h0"), nodes=["n0", "n1"])
    monitor = SimpleNamespace(
        stopping=threading.Event(), pollers=[poller], clock=lambda: 0.0,
        config=SimpleNamespace(timeout_ms=1000), client_factory=lambda entry, timeout: Client(),
        on_event=lambda host, ev, received, via="event": judged.append((ev.kind, ev.node, via)))
    follower = EventFollower(monitor, SimpleNamespace(host="h0"), (agent.public,))
    follower.epoch = "e1"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for seq, (events, node) in enumerate((("progress", "n1"), ("owner_died", "n0")), 1):
            body = _encode(EventFrame("events_suppressed", seq, "e1", node, 1.0,
                                      {"count": 5, "events": events, "per_s": 16.0, "burst": 64}))
            theirs.sendall(frame(_encode(Envelope(body, agent.sign(EVENT_DOMAIN, body)))))
        theirs.shutdown(socket.SHUT_WR)
        try:
            follower._read(ours, 0)
        except Exception as e:  # noqa: BLE001 - the stream's end
            assert "closed the event stream" in str(e)
    assert asked == [("orphans", {"node": "n0"}), ("orphans", {"node": "n1"})]
    assert judged == [("events_suppressed", "n1", "event"), ("events_suppressed", "n0", "event"),
                      ("owner_died", "n0", "poll")]


def _send(sock, agent, ev: EventFrame) -> None:
    body = _encode(ev)
    sock.sendall(frame(_encode(Envelope(body, agent.sign(EVENT_DOMAIN, body)))))


def _follower(agent, judged):
    monitor = SimpleNamespace(
        stopping=threading.Event(), pollers=[], clock=lambda: 0.0,
        config=SimpleNamespace(timeout_ms=1000), client_factory=None,
        on_event=lambda host, ev, received, via="event": judged.append((ev.seq, ev.kind)))
    follower = EventFollower(monitor, SimpleNamespace(host="h0"), (agent.public,))
    follower.epoch, follower.last_seq = "e1", 10
    return follower


def _stall(seq: int, kind: str, sensor: str = "progress") -> EventFrame:
    return EventFrame(kind, seq, "e1", "n0", 1.0, {"detector": "progress_stalled",
                                                   "box": "app", "sensor": sensor})


def test_a_replayed_violation_that_ended_meanwhile_is_not_judged():
    """Outside review: after a reconnect the agent replays what the follower missed; a
    stall that began and ended meanwhile opened an incident on a healthy node. The replay
    (up to the subscription's last_seq) is now held to its end, and a violation a later
    replayed event clears is dropped; one still open, and what comes live, are judged."""
    agent = new_identity("h0")
    judged = []
    follower = _follower(agent, judged)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for ev in (_stall(11, "violation"), _stall(12, "violation", "other"),
                   _stall(13, "cleared"), _stall(14, "violation")):
            _send(theirs, agent, ev)
        _send(theirs, agent, _stall(15, "cleared"))  # live: after the replay (up to 14)
        theirs.shutdown(socket.SHUT_WR)
        try:
            follower._read(ours, 14)
        except Exception as e:  # noqa: BLE001 - the stream's end
            assert "closed the event stream" in str(e)
    assert judged == [(12, "violation"), (13, "cleared"), (14, "violation"), (15, "cleared")]
    assert follower.stale == 1 and follower.last_seq == 15


def test_a_replay_cut_short_is_asked_for_again():
    """A stream that ends inside a replay judged none of it: the next subscription asks
    for it again (since = the last event judged)."""
    agent = new_identity("h0")
    judged = []
    follower = _follower(agent, judged)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for ev in (_stall(11, "violation"), _stall(12, "cleared")):
            _send(theirs, agent, ev)
        theirs.shutdown(socket.SHUT_WR)
        try:
            follower._read(ours, 14)
        except Exception as e:  # noqa: BLE001 - the stream's end
            assert "closed the event stream" in str(e)
    assert judged == [] and follower.last_seq == 10

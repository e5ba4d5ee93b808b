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
            follower._read(ours)
        except Exception as e:  # noqa: BLE001 - the stream's end
            assert "closed the event stream" in str(e)
    assert asked == [("orphans", {"node": "n0"}), ("orphans", {"node": "n1"})]
    assert judged == [("events_suppressed", "n1", "event"), ("events_suppressed", "n0", "event"),
                      ("owner_died", "n0", "poll")]

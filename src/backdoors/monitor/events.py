"""Events pushed by an agent, followed on a connection of their own (agent.events).

One `EventFollower` per agent subscribes (signed op `subscribe`), then reads the agent's
signed event frames and hands each event to the monitor (`Monitor.on_event`), which judges
it with the same rules as a poll. When the connection ends it subscribes again, asking
for the events after the last one it got (`epoch`, `since`): every event arrives once,
in order. Where the agent says events were lost (a "gap" frame, or events older than its
history) and at the first subscription, the follower asks the agent's `orphans` of each
node instead (a poll), so that nothing waits for the next event. The periodic poll
(AgentPoller) stays the liveness check.

The events a resubscription replays (published while the follower was away) are held
until the replay ends: a violation among them that a later one clears is dropped, since
it ended before the monitor could see it (a poll then would not have fired either).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque

import msgspec

from ..agent.events import EventFrame
from ..agent.keys import verify
from ..agent.protocol import DECODE_ERRORS, EVENT_DOMAIN, MAX_FRAME, Envelope
from ..errors import AgentError

log = logging.getLogger("backdoors.monitor")

READ_TIMEOUT_S = 3.0  # the agent sends a heartbeat every second
RETRY_S = 0.2
_envelope = msgspec.msgpack.Decoder(Envelope)
_frame = msgspec.msgpack.Decoder(EventFrame)


class EventFollower:
    """Follows one agent's events on a thread of its own (`start`, `stop`)."""

    def __init__(self, monitor, entry, agent_keys: tuple):
        self.monitor, self.entry, self._agent_keys = monitor, entry, agent_keys
        self.epoch, self.last_seq = "", -1
        self.subscriptions = 0  # successful subscribes (reconnects + 1)
        self.gaps = 0  # events the agent said this follower missed
        self.stale = 0  # replayed violations dropped: cleared before the replay
        self.seen: deque[tuple[str, int, str, str]] = deque(maxlen=65536)  # epoch, seq, kind, node
        self.connected = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"bd-mon-events-{entry.host}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.drop()
        self._thread.join(timeout)

    def drop(self) -> None:
        """End the current subscription (the follower subscribes again)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        m = self.monitor
        while not m.stopping.is_set():
            try:
                self._follow()
            except Exception:  # noqa: BLE001 - the follower must live on: events fall back to polls meanwhile
                log.exception("agent %s: event follower failed; subscribing again", self.entry.host)
                m.stopping.wait(RETRY_S)

    def _follow(self) -> None:
        """One subscription: subscribe, catch up, read events until the stream ends."""
        m = self.monitor
        client = m.client_factory(self.entry, m.config.timeout_ms / 1000)
        try:
            reply = client.call("subscribe", epoch=self.epoch,
                                since=self.last_seq if self.epoch else -1)
            self._sock = client.take_socket()
        except AgentError as e:
            log.debug("agent %s: cannot subscribe to events: %s", self.entry.host, e)
            client.close()
            m.stopping.wait(RETRY_S)
            return
        client.close()
        try:
            first = self.subscriptions == 0 or reply.get("epoch") != self.epoch
            if reply.get("epoch") != self.epoch and self.epoch:
                log.info("agent %s restarted (new event epoch)", self.entry.host)
            fresh = not self.epoch
            if fresh:
                self.epoch, self.last_seq = reply["epoch"], reply["last_seq"]
            self.subscriptions += 1
            self.connected.set()
            if first:
                self._catch_up("subscribed")
            self._read(self._sock, 0 if fresh else int(reply["last_seq"]))
        except (OSError, AgentError) as e:
            if not m.stopping.is_set():
                log.info("agent %s: event stream ended (%s); subscribing again",
                         self.entry.host, e)
        finally:
            self.connected.clear()
            self._sock.close()
            self._sock = None

    def _read(self, sock: socket.socket, replay_to: int) -> None:
        """Events until the stream ends; those up to seq `replay_to` (replayed from the
        agent's history) held until the replay ends, then judged (_replayed)."""
        sock.settimeout(READ_TIMEOUT_S)
        replay: list[EventFrame] = []
        while not self.monitor.stopping.is_set():
            size = int.from_bytes(_exactly(sock, 4), "big")
            if not 0 < size <= MAX_FRAME:
                raise AgentError(f"event frame of {size} bytes")
            try:
                env = _envelope.decode(_exactly(sock, size))
                if not verify(self._agent_keys, EVENT_DOMAIN, env.body, env.sig):
                    raise AgentError("an event frame's signature is invalid: not our agent")
                ev = _frame.decode(env.body)
            except DECODE_ERRORS as e:
                raise AgentError(f"malformed event frame: {e}") from None
            if ev.epoch != self.epoch:  # the agent restarted: its seqs start again
                self.epoch, self.last_seq = ev.epoch, 0
            if replay and (not ev.seq or ev.seq > replay_to):  # the replay is over
                self._replayed(replay)
                replay = []
            if ev.gap:
                self.gaps += ev.gap
                log.warning("agent %s: %d events missed; polling instead", self.entry.host,
                            ev.gap)
                self._catch_up("gap")
            if ev.seq:
                if ev.seq <= (replay[-1].seq if replay else self.last_seq):
                    continue  # had it already (never expected: the agent sends after since)
                if ev.seq <= replay_to:
                    replay.append(ev)
                    if ev.seq == replay_to:
                        self._replayed(replay)
                        replay = []
                    continue
                self._deliver(ev)

    def _replayed(self, events: list[EventFrame]) -> None:
        """Judge the events of a replay, but for the violations a later one of them
        clears (those ended while this follower was away)."""
        cleared: set[tuple] = set()
        stale: set[int] = set()
        for ev in reversed(events):
            key = (ev.node, *(ev.data.get(k) for k in ("detector", "condition", "box",
                                                          "sensor")))
            if ev.kind == "cleared":
                cleared.add(key)
            elif ev.kind == "violation" and key in cleared:
                stale.add(ev.seq)
        for ev in events:
            if ev.seq in stale:
                self.stale += 1
                self.last_seq = ev.seq
                log.info("agent %s: node %s: a violation replayed after a reconnect had "
                         "ended already (%s/%s): not judged", self.entry.host, ev.node,
                         ev.data.get("box"), ev.data.get("sensor"))
                continue
            self._deliver(ev)

    def _deliver(self, ev: EventFrame) -> None:
        self.last_seq = ev.seq
        self.seen.append((ev.epoch, ev.seq, ev.kind, ev.node))
        self.monitor.on_event(self.entry.host, ev, received=self.monitor.clock())
        if ev.kind == "events_suppressed" and ev.data.get("events") == "owner_died":
            self._catch_up("suppressed")  # deaths the agent did not push

    def _catch_up(self, why: str) -> None:
        """What events may have told: the nodes' orphaned sessions, asked by poll."""
        m = self.monitor
        client = m.client_factory(self.entry, m.config.timeout_ms / 1000)
        try:
            nodes = [n for p in m.pollers if p.entry.host == self.entry.host for n in p.nodes]
            for node in nodes:
                for o in client.call("orphans", node=node):
                    ev = EventFrame("owner_died", 0, self.epoch, node, o["died"],
                                    {"pid": o["pid"], "sessions": o["sessions"], "died": o["died"],
                                     "caught_up": why})
                    m.on_event(self.entry.host, ev, received=m.clock(), via="poll")
        except AgentError as e:
            log.debug("agent %s: orphans: %s", self.entry.host, e)
        finally:
            client.close()


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AgentError("the agent closed the event stream")
        buf += chunk
    return bytes(buf)

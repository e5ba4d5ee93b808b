"""Events the agent pushes to monitors: a bus, and the `subscribe` stream of it.

Anything in the agent (any thread) `publish`es an event: a kind ("owner_died", ...), the
node it is about and a small dict of facts. The bus numbers the events of this agent
(`seq`, 1, 2, ... in publishing order, so in order per node too), keeps the latest
`HISTORY` of them, and hands each to every subscriber.

A monitor subscribes with the signed op `subscribe` on a connection of its own: after the
(signed) reply the connection carries only event frames from the agent, each an Envelope
signed with the agent's key (event domain), whose body is an `EventFrame`. Frames of kind
"heartbeat" (no seq of their own) come every HEARTBEAT_S when there is nothing else.
Args `epoch` and `since` ask for the events after `since` of the agent run `epoch` (what
the monitor saw last, at a reconnect): they are sent first, from the history. An event
the subscriber cannot get any more (beyond the history, or dropped because it did not
read fast enough: each subscriber has a queue of QUEUE_MAX frames) is never sent late:
the next frame says how many came before it unseen (`gap`), and the monitor polls. The
events of the history a reconnect asks for are sent whatever their number (they are the
history's own frames, not copies), written in runs of REPLAY_RUN so that the loop's other
work goes on between them.

Nothing a subscriber does blocks the agent or another subscriber. One monitor (one key)
has at most MAX_PER_SIGNER streams: its next replaces its oldest, so one key, stolen or
buggy, cannot take the slots (MAX_SUBSCRIBERS) of the others.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from typing import Any

import msgspec

from .protocol import EVENT_DOMAIN, Envelope, frame

log = logging.getLogger("backdoors.agent")

HISTORY = 4096  # events kept for subscribers that reconnect
QUEUE_MAX = 1024  # frames queued per subscriber before it loses events (and sees a gap)
HEARTBEAT_S = 1.0
WRITE_TIMEOUT_S = 5.0  # a subscriber that takes no bytes for this long is dropped
MAX_SUBSCRIBERS = 16
MAX_PER_SIGNER = 4  # a monitor's streams of one agent (one, two while it reconnects)
REPLAY_RUN = 64  # replayed frames written before the loop runs other work
_encode = msgspec.msgpack.Encoder().encode



class EventBudget:
    """A node's events of one kind (`events`: "progress", "owner_died"): a token bucket
    of `burst` refilled at `per_s`; what it refuses is counted and said once a second at
    most ("events_suppressed" {count, events, per_s, burst}), a node's flood pushing no
    other node's events out of the bus's history and the monitors' queues. Not locked:
    one thread's, or its owner's lock."""

    def __init__(self, node: str, publish, events: str, burst: int, per_s: float):
        self.node, self.publish, self.events = node, publish, events
        self.burst, self.per_s = burst, per_s
        self.tokens, self.at = float(burst), time.monotonic()
        self.suppressed, self.said_at = 0, -math.inf

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        self.flush(now)
        return False

    def flush(self, now: float) -> None:
        """Say how many were suppressed since the last time, if a second has passed."""
        if self.suppressed and now - self.said_at >= 1.0:
            self.said_at = now
            self.publish("events_suppressed", self.node, count=self.suppressed,
                         events=self.events, per_s=self.per_s, burst=self.burst)
            log.warning("node %s: %d %s events suppressed (over %g per s)", self.node,
                        self.suppressed, self.events, self.per_s)
            self.suppressed = 0


class SubscribeArgs(msgspec.Struct, forbid_unknown_fields=True):
    epoch: str = ""  # the agent run the monitor's `since` belongs to ("" = none)
    since: int = -1  # the last seq seen; -1: only events from now on
    kinds: list[str] = []  # only these kinds ([] = every kind)


class SubscribeReply(msgspec.Struct):
    epoch: str  # this agent run (changes when the agent restarts)
    last_seq: int  # the seq of the latest event published so far


class EventFrame(msgspec.Struct, omit_defaults=True):
    """One pushed frame: an event (seq > 0), a "heartbeat", or a "gap": `gap` events of
    this agent run, after the previous frame, that this subscriber will never get."""

    kind: str
    seq: int = 0  # 0 for a heartbeat
    epoch: str = ""
    node: str = ""
    at: float = 0.0  # Unix time the agent saw it
    data: dict[str, Any] = {}
    gap: int = 0


class _Subscriber:
    def __init__(self, kinds: frozenset[str], signer: str = ""):
        self.kinds, self.signer = kinds, signer
        self.queue: deque[EventFrame] = deque()
        self.ready = asyncio.Event()
        self.replaced = False  # its signer subscribed again: this stream ends
        self.since = time.monotonic()

    def offer(self, ev: EventFrame) -> None:
        if self.kinds and ev.kind not in self.kinds:
            return
        if len(self.queue) < QUEUE_MAX:
            self.queue.append(ev)
        else:
            self.lose(1, ev.epoch)
        self.ready.set()

    def lose(self, n: int, epoch: str) -> None:
        """`n` events this subscriber will not get: one "gap" frame says how many."""
        last = self.queue[-1] if self.queue else None
        if last is not None and last.kind == "gap":
            last.gap += n
        else:
            self.queue.append(EventFrame("gap", 0, epoch, at=time.time(), gap=n))


class EventBus:
    """One agent's events; `publish` from any thread once `attach`ed to the loop."""

    def __init__(self, registry=None):
        self.epoch = secrets.token_hex(8)
        self.metrics = None
        if registry is not None:
            from prometheus_client import Counter
            self.metrics = Counter("backdoors_agent_events", "Events published to subscribed "
                                   "monitors, by kind", ["kind"], registry=registry)
        self._seq = itertools.count(1)
        self._last = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._history: deque[EventFrame] = deque(maxlen=HISTORY)
        self._subs: set[_Subscriber] = set()
        self._wire: dict[int, bytes] = {}  # seq -> its signed frame (events in the history)
        self._signer = None  # the identity that signed them

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def last_seq(self) -> int:
        return self._last

    def publish(self, kind: str, node: str, **data: Any) -> int:
        """Number the event and push it to every subscriber; returns its seq (0 if the
        bus is not attached to a running loop: the event is then lost, and said so)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("event %s on node %s not pushed: the agent is not serving", kind, node)
            return 0
        with self._lock:  # seq order = delivery order
            seq = next(self._seq)
            self._last = seq
            ev = EventFrame(kind, seq, self.epoch, node, time.time(), data)
            try:
                loop.call_soon_threadsafe(self._deliver, ev)
            except RuntimeError:  # the loop closed meanwhile
                return 0
        return seq

    def _deliver(self, ev: EventFrame) -> None:
        if len(self._history) == HISTORY:
            self._wire.pop(self._history[0].seq, None)
        self._history.append(ev)
        if self.metrics is not None:
            self.metrics.labels(ev.kind).inc()
        for sub in list(self._subs):
            sub.offer(ev)

    def subscribe(self, args: SubscribeArgs, signer: str = "") -> SubscribeReply:
        """The op's reply (validated here; the stream starts when the server calls
        `stream`). Busy when MAX_SUBSCRIBERS stream, unless `signer` has its
        MAX_PER_SIGNER (its new stream replaces its oldest)."""
        if len(self._subs) >= MAX_SUBSCRIBERS and len(self._of(signer)) < MAX_PER_SIGNER:
            from .ops import OpError
            raise OpError("busy", f"{len(self._subs)} monitors are subscribed, the most this "
                                  "agent serves")
        return SubscribeReply(self.epoch, self._last)

    def _of(self, signer: str) -> list[_Subscriber]:
        """`signer`'s streams, the oldest first."""
        return sorted((sub for sub in self._subs if sub.signer == signer),
                      key=lambda sub: sub.since)

    async def stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     identity, args: SubscribeArgs, signer: str = "") -> None:
        """Serve one subscriber until it goes away (or stops reading)."""
        sub = _Subscriber(frozenset(args.kinds), signer)
        old: list[EventFrame] = []
        if args.since >= 0:
            since = args.since if args.epoch == self.epoch else 0
            old = [ev for ev in self._history if ev.seq > since]
            first = old[0].seq if old else since + 1  # (later ones are on their way)
            if first - since - 1 > 0:  # beyond the history
                sub.lose(first - since - 1, self.epoch)
            if sub.kinds:
                old = [ev for ev in old if ev.kind in sub.kinds]
        mine = self._of(signer)
        for older in mine[:max(0, len(mine) - MAX_PER_SIGNER + 1)]:
            older.replaced = True
            older.ready.set()
            self._subs.discard(older)
        if len(self._subs) >= MAX_SUBSCRIBERS:  # others took the slots since the reply
            return
        # first the gap for what is beyond the history, if any, then the history's frames
        # (not through the queue, which live events take from here on)
        replay = [*sub.queue, *old]
        sub.queue.clear()
        self._subs.add(sub)
        eof = asyncio.ensure_future(reader.read(1))  # a subscriber sends nothing more
        try:
            for i in range(0, len(replay), REPLAY_RUN):
                self._write(writer, identity, replay[i:i + REPLAY_RUN])
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                await asyncio.sleep(0)
                if eof.done() or sub.replaced:
                    return
            while not eof.done() and not sub.replaced:
                ready = asyncio.ensure_future(sub.ready.wait())
                await asyncio.wait({ready, eof}, timeout=HEARTBEAT_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                sub.ready.clear()
                frames = list(sub.queue)
                sub.queue.clear()
                if not frames:
                    frames.append(EventFrame("heartbeat", 0, self.epoch, at=time.time(),
                                             data={"last_seq": self._last}))
                if sub.replaced:
                    return
                self._write(writer, identity, frames)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass  # gone, or not reading: it reconnects and asks for what it missed
        finally:
            self._subs.discard(sub)
            eof.cancel()

    def _write(self, writer: asyncio.StreamWriter, identity, frames: list[EventFrame]) -> None:
        """Write `frames`, signed: an event once for every subscriber (its signed frame
        kept while the history holds it), a gap or heartbeat each time."""
        if identity is not self._signer:
            self._signer, self._wire = identity, {}
        for ev in frames:
            wire = self._wire.get(ev.seq) if ev.seq else None
            if wire is None:
                body = _encode(ev)
                wire = frame(_encode(Envelope(body, identity.sign(EVENT_DOMAIN, body))))
                if ev.seq and self._history and ev.seq >= self._history[0].seq:
                    self._wire[ev.seq] = wire
            writer.write(wire)

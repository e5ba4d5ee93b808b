"""Opening a request frame: envelope, signer's public key, signature, strict decoding,
target agent, time bounds and replay checks.

Order matters: the body's signature is verified over its raw bytes before the body is
decoded into a Request (only the `monitor` field is read first, to choose the public keys),
and a nonce is remembered only once its signature is good, so unauthenticated traffic
cannot fill the cache. Each signer has its own share of the cache: one stolen key can make
the agent answer `busy` to that key's holder only.

The cache does not outlive the agent. What does: each signer's mark, the time of the
latest request accepted from it, written before the request runs into memory the fd store
keeps (`resume`). A restarted agent refuses a signer's requests up to its mark, besides
those signed before the agent started: a signer whose clock is ahead of the agent's signs
times after the restart for requests the previous run served.
"""

from __future__ import annotations

import heapq
import json
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .keys import verify
from .protocol import (
    DECODE_ERRORS, NONCE_BYTES, REPLAY_WINDOW_S, REQUEST_DOMAIN, VERSION, Envelope, MonitorOf,
    Request,
)

_envelope = msgspec.msgpack.Decoder(Envelope)
_monitor_of = msgspec.msgpack.Decoder(MonitorOf)
_request = msgspec.msgpack.Decoder(Request)


class Rejected(Exception):
    """A request refused before dispatch. `signed`: the reply is signed (the signer is
    authentic and the request fresh; a reply to a replay, a request for another agent or
    out of its time stays unsigned, so it cannot stand in for the real request's reply);
    `nonce` is echoed when it was read."""

    def __init__(self, code: str, message: str, *, monitor: str = "?", signed: bool = False,
                 nonce: bytes = b"", op: str = "?"):
        super().__init__(message)
        self.code, self.message, self.monitor, self.signed = code, message, monitor, signed
        self.nonce, self.op = nonce, op
        self.verified = False  # the signature was `monitor`'s (a signer's own rejection)


class ReplayGuard:
    """(signer, nonce) pairs seen while their ts is within the window, in a heap ordered by
    expiry; each signer may hold at most `quota` of them."""

    def __init__(self, quota: int, window: float = REPLAY_WINDOW_S):
        self.quota, self.window = quota, window
        self._heap: list[tuple[float, str, bytes]] = []
        self._seen: set[tuple[str, bytes]] = set()
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def held(self, signer: str) -> int:
        return self._held.get(signer, 0)

    def admit(self, signer: str, nonce: bytes, ts: float, now: float) -> str | None:
        """None if fresh (and now remembered), else why not: "replay" or "busy"."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, who, old = heapq.heappop(heap)
            self._seen.discard((who, old))
            self._held[who] -= 1
        pair = (signer, nonce)
        if pair in self._seen:
            return "replay"
        if self._held.get(signer, 0) >= self.quota:
            return "busy"
        self._seen.add(pair)
        self._held[signer] = self._held.get(signer, 0) + 1
        # after ts + window, ts itself is out of the window: the pair can go
        heapq.heappush(heap, (ts + self.window, signer, nonce))
        return None


@dataclass(frozen=True)
class Opened:
    """An authentic, fresh request and who signed it (`peer`: a peer agent, not a monitor)."""

    request: Request
    peer: bool


_MARKS = b"BDM1"  # then a u32 length, the signers' names (JSON), to 8 bytes, a float each


def _marks_layout(signers: Sequence[str]) -> tuple[bytes, int]:
    """The marks' header for `signers`, and the offset of their first mark."""
    names = json.dumps(list(signers)).encode()
    head = _MARKS + struct.pack("<I", len(names)) + names
    return head, -(-len(head) // 8) * 8


def read_marks(data: bytes) -> dict[str, float]:
    """The marks kept in `data` (by `Authenticator.resume`); ValueError if unreadable."""
    if data[:4] != _MARKS or len(data) < 8:
        raise ValueError("not the agent's request marks")
    size = struct.unpack_from("<I", data, 4)[0]
    try:
        signers = json.loads(data[8:8 + size])
    except ValueError as e:
        raise ValueError(f"the marks' signers: {e}") from None
    if not isinstance(signers, list) or not all(isinstance(x, str) for x in signers):
        raise ValueError("the marks' signers are not a list of names")
    start = _marks_layout(signers)[1]
    if len(data) < start + 8 * len(signers):
        raise ValueError(f"{len(data)} bytes hold no mark for each of {len(signers)} signers")
    marks = struct.unpack_from(f"<{len(signers)}d", data, start)
    return {who: t for who, t in zip(signers, marks) if math.isfinite(t)}


class Authenticator:
    """Turns a frame's payload into an authentic, fresh Request for agent `agent_id`, or
    raises Rejected. Requests signed before `started` (the agent's start) are refused,
    and after `resume` those up to their signer's mark of the previous run: the replay
    cache does not outlive the agent."""

    def __init__(self, agent_id: str, monitors: Mapping[str, Sequence[Ed25519PublicKey]],
                 peers: Mapping[str, Sequence[Ed25519PublicKey]] | None = None, *,
                 cache_entries: int, clock: Callable[[], float] = time.time,
                 started: float | None = None):
        self.agent_id, self.clock = agent_id, clock
        self.monitors, self.peers = dict(monitors), dict(peers or {})
        self.started = clock() if started is None else started
        signers = max(1, len(self.monitors) + len(self.peers))
        self.replay = ReplayGuard(max(1, cache_entries // signers))
        self.previous: dict[str, float] = {}  # signer -> its mark in the previous run
        self._slots: dict[str, int] = {}
        self._marks = None  # memoryview of floats in the kept memory

    def resume(self, kept: bytes | None, share: Callable[[bytes], Any]) -> list[str]:
        """Take the marks a previous run kept (`kept`: None if none), and keep this run's,
        starting from them, in the writable memory `share(initial bytes)` returns (None:
        not kept). What could not be taken back, with why."""
        dropped = []
        if kept:
            try:
                self.previous = read_marks(kept)
            except (ValueError, struct.error) as e:
                dropped.append(f"request marks: {e}")
        signers = sorted({*self.monitors, *self.peers})
        head, start = _marks_layout(signers)
        data = bytearray(head.ljust(start, b"\0")) + struct.pack(
            f"<{len(signers)}d", *(self.previous.get(s, -math.inf) for s in signers))
        memory = share(bytes(data)) if signers else None
        if memory is not None:
            self._marks = memoryview(memory)[start:start + 8 * len(signers)].cast("d")
            self._slots = {s: i for i, s in enumerate(signers)}
        return dropped

    def open(self, payload: bytes) -> Opened:
        try:
            env = _envelope.decode(payload)
        except DECODE_ERRORS as e:
            raise Rejected("bad_frame", f"not an envelope {{body, sig}}: {e}") from None
        try:
            monitor = _monitor_of.decode(env.body).monitor
        except DECODE_ERRORS:
            raise Rejected("auth", "the body names no monitor") from None
        peer = monitor not in self.monitors
        keys = self.peers.get(monitor) if peer else self.monitors[monitor]
        shown = monitor if len(monitor) <= 64 else monitor[:64] + "..."
        if keys is None:
            raise Rejected("auth", f"unknown monitor {shown!r}", monitor="?")
        if not verify(keys, REQUEST_DOMAIN, env.body, env.sig):
            raise Rejected("auth", f"bad signature for {'peer' if peer else 'monitor'} "
                           f"{shown!r}", monitor=shown)
        try:
            return self._verified(env, monitor, peer, shown)
        except Rejected as r:
            r.verified = True
            raise

    def _verified(self, env, monitor: str, peer: bool, shown: str) -> Opened:
        """The rest of `open` for a body whose signature is `monitor`'s."""
        try:
            req = _request.decode(env.body)
        except DECODE_ERRORS as e:
            raise Rejected("bad_request", f"malformed request body: {e}", monitor=monitor,
                           signed=True) from None
        if req.v != VERSION:
            raise Rejected("bad_request", f"protocol version {req.v}, this agent speaks {VERSION}",
                           monitor=monitor, signed=True, nonce=req.nonce, op=req.op)
        if len(req.nonce) != NONCE_BYTES:
            raise Rejected("bad_request", f"nonce must be {NONCE_BYTES} bytes, got "
                           f"{len(req.nonce)}", monitor=monitor, signed=True, op=req.op)
        if req.agent != self.agent_id:
            raise Rejected("auth", f"the request is for agent {req.agent[:64]!r}, this is "
                           f"{self.agent_id!r}", monitor=monitor, nonce=req.nonce, op=req.op)
        now = self.clock()
        if not (math.isfinite(req.ts) and abs(req.ts - now) < REPLAY_WINDOW_S):
            raise Rejected("replay", f"request time {req.ts:.3f} is {REPLAY_WINDOW_S:g} s or "
                           f"more from the agent's clock {now:.3f}", monitor=monitor,
                           nonce=req.nonce, op=req.op)
        if req.ts < self.started:
            raise Rejected("replay", f"request time {req.ts:.3f} is before this agent started "
                           f"({self.started:.3f}): sent to an earlier run, or replayed",
                           monitor=monitor, nonce=req.nonce, op=req.op)
        if req.ts <= (mark := self.previous.get(monitor, -math.inf)):
            raise Rejected("replay", f"request time {req.ts:.3f} is not after the last "
                           f"request the previous run of this agent took from {shown!r} "
                           f"({mark:.3f}): sent to an earlier run, or replayed",
                           monitor=monitor, nonce=req.nonce, op=req.op)
        verdict = self.replay.admit(monitor, req.nonce, req.ts, now)
        if verdict == "replay":
            raise Rejected("replay", "this nonce was already used (a replayed request)",
                           monitor=monitor, nonce=req.nonce, op=req.op)
        if verdict == "busy":
            raise Rejected("busy", f"{monitor} has {self.replay.quota} recent requests, its "
                           "share of the replay cache; retry later", monitor=monitor,
                           signed=True, nonce=req.nonce, op=req.op)
        if self._marks is not None and req.ts > self._marks[i := self._slots[monitor]]:
            self._marks[i] = req.ts  # before the request runs
        return Opened(req, peer)

"""Opening a request frame: envelope, monitor key, MAC, strict decoding, replay checks.

Order matters: the body's MAC is verified over its raw bytes before the body is decoded
into a Request (only the `monitor` field is read first, to choose the key), and a nonce
is remembered only once its MAC is good, so unauthenticated traffic cannot fill the cache.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from .protocol import (
    DECODE_ERRORS, NONCE_BYTES, REPLAY_WINDOW_S, VERSION, Envelope, MonitorOf, Request, mac_ok,
)

_envelope = msgspec.msgpack.Decoder(Envelope)
_monitor_of = msgspec.msgpack.Decoder(MonitorOf)
_request = msgspec.msgpack.Decoder(Request)


class Rejected(Exception):
    """A request refused before dispatch. `key` signs the reply when the monitor is known
    and authentic (None: the reply goes unsigned); `nonce` is echoed when it was read."""

    def __init__(self, code: str, message: str, *, monitor: str = "?", key: bytes | None = None,
                 nonce: bytes = b"", op: str = "?"):
        super().__init__(message)
        self.code, self.message, self.monitor, self.key = code, message, monitor, key
        self.nonce, self.op = nonce, op


class ReplayGuard:
    """(monitor, nonce) pairs seen within the replay window; at most `capacity` of them."""

    def __init__(self, capacity: int, window: float = REPLAY_WINDOW_S):
        self.capacity, self.window = capacity, window
        self._seen: OrderedDict[tuple[str, bytes], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, monitor: str, nonce: bytes, ts: float, now: float) -> str | None:
        """None if fresh (and now remembered), else why not: "replay" or "busy"."""
        while self._seen:
            first = next(iter(self._seen.values()))
            if first > now:
                break
            self._seen.popitem(last=False)
        pair = (monitor, nonce)
        if pair in self._seen:
            return "replay"
        if len(self._seen) >= self.capacity:
            return "busy"
        self._seen[pair] = ts + self.window  # after this, ts itself is out of the window
        return None


class Authenticator:
    """Turns a frame's payload into an authentic, fresh Request, or raises Rejected."""

    def __init__(self, keys: dict[str, bytes], *, cache_entries: int,
                 clock: Callable[[], float] = time.time):
        self.keys, self.clock = keys, clock
        self.replay = ReplayGuard(cache_entries)

    def open(self, payload: bytes) -> tuple[Request, bytes]:
        """(request, the monitor's key)."""
        try:
            env = _envelope.decode(payload)
        except DECODE_ERRORS as e:
            raise Rejected("bad_frame", f"not an envelope {{body, mac}}: {e}") from None
        try:
            monitor = _monitor_of.decode(env.body).monitor
        except DECODE_ERRORS:
            raise Rejected("auth", "the body names no monitor") from None
        key = self.keys.get(monitor)
        shown = monitor if len(monitor) <= 64 else monitor[:64] + "..."
        if key is None:
            raise Rejected("auth", f"unknown monitor {shown!r}", monitor="?")
        if not env.mac or not mac_ok(key, env.body, env.mac):
            raise Rejected("auth", f"bad MAC for monitor {shown!r}", monitor=shown)
        try:
            req = _request.decode(env.body)
        except DECODE_ERRORS as e:
            raise Rejected("bad_request", f"malformed request body: {e}", monitor=monitor,
                           key=key) from None
        if req.v != VERSION:
            raise Rejected("bad_request", f"protocol version {req.v}, this agent speaks {VERSION}",
                           monitor=monitor, key=key, nonce=req.nonce, op=req.op)
        if len(req.nonce) != NONCE_BYTES:
            raise Rejected("bad_request", f"nonce must be {NONCE_BYTES} bytes, got "
                           f"{len(req.nonce)}", monitor=monitor, key=key, op=req.op)
        now = self.clock()
        if not (math.isfinite(req.ts) and abs(req.ts - now) <= REPLAY_WINDOW_S):
            raise Rejected("replay", f"request time {req.ts:.3f} is more than "
                           f"{REPLAY_WINDOW_S:g} s from the agent's clock {now:.3f}",
                           monitor=monitor, nonce=req.nonce, op=req.op)
        verdict = self.replay.admit(monitor, req.nonce, req.ts, now)
        if verdict == "replay":
            raise Rejected("replay", "this nonce was already used (a replayed request)",
                           monitor=monitor, nonce=req.nonce, op=req.op)
        if verdict == "busy":
            raise Rejected("busy", f"replay cache full ({self.replay.capacity} recent requests)",
                           monitor=monitor, key=key, nonce=req.nonce, op=req.op)
        return req, key

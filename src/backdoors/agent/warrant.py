"""The warrant of a session hand-over: the monitors' signed `evacuate` requests.

A peer agent may hand sessions to this agent (ops `stage` and `adopt`) only on the
monitors' order: it forwards the signed evacuate request(s) it executed, and this agent
checks them against its own monitors' public keys and its own quorum. Each must be an
authentic `evacuate` addressed to the sending peer, naming this agent and the node the
sessions go to, and recent; together they must come from `quorum` distinct monitors
agreeing on the same arguments. A warrant whose final adopt was served is spent: it cannot
be used again while it is recent. The spent set is kept across a restart (in the fd
store, where there is one), and requests signed before this agent started are refused: a
restarted agent cannot be handed a warrant its predecessor spent (the evacuating agent
keeps the sessions; the monitor's next evacuate carries a fresh warrant), even when the
monitors' clocks are ahead of its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence

import msgspec

from .keys import verify
from .protocol import (
    DECODE_ERRORS, REPLAY_WINDOW_S, REQUEST_DOMAIN, Envelope, MonitorOf, Request,
)

#: How old a warrant's requests may be: their time window plus the evacuate's own deadline.
WARRANT_TTL_S = REPLAY_WINDOW_S + 30.0
MAX_WARRANT = 16  # signed requests in one warrant

_envelope = msgspec.msgpack.Decoder(Envelope)
_monitor_of = msgspec.msgpack.Decoder(MonitorOf)
_request = msgspec.msgpack.Decoder(Request)


class Evacuation(msgspec.Struct):
    """The args of evacuate a warrant must carry (decoded leniently: the agent's own
    EvacuateArgs decoder checked them strictly when it ran)."""

    node: str
    to: str
    to_agent: str
    to_node: str
    if_unsure: str = "ask"  # recovery.EvacuateArgs' default: a vote counts it unsent or sent


_evacuation = msgspec.msgpack.Decoder(Evacuation)


class WarrantError(Exception):
    """Why a warrant does not allow the hand-over."""


class Warrants:
    """Checks warrants for agent `agent_id` with its `monitors` and `quorum`."""

    def __init__(self, agent_id: str, monitors: Mapping[str, Sequence], quorum: int, *,
                 clock: Callable[[], float] = time.time, started: float | None = None):
        self.agent_id, self.monitors, self.quorum, self.clock = agent_id, monitors, quorum, clock
        self.started = clock() if started is None else started
        self._spent: dict[tuple[str, bytes], float] = {}  # (monitor, nonce) -> expiry

    def check(self, warrant: Sequence[bytes], peer: str, node: str) -> frozenset:
        """The warrant's (monitor, nonce) pairs if it lets `peer` hand sessions to `node`;
        else WarrantError saying why."""
        if not warrant:
            raise WarrantError("no warrant: a hand-over needs the monitors' signed evacuate "
                               "requests, forwarded by the evacuating agent")
        if len(warrant) > MAX_WARRANT:
            raise WarrantError(f"{len(warrant)} requests in the warrant, at most {MAX_WARRANT}")
        now = self.clock()
        self._forget(now)
        agreeing: dict[tuple, set[str]] = {}
        pairs = set()
        for i, payload in enumerate(warrant):
            req, monitor = self._open(payload, i)
            if req.op != "evacuate" or req.agent != peer:
                raise WarrantError(f"warrant request {i} is {req.op} for agent {req.agent!r}, "
                                   f"not evacuate for {peer!r}")
            if not (math.isfinite(req.ts) and now - WARRANT_TTL_S < req.ts
                    < now + REPLAY_WINDOW_S):
                raise WarrantError(f"warrant request {i} is out of date (ts {req.ts:.3f}, "
                                   f"now {now:.3f})")
            if req.ts < self.started:
                raise WarrantError(f"warrant request {i} was signed (ts {req.ts:.3f}) before "
                                   f"this agent started ({self.started:.3f}): it may have been "
                                   "spent by its predecessor; evacuate again")
            try:
                ev = _evacuation.decode(req.args)
            except DECODE_ERRORS as e:
                raise WarrantError(f"warrant request {i}: bad evacuate args: {e}") from None
            if ev.to_agent != self.agent_id or ev.to_node != node:
                raise WarrantError(f"warrant request {i} evacuates to {ev.to_agent!r} node "
                                   f"{ev.to_node!r}, not to {self.agent_id!r} node {node!r}")
            pair = (monitor, req.nonce)
            if pair in self._spent:
                raise WarrantError(f"warrant request {i} (monitor {monitor}) was already used "
                                   "for a hand-over")
            pairs.add(pair)
            # agreeing as the source's ballot counted them: the decoded args, not their bytes
            agreeing.setdefault(msgspec.structs.astuple(ev), set()).add(monitor)
        best = max(len(v) for v in agreeing.values())
        if best < self.quorum:
            raise WarrantError(f"the warrant holds {best} monitors' evacuate, this agent's "
                               f"quorum is {self.quorum}")
        return frozenset(pairs)

    def spend(self, pairs: frozenset) -> None:
        """Mark a warrant used (after its final adopt)."""
        expiry = self.clock() + WARRANT_TTL_S + REPLAY_WINDOW_S
        for pair in pairs:
            self._spent[pair] = expiry

    def encode(self) -> bytes | None:
        """The spent warrants still within their life, as kept in the fd store (None:
        none): a restarted agent takes them back, so a monitor's clock ahead of this
        agent's does not make one usable again."""
        now, spent = self.clock(), dict(self._spent)  # (a copy: check() runs on another thread)
        live = sorted((m, n.hex(), t) for (m, n), t in spent.items() if t > now)
        return json.dumps([list(e) for e in live]).encode() if live else None

    def take_back(self, data: bytes) -> None:
        """What `encode` kept; ValueError if it cannot be read."""
        try:
            kept = {(str(m), bytes.fromhex(n)): float(t) for m, n, t in json.loads(data)}
        except (TypeError, ValueError) as e:
            raise ValueError(f"not the spent warrants: {e}") from None
        self._spent.update(kept)
        self._forget(self.clock())

    def _open(self, payload: bytes, i: int) -> tuple[Request, str]:
        try:
            env = _envelope.decode(payload)
            monitor = _monitor_of.decode(env.body).monitor
        except DECODE_ERRORS:
            raise WarrantError(f"warrant request {i} is not a signed request") from None
        keys = self.monitors.get(monitor)
        if keys is None or not verify(keys, REQUEST_DOMAIN, env.body, env.sig):
            raise WarrantError(f"warrant request {i} is not signed by a monitor of this agent "
                               f"({monitor[:64]!r})")
        try:
            return _request.decode(env.body), monitor
        except DECODE_ERRORS as e:
            raise WarrantError(f"warrant request {i}: malformed body: {e}") from None

    def _forget(self, now: float) -> None:
        for pair, t in list(self._spent.items()):  # (one step: spend() runs on another thread)
            if t <= now:
                self._spent.pop(pair, None)

"""Fencing tokens: the highest token seen per node, and the refusal of older ones.

A monitor of a fleet owns a node since an etcd revision (within the fleet's epoch: its
token, fleet/member.py), and sends it with every destructive request (protocol.TOKENED). The agent keeps, per node, the
highest token it has seen and who sent it; a request with an older token (or the same
token from another monitor, which no one etcd history gives) is refused
(`stale_token`), so a monitor that lost its ownership — paused, partitioned from etcd, its
requests late — can never act on a node that another monitor now owns. A request without
a token is not checked (a single monitor without etcd, an operator's command).

The table lives on the event loop (checked and raised in one step, before the op runs; at
a quorum above 1 a token is recorded only when its request's vote applies it, and a claim's
not at all: agent/server.py) and is kept across an agent restart in the fd store
(`observer`, as fences are).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable


class StaleToken(Exception):
    """A token older than the node's highest; the message says whose is newer."""


class TokenTable:
    """node -> (highest token seen, the monitor that sent it)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, str]] = {}
        self._acted: dict[str, tuple[float, str]] = {}  # node -> (monotonic time, monitor)
        #: called with the whole table after each change (the daemon keeps it)
        self.observer: Callable[[dict[str, tuple[int, str]]], None] | None = None

    def get(self, node: str) -> tuple[int, str] | None:
        return self._seen.get(node)

    def check(self, node: str, token: int, monitor: str, *, record: bool = True,
              peers: frozenset[str] = frozenset()) -> int | None:
        """Accept `monitor`'s `token` for `node` (recording it when higher, if `record`)
        and return the node's previous token; StaleToken if an older one than seen, or,
        recording, the same one of another monitor than `peers` (its co-voters)."""
        seen = self._seen.get(node)
        if seen is not None and token < seen[0]:
            raise StaleToken(f"token {token} of {monitor} for node {node} is older than "
                             f"token {seen[0]} of {seen[1]}: {seen[1]} owns the node now; "
                             "not applied")
        if record and seen is not None and token == seen[0] and seen[1] not in (
                peers | {monitor}):
            # one fleet gives a token to one owner: a second is from another etcd history
            raise StaleToken(f"token {token} of {monitor} for node {node} is {seen[1]}'s "
                             "token (given by another etcd, or before a restore): not "
                             "applied")
        if record and (seen is None or token > seen[0]):
            self._seen[node] = (token, monitor)
            if self.observer is not None:
                self.observer(self.snapshot())
        return seen[0] if seen else None

    def acted(self, node: str, monitor: str) -> None:
        """`monitor`'s tokened destructive op on `node` was applied now."""
        self._acted[node] = (time.monotonic(), monitor)

    def last_act(self, node: str) -> tuple[float, str] | None:
        """(seconds since, monitor) of the last tokened destructive op applied on `node`
        since this agent started; what a new owner's claim is told, so that it does not
        repeat at once a repair its predecessor has just made."""
        acted = self._acted.get(node)
        return None if acted is None else (time.monotonic() - acted[0], acted[1])

    def snapshot(self) -> dict[str, tuple[int, str]]:
        return dict(self._seen)

    def encode(self) -> bytes | None:
        """The table as kept in the fd store (None when empty)."""
        if not self._seen:
            return None
        return json.dumps({n: list(v) for n, v in sorted(self._seen.items())}).encode()

    def take_back(self, data: bytes | None, nodes: set[str]) -> list[str]:
        """Take back what a previous agent kept (before any op runs); what is dropped, with
        why (unreadable, or a node no longer served)."""
        if not data:
            return []
        try:
            kept = {str(n): (int(v[0]), str(v[1])) for n, v in json.loads(data).items()}
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            return [f"fencing tokens: {e}"]
        self._seen = {n: v for n, v in kept.items() if n in nodes}
        return [f"fencing token of {n[:64]}: no such node" for n in kept if n not in nodes]

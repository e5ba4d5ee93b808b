"""Node locks held by monitors: a freeze under a lease, or a fence held until unlocked.

A lock is held by the monitors whose request took it (one, or the voters of a quorum).
A request whose monitors share one with the holders renews it (new lease or fence); others
get "busy". A lease that runs out is released by the agent: the node is thawed. A fence
(lease None) never runs out. The freeze and thaw themselves are Node.lock/unlock; this
table serialises them per node and remembers who holds what, for the RPC worker threads
and the lease reaper alike. Fences outlive an agent restart: every change of them goes to
`observer` (the agent keeps them in its fd store) and a new agent takes them back
(`refence`); leases do not (see docs/operations.md §14).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..nodes import Node
from .protocol import LockReply, LockState, UnlockReply


class LockBusy(Exception):
    """The node is locked by other monitors."""


@dataclass
class Lease:
    holders: frozenset[str]
    expires: float | None  # time.monotonic(); None = fence

    def left(self, now: float) -> float | None:
        return None if self.expires is None else max(0.0, self.expires - now)


class LeaseTable:
    """Who holds each node's lock, and until when."""

    def __init__(self, nodes: dict[str, Node]):
        self.nodes = nodes
        self._leases: dict[str, Lease] = {}
        self._guard = threading.Lock()  # the dict
        self._node_locks = {n: threading.Lock() for n in nodes}  # freeze/thaw, one at a time
        # called with every fenced node's holders after the fences changed
        self.observer: Callable[[dict[str, list[str]]], None] | None = None
        self._fences: dict[str, list[str]] = {}  # as last told to the observer
        self._telling = threading.Lock()

    def fences(self) -> dict[str, list[str]]:
        """Each fenced node's holders."""
        with self._guard:
            return self._fence_map()

    def _fence_map(self) -> dict[str, list[str]]:
        return {n: sorted(lease.holders) for n, lease in self._leases.items()
                if lease.expires is None}

    def _changed(self) -> None:
        """Tell the observer the fences, if they changed (one at a time: the last told is
        the last state)."""
        with self._telling:
            fences = self.fences()
            if fences == self._fences:
                return
            self._fences = fences
            if self.observer is not None:
                self.observer(fences)

    def refence(self, node: str, holders: list[str], timeout: float) -> None:
        """Take back a fence a previous agent held (from its fd store): freeze the node
        again (it stayed frozen; this heals a thaw behind our back) and hold it fenced."""
        with self._node_locks[node]:
            try:
                self.nodes[node].lock(timeout)
            finally:  # a node that will not freeze is still fenced: fail-stop, not serving
                with self._guard:
                    self._leases[node] = Lease(frozenset(holders), None)
        with self._telling:
            self._fences = self.fences()  # as the store has them

    def state(self, node: str) -> LockState:
        with self._guard:
            lease = self._leases.get(node)
        if lease is None:
            return LockState([], None, False)
        return LockState(sorted(lease.holders), lease.left(time.monotonic()),
                         lease.expires is None)

    def holders(self, node: str) -> frozenset[str]:
        with self._guard:
            lease = self._leases.get(node)
        return lease.holders if lease else frozenset()

    def lock(self, node: str, monitors: frozenset[str], lease_s: float | None,
             timeout: float) -> LockReply:
        """Freeze `node` for `monitors` (or renew their lock); LockBusy if others hold it."""
        with self._node_locks[node]:
            with self._guard:
                current = self._leases.get(node)
            if current is not None and not current.holders & monitors:
                raise LockBusy(self._busy_message(node, current))
            # Freeze even on renewal: cheap when frozen, and heals a thaw done behind our back.
            took = self.nodes[node].lock(timeout)
            expires = None if lease_s is None else time.monotonic() + lease_s
            holders = monitors if current is None else current.holders | monitors
            with self._guard:
                self._leases[node] = Lease(holders, expires)
        self._changed()
        return LockReply(sorted(holders), lease_s, took * 1000, current is not None)

    def unlock(self, node: str, monitors: frozenset[str], force: bool,
               timeout: float) -> UnlockReply:
        """Thaw `node`; only its holders may, unless `force` or nobody holds it."""
        with self._node_locks[node]:
            with self._guard:
                current = self._leases.get(node)
            if current is not None and not force and not current.holders & monitors:
                raise LockBusy(self._busy_message(node, current) + "; unlock with force=true to "
                               "override")
            took = self.nodes[node].unlock(timeout)
            with self._guard:
                self._leases.pop(node, None)
        self._changed()
        return UnlockReply(current is not None, took * 1000)

    @contextmanager
    def exclusive(self, node: str) -> Iterator[None]:
        """Hold `node`'s lock operations off while the body runs (e.g. kill_node)."""
        with self._node_locks[node]:
            yield

    def released(self, node: str) -> None:
        """Forget the lock of `node` (it was thawed another way, e.g. by kill_node)."""
        with self._guard:
            self._leases.pop(node, None)
        self._changed()

    def expired(self) -> list[str]:
        """Nodes whose lease has run out (still frozen until `expire()` thaws them)."""
        now = time.monotonic()
        with self._guard:
            return [n for n, lease in self._leases.items()
                    if lease.expires is not None and lease.expires <= now]

    def expire(self, node: str, timeout: float) -> bool:
        """Thaw `node` if its lease has (still) run out; True if it was released."""
        with self._node_locks[node]:
            with self._guard:
                lease = self._leases.get(node)
            if lease is None or lease.expires is None or lease.expires > time.monotonic():
                return False  # renewed, fenced or unlocked meanwhile
            self.nodes[node].unlock(timeout)
            with self._guard:
                if self._leases.get(node) is lease:
                    del self._leases[node]
        return True

    def leased(self) -> list[str]:
        """Nodes locked under a lease (not fenced): released when the agent stops."""
        with self._guard:
            return [n for n, lease in self._leases.items() if lease.expires is not None]

    def describe(self, node: str) -> str:
        """"node X is locked by m1, lease 0.50 s left" (or "is not locked")."""
        with self._guard:
            lease = self._leases.get(node)
        return self._busy_message(node, lease) if lease else f"node {node} is not locked"

    @staticmethod
    def _busy_message(node: str, lease: Lease) -> str:
        left = lease.left(time.monotonic())
        how = "fenced (no lease)" if left is None else f"lease {left:.2f} s left"
        return f"node {node} is locked by {', '.join(sorted(lease.holders))}, {how}"

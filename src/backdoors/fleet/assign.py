"""Rendezvous (highest random weight) hashing of nodes over the live monitors.

Every monitor computes the same assignment from the same membership, with no
coordination: node n goes to the member m with the highest hash(m, n). When a member
leaves, only its nodes move (each to its own next-highest member); when one joins, it takes
about 1/N of the nodes, from every other member alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, node: str) -> int:
    digest = hashlib.blake2b(f"{member}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(node: str, members: Iterable[str]) -> str | None:
    """The member `node` is assigned to (None without members); ties go to the lower id."""
    best = None
    for m in sorted(members):
        if best is None or weight(m, node) > weight(best, node):
            best = m
    return best


def assign(nodes: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """node -> member, for every node (empty without members)."""
    members = sorted(set(members))
    if not members:
        return {}
    return {n: owner(n, members) for n in nodes}

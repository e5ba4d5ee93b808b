"""Rendezvous (highest random weight) hashing of nodes over the live monitors.

Every monitor computes the same assignment from the same membership, with no
coordination: node n goes to the member m with the highest hash(m, n). When a member
leaves, only its nodes move (each to its own next-highest member); when one joins, it takes
about 1/N of the nodes, from every other member alike.

**Reach.** A node is named "host/node", after the agent that holds it. A member that
cannot reach a host's agent cannot watch its nodes, so each node is hashed over the
members that reach its host (`reaches`). When none does (the host is down, or cut off from
every monitor), the node stays with its owner (`owners`) while that one is a member, else
is hashed over the members that know the host's nodes (`knows`: they listed them once; a
member that never did could not take them), or every member if none does: someone keeps
it, to record and answer its silence, and a host that dies moves none of its nodes once
every member lost it. A member that says nothing of its reach (an older version) makes
the whole fleet assign as before, over every member: members that judged by different
rules would each leave a node to the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


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


def host_of(node: str) -> str:
    """The host of fleet node "host/node" (a name without "/" is its own host)."""
    return node.split("/", 1)[0]


Hosts = frozenset[str] | set[str] | None  # None: every host


def assign(nodes: Iterable[str], members: Iterable[str],
           reaches: Mapping[str, Hosts] | None = None, owners: Mapping[str, str] | None = None,
           knows: Mapping[str, Hosts] | None = None) -> dict[str, str]:
    """node -> member, for every node (empty without members). `reaches`: member -> the
    hosts it reaches (None for any member, or a member missing: reach is not used);
    `owners`: node -> its member now, and `knows`: member -> the hosts whose nodes it
    knows (missing or None: every host), for the nodes of a host no member reaches."""
    members = sorted(set(members))
    if not members:
        return {}
    if reaches is None or any(reaches.get(m) is None for m in members):
        return {n: owner(n, members) for n in nodes}
    out, owners, knows = {}, owners or {}, knows or {}
    for n in nodes:
        host = host_of(n)
        if near := [m for m in members if host in reaches[m]]:
            out[n] = owner(n, near)
        elif owners.get(n) in members:
            out[n] = owners[n]
        else:
            aware = [m for m in members if (k := knows.get(m)) is None or host in k]
            out[n] = owner(n, aware or members)
    return out

"""The agent's descriptors, shared by its nodes.

Every session a node has the agent hold costs the agent two descriptors (its box's memfd
and its socket), every region one (two when the agent maps it: Python's mmap keeps a
duplicate). With the configured caps (max_sessions_per_node, max_regions_per_node), a
few nodes together could need more than the agent's RLIMIT_NOFILE: two or three hostile
nodes would take every descriptor, and then every node's registrations, the fd store, a
recovery's adopt and new connections would fail with EMFILE. So a node's session cap is
at most its share of the limit, after a reserve for the agent's own use (connections,
pidfds, cgroup files, sessions in flight in a recovery): a node past its share is
refused, saying why, and the other nodes and the agent keep theirs.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

RESERVE_MIN = 256  # descriptors the agent keeps for itself, at least
RESERVE_SHARE = 8  # or this fraction of the limit, if more
#: a node's own besides its sessions and regions: its registration connections (at most
#: 64, each a socket and its caller's pidfd), the descriptors of its unfinished requests
#: (at most 128: agent/local.py), cgroup files, PSI triggers
PER_NODE = 288


@dataclass(frozen=True)
class SessionCap:
    """Sessions a node may hold: the configured cap, or less to fit the limit."""

    sessions: int
    configured: int
    limit: int  # the soft RLIMIT_NOFILE it was worked out from
    nodes: int

    @property
    def lowered(self) -> bool:
        return self.sessions < self.configured

    @property
    def note(self) -> str:
        """What the cap is, for a refusal: 'max_sessions_per_node' or why it is lower."""
        if not self.lowered:
            return "max_sessions_per_node"
        return (f"max_sessions_per_node {self.configured}, lowered to fit the agent's "
                f"descriptor limit of {self.limit} shared by its {self.nodes} nodes; raise "
                "LimitNOFILE for more")


def session_cap(configured: int, nodes: int, regions_per_node: int,
                limit: int | None = None) -> SessionCap:
    """The session cap per node for `nodes` nodes within `limit` descriptors (default:
    this process's soft RLIMIT_NOFILE)."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return SessionCap(configured, configured, limit, nodes)
    reserve = max(RESERVE_MIN, limit // RESERVE_SHARE)
    share = (limit - reserve) // max(1, nodes) - 2 * regions_per_node - PER_NODE
    return SessionCap(max(0, min(configured, share // 2)), configured, limit, nodes)

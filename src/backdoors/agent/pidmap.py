"""Pids a node reports, in the agent's terms: host pids.

A service in a container node (its own PID namespace) writes its in-node pid into what it
makes (a Sensor Box's `owner_pid`); the agent, its monitors and the host's /proc speak host
pids. The agent trusts the kernel's view: the registering process is known by SO_PEERCRED
(a host pid); its NSpid line in the host's /proc says which pid it has inside its node.
When a box's owner_pid is that in-node pid, the box is served with the registrant's host
pid instead. A node without a PID namespace of its own writes host pids: nothing changes.
"""

from __future__ import annotations

import struct

from ..sensors.abi import OFF_OWNER_PID

_U32 = struct.Struct("<I")


def ns_pids(pid: int) -> list[int]:
    """The pids of host process `pid` from the host's PID namespace down to its own
    ([] if it has exited)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def in_host_terms(pid: int, registrant: int) -> int:
    """`pid`, as written by registrant `registrant` (a host pid), as a host pid: the
    registrant's own host pid if `pid` is its pid inside its node, else `pid` unchanged."""
    if pid == registrant:
        return pid
    ns = ns_pids(registrant)
    return registrant if len(ns) > 1 and ns[-1] == pid else pid


def box_in_host_terms(image: bytes, registrant: int) -> bytes:
    """A Sensor Box copy whose owner_pid is mapped to a host pid (see in_host_terms)."""
    if len(image) < OFF_OWNER_PID + 4:
        return image
    (owner,) = _U32.unpack_from(image, OFF_OWNER_PID)
    host = in_host_terms(owner, registrant)
    if host == owner:
        return image
    return image[:OFF_OWNER_PID] + _U32.pack(host) + image[OFF_OWNER_PID + 4:]

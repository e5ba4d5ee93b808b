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


def inner_pid(pid: int) -> int:
    """The pid host process `pid` has in its own PID namespace (`pid` itself when it has
    none of its own, or has exited). Fixed for a process's life: callers keep it."""
    ns = ns_pids(pid)
    return ns[-1] if len(ns) > 1 else pid


def box_in_host_terms(image: bytes, registrant: int, inner: int) -> bytes:
    """A Sensor Box copy whose owner_pid, when it is `inner` (the registrant's pid inside
    its node), is the registrant's host pid `registrant` instead."""
    if inner == registrant or len(image) < OFF_OWNER_PID + 4:
        return image
    (owner,) = _U32.unpack_from(image, OFF_OWNER_PID)
    if owner != inner:
        return image
    return image[:OFF_OWNER_PID] + _U32.pack(registrant) + image[OFF_OWNER_PID + 4:]

"""This process's table of descriptors, grown once, ahead of need.

The kernel grows a process's descriptor table by doubling it when a new descriptor does
not fit, and in a process with more than one thread each growth waits for an RCU grace
period (`expand_fdtable`'s `synchronize_rcu`): 10-20 ms on these machines, in the middle
of whatever opened the descriptor. An agent adopting a thousand sessions, or the server
they are handed to, opens thousands of descriptors in a burst: several growths, tens of
milliseconds of stalls on a recovery's critical path (measured: 3,000 dups beside one
idle thread take 49 ms, a 20 ms stall the worst; 1.6 ms in a table grown beforehand).
Growing it once at start puts that cost where nobody waits for it (and in a process of
one thread there is no grace period at all). `raise_limit()` first: a table cannot grow
past the soft RLIMIT_NOFILE, which a shell sets to 1,024.
"""

from __future__ import annotations

import fcntl
import os
import resource

#: slots reserved by default: 8 bytes each in the kernel (128 KiB), a few thousand sessions
DEFAULT_SLOTS = 16384


def raise_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (no privilege needed: a process
    holding sessions by the thousand, while a shell gives it 1,024); the limit now.
    OSError or ValueError if the kernel refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def session_limit(per_session: int) -> int:
    """Sessions for half of this process's descriptors (its soft RLIMIT_NOFILE, raised to
    the hard one), `per_session` descriptors each, after 256 of its own: the other half
    stays free for the sessions a recovery hands over. At least 1 (a floor above what
    the descriptors allow would leave clients stalled in the accept queue rather than
    refused)."""
    try:
        limit = raise_limit()
    except (OSError, ValueError):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        limit = 1 << 20
    return max(1, (limit - 256) // (2 * per_session))


def reserve(slots: int = DEFAULT_SLOTS) -> int:
    """Grow the descriptor table to hold `slots` descriptors (at most the soft
    RLIMIT_NOFILE) by opening one at the last of them and closing it (no descriptor in
    use is touched); the size reached, 0 if it could not be grown."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        slots = min(slots, soft)
    if slots <= 64:  # the table starts this large
        return 0
    r, w = os.pipe()
    try:
        high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, slots - 1)
    except OSError:  # every slot from there on taken: the table is that large already
        return slots
    finally:
        os.close(r)
        os.close(w)
    os.close(high)
    return slots

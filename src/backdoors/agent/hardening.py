"""What the agent daemon does to itself to stay available while nodes suffer.

- `harden()`: lock its memory (mlockall, so node memory pressure cannot page it out),
  exempt it from the OOM killer (oom_score_adj -1000), raise its CPU priority (nice -10),
  shorten the GIL switch interval so the RPC loop waits less behind sampler threads, and
  raise its descriptor limit to the hard one (its nodes share it: agent/descriptors.py).
  Each step that the kernel refuses is a warning, not a failure.
- `OwnCgroup`: a cgroup of its own outside every node, entered at start and removed at
  exit (the daemon moves back to where it came from first), with the highest CPU weight:
  nice applies among the tasks of one cgroup only, and each busy node's cgroup weighs as
  much as the agent's otherwise (64 nodes starting their services at once starved the
  lab's agents past their watchdog).
"""

from __future__ import annotations

import ctypes
import os
import sys

from ..common import fdtable
from ..errors import NodeError
from ..nodes import Cgroup, Layout, detect
from ..nodes import cgfs
from .membership import paths_in, read_cgroups

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
M_ARENA_MAX = -8
NICE = -10
CPU_WEIGHT = 10000  # the v2 maximum; a node's cgroup has 100
OOM_SCORE_ADJ = -1000
SWITCH_INTERVAL_S = 0.001

_libc = ctypes.CDLL(None, use_errno=True)


def harden() -> list[str]:
    """Apply the measures above; returns warnings for those the kernel refused."""
    warnings = []
    _libc.mallopt(M_ARENA_MAX, 2)  # fewer malloc arenas: less memory pinned by mlockall
    # MCL_ONFAULT locks pages as they are touched: thread stacks and region mappings are
    # not populated in full up front; what the agent has touched stays resident. Without
    # it (Linux < 4.4) MCL_FUTURE would populate every later mapping at once - a node's
    # sparse region mapped by the agent would be allocated in full, charged to the agent -
    # so only the memory present now is locked then.
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        if _libc.mlockall(MCL_CURRENT) != 0:
            err = ctypes.get_errno()
            warnings.append(f"mlockall refused ({os.strerror(err)}): the agent's memory may be "
                            "paged out under pressure (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)")
        else:
            warnings.append("mlockall(MCL_ONFAULT) refused: only the agent's memory at start "
                            "is locked (later allocations may be paged out)")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as e:
        warnings.append(f"cannot set oom_score_adj {OOM_SCORE_ADJ}: {e.strerror}")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except OSError as e:
        warnings.append(f"cannot set nice {NICE}: {e.strerror}")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:  # a shell's 1024 would be all its nodes' sessions (agent/descriptors.py)
        fdtable.raise_limit()
    except (OSError, ValueError) as e:
        warnings.append(f"cannot raise the descriptor limit to the hard one: {e}")
    return warnings


class OwnCgroup:
    """The daemon's own cgroup: `enter()` creates it and moves the process in; `leave()`
    moves it back to its original cgroups and removes it, unless others are in it (the
    agent of this host started first, which removing would kill)."""

    def __init__(self, relpath: str, layout: Layout | None = None):
        self.layout = layout or detect()
        self.relpath = relpath
        self.cgroup: Cgroup | None = None
        self.warning: str | None = None  # what enter() could not do
        self._origin: dict[str, str] = {}

    def enter(self) -> OwnCgroup:
        self._origin = paths_in(self.layout, read_cgroups("self"))
        self.cgroup = Cgroup.create(self.relpath, layout=self.layout)
        try:
            self.cgroup.set_cpu_weight(CPU_WEIGHT)
        except NodeError as e:
            self.warning = f"cannot raise the agent cgroup's CPU weight: {e}"
        self.cgroup.attach(os.getpid())
        return self

    def leave(self) -> None:
        if self.cgroup is None:
            return
        for hierarchy, mount in self.layout.hierarchies().items():
            origin = self._origin.get(hierarchy, "/").strip("/")
            try:
                cgfs.write(mount / origin / "cgroup.procs", str(os.getpid()))
            except NodeError:
                pass  # checked below
        left = self.cgroup.procs()
        if os.getpid() in left:
            raise NodeError(f"the agent could not leave its cgroup {self.relpath!r}; it stays "
                            "(remove it later with backdoors.nodes.reap)")
        if left:  # (destroy would kill them: another agent of this host, started first)
            raise NodeError(f"the agent's cgroup {self.relpath!r} holds other processes "
                            f"({', '.join(map(str, sorted(left)[:8]))}): it stays")
        self.cgroup.destroy()
        self.cgroup = None

    def __enter__(self) -> OwnCgroup:
        return self.enter()

    def __exit__(self, *exc) -> None:
        self.leave()

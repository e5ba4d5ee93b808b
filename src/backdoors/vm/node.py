"""A VM node as an agent sees it: a node whose cgroup holds the QEMU of one guest.

Everything a node is (its cgroup's accounting and limits, its process table, kill) stays
as for a container node; two things differ. The node lock stops the guest's vCPUs
through QEMU's QMP socket kept for the agent (`stop` / `cont`): the guest kernel stops
where it is, QEMU itself keeps answering, and the guest's memory can be read and repaired
while it is held. And the guest's RAM is mapped from the QEMU's memfd, so the agent reads
the guest kernel without its help (memory.GuestMemory, guard.GuestWatch).

The node is bound to the QEMU it was opened with (pid and start time): its QMP and
gdbstub peers must be that process (SO_PEERCRED), so a guest restarted since, or a
socket swapped for another guest's, is refused rather than locked or written into.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..common.procs import is_same
from ..errors import BackdoorsError, NodeError
from ..nodes import Node, read_process
from ..nodes.cgroups import Cgroup
from ..nodes.hierarchies import Layout
from .gdb import GdbStub
from .kernel import GuestKernel
from .machine import GDB, QEMU, debug_session, open_ram
from .memory import GuestMemory
from .qmp import Qmp


class VmNode(Node):
    """The VM node `name`: QEMU `pid` (started at `start_time`) in cgroup `cgroup`, guest
    `guest`, QMP socket `qmp`, kernel package `kernel` (None: the lab's)."""

    def __init__(self, name: str, cgroup: Cgroup, netns: str | None, *, guest: str, qmp: Path,
                 pid: int, start_time: float, kernel: Path | None = None):
        super().__init__(name, cgroup, netns)
        self.guest, self.kernel = guest, kernel
        self.pid, self.start_time = pid, start_time
        self.qmp = Qmp(qmp, f"VM node {name}", pid=pid)
        #: QEMU's gdbstub, when healing: beside the QMP socket (started there on first use)
        self.gdb_path = qmp.parent / GDB
        self._memory: GuestMemory | None = None

    def __repr__(self) -> str:
        return f"VmNode({self.name!r}, cgroup={self.cgroup.relpath!r}, guest={self.guest!r})"

    @classmethod
    def open(cls, name: str, cgroup_path: str, *, netns: str | None = None,
             freezer: str = "auto", layout: Layout | None = None, guest: str = "",
             qmp: str | Path = "", kernel: str | Path | None = None) -> VmNode:
        """The VM node whose cgroup exists and holds one QEMU; NodeError if it, the netns
        or the QEMU is missing."""
        node = Node.open(name, cgroup_path, netns=netns, freezer=freezer, layout=layout)
        pid = _qemu(node)
        info = read_process(pid)
        if info is None:
            raise NodeError(f"VM node {name}: its QEMU (pid {pid}) exited")
        return cls(name, node.cgroup, node.netns, guest=guest, qmp=Path(qmp), pid=pid,
                   start_time=info.start_time, kernel=Path(kernel) if kernel else None)

    def alive(self) -> bool:
        """Whether the QEMU the node was opened with still runs."""
        return is_same(self.pid, self.start_time)

    def memory(self) -> GuestMemory:
        """The guest's RAM, mapped read-only from its QEMU (once), with the kernel located
        in it. Kept only once the kernel is found: a guest still booting (or a kernel not
        found) is searched for afresh at the next call."""
        if self._memory is None:
            fd = open_ram(self.pid, self.guest)
            try:
                memory = GuestMemory(fd, GuestKernel.find(self.kernel),
                                     where=f"VM node {self.name}")
            finally:
                os.close(fd)
            try:
                memory.text_phys  # noqa: B018 - located (and checked) now, or not kept
            except BaseException:
                memory.close()
                raise
            self._memory = memory
        return self._memory

    def running(self) -> bool:
        """Whether the guest's vCPUs run."""
        return self.qmp.running()

    def debug(self) -> contextlib.AbstractContextManager[GdbStub]:
        """A session on the guest's gdbstub (machine.debug_session): what healing writes
        through; the vCPUs are as they were after it. Refused once the QEMU is gone."""
        if not self.alive():
            raise NodeError(f"VM node {self.name}: its QEMU (pid {self.pid}) is gone: its "
                            "memory is not the guest's any more")
        return debug_session(self.qmp, self.gdb_path, f"VM node {self.name}")

    # -- the node lock: the guest's vCPUs --------------------------------------------

    def lock(self, timeout: float = 1.0) -> float:
        """Stop the guest's vCPUs (nothing to do if they are stopped: a renewal); returns
        the seconds it took. If the stop fails they are resumed, as a freeze that timed out
        is thawed -- only ever a guest this call found running."""
        began = time.monotonic()
        try:
            if not self.qmp.running(timeout):
                return time.monotonic() - began
            self.qmp.cmd("stop", timeout=timeout)
        except BackdoorsError as e:
            with contextlib.suppress(BackdoorsError):
                if not self.qmp.running():  # the stop landed after all, or did it?
                    self.qmp.cmd("cont", timeout=timeout)
            raise NodeError(f"node {self.name} would not lock: {e}") from None
        return time.monotonic() - began

    def unlock(self, timeout: float = 1.0) -> float:
        """Resume the guest's vCPUs; returns the seconds it took."""
        began = time.monotonic()
        try:
            self.qmp.cmd("cont", timeout=timeout)
        except BackdoorsError as e:
            raise NodeError(f"node {self.name} would not unlock: {e}") from None
        return time.monotonic() - began

    def is_locked(self) -> bool:
        """True while the guest's vCPUs are stopped."""
        try:
            return not self.qmp.running()
        except BackdoorsError as e:
            raise NodeError(f"node {self.name}: {e}") from None

    def close(self) -> None:
        self.qmp.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None


def _qemu(node: Node) -> int:
    """The pid of the one QEMU process of the node's cgroup."""
    found = []
    for pid in node.cgroup.procs():
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == QEMU:
                found.append(pid)
        except OSError:
            continue  # gone meanwhile
    if len(found) != 1:
        raise NodeError(f"VM node {node.name}: its cgroup {node.cgroup.relpath!r} holds "
                        f"{len(found)} {QEMU} processes, not one: is the guest running?")
    return found[0]

"""A VM node as an agent sees it: a node whose cgroup holds the QEMU of one guest.

Everything a node is (its cgroup's accounting and limits, its process table, kill) stays
as for a container node; two things differ. The node lock stops the guest's vCPUs
through QEMU's QMP socket kept for the agent (`stop` / `cont`): the guest kernel stops
where it is, QEMU itself keeps answering, and the guest's memory can be read and repaired
while it is held. And the guest's RAM is mapped from the QEMU's memfd, so the agent reads
the guest kernel without its help (memory.GuestMemory, sensors.GuestSensors).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..errors import BackdoorsError, NodeError
from ..nodes import Node
from ..nodes.cgroups import Cgroup
from ..nodes.hierarchies import Layout
from .kernel import GuestKernel
from .gdb import GdbStub
from .machine import GDB, QEMU, debug_session, open_ram
from .memory import GuestMemory
from .qmp import Qmp


class VmNode(Node):
    """The VM node `name`: QEMU in cgroup `cgroup`, guest `guest`, QMP socket `qmp`."""

    def __init__(self, name: str, cgroup: Cgroup, netns: str | None, *, guest: str, qmp: Path):
        super().__init__(name, cgroup, netns)
        self.guest = guest
        self.qmp = Qmp(qmp, f"VM node {name}")
        #: QEMU's gdbstub, when healing: beside the QMP socket (started there on first use)
        self.gdb_path = qmp.parent / GDB
        self._memory: GuestMemory | None = None

    def __repr__(self) -> str:
        return f"VmNode({self.name!r}, cgroup={self.cgroup.relpath!r}, guest={self.guest!r})"

    @classmethod
    def open(cls, name: str, cgroup_path: str, *, netns: str | None = None,
             freezer: str = "auto", layout: Layout | None = None, guest: str = "",
             qmp: str | Path = "") -> VmNode:
        """The VM node whose cgroup exists; NodeError if it or the netns is missing."""
        node = Node.open(name, cgroup_path, netns=netns, freezer=freezer, layout=layout)
        return cls(name, node.cgroup, node.netns, guest=guest, qmp=Path(qmp))

    def qemu(self) -> int:
        """The pid of the node's QEMU: the one process of its cgroup running QEMU."""
        found = []
        for pid in self.cgroup.procs():
            try:
                if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == QEMU:
                    found.append(pid)
            except OSError:
                continue  # gone meanwhile
        if len(found) != 1:
            raise NodeError(f"VM node {self.name}: its cgroup {self.cgroup.relpath!r} holds "
                            f"{len(found)} {QEMU} processes, not one: is the guest running?")
        return found[0]

    def memory(self) -> GuestMemory:
        """The guest's RAM, mapped read-only from its QEMU (once), with the kernel located
        in it."""
        if self._memory is None:
            fd = open_ram(self.qemu(), self.guest)
            try:
                self._memory = GuestMemory(fd, GuestKernel.find(), where=f"VM node {self.name}")
            finally:
                os.close(fd)
        return self._memory

    def running(self) -> bool:
        """Whether the guest's vCPUs run."""
        return self.qmp.running()

    def debug(self) -> contextlib.AbstractContextManager[GdbStub]:
        """A session on the guest's gdbstub (machine.debug_session): what healing writes
        through; the vCPUs are as they were after it."""
        return debug_session(self.qmp, self.gdb_path, f"VM node {self.name}")

    # -- the node lock: the guest's vCPUs --------------------------------------------

    def lock(self, timeout: float = 1.0) -> float:
        """Stop the guest's vCPUs; returns the seconds it took."""
        began = time.monotonic()
        try:
            self.qmp.cmd("stop", timeout=timeout)
        except BackdoorsError as e:
            try:  # as a freeze that timed out is thawed: the stop may land late
                self.qmp.cmd("cont", timeout=timeout)
            except BackdoorsError:
                pass
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

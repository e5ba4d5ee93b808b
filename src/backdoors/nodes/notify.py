"""Kernel notifications about one cgroup, as file descriptors to wait on (epoll).

A watcher waits on many nodes at once with no read per node per tick; each notifier
gives `fd` and `mask` (the epoll events to wait for), `consume()` after a wake-up (it
re-arms the notification and says what changed), and `close()` (the notifier owns its
descriptors; closing them removes the kernel's registration).

- `FrozenNotifier`: the v2 freezer's `cgroup.events` ("frozen"), which the kernel
  marks modified (EPOLLPRI) on every change. The v1 freezer has no notification:
  `FrozenNotifier.open` gives None there and the caller checks `Cgroup.is_frozen()`.
- `OomNotifier`: the memory controller's OOM notification. v1: an eventfd registered
  on `memory.oom_control` through `cgroup.event_control` (signalled when the cgroup
  hits OOM, before the kill); v2: `memory.events` (EPOLLPRI when oom/oom_kill rise).
  Either way the count itself is `Cgroup.oom_kills()`, read after the wake-up; a v1
  wake-up comes before the kill is counted, so the caller reads again shortly after.
"""

from __future__ import annotations

import os
import select
from pathlib import Path

from backdoors.errors import NodeError
from backdoors.nodes import cgfs
from backdoors.nodes.cgroups import Cgroup
from backdoors.nodes.hierarchies import UNIFIED

__all__ = ["FrozenNotifier", "OomNotifier"]


class _FileNotifier:
    """A kernfs file marked modified with EPOLLPRI; reading it re-arms the notification."""

    mask = select.EPOLLPRI

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise cgfs.error("open", path, e) from None

    def read(self) -> dict[str, int]:
        """The file's keys now (and the notification re-armed)."""
        try:
            return cgfs.keyed(os.pread(self.fd, 4096, 0).decode())
        except OSError as e:
            raise cgfs.error("read", self.path, e) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FrozenNotifier(_FileNotifier):
    """Changes of a v2-frozen cgroup's state; `consume()` -> frozen now."""

    @classmethod
    def open(cls, cg: Cgroup) -> FrozenNotifier | None:
        """A notifier for `cg`, or None where its freezer (v1) notifies nothing."""
        if cg.freezer != "v2" or UNIFIED not in cg.paths:
            return None
        return cls(cg.paths[UNIFIED] / "cgroup.events")

    def consume(self) -> bool:
        return self.read().get("frozen") == 1


class OomNotifier:
    """The OOM notification of a cgroup's memory controller (v1 eventfd or v2
    memory.events); `consume()` re-arms it."""

    mask = select.EPOLLIN

    def __init__(self, fd: int, events: _FileNotifier | None):
        self.fd, self._events = fd, events
        if events is not None:
            self.mask = select.EPOLLPRI

    @classmethod
    def open(cls, cg: Cgroup) -> OomNotifier | None:
        """A notifier for `cg`, or None without a memory controller."""
        home = cg.layout.home("memory")
        if home == "v2":
            events = _FileNotifier(cg.paths[UNIFIED] / "memory.events")
            return cls(events.fd, events)
        if home != "v1":
            return None
        memdir = cg.layout.v1["memory"] / cg.relpath
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = memdir / "memory.oom_control"
            try:
                cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise cgfs.error("open", control, e) from None
            try:  # the kernel keeps the registration until the eventfd is closed
                cgfs.write(memdir / "cgroup.event_control", f"{efd} {cfd}")
            finally:
                os.close(cfd)
        except BaseException:
            os.close(efd)
            raise
        return cls(efd, None)

    def consume(self) -> None:
        if self._events is not None:
            self._events.read()
            return
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        except OSError as e:
            raise NodeError(f"cannot read the OOM eventfd: {e.strerror}") from None

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

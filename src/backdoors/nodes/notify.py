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
- `MemoryThreshold`: the v1 memory controller's usage threshold, an eventfd registered on
  `memory.usage_in_bytes` through `cgroup.event_control`, signalled when the usage
  crosses it either way (the kernel checks every 128 page charges or so: ~512 KiB).
  The usage itself is `Cgroup.memory_usage()`, read after the wake-up. v2 has no such
  notification (`memory.events` counts `high` only above a `memory.high`, which would
  throttle the node): `open` gives None there.
- `PressureTrigger`: a PSI trigger on the cgroup's v2 `<resource>.pressure` (memory, cpu,
  io): EPOLLPRI when its tasks were stalled ("some") for at least `share` of a
  `window_s` window, at most once per window while that lasts. The kernel judges it as
  it accounts the stall: nothing is read until it fires. Needs no controller (PSI is
  accounted on the v2 hierarchy), only PSI in the kernel.
"""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

from backdoors.errors import NodeError
from backdoors.nodes import cgfs
from backdoors.nodes.cgroups import Cgroup
from backdoors.nodes.hierarchies import UNIFIED

__all__ = ["FrozenNotifier", "MemoryThreshold", "OomNotifier", "PressureTrigger"]


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
        return cls(_v1_eventfd(cg, "memory.oom_control"), None)

    def consume(self) -> None:
        if self._events is not None:
            self._events.read()
            return
        _drain(self.fd, "OOM")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class MemoryThreshold:
    """The v1 memory usage threshold of a cgroup at `threshold` bytes; its eventfd wakes
    (EPOLLIN) when the usage crosses it, up or down; `consume()` re-arms it."""

    mask = select.EPOLLIN

    def __init__(self, fd: int, threshold: int):
        self.fd, self.threshold = fd, threshold

    @classmethod
    def open(cls, cg: Cgroup, threshold: int) -> MemoryThreshold | None:
        """A threshold for `cg`, or None where its memory controller is not v1."""
        if cg.layout.home("memory") != "v1":
            return None
        return cls(_v1_eventfd(cg, "memory.usage_in_bytes", f" {int(threshold)}"), threshold)

    def consume(self) -> None:
        _drain(self.fd, "memory threshold")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _v1_eventfd(cg: Cgroup, file: str, args: str = "") -> int:
    """An eventfd registered on the v1 memory controller's `file` of `cg` (with `args`)
    through `cgroup.event_control`; the kernel keeps the registration until it is closed."""
    memdir = cg.layout.v1["memory"] / cg.relpath
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        path = memdir / file
        try:
            cfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise cgfs.error("open", path, e) from None
        try:
            cgfs.write(memdir / "cgroup.event_control", f"{efd} {cfd}{args}")
        finally:
            os.close(cfd)
    except BaseException:
        os.close(efd)
        raise
    return efd


def _drain(fd: int, what: str) -> None:
    """Read an eventfd's count (re-arming it); nothing to read is no error."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    except OSError as e:
        raise NodeError(f"cannot read the {what} eventfd: {e.strerror}") from None


class PressureTrigger:
    """A PSI trigger of one resource of a cgroup; its fd wakes (EPOLLPRI) when the stall
    passes the threshold; `consume()` has nothing to read (the poll itself re-arms it)."""

    mask = select.EPOLLPRI
    RESOURCES = ("memory", "cpu", "io")

    def __init__(self, fd: int, resource: str, share: float, window_s: float):
        self.fd, self.resource, self.share, self.window_s = fd, resource, share, window_s

    @classmethod
    def open(cls, cg: Cgroup, resource: str, share: float,
             window_s: float = 2.0) -> PressureTrigger | None:
        """A trigger at `share` (0..1) of `window_s` (0.5..10 s, the kernel's range) for
        `cg`, or None without a v2 hierarchy or PSI. Without CAP_SYS_RESOURCE the kernel
        takes only windows that are multiples of 2 s (and checks them every 2 s)."""
        if resource not in cls.RESOURCES:
            raise NodeError(f"no PSI for {resource!r}: one of {', '.join(cls.RESOURCES)}")
        if not 0 < share < 1 or not 0.5 <= window_s <= 10:
            raise NodeError(f"a PSI trigger needs 0 < share < 1 and a window of 0.5..10 s, "
                            f"not {share:g} of {window_s:g} s")
        if UNIFIED not in cg.paths:
            return None
        path = cg.paths[UNIFIED] / f"{resource}.pressure"
        window_us = round(window_s * 1e6)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # no PSI in this kernel (or psi=0 on its command line)
        except OSError as e:
            raise cgfs.error("open", path, e) from None
        try:  # the kernel keeps the trigger while this descriptor is open
            os.write(fd, f"some {max(1, round(share * window_us))} {window_us}\0".encode())
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EOPNOTSUPP:
                return None  # PSI compiled in but disabled
            hint = ("a window that is not a multiple of 2 s needs CAP_SYS_RESOURCE"
                    if e.errno == errno.EINVAL and window_us % 2_000_000 else "")
            raise cgfs.error("write a PSI trigger to", path, e, hint) from None
        return cls(fd, resource, share, window_s)

    def consume(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""The regions registered with the agent, per node, with their caps and lifetimes.

The table owns each region's file descriptor and mapping (a `Region`), so a region
outlives the process that registered it. Readers borrow an entry with `use()`; an entry
removed or replaced while borrowed is closed when the last borrower returns it, so a read
never races an unmap. The table is shared by the local registration thread, the RPC loop
and its worker threads: every access holds its lock (briefly: never during a copy).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..common.procs import is_same, read_process
from ..errors import AgentError
from ..sensors import GUEST_BOX, KERNEL_BOX, Region
from .pidmap import inner_pid

REGION_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KINDS = ("sensorbox", "region", "cb")
#: Continuation Boxes are counted against the session cap (max_sessions_per_node), not the
#: region count; their bytes count in max_node_bytes like every other region's.
SESSION_KIND = "cb"
#: Only Sensor Boxes are mapped by the agent (their seqlock needs single word loads); every
#: other region is read with pread, which allocates nothing for a sparse region's holes.
MAPPED_KINDS = ("sensorbox",)


class RegionRefused(AgentError):
    """A registration broke a rule (name, caps, a live owner); the message says which."""


class NoSuchRegion(KeyError):
    """The node has no region of that name."""


@dataclass(eq=False)
class Entry:
    """One registered region; `pid`/`start_time` name the process that registered it."""

    node: str
    name: str
    kind: str
    region: Region
    writable: bool
    pid: int
    start_time: float
    internal: bool = False  # the agent's own (kernel sensors): not counted in the caps
    registered_at: float = field(default_factory=time.time)
    _users: int = 0
    _retired: bool = False
    #: the registrant's pid inside its node, for a Sensor Box's owner_pid; other kinds
    #: carry no pid, so their registration skips the /proc/PID/status read (~11 us a box)
    inner_pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.inner_pid = inner_pid(self.pid) if self.kind in MAPPED_KINDS else self.pid

    @property
    def size(self) -> int:
        return self.region.size

    def registrant_alive(self) -> bool:
        return is_same(self.pid, self.start_time)


class RegionTable:
    """Regions per node, with per-node caps on count, total bytes and region size."""

    def __init__(self, nodes, *, max_regions: int, max_region_bytes: int, max_node_bytes: int,
                 max_sessions: int = 4096, sessions_note: str = "max_sessions_per_node"):
        self.max_regions, self.max_region_bytes = max_regions, max_region_bytes
        self.max_sessions, self.sessions_note = max_sessions, sessions_note
        self.max_node_bytes = max_node_bytes
        self._nodes: dict[str, dict[str, Entry]] = {n: {} for n in nodes}
        # per node, of the entries not internal: [Continuation Boxes, other regions, bytes]
        # kept as entries come and go, so a registration costs O(1) with 10,000 sessions
        self._tally: dict[str, list[int]] = {n: [0, 0, 0] for n in nodes}
        self._lock = threading.Lock()
        #: called as observer("add" | "remove", entry) after a change (the fd store)
        self.observer: Callable[[str, Entry], None] | None = None
        #: counts the Sensor Boxes added and removed: a reader that keeps borrowed boxes
        #: (the watcher) takes them again when it moves (sessions' boxes do not move it)
        self.box_version = 0
        #: per node, (pid, start_time) of its service: the first process to register while
        #: no service of the node ran (see `service`)
        self._service: dict[str, tuple[int, float]] = {}
        #: called with every node's service after one changes (the fd store keeps them)
        self.service_observer: Callable[[dict[str, tuple[int, float]]], None] | None = None

    def usage(self, node: str) -> tuple[int, int]:
        """(count, bytes) of the node's registered regions, the agent's own excluded; the
        count leaves Continuation Boxes out (they have their own cap), the bytes do not."""
        with self._lock:
            _, others, size = self._tally[node]
        return others, size

    def _count(self, entry: Entry, sign: int) -> None:  # with self._lock held
        if not entry.internal:
            tally = self._tally[entry.node]
            tally[0 if entry.kind == SESSION_KIND else 1] += sign
            tally[2] += sign * entry.size

    def add(self, entry: Entry, *, stand_in: bool = False) -> Entry | None:
        """Insert `entry`; returns the entry it replaced (already retired), if any.

        A name in use is taken over only from a registrant that has exited, or by the same
        process; otherwise, and beyond the caps, RegionRefused says why. A `stand_in` (the
        agent's copy of a box it handed to `entry.pid`) never replaces what that process
        registered itself: then nothing is added and `entry` itself is returned.
        """
        if not REGION_NAME.fullmatch(entry.name):
            raise RegionRefused(f"region name {entry.name!r} must be 1-64 of A-Z a-z 0-9 _ . : -")
        if entry.kind not in KINDS:
            raise RegionRefused(f"region kind {entry.kind!r} is not one of {', '.join(KINDS)}")
        if entry.name in (KERNEL_BOX, GUEST_BOX) and not entry.internal:
            raise RegionRefused(f"region name {entry.name!r} is reserved for the agent's kernel "
                                "sensors")
        if not entry.internal and entry.size > self.max_region_bytes:
            raise RegionRefused(f"region {entry.name!r} has {entry.size} bytes; the cap is "
                                f"{self.max_region_bytes} per region")
        with self._lock:
            regions = self._nodes[entry.node]
            old = regions.get(entry.name)
        if old is not None and old.internal != entry.internal:
            raise RegionRefused(f"region name {entry.name!r} is reserved")
        if old is not None and old.pid != entry.pid and old.registrant_alive():
            raise RegionRefused(
                f"region {entry.name!r} of node {entry.node} is registered by process {old.pid}, "
                "which still runs: unregister it there first, or use another name")
        with self._lock:
            regions = self._nodes[entry.node]
            current = regions.get(entry.name)
            if stand_in and current is not None and current.pid == entry.pid:
                return entry  # the registrant's own box is newer than the agent's copy
            if current is not old:
                raise RegionRefused(f"region {entry.name!r} changed during registration; retry")
            held, count, total = self._tally[entry.node]  # of the others: `old` left out
            if old is not None and not old.internal:
                held -= old.kind == SESSION_KIND
                count -= old.kind != SESSION_KIND
                total -= old.size
            if entry.kind == SESSION_KIND:
                if held + 1 > self.max_sessions:
                    raise RegionRefused(f"node {entry.node} has {held} Continuation Boxes, the "
                                        f"cap is {self.max_sessions} ({self.sessions_note})")
            elif not entry.internal:
                if count + 1 > self.max_regions:
                    raise RegionRefused(f"node {entry.node} has {count} regions, the cap is "
                                        f"{self.max_regions}: unregister some first")
            if not entry.internal:
                total += entry.size
                if total > self.max_node_bytes:
                    raise RegionRefused(
                        f"node {entry.node} would hold {total} bytes of regions and "
                        f"Continuation Boxes, the cap is {self.max_node_bytes} "
                        "(max_node_bytes): unregister some or register smaller ones")
            regions[entry.name] = entry
            self._count(entry, 1)
            if entry.kind == "sensorbox" or (old is not None and old.kind == "sensorbox"):
                self.box_version += 1
            if old is not None:
                self._count(old, -1)
                self._retire(old)
        if self.observer is not None:
            self.observer("add", entry)
        if not entry.internal:
            self._claim(entry.node, (entry.pid, entry.start_time))
        return old

    # -- the service of a node ---------------------------------------------------------

    def service(self, node: str) -> tuple[int, float] | None:
        """(pid, start_time) of the node's service: the first process that registered a
        region while no service of the node ran (it may have ended since). Another process
        of the node that registers while the service runs does not become the service: a
        hostile process registering a box is not spared as the service is (diagnosis)."""
        with self._lock:
            return self._service.get(node)

    def _claim(self, node: str, registrant: tuple[int, float]) -> None:
        with self._lock:
            current = self._service.get(node)
        if current == registrant or (current is not None and is_same(*current)):
            return
        with self._lock:
            if self._service.get(node) != current:
                return  # claimed meanwhile
            self._service[node] = registrant
            services = dict(self._service)
        if self.service_observer is not None:
            self.service_observer(services)

    def take_back_services(self, kept: dict[str, tuple[int, float]]) -> None:
        """The services a previous agent kept (the fd store), over those its regions'
        readoption claimed in whatever order they came; nodes not served here dropped."""
        with self._lock:
            self._service.update((n, who) for n, who in kept.items() if n in self._nodes)

    def keep(self, node: str, name: str, kind: str, fd: int, pid: int, *,
             writable: bool = False, check=None, stand_in: bool = False,
             process=None) -> Region | None:
        """Take on a region held by `fd` for the process `pid`: open it (mapped only if a
        Sensor Box), run `check(region)` (validation), add it. The region is closed again if
        anything fails. `stand_in`: see `add`; None if `pid` had registered its own.
        `process`: `pid`'s read_process(), if the caller read it already (for many regions
        of one process: reading /proc/PID/stat costs a step per thread of PID)."""
        info = process if process is not None else read_process(pid)
        region = Region(fd, writable=writable, label=f"node {node} region {name!r}",
                        map=kind in MAPPED_KINDS)
        try:
            if check is not None:
                check(region)
            entry = Entry(node, name, kind, region, writable, pid,
                          info.start_time if info else 0.0)
            if self.add(entry, stand_in=stand_in) is entry:
                region.close()
                return None
        except BaseException:
            region.close()
            raise
        return region

    def holds(self, node: str, name: str, kind: str, fd: int, pid: int,
              start_time: float | None) -> bool:
        """Whether `name` of `node` is kept as `kind` for process `pid` (started at
        `start_time`) with the very file `fd` refers to: a registrant registering again
        what the agent keeps for it already (a handed-over box it took over)."""
        try:
            with self.use(node, name) as entry:
                if (entry.internal or entry.kind != kind or entry.pid != pid
                        or (start_time is not None and entry.start_time != start_time)):
                    return False
                kept = os.fstat(entry.region.fd)
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # a memfd (not: a FUSE file, whose fstat waits)
            given = os.fstat(fd)
        except (NoSuchRegion, OSError):
            return False
        return (kept.st_dev, kept.st_ino, kept.st_size) == (given.st_dev, given.st_ino,
                                                            given.st_size)

    def remove(self, node: str, name: str) -> Entry:
        """Unregister `name` (closed once no reader holds it); KeyError if absent."""
        with self._lock:
            entry = self._nodes[node].get(name)
            if entry is None or entry.internal:
                raise KeyError(name)
            del self._nodes[node][name]
            self._count(entry, -1)
            if entry.kind == "sensorbox":
                self.box_version += 1
            self._retire(entry)
        if self.observer is not None:
            self.observer("remove", entry)
        return entry

    def entries(self, node: str) -> list[Entry]:
        with self._lock:
            return list(self._nodes[node].values())

    def registrants(self, node: str) -> set[tuple[int, float]]:
        """(pid, start_time) of every process that registered a region of `node`."""
        with self._lock:
            return {(e.pid, e.start_time) for e in self._nodes[node].values() if not e.internal}

    @contextmanager
    def use(self, node: str, name: str) -> Iterator[Entry]:
        """Borrow a region for a read or write; NoSuchRegion if it is not registered."""
        with self._lock:
            entry = self._nodes[node].get(name)
            if entry is None:
                raise NoSuchRegion(name)
            entry._users += 1
        try:
            yield entry
        finally:
            self.give_back([entry])

    @contextmanager
    def use_all(self, node: str, kind: str) -> Iterator[list[Entry]]:
        """Borrow every region of `kind` of a node."""
        entries = self.borrow_all(node, kind)
        try:
            yield entries
        finally:
            self.give_back(entries)

    def borrow_all(self, node: str, kind: str) -> list[Entry]:
        """Every region of `kind` of a node, borrowed (not closed, even when removed,
        until given back with `give_back`)."""
        with self._lock:
            entries = [e for e in self._nodes[node].values() if e.kind == kind]
            for e in entries:
                e._users += 1
        return entries

    def give_back(self, entries: list[Entry]) -> None:
        with self._lock:
            for e in entries:
                e._users -= 1
                if e._retired and e._users == 0:
                    e.region.close()

    def _retire(self, entry: Entry) -> None:  # with self._lock held
        entry._retired = True
        if entry._users == 0:
            entry.region.close()

    def close(self) -> None:
        """Close every region (at agent shutdown)."""
        with self._lock:
            for regions in self._nodes.values():
                for e in regions.values():
                    self._retire(e)
                regions.clear()
            self._tally = {n: [0, 0, 0] for n in self._nodes}
            self.box_version += 1

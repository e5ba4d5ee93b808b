"""One cgroup across every hierarchy of the machine's layout, behind one interface.

A Cgroup is the directory `relpath` in each hierarchy of the Layout (hybrid: memory, pids,
freezer, cpu, cpuacct and the controller-less v2 one; unified: one v2 directory). Callers never
see which version serves a controller. Freezing uses the v1 freezer or v2 cgroup.freeze,
chosen per cgroup, so both paths can be exercised on a hybrid machine.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from backdoors.errors import NodeError
from backdoors.nodes import cgfs, syscalls
from backdoors.nodes.hierarchies import UNIFIED, V2_CONTROLLERS, Layout, detect
from backdoors.nodes.proctable import process_table

__all__ = ["Cgroup", "Layout", "detect", "reap"]

FREEZERS = ("auto", "v1", "v2")
# v1 reports "no limit" as PAGE_COUNTER_MAX pages, a number close to 2**63.
_V1_UNLIMITED = 1 << 62


def _check_relpath(relpath: str) -> str:
    parts = relpath.strip("/").split("/")
    if not relpath.strip("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise NodeError(
            f"invalid cgroup path {relpath!r}: use names separated by '/', like 'bd-lab1/n0'"
        )
    if parts[:3] == ["sys", "fs", "cgroup"]:  # (it would be made under every hierarchy)
        raise NodeError(f"invalid cgroup path {relpath!r}: give the path inside the "
                        "hierarchies, like 'backdoors/web0', not a path under /sys/fs/cgroup")
    return "/".join(parts)


class Cgroup:
    """A cgroup with a directory in each hierarchy; use Cgroup.create or Cgroup.open.

    `freezer` is "v1" (freezer.state) or "v2" (cgroup.freeze), resolved from the request.
    """

    def __init__(self, relpath: str, layout: Layout, freezer: str = "auto"):
        self.relpath = _check_relpath(relpath)
        self.layout = layout
        self.paths: dict[str, Path] = {
            name: mount / self.relpath for name, mount in layout.hierarchies().items()
        }
        self._requested_freezer = freezer
        self.freezer = self._pick_freezer(freezer)
        self._kept: cgfs.KeptFiles | None = None

    def __repr__(self) -> str:
        return f"Cgroup({self.relpath!r}, {self.layout.kind}, freezer={self.freezer})"

    def _pick_freezer(self, requested: str) -> str:
        if requested not in FREEZERS:
            raise NodeError(f"unknown freezer {requested!r}: use one of {', '.join(FREEZERS)}")
        has_v1, has_v2 = "freezer" in self.layout.v1, self.layout.v2 is not None
        if requested == "auto":
            requested = "v2" if has_v2 else "v1"
        if requested == "v2" and not has_v2:
            raise NodeError(f"the v2 freezer needs a cgroup2 mount; {self.layout.describe()}")
        if requested == "v1" and not has_v1:
            raise NodeError(
                f"the v1 freezer needs the freezer controller mounted as cgroup v1; "
                f"{self.layout.describe()}"
            )
        return requested

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(
        cls, relpath: str, *, freezer: str = "auto", layout: Layout | None = None
    ) -> Cgroup:
        """Create the cgroup (and missing parents) in every hierarchy; fine if it exists.

        On a v2 hierarchy the memory, pids and cpu controllers are enabled in each parent's
        cgroup.subtree_control, as far as the parent offers them. If creation fails half way,
        the directories made by this call are removed again.
        """
        cg = cls(relpath, layout or detect(), freezer)
        made: list[Path] = []
        try:
            for mount in cg.layout.hierarchies().values():
                cg._make_dirs(mount, made)
            cg._check_kernel_support()
        except BaseException:
            for path in reversed(made):
                try:
                    path.rmdir()
                except OSError:
                    pass
            raise
        return cg

    def _make_dirs(self, mount: Path, made: list[Path]) -> None:
        path = mount
        for part in self.relpath.split("/"):
            if mount == self.layout.v2:
                self._enable_controllers(path)
            path = path / part
            try:
                path.mkdir()
                made.append(path)
            except FileExistsError:
                if not path.is_dir():
                    raise NodeError(f"cannot create cgroup {path}: a file has that name") from None
            except OSError as e:
                raise cgfs.error("create cgroup", path, e) from None

    @staticmethod
    def _enable_controllers(parent: Path) -> None:
        offered = set(cgfs.read(parent / "cgroup.controllers").split())
        enabled = set(cgfs.read(parent / "cgroup.subtree_control").split())
        missing = [c for c in V2_CONTROLLERS if c in offered and c not in enabled]
        if missing:
            cgfs.write(
                parent / "cgroup.subtree_control",
                " ".join(f"+{c}" for c in missing),
                "A cgroup with processes of its own cannot pass controllers to children "
                "(cgroup v2 'no internal processes' rule): create nodes under a cgroup "
                "that holds no processes",
            )

    def _check_kernel_support(self) -> None:
        if self.freezer == "v2" and not (self.paths[UNIFIED] / "cgroup.freeze").exists():
            if self._requested_freezer == "auto" and "freezer" in self.layout.v1:
                self.freezer = "v1"
                return
            raise NodeError(
                f"{self.paths[UNIFIED]} has no cgroup.freeze: this kernel predates the v2 "
                "freezer (Linux 5.2); use freezer='v1'"
            )

    @classmethod
    def open(
        cls, relpath: str, *, freezer: str = "auto", layout: Layout | None = None
    ) -> Cgroup:
        """The existing cgroup `relpath`; NodeError if it is missing from any hierarchy."""
        cg = cls(relpath, layout or detect(), freezer)
        missing = [str(p) for p in cg.paths.values() if not p.is_dir()]
        if missing:
            raise NodeError(
                f"cgroup {cg.relpath!r} does not exist (missing: {', '.join(missing)}): "
                "it needs a directory in every hierarchy of this host "
                f"({cg.layout.describe()}); `backdoors node create NAME --cgroup {cg.relpath}` "
                "makes them (docs/operations.md, section 5)"
            )
        cg._check_kernel_support()
        return cg

    def exists(self) -> bool:
        """True while any of the cgroup's directories exists."""
        return any(p.is_dir() for p in self.paths.values())

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill every process left, then remove the directories, children first.

        Idempotent: a cgroup already (partly) gone is fine.
        """
        if not self.exists():
            return
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for top in self.paths.values():
            for path in cgfs.tree(top):
                self._rmdir(path, deadline)

    @staticmethod
    def _rmdir(path: Path, deadline: float) -> None:
        while True:
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise cgfs.error(
                        "remove cgroup", path, e, "processes may still be exiting; retry"
                    ) from None
                time.sleep(0.005)

    # -- membership ------------------------------------------------------------------

    def attach(self, pid: int) -> None:
        """Move process `pid` (all its threads) into this cgroup in every hierarchy."""
        for path in self.paths.values():
            cgfs.write(path / "cgroup.procs", str(pid), f"is process {pid} still alive?")

    def procs(self, controller: str | None = None) -> list[int]:
        """Every process in this cgroup or below it, in any hierarchy (sorted pids); with
        `controller`, in the hierarchy holding it only (all when it is nowhere): a sixth
        of the reads on a hybrid host, for a sampler (what a kill must find is in every
        hierarchy's union)."""
        tops = ([self._controller_dir(controller)[1]]
                if controller and self.layout.home(controller) else list(self.paths.values()))
        missing = [str(p) for p in tops if not p.is_dir()]
        if missing:
            raise NodeError(f"cgroup {self.relpath!r} vanished: {', '.join(missing)} is gone")
        return self._procs(tops)

    def _procs(self, tops: list[Path] | None = None) -> list[int]:
        pids: set[int] = set()
        for top in tops or self.paths.values():
            for path in cgfs.tree(top):
                try:
                    pids.update(int(p) for p in cgfs.read(path / "cgroup.procs").split())
                except NodeError:
                    if path.is_dir():
                        raise
        return sorted(pids)

    # -- freezing --------------------------------------------------------------------

    def _state_file(self) -> Path:
        if self.freezer == "v1":
            return self._v1_dir("freezer") / "freezer.state"
        return self.paths[UNIFIED] / "cgroup.freeze"

    def freeze(self, timeout: float = 1.0) -> float:
        """Freeze every process of the cgroup and wait until the kernel says it is frozen.

        Returns the seconds it took. If it is not frozen within `timeout`, the cgroup is
        thawed back and NodeError names the processes that would not stop.
        """
        start = time.monotonic()
        if self.freezer == "v1":
            cgfs.write(self._state_file(), "FROZEN")
            done = cgfs.wait_until(self._v1_frozen, timeout)
        else:
            cgfs.write(self._state_file(), "1")
            done = cgfs.wait_event(self.paths[UNIFIED] / "cgroup.events", "frozen", 1, timeout)
        if done:
            return time.monotonic() - start
        stuck = [f"{p.pid} ({p.comm}, state {p.state})" for p in process_table(self._procs())]
        self.thaw(timeout=max(timeout, 1.0))
        raise NodeError(
            f"cgroup {self.relpath!r} would not freeze ({self.freezer} freezer) within "
            f"{timeout:g} s and was thawed back; processes: {', '.join(stuck[:10]) or 'none'}. "
            "A process in uninterruptible sleep (state D) delays freezing; retry or kill it."
        )

    def thaw(self, timeout: float = 1.0) -> float:
        """Thaw the cgroup and wait until the kernel says it is; returns the seconds taken."""
        start = time.monotonic()
        if self.freezer == "v1":
            cgfs.write(self._state_file(), "THAWED")
            done = cgfs.wait_until(lambda: self._v1_state() == "THAWED", timeout)
        else:
            cgfs.write(self._state_file(), "0")
            done = cgfs.wait_event(self.paths[UNIFIED] / "cgroup.events", "frozen", 0, timeout)
        if not done:
            raise NodeError(
                f"cgroup {self.relpath!r} would not thaw within {timeout:g} s "
                f"({self.freezer} freezer): is a parent cgroup frozen?"
            )
        return time.monotonic() - start

    def is_frozen(self) -> bool:
        """True when the chosen freezer reports the cgroup completely frozen."""
        if self.freezer == "v1":
            return self._v1_frozen()
        events = cgfs.keyed(self._read("cgroup.events", lambda: self.paths[UNIFIED]))
        return events.get("frozen") == 1

    def freeze_requested(self) -> bool:
        """True while a freeze of this cgroup itself is requested (held), frozen yet or not.

        Differs from is_frozen() while the freeze is in progress, and on v2 while a killed
        task of the frozen cgroup is exiting (cgroup.events then says "frozen 0").
        """
        if self.freezer == "v1":
            path = self._v1_dir("freezer") / "freezer.self_freezing"
            return cgfs.read(path).strip() == "1"
        return cgfs.read(self._state_file()).strip() == "1"

    def _v1_state(self) -> str:
        return self._read("freezer.state", lambda: self._v1_dir("freezer")).strip()

    def _v1_frozen(self) -> bool:
        return self._v1_state() == "FROZEN"

    def _thaw_everything(self) -> None:
        """Thaw this cgroup and every one below it with both freezers, ignoring errors."""
        targets = []
        if "freezer" in self.layout.v1:
            targets += [(p / "freezer.state", "THAWED") for p in cgfs.tree(self._v1_dir("freezer"))]
        if UNIFIED in self.paths:
            targets += [(p / "cgroup.freeze", "0") for p in cgfs.tree(self.paths[UNIFIED])]
        for path, value in targets:
            try:
                if cgfs.read(path).strip() not in ("THAWED", "0"):
                    cgfs.write(path, value)
            except NodeError:
                pass  # vanished or not offered: nothing to thaw

    # -- killing ---------------------------------------------------------------------

    def kill_all(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process of the cgroup and below; leaves it empty and thawed.

        Uses v2 cgroup.kill where the kernel offers it (it copes with concurrent forks);
        otherwise freezes (v1) so nothing forks, signals every member, thaws so that v1-frozen
        tasks can die, and repeats until empty. Returns the pids it saw and killed (a process
        forked and killed between two looks is not among them).
        """
        deadline = time.monotonic() + timeout
        kill_file = self.paths.get(UNIFIED, Path("/nonexistent")) / "cgroup.kill"
        v1_freezer = "freezer" in self.layout.v1 and self._v1_dir("freezer").is_dir()
        killed: set[int] = set()
        while True:
            seen = self._procs()
            if kill_file.exists():
                try:
                    cgfs.write(kill_file, "1")
                except NodeError:
                    if not kill_file.parent.exists():  # removed meanwhile (another reaper)
                        return sorted(killed)
                    raise
            elif v1_freezer:
                self._v1_freeze_briefly()
            pids = sorted(set(seen).union(self._procs()))
            self._signal_members(pids)
            self._thaw_everything()
            if not pids:
                return sorted(killed)
            killed.update(pids)
            survivors = process_table(self._procs()) if time.monotonic() > deadline else []
            if survivors:
                raise NodeError(
                    f"cgroup {self.relpath!r}: {len(survivors)} processes survived SIGKILL for "
                    f"{timeout:g} s: "
                    + ", ".join(f"{p.pid} ({p.comm}, state {p.state})" for p in survivors[:10])
                    + ". Processes in uninterruptible sleep (D) die when their I/O ends."
                )
            self._wait_empty(min(0.05, max(0.0, deadline - time.monotonic())))

    def _v1_dir(self, controller: str) -> Path:
        return self.layout.v1[controller] / self.relpath

    def _v1_freeze_briefly(self) -> None:
        """Freeze with the v1 freezer for a kill round; a slow freeze is no reason to stop."""
        try:
            cgfs.write(self._v1_dir("freezer") / "freezer.state", "FROZEN")
            cgfs.wait_until(self._v1_frozen, 0.2)
        except NodeError:
            pass

    def _signal_members(self, pids: list[int]) -> None:
        """SIGKILL each pid that is still a member once a pidfd pins it (no pid reuse race)."""
        pidfds = {pid: fd for pid in pids if (fd := syscalls.pidfd_open(pid)) is not None}
        try:
            members = set(self._procs()) if pidfds else set()
            for pid, fd in pidfds.items():
                if pid in members:
                    syscalls.pidfd_signal(fd, signal.SIGKILL)
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def _wait_empty(self, timeout: float) -> None:
        events = self.paths.get(UNIFIED, Path("/nonexistent")) / "cgroup.events"
        if events.exists():
            try:
                cgfs.wait_event(events, "populated", 0, timeout)
                return
            except NodeError:
                pass  # vanished under us: the caller re-reads the members
        cgfs.wait_until(lambda: not self._procs(), timeout)

    # -- limits and accounting -------------------------------------------------------

    def keep_files_open(self) -> None:
        """Keep the accounting files (memory, pids, CPU, pressure, frozen state) open once
        read, and read them again with pread (cgfs.KeptFiles): for a sampler reading
        them many times a second. close_files() closes them."""
        if self._kept is None:
            self._kept = cgfs.KeptFiles()

    def close_files(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.close()

    def _read(self, file: str, where: Callable[[], Path]) -> str:
        """The text of `file` in the directory `where()` (built only when opened)."""
        kept = self._kept
        if kept is None:
            return cgfs.read(where() / file)
        return kept.read(file, lambda: where() / file)

    def _home(self, controller: str) -> str:
        """"v1" or "v2": where `controller` lives (NodeError if nowhere)."""
        return self.layout.home(controller) or self._controller_dir(controller)[0]

    def _in(self, controller: str) -> Callable[[], Path]:
        return lambda: self._controller_dir(controller)[1]

    def _controller_dir(self, controller: str) -> tuple[str, Path]:
        home = self.layout.home(controller)
        if home == "v1":
            return "v1", self._v1_dir(controller)
        if home == "v2":
            return "v2", self.paths[UNIFIED]
        raise NodeError(
            f"the {controller} controller is not available ({self.layout.describe()}): mount it "
            f"as cgroup v1 or enable it in the cgroup v2 root's cgroup.subtree_control"
        )

    def set_memory_limit(self, limit: int | None) -> None:
        """Limit the cgroup's memory to `limit` bytes; None removes the limit."""
        _check_limit("memory limit", limit)
        version, path = self._controller_dir("memory")
        file = path / ("memory.limit_in_bytes" if version == "v1" else "memory.max")
        value = str(limit) if limit is not None else ("-1" if version == "v1" else "max")
        cgfs.write(file, value, "a limit below the current usage is refused (EBUSY) if the "
                   "kernel cannot reclaim enough: kill something first or choose more")
        tcp = path / "memory.kmem.tcp.limit_in_bytes"
        if version == "v1" and tcp.exists():
            # v1 leaves TCP buffers out of the cgroup unless this is set: they come from the
            # host's one pool (net.ipv4.tcp_mem), which a node could drain beyond its limit,
            # starving every TCP socket of the host. Set, they are counted (and capped) for
            # sockets made from now on; v2 counts them in memory.max by itself.
            cgfs.write(tcp, value)

    def memory_limit(self) -> int | None:
        """The memory limit in bytes, None when unlimited."""
        if self._home("memory") == "v1":
            value = cgfs.to_int(self._read("memory.limit_in_bytes", self._in("memory")))
            return None if value is None or value >= _V1_UNLIMITED else value
        return cgfs.to_int(self._read("memory.max", self._in("memory")))

    def memory_usage(self) -> int:
        """Bytes of memory charged to the cgroup (page cache included)."""
        file = "memory.usage_in_bytes" if self._home("memory") == "v1" else "memory.current"
        return cgfs.to_int(self._read(file, self._in("memory"))) or 0

    def socket_memory(self) -> int:
        """Bytes of TCP socket buffers charged to the cgroup (v1: memory.kmem.tcp, counted
        once set_memory_limit enabled it; v2: memory.stat "sock")."""
        version, path = self._controller_dir("memory")
        if version == "v1":
            return cgfs.read_int(path / "memory.kmem.tcp.usage_in_bytes") or 0
        return cgfs.keyed(cgfs.read(path / "memory.stat")).get("sock", 0)

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup (and below)."""
        file = "memory.oom_control" if self._home("memory") == "v1" else "memory.events"
        return cgfs.keyed(self._read(file, self._in("memory"))).get("oom_kill", 0)

    def set_pids_limit(self, limit: int | None) -> None:
        """Allow at most `limit` tasks (processes and threads); None removes the limit."""
        _check_limit("pids limit", limit)
        _, path = self._controller_dir("pids")
        cgfs.write(path / "pids.max", "max" if limit is None else str(limit))

    def pids_limit(self) -> int | None:
        """The task limit, None when unlimited."""
        return cgfs.to_int(self._read("pids.max", self._in("pids")))

    def pids_current(self) -> int:
        """Tasks (processes and threads) charged to the cgroup, exited-but-unreaped included."""
        return cgfs.to_int(self._read("pids.current", self._in("pids"))) or 0

    def fork_failures(self) -> int:
        """Forks refused so far because the pids limit was reached (pids.events "max")."""
        return _refused(self._read("pids.events", self._in("pids")))

    def polled_fork_failures(self) -> cgfs.Polled[int]:
        """fork_failures() as a file one thread reads many times a second (cgfs.Polled;
        NodeError without a pids controller; the caller closes it)."""
        return cgfs.Polled(lambda: self._controller_dir("pids")[1] / "pids.events", _refused)

    def set_cpu_weight(self, weight: int) -> None:
        """The cgroup's share of the CPU against its siblings when they all want it, on the
        v2 scale: 1..10000, 100 the default (v1: cpu.shares, 1024 for 100)."""
        if not 1 <= weight <= 10000:
            raise NodeError(f"CPU weight {weight}: must be within 1..10000 (100: the default)")
        version, path = self._controller_dir("cpu")
        if version == "v1":
            cgfs.write(path / "cpu.shares", str(max(2, weight * 1024 // 100)))
        else:
            cgfs.write(path / "cpu.weight", str(weight))

    def cpu_seconds(self) -> float:
        """CPU time used by the cgroup's processes so far (user + system), in seconds."""
        if "cpuacct" in self.layout.v1:
            usage = self._read("cpuacct.usage", lambda: self._v1_dir("cpuacct"))
            return (cgfs.to_int(usage) or 0) / 1e9
        if UNIFIED in self.paths:  # cpu.stat's usage_usec needs no controller
            stat = cgfs.keyed(self._read("cpu.stat", lambda: self.paths[UNIFIED]))
            return stat.get("usage_usec", 0) / 1e6
        raise NodeError(f"no CPU accounting available ({self.layout.describe()})")

    def polled_cpu_full_us(self) -> cgfs.Polled[int] | None:
        """Microseconds so far during which the cgroup's runnable tasks all waited for a CPU
        and none ran: the v2 cpu.pressure "full" total (no controller needed), as a file
        one thread reads many times a second (cgfs.Polled: NodeError where PSI is off,
        KeyError without a "full" line; the caller closes it). None without a v2
        hierarchy."""
        if UNIFIED not in self.paths:
            return None
        return cgfs.Polled(lambda: self.paths[UNIFIED] / "cpu.pressure",
                           lambda text: cgfs.pressure_total(text, "full"))

    def pressure(self) -> dict[str, dict[str, float | int]]:
        """PSI of the cgroup per resource ("memory", "cpu", "io"), from the v2 *.pressure files.

        Keys like "some_avg10" (percent) and "some_total_us"; resources without a
        pressure file (no v2 hierarchy, PSI off) are left out.
        """
        out: dict[str, dict[str, float | int]] = {}
        if UNIFIED not in self.paths:
            return out
        for resource in ("memory", "cpu", "io"):
            try:
                out[resource] = cgfs.pressure(self._read(f"{resource}.pressure",
                                                         lambda: self.paths[UNIFIED]))
            except NodeError:
                if not self.paths[UNIFIED].is_dir():
                    raise
        return out


def _refused(events: str) -> int:
    return cgfs.keyed(events).get("max", 0)


def _check_limit(what: str, limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise NodeError(f"invalid {what} {limit!r}: give a non-negative integer, or None for none")


def top_level_names(pid: int | str = "self") -> set[str]:
    """The top-level cgroup names process `pid` is inside, in any hierarchy (none for a
    process that is gone)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return set()
    return {line.split(":", 2)[2].strip("/").split("/")[0] for line in lines if line.count(":") >= 2}


#: Cgroups the project creates are named "bd..." (bd-lab1, bdt-1234 in tests); reap touches
#: no other name, so a careless prefix cannot kill the machine's services.
REAPABLE_PREFIX = "bd"


def reap(prefix: str, *, layout: Layout | None = None, timeout: float = 5.0) -> list[str]:
    """Remove every cgroup whose top-level name starts with `prefix`, in every hierarchy.

    Processes still inside are killed (frozen ones thawed so they can die) first. Meant for
    the leftovers of an owner that was SIGKILLed. The prefix must start with "bd", and a
    cgroup holding the calling process is refused. Returns the top-level names removed.
    """
    if not prefix.startswith(REAPABLE_PREFIX) or "/" in prefix:
        raise NodeError(
            f"refusing to reap prefix {prefix!r}: backdoors only reaps its own cgroups, whose "
            f"names start with {REAPABLE_PREFIX!r} (like 'bd-lab1')"
        )
    layout = layout or detect()
    names = set()
    for mount in layout.hierarchies().values():
        try:
            names.update(
                e.name for e in os.scandir(mount) if e.is_dir() and e.name.startswith(prefix)
            )
        except OSError as e:
            raise cgfs.error("list", mount, e) from None
    own = top_level_names()
    if names & own:
        raise NodeError(
            f"refusing to reap {sorted(names & own)}: this process is inside it; "
            "reap from outside the cgroups being removed"
        )
    # a name that extends another's first: a keeper (bd-X-agent-h0-keeper) before the agent
    # it would restart meanwhile (bd-X-agent-h0)
    for name in sorted(names, reverse=True):
        Cgroup(name, layout).destroy(timeout)
    return sorted(names)

"""A node: a named set of processes in their own cgroup and, optionally, network namespace.

The agent acts on a node only through this class: start processes inside it, lock it
(freeze) for exclusive repair or fencing, kill a process, a tree or everything, set limits
and read what the kernel accounts for it. The netns is someone else's (the net package
creates /run/netns/NAME); a node only enters it.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from backdoors.common.procs import ProcessInfo, read_process, running, same_start
from backdoors.errors import NodeError
from backdoors.nodes import syscalls
from backdoors.nodes.cgroups import Cgroup
from backdoors.nodes.hierarchies import Layout, detect
from backdoors.nodes.proctable import process_table, subtree

NETNS_DIR = Path("/run/netns")


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: Default of set_limits: leave this limit as it is (None removes a limit).
KEEP = _Keep()


class NodeStats(msgspec.Struct, frozen=True):
    """What the kernel accounts for a node; limits are None when unlimited.

    `frozen` is the kernel's word that every process is frozen now (see Node.is_locked).
    """

    memory_bytes: int
    memory_limit: int | None
    pids: int
    pids_limit: int | None
    oom_kills: int
    cpu_seconds: float
    frozen: bool
    pressure: dict[str, dict[str, float | int]]


def _netns_path(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise NodeError(f"invalid netns name {name!r}: give the name of a file in {NETNS_DIR}")
    path = NETNS_DIR / name
    if not path.exists():
        raise NodeError(
            f"network namespace {name!r} does not exist ({path} is missing): create it first"
        )
    return path


def _credentials(user: str | int) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) of `user`, a name or a uid, from the passwd database;
    a uid it does not list gets the gid of the same number and no groups (an id range no
    host user owns, like the nodes' containers use)."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, int) and 0 < user < (1 << 32) - 1:
            return user, user, []
        raise NodeError(f"no user {user!r} on this host (getent passwd {user}): create it "
                        "(useradd --system NAME) or give another") from None
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


class Node:
    """A node; use Node.create or Node.open. Owns its cgroup, not its netns."""

    def __init__(self, name: str, cgroup: Cgroup, netns: str | None = None):
        self.name = name
        self.cgroup = cgroup
        self.netns = netns

    def __repr__(self) -> str:
        return f"Node({self.name!r}, cgroup={self.cgroup.relpath!r}, netns={self.netns!r})"

    @classmethod
    def create(
        cls,
        name: str,
        cgroup_path: str,
        *,
        netns: str | None = None,
        memory_limit: int | None = None,
        pids_limit: int | None = None,
        freezer: str = "auto",
        layout: Layout | None = None,
    ) -> Node:
        """Create the node's cgroup (idempotent) and set the limits given.

        A limit left None is not written (a new cgroup is unlimited). If setting up fails,
        a cgroup created by this call is removed again.
        """
        if netns is not None:
            _netns_path(netns)
        layout = layout or detect()
        existed = Cgroup(cgroup_path, layout, freezer).exists()
        cgroup = Cgroup.create(cgroup_path, freezer=freezer, layout=layout)
        node = cls(name, cgroup, netns)
        try:
            node.set_limits(
                memory=KEEP if memory_limit is None else memory_limit,
                pids=KEEP if pids_limit is None else pids_limit,
            )
        except BaseException:
            if not existed:
                cgroup.destroy()
            raise
        return node

    @classmethod
    def open(
        cls,
        name: str,
        cgroup_path: str,
        *,
        netns: str | None = None,
        freezer: str = "auto",
        layout: Layout | None = None,
    ) -> Node:
        """The node whose cgroup already exists; NodeError if cgroup or netns is missing."""
        if netns is not None:
            _netns_path(netns)
        return cls(name, Cgroup.open(cgroup_path, freezer=freezer, layout=layout), netns)

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill the node's processes and remove its cgroup (the netns stays); idempotent."""
        self.cgroup.destroy(timeout)

    # -- processes -------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stdin=None,
        stdout=None,
        stderr=None,
        new_session: bool = True,
        pass_fds: Sequence[int] = (),
        user: str | int | None = None,
    ) -> subprocess.Popen:
        """Start `argv` inside the node: in its cgroup and, if it has one, its netns.

        The child joins the cgroup (every hierarchy) and the netns between fork and exec,
        so nothing it ever forks starts outside. The files are opened here in the parent;
        the child only writes "0" (itself) to each cgroup.procs and calls setns. With
        `user` (a name or uid) it then takes that user's uid, gid and groups.
        """
        if self.is_locked():
            raise NodeError(f"node {self.name} is locked (frozen): unlock it before run()")
        creds = _credentials(user) if user is not None else None
        procs_fds, netns_fd = self._open_for_child()
        fds = procs_fds + ([netns_fd] if netns_fd is not None else [])

        def enter_node() -> None:  # runs in the child between fork and exec
            for fd in procs_fds:
                os.write(fd, b"0")
            if netns_fd is not None:
                syscalls.setns(netns_fd, syscalls.CLONE_NEWNET)
            if creds is not None:  # last: joining needed root
                uid, gid, groups = creds
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)

        try:
            return subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=new_session,
                pass_fds=tuple(pass_fds),
                preexec_fn=enter_node,
            )
        except subprocess.SubprocessError as e:
            raise NodeError(
                f"node {self.name}: the child of {argv[0]!r} could not join the cgroup "
                f"{self.cgroup.relpath!r} or netns {self.netns!r} ({e})"
            ) from None
        except OSError as e:
            raise NodeError(f"node {self.name}: cannot run {argv[0]!r}: {e.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def _open_for_child(self) -> tuple[list[int], int | None]:
        """Open every cgroup.procs file of the node, and its netns, for a child to join."""
        netns_path = _netns_path(self.netns) if self.netns is not None else None
        procs_fds: list[int] = []
        try:
            for path in self.cgroup.paths.values():
                procs_fds.append(os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
            netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC) if netns_path else None
        except OSError as e:
            for fd in procs_fds:
                os.close(fd)
            raise NodeError(
                f"node {self.name}: cannot open {e.filename}: {e.strerror} (was it removed?)"
            ) from None
        return procs_fds, netns_fd

    def processes(self) -> list[ProcessInfo]:
        """The node's process table (every process of its cgroup)."""
        return process_table(self.cgroup.procs())

    # -- locking ---------------------------------------------------------------------

    def lock(self, timeout: float = 1.0) -> float:
        """Freeze the node and wait until it is frozen; returns the seconds it took.

        If it does not freeze within `timeout`, it is thawed back and NodeError is raised.
        """
        try:
            return self.cgroup.freeze(timeout)
        except NodeError as e:
            raise NodeError(f"node {self.name} would not lock: {e}") from None

    def unlock(self, timeout: float = 1.0) -> float:
        """Thaw the node and wait until it runs again; returns the seconds it took."""
        return self.cgroup.thaw(timeout)

    @contextmanager
    def locked(self, timeout: float = 1.0) -> Iterator[Node]:
        """Hold the node frozen for the `with` block, thawing it whatever happens."""
        self.lock(timeout)
        try:
            yield self
        finally:
            self.unlock(timeout)

    def is_locked(self) -> bool:
        """True while the node's lock is held (its freeze requested).

        stats().frozen tells whether the kernel reports every process frozen right now.
        """
        return self.cgroup.freeze_requested()

    # -- killing ---------------------------------------------------------------------

    def _pin(
        self, pid: int, start_time: float | None = None, members: set[int] | None = None
    ) -> int | None:
        """A pidfd for `pid` once checked to be a live process of this node; None if gone.

        The pidfd is opened first and the checks made after, so they concern the process
        the pidfd names: if that one died meanwhile, signalling it fails harmlessly.
        `members` is the node's pid set if the caller already has it (then the caller
        should give `start_time`, which catches a pid reused since `members` was read).
        """
        pidfd = syscalls.pidfd_open(pid)
        if pidfd is None:
            return None
        try:
            info = read_process(pid)
            if info is None or not running(info.state):
                os.close(pidfd)
                return None
            if pid not in (members if members is not None else self.cgroup.procs()):
                raise NodeError(f"process {pid} ({info.comm}) is not in node {self.name}: refused")
            if start_time is not None and not same_start(info.start_time, start_time):
                raise NodeError(
                    f"process {pid} in node {self.name} started at {info.start_time:.2f} s, not "
                    f"{start_time:.2f} s: the pid was reused by another process; refused"
                )
        except BaseException:
            os.close(pidfd)
            raise
        return pidfd

    def kill(self, pid: int, sig: int = signal.SIGKILL, start_time: float | None = None) -> bool:
        """Send `sig` to process `pid` of this node; False if it had already exited.

        Refuses (NodeError) a pid outside the node, and, when `start_time` (seconds since
        boot, as in ProcessInfo) is given, a pid now used by a different process.
        """
        pidfd = self._pin(pid, start_time)
        if pidfd is None:
            return False
        try:
            return syscalls.pidfd_signal(pidfd, sig)
        finally:
            os.close(pidfd)

    def kill_tree(self, pid: int, timeout: float = 2.0) -> list[int]:
        """SIGKILL process `pid` of this node and all its descendants; returns their pids.

        The node is frozen while the tree is read and signalled, so nothing forks away.
        If the node was already locked it stays locked; with the v1 freezer the victims
        then die only when it is unlocked (v1-frozen tasks ignore SIGKILL until thawed).
        Otherwise waits up to `timeout` for them to exit. The freeze is the cgroup's
        whatever a subclass's lock is (a VM node's stops vCPUs, not QEMU's forks).
        """
        was_locked = self.cgroup.freeze_requested()
        if not was_locked:
            Node.lock(self, timeout)
        pidfds: list[int] = []
        try:
            table = self.processes()
            if pid not in {p.pid for p in table}:
                raise NodeError(f"process {pid} is not in node {self.name}: refused")
            victims = subtree(table, pid)
            starts = {p.pid: p.start_time for p in table}
            members = set(self.cgroup.procs())
            for victim in sorted(victims):
                pidfd = self._pin(victim, starts[victim], members)
                if pidfd is not None:
                    pidfds.append(pidfd)
            for pidfd in pidfds:
                syscalls.pidfd_signal(pidfd, signal.SIGKILL)
        except BaseException:
            for pidfd in pidfds:
                os.close(pidfd)
            if not was_locked:
                Node.unlock(self, timeout)
            raise
        try:
            if not was_locked:
                Node.unlock(self, timeout)
            if not (was_locked and self.cgroup.freezer == "v1"):
                if not syscalls.wait_exited(pidfds, timeout):
                    raise NodeError(
                        f"node {self.name}: the tree of {pid} did not exit within {timeout:g} s "
                        "after SIGKILL (a process in uninterruptible sleep?)"
                    )
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        return sorted(victims)

    def kill_all(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process of the node; it is left empty and unlocked."""
        return self.cgroup.kill_all(timeout)

    # -- limits and accounting -------------------------------------------------------

    def set_limits(
        self, *, memory: int | None | _Keep = KEEP, pids: int | None | _Keep = KEEP
    ) -> None:
        """Set the memory limit (bytes) and the task limit; None removes one, KEEP leaves it."""
        if memory is not KEEP:
            self.cgroup.set_memory_limit(memory)
        if pids is not KEEP:
            self.cgroup.set_pids_limit(pids)

    def stats(self) -> NodeStats:
        """Memory, tasks, OOM kills, CPU time, frozen state and pressure of the node."""
        cg = self.cgroup
        return NodeStats(
            memory_bytes=cg.memory_usage(),
            memory_limit=cg.memory_limit(),
            pids=cg.pids_current(),
            pids_limit=cg.pids_limit(),
            oom_kills=cg.oom_kills(),
            cpu_seconds=cg.cpu_seconds(),
            frozen=cg.is_frozen(),
            pressure=cg.pressure(),
        )

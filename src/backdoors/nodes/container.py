"""Nodes as real containers: a node's own PID, mount, cgroup, IPC, UTS and user namespaces.

A `Container` is the set of namespaces of one node, held by the node's PID 1, and the way to
start processes in them. Everything a node runs has no power over the host:

- **PID namespace** with its own `/proc` and its own PID 1 (`catatonit -P`, Debian package
  `catatonit`), which reaps the node's orphans, so a killed parent leaves no zombie charged to
  the node's pids limit. Signals sent from inside the node cannot stop or kill its PID 1.
- **User namespace** mapping ids 0..count-1 inside to `uid_base`.. on the host, a range no
  host user owns (`uid_base_for(i)`: 65536 ids per node from 2**30). The node's root is uid 0
  inside and an unprivileged uid outside: no capability over the host's namespaces, and host
  files (owned by host ids, unmapped inside) are open to it only through their "other" bits.
  Services run as `Isolation.uid` inside (default 1000).
- **Mount namespace** set up by host root before the user namespace is entered, so its mounts
  are *locked* for the node (umount gives EINVAL): propagation private (nothing leaks back),
  each `Isolation.hide` directory covered by an empty read-only tmpfs, and the node's run
  directory (writable) and the `Isolation.share` paths (read-only) bound back at their usual
  paths. Hide /run/backdoors and only the node's own run directory is left there. The
  host's cgroupfs is hidden the same way, but for the node's own cgroup directories,
  bound back read-only: a node cannot read the agent's or another node's cgroup files
  (reading a cgroup's *.pressure files within a jiffy of each other makes the kernel
  drop that time from its totals: a node could blind another's PSI). /tmp,
  /var/tmp and /dev/shm are private tmpfs of `Isolation.scratch_bytes` (charged to the node);
  shares under one (a checkout in /tmp) are bound back read-only.
- **Network**: the node's named netns (/var/run/netns/NAME), owned by the host's user
  namespace, so the node's root cannot change addresses, routes or sysctls; no name: a fresh,
  empty netns. **Cgroup**: every process joins the node's cgroup in every hierarchy (the
  `Cgroup` paths, v1 and v2) first, and sees it as "/" in its own cgroup namespace.
  **IPC, UTS**: fresh ones; the hostname is `Isolation.hostname`. **ptys**: a devpts
  instance of its own (`Isolation.ptys` at most), its ptmx bound on /dev/ptmx.

API (host root; the caller owns the netns and the cgroup, the container owns its processes)::

    iso = Isolation(uid_base=uid_base_for(3), hide=(RUN_ROOT, Path.home()),
                    share=python_paths(), hostname="n0")
    box = Container.start(node.cgroup, "bd-lab1-n0", iso, run_dir)  # returns once PID 1 runs
    proc = box.spawn([python, "-m", "svc"], env=env, stdout=PIPE)    # as the service uid
    shell = box.spawn(["sh"], root=True)                             # as the node's root
    proc.pid, proc.ns_pid, proc.wait(), proc.kill()   # host pid, pid inside, Popen-like
    box = Container.open(node.cgroup, iso)  # from another process (`lab exec`): finds PID 1
    box.host_pid(ns_pid)                    # what a service reports as os.getpid(), mapped
    box.stop()                              # PID 1 ends: the kernel kills the whole node

`spawn` is `backdoors lab exec NODE -- CMD` (`--root`: `root=True`): the command joins the
node's cgroup, all its namespaces and its uid, with no_new_privs. Joining a PID namespace only
moves the children of the joining process, so the command is forked by a shim (`catatonit`
again, not as PID 1: it forwards signals and exits with the command's status, 128+N after
signal N) that stays on the host side; spawn returns once the command has exec'd (or failed
to); `NodeProcess.pid` is the command's host pid (None only if it ended before spawn could
see it), its signals go to the command through a pidfd. The node's
process table therefore also shows the launcher (`unshare`, host side), PID 1 and one shim per
spawned command (all `catatonit`); killing the node's cgroup ends the container too.

Facts checked on this machine (Linux 6.18, hybrid cgroups: v1 memory/pids/freezer/cpuacct and
a controller-less v2 at /sys/fs/cgroup/unified; util-linux 2.38.1; catatonit 0.1.7): start
takes ~50 ms, spawn ~17 ms.

- The user namespace is made by a helper child (unshare(CLONE_NEWUSER), then exec `cat`
  reading a pipe from its maker, so that it ends with its maker, even a SIGKILLed one)
  with effective ids `uid_base`, so that the node's root owns it, not host root (per-user
  kernel budgets such as inotify's 128 instances are also charged to a namespace's owner in
  the parent: a root-owned node could use up host root's), and whose uid_map/gid_map host
  root writes: a process cannot map a range into its own new
  namespace (that needs CAP_SETUID in the parent namespace), and util-linux 2.38's
  `unshare --map-users` fails here with "failed to execute newuidmap" (package uidmap).
- Order: host root joins the cgroup and the netns, creates the mount, UTS and IPC namespaces
  (owned by the host's user namespace) and mounts; then enters the user namespace as uid 0;
  then `unshare --pid --cgroup --fork --mount-proc --kill-child` creates the PID and cgroup
  namespaces and a mount namespace whose inherited mounts are locked; its child, PID 1, mounts
  the node's /proc (allowed in a user namespace since the host's /proc is fully visible) and
  execs `catatonit -P`. Joining: host root enters ipc, uts, net, cgroup, pid, mnt of PID 1,
  then its user namespace (still host uid 0, unmapped, until setresuid inside).
- A bind mount whose source fd was opened in another mount namespace fails with EINVAL: the
  paths bound back are opened (O_PATH) after unshare(CLONE_NEWNS), before they are covered.
- /root is 0700 here and the venv's Python lives in /root/.pyenv: a node's uid cannot exec it
  ("catatonit: failed to exec pid1: Permission denied"). Hide the home and share
  `python_paths()`.
- From inside, as the node's root: /proc lists only node pids; kill(host pid) and
  process_vm_readv(host pid) give ESRCH, /proc/<host pid>/mem ENOENT; every cgroupfs file
  (the node's own pids.max, a sibling's freezer.state, the parent's cgroup.procs) gives
  EACCES (owned by unmapped host root, 0644; CAP_DAC_OVERRIDE in a user namespace only covers
  inodes whose owner is mapped there); a 0600 root file gives EACCES; `kill -KILL 1`,
  `kill -STOP -1` leave PID 1 running. As the service uid: memfd_create + F_ADD_SEALS, a
  connect to a 0666 socket in the run directory with SCM_RIGHTS, SO_PEERCRED (the host sees
  the host pid and host uid) and binding TCP 7000 work; binding port 80 gives EACCES (it needs
  CAP_NET_BIND_SERVICE in the netns owner, the host's user namespace: set
  net.ipv4.ip_unprivileged_port_start in the netns if a node needs a low port).
- A SIGKILLed PID 1 makes `unshare` print "sigprocmask unblock failed" (signal(SIGKILL) is
  EINVAL), so `stop()` sends SIGTERM, on which `catatonit -P` exits 0.
- The run directory must outlive the container: rmdir on the host succeeds while it is bound
  in a node, and the node keeps the deleted directory ("//deleted" in its mountinfo), never
  seeing a recreated one or the sockets in it. So the lab creates each node's run directory
  before starting agent and container (an agent's LocalServer only removes directories it
  made itself), and an agent restart must keep it.
- The node's run directory is given to the service uid, mode 0700 (`Isolation.grant`): the
  node's root may use it too (its owner is mapped in the node), other nodes may not. A socket
  the host creates in it must be connectable by that uid (the agent's socket is 0666).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from backdoors.errors import NodeError
from backdoors.nodes import syscalls
from backdoors.nodes.cgroups import Cgroup
from backdoors.nodes.hierarchies import Layout

__all__ = ["Container", "Isolation", "NodeProcess", "mount_tmpfs", "python_paths", "resize_tmpfs",
           "tools_missing", "uid_base_for", "unmount_under"]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2
#: where each node gets a private tmpfs of `Isolation.scratch_bytes`
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
PR_SET_NO_NEW_PRIVS = 38

#: Node user namespaces map 65536 ids from UID_BASE + index * 65536 on (far above the
#: 100000.. ranges /etc/subuid usually hands to users).
UID_BASE = 1 << 30
UID_COUNT = 65536

#: The namespaces a command joins, in order: the ones owned by the host's user namespace
#: first, the node's user namespace last (after it, host root has no power left to join).
_JOIN = (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET),
         ("cgroup", CLONE_NEWCGROUP), ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
_INIT = "catatonit"
_PF_EXITING = 0x4  # /proc/PID/stat flags: the task is exiting

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def uid_base_for(index: int) -> int:
    """The host uid that node number `index` (0, 1, ...) maps its root to."""
    if index < 0 or UID_BASE + (index + 1) * UID_COUNT > (1 << 32) - 1:
        raise NodeError(f"node index {index} is out of range for uid mapping")
    return UID_BASE + index * UID_COUNT


def python_paths() -> tuple[Path, ...]:
    """What a Python program of this interpreter needs to see: its installation, its venv
    and the directories on sys.path (an editable install's source tree). Share them when
    they lie under a hidden path (pyenv under /root, which is 0700 anyway)."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    paths.update(Path(p).resolve() for p in sys.path if p and os.path.isdir(p))
    return tuple(sorted(paths))


def tools_missing() -> list[str]:
    """The programs containers need that are not installed (catatonit, unshare, cat)."""
    return [t for t in (_INIT, "unshare", "cat") if shutil.which(t) is None]


@dataclass(frozen=True)
class Isolation:
    """How a node is isolated.

    `uid_base`: host uid (and gid) of the node's root; ids 0..`count`-1 inside map to
    `uid_base`.. outside, a range no host user or other node may use. `uid`: the uid (and
    gid) inside the node its services run as. `hide`: host paths (directories) covered by an
    empty read-only tmpfs in the node (the agent's config and keys, the other nodes' run
    directories, a home directory); the node's run directory is bound back in, writable.
    `share`: paths bound back in read-only where they lie under a hidden path (e.g. the
    Python installation under a hidden /root: see `python_paths`). `hostname`: the node's
    hostname (UTS namespace). `scratch_bytes`: size of each of the node's private tmpfs
    at SCRATCH (/tmp, /var/tmp, /dev/shm): the host's are not writable from the node, and
    what it writes there is charged to its own memory limit. `ptys`: how many
    pseudo-terminals the node may hold, in a devpts instance of its own (the host's
    /dev/ptmx would let it take every pty of the machine: kernel.pty.max is global).
    """

    uid_base: int
    count: int = UID_COUNT
    uid: int = 1000
    hide: tuple[Path, ...] = ()
    share: tuple[Path, ...] = ()
    hostname: str = "node"
    scratch_bytes: int = 64 << 20
    ptys: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.ptys <= 1024:
            raise NodeError(f"invalid isolation: ptys {self.ptys}: a node holds 1 to 1024 "
                            "pseudo-terminals")
        if (self.uid_base <= 0 or self.count <= 0 or not 0 <= self.uid < self.count
                or self.uid_base + self.count > (1 << 32) - 1):
            raise NodeError(
                f"invalid isolation: uid_base {self.uid_base}, count {self.count}, uid "
                f"{self.uid}: the node's ids must map to a host range above 0 that holds its uid"
            )

    def host_uid(self, inner: int) -> int:
        """The host uid (and gid) that `inner` inside the node is."""
        return self.uid_base + inner

    def grant(self, path: str | os.PathLike, mode: int | None = None) -> None:
        """Make `path` owned by the node's service uid and gid (e.g. its run directory),
        and set its `mode` if given."""
        host = self.host_uid(self.uid)
        os.chown(path, host, host)
        if mode is not None:
            os.chmod(path, mode)


class NodeProcess:
    """A command started in a container; Popen-like.

    `pid` is the command's pid on the host (None only if it ended before spawn returned),
    `ns_pid` its pid inside the node. `popen` is the host-side shim whose status is the
    command's (128+N when signal N killed it); stdin, stdout, stderr are the command's.
    """

    def __init__(self, popen: subprocess.Popen, pid: int | None, pidfd: int | None,
                 ns_pid: int | None):
        self.popen, self.pid, self._pidfd, self.ns_pid = popen, pid, pidfd, ns_pid
        self.args = popen.args

    def __repr__(self) -> str:
        return f"NodeProcess(pid={self.pid}, ns_pid={self.ns_pid}, returncode={self.returncode})"

    stdin = property(lambda self: self.popen.stdin)
    stdout = property(lambda self: self.popen.stdout)
    stderr = property(lambda self: self.popen.stderr)
    returncode = property(lambda self: self.popen.returncode)

    def poll(self) -> int | None:
        return self._closing(self.popen.poll())

    def wait(self, timeout: float | None = None) -> int:
        return self._closing(self.popen.wait(timeout))

    def communicate(self, input=None, timeout: float | None = None):  # noqa: A002
        out = self.popen.communicate(input, timeout)
        self._closing(self.popen.returncode)
        return out

    def send_signal(self, sig: int) -> None:
        """Signal the command itself (not the shim); nothing happens once it has ended."""
        if self.poll() is None and self._pidfd is not None:
            syscalls.pidfd_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _closing(self, code: int | None) -> int | None:
        if code is not None and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return code

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.popen.__exit__(*exc)
        self._closing(self.popen.returncode)

    def __del__(self) -> None:
        if getattr(self, "_pidfd", None) is not None:
            os.close(self._pidfd)


class _ChildError:
    """Carries what failed in a child between fork and exec back to the parent."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()  # both close-on-exec

    def step(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            os.write(self.write, f"{what}: {e.strerror or e}".encode()[:500])
            raise

    def reason(self) -> str:
        os.close(self.write)
        self.write = -1
        try:
            return os.read(self.read, 512).decode(errors="replace") or "unknown"
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self.read, self.write):
            if fd >= 0:
                os.close(fd)
        self.read = self.write = -1


def _open_procs(cgroup: Cgroup) -> list[int]:
    fds: list[int] = []
    try:
        for path in cgroup.paths.values():
            fds.append(os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise NodeError(f"cannot open {e.filename}: {e.strerror} (is the node's cgroup there?)"
                        ) from None
    return fds


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _ns_pids(pid: int) -> list[int]:
    """The pids of `pid` from the host's PID namespace down to its own (NSpid)."""
    return [int(p) for p in _status(pid).get("NSpid", "").split()]


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_VERSION_3 = 0x20080522


def _owned_userns(uid: int) -> None:
    """unshare(CLONE_NEWUSER) with effective uid and gid `uid`, which then own the new user
    namespace. The kernel charges the per-user budgets of a namespace's users (inotify
    instances: 128, fanotify groups, namespaces, message queue bytes) also to its owner in
    the parent: owned by host root, a node could use up every root daemon's. Real and saved
    ids stay 0, so the permitted capabilities stay; the effective ones (cleared by the
    euid change) are raised again, so hosts that allow only privileged processes to make
    user namespaces (Debian's kernel.unprivileged_userns_clone=0) still do."""
    os.setresgid(0, uid, 0)
    os.setresuid(0, uid, 0)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for d in data:
        d.effective = d.permitted
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _unshare(CLONE_NEWUSER)


def _make_userns(iso: Isolation) -> int:
    """A new user namespace with the isolation's mapping, owned by the node's root's host
    uid; returns an fd naming it. Its holder, a child until then, reads a pipe whose other
    end is ours: it ends at EOF if we are killed before we end it (no exec keeps a
    PR_SET_PDEATHSIG across the credential change)."""
    cat = shutil.which("cat") or "/bin/cat"
    try:
        holder = subprocess.Popen([cat], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  preexec_fn=lambda: _owned_userns(iso.uid_base))
    except subprocess.SubprocessError:
        raise NodeError("cannot create a user namespace: are they disabled "
                        "(/proc/sys/user/max_user_namespaces is 0)?") from None
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(f"0 {iso.uid_base} {iso.count}\n")
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NodeError(f"cannot map the node's user namespace: {e.strerror}") from None
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()


class Container:
    """The namespaces of one node, held by its PID 1; use Container.start or Container.open.

    `init_pid` is the host pid of the node's PID 1. A container lives until `stop()`, until
    its PID 1 is killed from the host, or until the node's cgroup is killed.
    """

    def __init__(self, cgroup: Cgroup, isolation: Isolation, init_pid: int,
                 launcher: subprocess.Popen | None = None):
        self.cgroup, self.isolation, self.init_pid = cgroup, isolation, init_pid
        self._launcher = launcher

    def __repr__(self) -> str:
        return f"Container({self.cgroup.relpath!r}, init_pid={self.init_pid})"

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(cls, cgroup: Cgroup, netns: str | None, isolation: Isolation,
              run_dir: str | os.PathLike, *, timeout: float = 5.0, stderr=None) -> Container:
        """Create the node's namespaces and start its PID 1; returns when PID 1 runs.

        `run_dir` (which must exist) is given to the node's service uid (mode 0700) and is
        bound back in, writable, if it lies under a path of `isolation.hide`. `netns` is the name of an existing netns
        (None: a fresh empty one). `stderr` (Popen-style) receives what the launcher and
        PID 1 say; give a file when this process's stderr is a pipe someone waits on (the
        container outlives this process).
        """
        if missing := tools_missing():
            raise NodeError(f"containers need {', '.join(missing)}: apt-get install catatonit "
                            "util-linux coreutils")
        run_dir = Path(run_dir).resolve()
        if not run_dir.is_dir():
            raise NodeError(f"the node's run directory {run_dir} does not exist: create it first")
        isolation.grant(run_dir, 0o700)
        for path in isolation.hide:
            if not Path(path).is_absolute() or Path(path) == run_dir:
                raise NodeError(f"cannot hide {path}: give absolute paths other than the run "
                                "directory")
        hide = tuple(Path(p).resolve() for p in isolation.hide if Path(p).is_dir())
        shares = [(Path(p).resolve(), False) for p in isolation.share if Path(p).exists()]
        # the host's cgroupfs, but for the node's own cgroup (read-only: its limits)
        hide += _cgroup_roots(cgroup.layout)
        shares += [(path, False) for path in cgroup.paths.values()]
        # each is covered whole; the run directory and shares under one are bound back
        scratch = tuple(Path(p).resolve() for p in SCRATCH if os.path.isdir(p) and not any(
            Path(p).resolve() == q for q in (run_dir, *hide, *(path for path, _ in shares)))
                        and not any(h in Path(p).resolve().parents for h in hide))
        netns_fd = None
        if netns is not None:
            try:
                netns_fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise NodeError(f"network namespace {netns!r}: {e.strerror}: create it first"
                                ) from None
        procs = _open_procs(cgroup)
        userns = _make_userns(isolation)
        failure = _ChildError()
        fds = [*procs, userns] + ([netns_fd] if netns_fd is not None else [])

        def enter() -> None:  # in the child, between fork and exec
            for fd in procs:
                failure.step("join the node's cgroup", os.write, fd, b"0")
            if netns_fd is not None:
                failure.step(f"enter netns {netns}", syscalls.setns, netns_fd, CLONE_NEWNET)
            else:
                failure.step("create a netns", _unshare, CLONE_NEWNET)
            failure.step("create mount, uts, ipc namespaces", _unshare,
                         CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
            failure.step("make mounts private", _mount, None, "/", None, MS_REC | MS_PRIVATE)
            failure.step("detach copies of others' mounts", _drop_copies, (*hide, *scratch),
                         [run_dir, *(path for path, _ in shares)])
            _hide(hide, scratch, isolation.scratch_bytes, [(run_dir, True), *shares], failure)
            _own_ptys(isolation.ptys, failure)
            failure.step("set the hostname", socket.sethostname, isolation.hostname)
            failure.step("enter the node's user namespace", syscalls.setns, userns,
                         CLONE_NEWUSER)
            _become(0, failure)

        argv = [shutil.which("unshare"), "--pid", "--cgroup", "--fork", "--mount-proc",
                "--kill-child", "--", shutil.which(_INIT), "-P"]
        launcher = _launch(argv, enter, failure, fds,
                           f"cannot start the container of cgroup {cgroup.relpath!r}",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                           start_new_session=True)

        def init_runs() -> int | None:
            if launcher.poll() is not None:
                raise NodeError(f"the container's launcher exited with {launcher.returncode} "
                                "before its PID 1 ran (see its stderr)")
            for child in _children(launcher.pid):
                if _status(child).get("Name") == _INIT:
                    return child
            return None

        try:
            init = _wait_for(init_runs, timeout, "the container's PID 1")
        except BaseException:
            launcher.kill()
            launcher.wait()
            raise
        return cls(cgroup, isolation, init, launcher)

    @classmethod
    def open(cls, cgroup: Cgroup, isolation: Isolation) -> Container:
        """The running container of the node whose cgroup is `cgroup` (found by its PID 1)."""
        inits = [pid for pid in cgroup.procs()
                 if len(ns := _ns_pids(pid)) == 2 and ns[1] == 1
                 and cls(cgroup, isolation, pid).alive()]
        if len(inits) != 1:
            raise NodeError(
                f"cgroup {cgroup.relpath!r} holds {len(inits)} container PID 1 processes, "
                "not one: start the node's container (Container.start)"
            )
        return cls(cgroup, isolation, inits[0])

    def alive(self) -> bool:
        """True while the node's PID 1 runs: not a zombie, and not exiting (a killed PID 1
        stays in state S, exiting, until every process of its namespace has been reaped,
        also those whose parent is a host-side shim)."""
        status = _status(self.init_pid)
        if status.get("Name") != _INIT or status.get("State", "Z").startswith(("Z", "X")):
            return False
        try:
            stat = Path(f"/proc/{self.init_pid}/stat").read_text()
            flags = int(stat[stat.rindex(")") + 2:].split()[6])
        except (OSError, ValueError, IndexError):
            return False
        return not flags & _PF_EXITING

    def stop(self, timeout: float = 5.0) -> None:
        """End the node's PID 1, which kills every process in the node; idempotent.

        SIGTERM first (catatonit -P exits 0 on it; a SIGKILLed PID 1 makes util-linux
        unshare print "sigprocmask unblock failed"), SIGKILL if it is still there.
        """
        pidfd = syscalls.pidfd_open(self.init_pid)
        if pidfd is not None:
            try:
                if _status(self.init_pid).get("Name") == _INIT:
                    syscalls.pidfd_signal(pidfd, signal.SIGTERM)
                    if not syscalls.wait_exited([pidfd], timeout):
                        syscalls.pidfd_signal(pidfd, signal.SIGKILL)
                        syscalls.wait_exited([pidfd], timeout)
            finally:
                os.close(pidfd)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait()

    # -- processes -------------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        root: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike = "/",
        stdin=None,
        stdout=None,
        stderr=None,
        pass_fds: Sequence[int] = (),
        new_session: bool = True,
        timeout: float = 5.0,
    ) -> NodeProcess:
        """Run `argv` in the node as its services run: its cgroup, namespaces and uid
        (`root`: the node's root, uid 0 inside). `cwd` is a path inside the node."""
        if not argv:
            raise NodeError("spawn needs a command")
        if self.cgroup.freeze_requested():
            raise NodeError(f"node {self.cgroup.relpath!r} is locked (frozen): unlock it first")
        try:
            ns_fds = [(os.open(f"/proc/{self.init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC),
                       flag) for name, flag in (*_JOIN, ("user", CLONE_NEWUSER))]
        except OSError as e:
            raise NodeError(f"the container of {self.cgroup.relpath!r} is gone (PID 1 "
                            f"{self.init_pid}: {e.strerror}): start it again") from None
        procs = _open_procs(self.cgroup)
        failure = _ChildError()
        uid = 0 if root else self.isolation.uid

        def enter() -> None:  # in the child, between fork and exec
            for fd in procs:
                failure.step("join the node's cgroup", os.write, fd, b"0")
            for fd, flag in ns_fds:
                failure.step(f"enter namespace {flag:#x}", syscalls.setns, fd, flag)
            _become(uid, failure)
            failure.step(f"chdir to {cwd}", os.chdir, cwd)

        shim = _launch([shutil.which(_INIT) or _INIT, "--", *argv], enter, failure,
                       procs + [fd for fd, _ in ns_fds],
                       f"cannot enter the container of {self.cgroup.relpath!r}", env=env,
                       stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
                       start_new_session=new_session)
        return self._pin_command(shim, argv[0], timeout)

    def _pin_command(self, shim: subprocess.Popen, argv0: str, timeout: float) -> NodeProcess:
        """Find the command the shim forked, pinned by a pidfd, once it has exec'd."""

        def forked() -> tuple | None:
            for child in _children(shim.pid):
                pidfd = syscalls.pidfd_open(child)
                if pidfd is None:
                    continue
                if child in _children(shim.pid):  # still the shim's: the pidfd names it
                    return child, pidfd
                os.close(pidfd)
            if shim.poll() is not None:
                return None, None  # the command has ended (and was reaped) already
            return None

        def execd() -> bool:  # the forked shim is named like the shim until its exec
            return (_status(pid).get("Name") != _INIT or shim.poll() is not None
                    or os.path.basename(argv0).startswith(_INIT))

        pid = pidfd = None
        try:
            pid, pidfd = _wait_for(forked, timeout, f"{_INIT} to fork the command")
            if pid is not None:
                _wait_for(execd, timeout, f"the command {argv0!r} to start")
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            shim.kill()
            shim.wait()
            raise
        ns = _ns_pids(pid) if pid is not None else []
        return NodeProcess(shim, pid, pidfd, ns[-1] if len(ns) > 1 else None)

    def host_pid(self, ns_pid: int) -> int | None:
        """The host pid of the node's process `ns_pid` (as the node sees it), or None."""
        try:
            own_ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            raise NodeError(f"the container of {self.cgroup.relpath!r} is gone") from None
        for pid in self.cgroup.procs():
            ns = _ns_pids(pid)
            if len(ns) == 2 and ns[1] == ns_pid:
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") == own_ns:
                        return pid
                except OSError:
                    pass
        return None


def _launch(argv: list[str], enter, failure: _ChildError, fds: list[int], what: str,
            **popen) -> subprocess.Popen:
    """Start `argv` with `enter` run in the child before exec; a step of `enter` that failed
    becomes a NodeError saying `what` and which step. Closes `fds` (the child has used them)."""
    try:
        return subprocess.Popen(argv, preexec_fn=enter, **popen)
    except subprocess.SubprocessError:
        raise NodeError(f"{what}: {failure.reason()}") from None
    except OSError as e:
        raise NodeError(f"cannot run {argv[0]}: {e.strerror}") from None
    finally:
        failure.close()
        for fd in fds:
            os.close(fd)


def _cgroup_roots(layout: Layout) -> tuple[Path, ...]:
    """What covers the host's cgroupfs: the folder of every hierarchy where it is a file
    system of its own (`Layout.root`), else each hierarchy's mount."""
    return (layout.root,) if layout.root is not None else tuple(layout.hierarchies().values())


def _drop_copies(covered: tuple[Path, ...], binds: list[Path]) -> None:
    """In the node's new mount namespace: detach the copies it made of mounts it must not
    keep alive -- namespace handles (nsfs: every node's and lab's netns file; this one
    entered its own by fd) and the mounts under a path about to be covered but for those
    bound back. A copy in a private namespace holds its namespace or tmpfs after the host
    removed it there (another lab's, torn down while this node runs)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = Path(fields[4].encode().decode("unicode_escape"))
            fstype = fields[fields.index("-") + 1]
            related = any(b == point or b in point.parents or point in b.parents for b in binds)
            if fstype == "nsfs" or (any(c in point.parents for c in covered) and not related):
                points.append(str(point))
    for point in sorted(points, key=len, reverse=True):
        _libc.umount2(point.encode(), MNT_DETACH)  # (fails if one above took it: fine)


def _hide(hide: tuple[Path, ...], scratch: tuple[Path, ...], scratch_bytes: int,
          binds: list[tuple[Path, bool]], failure: _ChildError) -> None:
    """Cover each hidden path with an empty read-only tmpfs and each scratch path with a
    private writable one of `scratch_bytes`, then bind back in each (path, writable) of
    `binds` that lies under one (the run directory, the shares: a checkout under /tmp).

    The bound paths are held open (O_PATH) before they are covered and bound from those
    fds, which must be opened in this mount namespace (a bind source from another is EINVAL).
    """
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    covered = [(path, writable) for path, writable in sorted(binds, key=lambda b: len(b[0].parts))
               if any(h in path.parents for h in (*hide, *scratch))]
    held = []
    for path, writable in covered:
        try:
            held.append((path, writable, os.open(path, os.O_PATH | os.O_CLOEXEC)))
        except OSError as e:
            failure.step(f"open {path}", _raise, e)
    for path in scratch:  # first: a hidden path under one is hidden in it
        failure.step(f"mount a private tmpfs on {path}", _mount, "tmpfs", str(path), "tmpfs",
                     MS_NOSUID | MS_NODEV, f"mode=1777,size={scratch_bytes}")
    for path in hide:
        failure.step(f"make {path}", os.makedirs, path, 0o755, True)
        failure.step(f"hide {path}", _mount, "tmpfs", str(path), "tmpfs", flags,
                     "mode=0755,size=64k")
    for path, writable, fd in held:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            failure.step(f"make {path} in the tmpfs", os.makedirs, path, 0o755, True)
        else:
            failure.step(f"make {path.parent} in the tmpfs", os.makedirs, path.parent, 0o755,
                         True)
            failure.step(f"make {path} in the tmpfs", _touch, path)
        failure.step(f"bind {path}", _mount, f"/proc/self/fd/{fd}", str(path), None,
                     MS_BIND | MS_REC)
        if not writable:
            failure.step(f"make {path} read-only", _mount, None, str(path), None,
                         MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in hide:
        failure.step(f"make {path} read-only", _mount, None, str(path), None,
                     MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def _own_ptys(count: int, failure: _ChildError) -> None:
    """A devpts instance of the node's own at /dev/pts, of at most `count` ptys, and its
    ptmx bound over /dev/ptmx: the host's ptys are neither listed nor used up by the node.
    Mounted by host root, so locked for the node. Skipped where the host has no /dev/ptmx."""
    if not os.path.exists("/dev/ptmx") or not os.path.isdir("/dev/pts"):
        return
    failure.step("mount a devpts of its own on /dev/pts", _mount, "devpts", "/dev/pts",
                 "devpts", MS_NOSUID | MS_NOEXEC, f"newinstance,ptmxmode=0666,mode=0620,max={count}")
    failure.step("bind its ptmx on /dev/ptmx", _mount, "/dev/pts/ptmx", "/dev/ptmx", None,
                 MS_BIND)


def mount_tmpfs(path: str | os.PathLike, size: int, mode: int = 0o755) -> None:
    """Mount a tmpfs of `size` bytes on the existing directory `path` (host root): a node's
    run directory, so what the node writes there is bounded, and charged to its cgroup."""
    try:
        _mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"mode={mode:o},size={size}")
    except OSError as e:
        raise NodeError(f"cannot mount a tmpfs on {path}: {e.strerror}") from None


def resize_tmpfs(path: str | os.PathLike, size: int) -> None:
    """Give the tmpfs mounted on `path` (by mount_tmpfs) a new size in bytes: a node that
    keeps more than sockets in its run directory (a database's files)."""
    try:
        _mount(None, str(path), None, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"size={size}")
    except OSError as e:
        raise NodeError(f"cannot resize the tmpfs on {path} to {size} bytes: {e.strerror}") from None


def unmount_under(path: str | os.PathLike) -> list[str]:
    """Detach every mount at or under `path` in this mount namespace (deepest first);
    the paths unmounted. For cleanup: failures are skipped."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                found.append(point)
    done = []
    for point in sorted(found, key=len, reverse=True):
        if _libc.umount2(point.encode(), MNT_DETACH) == 0:
            done.append(point)
    return done


def _raise(e: OSError) -> None:
    raise e


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _become(uid: int, failure: _ChildError) -> None:
    """In the node's user namespace: drop groups, set uid and gid, forbid new privileges."""
    failure.step("clear groups", os.setgroups, [])
    failure.step(f"set gid {uid}", os.setresgid, uid, uid, uid)
    failure.step(f"set uid {uid}", os.setresuid, uid, uid, uid)
    failure.step("set no_new_privs", lambda: _check(
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl"))


"""The sealed agent: what the agent does to itself once it is set up (`backdoors agent --sealed`).

In two steps. `confine()`, in the main thread once the agent has read its config, loaded
its keys, opened its nodes and bound its sockets, and before it starts any thread (the
agent's `on_set_up` hook, agent/daemon.py):

- **without new privileges** (`PR_SET_NO_NEW_PRIVS 1`: inherited by every later thread);
- **path-confined** by Landlock (agent/landlock.py; `rules()` below): read-only its Python
  code, shared libraries, a few /etc files, /proc, /sys and /run/netns; read-write the
  cgroup hierarchies; create and remove sockets in its nodes' run directories; nothing
  else: not its config or keys file (read before), not /tmp, /root or home directories,
  and no execution anywhere. Landlock (ABI 7 on Linux 6.18) confines only the calling
  thread and those it starts later, hence before the threads. No Landlock in the kernel
  (ABI 0): a warning, unless `require_landlock`.

Then `seal()`, once the agent serves, on every thread:

- **not dumpable** (`PR_SET_DUMPABLE 0`): `/proc/<agent>/mem`, `environ`, `fd/`, `maps`,
  `process_vm_readv` and `ptrace` of the agent need CAP_SYS_PTRACE in the host's user
  namespace, even for a process of the same uid (root in a user namespace has none); its
  `/proc/<pid>/` files become root's; no core dump carries its keys;
- **without new privileges** (`PR_SET_NO_NEW_PRIVS 1`, every thread);
- **memory-locked** (checked: `harden()` did the `mlockall`; a warning if it could not);
- **syscall-filtered**: a seccomp filter (libseccomp through `pyseccomp`) on every thread
  (TSYNC) that refuses the calls in `DENIED` with EPERM, so a refused call is an OSError
  in the op that made it, never a dead agent. Calls of another ABI (i386, x32) are not
  allowed at all (the filter kills the process).

The filter is a deny-list, not an allow-list: the agent is a Python process (the interpreter,
pyroute2, psutil, msgspec, asyncio) whose exact system calls change with their versions,
and an allow-list that misses one kills an op in production; the calls denied below are
those no op of the agent makes and that would let a hijacked agent run programs, change
the kernel or reach other processes' memory for writing. The Landlock rules are the
allow-list for paths (docs/operations.md, "The sealed agent").
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
import sys

from ..errors import AgentError
from . import landlock

PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39

# Every system call the sealed agent refuses, with why. Names libseccomp does not know on
# this architecture are skipped (and listed in the Seal report).
DENIED: dict[str, str] = {
    # run another program: the agent never executes anything (no forking on its request path)
    "execve": "run a program", "execveat": "run a program",
    # other processes' memory and control; reading (process_vm_readv) stays: VM node memory
    "ptrace": "trace or write another process", "process_vm_writev": "write another process's memory",
    # the kernel itself
    "init_module": "load a kernel module", "finit_module": "load a kernel module",
    "delete_module": "unload a kernel module",
    "kexec_load": "replace the kernel", "kexec_file_load": "replace the kernel",
    "bpf": "load BPF programs", "perf_event_open": "attach perf/kprobe events",
    "iopl": "raw port I/O", "ioperm": "raw port I/O",
    "reboot": "reboot or halt the host", "swapon": "change swap", "swapoff": "change swap",
    "acct": "process accounting", "quotactl": "change disk quotas",
    "settimeofday": "set the clock", "clock_settime": "set the clock",
    "clock_adjtime": "adjust the clock", "adjtimex": "adjust the clock",
    # kernel keyrings
    "keyctl": "kernel keyrings", "add_key": "kernel keyrings", "request_key": "kernel keyrings",
    # the file system tree and namespaces (entering a node's netns, setns, stays)
    "mount": "mount", "umount2": "unmount", "pivot_root": "change root", "chroot": "change root",
    "mount_setattr": "mount", "move_mount": "mount", "open_tree": "mount", "fsopen": "mount",
    "fsconfig": "mount", "fsmount": "mount", "fspick": "mount",
    "unshare": "new namespaces", "open_by_handle_at": "open files by handle, past path checks",
    # io_uring runs file and socket operations that seccomp does not see
    "io_uring_setup": "io_uring bypasses the filter", "io_uring_enter": "io_uring bypasses the filter",
    "io_uring_register": "io_uring bypasses the filter",
    "userfaultfd": "stall the kernel on page faults", "personality": "change the execution domain",
    "uselib": "load a library (obsolete)",
}

# What a denied call does: "errno" (EPERM, the default), "log" (allowed, but logged by the
# kernel: the dry run to find what a change would deny), "kill" (the process dies, SIGSYS).
ACTIONS = ("errno", "log", "kill")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


# Files of /etc the agent may read after the seal: name resolution, time zone, the dynamic
# linker's cache, user names (psutil). Not secrets.
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/hosts", "/etc/host.conf",
             "/etc/nsswitch.conf", "/etc/resolv.conf", "/etc/gai.conf", "/etc/services",
             "/etc/protocols", "/etc/passwd", "/etc/group")
# Shared libraries (extension modules load theirs lazily; mmap of a file open for reading
# needs no execute right in Landlock) and the zone database.
LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                "/usr/share/zoneinfo")
# Executables, read only to hash them (the process table's exe_sha256, for warnings
# between clusters): Landlock denies a sealed agent /proc/PID/exe of node processes, so it
# reads the file their argv[0] names (common.procs.exe_sha256).
EXE_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
DEVICES = {"/dev/null": landlock.READ_FILE | landlock.WRITE_FILE,
           "/dev/zero": landlock.READ_FILE, "/dev/urandom": landlock.READ_FILE,
           "/dev/random": landlock.READ_FILE}
CGROUP = landlock.READ | landlock.WRITE | landlock.MAKE_DIR | landlock.REMOVE_DIR
NODE_RUN_DIR = landlock.MAKE_SOCK | landlock.REMOVE_FILE


@dataclasses.dataclass
class Confinement:
    """What `confine()` applied: `landlock_abi` (0: none), `landlock` the rules granted
    ({path: access names}), `warnings` what fell short."""

    landlock_abi: int
    landlock: dict[str, list[str]]
    warnings: list[str]


@dataclasses.dataclass
class Seal:
    """What `seal()` applied: `denied` the calls filtered, `unknown` those libseccomp did
    not know here, `locked_kib` the memory locked (VmLck), `warnings` what fell short,
    `landlock_abi` and `landlock` (the rules) from `confine()` (0 and {} without it)."""

    action: str
    denied: list[str]
    unknown: list[str]
    locked_kib: int
    warnings: list[str]
    landlock_abi: int = 0
    landlock: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def rules(*, run_dir: str, nodes: list[str], cgroup_mounts: list[str],
          read_dirs: tuple[str, ...] = ()) -> dict[str, int]:
    """The Landlock rules of a sealed agent: {path: accesses beneath it}; `read_dirs`
    are read too (the guest kernels of VM nodes, for their integrity baselines)."""
    out: dict[str, int] = {p: landlock.READ for p in code_dirs()}
    out.update((p, landlock.READ) for p in read_dirs)
    out.update((p, landlock.READ) for p in LIBRARY_DIRS)
    out.update((p, landlock.READ_FILE) for p in ETC_FILES)
    out.update((p, landlock.READ_FILE) for p in exe_dirs())
    out.update(DEVICES)
    out.update({"/proc": landlock.READ, "/sys": landlock.READ, "/run/netns": landlock.READ})
    # a node's network sysctls, set when it takes a service address over (adopt: ARP)
    out["/proc/sys/net"] = landlock.READ | landlock.WRITE
    out.update((str(m), CGROUP) for m in cgroup_mounts)  # kill, freeze, limits, own cgroup
    # registration sockets: removed at stop (made before the seal); adoption sockets are
    # connected to, which Landlock does not check up to ABI 7
    out.update((os.path.join(run_dir, n), NODE_RUN_DIR) for n in nodes)
    return out


def exe_dirs() -> list[str]:
    """EXE_DIRS that exist, and this interpreter's own folder (resolved)."""
    dirs = [*EXE_DIRS, os.path.dirname(os.path.realpath(sys.executable))]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def code_dirs() -> list[str]:
    """Where this interpreter imports from: sys.path (without the script's directory or
    the working directory, sys.path[0]) and the directory holding `backdoors`."""
    import backdoors
    dirs = [p for p in sys.path[1:] if p and os.path.isabs(p)]
    dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(backdoors.__file__))))
    return list(dict.fromkeys(dirs))


def confine(rules: dict[str, int], *, secrets: tuple[str, ...] = (),
            require_landlock: bool = False) -> Confinement:
    """The first step of the seal, in the main thread before any other thread starts: no new
    privileges, then Landlock `rules`. AgentError if a step fails, another thread runs,
    or (with `require_landlock`) the kernel has no Landlock; without it, a warning."""
    for path in secrets:
        _check_secret(path)
    _pyseccomp()  # loaded now: seal() needs it, and cannot run ldconfig once confined
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS 1")
    version = landlock.abi()
    if version < 1:
        if require_landlock:
            raise AgentError("sealing: Landlock is required but this kernel has none (ABI 0: "
                             "not built, or not in the lsm= boot parameter)")
        return Confinement(0, {}, ["Landlock is not available (ABI 0): the sealed agent's "
                                   "paths are not confined"])
    done = landlock.restrict(rules, version)
    warnings = []
    for secret in secrets:
        real = os.path.realpath(secret)
        for path, access in done.rules.items():
            base = os.path.realpath(path)
            if "read_file" in access and (real == base or real.startswith(base.rstrip("/") + "/")):
                warnings.append(f"the key file {secret} lies beneath {path}, which the sealed "
                                f"agent may read: keep it elsewhere (/etc/backdoors)")
    return Confinement(version, done.rules, warnings)


def seal(*, secrets: tuple[str, ...] = (), action: str = "errno", log_denials: bool = True,
         confined: Confinement | None = None) -> Seal:
    """Seal this process (every thread); AgentError if a step fails or a file of `secrets`
    (keys) is readable by anyone but root. `confined`: what `confine()` did before, for
    the report. Irreversible."""
    if action not in ACTIONS:
        raise AgentError(f"seal action {action!r}: expected one of {', '.join(ACTIONS)}")
    for path in secrets:
        _check_secret(path)
    warnings = list(confined.warnings) if confined else []
    _prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE 0")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS 1")
    denied, unknown = _load_filter(action, log_denials)
    locked = status("self").get("VmLck", "0 kB").split()[0]
    locked_kib = int(locked) if locked.isdigit() else 0
    if locked_kib == 0:
        warnings.append("memory is not locked (mlockall was refused: RLIMIT_MEMLOCK or "
                        "CAP_IPC_LOCK); the sealed agent may be paged out")
    return Seal(action, denied, unknown, locked_kib, warnings,
                confined.landlock_abi if confined else 0, confined.landlock if confined else {})


def status(pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/<pid>/status (Seccomp, NoNewPrivs, VmLck, ...): how to check a
    sealed agent from outside (Seccomp: 2, NoNewPrivs: 1)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def dumpable() -> bool:
    """Whether this process is dumpable (PR_GET_DUMPABLE)."""
    return _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def secret_paths(key_file: str) -> tuple[str, ...]:
    """The files holding the agent's secrets: its private key file (the config holds only
    public keys)."""
    return (key_file,)


def _check_secret(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise AgentError(f"sealing: cannot check the key file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != 0:
        raise AgentError(f"sealing: {path} holds the agent's private key and is not root's only "
                         f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): make it "
                         f"root's and private (chown root {path}; chmod 600 {path})")


def _prctl(option: int, value: int, what: str) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise AgentError(f"sealing: prctl {what}: {os.strerror(err)}")


def _pyseccomp():
    try:
        import pyseccomp  # finds libseccomp.so.2 with ctypes.util: a temporary file and an
        # execve of ldconfig, so before confine() and the filter
    except (ImportError, OSError, RuntimeError) as e:
        raise AgentError(f"sealing: cannot load libseccomp ({e}): install the Debian package "
                         "libseccomp2 and the Python package pyseccomp, or run without "
                         "--sealed") from None
    return pyseccomp


def _load_filter(action: str, log_denials: bool) -> tuple[list[str], list[str]]:
    pyseccomp = _pyseccomp()
    deny = {"errno": pyseccomp.ERRNO(errno.EPERM), "log": pyseccomp.LOG,
            "kill": pyseccomp.KILL_PROCESS}[action]
    try:
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        f.set_attr(pyseccomp.Attr.CTL_NNP, 1)
        f.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)  # every thread, started or not
        if log_denials:
            f.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    except OSError as e:
        raise AgentError(f"sealing: cannot set up the seccomp filter: {e}") from None
    denied, unknown = [], []
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (OSError, ValueError):
            unknown.append(name)
            continue
        denied.append(name)
    try:
        f.load()
    except OSError as e:
        raise AgentError(f"sealing: the kernel refused the seccomp filter: {e} (a thread with "
                         "another filter, or no seccomp in this kernel)") from None
    return denied, unknown

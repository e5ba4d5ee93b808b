"""The sealed agent: what the agent does to itself once it is set up (`backdoors agent --sealed`).

After it has read its config, loaded its keys, opened its nodes, bound its sockets and
started its threads, `seal()` makes the process:

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

It is a deny-list, not an allow-list: the agent is a Python process (the interpreter,
pyroute2, psutil, msgspec, asyncio) whose exact system calls change with their versions,
and an allow-list that misses one kills an op in production; the calls denied below are
those no op of the agent makes and that would let a hijacked agent run programs, change
the kernel or reach other processes' memory for writing. Landlock (ABI 7 on Linux 6.18)
restricts only the calling thread, and the agent's threads are running when it seals:
not used (docs/operations.md, "The sealed agent").
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat

from ..errors import AgentError

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


@dataclasses.dataclass
class Seal:
    """What `seal()` applied: `denied` the calls filtered, `unknown` those libseccomp did
    not know here, `locked_kib` the memory locked (VmLck), `warnings` what fell short."""

    action: str
    denied: list[str]
    unknown: list[str]
    locked_kib: int
    warnings: list[str]


def seal(*, secrets: tuple[str, ...] = (), action: str = "errno", log_denials: bool = True) -> Seal:
    """Seal this process (every thread); AgentError if a step fails or a file of `secrets`
    (keys) is readable by anyone but root. Irreversible."""
    if action not in ACTIONS:
        raise AgentError(f"seal action {action!r}: expected one of {', '.join(ACTIONS)}")
    for path in secrets:
        _check_secret(path)
    warnings = []
    _prctl(PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE 0")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS 1")
    denied, unknown = _load_filter(action, log_denials)
    locked = status("self").get("VmLck", "0 kB").split()[0]
    locked_kib = int(locked) if locked.isdigit() else 0
    if locked_kib == 0:
        warnings.append("memory is not locked (mlockall was refused: RLIMIT_MEMLOCK or "
                        "CAP_IPC_LOCK); the sealed agent may be paged out")
    return Seal(action, denied, unknown, locked_kib, warnings)


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


def _load_filter(action: str, log_denials: bool) -> tuple[list[str], list[str]]:
    try:
        import pyseccomp  # finds libseccomp.so.2 with ctypes.util (runs ldconfig: before the seal)
    except (ImportError, OSError, RuntimeError) as e:
        raise AgentError(f"sealing: cannot load libseccomp ({e}): install the Debian package "
                         "libseccomp2 and the Python package pyseccomp, or run without "
                         "--sealed") from None
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

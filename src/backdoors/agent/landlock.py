"""Landlock through its three system calls (ctypes, x86_64 numbers): the path part of the seal.

A ruleset names the file-system accesses it handles (every one this kernel's ABI knows);
each rule grants some of them beneath one path; `landlock_restrict_self` then confines the
calling thread and every thread or process it creates later. Up to ABI 7 there is no
thread sync: a thread running before `restrict()` stays free, so `restrict()` refuses to
run while this process has more than one thread. Access already granted stays: descriptors
opened before (the audit log, sockets, memfds, cgroup files held open) keep working.

Landlock ABI 1-7 does not check `connect`/`sendto` to a pathname Unix socket (the notify
socket, adoption sockets), `stat`, nsfs files (`/run/netns/NAME`, `/proc/<pid>/ns/*`: a
pseudo file system Landlock lets through), memfds, or `mmap(PROT_EXEC)` of a file open for
reading; network rules (ABI 4) and scopes (ABI 6) are not used (the agent binds and
connects for session recovery, and signals its nodes' processes).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os

from ..errors import AgentError

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # x86_64 and most 64-bit
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a file's rule may hold
READ = READ_FILE | READ_DIR
WRITE = WRITE_FILE | TRUNCATE

NAMES = {EXECUTE: "execute", WRITE_FILE: "write_file", READ_FILE: "read_file",
         READ_DIR: "read_dir", REMOVE_DIR: "remove_dir", REMOVE_FILE: "remove_file",
         MAKE_CHAR: "make_char", MAKE_DIR: "make_dir", MAKE_REG: "make_reg",
         MAKE_SOCK: "make_sock", MAKE_FIFO: "make_fifo", MAKE_BLOCK: "make_block",
         MAKE_SYM: "make_sym", REFER: "refer", TRUNCATE: "truncate", IOCTL_DEV: "ioctl_dev"}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]  # the ABI 1 prefix: fs only


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The Landlock ABI version of this kernel; 0 if it has none (ENOSYS) or it is off
    (EOPNOTSUPP: not in the `lsm=` list)."""
    version = _libc.syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    return max(version, 0)


def handled(version: int) -> int:
    """Every file-system access ABI `version` knows (all of them are handled: denied
    unless a rule grants them)."""
    mask = (MAKE_SYM << 1) - 1
    if version >= 2:
        mask |= REFER
    if version >= 3:
        mask |= TRUNCATE
    if version >= 5:
        mask |= IOCTL_DEV
    return mask


def names(access: int) -> list[str]:
    """The names of the accesses in the bit set `access`."""
    return [name for bit, name in NAMES.items() if access & bit]


@dataclasses.dataclass
class Confined:
    """What `restrict()` applied: the ABI, the rules granted ({path: access names}) and the
    paths skipped because they do not exist here."""

    abi: int
    rules: dict[str, list[str]]
    missing: list[str]


def restrict(rules: dict[str, int], version: int | None = None) -> Confined:
    """Confine this thread (and every thread and process it creates afterwards) to `rules`:
    {path: accesses granted beneath it}. Paths that do not exist are skipped. AgentError if
    the kernel refuses or another thread is running (it would stay unconfined)."""
    version = abi() if version is None else version
    if version < 1:
        raise AgentError("sealing: this kernel has no Landlock (ABI 0)")
    others = sorted(int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid())
    if others:
        raise AgentError(f"sealing: Landlock confines only the calling thread and the threads "
                         f"it starts later, but {len(others)} other thread(s) already run "
                         f"(tids {', '.join(map(str, others))}): confine before starting them")
    mask = handled(version)
    attr = _RulesetAttr(mask)
    ruleset = _libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        raise AgentError(f"sealing: landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    granted: dict[str, list[str]] = {}
    missing: list[str] = []
    try:
        for path, access in rules.items():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                missing.append(path)
                continue
            except OSError as e:
                raise AgentError(f"sealing: cannot open {path} for a Landlock rule: "
                                 f"{e.strerror}") from None
            try:
                allowed = access & mask
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    allowed &= FILE_ONLY
                if not allowed:
                    continue
                rule = _PathBeneathAttr(allowed, fd)
                if _libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule),
                                 0) != 0:
                    err = ctypes.get_errno()
                    raise AgentError(f"sealing: landlock_add_rule {path} "
                                     f"({', '.join(names(allowed))}): {os.strerror(err)}")
                granted[path] = names(allowed)
            finally:
                os.close(fd)
        if _libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
            err = ctypes.get_errno()
            hint = " (needs no_new_privs or CAP_SYS_ADMIN)" if err == errno.EPERM else ""
            raise AgentError(f"sealing: landlock_restrict_self: {os.strerror(err)}{hint}")
    finally:
        os.close(ruleset)
    return Confined(version, granted, missing)

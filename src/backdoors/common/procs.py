"""Process identity: one process read from /proc/PID/stat, alive or not, the same or not.

A pid alone does not name a process (pids are recycled); a pid with its start time does.
Only /proc/PID/stat is read: it never blocks on a process's memory map lock (cmdline and
status can, for a process stuck in the kernel), and one read gives every field needed.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import subprocess
from collections.abc import Collection

import msgspec

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Two start times name the same process when they differ by less than half a clock tick
#: (start times are whole ticks; this absorbs float rounding only).
START_TIME_TOLERANCE_S = 0.5 / CLOCK_TICKS
#: Task states of a process that has ended: a zombie (not reaped yet) or dead.
ENDED_STATES = frozenset({"Z", "X"})


class ProcessInfo(msgspec.Struct, frozen=True):
    """One process as seen from outside.

    start_time is in seconds since boot; with pid it names the process uniquely
    (a recycled pid has a later start_time). cpu_seconds is user + system time. pgid is
    its process group, inherited by every fork and kept when the process is orphaned.
    child_faults is the page faults of the children it reaped (cminflt + cmajflt), kept
    across an exec: it rises when the process reaps a child that ran.
    """

    pid: int
    ppid: int
    comm: str
    state: str
    rss_bytes: int
    start_time: float
    cpu_seconds: float
    threads: int
    pgid: int
    child_faults: int = 0  # (an agent before it sends none)


def parse_stat(text: str) -> ProcessInfo:
    """Parse the text of /proc/PID/stat.

    comm sits in parentheses and may itself contain spaces and ')', so the fixed fields
    are those after the LAST ')'. Raises ValueError on text that is not a stat line.
    """
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state) of proc(5); field n is rest[n - 3].
    return ProcessInfo(
        pid=int(text[:open_paren]),
        ppid=int(rest[1]),
        comm=text[open_paren + 1 : close_paren],
        state=rest[0],
        rss_bytes=int(rest[21]) * PAGE_SIZE,
        start_time=int(rest[19]) / CLOCK_TICKS,
        cpu_seconds=(int(rest[11]) + int(rest[12])) / CLOCK_TICKS,
        threads=int(rest[17]),
        pgid=int(rest[2]),
        child_faults=int(rest[8]) + int(rest[10]),
    )


def read_process(pid: int) -> ProcessInfo | None:
    """The ProcessInfo of `pid`, or None when it does not exist (or vanished)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:  # exited between open and read
        return None
    finally:
        os.close(fd)
    return parse_stat(data.decode(errors="replace"))


def young_threads(pid: int, since: float, max_reads: int) -> tuple[int, int]:
    """(threads of `pid` other than its first started at or after `since`, seconds since
    boot; /proc stat files read): each thread's, at most `max_reads`. Not by thread id:
    ids wrap at pid_max (32,768 on many hosts), so a young thread's may be the lower."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    except OSError:  # gone
        return 0, 0
    young = reads = 0
    for tid in tids[:max_reads]:
        reads += 1
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                text = f.read(4096).decode(errors="replace")
        except OSError:  # that thread ended meanwhile
            continue
        young += parse_stat(text).start_time >= since
    return young, reads


def unreaped_children(pid: int, live: Collection[int], max_reads: int) -> tuple[int, int]:
    """(children of `pid` not in `live`, /proc files read): with `live` the processes of
    its cgroup, its zombies (an exited process leaves cgroup.procs at once, and holds its
    pid until its parent reaps it). Every thread's children (a thread forks for itself),
    the first thread's first; at most `max_reads` reads."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:  # gone
        return 0, 0
    if pid in tids:
        tids.remove(pid)
        tids.insert(0, pid)
    unreaped = reads = 0
    for tid in tids[:max_reads]:
        reads += 1
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children = f.read().split()
        except OSError:
            continue
        unreaped += sum(1 for c in children if int(c) not in live)
    return unreaped, reads


def installed_exe(pid: int) -> tuple[str, tuple[int, int]] | None:
    """(name, (st_dev, st_ino)) of the executable `pid` runs, None if unreadable or gone.

    The name is the file's base name, and only for an *installed* executable: owned by
    root (as the reader sees it) and not writable by group or others. A process chooses
    its comm (prctl), and can copy itself to any file name it can write; it cannot make
    a root-owned file. "" for any other executable (the identity is still given)."""
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
        target = os.readlink(path)
    except OSError:  # gone, a kernel thread, or not ours to read
        return None
    installed = st.st_uid == 0 and not st.st_mode & 0o022 and not target.endswith(" (deleted)")
    return (os.path.basename(target) if installed else ""), (st.st_dev, st.st_ino)


#: Executables larger than this are not hashed (exe_sha256 gives "").
EXE_HASH_MAX_BYTES = 256 << 20
_EXE_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_EXE_DIGESTS_MAX = 1024
_BY_PROCESS: dict[tuple, str] = {}  # (pid, identity) -> digest, the argv[0] way
_BY_PROCESS_MAX = 8192


def exe_sha256(pid: int, identity: tuple | None = None, *, via_cmdline: bool = True) -> str | None:
    """The sha256 (hex) of the executable `pid` runs; "" when unknown or over
    EXE_HASH_MAX_BYTES. Read through /proc/PID/exe; where that is refused (a Landlocked
    reader, like the sealed agent: Landlock denies it the ptrace-mode access /proc/PID/exe
    needs to processes outside its domain), from the file the process's argv[0] names
    when that is an absolute path (/proc/PID/cmdline needs no such access; a process
    chooses its argv[0], so this names what it claims to run). Cached by the file's
    identity (device, inode, size, mtime): a fork bomb's members, or every process of one
    program, cost a stat each after the first read. `identity` (e.g. start time and comm,
    which an exec changes) caches the argv[0] way per process: its command line is read
    once, not at every table. `via_cmdline` false: None where only the command line would
    tell (reading it waits for the process's memory map lock, which a forking process
    holds: see agent/mmreads.py)."""
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
    except PermissionError:
        key = (pid, identity) if identity is not None else None
        if key is not None and (digest := _BY_PROCESS.get(key)) is not None:
            return digest
        if not via_cmdline:
            return None
        digest = _argv0_sha256(pid)
        if key is not None and digest:  # an unreadable one is tried again next time
            if len(_BY_PROCESS) >= _BY_PROCESS_MAX:
                _BY_PROCESS.clear()
            _BY_PROCESS[key] = digest
        return digest
    except OSError:
        return ""
    return _file_sha256(path, st)


def _argv0_sha256(pid: int) -> str:
    path = _argv0(pid)
    if path is None:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return _file_sha256(path, st)


def _file_sha256(path: str, st: os.stat_result) -> str:
    """The sha256 of the file at `path` (stat `st`), cached by its identity."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if (digest := _EXE_DIGESTS.get(key)) is not None:
        return digest
    if st.st_size > EXE_HASH_MAX_BYTES:
        return ""
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""
    if len(_EXE_DIGESTS) >= _EXE_DIGESTS_MAX:
        _EXE_DIGESTS.clear()
    _EXE_DIGESTS[key] = digest
    return digest


def read_cmdline(pid: int, max_bytes: int = 1024, max_args: int = 32) -> list[str]:
    """The command line of `pid` (at most `max_bytes`, `max_args` arguments; [] when gone,
    a kernel thread or unreadable). Reading it waits for the process's memory map lock,
    which a process holds through each of its forks: frozen processes hold none; of a
    running fork bomb's processes, a read waited 16 s (measured; agent/mmreads.py)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            head = f.read(max_bytes)
    except OSError:
        return []
    args = head.split(b"\0")
    if args and args[-1] == b"":
        args.pop()
    return [a.decode(errors="replace") for a in args[:max_args]]


def _argv0(pid: int) -> str | None:
    """The absolute path `pid`'s argv[0] names, None when it is relative or unreadable."""
    args = read_cmdline(pid, 4096, 1)
    return args[0] if args and args[0].startswith("/") else None


def running(state: str) -> bool:
    """Whether a process in task `state` still runs (not a zombie, not dead)."""
    return state not in ENDED_STATES


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    info = read_process(pid)
    return info is not None and running(info.state)


def same_start(start_time: float, other: float) -> bool:
    """Whether two start times (seconds since boot) are those of one process."""
    return abs(start_time - other) < START_TIME_TOLERANCE_S


def is_same(pid: int, start_time: float) -> bool:
    """True if the process that started at `start_time` as `pid` still runs (its pid was
    not recycled since)."""
    info = read_process(pid)
    return info is not None and running(info.state) and same_start(info.start_time, start_time)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout (stripped), or '' if it exits or stays silent past
    `timeout`: how a started program says it is ready."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return proc.stdout.readline().decode().strip()
    finally:
        sel.close()

"""The process table of a node, read from /proc/PID/stat without the processes' help.

Only /proc/PID/stat is read: it never blocks on a process's memory map lock (cmdline and
status can, for a process stuck in the kernel), and one read gives every field needed.
Parsing it directly measured faster than psutil for a node-sized table (see the nodes
tests and the package report).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import msgspec

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcessInfo(msgspec.Struct, frozen=True):
    """One process as the agent sees it from outside.

    start_time is in seconds since boot; with pid it names the process uniquely
    (a recycled pid has a later start_time). cpu_seconds is user + system time.
    """

    pid: int
    ppid: int
    comm: str
    state: str
    rss_bytes: int
    start_time: float
    cpu_seconds: float
    threads: int


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


def process_table(pids: Iterable[int]) -> list[ProcessInfo]:
    """ProcessInfo of each of `pids` still alive, in pid order; vanished ones are left out."""
    table = []
    for pid in sorted(set(pids)):
        info = read_process(pid)
        if info is not None:
            table.append(info)
    return table


def subtree(table: Iterable[ProcessInfo], pid: int) -> set[int]:
    """`pid` and all its descendants found in `table` (following ppid links)."""
    children: dict[int, list[int]] = {}
    for info in table:
        children.setdefault(info.ppid, []).append(info.pid)
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, ()))
    return found

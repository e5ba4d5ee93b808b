"""The process table of a node: the processes of a set of pids, and subtrees of it.

Each process is read from /proc/PID/stat by `common.procs` (never blocking on a stuck
process). Parsing it directly measured faster than psutil for a node-sized table (see the
nodes tests and the package report).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from backdoors.common.procs import ProcessInfo, read_process


def process_table(pids: Iterable[int]) -> list[ProcessInfo]:
    """ProcessInfo of each of `pids` still alive, in pid order; vanished ones are left out."""
    table = []
    for pid in sorted(set(pids)):
        info = read_process(pid)
        if info is not None:
            table.append(info)
    return table


def subtree(table: Iterable[ProcessInfo], pid: int,
            spare: Collection[int] = ()) -> set[int]:
    """`pid` and all its descendants found in `table` (following ppid links), but for
    the processes in `spare` (pids) and their own descendants."""
    children: dict[int, list[int]] = {}
    for info in table:
        if info.pid not in spare:
            children.setdefault(info.ppid, []).append(info.pid)
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, ()))
    return found

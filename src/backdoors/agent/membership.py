"""Which cgroup a process is in, per hierarchy: the basis of "a node registers only for itself".

/proc/PID/cgroup has one line per hierarchy, "ID:CONTROLLERS:PATH" ("0::PATH" for v2).
A Layout names its hierarchies by controller ("memory", "freezer", ...) or "unified".
"""

from __future__ import annotations

import os

from ..common.ipc import ready
from ..nodes import Layout
from ..nodes.hierarchies import UNIFIED


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller name (or "unified" for the v2 line) -> path, from /proc/PID/cgroup text."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hid == "0" and controllers == "":
            out[UNIFIED] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def read_cgroups(pid: int | str) -> dict[str, str]:
    """parse_proc_cgroup of a live process; OSError if it is gone."""
    with open(f"/proc/{pid}/cgroup", "rb", buffering=0) as f:
        return parse_proc_cgroup(f.read(65536).decode(errors="replace"))


def paths_in(layout: Layout, cgroups: dict[str, str]) -> dict[str, str]:
    """The paths of `cgroups` for each hierarchy of `layout` (missing ones left out)."""
    return {h: cgroups[h] for h in layout.hierarchies() if h in cgroups}


def misplaced(layout: Layout, cgroups: dict[str, str], relpath: str) -> tuple[str, str] | None:
    """The first hierarchy of `layout` (its name, and the process's path there: "?" if it
    has none) where the process is not in cgroup `relpath` or below; None if it is in all."""
    top = "/" + relpath.strip("/")
    for hierarchy in layout.hierarchies():
        path = cgroups.get(hierarchy)
        if path is None or not (path == top or path.startswith(top + "/")):
            return hierarchy, path or "?"
    return None


def outside_message(pid: int, node: str, cgroup_dirs: dict[str, object],
                    wrong: tuple[str, str], relpath: str) -> str:
    """Why process `pid` is not in node `node`, naming the hierarchy, and how to fix it."""
    hierarchy, where = wrong
    name = "cgroup v2 (unified)" if hierarchy == UNIFIED else f"{hierarchy} (cgroup v1)"
    files = ", ".join(f"{d}/cgroup.procs" for d in cgroup_dirs.values())
    return (f"process {pid} is not inside node {node}: it is in cgroup {where!r} of the "
            f"{name} hierarchy, not "
            f"{'/' + relpath.strip('/')!r}: start it with `backdoors node run {node} -- CMD`, "
            f"or write its pid to the node's cgroup.procs in every hierarchy ({files})")


def outsider(node, pid: int) -> str | None:
    """Why process `pid` (as this agent's PID namespace sees it) is not inside `node` (a
    nodes.Node), or None if it is: before the agent hands a node's sessions to whatever
    listens at the node's adoption socket, the listener must be one of the node's own
    processes in every hierarchy (a socket path is a name anyone able to write it, or to
    place a symlink there, can answer at). The pid is checked again after reading its
    cgroups, via a pidfd, so a recycled pid is noticed."""
    if pid <= 0:
        return f"the listener's pid is not visible to the agent (pid {pid})"
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return f"the listener (pid {pid}) has exited"
    try:
        cgroups = read_cgroups(pid)
        if ready(pidfd):
            return f"the listener (pid {pid}) exited during the check"
    except OSError:
        return f"the listener (pid {pid}) has exited"
    finally:
        os.close(pidfd)
    if (wrong := misplaced(node.cgroup.layout, cgroups, node.cgroup.relpath)) is not None:
        hierarchy, where = wrong
        return (f"the listener (pid {pid}) is not inside node {node.name} (cgroup {where!r} "
                f"of the {hierarchy} hierarchy, not {'/' + node.cgroup.relpath.strip('/')!r})")
    return None



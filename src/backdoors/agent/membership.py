"""Which cgroup a process is in, per hierarchy: the basis of "a node registers only for itself".

/proc/PID/cgroup has one line per hierarchy, "ID:CONTROLLERS:PATH" ("0::PATH" for v2).
A Layout names its hierarchies by controller ("memory", "freezer", ...) or "unified".
"""

from __future__ import annotations

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


def is_member(layout: Layout, cgroups: dict[str, str], relpath: str) -> bool:
    """True if the process is in cgroup `relpath` (or below) in every hierarchy of `layout`."""
    top = "/" + relpath.strip("/")
    for hierarchy in layout.hierarchies():
        path = cgroups.get(hierarchy)
        if path is None or not (path == top or path.startswith(top + "/")):
            return False
    return True

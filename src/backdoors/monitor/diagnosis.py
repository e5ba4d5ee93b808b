"""Diagnosis units: from a node's externalized state to a culprit, with the evidence.

Each unit (a Diagnosis subclass) `run`s itself over the response's Context: it fetches
the agent's process table (rows with pid, ppid, comm, state, rss_bytes, start_time,
age_s, rss_rate, registered, ...) and hands it to a pure function of this module, tested
over synthetic tables. A unit declares what it `provides` to the actions ("culprits",
"lineage") and may refine the onset the detectors gave. A Finding names its culprits by
(pid, start_time), which the agent checks again before it kills, so a pid reused since
the diagnosis is never hit.

To add a diagnosis: a Diagnosis subclass with `tag=`, its `run`, listed in DIAGNOSES.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Annotated, Any, ClassVar, Union

import msgspec

from ..common.procs import running
from ..agent.protocol import ProcessRow as Row  # the agent's process table rows
from ..sensors import KERNEL_BOX, SensorType
from .context import Context
from .detectors import Hit, NodeView, SensorHistory
from .unit import NonNeg, Pos, Unit

MiB = 1 << 20

STATE_MEANING = {
    "R": "running: busy but not progressing (a livelock or a busy loop)",
    "S": "sleeping: waiting and not progressing (a deadlock, or waiting for something that never comes)",
    "D": "in uninterruptible sleep: stuck in the kernel (I/O, a lock, memory reclaim)",
    "T": "stopped by a signal",
    "t": "stopped by a tracer",
    "Z": "a zombie: it died and was not reaped",
    "X": "dead",
}

#: What a diagnosis may provide to the actions, and how an error message says it.
CAPABILITIES = {"culprits": "names a culprit", "lineage": "finds a fork bomb's lineage"}


class Target(msgspec.Struct, frozen=True):
    """A process to act on, named so that a reused pid is refused."""

    pid: int
    start_time: float
    comm: str
    exe: str = ""  # its installed executable's name, as the agent's table showed it


class Finding(msgspec.Struct):
    """What a diagnosis unit concluded: culprits (maybe none) and the evidence."""

    kind: str
    summary: str
    culprits: list[Target] = []
    evidence: dict[str, Any] = {}


def _target(p: Row) -> Target:
    return Target(p.pid, p.start_time, p.comm, p.exe)


def _brief(p: Row) -> dict[str, Any]:
    return {"pid": p.pid, "comm": p.comm, "state": p.state, "rss_mb": round(p.rss_bytes / MiB, 1),
            "rate_mb_s": round(p.rss_rate / MiB, 2), "age_s": round(p.age_s, 2),
            "registered": p.registered}


def culprit_identity(rows: Iterable[Row]) -> dict[str, Any] | None:
    """What the culprit runs, for a warning to other clusters (monitor/warning.py): the
    sha256 of its executable (as the agent read it), its comm and installed name; of
    several rows (a fork bomb), their most common (hash, comm), with its count. None when
    no row has a hash."""
    counts: dict[tuple[str, str, str], int] = {}
    cmdlines: dict[tuple[str, str, str], list[str]] = {}
    for p in rows:
        if p.exe_sha256:
            k = (p.exe_sha256, p.comm, p.exe)
            counts[k] = counts.get(k, 0) + 1
            if p.cmdline and k not in cmdlines:
                cmdlines[k] = list(p.cmdline)
    if not counts:
        return None
    k, n = max(counts.items(), key=lambda kv: kv[1])
    return {"exe_sha256": k[0], "comm": k[1], "exe": k[2], "count": n,
            "cmdline": cmdlines.get(k, [])}


def culprit_of(finding: Finding) -> dict[str, Any] | None:
    """The culprit identity a finding carries (a memory hog's, or a fork bomb's lineage's)."""
    ev = finding.evidence or {}
    c = ev.get("culprit")
    if c is None and isinstance(ev.get("lineage"), dict):
        c = ev["lineage"].get("culprit")
    return c if isinstance(c, dict) and c.get("exe_sha256") else None


def _protected_comm(p: Row, patterns: Iterable[str]) -> bool:
    """`protect_comms` matches the installed executable the agent vouches for (`exe`),
    never the comm, which any process sets for itself."""
    return bool(p.exe) and any(fnmatch.fnmatchcase(p.exe, pat) for pat in patterns)


# ---- memory hog ------------------------------------------------------------------------


def memory_hog(cfg: MemoryHogDiagnosis, table: Sequence[Row],
               node_memory_mb: float | None = None) -> Finding:
    """The process responsible for the growth: the highest RSS growth rate, at least
    `min_rate_mb_s`; never a registered service or a protected comm, never chosen for
    its size. No culprit (and no kill) when nothing grows.

    A hog can also grow by forking: each child allocates and holds, none grows for long
    (and one born since the agent's last table shows no rate at all). So a process born
    within `born_s` counts its RSS as growth over that time, and a process's *family*
    grows by its own rate and its unprotected descendants'. A family with at least
    `born_min` members born so (a forking pattern: a pool that replaced one worker is
    not one; a forked child's RSS counts pages it shares with its parent, so one such
    child says little) that outgrows the fastest single process is the culprit, all of
    it, from its head: the process whose family grows fastest, not one of whose
    children holds `family_share` of that growth (down the tree to where the growth
    splits: the forker, not its shell). Never the node's first process, nor an ancestor of
    a registered service.

    A hog can also spread over processes that each grow too slowly to be one and that
    make no family (orphans: double-forked, setsid). So the free processes of one kind
    (an executable and comm, `_kind`) that grow, at least `kin_min` of them, are the
    culprit together when they outgrow the fastest single process, with what of their
    kind was born with them (`_growing_kin`)."""
    alive = [p for p in table if running(p.state)]
    by_rate = sorted(alive, key=lambda p: p.rss_rate, reverse=True)
    eligible = [p for p in by_rate if not p.registered and not _protected_comm(p, cfg.protect_comms)]
    largest = max(alive, key=lambda p: p.rss_bytes, default=None)
    evidence = {
        "by_growth": [_brief(p) for p in by_rate[: cfg.top]],
        "largest": _brief(largest) if largest else None,
        "min_rate_mb_s": cfg.min_rate_mb_s,
        "total_rss_mb": round(sum(p.rss_bytes for p in alive) / MiB, 1),
    }
    free = _free(cfg, alive)
    family = _growing_family(cfg, free)
    top = eligible[0] if eligible else None
    if family is not None and family[1] > max(top.rss_rate if top else 0.0,
                                              cfg.min_rate_mb_s * MiB):
        head, rate, members = family
        evidence["family"] = {**_brief(head), "members": len(members),
                              "rate_mb_s": round(rate / MiB, 1),
                              "rss_mb": round(sum(p.rss_bytes for p in members) / MiB, 1)}
        evidence["culprit"] = culprit_identity(members)
        return Finding("memory_hog", f"{head.comm} (pid {head.pid}) and its {len(members) - 1} "
                       f"descendants grow {rate / MiB:.1f} MB/s together, now "
                       f"{evidence['family']['rss_mb']:.0f} MB (processes born with their "
                       "memory)", [_target(p) for p in members], evidence)
    kin = _growing_kin(cfg, free)
    if kin is not None and kin[0] >= cfg.min_rate_mb_s * MiB and kin[0] > (
            top.rss_rate if top else 0.0):
        rate, members = kin
        (exe, comm), growing = _kind(members[0]), sum(1 for p in members if p.rss_rate > 0)
        rss_mb = round(sum(p.rss_bytes for p in members) / MiB, 1)
        evidence["kin"] = {"exe": exe, "comm": comm, "members": len(members),
                           "growing": growing, "rate_mb_s": round(rate / MiB, 1), "rss_mb": rss_mb}
        evidence["culprit"] = culprit_identity(members)
        fastest = max(p.rss_rate for p in members)
        return Finding("memory_hog", f"{growing} processes of {comm}{f' ({exe})' if exe and exe != comm else ''} "
                       f"grow {rate / MiB:.1f} MB/s together (the fastest {fastest / MiB:.1f} "
                       f"alone), now {rss_mb:.0f} MB with {len(members) - growing} more of "
                       "their kind (a hog spread over processes)",
                       [_target(p) for p in members], evidence)
    if top is None or top.rss_rate < cfg.min_rate_mb_s * MiB:
        grower = by_rate[0] if by_rate else None
        if grower is not None and grower.registered and grower.rss_rate >= cfg.min_rate_mb_s * MiB:
            return Finding("memory_hog", f"the service itself, {grower.comm} (pid {grower.pid}), "
                           f"grows {grower.rss_rate / MiB:.1f} MB/s: it holds the sessions, so it "
                           "is not killed; nothing else to repair", [], evidence)
        return Finding("memory_hog", "no process grows faster than "
                       f"{cfg.min_rate_mb_s:g} MB/s: no culprit{_unmapped(evidence, node_memory_mb)}",
                       [], evidence)
    evidence["culprit"] = culprit_identity([top])
    note = "" if largest is None or largest.pid == top.pid else (
        f"; the largest process is {largest.comm} ({largest.pid}, "
        f"{largest.rss_bytes / MiB:.0f} MB), stable or slower")
    return Finding("memory_hog", f"{top.comm} (pid {top.pid}) grows {top.rss_rate / MiB:.1f} MB/s, "
                   f"now {top.rss_bytes / MiB:.0f} MB{note}", [_target(top)], evidence)


def _unmapped(evidence: dict[str, Any], node_mb: float | None) -> str:
    """What the summary says when the node's memory is mostly not its processes' RSS:
    shared memory no process maps (a memfd or tmpfs file written, not mapped) or page
    cache; a process table cannot tell whose (the sealed agent may not read other
    processes' descriptors)."""
    if node_mb is None:
        return ""
    evidence["node_memory_mb"] = round(node_mb, 1)
    if evidence["total_rss_mb"] >= node_mb / 2:
        return ""
    return (f"; the processes' RSS is {evidence['total_rss_mb']:.0f} MB of the node's "
            f"{node_mb:.0f} MB: the rest is memory no process maps (shared memory written "
            "to a memfd or a tmpfs file, or page cache), whose holder a process table does "
            "not show")


def _free(cfg: MemoryHogDiagnosis, alive: Sequence[Row]) -> dict[int, Row]:
    """The processes a memory hog's repair may kill, by pid: never a registered service,
    a protected comm, the node's first process nor a service's keeper (killing either
    ends it)."""
    first, keepers = first_process(alive), _keepers(alive, {p.pid: p for p in alive})
    return {p.pid: p for p in alive if not p.registered and p.pid not in keepers
            and p is not first and not _protected_comm(p, cfg.protect_comms)}


def _growing_kin(cfg: MemoryHogDiagnosis, free: dict[int, Row]
                 ) -> tuple[float, list[Row]] | None:
    """(growth in bytes/s, members oldest first) of the kind (see `_kind`) whose free
    processes grow fastest together, if at least `kin_min` of them grow: a hog spread
    over processes each too slow to be one, orphans (double-forked, setsid) that make no
    family. With them, the kind's free processes born from `kin_gap_s` before the oldest
    grower on, and older ones that reaped a child since it was born (what starts them: a
    spawner that would start more, reaping the middle child of each double fork, however
    long it took to start); not other older ones (an innocent of the same kind that ran
    before). None if no kind has so many growers."""
    growing: dict[tuple[str, str], list[Row]] = {}
    for p in free.values():
        if p.rss_rate > 0:
            growing.setdefault(_kind(p), []).append(p)
    kind, members = max(growing.items(), key=lambda kv: sum(p.rss_rate for p in kv[1]),
                        default=(None, []))
    if len(members) < cfg.kin_min:
        return None
    first = max(p.age_s for p in members)
    members += [p for p in free.values() if p.rss_rate <= 0 and _kind(p) == kind and (
        p.age_s <= first + cfg.kin_gap_s or p.reaped_s is not None and p.reaped_s <= first)]
    return (sum(p.rss_rate for p in members),
            sorted(members, key=lambda p: (-p.age_s, p.pid)))


def _growing_family(cfg: MemoryHogDiagnosis, free: dict[int, Row]
                    ) -> tuple[Row, float, list[Row]] | None:
    """(head, growth in bytes/s, members head first) of the fastest-growing family of
    free processes (`_free`) with more than one member (see memory_hog); None if none."""
    def growth(p: Row) -> float:
        return max(p.rss_rate, p.rss_bytes / cfg.born_s if p.age_s < cfg.born_s else 0.0)

    children: dict[int, list[Row]] = {}
    for p in free.values():
        children.setdefault(p.ppid, []).append(p)
    # a reaper (an init, a subreaper) that inherited orphans heads no family: none of its
    # children runs its program or is in its group (a forker's children do one or the
    # other: a fork keeps both), and killing a pid namespace's init ends the whole node
    reapers = {pid for pid, kids in children.items() if pid in free and not any(
        _kind(c) == _kind(free[pid]) or 0 < c.pgid == free[pid].pgid for c in kids)}
    for pid in reapers:  # its children: each a root of its own
        del children[pid]
    free = {pid: p for pid, p in free.items() if pid not in reapers}
    total: dict[int, float] = {}

    def family_rate(p: Row) -> float:  # iterative: a fork bomb's tree may be deep
        order, todo = [], [p]
        while todo:
            cur = todo.pop()
            order.append(cur)
            todo.extend(c for c in children.get(cur.pid, ()) if c.pid not in total)
        for cur in reversed(order):
            total[cur.pid] = growth(cur) + sum(total[c.pid] for c in children.get(cur.pid, ()))
        return total[p.pid]

    roots = [p for p in free.values() if p.ppid not in free]
    best = max(roots, key=family_rate, default=None)
    if best is None or not children.get(best.pid):
        return None
    head = best
    while True:  # down to where the growth splits
        kids = children.get(head.pid, ())
        lead = max(kids, key=lambda c: total[c.pid], default=None)
        if lead is None or total[lead.pid] < cfg.family_share * total[head.pid]:
            break
        head = lead
    members, todo = [], [head]
    while todo:
        cur = todo.pop()
        members.append(cur)
        todo.extend(children.get(cur.pid, ()))
    if sum(1 for p in members if p.age_s < cfg.born_s) < cfg.born_min:
        return None  # not a forking pattern: the single-process rule decides
    return head, total[head.pid], members


def largest_rss(cfg: LargestRssDiagnosis, table: Sequence[Row]) -> Finding:
    """Baseline (kernel OOM killer, earlyoom): the largest resident process."""
    alive = [p for p in table if running(p.state)
             and not (cfg.protect_registered and p.registered)]
    by_size = sorted(alive, key=lambda p: p.rss_bytes, reverse=True)
    evidence = {"by_size": [_brief(p) for p in by_size[: cfg.top]]}
    if not by_size:
        return Finding("largest_rss", "no process", [], evidence)
    top = by_size[0]
    return Finding("largest_rss", f"{top.comm} (pid {top.pid}) is the largest, "
                   f"{top.rss_bytes / MiB:.0f} MB", [_target(top)], evidence)


# ---- fork bomb -------------------------------------------------------------------------


def first_process(table: Sequence[Row]) -> Row | None:
    """The node's first process: the oldest one whose parent is outside the node."""
    pids = {p.pid for p in table}
    roots = [p for p in table if p.ppid not in pids]
    return min(roots, key=lambda p: (p.start_time, p.pid), default=None)


def _kind(p: Row) -> tuple[str, str]:
    """What a process runs, as far as the table tells without blocking: the installed
    executable and the comm (a bomb's members share both: a fork keeps them, and an exec
    sets both anew). /proc/PID/cmdline is not read: it can block on a process's memory."""
    return p.exe, p.comm


def _keepers(table: Sequence[Row], by_pid: dict[int, Row]) -> set[int]:
    """The ancestors of registered services: they run them (a container's PID 1, its exec
    shim, a supervisor), and killing one would take the service down too."""
    keepers: set[int] = set()
    for p in table:
        parent = by_pid.get(p.ppid) if p.registered else None
        while parent is not None and parent.pid not in keepers:
            keepers.add(parent.pid)
            parent = by_pid.get(parent.ppid)
    return keepers


def bomb_lineage(table: Sequence[Row], young_age_s: float, protect_comms: Iterable[str] = (),
                 old_ancestor_min_children: int = 3, kin_min_young: int = 3,
                 kin_gap_s: float = 2.0, task_share: float = 0.25,
                 spared_before: Collection[int] = ()) -> tuple[list[Row], dict[str, Any]]:
    """The fork bomb in a (frozen) node's table: live processes born within the last
    `young_age_s` seconds (since onset), plus their ancestors in the node up to, but
    excluding, any protected one (a registered service or one of its ancestors, the node's
    first process if older than onset, a protected comm). An ancestor older than onset
    joins only if at least `old_ancestor_min_children` of its children are young and of
    its own kind (see `_kind`) or in its process group: a bomb forks itself, a spawner
    starts another program in its group (a fork keeps it: a shell without job control,
    subprocess), while an init or a subreaper that a bomb's orphans were reparented to
    runs another program and leads another group (killing the node's PID 1 would end
    the node). One spared so before (`spared_before`, the pids of an earlier attempt's)
    that has as many young children again joins whatever their kind: a reaper inherits
    orphans from forkers that were killed, a spawner (one that gives each child a session
    of its own) makes new ones.

    The onset can come late (under load a bomb grows in fits, and its count of tasks
    pauses), and a bomb's processes need not stay in one tree (orphans go to the node's
    init). So the bomb also takes its kin: a *bomb kind* is an executable and comm (see
    `_kind`) shared by at least `kin_min_young` young members. Another live process of
    such a kind joins when
    - at least `old_ancestor_min_children` members descend from it (young children or
      not): an older generation;
    - it was born after the bomb's oldest member so far, or within `kin_gap_s` before
      one (a bomb is born as a burst; an innocent of the same kind started well before
      it is not);
    - or it is in the process group of at least `kin_min_young` young members of its
      kind, a group no protected process leads: a fork keeps the group and so does an
      orphan, which ties a double-forking bomb's orphans to a forker that ran a while
      before it began.
    Last, what its members started since its oldest young or kin member joins (a `sleep`
    its processes exec'd), and so does a process that holds at least `task_share` of the
    node's tasks (and `kin_min_young`) as threads it started since onset or exited
    children it does not reap (its `young_threads` and `unreaped`: the table must be read
    with threads_within_s): a thread bomb, a spawner whose children exit or were killed.
    Protected processes are never part of it, whatever their age or kind."""
    by_pid = {p.pid: p for p in table}
    first = first_process(table)
    protect_comms = list(protect_comms)
    keepers = _keepers(table, by_pid)

    def protected(p: Row) -> bool:
        return p.registered or p.pid in keepers or (
            first is not None and p.pid == first.pid and p.age_s > young_age_s
        ) or _protected_comm(p, protect_comms)

    young = [p for p in table if p.age_s <= young_age_s and running(p.state)
             and not protected(p)]
    # of the parent's own kind (a bomb forks itself) or in its process group (a spawner
    # starts another program; a subreaper's inherited orphans are in their own group)
    young_children: dict[int, int] = {}
    for p in young:
        parent = by_pid.get(p.ppid)
        if parent is not None and (_kind(parent) == _kind(p) or 0 < parent.pgid == p.pgid
                                   or parent.pid in spared_before):
            young_children[p.ppid] = young_children.get(p.ppid, 0) + 1
    lineage: dict[int, Row] = {p.pid: p for p in young}
    held_back: list[Row] = []
    for p in young:
        parent = by_pid.get(p.ppid)
        while parent is not None and parent.pid not in lineage and not protected(parent):
            if parent.age_s > young_age_s and young_children.get(
                    parent.pid, 0) < old_ancestor_min_children:
                held_back.append(parent)
                break
            lineage[parent.pid] = parent
            parent = by_pid.get(parent.ppid)
    kin = _bomb_kin(table, lineage, young, protected, by_pid, kin_min_young,
                    old_ancestor_min_children, kin_gap_s)
    lineage.update((p.pid, p) for p in kin)
    spawn = _bomb_spawn(table, lineage, [*young, *kin], protected)
    lineage.update((p.pid, p) for p in spawn)
    alive = [p for p in table if running(p.state)]
    tasks = sum(p.threads + p.unreaped for p in alive)  # pids.current, as the rows tell
    holders = sorted((p for p in alive if p.young_threads or p.unreaped),
                     key=lambda p: -(p.young_threads + p.unreaped))
    least = max(kin_min_young, task_share * tasks)
    holding = [p for p in holders if p.pid not in lineage and not protected(p)
               and p.young_threads + p.unreaped >= least]
    lineage.update((p.pid, p) for p in holding)
    held_back = [p for p in held_back if p.pid not in lineage]
    spared = [p for p in table if p.pid not in lineage]
    comms: dict[str, int] = {}
    for p in lineage.values():
        comms[p.comm] = comms.get(p.comm, 0) + 1
    evidence = {
        "young_age_s": round(young_age_s, 3),
        "bomb_processes": len(lineage),
        "young": len(young),
        "ancestors": len(lineage) - len(young),
        "comms": dict(sorted(comms.items(), key=lambda kv: -kv[1])[:5]),
        "spared": [_brief(p) for p in sorted(spared, key=lambda p: p.pid)[:10]],
        "spared_count": len(spared),
        "old_parents_spared": sorted({p.pid for p in held_back}),
        "kin": len(kin),
        "spawn": len(spawn),
        "kinds": sorted({f"{p.exe or '?'}:{p.comm}" for p in kin})[:5],
        "holding": len(holding),
        "holding_min": round(least, 1),
        "holders": [{**_brief(p), "young_threads": p.young_threads, "unreaped": p.unreaped,
                     "protected": protected(p)} for p in holders[:5]],
        "first_process": first.pid if first else None,
        "culprit": culprit_identity(lineage.values()),
    }
    return sorted(lineage.values(), key=lambda p: p.pid), evidence


def _bomb_kin(table: Sequence[Row], lineage: dict[int, Row], young: Sequence[Row],
              protected: Callable[[Row], bool], by_pid: dict[int, Row], min_young: int,
              min_descendants: int, gap_s: float) -> list[Row]:
    """The processes of the bomb's kinds that its lineage missed (see bomb_lineage)."""
    counts: dict[tuple[str, str], int] = {}
    for p in young:
        counts[_kind(p)] = counts.get(_kind(p), 0) + 1
    kinds = {k for k, n in counts.items() if n >= min_young}
    if not kinds:
        return []
    groups: dict[tuple[tuple[str, str], int], int] = {}  # (kind, pgid) -> young members
    for p in young:
        leader = by_pid.get(p.pgid)
        if _kind(p) in kinds and p.pgid > 0 and not (leader and protected(leader)):
            groups[_kind(p), p.pgid] = groups.get((_kind(p), p.pgid), 0) + 1
    found: dict[int, Row] = {}

    def eligible(p: Row) -> bool:
        return (p.pid not in lineage and p.pid not in found and running(p.state)
                and _kind(p) in kinds and not protected(p))

    descendants: dict[int, int] = {}  # older generations: a fork keeps the kind
    for p in lineage.values():
        parent = by_pid.get(p.ppid)
        while parent is not None and eligible(parent):
            descendants[parent.pid] = descendants.get(parent.pid, 0) + 1
            parent = by_pid.get(parent.ppid)
    found.update((pid, by_pid[pid]) for pid, n in descendants.items() if n >= min_descendants)
    members = [p for p in (*lineage.values(), *found.values()) if _kind(p) in kinds]
    oldest = min(p.start_time for p in members)
    others = sorted((p for p in table if eligible(p)), key=lambda p: -p.start_time)
    for p in others:  # youngest first: each one taken extends the burst back
        if p.start_time >= oldest - gap_s:
            found[p.pid] = p
            oldest = min(oldest, p.start_time)
    # the bomb's process groups: a member found so does not extend the burst back
    found.update((p.pid, p) for p in others
                 if p.pid not in found and groups.get((_kind(p), p.pgid), 0) >= min_young)
    return sorted(found.values(), key=lambda p: p.pid)


def _bomb_spawn(table: Sequence[Row], lineage: dict[int, Row], core: Sequence[Row],
                protected: Callable[[Row], bool]) -> list[Row]:
    """What the bomb started that it missed: live descendants of its members born since
    its oldest young or kin member (`core`), e.g. the `sleep` a bomb's processes exec,
    which hold its pids after the forkers are killed."""
    if not core:
        return []
    since = min(p.start_time for p in core)
    children: dict[int, list[Row]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p)
    found: dict[int, Row] = {}
    todo = list(lineage)
    while todo:
        for c in children.get(todo.pop(), ()):
            if (c.pid not in lineage and c.pid not in found and running(c.state)
                    and c.start_time >= since and not protected(c)):
                found[c.pid] = c
                todo.append(c.pid)
    return sorted(found.values(), key=lambda p: p.pid)


def subtree_roots(lineage: Sequence[Row], table: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """Split the lineage into roots whose whole subtree is in the lineage (killable as a
    tree) and the remaining members to kill one by one."""
    members = {p.pid for p in lineage}
    children: dict[int, list[int]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p.pid)

    def whole(pid: int) -> bool:
        todo = [pid]
        while todo:
            cur = todo.pop()
            if cur not in members:
                return False
            todo.extend(children.get(cur, ()))
        return True

    roots = [p for p in lineage if p.ppid not in members and whole(p.pid)]
    covered: set[int] = set()
    for r in roots:
        todo = [r.pid]
        while todo:
            cur = todo.pop()
            covered.add(cur)
            todo.extend(children.get(cur, ()))
    return roots, [p for p in lineage if p.pid not in covered]


FORK_SENSORS = ((KERNEL_BOX, "forks"), (KERNEL_BOX, "fork_failures"), (KERNEL_BOX, "pids"))


def bomb_onset(history: SensorHistory, view: NodeView, onset: float,
               min_rise: float = 2.0) -> float:
    """The onset of a fork bomb: the earliest start of the latest rise of the kernel's
    fork counter, failed-fork counter or task count, whichever detector fired; `onset`
    (the detectors') if none rose. Only samples where a counter grew by at least
    `min_rise` make a rise: a service that forks a child now and then keeps the fork
    counter rising one at a time, which would date the bomb back to that service's start
    and make it, and whatever started since, look young (under load, a probe forking
    every 20 ms and the scenario's init were killed so). A bomb forks in bursts; what of
    it is born before a late onset joins as its kin (bomb_lineage)."""
    times = []
    for key in FORK_SENSORS:
        t = history.rise_start(key, view.at, min_step=min_rise)
        if t is not None:
            times.append(t)
    return min(times, default=onset)


def fork_bomb(view: NodeView, hits: list[Hit], onset: float) -> Finding:
    """Before the lock: the onset and the fork sensors. The lineage itself is found by
    `bomb_lineage` once the node is frozen (see the lock_kill_lineage action)."""
    kernel = view.snapshots.get(KERNEL_BOX)
    sensors = {}
    if kernel is not None:
        for s in kernel.sensors:
            if s.name in ("forks", "fork_failures", "pids"):
                sensors[s.name] = s.rate if s.type == SensorType.PRESSURE else s.value
    return Finding("fork_bomb", f"fork pressure since {view.at - onset:.2f} s before detection; "
                   "the lineage is identified with the node locked",
                   [], {"onset_before_detection_s": round(view.at - onset, 3),
                        "kernel": sensors, "detectors": [h.summary for h in hits]})


# ---- hang ------------------------------------------------------------------------------


def hang(view: NodeView, hits: list[Hit], table: Sequence[Row],
         later: Sequence[Row] | None = None, interval_s: float = 0.0) -> Finding:
    """Which process is stuck and in what state; the whole node frozen or one process.

    The stuck process is the owner of each box whose progress sensor stalled (the owner
    pid the box carries), else the registered processes. `later`, a second table taken
    `interval_s` after `table`, tells a spinning process (CPU time moves) from a blocked
    one.
    """
    by_pid = {p.pid: p for p in table}
    cpu_later = {(p.pid, p.start_time): p.cpu_seconds for p in later or ()}
    stalled = [v for h in hits for v in h.violations if v.type == SensorType.PROGRESS]
    frozen_hit = any(h.kind == "node_frozen" for h in hits)
    live = [p for p in table if running(p.state)]
    all_stopped = bool(live) and all(p.state in ("T", "t") for p in live)
    owners: dict[int, list[str]] = {}
    for v in stalled:
        snap = view.snapshots.get(v.box)  # (an agent's violation event names the owner)
        pid = snap.owner_pid if snap is not None else (view.event or {}).get("owner_pid")
        if pid:
            owners.setdefault(pid, []).append(
                f"{v.box}/{v.sensor} (stalled {v.measure * 1000:.0f} ms, counter {v.value:.0f})")
    if not owners:
        for p in live:
            if p.registered:
                owners[p.pid] = []
    stuck, culprits, gone = [], [], []
    for pid, sensors in owners.items():
        p = by_pid.get(pid)
        if p is None:
            gone.append({"pid": pid, "sensors": sensors})
            continue
        entry = {"pid": p.pid, "comm": p.comm, "state": p.state,
                 "meaning": STATE_MEANING.get(p.state, "unknown state"),
                 "threads": p.threads, "cpu_seconds": round(p.cpu_seconds, 3),
                 "sensors": sensors}
        if (p.pid, p.start_time) in cpu_later and interval_s > 0:
            entry["cpu_share"] = round((cpu_later[(p.pid, p.start_time)] - p.cpu_seconds)
                                       / interval_s, 3)
        stuck.append(entry)
        culprits.append(_target(p))
    if frozen_hit or all_stopped:
        scope = "node"
        how = ("its cgroup is frozen and nobody holds the lock" if frozen_hit
               else f"every process of the node ({len(live)}) is stopped")
        summary = f"whole node frozen: {how}"
    elif gone and not stuck:
        scope = "process"
        summary = (f"the owner of the stalled sensors (pid {gone[0]['pid']}) is gone: "
                   "the service crashed")
    elif stuck:
        scope = "process"
        s = stuck[0]
        spin = ""
        if "cpu_share" in s:
            spin = " and spinning" if s["cpu_share"] > 0.2 else " and not using CPU"
        summary = (f"{s['comm']} (pid {s['pid']}) stopped progressing; state {s['state']} "
                   f"({s['meaning']}){spin}; {s['threads']} threads")
    else:
        scope = "unknown"
        summary = "progress stalled but no owner process could be found"
    states: dict[str, int] = {}
    for p in live:
        states[p.state] = states.get(p.state, 0) + 1
    evidence = {"scope": scope, "stuck": stuck, "gone": gone, "node_states": states,
                "node_frozen": bool(view.frozen), "processes": len(live)}
    return Finding("hang", summary, culprits, evidence)


# ---- the units -------------------------------------------------------------------------


class Diagnosis(Unit):
    """From the detection and the node's externalized state to a Finding."""

    #: what its Finding gives the actions (keys of CAPABILITIES)
    provides: ClassVar[frozenset[str]] = frozenset()

    def onset(self, history: SensorHistory, view: NodeView, onset: float) -> float:
        """The onset to respond with, from the detectors' `onset`: unchanged by default."""
        return onset

    def run(self, ctx: Context) -> Finding:
        """Diagnose; agent errors may propagate (the pipeline records them)."""
        raise NotImplementedError


def _table_noted(finding: Finding, table) -> Finding:
    if table.truncated:
        finding.evidence["table_truncated"] = {"shown": len(table.rows), "total": table.total}
    return finding


class MemoryHogDiagnosis(Diagnosis, tag="memory_hog"):
    """The culprit is the process growing fastest (rss_rate), never the largest as such.

    Processes growing slower than `min_rate_mb_s` are never chosen (no culprit at all if
    none grows); registered services and `protect_comms` never are. `top` candidates go
    to the evidence.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"culprits"})
    min_rate_mb_s: Pos = 1.0
    top: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    protect_comms: list[str] = []
    born_s: Pos = 1.0  # a process younger than this counts its RSS as growth over it
    born_min: Annotated[int, msgspec.Meta(ge=2)] = 3  # of them in a family that forks
    kin_min: Annotated[int, msgspec.Meta(ge=2)] = 4  # growing processes of one kind, none fast
    kin_gap_s: NonNeg = 2.0  # their kind's processes born this long before them join them
    family_share: Annotated[float, msgspec.Meta(gt=0.5, le=1)] = 0.8

    def run(self, ctx: Context) -> Finding:
        table = ctx.client.processes(ctx.node, cmdline=True)  # the culprit's, for a warning
        kernel = ctx.view.snapshots.get(KERNEL_BOX)
        memory = next((s.value for s in kernel.sensors if s.name == "memory_mb"), None) \
            if kernel is not None else None
        return _table_noted(memory_hog(self, table.rows, memory), table)


class ForkBombDiagnosis(Diagnosis, tag="fork_bomb"):
    """The bomb is the lineage created since onset, identified while the node is locked.

    Onset comes from the sensor history; processes younger than onset + `onset_slack_ms`
    and their unprotected ancestors are the bomb. An ancestor older than onset joins only
    with at least `old_ancestor_min_children` young children of its own kind alive (a
    shell that forks the bomb does; a service that started one helper, or the node's
    init that inherited the bomb's orphans, does not). Its kin join (same
    executable and comm as at least `kin_min_young` young members, born within
    `kin_gap_ms` of the bomb's burst): older generations and orphans a late onset or the
    node's init would hide. A retry takes an old parent spared before if it has as many
    young children again (a spawner). A process that holds `task_share` of the node's
    tasks as threads started since onset or unreaped children joins too (a thread bomb,
    a spawner whose children exited or were killed). Registered services, the
    node's first process and `protect_comms` are never part of it.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"lineage"})
    onset_slack_ms: NonNeg = 250.0
    onset_min_rise: Pos = 2.0
    old_ancestor_min_children: Annotated[int, msgspec.Meta(ge=1)] = 3
    kin_min_young: Annotated[int, msgspec.Meta(ge=1)] = 3
    kin_gap_ms: NonNeg = 2000.0
    task_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    protect_comms: list[str] = []

    def onset(self, history: SensorHistory, view: NodeView, onset: float) -> float:
        return bomb_onset(history, view, onset, self.onset_min_rise)

    def run(self, ctx: Context) -> Finding:
        return fork_bomb(ctx.view, ctx.hits, ctx.onset)

    def young_age_s(self, since_onset_s: float) -> float:
        """How old the bomb's processes and threads are at most, `since_onset_s` after
        its onset (a LineageFinder)."""
        return since_onset_s + self.onset_slack_ms / 1000

    def lineage(self, table: Sequence[Row], young_age_s: float, spared_before: Collection[int] = ()
                ) -> tuple[list[Row], dict[str, Any]]:
        """The bomb in a frozen node's table, read with threads_within_s=`young_age_s`."""
        return bomb_lineage(table, young_age_s, self.protect_comms,
                            self.old_ancestor_min_children, self.kin_min_young,
                            self.kin_gap_ms / 1000, self.task_share, spared_before)


class HangDiagnosis(Diagnosis, tag="hang"):
    """Which process is stuck, in what state; whole node frozen vs one process stalled.

    A second process table `sample_ms` later tells a spinning process from a blocked one
    (0: one table only).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"culprits"})
    sample_ms: NonNeg = 100.0

    def run(self, ctx: Context) -> Finding:
        table = ctx.client.processes(ctx.node)
        later, interval = None, 0.0
        if self.sample_ms > 0:
            t0 = ctx.clock()
            time.sleep(self.sample_ms / 1000)
            later = ctx.client.processes(ctx.node).rows
            interval = ctx.clock() - t0
        return _table_noted(hang(ctx.view, ctx.hits, table.rows, later, interval), table)


class LargestRssDiagnosis(Diagnosis, tag="largest_rss"):
    """Baseline policy (the kernel's and earlyoom's): the largest process is the culprit."""

    provides: ClassVar[frozenset[str]] = frozenset({"culprits"})
    top: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    protect_registered: bool = False

    def run(self, ctx: Context) -> Finding:
        table = ctx.client.processes(ctx.node)
        return _table_noted(largest_rss(self, table.rows), table)


class NoDiagnosis(Diagnosis, tag="none"):
    """No diagnosis: actions run on the detection alone."""

    def run(self, ctx: Context) -> Finding:
        return Finding("none", "no diagnosis configured",
                       evidence={"detectors": [h.summary for h in ctx.hits]})


# ---- registration ------------------------------------------------------------------------

DIAGNOSES = (MemoryHogDiagnosis, ForkBombDiagnosis, HangDiagnosis, LargestRssDiagnosis,
             NoDiagnosis)
DiagnosisUnit = Union[DIAGNOSES]  # the TOML `diagnosis = {...}` entry

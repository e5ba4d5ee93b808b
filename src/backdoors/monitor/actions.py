"""Action units: what the monitor does about a diagnosis, through the node's agent.

Each unit (an Action subclass) `run`s itself with the response's Context and the
Finding, and returns an Outcome: "done", "failed" or "skipped", with a dict of what
happened. A unit raises only for the unexpected; agent errors become a "failed" outcome
with the error. What it needs of the diagnosis it declares (`needs`, checked when a
ruleset is loaded), and what its success means for the incident (`effect`).

To add an action: an Action subclass with `tag=`, its `run`, listed in ACTIONS.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

import msgspec

from ..common.procs import running
from ..errors import AgentError
from ..vm.service import service
from .context import Context
from .diagnosis import Finding, Target, subtree_roots
from .unit import NonNeg, Path, Pos, Unit


@dataclass
class Outcome:
    """What an action did. `finding` replaces the diagnosis's Finding for the incident
    and the actions after it, when the action learnt more (the lineage found with the
    node locked)."""

    status: str  # "done", "failed", "skipped"
    detail: dict[str, Any] = field(default_factory=dict)
    finding: Finding | None = None


class Action(Unit):
    """One step of a rule's response."""

    #: what the rule's diagnosis must provide (keys of diagnosis.CAPABILITIES)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: what "done" means for the incident: "repair" (the node was changed in place),
    #: "recover" (its sessions moved) or "record" (nothing changed)
    effect: ClassVar[Literal["repair", "recover", "record"]] = "repair"
    #: a kill action: a rule has at most one
    kills: ClassVar[bool] = False
    #: needs each poll to ask the agent for the nodes' state (which are fenced)
    needs_node_state: ClassVar[bool] = False

    def missing_hook(self, hooks: dict[str, Callable[[dict], Any]]) -> str | None:
        """The name of an in-process hook it needs and `hooks` lacks, else None."""
        return None

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        raise NotImplementedError


def _rows(ctx: Context) -> list:
    return ctx.client.processes(ctx.node).rows


def _wait_gone(ctx: Context, targets: list[Target], timeout: float
               ) -> tuple[list[Target], float, list]:
    """Poll the process table until none of `targets` is alive; (survivors, seconds,
    the last table's running rows)."""
    start = ctx.clock()
    want = {(t.pid, t.start_time) for t in targets}
    while True:
        rows = [p for p in _rows(ctx) if running(p.state)]
        alive = {(p.pid, p.start_time) for p in rows}
        left = [t for t in targets if (t.pid, t.start_time) in alive & want]
        waited = ctx.clock() - start
        if not left or waited >= timeout:
            return left, waited, rows
        time.sleep(0.01)


def _stragglers(rows: list, culprits: list[Target], killed: set[int], since: float
                ) -> list[Target]:
    """What the culprits started while they were killed: processes of a culprit's kind
    (executable and comm: a fork keeps both) born after the newest culprit and not
    before `since` (the agent's boot clock), not a registered service, and tied to the
    killed ones: a child of one, in a process group one led, or an orphan (the middle
    child of a double fork, maybe born after the table too, leads the orphan's group and
    exits: the group's leader is gone, and its parent, a reaper, is of another kind and
    group). (The table the culprits were chosen from was taken before they were killed:
    a child forked since is in none.) So not a process that a live one of the kind
    started (a pool's master replacing a killed worker), nor one in its parent's group (a
    supervisor restarting it). `rows`: the running processes once the killed ones are
    gone."""
    kinds = {(t.exe, t.comm) for t in culprits}
    born = max(since, max(t.start_time for t in culprits))
    by_pid = {p.pid: p for p in rows}

    def orphan(p) -> bool:
        parent = by_pid.get(p.ppid)
        return p.pgid not in by_pid and (parent is None or (
            (parent.exe, parent.comm) not in kinds and parent.pgid != p.pgid))

    return [Target(p.pid, p.start_time, p.comm, p.exe) for p in rows
            if (p.exe, p.comm) in kinds and p.start_time >= born and not p.registered
            and (p.ppid in killed or p.pgid in killed or orphan(p))]


class KillCulprit(Action, tag="kill_culprit"):
    """Kill the diagnosed culprit through the agent (pid + start time, so never a reused
    pid), then wait up to `wait_ms` for it to be gone; then what it started meanwhile
    (`_stragglers`, born at most `stragglers_s` before the kill), for up to `rounds`
    rounds (0: none), failed if more still come."""

    needs: ClassVar[frozenset[str]] = frozenset({"culprits"})
    kills: ClassVar[bool] = True
    wait_ms: Pos = 1000.0
    stragglers_s: NonNeg = 1.0
    rounds: Annotated[int, msgspec.Meta(ge=0)] = 3

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        """SIGKILL each culprit (pid + start time), wait for it to be gone; again for
        its stragglers."""
        if not finding.culprits:
            return Outcome("skipped", {"reason": "the diagnosis named no culprit"})
        killed: list[dict] = []
        found: list[int] = []
        start, targets, since = ctx.clock(), list(finding.culprits), None
        for done_rounds in range(self.rounds + 1):
            for t in targets:
                if ctx.client.kill(ctx.node, t.pid, t.start_time):
                    killed.append({"pid": t.pid, "comm": t.comm})
            left, _, rows = _wait_gone(ctx, targets, self.wait_ms / 1000)
            if left or not self.rounds or not rows:
                break
            if since is None:  # the kill's start on the agent's boot clock, less the window
                now = max(p.start_time + p.age_s for p in rows)
                since = now - (ctx.clock() - start) - self.stragglers_s
            targets = _stragglers(rows, finding.culprits,
                                  {t.pid for t in finding.culprits} | set(found), since)
            if not targets:
                break
            if done_rounds == self.rounds:  # more still come after the last round
                left = targets
                break
            found += [t.pid for t in targets]
        detail = {"killed": killed, "gone_after_ms": round((ctx.clock() - start) * 1000, 1),
                  "survivors": [t.pid for t in left]}
        if found:
            detail["stragglers"] = found
        return Outcome("failed" if left else "done", detail)


def fork_room(client: Any, node: str, killed: int, timeout: float,
              clock: Callable[[], float] = time.monotonic) -> tuple[dict, str | None]:
    """Wait up to `timeout` s until node `node` can fork again: its task count
    (pids.current, which counts exited processes until their parent reaps them) below its
    pids limit. Returns what was seen, and None or why the node still cannot fork."""
    start = clock()
    while True:
        stats = client.status(node).stats
        waited = clock() - start
        room = stats.pids_limit is None or stats.pids < stats.pids_limit
        if room or waited >= timeout:
            break
        time.sleep(0.01)
    detail = {"pids_after": stats.pids, "pids_limit": stats.pids_limit,
              "fork_room_after_ms": round(waited * 1000, 1)}
    if room:
        return detail, None
    # an exited task leaves cgroup.procs at once but stays charged until it is reaped
    unreaped = stats.pids - sum(p.threads for p in client.processes(node).rows)
    why = (f"killed {killed} processes; pids.current still {stats.pids} of {stats.pids_limit} "
           f"after {waited * 1000:.0f} ms")
    if unreaped <= 0:
        return detail, why + " (the node's live processes and threads fill its pids limit)"
    detail["unreaped"] = unreaped
    return detail, (
        why + f" ({unreaped} zombies not reaped: their parent does not wait for them, or they "
        "were orphaned to a host process such as PID 1 that reaps late; the node has no "
        "reaping init: run its services under one, e.g. `backdoors node run NODE --init -- "
        "CMD` (catatonit), docs/operations.md section 5)")


class LockKillLineage(Action, tag="lock_kill_lineage"):
    """Lock (freeze) the node, identify the lineage, kill it frozen, unlock, verify.

    The lock has a lease of `lease_s`, so a monitor dying mid-repair cannot leave the
    node frozen. Up to `max_rounds` rounds if survivors are found within `verify_ms`.
    Done only once the node can fork again: its task count below its pids limit within
    `fork_wait_ms` (killed processes count until their parent reaps them). When zombies
    hold it, another round: a parent that does not reap its killed children holds them
    (`unreaped`), and joins the lineage.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"lineage"})
    kills: ClassVar[bool] = True
    lease_s: Pos = 5.0
    verify_ms: Pos = 2000.0
    max_rounds: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    fork_wait_ms: NonNeg = 2000.0

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        """Freeze, find the lineage born since onset, kill it frozen, thaw, check survivors."""
        rounds, killed_total, survivors, found = [], 0, [], None
        holders, for_zombies = [], False  # killed in a round for the zombies left
        checked = None  # the last fork_room, while no round failed since
        for _ in range(self.max_rounds):
            t0 = ctx.clock()
            try:
                lock = ctx.client.lock(ctx.node, self.lease_s)
            except AgentError as e:  # e.g. a bomb forking faster than it freezes: try again
                rounds.append({"lineage": 0, "survivors": [t.pid for t in survivors],
                               "error": f"lock failed: {e}"})
                continue
            frozen_at = ctx.clock()
            error, table, lineage, evidence, roots, singles = None, None, [], {}, [], []
            try:
                young_s = ctx.lineage.young_age_s(ctx.clock() - ctx.onset)
                table = ctx.client.processes(ctx.node, cmdline=True,  # frozen: cheap
                                             threads_within_s=young_s)
                lineage, evidence = ctx.lineage.lineage(table.rows, young_s, ctx.spared_before)
                roots, singles = subtree_roots(lineage, table.rows)
                # every kill is sent while the node is frozen: one that fails (a tree slow
                # to exit under load) must not spare the rest until the node is thawed
                failed = []
                for root in roots:
                    try:
                        ctx.client.kill_tree(ctx.node, root.pid)
                    except AgentError as e:
                        failed.append(f"kill_tree {root.pid}: {e}")
                for p in singles:
                    try:
                        ctx.client.kill(ctx.node, p.pid, p.start_time)
                    except AgentError as e:
                        failed.append(f"kill {p.pid}: {e}")
                if failed:
                    error = "; ".join(failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
            except AgentError as e:
                error = str(e)
            finally:
                try:
                    thaw_ms = round(ctx.client.unlock(ctx.node).thaw_ms, 2)
                except AgentError as e:
                    thaw_ms = None
                    error = f"{error + '; ' if error else ''}unlock failed: {e} (the lease " \
                            f"thaws the node within {self.lease_s:g} s)"
            thawed_at = ctx.clock()
            targets = [Target(p.pid, p.start_time, p.comm, p.exe) for p in lineage]
            left, waited, _ = (_wait_gone(ctx, targets, self.verify_ms / 1000) if targets
                               else ([], 0.0, []))
            killed_total += len(targets) - len(left)
            rounds.append({
                "freeze_ms": round(lock.freeze_ms, 2), "thaw_ms": thaw_ms,
                "locked_ms": round((thawed_at - t0) * 1000, 1),
                "frozen_ms": round((thawed_at - frozen_at) * 1000, 1),
                "table_total": table.total if table else None,
                "table_truncated": table.truncated if table else None,
                "killed_trees": [r.pid for r in roots], "killed_singly": len(singles),
                "lineage": len(targets), "gone_after_ms": round(waited * 1000, 1),
                "survivors": [t.pid for t in left], "error": error,
            })
            if found is None:  # the first round that read the table
                comms = ", ".join(f"{c}×{k}" for c, k in evidence.get("comms", {}).items())
                kin, holding = evidence.get("kin", 0), evidence.get("holding", 0)
                found = Finding(
                    finding.kind,
                    f"fork bomb of {len(targets)} processes ({comms}) born since onset"
                    f"{f' or of its kind ({kin})' if kin else ''}"
                    f"{f' or holding its tasks as threads or zombies ({holding})' if holding else ''}; "
                    f"{evidence.get('spared_count', 0)} processes spared{_spared_holder(evidence)}",
                    targets[:64], {**finding.evidence, "lineage": evidence})
            if for_zombies:
                holders += targets
            survivors = left
            if error is not None or left or (table and table.truncated):
                checked = None
                continue
            if for_zombies and not targets:
                break  # no process holds them: the last check stands
            checked = fork_room(ctx.client, ctx.node, killed_total, self.fork_wait_ms / 1000,
                                ctx.clock)
            if checked[1] is None or not checked[0].get("unreaped"):
                break
            for_zombies = True
        status = "done" if not survivors and rounds[-1]["error"] is None else "failed"
        detail = {"rounds": rounds, "killed": killed_total,
                  "survivors": [t.pid for t in survivors]}
        if status == "done":
            seen, why = checked or fork_room(ctx.client, ctx.node, killed_total,
                                             self.fork_wait_ms / 1000, ctx.clock)
            detail.update(seen)
            if why is not None:
                status, detail["error"] = "failed", why
        if found is not None and holders:
            found.summary += (f"; then {len(holders)} that held their zombies "
                              f"({', '.join(sorted({t.comm for t in holders}))})")
            found.culprits = (holders + found.culprits)[:64]
        return Outcome(status, detail, found)


def _spared_holder(evidence: dict) -> str:
    """What the summary says of a protected process that holds as many of the node's tasks
    as a bomb would (a service leaking threads or zombies is never killed)."""
    top = (evidence.get("holders") or [None])[0]
    if top is None or not top["protected"] or \
            top["young_threads"] + top["unreaped"] < evidence["holding_min"]:
        return ""
    return (f"; {top['comm']} (pid {top['pid']}) holds {top['young_threads']} threads started "
            f"since onset and {top['unreaped']} unreaped children, and is protected")


REFRESH_KEYS = ("node", "host", "rule", "incident", "pid")
FENCE_KEYS = ("node", "host", "rule", "incident", "target")


def _template_problem(command: list[str], keys: tuple[str, ...]) -> str | None:
    """What is wrong with a command's {key} templates (checked at load, not first at an
    incident's response), or None."""
    for arg in command:
        try:
            arg.format(**{k: "x" for k in keys})
        except (KeyError, IndexError, ValueError) as e:
            return (f"argument {arg!r}: {type(e).__name__} {e} in its {{}} template; it "
                    f"may use {', '.join('{' + k + '}' for k in keys)} ({{{{ }}}} for a brace)")
    return None


def _call_out(ctx: Context, hook: str | None, command: list[str] | None, info: dict,
              timeout_s: float) -> Outcome:
    """Run an in-process hook (registered with the Monitor) or a command (`info`'s keys
    expand in its arguments): "done" with what it said, "failed" on an error, a non-zero
    exit or `timeout_s`."""
    if hook is not None:
        fn = ctx.hooks.get(hook)
        if fn is None:
            return Outcome("failed", {"error": f"no hook named {hook!r} is registered "
                                               "with the monitor"})
        try:
            return Outcome("done", {"hook": hook, "result": fn(info)})
        except Exception as e:  # noqa: BLE001 - a hook's failure is the action's outcome
            return Outcome("failed", {"hook": hook, "error": f"{type(e).__name__}: {e}"})
    argv = [a.format(**{k: "" if v is None else v for k, v in info.items()}) for a in command]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Outcome("failed", {"command": argv, "error": str(e)})
    detail = {"command": argv, "returncode": proc.returncode,
              "output": (proc.stdout + proc.stderr)[-400:]}
    return Outcome("done" if proc.returncode == 0 else "failed", detail)


class Refresh(Action, tag="refresh"):
    """Restart the service: an in-process hook (`hook`, registered with the Monitor) or a
    command run by the monitor (`command`; {node}, {host}, {pid}, {incident} expand)."""

    hook: str | None = None
    command: list[str] | None = None
    timeout_s: Pos = 30.0

    def problems(self) -> Iterator[tuple[Path, str]]:
        if (self.hook is None) == (self.command is None):
            yield (), "refresh needs exactly one of hook or command"
        elif self.command is not None and not self.command:
            yield ("command",), "must not be empty"
        elif self.command is not None and (bad := _template_problem(self.command, REFRESH_KEYS)):
            yield ("command",), bad

    def missing_hook(self, hooks: dict[str, Callable[[dict], Any]]) -> str | None:
        return self.hook if self.hook is not None and self.hook not in hooks else None

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        """Restart the service: an in-process hook, or a command run by the monitor."""
        pid = finding.culprits[0].pid if finding.culprits else None
        info = {"node": ctx.node, "host": ctx.host, "rule": ctx.rule,
                "incident": ctx.incident, "pid": pid}
        return _call_out(ctx, self.hook, self.command, info, self.timeout_s)


class Record(Action, tag="record"):
    """Record the incident only."""

    effect: ClassVar[Literal["repair", "recover", "record"]] = "record"
    note: str = ""

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        return Outcome("done", {"note": self.note} if self.note else {})


class Recover(Action, tag="recover"):
    """Move the node's client sessions to a healthy node (another agent's, normally):
    fence the failed node (freeze it, cut its network), then have its agent evacuate the
    sessions to `target` (default: the first node, by name, of another reachable agent).
    The failed node stays fenced for inspection unless `after` is "release" (unfence and
    kill what ran there: a refresh is then up to the operator). With `when` =
    "unrepaired" it runs only if no earlier action of the incident repaired the node (a
    memory hog that is the service itself cannot be killed: its sessions move instead).

    `fence_hook` (in-process, registered with the Monitor) or `fence_command` ({node},
    {host}, {incident}, {target} expand) fences what the node holds elsewhere, after the
    node's own fence and before the move: e.g. its database connections, whose open
    transactions would otherwise hold locks the replayed requests wait on. If it fails
    the sessions do not move (a fence that did not hold is none); the node stays fenced."""

    effect: ClassVar[Literal["repair", "recover", "record"]] = "recover"
    needs_node_state: ClassVar[bool] = True
    target: str | None = None
    when: Literal["always", "unrepaired"] = "always"
    after: Literal["fenced", "release"] = "fenced"
    timeout_s: Pos = 30.0
    fence_hook: str | None = None
    fence_command: list[str] | None = None

    same_node_wait_ms: NonNeg = 3000.0

    #: a process of the node started this long before the server's death, or after it,
    #: is taken for its replacement starting (a supervisor restarts within milliseconds)
    REPLACEMENT_SLACK_S: ClassVar[float] = 1.0

    def problems(self) -> Iterator[tuple[Path, str]]:
        if self.fence_hook is not None and self.fence_command is not None:
            yield (), "recover takes at most one of fence_hook and fence_command"
        elif self.fence_command is not None and not self.fence_command:
            yield ("fence_command",), "must not be empty"
        elif self.fence_command is not None and (
                bad := _template_problem(self.fence_command, FENCE_KEYS)):
            yield ("fence_command",), bad

    def missing_hook(self, hooks: dict[str, Callable[[dict], Any]]) -> str | None:
        return self.fence_hook if self.fence_hook is not None and self.fence_hook not in hooks \
            else None

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        """Fence the node, then evacuate its sessions to the target node's agent."""
        if self.when == "unrepaired" and ctx.repaired:
            return Outcome("skipped", {"reason": "an earlier action repaired the node"})
        ev = ctx.view.event
        waited_ms = None  # for a restarted server of the node, before moving its sessions
        if ev is not None and ev.get("kind") == "owner_died":
            t_same = ctx.clock()
            same = self._same_node(ctx, ev)
            if same is not None:
                return same
            waited_ms = round((ctx.clock() - t_same) * 1000, 1)
        target = self.target or next((n for n, (host, _) in sorted(ctx.placement.items())
                                      if host != ctx.host), None)
        if target is None or target not in ctx.placement:
            return Outcome("failed", {"error": no_recovery_node(ctx, target)})
        to_host, to_address = ctx.placement[target]
        t0 = ctx.clock()
        fence = ctx.client.fence(ctx.node)
        node_fenced_at, more = ctx.clock(), None
        if self.fence_hook is not None or self.fence_command is not None:
            info = {"node": ctx.node, "host": ctx.host, "rule": ctx.rule,
                    "incident": ctx.incident, "target": target}
            more = _call_out(ctx, self.fence_hook, self.fence_command, info, self.timeout_s)
            if more.status != "done":
                return Outcome("failed", {"target": target, "error": "the fence of what the "
                                          "node holds elsewhere failed; nothing moved",
                                          "fence": msgspec.to_builtins(fence),
                                          "fence_more": more.detail})
        fenced_at = ctx.clock()
        ev = ctx.client.evacuate(ctx.node, to_address, to_host, target, timeout=self.timeout_s)
        detail = {"target": target, "target_host": to_host,
                  "fence_ms": round((node_fenced_at - t0) * 1000, 1),
                  "evacuate_ms": round((ctx.clock() - fenced_at) * 1000, 1),
                  "fence": msgspec.to_builtins(fence), "sessions": ev.sessions,
                  "moved": ev.moved, "failed": ev.failed, "dump_ms": ev.dump_ms,
                  "transfer_ms": ev.transfer_ms, "adopt": msgspec.to_builtins(ev.adopt),
                  "dump_phases": ev.phases}
        if ev.present:  # found on the target: moved by an earlier evacuate, answer lost
            detail["present"] = ev.present
        if ev.ended:  # their clients reset them during the move: over, nothing to move
            detail["ended"] = ev.ended
        if waited_ms is not None:
            detail["same_node_waited_ms"] = waited_ms
        if more is not None:
            detail.update(fence_more_ms=round((fenced_at - node_fenced_at) * 1000, 1),
                          fence_more=more.detail)
        if self.after == "release":
            ctx.client.kill_node(ctx.node)
            ctx.client.unlock(ctx.node, force=True)
            detail["released"] = True
        # (a session its client ended during the move is over, not failed)
        ok = ev.moved + ev.ended == ev.sessions and not ev.failed
        return Outcome("done" if ok else "failed", detail)


    def _replacement(self, ctx: Context, ev: dict) -> dict | None:
        """A process of the node that started around the server's death or after it
        ({pid, comm, age_s}), None if there is none (or the agent cannot say)."""
        if ev.get("died") is None:
            return None
        try:
            rows = ctx.client.call("processes", node=ctx.node)["rows"]
        except AgentError:
            return None
        young = _young(rows, float(ev["died"]), self.REPLACEMENT_SLACK_S)
        return None if young is None else {k: young[k] for k in ("pid", "comm", "age_s")}

    def _same_node(self, ctx: Context, ev: dict) -> Outcome | None:
        """A server died (not the node): hand its sessions to a recovery server of the same
        node (the server restarted), waiting up to `same_node_wait_ms` for one to answer on
        the node's adoption socket; None if none did (the node's sessions then move).

        Once a server of the node took sessions, the node stays where it is, and the other
        orphans (of servers that died together) are offered until the agent would close
        them (the event's `orphan_timeout_s`): a server restarting slower than
        `same_node_wait_ms` (start-up under load) still gets its sessions back.

        So does one still starting when the wait ends: while a process of the node that
        started around the death or after it (`_replacement`) runs there, the node is not
        fenced (a fence would freeze the replacement half-started: under load a Python
        server takes seconds of wall time to reach its listener)."""
        t0 = ctx.clock()
        end = t0 + self.same_node_wait_ms / 1000
        last = max(end, t0 + float(ev.get("orphan_timeout_s") or 0))
        tries, sessions, handed, servers = 0, 0, 0, set()
        starting, looked = None, 0.0
        while True:  # every orphan of the node (servers that died together go together)
            tries += 1
            reply = ctx.client.call("readopt", node=ctx.node, pid=0, timeout=self.timeout_s)
            # every orphan seen so far: a server that died together with this one may be
            # seen dead by the agent a little later (under load), its sessions then join
            sessions = max(sessions, handed + reply["sessions"])
            handed += reply["handed"]
            if reply["handed"]:
                servers.add(reply["server_pid"])
            failed = reply["failed"]  # why the sessions still held were not taken, this try
            now = ctx.clock()
            if reply["left"] == 0 or now >= last:
                break
            if now >= end and not handed:
                if now - looked >= 0.25:
                    starting, looked = self._replacement(ctx, ev), now
                if starting is None:
                    break
            time.sleep(0.02 if not (handed or starting) else 0.1)
        if sessions == 0:
            return Outcome("skipped", {"reason": f"no session of server {ev['pid']} is held "
                                                 "any more (released, moved or closed)"})
        if reply["left"] and not handed:
            return None  # no server of the node took any: the node's sessions move
        detail = {"target": ctx.node, "target_host": ctx.host, "same_node": True,
                  "server_pids": sorted(servers), "dead_pid": ev["pid"],
                  "sessions": sessions, "moved": handed, "left": reply["left"],
                  "failed": failed, "tries": tries,
                  "waited_ms": round((ctx.clock() - t0) * 1000, 1)}
        if starting is not None:
            detail["waited_for"] = starting
        ok = reply["left"] == 0 and not failed and handed == sessions  # none closed meanwhile
        return Outcome("done" if ok else "failed", detail)


def _young(rows: list[dict], died: float, slack: float) -> dict | None:
    """The first running process in `rows` (a `processes` reply) started after Unix time
    `died` - `slack`, by its age (the agent's and the monitor's clocks are taken to agree
    within the slack)."""
    since = time.time() - died + slack
    return next((r for r in rows if r["age_s"] < since and running(r["state"])), None)


def no_recovery_node(ctx: Context, target: str | None) -> str:
    """Why no node can take `ctx.node`'s sessions, and what to configure."""
    fleet, node, host = ctx.fleet, ctx.node, ctx.host

    def why(h: str) -> str:  # why the nodes of agent `h` cannot take sessions
        error, nodes = fleet[h]
        if error is not None:
            return f"agent {h} does not answer ({error})"
        if not nodes:
            return f"agent {h} serves no node"
        return f"agent {h}'s nodes are fenced ({', '.join(sorted(nodes))}: backdoors node unfence)"
    if target is not None:
        at = next((h for h, (_, nodes) in fleet.items() if target in nodes), None)
        if at is None:
            return (f"no recovery node for {node}: the recover action's target {target!r} is "
                    f"not a node of any agent in the monitor's [[monitor.agents]] "
                    f"({', '.join(sorted(fleet)) or 'none'}); fix target in the rule, or add "
                    "the agent that serves it")
        reason = why(at) if fleet[at][0] is not None else f"{target} is fenced"
        return f"no recovery node for {node}: the recover action's target {target!r}: {reason}"
    others = sorted(h for h in fleet if h != host)
    if not others:
        return (f"no recovery node for {node}: sessions move to a node of another agent, and "
                f"the monitor knows only agent {host}: add another host's agent to the "
                "monitor's [[monitor.agents]] (host, address), or set target = \"NODE\" in "
                "the rule's recover action")
    return (f"no recovery node for {node}: no node of another agent is in service ("
            f"{'; '.join(why(h) for h in others)}); or set target = \"NODE\" in the rule's "
            "recover action")


class HealKernel(Action, tag="heal_kernel"):
    """Restore a VM node's tampered guest kernel through its agent: the clean bytes of
    each open finding written back with the guest's vCPUs stopped, hidden processes
    relinked, read back (docs/vm-backdoor.md); then ask the agent what is still open."""

    #: heal calls at most (one restores up to 256 findings)
    MAX_CALLS: ClassVar[int] = 8

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        healed, failed, took_ms = [], [], 0.0
        for _ in range(self.MAX_CALLS):
            reply = ctx.client.heal_kernel(ctx.node)
            healed += [msgspec.to_builtins(f) for f in reply.healed]
            failed += [msgspec.to_builtins(f) for f in reply.failed]
            took_ms += reply.took_ms
            if reply.failed or not reply.left:
                break
        detail: dict[str, Any] = {"healed": healed, "failed": failed,
                                  "took_ms": round(took_ms, 1)}
        if not healed and not failed:
            return Outcome("skipped", {**detail, "reason": "nothing was open any more"})
        after = ctx.client.kernel_integrity(ctx.node)
        detail["open_after"] = [msgspec.to_builtins(f) for f in after.findings]
        return Outcome("failed" if failed or after.open else "done", detail)


def guest_culprit(rows: list, by: str, protect: frozenset[str] | set[str],
                  min_lineage: int = 1) -> tuple[Any, int, str] | None:
    """The process of a guest's table (agent guest_processes rows) to kill, how many
    processes it heads, and how it was chosen ("rss" or "lineage"). Only user processes
    count: not pid 0-2, not kernel threads (kthreadd's children), not the service
    processes of the comms in `protect` (vm.service: not any process that names itself
    so). `by` "rss": the largest resident one (a memory hog), or its parent if that
    holds as much (a hog caught forking: the child shows the pages it shares as its own).
    "lineage": the root of the largest tree of them -- a root being one whose parent is
    none of them (init, a protected service, gone) -- ties to the newest (a fork bomb).
    "memory": whichever holds more resident memory, the largest process or the tree of at
    least `min_lineage` processes whose sum is largest (a fork bomb fills the memory with
    many small processes, a hog with one large one)."""
    # (no memory does not make a kernel thread: a process in the middle of an exec has none)
    spared = service(rows, protect)
    user = {r.pid: r for r in rows if r.pid > 2 and r.ppid != 2 and r.pid not in spared}
    if not user:
        return None
    largest = max(user.values(), key=lambda r: (r.rss_bytes, r.pid))
    seen = {largest.pid}
    while (up := user.get(largest.ppid)) is not None and up.pid not in seen \
            and up.rss_bytes >= largest.rss_bytes:
        largest = up
        seen.add(up.pid)
    if by == "rss":
        return largest, 1, "rss"
    children: dict[int, list[int]] = {}
    for r in user.values():
        children.setdefault(r.ppid, []).append(r.pid)

    def tree(pid: int) -> tuple[int, int]:  # (processes, resident bytes)
        n, rss, todo = 0, 0, [pid]
        while todo:
            p = todo.pop()
            n, rss = n + 1, rss + user[p].rss_bytes
            todo += children.get(p, [])
        return n, rss
    trees = {r.pid: tree(r.pid) for r in user.values() if r.ppid not in user}  # the roots
    if by == "lineage":
        best = max(trees, key=lambda pid: (trees[pid][0], pid))
        return user[best], trees[best][0], "lineage"
    big = [pid for pid, (n, _) in trees.items() if n >= min_lineage]
    best = max(big, key=lambda pid: (trees[pid][1], pid), default=None)
    if best is not None and trees[best][1] > largest.rss_bytes:
        return user[best], trees[best][0], "lineage"
    return largest, 1, "rss"


#: the guest box's sensors whose violation says "too many processes": a tree is the culprit
LINEAGE_SENSORS = frozenset({"predicted_forks", "predicted_starvation", "threads", "running"})


class KillGuestCulprit(Action, tag="kill_guest_culprit"):
    """Kill what makes a VM node's guest unstable, found in its process table (read from
    its kernel's memory by the agent: `guest_processes`) -- by="rss" the largest process,
    by="lineage" the largest process tree, root and all (a fork bomb; at least
    `min_lineage` processes), by="memory" whichever of the two holds more memory (a fork
    bomb also exhausts memory), by="predicted" as the guest box's sensor that fired says
    (`predicted_forks`, `predicted_starvation` or the bounds `threads`, `running`:
    lineage; `predicted_oom`, `available_mb`: memory) -- never the guest's service
    named in `protect` (vm.service: its oldest process of that comm and its workers, not
    any process that takes the name). SIGKILL is written into the guest kernel with
    its vCPUs stopped (`guest_kill`, docs/vm-backdoor.md); done once all are gone, which
    may take until each wakes: survivors are looked for up to `settle_s`. A largest tree
    below `min_lineage` is looked at again for up to `grow_s`: a runaway foreseen early
    may still be starting its processes (it is skipped if it stays below)."""

    kills: ClassVar[bool] = True
    by: Literal["predicted", "rss", "lineage", "memory"] = "predicted"
    #: comms (a comm is at most 15 characters: a longer name would protect nothing)
    protect: list[Annotated[str, msgspec.Meta(min_length=1, max_length=15)]] = []
    min_lineage: Annotated[int, msgspec.Meta(ge=1)] = 8
    settle_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 5.0
    grow_s: Annotated[float, msgspec.Meta(ge=0, le=10)] = 1.0

    def run(self, ctx: Context, finding: Finding) -> Outcome:
        by = self.by
        if by == "predicted":
            fired = {v.sensor for h in ctx.hits for v in h.violations}
            by = "lineage" if fired & LINEAGE_SENSORS else "memory"
        until = time.monotonic() + self.grow_s
        while True:
            rows = ctx.client.guest_processes(ctx.node).rows
            found = guest_culprit(rows, by, set(self.protect), self.min_lineage)
            spared = sorted(service(rows, self.protect))
            if found is None:
                return Outcome("skipped", {"reason": "no user process in the guest but its "
                                           "service", "service": spared})
            culprit, heads, how = found
            if how != "lineage" or heads >= self.min_lineage or time.monotonic() >= until:
                break
            time.sleep(0.1)
        who = {"pid": culprit.pid, "comm": culprit.comm, "rss_bytes": culprit.rss_bytes,
               "processes": heads, "by": how}
        if how == "lineage" and heads < self.min_lineage:
            return Outcome("skipped", {"culprit": who, "service": spared, "reason": f"the "
                                       f"largest process tree has {heads} processes, below "
                                       "min_lineage"})
        began = time.monotonic()
        reply = ctx.client.guest_kill(ctx.node, culprit.pid, comm=culprit.comm,
                                      tree=how == "lineage", spare=self.protect)
        left = set(reply.survivors)
        while left and time.monotonic() - began < self.settle_s:
            time.sleep(0.1)  # a sleeper dies when it wakes; a busy guest wakes them late
            left &= {r.pid for r in ctx.client.guest_processes(ctx.node).rows
                     if r.state not in ("Z", "X")}
        detail = {"culprit": who, "service": spared, "signalled": reply.signalled,
                  "survivors": sorted(left),
                  "took_ms": round(max(reply.took_ms, 1000 * (time.monotonic() - began)), 1)}
        return Outcome("failed" if left else "done", detail)


# ---- registration ------------------------------------------------------------------------

ACTIONS = (KillCulprit, LockKillLineage, Refresh, Record, Recover, HealKernel, KillGuestCulprit)
ActionUnit = Union[ACTIONS]  # the TOML `actions = [...]` entries

"""`backdoors scenario fleet`: a fleet of monitors under a random schedule of faults (issue
14 §2): faults of its nodes, of its monitors and of its etcd.

A lab with its own etcd (a cluster of `etcd_members`) and `monitors` monitor processes
(default rules) sharing `nodes` nodes with services on `hosts` hosts. The monitors act on
the agents' pushed events and poll every `poll_ms`; the agents sample kernel state every
`sample_period_s` (a poll every 50 ms of 64 nodes, each sampled every 50 ms, takes more
than the two cores of a development machine: issue 12 §3). For `duration_s`, every
`interval_s`, one fault is drawn (seeded):

- of a node: a fork bomb or a memory hog, each stopped after `fault_s` if still there; a
  frozen node, thawed after `fault_s`;
- of a monitor: SIGKILLed, then started again once its nodes were taken over; SIGSTOPped for
  `pause_s`, longer than its lease (the paused process holding a lease), then SIGCONTed;
  cut off from etcd (nftables drops its packets to every member: Lab.cut_monitor) until
  the others took its nodes, then a node fault on one of those nodes while it is still cut
  off (it goes on watching them, degraded: its late repairs carry its old tokens, which the
  agents must refuse), then the cut lifted;
- of etcd (with 3 or more members): a member SIGKILLed, a node fault while it is down (the
  fleet must keep working on the others' quorum), then the member restarted with its data.

The facts come from outside the monitors: the agents' ownership of the nodes (`nodes()`),
the monitors' incident logs and logs, and the agents' audit logs.

Keys: monitors, hosts, nodes, etcd_members, faults_injected, faults_handled (node faults
that an incident of some monitor opened on that node within `handle_s`), missed (node faults
nobody handled), takeover_ms_p99 (a monitor's SIGKILL to each of its nodes claimed by
another; `cut_takeover_ms`: from a monitor's cut), stale_token_ops_refused (the agents'
`stale_token` refusals), stale_token_ops_applied (a destructive op applied with a token
older than one the agent had already accepted for that node: must be 0), double_acted
(pairs of incidents of two monitors that acted on one node at once: the first to the last
destructive op applied for one of them, as the audit lines name the incident each acted
for, overlaps the other's: must be 0; an incident carried on by the node's next owner
counts once per monitor; an op that names no incident pairs by time, within
`overlap_s`; a monitor fenced off mid-repair acted before its successor, not at once;
`fencing_violations`: the audit lines behind either, each with the line before it that it
breaks; `ops_without_incident`: destructive ops applied that named none), cut_degraded (cuts after which the monitor said it was degraded), timeline (what
happened when, for the report's plot: `start` (Unix time) and `events`, each {t (s since
start), lane (a monitor's id, "nodes" or "etcd"), kind, target; `end` for what lasted}:
the faults injected, each monitor's incidents and its nodes' takeovers).
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import BackdoorsError
from ..fleet import assign
from ..lab import Lab, faults
from .labkit import unique_name

MiB = 1 << 20
DESTRUCTIVE = ("kill", "kill_tree", "kill_node", "lock", "set_limits")
NODE_FAULTS = ("fork-bomb", "memory-hog", "freeze")
FLEET_FAULTS = ("monitor-kill", "monitor-stop", "monitor-cut", "etcd-kill")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 1)


def fleet(*, monitors: int = 3, hosts: int = 8, nodes: int = 64, etcd_members: int = 3,
          duration_s: float = 60.0, interval_s: float = 3.0, fault_s: float = 3.0,
          pause_s: float = 2.5, handle_s: float = 10.0, overlap_s: float = 1.0,
          poll_ms: float = 250.0, sample_period_s: float = 0.25, seed: int | None = None,
          schedule: list[str] | tuple[str, ...] = (),
          progress: Callable[[str], None] = lambda _line: None) -> dict:
    """Run the scenario (see the module's docstring); a JSON-ready dict. `schedule`: kinds
    injected first, in that order (even past `duration_s`), before the random draws;
    `progress` is told each step as it starts (a long run's only sign of life)."""
    unknown = [k for k in schedule if k not in NODE_FAULTS + FLEET_FAULTS]
    if unknown:
        raise BackdoorsError(f"scenario fleet: unknown fault kinds {unknown} (known: "
                             f"{', '.join(NODE_FAULTS + FLEET_FAULTS)})")
    if "etcd-kill" in schedule and etcd_members < 3:
        raise BackdoorsError("scenario fleet: etcd-kill needs a cluster of 3 or more members "
                             f"(etcd_members={etcd_members})")
    rng = random.Random(seed)
    ids = tuple(f"m{i + 1}" for i in range(monitors))
    lab = Lab(unique_name("fl"), hosts=hosts, nodes=nodes, memory_limit=256 * MiB,
              pids_limit=256, agents=True, services=False, monitors=ids, etcd=etcd_members,
              sample_period_s=sample_period_s)
    kinds = NODE_FAULTS + FLEET_FAULTS[:3] + (("etcd-kill",) if etcd_members >= 3 else ())
    injected: list[dict] = []
    takeover: list[float] = []
    cut_takeover: list[float] = []
    taken: list[dict] = []  # each takeover's end: {monitor, at, nodes}
    t0 = time.monotonic()

    def step(what: str) -> None:
        progress(f"fleet +{time.monotonic() - t0:.1f}s: {what}")

    def start_monitor(m: str) -> None:
        lab.start_monitor(m, rulesets=["default"], period_ms=poll_ms, fleet_poll_ms=50.0)

    step(f"lab of {hosts} hosts, {nodes} nodes, {etcd_members} etcd members")
    with lab:
        step(f"lab up; starting {nodes} services")
        # a generous wait: 64 services start slowly on 2 busy cores
        lab.start_services([n.name for n in lab.plan.nodes], timeout=60.0 + nodes)
        step(f"services up; starting monitors {', '.join(ids)}")
        for m in ids:
            start_monitor(m)
        keys = [f"{n.host}/{n.name}" for n in lab.plan.nodes]
        by_key = {f"{n.host}/{n.name}": n for n in lab.plan.nodes}
        clients = {h.name: lab.agent_client(h.name) for h in lab.plan.hosts}
        try:
            def owners() -> dict[str, str | None]:
                got = {}
                for host, c in clients.items():
                    got.update({f"{host}/{i.name}": i.owner for i in c.nodes()})
                return got

            def wait(pred, timeout: float) -> bool:
                end = time.monotonic() + timeout
                while not pred():
                    if time.monotonic() > end:
                        return False
                    time.sleep(0.01)
                return True

            def node_fault(kind: str, n, during: str | None = None) -> None:
                injected.append({"kind": kind, "node": n.name, "host": n.host,
                                 "at": time.time(), **({"during": during} if during else {})})
                # a hog fast enough to cross the high mark (80% of 256 MiB) in fault_s
                faults.inject(lab, kind, n.name, **(
                    {"rate_mb": 150, "cap_mb": 400} if kind == "memory-hog" else {}))
                time.sleep(fault_s)
                try:  # whatever the monitors left of it (nothing, when repaired)
                    faults.stop(lab, kind, n.name)
                except BackdoorsError:
                    pass

            def taken_over(victim: str, lost: set[str], since: float, into: list[float]):
                if lost and wait(lambda: all(owners().get(k) not in (victim, None)
                                             for k in lost), 30):
                    into.append((time.monotonic() - since) * 1000)
                    taken.append({"monitor": victim, "at": time.time(), "nodes": len(lost)})

            everyone = assign(keys, ids)
            step("waiting for the monitors to claim every node")
            if not wait(lambda: owners() == everyone, 60):
                raise BackdoorsError("scenario fleet: the monitors did not claim every node "
                                     "within 60 s")
            end = time.monotonic() + duration_s
            planned = list(schedule)
            while planned or time.monotonic() < end:
                kind = planned.pop(0) if planned else rng.choice(kinds)
                step(f"fault {len(injected) + 1}: {kind}")
                if kind in NODE_FAULTS:
                    node_fault(kind, rng.choice(lab.plan.nodes))
                elif kind == "etcd-kill":
                    member = rng.randrange(etcd_members)
                    fault = {"kind": kind, "member": member, "at": time.time()}
                    injected.append(fault)
                    lab.kill_etcd_member(member)
                    # the fleet keeps working on the others' quorum
                    node_fault(rng.choice(NODE_FAULTS), rng.choice(lab.plan.nodes), kind)
                    lab.restart_etcd_member(member)
                    fault["end"] = time.time()
                else:  # one with nodes to take over (rendezvous may leave one without)
                    victim = rng.choice(sorted(set(everyone.values())))
                    fault = {"kind": kind, "monitor": victim, "at": time.time()}
                    injected.append(fault)
                    lost = {k for k, m in owners().items() if m == victim}
                    since = time.monotonic()
                    if kind == "monitor-kill":
                        lab.stop_monitor(victim, signal.SIGKILL)
                        taken_over(victim, lost, since, takeover)
                        start_monitor(victim)
                        fault["end"] = time.time()
                    elif kind == "monitor-stop":
                        pid = lab.state.monitors[victim]
                        _signal(pid, signal.SIGSTOP)
                        time.sleep(pause_s)
                        _signal(pid, signal.SIGCONT)
                        fault["end"] = time.time()
                    else:  # monitor-cut
                        log = lab.plan.run_dir / "monitors" / f"{victim}.log"
                        seen = log.stat().st_size
                        lab.cut_monitor(victim)
                        try:
                            taken_over(victim, lost, since, cut_takeover)
                            if lost:  # it still watches them: its repairs come late
                                node_fault(rng.choice(("fork-bomb", "memory-hog")),
                                           by_key[rng.choice(sorted(lost))], kind)
                            fault["degraded"] = wait(lambda: "DEGRADED" in log.read_text(
                                errors="replace")[seen:], 10)
                        finally:
                            lab.reconnect_monitor(victim)
                            fault["end"] = time.time()
                    wait(lambda: owners() == everyone, 30)  # its share back
                time.sleep(max(0.0, interval_s - fault_s))
            step("faults over; reading incidents and audit logs")
            time.sleep(2.0)  # the last incidents written
            run_dir = lab.plan.run_dir
            incidents = _incidents(run_dir / "monitors")
            audit = _audit(run_dir)
        finally:
            for c in clients.values():
                c.close()
    node_faults = [f for f in injected if f["kind"] in NODE_FAULTS]
    handled = [f for f in node_faults if any(
        i["node"] == f["node"] and i["host"] == f["host"]
        and f["at"] - 0.5 <= i["detected"] <= f["at"] + handle_s for i in incidents)]
    refused, applied_stale, double, violations = _fencing(audit, overlap_s)
    cuts = [f for f in injected if f["kind"] == "monitor-cut"]
    return {
        "monitors": monitors, "hosts": hosts, "nodes": nodes, "etcd_members": etcd_members,
        "duration_s": duration_s, "seed": seed, "poll_ms": poll_ms,
        "sample_period_s": sample_period_s, "faults_injected": len(injected),
        "faults_by_kind": {k: sum(1 for f in injected if f["kind"] == k)
                           for k in NODE_FAULTS + FLEET_FAULTS},
        "faults_handled": len(handled), "missed": len(node_faults) - len(handled),
        "missed_faults": [f for f in node_faults if f not in handled],
        "takeover_ms": [round(x, 1) for x in takeover],
        "takeover_ms_p99": _pct(takeover, 0.99),
        "cut_takeover_ms": [round(x, 1) for x in cut_takeover],
        "cut_degraded": sum(1 for f in cuts if f.get("degraded")),
        "stale_token_ops_refused": refused, "stale_token_ops_applied": applied_stale,
        "double_acted": double, "fencing_violations": violations, "incidents": len(incidents),
        "ops_without_incident": sum(1 for r in audit if r.get("ok") and r.get("op") in
                                    DESTRUCTIVE and not r.get("incident")),
        "anchors_s": {"kubernetes_node_lease": 40, "nomad_heartbeat": 20,
                      "memberlist_swim": 5, "target_takeover": 2},
        "timeline": _timeline(injected, incidents, taken),
    }


def _timeline(injected: list[dict], incidents: list[dict], taken: list[dict]) -> dict:
    """The run's events on one clock (seconds since the first fault), by lane: a monitor's
    own faults, incidents and takeovers of its nodes in its lane; node faults in "nodes";
    etcd members' in "etcd"."""
    start = min([f["at"] for f in injected] + [i["detected"] for i in incidents], default=0.0)
    events = []
    for f in injected:
        if f["kind"] in NODE_FAULTS:
            lane, target = "nodes", f"{f['host']}/{f['node']}"
        elif f["kind"] == "etcd-kill":
            lane, target = "etcd", f"member {f['member']}"
        else:
            lane, target = f["monitor"], f["monitor"]
        e = {"t": round(f["at"] - start, 3), "lane": lane, "kind": f["kind"], "target": target}
        if "end" in f:
            e["end"] = round(f["end"] - start, 3)
        events.append(e)
    events += [{"t": round(i["detected"] - start, 3), "lane": i["monitor"], "kind": "incident",
                "target": f"{i['host']}/{i['node']}"} for i in incidents if i["detected"]]
    events += [{"t": round(x["at"] - start, 3), "lane": x["monitor"], "kind": "taken-over",
                "target": f"{x['nodes']} nodes"} for x in taken]
    return {"start": start, "events": sorted(events, key=lambda e: e["t"])}


def _signal(pid: int, sig: int) -> None:
    import os
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _incidents(folder: Path) -> list[dict]:
    """Every incident the monitors opened: {monitor, node, host, detected}."""
    out = []
    for path in sorted(folder.glob("incidents-*/*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a torn last line (a monitor SIGKILLed mid-write)
            rec = ev.get("record")
            if ev.get("event") == "opened" and isinstance(rec, dict):
                out.append({"monitor": rec.get("monitor"), "node": rec.get("node"),
                            "host": rec.get("host"), "detected": rec.get("detected", 0.0)})
    return out


def _audit(run_dir: Path) -> list[dict]:
    """The agents' audit lines of requests, in each agent's order (with its host)."""
    out = []
    for path in sorted(run_dir.glob("audit-*.jsonl")):
        host = path.stem[len("audit-"):]
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "rpc":
                rec["host"] = host
                out.append(rec)
    return out


def _node(r: dict) -> str:
    tok = r.get("token") or {}
    return f"{r['host']}/{tok.get('node') or (r.get('args') or {}).get('node', '?')}"


def _acting(audit: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, dict]]:
    """(node, incident, monitor) -> (its first and last destructive op applied there, the
    first op's line), for the ops that name their incident (an incident carried on by the
    node's next owner is one span per monitor: each acted for it in turn)."""
    spans: dict[tuple[str, str, str], tuple[float, float, dict]] = {}
    for r in audit:
        if r.get("ok") and r.get("op") in DESTRUCTIVE and r.get("incident"):
            key = (_node(r), r["incident"], str(r.get("monitor")))
            ts = r.get("ts", 0.0)
            first, last, line = spans.get(key, (ts, ts, r))
            spans[key] = (min(first, ts), max(last, ts), line)
    return spans


def _fencing(audit: list[dict], overlap_s: float) -> tuple[int, int, int, list[dict]]:
    """(stale-token refusals, destructive ops applied with a token older than one already
    accepted for the node, pairs of incidents of two monitors acting on one node at once
    (see the module's docstring), and the audit lines behind the last two: {why, node,
    line, before})."""
    refused = sum(1 for r in audit if r.get("error") == "stale_token")
    highest: dict[str, tuple[int, dict]] = {}  # node -> (its highest token, that line)
    last: dict[str, dict] = {}  # node -> its last destructive op applied naming no incident
    violations: list[dict] = []
    acting = sorted(_acting(audit).items())
    for i, ((node, _, _), (first, end, line)) in enumerate(acting):
        for (node2, _, _), (first2, end2, line2) in acting[i + 1:]:
            if node2 == node and line2.get("monitor") != line.get("monitor") \
                    and first <= end2 and first2 <= end:
                violations.append({"why": "double", "node": node, "line": line2,
                                   "before": line})
    for r in audit:
        tok = r.get("token") or {}
        node = _node(r)
        if r.get("ok") and "token" in tok:
            top = highest.get(node)
            if r.get("op") in DESTRUCTIVE and top is not None and tok["token"] < top[0]:
                violations.append({"why": "stale", "node": node, "line": r, "before": top[1]})
            if top is None or tok["token"] >= top[0]:
                highest[node] = (tok["token"], r)
        if r.get("ok") and r.get("op") in DESTRUCTIVE and not r.get("incident"):
            prev = last.get(node)
            if (prev is not None and prev.get("monitor") != r.get("monitor")
                    and r.get("ts", 0.0) - prev.get("ts", 0.0) <= overlap_s):
                violations.append({"why": "double", "node": node, "line": r, "before": prev})
            last[node] = r
    return (refused, sum(v["why"] == "stale" for v in violations),
            sum(v["why"] == "double" for v in violations), violations)

"""Takeover in a fleet of monitors: from a monitor's SIGKILL to each of its nodes watched by
another monitor (claimed at the node's agent with a newer fencing token), p50/p99.

A lab with its own etcd (1 s leases, 50 ms heartbeat) and `monitors` monitor processes
sharing `nodes` nodes on 2 hosts. Each trial SIGKILLs one monitor (in turn), polls the
agents' `nodes()` every 5 ms until every node it owned is owned by another monitor, then
starts it again and waits until it has its share back (`giveback_ms`: from its start,
Python's import time included). Then each trial cuts one monitor off from one host's
agent (nftables: Lab.cut_monitor) until each of its nodes there is claimed by a monitor
that reaches it (`cut_takeover_ms`: the fleet's reach, 2 s, its grace, 1.1 s, and a step),
and lifts the cut. Anchors (cited, not measured here): Kubernetes' node lease
40 s, Nomad's heartbeat ~20 s, memberlist/SWIM ~5 s.

`scenario`: then a short `scenario fleet` (3 monitors, 2 hosts, 8 nodes, a 3-member etcd,
30 s of seeded random faults of the nodes, the monitors and etcd): its figures and its
timeline, which the report plots.

    python bench/bench_fleet.py [TRIALS]        # or: backdoors bench fleet --json
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import time


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(trials: int = 10, monitors: int = 3, nodes: int = 16, scenario_s: float = 30.0) -> dict:
    from backdoors.fleet import assign
    from backdoors.lab import Lab
    from backdoors.scenarios.labkit import unique_name

    ids = tuple(f"m{i + 1}" for i in range(monitors))
    lab = Lab(unique_name("bf"), hosts=2, nodes=nodes, agents=True, services=False,
              monitors=ids, etcd=True)
    takeover, giveback, cut_takeover = [], [], []
    with lab:
        poll_ms = 50.0
        for m in ids:
            lab.start_monitor(m, rulesets=["default"], events=False, fleet_poll_ms=poll_ms)
        keys = [f"{n.host}/{n.name}" for n in lab.plan.nodes]
        clients = {h.name: lab.agent_client(h.name) for h in lab.plan.hosts}

        def owners() -> dict[str, str | None]:
            got = {}
            for host, c in clients.items():
                got.update({f"{host}/{i.name}": i.owner for i in c.nodes()})
            return got

        def wait(pred, timeout: float, what: str) -> None:
            end = time.monotonic() + timeout
            while not pred():
                if time.monotonic() > end:
                    raise TimeoutError(f"bench fleet: timed out waiting for {what}")
                time.sleep(0.005)

        everyone = assign(keys, ids)
        wait(lambda: owners() == everyone, 60, "every node claimed")
        for t in range(trials):
            victim = ids[t % len(ids)]
            lost = {k for k, m in everyone.items() if m == victim}
            killed = time.monotonic()
            lab.stop_monitor(victim, signal.SIGKILL)
            wait(lambda: all(owners()[k] not in (victim, None) for k in lost), 30,
                 f"{victim}'s nodes taken over")
            takeover.append((time.monotonic() - killed) * 1000)
            started = time.monotonic()
            lab.start_monitor(victim, rulesets=["default"], events=False,
                              fleet_poll_ms=poll_ms)
            wait(lambda: owners() == everyone, 60, f"{victim}'s share back")
            giveback.append((time.monotonic() - started) * 1000)
        # a monitor cut off from one host's agent (nftables): from the cut to each of its
        # nodes there claimed by a monitor that reaches it (fleet_reach_ms + the grace)
        for t in range(trials):
            victim, host = ids[t % len(ids)], lab.plan.hosts[t % 2].name
            lost = {k for k, m in everyone.items() if m == victim and k.startswith(host + "/")}
            cut = time.monotonic()
            lab.cut_monitor(victim, host)
            wait(lambda: all(owners()[k] not in (victim, None) for k in lost), 30,
                 f"{victim}'s nodes on {host} taken over")
            cut_takeover.append((time.monotonic() - cut) * 1000)
            lab.reconnect_monitor(victim, host)
            wait(lambda: owners() == everyone, 60, f"{victim}'s nodes on {host} back")
        for c in clients.values():
            c.close()
    return {"monitors": monitors, "nodes": nodes, "trials": trials, "lease_ttl_s": 1,
            "fleet_poll_ms": poll_ms, "takeover_ms": [round(x, 1) for x in takeover],
            "takeover_ms_p50": round(statistics.median(takeover), 1),
            "takeover_ms_p99": round(_pct(takeover, 0.99), 1),
            "takeover_ms_max": round(max(takeover), 1),
            "giveback_ms_p50": round(statistics.median(giveback), 1),
            "cut_takeover_ms": [round(x, 1) for x in cut_takeover],
            "cut_takeover_ms_p50": round(statistics.median(cut_takeover), 1),
            "fleet_reach_ms": 2000, "reach_grace_ms": 1000 + 2 * poll_ms,
            "anchors_s": {"kubernetes_node_lease": 40, "nomad_heartbeat": 20,
                          "memberlist_swim": 5},
            "scenario": _scenario(scenario_s) if scenario_s else None}


def _scenario(duration_s: float) -> dict:
    from backdoors.scenarios.fleet import fleet

    got = fleet(monitors=3, hosts=2, nodes=8, etcd_members=3, duration_s=duration_s, seed=1,
                schedule=("monitor-kill", "fork-bomb", "monitor-cut", "etcd-kill"))
    return {k: got[k] for k in ("monitors", "hosts", "nodes", "etcd_members", "duration_s",
                                "seed", "faults_injected", "faults_handled", "missed",
                                "takeover_ms_p99", "stale_token_ops_refused",
                                "stale_token_ops_applied", "double_acted", "timeline")}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 10), indent=2))

"""Hang detection: latency for several progress deadlines, and false positives under load.

One lab, one node per deadline (50, 100, 200 ms), each with the sample service ticking
every 10 ms under that deadline; the monitor polls every --period-ms with the default
rules. Latency: the service's main loop is stalled (SIGUSR1) and the time until the
monitor opens the hang incident is measured, --trials times per deadline (the nodes run
their trials concurrently); the bound is deadline + 2 poll periods. Soak: for
--soak-seconds, nothing is wrong but both cores are saturated (two busy-loop processes
and a memory churner allocating, touching and freeing 256 MB, all outside the nodes, so
they compete with services, agent and monitor alike); every incident opened is a false
positive.

    python bench/bench_detection.py [--json] [--soak-seconds 60] [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from backdoors.monitor import Monitor
from backdoors.scenarios.labkit import AgentLab, unique_name

DEADLINES_MS = (50, 100, 200)

_CHURN = r"""
import time
while True:
    b = bytearray(256 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    del b
"""


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def _trials(al: AgentLab, mon: Monitor, node: str, trials: int, results: list, errors: list):
    n = al.lab.node(node)
    seen: set[str] = set()
    try:
        for _ in range(trials):
            svc = al.lab.service(node).pid
            t0_wall = time.time()
            n.kill(svc, signal.SIGUSR1)
            inc = mon.wait_for(lambda i: i.node == node and i.rule == "hang" and i.id not in seen, 5)
            n.kill(svc, signal.SIGUSR2)
            if inc is None:
                errors.append(f"{node}: a stall was not detected within 5 s")
                continue
            seen.add(inc.id)
            results.append((inc.detected - t0_wall) * 1000)
            mon.wait_for(lambda i: i.id == inc.id and i.outcome is not None, 5)
            time.sleep(0.6)  # the rule's cooldown, and a steady counter again
    except Exception as e:  # noqa: BLE001 - reported with the results
        errors.append(f"{node}: {e}")


def run(*, soak_seconds: float = 60.0, trials: int = 20, period_ms: float = 50.0) -> dict:
    out: dict = {"period_ms": period_ms, "deadlines_ms": list(DEADLINES_MS), "latency": {},
                 "soak": {}}
    nodes = {f"n{i}": d for i, d in enumerate(DEADLINES_MS)}
    with AgentLab(unique_name("b"), nodes=len(nodes), memory_limit=1 << 30) as al:
        for node, deadline in nodes.items():
            al.wait_registered(node)
            al.restart_service(node, "--deadline", str(deadline / 1000))
        cfg = al.monitor_config(period_ms=period_ms)
        with Monitor(cfg, key=al.monitor_key()) as mon:
            mon.wait_ready()
            time.sleep(0.5)
            results = {node: [] for node in nodes}
            errors: list[str] = []
            threads = [threading.Thread(target=_trials, args=(al, mon, node, trials, results[node],
                                                              errors)) for node in nodes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for node, deadline in nodes.items():
                lat = results[node]
                bound = deadline + 2 * period_ms
                out["latency"][str(deadline)] = {
                    "trials": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                    "max_ms": round(max(lat), 1) if lat else None, "bound_ms": bound,
                    "within_bound": sum(1 for x in lat if x <= bound)}
            out["errors"] = errors

            time.sleep(1.0)  # every trial's incident closed and cooled down
            before = {i.id for i in mon.incidents()}
            quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
            load = [subprocess.Popen([sys.executable, "-m", "backdoors.lab.hogs", "cpu",
                                      "--procs", "2"], **quiet),
                    subprocess.Popen([sys.executable, "-c", _CHURN], **quiet)]
            polls0 = sum(p.polls for p in mon.pollers)
            t0 = time.monotonic()
            try:
                time.sleep(soak_seconds)
            finally:
                for p in load:  # the cpu hog forks: kill each whole session
                    os.killpg(p.pid, signal.SIGKILL)
                for p in load:
                    p.wait()
            elapsed = time.monotonic() - t0
            polls = sum(p.polls for p in mon.pollers) - polls0
            fps = [i for i in mon.incidents() if i.id not in before]
            by_deadline = {str(d): 0 for d in DEADLINES_MS}
            for i in fps:
                if i.node in nodes:
                    by_deadline[str(nodes[i.node])] += 1
            out["soak"] = {
                "seconds": round(elapsed, 1), "load": "2 busy loops + 256 MB memory churn, outside the nodes",
                "false_positives": len(fps), "false_positives_by_deadline_ms": by_deadline,
                "false_positive_rules": sorted({i.rule for i in fps}),
                "examples": [f"{i.node} {i.rule}: {'; '.join(h.summary for h in i.detectors)}"
                             for i in fps[:5]],
                "polls_per_s": round(polls / elapsed, 1),
            }
    for d, v in out["latency"].items():
        out[f"detect_p50_ms_deadline_{d}"] = v["p50_ms"]
        out[f"detect_p99_ms_deadline_{d}"] = v["p99_ms"]
    out["false_positives_soak"] = out["soak"]["false_positives"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a summary)")
    ap.add_argument("--soak-seconds", type=float, default=60.0)
    ap.add_argument("--trials", type=int, default=20, help="stalls per deadline")
    ap.add_argument("--period-ms", type=float, default=50.0, help="monitor poll period")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(soak_seconds=a.soak_seconds, trials=a.trials, period_ms=a.period_ms)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    for d, v in r["latency"].items():
        print(f"deadline {d:>4} ms: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, "
              f"{v['within_bound']}/{v['trials']} within {v['bound_ms']} ms")
    print(f"soak {r['soak']['seconds']} s: {r['soak']['false_positives']} false positives")
    return 0


if __name__ == "__main__":
    sys.exit(main())

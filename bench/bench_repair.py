"""Repair vs the kernel's own answers, side by side in one run (JSON out).

Memory hog (a node with the sample service, a large stable cache and a growing hog):
  backdoors    the default rules: kill the process responsible for the growth;
  kernel_oom   no monitor: the cgroup memory limit and the kernel's OOM killer;
  largest_rss  a monitor with the "kill the largest process" policy (the kernel's and
               earlyoom's choice), triggered at the same memory mark as backdoors.
Fork bomb (the sample service and a process that forks now and then, under a pids limit):
  backdoors        the default rules: freeze, kill the lineage born since onset, thaw;
  pids_limit_only  the pids limit alone, watched for up to --wedge-cap-s seconds.

Shape: {"memory_hog": {"backdoors": R, "kernel_oom": R, "largest_rss": R},
        "fork_bomb": {"backdoors": F, "pids_limit_only": F}, "details": {...}}
R = {victim: "hog"|"cache"|"service"|null (the first to die), service_survived,
     cache_survived, max_progress_gap_ms}; F = {service_survived, wedged_ms (time a fork
inside the node failed), bomb_processes_left}. Both also carry what the scenario's
ground-truth watch saw, times in ms relative to the fault's start (the hog's or the
bomb's), at most SERIES_POINTS points each:
  progress_series  [[t_ms, counter], ...]  the service's progress counter (null while
                   its box was unreadable, i.e. the service gone);
  deaths_ms        {name: t_ms}  when a watched process was first seen dead
                   ("service", "cache", "hog"; "probe", "init" for the fork bomb);
  fork_series      (F only) [[t_ms, 1|0], ...]  whether a fork inside the node worked
                   (no point while the node was frozen).

    python bench/bench_repair.py [--json] [--wedge-cap-s 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from backdoors.scenarios.repair import run_fork_bomb, run_memory_hog
from backdoors.scenarios.watch import Recording, recording

R_KEYS = ("victim", "service_survived", "cache_survived", "max_progress_gap_ms")
F_KEYS = ("service_survived", "wedged_ms", "bomb_processes_left")
DETAIL_KEYS = ("detect_ms", "repair_ms", "hog_survived", "innocent_killed", "oom_kills",
               "probe_survived", "can_fork_after", "diagnosis")
SERIES_POINTS = 300


def series(rec: Recording) -> dict:
    """The time series of the scenario's watch (and fork probe), from its fault start:
    the window the scenario measured its progress gap over."""
    watch = rec.watches[-1] if rec.watches else None
    if watch is None or watch.window is None:
        return {}
    since, until = watch.window
    out = {"progress_series": watch.series(since, until, points=SERIES_POINTS),
           "deaths_ms": {name: round((t - since) * 1000, 1) for name, t in watch.died.items()}}
    if rec.probes:
        out["fork_series"] = rec.probes[-1].series(since, until, points=SERIES_POINTS)
    return out


def run(*, wedge_cap_s: float = 30.0, memory_mb: int = 512, cache_mb: float = 240,
        rate_mb: float = 40, pids_limit: int = 128) -> dict:
    memory, fork, details = {}, {}, {"memory_hog": {}, "fork_bomb": {}}
    for policy in ("backdoors", "kernel_oom", "largest_rss"):
        with recording() as rec:
            r = run_memory_hog(policy, memory_mb=memory_mb, cache_mb=cache_mb, rate_mb=rate_mb)
        memory[policy] = {k: r[k] for k in R_KEYS} | series(rec)
        details["memory_hog"][policy] = {k: r.get(k) for k in DETAIL_KEYS if k in r}
    for policy in ("backdoors", "pids_limit_only"):
        with recording() as rec:
            r = run_fork_bomb(policy, pids_limit=pids_limit, wedge_cap_s=wedge_cap_s)
        fork[policy] = {k: r[k] for k in F_KEYS} | series(rec)
        details["fork_bomb"][policy] = {k: r.get(k) for k in DETAIL_KEYS if k in r}
    return {"memory_hog": memory, "fork_bomb": fork, "details": details,
            "params": {"memory_limit_mb": memory_mb, "cache_mb": cache_mb,
                       "hog_rate_mb_s": rate_mb, "pids_limit": pids_limit,
                       "wedge_cap_s": wedge_cap_s}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a summary)")
    ap.add_argument("--wedge-cap-s", type=float, default=30.0,
                    help="how long the pids-limit-only baseline is watched (s)")
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--cache-mb", type=float, default=240)
    ap.add_argument("--rate-mb", type=float, default=40)
    ap.add_argument("--pids-limit", type=int, default=128)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(wedge_cap_s=a.wedge_cap_s, memory_mb=a.memory_mb, cache_mb=a.cache_mb,
            rate_mb=a.rate_mb, pids_limit=a.pids_limit)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    for case in ("memory_hog", "fork_bomb"):
        for policy, v in r[case].items():
            brief = {k: x for k, x in v.items() if not k.endswith("_series")}
            print(f"{case:10} {policy:16} {brief}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Non-intrusiveness: what being watched costs the watched service (JSON out).

1. System calls: `strace -c -f` of the sample service (every thread) for --seconds, not
   watched, then watched by a monitor polling its node at 100 Hz through the agent. The
   service only stores into its Sensor Box; the agent reads the region and /proc from
   outside. Expected: the same calls at the same rates, none attributable to watching.
2. Throughput: the service restarted with a busy main loop (--tick 0) counts progress
   ticks as fast as it can; ticks/s not watched vs watched at 100 Hz, alternated over
   --rounds pairs of --seconds windows, read from its box directly (not via the agent).

    python bench/bench_nonintrusive.py [--json] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from backdoors.monitor import Monitor
from backdoors.scenarios.labkit import AgentLab, unique_name

WATCH_PERIOD_MS = 10.0  # 100 Hz
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_counts(pid: int, seconds: float) -> dict[str, int]:
    """System calls of process `pid` (all threads) during `seconds`, from strace -c -f."""
    if shutil.which("strace") is None:
        raise RuntimeError("strace is not installed (make system-deps installs it)")
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        counts = {}
        for line in open(out.name):
            m = _ROW.match(line)
            if m and m.group(3) != "total":
                counts[m.group(3)] = int(m.group(1))
        return counts


def _ticks(reader) -> int:
    return next(s.value for s in reader.image().sensors if s.name == "progress")


def _rate(reader, seconds: float) -> float:
    a, t = _ticks(reader), time.monotonic()
    time.sleep(seconds)
    return (_ticks(reader) - a) / (time.monotonic() - t)


def run(*, seconds: float = 5.0, rounds: int = 3) -> dict:
    out: dict = {"watch_period_ms": WATCH_PERIOD_MS, "seconds": seconds}
    node = "n0"
    with AgentLab(unique_name("b"), nodes=1) as al:
        al.wait_registered(node)
        cfg = al.monitor_config(period_ms=WATCH_PERIOD_MS)
        svc = al.lab.service(node).pid

        plain = strace_counts(svc, seconds)
        with Monitor(cfg, key=al.monitor_key()) as mon:
            mon.wait_ready()
            polls0 = mon.status()["h0"]["polls"]
            t0 = time.monotonic()
            watched = strace_counts(svc, seconds)
            polls_per_s = (mon.status()["h0"]["polls"] - polls0) / (time.monotonic() - t0)
        names = sorted(set(plain) | set(watched))
        per_s = lambda c: {n: round(c.get(n, 0) / seconds, 1) for n in names}  # noqa: E731
        out["syscalls"] = {
            "unwatched_per_s": per_s(plain), "watched_per_s": per_s(watched),
            "total_per_s_unwatched": round(sum(plain.values()) / seconds, 1),
            "total_per_s_watched": round(sum(watched.values()) / seconds, 1),
            "only_when_watched": sorted(set(watched) - set(plain)),
            "monitor_polls_per_s": round(polls_per_s, 1),
        }

        al.restart_service(node, "--tick", "0")
        with al.lab.sensor_reader(node) as reader:
            unwatched, watched_rates = [], []
            for _ in range(rounds):
                unwatched.append(_rate(reader, seconds))
                mon = Monitor(cfg, key=al.monitor_key()).start()
                try:
                    mon.wait_ready()
                    watched_rates.append(_rate(reader, seconds))
                finally:
                    mon.stop()
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out["throughput"] = {
            "ticks_per_s_unwatched": round(mean(unwatched)),
            "ticks_per_s_watched": round(mean(watched_rates)),
            "watched_over_unwatched": round(mean(watched_rates) / mean(unwatched), 3),
            "rounds": rounds, "cpus": os.cpu_count(),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a summary)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(seconds=a.seconds, rounds=a.rounds)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    s, t = r["syscalls"], r["throughput"]
    print(f"syscalls/s unwatched {s['total_per_s_unwatched']}, watched {s['total_per_s_watched']}; "
          f"only when watched: {s['only_when_watched'] or 'none'}")
    print(f"ticks/s unwatched {t['ticks_per_s_unwatched']}, watched {t['ticks_per_s_watched']} "
          f"(x{t['watched_over_unwatched']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

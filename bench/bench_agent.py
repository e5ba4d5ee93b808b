"""Agent RPC latency while the node it serves suffers (JSON out).

A monitor-side client (in the lab's monitor namespace, over the private network) reads
the sample service's Sensor Box region with `read` (and the whole node with `sensors`,
the monitor's poll) while the node is idle, frozen (locked by the agent), memory-hogged
(a hog held just under the memory limit) and fork-bombed (a bomb against the pids
limit). Nothing repairs the node meanwhile. Latency is the client's round trip.

    python bench/bench_agent.py [--json] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from backdoors.lab import hogs
from backdoors.scenarios.labkit import AgentLab, unique_name
from backdoors.sensors import KERNEL_BOX

MiB = 1 << 20


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def _measure(client, node: str, region: str, size: int, seconds: float) -> dict:
    reads_ms, polls_ms = [], []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        t = time.perf_counter()
        data = client.read(node, region, 0, size)
        reads_ms.append((time.perf_counter() - t) * 1000)
        assert len(data) == size
        if i % 4 == 0:
            t = time.perf_counter()
            client.sensors(node)
            polls_ms.append((time.perf_counter() - t) * 1000)
    return {"reads": len(reads_ms), "read_p50_ms": _pct(reads_ms, 0.50), "read_p99_ms": _pct(reads_ms, 0.99),
            "read_max_ms": round(max(reads_ms), 3), "read_mean_ms": round(statistics.mean(reads_ms), 3),
            "sensors_p50_ms": _pct(polls_ms, 0.50), "sensors_p99_ms": _pct(polls_ms, 0.99)}


def _keep_hogging(al, node: str, memory_mb: int, stop) -> None:
    """Run memory hogs in `node` one after the other until `stop` is set."""
    argv = [sys.executable, "-m", "backdoors.lab.hogs", "memory", "--rate-mb", "400",
            "--cap-mb", str(memory_mb * 2)]
    hog = None
    try:
        while not stop.is_set():
            if hog is None or hog.poll() is not None:
                hog = al.lab.run_in_node(node, argv)
            stop.wait(0.02)
    finally:
        _kill(hog)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def run(*, seconds: float = 3.0, memory_mb: int = 512, pids_limit: int = 128) -> dict:
    """Latency of back-to-back region reads for `seconds` in each condition."""
    out: dict = {"seconds_per_condition": seconds, "memory_limit_mb": memory_mb,
                 "pids_limit": pids_limit}
    node = "n0"
    with AgentLab(unique_name("b"), nodes=1, memory_limit=memory_mb * MiB,
                  pids_limit=pids_limit) as al:
        al.wait_registered(node)
        n = al.lab.node(node)
        with al.agent_client("h0", timeout=5.0) as c:
            [region] = [r for r in c.regions(node) if r.name != KERNEL_BOX]
            conditions = {}
            _measure(c, node, region.name, region.size, 0.2)  # warm up the connection
            conditions["idle"] = _measure(c, node, region.name, region.size, seconds)

            c.lock(node, 60.0)
            try:
                assert n.stats().frozen
                conditions["frozen"] = _measure(c, node, region.name, region.size, seconds)
            finally:
                c.unlock(node)

            # Memory-hogged: a hog grows at 400 MB/s until the kernel OOM-kills it at the
            # limit, and is started again at once: the node lives at its limit.
            oom0 = n.stats().oom_kills
            stop = threading.Event()
            hogger = threading.Thread(target=_keep_hogging, args=(al, node, memory_mb, stop))
            hogger.start()
            try:
                end = time.monotonic() + 10
                while n.stats().memory_bytes < memory_mb * 0.9 * MiB and time.monotonic() < end:
                    time.sleep(0.02)
                conditions["memory_hog"] = _measure(c, node, region.name, region.size, seconds)
            finally:
                stop.set()
                hogger.join(20)
            conditions["memory_hog"]["oom_kills"] = n.stats().oom_kills - oom0

            bomb = al.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs", "forkbomb"])
            try:
                end = time.monotonic() + 10
                while n.stats().pids < pids_limit and time.monotonic() < end:
                    time.sleep(0.05)
                conditions["fork_bomb"] = _measure(c, node, region.name, region.size, seconds)
                conditions["fork_bomb"]["node_pids"] = n.stats().pids
                conditions["fork_bomb"]["bomb_processes"] = sum(
                    1 for p in n.processes() if p.comm == hogs.COMM["forkbomb"])
            finally:
                with n.locked(5.0):
                    for p in n.processes():
                        if p.comm == hogs.COMM["forkbomb"]:
                            n.kill(p.pid)
                _kill(bomb)
    for cond, m in conditions.items():
        out[f"read_p50_ms_{cond}"] = m["read_p50_ms"]
        out[f"read_p99_ms_{cond}"] = m["read_p99_ms"]
    out["conditions"] = conditions
    out["region_bytes"] = region.size
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of reads per condition")
    a = ap.parse_args(argv)
    r = run(seconds=a.seconds)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        for cond, m in r["conditions"].items():
            print(f"{cond:12} read p50 {m['read_p50_ms']:.3f} ms  p99 {m['read_p99_ms']:.3f} ms  "
                  f"sensors p99 {m['sensors_p99_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

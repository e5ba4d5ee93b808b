"""`backdoors bench` runs the benchmarks of the checkout it is installed from (editable),
and says in one line that it needs one otherwise; no root needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

NOT_FROM_A_CHECKOUT = """
import importlib.metadata, runpy

def nowhere(name):
    raise importlib.metadata.PackageNotFoundError(name)

importlib.metadata.distribution = nowhere  # as for a wheel: no direct_url.json
runpy.run_module("backdoors", run_name="__main__")
"""


def test_bench_runs_the_checkouts_benchmark_from_anywhere(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backdoors", "bench", "sensors",
                           "--number", "1000", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["progress_tick_ns"] > 0


def test_bench_without_a_checkout_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", NOT_FROM_A_CHECKOUT, "bench", "sensors"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "source checkout" in line and "make bench" in line


def test_bench_monitor_reports_cpu_and_detection_per_size(root, tmp_path):
    """One small lab per size; every row keyed by (nodes, mode), with sane values, and no
    lab left behind."""
    from backdoors.common.procs import alive
    from backdoors.errors import LabError
    from backdoors.lab.lab import STATE_FILE, LabState, running_labs
    from backdoors.lab.topology import RUN_ROOT

    def leftovers():
        """The bench's labs (bm<hex>) and namespaces left behind: a lab whose builder
        still runs is another bench's, running beside this test, not a leftover."""
        live, dead = set(), set()
        for name in running_labs():
            if name.startswith("bm"):
                try:
                    owner = LabState.load(RUN_ROOT / name / STATE_FILE).owner_pid
                except LabError:  # torn down meanwhile
                    continue
                (live if alive(owner) else dead).add(name)
        netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
        return dead | {n for n in netns if n.startswith("bd-bm") and n.split("-")[1] not in live}

    before = leftovers()
    done = subprocess.run([sys.executable, "-m", "backdoors", "bench", "monitor", "--json",
                           "--sizes", "1,2", "--seconds", "2", "--trials", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["machine"]["cpus"] >= 1
    assert [(r["nodes"], r["mode"]) for r in result["results"]] == [
        (1, "event"), (1, "poll"), (2, "event"), (2, "poll")]
    for r in result["results"]:
        assert r["errors"] == []
        assert r["trials"] == 2 and sum(r["detected_by"].values()) == 2
        assert r["monitor_cpu_pct"] >= 0 and r["agent_cpu_pct_per_node"] >= 0
        assert r["agent_idle_cpu_pct_per_node"] >= 0 and r["monitor_cpu_us_per_node_poll"] >= 0
        assert 0 < r["detect_p50_ms"] <= r["detect_p99_ms"]
        assert r["deadline_ms"] > 0
        assert r["steady_incidents"] == 0  # nothing was wrong in the steady window
        if r["mode"] == "event":  # the agents pushed; the monitor polled only as a fallback
            assert r["events_received"] > 0 and r["period_ms"] > 50.0
        else:
            assert r["events_received"] == 0 and r["detected_by"]["event"] == 0
            assert r["period_ms"] == 50.0
    assert not leftovers() - before


def test_bench_monitor_refuses_a_size_beyond_the_lab_s_limit(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backdoors", "bench", "monitor",
                           "--sizes", "8,500"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "1..128" in done.stderr and "Traceback" not in done.stderr

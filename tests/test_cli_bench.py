"""`backdoors bench` runs the benchmarks of the checkout it is installed from (editable),
and says in one line that it needs one otherwise; no root needed."""

from __future__ import annotations

import json
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

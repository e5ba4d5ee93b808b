"""`backdoors demo --scenario auction`: the auction site under load, a front end frozen,
its sessions moved with no request nor bid lost; results, incidents and the report
written; the site's lab gone after."""

import json
import subprocess
import sys
import uuid

import pytest

from backdoors.lab import topology
from backdoors.monitor.incidents import load_incidents
from backdoors.net import netns

pytestmark = pytest.mark.root


def test_demo_auction_end_to_end(root, tmp_path):
    name = "a" + uuid.uuid4().hex[:6]
    run = subprocess.run([sys.executable, "-m", "backdoors", "demo", "--scenario", "auction",
                          "--name", name, "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((out / "results.json").read_text())
    [s] = results["scenarios"]
    assert (s["name"], s["kind"], s["node"], s["passed"]) == ("auction", "recovery", "n0", True), s
    assert [c["ok"] for c in s["checks"]] == [True, True, True], s["checks"]
    assert s["sessions"] >= 1 and s["detect_ms"] is not None and s["recovery_ms"] is not None, s
    [inc] = [i for i in load_incidents(results["incidents"]) if i.id == s["incident"]]
    assert inc.node == "n0" and [(a.kind, a.status) for a in inc.actions
                                 if a.kind == "recover"] == [("recover", "done")], inc
    assert "Demo verdicts" in (out / "report.html").read_text()
    assert netns.names(topology.prefix(name)) == []


def test_demo_names_the_auction_among_its_scenarios(root):
    run = subprocess.run([sys.executable, "-m", "backdoors", "demo", "--scenario", "auctions"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "unknown scenario 'auctions'" in run.stderr and "auction" in run.stderr.split(
        "choose one of")[1], run.stderr

"""`backdoors demo --scenario vm`: a rootkit in a guest kernel healed, a memory hog and a
fork bomb and CPU runaways in the guest foreseen and killed from outside, the guest's
service answering
throughout; results, incidents and the report written; the lab gone after."""

import json
import subprocess
import sys
import uuid

import pytest

from backdoors.errors import VmError
from backdoors.lab import topology
from backdoors.monitor.incidents import load_incidents
from backdoors.net import netns
from backdoors.vm.kernel import GuestKernel

from conftest import unavailable

pytestmark = pytest.mark.root


def test_demo_vm_end_to_end(root, tmp_path):
    try:
        GuestKernel.find()
    except VmError as e:
        unavailable(str(e))
    name = "g" + uuid.uuid4().hex[:6]
    run = subprocess.run([sys.executable, "-m", "backdoors", "demo", "--scenario", "vm",
                          "--name", name, "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["scenarios"]}
    assert list(steps) == ["guest-rootkit", "guest-hog", "guest-fork-bomb", "guest-runaways"]
    for s in steps.values():
        assert (s["kind"], s["node"], s["passed"]) == ("repair", "v0", True), s
        assert s["checks"] and all(c["ok"] for c in s["checks"]), s["checks"]
    incidents = {i.id: i for i in load_incidents(results["incidents"])}
    assert {n: (incidents[s["incident"]].node, incidents[s["incident"]].rule)
            for n, s in steps.items()} == {"guest-rootkit": ("v0", "kernel-integrity"),
                                           "guest-hog": ("v0", "guest-unstable"),
                                           "guest-fork-bomb": ("v0", "guest-unstable"),
                                           "guest-runaways": ("v0", "guest-unstable")}
    bomb = next(a for a in incidents[steps["guest-fork-bomb"]["incident"]].actions
                if a.kind == "kill_guest_culprit")
    assert bomb.detail["culprit"]["by"] == "lineage" and bomb.detail["culprit"]["processes"] >= 16
    assert "Demo verdicts" in (out / "report.html").read_text()
    assert netns.names(topology.prefix(name)) == []

"""`backdoors demo --quick` end to end: verdicts pass, results and report are written,
the report's plots are real images, and the lab leaves nothing behind."""

import base64
import json
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from backdoors.lab import topology
from backdoors.net import netns

pytestmark = pytest.mark.root


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_demo_quick_end_to_end(root, tmp_path):
    name = "d" + uuid.uuid4().hex[:6]
    run = subprocess.run([sys.executable, "-m", "backdoors", "demo", "--quick",
                          "--name", name, "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["scenarios"]] == ["memory-hog", "freeze", "agent-restart",
                                                        "network"]
    assert all(s["passed"] for s in results["scenarios"])
    freeze = results["scenarios"][1]
    assert freeze["sessions_ok"] == freeze["sessions"] > 0
    assert Path(results["incidents"]).stat().st_size > 0

    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "file://" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # without benchmark JSON: the memory hog's repairing timeline and the recovery's stalls
    assert len(images) >= 2
    assert "Repairing timeline" in html and "Recovery is fast" in html
    for b64 in images:
        data = base64.b64decode(b64)
        w, h = png_size(data)
        assert w > 100 and h > 100 and len(data) > 5000
    assert netns.names(topology.prefix(name)) == []

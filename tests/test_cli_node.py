"""`backdoors node unfence|kill` act on a node of a running lab through its agent."""

import subprocess
import sys
import uuid

import pytest

from backdoors import net
from backdoors.lab import Lab

pytestmark = pytest.mark.root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "backdoors", *args],
                          capture_output=True, text=True, timeout=60)


def test_unfence_and_kill(root):
    name = "t" + uuid.uuid4().hex[:6]
    with Lab(name, hosts=1, nodes=1, agents=True) as lab:
        with lab.agent_client("h0") as c:
            c.call("fence", node="n0")
            info = {i.name: i for i in c.nodes()}["n0"]
            assert info.fenced and not net.link_info(lab.plan.node("n0").netns, "eth0").up
            r = cli("node", "unfence", "n0", "--lab", name)
            assert r.returncode == 0, r.stderr
            info = {i.name: i for i in c.nodes()}["n0"]
            assert not info.fenced and not info.locked_by
            assert net.link_info(lab.plan.node("n0").netns, "eth0").up
            r = cli("node", "kill", "n0", "--lab", name)
            assert r.returncode == 0 and "processes killed" in r.stderr, r.stderr
            assert lab.node("n0").processes() == []
            r = cli("node", "unfence", "n9", "--lab", name)
            assert r.returncode == 1 and "no reachable agent serves node 'n9'" in r.stderr

"""The fleet's own faults in the lab: a 3-member etcd losing a member (the fleet keeps
working, the member rejoins), a monitor cut off from etcd by an nftables rule (it goes
degraded, the other takes its nodes, it comes back once the cut is lifted), or from one
host's agent (the other, which reaches it, takes its nodes there); nothing left."""

import signal
from pathlib import Path

import psutil
import pytest
from test_fleet_support import etcd_required, until

from backdoors.fleet import EtcdClient, assign
from backdoors.lab import Lab
from backdoors.net import firewall, netns
from backdoors.nodes import cgroups
from backdoors.scenarios.labkit import unique_name

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _owners(lab):
    got = {}
    for h in lab.plan.hosts:
        with lab.agent_client(h.name) as c:
            got.update({f"{h.name}/{i.name}": i.owner for i in c.nodes()})
    return got


def _left(name: str) -> list:
    procs = [p.pid for p in psutil.process_iter(["cmdline"])
             if any(f"bd-{name}-" in a or f"/{name}/monitors/" in a
                    for a in (p.info["cmdline"] or []))]
    return procs + netns.names(f"bd-{name}-") + [
        str(p) for mount in cgroups.detect().hierarchies().values()
        for p in Path(mount).glob(f"bd-{name}-*")]


def test_a_three_member_etcd_loses_a_member_and_a_monitor_is_cut_off(root):
    etcd_required()
    if firewall.available() is None:
        from conftest import unavailable
        unavailable("nft is not installed (Debian: nftables; make system-deps)")
    name = unique_name("ff")
    ids = ("m1", "m2")
    lab = Lab(name, hosts=2, nodes=4, agents=True, services=False, monitors=ids, etcd=3)
    with lab:
        assert len(lab.state.etcd_endpoints) == 3 and lab.status()["etcd_members"]
        for m in ids:
            lab.start_monitor(m, rulesets=["default"], events=False, fleet_poll_ms=50.0)
        keys = [f"{n.host}/{n.name}" for n in lab.plan.nodes]
        want = assign(keys, ids)
        until(lambda: _owners(lab) == want, 60, "every node claimed", show=lambda: _owners(lab))

        # an etcd member killed: the two left are a quorum; a monitor's death is still seen
        lab.kill_etcd_member(0)
        lab.stop_monitor("m2", signal.SIGKILL)
        until(lambda: set(_owners(lab).values()) == {"m1"}, 60, "m2's nodes taken by m1",
              show=lambda: _owners(lab))
        lab.restart_etcd_member(0)
        with netns.enter(lab.plan.monitor_ns), EtcdClient(lab.state.etcd_endpoints[0]) as c:
            rev, _ = c.prefix("/backdoors/fleet/")
            assert rev > 0  # the member is back and answers from the cluster's data
        lab.start_monitor("m2", rulesets=["default"], events=False, fleet_poll_ms=50.0)
        until(lambda: _owners(lab) == want, 60, "m2 back with its share",
              show=lambda: _owners(lab))

        # m1 cut off from etcd: it says it is degraded, m2 takes its nodes; lifted, it is back
        log = lab.plan.run_dir / "monitors" / "m1.log"
        seen = log.stat().st_size
        lab.cut_monitor("m1")
        assert firewall.tables(lab.plan.monitor_ns) == ["backdoors_cut_m1"]
        until(lambda: "DEGRADED" in log.read_text(errors="replace")[seen:], 30,
              "m1 degraded")
        until(lambda: set(_owners(lab).values()) == {"m2"}, 60, "m1's nodes taken by m2",
              show=lambda: _owners(lab))
        lab.reconnect_monitor("m1")
        assert firewall.tables(lab.plan.monitor_ns) == []
        until(lambda: _owners(lab) == want, 60, "m1 back with its share",
              show=lambda: _owners(lab))

        # m1 cut off from h0's agent only: m2, which reaches it, takes m1's h0 nodes; m1
        # keeps its h1 nodes; lifted, m1 has its h0 nodes back
        lab.cut_monitor("m1", "h0")
        assert firewall.tables(lab.plan.monitor_ns) == ["backdoors_cuta_m1__h0"]
        apart = {k: ("m2" if k.startswith("h0/") else m) for k, m in want.items()}
        assert apart != want  # (m1 had nodes on h0)
        until(lambda: _owners(lab) == apart, 60, "m1's h0 nodes taken by m2",
              show=lambda: _owners(lab))
        lab.reconnect_monitor("m1", "h0")
        until(lambda: _owners(lab) == want, 60, "m1's h0 nodes back",
              show=lambda: _owners(lab))
        lab.cut_monitor("m1", "h1")  # left in place: the lab's teardown removes it
    assert _left(name) == []


def test_bad_cuts_are_refused_with_a_clear_error():
    from backdoors.errors import NetError
    with pytest.raises(NetError, match="table name"):
        firewall.cut("x", "bad-name", cgroup="bd-x", daddr="10.0.0.1", ports=[1])
    with pytest.raises(NetError, match="cgroup"):
        firewall.cut("x", "ok_name", cgroup="a/b", daddr="10.0.0.1", ports=[1])
    with pytest.raises(NetError, match="not an IPv4"):
        firewall.cut("x", "ok_name", cgroup="bd-x", daddr="nowhere", ports=[1])


def test_an_etcd_cluster_has_an_odd_number_of_members():
    from backdoors.errors import LabError
    with pytest.raises(LabError, match="odd number"):
        Lab(unique_name("ff"), etcd=2)

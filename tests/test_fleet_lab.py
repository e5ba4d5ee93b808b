"""The lab with a fleet: its own etcd on the private network, monitor processes sharing
its nodes, a killed monitor's nodes taken over; everything reaped with the lab."""

import json
import signal
import subprocess
import sys

import psutil
import pytest
from test_fleet_support import etcd_required, until

from backdoors.fleet import assign
from backdoors.lab import Lab
from backdoors.scenarios.labkit import unique_name
from backdoors.status import fleet_status, render_fleet, render_status, status_table

pytestmark = [pytest.mark.root, pytest.mark.slow]



def test_a_lab_fleet_shares_the_nodes_and_survives_a_monitor(root):
    etcd_required()
    name = unique_name("fl")
    ids = ("m1", "m2", "m3")
    lab = Lab(name, hosts=2, nodes=6, agents=True, services=False, monitors=ids, etcd=True)
    with lab:
        for m in ids:
            lab.start_monitor(m, rulesets=["default"], events=False)
        keys = [f"{n.host}/{n.name}" for n in lab.plan.nodes]

        def owners():
            got = {}
            for h in lab.plan.hosts:
                with lab.agent_client(h.name) as c:
                    got.update({f"{h.name}/{i.name}": i.owner for i in c.nodes()})
            return got
        want = assign(keys, ids)
        until(lambda: owners() == want, 60, "every node claimed by its monitor")
        lab.stop_monitor("m2", signal.SIGKILL)
        rest = assign(keys, ("m1", "m3"))
        until(lambda: owners() == rest, 60, "m2's nodes taken over by m1 and m3")
        assert lab.status()["etcd"] == lab.etcd_url
        # backdoors status: who watches each node, and the fleet's members and leases
        rows = status_table(lab=name)
        assert {f"{r['host']}/{r['node']}": r["owner"] for r in rows} == rest
        fleet = fleet_status(lab=name)
        assert set(fleet["members"]) == {"m1", "m3"}
        assert sum(m["nodes"] for m in fleet["members"].values()) == len(keys)
        hosts = sorted(h.name for h in lab.plan.hosts)
        assert all(m["reaches"] == hosts for m in fleet["members"].values())
        assert all(m["lease_left_s"] is not None and m["lease_left_s"] >= 0
                   for m in fleet["members"].values())
        from rich.console import Console
        console = Console(record=True, width=120)
        render_status(rows, console)
        render_fleet(fleet, console)
        text = console.export_text()
        assert "watched by" in text and "fleet (etcd revision" in text
        assert "reaches" in text and ", ".join(hosts) in text
        shown = json.loads(subprocess.run(
            [sys.executable, "-m", "backdoors", "status", "--lab", name, "--json"],
            capture_output=True, text=True, check=True).stdout)
        assert {f"{r['host']}/{r['node']}": r["owner"] for r in shown["nodes"]} == rest
        assert set(shown["fleet"]["members"]) == {"m1", "m3"}
    assert not [p for p in psutil.process_iter(["cmdline"])
                if any(f"bd-{name}-etcd" in a for a in (p.info["cmdline"] or []))]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if any(f"/{name}/monitors/" in a for a in (p.info["cmdline"] or []))]

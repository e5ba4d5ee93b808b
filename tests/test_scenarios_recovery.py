"""Session recovery end to end: agents, monitor, fault, clients verifying every byte."""

import json
import os
import signal

import pytest

from backdoors.lab import topology
from backdoors.net import netns
from backdoors.scenarios.labkit import unique_name
from backdoors.scenarios.recovery import recovery

pytestmark = pytest.mark.root


@pytest.mark.parametrize("fault", ["freeze", "crash", "network", "memory-hog"])
def test_every_session_continues_byte_exact(root, fault):
    name = unique_name("r")
    r = recovery(fault, sessions=6, name=name, watch_s=1.0)
    assert r["detected"], r
    assert r["recover_status"] == "done", r
    assert r["moved"] == 6
    assert r["sessions_ok"] == r["sessions"] == 6, r
    assert r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0, r
    assert r["broken_connections"] == 0, r
    assert netns.names(topology.prefix(name)) == []


@pytest.mark.parametrize("fault", ["agent-restart", "agent-stop"])
def test_sessions_survive_an_agent_restart_then_recover(root, fault):
    """The agent is SIGKILLed (or SIGSTOPped: its watchdog replaces it) while sessions
    stream; the new agent takes every session back from the fd store, and a node freeze
    afterwards still recovers every session byte-exact."""
    name = unique_name("r")
    r = recovery(fault, sessions=6, name=name, watch_s=1.0)
    assert r["sessions_held_at_first_answer"] == 6, r
    assert r["sessions_recovered_after_restart"] == 6, r
    assert r["agent_restart_ms"] > 0
    assert r["recover_status"] == "done" and r["moved"] == 6, r
    assert r["sessions_ok"] == 6 and r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0, r
    assert r["broken_connections"] == 0, r
    assert netns.names(topology.prefix(name)) == []


def test_sessions_move_on_after_the_agent_that_took_them_restarted(root):
    """Sessions move n0 -> n1; n1's agent is SIGKILLed and restarted by its keeper; then
    n1 freezes and the sessions move on to n2 with n0's service address (which the new
    agent must remember its node took over: it did not, and 0 sessions moved) and their
    stream offsets, byte-exact. A fence outlives a restart too."""
    import time

    from backdoors.errors import BackdoorsError
    from backdoors.lab import Lab, inject
    from backdoors.lab.agents import agent_pid
    from backdoors.lab.clients import StreamClients
    from backdoors.scenarios.labkit import wait_until
    from backdoors.scenarios.recovery import agent_fault, monitor_for

    sessions = 8
    with Lab(unique_name("r"), hosts=2, nodes=3, agents=True, services=False,
             pids_limit=512) as lab:
        for node in ("n0", "n1", "n2"):
            lab.start_service(node, "--rate", "16384", "--chunk", "1024", "--export-every",
                              "8192", "--deadline", "0.2", recoverable=True)
        with lab.agent_client("h0") as c:
            wait_until(lambda: any(k.startswith("rsvc") for k in c.sensors("n0").boxes), 10,
                       "the service's Sensor Box")
        with monitor_for(lab) as mon, StreamClients(
                lab, lab.plan.node("n0").vip, topology.RECOVERABLE_PORT, sessions) as clients:
            mon.wait_ready(timeout=10)

            def recovered(node: str, t0: float):
                inc = mon.wait_for(lambda i: i.node == node and i.detected >= t0 and any(
                    a.kind == "recover" for a in i.actions), 30)
                assert inc is not None, f"no recovery of {node}"
                return next(a for a in inc.actions if a.kind == "recover")

            with lab.agent_client("h0") as c:
                wait_until(lambda: len(c.call("sessions", node="n0")) == sessions, 30,
                           "the sessions held on n0")
            time.sleep(0.5)
            offsets, t_mono, t0 = clients.offsets(), time.monotonic(), time.time()
            inject(lab, "freeze", "n0")
            first = recovered("n0", t0)
            assert (first.status, first.detail["target"], first.detail["moved"]) == \
                ("done", "n1", sessions), first
            facts = agent_fault(lab, "n1", signal.SIGKILL, sessions, mon, 30)
            assert facts["sessions_held_at_first_answer"] == sessions, facts
            inject(lab, "freeze", "n1")
            second = recovered("n1", time.time() - 0.1)
            assert (second.status, second.detail["target"], second.detail["moved"]) == \
                ("done", "n2", sessions), json.dumps(second.detail, default=str)[:3000]
            time.sleep(1.0)
            report = clients.report(t_mono, offsets)
            # n1 is fenced now; its agent, restarted again, holds it still fenced by m1
            old = agent_pid(lab.plan, lab.plan.host("h1"))
            os.kill(old, signal.SIGKILL)

            def n1_seen_by_a_new_agent():
                try:
                    with lab.agent_client("h1", timeout=0.5) as c:
                        if c.ping().pid != old:
                            return next(n for n in c.nodes() if n.name == "n1")
                except (BackdoorsError, OSError):
                    return None
            n1 = wait_until(n1_seen_by_a_new_agent, 30, "a new agent of h1")
            assert n1.fenced and n1.locked_by == ["m1"], n1
    assert report["sessions_ok"] == report["sessions"] == sessions, report
    assert report["bytes_lost"] == 0 and report["bytes_duplicated"] == 0, report
    assert report["broken_connections"] == 0, report

"""A crashed server, its node healthy: the agent pushes the death at once (pidfd), the
monitor recovers the sessions byte-exact (to the restarted server of the same node, or to
another node), and sessions nobody adopts are closed at orphan_timeout_s, never kept."""

import signal
import socket
import time

import pytest

from backdoors.lab import Lab, topology
from backdoors.lab.clients import StreamClients
from backdoors.net import netns
from backdoors.scenarios.labkit import unique_name
from backdoors.scenarios.recovery import recovery
from test_agent_support import read_audit

pytestmark = pytest.mark.root


@pytest.mark.parametrize("restart", [True, False], ids=["same-node", "other-node"])
def test_server_death_is_pushed_and_its_sessions_continue(root, restart):
    name = unique_name("r")
    r = recovery("server-crash", 4, restart_server=restart, name=name, watch_s=1.0)
    assert r["detected"] and r["detected_by"] == "event", r
    assert r["rule"] == "server-died", r
    assert r["same_node"] is restart, r
    assert r["recover_status"] == "done", f"{r['recover_detail']} {r['error']} moved {r['moved']}"
    assert r["sessions_ok"] == 4 and r["bytes_lost"] == 0 and r["bytes_duplicated"] == 0, r
    assert r["broken_connections"] == 0, r
    assert r["other_incidents"] == [], r  # the node's other service stayed healthy
    assert r["http_ok"] == r["http_sessions"] == 2, r  # unmodified curl, byte-exact
    assert r["moved"] == 4 + 2, r
    assert netns.names(topology.prefix(name)) == []


def test_recovery_scenario_has_the_server_crash_fault(root):
    r = recovery("server-crash", sessions=2, watch_s=0.5)
    assert r["fault"] == "server-crash" and r["detected_by"] == "event", r
    assert r["sessions_ok"] == 2 and r["broken_connections"] == 0, r


def test_orphans_nobody_adopts_are_closed(root, monkeypatch):
    monkeypatch.setenv("BACKDOORS_LAB_ORPHAN_TIMEOUT_S", "1")
    with Lab(unique_name("o"), hosts=1, nodes=1, agents=True, services=False) as lab:
        svc = lab.start_service("n0", recoverable=True)
        vip = lab.plan.node("n0").vip
        with netns.enter(lab.plan.client_ns):  # a client with input the server never reads
            talker = socket.create_connection((vip, topology.RECOVERABLE_PORT), timeout=5)
        talker.sendall(b"a request nobody will answer")
        with lab.agent_client("h0") as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as clients:
            end = time.monotonic() + 30
            while len(c.call("sessions", node="n0")) < 4:
                assert time.monotonic() < end, "sessions not held"
                time.sleep(0.05)
            lab.node("n0").kill(svc.pid, signal.SIGKILL)
            end = time.monotonic() + 30
            while not all(s.broken for s in clients.sessions):
                assert time.monotonic() < end, "clients of a dead server still hang"
                time.sleep(0.05)
            assert {s.broken for s in clients.sessions} == {"EOF"}  # FIN after its output
            talker.settimeout(10)
            with pytest.raises(ConnectionResetError):  # it had sent input: RST
                while talker.recv(65536):
                    pass
            talker.close()
            assert c.call("sessions", node="n0") == []
        audit = read_audit(lab.plan.run_dir / "audit-h0.jsonl")
        closed = [a for a in audit if a.get("kind") == "orphans_closed"]
        assert len(closed) == 1 and closed[0]["fin"] == 3 and closed[0]["rst"] == 1, closed
        assert any(a.get("kind") == "owner_died" for a in audit)


REPLACEMENT_RULES = """
[[rule]]
name = "server-died"
detectors = [{ kind = "sessions_orphaned" }]
diagnosis = { kind = "none" }
actions = [{ kind = "recover", same_node_wait_ms = 0 }]
clear_ms = 0
cooldown_ms = 0
"""


def test_a_replacement_slower_than_the_wait_is_not_fenced_but_gets_the_sessions(root):
    """The server dies while its replacement is starting (here: 2 s late on purpose, as a
    loaded machine makes a Python server): the recover action does not give the node up
    when `same_node_wait_ms` (0 here) ends, since a process that started around the death
    runs in the node; the replacement gets the sessions, the clients see nothing."""
    import subprocess
    import sys

    from backdoors.monitor import Monitor, parse_ruleset

    rules = parse_ruleset(REPLACEMENT_RULES).rule
    with Lab(unique_name("w"), hosts=1, nodes=1, agents=True, services=False) as lab:
        svc = lab.start_service("n0", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0") as c, \
                Monitor(lab.monitor_config(), key=lab.monitor_key("m1"), rules=rules) as mon, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as clients:
            assert all(f.connected.wait(10) for f in mon.followers)
            end = time.monotonic() + 30
            while len(c.call("sessions", node="n0")) < 3:
                assert time.monotonic() < end, "sessions not held"
                time.sleep(0.05)
            late = lab.run_in_node("n0", ["sh", "-c", f"sleep 2; exec {sys.executable} -m "
                                          f"backdoors.lab.recoverable --name rsvc-n0 --port "
                                          f"{topology.RECOVERABLE_PORT}"],
                                   stdout=subprocess.DEVNULL)
            lab.node("n0").kill(svc.pid, signal.SIGKILL)
            inc = mon.wait_for(lambda i: i.rule == "server-died" and i.actions, 30)
            assert inc is not None, mon.incidents()
            (act,) = inc.actions
            assert act.status == "done", act
            assert act.detail["same_node"] is True and act.detail["moved"] == 3, act
            assert act.detail["waited_for"]["pid"] in (late.pid, *lab.node("n0").cgroup.procs())
            assert not any(s.broken for s in clients.sessions)
            assert not lab.node("n0").is_locked()  # never fenced
            late.kill()
            late.wait()

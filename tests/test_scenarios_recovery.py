"""Session recovery end to end: agents, monitor, fault, clients verifying every byte."""

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

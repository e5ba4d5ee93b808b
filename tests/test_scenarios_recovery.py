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

"""A hostile node's root against its own host's agent: every attack fails.

One lab (the scenario's: one host, n0 hostile, n1 streaming two recoverable sessions, a
reader asking the agent for n1's sensors every 20 ms) for the per-attack tests; each runs
one attack program inside n0 as its root and asserts it had no effect, plus what the node
saw. The last test runs the whole scenario on its own lab.
"""

import json
import uuid

import pytest

from backdoors.scenarios.hostile import ATTACKS, Hostile, hostile_node

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def hostile():
    from conftest import needs_root
    needs_root()  # skipped without root locally, a failure in CI
    with Hostile("y" + uuid.uuid4().hex[:6]) as h:
        yield h


def attack(h: Hostile, name: str) -> str:
    """Run attack `name`; it must have failed; its detail. The agent kept answering."""
    result = ATTACKS[name](h)
    assert not result.succeeded, result.detail
    assert not h.reader.errors, h.reader.errors
    return result.detail


def test_signals_to_every_visible_pid_and_to_the_agents_pid(hostile):
    detail = attack(hostile, "signal-all")
    assert '"kill": "sent"' in detail  # kill -KILL -1 reached the node's own processes only
    assert '"ESRCH"' in detail and f'"{hostile.agent}": "ESRCH"' in detail


def test_ptrace_process_vm_readv_and_proc_mem_of_the_agent(hostile):
    detail = attack(hostile, "ptrace-and-mem")
    for what in ('"attach": "ESRCH"', '"seize": "ESRCH"', '"process_vm_readv": "ESRCH"',
                 '"mem": "ENOENT"'):
        assert what in detail


def test_cgroupfs_writes_and_own_mounts(hostile):
    detail = attack(hostile, "cgroupfs")
    assert '"written"' not in detail and '"made"' not in detail


def test_the_agents_and_the_neighbours_cgroup_files_cannot_be_read(hostile):
    detail = attack(hostile, "cgroup-reads")
    assert '"read": 0' in detail and '"refused": ["ENOENT"]' in detail


def test_renice_ioprio_oom_score_adj_of_the_agent(hostile):
    detail = attack(hostile, "priority")
    assert '"renice": "ESRCH"' in detail and '"oom_score_adj": "ENOENT"' in detail


def test_the_private_network_is_unreachable(hostile):
    detail = attack(hostile, "private-network")
    assert "connected" not in detail and "7700" in detail
    # no address, route or forwarding of its own: the netns belongs to the host's user ns
    assert detail.count("Operation not permitted") == 2 and '"ip_forward": "EACCES"' in detail


def test_10000_malformed_registration_frames(hostile):
    detail = attack(hostile, "registration-malformed-flood")
    assert '"sent": 10000' in detail and "exceeds 65536" in detail


def test_thousands_of_registration_connections(hostile):
    detail = attack(hostile, "registration-connection-flood")
    facts = json.loads(detail.split(" -- ", 1)[1].rsplit(" (", 1)[0])
    assert facts["opened"] == 3000 and facts["kept_open_by_agent"] <= 64, facts
    # meanwhile the neighbour registered a new box: its socket and cap are its own
    assert '"neighbour_registration": "accepted"' in detail


def test_huge_unsealed_shrinking_and_foreign_memfds(hostile):
    detail = attack(hostile, "registration-bad-memfds")
    assert '"wrongly_accepted": []' in detail
    assert '"shrink_after": "EPERM"' in detail and "not sealed against shrinking" in detail
    assert "the cap is" in detail and "not a memfd" in detail


def test_another_nodes_names_and_socket(hostile):
    before = sorted(r.name for r in _regions(hostile, "n1"))
    detail = attack(hostile, "registration-other-node")
    assert '"victim_socket": "ENOENT"' in detail and "unknown field `node`" in detail
    assert sorted(r.name for r in _regions(hostile, "n1")) == before


def test_descriptor_exhaustion_is_capped(hostile):
    detail = attack(hostile, "descriptor-exhaustion")
    assert "more than 64 file descriptors" in detail and "the cap is 64" in detail


def test_filling_disk_and_memory_at_once(hostile):
    detail = attack(hostile, "fill-disk-and-memory")
    assert "memory limit" in detail  # the hog met the node's own limit
    # /tmp and the run directory are the node's own bounded tmpfs: full, the host's untouched
    assert detail.count('"stopped_by": "ENOSPC"') >= 2, detail


def test_socket_buffers_beyond_the_nodes_memory(hostile):
    """Data queued in TCP connections the node never reads is kernel memory: it must stop
    at the node's own memory limit, not drain the host's TCP pool."""
    detail = attack(hostile, "socket-buffers")
    facts = json.loads(detail.split(" -- ", 1)[1].rsplit(" (", 1)[0])
    assert facts["queued_mib"] <= facts["bound_mib"] < facts["limit_mib"] + 32, facts
    assert facts["stopped_by"].startswith("no more room"), facts


def test_the_neighbour_stayed_healthy_through_all_of_it(hostile):
    healthy, facts = hostile.neighbour_healthy()
    assert healthy, facts
    assert hostile.reader.latencies and not hostile.reader.errors


def _regions(h: Hostile, node: str):
    with h.lab.agent_client(h.host, timeout=5.0) as c:
        return c.regions(node)


def test_the_whole_scenario(root):
    name = "z" + uuid.uuid4().hex[:6]
    out = hostile_node(name)
    assert out["succeeded"] == 0, [a for a in out["attacks"] if a["succeeded"]]
    assert len(out["attacks"]) == len(ATTACKS)
    assert out["agent_answered_throughout"], out["agent_read_errors"]
    assert out["agent_read_p99_ms"] is not None and out["agent_reads"] > 10
    assert out["other_node_healthy"], out["other_node"]
    with open("/proc/self/mountinfo") as f:  # the nodes' run directory tmpfs are gone
        assert f"/run/backdoors/{name}" not in f.read()

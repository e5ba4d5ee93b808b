"""The agent owns VM nodes: the lab runs each QEMU inside its node as an unprivileged uid;
the agent reads the guest kernel from its RAM into the node's `guest` box, pushes a hung
guest kernel (vCPUs stopped behind its back) and a dead QEMU as events, and its node lock
stops and resumes the guest's vCPUs through QMP."""

import os
import signal
import time
import uuid

import psutil
import pytest

from backdoors.errors import VmError
from backdoors.lab import Lab
from backdoors.nodes import Node
from backdoors.sensors import parse_box
from backdoors.vm.kernel import GuestKernel

from conftest import unavailable
from test_agent_events import _subscribe, _until

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    try:
        GuestKernel.find()
    except VmError as e:
        unavailable(str(e))
    with Lab("w" + uuid.uuid4().hex[:6], hosts=1, nodes=1, services=False, agents=True,
             vm_nodes=1) as lab:
        yield lab


class _Client:
    """lab.agent_client with the `client()` shape test_agent_events' helpers use."""

    def __init__(self, lab):
        self.lab = lab

    def client(self):
        return self.lab.agent_client("h0", timeout=10.0)


def _guest(c) -> dict[str, float]:
    return {s.name: s.value for s in parse_box(c.sensors("v0").boxes["guest"]).sensors}


def _eventually(check, limit: float = 30.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_qemu_runs_inside_its_node_as_an_unprivileged_uid(lab):
    vm, plan = lab.vm("v0"), lab.plan.vm("v0")
    node = Node.open("v0", plan.cgroup)
    assert node.cgroup.procs() == [vm.pid]  # its memory, threads and CPU are the node's
    uids = psutil.Process(vm.pid).uids()
    assert uids.real == uids.effective == lab.vm_uid("v0") >= 1 << 30
    assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino == os.stat(f"/run/netns/{plan.netns}").st_ino


def test_the_agent_reads_the_guest_kernel_and_locks_it_by_its_vcpus(lab):
    vm = lab.vm("v0")
    with lab.agent_client("h0", timeout=10.0) as c:
        assert "v0" in [n.name for n in c.nodes()]
        first = _guest(c)
        assert first["tasks"] >= 3 and 0 < first["available_mb"] < 256 and first["threads"] >= 1
        assert _eventually(lambda: _guest(c)["jiffies"] > first["jiffies"])
        # the node lock: the vCPUs stop (QEMU answers on), the guest kernel stops ticking
        c.lock("v0", 30.0)
        try:
            assert not vm.running()
            held = _guest(c)["jiffies"]
            time.sleep(0.3)
            assert _guest(c)["jiffies"] == held
        finally:
            c.unlock("v0")
        assert vm.running()
        assert _eventually(lambda: _guest(c)["jiffies"] > held)


def test_a_hung_guest_kernel_is_pushed_at_its_deadline(lab):
    """vCPUs stopped behind the agent's back (not its lock): the guest's jiffies stall, and
    the watcher pushes one violation after the 1 s deadline, one `cleared` after."""
    vm = lab.vm("v0")
    key = lab.agent_keys("h0")[0]
    reply, sock = _subscribe(_Client(lab), kinds=["violation", "cleared"])
    time.sleep(0.3)
    stopped = time.monotonic()
    vm.lock()
    try:
        v = _until(sock, key, {"violation"})
        assert time.monotonic() - stopped >= 0.9  # the deadline, less one guest tick
        d = v.data
        assert (v.node, d["detector"], d["box"], d["sensor"]) == \
            ("v0", "progress_stalled", "guest", "jiffies")
        assert d["deadline_ms"] == 1000 and d["owner_pid"] == vm.pid
    finally:
        vm.unlock()
    c = _until(sock, key, {"cleared"})
    assert (c.node, c.data["box"], c.data["sensor"]) == ("v0", "guest", "jiffies")
    sock.close()


def test_a_dead_qemu_is_pushed_at_its_death(lab):
    """The guest box is owned by the QEMU: SIGKILL it and the stall is pushed at once
    (`reason` "died"), long before the deadline. Runs last: the guest is gone after."""
    vm = lab.vm("v0")
    key = lab.agent_keys("h0")[0]
    reply, sock = _subscribe(_Client(lab), kinds=["violation"])
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(vm.pid, signal.SIGKILL)
    v = _until(sock, key, {"violation"})
    assert time.monotonic() - killed < 1.0
    assert (v.node, v.data["box"], v.data["sensor"], v.data["reason"]) == \
        ("v0", "guest", "jiffies", "died")
    sock.close()


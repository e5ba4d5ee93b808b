"""Node: run inside (cgroup + netns), lock/unlock, kill, limits and stats, on the real kernel."""

import os
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from pyroute2 import netns as pyroute2_netns
from test_nodes_support import (
    COUNTER,
    FORKER,
    PY,
    SPAWNER,
    alive,
    prefix,
    read_counter,
    require_freezer,
    wait_for,
)

from backdoors.errors import NodeError
from backdoors.nodes import Node, NodeStats, cgfs, read_process, subtree

__all__ = ["prefix"]  # the fixture, imported for pytest
pytestmark = pytest.mark.root

FREEZERS = ["v1", "v2"]


@pytest.fixture
def netns(root, unique):
    """A named netns made the way the net package makes them (someone else's, to enter)."""
    name = f"bdt-{unique}"
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        pyroute2_netns.remove(name)


def _in_cgroup(pid: int, node: Node) -> bool:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return text.count(f":/{node.cgroup.relpath}\n") == len(node.cgroup.paths)


# -- run --------------------------------------------------------------------------------


def test_run_puts_the_child_and_its_forks_in_the_node(prefix):
    node = Node.create("n", f"{prefix}/n0")
    child = node.run(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        comms = lambda: sorted(p.comm for p in node.processes())  # noqa: E731
        wait_for(lambda: comms() == ["sh", "sleep", "sleep"], what="sh to fork two sleeps")
        pids = node.cgroup.procs()
        assert child.pid in pids
        assert all(_in_cgroup(pid, node) for pid in pids)
        assert os.getsid(child.pid) == child.pid  # new_session
        table = node.processes()
        assert subtree(table, child.pid) == set(pids)
        assert not _in_cgroup(os.getpid(), node)
    finally:
        node.destroy()
        child.wait()


def test_run_enters_the_netns(prefix, netns):
    node = Node.create("n", prefix, netns=netns)
    out = node.run(["readlink", "/proc/self/ns/net"], stdout=subprocess.PIPE).communicate()[0]
    assert out.decode().strip() == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
    assert os.readlink("/proc/self/ns/net") != out.decode().strip()  # the parent stayed
    node.destroy()


def test_run_refuses_what_cannot_work(prefix):
    with pytest.raises(NodeError, match="does not exist"):
        Node.create("n", prefix, netns=f"{prefix}-nonexistent")
    node = Node.create("n", prefix)
    with pytest.raises(NodeError, match="cannot run"):
        node.run([f"/nonexistent/{prefix}"])
    with node.locked():
        with pytest.raises(NodeError, match="locked"):
            node.run(["true"])
    node.destroy()
    with pytest.raises(NodeError, match="was removed"):
        node.run(["true"])


def test_run_reports_a_child_that_could_not_join(prefix):
    """setns on a file that is not a namespace fails in the child: reported, not hidden."""
    bogus = Path(f"/run/netns/{prefix}-bogus")
    bogus.parent.mkdir(exist_ok=True)
    bogus.touch()
    try:
        node = Node.create("n", prefix, netns=bogus.name)
        with pytest.raises(NodeError, match="could not join"):
            node.run(["true"])
        assert node.cgroup.procs() == []
    finally:
        bogus.unlink()


# -- lock -------------------------------------------------------------------------------


def _loaded_node(prefix, freezer, tmp_path, forkers=4):
    require_freezer(freezer)
    node = Node.create("n", prefix, freezer=freezer, pids_limit=200)
    counter = tmp_path / "counter"
    children = [node.run([PY, "-c", COUNTER, str(counter)])]
    children += [node.run([PY, "-c", FORKER]) for _ in range(forkers)]
    wait_for(lambda: read_counter(counter) > 0, what="the counter to start")
    return node, counter, children


@pytest.mark.parametrize("freezer", FREEZERS)
def test_lock_under_load_stops_everything(prefix, freezer, tmp_path):
    node, counter, children = _loaded_node(prefix, freezer, tmp_path)
    try:
        for _ in range(3):
            with node.locked(timeout=1.0):
                assert node.is_locked() and node.stats().frozen
                before = (read_counter(counter), node.cgroup.procs(), node.cgroup.cpu_seconds())
                time.sleep(0.1)
                after = (read_counter(counter), node.cgroup.procs(), node.cgroup.cpu_seconds())
                assert after[:2] == before[:2]  # no progress, no fork, no exit
                assert after[2] == pytest.approx(before[2], abs=0.005)
            assert not node.is_locked()
            at = read_counter(counter)
            wait_for(lambda: read_counter(counter) > at, what="progress after unlock")
    finally:
        node.destroy()
        for child in children:
            child.wait()


def test_lock_timeout_thaws_back_v1(prefix, tmp_path):
    """With no time to freeze 8 busy forking processes on 2 cores, lock gives up and thaws."""
    node, counter, children = _loaded_node(prefix, "v1", tmp_path, forkers=8)
    try:
        failures = 0
        for _ in range(20):  # a lucky instant freeze is possible, 20 in a row is not
            try:
                node.lock(timeout=0)
                node.unlock()
            except NodeError as e:
                assert "would not lock" in str(e) and "thawed back" in str(e)
                failures += 1
                assert not node.is_locked()
        assert failures > 0
        at = read_counter(counter)
        wait_for(lambda: read_counter(counter) > at, what="progress after a failed lock")
    finally:
        node.destroy()
        for child in children:
            child.wait()


def test_lock_timeout_thaws_back_v2(prefix, tmp_path):
    """A node that cannot freeze in time is thawed back and the lock refused. Its tasks
    held by the v1 freezer cannot enter the v2 freezer's trap, whatever the time given
    (20 tries with no time to freeze busy processes were once all frozen: a loaded host
    left the test itself that long between its write and its read). Needs both freezers
    (hybrid hosts)."""
    require_freezer("v1")
    node, counter, children = _loaded_node(prefix, "v2", tmp_path, forkers=2)
    held = node.cgroup._v1_dir("freezer") / "freezer.state"
    try:
        cgfs.write(held, "FROZEN")
        with pytest.raises(NodeError, match="would not lock.*thawed back"):
            node.lock(timeout=0.2)
        assert not node.is_locked()  # its v2 freeze taken back
        cgfs.write(held, "THAWED")
        at = read_counter(counter)
        wait_for(lambda: read_counter(counter) > at, what="progress after a failed lock")
    finally:
        cgfs.write(held, "THAWED")
        node.destroy()
        for child in children:
            child.wait()


def test_locked_thaws_on_error(prefix):
    node = Node.create("n", prefix)
    with pytest.raises(RuntimeError):
        with node.locked():
            raise RuntimeError("repair failed")
    assert not node.is_locked()
    node.destroy()


# -- kill -------------------------------------------------------------------------------


def test_kill_only_processes_of_the_node(prefix):
    node = Node.create("n", prefix)
    child = node.run(["sleep", "60"])
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: node.cgroup.procs() == [child.pid])
        with pytest.raises(NodeError, match="not in node"):
            node.kill(outsider.pid)
        with pytest.raises(NodeError, match="not in node"):
            node.kill(os.getpid())
        info = read_process(child.pid)
        with pytest.raises(NodeError, match="reused"):
            node.kill(child.pid, start_time=info.start_time - 1.0)
        assert alive(child.pid) and alive(outsider.pid)
        assert node.kill(child.pid, signal.SIGTERM, start_time=info.start_time) is True
        assert child.wait(timeout=5) == -signal.SIGTERM
        assert node.kill(child.pid) is False  # gone
    finally:
        outsider.kill()
        outsider.wait()
        node.destroy()


@pytest.mark.parametrize("freezer", FREEZERS)
def test_kill_tree_takes_descendants_and_spares_the_rest(prefix, freezer):
    require_freezer(freezer)
    node = Node.create("n", prefix, freezer=freezer, pids_limit=100)
    bystander = node.run(["sleep", "60"])
    nested = node.run(["sh", "-c", "sh -c 'sleep 60 & wait' & wait"])  # sh -> sh -> sleep
    spawner = node.run([PY, "-c", SPAWNER])  # forks long-lived children continuously
    try:
        wait_for(lambda: len(node.cgroup.procs()) >= 10, 30, what="the spawner to fork")
        # and the nested tree whole: on a busy machine its sleep can come much later
        wait_for(lambda: len(subtree(node.processes(), nested.pid)) >= 3, 30,
                 what="sh -> sh -> sleep")
        for top in (nested.pid, spawner.pid):
            killed = node.kill_tree(top)
            assert top in killed and len(killed) >= 3
            assert not any(alive(pid) for pid in killed)
        assert not node.is_locked()
        assert node.cgroup.procs() == [bystander.pid]
        with pytest.raises(NodeError, match="not in node"):
            node.kill_tree(os.getpid())
    finally:
        node.destroy()
        for child in (bystander, nested, spawner):
            child.wait()


@pytest.mark.parametrize("freezer", FREEZERS)
def test_kill_while_locked(prefix, freezer):
    """A v1-frozen task ignores SIGKILL until thawed (it dies on unlock); a v2-frozen one dies."""
    require_freezer(freezer)
    node = Node.create("n", prefix, freezer=freezer)
    single = node.run(["sleep", "60"])
    tree = node.run(["sh", "-c", "sleep 60 & wait"])
    try:
        wait_for(lambda: sorted(p.comm for p in node.processes()) == ["sh", "sleep", "sleep"])
        node.lock()
        assert node.kill(single.pid) is True
        victims = node.kill_tree(tree.pid)
        assert len(victims) == 2 and node.is_locked()
        if freezer == "v1":
            time.sleep(0.1)
            assert all(alive(pid) for pid in [single.pid, *victims])  # kill pending
            node.unlock()
        assert single.wait(timeout=5) == -signal.SIGKILL
        assert tree.wait(timeout=5) == -signal.SIGKILL
        wait_for(lambda: node.cgroup.procs() == [], what="the tree to die")
        assert node.is_locked() == (freezer == "v2")
    finally:
        node.destroy()


@pytest.mark.parametrize("freezer", FREEZERS)
def test_kill_all_a_continuously_forking_node(prefix, freezer):
    require_freezer(freezer)
    node = Node.create("n", prefix, freezer=freezer, pids_limit=60)
    spawners = [node.run([PY, "-c", SPAWNER]) for _ in range(2)]
    try:
        wait_for(lambda: node.cgroup.pids_current() >= 20, what="the spawners to fork")
        killed = node.kill_all()
        assert {s.pid for s in spawners} <= set(killed)
        assert node.cgroup.procs() == [] and not node.is_locked()
        assert [s.wait(timeout=5) for s in spawners] == [-signal.SIGKILL] * 2
    finally:
        node.destroy()


# -- limits and stats -------------------------------------------------------------------


def test_memory_limit_gets_the_hog_oom_killed(prefix):
    node = Node.create("n", prefix, memory_limit=64 << 20)
    assert node.stats().oom_kills == 0
    hog = node.run([PY, "-c", "data = b'x' * (256 << 20)"], stderr=subprocess.DEVNULL)
    assert hog.wait(timeout=20) == -signal.SIGKILL
    stats = node.stats()
    assert stats.oom_kills >= 1 and stats.memory_limit == 64 << 20
    node.destroy()


def test_pids_limit_makes_fork_fail(prefix):
    node = Node.create("n", prefix, pids_limit=10)
    code = (
        "import os, sys, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "    except BlockingIOError:\n"
        "        print(n, flush=True); sys.stdin.read(); break\n"
        "    n += 1\n"
    )
    child = node.run([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert int(child.stdout.readline()) == 9  # itself + 9 children = 10 tasks
        assert node.stats().pids == 10
        node.set_limits(pids=None)
        assert node.stats().pids_limit is None
    finally:
        node.destroy()
        child.wait()


def test_stats_and_pressure(prefix, tmp_path):
    node = Node.create("n", prefix, memory_limit=256 << 20, pids_limit=50)
    counter = tmp_path / "counter"
    child = node.run([PY, "-c", COUNTER, str(counter)])
    try:
        wait_for(lambda: node.stats().cpu_seconds > 0.05, what="CPU time to accrue")
        stats = node.stats()
        assert isinstance(stats, NodeStats)
        assert stats.memory_bytes > 0 and stats.memory_limit == 256 << 20
        assert stats.pids == 1 and stats.pids_limit == 50
        assert stats.oom_kills == 0 and stats.frozen is False
        if node.cgroup.layout.v2 is not None:
            assert set(stats.pressure) == {"memory", "cpu", "io"}
            assert {"some_avg10", "some_total_us", "full_avg10"} <= set(stats.pressure["cpu"])
        decoded = msgspec.json.decode(msgspec.json.encode(stats), type=NodeStats)
        assert decoded == stats
        info = node.processes()[0]
        assert info.pid == child.pid and info.cpu_seconds > 0 and info.rss_bytes > 0
        node.set_limits(memory=None)  # pids untouched
        assert node.stats().memory_limit is None and node.stats().pids_limit == 50
    finally:
        node.destroy()
        child.wait()


def test_open_an_existing_node(prefix):
    created = Node.create("n", prefix, pids_limit=7)
    opened = Node.open("n", prefix)
    assert opened.stats().pids_limit == 7
    opened.destroy()
    with pytest.raises(NodeError, match="does not exist"):
        Node.open("n", prefix)
    created.destroy()  # idempotent

"""The agent's RPC ops against real nodes: reads, sensors, processes, locks, kills, limits."""

import json
import os
import time

import msgspec
import pytest
from test_agent_support import GROWER, agent_lab, prefix, read_line, wait_for
from test_nodes_support import COUNTER, FORK_BOMB, alive, read_counter, require_freezer

from backdoors.agent import AgentClient
from backdoors.agent.errors import BoundsError, BusyError, NotFoundError, RemoteError
from backdoors.agent.ops import Op
from backdoors.agent.protocol import MAX_IO, ProcessTable
from backdoors.net import netns
from backdoors.sensors import KERNEL_SENSORS, SensorTracker, parse_box

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root

MiB = 1 << 20


def test_ping_and_nodes(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    c = lab.client()
    pong = c.ping()
    assert pong.host == "h0" and abs(pong.time - time.time()) < 5
    infos = {n.name: n for n in c.nodes()}
    assert set(infos) == {"n0", "n1"}
    assert infos["n0"].frozen is False and infos["n0"].locked_by == []
    assert infos["n0"].sample_age_s < 1.0
    with pytest.raises(NotFoundError, match="no node 'nope'") as err:
        c.status("nope")
    assert err.value.code == "no_such_node"


def test_kernel_sensors_report_memory_and_pids(agent_lab):
    lab = agent_lab(nodes={"n0": {"memory_limit": 256 * MiB, "pids_limit": 50}})
    lab.start_app("n0")
    lab.run("n0", GROWER, "40")
    c = lab.client()

    def kernel():
        return {s.name: s for s in parse_box(c.sensors("n0").boxes["kernel"]).sensors}

    sensors = wait_for(lambda: (k := kernel())["memory_mb"].value > 40 and k, timeout=10,
                       what="memory_mb to show the grower's 40 MiB")
    assert sensors["memory_mb"].max == pytest.approx(256 * 0.8)
    # tasks: the app's main thread and its agent watch (it registers again with a restarted
    # agent), and the grower
    assert sensors["pids"].value == 3 and sensors["pids"].max == pytest.approx(45)
    assert {"forks", "fork_failures", "oom_kills", "psi_memory_some", "psi_cpu_some",
            "psi_io_some"} <= set(sensors)
    # the names and types the monitor's rules are checked against
    assert {n: s.type for n, s in sensors.items()} == \
        {n: t for n, t in KERNEL_SENSORS.items() if n in sensors}
    assert sensors["forks"].value >= 1  # the grower appeared after the first sample
    tracker = SensorTracker()
    snap = tracker.update(parse_box(c.sensors("n0").boxes["kernel"]))
    assert not snap.violations


def test_kernel_sensors_see_fork_failures_and_follow_new_limits(agent_lab):
    lab = agent_lab(nodes={"n0": {"pids_limit": 10}})
    from test_nodes_support import SPAWNER

    lab.run("n0", SPAWNER)
    c = lab.client()
    def value(name):
        return {s.name: s for s in parse_box(c.sensors("n0").boxes["kernel"]).sensors}[name]

    wait_for(lambda: value("fork_failures").value > 50, timeout=10, what="failed forks")
    assert value("pids").value == 10 and c.status("n0").fork_failures > 50
    assert c.set_limits("n0", pids=200).pids_limit == 200
    wait_for(lambda: value("pids").max == pytest.approx(180), what="the new pids threshold")
    assert value("fork_failures").value > 50  # counters carried over to the new box


# Registers two boxes, then breaks them from inside: one's magic is overwritten, the
# other's generation stays odd (a writer that died while adding a sensor, or a hostile one).
BREAKER = """
import sys, time
from backdoors.sensors import SensorBox
from backdoors.common.runtime import register_box
bad, stuck = SensorBox.create("bad"), SensorBox.create("stuck")
register_box(bad)
register_box(stuck)
bad._mm[0:4] = b"EVIL"
stuck._words[3] = stuck._words[3] + 1
print("broken", flush=True)
time.sleep(300)
"""


def test_sensors_returns_every_box_and_reports_broken_ones(agent_lab):
    lab = agent_lab()
    lab.start_app("n0", "svc")
    c = lab.client()
    reply = c.sensors("n0")
    assert set(reply.boxes) == {"kernel", "svc"} and reply.errors == {}
    t0 = parse_box(reply.boxes["svc"]).sensors[0].value
    wait_for(lambda: parse_box(c.sensors("n0").boxes["svc"]).sensors[0].value > t0,
             what="the service's ticks to show")
    read_line(lab.run("n0", BREAKER))
    start = time.monotonic()
    reply = c.sensors("n0")
    assert time.monotonic() - start < 0.5
    assert set(reply.boxes) == {"kernel", "svc"}
    assert "not a Sensor Box" in reply.errors["bad"]
    assert "did not settle" in reply.errors["stuck"]
    assert c.read("n0", "bad", 0, 4) == b"EVIL"  # raw reads still work


def test_metrics_count_requests(agent_lab):
    from prometheus_client import generate_latest

    lab = agent_lab()
    c = lab.client()
    c.ping()
    with pytest.raises(NotFoundError):
        c.read("n0", "nothere", 0, 1)
    text = generate_latest(lab.agent.agent.metrics.registry).decode()
    assert 'backdoors_agent_rpc_total{op="ping",result="ok"} 1.0' in text
    assert 'backdoors_agent_rpc_total{op="read",result="no_such_region"} 1.0' in text
    assert 'backdoors_agent_sample_seconds{node="n0"}' in text


def test_read_is_bounds_checked(agent_lab):
    lab = agent_lab()
    lab.start_app("n0", "svc")
    c = lab.client()
    size = {r.name: r.size for r in c.regions("n0")}["svc"]
    assert c.read("n0", "svc", 0, 4) == b"BDSB"
    assert len(c.read("n0", "svc", size - 8, 8)) == 8
    assert c.read("n0", "svc", size, 0) == b""
    for offset, length in ((-1, 4), (0, -1), (size - 3, 4), (size, 1), (0, size + 1),
                           (2**62, 8), (0, MAX_IO + 1), (-(2**63), 2**63 - 1), (1, 2**63 - 1)):
        with pytest.raises(BoundsError) as err:
            c.read("n0", "svc", offset, length)
        assert err.value.code == "out_of_bounds", (offset, length)
    with pytest.raises(NotFoundError) as err:
        c.read("n0", "nothere", 0, 1)
    assert err.value.code == "no_such_region"


def test_write_only_to_writable_regions(agent_lab):
    lab = agent_lab()
    proc, reply = lab.start_app("n0", "svc", mailbox=True)
    c = lab.client()
    with pytest.raises(BoundsError) as err:
        c.write("n0", "svc", 0, b"evil")
    assert err.value.code == "not_writable"
    assert c.read("n0", "svc", 0, 4) == b"BDSB"
    with pytest.raises(BoundsError, match="outside"):
        c.write("n0", "mailbox", 4090, b"12345678")
    assert c.write("n0", "mailbox", 0, b"\x01hello\x00\x02") == 8
    assert json.loads(read_line(proc)) == {"mailbox": "0168656c6c6f0002"}  # the app saw it
    assert c.read("n0", "mailbox", 0, 8) == b"\x01hello\x00\x02"


# Registers a writable memfd, then sets O_APPEND on its open file description (which the
# agent's descriptor shares); on a line from stdin, prints its size and first 8 bytes.
APPENDING = r"""
import fcntl, json, os, sys
from backdoors.common.runtime import register_region
fd = os.memfd_create("mbox", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 4096)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
register_region(fd, "mbox", writable=True, timeout=5)
fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
print(json.dumps("appending"), flush=True)
sys.stdin.readline()
print(json.dumps({"size": os.fstat(fd).st_size, "head": os.pread(fd, 8, 0).hex()}), flush=True)
"""


def test_a_write_lands_at_its_offset_even_if_the_node_set_o_append(agent_lab):
    """Outside review: the agent's descriptor of a region shares the node's open file
    description; a node that set O_APPEND on it after registering made every monitor
    write land at the end of the memfd (Linux pwrite with O_APPEND), growing it, while
    the op said it was written at its offset."""
    import subprocess
    lab = agent_lab()
    proc = lab.run("n0", APPENDING, stdin=subprocess.PIPE)
    try:
        assert json.loads(read_line(proc)) == "appending"
        c = lab.client()
        for _ in range(10):
            assert c.write("n0", "mbox", 0, b"\x01hello\x00\x02") == 8
        assert c.read("n0", "mbox", 0, 8) == b"\x01hello\x00\x02"
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert json.loads(read_line(proc)) == {"size": 4096, "head": "0168656c6c6f0002"}
    finally:
        proc.kill()
        proc.wait()

def test_processes_shows_age_rss_and_growth(agent_lab):
    lab = agent_lab()
    app, _ = lab.start_app("n0", "svc")
    time.sleep(1.1)  # the app's own start-up growth leaves the 1 s rate window
    grower = lab.run("n0", GROWER, "200")
    c = lab.client()
    time.sleep(0.6)
    table = c.processes("n0")
    rows = {r.pid: r for r in table.rows}
    assert set(rows) == {app.pid, grower.pid} and table.total == 2 and not table.truncated
    assert rows[app.pid].registered and not rows[grower.pid].registered
    assert rows[grower.pid].rss_rate > 20 * MiB, rows[grower.pid]
    assert abs(rows[app.pid].rss_rate) < 5 * MiB
    assert 0.5 < rows[grower.pid].age_s < 10 and rows[grower.pid].comm.startswith("python")
    assert rows[grower.pid].rss_bytes > 20 * MiB


# Prints "ready", then on each line of stdin forks a child that runs 0.3 s and reaps it,
# printing "reaped".
REAPER = """
import os, sys, time
print("ready", flush=True)
for _ in sys.stdin:
    if (child := os.fork()) == 0:
        time.sleep(0.3)
        os._exit(0)
    os.waitpid(child, 0)
    print("reaped", flush=True)
"""


def test_processes_tells_since_when_a_process_reaped_a_child(agent_lab):
    """`reaped_s`: None until the agent's table shows the process's reaped children's
    page faults rise (it reaped a child that ran), then the seconds since."""
    import subprocess
    lab = agent_lab()
    proc = lab.run("n0", REAPER, stdin=subprocess.PIPE)
    c = lab.client()

    def row():
        return next(r for r in c.processes("n0").rows if r.pid == proc.pid)

    try:
        assert read_line(proc).strip() == "ready"
        time.sleep(0.5)  # tables of it, as it is
        before = row()
        assert before.reaped_s is None, before
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert read_line(proc).strip() == "reaped"
        reaped = wait_for(lambda: row().reaped_s is not None and row(), timeout=10,
                          what="the reap in the agent's table")
        assert reaped.child_faults > before.child_faults and 0 <= reaped.reaped_s < 10, reaped
        time.sleep(0.3)
        assert row().reaped_s > reaped.reaped_s  # since then: it reaped nothing more
    finally:
        proc.kill()
        proc.wait()


# Registers a Sensor Box named argv[1], then forks a child that registers argv[1] + "-kid";
# prints "ready" once both are registered, then holds.
FAMILY = """
import os, sys, time
from backdoors.sensors import SensorBox
from backdoors.common.runtime import register_box
box = SensorBox.create(sys.argv[1])
register_box(box)
r, w = os.pipe()
if os.fork() == 0:
    kid = SensorBox.create(sys.argv[1] + "-kid")
    register_box(kid)
    os.write(w, b"x")
    time.sleep(300)
    os._exit(0)
os.read(r, 1)
print("ready", flush=True)
time.sleep(300)
"""


def test_the_service_is_the_first_registrant_and_what_descends_from_it(agent_lab):
    """`registered` (what diagnosis spares) is the node's service: the first process to
    register while none ran, and its descendants that register; a process registering
    beside it is not. Once the service ends, the next process to register is."""
    lab = agent_lab()
    service = lab.run("n0", FAMILY, "svc")
    assert read_line(service).strip() == "ready"
    intruder, _ = lab.start_app("n0", "intruder")
    c = lab.client()

    def registered() -> dict[int, bool]:
        return {r.pid: r.registered for r in c.processes("n0").rows}

    rows = {r.pid: r for r in c.processes("n0").rows}
    [kid] = [pid for pid, r in rows.items() if r.ppid == service.pid]
    owners = {r.pid for r in c.regions("n0") if r.name != "kernel"}
    assert owners == {service.pid, kid, intruder.pid}
    assert registered() == {service.pid: True, kid: True, intruder.pid: False}
    service.kill()
    os.kill(kid, 9)
    service.wait(10)
    # no service runs: every running registrant counts, until another registers
    wait_for(lambda: registered() == {intruder.pid: True}, what="the service's end")
    app, _ = lab.start_app("n0", "svc2")
    assert registered() == {app.pid: True, intruder.pid: False}


# Starts 5 threads, then (its boot clock between, on stdout) 7 more; holds them, and
# 3 children that exited, not reaped.
THREADS = r"""
import os, threading, time
hold = threading.Event()
def start(n):
    for _ in range(n):
        threading.Thread(target=hold.wait, daemon=True).start()
start(5)
time.sleep(0.3)
print(time.clock_gettime(time.CLOCK_BOOTTIME), flush=True)
time.sleep(0.3)
start(7)
for _ in range(3):
    if os.fork() == 0:
        os._exit(0)
time.sleep(0.2)
print("ready", flush=True)
hold.wait()
"""


def test_processes_counts_the_threads_a_process_started_lately(agent_lab):
    """threads_within_s: each row's young_threads, its threads (not its first) started
    within the last that many seconds, and unreaped, its zombies; none asked, none
    counted; a negative age refused."""
    lab = agent_lab()
    proc = lab.run("n0", THREADS)
    between = float(read_line(proc))
    assert read_line(proc).strip() == "ready"
    c = lab.client()
    row = {r.pid: r for r in c.processes("n0").rows}[proc.pid]
    assert row.threads == 13 and row.young_threads == 0 and row.unreaped == 0
    within = time.clock_gettime(time.CLOCK_BOOTTIME) - between
    row = {r.pid: r for r in c.processes("n0", threads_within_s=within).rows}[proc.pid]
    assert row.young_threads == 7 and row.unreaped == 3, row
    row = {r.pid: r for r in c.processes("n0", threads_within_s=3600).rows}[proc.pid]
    assert row.young_threads == 12, row
    with pytest.raises(RemoteError) as err:
        c.processes("n0", threads_within_s=-1)
    assert err.value.code == "bad_request" and "threads_within_s" in str(err.value)

    class OlderArgs(msgspec.Struct, forbid_unknown_fields=True):  # before threads_within_s
        node: str
        cmdline: bool = False
        comms: list[str] = []
        hashed: bool = True

    agent = lab.agent.agent
    new = agent.ops["processes"]
    asked = []
    agent.ops["processes"] = Op("processes", OlderArgs, lambda call: asked.append(call.args)
                                or ProcessTable([], 0, False))
    try:  # an older agent refuses the field: asked again without it
        assert c.processes("n0", cmdline=True, threads_within_s=1.0).rows == []
        assert asked == [OlderArgs("n0", cmdline=True)]
    finally:
        agent.ops["processes"] = new


def test_a_running_fork_bombs_table_comes_within_the_op_deadline(agent_lab):
    """Reading a forking process's command line waits for its memory map lock (16 s for
    one read, measured under a bomb): the table comes anyway, within the op deadline,
    the rows not read in time left empty; with the node locked, every row is read."""
    lab = agent_lab(nodes={"n0": {"pids_limit": 128}})
    lab.run("n0", FORK_BOMB)
    c = lab.client()
    try:
        wait_for(lambda: c.status("n0").stats.pids >= 100, 20, "the bomb at its limit")
        for _ in range(3):  # the agent's op deadline (1 s) ends a table that waits
            assert len(c.processes("n0", cmdline=True).rows) >= 50
        c.lock("n0", 30)
        rows = c.processes("n0", cmdline=True).rows
        assert rows and all(r.cmdline and r.exe_sha256 for r in rows if r.state != "Z"), \
            [r for r in rows if not r.cmdline and r.state != "Z"][:3]
    finally:
        lab.nodes["n0"].kill_all(10)
        c.unlock("n0")


def test_lock_freezes_and_the_lease_expiry_thaws(agent_lab, tmp_path):
    lab = agent_lab()
    counter = tmp_path / "count"
    lab.run("n0", COUNTER, str(counter))
    wait_for(lambda: read_counter(counter) > 0, what="the counter to run")
    c = lab.client()
    # a lease long enough that a loaded machine does not end it between these calls
    reply = c.lock("n0", 10.0)
    assert reply.locked_by == ["m1"] and not reply.renewed
    status = c.status("n0")
    assert status.stats.frozen and status.lock.locked_by == ["m1"]
    assert 0 < status.lock.lease_left_s <= 10.0 and not status.lock.fenced
    before = read_counter(counter)
    time.sleep(0.2)
    assert read_counter(counter) == before  # frozen: no progress
    assert c.lock("n0", 0.4).renewed  # the holder renews, for a short lease this time

    def released():  # the expiry thaws, then forgets the lease: both, in a moment
        status = c.status("n0")
        return not status.stats.frozen and status.lock.locked_by == []

    wait_for(released, timeout=20, what="the lease to expire and the node to thaw")
    wait_for(lambda: read_counter(counter) > before, what="the counter to run again")
    assert any(a["kind"] == "lease_expired" and a["ok"] for a in lab.audit())


@pytest.mark.parametrize("freezer", ["v1", "v2"])
def test_lock_works_with_either_freezer(agent_lab, freezer):
    require_freezer(freezer)
    lab = agent_lab(nodes={"n0": {"freezer": freezer}}, node_n0={"freezer": freezer})
    app, _ = lab.start_app("n0")
    c = lab.client()
    c.lock("n0", 5)
    assert c.status("n0").stats.frozen
    assert lab.agent.agent.nodes["n0"].node.cgroup.freezer == freezer
    c.kill("n0", app.pid)  # v1-frozen tasks die at the thaw; v2-frozen ones at once
    c.unlock("n0")
    app.wait(5)


def test_a_fence_holds_until_its_holder_unlocks(agent_lab):
    lab = agent_lab()
    lab.start_app("n0")
    m1, m2 = lab.client("m1"), lab.client("m2")
    assert m1.lock("n0", None).lease_s is None
    time.sleep(0.3)
    status = m1.status("n0")
    assert status.stats.frozen and status.lock.fenced and status.lock.lease_left_s is None
    for attempt in (lambda: m2.lock("n0", 1.0), lambda: m2.unlock("n0"),
                    lambda: m2.kill_node("n0")):
        with pytest.raises(BusyError, match="locked by m1, fenced"):
            attempt()
    # Reads still work while frozen.
    assert m2.read("n0", "app", 0, 4) == b"BDSB" and "app" in m2.sensors("n0").boxes
    assert m1.unlock("n0").was_locked
    assert not m1.status("n0").stats.frozen


RT_HOG = """
import os, sys, time
os.sched_setaffinity(0, {0})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
print("on", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def test_a_fence_waits_for_a_node_denied_the_cpu_to_freeze(agent_lab):
    """The node's task must get a CPU to stop: a real-time hog on the only CPU it may use
    holds that off for 2 s, twice the agent's op deadline. The fence waits (FENCE_S)
    rather than giving up and thawing the node back (it failed recoveries under load)."""
    import subprocess
    import sys
    lab = agent_lab()
    app, _ = lab.start_app("n0")
    for tid in os.listdir(f"/proc/{app.pid}/task"):
        os.sched_setaffinity(int(tid), {0})
    hog = subprocess.Popen([sys.executable, "-c", RT_HOG, "2.0"], stdout=subprocess.PIPE,
                           text=True)
    try:
        assert hog.stdout.readline() == "on\n"
        reply = lab.client().fence("n0")
        assert reply.frozen_ms > 0
        assert lab.client().status("n0").stats.frozen
    finally:
        hog.kill()
        hog.wait()
    assert lab.client().unfence("n0").was_locked
    assert not lab.client().status("n0").stats.frozen


def test_unlock_force_overrides_another_monitors_lock(agent_lab):
    lab = agent_lab()
    m1, m2 = lab.client("m1"), lab.client("m2")
    m1.lock("n0", None)
    assert m2.unlock("n0", force=True).was_locked
    assert not m1.status("n0").stats.frozen and m1.status("n0").lock.locked_by == []


def test_stopping_the_agent_thaws_leases_but_keeps_fences(agent_lab):
    lab = agent_lab(nodes={"leased": {}, "fenced": {}})
    c = lab.client()
    c.lock("leased", 60)
    c.lock("fenced", None)
    c.close()
    lab.agent.stop()
    lab.agent = None
    assert not lab.nodes["leased"].is_locked()
    assert lab.nodes["fenced"].is_locked()  # fail-stop fencing survives the agent
    lab.nodes["fenced"].unlock()


def test_kill_a_process_and_refuse_one_outside_the_node(agent_lab):
    lab = agent_lab()
    app, _ = lab.start_app("n0")
    other, _ = lab.start_app("n0", "other")
    c = lab.client()
    start = {r.pid: r.start_time for r in c.processes("n0").rows}
    with pytest.raises(RemoteError, match="pid was reused") as err:
        c.kill("n0", app.pid, start_time=start[app.pid] + 5)
    assert err.value.code == "failed" and alive(app.pid)
    assert c.kill("n0", app.pid, start_time=start[app.pid]) is True
    app.wait(5)
    assert alive(other.pid)
    with pytest.raises(RemoteError, match="not in node n0"):
        c.kill("n0", os.getpid())
    with pytest.raises(RemoteError, match="not a valid process id") as err:
        c.kill("n0", 0)
    assert err.value.code == "bad_request"


def test_kill_tree_and_kill_node(agent_lab):
    lab = agent_lab()
    app, _ = lab.start_app("n0")
    tree = lab.nodes["n0"].run(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    lab.procs.append(tree)
    wait_for(lambda: len(lab.nodes["n0"].cgroup.procs()) == 4, what="the tree")
    c = lab.client()
    killed = c.kill_tree("n0", tree.pid)
    assert len(killed) == 3 and tree.pid in killed
    tree.wait(5)
    assert lab.nodes["n0"].cgroup.procs() == [app.pid]
    assert c.kill_node("n0") == [app.pid]
    app.wait(5)
    wait_for(lambda: lab.nodes["n0"].cgroup.procs() == [], what="an empty node")


def test_protected_processes_are_refused(agent_lab):
    lab = agent_lab(node_n0={"protected_comms": ["sleep"]})
    sleeper = lab.nodes["n0"].run(["sleep", "60"])
    tree = lab.nodes["n0"].run(["sh", "-c", "sleep 61 & wait"])
    lab.procs += [sleeper, tree]
    # Protection is by comm: wait until both have exec'd (a forked child keeps its parent's
    # comm until then) and the tree's sleep runs.
    def comms():
        return sorted(p.comm for p in lab.nodes["n0"].processes())
    wait_for(lambda: comms() == ["sh", "sleep", "sleep"], what="the processes")
    c = lab.client()
    with pytest.raises(RemoteError, match=r"\(sleep\) of node n0 is protected"):
        c.kill("n0", sleeper.pid)
    with pytest.raises(RemoteError, match="protected"):
        c.kill_tree("n0", tree.pid)
    assert alive(sleeper.pid) and alive(tree.pid)


def test_set_limits(agent_lab):
    lab = agent_lab()
    c = lab.client()
    reply = c.set_limits("n0", memory=128 * MiB, pids=77)
    assert (reply.memory_limit, reply.pids_limit) == (128 * MiB, 77)
    assert c.set_limits("n0", pids=None).pids_limit is None  # removed
    assert c.set_limits("n0").memory_limit == 128 * MiB  # kept
    stats = c.status("n0").stats
    assert stats.memory_limit == 128 * MiB and stats.pids_limit is None
    with pytest.raises(RemoteError, match=">= 0") as err:
        c.set_limits("n0", pids=-1)
    assert err.value.code == "bad_request"


def test_the_listener_can_live_in_a_private_netns(agent_lab, unique):
    name = f"bdt-{unique}"
    netns.create(name)
    try:
        lab = agent_lab(netns=name, listen="127.0.0.1:0")
        port = lab.agent.address[1]
        with pytest.raises(Exception):  # nothing listens on the host's loopback
            AgentClient(("127.0.0.1", port), "m1", lab.keys["m1"], timeout=0.5).ping()
        inside = lab.client(netns=name)
        assert inside.ping().host == "h0"
        lab.agent.stop()
        lab.agent = None
    finally:
        netns.remove(name)



RENAMED_HOG = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: any comm it likes
hog = [bytearray(1 << 20) for _ in range(32)]
print("ready", flush=True)
time.sleep(300)
"""


def test_a_hog_naming_itself_after_a_protected_process_is_killed(agent_lab):
    """Issue 10, finding 12: protection is by the executable (an installed, root-owned
    file of that name, or a `protected_exes` path), not by the comm a process sets."""
    import sys

    from backdoors.monitor.diagnosis import MemoryHogDiagnosis, memory_hog
    lab = agent_lab(node_n0={"protected_comms": ["sshd", "sleep"]})
    hog = lab.run("n0", RENAMED_HOG, "sshd")
    assert read_line(hog).strip() == "ready"
    sleeper = lab.nodes["n0"].run(["sleep", "60"])
    lab.procs.append(sleeper)
    c = lab.client()
    wait_for(lambda: {r.comm for r in c.processes("n0").rows} == {"sshd", "sleep"},
             what="both processes")
    rows = {r.pid: r for r in c.processes("n0").rows}
    only = c.processes("n0", comms=["sleep", "nothing"])  # a pre-armed scan's table
    assert [r.pid for r in only.rows] == [sleeper.pid] and only.total == len(rows)
    assert only.rows[0].exe_sha256 == rows[sleeper.pid].exe_sha256 != ""
    assert rows[hog.pid].comm == "sshd" and rows[hog.pid].exe == os.path.basename(
        os.path.realpath(sys.executable))
    assert rows[sleeper.pid].exe == "sleep"
    # the monitor's diagnosis does not spare it for its comm either
    cfg = MemoryHogDiagnosis(min_rate_mb_s=0.0, protect_comms=["sshd"])
    hogrow = rows[hog.pid]
    assert [t.pid for t in memory_hog(cfg, [msgspec_replace(hogrow, rss_rate=50 << 20)])
            .culprits] == [hog.pid]
    c.kill("n0", hog.pid)
    hog.wait(5)
    with pytest.raises(RemoteError, match=r"\(sleep\) of node n0 is protected"):
        c.kill("n0", sleeper.pid)
    assert alive(sleeper.pid)
    sleeper.kill()


def msgspec_replace(row, **changes):
    import msgspec
    return msgspec.structs.replace(row, **changes)

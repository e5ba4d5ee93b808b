"""The agent daemon process: hardening, its own cgroup, clean shutdown, config errors."""

import os
import signal
import subprocess
import time

import msgspec
import pytest
from test_agent_support import PY, agent_lab, daemon, prefix

from backdoors.agent.membership import read_cgroups
from backdoors.errors import NodeError
from backdoors.nodes import Cgroup

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root


CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    return bool(int(_status_field(os.getpid(), "CapEff"), 16) >> cap & 1)


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":"))


def test_the_daemon_hardens_itself_and_cleans_up_on_sigterm(agent_lab):
    lab = agent_lab(nodes={"leased": {}, "fenced": {}}, start=False)
    with daemon(lab) as (proc, ready):
        assert ready["event"] == "ready" and ready["pid"] == proc.pid and ready["host"] == "h0"
        c = lab.client()
        assert c.ping().pid == proc.pid
        # Its own cgroup, outside the nodes, in every hierarchy.
        cgroups = read_cgroups(proc.pid)
        own = f"/{lab.prefix}-agent"
        assert cgroups["freezer"] == own and cgroups["memory"] == own
        assert cgroups["unified"] == own and cgroups["pids"] == own
        with open(f"/proc/{proc.pid}/oom_score_adj") as f:
            oom_score_adj = f.read().strip()
        # Lowering it needs CAP_SYS_RESOURCE, which some sandboxes withhold: then a warning.
        assert oom_score_adj == ("-1000" if _has_cap(CAP_SYS_RESOURCE) else "0")
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == -10
        assert int(_status_field(proc.pid, "VmLck").split()[0]) > 0  # mlockall took
        app, _ = lab.start_app("leased")
        assert "app" in c.sensors("leased").boxes
        c.lock("leased", 60)
        c.lock("fenced", None)
        sockets = [lab.socket_path(n) for n in lab.nodes]
        assert all(os.path.exists(s) for s in sockets)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr.read().decode()
        assert ("cannot set oom_score_adj" in stderr) != (oom_score_adj == "-1000"), stderr
    assert not any(os.path.exists(s) for s in sockets)
    # the node directories stay (a node may have them bound in); only the sockets go
    assert all(os.path.isdir(os.path.dirname(s)) for s in sockets)
    assert not Cgroup(f"{lab.prefix}-agent", lab.nodes["leased"].cgroup.layout).exists()
    assert not lab.nodes["leased"].is_locked()  # a lease is released at exit...
    assert lab.nodes["fenced"].is_locked()  # ...a fence is not
    lab.nodes["fenced"].unlock()
    kinds = [a["kind"] for a in lab.audit()]
    assert kinds[0] == "start" and kinds[-1] == "stop" and "lease_released" in kinds


def test_a_restarted_daemon_replaces_stale_sockets(agent_lab):
    lab = agent_lab(start=False)
    with daemon(lab) as (proc, _):
        proc.kill()  # no cleanup: the socket file and the cgroup stay behind
        proc.wait()
    assert os.path.exists(lab.socket_path("n0"))
    with daemon(lab) as (proc, _):
        assert lab.client().ping().pid == proc.pid
        _, reply = lab.start_app("n0")
        assert reply["box"]["name"] == "app"


def test_a_second_agent_of_the_host_leaves_the_first_running(agent_lab):
    """Outside review: a second `backdoors agent` with the same config joined the first's
    cgroup, failed on the taken address, and on its way out destroyed the cgroup, which
    SIGKILLs what is in it: the running agent. Now it leaves the cgroup to the first."""
    lab = agent_lab(start=False)
    with daemon(lab) as (proc, _):
        path = os.path.join(lab.tmp, "agent.toml")
        second = subprocess.run([PY, "-m", "backdoors", "agent", "--config", path],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert "holds other processes" in second.stderr
        assert proc.poll() is None and lab.client().ping().pid == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert not Cgroup(f"{lab.prefix}-agent", lab.nodes["n0"].cgroup.layout).exists()


def test_a_sigterm_while_the_agent_starts_removes_its_cgroup(agent_lab):
    """Outside review: SIGTERM (or SIGINT) between the agent's entering its own cgroup
    and its event loop taking the signal killed it there, and the cgroup stayed."""
    from test_agent_support import to_toml
    lab = agent_lab(start=False)
    path = os.path.join(lab.tmp, "agent.toml")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(to_toml(lab.config))
    own = Cgroup(f"{lab.prefix}-agent", lab.nodes["n0"].cgroup.layout)
    proc = subprocess.Popen([PY, "-m", "backdoors", "agent", "--config", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def entered() -> bool:
        try:
            return proc.pid in own.procs()
        except NodeError:  # not made in every hierarchy yet
            return False
    try:
        end = time.monotonic() + 30
        while not entered():
            assert time.monotonic() < end and proc.poll() is None, "the agent in its cgroup"
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, 128 + signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not own.exists()


def test_a_bad_config_exits_2_naming_the_problem(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('host = "h0"\nlisten = 7\n')
    out = subprocess.run([PY, "-m", "backdoors", "agent", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"{path}:2: key listen: Expected `str`, got `int`" in out.stderr


def test_a_missing_key_file_or_audit_folder_exits_2_before_anything_starts(agent_lab):
    """Outside review: they stopped the agent with status 1 once it had started (its
    cgroup made, its sockets set up), where the README says a bad config exits 2."""
    from test_agent_support import to_toml
    lab = agent_lab(start=False)
    path = os.path.join(lab.tmp, "agent.toml")
    for change, said in ((dict(key_file=os.path.join(lab.tmp, "none.key")), "none.key"),
                         (dict(audit_log=os.path.join(lab.tmp, "no", "audit.jsonl")),
                          "its folder does not exist")):
        config = msgspec.structs.replace(lab.config, **change)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(to_toml(config))
        out = subprocess.run([PY, "-m", "backdoors", "agent", "--config", path],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and said in out.stderr, out.stderr
    assert not Cgroup(f"{lab.prefix}-agent", lab.nodes["n0"].cgroup.layout).exists()


def test_the_agent_without_root_exits_77_saying_so(tmp_path):
    """As every command that needs root, before its config is read (only root may read
    the key it names)."""
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                          PY, "-m", "backdoors", "agent", "--config", str(tmp_path / "x.toml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 77, out.stderr
    assert "the agent needs root" in out.stderr


def test_a_missing_node_cgroup_fails_start_clearly(agent_lab):
    lab = agent_lab(start=False)
    lab.nodes["n0"].destroy()
    path = os.path.join(lab.tmp, "agent.toml")
    from test_agent_support import to_toml

    with open(path, "w") as f:
        f.write(to_toml(lab.config))
    out = subprocess.run([PY, "-m", "backdoors", "agent", "--config", path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "node n0: cgroup" in out.stderr and "does not exist" in out.stderr
    assert not Cgroup(f"{lab.prefix}-agent", lab.nodes["n0"].cgroup.layout).exists()


@pytest.mark.parametrize("wedge", [False, True])
def test_the_watchdog_pings_while_every_lane_works_and_probes_each_lane_rarely(wedge):
    """_keep_alive on a stand-in agent with real worker lanes: it pings every quarter
    interval while each lane runs its probe within the grace (op deadline + interval),
    probing a lane again only a quarter grace after its last probe, not at every ping;
    a lane that runs nothing past the grace stops the pings."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from backdoors.agent.daemon import Agent
    from backdoors.agent.served import Lane

    lanes = [Lane(f"l{i}", 1) for i in range(3)]
    probes = [0] * len(lanes)
    for i, lane in enumerate(lanes):
        def counted(fn, *args, _i=i, _submit=lane.pool.submit):
            probes[_i] += 1
            return _submit(fn, *args)

        lane.pool.submit = counted
    pings = []
    release = threading.Event()
    fake = SimpleNamespace(
        config=SimpleNamespace(op_deadline_s=0.2), ops={}, lanes=lambda: lanes,
        local=SimpleNamespace(alive=lambda: True),
        store=SimpleNamespace(notifier=SimpleNamespace(
            watchdog=lambda: pings.append(time.monotonic()))))
    interval = 0.2  # a ping every 50 ms; grace 0.4 s: a lane probed every 0.1 s at most

    async def run():
        task = asyncio.get_running_loop().create_task(Agent._keep_alive(fake, interval))
        await asyncio.sleep(1.0)
        if wedge:
            lanes[1].pool.submit(release.wait)  # its one worker busy from now on
        await asyncio.sleep(1.5)  # past the grace, with room for a slow loop
        last = time.monotonic()
        await asyncio.sleep(1.0)
        task.cancel()
        return last

    t0 = time.monotonic()
    try:
        last = asyncio.run(run())
    finally:
        release.set()
        for lane in lanes:
            lane.pool.shutdown(wait=True)
    elapsed = time.monotonic() - t0
    assert len([t for t in pings if t < t0 + 1.0]) >= 5  # ~20 on an idle machine
    assert max(probes) <= elapsed / 0.1 + 2  # a probe per ping would be twice as many
    late = [t for t in pings if t > last]
    assert (late == []) if wedge else (len(late) >= 5)


def test_the_sampler_queues_a_tracking_pass_only_when_none_ran_within_its_period():
    """A monitor's sensors call is a tracking pass (ops.read_boxes sets passed_at): the
    sampler's own pass is queued only when none ran within the sampling period."""
    from types import SimpleNamespace

    from backdoors.agent.daemon import Agent
    from backdoors.agent.tracking import BoxTracking

    queued = []
    rt = SimpleNamespace(name="n0", tracking=BoxTracking(), sampler=SimpleNamespace(period=1.0),
                         reads=SimpleNamespace(pool=SimpleNamespace(
                             submit=lambda fn, *a: queued.append(fn) or _Done())))
    fake = SimpleNamespace(_tracking={})
    Agent._track(fake, rt)  # never passed: queued
    assert len(queued) == 1
    rt.tracking.passed_at = time.monotonic()  # a sensors call just now
    Agent._track(fake, rt)
    assert len(queued) == 1
    rt.tracking.passed_at = time.monotonic() - 1.5
    Agent._track(fake, rt)
    assert len(queued) == 2


class _Done:
    def done(self) -> bool:
        return True


def test_a_lane_tells_where_a_call_it_runs_is():
    """What an abandoned op's error names: its wait for a worker, then the innermost
    frame and the innermost of ours (here a read of a child that stays silent)."""
    import threading

    from backdoors.agent.served import Lane
    from backdoors.common.procs import read_line

    lane = Lane("t", 1)
    hold = threading.Event()
    try:
        _, first = lane.submit(hold.wait)
        silent = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
        _, second = lane.submit(read_line, silent, 30)
        assert second.where() == "waiting for a worker"  # the one worker holds the first
        assert "threading.py" in first.where()  # not ours: the innermost frame only
        hold.set()
        deadline = time.monotonic() + 10
        while "read_line" not in second.where() and time.monotonic() < deadline:
            time.sleep(0.01)
        where = second.where()
        assert where.startswith("waited "), where
        assert " for a worker; at select (selectors.py:" in where, where
        line = _line_of(read_line, "select(")
        assert where.endswith(f" in read_line (common/procs.py:{line})"), where
    finally:
        hold.set()
        silent.kill()
        silent.wait()
        lane.pool.shutdown(wait=True)


def _line_of(fn, text: str) -> int:
    import inspect

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)

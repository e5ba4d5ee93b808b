"""`backdoors status` against a real lab with agents: node states, the worst sensor, open
incidents, unreachable agents, and a monitor config as the source."""

import io
import json
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from backdoors.agent.keys import new_identity, write_key_file
from backdoors.lab import Lab
from backdoors.lab import topology
from backdoors.lab.agents import stop_agents
from backdoors.lab.clients import StreamClients
from backdoors.monitor.incidents import Incident, IncidentLog
from backdoors.sensors import SensorBox
from backdoors.sensors.reader import parse_box
from backdoors.status import judge, render_status, status_table

def by_node(rows):
    return {r["node"]: r for r in rows}


def wait(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := pred()):
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def rendered(rows) -> str:
    buf = io.StringIO()
    render_status(rows, Console(file=buf, width=200))
    return buf.getvalue()


@pytest.fixture
def lab(root, unique):
    with Lab(f"t{unique}", hosts=1, nodes=2, agents=True) as lab:
        with lab.agent_client("h0") as c:  # the sample services' boxes are served
            wait(lambda: all(len(c.sensors(n).boxes) == 2 for n in ("n0", "n1")),
                 what="the services' Sensor Boxes")
        yield lab


@pytest.mark.root
def test_ok_suspect_locked_and_open_incidents(lab, tmp_path):
    rows = status_table(lab=lab.name)
    assert json.loads(json.dumps(rows)) == rows  # plain data, for --json
    nodes = by_node(rows)
    assert set(nodes) == {"n0", "n1"}
    for r in rows:
        assert r["state"] == "ok" and r["host"] == "h0" and r["reachable"]
        assert r["sessions"] == 0 and r["violations"] == 0 and r["incidents"] == []
        assert not r["worst"]["violated"] and 0 <= r["worst"]["ratio"] < 1

    svc = lab.service("n1").pid
    lab.node("n1").kill(svc, signal.SIGUSR1)  # the service stops progressing
    try:
        with lab.agent_client("h0") as c:
            c.lock("n0", 30.0)
        nodes = wait(lambda: (r := by_node(status_table(lab=lab.name)))["n1"]["violations"]
                     and r, what="n1 past its 0.2 s deadline")
        assert nodes["n0"]["state"] == "locked" and nodes["n0"]["locked_by"] == ["m1"]
        n1 = nodes["n1"]
        assert n1["state"] == "suspect" and n1["violations"] == 1
        assert n1["worst"]["box"] == "svc-n1" and n1["worst"]["sensor"] == "progress"
        assert n1["worst"]["violated"] and n1["worst"]["measure"] > 0.2
        assert n1["worst"]["bound"] == pytest.approx(0.2)
        assert "stalled" in n1["worst"]["text"]
    finally:
        lab.node("n1").kill(svc, signal.SIGUSR2)
        with lab.agent_client("h0") as c:
            c.unlock("n0")

    # open incidents come from the monitor's log: opened and not closed
    log = IncidentLog(tmp_path)
    still = Incident("i-open", "m1", "hang", "n0", "h0", 1.0, 2.0, 1000.0, [])
    done = Incident("i-done", "m1", "memory-hog", "n0", "h0", 1.0, 2.0, 1000.0, [])
    log.write("opened", still, record=still)
    log.write("opened", done, record=done)
    done.closed, done.outcome = 3.0, "cleared"
    log.write("closed", done, record=done)
    log.close()
    rows = status_table(lab=lab.name, incidents=str(tmp_path))
    n0 = by_node(rows)["n0"]
    assert [i["id"] for i in n0["incidents"]] == ["i-open"] and n0["state"] == "suspect"
    assert by_node(rows)["n1"]["incidents"] == []
    text = rendered(rows)
    assert "hang i-open" in text and "suspect" in text and "i-done" not in text


@pytest.mark.root
def test_a_stopped_service_is_stalled_on_every_run_after_its_deadline(root, unique):
    """The stall is the agent's own tracking (how long since the counter last changed),
    not two readings of status: a SIGSTOPped service with a 0.5 s deadline is `stalled`
    on every run once the deadline has passed, however short each run's sampling."""
    with Lab(f"t{unique}", hosts=1, nodes=1, agents=True, services=False) as lab:
        svc = lab.start_service("n0", "--deadline", "0.5")
        with lab.agent_client("h0") as c:
            wait(lambda: len(c.sensors("n0").boxes) == 2, what="the service's Sensor Box")
            progress = lambda: c.sensors("n0").progress_unchanged_s["svc-n0"]["progress"]
            wait(lambda: progress() < 0.5, what="the agent seeing the service progress")
        lab.node("n0").kill(svc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.6)
            measures = []
            for _ in range(6):
                row = by_node(status_table(lab=lab.name))["n0"]
                assert row["state"] == "suspect" and row["violations"] == 1, row
                worst = row["worst"]
                assert (worst["box"], worst["sensor"], worst["violated"]) == \
                    ("svc-n0", "progress", True)
                measures.append(worst["measure"])
                assert "stalled" in worst["text"] and "> deadline 0.5 s" in worst["text"]
            assert 0.5 < measures[0] and measures == sorted(measures)  # one stall, growing
        finally:
            lab.node("n0").kill(svc.pid, signal.SIGCONT)
        wait(lambda: by_node(status_table(lab=lab.name))["n0"]["state"] == "ok",
             what="the service progressing again")


@pytest.mark.root
def test_an_unreachable_agent_is_a_state_not_a_traceback(lab):
    stop_agents(lab.plan, lab.state.agents)
    rows = status_table(lab=lab.name, timeout=0.5)
    assert [r["node"] for r in rows] == ["n0", "n1"]
    for r in rows:
        assert r["state"] == "unreachable" and r["reachable"] is False
        assert "10.99.0.1:7700" in r["error"] and "refused" in r["error"]
    assert "unreachable" in rendered(rows)


@pytest.mark.root
def test_a_monitor_config_as_the_source(lab, tmp_path):
    write_key_file(str(tmp_path / "keys.toml"), lab.monitor_key())
    conf = tmp_path / "backdoors.toml"
    conf.write_text(f"""\
[monitor]
monitor_id = "m1"
key_file = "keys.toml"
incidents_dir = "incidents"

[[monitor.agents]]
host = "h0"
address = "{lab.agent_address('h0')}"
netns = "{lab.plan.monitor_ns}"
public_key = "{lab.agent_public_key('h0')}"

[[monitor.agents]]
host = "gone"
address = "10.99.0.77:7700"
netns = "{lab.plan.monitor_ns}"
public_key = "{new_identity('gone').public_text()}"
nodes = ["x0"]
""")
    rows = status_table(monitor_config=str(conf), timeout=0.5)
    nodes = by_node(rows)
    assert nodes["n0"]["state"] == nodes["n1"]["state"] == "ok"
    assert nodes["x0"]["state"] == "unreachable" and nodes["x0"]["host"] == "gone"
    for args, code in (((), 0), (("--check",), 3)):  # --check: a node not ok fails a script
        r = subprocess.run([sys.executable, "-m", "backdoors", "status", "--config", str(conf),
                            "--json", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == code, r.stderr
        assert {n["node"]: n["state"] for n in json.loads(r.stdout)["nodes"]}["x0"] == "unreachable"
    with pytest.raises(Exception, match="not both"):
        status_table(lab=lab.name, monitor_config=str(conf))


@pytest.mark.root
def test_recovered_and_fenced_after_sessions_move(root, unique):
    with Lab(f"t{unique}", hosts=1, nodes=2, agents=True, services=False) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=30) as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as clients:
            wait(lambda: len(c.call("sessions", node="n0")) == 3, 20, "3 held sessions")
            assert by_node(status_table(lab=lab.name))["n1"]["state"] == "ok"
            c.call("fence", node="n0")
            moved = c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                           to_node="n1")
            assert moved["moved"] == 3, moved
            rows = by_node(status_table(lab=lab.name))
            assert rows["n0"]["state"] == "fenced" and rows["n0"]["fenced"]
            n1 = rows["n1"]
            assert n1["state"] == "recovered"
            assert n1["sessions"] == n1["adopted_sessions"] == 3
            assert all(s["adopted"] for s in c.call("sessions", node="n1"))
            assert clients.received() > 0
            text = rendered(list(rows.values()))
            assert "fenced" in text and "recovered" in text and "3 (3 recovered)" in text


# -- the worst sensor, without a lab -------------------------------------------------------


def _read(box):
    with open(f"/proc/self/fd/{box.fd}", "rb") as f:
        return parse_box(f.read())


def test_judge_levels_progress_and_pressure():
    box = SensorBox.create("t")
    try:
        mem = box.level("mem", min=0.0, max=100.0, initial=90.0)
        low = box.level("free", min=10.0, initial=5.0)
        up = box.level("link_up", min=0.5, initial=1.0)
        box.progress("tick", deadline=0.2)
        forks = box.pressure("forks", max_events=10, window=1.0)
        forks.add(16)
        after = _read(box)
    finally:
        box.close()
    # what the agent tracked: tick unchanged for 0.25 s, 16 fork events in the last window
    tracked = {"tick": 0.25, "forks": 16.0}
    j = {s.name: judge("t", s, tracked.get(s.name)) for s in after.sensors}
    assert not j["mem"]["violated"] and j["mem"]["ratio"] == pytest.approx(0.9)
    assert j["mem"]["text"] == "t/mem 90 (max 100)"
    assert j["free"]["violated"] and j["free"]["text"] == "t/free 5 < min 10"
    assert not j["link_up"]["violated"] and j["link_up"]["ratio"] == 0  # a flag: no closeness
    assert j["tick"]["violated"] and j["tick"]["measure"] == 0.25  # did not move: stalled
    assert j["forks"]["violated"] and j["forks"]["measure"] == pytest.approx(16)
    assert j["forks"]["text"] == "t/forks 16/1 s > max 10"
    assert j["tick"]["text"] == "t/tick stalled 0.25 s > deadline 0.2 s"
    calm = judge("t", after.sensors[3], 0.1)
    assert not calm["violated"] and calm["text"] == "t/tick unchanged 0.10 s (deadline 0.2 s)"
    assert judge("t", after.sensors[3], None)["text"] == "t/tick moving (deadline 0.2 s)"


@pytest.mark.root
def test_a_node_whose_cgroup_went_is_suspect_saying_why(lab):
    """Outside review: a node deleted behind its agent's back showed `ok`, its values the
    last sample's, for as long as the agent ran. Now `nodes` says why its sampling fails,
    and status shows it suspect with that."""
    lab.node("n1").cgroup.destroy()  # what `backdoors node delete` does to it
    row = wait(lambda: (r := by_node(status_table(lab=lab.name))["n1"])["box_errors"].get(
        "kernel") and r, what="n1's failed sampling in status")
    assert row["state"] == "suspect" and "not sampled for" in row["box_errors"]["kernel"]
    assert by_node(status_table(lab=lab.name))["n0"]["state"] == "ok"

"""Prometheus metrics of the agent and the monitor, scraped over HTTP from real daemons.

The agent runs in-process on real test cgroups (test_agent_support), the monitor against a
lab's agents; both serve GET /metrics on real sockets, and stop serving when they stop.
"""

import http.client
import signal
import socket
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_agent_support import agent_lab, prefix  # noqa: F401 - fixtures

from backdoors.agent import AgentClient
from backdoors.agent.errors import QuorumError, TransportError
from backdoors.agent.keys import new_identity
from backdoors.monitor import Monitor
from backdoors.monitor.incidents import ActionRecord, Incident
from backdoors.monitor.metrics import MonitorMetrics
from backdoors.net import netns


def scrape(address, *, ns: str | None = None, path: str = "/metrics"):
    """(status, {(name, labels...): value}) of one GET, from netns `ns` if given."""
    host, port = address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    if ns is not None:
        sock = netns.socket_in(ns, socket.AF_INET)
        sock.settimeout(5)
        sock.connect((host, port))
        conn.sock = sock
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read().decode()
    finally:
        conn.close()
    if reply.status != 200:
        return reply.status, body
    return reply.status, samples(body)


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def get(values: dict, name: str, **labels):
    return values.get((name, *sorted(labels.items())))


def scrape_until(address, pred, timeout: float = 5.0) -> dict:
    """The first scrape whose values satisfy `pred` (AssertionError after `timeout`)."""
    end = time.monotonic() + timeout
    while True:
        status, m = scrape(address)
        if status == 200 and pred(m):
            return m
        if time.monotonic() > end:
            raise AssertionError(f"no scrape of {address} satisfied the condition")
        time.sleep(0.05)


def refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the agent ---------------------------------------------------------------------------


@pytest.mark.root
def test_agent_serves_its_metrics_and_stops_with_it(agent_lab):  # noqa: F811
    lab = agent_lab(nodes={"n0": {"pids_limit": 64}}, quorum=2, vote_window_s=0.2,
                    metrics_listen="127.0.0.1:0")
    agent = lab.agent.agent
    address = agent.metrics_server.address
    lab.start_app("n0")
    c = lab.client(vote_window=0.2)
    c.ping()
    c.sensors("n0")
    with pytest.raises(QuorumError):
        c.lock("n0", 1.0)  # one vote of two: expires, nothing applied
    with pytest.raises(TransportError, match="bad signature"):  # refused, unsigned
        lab.client(new_identity("m1"), timeout=2).ping()

    status, m = scrape(address)
    assert status == 200
    assert get(m, "backdoors_agent_rpc_total", op="ping", result="ok") == 1
    assert get(m, "backdoors_agent_rpc_total", op="lock", result="quorum") == 1
    assert get(m, "backdoors_agent_rpc_seconds_count", op="sensors") == 1
    assert 0 < get(m, "backdoors_agent_rpc_seconds_sum", op="sensors") < 1
    assert get(m, "backdoors_agent_rpc_seconds_bucket", op="ping", le="+Inf") == 1
    assert get(m, "backdoors_agent_rejected_total", code="auth") == 1
    assert get(m, "backdoors_agent_votes_total", op="lock", outcome="cast") == 1
    assert get(m, "backdoors_agent_votes_total", op="lock", outcome="expired") == 1
    assert get(m, "backdoors_agent_regions", node="n0") == 1
    assert get(m, "backdoors_agent_registrations_total", node="n0", op="register",
               result="ok") == 1
    assert get(m, "backdoors_agent_sessions", node="n0") == 0
    assert get(m, "backdoors_agent_region_bytes", node="n0") > 0
    assert get(m, "backdoors_agent_node_frozen", node="n0") == 0
    assert get(m, "backdoors_agent_recovery_expired_total", what="staged") == 0
    assert get(m, "backdoors_agent_recovery_expired_total", what="adopting") == 0
    assert get(m, "backdoors_agent_node_locked", node="n0") == 0
    assert get(m, "backdoors_agent_node_fenced", node="n0") == 0
    assert 0 <= get(m, "backdoors_agent_sample_age_seconds", node="n0") < 1
    assert 0 < get(m, "backdoors_agent_sample_seconds", node="n0") < 1
    assert get(m, "backdoors_agent_stuck_ops", lane="n0") == 0
    assert get(m, "backdoors_agent_stuck_ops", lane="memory") == 0
    assert get(m, "backdoors_agent_deadline_misses_total", lane="n0") == 0
    assert get(m, "backdoors_agent_kernel_sensor", node="n0", sensor="pids") >= 1
    assert get(m, "backdoors_agent_kernel_sensor", node="n0", sensor="memory_mb") > 0
    assert get(m, "backdoors_agent_kernel_sensor_max", node="n0", sensor="pids") == \
        pytest.approx(64 * 0.9)
    assert get(m, "backdoors_agent_kernel_events_total", node="n0", sensor="forks") >= 0
    assert get(m, "backdoors_agent_info", host="h0") == 1
    assert get(m, "backdoors_agent_rpc_connections") >= 1
    assert abs(get(m, "backdoors_agent_start_time_seconds") - time.time()) < 60

    status, body = scrape(address, path="/")
    assert status == 404 and "/metrics" in body
    lab.agent.stop()
    lab.agent = None
    assert refused(address)


@pytest.mark.root
def test_agent_metrics_listen_in_the_agents_netns(agent_lab, unique):  # noqa: F811
    name = f"bdt-{unique}"
    netns.create(name)
    try:
        lab = agent_lab(netns=name, listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
        address = lab.agent.agent.metrics_server.address
        assert refused(address)  # nothing listens on the host's loopback
        status, m = scrape(address, ns=name)
        assert status == 200 and get(m, "backdoors_agent_info", host="h0") == 1
        lab.agent.stop()
        lab.agent = None
        with pytest.raises(ConnectionRefusedError):
            scrape(address, ns=name)
    finally:
        netns.remove(name)


@pytest.mark.root
def test_the_agent_daemon_on_a_unified_file_serves_metrics(agent_lab, tmp_path):  # noqa: F811
    import json
    import subprocess
    import sys

    import tomllib

    import tomli_w
    from test_agent_support import read_line, to_toml

    lab = agent_lab(start=False, metrics_listen="127.0.0.1:0")
    path = tmp_path / "backdoors.toml"  # the plain config, as the [agent] section
    path.write_text(tomli_w.dumps({"agent": tomllib.loads(to_toml(lab.config))}))
    proc = subprocess.Popen([sys.executable, "-m", "backdoors", "agent", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = json.loads(read_line(proc, 20))
        host, _, port = ready["metrics"].rpartition(":")
        address = (host, int(port))
        status, m = scrape(address)
        assert status == 200 and get(m, "backdoors_agent_info", host="h0") == 1
        assert get(m, "backdoors_agent_sessions", node="n0") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
    assert refused(address)


@pytest.mark.root
def test_agent_refuses_to_start_on_a_taken_metrics_port(agent_lab):  # noqa: F811
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        from backdoors.errors import AgentError
        with pytest.raises(AgentError, match=f"cannot serve agent h0 metrics on 127.0.0.1:{port}"):
            agent_lab(metrics_listen=f"127.0.0.1:{port}")
    finally:
        taken.close()


# -- the monitor -------------------------------------------------------------------------


@pytest.fixture
def lab_with_agents(root, unique):
    from backdoors.scenarios.labkit import AgentLab

    with AgentLab(f"t{unique}", nodes=1) as al:
        al.wait_registered("n0")
        yield al


@pytest.mark.root
def test_monitor_serves_its_metrics_and_stops_with_it(lab_with_agents, tmp_path):
    al = lab_with_agents
    cfg = al.monitor_config(period_ms=50, metrics_listen="127.0.0.1:0",
                            incidents_dir=str(tmp_path / "incidents"))
    svc = al.lab.service("n0").pid
    with Monitor(cfg, key=al.monitor_key()) as mon:
        mon.wait_ready()
        address = mon.metrics_server.address
        status, m = scrape(address)
        assert status == 200
        assert get(m, "backdoors_monitor_agent_reachable", host="h0") == 1
        assert get(m, "backdoors_monitor_agent_nodes", host="h0") == 1
        assert get(m, "backdoors_monitor_poll_seconds_count", host="h0") >= 3
        assert 0 < get(m, "backdoors_monitor_poll_seconds_sum", host="h0") < 10
        assert get(m, "backdoors_monitor_poll_failures_total", host="h0") == 0
        box = "svc-n0"
        assert get(m, "backdoors_monitor_sensor_value", host="h0", node="n0", box="kernel",
                   sensor="memory_mb", type="level") > 0
        assert get(m, "backdoors_monitor_sensor_violated", host="h0", node="n0", box=box,
                   sensor="progress") == 0
        assert get(m, "backdoors_monitor_sensor_stalled_seconds", host="h0", node="n0",
                   box=box, sensor="progress") < 0.2
        assert get(m, "backdoors_monitor_sensor_window_events", host="h0", node="n0",
                   box="kernel", sensor="forks") >= 0
        assert get(m, "backdoors_monitor_node_fenced", host="h0", node="n0") == 0
        assert get(m, "backdoors_monitor_detection_latency_seconds_count", rule="hang") == 0

        al.lab.node("n0").kill(svc, signal.SIGUSR1)  # the service stops progressing
        inc = mon.wait_for(lambda i: i.rule == "hang" and i.state == "recorded", 5)
        assert inc is not None, mon.incidents()
        # the "responded" event (counted) follows the state change: scrape until it is in
        m = scrape_until(address, lambda m: get(m, "backdoors_monitor_repairs_total",
                                                rule="hang", outcome="recorded"))
        assert get(m, "backdoors_monitor_detections_total", rule="hang", node="n0") == 1
        assert get(m, "backdoors_monitor_repairs_total", rule="hang", outcome="recorded") == 1
        assert get(m, "backdoors_monitor_repair_seconds_count", rule="hang") == 1
        assert get(m, "backdoors_monitor_detection_latency_seconds_count", rule="hang") == 1
        assert get(m, "backdoors_monitor_incidents_open", rule="hang", node="n0") == 1
        assert get(m, "backdoors_monitor_sensor_violated", host="h0", node="n0", box=box,
                   sensor="progress") == 1

        al.lab.node("n0").kill(svc, signal.SIGUSR2)
        assert mon.wait_for(lambda i: i.id == inc.id and i.outcome == "cleared", 5)
        m = scrape_until(address, lambda m: get(m, "backdoors_monitor_incidents_closed_total",
                                                rule="hang", outcome="cleared"))
        assert get(m, "backdoors_monitor_incidents_closed_total", rule="hang",
                   outcome="cleared") == 1
        assert get(m, "backdoors_monitor_incidents_open", rule="hang", node="n0") is None
    assert mon.metrics_server is None
    assert refused(address)


def test_monitor_counts_recoveries_from_incident_events():
    metrics = MonitorMetrics()
    inc = Incident(id="i1", monitor="m1", rule="hang", node="n0", host="h0", onset=0.0,
                   detected=0.25, onset_to_detect_ms=250.0, detectors=[])
    metrics.on_event("opened", inc)
    inc.actions.append(ActionRecord("recover", "done", 1.0, 40.0,
                                    {"moved": 3, "sessions": 4, "failed": {"cb-x": "dump: gone"}}))
    metrics.on_event("action", inc)
    inc.actions.append(ActionRecord("recover", "skipped", 41.0, 0.0, {}))  # not a recovery
    metrics.on_event("action", inc)
    inc.state, inc.repaired_ms = "nothing to do", 41.0
    metrics.on_event("responded", inc)
    inc.outcome = "node gone"
    metrics.on_event("closed", inc)
    m = samples(generate_latest(metrics.registry).decode())
    assert get(m, "backdoors_monitor_detections_total", rule="hang", node="n0") == 1
    assert get(m, "backdoors_monitor_detection_latency_seconds_sum", rule="hang") == 0.25
    assert get(m, "backdoors_monitor_recoveries_total", rule="hang", outcome="done") == 1
    assert get(m, "backdoors_monitor_recoveries_total", rule="hang", outcome="skipped") is None
    assert get(m, "backdoors_monitor_sessions_recovered_total", rule="hang") == 3
    assert get(m, "backdoors_monitor_sessions_failed_total", rule="hang") == 1
    assert get(m, "backdoors_monitor_repairs_total", rule="hang", outcome="nothing_to_do") == 1
    assert get(m, "backdoors_monitor_repair_seconds_sum", rule="hang") == pytest.approx(0.041)
    assert get(m, "backdoors_monitor_incidents_closed_total", rule="hang",
               outcome="node_gone") == 1


def test_a_client_dribbling_its_request_cannot_hold_the_metrics_server(monkeypatch):
    """Requests are served one at a time: one sent a byte at a time, each byte within the
    socket timeout, is cut off when the exchange's deadline passes, and the next scrape
    is served."""
    import threading

    from prometheus_client import CollectorRegistry, Gauge

    from backdoors.agent import metrics as agent_metrics

    monkeypatch.setattr(agent_metrics._Handler, "timeout", 1.0)
    registry = CollectorRegistry()
    Gauge("bd_test_up", "a gauge", registry=registry).set(1)
    with agent_metrics.MetricsServer(registry, "127.0.0.1:0") as server:
        slow = socket.create_connection(server.address, timeout=10)
        stop = threading.Event()

        def dribble() -> None:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 100:
                if stop.wait(0.3):
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return

        t = threading.Thread(target=dribble, daemon=True)
        t.start()
        try:
            try:  # cut off: the end of the stream, or a reset (a timeout: still held)
                assert slow.recv(1024) == b""
            except ConnectionResetError:
                pass
        finally:
            stop.set()
            t.join(5)
            slow.close()
        status, values = scrape(server.address)
        assert status == 200 and values[("bd_test_up",)] == 1.0

"""`backdoors incidents`: which log it reads (PATH, --config's incidents_dir, the default
config file), and a table that stays readable in an 80-column terminal."""

import io
import json
import os
import subprocess
import sys

from rich.console import Console
from typer.testing import CliRunner

from backdoors.cli import app
from backdoors.monitor.detectors import Hit
from backdoors.monitor.diagnosis import Finding
from backdoors.monitor.incidents import (
    ActionRecord, Incident, IncidentLog, load_incidents, show_incidents,
)

NODES = ["web-frontend-1", "n0", "db-primary-eu-west"]


def incident(i, node, rule="memory-hog", closed=True):
    t = 1_790_000_000.0 + 60 * i
    inc = Incident(
        id=f"20261130-1812{i:02d}-{node}-{i}", monitor="m1", rule=rule, node=node, host="h0",
        onset=t - 0.3, detected=t, onset_to_detect_ms=300.0,
        detectors=[Hit(0, "level_out_of_bounds", "kernel/memory_mb 410 > 409.6")],
        diagnosis=Finding("memory_hog", "hog (pid 4242) grows 40.1 MB/s, 380 MB resident; "
                          "the largest, cache (pid 17, 240 MB), does not grow"),
        actions=[ActionRecord("kill_culprit", "done", 12.0, 8.5)], state="repaired",
        repaired_ms=20.5, last_seen=t + 1.2, detections=25)
    if closed:
        inc.closed, inc.outcome, inc.open_ms = t + 1.5, "cleared", 1500.0
    return inc


def write_log(folder, incidents):
    log = IncidentLog(folder)
    for inc in incidents:
        log.write("opened", inc, record=inc)
        if inc.closed is not None:
            log.write("closed", inc, record=inc)
    log.close()


def render(folder, width=80, **kw):
    console = Console(width=width, record=True, file=io.StringIO())
    show_incidents(folder, console=console, **kw)
    return console.export_text().splitlines()


def test_the_table_is_readable_at_80_columns(tmp_path):
    """One line per incident with its id, node, rule and result whole, the diagnosis cut
    to what is left (the old table folded every column down to a few characters)."""
    incs = [incident(1, "n0"), incident(2, "web0", rule="hang"),
            incident(3, "n2", rule="fork-bomb", closed=False), incident(4, "n1")]
    incs[3].outcome, incs[3].state = "monitor stopped", "recorded"
    write_log(tmp_path, incs)
    lines = render(tmp_path)
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if line.startswith("id "))
    assert header.split() == ["id", "node", "rule", "result", "lasted", "diagnosis"]
    for inc in incs:
        [line] = [line for line in lines if inc.id in line]
        words = line.replace(inc.id, "").split()
        assert inc.node in words and inc.rule in words, line
        assert "hog (pid" in line  # the diagnosis, cut to fit
    assert [w for line in lines for w in line.split() if w in ("repaired", "OPEN,")] == \
        ["repaired", "repaired", "OPEN,", "repaired"]
    assert "recorded, stopped" in lines[-1]  # the result is never cut


def test_long_names_keep_id_and_rule_whole_at_80_columns(tmp_path):
    """Short of room the node column goes first (the id holds the node), then the
    diagnosis: what is shown is never cut."""
    incs = [incident(1, "web-frontend-1"), incident(2, "n0", rule="agent-unreachable"),
            incident(3, "db-primary-eu-west", closed=False)]
    write_log(tmp_path, incs)
    lines = render(tmp_path)
    assert max(len(line) for line in lines) <= 80 and not any("…" in line for line in lines)
    for inc in incs:
        [line] = [line for line in lines if inc.id in line]
        assert inc.rule in line.split() and inc.node in inc.id


def test_wide_shows_every_column(tmp_path):
    write_log(tmp_path, [incident(1, NODES[0])])
    text = "\n".join(render(tmp_path, width=250, wide=True))
    for want in ("kill_culprit:done", "2026", "300", "25", "h0", "20"):
        assert want in text, want


def monitor_config(tmp_path, incidents_dir, unified=False):
    body = f"""\
monitor_id = "m1"
incidents_dir = "{incidents_dir}"

[[{'monitor.' if unified else ''}agents]]
host = "h0"
address = "10.99.0.1:7700"
"""
    if unified:
        body = "[monitor]\n" + body
    path = tmp_path / ("backdoors.toml" if unified else "monitor.toml")
    path.write_text(body)
    return path


def test_the_command_reads_the_configured_incidents_dir(tmp_path):
    write_log(tmp_path / "spool", [incident(1, NODES[0]), incident(2, NODES[1])])
    runner = CliRunner()
    for unified in (False, True):
        conf = monitor_config(tmp_path, "spool", unified=unified)  # relative: from the file's folder
        res = runner.invoke(app, ["incidents", "--config", str(conf), "--json", "--limit", "1"])
        assert res.exit_code == 0, res.output
        assert [i["id"] for i in json.loads(res.output)] == ["20261130-181202-n0-2"]
    res = runner.invoke(app, ["incidents", str(tmp_path / "spool" / "incidents.jsonl"), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)) == 2


def bd(*args, **env):
    return subprocess.run([sys.executable, "-m", "backdoors", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_the_command_at_80_columns(tmp_path):
    incs = [incident(1, "n0"), incident(2, "web0", rule="hang", closed=False)]
    write_log(tmp_path / "spool", incs)
    res = bd("incidents", "--config", str(monitor_config(tmp_path, "spool")), COLUMNS="80")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for inc in incs:
        [line] = [line for line in lines if inc.id in line]
        assert inc.node in line.replace(inc.id, "").split()


def test_a_missing_log_says_where_it_looked_and_why(tmp_path):
    conf = monitor_config(tmp_path, "nowhere")
    res = bd("incidents", "--config", str(conf))
    assert res.returncode == 1 and res.stdout == ""
    assert f"{tmp_path}/nowhere" in res.stderr and f"incidents_dir of {conf}" in res.stderr


def test_a_torn_line_costs_no_later_incident_and_odd_files_a_clear_error(tmp_path):
    """Outside review: a line torn by a monitor killed mid-write had the next run's first
    event appended to it, and from then on `incidents` and `status` refused the whole log;
    a directory or dangling link named *.jsonl made a traceback; --limit 0 showed all."""
    write_log(tmp_path, [incident(1, "n0")])
    log_file = tmp_path / "incidents.jsonl"
    whole = log_file.read_bytes()
    log_file.write_bytes(whole + whole[:60])  # killed mid-write
    write_log(tmp_path, [incident(2, "n1")])  # the next run ends the torn line first
    assert [i.node for i in load_incidents(tmp_path)] == ["n0", "n1"]
    log_file.write_bytes(whole + whole[:60] + whole)  # what an older monitor wrote
    write_log(tmp_path, [incident(3, "n2")])
    assert [i.node for i in load_incidents(tmp_path)] == ["n0", "n2"]
    (tmp_path / "old.jsonl").mkdir()
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere")
    assert [i.node for i in load_incidents(tmp_path)] == ["n0", "n2"]
    runner = CliRunner()
    assert runner.invoke(app, ["incidents", str(tmp_path / "gone.jsonl")]).exit_code == 1
    out = runner.invoke(app, ["incidents", str(tmp_path), "--limit", "0"])
    assert out.exit_code == 2 and "--limit" in out.output


def test_a_file_that_is_no_incident_log_is_said_so_and_wide_is_wide_when_piped(tmp_path):
    """Outside review: a config file given as the log read as "no incidents" (exit 0),
    and `--wide` piped was squeezed into 80 columns, worse than without it."""
    conf = monitor_config(tmp_path, "spool")
    res = bd("incidents", str(conf))
    assert res.returncode == 1 and "is not an incident log: none of its lines" in res.stderr
    write_log(tmp_path / "spool", [incident(1, NODES[0])])
    res = bd("incidents", "--config", str(conf), "--wide", COLUMNS="80")
    assert res.returncode == 0, res.stderr
    assert "kill_culprit:done" in res.stdout and max(map(len, res.stdout.splitlines())) > 80

def test_a_broken_default_config_is_named_not_taken_for_an_agent_hosts(tmp_path, monkeypatch):
    """Outside review: any error in /etc/backdoors/backdoors.toml was taken for "no
    [monitor] section", and the default folder was read instead, its error blaming a
    missing config."""
    import backdoors.config
    import backdoors.monitor

    default = tmp_path / "backdoors.toml"
    monkeypatch.setattr(backdoors.config, "DEFAULT_PATH", str(default))
    monkeypatch.setattr(backdoors.monitor, "DEFAULT_INCIDENTS_DIR", str(tmp_path / "none"))
    write_log(tmp_path / "spool", [incident(1, "n0")])
    default.write_text('[monitor]\nmonitor_id = "m1"\nincidents_dir = "spool"\nperiod_ms = "fast"\n'
                       '[[monitor.agents]]\nhost = "h0"\naddress = "10.99.0.1:7700"\n')
    res = CliRunner().invoke(app, ["incidents", "--json"])
    assert res.exit_code == 1 and f"{default}:4: key monitor.period_ms" in str(res.exception)
    default.write_text(default.read_text().replace('period_ms = "fast"\n', ""))
    res = CliRunner().invoke(app, ["incidents", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)) == 1, res.output
    default.write_text('[agent]\nhost = "h0"\n')  # an agent host's file: the default folder
    res = CliRunner().invoke(app, ["incidents", "--json"])
    assert res.exit_code == 1, res.output
    assert f"no incident log at {tmp_path}/none (the default: no monitor config at" in str(res.exception)

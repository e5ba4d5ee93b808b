"""What a node chose (its sensor names, its processes' names) reaches the operator's
terminal as text: no terminal sequence, no rich markup, in `status` and `incidents`."""

import io
import os
from types import SimpleNamespace

from rich.console import Console
from typer.testing import CliRunner

from backdoors import status
from backdoors.cli import app
from backdoors.common.text import printable
from backdoors.monitor.detectors import Hit
from backdoors.monitor.diagnosis import Finding
from backdoors.monitor.incidents import ActionRecord, Incident, IncidentLog

CLEAR = "\x1b[2J\x1b[H\x1b[32mOK\x1b[8m"  # clear the screen, a green "OK", hide the rest
MARKUP = "[/bold]x"  # a closing tag with nothing open: rich refuses the whole print


class _Agent:
    """An agent's replies (the box is a real Sensor Box's bytes; only the transport is not)."""

    def __init__(self, boxes: dict, nodes=("n0",)):
        self.boxes, self.served = boxes, nodes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def nodes(self):
        return [SimpleNamespace(name=n, frozen=False, locked_by=[], fenced=False)
                for n in self.served]

    def sensors(self, node):
        return SimpleNamespace(errors={}, boxes=self.boxes, progress_unchanged_s={},
                               pressure_events={})

    def call(self, op, **kw):
        return []


def _hostile_box(name: str) -> bytes:
    from backdoors.sensors import SensorBox

    box = SensorBox.create("svc")
    try:
        box.level(name, max=1.0).set(5.0)  # violated: the worst sensor, shown
        return os.pread(box.fd, 1 << 20, 0)
    finally:
        box.close()


def _status_screen(rows) -> str:
    buf = io.StringIO()
    status.render_status(rows, Console(file=buf, force_terminal=True, width=200))
    return buf.getvalue()


def test_printable_shows_controls_and_keeps_the_rest():
    assert printable("svc/requests é 日本") == "svc/requests é 日本"
    assert printable("a\x1bb\x07\x9b\u202ec") == "a\\x1bb\\x07\\x9b\\u202ec"
    assert printable(42) == "42"


def test_a_sensor_name_with_terminal_sequences_is_shown_as_text_in_status():
    for name in (CLEAR, MARKUP):
        src = status.AgentSource("h0", "10.0.0.1:7700", lambda n=name: _Agent({"svc": _hostile_box(n)}),
                                 ["n0"])
        rows = status._agent_rows(src)
        for r in rows:
            r["incidents"] = []
        screen = _status_screen(rows)
        assert rows[0]["state"] == "suspect"
        assert printable(name) in screen  # the name is there, its controls visible
        assert "\x1b[2J" not in screen and "\x1b[8m" not in screen


def test_a_node_the_config_lists_but_the_agent_does_not_serve_is_a_row():
    box = _hostile_box("load")
    src = status.AgentSource("h0", "10.0.0.1:7700", lambda: _Agent({"svc": box}), ["n0", "n1"])
    rows = {r["node"]: r for r in status._agent_rows(src)}
    assert rows["n1"]["state"] == "suspect"
    assert "does not serve it" in rows["n1"]["error"]
    empty = status.AgentSource("h0", "10.0.0.1:7700", lambda: _Agent({}, nodes=()), None)
    [row] = status._agent_rows(empty)
    assert row["state"] == "suspect" and "serves no node" in row["error"]


def _incident(comm: str) -> Incident:
    t = 1_790_000_000.0
    return Incident(
        id="20261130-181200-n0-1", monitor="m1", rule="hang", node="n0", host="h0",
        onset=t - 0.3, detected=t, onset_to_detect_ms=300.0,
        detectors=[Hit(0, "progress_stalled", f"svc/{comm} stalled 0.31 s > deadline 0.2 s")],
        diagnosis=Finding("hang", f"{comm} (pid 4242) stopped progressing; state S"),
        actions=[ActionRecord("record", "done", 1.0, 1.0)], state="recorded",
        repaired_ms=None, last_seen=t + 1.2, detections=3)


def test_a_process_name_with_markup_or_sequences_is_shown_as_text_in_incidents(tmp_path):
    for i, comm in enumerate((MARKUP, CLEAR)):
        folder = tmp_path / f"log{i}"
        log = IncidentLog(str(folder))
        log.write("opened", _incident(comm), record=_incident(comm))
        log.close()
        for wide in ([], ["--wide"]):
            got = CliRunner().invoke(app, ["incidents", str(folder), *wide],
                                     env={"COLUMNS": "300", "FORCE_COLOR": "1"})
            assert got.exit_code == 0, got.output
            assert "\x1b[2J" not in got.output and "\x1b[8m" not in got.output
            assert printable(comm) in got.output

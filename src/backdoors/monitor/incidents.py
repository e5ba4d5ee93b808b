"""Incidents: what was detected, diagnosed and done, with a timeline, as JSONL.

The log is a file of JSON lines, one per incident *event*, appended as it happens (so a
monitor killed mid-repair leaves what it had done):

    {"v": 1, "event": "opened",    "incident": ID, "at": T, "record": {...the incident...}}
    {"v": 1, "event": "diagnosis", "incident": ID, "at": T, "diagnosis": {...}}
    {"v": 1, "event": "action",    "incident": ID, "at": T, "action": {...}}
    {"v": 1, "event": "responded", "incident": ID, "at": T, "record": {...}}
    {"v": 1, "event": "retry",     "incident": ID, "at": T, "record": {...}}  # then diagnosis, actions again
    {"v": 1, "event": "unresolved","incident": ID, "at": T, "record": {...}}
    {"v": 1, "event": "adopted",   "incident": ID, "at": T, "record": {...}}  # from a former owner (fleet)
    {"v": 1, "event": "closed",    "incident": ID, "at": T, "record": {...final incident...}}

One incident is one ongoing condition, open until it clears (engine.py). `at` is Unix time. `load_incidents` folds events back into Incident records (the
"closed" record when there is one); `show_incidents` renders them for
`backdoors incidents`. docs/monitor.md lists every field.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from ..common.text import cell
from ..errors import ConfigError
from .detectors import Hit
from .diagnosis import Finding

log = logging.getLogger("backdoors.monitor")

LOG_NAME = "incidents.jsonl"


class ActionRecord(msgspec.Struct):
    """One action of an incident: `started_ms` counts from detection."""

    kind: str
    status: str  # "done", "failed", "skipped"
    started_ms: float
    duration_ms: float
    detail: dict[str, Any] = {}
    error: str | None = None


class Incident(msgspec.Struct):
    """One ongoing condition on one node by one rule, from onset to close.

    Times `onset`, `detected`, `last_seen`, `closed` are Unix seconds; `*_ms` are
    durations from detection. `sensors` holds the involved sensors' values around onset
    as {"box/sensor": [[ms relative to detection, value], ...]}. While the condition
    holds the incident stays open: `detections` counts the polls that saw it, `attempts`
    the responses run (a retried repair appends its actions here).
    """

    id: str
    monitor: str
    rule: str
    node: str
    host: str
    onset: float
    detected: float
    onset_to_detect_ms: float
    detectors: list[Hit]
    sensors: dict[str, list[list[float]]] = {}
    state: str = "detected"  # -> repaired | recovered | recorded | nothing to do | failed | unresolved
    diagnosis: Finding | None = None
    actions: list[ActionRecord] = []
    repaired_ms: float | None = None  # detection -> the last action done
    closed: float | None = None
    outcome: str | None = None  # "cleared", "fenced", "node gone", "monitor stopped"
    open_ms: float | None = None  # detection -> closed
    detected_by: str = "poll"  # "event": pushed by the agent (monitor.events); "poll"
    event: dict | None = None  # the agent's event that opened it, if one did
    last_seen: float | None = None  # the last poll that saw the condition
    detections: int = 1  # polls (or events) that saw the condition while it was open
    attempts: int = 1  # responses run (the first, then retries of a repair that did not help)
    adopted_from: str | None = None  # the fleet monitor that opened it, when taken over from it


class Event(msgspec.Struct, omit_defaults=True):
    v: int
    event: str
    incident: str
    at: float
    record: Incident | None = None
    diagnosis: Finding | None = None
    action: ActionRecord | None = None


_encoder = msgspec.json.Encoder()


class IncidentLog:
    """Appends incident events to DIR/incidents.jsonl; safe to share between threads.

    With `directory=None` nothing is written (events still reach `listeners`).
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._file = None
        if directory is not None:
            d = Path(directory)
            try:
                d.mkdir(parents=True, exist_ok=True)
                self.path = d / LOG_NAME
                self._file = open(self.path, "a+b", buffering=0)
                end = self._file.tell()
                if end and os.pread(self._file.fileno(), 1, end - 1) != b"\n":
                    self._file.write(b"\n")  # a line torn by a monitor killed mid-write ends
            except OSError as e:
                raise ConfigError(f"incidents directory {d}: {e.strerror}") from None

    def write(self, event: str, incident: Incident, **payload) -> None:
        line = _encoder.encode(Event(1, event, incident.id, time.time(), **payload)) + b"\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.glob("*.jsonl") if f.is_file())
    if p.exists():
        return [p]
    raise ConfigError(f"no incident log at {p}: give the monitor's incidents_dir or a .jsonl file")


def load_incidents(path: str | os.PathLike) -> list[Incident]:
    """Incidents of a log file (or of every *.jsonl file in a directory), oldest first.

    A torn last line (a monitor killed mid-write) is skipped. So is any other line that
    is no event, with a warning naming file and line; one that ends with an event (a
    torn line the next event was appended to, by a monitor before it ended torn lines)
    gives that event. A file that cannot be read is a ConfigError.
    """
    found: dict[str, Incident] = {}
    decoder = msgspec.json.Decoder(Event)
    for file in _files(path):
        try:
            lines = file.read_bytes().split(b"\n")
        except OSError as e:
            raise ConfigError(f"cannot read the incident log {file}: {e.strerror}") from None
        events, skipped = 0, []
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                ev = decoder.decode(raw)
            except msgspec.DecodeError as e:
                if n >= len(lines) - 1:
                    continue  # torn tail
                ev = _after_torn_bytes(decoder, raw)
                if ev is None:
                    skipped.append((n, e))
                    log.warning("%s:%d: not an incident event, skipped: %s", file, n, e)
                    continue
                log.warning("%s:%d: torn bytes before an event, skipped", file, n)
            events += 1
            if ev.record is not None:
                found[ev.incident] = ev.record
                continue
            inc = found.get(ev.incident)
            if inc is None:
                continue
            if ev.diagnosis is not None:
                inc.diagnosis = ev.diagnosis
            if ev.action is not None:
                inc.actions.append(ev.action)
        if skipped and not events:  # (a TOML file given as the log, say)
            n, e = skipped[0]
            raise ConfigError(f"{file} is not an incident log: none of its lines is an "
                              f"incident event (line {n}: {e})")
    return sorted(found.values(), key=lambda i: i.detected)


def _after_torn_bytes(decoder, raw: bytes) -> Event | None:
    """The event that ends `raw` after torn bytes, if one does."""
    at = raw.find(b'{"v":', 1)
    while at > 0:
        try:
            return decoder.decode(raw[at:])
        except msgspec.DecodeError:
            at = raw.find(b'{"v":', at + 1)
    return None


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _span(seconds: float) -> str:
    """A duration in a few characters: 850 ms, 8.2 s, 12m05s, 3h02m."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def lasted(inc: Incident) -> float:
    """Seconds from detection to close, or to the last poll that saw it while open."""
    end = inc.closed if inc.closed is not None else (inc.last_seen or inc.detected)
    return max(0.0, end - inc.detected)


#: Outcomes as the table says them (the log and --json keep the full words).
_SHORT = {"monitor stopped": "stopped", "node gone": "gone", "agent reachable again": "agent back"}


def _result(inc: Incident) -> str:
    """The response's state, and how it ended unless it simply cleared: 'repaired',
    'recovered, fenced', 'recorded, stopped', 'OPEN, recorded'."""
    if inc.closed is None:
        return f"OPEN, {inc.state}"
    if inc.outcome == "cleared":
        return inc.state
    return f"{inc.state}, {_SHORT.get(inc.outcome or '', inc.outcome)}"


def _what(inc: Incident) -> str:
    """The diagnosis, or what the detectors saw when there is none."""
    if inc.diagnosis is not None and inc.diagnosis.kind != "none":
        return inc.diagnosis.summary
    return "; ".join(h.summary for h in inc.detectors) or "-"


WIDE_PIPED = 200  # columns of `--wide` written to a pipe or file


def show_incidents(path: str | os.PathLike, as_json: bool = False, *, limit: int | None = None,
                   console=None, wide: bool = False) -> list[Incident]:
    """Print the incidents of a log (file or directory): a table, or JSON with `as_json`.

    The CLI's `backdoors incidents`. The table fits the console (80 columns too): id,
    rule and duration are never cut, the diagnosis is cut to the width left; short of
    room the node column goes (the id holds the node), then the diagnosis. `wide` shows
    every column (detection time, host, latency, detections, attempts, actions, repair
    time), folded. Returns the incidents shown (newest `limit`).
    """
    incidents = load_incidents(path)
    if limit is not None:
        incidents = incidents[-limit:]
    if as_json:
        print(json.dumps(msgspec.to_builtins(incidents), indent=2))
        return incidents
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if wide and not console.is_terminal and console.width < WIDE_PIPED:
        console.width = WIDE_PIPED  # piped: every column, not 80 of them
    if not incidents:
        console.print(cell(f"no incidents in {path}"))
        return incidents
    rows = [(i, _result(i), _span(lasted(i))) for i in incidents]
    width = lambda head, texts: max(len(head), *(len(x) for x in texts))  # noqa: E731
    cols = {"id": width("id", (i.id for i in incidents)),
            "node": width("node", (i.node for i in incidents)),
            "rule": width("rule", (i.rule for i in incidents)),
            "result": min(width("result", (r for _, r, _ in rows)), 24),
            "lasted": width("lasted", (d for _, _, d in rows))}
    diagnosis = True
    if not wide:  # short of room: the node goes first (it is in the id), then the diagnosis
        room = lambda: console.width - sum(cols.values()) - len(cols)  # noqa: E731
        if room() < 12:
            del cols["node"]
        diagnosis = room() >= 12
    t = Table(title=cell(f"incidents in {path}"), box=box.SIMPLE_HEAD, show_edge=False,
              padding=(0, 0), title_justify="left")  # columns apart by the box's space
    for name in ("id", "node", "rule", "result", "lasted"):
        if name == "lasted" and wide:
            t.add_column("detected", no_wrap=True)
            t.add_column("host", no_wrap=True)
        if name in cols:
            t.add_column(name, no_wrap=True, overflow="ellipsis", width=cols[name],
                         justify="right" if name == "lasted" else "left")
    if wide:
        for col in ("onset→detect ms", "detections", "attempts", "repair ms"):
            t.add_column(col, no_wrap=True, justify="right")
        t.add_column("actions", overflow="fold")
        t.add_column("diagnosis", overflow="fold")
    elif diagnosis:  # takes the width left; its cells are cut, not wrapped
        t.add_column("diagnosis")
    for i, result, span in rows:
        row = [i.id] + ([i.node] if "node" in cols else []) + [i.rule, result]
        if wide:
            acts = ", ".join(f"{a.kind}:{a.status}" for a in i.actions) or "-"
            row += [_fmt_time(i.detected), i.host, span, _ms(i.onset_to_detect_ms),
                    str(i.detections), str(i.attempts), _ms(i.repaired_ms), acts]
        else:
            row.append(span)
        row = [cell(x) for x in row]  # (a node chose its names, and its processes theirs)
        if wide:
            row.append(cell(_what(i)))
        elif diagnosis:
            row.append(cell(_what(i), no_wrap=True, overflow="ellipsis"))
        t.add_row(*row)
    console.print(t)
    return incidents

"""The report's inputs: demo results, incident logs and benchmark JSON, read and checked.

Nothing here measures. A missing input becomes a note (what is missing, and the command
that produces it); a malformed one is a ReportError naming the file (and the line, for
JSON and JSON Lines). A path given explicitly that does not exist is an error too: a
typo must not pass for "nothing measured".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..errors import BackdoorsError, ConfigError
from ..monitor.incidents import Incident, load_incidents

DEMO_ROOT = Path("out/demo")
BENCH_ROOT = Path("out/bench")
RESULTS = "results.json"


class ReportError(BackdoorsError):
    """An input of the report is malformed, or a path given for it does not exist."""


class MissingExtraError(ReportError, ImportError):
    """The report's optional dependencies (the "report" extra) are not installed."""


# ---- demo results (written by `backdoors demo`) -------------------------------------------


class Check(msgspec.Struct):
    what: str
    ok: bool
    detail: str = ""


class Scenario(msgspec.Struct):
    """One scenario of a demo run and its verdict."""

    name: str
    passed: bool
    title: str = ""
    kind: str = ""  # "repair", "detection", "recovery"
    node: str | None = None
    verdict: str = ""
    checks: list[Check] = []
    incident: str | None = None
    detect_ms: float | None = None
    repair_ms: float | None = None
    recovery_ms: float | None = None
    sessions: float | None = None
    sessions_ok: float | None = None
    stalls_ms: list[float] | None = None


class DemoResults(msgspec.Struct):
    """`out/demo/<stamp>/results.json`."""

    started: float
    lab: str = ""
    duration_s: float | None = None
    incidents: str | None = None
    scenarios: list[Scenario] = []


# ---- benchmark JSON (bench/*.py, written to out/bench/<module>.json by `make bench`) -------
# Only the keys the report uses; each is optional, so an older file shows what it has.

Num = float | None


class RepairPolicy(msgspec.Struct):
    """One policy of a bench_repair case (memory hog R or fork bomb F)."""

    victim: str | None = None
    service_survived: bool | None = None
    cache_survived: bool | None = None
    max_progress_gap_ms: Num = None
    wedged_ms: Num = None
    bomb_processes_left: Num = None
    progress_series: list[tuple[float, Num]] | None = None
    fork_series: list[tuple[float, float]] | None = None
    deaths_ms: dict[str, float] = {}


class BenchRepair(msgspec.Struct):
    memory_hog: dict[str, RepairPolicy] = {}
    fork_bomb: dict[str, RepairPolicy] = {}
    details: dict[str, dict[str, dict[str, Any]]] = {}
    params: dict[str, Any] = {}


class RecoveryRow(msgspec.Struct):
    sessions: float
    backdoors_broken: Num = None
    backdoors_sessions_ok: Num = None
    backdoors_bytes_lost: Num = None
    backdoors_detect_ms: Num = None
    backdoors_recovery_ms: Num = None
    backdoors_stall_p50_ms: Num = None
    backdoors_stall_p99_ms: Num = None
    pace_interval_ms: Num = None
    haproxy_broken: Num = None
    haproxy_resume_ms: Num = None


class Overhead(msgspec.Struct):
    plain_rps: Num = None
    cb_rps: Num = None
    plain_p50_ms: Num = None
    cb_p50_ms: Num = None
    plain_p99_ms: Num = None
    cb_p99_ms: Num = None
    overhead_pct: Num = None
    overhead_pct_iqr: list[Num] = []
    response_bytes: Num = None
    rounds: Num = None
    clients: Num = None
    seconds_per_round: Num = None


class BenchRecovery(msgspec.Struct):
    fault: str = ""
    results: list[RecoveryRow] = []
    overhead: Overhead | None = None


class BenchSensors(msgspec.Struct):
    progress_tick_ns: Num = None
    stamped_progress_tick_ns: Num = None
    level_set_ns: Num = None
    pressure_event_ns: Num = None
    prometheus_counter_inc_ns: Num = None
    prometheus_gauge_set_ns: Num = None
    notify_datagram_ns: Num = None
    snapshot_per_sensor_ns: Num = None
    tick_vs_prometheus_inc: Num = None


class DetectionLatency(msgspec.Struct):
    trials: Num = None
    p50_ms: Num = None
    p99_ms: Num = None
    max_ms: Num = None
    bound_ms: Num = None
    within_bound: Num = None


class Soak(msgspec.Struct):
    seconds: Num = None
    false_positives: Num = None
    load: str = ""


class DetectionRow(msgspec.Struct):
    """One (fault, deadline, mode) of bench_detection: event-pushed or polled."""
    fault: str
    mode: str
    deadline_ms: Num = None
    p50_ms: Num = None
    p99_ms: Num = None
    trials: Num = None


class BenchDetection(msgspec.Struct):
    period_ms: Num = None
    results: list[DetectionRow] = []
    latency: dict[str, DetectionLatency] = {}
    soak: Soak | None = None


class MonitorRow(msgspec.Struct):
    """One (size, mode) of bench_monitor."""
    nodes: float
    mode: str = "poll"
    monitor_cpu_pct: Num = None
    agent_cpu_pct_per_node: Num = None
    detect_p50_ms: Num = None
    detect_p99_ms: Num = None
    trials: Num = None


class BenchMonitor(msgspec.Struct):
    sensors_per_node: Num = None
    results: list[MonitorRow] = []


class TcpRepairRow(msgspec.Struct):
    sockets: float
    dump_us_per_socket: Num = None
    restore_us_per_socket: Num = None
    total_ms: Num = None
    reference_connect_accept_us_per_socket: Num = None


class BenchTcpRepair(msgspec.Struct):
    kernel: str = ""
    results: list[TcpRepairRow] = []


class FleetEvent(msgspec.Struct):
    """One event of the fleet scenario's timeline (seconds since its first fault)."""
    t: float
    lane: str  # a monitor's id, "nodes" or "etcd"
    kind: str  # a fault kind, "incident" or "taken-over"
    target: str = ""
    end: Num = None  # for what lasted (a monitor down, stopped or cut; an etcd member down)


class FleetTimeline(msgspec.Struct):
    start: float = 0.0
    events: list[FleetEvent] = []


class FleetScenario(msgspec.Struct):
    """bench_fleet's short `scenario fleet`: its figures and its timeline."""
    monitors: Num = None
    hosts: Num = None
    nodes: Num = None
    duration_s: Num = None
    faults_injected: Num = None
    faults_handled: Num = None
    missed: Num = None
    takeover_ms_p99: Num = None
    stale_token_ops_refused: Num = None
    stale_token_ops_applied: Num = None
    double_acted: Num = None
    timeline: FleetTimeline = msgspec.field(default_factory=FleetTimeline)


class BenchFleet(msgspec.Struct):
    """bench_fleet: takeover in a fleet of monitors, from a monitor's SIGKILL to each of
    its nodes claimed by another, one value per kill; and a short fleet scenario."""
    monitors: Num = None
    nodes: Num = None
    trials: Num = None
    lease_ttl_s: Num = None
    fleet_poll_ms: Num = None
    takeover_ms: list[float] = []
    takeover_ms_p50: Num = None
    takeover_ms_p99: Num = None
    takeover_ms_max: Num = None
    giveback_ms_p50: Num = None
    anchors_s: dict[str, float] = {}
    scenario: FleetScenario | None = None


class CasestudyLoad(msgspec.Struct):
    """One load level of the RUBiS case study: plain vs recoverable."""
    users: float
    plain_rps: Num = None
    recoverable_rps: Num = None
    plain_p50_ms: Num = None
    recoverable_p50_ms: Num = None
    plain_p99_ms: Num = None
    recoverable_p99_ms: Num = None
    plain_first_p99_ms: Num = None  # the users' first requests (opening their sessions)
    recoverable_first_p99_ms: Num = None
    plain_steady_p99_ms: Num = None  # the later requests (on sessions set up)
    recoverable_steady_p99_ms: Num = None
    plain_interval_p99_ms: Num = None  # the measurement interval (after the ramp-up)
    recoverable_interval_p99_ms: Num = None
    plain_failed: Num = None
    recoverable_failed: Num = None
    overhead_pct: Num = None
    saturated: bool | None = None


class Per100ms(msgspec.Struct):
    """Requests completed per bucket across a fault (casestudy.rubis.throughput): bucket i
    starts t0 + i * bucket_ms ms from the fault; node_ok: the failed node's users' ok."""
    t0: float = 0.0
    bucket_ms: float = 100.0
    ok: list[float] = []
    failed: list[float] = []
    node_ok: list[float] | None = None
    dip_from_ms: Num = None
    dip_recovered: bool | None = None
    baseline: Num = None
    fraction: Num = None


class CasestudyFault(msgspec.Struct):
    """One fault under load of the RUBiS case study."""
    tier: str = ""
    fault: str = ""
    users: Num = None
    requests: Num = None
    failed_requests: Num = None
    haproxy_failed_requests: Num = None
    detect_ms: Num = None
    recovery_ms: Num = None
    dip_ms: Num = None
    moved: Num = None
    bids_acknowledged: Num = None
    bids_lost: Num = None
    bids_duplicated: Num = None
    per_100ms: Per100ms | None = None
    haproxy_per_100ms: Per100ms | None = None  # the baseline's, once it is measured


class BenchCasestudy(msgspec.Struct):
    """bench_casestudy: `backdoors casestudy rubis --json`, short."""
    users: Num = None
    seconds: Num = None
    rounds: Num = None
    data: dict[str, float] = {}
    load: list[CasestudyLoad] = []
    overhead_pct_max: Num = None
    p99_overhead_pct_max: Num = None
    steady_p99_overhead_pct_max: Num = None
    interval_overhead_pct_max: Num = None
    interval_p99_overhead_pct_max: Num = None
    ramp_s: Num = None
    bids_acknowledged: Num = None
    bids_lost: Num = None
    bids_duplicated: Num = None
    faults: list[CasestudyFault] = []


class VmEvent(msgspec.Struct):
    """One event of the vm scenario's timeline (seconds since the guest was up)."""
    t: float
    lane: str  # "guest", a tamper kind or an Orion fault
    kind: str  # hang, benign work, tamper, detected, healed, fault, alarm
    end: Num = None  # for what lasted (the hang until seen, benign work, a fault to its bound)


class VmTimeline(msgspec.Struct):
    events: list[VmEvent] = []


class BenchVm(msgspec.Struct):
    """bench_vm: `scenario vm` in full (the guest kernel's integrity, Orion)."""
    accel: str | None = None
    boot_s: Num = None
    guest_hang_detect_ms: Num = None
    guest_hang_deadline_ms: Num = None
    tamper_detect_ms: dict[str, float] | None = None
    tamper_healed: bool | None = None
    hidden_process_found: bool | None = None
    false_positives: Num = None
    benign_minutes: Num = None
    overhead_pct: Num = None
    scan_cpu_pct: Num = None
    prediction_lead_ms: dict[str, Num] = {}
    prediction_false_alarms: Num = None
    timeline: VmTimeline | None = None
    gibraltar: dict[str, float] = {}


BENCHES: dict[str, type] = {
    "bench_repair": BenchRepair,
    "bench_recovery": BenchRecovery,
    "bench_detection": BenchDetection,
    "bench_monitor": BenchMonitor,
    "bench_sensors": BenchSensors,
    "bench_tcprepair": BenchTcpRepair,
    "bench_fleet": BenchFleet,
    "bench_casestudy": BenchCasestudy,
    "bench_vm": BenchVm,
}


def bench_command(name: str) -> str:
    return f"run `make bench` ({name}), or only it: `python bench/run_all.py {name}`"


# ---- loading ------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything the report shows, and a note for each input it could not find."""

    demo: DemoResults | None = None
    demo_dir: Path | None = None
    incidents: list[Incident] = field(default_factory=list)
    incidents_path: Path | None = None
    diagnosis_ms: dict[str, float] = field(default_factory=dict)  # incident id -> ms
    bench: dict[str, Any] = field(default_factory=dict)  # module name -> struct
    bench_files: dict[str, Path] = field(default_factory=dict)
    bench_dir: Path | None = None
    missing: dict[str, str] = field(default_factory=dict)  # input -> what to do


def read_json(path: Path, type_: type, what: str):
    """`path` decoded as `type_`; None for an empty file (a run still writing it)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ReportError(f"{path}: cannot read {what}: {e.strerror}") from None
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON: {e.msg}") \
            from None
    except ValueError as e:
        raise ReportError(f"{path}: {what} is not UTF-8 JSON: {e}") from None
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as e:
        raise ReportError(f"{path}: not the expected {what}: {e}") from None


def newest_demo(root: Path = DEMO_ROOT) -> Path | None:
    """The newest `root/<YYYYmmdd-HHMMSS>` folder holding a results.json."""
    if not root.is_dir():
        return None
    runs = sorted((d for d in root.iterdir() if (d / RESULTS).is_file()), key=lambda d: d.name)
    return runs[-1] if runs else None


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{what} {p} does not exist")
    return p


def load_demo(inputs: Inputs, demo_dir: str | os.PathLike | None) -> None:
    d = _existing(demo_dir, "demo directory") if demo_dir is not None else newest_demo()
    if d is None:
        inputs.missing["demo"] = (f"no demo results (no {DEMO_ROOT}/<run>/{RESULTS}): "
                                  "run `make demo` (or `backdoors demo`)")
        return
    if d.is_file():
        d = d.parent
    inputs.demo_dir = d
    demo = read_json(d / RESULTS, DemoResults, "demo results") if (d / RESULTS).is_file() \
        else None
    if demo is None:
        inputs.missing["demo"] = (f"{d} has no (or an empty) {RESULTS}: the demo did not "
                                  "finish; run `make demo` (or `backdoors demo`)")
        return
    inputs.demo = demo


def _demo_incident_log(inputs: Inputs) -> Path | None:
    if inputs.demo is None or inputs.demo_dir is None:
        return None
    named = inputs.demo.incidents
    candidates = []
    if named:
        p = Path(named)
        candidates += [p] if p.is_absolute() else [inputs.demo_dir / p, p]
    candidates += [inputs.demo_dir / "incidents.jsonl", inputs.demo_dir / "incidents"]
    return next((c for c in candidates if c.exists()), None)


class _Stamp(msgspec.Struct):
    event: str
    incident: str
    at: float


def _diagnosis_times(path: Path, incidents: list[Incident]) -> dict[str, float]:
    """ms from detection to each incident's first diagnosis event (a retried response
    diagnoses again; load_incidents drops `at`)."""
    detected = {i.id: i.detected for i in incidents}
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    out: dict[str, float] = {}
    decoder = msgspec.json.Decoder(_Stamp)
    for f in files:
        for raw in f.read_bytes().splitlines():
            if b'"diagnosis"' not in raw:
                continue
            try:
                s = decoder.decode(raw)
            except msgspec.DecodeError:
                continue  # a torn tail: load_incidents judged every other line already
            if s.event == "diagnosis" and s.incident in detected and s.incident not in out:
                out[s.incident] = (s.at - detected[s.incident]) * 1000  # the first attempt's
    return out


def load_incident_log(inputs: Inputs, incidents: str | os.PathLike | None) -> None:
    path = _existing(incidents, "incident log") if incidents is not None else \
        _demo_incident_log(inputs)
    if path is None:
        where = (f"the demo's log ({inputs.demo.incidents}) is not there"
                 if inputs.demo is not None and inputs.demo.incidents else "no incident log given")
        inputs.missing["incidents"] = (f"{where}: run `make demo` (or `backdoors demo`), or "
                                       "give a monitor's incidents_dir or incidents.jsonl")
        return
    try:
        inputs.incidents = load_incidents(path)
    except ConfigError as e:
        raise ReportError(str(e)) from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read the incident log: {e.strerror}") from None
    inputs.incidents_path = path
    inputs.diagnosis_ms = _diagnosis_times(path, inputs.incidents)


def load_benches(inputs: Inputs, bench_dir: str | os.PathLike | None) -> None:
    d = _existing(bench_dir, "benchmark directory") if bench_dir is not None else (
        BENCH_ROOT if BENCH_ROOT.is_dir() else None)
    inputs.bench_dir = d
    for name, type_ in BENCHES.items():
        path = d / f"{name}.json" if d is not None else None
        if path is None or not path.is_file():
            inputs.missing[name] = f"no {name}.json in {d or BENCH_ROOT}: {bench_command(name)}"
            continue
        value = read_json(path, type_, f"{name} results")
        if value is None:
            inputs.missing[name] = (f"{path} is empty (a benchmark still running, or one that "
                                    f"failed): {bench_command(name)}")
            continue
        inputs.bench[name] = value
        inputs.bench_files[name] = path


def load_inputs(*, demo_dir: str | os.PathLike | None = None,
                bench_dir: str | os.PathLike | None = None,
                incidents: str | os.PathLike | None = None) -> Inputs:
    """Read every input of the report (see build_report for the defaults)."""
    inputs = Inputs()
    load_demo(inputs, demo_dir)
    load_incident_log(inputs, incidents)
    load_benches(inputs, bench_dir)
    return inputs

"""The report: built from synthetic inputs in the real formats, no root needed.

Inputs: an incident log written with the monitor's own Event/Incident structs (opened,
diagnosis, action, closed), a demo results.json, and benchmark JSON in the shapes the
bench/ modules write. Checks: one self-contained HTML file with every section, every
embedded PNG a real, non-blank image; missing inputs become notes; malformed ones
errors naming file and line. Also the time series bench_repair now records.
"""

import base64
import importlib.util
import io
import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import msgspec
import numpy as np
import pytest

from backdoors.monitor.detectors import Hit, Violation
from backdoors.monitor.diagnosis import Finding, Target
from backdoors.monitor.incidents import ActionRecord, Event, Incident
from backdoors.report import SECTIONS, ReportError, build_report, load_inputs
from backdoors.scenarios import watch

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_764_300_000.0  # a fixed Unix time for the synthetic run


# ---- synthetic inputs -----------------------------------------------------------------------


def _incident(id_, rule, node, detected, onset_ms, hits, sensors, diagnosis, actions,
              repaired_ms, state="repaired"):
    opened = Incident(id=id_, monitor="m1", rule=rule, node=node, host="h0",
                      onset=detected - onset_ms / 1000, detected=detected,
                      onset_to_detect_ms=onset_ms, detectors=hits, sensors=sensors)
    events = [Event(1, "opened", id_, detected, record=opened),
              Event(1, "diagnosis", id_, detected + 0.004, diagnosis=diagnosis)]
    events += [Event(1, "action", id_, detected + (a.started_ms + a.duration_ms) / 1000, action=a)
               for a in actions]
    closed = msgspec.structs.replace(opened, state=state, diagnosis=diagnosis, actions=actions,
                                     repaired_ms=repaired_ms, closed=detected + 0.6,
                                     outcome="cleared", open_ms=600.0)
    events.append(Event(1, "closed", id_, detected + 0.6, record=closed))
    return events


def incident_events() -> list[Event]:
    mem = [[float(t), 200 + 0.04 * (t + 2500)] for t in range(-2500, 1, 50)]
    hog = _incident(
        "20251128-050000-n0-1", "memory-hog", "n0", T0 + 10, 2450.0,
        [Hit(0, "level_out_of_bounds", "kernel/memory_mb 410 > 409.6",
             [Violation("kernel", "memory_mb", "level", 410.0, 409.6, 410.0)])],
        {"kernel/memory_mb": mem},
        Finding("memory_hog", "bd-memhog (pid 412) grows 38 MB/s, now 131 MB",
                [Target(412, 1234.5, "bd-memhog")], {"largest": {"comm": "bd-cache"}}),
        [ActionRecord("kill_culprit", "done", 5.0, 18.0, {"killed": 1})], 23.0)
    forks = [[float(t), max(0.0, (t + 400) * 0.3)] for t in range(-1400, 1, 50)]
    pids = [[float(t), min(120.0, 10 + max(0.0, (t + 400) * 0.3))] for t in range(-1400, 1, 50)]
    bomb = _incident(
        "20251128-050010-n1-2", "fork-bomb", "n1", T0 + 20, 400.0,
        [Hit(1, "pressure_over_rate", "kernel/forks 120 in 1 s > 200",
             [Violation("kernel", "forks", "pressure", 120.0, 200.0, 120.0)]),
         Hit(2, "level_out_of_bounds", "kernel/pids 120 > 115",
             [Violation("kernel", "pids", "level", 120.0, 115.2, 120.0)])],
        {"kernel/forks": forks, "kernel/pids": pids},
        Finding("fork_bomb", "fork bomb since onset"),
        [ActionRecord("lock_kill_lineage", "done", 6.0, 185.0,
                      {"killed": 123, "survivors": [], "rounds": 1})], 191.0)
    progress = [[float(t), float(max(0, min(t + 2000, 1800) // 10))] for t in range(-2000, 1, 25)]
    dead = _incident(
        "20251128-050020-n3-3", "deadlock", "n3", T0 + 30, 210.0,
        [Hit(0, "progress_stalled", "svc-n3/progress stalled 0.21 s > 0.2 s",
             [Violation("svc-n3", "progress", "progress", 180.0, 0.2, 0.21)])],
        {"svc-n3/progress": progress},
        Finding("hang", "pid 77 (svc) sleeps (S), 0% CPU: waiting on a lock"),
        [ActionRecord("record", "done", 104.0, 0.0),
         ActionRecord("refresh", "done", 104.5, 80.0, {"hook": "restart-service"})], 185.0)
    freeze = _incident(
        "20251128-050030-n0-4", "hang", "n0", T0 + 40, 250.0,
        [Hit(1, "node_frozen", "n0 frozen, no lock holder", [])], {},
        Finding("hang", "node n0 frozen"),
        [ActionRecord("recover", "done", 2.0, 95.0, {"moved": 37, "target": "n1"})], 97.0)
    return hog + bomb + dead + freeze


def write_incidents(path: Path) -> Path:
    enc = msgspec.json.Encoder()
    path.write_bytes(b"".join(enc.encode(e) + b"\n" for e in incident_events()))
    return path


def scenario(name, kind, passed=True, **kw):
    base = {"name": name, "title": name.replace("-", " "), "kind": kind, "node": "n0",
            "passed": passed, "verdict": f"{name}: ok" if passed else f"{name}: failed",
            "checks": [{"what": "service survived", "ok": passed, "detail": "pid 77 alive"}],
            "incident": None, "detect_ms": None, "repair_ms": None, "recovery_ms": None,
            "sessions": None, "sessions_ok": None, "stalls_ms": None}
    base.update(kw)
    return base


def demo_results(incidents_path: str) -> dict:
    rng = np.random.default_rng(1)

    def stalls(detect):
        return [round(float(x), 1) for x in detect + 40 + rng.gamma(2.0, 30.0, 37)]

    return {"started": T0, "lab": "demo", "duration_s": 142.5, "incidents": incidents_path,
            "scenarios": [
                scenario("memory-hog", "repair", incident="20251128-050000-n0-1", detect_ms=2498,
                         repair_ms=23),
                scenario("fork-bomb", "repair", incident="20251128-050010-n1-2", detect_ms=400,
                         repair_ms=191),
                scenario("deadlock", "detection", incident="20251128-050020-n3-3",
                         detect_ms=210, repair_ms=185),
                scenario("freeze", "recovery", incident="20251128-050030-n0-4", detect_ms=250,
                         recovery_ms=97, sessions=37, sessions_ok=37, stalls_ms=stalls(250)),
                scenario("crash", "recovery", detect_ms=220, recovery_ms=90, sessions=37,
                         sessions_ok=37, stalls_ms=stalls(220)),
                scenario("network", "recovery", passed=False, detect_ms=300, recovery_ms=120,
                         sessions=37, sessions_ok=36, stalls_ms=stalls(300))]}


def _progress(t_end_ms: float, gap: tuple[float, float] | None = None, dies_at=None):
    pts, v, t = [], 100, -500.0
    while t <= t_end_ms:
        if dies_at is not None and t >= dies_at:
            pts.append([t, None])
            break
        if gap is None or not gap[0] <= t < gap[1]:
            v += 1
        pts.append([round(t, 1), v])
        t += 10.0 if t_end_ms < 3000 else 100.0
    return pts[:300]


def bench_repair(series: bool = True) -> dict:
    mem = {"backdoors": {"victim": "hog", "service_survived": True, "cache_survived": True,
                         "max_progress_gap_ms": 17.7, "deaths_ms": {"hog": 2519.4}},
           "kernel_oom": {"victim": "cache", "service_survived": True, "cache_survived": False,
                          "max_progress_gap_ms": 14.7, "deaths_ms": {"cache": 5199.5,
                                                                      "hog": 11807.5}},
           "largest_rss": {"victim": "cache", "service_survived": True, "cache_survived": False,
                           "max_progress_gap_ms": 14.5, "deaths_ms": {"cache": 2582.5}}}
    fork = {"backdoors": {"service_survived": True, "wedged_ms": 225.7, "bomb_processes_left": 0},
            "pids_limit_only": {"service_survived": True, "wedged_ms": 29715.6,
                                "bomb_processes_left": 123}}
    if series:
        mem["backdoors"]["progress_series"] = _progress(2900)
        mem["kernel_oom"]["progress_series"] = _progress(12000)
        mem["largest_rss"]["progress_series"] = _progress(2900)
        fork["backdoors"]["progress_series"] = _progress(1500, gap=(400, 600))
        fork["backdoors"]["fork_series"] = (
            [[t, 1.0] for t in range(-1000, 300, 20)] + [[t, 0.0] for t in range(300, 400, 20)]
            + [[t, 1.0] for t in range(610, 1500, 20)])
        fork["pids_limit_only"]["progress_series"] = _progress(30000)
        fork["pids_limit_only"]["fork_series"] = (
            [[t, 1.0] for t in range(-1000, 300, 100)] + [[t, 0.0] for t in range(300, 30000, 100)])
    else:
        for r in list(mem.values()) + list(fork.values()):
            r.pop("deaths_ms", None)
    return {"memory_hog": mem, "fork_bomb": fork,
            "details": {"memory_hog": {"backdoors": {"detect_ms": 2498.1, "repair_ms": 23.1}},
                        "fork_bomb": {"backdoors": {"detect_ms": 400.7, "repair_ms": 190.9}}},
            "params": {"memory_limit_mb": 512, "cache_mb": 240, "hog_rate_mb_s": 40,
                       "pids_limit": 128, "wedge_cap_s": 30.0}}


BENCH_RECOVERY = {
    "fault": "freeze",
    "results": [{"sessions": n, "backdoors_broken": 0, "backdoors_sessions_ok": n,
                 "backdoors_bytes_lost": 0, "backdoors_bytes_duplicated": 0,
                 "backdoors_detect_ms": 260.0 + n / 10, "backdoors_recovery_ms": 40.0 + n / 5,
                 "backdoors_stall_p50_ms": 330.0 + n / 8, "backdoors_stall_p99_ms": 380.0 + n / 4,
                 "backdoors_stall_p99_beyond_detection_ms": 120.0, "pace_interval_ms": 15.6,
                 "backdoors_steps": {"target": "n1"}, "haproxy_broken": n,
                 "haproxy_resume_ms": 2100.0, "haproxy_pinned": n}
                for n in (1, 10, 100, 1000)],
    "overhead_pct": 3.1,
    "overhead": {"response_bytes": 16384, "seconds_per_round": 3.0, "rounds": 3,
                 "plain_rps": 2950.2, "cb_rps": 2858.7, "plain_p50_ms": 0.301,
                 "cb_p50_ms": 0.312, "plain_p99_ms": 0.702, "cb_p99_ms": 0.741,
                 "overhead_pct": 3.1}}
BENCH_SENSORS = {"progress_tick_ns": 38.2, "level_set_ns": 61.0, "pressure_event_ns": 45.5,
                 "prometheus_counter_inc_ns": 190.4, "prometheus_gauge_set_ns": 170.1,
                 "notify_datagram_ns": 2100.7, "snapshot_per_sensor_ns": 300.0,
                 "snapshot_sensors": 64, "tick_vs_prometheus_inc": 0.2,
                 "target_tick_at_most_quarter_of_prometheus": True}
BENCH_DETECTION = {"period_ms": 50.0, "deadlines_ms": [50, 100, 200],
                   "latency": {str(d): {"trials": 20, "p50_ms": d + 0.0, "p99_ms": d + 50.0,
                                        "max_ms": d + 50.0, "bound_ms": d + 100.0,
                                        "within_bound": 20} for d in (50, 100, 200)},
                   "results": [{"fault": f, "deadline_ms": d, "mode": m, "trials": 20,
                                "p50_ms": (d or 5) + (40.0 if m == "poll" else 3.0),
                                "p99_ms": (d or 8) + (95.0 if m == "poll" else 9.0)}
                               for f, ds in (("hang", (50, 100, 200)), ("freeze", (200,)),
                                             ("crash", (0,)), ("link_down", (0,)))
                               for d in ds for m in ("event", "poll")],
                   "soak": {"seconds": 60.0, "load": "2 busy loops", "false_positives": 0,
                            "polls_per_s": 60.0}, "errors": []}
BENCH_MONITOR = {"sensors_per_node": 16, "results": [
    {"nodes": n, "mode": m, "monitor_cpu_pct": (3.0 if m == "event" else 10.0) * n / 8,
     "agent_cpu_pct_per_node": 0.15 if m == "event" else 3.0, "detect_p50_ms": 210.0,
     "detect_p99_ms": 215.0 if m == "event" else 400.0, "trials": 20}
    for n in (8, 32, 128) for m in ("event", "poll")]}


BENCH_FLEET = {"monitors": 3, "nodes": 16, "trials": 6, "lease_ttl_s": 1, "fleet_poll_ms": 50,
               "takeover_ms": [1362.0, 1134.0, 1535.0, 1290.5, 1401.2, 1250.0],
               "takeover_ms_p50": 1326.0, "takeover_ms_p99": 1535.0, "takeover_ms_max": 1535.0,
               "giveback_ms_p50": 210.0, "anchors_s": {"kubernetes_node_lease": 40,
                                                       "nomad_heartbeat": 20,
                                                       "memberlist_swim": 5},
               "scenario": {
                   "monitors": 3, "hosts": 2, "nodes": 8, "etcd_members": 3, "duration_s": 30,
                   "seed": 1, "faults_injected": 6, "faults_handled": 4, "missed": 0,
                   "takeover_ms_p99": 1712.5, "stale_token_ops_refused": 2,
                   "stale_token_ops_applied": 0, "double_acted": 0,
                   "timeline": {"start": 1796100000.0, "events": [
                       {"t": 0.0, "lane": "m2", "kind": "monitor-kill", "target": "m2",
                        "end": 3.1},
                       {"t": 1.7, "lane": "m2", "kind": "taken-over", "target": "3 nodes"},
                       {"t": 4.0, "lane": "nodes", "kind": "fork-bomb", "target": "h0/n3"},
                       {"t": 4.5, "lane": "m1", "kind": "incident", "target": "h0/n3"},
                       {"t": 8.0, "lane": "m3", "kind": "monitor-cut", "target": "m3",
                        "end": 14.0},
                       {"t": 16.0, "lane": "etcd", "kind": "etcd-kill", "target": "member 1",
                        "end": 21.0},
                       {"t": 17.0, "lane": "nodes", "kind": "memory-hog", "target": "h1/n6"},
                       {"t": 18.1, "lane": "m3", "kind": "incident", "target": "h1/n6"}]}}}


def _per_100ms(dip_from: int, dip_len: int, failed_at: tuple[int, ...] = (),
               recovered: bool = True, n: int = 90) -> dict:
    """A series around a fault at bucket 30: 12 ok per bucket, 6 of them the node's."""
    ok = [12.0] * n
    node = [6.0] * n
    end = n if not recovered else 30 + dip_from + dip_len
    for i in range(30 + dip_from, end):
        ok[i], node[i] = 6.0, 0.0
    failed = [3.0 if i - 30 in failed_at else 0.0 for i in range(n)]
    return {"t0": -3000, "bucket_ms": 100, "ok": ok, "failed": failed, "node_ok": node,
            "dip_from_ms": dip_from * 100, "dip_recovered": recovered, "baseline": 6.0,
            "fraction": 0.5}


BENCH_CASESTUDY = {
    "users": 16, "seconds": 4.0, "rounds": 1, "mixes": ["Browsing", "Bidding"],
    "data": {"users": 1000, "items": 2000, "bids": 10000},
    "load": [{"users": u, "plain_rps": rps, "recoverable_rps": rps * 0.98,
              "plain_p50_ms": 4.5 + u / 4, "recoverable_p50_ms": 4.6 + u / 4,
              "plain_p99_ms": 40.0 + 5 * u, "recoverable_p99_ms": 43.0 + 5 * u,
              "plain_interval_p99_ms": 20.0 + u, "recoverable_interval_p99_ms": 21.0 + u,
              "plain_requests": int(rps * 4), "plain_failed": 0,
              "recoverable_requests": int(rps * 4), "recoverable_failed": 0,
              "overhead_pct": 2.0, "saturated": u == 16}
             for u, rps in ((1, 9.5), (2, 19.1), (4, 38.7), (8, 70.2), (16, 74.0))],
    "overhead_pct_max": 2.5, "p99_overhead_pct_max": 7.5, "levels_below_saturation": [1, 2, 4, 8],
    "ramp_s": 1.0, "interval_overhead_pct_max": 1.5, "interval_p99_overhead_pct_max": 4.5,
    "bids_acknowledged": 417, "bids_lost": 0, "bids_duplicated": 0,
    "faults": [
        {"tier": "fe", "fault": "freeze", "users": 8, "requests": 1804, "failed_requests": 0,
         "max_response_ms": 735.0, "detect_ms": 515.3, "recovery_ms": 121.4, "moved": 4,
         "recover_status": "done", "target": "n1", "dip_ms": 600.0,
         "per_100ms": _per_100ms(0, 6), "bids_acknowledged": 100, "bids_lost": 0,
         "bids_duplicated": 0},
        {"tier": "mt", "fault": "crash", "users": 8, "requests": 1650, "failed_requests": 3,
         "haproxy_failed_requests": 37, "detect_ms": 230.0, "recovery_ms": 95.0,
         "dip_ms": 2500.0, "per_100ms": _per_100ms(35, 0, failed_at=(3,), recovered=False),
         "haproxy_per_100ms": _per_100ms(0, 20, failed_at=(0, 1, 2, 3)),
         "bids_acknowledged": 90, "bids_lost": 0, "bids_duplicated": 1}]}


BENCH_VM = {"accel": "tcg", "boot_s": 6.3, "guest_hang_detect_ms": 501,
            "guest_hang_deadline_ms": 500, "tamper_detect_ms": {"p50": 151, "p99": 716},
            "tamper_healed": True, "hidden_process_found": True, "false_positives": 0,
            "benign_minutes": 10.02, "overhead_pct": 3.1, "scan_cpu_pct": 3.2,
            "prediction_lead_ms": {"memory-leak": 4922, "fork-bomb": 324},
            "prediction_false_alarms": 0,
            "gibraltar": {"detect_s": 20, "false_positive_pct": 0.65, "overhead_pct": 0.49},
            "timeline": {"events": [
                {"t": 0.3, "lane": "guest", "kind": "hang", "end": 0.8},
                {"t": 30.0, "lane": "guest", "kind": "benign work", "end": 630.0},
                {"t": 631.0, "lane": "syscall-table", "kind": "tamper"},
                {"t": 631.02, "lane": "syscall-table", "kind": "detected"},
                {"t": 631.03, "lane": "syscall-table", "kind": "healed"},
                {"t": 632.0, "lane": "function-patch", "kind": "tamper"},
                {"t": 632.6, "lane": "function-patch", "kind": "detected"},
                {"t": 632.61, "lane": "function-patch", "kind": "healed"},
                {"t": 640.0, "lane": "memory-leak", "kind": "fault", "end": 649.6},
                {"t": 644.6, "lane": "memory-leak", "kind": "alarm"}]}}


def inputs(tmp_path: Path, *, series: bool = True) -> dict:
    """A demo folder (with its incident log) and a bench folder; build_report kwargs."""
    demo = tmp_path / "out" / "demo" / "20251128-050000"
    demo.mkdir(parents=True)
    write_incidents(demo / "incidents.jsonl")
    (demo / "results.json").write_text(json.dumps(demo_results(str(demo / "incidents.jsonl"))))
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, value in {"bench_repair": bench_repair(series), "bench_recovery": BENCH_RECOVERY,
                        "bench_sensors": BENCH_SENSORS, "bench_detection": BENCH_DETECTION,
                        "bench_monitor": BENCH_MONITOR, "bench_fleet": BENCH_FLEET,
                        "bench_casestudy": BENCH_CASESTUDY, "bench_vm": BENCH_VM}.items():
        (bench / f"{name}.json").write_text(json.dumps(value, indent=2))
    (bench / "bench_tcprepair.json").write_text(json.dumps(
        {"benchmark": "tcprepair", "kernel": "6.18", "results": [
            {"sockets": n, "dump_us_per_socket": 25.0, "close_silently_us_per_socket": 5.0,
             "restore_us_per_socket": 28.0, "total_ms": n * 0.06,
             "reference_connect_accept_us_per_socket": 25.0} for n in (1, 100, 1000)]}))
    return {"demo_dir": str(demo), "bench_dir": str(bench), "incidents": None,
            "out": str(tmp_path / "report.html")}


# ---- checks -------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def check_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert img.shape[:2] == (height, width)
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert len(colours) > 20, "a blank or nearly blank image"


def self_contained(page: str) -> None:
    for ref in ("http://", "https://", "file://", "<link", "<script"):
        assert ref not in page, ref
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")


# ---- tests --------------------------------------------------------------------------------


def test_the_report_has_every_section_and_real_plots(tmp_path):
    path = build_report(**inputs(tmp_path))
    assert path == tmp_path / "report.html" and path.is_file()
    page = path.read_text()
    self_contained(page)
    for anchor, title in SECTIONS.items():
        assert f'id="{anchor}"' in page and title in page
    assert 'class="note' not in page  # nothing missing, no figure failed
    # 3 timelines, 2 repair cases, stall CDF, recovery vs HAProxy, RUBiS faults, detection,
    # overhead, RUBiS load, fleet takeover, fleet timeline, monitor cost, sensor cost,
    # the VM backdoor's integrity timeline
    pngs = images(page)
    assert len(pngs) == 16
    for png in pngs:
        check_png(png)
    # the header: verdicts of the demo
    assert "5/6 scenarios passed" in page and "network: failed" in page and "lab <code>demo" in page
    # every incident in the table, with its actions
    for inc in ("20251128-050000-n0-1", "20251128-050010-n1-2", "20251128-050020-n3-3",
                "20251128-050030-n0-4"):
        assert inc in page
    assert "lock_kill_lineage" in page and "refresh" in page
    assert "bd-memhog (pid 412) grows 38 MB/s" in page


def test_an_existing_folder_as_out_gets_report_html(tmp_path):
    kw = inputs(tmp_path)
    kw["out"] = str(tmp_path)
    assert build_report(**kw) == tmp_path / "report.html"


def test_diagnosis_time_comes_from_the_log(tmp_path):
    kw = inputs(tmp_path)
    got = load_inputs(demo_dir=kw["demo_dir"], bench_dir=kw["bench_dir"], incidents=None)
    assert got.diagnosis_ms["20251128-050000-n0-1"] == pytest.approx(4.0, abs=0.01)
    assert [i.rule for i in got.incidents] == ["memory-hog", "fork-bomb", "deadlock", "hang"]


def test_missing_inputs_are_notes_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/demo, no out/bench here
    path = build_report(demo_dir=None, bench_dir=None, incidents=None, out="r/report.html")
    page = path.read_text()
    self_contained(page)
    for title in SECTIONS.values():
        assert title in page
    assert images(page) == []
    for name in ("bench_repair", "bench_recovery", "bench_sensors", "bench_detection",
                 "bench_monitor", "bench_tcprepair", "bench_fleet", "bench_casestudy",
                 "bench_vm"):
        assert f"run <code>make bench</code> ({name})" in page
    assert "run <code>make demo</code>" in page


def test_the_fleet_takeover_plot_shows_the_kills_and_the_target(tmp_path):
    page = build_report(**inputs(tmp_path)).read_text()
    assert "Takeover in a fleet of monitors (bench_fleet)" in page
    assert "3 monitor processes, 16 nodes, lease 1 s" in page
    assert ">1535<" in page  # p99 in the table


def test_the_fleet_scenario_timeline_is_drawn_with_its_figures(tmp_path):
    page = build_report(**inputs(tmp_path)).read_text()
    assert "could not draw" not in page
    assert "fleet scenario timeline" in page and "3 monitors, 2 hosts, 8 nodes, 30 s" in page
    assert ">1712<" in page  # the scenario's takeover p99 in its table
    kw = inputs(tmp_path / "old")  # a bench_fleet.json from before the scenario: a note
    old = {k: v for k, v in BENCH_FLEET.items() if k != "scenario"}
    (Path(kw["bench_dir"]) / "bench_fleet.json").write_text(json.dumps(old))
    page = build_report(**kw).read_text()
    assert "has no fleet scenario timeline" in page and ">1535<" in page


def test_the_vm_backdoor_timeline_and_figures_beside_gibraltars(tmp_path):
    page = build_report(**inputs(tmp_path)).read_text()
    assert "could not draw" not in page and "integrity timeline" in page
    for cell in (">151 / 716<", "~20000 average", ">0 / 10.0<", "0.65 % over 42 min",
                 ">yes, yes<", ">501 (500)<", ">4922<", ">324<"):
        assert cell in page, cell
    kw = inputs(tmp_path / "old")  # without a timeline: the table and a note
    (Path(kw["bench_dir"]) / "bench_vm.json").write_text(json.dumps(
        {k: v for k, v in BENCH_VM.items() if k != "timeline"}))
    page = build_report(**kw).read_text()
    assert "has no timeline" in page and ">151 / 716<" in page


def test_the_casestudy_figures_and_its_fault_table(tmp_path):
    page = build_report(**inputs(tmp_path)).read_text()
    assert "could not draw" not in page
    assert 'alt="RUBiS throughput and latency vs load"' in page
    assert 'alt="requests per 100 ms across each fault"' in page
    assert "1000 users, 2000 items, 10000 bids" in page and "orange: the baseline" in page
    assert "throughput 2.5 % (target 5 %), p99 latency 7.5 %" in page
    assert ("ramp-up of 1.0 s in which every user opens its session, as TPC-W measures): "
            "throughput 1.5 %, p99 latency 4.5 %") in page
    assert "acknowledged 417, lost 0, duplicated 0" in page
    load = page.split("plain vs recoverable (bench_casestudy)")[1]
    assert ">74.0<" in load and ">72.5<" in load and "0 / 0" in load  # 16 users' row
    assert "36.0 / 37.0" in load  # its measurement interval's p99
    faults = page.split("a node fails (bench_casestudy)")[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", faults)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert cells[0] == ["fe", "freeze", "8", "1804", "0", "-", "515", "121", "600", "100", "0",
                        "0"]
    # the middle tier's dip lasted to the series' end: a lower bound
    assert cells[1] == ["mt", "crash", "8", "1650", "3", "37", "230", "95", "≥ 2500", "90", "0",
                        "1"]


def test_without_the_casestudy_file_a_note_tells_how_to_get_it(tmp_path):
    kw = inputs(tmp_path)
    (Path(kw["bench_dir"]) / "bench_casestudy.json").unlink()
    page = build_report(**kw).read_text()
    assert page.count("run <code>make bench</code> (bench_casestudy)") == 2  # both parts
    assert "<code>backdoors casestudy rubis --json --faults all &gt; " \
           "out/bench/bench_casestudy.json</code>" in page
    assert len(images(page)) == 14 and "could not draw" not in page


def test_a_casestudy_file_without_series_still_has_its_table(tmp_path):
    """A file written before the requests per 100 ms were recorded: its load figure and
    fault table, a note for the missing series, and no fault figure."""
    kw = inputs(tmp_path)
    old = json.loads(json.dumps(BENCH_CASESTUDY))
    old["faults"] = [{k: v for k, v in old["faults"][0].items()
                      if k not in ("per_100ms", "dip_ms")}]
    (Path(kw["bench_dir"]) / "bench_casestudy.json").write_text(json.dumps(old))
    page = build_report(**kw).read_text()
    assert "no requests per 100 ms for fe-freeze" in page
    assert 'alt="requests per 100 ms across each fault"' not in page
    assert 'alt="RUBiS throughput and latency vs load"' in page and ">515<" in page
    assert len(images(page)) == 15 and "could not draw" not in page
    old["faults"] = []
    old["load"] = []
    (Path(kw["bench_dir"]) / "bench_casestudy.json").write_text(json.dumps(old))
    page = build_report(**kw).read_text()
    assert "has no fault under load" in page and "has no load level" in page
    assert len(images(page)) == 14


def test_bench_casestudy_runs_the_study_short(monkeypatch):
    """`make bench`'s runner calls the study with small parameters and every fault built
    (the study itself is not run here)."""
    from backdoors.casestudy.rubis import study

    spec = importlib.util.spec_from_file_location("bench_casestudy",
                                                  ROOT / "bench/bench_casestudy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(study, "rubis", lambda *a, **kw: calls.append((a, kw)) or {"load": []})
    assert mod.run() == {"load": []}
    [(args, kw)] = calls
    assert args == (16, 4.0) and kw["rounds"] == 1 and kw["faults"] == study.FAULTS
    assert kw["scale"].users == 1000 and kw["scale"].bids == 10000


def test_an_empty_bench_file_is_a_note_not_an_error(tmp_path):
    kw = inputs(tmp_path)
    (Path(kw["bench_dir"]) / "bench_recovery.json").write_text("")
    page = build_report(**kw).read_text()
    assert "bench_recovery.json is empty" in page
    assert "run <code>make bench</code> (bench_recovery)" in page


def test_an_older_bench_repair_falls_back_to_bars(tmp_path):
    page = build_report(**inputs(tmp_path, series=False)).read_text()
    assert "has no time series" in page
    pngs = images(page)
    assert len(pngs) == 16
    for png in pngs:
        check_png(png)


def test_an_older_bench_detection_gives_its_hang_table(tmp_path):
    kw = inputs(tmp_path)
    older = {k: v for k, v in BENCH_DETECTION.items() if k != "results"}
    (Path(kw["bench_dir"]) / "bench_detection.json").write_text(json.dumps(older))
    page = build_report(**kw).read_text()
    assert "bound: deadline + 2 polls" in page and "detection latency by fault" not in page
    assert len(images(page)) == 15


def test_a_demo_without_incident_log_notes_it(tmp_path):
    kw = inputs(tmp_path)
    (Path(kw["demo_dir"]) / "incidents.jsonl").unlink()
    page = build_report(**kw).read_text()
    assert "is not there" in page  # the demo's log was named but is gone
    assert len(images(page)) == 13  # no repairing timelines


def test_the_newest_demo_is_the_default(tmp_path, monkeypatch):
    kw = inputs(tmp_path)
    older = tmp_path / "out" / "demo" / "20250101-000000"
    older.mkdir()
    (older / "results.json").write_text(json.dumps({"started": 1.0, "lab": "old", "scenarios": []}))
    (tmp_path / "out" / "demo" / "20991231-000000").mkdir()  # a run without results yet
    monkeypatch.chdir(tmp_path)
    got = load_inputs(demo_dir=None, bench_dir=kw["bench_dir"], incidents=None)
    assert got.demo is not None and got.demo.lab == "demo"
    assert got.demo_dir == Path("out/demo/20251128-050000")


def test_a_corrupt_incident_line_is_skipped_naming_file_and_line(tmp_path, caplog):
    kw = inputs(tmp_path)
    log = Path(kw["demo_dir"]) / "incidents.jsonl"
    lines = log.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a torn line that is not the last one
    log.write_text("\n".join(lines) + "\n")
    build_report(**kw)  # the rest of the log still makes the report
    assert f"{log}:3: not an incident event, skipped" in caplog.text


def test_malformed_json_names_the_file_and_where(tmp_path):
    kw = inputs(tmp_path)
    results = Path(kw["demo_dir"]) / "results.json"
    results.write_text('{"started": 1,\n "scenarios": [oops]}')
    with pytest.raises(ReportError, match=rf"{re.escape(str(results))}:2:\d+: .*not valid JSON"):
        build_report(**kw)
    results.write_text(json.dumps({"started": 1, "scenarios": [{"name": "x", "passed": "yes"}]}))
    with pytest.raises(ReportError, match=r"results.json: .*\$\.scenarios\[0\]\.passed"):
        build_report(**kw)
    bench = Path(kw["bench_dir"]) / "bench_sensors.json"
    bench.write_text(json.dumps({"progress_tick_ns": "fast"}))
    results.write_text(json.dumps(demo_results(kw["demo_dir"] + "/incidents.jsonl")))
    with pytest.raises(ReportError, match=r"bench_sensors.json: .*progress_tick_ns"):
        build_report(**kw)


def test_a_given_path_that_does_not_exist_is_an_error(tmp_path):
    kw = inputs(tmp_path)
    with pytest.raises(ReportError, match="incident log .*nowhere.jsonl does not exist"):
        build_report(**{**kw, "incidents": str(tmp_path / "nowhere.jsonl")})
    with pytest.raises(ReportError, match="benchmark directory"):
        build_report(**{**kw, "bench_dir": str(tmp_path / "nobench")})


def test_incidents_given_explicitly_replace_the_demos(tmp_path):
    kw = inputs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    enc = msgspec.json.Encoder()
    (other / "incidents.jsonl").write_bytes(
        b"".join(enc.encode(e) + b"\n" for e in incident_events()[:4]))  # the memory hog only
    got = load_inputs(demo_dir=kw["demo_dir"], bench_dir=None, incidents=str(other))
    assert [i.rule for i in got.incidents] == ["memory-hog"]
    assert got.incidents_path == other


# ---- the time series bench_repair records (scenarios.watch) -----------------------------------


class _Reader:
    def close(self):
        pass


class _Lab:
    def sensor_reader(self, node):
        return _Reader()


def test_progress_series_is_bounded_and_keeps_a_stall():
    with watch.recording() as rec:
        w = watch.ProgressWatch(_Lab(), "n0", {})
    assert rec.watches == [w]
    t0 = 1000.0
    v = 0
    for k in range(5000):  # 10 s at 2 ms, a 400 ms stall at 4 s, gone at 9 s
        t = t0 + k * 0.002
        if not 4.0 <= t - t0 < 4.4:
            v += 1
        w._changes.append((t, v if t - t0 < 9.0 else None))
    w._changes = [c for i, c in enumerate(w._changes) if i == 0 or c[1] != w._changes[i - 1][1]]
    s = w.series(t0 + 1.0, t0 + 10.0, points=300)
    assert len(s) <= 300
    assert s[0][0] == pytest.approx(-1000, abs=40)  # from the watch's start, fault at 1 s
    steps = [b[0] - a[0] for a, b in zip(s, s[1:])]
    assert max(steps) == pytest.approx(400, abs=5)  # the stall kept its edges
    assert s[-1][1] is None  # the service gone
    json.dumps(s)


def test_fork_series_marks_failures():
    with watch.recording() as rec:
        p = watch.ForkProbe(_Lab(), "n0")
    assert rec.probes == [p]
    p._tries = [(100.0 + k * 0.02, 0.0 if 50 <= k < 60 else 1.0) for k in range(1000)]
    s = p.series(101.0, 120.0, points=100)
    assert len(s) <= 100
    assert {v for _, v in s} == {0.0, 1.0}
    failed = [t for t, v in s if v == 0.0]
    assert min(failed) >= -20 and max(failed) <= 200


def test_bench_repair_attaches_the_watch_series():
    spec = importlib.util.spec_from_file_location("bench_repair", ROOT / "bench/bench_repair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with watch.recording() as rec:
        w = watch.ProgressWatch(_Lab(), "n0", {})
        p = watch.ForkProbe(_Lab(), "n0")
    now = time.monotonic()
    w._changes = [(now + k * 0.01, k) for k in range(100)]
    w.died = {"cache": now + 0.5}
    p._tries = [(now + k * 0.02, 1.0) for k in range(50)]
    assert mod.series(rec) == {}  # no window measured yet
    w.max_gap_ms(now + 0.2, now + 1.0)
    got = mod.series(rec)
    assert got["deaths_ms"] == {"cache": pytest.approx(300, abs=0.1)}
    assert got["progress_series"][0] == [pytest.approx(-200, abs=0.1), 0]
    assert len(got["fork_series"]) == 50


def test_report_without_its_extra_names_the_extra(tmp_path):
    """Without matplotlib (the "report" extra), `backdoors report` says what to install, in
    one line, instead of a traceback; it writes nothing."""
    no_matplotlib = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                     "runpy.run_module('backdoors', run_name='__main__')")
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-c", no_matplotlib, "report", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "pip install 'backdoors[report]'" in line and "matplotlib" in line
    assert not out.exists()

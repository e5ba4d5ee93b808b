"""The report, section by section: `build_report` reads the inputs and writes one HTML file.

Sections (anchors in SECTIONS): the header with the demo's verdicts, then the
counterparts of the original Backdoors figures: repairing timeline, effectiveness of
remote repair, recovery is fast, low overhead under load, the VM backdoor (kernel
integrity against Gibraltar, Orion), and the incident list.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ..monitor.incidents import Incident
from . import plots
from .data import (
    BenchCasestudy,
    BenchRepair,
    CasestudyFault,
    Inputs,
    RepairPolicy,
    ReportError,
    Scenario,
    load_inputs,
)
from .html import Html, esc, figure, inline, note, page, para, section, status, table

log = logging.getLogger(__name__)

SECTIONS = {
    "repairing-timeline": "1. Repairing timeline",
    "repair-effectiveness": "2. Effectiveness of remote repair",
    "recovery": "3. Recovery is fast",
    "overhead": "4. Low overhead under load",
    "vm-backdoor": "5. The VM backdoor: a guest kernel healed and predicted",
    "incidents": "6. Incidents",
}
REPAIR_RULES = ("memory-hog", "fork-bomb", "deadlock", "hang")
REPORT_NAME = "report.html"


def _ms(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # not "-0"


def _time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _plot(what: str, draw: Callable[[], bytes], caption: str | None = None) -> Html:
    """A figure, or an error note naming it if drawing failed (the rest of the report
    is still written)."""
    try:
        return figure(draw(), what, caption)
    except Exception as e:  # noqa: BLE001 - one bad figure must not lose the report
        log.exception("report figure %r failed", what)
        return note(f"could not draw {what}: {type(e).__name__}: {e}", error=True)


# ---- header -------------------------------------------------------------------------------


def header(inputs: Inputs, generated: float) -> list[str]:
    demo = inputs.demo
    meta = [f"generated {_time(generated)} {time.strftime('%Z', time.localtime(generated))} "
            f"on {socket.gethostname()}"]
    if demo is not None:
        meta.append(f"lab `{demo.lab or '?'}`, demo started {_time(demo.started)}"
                    + (f", ran {demo.duration_s:.0f} s" if demo.duration_s is not None else ""))
    nav = " ".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in SECTIONS.items())
    parts = [Html("<header><h1>backdoors report</h1>"), para(" · ".join(meta), "meta"),
             Html(f"<nav>{nav}</nav></header>"),
             para("What the system did, read from the demo's results, the monitor's incident "
                  "log and the benchmarks' JSON; nothing is measured again for this page."),
             Html('<section id="verdicts"><h2>Demo verdicts</h2>')]
    if demo is None:
        parts.append(note(inputs.missing.get("demo", "no demo results")))
    else:
        passed = sum(s.passed for s in demo.scenarios)
        parts.append(para(f"{passed}/{len(demo.scenarios)} scenarios passed "
                          f"(results: `{inputs.demo_dir}`)."))
        parts.append(table(["scenario", "kind", "node", "result", "verdict", "checks",
                            "detect ms", "repair ms", "recovery ms"],
                           [_verdict_row(s) for s in demo.scenarios], numeric=(6, 7, 8)))
    parts.append(Html("</section>"))
    return parts


def _verdict_row(s: Scenario) -> list[object]:
    checks = "".join(f"<li>{status(c.ok, '✔', '✘')} {inline(c.what)}"
                     f"{(': ' + inline(c.detail)) if c.detail else ''}</li>" for c in s.checks)
    name = f"{s.title} ({s.name})" if s.title and s.title != s.name else s.name
    return [name, s.kind or "-", s.node or "-", status(s.passed), s.verdict or "-",
            Html(f'<ul class="checks">{checks}</ul>') if checks else "-",
            _ms(s.detect_ms), _ms(s.repair_ms), _ms(s.recovery_ms)]


# ---- 1. repairing timeline ----------------------------------------------------------------


def _timeline_cases(inputs: Inputs) -> tuple[list[tuple[str, Incident]], list[str]]:
    by_id = {i.id: i for i in inputs.incidents}
    cases, notes = [], []
    if inputs.demo is not None:
        for s in inputs.demo.scenarios:
            if s.kind not in ("repair", "detection") or not s.incident:
                continue
            if s.incident in by_id:
                cases.append((s.title or s.name, by_id[s.incident]))
            elif inputs.incidents_path is not None:
                notes.append(f"scenario {s.name} names incident {s.incident}, which is not in "
                             f"`{inputs.incidents_path}`")
    if not cases:
        for rule in REPAIR_RULES:
            found = [i for i in inputs.incidents if i.rule == rule]
            best = next((i for i in found if i.actions), found[0] if found else None)
            if best is not None:
                cases.append((rule, best))
    return cases, notes


def timeline_section(inputs: Inputs) -> Html:
    parts = [para("For each repair case: the sensors that fired, as the monitor saw them "
                  "before detection (left), and its response after detection (right): "
                  "diagnosis, each action with its status, and the end of the repair. "
                  "The onset is where the monitor's sensor history says the fault began.")]
    if inputs.incidents_path is None:
        parts.append(note(inputs.missing.get("incidents", "no incident log")))
        return section("repairing-timeline", SECTIONS["repairing-timeline"], parts)
    cases, notes = _timeline_cases(inputs)
    parts += [note(n) for n in notes]
    if not cases:
        parts.append(note(f"no incident of the repair rules ({', '.join(REPAIR_RULES)}) in "
                          f"`{inputs.incidents_path}`: run `make demo` (or `backdoors demo`)"))
    for title, inc in cases:
        diag = inputs.diagnosis_ms.get(inc.id)
        summary = inc.diagnosis.summary if inc.diagnosis else "no diagnosis"
        parts.append(Html(f"<h3>{esc(title)}</h3>"))
        parts.append(_plot(f"repairing timeline of incident {inc.id}",
                           lambda inc=inc, diag=diag: plots.timeline(inc, diag),
                           f"incident `{inc.id}` ({inc.rule} on {inc.node}): {summary}"))
        parts.append(table(["step", "at (ms after detection)", "took (ms)", "status", "detail"],
                           _steps(inc, diag), numeric=(1, 2)))
    return section("repairing-timeline", SECTIONS["repairing-timeline"], parts)


def _steps(inc: Incident, diag: float | None) -> list[list[object]]:
    rows: list[list[object]] = [
        ["onset", _ms(-inc.onset_to_detect_ms), "-", "-",
         "; ".join(h.summary for h in inc.detectors)],
        ["detection", "0", "-", "-", f"rule {inc.rule}"]]
    if inc.diagnosis is not None:
        rows.append([f"diagnosis ({inc.diagnosis.kind})", _ms(diag), "-", "-",
                     inc.diagnosis.summary])
    for a in inc.actions:
        detail = a.error or ", ".join(f"{k}={v}" for k, v in a.detail.items()
                                      if not isinstance(v, (dict, list)))
        rows.append([a.kind, _ms(a.started_ms), _ms(a.duration_ms), status(
            a.status == "done", a.status, a.status) if a.status != "skipped" else a.status, detail])
    if inc.repaired_ms is not None:
        rows.append([f"response done ({inc.state})", _ms(inc.repaired_ms), "-", "-", ""])
    return rows


# ---- 2. effectiveness of remote repair ------------------------------------------------------


def effectiveness_section(inputs: Inputs) -> Html:
    parts = [para("The same fault with and without backdoors (bench_repair): the service's "
                  "progress counter, read beside the monitor straight from its Sensor Box, "
                  "and who was killed.")]
    b: BenchRepair | None = inputs.bench.get("bench_repair")
    if b is None:
        parts.append(note(inputs.missing["bench_repair"]))
        return section("repair-effectiveness", SECTIONS["repair-effectiveness"], parts)
    p = b.params
    if b.memory_hog:
        parts.append(Html("<h3>Memory hog</h3>"))
        fault = (f"a hog grows {p.get('hog_rate_mb_s', '?')} MB/s next to a "
                 f"{p.get('cache_mb', '?')} MB cache, memory limit "
                 f"{p.get('memory_limit_mb', '?')} MB")
        parts += _case(b.memory_hog, "Memory hog: service progress", fault, "hog starts",
                       "max_progress_gap_ms", "longest progress gap (ms)")
        d = b.details.get("memory_hog", {})
        parts.append(table(
            ["policy", "first killed", "service survived", "cache survived",
             "longest progress gap (ms)", "detect (ms)", "repair (ms)"],
            [[plots._policy(n, i)[0], r.victim or "-", _yes(r.service_survived),
              _yes(r.cache_survived), _ms(r.max_progress_gap_ms),
              _ms(d.get(n, {}).get("detect_ms")), _ms(d.get(n, {}).get("repair_ms"))]
             for i, (n, r) in enumerate(b.memory_hog.items())], numeric=(4, 5, 6)))
    if b.fork_bomb:
        parts.append(Html("<h3>Fork bomb</h3>"))
        fault = f"a fork bomb under a pids limit of {p.get('pids_limit', '?')}"
        parts += _case(b.fork_bomb, "Fork bomb: service progress", fault, "bomb starts",
                       "wedged_ms", "time a fork in the node failed (ms)")
        d = b.details.get("fork_bomb", {})
        parts.append(table(
            ["policy", "service survived", "fork failed for (ms)", "bomb processes left",
             "detect (ms)", "repair (ms)"],
            [[plots._policy(n, i)[0], _yes(r.service_survived), _ms(r.wedged_ms),
              _ms(r.bomb_processes_left), _ms(d.get(n, {}).get("detect_ms")),
              _ms(d.get(n, {}).get("repair_ms"))]
             for i, (n, r) in enumerate(b.fork_bomb.items())], numeric=(2, 3, 4, 5)))
    if not b.memory_hog and not b.fork_bomb:
        parts.append(note(f"`{inputs.bench_files['bench_repair']}` holds no case: "
                          "run `make bench` (bench_repair)"))
    return section("repair-effectiveness", SECTIONS["repair-effectiveness"], parts)


def _case(policies: dict[str, RepairPolicy], title: str, fault: str, start: str, metric: str,
          ylabel: str) -> list[Html]:
    if any(r.progress_series for r in policies.values()):
        return [_plot(title, lambda: plots.repair_effect(title, start, policies),
                      f"{fault}; time 0 is the fault's start. ✕ marks when a watched process "
                      "was first seen dead. Lines lying on each other mean the service "
                      "progressed alike under those policies.")]
    return [note("this bench_repair.json has no time series (written by an older "
                 "bench_repair): run `make bench` (bench_repair) again for the progress plot; "
                 "here, its summary"),
            _plot(title, lambda: plots.repair_bars(f"{title.split(':')[0]}: {ylabel}", policies,
                                                   metric, ylabel), fault)]


# ---- 3. recovery is fast --------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else None


def recovery_section(inputs: Inputs) -> Html:
    parts = [para("When a node fails, its client sessions move to another node. A session's "
                  "stall is the longest time its client received nothing around the fault; "
                  "detection is part of it.")]
    demo = inputs.demo
    cases = [s for s in demo.scenarios if s.kind == "recovery"] if demo else []
    with_stalls = [s for s in cases if s.stalls_ms]
    parts.append(Html("<h3>In the demo</h3>"))
    if demo is None:
        parts.append(note(inputs.missing.get("demo", "no demo results")))
    elif not with_stalls:
        parts.append(note(f"the demo results in `{inputs.demo_dir}` have no recovery scenario "
                          "with client stalls (the main demo's freeze, crash and network "
                          "record them; the auction scenario counts requests instead): run "
                          "`make demo` (or `backdoors demo`)"))
    else:
        parts.append(_plot("client stall distribution", lambda: plots.stall_cdf(
            [(s.name, s.stalls_ms, s.detect_ms) for s in with_stalls]),
            "one line per recovery scenario; the dashed line of the same colour is when the "
            "monitor detected the fault"))
        parts.append(table(
            ["scenario", "node", "sessions continued", "detect (ms)", "recovery (ms)",
             "stall p50 (ms)", "stall p99 (ms)", "stall max (ms)"],
            [[s.title or s.name, s.node or "-",
              f"{_ms(s.sessions_ok)}/{_ms(s.sessions)}" if s.sessions is not None else "-",
              _ms(s.detect_ms), _ms(s.recovery_ms), _ms(statistics.median(s.stalls_ms)),
              _ms(_pct(s.stalls_ms, 0.99)), _ms(max(s.stalls_ms))] for s in with_stalls],
            numeric=(3, 4, 5, 6, 7)))
    parts.append(Html("<h3>Backdoors vs HAProxy (bench_recovery)</h3>"))
    rec = inputs.bench.get("bench_recovery")
    if rec is None:
        parts.append(note(inputs.missing["bench_recovery"]))
    elif not rec.results:
        parts.append(note(f"`{inputs.bench_files['bench_recovery']}` has no per-session-count "
                          "results: run `make bench` (bench_recovery)"))
    else:
        parts.append(_plot("recovery vs HAProxy", lambda: plots.recovery_bench(rec.results),
                           f"fault: node {rec.fault or 'frozen'}; HAProxy balances two plain "
                           "servers with health checks. Backdoors' recovery time counts from "
                           "detection; its stall includes the stream's pacing interval."))
        parts.append(table(
            ["sessions", "broken (backdoors)", "broken (HAProxy)", "detect (ms)",
             "recovery (ms)", "stall p50 (ms)", "stall p99 (ms)", "pacing interval (ms)",
             "HAProxy serving again after (ms)"],
            [[_ms(r.sessions), _ms(r.backdoors_broken), _ms(r.haproxy_broken),
              _ms(r.backdoors_detect_ms), _ms(r.backdoors_recovery_ms),
              _ms(r.backdoors_stall_p50_ms), _ms(r.backdoors_stall_p99_ms),
              _ms(r.pace_interval_ms, 1), _ms(r.haproxy_resume_ms)] for r in rec.results],
            numeric=tuple(range(9))))
    parts += _casestudy_faults_part(inputs)
    parts += _detection_part(inputs) + _tcprepair_part(inputs) + _fleet_part(inputs)
    return section("recovery", SECTIONS["recovery"], parts)


# the RUBiS case study (bench_casestudy): its two figures of the original evaluation

CASESTUDY_FULL = ("backdoors casestudy rubis --json --faults all "
                  "> out/bench/bench_casestudy.json")


def _casestudy(inputs: Inputs, title: str, key: str, what: str
               ) -> tuple[list[Html], BenchCasestudy | None]:
    """The part's heading and the case study's results when they have `key` rows; else
    the heading and a note saying how to get them (`what`: what the file lacks)."""
    parts = [Html(f"<h3>{title} (bench_casestudy)</h3>")]
    c: BenchCasestudy | None = inputs.bench.get("bench_casestudy")
    if c is None:
        return parts + [note(f"{inputs.missing['bench_casestudy']} (root, about two "
                             f"minutes); or the full measure (several minutes): "
                             f"`{CASESTUDY_FULL}`")], None
    if not getattr(c, key):
        return parts + [note(f"`{inputs.bench_files['bench_casestudy']}` has {what}: "
                             f"`{CASESTUDY_FULL}`")], None
    return parts, c


def _dip(f: CasestudyFault) -> str:
    if f.dip_ms is None:
        return "-"
    open_ = f.per_100ms is not None and f.per_100ms.dip_recovered is False
    return f"≥ {_ms(f.dip_ms)}" if open_ else _ms(f.dip_ms)


def _casestudy_faults_part(inputs: Inputs) -> list[Html]:
    parts, c = _casestudy(inputs, "RUBiS under load: a node fails", "faults",
                          "no fault under load (run without --faults)")
    if c is None:
        return parts
    drawn = [f for f in c.faults if f.per_100ms is not None and f.per_100ms.ok]
    if drawn:
        baseline = any(f.haproxy_per_100ms is not None for f in drawn)
        parts.append(_plot("requests per 100 ms across each fault",
                           lambda: plots.casestudy_faults(drawn),
                           "the recoverable site under locust's load (bidding and browsing "
                           "mixes): requests completed per 100 ms, the bars the whole site's "
                           "(red: failed), the line those of the failed node's users; time "
                           "0 is the fault's injection (dashed), then its detection and the "
                           "end of the sessions' move (dotted). Shaded: the dip, the longest "
                           "run of 100 ms buckets in which the node's users got less than "
                           "half their mean of the second before the fault"
                           + ("; orange: the baseline, the plain site behind HAProxy (for a "
                              "middle tier's fault, with its front ends' own retry)"
                              if baseline else "; the baseline is not measured yet")))
    old = [f"{f.tier}-{f.fault}" for f in c.faults if f not in drawn]
    if old:
        parts.append(note(f"no requests per 100 ms for {', '.join(old)} (a file written "
                          f"before they were recorded): `{CASESTUDY_FULL}`"))
    parts.append(table(
        ["tier", "fault", "users", "requests", "failed requests", "baseline failed requests",
         "detect (ms)", "recovery (ms)", "dip (ms)", "bids acknowledged", "bids lost",
         "bids duplicated"],
        [[f.tier, f.fault, _ms(f.users), _ms(f.requests), _ms(f.failed_requests),
          _ms(f.haproxy_failed_requests), _ms(f.detect_ms), _ms(f.recovery_ms), _dip(f),
          _ms(f.bids_acknowledged), _ms(f.bids_lost), _ms(f.bids_duplicated)]
         for f in c.faults], numeric=tuple(range(2, 12))))
    return parts


def _casestudy_load_part(inputs: Inputs) -> list[Html]:
    parts, c = _casestudy(inputs, "RUBiS under load: plain vs recoverable", "load",
                          "no load level")
    if c is None:
        return parts
    d = c.data
    parts.append(_plot("RUBiS throughput and latency vs load", lambda: plots.casestudy_load(
        c.load), f"the same site (2 front ends, 2 middle tiers, PostgreSQL with "
        f"{_ms(d.get('users'))} users, {_ms(d.get('items'))} items, {_ms(d.get('bids'))} bids) "
        "served by plain servers (uvicorn, asyncio) and recoverable ones, loaded in turn by "
        f"locust, {_ms(c.seconds)} s per level and kind, {_ms(c.rounds)} round(s) averaged; "
        "locust's aggregate over every page. Shaded: levels at saturation (the plain site "
        "grew less than 10 % from the level before)"))
    parts.append(table(
        ["users", "plain rps", "recoverable rps", "plain p50 (ms)", "recoverable p50 (ms)",
         "plain p99 (ms)", "recoverable p99 (ms)", "first requests' p99 (ms, plain / "
         "recoverable)", "later requests' p99 (ms, plain / recoverable)",
         "measurement interval's p99 (ms, plain / recoverable)", "failed (plain / recoverable)", "throughput loss (%)", "saturated"],
        [[_ms(r.users), _ms(r.plain_rps, 1), _ms(r.recoverable_rps, 1), _ms(r.plain_p50_ms, 1),
          _ms(r.recoverable_p50_ms, 1), _ms(r.plain_p99_ms, 1), _ms(r.recoverable_p99_ms, 1),
          f"{_ms(r.plain_first_p99_ms, 1)} / {_ms(r.recoverable_first_p99_ms, 1)}",
          f"{_ms(r.plain_steady_p99_ms, 1)} / {_ms(r.recoverable_steady_p99_ms, 1)}",
          f"{_ms(r.plain_interval_p99_ms, 1)} / {_ms(r.recoverable_interval_p99_ms, 1)}",
          f"{_ms(r.plain_failed)} / {_ms(r.recoverable_failed)}", _ms(r.overhead_pct, 1),
          _yes(r.saturated)] for r in c.load], numeric=tuple(range(7)) + (11,)))
    parts.append(para(
        f"Largest loss below saturation: throughput {_ms(c.overhead_pct_max, 1)} % (target "
        f"5 %), p99 latency {_ms(c.p99_overhead_pct_max, 1)} % (target 10 %; of the requests "
        f"after each user's first, which opens its session: "
        f"{_ms(c.steady_p99_overhead_pct_max, 1)} %). In the measurement intervals (after "
        f"a ramp-up of {_ms(c.ramp_s, 1)} s in which every user opens its session, as TPC-W "
        f"measures): throughput {_ms(c.interval_overhead_pct_max, 1)} %, p99 latency "
        f"{_ms(c.interval_p99_overhead_pct_max, 1)} %. Bids "
        f"acknowledged {_ms(c.bids_acknowledged)}, lost {_ms(c.bids_lost)}, duplicated "
        f"{_ms(c.bids_duplicated)}."))
    return parts


def _fleet_part(inputs: Inputs) -> list[Html]:
    parts = [Html("<h3>Takeover in a fleet of monitors (bench_fleet)</h3>")]
    f = inputs.bench.get("bench_fleet")
    if f is None:
        return parts + [note(inputs.missing["bench_fleet"])]
    if not f.takeover_ms:
        return parts + [note(f"`{inputs.bench_files['bench_fleet']}` has no takeover times: "
                             "run `make bench` (bench_fleet)")]
    parts.append(_plot("takeover times", lambda: plots.takeover(f.takeover_ms, f.anchors_s),
                       f"{_ms(f.monitors)} monitor processes, {_ms(f.nodes)} nodes, lease "
                       f"{_ms(f.lease_ttl_s)} s, fleet poll {_ms(f.fleet_poll_ms)} ms: from a "
                       "monitor's SIGKILL to each of its nodes claimed at its agent by another "
                       "monitor; dashed: the 2 s target" + "".join(
                           f"; {k.replace('_', ' ')}: {v:g} s" for k, v in f.anchors_s.items()
                           if k != "target_takeover")))
    parts.append(table(
        ["kills", "takeover p50 (ms)", "takeover p99 (ms)", "takeover max (ms)",
         "share given back p50 (ms)"],
        [[_ms(len(f.takeover_ms)), _ms(f.takeover_ms_p50), _ms(f.takeover_ms_p99),
          _ms(f.takeover_ms_max), _ms(f.giveback_ms_p50)]], numeric=(0, 1, 2, 3, 4)))
    sc = f.scenario
    if sc is None or not sc.timeline.events:
        return parts + [note(f"`{inputs.bench_files['bench_fleet']}` has no fleet scenario "
                             "timeline: run `make bench` (bench_fleet)")]
    parts.append(_plot("fleet scenario timeline", lambda: plots.fleet_timeline(
        sc.timeline.events), f"`scenario fleet`: {_ms(sc.monitors)} monitors, {_ms(sc.hosts)} "
        f"hosts, {_ms(sc.nodes)} nodes, {_ms(sc.duration_s)} s of faults; a span is a fault "
        "that lasted (a monitor down, stopped or cut off from etcd; an etcd member down)"))
    parts.append(table(
        ["faults", "handled", "missed", "takeover p99 (ms)", "stale-token ops refused",
         "stale-token ops applied", "double acted"],
        [[_ms(sc.faults_injected), _ms(sc.faults_handled), _ms(sc.missed),
          _ms(sc.takeover_ms_p99), _ms(sc.stale_token_ops_refused),
          _ms(sc.stale_token_ops_applied), _ms(sc.double_acted)]],
        numeric=(0, 1, 2, 3, 4, 5, 6)))
    return parts


def _detection_part(inputs: Inputs) -> list[Html]:
    parts = [Html("<h3>Detection latency (bench_detection)</h3>")]
    d = inputs.bench.get("bench_detection")
    if d is None:
        return parts + [note(inputs.missing["bench_detection"])]
    if d.results:
        parts.append(_plot("detection latency by fault and mode",
                           lambda: plots.detection(d.results),
                           "event: the agent judges its nodes and pushes the violation; "
                           "poll: the monitor judges what it reads every "
                           f"{_ms(d.period_ms)} ms. Dashed: the progress deadline"))
        parts.append(table(
            ["fault", "deadline (ms)", "mode", "trials", "p50 (ms)", "p99 (ms)"],
            [[r.fault, _ms(r.deadline_ms) if r.deadline_ms else "-", r.mode, _ms(r.trials),
              _ms(r.p50_ms, 1), _ms(r.p99_ms, 1)] for r in d.results],
            numeric=(1, 3, 4, 5)))
    elif d.latency:  # written by an older bench_detection: hangs, polled
        parts.append(table(
            ["progress deadline (ms)", "trials", "p50 (ms)", "p99 (ms)", "max (ms)",
             "bound: deadline + 2 polls (ms)", "within bound"],
            [[k, _ms(v.trials), _ms(v.p50_ms), _ms(v.p99_ms), _ms(v.max_ms), _ms(v.bound_ms),
              f"{_ms(v.within_bound)}/{_ms(v.trials)}"] for k, v in d.latency.items()],
            numeric=(0, 1, 2, 3, 4, 5)))
    if d.soak is not None and d.soak.false_positives is not None:
        load = d.soak.load or "saturated cores"
        parts.append(para(f"False positives: {d.soak.false_positives:.0f} in "
                          f"{_ms(d.soak.seconds)} s under load ({load})."))
    return parts


def _tcprepair_part(inputs: Inputs) -> list[Html]:
    parts = [Html("<h3>Moving a TCP session (bench_tcprepair)</h3>")]
    t = inputs.bench.get("bench_tcprepair")
    if t is None:
        return parts + [note(inputs.missing["bench_tcprepair"])]
    parts.append(table(
        ["sockets", "dump (µs/socket)", "restore (µs/socket)", "total (ms)",
         "for reference: connect+accept (µs/socket)"],
        [[_ms(r.sockets), _ms(r.dump_us_per_socket, 1), _ms(r.restore_us_per_socket, 1),
          _ms(r.total_ms, 2), _ms(r.reference_connect_accept_us_per_socket, 1)]
         for r in t.results], numeric=(0, 1, 2, 3, 4)))
    return parts


# ---- 4. low overhead under load ---------------------------------------------------------------


def overhead_section(inputs: Inputs) -> Html:
    parts = [para("What being recoverable and watched costs a service in normal operation.")]
    parts.append(Html("<h3>Continuation Boxes under load (bench_recovery)</h3>"))
    rec = inputs.bench.get("bench_recovery")
    if rec is None:
        parts.append(note(inputs.missing["bench_recovery"]))
    elif rec.overhead is None:
        parts.append(note(f"`{inputs.bench_files['bench_recovery']}` has no overhead measure "
                          "(run without --no-overhead): run `make bench` (bench_recovery)"))
    else:
        o = rec.overhead
        detail = (f"the HTTP example serving {_ms(o.response_bytes)}-byte responses over "
                  f"keep-alive to {_ms(o.clients or 1)} clients at once, {_ms(o.rounds)} "
                  f"alternated rounds of {_ms(o.seconds_per_round)} s each, medians")
        parts.append(_plot("throughput and latency with and without Continuation Boxes",
                           lambda: plots.overhead(o), detail))
        parts.append(table(["", "requests/s", "p50 (ms)", "p99 (ms)"], [
            ["without Continuation Boxes", _ms(o.plain_rps), _ms(o.plain_p50_ms, 3),
             _ms(o.plain_p99_ms, 3)],
            ["with Continuation Boxes", _ms(o.cb_rps), _ms(o.cb_p50_ms, 3), _ms(o.cb_p99_ms, 3)],
        ], numeric=(1, 2, 3)))
        if o.overhead_pct is not None:
            spread = (f" (the pairs' middle half: {o.overhead_pct_iqr[0]:.1f} to "
                      f"{o.overhead_pct_iqr[1]:.1f} %)" if len(o.overhead_pct_iqr) == 2 else "")
            parts.append(para(f"Throughput overhead: {o.overhead_pct:.1f}%{spread}."))
    parts += _casestudy_load_part(inputs) + _monitor_part(inputs)
    parts.append(Html("<h3>Sensor updates (bench_sensors)</h3>"))
    s = inputs.bench.get("bench_sensors")
    if s is None:
        parts.append(note(inputs.missing["bench_sensors"]))
    else:
        parts.append(_plot("cost of one sensor update", lambda: plots.sensor_cost(s),
                           "best of several timing loops, one call through a bound method"))
        if s.progress_tick_ns is not None and s.prometheus_counter_inc_ns:
            parts.append(para(f"A progress tick costs {s.progress_tick_ns:.0f} ns, "
                              f"{s.progress_tick_ns / s.prometheus_counter_inc_ns:.2f}× a "
                              "prometheus_client `Counter.inc()`; it is a memory store, no "
                              "system call."))
    return section("overhead", SECTIONS["overhead"], parts)


def _monitor_part(inputs: Inputs) -> list[Html]:
    parts = [Html("<h3>Cost of watching many nodes (bench_monitor)</h3>")]
    m = inputs.bench.get("bench_monitor")
    if m is None:
        return parts + [note(inputs.missing["bench_monitor"])]
    if not m.results:
        return parts + [note(f"`{inputs.bench_files['bench_monitor']}` has no results: "
                             "run `make bench` (bench_monitor)")]
    sensors = f", {m.sensors_per_node:.0f} sensors per node" if m.sensors_per_node else ""
    parts.append(_plot("monitor and agent cost vs nodes", lambda: plots.monitor_cost(m.results),
                       f"one monitor, the agents of one lab{sensors}; dashed: the targets "
                       "(monitor 10 % of a core, agent 0.2 % of a core per node)"))
    parts.append(table(
        ["nodes", "mode", "monitor CPU (%)", "agent CPU per node (%)", "detection p50 (ms)",
         "detection p99 (ms)"],
        [[_ms(r.nodes), r.mode, _ms(r.monitor_cpu_pct, 1), _ms(r.agent_cpu_pct_per_node, 3),
          _ms(r.detect_p50_ms), _ms(r.detect_p99_ms)] for r in m.results],
        numeric=(0, 2, 3, 4, 5)))
    return parts


# ---- 5. incidents ---------------------------------------------------------------------------


def vm_section(inputs: Inputs) -> Html:
    """bench_vm: the integrity timeline and the figures beside Gibraltar's."""
    parts: list[Html] = []
    v = inputs.bench.get("bench_vm")
    if v is None:
        parts.append(note(f"{inputs.missing['bench_vm']} (root, about 13 minutes: 10 of "
                          "them benign work in the guest)"))
        return section("vm-backdoor", SECTIONS["vm-backdoor"], parts)
    events = v.timeline.events if v.timeline else []
    if events:
        parts.append(_plot("integrity timeline", lambda: plots.integrity_timeline(events),
                           f"`scenario vm` ({v.accel or '?'}): the guest hung by stopping its "
                           "vCPUs, seen by its jiffies deadline; each tamper written through "
                           "QEMU's gdbstub, found by the scan and healed; Orion's alarm "
                           "before each fault reached its plain bound"))
    else:
        parts.append(note(f"`{inputs.bench_files['bench_vm']}` has no timeline: "
                          "run `make bench` (bench_vm)"))
    g, det = v.gibraltar, v.tamper_detect_ms or {}
    parts.append(table(
        ["figure", "backdoors", "Gibraltar"],
        [["tamper detection p50 / p99 (ms)", f"{_ms(det.get('p50'))} / {_ms(det.get('p99'))}",
          f"~{_ms(1000 * g['detect_s'])} average" if "detect_s" in g else "—"],
         ["false positives / benign minutes", f"{_ms(v.false_positives)} / "
          f"{_ms(v.benign_minutes, 1)}",
          f"{g['false_positive_pct']} % over 42 min" if "false_positive_pct" in g else "—"],
         ["overhead on STREAM in the guest (%)", _ms(v.overhead_pct, 1),
          f"{g['overhead_pct']} (STREAM)" if "overhead_pct" in g else "—"],
         ["tampers healed, hidden process found",
          f"{_yes(v.tamper_healed)}, {_yes(v.hidden_process_found)}", "—"],
         ["guest hang seen (ms; deadline)", f"{_ms(v.guest_hang_detect_ms)} "
          f"({_ms(v.guest_hang_deadline_ms)})", "—"],
         *([f"Orion lead over the bound, {fault} (ms)", _ms(lead), "—"]
           for fault, lead in v.prediction_lead_ms.items()),
         ["Orion false alarms during the benign work", _ms(v.prediction_false_alarms), "—"]]))
    return section("vm-backdoor", SECTIONS["vm-backdoor"], parts)


def incidents_section(inputs: Inputs) -> Html:
    parts: list[str] = []
    if inputs.incidents_path is None:
        parts.append(note(inputs.missing.get("incidents", "no incident log")))
    elif not inputs.incidents:
        parts.append(note(f"no incidents in `{inputs.incidents_path}`"))
    else:
        parts.append(para(f"{len(inputs.incidents)} incidents in `{inputs.incidents_path}`, "
                          "oldest first. Action times count from detection."))
        parts.append(table(
            ["id", "node", "rule", "detected", "onset→detect (ms)", "diagnosis",
             "actions", "response (ms)", "outcome"],
            [_incident_row(i) for i in inputs.incidents], numeric=(4, 7)))
    return section("incidents", SECTIONS["incidents"], parts)


def _incident_row(i: Incident) -> list[object]:
    acts = "".join(f"<li>{esc(a.kind)}: {status(a.status == 'done', a.status, a.status)} "
                   f"(at {a.started_ms:.0f} ms, {a.duration_ms:.0f} ms)"
                   f"{(' — ' + esc(a.error)) if a.error else ''}</li>" for a in i.actions)
    return [i.id, i.node, i.rule, _time(i.detected), _ms(i.onset_to_detect_ms),
            i.diagnosis.summary if i.diagnosis else "-",
            Html(f'<ul class="checks">{acts}</ul>') if acts else "-", _ms(i.repaired_ms),
            f"{i.outcome or 'open'} ({i.state})"]


# ---- the page -------------------------------------------------------------------------------


def sources(inputs: Inputs) -> Html:
    rows = [["demo results", str(inputs.demo_dir) if inputs.demo else "missing"],
            ["incident log", str(inputs.incidents_path or "missing")]]
    rows += [[name, str(inputs.bench_files.get(name, "missing"))]
             for name in ("bench_repair", "bench_recovery", "bench_detection", "bench_monitor",
                          "bench_sensors", "bench_tcprepair", "bench_fleet",
                          "bench_casestudy", "bench_vm")]
    return Html('<footer><h2>Sources</h2>' + table(["input", "file"], rows) + "</footer>")


def render(inputs: Inputs, generated: float | None = None) -> str:
    """The whole page for `inputs`."""
    generated = time.time() if generated is None else generated
    parts = header(inputs, generated) + [
        timeline_section(inputs), effectiveness_section(inputs), recovery_section(inputs),
        overhead_section(inputs), vm_section(inputs), incidents_section(inputs), sources(inputs)]
    return page("backdoors report", parts)


def build_report(*, demo_dir: str | os.PathLike | None, bench_dir: str | os.PathLike | None,
                 incidents: str | os.PathLike | None, out: str | os.PathLike) -> Path:
    """Write the report as one self-contained HTML file and return its path.

    demo_dir: a `backdoors demo` results folder (None: the newest under out/demo);
    bench_dir: the benchmarks' JSON folder (None: out/bench when it exists);
    incidents: an incident log file or folder (None: the demo's); out: the HTML file
    (an existing folder: report.html in it). Missing inputs are noted in the page;
    malformed ones, and given paths that do not exist, raise ReportError.
    """
    inputs = load_inputs(demo_dir=demo_dir, bench_dir=bench_dir, incidents=incidents)
    path = Path(out)
    if path.is_dir():
        path = path / REPORT_NAME
    text = render(inputs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report to {path}: {e.strerror}") from None
    return path

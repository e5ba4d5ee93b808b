"""Cost of watching many nodes: monitor and agent CPU, and hang detection, per lab size.

For each size (8, 32, 128 nodes by default) one lab is built (one host: one agent serves
every node), each node running the lightest watched process (`backdoors.lab.ticker`: a
Sensor Box of 16 sensors, a quarter of them progress counters ticked every --tick-ms
under a --deadline-ms deadline), and one monitor with the default rules watches them
from the lab's monitor namespace. The sizes are the peers: same machine, same run.

- steady state: over --seconds with nothing wrong, the CPU time of the monitor (this
  process: its poller, event and repair threads; the main thread only sleeps meanwhile)
  and of the agent process (/proc/<pid>/stat), as % of one core; the agent's share per
  node is its total divided by the nodes. The agents are first measured alone for as
  long, before the monitor starts (`agent_idle_cpu_pct_per_node`: their kernel samplers).
- detection: --trials hangs spread over the nodes, one at a time: a node's ticker is
  SIGSTOPped and the time from the stop (the harness's wall clock) to the detection
  of the hang incident (Incident.detected) is measured; it includes the deadline.

Two modes, rows keyed by (nodes, mode), both in the same run:

- "poll": the monitor detects by polling (one sensors() call per node every
  --period-ms), events off; the agents sample kernel state every 50 ms (their default).
- "event": the agent's watcher judges the progress counters and listens to the kernel,
  and pushes violations; the monitor acts on them and polls only every
  --event-poll-ms (its liveness check and fallback); the agents sample kernel state
  every --event-sample-s (what a poll that rare reads).

A size that cannot be measured (an agent starved and replaced by its keeper's watchdog)
gives a row without measures and the reason in `errors`; the other sizes are measured
all the same.

    python bench/bench_monitor.py [--json] [--sizes 8,32,128] [--modes event,poll]
                                  [--seconds 10] [--trials 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time

from backdoors.common.procs import CLOCK_TICKS, read_line
from backdoors.errors import BackdoorsError, LabError
from backdoors.lab.agents import keeper_files
from backdoors.lab.topology import MAX_NODES
from backdoors.monitor import Monitor
from backdoors.scenarios.labkit import AgentLab, unique_name

SIZES = (8, 32, 128)
MODES = ("event", "poll")
EVENT_POLL_MS = 1000.0  # the monitor's poll in event mode: liveness and fallback
EVENT_SAMPLE_S = 1.0  # the agents' kernel sampling in event mode
MiB = 1 << 20
#: the default rules' hang rule: an incident closes 200 ms after its sensors move again,
#: and the rule fires again on that node after 500 ms more
REUSE_GAP_S = 1.0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def _self_cpu() -> float:
    """CPU seconds (user + system) of this process, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid`, every thread."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def _start_tickers(al: AgentLab, nodes: list[str], sensors: int, tick_ms: float,
                   deadline_ms: float) -> dict[str, int]:
    """A ticker in every node, its box registered; node -> the ticker's host pid."""
    pids = {}
    for node in nodes:
        argv = [sys.executable, "-m", "backdoors.lab.ticker", "--name", f"tick-{node}",
                "--sensors", str(sensors), "--tick", str(tick_ms / 1000),
                "--deadline", str(deadline_ms / 1000)]
        proc = al.lab.run_in_node(node, argv, stdout=subprocess.PIPE)
        line = read_line(proc, 30.0)
        proc.stdout.close()
        if not line:
            proc.kill()
            log = al.lab.plan.run_dir / node / "stderr.log"
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise LabError(f"the ticker of node {node} did not start within 30 s: "
                           f"{last[0] if last else 'no output'}")
        pids[node] = proc.pid
    for node in nodes:
        al.wait_registered(node, timeout=30.0)
    return pids


def _steady(mon: Monitor, agent_pids: list[int], seconds: float) -> dict:
    """CPU of the monitor and the agents over `seconds` of nothing wrong."""
    polls0 = sum(p.polls for p in mon.pollers)
    node_polls0 = sum(p.polls * len(p.nodes) for p in mon.pollers)
    agents0 = [_proc_cpu(p) for p in agent_pids]
    t0, mon0 = time.monotonic(), _self_cpu()
    time.sleep(seconds)
    elapsed, mon_s = time.monotonic() - t0, _self_cpu() - mon0
    agent_s = sum(_proc_cpu(p) - c for p, c in zip(agent_pids, agents0))
    polls = sum(p.polls for p in mon.pollers) - polls0
    node_polls = sum(p.polls * len(p.nodes) for p in mon.pollers) - node_polls0
    return {"seconds": round(elapsed, 1), "monitor_cpu_s": mon_s, "agent_cpu_s": agent_s,
            "polls_per_s": round(polls / elapsed, 1), "node_polls": node_polls,
            "incidents": len(mon.incidents())}


def _detections(al: AgentLab, mon: Monitor, pids: dict[str, int], trials: int,
                timeout: float) -> tuple[list[float], dict[str, int], list[str]]:
    """Hang one node's ticker at a time (SIGSTOP), spread over the nodes; the ms from
    each stop to its incident's detection, how many were detected by event and by poll,
    and what went wrong."""
    nodes = list(pids)
    latencies, errors, by = [], [], {"event": 0, "poll": 0}
    last_used: dict[str, float] = {}
    seen = {i.id for i in mon.incidents()}
    for k in range(trials):
        # fewer trials than nodes: spread evenly; more: round robin
        node = nodes[k * len(nodes) // trials if trials <= len(nodes) else k % len(nodes)]
        if node in last_used:  # its last incident closed and the rule cooled down
            time.sleep(max(0.0, last_used[node] + REUSE_GAP_S - time.monotonic()))
        time.sleep(0.05 + (k % 5) * 0.013)  # stops fall at different phases of the poll
        n = al.lab.node(node)
        t0 = time.time()
        n.kill(pids[node], signal.SIGSTOP)
        try:
            inc = mon.wait_for(lambda i: i.node == node and i.rule == "hang"
                               and i.id not in seen, timeout)
        finally:
            n.kill(pids[node], signal.SIGCONT)
        if inc is None:
            errors.append(f"{node}: a hang was not detected within {timeout:g} s")
        else:
            seen.add(inc.id)
            latencies.append((inc.detected - t0) * 1000)
            by[inc.detected_by or "poll"] = by.get(inc.detected_by or "poll", 0) + 1
            mon.wait_for(lambda i: i.id == inc.id and i.outcome is not None, timeout)
        last_used[node] = time.monotonic()
    return latencies, by, errors


def _restarts(al: AgentLab) -> dict[str, int]:
    """host -> how often its keeper replaced the agent (its watchdog: a starved agent)."""
    out = {}
    for h in al.plan.hosts:
        try:
            out[h.name] = json.loads(keeper_files(al.plan, h)[1].read_text())["restarts"]
        except (OSError, ValueError, KeyError):
            out[h.name] = 0
    return out


def _row(size: int, mode: str, period_ms: float, deadline_ms: float, hosts: int,
         sample_period_s: float) -> dict:
    """A row with every measure missing: a size that could not be measured."""
    return {"nodes": size, "mode": mode, "hosts": hosts, "sample_period_s": sample_period_s,
            "monitor_cpu_pct": None, "events_received": None, "detected_by": None,
            "agent_cpu_pct": None, "agent_cpu_pct_per_node": None,
            "agent_idle_cpu_pct_per_node": None, "detect_p50_ms": None, "detect_p99_ms": None,
            "detect_max_ms": None, "trials": 0, "period_ms": period_ms,
            "deadline_ms": deadline_ms, "polls_per_s": None, "steady_seconds": None,
            "monitor_cpu_us_per_node_poll": None,
            "steady_incidents": None, "node_memory_mb": None, "setup_s": None, "errors": []}


def measure(size: int, mode: str, *, seconds: float, trials: int, period_ms: float,
            deadline_ms: float, tick_ms: float, sensors: int, hosts: int = 1,
            event_poll_ms: float = EVENT_POLL_MS, event_sample_s: float = EVENT_SAMPLE_S) -> dict:
    """One row: a lab of `size` nodes on `hosts` agents watched in `mode`. A size that
    cannot be measured (the lab does not come up, an agent cannot keep up) gives a row
    without measures and the reason in `errors`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if mode == "event":
        period_ms, sample_s = event_poll_ms, event_sample_s
    else:
        sample_s = None
    row = _row(size, mode, period_ms, deadline_ms, hosts, sample_s or 0.05)
    al = AgentLab(unique_name("bm"), hosts=hosts, nodes=size, memory_limit=128 * MiB,
                  pids_limit=64, services=False, sample_period_s=sample_s)
    try:
        t0 = time.monotonic()
        with al:
            try:
                _measure_lab(al, row, seconds=seconds, trials=trials, period_ms=period_ms,
                             deadline_ms=deadline_ms, tick_ms=tick_ms, sensors=sensors,
                             started=t0, events=mode == "event")
            except (BackdoorsError, OSError) as e:
                row["errors"].append(_unmeasured(size, e, _restarts(al)))
    except (BackdoorsError, OSError) as e:  # the lab did not come up
        row["errors"].append(_unmeasured(size, e, {}))
    return row


def _unmeasured(size: int, e: Exception, restarts: dict[str, int]) -> str:
    starved = {h: n for h, n in restarts.items() if n}
    why = (f" (agents replaced by their keeper's watchdog, starved: {starved})"
           if starved else "")
    return f"{size} nodes could not be measured: {e}{why}"


def _measure_lab(al: AgentLab, row: dict, *, seconds: float, trials: int, period_ms: float,
                 deadline_ms: float, tick_ms: float, sensors: int, started: float,
                 events: bool) -> None:
    """Fill `row`: tickers up, the agents alone (their kernel samplers and watcher), then
    with the monitor watching (steady state), then the hang trials."""
    size = row["nodes"]
    nodes = [n.name for n in al.plan.nodes]
    pids = _start_tickers(al, nodes, sensors, tick_ms, deadline_ms)
    row["setup_s"] = round(time.monotonic() - started, 1)
    row["node_memory_mb"] = round(sum(al.lab.node(n).stats().memory_bytes for n in nodes)
                                  / size / MiB, 1)
    agent_pids = [al.lab.agent_pid(h.name) for h in al.plan.hosts]
    idle = [_proc_cpu(p) for p in agent_pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    idle_s = sum(_proc_cpu(p) - c for p, c in zip(agent_pids, idle))
    row["agent_idle_cpu_pct_per_node"] = round(100 * idle_s / (time.monotonic() - t0) / size, 3)
    cfg = al.monitor_config(period_ms=period_ms, events=events)
    with Monitor(cfg, key=al.monitor_key()) as mon:
        mon.wait_ready(timeout=30.0)
        if events:
            end = time.monotonic() + 30.0
            while not all(f.connected.is_set() for f in mon.followers):
                if time.monotonic() > end:
                    raise LabError("the monitor did not subscribe to every agent's events")
                time.sleep(0.05)
        time.sleep(max(1.0, 2 * period_ms / 1000))  # every box tracked, trackers warm
        steady = _steady(mon, agent_pids, seconds)
        lat, by, errors = _detections(al, mon, pids, trials, max(5.0, 20 * deadline_ms / 1000))
    restarted = [h.name for h, p in zip(al.plan.hosts, agent_pids)
                 if al.lab.agent_pid(h.name) != p]
    if restarted:
        errors.append(f"agent of {', '.join(restarted)} replaced during the run (its keeper's "
                      "watchdog: it could not keep up): its CPU time is incomplete")
    sec = steady["seconds"]
    row.update({
        "monitor_cpu_pct": round(100 * steady["monitor_cpu_s"] / sec, 2),
        "agent_cpu_pct": round(100 * steady["agent_cpu_s"] / sec, 2),
        "agent_cpu_pct_per_node": round(100 * steady["agent_cpu_s"] / sec / size, 3),
        "detect_p50_ms": _pct(lat, 0.5), "detect_p99_ms": _pct(lat, 0.99),
        "detect_max_ms": round(max(lat), 1) if lat else None, "trials": len(lat),
        "polls_per_s": steady["polls_per_s"], "steady_seconds": sec,
        # what one node's sensors() costs the monitor, whatever the poll rate reached
        "monitor_cpu_us_per_node_poll": (round(1e6 * steady["monitor_cpu_s"] / steady["node_polls"])
                                         if steady["node_polls"] else None),
        "steady_incidents": steady["incidents"], "detected_by": by,
        "events_received": sum(len(f.seen) for f in mon.followers),
        "errors": errors})


def machine() -> dict:
    """Where it ran: cores, memory, kernel, load when it started."""
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"cpus": os.cpu_count(), "memory_mb": mem_kb // 1024, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": list(os.getloadavg())}


def run(*, sizes: tuple[int, ...] = SIZES, modes: tuple[str, ...] = MODES,
        seconds: float = 10.0, trials: int = 20, period_ms: float = 50.0,
        deadline_ms: float = 200.0, tick_ms: float = 20.0, sensors: int = 16,
        hosts: int = 1, event_poll_ms: float = EVENT_POLL_MS,
        event_sample_s: float = EVENT_SAMPLE_S) -> dict:
    """A row per (size, mode); every lab is torn down before the next is built."""
    for s in sizes:
        if not 1 <= s <= MAX_NODES:
            raise ValueError(f"sizes must be 1..{MAX_NODES} nodes, got {s}")
    if not 1 <= hosts <= 8:
        raise ValueError(f"hosts must be 1..8, got {hosts}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} (modes: {', '.join(MODES)})")
    if seconds <= 0 or trials < 1:
        raise ValueError("seconds must be > 0 and trials at least 1")
    out = {"machine": machine(), "sensors_per_node": sensors, "tick_ms": tick_ms,
           "hosts": hosts, "rules": "default", "results": []}
    with _terminate_as_interrupt():
        for size in sizes:
            for mode in modes:
                out["results"].append(measure(size, mode, seconds=seconds, trials=trials,
                                              period_ms=period_ms, deadline_ms=deadline_ms,
                                              tick_ms=tick_ms, sensors=sensors, hosts=hosts,
                                              event_poll_ms=event_poll_ms,
                                              event_sample_s=event_sample_s))
    return out


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt meanwhile, like Ctrl-C: the lab being measured
    is torn down on the way out either way (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--sizes: expected comma-separated node counts, got {text!r}") from None
    if not sizes:
        raise ValueError("--sizes: no size given")
    return sizes


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: expected some of {', '.join(MODES)}, got {text!r}")
    return modes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="node counts, e.g. 8,32,128")
    ap.add_argument("--modes", default=",".join(MODES), help="event,poll (either or both)")
    ap.add_argument("--event-poll-ms", type=float, default=EVENT_POLL_MS,
                    help="the monitor's poll period in event mode (liveness, fallback)")
    ap.add_argument("--event-sample-s", type=float, default=EVENT_SAMPLE_S,
                    help="the agents' kernel sampling period in event mode")
    ap.add_argument("--seconds", type=float, default=10.0, help="steady-state CPU window")
    ap.add_argument("--trials", type=int, default=20, help="hangs per size")
    ap.add_argument("--period-ms", type=float, default=50.0, help="monitor poll period")
    ap.add_argument("--hosts", type=int, default=1, help="agents the nodes are spread over")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="the tickers' period")
    ap.add_argument("--deadline-ms", type=float, default=200.0, help="their progress deadline")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(sizes=parse_sizes(a.sizes), modes=parse_modes(a.modes), seconds=a.seconds,
            trials=a.trials, period_ms=a.period_ms, hosts=a.hosts, tick_ms=a.tick_ms,
            deadline_ms=a.deadline_ms, event_poll_ms=a.event_poll_ms,
            event_sample_s=a.event_sample_s)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    for row in r["results"]:
        print(f"{row['nodes']:>4} nodes {row['mode']:>5}: monitor {row['monitor_cpu_pct']:6.2f} % "
              f"agent/node {row['agent_cpu_pct_per_node']:6.3f} %  detect p50 "
              f"{row['detect_p50_ms']} p99 {row['detect_p99_ms']} ms ({row['trials']} trials)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

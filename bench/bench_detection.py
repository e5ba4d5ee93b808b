"""Detection latency by event and by poll, for hangs, crashes, freezes, link failures,
memory use past its high mark and refused forks; false positives under load.

One lab, one node per deadline (50, 100, 200 ms), each with the sample service ticking
every 10 ms under that deadline. The same run measures two modes: "event", the monitor
subscribed to the agents' events (the agent's watcher judges deadlines, link state and
freezes itself and pushes violations), and "poll", the monitor polling every --period-ms
only (config events = false). Faults, --trials times each per node (the nodes run their
trials concurrently), the time until the monitor opens the incident measured from the
injection: hang (the service's main loop stalled, SIGUSR1: rule hang), crash (the
service SIGKILLed: rule hang; by event the agent pushes the death of the box's
registrant at once, by poll the counter stalls past its deadline; the service is
started again after each trial), freeze (the node's cgroup frozen by nobody's lock: rule
hang), link_down (the node's service interface set down: rule network), memory (a
ballast holds the node at most ~40 MB below its memory high mark; a process of
the node, started and waiting beforehand, allocates and touches that distance + 24 MB at
once: rule memory; by event the agent's usage threshold wakes its watcher, by poll the
kernel sampler's next read and the poll after it see it; the time counts from the
request to allocate, its ~10-30 ms of page faults included alike in both modes) and forks
(the node's pids limit set 8 tasks above its count; a process of the node, started and
waiting beforehand, forks 64 times at once: rule forks on fork_failures; by event the
agent's watcher reads pids.events every 25 ms, by poll the sampler and a poll see it).
Soak (event mode): for --soak-seconds (60 by default; 600 for the 10-minute soak),
nothing is wrong but both cores are saturated (two busy-loop processes and a memory
churner allocating, touching and freeing 256 MB, all outside the nodes, so they compete
with services, agent and monitor alike); every incident opened is a false positive.

Output: `results`, rows {fault, deadline_ms, mode, p50_ms, p99_ms, trials}; `soak`
{deadline_ms (the smallest), seconds, false_positives, ...}; `latency` (hang, event mode,
by deadline: the report's table).

    python bench/bench_detection.py [--json] [--soak-seconds 60] [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from backdoors.agent.config import KernelSensorLimits
from backdoors.lab import faults
from backdoors.monitor import Monitor, parse_ruleset
from backdoors.scenarios.labkit import AgentLab, unique_name

DEADLINES_MS = (50, 100, 200)

_CHURN = r"""
import time
while True:
    b = bytearray(256 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    del b
"""


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


RULES = """
[[rule]]
name = "hang"
match = "any"
detectors = [{ kind = "progress_stalled", box = "*" }, { kind = "node_frozen" }]
actions = [{ kind = "record" }]
clear_ms = 200
cooldown_ms = 500

[[rule]]
name = "network"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["link_up"] }]
actions = [{ kind = "record" }]
clear_ms = 200
cooldown_ms = 500

[[rule]]
name = "memory"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
actions = [{ kind = "record" }]
clear_ms = 200
cooldown_ms = 500

[[rule]]
name = "forks"
detectors = [{ kind = "pressure_over_rate", box = "kernel", sensors = ["fork_failures"] }]
actions = [{ kind = "record" }]
clear_ms = 200
cooldown_ms = 500
"""
FAULTS = ("hang", "crash", "freeze", "link_down", "memory", "forks")
RULE_OF = {"hang": "hang", "crash": "hang", "freeze": "hang", "link_down": "network",
           "memory": "memory", "forks": "forks"}
MiB = 1 << 20
BALLAST_BELOW_MB = 40  # where the ballast aims to leave the node below its high mark (at most)
SPIKE_PAST_MB = 24  # the memory fault's allocation goes this far past the high mark
#: says it is armed, reads a size, allocates and touches that many bytes, waits to exit
_SPIKE = ("import sys\nprint('armed', flush=True)\n"
          "b = bytearray(b'\\3') * int(sys.stdin.readline())\nsys.stdin.readline()\n")
FORK_ROOM, FORK_TRIES = 8, 64  # the forks fault: 56 forks refused at once (bound: 20/s)
#: says it is armed, at a line forks FORK_TRIES times (the children wait), at the end of
#: its input kills and reaps them
_FORKER = f"""import os, signal, sys
print("armed", flush=True)
sys.stdin.readline()
kids = []
for _ in range({FORK_TRIES}):
    try:
        pid = os.fork()
    except BlockingIOError:  # refused: the pids limit
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
sys.stdin.read()
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


class _Armed:
    """Per node, a fault's process started (its interpreter loaded) before the trial and
    waiting for a line on stdin, so the trial times the fault, not a Python start."""

    SCRIPT = ""

    def __init__(self, al: AgentLab):
        self.al, self.ready = al, {}

    def arm(self, node: str) -> None:
        self.ready[node] = self.al.lab.run_in_node(
            node, [sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        if self.ready[node].stdout.readline().strip() != b"armed":
            raise RuntimeError(f"{node}: the {type(self).__name__} fault's process did not start")

    def fire(self, node: str) -> None:
        self.ready[node].stdin.write(self.line(node))
        self.ready[node].stdin.flush()

    def line(self, node: str) -> bytes:
        return b"\n"

    def end(self, node: str) -> None:
        proc = self.ready.pop(node)
        proc.stdin.close()  # it undoes its fault and exits
        proc.wait(10)
        self.arm(node)


class _Spikes(_Armed):
    """The memory fault: a process that allocates and touches a size past the high mark."""

    SCRIPT = _SPIKE

    def __init__(self, al: AgentLab):
        super().__init__(al)
        self.size, self.below_mb = {}, {}

    def ballast(self, node: str) -> None:
        """Fill the node to at most BALLAST_BELOW_MB under its high mark (the agents' own
        `memory_high`) with a stable cache, the armed process and the interpreters' page
        cache counted (they often take more than allowed for: 18.5 MB below was measured),
        and size the fault's allocation from what is left."""
        self.arm(node)
        cg = self.al.lab.node(node).cgroup
        high = KernelSensorLimits().memory_high(cg.memory_limit())
        if high is None:
            raise RuntimeError(f"{node}: the memory fault needs a node with a memory limit")
        mb = (high - cg.memory_usage()) / MiB - BALLAST_BELOW_MB - 16  # its interpreter
        proc = self.al.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs",
                                              "cache", "--mb", str(round(mb))],
                                       stdout=subprocess.PIPE)
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{node}: the memory ballast ({mb:.0f} MB) did not start")
        below = high - cg.memory_usage()
        if below < 4 * MiB:
            raise RuntimeError(f"{node}: the memory ballast left the node {below / MiB:.0f} "
                               "MB below its high mark")
        self.below_mb[node] = round(below / MiB, 1)
        self.size[node] = int(below) + SPIKE_PAST_MB * MiB

    def line(self, node: str) -> bytes:
        return b"%d\n" % self.size[node]


class _Forks(_Armed):
    """The forks fault: a process that forks FORK_TRIES times at once against a pids limit
    set FORK_ROOM tasks above the node's count for the trial (the node's own limit again
    after it)."""

    SCRIPT = _FORKER

    def __init__(self, al: AgentLab):
        super().__init__(al)
        self.limit = {}

    def fire(self, node: str) -> None:
        cg = self.al.lab.node(node).cgroup
        self.limit[node] = cg.pids_limit()
        cg.set_pids_limit(cg.pids_current() + FORK_ROOM)
        super().fire(node)

    def end(self, node: str) -> None:
        super().end(node)  # its children killed: the next one arms within the room
        self.al.lab.node(node).cgroup.set_pids_limit(self.limit.pop(node))


def _inject(al: AgentLab, node: str, fault: str, on: bool, deadline_ms: float,
            armed: dict[str, _Armed]) -> None:
    n = al.lab.node(node)
    if fault in armed:
        (armed[fault].fire if on else armed[fault].end)(node)
    elif fault == "hang":
        n.kill(al.lab.service(node).pid, signal.SIGUSR1 if on else signal.SIGUSR2)
    elif fault == "crash":
        if on:
            n.kill(al.lab.service(node).pid, signal.SIGKILL)
        else:  # the service again, its box registered
            al.restart_service(node, "--deadline", str(deadline_ms / 1000))
    elif fault == "freeze":
        if on:
            n.lock()
        else:
            n.unlock()
    else:
        (faults.inject if on else faults.stop)(al.lab, "network", node, mode="down")


def _trials(al: AgentLab, mon: Monitor, node: str, deadline_ms: float,
            faults_: tuple[str, ...], trials: int, results: dict, errors: list,
            armed: dict[str, _Armed]):
    seen: set[str] = set()
    for fault in faults_:
        rule = RULE_OF[fault]
        for _ in range(trials):
            try:
                t0_wall = time.time()
                _inject(al, node, fault, True, deadline_ms, armed)
                try:
                    inc = mon.wait_for(lambda i: i.node == node and i.rule == rule
                                       and i.id not in seen, 5)
                finally:
                    _inject(al, node, fault, False, deadline_ms, armed)
                if inc is None:
                    errors.append(f"{node}: {fault} was not detected within 5 s")
                    continue
                seen.add(inc.id)
                results.setdefault(fault, []).append(((inc.detected - t0_wall) * 1000,
                                                      inc.detected_by))
                mon.wait_for(lambda i: i.id == inc.id and i.outcome is not None, 5)
                time.sleep(0.6)  # the rule's cooldown, and a steady counter again
            except Exception as e:  # noqa: BLE001 - reported with the results
                errors.append(f"{node} {fault}: {e}")


def _measure(al: AgentLab, nodes: dict[str, int], mode: str, trials: int, period_ms: float,
             faults_: tuple[str, ...], out: dict, armed: dict[str, _Armed]) -> Monitor:
    """One mode's trials; returns its (running) monitor, for the soak."""
    cfg = al.monitor_config(period_ms=period_ms, events=mode == "event")
    mon = Monitor(cfg, key=al.monitor_key(), rules=parse_ruleset(RULES).rule).start()
    mon.wait_ready()
    if mode == "event" and not all(f.connected.wait(10) for f in mon.followers):
        raise RuntimeError("the monitor did not subscribe to every agent's events")
    time.sleep(0.5)
    results: dict[str, dict] = {node: {} for node in nodes}
    errors: list[str] = []
    threads = [threading.Thread(target=_trials, args=(al, mon, node, deadline, faults_,
                                                      trials, results[node], errors,
                                                      armed))
               for node, deadline in nodes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for node, deadline in nodes.items():
        for fault in faults_:
            got = results[node].get(fault, [])
            lat = [ms for ms, _ in got]
            out["results"].append({
                "fault": fault, "deadline_ms": deadline, "mode": mode, "trials": len(lat),
                "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                "max_ms": round(max(lat), 1) if lat else None,
                "by_event": sum(1 for _, by in got if by == "event"),
                "by_poll_ms": sorted(round(ms, 1) for ms, by in got if by == "poll")})
            if fault == "hang" and mode == "event":
                bound = deadline + 2 * period_ms
                out["latency"][str(deadline)] = {
                    "trials": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
                    "max_ms": round(max(lat), 1) if lat else None, "bound_ms": bound,
                    "within_bound": sum(1 for x in lat if x <= bound)}
    out["errors"] += [f"{mode}: {e}" for e in errors]
    return mon


def _soak(mon: Monitor, nodes: dict[str, int], soak_seconds: float) -> dict:
    time.sleep(1.0)  # every trial's incident closed and cooled down
    before = {i.id for i in mon.incidents()}
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, start_new_session=True)
    load = [subprocess.Popen([sys.executable, "-m", "backdoors.lab.hogs", "cpu",
                              "--procs", "2"], **quiet),
            subprocess.Popen([sys.executable, "-c", _CHURN], **quiet)]
    polls0 = sum(p.polls for p in mon.pollers)
    t0 = time.monotonic()
    try:
        time.sleep(soak_seconds)
    finally:
        for p in load:  # the cpu hog forks: kill each whole session
            os.killpg(p.pid, signal.SIGKILL)
        for p in load:
            p.wait()
    elapsed = time.monotonic() - t0
    polls = sum(p.polls for p in mon.pollers) - polls0
    fps = [i for i in mon.incidents() if i.id not in before]
    by_deadline = {str(d): 0 for d in nodes.values()}
    for i in fps:
        if i.node in nodes:
            by_deadline[str(nodes[i.node])] += 1
    smallest = min(nodes.values())
    return {
        "deadline_ms": smallest, "seconds": round(elapsed, 1), "mode": "event",
        "load": "2 busy loops + 256 MB memory churn, outside the nodes",
        "false_positives": by_deadline[str(smallest)],
        "false_positives_all_nodes": len(fps), "false_positives_by_deadline_ms": by_deadline,
        "false_positive_rules": sorted({i.rule for i in fps}),
        "examples": [f"{i.node} {i.rule} ({i.detected_by}): "
                     f"{'; '.join(h.summary for h in i.detectors)}" for i in fps[:5]],
        "polls_per_s": round(polls / elapsed, 1),
    }


def run(*, soak_seconds: float = 60.0, trials: int = 20, period_ms: float = 50.0,
        modes: tuple[str, ...] = ("event", "poll"), faults_: tuple[str, ...] = FAULTS) -> dict:
    out: dict = {"period_ms": period_ms, "deadlines_ms": list(DEADLINES_MS), "results": [],
                 "latency": {}, "soak": {}, "errors": []}
    nodes = {f"n{i}": d for i, d in enumerate(DEADLINES_MS)}
    with AgentLab(unique_name("b"), nodes=len(nodes), memory_limit=1 << 30) as al:
        for node, deadline in nodes.items():
            al.wait_registered(node)
            al.restart_service(node, "--deadline", str(deadline / 1000))
        spikes, forks = _Spikes(al), _Forks(al)
        if "memory" in faults_:
            for node in nodes:
                spikes.ballast(node)
            out["memory_below_high_mb"] = spikes.below_mb
        if "forks" in faults_:
            for node in nodes:
                forks.arm(node)
        armed = {"memory": spikes, "forks": forks}
        for mode in modes:
            mon = _measure(al, nodes, mode, trials, period_ms, faults_, out, armed)
            try:
                if mode == "event" and soak_seconds > 0:
                    out["soak"] = _soak(mon, nodes, soak_seconds)
            finally:
                mon.stop()
    rows = {(r["fault"], r["deadline_ms"], r["mode"]): r for r in out["results"]}
    out["event_vs_poll_p99"] = {
        f"{f}@{d}": round(e["p99_ms"] / p["p99_ms"], 2)
        for (f, d, m), e in rows.items() if m == "event"
        if (p := rows.get((f, d, "poll"))) and e["p99_ms"] and p["p99_ms"]}
    for d, v in out["latency"].items():
        out[f"detect_p50_ms_deadline_{d}"] = v["p50_ms"]
        out[f"detect_p99_ms_deadline_{d}"] = v["p99_ms"]
    if out["soak"]:
        out["false_positives_soak"] = out["soak"]["false_positives"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a summary)")
    ap.add_argument("--soak-seconds", type=float, default=60.0,
                    help="the saturated soak (600: the full 10 minutes; 0: none)")
    ap.add_argument("--trials", type=int, default=20, help="stalls per deadline")
    ap.add_argument("--period-ms", type=float, default=50.0, help="monitor poll period")
    ap.add_argument("--modes", default="event,poll", help="event, poll or both")
    ap.add_argument("--faults", default=",".join(FAULTS), help="of " + ", ".join(FAULTS))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    r = run(soak_seconds=a.soak_seconds, trials=a.trials, period_ms=a.period_ms,
            modes=tuple(a.modes.split(",")), faults_=tuple(a.faults.split(",")))
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    for row in r["results"]:
        print(f"{row['fault']:>9} deadline {row['deadline_ms']:>4} ms {row['mode']:>5}: "
              f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms ({row['trials']} trials)")
    if r["soak"]:
        print(f"soak {r['soak']['seconds']} s: {r['soak']['false_positives']} false positives")
    for e in r["errors"]:
        print("error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

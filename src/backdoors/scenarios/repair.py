"""The three repair scenarios, end to end: lab with agents, monitor in-process, a fault.

    memory_hog()  -> detected, detect_ms, repair_ms, culprit_killed, innocent_killed,
                     service_survived, max_progress_gap_ms (+ cache_survived, victim, ...)
    fork_bomb()   -> detected, detect_ms, repair_ms, bomb_processes_left, service_survived,
                     node_thawed (+ can_fork_after, wedged_ms, ...)
    hang()        -> detected, detect_ms, deadline_ms, poll_ms, diagnosis (+ scope, ...)

Each builds its own lab (a unique name), waits for the outcome, tears everything down
even on failure, and returns a JSON-ready dict. The facts (who died, what is left) are
measured beside the monitor (`watch`), not taken from its own report. The `policy`
parameters let the benchmarks run the same case against the kernel's own answers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import ExitStack

from ..common.procs import alive, read_line, running
from ..errors import BackdoorsError, LabError
from ..lab import hogs
from ..monitor import Monitor, parse_ruleset
from ..monitor.incidents import Incident
from .labkit import AgentLab, unique_name, wait_until
from .watch import ForkProbe, ProgressWatch

MiB = 1 << 20

# The "kill the largest process" policy of the kernel's OOM killer and earlyoom, as a rule.
LARGEST_RSS_RULES = """
[[rule]]
name = "memory-hog"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
diagnosis = { kind = "largest_rss" }
actions = [{ kind = "kill_culprit" }]
"""


def _hog_argv(kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "backdoors.lab.hogs", kind, *args]


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


def _mono(wall: float) -> float:
    """A Unix time of an incident on the time.monotonic() scale."""
    return time.monotonic() - (time.time() - wall)


def _monitor(al: AgentLab, stack: ExitStack, *, period_ms: float, rules=None,
             incidents_dir: str | None = None, hooks=None) -> Monitor:
    cfg = al.monitor_config(period_ms=period_ms, incidents_dir=incidents_dir)
    mon = Monitor(cfg, key=al.monitor_key(), rules=rules, hooks=hooks)
    stack.enter_context(mon)
    mon.wait_ready(timeout=10)
    return mon


def _start_cache(al: AgentLab, node: str, mb: float) -> subprocess.Popen:
    proc = al.lab.run_in_node(node, _hog_argv("cache", "--mb", str(mb)), stdout=subprocess.PIPE)
    if read_line(proc, 20.0) != "ready":
        proc.kill()
        raise LabError(f"the cache process in node {node} did not get ready")
    proc.stdout.close()
    return proc


def _reap(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
        if p is not None:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _incident_summary(inc: Incident | None) -> dict | None:
    if inc is None:
        return None
    return {"id": inc.id, "rule": inc.rule, "state": inc.state,
            "diagnosis": inc.diagnosis.summary if inc.diagnosis else None,
            "actions": [f"{a.kind}:{a.status}" for a in inc.actions]}


# ---- memory hog ------------------------------------------------------------------------


def run_memory_hog(policy: str = "backdoors", *, name: str | None = None, memory_mb: int = 512,
                   cache_mb: float = 240, rate_mb: float = 40, period_ms: float = 50,
                   timeout_s: float = 20.0, observe_s: float = 1.0,
                   incidents_dir: str | None = None, forks: bool = False,
                   spread: bool = False, register: bool = False, after_s: float = 0.0) -> dict:
    """The memory-hog case under `policy`: "backdoors" (the default rules), "largest_rss"
    (a monitor killing the largest process) or "kernel_oom" (no monitor: the memory
    limit and the kernel's OOM killer alone). `forks`: the hog grows by forking children
    that allocate (lab.hogs memory --forks); `spread`: by orphans each too slow to be a
    hog (--spread); `register`: the hog first registers a Sensor Box beside the service's
    (--register; `hog_registered` says whether the agent took it); `after_s`: it is
    quiet that long first (--after)."""
    if policy not in ("backdoors", "largest_rss", "kernel_oom"):
        raise ValueError(f"unknown memory-hog policy {policy!r}")
    name = name or unique_name("s")
    node = "n0"
    out: dict = {"policy": policy, "memory_limit_mb": memory_mb, "cache_mb": cache_mb,
                 "hog_rate_mb_s": rate_mb}
    hog = cache = watch = None
    with ExitStack() as stack:
        al = stack.enter_context(AgentLab(name, nodes=1, memory_limit=memory_mb * MiB,
                                          pids_limit=256))
        try:
            al.wait_registered(node)
            cache = _start_cache(al, node, cache_mb)
            mon = None
            if policy != "kernel_oom":
                rules = None if policy == "backdoors" else list(
                    parse_ruleset(LARGEST_RSS_RULES, "<largest_rss policy>").rule)
                mon = _monitor(al, stack, period_ms=period_ms, rules=rules,
                               incidents_dir=incidents_dir)
                time.sleep(0.5)  # the agent's RSS rates need a window of history
            service_pid = al.lab.service(node).pid
            before = {p.pid for p in al.lab.node(node).processes()}
            oom_before = al.lab.node(node).stats().oom_kills
            watch = ProgressWatch(al.lab, node, {"service": service_pid, "cache": cache.pid})
            watch.start()
            t_hog = time.monotonic()
            hog = al.lab.run_in_node(node, _hog_argv("memory", "--rate-mb", str(rate_mb),
                                                     "--cap-mb", str(memory_mb * 2),
                                                     *(["--forks"] if forks else []),
                                                     *(["--spread"] if spread else []),
                                                     *(["--register", HOG_BOX] if register
                                                       else []), "--after", str(after_s)))
            watch.track("hog", hog.pid)
            if register:
                out["hog_registered"] = _registered(al, node, HOG_BOX, hog.pid)
            inc = None
            end = t_hog + timeout_s
            if mon is not None:
                inc = mon.wait_for(lambda i: i.rule == "memory-hog" and i.state != "detected",
                                   timeout_s)
            else:  # the kernel alone: wait for the hog to die (after whatever else died)
                while hog.poll() is None and time.monotonic() < end:
                    time.sleep(0.05)
            time.sleep(observe_s)
            t_end = time.monotonic()
            watch.stop()
            after = {p.pid for p in al.lab.node(node).processes()}
            first = watch.first_death()
            killed_by_monitor = bool(inc and inc.diagnosis and any(
                c.pid == hog.pid for c in inc.diagnosis.culprits) and any(
                a.kind == "kill_culprit" and a.status == "done" for a in inc.actions))
            innocents_gone = sorted((before - {hog.pid}) - after)
            out.update(
                detected=inc is not None,
                detect_ms=_ms(t_hog, _mono(inc.detected)) if inc else None,
                repair_ms=inc.repaired_ms if inc else None,
                culprit_killed=killed_by_monitor if mon is not None else hog.poll() is not None,
                innocent_killed=len(innocents_gone),
                service_survived=alive(service_pid),
                cache_survived=cache.poll() is None,
                hog_survived=hog.poll() is None,
                hog_processes_left=_count_comm(al, node, hogs.COMM["memory"]),
                victim={"hog": "hog", "cache": "cache", "service": "service"}.get(first),
                max_progress_gap_ms=watch.max_gap_ms(t_hog, t_end),
                oom_kills=al.lab.node(node).stats().oom_kills - oom_before,
                incident=_incident_summary(inc),
            )
            if inc and inc.diagnosis:
                out["diagnosis"] = inc.diagnosis.summary
        finally:
            if watch is not None and watch._thread.is_alive():
                watch.stop()
            _reap(hog, cache)
    return out


#: the Sensor Box a registering hog registers (run_memory_hog(register=True))
HOG_BOX = "bd-hogbox"


def _registered(al: AgentLab, node: str, name: str, pid: int | None = None,
                timeout: float = 10.0) -> bool:
    """Whether the agent comes to hold region `name` of `node` (registered by `pid`)."""
    with al.agent_client(al.plan.node(node).host) as c:
        try:
            return wait_until(lambda: any(r.name == name and pid in (None, r.pid)
                                          for r in c.regions(node)), timeout,
                              f"region {name} of node {node} registered")
        except LabError:
            return False


def memory_hog(**kw) -> dict:
    """`backdoors scenario memory-hog`: the default rules against a growing hog next to
    a large stable cache. See run_memory_hog for the parameters."""
    return run_memory_hog("backdoors", **kw)


# ---- fork bomb ---------------------------------------------------------------------------


# A process manager in the node, started with it: the parent of what it is asked to start
# (one JSON argv per stdin line); it reaps its children. Orphans go to the node's own PID 1
# (lab nodes are containers), which reaps them at once.
_NODE_INIT = r"""
import ctypes, json, os, sys, threading, time
libc = ctypes.CDLL(None)
libc.prctl(15, b"bd-init", 0, 0, 0)
def spawn():
    for line in sys.stdin:
        argv = json.loads(line)
        os.posix_spawn(argv[0], argv, os.environ)
threading.Thread(target=spawn, daemon=True).start()
print("ready", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.01)
"""


class NodeInit:
    """The init of a node (see _NODE_INIT): `spawn(argv)` starts a process under it."""

    def __init__(self, al: AgentLab, node: str):
        self.proc = al.lab.run_in_node(node, [sys.executable, "-c", _NODE_INIT],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if read_line(self.proc, 10.0) != "ready":
            self.proc.kill()
            raise LabError(f"the init of node {node} did not start")

    def spawn(self, argv: list[str]) -> None:
        import json
        self.proc.stdin.write((json.dumps(argv) + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        _reap(self.proc)


def _count_comm(al: AgentLab, node: str, comm: str) -> int:
    return sum(1 for p in al.lab.node(node).processes() if p.comm == comm and running(p.state))


def run_fork_bomb(policy: str = "backdoors", *, name: str | None = None, pids_limit: int = 128,
                  memory_mb: int = 1024, period_ms: float = 50, timeout_s: float = 20.0,
                  wedge_cap_s: float = 30.0, settle_s: float = 1.0,
                  incidents_dir: str | None = None, shape: str = "tree",
                  register: bool = False) -> dict:
    """The fork-bomb case under `policy`: "backdoors" (the default rules) or
    "pids_limit_only" (the pids limit alone, watched for `wedge_cap_s`). `shape` is the
    bomb's (lab.hogs forkbomb --shape): "tree", "orphans" (it double-forks), "threads",
    "spawner", "sessions" or "zombies" (one process, started 3 s before, so older than
    the onset, starts threads, `sleep` processes, each in a session of its own, and does
    not reap them). `register`: the bomb first registers a Sensor Box beside the
    service's (`bomb_registered` says whether the agent took it)."""
    if policy not in ("backdoors", "pids_limit_only"):
        raise ValueError(f"unknown fork-bomb policy {policy!r}")
    name = name or unique_name("s")
    node = "n0"
    out: dict = {"policy": policy, "pids_limit": pids_limit}
    init = probe = watch = None
    with ExitStack() as stack:
        al = stack.enter_context(AgentLab(name, nodes=1, memory_limit=memory_mb * MiB,
                                          pids_limit=pids_limit))
        try:
            al.wait_registered(node)
            init = NodeInit(al, node)
            probe = ForkProbe(al.lab, node).start()  # a process of the node that forks
            mon = None
            if policy == "backdoors":
                mon = _monitor(al, stack, period_ms=period_ms, incidents_dir=incidents_dir)
            service_pid = al.lab.service(node).pid
            watch = ProgressWatch(al.lab, node, {"service": service_pid, "probe": probe.pid,
                                                 "init": init.proc.pid}).start()
            time.sleep(settle_s)  # a node in its steady state, not one just started
            after = 0.0 if shape in ("tree", "orphans") else 3.0
            t_bomb = time.monotonic() + after
            init.spawn(_hog_argv("forkbomb", "--shape", shape, "--after", str(after),
                                 *(["--register", HOG_BOX] if register else [])))
            if register:
                out["bomb_registered"] = _registered(al, node, HOG_BOX)
            inc, t_repaired = None, None
            if mon is not None:
                inc = mon.wait_for(lambda i: i.rule == "fork-bomb" and i.state != "detected",
                                   timeout_s)
                if inc is not None:  # a retry may end it (a spawner spared at first)
                    end = time.monotonic() + timeout_s
                    while _count_comm(al, node, hogs.COMM["forkbomb"]) and time.monotonic() < end:
                        time.sleep(0.05)
                    # the retry that killed them may still hold the node locked: its end
                    # (the unlock, repaired_ms) is the repair's
                    while mon.responding(node) and time.monotonic() < end:
                        time.sleep(0.02)
                    t_repaired = _mono(inc.detected) + (inc.repaired_ms or 0) / 1000
                end = time.monotonic() + 5.0
                while (t_repaired is None or not probe.can_fork_since(t_repaired)) and \
                        time.monotonic() < end:
                    time.sleep(0.02)  # until a fork inside the node works again
            else:
                end = t_bomb + wedge_cap_s
                while time.monotonic() < end and (probe.first_failure is None
                                                  or probe.recovered_at is None):
                    time.sleep(0.05)
            t_end = time.monotonic()
            left = _count_comm(al, node, hogs.COMM["forkbomb"])
            can_fork = probe.can_fork_since(t_repaired if t_repaired is not None else t_end)
            n = al.lab.node(node)
            stats = n.stats()
            watch.stop()
            out.update(
                detected=inc is not None,
                detect_ms=_ms(t_bomb, _mono(inc.detected)) if inc else None,
                repair_ms=inc.repaired_ms if inc else None,
                bomb_processes_left=left,
                service_survived=alive(service_pid),
                probe_survived="probe" not in watch.died,
                init_survived="init" not in watch.died,
                node_thawed=not n.is_locked() and not stats.frozen,
                can_fork_after=can_fork,
                wedged_ms=min(probe.wedged_ms(t_end), wedge_cap_s * 1000),
                fork_failures_seen=probe.failures,
                max_progress_gap_ms=watch.max_gap_ms(t_bomb, t_end),
                incident=_incident_summary(inc),
            )
            if inc and inc.diagnosis:
                out["diagnosis"] = inc.diagnosis.summary
        finally:
            if probe is not None:
                probe.stop()
            if watch is not None and watch._thread.is_alive():
                watch.stop()
            try:  # never leave a bomb behind, whatever happened above
                al.lab.node(node).kill_all(5.0)
            except BackdoorsError:
                pass
            if init is not None:
                init.close()
    return out


def fork_bomb(**kw) -> dict:
    """`backdoors scenario fork-bomb`: the default rules against a fork bomb under the
    node's pids limit. See run_fork_bomb for the parameters."""
    return run_fork_bomb("backdoors", **kw)


# ---- hang --------------------------------------------------------------------------------

HANG_MODES = ("stall", "freeze", "cgroup-freeze")


def hang(*, mode: str = "stall", name: str | None = None, deadline_ms: float = 200,
         period_ms: float = 50, timeout_s: float = 10.0, refresh: bool = False,
         incidents_dir: str | None = None) -> dict:
    """`backdoors scenario hang`: the service stops ticking, and the monitor must notice
    within deadline + 2 poll periods and say which process is stuck and how.

    mode: "stall" (the service's main loop blocks: alive, not progressing), "freeze"
    (every process of the node stopped with SIGSTOP) or "cgroup-freeze" (the node's
    cgroup frozen behind the agent's back). `refresh` makes the action a restart of the
    service (through an in-process hook) instead of a record.
    """
    if mode not in HANG_MODES:
        raise ValueError(f"hang mode must be one of {', '.join(HANG_MODES)}, got {mode!r}")
    name = name or unique_name("s")
    node = "n0"
    out: dict = {"mode": mode, "deadline_ms": deadline_ms, "poll_ms": period_ms}
    with ExitStack() as stack:
        al = stack.enter_context(AgentLab(name, nodes=1))
        fault_undo = None
        try:
            al.wait_registered(node)
            if deadline_ms != 200:
                al.restart_service(node, "--deadline", str(deadline_ms / 1000))
            rules = None
            hooks = None
            if refresh:
                rules = _hang_refresh_rules()
                hooks = {"restart-service": lambda info: al.restart_service(info["node"])}
            mon = _monitor(al, stack, period_ms=period_ms, rules=rules, hooks=hooks,
                           incidents_dir=incidents_dir)
            service_pid = al.lab.service(node).pid
            n = al.lab.node(node)
            t0 = time.monotonic()
            if mode == "stall":
                n.kill(service_pid, signal.SIGUSR1)
                fault_undo = lambda: n.kill(service_pid, signal.SIGUSR2)  # noqa: E731
            elif mode == "freeze":
                for p in n.processes():
                    n.kill(p.pid, signal.SIGSTOP)
                fault_undo = lambda: [n.kill(p.pid, signal.SIGCONT) for p in n.processes()]  # noqa: E731
            else:
                n.lock(2.0)
                fault_undo = lambda: n.unlock(2.0)  # noqa: E731
            inc = mon.wait_for(lambda i: i.rule == "hang" and i.state != "detected", timeout_s)
            detect_ms = _ms(t0, _mono(inc.detected)) if inc else None
            out.update(
                detected=inc is not None,
                detect_ms=detect_ms,
                within_bound=detect_ms is not None and detect_ms <= deadline_ms + 2 * period_ms,
                diagnosis=inc.diagnosis.summary if inc and inc.diagnosis else None,
                scope=inc.diagnosis.evidence.get("scope") if inc and inc.diagnosis else None,
                stuck=[{k: s[k] for k in ("pid", "comm", "state", "threads") if k in s}
                       for s in (inc.diagnosis.evidence.get("stuck", []) if inc and inc.diagnosis else [])],
                actions=[f"{a.kind}:{a.status}" for a in inc.actions] if inc else [],
            )
            if refresh:
                out["service_restarted"] = al.lab.service(node).pid != service_pid
        finally:
            if fault_undo is not None:
                try:
                    fault_undo()
                except BackdoorsError:
                    pass
    return out


def _hang_refresh_rules():
    text = """
[[rule]]
name = "hang"
detectors = [{ kind = "progress_stalled", box = "*" }, { kind = "node_frozen" }]
diagnosis = { kind = "hang" }
actions = [{ kind = "refresh", hook = "restart-service" }]
"""
    return list(parse_ruleset(text, "<hang refresh>").rule)


__all__ = ["HANG_MODES", "fork_bomb", "hang", "memory_hog", "run_fork_bomb", "run_memory_hog"]

"""The demo's scenarios, played in turn in one world; each returns its result record.

A record is the shape `backdoors report` reads: name, title, kind, node, passed, verdict,
checks [{what, ok, detail}], incident, detect_ms, repair_ms / recovery_ms, sessions,
sessions_ok, stalls_ms (agent-restart: also agent_restart_ms, sessions_held_at_first_answer).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time

from ..common.procs import alive, read_line, running
from ..errors import LabError
from ..lab import hogs, inject
from ..scenarios.recovery import agent_fault
from .world import World

TIMEOUT_S = 30.0


class Step:
    def __init__(self, name: str, title: str, kind: str, node: str):
        self.record = {"name": name, "title": title, "kind": kind, "node": node, "passed": False,
                       "verdict": "", "checks": [], "incident": None, "detect_ms": None,
                       "repair_ms": None, "recovery_ms": None, "sessions": None,
                       "sessions_ok": None, "stalls_ms": None}

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.record["checks"].append({"what": what, "ok": bool(ok), "detail": detail})
        return ok

    def done(self, verdict: str) -> dict:
        self.record["passed"] = all(c["ok"] for c in self.record["checks"])
        self.record["verdict"] = verdict
        return self.record


def _incident(w: World, node: str, rules: tuple[str, ...], action: str, since: float):
    """The incident on `node` by one of `rules`, detected after `since`, once `action` ran."""
    return w.monitor.wait_for(lambda i: i.node == node and i.rule in rules and i.detected >= since
                              and any(a.kind == action for a in i.actions), TIMEOUT_S)


def _note_incident(step: Step, inc, t0_wall: float, action: str) -> None:
    step.record["incident"] = inc.id
    step.record["detect_ms"] = round((inc.detected - t0_wall) * 1000, 1)
    act = [a for a in inc.actions if a.kind == action][-1]  # the attempt that acted last
    step.record["repair_ms" if step.record["kind"] != "recovery" else "recovery_ms"] = round(
        act.started_ms + act.duration_ms, 1)


def _comm_alive(w: World, node: str, comm: str) -> list[int]:
    return [p.pid for p in w.lab.node(node).processes() if p.comm == comm and running(p.state)]


def _wait(cond, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while not (v := cond()) and time.monotonic() < end:
        time.sleep(0.05)
    return v


# ---- repair ----------------------------------------------------------------------------


def memory_hog(w: World, node: str = "n3") -> dict:
    step = Step("memory-hog", "memory hog: repair", "repair", node)
    cache = w.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs", "cache", "--mb", "180"],
                              stdout=subprocess.PIPE)
    try:
        if read_line(cache, 20.0) != "ready":
            step.check("the legitimate 180 MB cache started", False)
            return step.done("setup failed")
        time.sleep(0.6)  # a window of RSS history for the growth rates
        service = w.lab.service(node, recoverable=False).pid
        t0 = time.time()
        hog = w.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs", "memory",
                                       "--rate-mb", "40", "--cap-mb", "400"])
        inc = _incident(w, node, ("memory-hog",), "kill_culprit", t0)
        if not step.check("detected and repaired", inc is not None, "" if inc else "no incident within 30 s"):
            hog.kill()
            return step.done("the memory hog was NOT repaired")
        _note_incident(step, inc, t0, "kill_culprit")
        gone = _wait(lambda: hog.poll() is not None)
        step.check("the hog (growing fastest) was killed", gone)
        step.check("the cache (largest, stable) survived", cache.poll() is None)
        step.check("the service survived", alive(service))
        summary = inc.diagnosis.summary if inc.diagnosis else ""
        return step.done(f"hog killed {step.record['repair_ms']:.0f} ms after detection "
                         f"({step.record['detect_ms']:.0f} ms after it started); cache and "
                         f"service kept their state. Diagnosis: {summary}")
    finally:
        cache.kill()
        cache.wait()


def fork_bomb(w: World, node: str = "n3") -> dict:
    step = Step("fork-bomb", "fork bomb: lock and repair", "repair", node)
    service = w.lab.service(node, recoverable=False).pid
    t0 = time.time()
    bomb = w.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs", "forkbomb"])
    inc = _incident(w, node, ("fork-bomb",), "lock_kill_lineage", t0)
    bomb.wait(10)
    if not step.check("detected and repaired", inc is not None, "" if inc else "no incident within 30 s"):
        return step.done("the fork bomb was NOT repaired")
    _note_incident(step, inc, t0, "lock_kill_lineage")
    left = _wait(lambda: not _comm_alive(w, node, hogs.COMM["forkbomb"]), 5.0)
    step.check("no bomb process left", left, f"{len(_comm_alive(w, node, hogs.COMM['forkbomb']))} left")
    step.check("the node is thawed", not w.lab.node(node).stats().frozen)
    step.check("the service survived", alive(service))
    forked = _wait(lambda: _can_fork(w, node), 8.0)
    step.check("the node can fork again", forked)
    return step.done(f"node locked, {_killed(inc)} bomb processes killed while frozen, unlocked "
                     f"{step.record['repair_ms']:.0f} ms after detection; the service runs on")


def _can_fork(w: World, node: str) -> bool:
    probe = w.lab.run_in_node(node, [sys.executable, "-c",
                                     "import os; p = os.fork(); os._exit(0) if p == 0 else os.waitpid(p, 0)"])
    try:
        return probe.wait(10) == 0
    except subprocess.TimeoutExpired:
        probe.kill()
        return False


def _killed(inc) -> int:
    act = next((a for a in inc.actions if a.kind == "lock_kill_lineage"), None)
    return act.detail.get("killed", 0) if act else 0


def deadlock(w: World, node: str = "n3") -> dict:
    step = Step("deadlock", "service deadlock: detection", "detection", node)
    old = w.lab.service(node, recoverable=False).pid
    t0 = time.time()
    inject(w.lab, "stall", node)
    inc = _incident(w, node, ("deadlock",), "refresh", t0)
    if not step.check("detected", inc is not None, "" if inc else "no incident within 30 s"):
        return step.done("the deadlock was NOT detected")
    _note_incident(step, inc, t0, "refresh")
    # a time, not a check: on a host saturated from outside the node the agent does not
    # count the time the node could not run (docs/agent-protocol.md §5.7)
    bound = 200 + 2 * 50 + 50  # deadline + 2 polls (+ the last tick's age at the fault)
    diag = inc.diagnosis.summary if inc.diagnosis else ""
    step.check("the diagnosis names the stuck process", str(old) in diag, diag)
    new = w.lab.service(node, recoverable=False).pid
    step.check("the service was restarted (refresh)", new != old and alive(new))
    return step.done(f"detected {step.record['detect_ms']:.0f} ms after the service stopped "
                     f"ticking (deadline 200 ms + 2 polls: ~{bound} ms on an idle host): "
                     f"{diag}; restarted as pid {new}")


# ---- recovery ----------------------------------------------------------------------------


def recovery(w: World, fault: str) -> dict:
    """Fail the node that serves the sessions now; they move on (and the next fault finds
    them where they landed)."""
    node = w.session_node
    titles = {"freeze": "node freeze", "crash": "server crash", "network": "network driver failure"}
    step = Step(fault, f"{titles[fault]}: session recovery", "recovery", node)
    host = w.lab.plan.node(node).host
    with w.lab.agent_client(host) as c:
        held = len(c.call("sessions", node=node))
    return _recover(w, step, fault, held)


def agent_restart(w: World) -> dict:
    """SIGKILL the agent of the host serving the sessions: its keeper starts it again, the
    new agent takes the sessions back from the fd store, and they stream on byte-exact.
    Played after a recovery and before another: the next failure moves the sessions on
    from a node whose agent restarted since it took them (and their address) over."""
    node = w.session_node
    step = Step("agent-restart", "agent restart: sessions held across it", "recovery", node)
    host = w.lab.plan.node(node).host
    with w.lab.agent_client(host) as c:
        held = len(c.call("sessions", node=node))
    old = w.lab.agent_pid(host)
    offsets, t0_mono = w.clients.offsets(), time.monotonic()
    w.note(f"{host}: agent (pid {old}) SIGKILLed while {node} holds {held} sessions")
    try:
        facts = agent_fault(w.lab, node, signal.SIGKILL, held, w.monitor, TIMEOUT_S)
    except LabError as e:
        step.check("the keeper restarted the agent", False, str(e))
        return step.done("the agent did NOT come back")
    new = w.lab.agent_pid(host)
    step.record.update(agent_restart_ms=facts["agent_restart_ms"],
                       sessions_held_at_first_answer=facts["sessions_held_at_first_answer"])
    w.note(f"{host}: agent back as pid {new}, answering {facts['agent_restart_ms']:.0f} ms after "
           f"the kill, holding {facts['sessions_held_at_first_answer']}/{held} sessions")
    step.check("the keeper restarted the agent (a new pid)", new is not None and new != old,
               f"{old} -> {new}")
    step.check("the new agent held every session at its first answer (fd store)",
               facts["sessions_held_at_first_answer"] == held,
               f"{facts['sessions_held_at_first_answer']}/{held}")
    time.sleep(1.5)  # the sessions stream on across the restart
    report = w.clients.report(t0_mono, offsets)
    n = report["sessions"]
    step.record.update(sessions=n, sessions_ok=report["sessions_ok"], stalls_ms=report["stalls_ms"])
    step.check("every stream session went on byte-exact across the restart",
               report["sessions_ok"] == n and not report["bytes_lost"]
               and not report["bytes_duplicated"] and report["broken_connections"] == 0,
               f"{report['sessions_ok']}/{n} ok, {report['bytes_lost']} lost, "
               f"{report['bytes_duplicated']} duplicated, {report['broken_by']}")
    return step.done(f"agent restarted in {facts['agent_restart_ms']:.0f} ms holding "
                     f"{facts['sessions_held_at_first_answer']}/{held} sessions; "
                     f"{report['sessions_ok']}/{n} stream sessions went on byte-exact "
                     "(the next failure moves them on)")


def _recover(w: World, step: Step, fault: str, held: int) -> dict:
    """Inject `fault` into the node serving the sessions, wait for the monitor's recovery,
    check the sessions moved and continued byte-exact."""
    node = step.record["node"]
    offsets = w.clients.offsets()
    t0_mono, t0 = time.monotonic(), time.time()
    if fault == "crash":
        inject(w.lab, "crash", node, recoverable=True)  # the stream server holding sessions
    else:
        inject(w.lab, fault, node)
    inc = _incident(w, node, ("hang", "server-died", "network-failure"), "recover", t0)
    if not step.check("detected and recovered", inc is not None, "" if inc else "no incident within 30 s"):
        return step.done("the sessions were NOT recovered")
    _note_incident(step, inc, t0, "recover")
    act = next(a for a in inc.actions if a.kind == "recover")
    moved, target = act.detail.get("moved"), act.detail.get("target")
    if target:
        w.session_node = target
    time.sleep(1.5)  # the sessions flow again from the target node
    report = w.clients.report(t0_mono, offsets)
    n = report["sessions"]
    step.record.update(sessions=n, sessions_ok=report["sessions_ok"], stalls_ms=report["stalls_ms"])
    step.check(f"every session held by {node} moved", moved == held, f"{moved}/{held} to {target}")
    step.check("every stream session continued byte-exact", report["sessions_ok"] == n and
               not report["bytes_lost"] and not report["bytes_duplicated"],
               f"{report['sessions_ok']}/{n} ok, {report['bytes_lost']} lost, "
               f"{report['bytes_duplicated']} duplicated")
    step.check("no connection broke", report["broken_connections"] == 0, str(report["broken_by"]))
    # curl --limit-rate reads in bursts (it averages over the whole transfer), so a
    # download may rightly be idle for seconds: what counts is that curl is alive or done
    # and every byte it wrote is the file's
    intact, problems = w.downloads_intact()
    step.check("the HTTP downloads (unmodified curl) go on, byte-exact so far",
               intact == len(w.downloads),
               f"{intact}/{len(w.downloads)} intact, {sum(w.download_sizes()) / 2**20:.1f} MiB; "
               + "; ".join(problems))
    p99 = sorted(report["stalls_ms"])[int(0.99 * (len(report["stalls_ms"]) - 1))]
    return step.done(
        f"{report['sessions_ok']}/{n} stream sessions and {intact}/{len(w.downloads)} downloads "
        f"continued byte-exact on {target}; detected {step.record['detect_ms']:.0f} ms after the "
        f"fault, moved in {step.record['recovery_ms']:.0f} ms{_waited(act, node)}; "
        f"client stall p50 {statistics.median(report['stalls_ms']):.0f} ms, p99 {p99:.0f} ms")


def _waited(act, node: str) -> str:
    """What of a move was the wait for a restarted server on the node (server-died)."""
    waited = act.detail.get("same_node_waited_ms")
    return f" ({waited:.0f} of them waiting for a restarted server on {node})" if waited else ""


SCENARIOS = {
    "memory-hog": memory_hog,
    "fork-bomb": fork_bomb,
    "deadlock": deadlock,
    "freeze": lambda w: recovery(w, "freeze"),
    # between two recoveries: the sessions' node took them (and a service address) over
    # from another; its new agent must remember that for the next failure to move them on
    "agent-restart": agent_restart,
    "crash": lambda w: recovery(w, "crash"),
    "network": lambda w: recovery(w, "network"),
}
ORDER = tuple(SCENARIOS)
QUICK = ("memory-hog", "freeze", "agent-restart", "network")  # a restart between two moves

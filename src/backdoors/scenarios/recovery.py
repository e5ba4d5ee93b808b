"""The session recovery scenario: a node fails, its client sessions continue elsewhere.

    recovery(fault="freeze", sessions=10) -> {"sessions", "sessions_ok", "bytes_lost",
        "bytes_duplicated", "broken_connections", "detect_ms", "recovery_ms",
        "max_client_stall_ms", ...}

A lab of two hosts, one node each, both running the recoverable stream service (its
sessions' Continuation Boxes and sockets held by the node's agent). Clients open
`sessions` sessions to node n0's service address and verify every byte. The fault hits
n0; the monitor (the "heal" ruleset) detects it and recovers: fence n0, evacuate its
sessions to n1, which resumes each from its last export. The clients must see one
unbroken, byte-exact stream each.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

from ..errors import BackdoorsError, LabError
from ..lab import Lab, inject
from ..lab import topology
from ..lab.agents import agent_pid
from ..lab.clients import StreamClients
from ..monitor import Monitor
from .labkit import unique_name, wait_until

FAULTS = ("freeze", "crash", "network", "memory-hog", "server-crash", "agent-restart",
          "agent-stop")
#: faults of the agent itself: it is SIGKILLed (or SIGSTOPped, then replaced by its keeper's
#: watchdog) while the sessions stream, then the node is frozen and must still recover
AGENT_FAULTS = {"agent-restart": signal.SIGKILL, "agent-stop": signal.SIGSTOP}



def monitor_for(lab: Lab, *, period_ms: float = 50, incidents_dir: str | None = None,
                rulesets: tuple[str, ...] = ("heal",), hooks=None) -> Monitor:
    """A monitor of every agent of `lab`, from its monitor namespace (not started)."""
    cfg = lab.monitor_config(period_ms=period_ms, incidents_dir=incidents_dir,
                             rulesets=list(rulesets))
    return Monitor(cfg, key=lab.monitor_key("m1"), hooks=hooks)


def recovery(fault: str = "freeze", sessions: int = 10, *, name: str | None = None,
             period_ms: float = 50, deadline_ms: float = 200, rate: int = 16384,
             chunk: int = 1024, warmup_s: float = 1.0, watch_s: float = 2.0,
             timeout_s: float = 30.0, incidents_dir: str | None = None,
             restart_server: bool = True, export_every: int | None = None) -> dict:
    """Run the case; returns the facts (see the module docstring). `restart_server`: the
    server-crash fault's crashed server is restarted in its node (see server_crash).
    `export_every`: bytes between the service's exports (default 8 chunks); a recovered
    session regenerates what followed its last export, paced like the rest."""
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {', '.join(FAULTS)}, got {fault!r}")
    if fault == "server-crash":  # a server dies, its node stays healthy: server_crash.py
        from .server_crash import server_crash
        out, inc, wall_fault, report = server_crash(
            sessions, restart=restart_server, name=name, period_ms=period_ms,
            deadline_ms=deadline_ms, rate=rate, chunk=chunk, warmup_s=warmup_s,
            watch_s=watch_s, timeout_s=timeout_s, incidents_dir=incidents_dir)
        return {**out, **_facts(inc, wall_fault, report)}
    name = name or unique_name("r")
    out: dict = {"fault": fault, "sessions": sessions, "poll_ms": period_ms,
                 "deadline_ms": deadline_ms, "rate_bytes_per_s": rate}
    # the memory-hog case: the service itself leaks, in a node small enough to fill fast
    memory = 256 * 2**20 if fault == "memory-hog" else 1 << 30
    with Lab(name, hosts=2, nodes=2, agents=True, services=False, memory_limit=memory,
             pids_limit=max(512, 2 * sessions + 256)) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", str(rate), "--chunk", str(chunk),
                              "--export-every", str(export_every or chunk * 8), "--deadline",
                              str(deadline_ms / 1000), recoverable=True)
        with lab.agent_client("h0") as c:
            wait_until(lambda: any(k.startswith("rsvc") for k in c.sensors("n0").boxes), 10,
                  "the service's Sensor Box")
            vip = lab.plan.node("n0").vip
            # the sessions first, then the monitor: a server starting thousands of session
            # threads can miss its progress deadline while they connect (not the fault)
            with StreamClients(lab, vip, topology.RECOVERABLE_PORT, sessions) as clients:
                # registering takes a round trip per session: ~1 ms each, more if loaded
                wait_until(lambda: _held(c, "n0") == sessions,
                           30 + sessions / 100, f"{sessions} sessions held by the agent")
                with monitor_for(lab, period_ms=period_ms, incidents_dir=incidents_dir) as mon:
                    mon.wait_ready(timeout=10)
                    time.sleep(warmup_s)
                    if fault in AGENT_FAULTS:
                        out.update(agent_fault(lab, "n0", AGENT_FAULTS[fault], sessions, mon,
                                               timeout_s))
                    at_fault = clients.offsets()
                    t_fault, wall_fault = time.monotonic(), time.time()
                    if fault == "memory-hog":
                        lab.node("n0").kill(lab.service("n0").pid, signal.SIGUSR1)
                    else:
                        inject(lab, "freeze" if fault in AGENT_FAULTS else fault, "n0")
                    inc = mon.wait_for(lambda i: i.node == "n0" and any(
                        a.kind == "recover" for a in i.actions), timeout_s)
                    time.sleep(watch_s)
                    report = clients.report(t_fault, at_fault)
        out.update(_facts(inc, wall_fault, report))
    return out


def agent_fault(lab: Lab, node: str, sig: signal.Signals, sessions: int, mon: Monitor,
                timeout_s: float) -> dict:
    """Hit the agent of `node`'s host with `sig` (SIGKILL: its keeper restarts it; SIGSTOP:
    the keeper's watchdog kills and replaces it) and wait until the new agent answers,
    holds the node's sessions again and the monitor has no incident open on the node.
    Facts: agent_restart_ms (signal to the new agent's first answer), sessions held at
    that first answer (taken back from the fd store) and once settled."""
    host = lab.plan.host(lab.plan.node(node).host)
    old = agent_pid(lab.plan, host)
    if old is None:
        raise LabError(f"the agent of host {host.name} has no pid file: started without keeper?")
    t0 = time.monotonic()
    os.kill(old, sig)

    def first_answer():
        try:
            with lab.agent_client(host.name, timeout=0.2) as c:
                if c.ping().pid != old:
                    return len(c.call("sessions", node=node)) + 1  # +1: 0 sessions is an answer
        except (BackdoorsError, OSError):
            return None
        return None

    held_at_answer = wait_until(first_answer, timeout_s, f"a new agent of host {host.name}", 0.005) - 1
    restart_ms = (time.monotonic() - t0) * 1000
    with lab.agent_client(host.name) as c:
        seen = [held_at_answer]

        def all_held() -> int:
            seen.append(len(c.call("sessions", node=node)))
            return seen[-1] if seen[-1] >= sessions else 0

        try:
            held = wait_until(all_held, timeout_s, f"{sessions} sessions held by the new agent")
        except LabError as e:
            raise LabError(f"{e} (held at its first answer: {held_at_answer}, "
                           f"last: {seen[-1]})") from None
    wait_until(lambda: not any(i.node == node and i.closed is None for i in mon.incidents()),
          timeout_s, f"no open incident on {node} after the agent came back")
    return {"agent_signal": sig.name, "agent_restart_ms": round(restart_ms, 1),
            "sessions_held_at_first_answer": held_at_answer,
            "sessions_recovered_after_restart": held}


def _held(client, node: str) -> int | None:
    """Sessions the agent holds for `node`; None if it does not answer in time (busy with
    thousands of registrations on a loaded machine: asked again)."""
    try:
        return client.held(node).sessions
    except BackdoorsError:
        return None


def _facts(inc, wall_fault: float, report: dict) -> dict:
    stalls = report.pop("stalls_ms")
    last_resumed = wall_fault + report.pop("last_resumed_s", 0.0)  # wall clock
    facts = {k: report[k] for k in ("sessions_ok", "bytes_lost", "bytes_duplicated",
                                     "broken_connections")}
    facts.update(detected=inc is not None, detect_ms=None, recovery_ms=None, rule=None,
                 moved=None, max_client_stall_ms=max(stalls, default=None),
                 stall_p50_ms=statistics.median(stalls) if stalls else None,
                 stall_p99_ms=stalls[min(len(stalls) - 1, int(len(stalls) * 0.99))] if stalls else None,
                 broken_by=report["broken_by"], corrupt_sessions=report["corrupt_sessions"],
                 bytes_received=report["bytes_received"])
    if inc is not None:
        rec = next(a for a in inc.actions if a.kind == "recover")
        facts.update(detect_ms=round((inc.detected - wall_fault) * 1000, 1),
                     recovery_ms=round(rec.started_ms + rec.duration_ms, 1), rule=inc.rule,
                     recover_status=rec.status, moved=rec.detail.get("moved"),
                     recover_detail={k: rec.detail.get(k) for k in
                                     ("target", "fence_ms", "evacuate_ms", "dump_ms", "transfer_ms", "failed",
                                       "sessions", "left", "tries", "waited_ms")},
                     incident=inc.id, error=rec.error,
                     phases=phases(rec.detail, inc.detected + rec.started_ms / 1000,
                                   inc.detected + (rec.started_ms + rec.duration_ms) / 1000,
                                   last_resumed))
    return facts


def phases(detail: dict, started: float, ended: float, last_resumed: float) -> dict:
    """Where the move went, ms: fence; dump (the failed node's agent); transfer (agent to
    agent: stage/adopt requests, less the target's work; negative when batches restored
    while the source dumped); restore (inert sockets, every batch); then the final
    batch's steps: arp (announcing the addresses), resume (repair mode released),
    connect, send (batches to the server, its verdicts), hold (the sessions held as the
    server's, within send); first_byte (the end of the recover action to the last client
    session receiving again: negative if it came before); move (fence to that last
    first byte)."""
    adopt = detail.get("adopt") or []
    if not adopt:
        return {}
    final = adopt[-1].get("phases") or {}
    agent_ms = sum(a["restore_ms"] + a["announce_ms"] + a["handover_ms"] for a in adopt)
    out = {"fence": detail.get("fence_ms"), "dump": detail.get("dump_ms"),
           "transfer": round(detail.get("transfer_ms", 0.0) - agent_ms, 1),
           "restore": round(sum(a["restore_ms"] for a in adopt), 1)}
    out.update({k.removesuffix("_ms"): round(v, 1) for k, v in final.items()})
    out["dump_steps"] = {k.removesuffix("_ms"): round(v, 1)
                         for k, v in (detail.get("dump_phases") or {}).items()}
    out["first_byte"] = round((last_resumed - ended) * 1000, 1)
    out["move"] = round((last_resumed - started) * 1000, 1)
    return out

"""Faults the lab injects into a node, each of which can be stopped again.

    fault = inject(lab, "memory-hog", "n0", rate_mb=40, cap_mb=400)
    ...
    fault.stop()

Faults keep no state a later command could not find again: hog processes are found by
their process name (`bd-memhog`, ...), the service by the lab state, the link by name. So
`backdoors lab fault stop KIND --node N` works from another process than the one that
injected it.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field

from ..common.procs import alive
from .. import net
from ..errors import LabError
from . import topology
from .lab import Lab

KINDS = ("freeze", "memory-hog", "fork-bomb", "crash", "network", "cpu-hog", "stall")


@dataclass
class Fault:
    """An injected fault; `stop()` undoes it (idempotent)."""

    lab: Lab
    kind: str
    node: str
    options: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    pid: int | None = None  # the fault's own process, when it has one

    def stop(self) -> None:
        stop(self.lab, self.kind, self.node, **self.options)


def _hog_argv(kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "backdoors.lab.hogs", kind, *args]


def _by_comm(lab: Lab, node: str, comm: str) -> list[int]:
    return [p.pid for p in lab.node(node).processes() if p.comm == comm]


def inject(lab: Lab, kind: str, node: str, **opts) -> Fault:
    """Start fault `kind` in `node`. Options: memory-hog rate_mb, cap_mb; cpu-hog procs;
    network mode ("down" or "detach"); crash recoverable (True: the stream service)."""
    if kind not in KINDS:
        raise LabError(f"unknown fault {kind!r}; choose one of {', '.join(KINDS)}")
    n = lab.node(node)
    fault = Fault(lab, kind, node, opts)
    if kind == "freeze":
        # SIGSTOP every process: a synthetic hang that leaves the cgroup freezer to the agent
        for p in n.processes():
            n.kill(p.pid, signal.SIGSTOP)
    elif kind == "memory-hog":
        proc = lab.run_in_node(node, _hog_argv("memory", "--rate-mb", str(opts.get("rate_mb", 40)),
                                               "--cap-mb", str(opts.get("cap_mb", 400))))
        fault.pid = proc.pid
    elif kind == "fork-bomb":
        fault.pid = lab.run_in_node(node, _hog_argv("forkbomb")).pid
    elif kind == "crash":
        n.kill(_service(lab, node, opts).pid, signal.SIGKILL)
    elif kind == "network":
        _network(lab, node, opts.get("mode", "down"), broken=True)
    elif kind == "cpu-hog":
        fault.pid = lab.run_in_node(node, _hog_argv("cpu", "--procs", str(opts.get("procs", 2)))).pid
    elif kind == "stall":
        n.kill(lab.service(node).pid, signal.SIGUSR1)
    return fault


def stop(lab: Lab, kind: str, node: str, **opts) -> None:
    """Undo fault `kind` in `node` (a crash is undone by starting the service again)."""
    if kind not in KINDS:
        raise LabError(f"unknown fault {kind!r}; choose one of {', '.join(KINDS)}")
    n = lab.node(node)
    if kind == "freeze":
        for p in n.processes():
            n.kill(p.pid, signal.SIGCONT)
    elif kind in ("memory-hog", "fork-bomb", "cpu-hog"):
        from .hogs import COMM  # lazily: else `python -m backdoors.lab.hogs` warns (runpy)
        comm = COMM[{"memory-hog": "memory", "fork-bomb": "forkbomb", "cpu-hog": "cpu"}[kind]]
        with n.locked(timeout=5.0):  # nothing forks while we pick the victims
            for pid in _by_comm(lab, node, comm):
                n.kill(pid, signal.SIGKILL)
    elif kind == "crash":
        if not alive(_service(lab, node, opts).pid):
            lab.start_service(node, recoverable=bool(opts.get("recoverable")))
    elif kind == "network":
        _network(lab, node, opts.get("mode", "down"), broken=False)
    elif kind == "stall":
        n.kill(lab.service(node).pid, signal.SIGUSR2)


def _service(lab: Lab, node: str, opts: dict):
    """The service a crash is about: option recoverable=True picks the stream service."""
    return lab.service(node, recoverable=opts.get("recoverable"))


def _network(lab: Lab, node: str, mode: str, *, broken: bool) -> None:
    """Emulate a failed network driver: the node's link down, or its port off the bridge."""
    plan = lab.plan.node(node)
    if mode == "down":
        net.set_up(plan.netns, "eth0", not broken)
    elif mode == "detach":
        net.set_master(lab.plan.switch_ns, node, None if broken else topology.BR_SERVICE)
    else:
        raise LabError(f"network fault mode must be 'down' or 'detach', got {mode!r}")

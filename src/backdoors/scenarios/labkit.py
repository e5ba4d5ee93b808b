"""A lab with its agents, plus what a monitor and a scenario need around it.

`AgentLab` wraps `Lab(..., agents=True)` (one agent per lab host, services registering
their Sensor Box with their node's agent) and adds: a MonitorConfig that reaches every
agent from the lab's monitor namespace, waiting until a service's box is served, and
restarting a service (the refresh action of a hang).
"""

from __future__ import annotations

import os
import signal
import time

from ..common.procs import alive
from ..errors import LabError
from ..lab import Lab
from ..monitor.config import MonitorConfig
from ..sensors import KERNEL_BOX, parse_box

MiB = 1 << 20


class AgentLab:
    """A context manager: the lab up with its agents, torn down on exit (also on error)."""

    def __init__(self, name: str, *, hosts: int = 1, nodes: int = 1,
                 memory_limit: int | None = 1 << 30, pids_limit: int | None = 512,
                 monitors: tuple[str, ...] = ("m1",), quorum: int = 1, services: bool = True,
                 etcd: bool | int = False, sample_period_s: float | None = None):
        self.lab = Lab(name, hosts=hosts, nodes=nodes, memory_limit=memory_limit,
                       pids_limit=pids_limit, services=services, agents=True, quorum=quorum,
                       monitors=monitors, etcd=etcd, sample_period_s=sample_period_s)

    @property
    def plan(self):
        return self.lab.plan

    def up(self) -> AgentLab:
        self.lab.up()
        return self

    def down(self) -> None:
        self.lab.down()

    def __enter__(self) -> AgentLab:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def agent_client(self, host: str, monitor_id: str = "m1", timeout: float = 2.0):
        return self.lab.agent_client(host, monitor_id=monitor_id, timeout=timeout)

    def monitor_key(self, monitor_id: str = "m1"):
        return self.lab.monitor_key(monitor_id)

    def monitor_config(self, monitor_id: str = "m1", **kw) -> MonitorConfig:
        return self.lab.monitor_config(monitor_id, **kw)

    def wait_registered(self, node: str, timeout: float = 10.0, owner: int | None = None) -> None:
        """Wait until the node's agent serves an application box besides its kernel box
        (one created by process `owner`, when given)."""
        host = self.plan.node(node).host
        end = time.monotonic() + timeout
        with self.agent_client(host) as c:
            while True:
                boxes = c.sensors(node).boxes
                apps = [parse_box(b) for k, b in boxes.items() if k != KERNEL_BOX]
                if apps and (owner is None or any(a.owner_pid == owner for a in apps)):
                    return
                if time.monotonic() > end:
                    raise LabError(f"node {node}: the service's Sensor Box was not registered "
                                   f"with the agent within {timeout:g} s (boxes: {sorted(boxes)})")
                time.sleep(0.05)

    def restart_service(self, node: str, *args: str, timeout: float = 10.0) -> int:
        """Kill the node's sample service and start it again with `args`; wait until the
        new one's box is registered. Returns the new pid."""
        old = self.lab.service(node).pid
        self.lab.node(node).kill(old, signal.SIGKILL)
        end = time.monotonic() + timeout
        while alive(old) and time.monotonic() < end:
            time.sleep(0.01)
        pid = self.lab.start_service(node, *args).pid
        self.wait_registered(node, timeout, owner=pid)
        return pid


def unique_name(prefix: str = "s") -> str:
    """A lab name `<prefix><6 hex>` (labs of concurrent runs never collide)."""
    return f"{prefix}{os.urandom(3).hex()}"


def wait_until(pred, timeout: float, what: str, step: float = 0.02):
    """The first true value of `pred()`, polled every `step` s; LabError naming `what`
    after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := pred()):
            return v
        time.sleep(step)
    raise LabError(f"timed out after {timeout:g} s waiting for {what}")

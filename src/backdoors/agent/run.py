"""The agent as a process (`backdoors agent --config FILE`): the daemon of a host.

Hardens the process, moves it into its own cgroup, serves until SIGTERM or SIGINT, then
releases leases, removes its sockets and its cgroup. When it is serving it prints one
JSON line on stdout: {"event": "ready", "host", "listen", "pid"} (and "sealed": {"action",
"denied", "landlock": {"abi", "rules"}} when it sealed itself, `--sealed`: agent/sealing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from ..common import fdtable
from ..errors import BackdoorsError
from ..vm.kernel import cache_dir
from .config import AgentConfig
from .daemon import Agent
from .hardening import OwnCgroup, harden
from .sealing import Confinement, confine, rules, seal, secret_paths

log = logging.getLogger("backdoors.agent")


def run_agent(config: AgentConfig, *, sealed: bool = False, config_path: str | None = None,
              seal_action: str = "errno", require_landlock: bool = False) -> int:
    """Run the agent daemon of `config` in this process until SIGTERM or SIGINT; the exit
    status (0, or 1 when it could not serve). `sealed`: seal the process once it is set up
    (agent/sealing.py; `config_path` is checked if it holds the keys; `require_landlock`:
    refuse to run on a kernel without Landlock instead of warning)."""
    for warning in harden():
        log.warning("%s", warning)
    own = OwnCgroup(config.own_cgroup)
    # until the event loop handles it: a SIGTERM while starting still removes the cgroup
    default_term = signal.signal(signal.SIGTERM, _terminated)
    stuck = 0
    try:
        try:
            own.enter()
        except BackdoorsError as e:
            print(f"backdoors agent: cannot enter its cgroup {config.own_cgroup!r}: {e}",
                  file=sys.stderr)
            return 1
        if own.warning:
            log.warning("%s", own.warning)
        fdtable.reserve()  # before any thread: adopting sessions then never waits for it
        sealing = (_Sealing(config, config_path, seal_action, require_landlock)
                   if sealed else None)
        stuck = asyncio.run(_serve(config, sealing))
        rc = 0
    except BackdoorsError as e:
        print(f"backdoors agent: {e}", file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving the cgroup is not cut short
        try:
            own.leave()
        except BackdoorsError as e:
            log.warning("%s", e)
        signal.signal(signal.SIGTERM, default_term)
    if stuck:  # worker threads blocked in the kernel would hold up interpreter exit
        log.warning("%d operations still stuck at exit; exiting without waiting for them", stuck)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


class _Sealing:
    """The two steps of the seal (agent/sealing.py): `confine` (no new privileges, Landlock)
    once the agent is set up and before it starts a thread, `serving` (seccomp) once it
    serves and before it tells its supervisor it is ready."""

    def __init__(self, config: AgentConfig, config_path: str | None, action: str,
                 require_landlock: bool = False):
        self.secrets = secret_paths(config.key_file)
        self.action, self.require_landlock = action, require_landlock
        self.confined: Confinement | None = None
        self.sealed: dict | None = None  # what serving() applied, for the ready line

    def confine(self, agent: Agent) -> None:
        c = agent.config
        mounts = sorted({str(m) for m in agent.layout.hierarchies().values()})
        # VM nodes: their integrity baselines come from the guest kernel's image (vm/guard.py)
        kernels = tuple(sorted({n.vm.kernel or str(cache_dir()) for n in c.nodes if n.vm}))
        self.confined = confine(rules(run_dir=c.run_dir, nodes=[n.name for n in c.nodes],
                                      cgroup_mounts=mounts, read_dirs=kernels),
                                secrets=self.secrets, require_landlock=self.require_landlock)

    def serving(self, agent: Agent) -> None:
        done = seal(secrets=self.secrets, action=self.action, confined=self.confined)
        for warning in done.warnings:
            log.warning("%s", warning)
        log.info("sealed: not dumpable, no new privileges, %d system calls denied (%s)%s; "
                 "Landlock ABI %d, %d path rules: %s", len(done.denied), done.action,
                 f"; unknown here: {', '.join(done.unknown)}" if done.unknown else "",
                 done.landlock_abi, len(done.landlock),
                 "; ".join(f"{p} {'+'.join(a)}" for p, a in done.landlock.items()))
        self.sealed = {"action": done.action, "denied": len(done.denied),
                       "landlock": {"abi": done.landlock_abi, "rules": done.landlock}}


async def _serve(config: AgentConfig, sealing: _Sealing | None = None) -> int:
    agent = Agent(config, on_set_up=sealing.confine if sealing is not None else None,
                  on_serving=sealing.serving if sealing is not None else None)
    await agent.start()  # a failed seal stops it again and raises
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = agent.address
    ready = {"event": "ready", "host": config.host, "pid": os.getpid(),
             "listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    if sealing is not None:
        ready["sealed"] = sealing.sealed
    if agent.metrics_server is not None:
        ready["metrics"] = agent.metrics_server.url_host
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await agent.stop()
    return agent.stuck_ops()

"""The agent as a process (`backdoors agent --config FILE`): the daemon of a host.

Hardens the process, moves it into its own cgroup, serves until SIGTERM or SIGINT, then
releases leases, removes its sockets and its cgroup. When it is serving it prints one
JSON line on stdout: {"event": "ready", "host", "listen", "pid"}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from ..errors import BackdoorsError
from .config import AgentConfig
from .daemon import Agent
from .hardening import OwnCgroup, harden

log = logging.getLogger("backdoors.agent")


def run_agent(config: AgentConfig) -> int:
    """Run the agent daemon of `config` in this process until SIGTERM or SIGINT; the exit
    status (0, or 1 when it could not serve)."""
    for warning in harden():
        log.warning("%s", warning)
    own = OwnCgroup(config.own_cgroup)
    try:
        own.enter()
    except BackdoorsError as e:
        print(f"backdoors agent: cannot enter its cgroup {config.own_cgroup!r}: {e}",
              file=sys.stderr)
        return 1
    stuck = 0
    try:
        stuck = asyncio.run(_serve(config))
        rc = 0
    except BackdoorsError as e:
        print(f"backdoors agent: {e}", file=sys.stderr)
        rc = 1
    finally:
        try:
            own.leave()
        except BackdoorsError as e:
            log.warning("%s", e)
    if stuck:  # worker threads blocked in the kernel would hold up interpreter exit
        log.warning("%d operations still stuck at exit; exiting without waiting for them", stuck)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


async def _serve(config: AgentConfig) -> int:
    agent = Agent(config)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = agent.address
    ready = {"event": "ready", "host": config.host, "pid": os.getpid(),
             "listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    if agent.metrics_server is not None:
        ready["metrics"] = agent.metrics_server.url_host
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await agent.stop()
    return agent.stuck_ops()

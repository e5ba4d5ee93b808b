"""A monitor's reads of a healthy node while keyless clients and a hostile node attack
the agent (issue 10, findings 5 and 9), against the same reads without the attack (JSON).

One agent (in-process, on 127.0.0.1) serves two nodes: n1 runs a service with a Sensor
Box, n0 is hostile. A monitor polls n0 as it polls every node (two threads), and we time
its reads of n1: `sensors` on a kept connection, and `ping` on a new connection each time
(what a restarted monitor does). Then the attack: 64 keyless connections from 64 source
addresses, silent and reopened as soon as the agent closes them, and n0 registering 64
Sensor Boxes whose generation it leaves odd (no copy ever settles). Root (cgroups).

    python bench/bench_dos.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from backdoors.agent import AgentClient, AgentConfig, BackgroundAgent, Identity, NodeSpec, new_identity
from backdoors.agent.errors import AgentError
from backdoors.agent.keys import write_key_file
from backdoors.common.runtime import AGENT_SOCKET_ENV
from backdoors.nodes import Node
from backdoors.nodes.cgroups import reap
from backdoors.scenarios.flood import KeylessFlood, loopback_addresses

APP = """
import sys, time
from backdoors.sensors import SensorBox
from backdoors.common.runtime import register_box
box = SensorBox.create("app")
tick = box.progress("tick", deadline=1.0)
register_box(box)
print("ready", flush=True)
while True:
    tick.tick()
    time.sleep(0.01)
"""

STUCK = """
import sys, time
from backdoors.sensors import SensorBox, abi
from backdoors.common.runtime import register_box
boxes = []
for i in range(int(sys.argv[1])):
    box = SensorBox.create(f"stuck{i}")
    box.progress("tick", deadline=1.0)
    register_box(box)
    box._words[abi.OFF_GENERATION // 8] |= 1  # a writer that never finishes
    boxes.append(box)
print("ready", flush=True)
time.sleep(3600)
"""


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def _measure(agent, me: Identity, agent_key: Identity, seconds: float) -> dict:
    sensors_ms, connect_ms, errors = [], [], {}
    kept = AgentClient(agent.address, me, agent_key.id, agent_key.public, timeout=5)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        try:
            t = time.perf_counter()
            kept.sensors("n1")
            sensors_ms.append((time.perf_counter() - t) * 1000)
            if i % 4 == 0:
                t = time.perf_counter()
                with AgentClient(agent.address, me, agent_key.id, agent_key.public,
                                 timeout=5) as fresh:
                    fresh.ping()
                connect_ms.append((time.perf_counter() - t) * 1000)
        except AgentError as e:
            errors[e.code] = errors.get(e.code, 0) + 1
        time.sleep(0.005)
    kept.close()
    return {"sensors": len(sensors_ms), "sensors_p50_ms": _pct(sensors_ms, 0.5),
            "sensors_p99_ms": _pct(sensors_ms, 0.99),
            "new_connection_pings": len(connect_ms),
            "new_connection_p50_ms": _pct(connect_ms, 0.5),
            "new_connection_p99_ms": _pct(connect_ms, 0.99), "errors": errors}


def _poll_hostile(agent, me: Identity, agent_key: Identity, stop: threading.Event, seen: dict):
    with AgentClient(agent.address, me, agent_key.id, agent_key.public, timeout=5) as c:
        while not stop.is_set():
            try:
                reply = c.sensors("n0")
                seen["skipped"] = max(seen.get("skipped", 0), len(getattr(reply, "skipped", ())))
            except AgentError as e:
                seen[e.code] = seen.get(e.code, 0) + 1
            stop.wait(0.02)


def run(*, seconds: float = 3.0, stuck_boxes: int = 64, connections: int = 64) -> dict:
    prefix = f"bdb-{uuid.uuid4().hex[:6]}"
    tmp = tempfile.mkdtemp(prefix="bdb-", dir="/tmp")
    keys = {"m1": new_identity("m1"), "m2": new_identity("m2")}
    agent_key = new_identity("h0")
    write_key_file(f"{tmp}/agent-h0.key", agent_key)
    nodes = {n: Node.create(n, f"{prefix}/{n}") for n in ("n0", "n1")}
    config = AgentConfig(host="h0", listen="127.0.0.1:0", run_dir=f"{tmp}/run",
                         audit_log=f"{tmp}/audit.jsonl", cgroup=f"{prefix}-agent",
                         monitors={m: k.public_text() for m, k in keys.items()},
                         key_file=f"{tmp}/agent-h0.key",
                         nodes=[NodeSpec(n, f"{prefix}/{n}", isolation="trusted")
                                for n in nodes])
    agent = BackgroundAgent(config).start()
    procs: list[subprocess.Popen] = []

    def start(node: str, script: str, *args: str) -> None:
        env = dict(os.environ, **{AGENT_SOCKET_ENV: agent.agent.socket_path(node)})
        p = nodes[node].run([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline().strip() == b"ready"

    out: dict = {"seconds_per_condition": seconds, "stuck_boxes": stuck_boxes,
                 "keyless_connections": connections, "config": {
                     k: getattr(config, k, None) for k in (
                         "max_connections", "max_unauthenticated",
                         "max_unauthenticated_per_address", "auth_timeout_s",
                         "op_deadline_s")}}
    try:
        start("n1", APP)
        stop, hostile = threading.Event(), {}
        pollers = [threading.Thread(target=_poll_hostile,
                                    args=(agent, keys["m2"], agent_key, stop, hostile))
                   for _ in range(2)]
        for t in pollers:
            t.start()
        try:
            _measure(agent, keys["m1"], agent_key, 0.3)  # warm up
            out["baseline"] = _measure(agent, keys["m1"], agent_key, seconds)
            start("n0", STUCK, str(stuck_boxes))
            with KeylessFlood(agent.address, connections,
                              loopback_addresses(connections), connect_timeout=1) as flood:
                out["attack"] = _measure(agent, keys["m1"], agent_key, seconds)
            out["attack"]["keyless_opened"] = flood.opened
            out["attack"]["keyless_closed_by_agent"] = flood.closed_by_agent
        finally:
            stop.set()
            for t in pollers:
                t.join(10)
        out["attack"]["hostile_node_polls"] = hostile
        b, a = out["baseline"], out["attack"]
        for what in ("sensors_p50_ms", "sensors_p99_ms", "new_connection_p99_ms"):
            if a[what] is not None and b[what]:
                out[f"ratio_{what}"] = round(a[what] / b[what], 2)
    finally:
        agent.stop()
        for p in procs:
            p.kill()
            p.wait(5)
            p.stdout.close()
        for n in nodes.values():
            n.destroy()
        reap(prefix)  # the nodes' parent and the agent's cgroups, in every hierarchy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per condition")
    a = ap.parse_args(argv)
    print(json.dumps(run(seconds=a.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Availability: the agent daemon keeps answering while its nodes are frozen, out of memory
or fork-bombed. Measured from a monitor's side (round trip), printed as JSON (-s)."""

import json
import statistics
import time

import pytest
from test_agent_support import agent_lab, daemon, prefix, wait_for
from test_nodes_support import FORK_BOMB

from backdoors.agent.errors import DeadlineError
from backdoors.sensors import parse_box

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root

MiB = 1 << 20
DEADLINE_S = 1.0
ROUNDS = 150

# Forks a child that allocates until the OOM killer ends it, forever: a node stuck at its
# memory limit.
OOM_LOOP = """
import os
while True:
    pid = os.fork()
    if pid == 0:
        chunks = []
        while True:
            chunks.append(bytearray(1 << 20))
    os.waitpid(pid, 0)
"""


def _measure(client, node: str) -> dict:
    """Round-trip milliseconds of ping, a 64-byte region read and sensors() on `node`."""
    times: dict[str, list[float]] = {"ping": [], "read": [], "sensors": []}
    calls = {"ping": client.ping, "read": lambda: client.read(node, "app", 0, 64),
             "sensors": lambda: client.sensors(node)}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
        time.sleep(0.002)
    return {name: {"p50_ms": round(statistics.median(v), 3),
                   "p99_ms": round(sorted(v)[int(len(v) * 0.99) - 1], 3),
                   "max_ms": round(max(v), 3)} for name, v in times.items()}


def _kernel(client, node: str) -> dict[str, float]:
    return {s.name: s.value for s in parse_box(client.sensors(node).boxes["kernel"]).sensors}


def _within_deadline(name: str, fn):
    """Either an answer or a deadline error, and in either case within the deadline + slack."""
    start = time.perf_counter()
    try:
        fn()
        got = "an answer"
    except DeadlineError:
        got = "its deadline error"
    elapsed = time.perf_counter() - start
    assert elapsed < DEADLINE_S + 0.5, f"{name}: {got} took {elapsed:.3f} s"
    return elapsed


def test_the_agent_answers_while_nodes_are_frozen_oom_and_fork_bombed(agent_lab):
    lab = agent_lab(nodes={"frozen": {}, "oom": {"memory_limit": 64 * MiB},
                           "bomb": {"pids_limit": 64}}, start=False, op_deadline_s=DEADLINE_S)
    results = {}
    with daemon(lab):
        for node in lab.nodes:
            lab.start_app(node)
        c = lab.client()
        results["idle"] = _measure(c, "frozen")

        lab.nodes["frozen"].lock()
        results["frozen"] = _measure(c, "frozen")
        assert c.status("frozen").stats.frozen

        lab.run("oom", OOM_LOOP)
        kernel = lambda: _kernel(c, "oom")  # noqa: E731
        wait_for(lambda: kernel()["oom_kills"] >= 2, timeout=30, what="OOM kills in the node")
        results["memory_hog"] = _measure(c, "oom")
        wait_for(lambda: kernel()["memory_mb"] > 48, what="memory near the 64 MiB limit")

        lab.run("bomb", FORK_BOMB)
        bomb_kernel = lambda: _kernel(c, "bomb")  # noqa: E731
        wait_for(lambda: bomb_kernel()["fork_failures"] > 1000, timeout=30, what="a wedged node")
        results["fork_bomb"] = _measure(c, "bomb")
        assert bomb_kernel()["pids"] == 64
        # Ops that read /proc and cgroupfs answer (or report their deadline) in time too.
        slow = {name: round(_within_deadline(name, fn) * 1000, 3) for name, fn in (
            ("status", lambda: c.status("bomb")), ("processes", lambda: c.processes("bomb")),
            ("nodes", c.nodes))}
        results["fork_bomb_other_ops_ms"] = slow
        # And a repair under the bomb: lock, kill everything, unlock.
        start = time.perf_counter()
        c.lock("bomb", 5.0)
        killed = c.kill_node("bomb")
        results["fork_bomb_repair_ms"] = round((time.perf_counter() - start) * 1000, 3)
        assert len(killed) >= 60 and lab.nodes["bomb"].cgroup.procs() == []
        lab.nodes["frozen"].unlock()
    print(json.dumps({"agent_availability": results}, indent=1))
    for condition in ("idle", "frozen", "memory_hog", "fork_bomb"):
        for op, stats in results[condition].items():
            assert stats["max_ms"] < DEADLINE_S * 1000, (condition, op, stats)

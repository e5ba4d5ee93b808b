"""The kernel sampler reads a node's process table when its processes, tasks or memory
move, and only every TABLE_IDLE_S while they stand still (here an hour: no timing
involved)."""

import subprocess
import sys

import pytest
from test_nodes_support import prefix, wait_for

from backdoors.agent import sampler as sampler_mod
from backdoors.agent.config import KernelSensorLimits
from backdoors.agent.sampler import NodeSampler
from backdoors.nodes import Node

__all__ = ["prefix"]  # the fixture, imported for pytest
pytestmark = pytest.mark.root

GROW = ("import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        "b = bytearray(8 << 20)\nsys.stdin.readline()\n")


def test_the_table_is_read_again_when_tasks_or_memory_move_and_not_while_still(prefix, monkeypatch):
    monkeypatch.setattr(sampler_mod, "TABLE_IDLE_S", 3600.0)
    node = Node.create("n", prefix, pids_limit=64, memory_limit=256 << 20)
    s = NodeSampler(node, KernelSensorLimits(), period=0.05, max_procs=64,
                    on_new_box=lambda box: None)
    sleeper = grower = None
    try:
        sleeper = node.run(["sleep", "60"])
        wait_for(lambda: open(f"/proc/{sleeper.pid}/comm").read() == "sleep\n",
                 what="sleep to start")  # exec'd: its memory stands still
        first = s.sample_once().table
        assert [p.pid for p in first] == [sleeper.pid]
        assert s.sample_once().table is first  # nothing moved: not read again

        grower = node.run([sys.executable, "-c", GROW], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
        assert grower.stdout.readline() == b"ready\n"  # started: its memory stands still
        # a task more: read again as soon as a table is due (at most a TABLE_DUTY share of
        # the sampler's time: under load, a few samples later)
        second = wait_for(lambda: (t := s.sample_once().table) is not first and t,
                          what="the table read again")
        assert {p.pid for p in second} == {sleeper.pid, grower.pid}
        assert s.sensors.forks.value >= 1
        assert s.sample_once().table is second

        before = node.cgroup.memory_usage()
        grower.stdin.write(b"\n")
        grower.stdin.flush()
        wait_for(lambda: node.cgroup.memory_usage() >= before + (4 << 20), what="the allocation")
        # memory moved, the same tasks: read again (once due)
        third = wait_for(lambda: (t := s.sample_once().table) is not second and t,
                         what="the table read again")
        assert {p.pid for p in third} == {sleeper.pid, grower.pid}
    finally:
        s.close()
        for proc in (sleeper, grower):
            if proc is not None:
                proc.kill()
                proc.wait()
        node.destroy()


def test_a_process_replaced_by_another_is_read_and_counted_as_a_fork(prefix, monkeypatch):
    """The same task count and memory, another process: the pids differ, so the table is
    read again at once and the new process counted (a pool that replaces its workers
    forks at the rate it replaces them)."""
    monkeypatch.setattr(sampler_mod, "TABLE_IDLE_S", 3600.0)
    node = Node.create("n", prefix, pids_limit=64, memory_limit=256 << 20)
    s = NodeSampler(node, KernelSensorLimits(), period=0.05, max_procs=64,
                    on_new_box=lambda box: None)
    procs = []
    try:
        for _ in range(3):
            if procs:
                procs[-1].kill()
                procs[-1].wait()
            procs.append(node.run(["sleep", "60"]))
            wait_for(lambda: open(f"/proc/{procs[-1].pid}/comm").read() == "sleep\n",
                     what="sleep to start")
            wait_for(lambda: node.cgroup.procs("pids") == [procs[-1].pid],
                     what="only the new sleeper in the node")
            forks = s.sensors.forks.value if s.sensors else 0
            wait_for(lambda: [p.pid for p in s.sample_once().table] == [procs[-1].pid],
                     what="the table read again (once due)")
            if len(procs) > 1:
                assert s.sensors.forks.value == forks + 1
    finally:
        s.close()
        for proc in procs:
            proc.kill()
            proc.wait()
        node.destroy()

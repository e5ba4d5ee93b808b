"""Nodes: processes in their own cgroup (memory, pids, freezer, cpu) and, optionally, netns.

The kernel-facing leaf the agent acts through. Cgroup v1/v2 differences (hybrid and unified
layouts, detected at run time) stay behind `Cgroup`; `Node` adds a name, the netns, and the
remote access hooks: run inside, lock (freeze), kill a process, a tree or all, limits, stats.
"""

from backdoors.nodes.cgroups import Cgroup, reap
from backdoors.nodes.hierarchies import Layout, detect
from backdoors.nodes.node import KEEP, Node, NodeStats
from backdoors.common.procs import ProcessInfo, read_process
from backdoors.nodes.proctable import process_table, subtree

__all__ = [
    "KEEP",
    "Cgroup",
    "Layout",
    "Node",
    "NodeStats",
    "ProcessInfo",
    "detect",
    "process_table",
    "read_process",
    "reap",
    "subtree",
]

"""What the agent keeps per served node, and the worker lanes its blocking ops run on.

Below the daemon, the RPC server, the ops and the metrics, which all speak of nodes and
lanes: none of them needs the daemon for it.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

from ..nodes import Node
from ..vm.guard import GuestWatch
from .backoff import BoxBackoff
from .config import NodeSpec
from .sampler import NodeSampler
from .tracking import BoxTracking


@dataclass
class Lane:
    """Workers for blocking ops, and how many of them are stuck past a deadline."""

    name: str
    workers: int
    stuck: int = 0
    misses: int = 0
    pool: concurrent.futures.ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers,
                                                          thread_name_prefix=f"bd-{self.name}")


READ_WORKERS = 2  # per node, for its region copies (the sensors op)


@dataclass(eq=False)
class NodeRuntime:
    """A served node and what the agent keeps for it: `lane` for its /proc and cgroupfs
    ops, `reads` for copies of its regions (so one node's boxes cannot make another's
    reads wait), the back-off of its failing Sensor Boxes and what it tracks of them."""

    spec: NodeSpec
    node: Node
    sampler: NodeSampler
    lane: Lane
    reads: Lane = field(init=False)
    boxes: BoxBackoff = field(init=False, default_factory=BoxBackoff)
    tracking: BoxTracking = field(init=False, default_factory=BoxTracking)
    guest: GuestWatch | None = None  # a VM node's guest kernel box and integrity (vm/guard.py)

    def __post_init__(self) -> None:
        self.reads = Lane(f"{self.spec.name}:memory", READ_WORKERS)

    @property
    def name(self) -> str:
        return self.spec.name

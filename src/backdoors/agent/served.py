"""What the agent keeps per served node, and the worker lanes its blocking ops run on.

Below the daemon, the RPC server, the ops and the metrics, which all speak of nodes and
lanes: none of them needs the daemon for it.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
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

    def submit(self, fn, *args) -> tuple[concurrent.futures.Future, Running]:
        """fn(*args) on a worker, and a handle that tells, while it runs, where it is."""
        running = Running(time.monotonic())
        return self.pool.submit(running.run, fn, *args), running


@dataclass
class Running:
    """A call submitted to a lane: when, and once a worker took it, which thread has it."""

    submitted: float
    started: float | None = None
    thread: int | None = None

    def run(self, fn, *args):
        self.started, self.thread = time.monotonic(), threading.get_ident()
        try:
            return fn(*args)
        finally:
            self.thread = None

    def where(self) -> str:
        """How long it waited for a worker and where it is now: its innermost frame and,
        when that is not in our code, the innermost one that is (what an abandoned op
        was stuck in)."""
        if self.started is None:
            return "waiting for a worker"
        frame = sys._current_frames().get(self.thread) if self.thread is not None else None
        spots = []
        while frame is not None and len(spots) < 2:
            ours = frame.f_code.co_filename.startswith(_OURS)
            if not spots or ours:
                path = frame.f_code.co_filename
                path = os.path.relpath(path, _OURS) if ours else os.path.basename(path)
                spots.append(f"{frame.f_code.co_name} ({path}:{frame.f_lineno})")
                if ours:
                    break
            frame = frame.f_back
        return (f"waited {self.started - self.submitted:.2f} s for a worker; "
                f"at {' in '.join(spots) or 'its return'}")


_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the backdoors package


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

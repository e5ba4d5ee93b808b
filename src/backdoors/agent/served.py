"""What the agent keeps per served node, and the worker lanes its blocking ops run on.

Below the daemon, the RPC server, the ops and the metrics, which all speak of nodes and
lanes: none of them needs the daemon for it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
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


class FairPool(concurrent.futures.Executor):
    """`workers` threads (started as needed) that take queued calls by turns of their
    submitters (`submit_as`): one signer's many requests wait behind each other's, not
    in front of every other signer's (a stolen key looping slow ops on a node would take
    its workers from the monitors' kills). Daemon threads: a call stuck in the kernel
    does not keep the process from exiting."""

    def __init__(self, workers: int, prefix: str):
        self.workers, self.prefix = workers, prefix
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque] = {}  # submitter -> its calls, in order
        self._turns: collections.deque[str] = collections.deque()  # submitters with calls
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a call
        self._queued = 0  # calls waiting for a worker
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        return self.submit_as("", functools.partial(fn, *args, **kwargs))

    def submit_as(self, who: str, fn, *args) -> concurrent.futures.Future:
        """fn(*args) in `who`'s turn."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if (queue := self._queues.get(who)) is None:
                queue = self._queues[who] = collections.deque()
                self._turns.append(who)
            queue.append((future, fn, args))
            self._queued += 1
            # (an idle worker counts as idle until it wakes: more calls than idle workers
            # start one, not only when none is idle)
            if self._queued > self._idle and len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self.prefix}_{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._turns and not self._shutdown:
                    self._cond.wait()
                self._idle -= 1
                if not self._turns:
                    return  # shut down
                who = self._turns.popleft()
                queue = self._queues[who]
                future, fn, args = queue.popleft()
                self._queued -= 1
                if queue:
                    self._turns.append(who)  # its next call: after the others' turns
                else:
                    del self._queues[who]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - the caller's to see
                future.set_exception(e)
            else:
                future.set_result(result)
            del future, fn, args

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for queue in self._queues.values():
                    for future, _, _ in queue:
                        future.cancel()
                self._queues.clear()
                self._turns.clear()
                self._queued = 0
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


@dataclass
class Lane:
    """Workers for blocking ops, taken by turns of their signers, and how many of them
    are stuck past a deadline."""

    name: str
    workers: int
    stuck: int = 0
    misses: int = 0
    pool: FairPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = FairPool(self.workers, f"bd-{self.name}")

    def submit(self, fn, *args, who: str = "") -> tuple[concurrent.futures.Future, Running]:
        """fn(*args) on a worker in `who`'s turn, and a handle that tells, while it runs,
        where it is."""
        running = Running(time.monotonic())
        return self.pool.submit_as(who, running.run, fn, *args), running


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

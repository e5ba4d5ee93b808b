"""Reads of /proc/PID/cmdline, off the node's workers and under a time budget.

Such a read waits for the process's memory map lock, which a process holds through each
of its forks. Of a running fork bomb's processes (256, in a cgroup of their own, on this
2-core machine) a read of /proc/PID/cmdline waited up to 16 s, when /proc/PID/stat took
12 ms for all of them (measured). An op that read them in line held the node's workers
for seconds ("all 2 workers of n0 are stuck"), exactly while the node needed repair.

`MmReads` runs them on daemon threads of its own. An op hands over the reads it needs
and waits at most its budget; a read not done by then leaves its row empty (the
`processes` op gives "" and []) and goes on, filling the caches of `common.procs` for
the next table. At most `max_pending` reads wait at once; beyond, none is queued. Frozen
processes hold no lock: a repair's table, taken with the node locked, gets every read.
The threads start at the first read, not before: the sealed agent confines itself
before it starts any thread (agent/sealing.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future

log = logging.getLogger("backdoors.agent")

WORKERS = 2
MAX_PENDING = 256


class MmReads:
    def __init__(self, workers: int = WORKERS, max_pending: int = MAX_PENDING):
        self.workers, self.max_pending = workers, max_pending
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._started = False
        self.dropped = 0  # reads not queued: too many waiting

    def run(self, jobs: dict[Hashable, Callable[[], object]], budget_s: float
            ) -> dict[Hashable, object]:
        """Run `jobs`; the results of those done within `budget_s` seconds."""
        with self._lock:
            if not self._started:
                self._started = True
                for i in range(self.workers):
                    threading.Thread(target=self._work, name=f"bd-mmread-{i}",
                                     daemon=True).start()
        futures = {}
        for key, fn in jobs.items():
            with self._lock:
                if self._pending >= self.max_pending:
                    self.dropped += 1
                    continue
                self._pending += 1
            future: Future = Future()
            self._queue.put((fn, future))
            futures[key] = future
        end = time.monotonic() + budget_s
        done = {}
        for key, future in futures.items():
            try:
                done[key] = future.result(max(0.0, end - time.monotonic()))
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 - a read that failed is a row left empty
                log.debug("mm read failed: %s", e)
        return done

    def _work(self) -> None:
        while True:
            fn, future = self._queue.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                future.set_exception(e)
            finally:
                with self._lock:
                    self._pending -= 1

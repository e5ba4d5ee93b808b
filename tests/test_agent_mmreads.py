"""The agent's reads that may wait (agent/mmreads.py): an op gets what is done within its
budget, a read that waits does not hold it, and the waiting reads are bounded."""

import threading
import time

from backdoors.agent.mmreads import MmReads


def test_an_op_gets_what_is_done_within_its_budget_and_a_waiting_read_goes_on():
    reads = MmReads(workers=2)
    release, finished = threading.Event(), threading.Event()

    def waits():
        release.wait(10)
        finished.set()
        return "late"

    t0 = time.monotonic()
    got = reads.run({"slow": waits, "fast": lambda: "now", "bad": lambda: 1 / 0}, 0.2)
    assert got == {"fast": "now"}  # the failed read is a row left empty
    assert time.monotonic() - t0 < 5  # the budget, not the read, ended the wait
    release.set()
    assert finished.wait(5)  # the read went on


def test_reads_beyond_max_pending_are_not_queued():
    reads = MmReads(workers=1, max_pending=2)
    release = threading.Event()
    try:
        got = reads.run({i: (lambda: release.wait(10)) for i in range(4)}, 0.05)
        assert got == {} and reads.dropped == 2
    finally:
        release.set()
    end = time.monotonic() + 5
    while reads.run({"x": lambda: "ok"}, 0.5) != {"x": "ok"}:  # the queue drains
        assert time.monotonic() < end

"""The agent's worker lanes: calls taken by turns of their signers (agent/served.py)."""

import threading

import pytest

from backdoors.agent.served import FairPool, Lane


def test_one_signers_queue_waits_behind_each_others_call():
    """Outside review: a stolen monitor key looping slow ops on a node filled its lane's
    queue, and another monitor's kill waited behind all of them (and failed `busy` or
    `deadline`). Calls are taken by turns: the other's comes after at most one more."""
    pool = FairPool(1, "t")
    started, release, ran = threading.Event(), threading.Event(), []

    def call(name):
        started.set()
        release.wait(10)
        ran.append(name)

    try:
        futures = [pool.submit_as("m1", call, "m1-0")]
        assert started.wait(10)  # running: the others queue behind it
        futures += [pool.submit_as("m1", call, f"m1-{i}") for i in range(1, 5)]
        futures.append(pool.submit_as("m2", call, "m2"))
        futures.append(pool.submit(call, "probe"))  # (the watchdog's: a turn of its own)
        release.set()
        for f in futures:
            f.result(10)
        assert ran == ["m1-0", "m1-1", "m2", "probe", "m1-2", "m1-3", "m1-4"]
    finally:
        pool.shutdown()


def test_a_call_cancelled_while_queued_never_runs_and_errors_reach_the_caller():
    pool = FairPool(1, "t")
    gate = threading.Event()
    try:
        first = pool.submit_as("a", gate.wait, 10)
        dropped = pool.submit_as("a", lambda: pytest.fail("a cancelled call ran"))
        failing = pool.submit_as("b", lambda: 1 / 0)
        assert dropped.cancel()
        gate.set()
        assert first.result(10) is True
        with pytest.raises(ZeroDivisionError):
            failing.result(10)
    finally:
        pool.shutdown()


def test_shutdown_cancels_what_is_queued_and_refuses_more():
    lane = Lane("t", 2)
    gate, started = threading.Event(), threading.Semaphore(0)

    def hold():
        started.release()
        return gate.wait(10)

    running = [lane.submit(hold, who="a")[0] for _ in range(2)]
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    queued, _ = lane.submit(gate.wait, 10, who="b")
    lane.pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        lane.submit(gate.wait, 10)
    gate.set()
    assert all(f.result(10) is True for f in running)
    assert len(lane.pool._threads) == 2  # no more than its workers


def test_calls_submitted_at_once_get_every_free_worker():
    """Outside review: a worker counted as idle until it woke, so two calls submitted
    together to a pool with one idle worker started no second one: the second waited
    behind the first with a worker free."""
    pool = FairPool(4, "t")
    started, release = threading.Semaphore(0), threading.Event()

    def hold():
        started.release()
        release.wait(10)

    try:
        pool.submit_as("a", lambda: None).result(10)  # one worker, idle now
        calls = [pool.submit_as("a", hold), pool.submit_as("b", hold)]
        assert started.acquire(timeout=10) and started.acquire(timeout=10)  # both at once
        release.set()
        for f in calls:
            f.result(10)
    finally:
        release.set()
        pool.shutdown()

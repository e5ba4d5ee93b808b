"""Process table: /proc/PID/stat parsing, vanishing processes, subtrees."""

import os
import subprocess
import sys

import pytest

from backdoors.nodes import ProcessInfo, process_table, read_process, subtree
from backdoors.common.procs import (
    CLOCK_TICKS, PAGE_SIZE, parse_stat, unreaped_children, young_threads,
)

# A real stat line (Linux 6.x, 52 fields) whose comm contains spaces and parentheses.
STAT_WEIRD = (
    "4242 (a) b (c) d) S 4200 4242 4200 34816 4242 4194304 120 7 0 5 "
    "250 50 0 0 20 0 3 0 123456 18350080 2345 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 2 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
)


def test_parse_stat_comm_with_spaces_and_parens():
    info = parse_stat(STAT_WEIRD)
    assert info == ProcessInfo(
        pid=4242,
        ppid=4200,
        comm="a) b (c) d",
        state="S",
        rss_bytes=2345 * PAGE_SIZE,
        start_time=123456 / CLOCK_TICKS,
        cpu_seconds=300 / CLOCK_TICKS,
        threads=3,
        pgid=4242,
        child_faults=7 + 5,  # cminflt + cmajflt
    )


def test_parse_stat_rejects_garbage():
    with pytest.raises(ValueError):
        parse_stat("not a stat line")


def test_read_process_of_self_matches_kernel():
    info = read_process(os.getpid())
    assert info.pid == os.getpid()
    assert info.ppid == os.getppid()
    assert info.state in "RS"
    assert info.rss_bytes > 1 << 20
    assert info.threads >= 1
    assert 0 < info.start_time < float(open("/proc/uptime").read().split()[0]) + 1


def test_weird_comm_of_a_live_process():
    """A process renames itself (prctl PR_SET_NAME) to a comm with ') (' in it."""
    code = (
        "import ctypes, sys\n"
        "ctypes.CDLL(None).prctl(15, b'x) (y z)', 0, 0, 0)\n"
        "print('ok', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout.readline() == b"ok\n"
        info = read_process(child.pid)
        assert info.comm == "x) (y z)"
        assert info.ppid == os.getpid()
        assert info.state in "RS"
    finally:
        child.stdin.close()
        child.wait()


def test_vanished_processes_are_left_out():
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid is gone
    assert read_process(child.pid) is None
    table = process_table([os.getpid(), child.pid, os.getpid()])
    assert [p.pid for p in table] == [os.getpid()]


def _info(pid, ppid):
    return ProcessInfo(pid, ppid, "p", "S", 0, 0.0, 0.0, 1, pid)


def test_subtree_follows_ppid_links():
    table = [_info(1, 0), _info(10, 1), _info(11, 10), _info(12, 11), _info(20, 1), _info(13, 10)]
    assert subtree(table, 10) == {10, 11, 12, 13}
    assert subtree(table, 12) == {12}
    assert subtree(table, 99) == {99}
    assert subtree(table, 1) == {1, 10, 11, 12, 13, 20}


def test_young_threads_counts_the_threads_started_since_a_time():
    """Threads (not the first) started since a time, each read (not by thread id: ids
    wrap at pid_max, which a busy host reaches: seen under the whole suite); `max_reads`
    bounds the reads; a gone pid gives 0."""
    import threading
    import time

    hold = threading.Event()
    threads = []

    def start(n):
        for _ in range(n):
            t = threading.Thread(target=hold.wait)
            t.start()
            threads.append(t)

    try:
        start(3)
        time.sleep(0.3)
        between = time.clock_gettime(time.CLOCK_BOOTTIME)
        time.sleep(0.3)
        start(4)
        others = len(os.listdir(f"/proc/{os.getpid()}/task")) - 1
        assert young_threads(os.getpid(), between, 1000) == (4, others)
        assert young_threads(os.getpid(), between, 2)[1] == 2
        assert young_threads(os.getpid(), 0.0, 1000) == (others, others)
    finally:
        hold.set()
        for t in threads:
            t.join()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert young_threads(int(gone.stdout), 0.0, 100) == (0, 0)


def test_unreaped_children_are_the_children_not_among_the_live_ones():
    """A child that exited and was not reaped is listed as a child, not as a live
    process of the cgroup: `live` tells them apart. Children of every thread count."""
    import threading

    exited = []
    for _ in range(2):
        if (pid := os.fork()) == 0:
            os._exit(0)
        exited.append(pid)
    live_child = subprocess.Popen(["sleep", "30"])
    from_thread = []
    t = threading.Thread(target=lambda: from_thread.append(os.fork() or os._exit(0)))
    try:
        t.start()
        t.join()
        assert from_thread and from_thread[0] > 0
        children = [*exited, *from_thread]
        for pid in children:  # exited, not reaped: zombies
            assert _wait_state(pid, "Z")
        live = {os.getpid(), live_child.pid}
        assert unreaped_children(os.getpid(), live, 1000)[0] == 3
        assert unreaped_children(os.getpid(), live | set(children), 1000)[0] == 0
    finally:
        live_child.kill()
        live_child.wait()
        for pid in [*exited, *from_thread]:
            os.waitpid(pid, 0)


def _wait_state(pid, state, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = read_process(pid)
        if info is not None and info.state == state:
            return True
        time.sleep(0.01)
    return False


def test_a_row_of_an_agent_before_child_faults_decodes():
    """Outside review: `child_faults` was required, so a monitor could not read the
    process table of an agent not yet upgraded (every lineage and memory-hog diagnosis
    failed); it reads as 0, and `reaped_s` as None."""
    import msgspec

    from backdoors.agent.protocol import ProcessRow
    old = {"pid": 7, "ppid": 1, "comm": "p", "state": "S", "rss_bytes": 0, "start_time": 1.0,
           "cpu_seconds": 0.0, "threads": 1, "pgid": 7, "age_s": 2.0, "rss_rate": 0.0,
           "registered": False}
    row = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=ProcessRow)
    assert row.child_faults == 0 and row.reaped_s is None and row.age_s == 2.0

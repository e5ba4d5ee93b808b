"""Fixtures and workloads shared by the nodes tests (this module holds no tests).

Every test cgroup is named `bdt-<unique>...` and reaped at teardown, even on failure.
The test process is made a child subreaper for the test, so the orphans of killed node
processes come back to it and are waited for, instead of piling up as zombies under a PID 1
that does not reap (as in some sandboxes).
"""

import ctypes
import os
import sys
import time
from pathlib import Path

import pytest

from backdoors.nodes import reap, read_process

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

PY = sys.executable

# Increments a counter in a busy loop and stores it in the file argv[1].
COUNTER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
i = 0
while True:
    i += 1
    if i % 5000 == 0:
        os.pwrite(fd, b"%020d" % i, 0)
"""

# Forks short-lived children forever (a busy, forking service).
FORKER = """
import os
while True:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""

# Forks long-lived children forever, ignoring EAGAIN (grows until the pids limit).
SPAWNER = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""

# A fork bomb: every process forks forever.
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def wait_for(check, timeout=5.0, what="the condition"):
    """Poll `check()` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def read_counter(path: Path) -> int:
    text = path.read_bytes().strip(b"\0 ") if path.exists() else b""
    return int(text or 0)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead)."""
    info = read_process(pid)
    return info is not None and info.state not in ("Z", "X")


def _reap_own_orphans(since: float) -> None:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_process(int(entry))
            if info and info.ppid == me and info.state == "Z" and info.start_time >= since:
                try:
                    os.waitpid(info.pid, os.WNOHANG)
                except ChildProcessError:
                    pass


@pytest.fixture
def prefix(root, unique):
    """A unique cgroup name prefix `bdt-<unique>`; all cgroups under it are reaped after."""
    name = f"bdt-{unique}"
    since = time.clock_gettime(time.CLOCK_BOOTTIME) - 0.02
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield name
    finally:
        try:
            reap(name)
        finally:
            _reap_own_orphans(since)
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def require_freezer(freezer: str) -> None:
    """Skip a test of one freezer on a layout that does not have it (not a missing feature:
    a pure cgroup v2 machine has no v1 freezer by design)."""
    from backdoors.nodes import detect

    layout = detect()
    if freezer == "v1" and "freezer" not in layout.v1:
        pytest.skip(f"this layout has no v1 freezer: {layout.describe()}")
    if freezer == "v2" and layout.v2 is None:
        pytest.skip(f"this layout has no cgroup2 hierarchy: {layout.describe()}")

"""Shared test fixtures.

Tests that need root or a kernel feature use the `root` fixture (or `needs_root()`): on a
developer machine without root they are skipped with the reason; in CI (CI=true) a missing
capability is a failure, never a skip.
"""

import os
import uuid

import pytest
from leftovers import hold_runs_lock

from backdoors.common import fdtable

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUNS_LOCK = pytest.StashKey[int]()


def pytest_sessionstart(session) -> None:
    """The soft descriptor limit raised to the hard one, as the agent daemon raises its
    own (agent.hardening): agents run in this process (BackgroundAgent) share it, and
    a shell's 1,024 would cap their nodes' sessions (agent.descriptors) below what the
    tests hold. As root, what a killed run left is reaped first (leftovers). SIGTERM or
    SIGHUP (a CI timeout) stops the run as Ctrl-C would, so that the running test's labs,
    VMs and servers are torn down (left at the default, the run died at once and left
    them: a VM's QEMU ran on)."""
    from backdoors.cli import _Terminated

    _Terminated(lambda signum: KeyboardInterrupt(f"signal {signum}")).install()
    fdtable.raise_limit()
    if os.geteuid() == 0:
        session.config.stash[RUNS_LOCK] = hold_runs_lock()


def unavailable(reason: str) -> None:
    """Skip locally, fail loudly in CI."""
    if IN_CI:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


def needs_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (cgroups, namespaces, raw sockets)")


@pytest.fixture
def root():
    needs_root()


@pytest.fixture
def unique():
    """A short unique token for kernel object names (tests may run in parallel)."""
    return uuid.uuid4().hex[:6]

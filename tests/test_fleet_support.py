"""Fixtures shared by the fleet tests (this module holds no tests): a real etcd."""

import socket
import tempfile
import time

import pytest
from conftest import unavailable

from backdoors.fleet.process import EtcdProcess, available


def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (etcd's client and peer ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two free ports in a row")


@pytest.fixture
def etcd(unique):
    """A running single-member etcd of its own (stopped and its data removed after)."""
    if available() is None:
        unavailable("etcd is not installed (Debian: etcd-server; make system-deps)")
    proc = EtcdProcess(f"bdt-etcd-{unique}", tempfile.mkdtemp(prefix="bdt-etcd-", dir="/dev/shm"),
                       port=free_port_pair()).start()
    try:
        yield proc
    finally:
        proc.stop()


def etcd_required() -> None:
    """Skip locally, fail in CI, when etcd is not installed."""
    if available() is None:
        unavailable("etcd is not installed (Debian: etcd-server; make system-deps)")


def until(fn, timeout=20.0, what="condition", every=0.01, show=None):
    """fn()'s first true value; on timeout, AssertionError with `show()` (what was seen)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := fn()):
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"; saw {show()}" if show else ""))

"""The few system calls nodes need that Python 3.11 lacks or wraps awkwardly.

setns(2) through ctypes (os.setns arrived in 3.12), and pidfd helpers: a pidfd names one
process for its whole life, so signalling through it never hits a recycled pid.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import time

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace open at `fd` (setns(2))."""
    if _setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def pidfd_open(pid: int) -> int | None:
    """A pidfd for `pid`, or None when no such process exists."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def pidfd_signal(pidfd: int, sig: int) -> bool:
    """Send `sig` through a pidfd; False when the process has already exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    return True


def wait_exited(pidfds: list[int], timeout: float) -> bool:
    """Wait until every pidfd reports its process exited (readable); False on timeout."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    pending = set(pidfds)
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining < 0:
            return False
        for fd, _ in poller.poll(math.ceil(remaining * 1000)):
            pending.discard(fd)
            poller.unregister(fd)
    return True

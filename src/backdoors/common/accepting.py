"""accept(2)'s errors, for accept loops that must outlive them.

Linux reports some errors of the new connection itself from accept(2) (ECONNABORTED,
EPROTO and the network errors its man page lists): the next connection can be taken at
once. Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the connection
stays queued and the listening socket readable: a loop that retried at once would spin,
one that raised would stop serving for good (a flood of idle connections would take a
server down). `Pause` stops accepting for PAUSE_S instead, as asyncio's own servers do;
the sessions held go on, and those that end make room.
"""

from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger("backdoors.accept")

RETRY = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                   errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                   errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EINTR, errno.EAGAIN})
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_S = 0.1


class Pause:
    """When a listening socket `what` may be accepted from again. Logs once when
    accepting stops and once when it resumes, not on every retry."""

    def __init__(self, what: str):
        self.what = what
        self.until = 0.0  # time.monotonic()
        self.pauses = 0  # since accepting last worked
        self._since: float | None = None

    def absorb(self, err: OSError) -> bool:
        """Whether the loop goes on after `err` from accept(): at once (the connection's
        own error), or once `remaining()` is 0 (out of a resource). False: the socket
        itself failed; the caller raises."""
        if err.errno in RETRY:
            return True
        if err.errno not in EXHAUSTED:
            return False
        now = time.monotonic()
        self.until = now + PAUSE_S
        self.pauses += 1
        if self._since is None:
            self._since = now
            log.warning("%s: cannot accept (%s): new connections wait, retried every %.1f s",
                        self.what, err.strerror, PAUSE_S)
        return True

    def remaining(self) -> float:
        """Seconds until accept() may be tried again (0: now)."""
        return max(0.0, self.until - time.monotonic()) if self.until else 0.0

    def accepted(self) -> None:
        """An accept() worked."""
        if self._since is not None:
            log.warning("%s: accepting again after %.1f s (%d retries)", self.what,
                        time.monotonic() - self._since, self.pauses)
            self._since, self.pauses, self.until = None, 0, 0.0

"""Closing descriptors a node handed to the agent, without letting the node stall it.

close(2) of the last reference to a TCP socket with SO_LINGER set and unsent data blocks
for the linger time (up to years). A node can hand the agent such a socket (where a memfd
is expected, as a session socket, or queued unread on its registration connection) and
close its own copy. So the agent clears SO_LINGER on a socket before closing it, and does
the close itself on a thread of its own, never registration's or a request's.

A node can still stall a close: it sets the option again between the two (its own copy
closed right after), or hands a file of a FUSE mount it serves (each close asks its
daemon, which need never answer). A close that has taken STALL_S is left to its thread,
and a new thread closes the rest; at most MAX_STALLED threads are left so (a node that
stalls more holds up the closes from then on, and the agent logs it).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
import time

from ..common import ipc

log = logging.getLogger("backdoors.agent")

_NO_LINGER = struct.pack("ii", 0, 0)
DRAIN_READS = 64
STALL_S = 0.5  # a close this long is stalled (a linger time, a FUSE daemon): left to its thread
MAX_STALLED = 16  # threads left in a stalled close, at most


def defuse(fd: int) -> None:
    """Clear SO_LINGER if `fd` is a socket (so its last close returns at once). Told by
    the socket calls failing on anything else, not by fstat(2): that of a file on a FUSE
    mount the node serves waits for the node's daemon, for ever if it never answers."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    except OSError:
        pass
    finally:
        sock.detach()


def drain(sock: socket.socket) -> list[int]:
    """Descriptors still queued unread on a Unix socket (taken out so that closing the
    socket does not close them on the caller's thread)."""
    fds: list[int] = []
    space = socket.CMSG_SPACE(ipc.SCM_MAX_FD * 4)
    for _ in range(DRAIN_READS):  # a sender that keeps sending is not followed for ever
        try:
            data, ancdata, _, _ = sock.recvmsg(65536, space,
                                               socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return fds
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(ipc.fds_in(payload))
        if not data and not ancdata:
            return fds
    return fds


class Closer:
    """A thread that closes descriptors (sockets defused first); `close(fd)` queues one.
    A watchdog thread replaces it when a close stalls (STALL_S); idle, it only waits.

    The threads start with `start()` (the agent starts no thread before its seal's path
    part, agent/sealing.py); until then, and after `stop()`, a close is done at once."""

    def __init__(self, name: str = "bd-agent-closer"):
        self.name = name
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._stopped = False
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None  # the one taking from the queue
        self._closing = 0  # its close in progress (a sequence number), 0: none
        self._since = 0.0  # when that close began (monotonic)
        self._closes = 0
        self._watching = False  # the watchdog waits on a close (not idle)
        self._stalled = 0  # threads left in a stalled close
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)

    @property
    def stalled(self) -> int:
        """Threads left in a close that stalled, and not back from it yet."""
        with self._cond:
            return self._stalled

    def start(self) -> None:
        with self._cond:
            self._replace()
        self._watchdog.start()

    def close(self, fd: int) -> None:
        """Close `fd` soon, off the caller's thread (the caller must not use it again)."""
        if self._stopped or self._worker is None:  # nothing served yet, or any more
            defuse(fd)
            os.close(fd)
        else:
            self._queue.put(fd)  # (defused there, right before its close)

    def close_socket(self, sock: socket.socket) -> None:
        """Close a socket object the same way, and the descriptors queued unread on it."""
        if sock.fileno() < 0:
            return
        if sock.family == socket.AF_UNIX:
            for queued in drain(sock):
                self.close(queued)
        self.close(sock.detach())

    def stop(self) -> None:
        """Close what is queued, then end the threads (without waiting for a stalled close:
        what is queued behind it stays open)."""
        with self._cond:
            self._stopped = True
            worker = self._worker
            self._cond.notify_all()
        if worker is not None:
            self._queue.put(None)
            worker.join(1.0)
        if self._watchdog.is_alive():
            self._watchdog.join(1.0)

    def _replace(self) -> None:
        """A new worker takes the queue (the old one, if any, is left to its close)."""
        self._worker = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._closing = 0
        self._worker.start()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            fd = self._queue.get()
            if fd is None:
                return
            defuse(fd)  # here, not when queued: the node could set it again in between
            with self._cond:
                self._closes += 1
                self._closing, self._since = self._closes, time.monotonic()
                if not self._watching:
                    self._cond.notify_all()
            try:
                os.close(fd)
            except OSError as e:
                log.warning("closing a node's descriptor %d: %s", fd, e.strerror)
            with self._cond:
                if self._worker is not me:  # it stalled and was replaced: back, it ends
                    self._stalled -= 1
                    self._cond.notify_all()
                    return
                self._closing = 0

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                closing = self._closing
                self._watching = closing != 0
                if not closing:
                    self._cond.wait()
                    continue
                stalled_at = self._since + STALL_S  # (woken early by a stalled one back)
                if self._cond.wait_for(lambda: self._stopped or self._closing != closing,
                                       stalled_at - time.monotonic()):
                    continue
                if self._stalled >= MAX_STALLED:  # (held up until one of them is back)
                    log.error("closing node descriptors: %d closes stalled (a node's "
                              "SO_LINGER set again, or its FUSE daemon silent); the next "
                              "waits for one of them", self._stalled + 1)
                    while self._stalled >= MAX_STALLED and not self._stopped:
                        self._cond.wait()
                    continue
                self._stalled += 1
                log.warning("closing a node's descriptor stalled for %.1f s (its SO_LINGER "
                            "set again, or a FUSE daemon silent): left to its thread, "
                            "%d so far", STALL_S, self._stalled)
                self._replace()

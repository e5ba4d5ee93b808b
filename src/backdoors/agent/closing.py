"""Closing descriptors a node handed to the agent, without letting the node stall it.

close(2) of the last reference to a TCP socket with SO_LINGER set and unsent data blocks
for the linger time (up to years). A node can hand the agent such a socket (where a memfd
is expected, as a session socket, or queued unread on its registration connection) and
close its own copy. So the agent clears SO_LINGER on a socket before closing it, and does
the close itself on a thread of its own: a node that sets the option again in between
stalls that thread, never registration or requests.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading

from ..common import ipc

log = logging.getLogger("backdoors.agent")

_NO_LINGER = struct.pack("ii", 0, 0)
DRAIN_READS = 64


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

    The thread starts with `start()` (the agent starts no thread before its seal's path
    part, agent/sealing.py); until then, and after `stop()`, a close is done at once."""

    def __init__(self, name: str = "bd-agent-closer"):
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, fd: int) -> None:
        """Close `fd` soon, off the caller's thread (the caller must not use it again)."""
        if self._stopped or not self._thread.is_alive():  # nothing served yet, or any more
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
        """Close what is queued, then end the thread (without waiting for a stalled close)."""
        self._stopped = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(1.0)

    def _run(self) -> None:
        while True:
            fd = self._queue.get()
            if fd is None:
                return
            defuse(fd)  # here, not when queued: the node could set it again in between
            try:
                os.close(fd)
            except OSError as e:
                log.warning("closing a node's descriptor %d: %s", fd, e.strerror)

"""Closing descriptors a node handed to the agent, without letting the node stall it.

close(2) of the last reference to a TCP socket with SO_LINGER set and unsent data blocks
for the linger time (up to years). A node can hand the agent such a socket (where a memfd
is expected, as a session socket, or queued unread on its registration connection) and
close its own copy. So the agent clears SO_LINGER on a socket before closing it, and does
the close itself on a thread of its own, never registration's or a request's.

A node can still stall a close: it sets the option again between the two (its own copy
closed right after), or hands a file of a FUSE mount it serves (each close asks its
daemon, which need never answer). So each node's descriptors are closed in a lane of
their own, by a thread of the lane's: a node that stalls its closes holds up its own, no
other node's. A close that has taken STALL_S is left to its thread and a new one takes
the lane's next, up to MAX_STALLED_PER_NODE threads so left per node and MAX_STALLED in
all; past either, that node's next closes wait until a stalled one ends.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from ..common import ipc

log = logging.getLogger("backdoors.agent")

_NO_LINGER = struct.pack("ii", 0, 0)
DRAIN_READS = 64
STALL_S = 0.5  # a close this long is stalled (a linger time, a FUSE daemon): left to its thread
MAX_STALLED_PER_NODE = 4  # threads left in a stalled close of one node's, at most
MAX_STALLED = 64  # and of all nodes'
IDLE_S = 1.0  # a lane's thread with nothing to close ends after this
_STOP = -1  # queued by stop(): the lane's thread ends once what was queued before is closed


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


@dataclass(eq=False)
class _Lane:
    """One node's closes: its queue, the thread taking from it, the close in progress."""

    queue: queue.SimpleQueue[int] = field(default_factory=queue.SimpleQueue)
    worker: threading.Thread | None = None
    closing: int = 0  # the close in progress (a sequence number), 0: none
    since: float = 0.0  # when it began (monotonic)
    stalled: int = 0  # threads left in a stalled close of this lane's
    held: bool = False  # its close stalled past the caps: waits for a stalled one back


class Closer:
    """Closes descriptors (sockets defused first) off the caller's thread, in a lane per
    node; `close(node, fd)` queues one. A watchdog thread replaces a lane's thread when
    its close stalls (STALL_S); idle, it only waits.

    The threads start with `start()` (the agent starts no thread before its seal's path
    part, agent/sealing.py); until then, and after `stop()`, a close is done at once."""

    def __init__(self, name: str = "bd-agent-closer"):
        self.name = name
        self._lock = threading.Lock()
        self._watch_wake = threading.Condition(self._lock)
        self._lanes: dict[str, _Lane] = {}
        self._started = False
        self._stopped = False
        self._closes = 0
        self._stalled = 0  # threads left in a stalled close, all lanes
        self._due = math.inf  # when the watchdog wakes next (inf: when told)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)

    @property
    def stalled(self) -> int:
        """Threads left in a close that stalled, and not back from it yet."""
        with self._lock:
            return self._stalled

    def stalled_of(self, node: str) -> int:
        """Those of them left in a close of `node`'s."""
        with self._lock:
            lane = self._lanes.get(node)
            return lane.stalled if lane else 0

    def start(self) -> None:
        with self._lock:
            self._started = True
        self._watchdog.start()

    def close(self, node: str, fd: int) -> None:
        """Close `fd`, a descriptor of `node`'s, soon, off the caller's thread (the caller
        must not use it again)."""
        with self._lock:
            queued = self._started and not self._stopped
            if queued:
                lane = self._lanes.get(node)
                if lane is None:
                    lane = self._lanes[node] = _Lane()
                lane.queue.put(fd)  # (defused there, right before its close)
                if lane.worker is None:
                    self._replace(node, lane)
        if not queued:  # nothing served yet, or any more
            defuse(fd)
            os.close(fd)

    def close_socket(self, node: str, sock: socket.socket) -> None:
        """Close a socket object the same way, and the descriptors queued unread on it."""
        if sock.fileno() < 0:
            return
        if sock.family == socket.AF_UNIX:
            for queued in drain(sock):
                self.close(node, queued)
        self.close(node, sock.detach())

    def stop(self) -> None:
        """Close what is queued, then end the threads (without waiting for a stalled close:
        what is queued behind it stays open)."""
        with self._lock:
            self._stopped = True
            lanes = [lane for lane in self._lanes.values() if lane.worker]
            for lane in lanes:
                lane.queue.put(_STOP)
            self._watch_wake.notify_all()
        end = time.monotonic() + 1.0
        for lane in lanes:
            if (worker := lane.worker) is not None:
                worker.join(max(0.0, end - time.monotonic()))
        if self._watchdog.is_alive():
            self._watchdog.join(max(0.0, end - time.monotonic()))

    def _replace(self, node: str, lane: _Lane) -> None:
        """A new thread takes the lane (the old one, if any, is left to its close). Locked."""
        lane.worker = threading.Thread(target=self._run, args=(node, lane),
                                       name=f"{self.name}-{node}", daemon=True)
        lane.closing, lane.held = 0, False
        lane.worker.start()

    def _run(self, node: str, lane: _Lane) -> None:
        me = threading.current_thread()
        while True:
            try:
                fd = lane.queue.get(timeout=IDLE_S)
            except queue.Empty:
                fd = _STOP
            if fd == _STOP:
                with self._lock:  # (closes are queued under it: none is missed)
                    if not lane.queue.empty():
                        continue
                    lane.worker = None  # idle, or stopped and done: the lane's thread ends
                    if not lane.stalled and self._lanes.get(node) is lane:
                        del self._lanes[node]
                    return
            defuse(fd)  # here, not when queued: the node could set it again in between
            with self._lock:
                self._closes += 1
                lane.closing, lane.since = self._closes, time.monotonic()
                if lane.since + STALL_S < self._due:
                    self._watch_wake.notify()
            try:
                os.close(fd)
            except OSError as e:
                log.warning("closing a descriptor of node %s's (%d): %s", node, fd, e.strerror)
            with self._lock:
                if lane.worker is not me:  # it stalled and was replaced: back, it ends
                    lane.stalled -= 1
                    self._stalled -= 1
                    for other in self._lanes.values():  # room again: held ones are looked at
                        other.held = False
                    if not lane.stalled and lane.worker is None and self._lanes.get(node) is lane:
                        del self._lanes[node]
                    self._watch_wake.notify()
                    return
                lane.closing, lane.held = 0, False

    def _watch(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                due = [(lane.since + STALL_S, node, lane) for node, lane in self._lanes.items()
                       if lane.closing and not lane.held]
                if not due:
                    self._due = math.inf
                    self._watch_wake.wait()
                    continue
                at, node, lane = min(due, key=lambda d: d[0])
                if at > now:
                    self._due = at
                    self._watch_wake.wait(at - now)
                    continue
                if lane.stalled >= MAX_STALLED_PER_NODE or self._stalled >= MAX_STALLED:
                    lane.held = True  # looked at again once a stalled one is back
                    log.error("closing node %s's descriptors: %d of its closes and %d in all "
                              "stalled (its SO_LINGER set again, or its FUSE daemon silent); "
                              "its next close waits for one of them", node, lane.stalled + 1,
                              self._stalled + 1)
                    continue
                lane.stalled += 1
                self._stalled += 1
                log.warning("closing a descriptor of node %s's stalled for %.1f s (its "
                            "SO_LINGER set again, or its FUSE daemon silent): left to its "
                            "thread, %d of its so far", node, STALL_S, lane.stalled)
                self._replace(node, lane)

"""Clients of the numbered stream, from the lab's client namespace, that verify every byte.

    with StreamClients(lab, vip, RECOVERABLE_PORT, 100) as clients:
        ...
    report = clients.report(since=t_fault)

One thread multiplexes every session (1000 sessions cost one thread). Each session
checks what it receives against `stream.expected` at its offset. A mismatch is classified
by the shift that explains it (the stream repeats every 251 bytes, so a shift is known
modulo 251): data from later in the stream is bytes lost, from earlier bytes duplicated.
A session ends broken on EOF, reset or error. Gaps between receptions give the stall.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from ..common import fdtable
from ..errors import LabError
from . import stream


@dataclass
class Session:
    sock: socket.socket
    offset: int = 0
    last_rx: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (at, gap s), gaps > 20 ms
    lost: int = 0
    duplicated: int = 0
    mismatches: int = 0
    broken: str | None = None


def _shift(offset: int, data: bytes) -> int:
    """The shift d (|d| <= 125) such that data == stream at offset + d; 0 if none fits."""
    for d in sorted(range(-125, 126), key=abs):
        if d and stream.expected(offset + d, len(data)) == data:
            return d
    return 0


class StreamClients:
    """`count` verifying stream sessions to address:port, read on one thread."""

    GAP_S = 0.02

    def __init__(self, lab, address: str, port: int, count: int, *, connect_timeout: float = 5.0,
                 half_close: int = 0):
        """`half_close`: so many of the sessions shut their writing side down once
        connected (the server's socket in CLOSE_WAIT, as `nc -N` leaves it)."""
        fdtable.raise_limit()
        self.sessions: list[Session] = []
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        try:
            for _ in range(count):
                s = lab.client_socket()
                self.sessions.append(Session(s))
                s.settimeout(connect_timeout)
                s.connect((address, port))
                if len(self.sessions) <= half_close:
                    s.shutdown(socket.SHUT_WR)
                s.setblocking(False)
        except OSError as e:
            self.close()
            raise LabError(f"stream client could not connect to {address}:{port}: {e}") from None
        now = time.monotonic()
        for sess in self.sessions:
            sess.last_rx = now
            self._sel.register(sess.sock, selectors.EVENT_READ, sess)
        self._thread = threading.Thread(target=self._run, name="bd-stream-clients", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(65536)
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                sess: Session = key.data
                try:
                    n = sess.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._broken(sess, errno.errorcode.get(e.errno, str(e)))
                    continue
                if n == 0:
                    self._broken(sess, "EOF")
                    continue
                self._take(sess, bytes(buf[:n]), time.monotonic())

    def _take(self, sess: Session, data: bytes, now: float) -> None:
        with self._lock:
            gap = now - sess.last_rx
            if gap > self.GAP_S:
                sess.gaps.append((now, gap))
            sess.last_rx = now
            i = stream.first_mismatch(sess.offset, data)
            if i is not None:
                sess.mismatches += 1
                d = _shift(sess.offset + i, data[i:])
                if d > 0:
                    sess.lost += d
                elif d < 0:
                    sess.duplicated += -d
                sess.offset += d  # follow the stream as received
            sess.offset += len(data)

    def _broken(self, sess: Session, why: str) -> None:
        with self._lock:
            sess.broken = why
        self._sel.unregister(sess.sock)

    def received(self) -> int:
        with self._lock:
            return sum(s.offset for s in self.sessions)

    def offsets(self) -> list[int]:
        with self._lock:
            return [s.offset for s in self.sessions]

    def beyond(self, offsets: list[int]) -> bool:
        """Whether every session has received past its offset in `offsets` (taken from
        offsets() earlier): all of them went on."""
        return all(o > a for o, a in zip(self.offsets(), offsets))

    def report(self, since: float, progressed_from: list[int] | None = None) -> dict:
        """Totals; stalls count gaps that ended after `since` (time.monotonic()).

        A session is ok when nothing was lost, duplicated or corrupted, it is not broken,
        and (given `progressed_from`, offsets taken at `since`) it received data after.
        """
        with self._lock:
            stalls = [max([g for at, g in s.gaps if at >= since], default=0.0) for s in self.sessions]
            # when the last session received again: the end of its longest gap since
            resumed = [max(((g, at) for at, g in s.gaps if at >= since), default=(0.0, since))[1]
                       for s in self.sessions]
            ok = [not (s.broken or s.mismatches or s.lost or s.duplicated) and
                  (progressed_from is None or s.offset > progressed_from[i])
                  for i, s in enumerate(self.sessions)]
            return {
                "sessions": len(self.sessions),
                "sessions_ok": sum(ok),
                "bytes_received": sum(s.offset for s in self.sessions),
                "bytes_lost": sum(s.lost for s in self.sessions),
                "bytes_duplicated": sum(s.duplicated for s in self.sessions),
                "corrupt_sessions": sum(bool(s.mismatches) for s in self.sessions),
                "broken_connections": sum(bool(s.broken) for s in self.sessions),
                "broken_by": sorted({s.broken for s in self.sessions if s.broken}),
                "stalls_ms": sorted(round(x * 1000, 1) for x in stalls),
                "last_resumed_s": max(resumed, default=since) - since,
            }

    def close(self) -> None:
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(2)
        for s in self.sessions:
            s.sock.close()
        self._sel.close()

    def __enter__(self) -> StreamClients:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

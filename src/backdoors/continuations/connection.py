"""The recoverable connection: a session socket that keeps the CB's communication state.

It counts the output stream (`sent`) and the input stream the application consumed
(`received`), and receives straight into the CB's receive log, which doubles as its read
buffer: bytes received but not consumed yet (read ahead by `readline`, or replayed after
a recovery) sit in the log beyond the consumed position, so an export never loses them.

After a recovery it also carries the rollback: regenerated output up to the position the
old server had already handed to the kernel is discarded (and, where the dumped send
queue is known, checked byte for byte), and the logged input is served before the socket's.

One thread uses a connection at a time. Everything the application sends or reads must go
through it (not through the raw socket), or the stream positions are wrong.
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any

from .errors import LogFullError, RecoveryError
from .region import CbRegion

FILL = 16 * 1024  # read-ahead per receive when the log has room
_SENDFILE_CHUNK = 1 << 30
_COPY_CHUNK = 256 * 1024


class RecoverableConnection:
    """Socket-like object over one session socket; create it with `create_cb`."""

    def __init__(
        self,
        sock: socket.socket,
        region: CbRegion,
        session: str,
        *,
        sent: int = 0,
        received: int = 0,
        log_end: int = 0,
        skip_until: int = 0,
        tail: bytes = b"",
    ):
        self.sock, self.session = sock, session
        self._region = region
        self._mm, self._ring_at = region.mm, region.ring_at
        self._ring, self._cap = region.ring, region.log_capacity
        self._sent = sent  # output position: bytes the application has sent
        self._consumed = received  # input position: bytes the application has consumed
        self._end = log_end  # input position after the last byte in the log
        self._export_received = received  # log start: input position of the last export
        self._skip_until = skip_until  # output before this the client already has
        self._tail, self._tail_start = tail, skip_until - len(tail)

    # -- positions -------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Output stream position: bytes sent so far (including ones skipped on recovery)."""
        return self._sent

    @property
    def received(self) -> int:
        """Input stream position: bytes the application has consumed so far."""
        return self._consumed

    @property
    def buffered(self) -> int:
        """Bytes received into the log (or replayed) but not consumed yet."""
        return self._end - self._consumed

    @property
    def log_room(self) -> int:
        """Bytes that can still be received before an export is needed."""
        return self._cap - (self._end - self._export_received)

    @property
    def log_capacity(self) -> int:
        """Bytes the receive log holds: what can be received between two exports."""
        return self._cap

    @property
    def log_consumed(self) -> int:
        """Bytes of input consumed since the last export (a replay counts the same)."""
        return self._consumed - self._export_received

    @property
    def skipping(self) -> int:
        """Bytes of regenerated output still to be discarded after a recovery."""
        return max(0, self._skip_until - self._sent)

    def _exported(self, unread: int = 0) -> tuple[int, int]:
        """(sent, received) for an export; the log now starts at `received`: the input
        consumed less its last `unread` bytes (read ahead by a parser and not used yet,
        they stay in the log: a recovery serves them again)."""
        if not 0 <= unread <= self._consumed - self._export_received:
            raise ValueError(f"session {self.session}: {unread} bytes unread, but only "
                             f"{self._consumed - self._export_received} were consumed since "
                             "the last export")
        self._export_received = self._consumed - unread
        return self._sent, self._export_received

    # -- output ----------------------------------------------------------------------

    def send(self, data: Any) -> int:
        """Send some of `data`; the count includes bytes discarded after a recovery."""
        view = memoryview(data).cast("B")
        done = 0
        if self._sent < self._skip_until:
            done = self._discard(view)
            if done == len(view):
                return done
            view = view[done:]
        try:
            n = self.sock.send(view)
        except (BlockingIOError, TimeoutError):
            if done:
                return done
            raise
        self._sent += n
        return done + n

    def sendall(self, data: Any) -> None:
        """Send all of `data` (exactly counted even if a timeout interrupts it)."""
        view = memoryview(data).cast("B")
        if self._sent < self._skip_until:
            view = view[self._discard(view):]
        send = self.sock.send
        while view:
            n = send(view)
            self._sent += n
            view = view[n:]

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send `count` bytes of `file` from `offset` (to its end if None); zero-copy
        when the socket is blocking or non-blocking (not with a timeout). Returns bytes
        sent (or skipped)."""
        fd = file if isinstance(file, int) else file.fileno()
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        pos, end = offset, offset + count
        if self._sent < self._skip_until and pos < end:
            k = min(end - pos, self._skip_until - self._sent)
            if self._tail:
                self._check_file(fd, pos, k)
            self._sent += k
            pos += k
            if self._sent >= self._skip_until:
                self._tail = b""
        # zero-copy unless the socket has a timeout (os.sendfile would not wait for it);
        # a non-blocking one (asyncio) raises BlockingIOError with the count exact
        zero_copy = self.sock.gettimeout() in (None, 0.0)
        out = self.sock.fileno()
        while pos < end:
            if zero_copy:
                n = os.sendfile(out, fd, pos, min(end - pos, _SENDFILE_CHUNK))
            else:
                chunk = os.pread(fd, min(end - pos, _COPY_CHUNK), pos)
                n = self.sock.send(chunk) if chunk else 0
            if n == 0:
                break  # the file is shorter than expected
            self._sent += n
            pos += n
        return pos - offset

    def _discard(self, view: memoryview) -> int:
        """Count (without sending) the part of `view` the client already has."""
        k = min(len(view), self._skip_until - self._sent)
        if self._tail:
            self._check(view[:k], self._sent)
        self._sent += k
        if self._sent >= self._skip_until:
            self._tail = b""
        return k

    def _check_file(self, fd: int, pos: int, count: int) -> None:
        lo = max(self._sent, self._tail_start)
        hi = self._sent + count
        if lo < hi:
            self._check(os.pread(fd, hi - lo, pos + lo - self._sent), lo)

    def _check(self, data: Any, at: int) -> None:
        """RecoveryError unless `data` (output at position `at`) matches the known tail."""
        lo, hi = max(at, self._tail_start), min(at + len(data), self._skip_until)
        if lo >= hi:
            return
        mine = bytes(data[lo - at:hi - at])
        theirs = self._tail[lo - self._tail_start:hi - self._tail_start]
        if mine != theirs:
            where = lo + next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
            raise RecoveryError(
                f"session {self.session}: the recovering server regenerated different output "
                f"at stream position {where} than the old server had sent: it is not "
                "deterministic given its exported state and input (see docs/continuations.md)"
            )

    # -- input -----------------------------------------------------------------------

    def _fill(self, want: int) -> int:
        """Receive up to `want` bytes from the socket straight into the log; 0 at EOF."""
        cap = self._cap
        room = cap - (self._end - self._export_received)
        if room <= 0:
            raise LogFullError(
                f"session {self.session}: receive log full ({cap} bytes received since the "
                f"last export at input position {self._export_received}); call cb.export() "
                "more often or create the box with a larger log_capacity"
            )
        first = self._end % cap
        n = min(want, room, cap - first)
        got = self.sock.recv_into(self._ring[first:first + n], n)
        if got:
            self._end += got
            self._region.set_log_end(self._end)
        return got

    def _take(self, n: int) -> bytes:
        """The next `n` buffered bytes, consumed."""
        first = self._consumed % self._cap
        base = self._ring_at
        self._consumed += n
        if first + n <= self._cap:
            return self._mm[base + first:base + first + n]
        head = self._cap - first
        return self._mm[base + first:base + self._cap] + self._mm[base:base + n - head]

    def recv(self, bufsize: int) -> bytes:
        """Up to `bufsize` bytes (b"" at EOF): logged input first, then the socket's."""
        if bufsize <= 0:
            return b""
        if self._consumed == self._end and self._fill(max(bufsize, FILL)) == 0:
            return b""
        return self._take(min(bufsize, self._end - self._consumed))

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Like socket.recv_into: fill up to `nbytes` (or len(buffer)) bytes; 0 at EOF."""
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        data = self.recv(n)
        view[:len(data)] = data
        return len(data)

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes, or fewer only at EOF."""
        parts, left = [], n
        while left > 0:
            chunk = self.recv(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def readline(self, limit: int = -1) -> bytes:
        """One line including its b"\\n"; at most `limit` bytes (and the log's capacity);
        the partial line at EOF."""
        if limit < 0 or limit > self._cap:
            limit = self._cap
        scan = self._consumed
        while True:
            at = self._find_newline(scan, min(self._end, self._consumed + limit))
            if at >= 0:
                return self._take(at + 1 - self._consumed)
            if self._end - self._consumed >= limit:
                return self._take(limit)
            scan = self._end
            if self._fill(FILL) == 0:
                return self._take(self._end - self._consumed)

    def _find_newline(self, start: int, stop: int) -> int:
        """Input position of the first b"\\n" in [start, stop), or -1."""
        cap, base = self._cap, self._ring_at
        while start < stop:
            first = start % cap
            seg = min(stop - start, cap - first)
            i = self._mm.find(b"\n", base + first, base + first + seg)
            if i >= 0:
                return start + i - base - first
            start += seg
        return -1

    # -- socket-like rest ------------------------------------------------------------

    def makefile(self, mode: str = "rb") -> SessionFile:
        """A binary file object over this connection (reads and writes are counted).

        It does no read-ahead of its own, so exports see exactly what was consumed."""
        return SessionFile(self, mode)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        """End the session: FIN to the client even if the agent holds a duplicate."""
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __repr__(self) -> str:
        return (f"<RecoverableConnection session={self.session} sent={self._sent} "
                f"received={self._consumed} buffered={self.buffered}>")


class SessionFile(io.RawIOBase):
    """makefile() of a RecoverableConnection: readline/read/write without extra buffering."""

    def __init__(self, conn: RecoverableConnection, mode: str):
        super().__init__()
        if set(mode) - set("rwb"):
            raise ValueError(f"invalid mode {mode!r}: use 'rb', 'wb' or 'rwb'")
        self.conn, self.mode = conn, mode

    def readable(self) -> bool:
        return "r" in self.mode

    def writable(self) -> bool:
        return "w" in self.mode

    def readinto(self, buffer: Any) -> int:
        return self.conn.recv_into(buffer)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.conn.recv(FILL):
                parts.append(chunk)
            return b"".join(parts)
        return self.conn.read(size)

    def readline(self, size: int | None = -1) -> bytes:
        return self.conn.readline(-1 if size is None else size)

    def write(self, data: Any) -> int:
        self.conn.sendall(data)
        return len(memoryview(data).cast("B"))

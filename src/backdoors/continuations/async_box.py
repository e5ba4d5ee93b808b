"""Continuation Boxes for asyncio servers: a recoverable reader/writer pair per session.

    async def serve(conn):                            # what AsyncListener.accept() gave
        async with await create_cb_async(conn) as cb:
            state = cb.import_state(State) or State(await cb.reader.readline())
            cb.writer.write(data)                     # counted, skipped after a recovery
            await cb.export(state)                    # drains first, then exports

The box is the threaded one (`ContinuationBox`, built by the same `new_box` /
`recovered_box`), its `RecoverableConnection` over a non-blocking socket: the stream
positions, the receive log, the replay after a recovery and the skipping of output the
client has are that connection's; the reader and writer here only wait for the socket
when it would block. Registration with the agent never blocks the event loop: it runs on
the registration worker thread (`agent_link.WORKER`), in order; a new session's box is
returned once the agent holds it, a recovered one's at once (the agent that handed it
over holds it already).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .adoption import Recovered
from .agent_link import WORKER, NullRegistrar, Registrar
from .box import (
    DEFAULT_LOG_CAPACITY,
    DEFAULT_STATE_CAPACITY,
    ContinuationBox,
    attach_in_background,
    new_box,
    recovered_box,
    registrar_or_default,
)
from .connection import FILL, RecoverableConnection


async def create_cb_async(
    conn: socket.socket | Recovered,
    *,
    state_capacity: int = DEFAULT_STATE_CAPACITY,
    log_capacity: int = DEFAULT_LOG_CAPACITY,
    registrar: Registrar | None = None,
    channel_of: int = 0,
) -> AsyncContinuationBox:
    """The session's box for what `AsyncListener.accept()` returned, as create_cb does:
    a new box for a fresh connection (registered with the agent before it is returned),
    the rolled-back one for a recovered session (registered in the background). A
    recovered session whose box cannot be made is dropped (closed, released at the
    agent) and the error raised. `channel_of`: a fresh socket this process connect()ed,
    a channel of its server on that port (continuations.channels), not one it accepted."""
    registrar = registrar_or_default(registrar)
    if isinstance(conn, Recovered):
        conn.sock.setblocking(False)
        box = recovered_box(conn, state_capacity=state_capacity, log_capacity=log_capacity,
                            registrar=registrar)
        attach_in_background(box)
        return AsyncContinuationBox(box)
    conn.setblocking(False)
    box = new_box(conn, state_capacity=state_capacity, log_capacity=log_capacity,
                  registrar=registrar, channel_of=channel_of)
    cb = AsyncContinuationBox(box)
    if (attaching := attach_in_background(box)) is not None:
        try:
            await asyncio.wrap_future(attaching)
        except BaseException:
            cb.close()
            raise
    return cb


def _teardown(box: ContinuationBox) -> None:
    """On the worker, after the box's attach: release at the agent, close the descriptors."""
    try:
        if box._to_release():
            box._registrar.detach(box)
    finally:
        box.conn.close()
        box.region.close()


class AsyncContinuationBox:
    """A session's Continuation Box with its asyncio reader and writer.

    `reader` and `writer` carry all of the session's I/O (one task reading and one
    writing at most); `conn` is the box's RecoverableConnection, for its positions
    (sent, received, buffered, skipping): do no I/O through it."""

    def __init__(self, box: ContinuationBox):
        self.box = box
        self.conn: RecoverableConnection = box.conn
        self.reader = SessionReader(box.conn)
        self.writer = SessionWriter(box.conn)
        self._closed = False

    session = property(lambda self: self.box.session, doc="session id (hex)")
    name = property(lambda self: self.box.name, doc="'cb-<session>', the agent's name for it")
    recovered = property(lambda self: self.box.recovered, doc="whether it came from a recovery")
    registered = property(lambda self: self.box.registered, doc="whether the agent holds it")
    version = property(lambda self: self.box.version, doc="number of the last export")
    fd = property(lambda self: self.box.fd, doc="the region's memfd")

    def import_state(self, type: Any = None) -> Any:  # noqa: A002 - mirrors msgspec
        """The last exported state (see ContinuationBox.import_state); None if new."""
        return self.box.import_state(type)

    async def export(self, state: Any, *, unread: int = 0) -> int:
        """Send what the writer holds, then export `state` (see ContinuationBox.export,
        `unread` too): an export records output the kernel has, never output still in
        this process."""
        await self.writer.drain()
        return self.box.export(state, unread=unread)

    def close(self) -> None:
        """End the session: FIN to the client now; the release at the agent and the
        closing of the descriptors happen on the registration worker, after any attach
        of this box (the event loop never waits for the agent). Output not drained yet
        is dropped."""
        if self._closed:
            return
        self._closed = True
        self.reader.unwatch()
        box = self.box
        try:
            box.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if isinstance(box._registrar, NullRegistrar):
            _teardown(box)
        else:
            WORKER.submit(_teardown, box)

    async def __aenter__(self) -> AsyncContinuationBox:
        return self

    async def __aexit__(self, exc_type: Any, *exc: object) -> None:
        try:
            if exc_type is None:
                await self.writer.drain()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<AsyncContinuationBox {self.box!r}>"


class SessionReader:
    """The input side of a session, like asyncio.StreamReader: logged input first (after
    a recovery, the replay), then the socket's, received straight into the box's log."""

    def __init__(self, conn: RecoverableConnection):
        self._conn = conn
        self._eof = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the fd is registered there
        self._fd = -1  # the fd registered
        self._waiter: asyncio.Future | None = None
        self._error: OSError | None = None  # met receiving on readiness, not yet raised

    async def _call(self, fn: Any, *args: Any) -> Any:
        while True:
            if self._error is not None and not self._conn.buffered:
                error, self._error = self._error, None
                raise error
            try:
                return fn(*args)
            except BlockingIOError:
                await self._readable()

    async def _readable(self) -> None:
        """Wait until input is in the log (or the socket has news: EOF, an error). The
        fd stays registered with the loop from one wait to the next -- a request-reply
        session waits again soon, and epoll_ctl twice per wait was a fifth of the box's
        cost -- until the log is full, the input ends, or the box closes."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.unwatch()
            self._fd = self._conn.fileno()
            # a registration of a socket closed unwatched, that had this number, would
            # swallow this one (asyncio keeps it as is: epoll would never be told)
            loop.remove_reader(self._fd)
            loop.add_reader(self._fd, self._on_readable)
            self._loop = loop
        self._waiter = loop.create_future()
        try:
            await self._waiter
        except asyncio.CancelledError:
            self.unwatch()  # the session's task is ending: its socket may close next
            raise
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        """The socket is readable: receive into the log now, as a transport would (the
        readiness is spent, it does not fire again for the same bytes), then wake the
        reading task. A full log or the end of the input stops the watch: the reader
        meets them itself (LogFullError, EOF)."""
        conn = self._conn
        try:
            if conn.log_room <= 0 or conn._fill(FILL) == 0:
                self.unwatch()
        except BlockingIOError:
            return
        except OSError as e:
            self._error = e
            self.unwatch()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def unwatch(self) -> None:
        """Drop the fd's registration with the loop. Before the fd is closed: asyncio
        would keep a stale one, and break on the next socket given that number (the box
        closes through close(), never by closing its socket; a cancelled read unwatches)."""
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._loop = None

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (b"" at EOF); n < 0: everything up to EOF."""
        if n >= 0:
            data = await self._call(self._conn.recv, n)
            self._eof = n > 0 and not data
            return data
        parts = []
        while chunk := await self._call(self._conn.recv, FILL):
            parts.append(chunk)
        self._eof = True
        return b"".join(parts)

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes; asyncio.IncompleteReadError (with the partial bytes) at EOF."""
        parts, left = [], n
        while left > 0:
            chunk = await self._call(self._conn.recv, left)
            if not chunk:
                self._eof = True
                partial = b"".join(parts)
                raise asyncio.IncompleteReadError(partial, n)
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    async def readline(self, limit: int = -1) -> bytes:
        """One line including its b"\\n"; at most `limit` bytes (and the log's capacity);
        the partial line at EOF, b"" after it."""
        line = await self._call(self._conn.readline, limit)
        if not line:
            self._eof = True
        return line

    def at_eof(self) -> bool:
        """True once a read met the end of the input and nothing is buffered."""
        return self._eof and self._conn.buffered == 0


class SessionWriter:
    """The output side of a session, like asyncio.StreamWriter: write() hands the kernel
    what it takes now and keeps the rest until drain(); regenerated output the client
    already has (after a recovery) is counted and discarded, never sent."""

    def __init__(self, conn: RecoverableConnection):
        self._conn = conn
        self._pending = bytearray()  # written, not yet handed to the kernel
        self._at = 0  # start of the unsent part of _pending

    @property
    def pending(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return len(self._pending) - self._at

    def write(self, data: Any) -> None:
        """Queue `data`; what the socket takes now is sent at once."""
        view = memoryview(data).cast("B")
        if not self.pending:
            while view:
                try:
                    n = self._conn.send(view)
                except BlockingIOError:
                    break
                view = view[n:]
        if view:
            self._pending += view

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    async def drain(self) -> None:
        """Wait until everything written is handed to the kernel."""
        while self._at < len(self._pending):
            with memoryview(self._pending) as whole, whole[self._at:] as rest:
                try:
                    n = self._conn.send(rest)
                except BlockingIOError:
                    n = -1
            if n < 0:
                await _writable(self._conn.fileno())
            else:
                self._at += n
        self._pending.clear()
        self._at = 0

    async def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send `count` bytes of `file` from `offset` (to its end if None), zero-copy,
        after what was written before; returns bytes sent (or skipped after a recovery)."""
        await self.drain()
        fd = file if isinstance(file, int) else file.fileno()
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        done = 0
        while done < count:
            before = self._conn.sent
            try:
                done += self._conn.sendfile(fd, offset + done, count - done)
                break  # all of it, or the file ended early
            except BlockingIOError:
                done += self._conn.sent - before
                await _writable(self._conn.fileno())
        return done

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """'peername', 'sockname' or 'socket' of the session, like a transport's."""
        sock = self._conn.sock
        try:
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            return default
        return sock if name == "socket" else default


async def _writable(fd: int) -> None:
    """Wait until `fd` is writable on the running loop."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop.add_writer(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)

"""One asyncio accept path for new connections and recovered sessions.

    async with AsyncListener.tcp("0.0.0.0", 8080) as listener:
        async for conn in listener:                 # a socket or a Recovered session
            asyncio.create_task(serve(conn))        # serve: `await create_cb_async(conn)`

The asyncio twin of `Listener`: no thread per session and none per accept. Its listening
socket and its adoption source (`AdoptionSource.fileno()`) are watched by the event loop;
accept() takes a recovered session first when both are ready (its client is already
waiting), and every session the source took in a batch is handed out before the next
wait. `listener.serve(handler)` runs the usual accept loop, one task per session, with
a limit on the sessions served at once: past it, new clients wait in the listening
socket's backlog while recovered sessions are still taken.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ..common.accepting import Pause
from ..common.runtime import adoption_socket
from .adoption import AdoptionSource, Recovered, resume_in
from .listener import adoption_source, listen_tcp, listening_name

log = logging.getLogger("backdoors.continuations")

FULL_LOG_S = 60.0  # "serving its limit" is logged at most this often
#: seconds serve() spends taking the recovered sessions ready at once before letting them
#: start: a recovery's sessions are taken many to a loop turn (the agent's batches read and
#: answered sooner), not one, which moves 1,000 sessions sooner (docs/recovery.md); the
#: bound keeps timers and the other sessions from waiting long (a progress sensor ticked on
#: the loop must not look hung)
TAKE_S = 0.005


class AsyncListener:
    """Accepts from a listening socket and an adoption source (either may be absent),
    on the running event loop. close() ends a waiting accept() (it then returns None)."""

    def __init__(self, sock: socket.socket | None = None, *,
                 adopt: AdoptionSource | str | None = None):
        if sock is None and adopt is None:
            raise ValueError("an AsyncListener needs a listening socket, an adoption source, or both")
        self.sock = sock
        self.source = adoption_source(adopt)
        if sock is not None:
            sock.setblocking(False)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None
        self._watched: list[int] = []
        self._pause = Pause(listening_name(sock))
        self._limit: int | None = None  # serve()'s, on its sessions' tasks
        self._tasks: set[asyncio.Task] = set()
        self._full_logged = -FULL_LOG_S

    @classmethod
    def tcp(cls, host: str, port: int, *, adopt: AdoptionSource | str | None = None,
            backlog: int = 128) -> AsyncListener:
        """Listen on host:port (SO_REUSEADDR); `adopt` as for Listener.tcp (default from
        $BACKDOORS_ADOPT_SOCKET or $BACKDOORS_ADOPT_DIR, if set)."""
        sock = listen_tcp(host, port, backlog)
        try:
            return cls(sock, adopt=adopt if adopt is not None else adoption_socket(port))
        except BaseException:
            sock.close()
            raise

    @property
    def address(self) -> tuple[str, int] | None:
        return self.sock.getsockname()[:2] if self.sock is not None else None

    async def accept(self) -> socket.socket | Recovered | None:
        """The next new connection (a non-blocking socket) or recovered session; None once
        close() was called."""
        self._loop = asyncio.get_running_loop()
        while not self._closed:
            if self.source is not None and (recovered := self.source.receive()) is not None:
                return recovered
            if self.sock is not None and not self._pause.remaining() and not self._full():
                try:
                    conn, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as err:
                    if self._closed:
                        return None
                    if not self._pause.absorb(err):
                        raise
                    if not self._pause.remaining():
                        continue  # that connection's own error: the next one now
                else:
                    self._pause.accepted()
                    conn.setblocking(False)
                    return conn
            await self._readable()
        return None

    async def _readable(self) -> None:
        """Wait until the listening socket or the adoption source is readable (or close),
        or until the end of a pause in accepting from either (common.accepting)."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        paused = self._pause.remaining()
        sock = None if paused or self._full() else self.sock
        self._watched = [f.fileno() for f in (sock, self.source) if f is not None]
        for fd in self._watched:
            loop.add_reader(fd, _wake, waiter)
        if self._closed:  # close() came before the waiter was there to wake (a signal
            _wake(waiter)  # handler run inside accept(), another thread)
        resume = [t for t in (paused, resume_in(self.source)) if t]
        timer = loop.call_later(min(resume), _wake, waiter) if resume else None
        try:
            await waiter
        finally:
            self._unwatch()
            if timer is not None:
                timer.cancel()

    def _full(self) -> bool:
        """serve() runs its limit of sessions: new connections are not taken."""
        return self._limit is not None and len(self._tasks) >= self._limit

    def _unwatch(self) -> None:
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched, self._waiter = [], None

    def __aiter__(self) -> AsyncIterator[socket.socket | Recovered]:
        return self._each()

    async def _each(self) -> AsyncIterator[socket.socket | Recovered]:
        while (conn := await self.accept()) is not None:
            yield conn

    async def serve(self, handler: Callable[..., Awaitable[Any]], *args: Any,
                    limit: int | None = None) -> None:
        """Run `handler(conn, *args)` as a task of its own for every accepted connection or
        recovered session, until close(). A handler's OSError (the client went away) is
        logged at INFO, any other error with its traceback; neither stops the server.
        Sessions still running when this returns are left as they are (see run()).

        `limit`: while that many sessions run, no new connection is accepted (they wait
        in the listening socket's backlog, then the kernel drops their SYNs and clients
        retry, as at nginx's worker_connections) so that a flood cannot take the
        descriptors a recovery's sessions need; recovered sessions are always taken.
        `common.fdtable.session_limit()` gives one for half the descriptors. None: none.

        A new connection's handler starts before the next connection is taken; recovered
        sessions ready at once are taken for up to TAKE_S before theirs start."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be 1 or more sessions, not {limit}")
        tasks = self._tasks
        self._limit = limit

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if len(tasks) + 1 == self._limit and self._waiter is not None:
                _wake(self._waiter)  # room again: watch the listening socket
            if task.cancelled() or (err := task.exception()) is None:
                return
            if isinstance(err, OSError):
                log.info("session ended: %s", err)
            else:
                log.error("session failed", exc_info=err)

        taking_until = 0.0
        async for conn in self:
            task = asyncio.create_task(handler(conn, *args))
            tasks.add(task)
            task.add_done_callback(done)
            if self._full() and (now := time.monotonic()) - self._full_logged >= FULL_LOG_S:
                self._full_logged = now
                log.warning("%s: serving its limit of %d sessions: new connections wait "
                            "(recovered sessions are still taken)",
                            listening_name(self.sock), limit)
            if not isinstance(conn, Recovered) or time.monotonic() >= taking_until:
                await asyncio.sleep(0)  # the sessions taken so far start now
                taking_until = time.monotonic() + TAKE_S

    def running(self) -> set[asyncio.Task]:
        """The session tasks serve() started that have not ended."""
        return set(self._tasks)

    def close(self) -> None:
        """Stop accepting; a waiting accept() returns None. Safe from any thread and from
        a signal handler (loop.add_signal_handler or signal.signal)."""
        if self._closed:
            return
        self._closed = True
        waiter, loop = self._waiter, self._loop
        if waiter is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_wake, waiter)

    def release(self) -> None:
        """Close the sockets and the adoption source (after the accept loop ended)."""
        self.close()
        if self._watched and self._loop is not None and not self._loop.is_closed():
            self._unwatch()
        if self.sock is not None and self.sock.fileno() >= 0:
            self.sock.close()
        if self.source is not None:
            self.source.close()
            self.source = None

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __enter__(self) -> AsyncListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None) -> T:
    """Run `main` on a new event loop and return its result: uvloop's loop when it is
    installed (`use_uvloop=None`; False: asyncio's own), else asyncio's.

    Unlike asyncio.run, sessions still running when `main` returns are not cancelled: a
    recoverable server that stops (SIGTERM) leaves them to the agent that holds them, as
    the threaded servers' daemon threads do, instead of closing them; the process is
    expected to exit next."""
    loop = _new_loop(use_uvloop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        if asyncio.all_tasks(loop):
            # abandoned sessions: their tasks are destroyed pending at exit, nothing to report
            loop.set_exception_handler(lambda loop, context: None)
        else:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()


def _new_loop(use_uvloop: bool | None) -> asyncio.AbstractEventLoop:
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)

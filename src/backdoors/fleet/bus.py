"""A NATS connection (nats-py) for threaded code: publish bytes, receive them by callback.

nats-py is asyncio; the monitor is threads. `Bus` runs the connection on an event loop of
its own thread: `publish` may be called from any thread (it waits until the server has the
message, `flush`), and `on_message(subject, data)` is called for each message of the
subscribed subject, in order, on a thread of its own (the loop goes on reading meanwhile).
nats-py reconnects by itself when its server goes away and comes back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

from ..common.ratelimit import LogLimiter
from .nats import NatsError

log = logging.getLogger("backdoors.fleet")


class Bus:
    """A connection to `servers` (nats:// URLs), subscribed to `subject` when `on_message`
    is given. `within()`: entered around the connection (a network namespace)."""

    def __init__(self, servers: list[str], subject: str,
                 on_message: Callable[[str, bytes], None] | None = None, *,
                 name: str = "backdoors", timeout: float = 5.0,
                 within: Callable[[], AbstractContextManager] | None = None):
        if not servers:
            raise NatsError("no NATS server given (like nats://127.0.0.1:4222)")
        self.servers, self.subject, self.on_message = list(servers), subject, on_message
        self.shown = ", ".join(without_password(u) for u in servers)  # for the logs
        self.name, self.timeout, self.within = name, timeout, within
        self._loop = asyncio.new_event_loop()
        self._nc = None
        self._connecting = None  # the future of the first connection
        self._handler = ThreadPoolExecutor(1, thread_name_prefix="bd-nats-in")
        self._log_limit = LogLimiter(rate=1 / 60, burst=1)  # a line a minute per kind
        self.errors: dict[str, int] = {}  # nats-py's errors by kind (SlowConsumerError...)
        self.last_error = ""  # the latest of them (why a connection does not come up)
        self.refused = ""  # the server's refusal of the credentials, if any attempt met it
        self._thread = threading.Thread(target=self._run, name="bd-nats", daemon=True)

    def _run(self) -> None:
        # the loop's thread makes every connection (and reconnection): it enters `within`
        with self.within() if self.within is not None else nullcontext():
            self._loop.run_forever()

    def start(self, *, wait: bool = True) -> Bus:
        """Connect (and subscribe); NatsError when no server answers within the timeout.
        With `wait=False` a server that does not answer is logged, and the connection
        goes on trying in the background (publish fails until it is made)."""
        self._thread.start()
        fut = self._connecting = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)
        try:
            fut.result(self.timeout + 1)
        except Exception as e:  # noqa: BLE001 - nats-py raises many kinds
            why = f"NATS {self.shown}: cannot connect: {_reason(e)}"
            if self.refused and self.refused not in why:  # (a later attempt may only see
                why += f" (the server refused: {self.refused})"  # the connection reset)
            if self.last_error and self.last_error not in why:
                why += f" (the last error: {self.last_error})"
            if wait or fut.done():  # (done: a bad address, not a server away)
                self.stop()
                raise NatsError(why) from None
            log.warning("%s; trying again in the background", why)
            fut.add_done_callback(self._late)
        return self

    def _late(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            log.warning("NATS %s: connected", self.shown)

    async def _connect(self) -> None:
        import nats
        nc = await nats.connect(servers=self.servers, name=self.name, error_cb=self._error,
                                connect_timeout=self.timeout, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, allow_reconnect=True)
        if self.on_message is not None:
            # a flood past these is dropped by nats-py (counted in `errors`), not held
            await nc.subscribe(self.subject, cb=self._deliver, pending_msgs_limit=65536,
                               pending_bytes_limit=64 << 20)
            await nc.flush()
        self._nc = nc

    async def _error(self, e: Exception) -> None:
        """nats-py's errors (each failed attempt to connect while it tries, each message
        dropped past the subscription's pending limit): counted, and one line a minute
        of each kind (nats-py would log a traceback each)."""
        kind = type(e).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = _reason(e)
        if "authorization" in self.last_error.lower():
            self.refused = self.last_error
        if self._log_limit.admit(kind)[0]:
            log.warning("NATS %s: %s (%d of this kind so far)", self.shown,
                        _reason(e), self.errors[kind])

    async def _deliver(self, msg) -> None:
        # on a thread of its own, one message after another: the loop keeps reading from
        # the server meanwhile (a handler that takes its time, checking the signatures of
        # a flood, would otherwise leave the server's buffer to fill until it cuts the
        # connection as a slow consumer, and the messages in it are lost)
        await asyncio.wrap_future(self._handler.submit(self._handle, msg.subject, msg.data))

    def _handle(self, subject: str, data: bytes) -> None:
        try:
            self.on_message(subject, data)
        except Exception:  # noqa: BLE001 - one bad message must not end the subscription
            log.exception("NATS message on %s: handler failed", subject)

    def publish(self, data: bytes, subject: str | None = None) -> None:
        """Send `data` and wait until the server has it; NatsError if it cannot."""
        async def send() -> None:
            if self._nc is None:
                raise ConnectionError("not connected (yet)")
            if not self._nc.is_connected:  # (nats-py would hold it, and lose it)
                raise ConnectionError("not connected (the server went away: reconnecting)")
            await self._nc.publish(subject or self.subject, data)
            await self._nc.flush(timeout=self.timeout)
        try:
            asyncio.run_coroutine_threadsafe(send(), self._loop).result(self.timeout + 1)
        except Exception as e:  # noqa: BLE001
            raise NatsError(f"NATS publish on {subject or self.subject}: "
                            f"{_reason(e)}") from None

    def stop(self) -> None:
        if self._thread.is_alive():
            try:  # close the connection, and end what runs on the loop (a connection
                # still trying) before the loop stops
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(3)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()  # (its selector and self-pipe: three descriptors)
        self._handler.shutdown(wait=False, cancel_futures=True)
        self._nc = None

    async def _close(self) -> None:
        try:
            if self._nc is not None:
                await self._nc.close()
        finally:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _reason(e: BaseException) -> str:
    """What went wrong, never empty (a TimeoutError's text is)."""
    return str(e) or type(e).__name__


def without_password(url: str) -> str:
    """`url` as logged: a password or token in it (nats://user:password@host,
    nats://token@host) left out, whatever characters it holds."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0] + ":***" if ":" in userinfo else "***"
    return f"{scheme}://{user}@{host}"

"""A session's outgoing connections (channels) that move with it, for asyncio servers.

A server that calls other servers on a client's behalf (a front end and its middle tier)
has sessions made of several sockets: the client's connection and the channel(s) opened
for it. When the node fails, the channels move with the client session, so the peer (the
middle tier) keeps its end and its per-channel state, and sees a pause, not a new
connection:

- a channel is opened from the address the client reached (the node's service address,
  which moves with the node), so its four-tuple is still valid on the recovery node;
- it is a Continuation Box session of its own (a socket held by the agent, stream
  positions, a receive log of the peer's answers), whose state names the client session
  it serves (its group) and the application's per-channel state;
- channels are exported right before their client session, at the same point of the
  session: a recovery rolls all of them back to it. The client session's requests read
  after it are replayed; the calls they make again regenerate the same bytes on the
  channel (the box skips what the peer has, and checks the bytes it still can), and the
  answers read after the export are replayed from the channel's log. The application must
  make the same calls for the same request and answers: calls from the request, the
  session's state and the answers before them.

A server may keep spare channels (`Spares`): opened ahead from an address to a peer
that its sessions have called, so that a new session's first call finds one connected
and held by the agent (its own box's and the peer's registrations done), not a connect
and two registrations on its first request's path. A spare belongs to no session until
one takes it (its export names no group): one moved by a recovery before that is closed
on arrival.

The client session's export lists its channels (name -> channel box id). On the recovery
node the channels and their session arrive as separate recovered sessions, in any order:
`Handed` keeps each channel until its session claims it; a session waits for the channels
it lists at most `WAIT_S` (one the application closed after the session's last export
never comes: the application then opens a new one), and a channel no session claims is
closed after `ORPHAN_S` (one opened after its session's last export: the replay opens
its own).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Any

import msgspec

from .async_box import AsyncContinuationBox, create_cb_async
from .errors import StateTooLargeError

log = logging.getLogger("backdoors.continuations")

WAIT_S = 3.0  # how long a recovered session waits for a channel it lists
ORPHAN_S = 30.0  # a recovered channel no session claimed is closed after this
STATE_CAPACITY = 16 * 1024  # a channel's exported state (the application's dict in it)
LOG_CAPACITY = 256 * 1024  # a channel's answers read between two exports of its session
SPARES = 0  # spare channels kept per (local address, peer), by default: none
#: spares are made again once no session took one for this long: a burst of new sessions
#: is not slowed by the making of the spares it took
SPARE_QUIET_S = 0.2
SPARE_IDLE_S = 60.0  # no session took one for this long: the spares are closed, none made


class ChannelState(msgspec.Struct, tag="channel"):
    """What a channel's box exports: whose channel it is, and the application's state."""

    group: str  # the client session it serves (its box's session id)
    name: str  # the application's name for it, unique within the session
    state: dict[str, Any] = {}


class Channel:
    """An outgoing connection of a session (from `SessionChannels.connect`): `reader` and
    `writer` as asyncio's streams; `state`: a dict of msgpack-able values the application
    keeps for the channel, exported with it; `recovered`: it came with its session from
    another node, rolled back with it (its `state` is the one exported then)."""

    def __init__(self, cb: AsyncContinuationBox, name: str, state: dict, owner: SessionChannels):
        self.cb, self.name, self.state = cb, name, state
        self.reader, self.writer = cb.reader, cb.writer
        self.recovered = cb.recovered
        self._owner = owner

    @property
    def closed(self) -> bool:
        return self._owner.open.get(self.name) is not self

    def close(self) -> None:
        """End the channel (FIN to the peer; released at the agent): it no longer moves."""
        if self._owner.open.get(self.name) is self:
            del self._owner.open[self.name]
        self.cb.close()

    def __repr__(self) -> str:
        return f"<Channel {self.name} of {self._owner.group} {self.cb.box!r}>"


async def _open_box(local: tuple, host: str, port: int) -> AsyncContinuationBox:
    """A new connection to host:port from local's address, with its box held by the
    agent."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((local[0], 0))
        await loop.sock_connect(sock, (host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await create_cb_async(sock, state_capacity=STATE_CAPACITY,
                                     log_capacity=LOG_CAPACITY, channel_of=local[1])
    except BaseException:
        sock.close()
        raise


class Spares:
    """Spare channels of one server, per (local address, peer): up to `count` each, made
    once a session opened a channel from that address to that peer, and again once no
    session took one for SPARE_QUIET_S; all closed once none was taken for SPARE_IDLE_S
    (made again when a session next opens one). 0: none."""

    def __init__(self, count: int = SPARES):
        if count < 0:
            raise ValueError(f"spare channels must be 0 or more, got {count}")
        self.count = count
        self._ready: dict[tuple, collections.deque[AsyncContinuationBox]] = {}
        self._taken_at: dict[tuple, float] = {}
        self._making: dict[tuple, asyncio.Task] = {}
        self._closed = False

    def take(self, local: tuple, peer: tuple) -> AsyncContinuationBox | None:
        """A spare from `local` to `peer` (a still open one), or None; spares are made
        for them from now on."""
        if self.count == 0 or self._closed:
            return None
        key = (local, peer)
        self._taken_at[key] = asyncio.get_running_loop().time()
        ready = self._ready.setdefault(key, collections.deque())
        got = None
        while ready and got is None:
            cb = ready.popleft()
            if _untouched(cb):
                got = cb
            else:  # the peer closed it, or said something unasked
                cb.close()
        if (task := self._making.get(key)) is None or task.done():
            self._making[key] = asyncio.create_task(self._make(key))
        return got

    async def _make(self, key: tuple) -> None:
        local, (host, port) = key
        loop, ready = asyncio.get_running_loop(), self._ready[key]
        while not self._closed:
            now = loop.time()
            if now - self._taken_at[key] >= SPARE_IDLE_S:
                break
            if (wait := self._taken_at[key] + SPARE_QUIET_S - now) > 0 or len(ready) >= self.count:
                await asyncio.sleep(max(wait, 0) or SPARE_QUIET_S * 5)
                continue
            try:
                cb = await _open_box(local, host, port)
            except Exception as e:  # noqa: BLE001 - the peer down, the agent refusing...
                log.info("spare channels from %s to %s:%d: %s; none made until a session "
                         "opens one", local[0], host, port, e)
                break
            try:
                await cb.export(ChannelState("", ""))  # no session's yet
            except BaseException:
                cb.close()
                raise
            ready.append(cb)
        for cb in ready:
            cb.close()
        ready.clear()

    def close(self) -> None:
        self._closed = True
        for task in self._making.values():
            task.cancel()
        for ready in self._ready.values():
            for cb in ready:
                cb.close()
            ready.clear()


def _untouched(cb: AsyncContinuationBox) -> bool:
    """Nothing has come on the spare's socket: neither the peer's end nor a byte."""
    try:
        cb.conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


class SessionChannels:
    """The channels of one client session: opened from `local` (the address its client
    reached), or taken from `spares`, exported before it, closed with it."""

    def __init__(self, group: str, local: tuple, spares: Spares | None = None):
        self.group, self.local, self.spares = group, local, spares
        self.open: dict[str, Channel] = {}

    async def connect(self, name: str, host: str, port: int) -> Channel:
        """The session's channel `name`: the open one (or the one recovered with the
        session, wherever it leads), else a new connection to host:port from the session's
        local address, held by the agent before it is returned."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a channel needs a name, got {name!r}")
        if (ch := self.open.get(name)) is not None:
            return ch
        cb = self.spares.take(self.local, (host, port)) if self.spares is not None else None
        if cb is None:
            cb = await _open_box(self.local, host, port)
        ch = Channel(cb, name, {}, self)
        try:
            await cb.export(ChannelState(self.group, name))  # it is a channel before any byte
        except BaseException:
            cb.close()
            raise
        if (other := self.open.get(name)) is not None:  # opened meanwhile by another task
            cb.close()
            return other
        self.open[name] = ch
        return ch

    def adopt(self, name: str, cb: AsyncContinuationBox, kept: ChannelState) -> None:
        """Take back a channel recovered with the session."""
        self.open[name] = Channel(cb, name, dict(kept.state), self)

    async def export(self) -> dict[str, str]:
        """Export every open channel at this point of the session; their names and box ids
        for the session's export. A channel whose state does not fit is closed (it will
        not move; the application opens another)."""
        listed = {}
        for name, ch in list(self.open.items()):
            try:
                await ch.cb.export(ChannelState(self.group, name, ch.state))
            except StateTooLargeError as e:
                log.warning("channel %s of session %s closed: %s", name, self.group, e)
                ch.close()
                continue
            listed[name] = ch.cb.session
        return listed

    def close(self) -> None:
        for ch in list(self.open.values()):
            ch.close()


class Handed:
    """Channels recovered on this node, kept until their session claims them."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[AsyncContinuationBox, ChannelState]] = {}
        self._waiting: dict[str, asyncio.Future] = {}

    def put(self, cb: AsyncContinuationBox, kept: ChannelState) -> None:
        """A recovered channel: to its waiting session, else kept for `ORPHAN_S`; a
        spare no session had taken (no group) is closed."""
        if not kept.group:
            cb.close()
            return
        waiter = self._waiting.pop(cb.session, None)
        if waiter is not None and not waiter.done():
            waiter.set_result((cb, kept))
            return
        if (old := self._kept.pop(cb.session, None)) is not None:
            old[0].close()
        self._kept[cb.session] = (cb, kept)
        asyncio.get_running_loop().call_later(ORPHAN_S, self._expire, cb)

    async def claim(self, box_id: str, wait: float = WAIT_S
                    ) -> tuple[AsyncContinuationBox, ChannelState] | None:
        """The channel `box_id`, waiting for it at most `wait` seconds; None if it did
        not come."""
        if (got := self._kept.pop(box_id, None)) is not None:
            return got
        waiter = self._waiting[box_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({waiter}, timeout=wait)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # came, and nobody will use it
                waiter.result()[0].close()
            raise
        finally:
            if self._waiting.get(box_id) is waiter:
                del self._waiting[box_id]
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        return None

    def drop_group(self, group: str) -> None:
        """Close the channels of `group` its session did not claim (opened after its
        last export: its replay opens them again)."""
        for box_id, (cb, kept) in list(self._kept.items()):
            if kept.group == group:
                del self._kept[box_id]
                log.info("channel %s of session %s: opened after the session's last export, "
                         "closed", kept.name, group)
                cb.close()

    def _expire(self, cb: AsyncContinuationBox) -> None:
        got = self._kept.get(cb.session)
        if got is not None and got[0] is cb:
            del self._kept[cb.session]
            log.warning("channel %s of session %s: no session claimed it in %g s, closed",
                        got[1].name, got[1].group, ORPHAN_S)
            cb.close()

    def close(self) -> None:
        for cb, _ in self._kept.values():
            cb.close()
        self._kept.clear()

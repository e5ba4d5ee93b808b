"""A recoverable HTTP/1.1 server for any ASGI application.

    python -m backdoors.asgi myapp:app --port 8080 [--adopt /run/app/adopt-8080.sock]
                             [--app-dir DIR] [--sensor-box NAME [--deadline S]]
                             [--limit-concurrency N] [--timeout-idle S]
                             [--max-response BYTES] [--spare-channels N]

    await serve(app, AsyncListener.tcp("0.0.0.0", 8080))      # from Python

Every client connection is a Continuation Box session (backdoors.continuations): new
connections and recovered sessions come through one AsyncListener; HTTP/1.1 is parsed
by h11; requests on a connection are answered one at a time, keep-alive as HTTP/1.1 says.
A request is kept in the session's receive log until answered, so it must fit there
(`--log-capacity`): a bigger one is answered 413. A client silent for `--timeout-idle`
while a request is awaited, or whose request does not come whole within it, is closed;
past `--limit-concurrency` client sessions a new connection is answered 503, while
sessions a recovery hands over are always taken. A response is held whole before it is
sent (below), so one past `--max-response` bytes (an endless stream: server-sent events
are not for this server) is a 500 that ends the connection.

What makes an application recoverable without changing it: the whole response is
produced by the application first, then the session's state is exported with the
response in it, and only then is the response written. A recovery resumes from that
export: the response is sent again (the box skips what the client already has), and
the requests read after it are replayed from the receive log. The application sees a
replayed request again, so it must give the same effect twice — reads are harmless; a
state-changing request should use the key the server hands it:

    scope["extensions"]["backdoors.session"] = {
        "id": "<session hex>",   # the same on every node the session moves to
        "seq": 7,                # this request's number in the session (replays keep it)
        "key": "<id>-7",         # an idempotency key: id and seq
        "state": {...},          # the application's own per-session state: a dict of
                                 # msgpack-able values, exported with the session
        "connect": connect,      # await connect(name, host, port): the session's channel
    }                            # `name` to another server, which moves with the session

A channel (continuations.channels) is an outgoing connection that belongs to the client
session: opened from the address the client reached, exported with the session, moved
with it to the recovery node and rolled back with it. Its `reader` and `writer` are
asyncio's streams; its `state` dict (exported with it) holds what the application needs
to make the same calls again; `recovered` says it came from another node. A replayed
request must make the same calls on it, in the same order, as the first time (the
peer's answers read before the failure are replayed from the channel's log). Once a
session has opened a channel to a peer, the server can keep `--spare-channels` more open
to it, held by the agent, for the sessions that come next (continuations.channels.Spares).

The lifespan protocol (startup, shutdown) is run when the application supports it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import re
import select
import signal
import socket
import sys
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import msgspec

from .common.fdtable import session_limit
from .common.ipc import ready
from .continuations import SESSION_FDS as BOX_SESSION_FDS
from .continuations import AsyncListener, LogFullError, StateTooLargeError, create_cb_async, run
from .continuations.agent_link import NULL, default_registrar
from .continuations.channels import SPARES, ChannelState, Handed, SessionChannels, Spares
from .continuations.cbformat import MAX_LOG_CAPACITY, MAX_STATE_CAPACITY

log = logging.getLogger("backdoors.asgi")

READ = 64 * 1024
MAX_INCOMPLETE = 64 * 1024  # request line and headers, at most half the receive log
LINGER_S = 2.0  # after refusing a request, how long its body is read and dropped at most
IDLE_S = 75.0  # a client silent this long while a request is awaited is closed (nginx's)
#: descriptors a client session may take here: its box session's and one channel's
SESSION_FDS = 2 * BOX_SESSION_FDS
MAX_REFUSING = 64  # connections refused past the session limit, read before they close
SERVER_NAME = b"backdoors-asgi"
ABSOLUTE_FORM = re.compile(rb"(?i)https?://")  # a request target with scheme and authority
HANGUP_POLL_S = 0.2  # how often an application waiting for a disconnect has its client checked


STATE_CAPACITY = 64 * 1024
LOG_CAPACITY = 64 * 1024
RESPONSE_MAX = 32 << 20  # bytes of a response body held at most (it is sent whole)
GRACE_S = 10.0  # without an agent, how long a stopping server finishes its answers


class Session(msgspec.Struct, tag="session"):
    """What a session exports: the response being sent, and what the application keeps.
    Input the parser read ahead (pipelined requests) stays in the receive log, left out
    of the export (`unread`): a recovery replays it."""

    seq: int = 0                 # requests answered
    pending: bytes = b""         # the response being sent when exported
    state: dict[str, Any] = {}   # the application's ("backdoors.session" "state")
    close: bool = False          # the connection ends after `pending`
    oversize: int = 0            # the length of a response too big to keep (pending empty)
    channels: dict[str, str] = {}  # its channels at the export: name -> channel box id


#: what a box of this server exports: a client session, or one of its channels
Kept = Session | ChannelState


class _Done(Exception):
    """The client closed, or sent what cannot be answered."""


class _TooLarge(Exception):
    """The request does not fit the session's receive log (answered 413)."""


async def serve(app, listener: AsyncListener, *, root_path: str = "",
                state_capacity: int = STATE_CAPACITY, log_capacity: int = LOG_CAPACITY,
                idle_s: float | None = IDLE_S, limit: int | None = None,
                state: dict | None = None, response_max: int | None = RESPONSE_MAX,
                grace_s: float = GRACE_S, spares: int = SPARES) -> None:
    """Serve `app` on `listener` until the listener is closed. `state_capacity`: bytes of
    each session's exported state, which holds the response being sent: a response that
    does not fit is sent all the same, but a recovery in the middle of it ends the
    connection (the client sees it end rather than a wrong byte). `log_capacity`: bytes
    of each session's receive log, which holds a request until it is answered: a request
    (head and body) that does not fit is refused with 413. `idle_s`: a client that sends
    nothing for that long while a request is awaited, or whose request does not come
    whole within that long of its first byte, is closed without an answer, so that
    clients gone without a word (a crashed host, a dropped route) do not hold their
    sessions, and the agent's, for ever; None: never. `limit`:
    while that many client sessions are served, a new connection is answered 503 (no
    box, nothing registered) so that the server's descriptors are not all taken by new
    clients: sessions handed over by a recovery are always taken; None: no limit.
    `state`: the lifespan's state (`Lifespan.state`), a shallow copy of which each
    request's scope carries. `response_max`: the most bytes of a response body held
    (a response is sent whole, once the application has made it): past it, a 500 that
    ends the connection, so that an endless stream (server-sent events) cannot grow the
    server without bound; None: no bound. `spares`: spare channels kept open to each
    peer sessions have opened channels to, so that a new session's first call does not
    wait for a connect and its registrations (continuations.channels.Spares); 0: none.

    Once the listener is closed, the sessions are left to the agent that holds them (it
    moves them to a recovery server). Without an agent ($BACKDOORS_AGENT_SOCKET unset)
    nothing would: the requests being answered are answered first (for up to `grace_s`;
    their connections end after), and the connections waiting for a request end."""
    handed = Handed()
    idle = _Idle(idle_s) if idle_s else None
    live = _Live(limit)
    site = _Site(app, root_path, {} if state is None else state, response_max,
                 Spares(spares))
    try:
        await listener.serve(_session, site, state_capacity, log_capacity, handed, idle, live)
        if default_registrar() is NULL:  # no agent holds the sessions: they end here
            await site.drain(listener.running(), grace_s)
    finally:
        site.spares.close()
        handed.close()
        if idle is not None:
            idle.stop()


class _Site:
    """What every session of one server shares: the application, its root path, the
    lifespan's state, the bound on a response, the spare channels, and whether the server
    stops (without an agent: `drain`)."""

    def __init__(self, app, root_path: str, state: dict, response_max: int | None,
                 spares: Spares):
        self.app, self.root_path, self.state = app, root_path, state
        self.response_max, self.spares = response_max, spares
        self.stopping = False
        self.waiting: set[asyncio.Task] = set()  # sessions with no byte of a next request

    async def drain(self, sessions: set[asyncio.Task], grace_s: float) -> None:
        """End the sessions waiting for a request; let those answering one finish it
        (then they end) for up to grace_s; end the rest."""
        self.stopping = True
        for task in self.waiting & sessions:
            task.cancel()
        if not sessions:
            return
        _, late = await asyncio.wait(sessions, timeout=grace_s)
        if late:
            log.warning("asgi: %d sessions still answering %g s after the stop: closed",
                        len(late), grace_s)
            for task in late:
                task.cancel()
            await asyncio.wait(late)


class _Live:
    """Client sessions being served, the limit on new ones, and the refused connections
    still read before they close (at most MAX_REFUSING: a flood of refusals must not
    take the descriptors kept for recovered sessions)."""

    def __init__(self, limit: int | None):
        self.limit, self.count, self.refusing = limit, 0, 0

    def full(self) -> bool:
        return self.limit is not None and self.count >= self.limit


class _Idle:
    """The sessions waiting for their client's next bytes, since when; a sweep every
    idle_s / 8 ends those silent for idle_s (their read cancelled: _Done): a dict entry
    per read, not a timer per read. Input already there is not silence: the loop ran
    late (the server was stopped, a freeze)."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self.waiting: dict[asyncio.Task, tuple[float, Any]] = {}  # task -> (since, cb)
        self.expired: set[asyncio.Task] = set()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def read(self, cb, since: float | None = None) -> bytes:
        """cb.reader.read(READ); _Done if the client stays silent for idle_s (counted
        from `since`, when given: a request must come whole within idle_s, not a byte
        every idle_s)."""
        task = asyncio.current_task()
        self.waiting[task] = (task.get_loop().time() if since is None else since, cb)
        try:
            return await cb.reader.read(READ)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)
            task.uncancel()
            log.info("asgi: session %s: nothing (or no whole request) from the client "
                     "for %g s: closed", cb.session, self.idle_s)
            raise _Done from None
        finally:
            self.waiting.pop(task, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_s / 8)
            now = loop.time()
            for task, (since, cb) in list(self.waiting.items()):
                if now - since < self.idle_s:
                    continue
                if cb.conn.buffered or ready(cb.conn.fileno()):
                    self.waiting[task] = (now, cb)  # it did send: its read goes on
                    continue
                del self.waiting[task]
                self.expired.add(task)
                task.cancel()

    def stop(self) -> None:
        self._sweeper.cancel()


async def _session(conn, site: _Site, state_capacity: int, log_capacity: int,
                   handed: Handed, idle: _Idle | None, live: _Live) -> None:
    if isinstance(conn, socket.socket):
        if live.full():
            return await _busy(conn, live)
        _nodelay(conn)  # a response leaves at once (a recovered socket keeps the option)
    live.count += 1
    try:
        await _open_session(conn, site, state_capacity, log_capacity, handed, idle)
    finally:
        live.count -= 1


async def _busy(sock: socket.socket, live: _Live) -> None:
    """A new connection past the limit: 503 (no box, nothing registered), then its input
    read and dropped for up to LINGER_S, so that the client reads the answer rather than
    a reset (unread input makes close() send one); past MAX_REFUSING such connections at
    once, closed at once (the answer may then be lost to a reset)."""
    body = f"this server serves its limit of {live.limit} sessions: try again\n".encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    live.refusing += 1
    try:
        sock.send(head.encode() + body)  # a new socket's buffer takes it whole
        if live.refusing <= MAX_REFUSING:
            await _drop_input(sock)
    except OSError:
        pass
    finally:
        live.refusing -= 1
        sock.close()


async def _open_session(conn, site: _Site, state_capacity: int, log_capacity: int,
                        handed: Handed, idle: _Idle | None) -> None:
    try:
        cb = await create_cb_async(conn, state_capacity=state_capacity,
                                   log_capacity=log_capacity)
    except Exception as e:  # noqa: BLE001 - a box that cannot be made loses this session only
        log.warning("asgi: a session could not get its box: %s", e)
        if isinstance(conn, socket.socket):  # (a recovered one was dropped already)
            conn.close()
        return
    try:
        s = cb.import_state(Kept) or Session()
    except Exception as e:  # noqa: BLE001 - a state this server cannot read loses this one
        log.warning("asgi: recovered session %s has a state this server cannot read (%s): "
                    "closing it", cb.session, e)
        cb.close()
        return
    if isinstance(s, ChannelState):  # a channel, recovered: kept until its session claims it
        handed.put(cb, s)
        return
    channels = SessionChannels(cb.session, cb.conn.sock.getsockname(), site.spares)
    try:
        await _serve_session(cb, s, channels, handed, site, idle)
    except _Done:  # the client stopped reading (_send): closed, as it was told
        pass
    finally:
        channels.close()


async def _serve_session(cb, s: Session, channels: SessionChannels, handed: Handed,
                         site: _Site, idle: _Idle | None) -> None:
    import h11

    async with cb:
        if s.channels:  # recovered: its channels were handed over with it
            got = await asyncio.gather(*(handed.claim(i) for i in s.channels.values()))
            for (name, box_id), kept in zip(s.channels.items(), got):
                if kept is None or kept[1].group != cb.session:
                    log.warning("asgi: session %s: its channel %s (%s) did not come with it; "
                                "the application opens a new one", cb.session, name, box_id)
                    if kept is not None:  # another session's: not this one's to use
                        kept[0].close()
                else:
                    channels.adopt(name, *kept)
            handed.drop_group(cb.session)
        if s.oversize and cb.conn.skipping < s.oversize:
            log.warning("asgi: session %s recovered inside a %d-byte response it could not "
                        "keep: closing it", cb.session, s.oversize)
            return
        if s.pending or s.oversize:  # recovered: send it again; the box skips what was sent
            await _send(cb, s.pending, idle)
            s.pending = b""  # (the box's export keeps it)
            if s.close:
                return await _linger(cb)
        head_max = min(MAX_INCOMPLETE, cb.conn.log_capacity // 2)
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=head_max)
        sock = cb.conn.sock
        client, server = _address(sock.getpeername), _address(sock.getsockname)
        while not site.stopping:
            try:
                request, body = await _read_request(parser, cb, idle, head_max, site.waiting)
            except _Done:
                return
            except h11.RemoteProtocolError as e:
                log.info("asgi: session %s: bad request from %s: %s", cb.session, client, e)
                await _send(cb, _plain(parser, e.error_status_hint, _without_input(str(e))),
                            idle)
                return await _linger(cb)
            except _TooLarge as e:
                await _send(cb, _plain(parser, 413, str(e)), idle)
                return await _linger(cb)
            ext = {"id": cb.session, "seq": s.seq, "key": f"{cb.session}-{s.seq}",
                   "state": s.state, "connect": channels.connect}
            scope = _scope(request, client, server, site.root_path, ext, site.state)
            status, headers, chunks = await _call(site.app, scope, body, sock,
                                                  site.response_max)
            s.state = ext["state"]
            if site.stopping:  # (the server stops, with no agent: the connection ends)
                headers = [*headers, (b"connection", b"close")]
            response = _encode(parser, request, status, headers, b"".join(chunks))
            del chunks, body
            s.seq += 1
            s.close = parser.our_state is not h11.DONE
            s.pending, s.oversize = response, 0
            if not s.close:
                parser.start_next_cycle()
                parser = _past_blank_lines(parser, head_max)
            unread = len(parser.trailing_data[0])
            s.channels = await channels.export()  # before the session: never behind it
            try:
                await cb.export(s, unread=unread)
            except StateTooLargeError:
                s.pending, s.oversize = b"", len(response)
                try:
                    await cb.export(s, unread=unread)
                except (StateTooLargeError, *_UNENCODABLE) as e:
                    response = await _unexportable(cb, s, unread, e)
            except _UNENCODABLE as e:  # (msgspec: a value it cannot encode)
                response = await _unexportable(cb, s, unread, e)
            await _send(cb, response, idle)
            s.pending = response = b""  # (the box's export keeps it)
            if s.close or site.stopping:  # (stopping: its answer may have said keep-alive)
                return await _linger(cb)


#: what msgspec raises for a value msgpack cannot hold (an object, an int past 64 bits, a
#: dict that holds itself)
_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


async def _unexportable(cb, s: Session, unread: int, e: Exception) -> bytes:
    """The application left a state the session cannot export (too large for
    --state-capacity, or a value msgpack cannot hold): its response cannot be made
    recoverable, so it is not sent. A 500 that ends the connection is, with the state
    emptied (the application's mistake, like an exception)."""
    log.error("asgi: session %s: the application's state cannot be exported (%s): 500, "
              "and the connection ends", cb.session, e)
    response = _closing_500(b"the application's session state cannot be kept\n")
    s.state, s.pending, s.oversize, s.close, s.channels = {}, response, 0, True, {}
    await cb.export(s, unread=unread)
    return response


def _nodelay(sock: socket.socket) -> None:
    """No Nagle delay: a response's last segment would wait for the client's (delayed)
    acknowledgement of the one before."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


async def _send(cb, data: bytes, idle: _Idle | None) -> None:
    """Write `data` and wait until the kernel has it all; _Done if the client takes
    none of it for idle_s (a client that stops reading must not hold its session, and
    the response, for ever)."""
    cb.writer.write(data)
    if idle is None:
        return await cb.writer.drain()
    while cb.writer.pending:
        before = cb.writer.pending
        try:
            await asyncio.wait_for(cb.writer.drain(), idle.idle_s)
        except TimeoutError:
            if cb.writer.pending == before:
                log.info("asgi: session %s: the client read nothing for %g s: closed",
                         cb.session, idle.idle_s)
                raise _Done from None


def _framed_twice(request) -> bool:
    """Whether a request has both a Content-Length and a Transfer-Encoding."""
    names = {k.lower() for k, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _address(get) -> list | None:
    try:
        host, port = get()[:2]
        return [host, port]
    except OSError:
        return None


async def _read_request(parser, cb, idle: _Idle | None, head_max: int,
                        waiting: set[asyncio.Task] | None = None):
    """The next request and its whole body. The request stays in the session's receive
    log until its response is exported, so one that cannot fit there is _TooLarge: by
    its Content-Length, before its body is read (and then no 100 Continue is sent), or
    when the log fills (a chunked body). Each decision depends on the input stream only,
    never on how it arrived, so a replay makes the same ones (and sends the same bytes);
    but a client silent for `idle.idle_s` is _Done (closed, nothing sent: no decision
    to replay). The task is in `waiting` until the request's first byte."""
    import h11

    conn = cb.conn
    request, body = None, bytearray()
    ahead = len(parser.trailing_data[0])  # read ahead with the last request
    begin = conn.log_consumed - ahead  # where this request starts
    head_since = asyncio.get_running_loop().time() if ahead else None
    fed = ahead > 0  # the parser holds part of this request
    task = asyncio.current_task()
    if waiting is not None and head_since is None:
        waiting.add(task)
    try:
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                try:  # b"" marks the end of the stream
                    if idle is None:
                        data = await cb.reader.read(READ)
                    else:  # a request begun must come whole within idle_s (its head and its
                        # body: a byte every idle_s would hold the session for ever)
                        data = await idle.read(cb, head_since)
                except LogFullError:
                    raise _TooLarge(_too_large(conn.log_capacity)) from None
                if data and request is None and head_since is None:
                    head_since = asyncio.get_running_loop().time()
                    if waiting is not None:
                        waiting.discard(task)
                if request is None and not fed:
                    # RFC 9112 2.2: empty lines before a request line are ignored (some
                    # clients send a CRLF after a POST's body); the request is then
                    # counted from its first byte on, and b"" still ends the stream
                    if data and not (data := data.lstrip(b"\r\n")):
                        continue
                fed = fed or bool(data)
                parser.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                if event.http_version not in (b"1.0", b"1.1"):  # h11 takes any as 1.1
                    raise h11.RemoteProtocolError(
                        f"HTTP/{event.http_version.decode(errors='replace')} is not supported: "
                        "this server speaks HTTP/1.1 (and 1.0)", error_status_hint=505)
                request = event
                # where the head ends in what the log holds since the export (the parser's
                # buffer holds what comes after it): the body must fit behind it
                head_end = conn.log_consumed - len(parser.trailing_data[0])
                if head_end - begin > head_max:  # (h11 checks only a head still incomplete:
                    # the same head is refused however it arrived)
                    raise h11.RemoteProtocolError(f"request head too large: at most {head_max} "
                                                  "bytes", error_status_hint=431)
                length = None if _chunked(event) else next(
                    (int(v) for k, v in event.headers if k == b"content-length"), None)
                if length is not None and head_end + length > conn.log_capacity:
                    raise _TooLarge(_too_large(conn.log_capacity))
                if event.http_version == b"1.1" and any(
                        k == b"expect" and v.lower() == b"100-continue" for k, v in event.headers):
                    # always, even if the body came with the head: a replay must send it too
                    cb.writer.write(parser.send(h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue")))
                    await cb.writer.drain()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise _Done
    finally:
        if waiting is not None:
            waiting.discard(task)


def _past_blank_lines(parser, head_max: int):
    """The parser for the next request: `parser`, or one past the empty lines that begin
    the input it read ahead (RFC 9112 2.2: they are ignored; h11 refuses them). Between
    requests h11 keeps nothing else, so a new one is the same parser. The lines are then
    no longer unread: a recovery does not replay them."""
    import h11

    ahead, closed = parser.trailing_data
    if ahead[:1] not in (b"\r", b"\n"):
        return parser
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=head_max)
    if rest := ahead.lstrip(b"\r\n"):
        parser.receive_data(rest)
    if closed:
        parser.receive_data(b"")
    return parser


def _chunked(request) -> bool:
    return any(k == b"transfer-encoding" for k, _ in request.headers)


def _too_large(capacity: int) -> str:
    return (f"request too large: a session's request (head and body) must fit its receive "
            f"log of {capacity} bytes (the server's --log-capacity)")


async def _linger(cb) -> None:
    """After refusing a request whose body may still be arriving: stop sending and read
    what comes, dropped, for up to LINGER_S, so that closing does not reset the
    connection before the client has read the refusal (unread input makes close() send
    a reset, and the client's stack may drop the response with it)."""
    cb.reader.unwatch()  # read here, past the log (which is full, or not needed)
    await _drop_input(cb.conn.sock)


async def _drop_input(sock: socket.socket) -> None:
    """Shut the sending side and read what comes, dropped, for up to LINGER_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + LINGER_S
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := end - loop.time()) > 0:
            if not await asyncio.wait_for(loop.sock_recv(sock, READ), left):
                return
    except (OSError, TimeoutError):
        return


def _scope(request, client, server, root_path: str, ext: dict, state: dict) -> dict:
    target = request.target
    if ABSOLUTE_FORM.match(target):  # RFC 9112 3.2.2: a server takes it; RFC 3986 3: the
        # authority ends at the first "/", "?" or "#", and an empty path is "/"
        rest = target.split(b"://", 1)[1].partition(b"#")[0]  # (a fragment is no path)
        end = min((i for i in map(rest.find, (b"/", b"?", b"#")) if i >= 0), default=len(rest))
        target = rest[end:]
        target = target if target.startswith(b"/") else b"/" + target
    path, _, query = target.partition(b"?")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode(), "method": request.method.decode(),
        "scheme": "http", "path": _unquote(path), "raw_path": path, "query_string": query,
        "root_path": root_path, "headers": [(k.lower(), v) for k, v in request.headers],
        "client": client, "server": server, "extensions": {"backdoors.session": ext},
        "state": dict(state),  # (ASGI: a shallow copy of the lifespan's, per request)
    }


def _unquote(path: bytes) -> str:
    from urllib.parse import unquote

    return unquote(path.decode("latin-1"))


async def _call(app, scope: dict, body: bytes, sock: socket.socket | None = None,
                limit: int | None = None) -> tuple[int, list, list[bytes]]:
    """Run the application on one request; its whole response (500 if it fails, or
    returns before its body's end; a 500 that ends the connection once its body passes
    `limit` bytes: the response is held whole before it is sent, so an endless stream
    must not grow the server without bound). Once it has the body, `receive()` says
    `http.disconnect` when the response is done or the client went away (`sock` hung
    up: an application waiting for that, a long poll, ends)."""
    sent_body = False
    start: dict | None = None
    chunks: list[bytes] = []
    size, over = 0, False
    finished = asyncio.Event()

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not finished.is_set():
            if sock is not None and ready(sock.fileno(), select.POLLRDHUP):
                break
            try:
                await asyncio.wait_for(finished.wait(), HANGUP_POLL_S)
            except TimeoutError:
                pass
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal start, size, over
        kind = message["type"]
        if finished.is_set():
            raise RuntimeError(f"{kind} after the response's end")
        if kind == "http.response.start":
            if start is not None:
                raise RuntimeError("http.response.start sent twice")
            start = message
        elif kind == "http.response.body":
            if start is None:
                raise RuntimeError("http.response.body before http.response.start")
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if limit is not None and size > limit:
                over = True
                chunks.clear()
                finished.set()
                raise RuntimeError(f"the response passed {limit} bytes, the most this server "
                                   "holds (a response is sent whole; --max-response)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                finished.set()

    # the response is whole at its body's end: what the application does after (a
    # background task) runs on while it is sent, as in other ASGI servers
    task = asyncio.ensure_future(app(scope, receive, send))
    ended = asyncio.ensure_future(finished.wait())
    try:
        await asyncio.wait((task, ended), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # (the session cancelled: the application with it)
        task.cancel()
        raise
    finally:
        ended.cancel()
    if over:
        log.error("asgi: the application's response to %s %s passed %d bytes: 500, and the "
                  "connection ends", scope["method"], scope["path"], limit)
        if task.done() and not task.cancelled():
            task.exception()  # (the error it was sent: told above)
        elif not task.done():
            task.cancel()
        return 500, [(b"content-type", b"text/plain"), (b"connection", b"close")], [
            b"response too large\n"]
    if not task.done():
        _AFTER.add(task)
        task.add_done_callback(functools.partial(_after_response, scope))
    elif not task.cancelled() and (err := task.exception()) is not None:
        log.error("asgi: the application failed on %s %s", scope["method"], scope["path"],
                  exc_info=err)
        if start is None or not finished.is_set():
            finished.set()
            return 500, [(b"content-type", b"text/plain")], [b"Internal Server Error\n"]
    done = finished.is_set()
    finished.set()  # (what still waits in receive() ends)
    if start is None:
        return 500, [(b"content-type", b"text/plain")], [b"no response from the application\n"]
    if not done:
        log.error("asgi: the application returned before its response's end on %s %s",
                  scope["method"], scope["path"])
        return 500, [(b"content-type", b"text/plain")], [b"incomplete response\n"]
    # (a start without a status, or headers None: a 500 from _encode, the session goes on)
    return start.get("status"), list(start.get("headers") or []), chunks


#: applications still running after their response's end (background tasks), held here
_AFTER: set[asyncio.Task] = set()


def _after_response(scope: dict, task: asyncio.Task) -> None:
    _AFTER.discard(task)
    if not task.cancelled() and (err := task.exception()) is not None:
        log.error("asgi: the application failed after its response on %s %s",
                  scope["method"], scope["path"], exc_info=err)


def _encode(parser, request, status: int, headers: list, body: bytes) -> bytes:
    """The response's bytes: its Content-Length the body's (a HEAD's and a 304's the
    application's, which are the length a GET would have, or none when it gave none;
    none for a 204). What h11
    refuses to send (a 1xx or 101 status, a header with a line break, a body for a 204,
    an answer to CONNECT) is a 500 that ends the connection, not a session failed."""
    import h11

    try:
        names = {bytes(k).lower() for k, _ in headers}
        keep = request.method == b"HEAD" or status == 304
        headers = [(bytes(k), bytes(v)) for k, v in headers
                   if keep or bytes(k).lower() != b"content-length"]
        if status not in (204, 304) and b"content-length" not in {k.lower() for k, _ in headers} \
                and (body or request.method != b"HEAD"):  # (RFC 9110 8.6: a HEAD's only if
            headers.append((b"content-length", str(len(body)).encode()))  # it is a GET's)
        if b"server" not in names:
            headers.append((b"server", SERVER_NAME))
        if b"date" not in names:  # RFC 9110 6.6.1 (exported with the response: a resend
            headers.append((b"date", _date()))  # is the same)
        if _framed_twice(request):  # RFC 9112 6.1: it ends its connection
            headers.append((b"connection", b"close"))
        out = parser.send(h11.Response(status_code=status, headers=headers,
                                       reason=_reason(status)))
        if request.method != b"HEAD" and body:
            out += parser.send(h11.Data(data=body))
        return out + parser.send(h11.EndOfMessage())
    except (h11.LocalProtocolError, TypeError, ValueError) as e:
        log.error("asgi: the application's response to %s %s cannot be sent (%s): 500",
                  request.method.decode(errors="replace"),
                  request.target[:200].decode(errors="replace"), e)
        return _closing_500(b"the application's response cannot be sent\n")


def _closing_500(text: bytes) -> bytes:
    """A 500 that ends the connection, made without h11 (whose state the failed
    response may have left unusable)."""
    return (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\nconnection: close\r\nserver: %s\r\n\r\n%s"
            % (len(text), SERVER_NAME, text))


_dated: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The HTTP date of now (made once a second)."""
    global _dated
    now = int(time.time())
    if _dated[0] != now:
        _dated = (now, formatdate(now, usegmt=True).encode())
    return _dated[1]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:  # a status of the application's own
        return b""


def _without_input(reason: str) -> str:
    """h11's reason for refusing a request, without the repr of the client's bytes it
    may end with ("illegal request line: bytearray(b'...')"): an answer does not echo
    them back; the log keeps them."""
    return re.sub(r":\s*(?:bytearray\()?b['\"].*\Z", "", reason, flags=re.S)


def _plain(parser, status: int, text: str) -> bytes:
    import h11

    body = (text + "\n").encode()
    try:
        return (parser.send(h11.Response(status_code=status, reason=_reason(status), headers=[
            (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")])) + parser.send(h11.Data(data=body))
            + parser.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        return b""


class Lifespan:
    """The application's lifespan protocol: startup before serving, shutdown after. An
    application without one (it raises on the scope, or returns) is served all the same."""

    def __init__(self, app):
        self.app = app
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.state: dict = {}  # what the application keeps there, for every request

    async def _run(self) -> None:
        try:
            await self.app({"type": "lifespan", "asgi": {"version": "3.0"},
                            "state": self.state}, self.inbox.get, self.outbox.put)
        except Exception as e:  # noqa: BLE001 - no lifespan support
            log.debug("asgi: no lifespan (%s)", e)
        await self.outbox.put(None)

    async def _event(self, event: str) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": f"lifespan.{event}"})
        message = await self.outbox.get()
        if message is not None and message["type"] == f"lifespan.{event}.failed":
            raise RuntimeError(f"the application's {event} failed: {message.get('message', '')}")

    async def startup(self) -> None:
        self.task = asyncio.create_task(self._run())
        await self._event("startup")

    async def shutdown(self) -> None:
        await self._event("shutdown")


def _heartbeat(name: str, deadline: float) -> asyncio.Task:
    """A Sensor Box `name` whose progress sensor the event loop ticks every 10 ms (a
    stuck or frozen loop stops it), registered with the node's agent if there is one."""
    import os

    from .common.runtime import AGENT_SOCKET_ENV, register_box
    from .sensors import SensorBox

    box = SensorBox.create(name)
    progress = box.progress("progress", deadline=deadline, stamped=True)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)

    async def tick(box) -> None:  # holds the box for as long as it ticks
        while box.fd >= 0:
            progress.tick()
            await asyncio.sleep(0.01)

    return asyncio.create_task(tick(box))


def load(spec: str):
    """'module:attribute' -> the ASGI application."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SystemExit(f"application: expected module:attribute, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"application {spec}: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backdoors.asgi",
                                 description="Serve an ASGI application with recoverable "
                                             "sessions (Continuation Boxes).")
    ap.add_argument("app", help="module:attribute of the ASGI application")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--adopt", default=None, help="the adoption socket for recovered sessions "
                    "(default: from $BACKDOORS_ADOPT_SOCKET / $BACKDOORS_ADOPT_DIR)")
    ap.add_argument("--app-dir", default="", help="a directory to import the application from")
    ap.add_argument("--sensor-box", default="", metavar="NAME",
                    help="a Sensor Box NAME with a progress sensor the event loop ticks every "
                         "10 ms, registered with the node's agent: a hung or frozen server is "
                         "then seen by the monitors")
    ap.add_argument("--deadline", type=float, default=0.2,
                    help="the progress sensor's deadline (s), with --sensor-box")
    ap.add_argument("--state-capacity", type=int, default=STATE_CAPACITY,
                    help="bytes of each session's exported state, which holds the response "
                         "being sent (a recovery inside a bigger one ends the connection)")
    ap.add_argument("--log-capacity", type=int, default=LOG_CAPACITY,
                    help="bytes of each session's receive log, which holds a request until "
                         "it is answered: a request (head and body) that does not fit is "
                         "refused with 413 (default %(default)s)")
    ap.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                    help="while N client sessions are served, a new connection is answered "
                         "503 (sessions a recovery hands over are always taken). Default: "
                         f"half the descriptor limit's worth, at {SESSION_FDS} a session "
                         "(the other half for sessions a recovery brings)")
    ap.add_argument("--max-response", type=int, default=RESPONSE_MAX, metavar="BYTES",
                    help="the largest response body held: a response is sent whole once "
                         "the application has made it (that is what makes it "
                         "recoverable), so a bigger one, or an endless stream, is a 500 "
                         "that ends the connection (default %(default)s)")
    ap.add_argument("--timeout-idle", type=float, default=IDLE_S, metavar="S",
                    help="close a client that sends nothing for S seconds while a request "
                         "is awaited, or whose request (head and body) does not come whole "
                         "within S seconds of its first byte: clients gone "
                         "without a word do not hold their sessions at the agent for ever; "
                         "0: never (default %(default)s)")
    ap.add_argument("--spare-channels", type=int, default=SPARES, metavar="N",
                    help="once a session has opened a channel to a peer (the application's "
                         "connect), keep N more open to it, held by the agent, for the "
                         "sessions that come next: their first call then waits for no "
                         "connect and no registration. Made again once no session took one "
                         "for 0.2 s, closed after 60 s untaken. Worth about as many as the "
                         "new sessions that come at once, for an application whose sessions "
                         "open channels (see docs/casestudy.md for what was measured, and an "
                         "open question); 0: none (default %(default)s)")
    a = ap.parse_args(argv)
    if not 0 < a.state_capacity <= MAX_STATE_CAPACITY:
        ap.error(f"--state-capacity must be 1..{MAX_STATE_CAPACITY} bytes")
    if not 4096 <= a.log_capacity <= MAX_LOG_CAPACITY:
        ap.error(f"--log-capacity must be 4096..{MAX_LOG_CAPACITY} bytes")
    if a.timeout_idle < 0:
        ap.error("--timeout-idle must be 0 (never) or more seconds")
    if a.max_response < 1:
        ap.error("--max-response must be 1 or more bytes")
    if a.limit_concurrency is not None and a.limit_concurrency < 1:
        ap.error("--limit-concurrency must be 1 or more sessions")
    if not 0 <= a.spare_channels <= 1024:
        ap.error("--spare-channels must be 0..1024")
    default = session_limit(SESSION_FDS)  # it raises the descriptor limit, needed either way
    limit = a.limit_concurrency or default
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if a.app_dir:
        sys.path.insert(0, a.app_dir)
    app = load(a.app)

    async def main_task() -> None:
        listener = AsyncListener.tcp(a.host, a.port, adopt=a.adopt, backlog=1024)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # (Ctrl-C too: lifespan shutdown runs)
            loop.add_signal_handler(sig, listener.close)
        ticker = _heartbeat(a.sensor_box, a.deadline) if a.sensor_box else None
        life = Lifespan(app)
        await life.startup()
        print("asgi listening on %s:%d" % listener.address, flush=True)
        try:
            with listener:
                await serve(app, listener, state_capacity=a.state_capacity,
                            log_capacity=a.log_capacity, idle_s=a.timeout_idle or None,
                            limit=limit, state=life.state, response_max=a.max_response,
                            spares=a.spare_channels)
        finally:
            await life.shutdown()
            if ticker is not None:
                ticker.cancel()

    run(main_task())
    return 0


if __name__ == "__main__":
    sys.exit(main())

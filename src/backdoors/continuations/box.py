"""The Continuation Box API for server authors: create_cb, export, open_cb, import_state.

    while conn := listener.accept():          # new connections and recovered sessions
        cb = create_cb(conn)                  # region + I/O channel handed to the agent
        state = cb.import_state() or new_state(receive_request(cb.conn))
        ... send from state through cb.conn ...; cb.export(state)

A server made recoverable this way must be deterministic: given an exported state and
the input that follows it, it produces the same output bytes (see docs/continuations.md).
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import Future
from typing import Any

import msgspec

from ..errors import TcpRepairError
from . import cbformat
from .adoption import Recovered
from .agent_link import WORKER, NullRegistrar, Registrar, default_registrar
from .connection import RecoverableConnection
from .errors import ContinuationError, StateTooLargeError
from .image import decode_state
from .region import CbRegion, endpoints_of

DEFAULT_STATE_CAPACITY = 4096
DEFAULT_LOG_CAPACITY = 64 * 1024
#: descriptors a session holds in its server: its socket, its box's memfd and the duplicate
#: that Python's mmap keeps of it (the size of a session for common.fdtable.session_limit)
SESSION_FDS = 3

_encode = msgspec.msgpack.Encoder().encode


class ContinuationBox:
    """One client session's Continuation Box: its region, its connection, its exports."""

    def __init__(self, region: CbRegion, conn: RecoverableConnection, session: bytes, *,
                 version: int, last: tuple[cbformat.Encoding, bytes], recovered: bool,
                 registrar: Registrar):
        self.region, self.conn = region, conn
        self.session = session.hex()
        self.recovered = recovered
        self._version = version
        self._last = last
        self._registrar = registrar
        self.registered = False
        self._attaching: Future | None = None  # a background attach not finished yet

    @property
    def fd(self) -> int:
        """The region's memfd (what the agent holds)."""
        return self.region.fd

    @property
    def name(self) -> str:
        """The region's name for the agent: 'cb-<session id>'."""
        return f"cb-{self.session}"

    @property
    def version(self) -> int:
        """Number of the last export (0: never exported); it continues across recoveries."""
        return self._version

    def export(self, state: Any, *, unread: int = 0) -> int:
        """Store `state` atomically with the connection's stream positions; returns the
        export version. `state` is bytes, or anything msgspec encodes to msgpack
        (Structs, dicts, lists, numbers, strings). The receive log restarts here, less
        the last `unread` bytes consumed: input a parser read ahead and has not used yet
        (pipelined requests), which a recovery serves again rather than the state
        having to hold it."""
        if state is None:
            raise TypeError("export(None): None means 'no state'; export a value")
        if isinstance(state, (bytes, bytearray, memoryview)):
            encoding, data = cbformat.Encoding.RAW, bytes(state)
        else:
            encoding, data = cbformat.Encoding.MSGPACK, _encode(state)
        if len(data) > self.region.state_capacity:
            raise StateTooLargeError(
                f"session {self.session}: exported state is {len(data)} bytes, the box holds "
                f"{self.region.state_capacity}; create it with a larger state_capacity"
            )
        version = self._version + 1
        sent, received = self.conn._exported(unread)
        self.region.write_export(version, sent, received, encoding, data)
        self._version, self._last = version, (encoding, data)
        return version

    def import_state(self, type: Any = None) -> Any:  # noqa: A002 - mirrors msgspec
        """The last exported state, or None for a new session; decoded as `type` if given
        (e.g. a msgspec Struct class), else as plain msgpack values (bytes stay bytes)."""
        encoding, data = self._last
        return decode_state(encoding, data, type, self.session)

    def close(self) -> None:
        """End the session: release it at the agent, close the connection and region."""
        if self.region.fd < 0:
            return
        try:
            if self._attaching is not None:  # the agent must not be handed closed fds
                self._attaching.result()
            if self._to_release():
                self._registrar.detach(self)
        finally:
            self.conn.close()
            self.region.close()

    def _to_release(self) -> bool:
        """Whether the agent holds this session (registered, or recovered: the agent that
        handed it over holds it); the box counts as unregistered from here on."""
        held = self.registered or self.recovered
        self.registered = False
        return held

    def __enter__(self) -> ContinuationBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ContinuationBox {self.session} v{self._version} {self.conn!r}>"


def create_cb(
    conn: socket.socket | Recovered,
    *,
    state_capacity: int = DEFAULT_STATE_CAPACITY,
    log_capacity: int = DEFAULT_LOG_CAPACITY,
    registrar: Registrar | None = None,
) -> ContinuationBox:
    """The session's Continuation Box, for what `Listener.accept()` returned.

    A new connection (a socket nothing was read from or written to yet) gets a new, empty
    box; a recovered session gets the box it had (see open_cb). Either way the box's
    region and the socket are handed to the agent through `registrar` (default: the
    agent named by BACKDOORS_AGENT_SOCKET, or none). Capacities are bytes, multiples of 8.
    """
    if isinstance(conn, Recovered):
        return open_cb(conn, state_capacity=state_capacity, log_capacity=log_capacity,
                       registrar=registrar)
    box = new_box(conn, state_capacity=state_capacity, log_capacity=log_capacity,
                  registrar=registrar)
    box.registered = box._registrar.attach(box)
    return box


def new_box(conn: socket.socket, *, state_capacity: int, log_capacity: int,
            registrar: Registrar | None, channel_of: int = 0) -> ContinuationBox:
    """A new, empty box for a fresh connection, not yet handed to the agent (the part of
    create_cb that the threaded and the asyncio servers share); `channel_of`: this
    process connect()ed it, as a channel of its server on that port (not accepted it)."""
    if isinstance(conn, socket.socket) and conn.type == socket.SOCK_STREAM and \
            conn.family in (socket.AF_INET, socket.AF_INET6):
        # urgent data is a byte of the stream the box logs (out of line, a move could
        # not keep it: tcprepair/dump.py)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    _check_fresh(conn, bool(channel_of))
    session = os.urandom(cbformat.SESSION_SIZE)
    region = CbRegion.create(session, state_capacity=_round(state_capacity),
                             log_capacity=_round(log_capacity), endpoints=endpoints_of(conn),
                             channel_of=channel_of)
    try:
        rconn = RecoverableConnection(conn, region, session.hex())
        return ContinuationBox(region, rconn, session, version=0,
                               last=(cbformat.Encoding.NONE, b""), recovered=False,
                               registrar=registrar_or_default(registrar))
    except BaseException:
        region.close()
        raise


def open_cb(
    recovered: Recovered,
    *,
    state_capacity: int = DEFAULT_STATE_CAPACITY,
    log_capacity: int = DEFAULT_LOG_CAPACITY,
    registrar: Registrar | None = None,
) -> ContinuationBox:
    """The box of a recovered session, rolled back to its last export.

    The recovering server gets a region of its own (capacities: the larger of the old
    box's and the ones given) holding the last export and the input logged since, and a
    connection that replays that input before the socket's and discards the output the
    client already has. import_state() returns the exported state.

    If the box cannot be made (no memory, no descriptors, bad capacities), the session is
    dropped, not leaked: its socket is closed and the agent told to release it, so the
    client sees the connection end instead of waiting forever; the error is raised.
    """
    box = recovered_box(recovered, state_capacity=state_capacity, log_capacity=log_capacity,
                        registrar=registrar)
    # The agent that handed the session over already holds it: registering it again (under
    # this process) need not delay the session's first bytes.
    attach_in_background(box)
    return box


def attach_in_background(box: ContinuationBox) -> Future | None:
    """Hand `box` to the agent on the registration worker (agent_link.WORKER), in order
    with the other calls there; `box.registered` is set when done. None: no agent."""
    if isinstance(box._registrar, NullRegistrar):
        return None
    box._attaching = WORKER.submit_batched(_attach_open, box)
    return box._attaching


def _attach_open(boxes: list[ContinuationBox]) -> list[bool]:
    """Attach the boxes still open (a session may have ended meanwhile), each registrar's
    in one attach_many; whether each is registered."""
    by_registrar: dict[int, list[ContinuationBox]] = {}
    for box in boxes:
        if box.fd >= 0:
            by_registrar.setdefault(id(box._registrar), []).append(box)
    for group in by_registrar.values():
        registrar = group[0]._registrar
        many = getattr(registrar, "attach_many", None)
        got = many(group) if many is not None else [registrar.attach(box) for box in group]
        for box, registered in zip(group, got):
            box.registered = registered
    return [box.registered for box in boxes]


def recovered_box(recovered: Recovered, *, state_capacity: int, log_capacity: int,
                  registrar: Registrar | None) -> ContinuationBox:
    """The rolled-back box of a recovered session, not yet registered under this process
    (the part of open_cb that the threaded and the asyncio servers share); on failure the
    session is dropped (see open_cb) and the error raised."""
    registrar = registrar_or_default(registrar)
    try:
        image, plan, sock = recovered.image, recovered.plan, recovered.sock
        state_cap = max(_round(state_capacity), image.state_capacity)
        log_cap = max(_round(log_capacity), image.log_capacity)
        region = taken = _taken_over(recovered, state_cap, log_cap)
        if region is None:
            region = CbRegion.create(
                image.session,
                state_capacity=state_cap,
                log_capacity=log_cap,
                endpoints=endpoints_of(sock),
                recoveries=image.recoveries + 1,
                channel_of=image.home_port,
            )
    except BaseException:
        drop_recovered(recovered, registrar)
        raise
    try:
        ex = image.export
        if taken is None:  # a new region: the export and the log to replay (the copy has them)
            if ex.version:
                region.write_export(ex.version, ex.sent, ex.received, ex.encoding, ex.data,
                                    ex.exported_at_ns)
            region.put_log(plan.received, plan.replay)
        region.set_log_end(plan.read)
        rconn = RecoverableConnection(
            sock, region, image.session_id, sent=plan.sent, received=plan.received,
            log_end=plan.read, skip_until=plan.handed, tail=plan.tail,
        )
        box = ContinuationBox(region, rconn, image.session, version=ex.version,
                              last=(ex.encoding, ex.data), recovered=True,
                              registrar=registrar)
    except BaseException:
        region.close()
        drop_recovered(recovered, registrar)
        raise
    recovered.opened = True
    return box


def _taken_over(recovered: Recovered, state_capacity: int, log_capacity: int
                ) -> CbRegion | None:
    """The copy of the box handed over with the session, as its region: the agent made it
    for this hand-over and only reads it, and it holds the export and the receive log the
    session resumes from (nothing to fill). None, the copy closed, if there is none, or
    it is not a region of these capacities (a new region is made then)."""
    fd = recovered.take_cb_fd()
    if fd < 0:
        return None
    image = recovered.image
    region = None
    if (state_capacity, log_capacity) == (image.state_capacity, image.log_capacity):
        region = CbRegion.take_over(fd, state_capacity=state_capacity,
                                    log_capacity=log_capacity,
                                    recoveries=image.recoveries + 1)
    if region is None:
        os.close(fd)
    return region


def drop_recovered(recovered: Recovered, registrar: Registrar) -> None:
    """A recovered session this server will not serve: close its socket (FIN to the
    client) and have the agent, which held it at the hand-over, release it."""
    try:
        recovered.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    recovered.close()
    release_later = getattr(registrar, "release_later", None)
    if release_later is not None:  # never blocks: an asyncio server calls this too
        release_later(f"cb-{recovered.session}")


def registrar_or_default(registrar: Registrar | None) -> Registrar:
    if registrar is not None:
        return registrar
    return default_registrar()


def _round(n: int) -> int:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"capacity must be a positive number of bytes, got {n!r}")
    return cbformat.round8(n)


def _check_fresh(sock: socket.socket, active_open: bool = False) -> None:
    """A box must start with the connection: nothing read or written before it."""
    if not isinstance(sock, socket.socket):
        raise TypeError(f"create_cb needs a socket or a Recovered session, got {type(sock).__name__}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return  # no kernel byte counts to check (e.g. a Unix socket in tests)
    from ..tcprepair import bytes_handed, bytes_received

    try:
        handed, read = bytes_handed(sock, active_open=active_open), bytes_received(sock)
    except TcpRepairError:
        return  # the connection is already closing; nothing to recover anyway
    if handed > 0 or read > 0:
        raise ContinuationError(
            f"create_cb on a connection that already carried data ({handed} bytes written, "
            f"{read} read): call create_cb right after accept, before any send or recv"
        )

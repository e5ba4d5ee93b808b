"""Recovered sessions reaching a recovery server: the hand-over message and its sources.

At recovery the agent restores a session's socket in the recovery node, then hands the
socket, the session's Continuation Box (a memfd) and the socket's byte counts at the dump
to the recovery server. The local transport is a Unix stream socket at a path the
server listens on, carrying common.ipc frames; one frame per session:

    frame:      msgpack Handover {v, session, handed, read, tail}
    attached:   [restored socket fd, CB memfd]
    reply:      a frame, msgpack HandoverReply {session, ok, error}

The server validates before it replies: the CB parses, its session id matches, and it
agrees with the byte counts (CbImage.plan). `ok: false` means the server refused the
session (the sender still holds its copies and may try elsewhere); no reply means the
server is gone. `hand_over()` / `AdoptionClient` are the sending side (the agent's, and
the tests').
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Protocol

import msgspec

from ..common import ipc
from ..common.peers import not_the_agent
from ..tcprepair import TcpState
from .cbformat import SESSION_SIZE
from .errors import AdoptionError, ContinuationError, NoVerdict
from .image import CbImage, ResumePlan, read_cb

log = logging.getLogger("backdoors.continuations")

HANDOVER_VERSION = 1
TAIL_MAX = 64 * 1024  # bytes of the dumped send queue sent along to check regeneration
MAX_MESSAGE = TAIL_MAX + 4096
MAX_REPLY = 4096
BATCH = 256  # sessions taken per receive() at most
_FDS = 2


#: a stream position as the CB plans it (image._MAX_POSITION): a byte count below 2**62
Position = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
#: a session id as the CB holds it: 16 bytes, lower-case hex
SessionHex = Annotated[str, msgspec.Meta(pattern=f"^[0-9a-f]{{{2 * SESSION_SIZE}}}$")]


class Handover(msgspec.Struct, forbid_unknown_fields=True):
    """The metadata of one recovered session (travels with its two fds). Decoding checks
    the ranges: a field out of range is refused by name before anything else is read."""

    v: Annotated[int, msgspec.Meta(ge=0, le=255)]
    session: SessionHex  # hex session id, as in the CB
    handed: Position  # bytes the old application had written to the socket (TcpState.handed)
    read: Position  # bytes it had read from it (TcpState.read)
    # the last bytes of output ending at `handed` (the dumped send queue)
    tail: Annotated[bytes, msgspec.Meta(max_length=TAIL_MAX)] = b""

    @classmethod
    def from_tcp_state(cls, session: str, state: TcpState, *, tail_max: int = TAIL_MAX) -> Handover:
        """The hand-over for a socket dumped as `state` (dumped with `since=` when it had
        been restored before, so the counts continue the session's)."""
        tail = state.send_queue[max(0, len(state.send_queue) - tail_max):]
        return cls(HANDOVER_VERSION, session, state.handed, state.read, tail)


class HandoverReply(msgspec.Struct):
    session: str
    ok: bool
    error: str = ""


_decode_handover = msgspec.msgpack.Decoder(Handover).decode
_decode_reply = msgspec.msgpack.Decoder(HandoverReply).decode


@dataclass(eq=False)
class Recovered:
    """A recovered session ready for create_cb/open_cb: restored socket, CB, plan."""

    sock: socket.socket
    image: CbImage
    plan: ResumePlan
    opened: bool = field(default=False)

    @property
    def session(self) -> str:
        return self.image.session_id

    def close(self) -> None:
        """Drop a session that will not be served (its socket is closed)."""
        self.sock.close()


def prepare(sock: socket.socket, cb_fd: int, handover: Handover) -> Recovered:
    """Validate a handed-over session; ContinuationError (with the reason) if unusable.

    Reads the CB from `cb_fd` (the caller keeps and closes `cb_fd`).
    """
    if handover.v != HANDOVER_VERSION:
        raise AdoptionError(f"hand-over version {handover.v}, this server knows {HANDOVER_VERSION}")
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise AdoptionError(f"session {handover.session}: the handed socket is not a TCP socket")
    try:
        sock.getpeername()
    except OSError:
        raise AdoptionError(f"session {handover.session}: the handed socket is not connected") from None
    image = read_cb(cb_fd)
    if image.session_id != handover.session:
        raise AdoptionError(
            f"hand-over names session {handover.session} but the CB holds {image.session_id}"
        )
    plan = image.plan(handover.handed, handover.read, handover.tail)
    return Recovered(sock, image, plan)


class AdoptionSource(Protocol):
    """Where recovered sessions come from; a Listener polls `fileno()` for readability."""

    def fileno(self) -> int: ...

    def receive(self) -> Recovered | None:
        """The next recovered session if one is ready, else None; never blocks. Called
        by the Listener when fileno() is readable and before each wait."""

    def close(self) -> None: ...


class UnixAdoptionSource:
    """Receives sessions on a Unix stream socket at `path` (mode 0600).

    A stale socket file of a dead server is replaced; one in use is an error. Only the
    agent may hand sessions over: a connection from a peer that cannot be the agent
    (common.peers.not_the_agent: another process of this node) gets one reply naming the
    reason and is closed unread; `refused` counts them.
    """

    def __init__(self, path: str, *, backlog: int = 16):
        self.path = path
        try:
            self._listener = ipc.listen(path, mode=0o600, backlog=backlog)
        except ipc.SocketInUse:
            raise AdoptionError(f"another recovery server listens at {path}") from None
        except ipc.NotASocket:
            raise AdoptionError(f"{path} exists and is not a socket: choose another "
                                "adoption path") from None
        except OSError as err:
            raise AdoptionError(f"cannot listen for recovered sessions at {path}: "
                                f"{err.strerror}") from None
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        self._conns: dict[int, socket.socket] = {}
        self._readers: dict[int, ipc.FrameReader] = {}
        self._ready: deque[Recovered] = deque()
        self.refused = 0  # connections refused: not from the agent

    def fileno(self) -> int:
        return self._epoll.fileno()

    def receive(self) -> Recovered | None:
        """The next session. Everything already sent is taken (and answered) at once, so
        a sender handing over many sessions waits for one round trip, not one each."""
        if not self._ready:
            for _ in range(BATCH):
                events = self._epoll.poll(0)
                if not events:
                    break
                for fd, _ in events:
                    if fd == self._listener.fileno():
                        self._accept()
                    elif (conn := self._conns.get(fd)) is not None:
                        recovered = self._receive_from(conn)
                        if recovered is not None:
                            self._ready.append(recovered)
        return self._ready.popleft() if self._ready else None

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        if (why := not_the_agent(conn)) is not None:
            self.refused += 1
            log.warning("refused a connection to %s: %s", self.path, why)
            try:  # the reason, best effort (never blocks), then nothing more is read
                conn.setblocking(False)
                conn.send(ipc.pack(HandoverReply("?", False, f"hand-over refused: {why}")))
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = conn
        self._readers[conn.fileno()] = ipc.FrameReader(max_bytes=MAX_MESSAGE, max_fds=_FDS)
        self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _drop(self, conn: socket.socket) -> None:
        self._conns.pop(conn.fileno(), None)
        if (reader := self._readers.pop(conn.fileno(), None)) is not None:
            reader.discard()
        try:
            self._epoll.unregister(conn.fileno())
        except (OSError, ValueError):
            pass
        conn.close()

    def _receive_from(self, conn: socket.socket) -> Recovered | None:
        try:
            frame = self._readers[conn.fileno()].read(conn)
        except ipc.FrameError as err:  # a sender breaking the framing is not heard further
            if not isinstance(err, ipc.PeerClosed):
                log.warning("refused a hand-over: %s", err.strerror)
                self._reply(conn, HandoverReply("?", False, f"hand-over refused: {err.strerror}"))
            self._drop(conn)
            return None
        except OSError:
            self._drop(conn)
            return None
        if frame is None:
            return None
        fds = frame.fds
        session = "?"
        sock: socket.socket | None = None
        try:
            try:
                handover = _decode_handover(frame.payload)
                session = handover.session
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                handover = None
                bad_metadata = f"hand-over metadata does not decode: {err}"
            if len(fds) != _FDS:
                raise AdoptionError(f"hand-over carries {len(fds)} fds, expected {_FDS} (socket, CB)")
            if handover is None:
                raise AdoptionError(bad_metadata)
            sock = socket.socket(fileno=fds[0])
            fds[0] = -1
            recovered = prepare(sock, fds[1], handover)
        except (ContinuationError, OSError) as err:
            if sock is not None:
                sock.close()
            log.warning("refused recovered session %s: %s", session, err)
            self._reply(conn, HandoverReply(session, False, str(err)))
            return None
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        self._reply(conn, HandoverReply(session, True))
        return recovered

    def _reply(self, conn: socket.socket, reply: HandoverReply) -> None:
        try:
            ipc.send(conn, reply)
        except OSError:
            self._drop(conn)

    def close(self) -> None:
        while self._ready:  # taken but never served: their sockets close (sender has copies)
            self._ready.popleft().close()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._epoll.close()
        if self._listener.fileno() >= 0:
            self._listener.close()
            ipc.unlink_socket(self.path)

    def __enter__(self) -> UnixAdoptionSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AdoptionClient:
    """The sending side: hands recovered sessions to the server listening at `path`."""

    def __init__(self, path: str, *, timeout: float = 5.0):
        self.path = path
        try:
            self._sock = ipc.connect(path, timeout=timeout)
        except OSError as err:
            raise AdoptionError(
                f"no recovery server at {path}: {err.strerror}; is it running with this "
                "adoption socket?"
            ) from None

    @property
    def server_pid(self) -> int:
        """The pid of the recovery server at the other end (SO_PEERCRED)."""
        return ipc.peer_credentials(self._sock)[0]

    def hand_over(self, sock: socket.socket | int, cb_fd: int, handover: Handover) -> None:
        """Send one session and wait for the server's verdict; AdoptionError if refused.

        The caller keeps its own descriptors (the server gets duplicates)."""
        error = self.hand_over_all([(sock, cb_fd, handover)])[0]
        if error is not None:
            raise error

    def hand_over_all(
        self, sessions: list[tuple[socket.socket | int, int, Handover]], *,
        timeout: float | None = None,
    ) -> list[AdoptionError | None]:
        """Send every session, then collect the verdicts (one round trip for all, not
        one per session); returns None or the AdoptionError of each, in order. A broken
        transport while sending raises AdoptionError. Once all are sent, the verdicts
        read are kept: a session whose verdict does not come (`timeout`, if given, else
        the client's; or the connection broke) gets NoVerdict, as the server may have
        taken it (it reads what was sent even after this side closes)."""
        for sock, cb_fd, handover in sessions:
            fd = sock if isinstance(sock, int) else sock.fileno()
            try:
                ipc.send(self._sock, handover, (fd, cb_fd))
            except OSError as err:
                if isinstance(err, (BrokenPipeError, ConnectionResetError)):
                    self._raise_refusal()  # refused at accept: its reason is queued here
                raise AdoptionError(
                    f"hand-over of session {handover.session} to {self.path} failed: {err}"
                ) from None
        if timeout is not None:
            self._sock.settimeout(timeout)
        verdicts: list[AdoptionError | None] = []
        for _, _, handover in sessions:
            try:
                verdicts.append(self._verdict(handover))
            except AdoptionError as err:  # this one and the rest: unanswered
                gone = NoVerdict(f"{err}; the server may hold the session")
                verdicts += [gone] * (len(sessions) - len(verdicts))
                break
        return verdicts

    def _raise_refusal(self) -> None:
        """Raise the server's refusal if one waits unread (a server refuses a peer at
        accept with one reply, then closes); return if none does."""
        payload = ipc.recv_queued(self._sock, max_bytes=MAX_REPLY)
        if payload is None:
            return
        try:
            reply = _decode_reply(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if not reply.ok:
            raise AdoptionError(f"recovery server at {self.path} refused the hand-over: "
                                f"{reply.error}")

    def _verdict(self, handover: Handover) -> AdoptionError | None:
        try:
            raw = ipc.recv(self._sock, max_bytes=MAX_REPLY).payload
        except ipc.PeerClosed:
            raise AdoptionError(f"recovery server at {self.path} closed without answering") from None
        except OSError as err:
            raise AdoptionError(f"no verdict from {self.path} on session {handover.session}: {err}") from None
        try:
            reply = _decode_reply(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise AdoptionError(f"bad reply from recovery server at {self.path}: {err}") from None
        if not reply.ok:
            return AdoptionError(f"recovery server at {self.path} refused session {handover.session}: {reply.error}")
        if reply.session != handover.session:
            raise AdoptionError(f"recovery server at {self.path} accepted session "
                                f"{reply.session}, expected {handover.session}")
        return None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdoptionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hand_over(path: str, sock: socket.socket | int, cb_fd: int, handover: Handover,
              *, timeout: float = 5.0) -> None:
    """Hand one recovered session to the server listening at `path` (see AdoptionClient)."""
    with AdoptionClient(path, timeout=timeout) as client:
        client.hand_over(sock, cb_fd, handover)


def cb_memfd(name: str, data: bytes) -> int:
    """A sealed memfd holding a copy of a Continuation Box, to hand over with its session."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd

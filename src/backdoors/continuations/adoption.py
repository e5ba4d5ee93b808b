"""Recovered sessions reaching a recovery server: the hand-over message and its sources.

At recovery the agent restores a session's socket in the recovery node, then hands the
socket, the session's Continuation Box (a memfd) and the socket's byte counts at the dump
to the recovery server. The local transport is a Unix stream socket at a path the
server listens on, carrying common.ipc frames; one frame carries a batch of sessions:

    frame:      msgpack HandoverBatch {v, sessions: [Handover {session, handed, read, tail}]}
    attached:   2 fds per session, in order: [socket 0, CB memfd 0, socket 1, CB 1, ...]
    reply:      one frame, msgpack HandoverVerdicts {verdicts: [HandoverReply {session, ok,
                error}], error}: a verdict per session, in order; or none and `error` when
                the frame as a whole was refused (its metadata does not decode, its
                descriptors do not match the sessions)

A batch holds at most MAX_BATCH sessions (SCM_RIGHTS carries SCM_MAX_FD descriptors per
message) and MAX_MESSAGE bytes; the sender splits larger hand-overs into frames and keeps
a window of them in flight, so a thousand sessions cost a handful of messages and no
round trip each. The server validates each session before it answers: the CB parses, its
session id matches, and it agrees with the byte counts (CbImage.plan). `ok: false` means
the server refused that session (and closed its copies; the sender still holds its own
and may try elsewhere) while the others of the batch are adopted; no reply means the
server is gone. `hand_over()` / `AdoptionClient` are the sending side (the agent's, and
the tests').
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

import msgspec

from ..common import fdtable, ipc
from ..common.accepting import Pause
from ..common.peers import not_the_agent
from ..tcprepair import TcpState
from .cbformat import SESSION_SIZE
from .errors import AdoptionError, ContinuationError, NotHanded, NoVerdict
from .image import CbImage, ResumePlan, read_cb, read_copy

log = logging.getLogger("backdoors.continuations")

HANDOVER_VERSION = 2  # 2: a frame carries a batch of sessions, one reply frame per batch
TAIL_MAX = 64 * 1024  # bytes of the dumped send queue sent along to check regeneration
_FDS = 2  # per session: its socket, its CB memfd
MAX_BATCH = ipc.SCM_MAX_FD // _FDS  # sessions per frame: their fds travel in one message
MAX_MESSAGE = 1 << 20  # bytes of one batch frame (a session with the largest tail fits)
MAX_REPLY = MAX_BATCH * 4096 + 4096  # a verdict per session, each error at most ~4 KiB
ERROR_MAX = 4000  # characters of one refusal's reason sent back
WINDOW = 8  # batch frames a sender has in flight before it waits for a verdict
#: sessions taken per receive() at most: about a frame's, served before the next frame is
#: read, so that the first sessions of a large hand-over resume while the rest arrive
BATCH = MAX_BATCH


#: a stream position as the CB plans it (image._MAX_POSITION): a byte count below 2**62
Position = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
#: a session id as the CB holds it: 16 bytes, lower-case hex
SessionHex = Annotated[str, msgspec.Meta(pattern=f"^[0-9a-f]{{{2 * SESSION_SIZE}}}$")]


class Handover(msgspec.Struct, forbid_unknown_fields=True):
    """The metadata of one recovered session (travels with its two fds). Decoding checks
    the ranges: a field out of range is refused by name before anything else is read."""

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
        return cls(session, state.handed, state.read, tail)


class HandoverBatch(msgspec.Struct, forbid_unknown_fields=True):
    """One frame: a batch of sessions, their fds attached in the same order."""

    v: Annotated[int, msgspec.Meta(ge=0, le=255)]
    sessions: Annotated[list[Handover], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class HandoverReply(msgspec.Struct):
    """The verdict on one session."""

    session: str
    ok: bool
    error: str = ""


class HandoverVerdicts(msgspec.Struct):
    """The reply to one batch: a verdict per session in order, or (none and) `error` if
    the whole frame was refused."""

    verdicts: list[HandoverReply] = []
    error: str = ""


class _Versioned(msgspec.Struct):
    v: object = None


_decode_batch = msgspec.msgpack.Decoder(HandoverBatch).decode
_decode_version = msgspec.msgpack.Decoder(_Versioned).decode
_decode_verdicts = msgspec.msgpack.Decoder(HandoverVerdicts).decode


def _batch_error(payload: bytes, err: Exception) -> str:
    """Why a batch frame does not decode; a frame of another hand-over version says so."""
    try:
        v = _decode_version(payload).v
    except (msgspec.DecodeError, msgspec.ValidationError):
        v = None
    if isinstance(v, int) and not isinstance(v, bool) and v != HANDOVER_VERSION:
        return f"hand-over version {v}, this server knows {HANDOVER_VERSION}"
    return f"hand-over metadata does not decode: {err}"


@dataclass(eq=False)
class Recovered:
    """A recovered session ready for create_cb/open_cb: restored socket, CB, plan."""

    sock: socket.socket
    image: CbImage
    plan: ResumePlan
    opened: bool = field(default=False)
    #: the handed copy of the CB (a memfd cb_memfd made for this hand-over), which the
    #: recovered box takes over as its own region (take_cb_fd); -1: none
    cb_fd: int = -1
    _closer: weakref.finalize | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cb_fd >= 0:  # closed with the session if nothing takes it
            self._closer = weakref.finalize(self, os.close, self.cb_fd)

    @property
    def session(self) -> str:
        return self.image.session_id

    def take_cb_fd(self) -> int:
        """The handed CB's memfd, from now on the caller's to close; -1 if none."""
        fd, self.cb_fd = self.cb_fd, -1
        if self._closer is not None:
            self._closer.detach()
            self._closer = None
        return fd

    def close(self) -> None:
        """Drop a session that will not be served (its socket and CB copy are closed)."""
        self.sock.close()
        if (fd := self.take_cb_fd()) >= 0:
            os.close(fd)


def prepare(sock: socket.socket, cb_fd: int, handover: Handover) -> Recovered:
    """Validate a handed-over session; ContinuationError (with the reason) if unusable.

    Reads the CB from `cb_fd`; the caller keeps and closes `cb_fd`. When it is a copy made
    for the hand-over (is_handed_copy), the Recovered holds a duplicate, which its box
    takes over (Recovered.take_cb_fd); any other box is copied into a new one.
    """
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise AdoptionError(f"session {handover.session}: the handed socket is not a TCP socket")
    try:
        sock.getpeername()
    except OSError:
        raise AdoptionError(f"session {handover.session}: the handed socket is not connected") from None
    handed_copy = is_handed_copy(cb_fd)
    # a copy no process writes is read once, whole (no page for its holes); any other box
    # under its seqlock
    image = read_copy(cb_fd) if handed_copy else read_cb(cb_fd, map=False)
    if image.session_id != handover.session:
        raise AdoptionError(
            f"hand-over names session {handover.session} but the CB holds {image.session_id}"
        )
    plan = image.plan(handover.handed, handover.read, handover.tail)
    copy = os.dup(cb_fd) if handed_copy else -1
    return Recovered(sock, image, plan, cb_fd=copy)


class AdoptionSource(Protocol):
    """Where recovered sessions come from; a Listener polls `fileno()` for readability."""

    def fileno(self) -> int: ...

    def receive(self) -> Recovered | None:
        """The next recovered session if one is ready, else None; never blocks. Called
        by the Listener when fileno() is readable and before each wait."""

    def close(self) -> None: ...


def resume_in(source: AdoptionSource | None) -> float:
    """Seconds until `source` takes connections again after a pause (0: it does, or it
    cannot pause): the listener looks at it again then."""
    resume = getattr(source, "resume_in", None)
    return resume() if resume is not None else 0.0


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
        fdtable.reserve()  # sessions arrive by the thousand, two descriptors each
        self._conns: dict[int, socket.socket] = {}
        self._readers: dict[int, ipc.FrameReader] = {}
        self._ready: deque[Recovered] = deque()
        self.refused = 0  # connections refused: not from the agent
        self._pause = Pause(f"adoption socket {path}")
        self._paused = False

    def fileno(self) -> int:
        return self._epoll.fileno()

    def receive(self) -> Recovered | None:
        """The next session. Every batch already sent is taken and answered (one reply
        frame per batch), up to BATCH sessions, before the first is returned: a sender
        handing over many sessions waits for no round trip per session."""
        if self._paused and not self._pause.remaining():
            self._paused = False
            self._epoll.register(self._listener.fileno(), select.EPOLLIN)
        if not self._ready:
            for _ in range(BATCH):  # bounded: a sender that never stops cannot hold it here
                events = self._epoll.poll(0)
                if not events or len(self._ready) >= BATCH:
                    break
                for fd, _ in events:
                    if fd == self._listener.fileno():
                        self._accept()
                    elif (conn := self._conns.get(fd)) is not None:
                        self._ready.extend(self._receive_from(conn))
        return self._ready.popleft() if self._ready else None

    def resume_in(self) -> float:
        """Seconds until it takes connections again after running out of descriptors
        (0: it does); the listener calls receive() then."""
        return self._pause.remaining() if self._paused else 0.0

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as err:
            if not self._pause.absorb(err):
                raise
            if self._pause.remaining():  # out of descriptors: not watched until it ends
                self._paused = True
                self._epoll.unregister(self._listener.fileno())
            return
        self._pause.accepted()
        if (why := not_the_agent(conn)) is not None:
            self.refused += 1
            log.warning("refused a connection to %s: %s", self.path, why)
            try:  # the reason, best effort (never blocks), then nothing more is read
                conn.setblocking(False)
                conn.send(ipc.pack(HandoverVerdicts(error=f"hand-over refused: {why}")))
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        self._conns[conn.fileno()] = conn
        self._readers[conn.fileno()] = ipc.FrameReader(max_bytes=MAX_MESSAGE,
                                                       max_fds=_FDS * MAX_BATCH)
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

    def _receive_from(self, conn: socket.socket) -> list[Recovered]:
        """The sessions of the next batch frame on `conn` that check (each refused one
        closed and named in the reply); [] if no complete frame is there yet."""
        try:
            frame = self._readers[conn.fileno()].read(conn)
        except ipc.FrameError as err:  # a sender breaking the framing is not heard further
            if not isinstance(err, ipc.PeerClosed):
                log.warning("refused a hand-over: %s", err.strerror)
                self._reply(conn, HandoverVerdicts(error=f"hand-over refused: {err.strerror}"))
            self._drop(conn)
            return []
        except OSError:
            self._drop(conn)
            return []
        if frame is None:
            return []
        fds = frame.fds
        try:
            try:
                batch = _decode_batch(frame.payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                raise AdoptionError(_batch_error(frame.payload, err)) from None
            if batch.v != HANDOVER_VERSION:
                raise AdoptionError(f"hand-over version {batch.v}, this server knows "
                                    f"{HANDOVER_VERSION}")
            if len(fds) != _FDS * len(batch.sessions):
                raise AdoptionError(f"hand-over of {len(batch.sessions)} sessions carries "
                                    f"{len(fds)} fds, expected {_FDS * len(batch.sessions)} "
                                    "(a socket and a CB each)")
        except AdoptionError as err:
            for fd in fds:
                os.close(fd)
            log.warning("refused a hand-over batch: %s", err)
            self._reply(conn, HandoverVerdicts(error=str(err)[:ERROR_MAX]))
            return []
        recovered, verdicts = [], []
        for i, handover in enumerate(batch.sessions):
            sock_fd, cb_fd = fds[_FDS * i], fds[_FDS * i + 1]
            sock: socket.socket | None = None
            try:
                sock = socket.socket(fileno=sock_fd)
                recovered.append(prepare(sock, cb_fd, handover))
                verdicts.append(HandoverReply(handover.session, True))
            except (ContinuationError, OSError) as err:
                if sock is not None:
                    sock.close()
                else:  # not a socket at all
                    os.close(sock_fd)
                log.warning("refused recovered session %s: %s", handover.session, err)
                verdicts.append(HandoverReply(handover.session, False, str(err)[:ERROR_MAX]))
            finally:
                os.close(cb_fd)
        self._reply(conn, HandoverVerdicts(verdicts))
        return recovered

    def _reply(self, conn: socket.socket, reply: HandoverVerdicts) -> None:
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
    """The sending side: hands recovered sessions to the server listening at `path`, in
    batch frames of up to `batch` sessions, `window` frames in flight."""

    def __init__(self, path: str, *, timeout: float = 5.0, batch: int = MAX_BATCH,
                 window: int = WINDOW):
        if not 1 <= batch <= MAX_BATCH or window < 1:
            raise ValueError(f"batch must be within 1..{MAX_BATCH} and window at least 1")
        self.path, self.timeout, self.batch, self.window = path, timeout, batch, window
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
        answered: Callable[[int, int, list[AdoptionError | None]], None] | None = None,
    ) -> list[AdoptionError | None]:
        """Send every session in batch frames and collect one verdict frame per batch
        (with `window` frames in flight); returns None or the AdoptionError of each, in
        order. A transport broken before anything was sent raises AdoptionError. Once
        frames are sent, their verdicts are kept: a session whose verdict does not come
        (`timeout`, if given, else the client's; or the connection broke) gets NoVerdict,
        as the server may have taken it (it reads what was sent even after this side
        closes); sessions not sent after that get NotHanded. `answered(lo, hi, verdicts)`
        is called with each batch's verdicts as they come (sessions[lo:hi]), in order,
        while the server takes the next batches."""
        frames = self._frames(sessions)
        verdicts: list[AdoptionError | None] = [None] * len(sessions)
        sent = done = 0  # frames
        wait = self.timeout if timeout is None else timeout
        try:
            while done < len(frames):
                if sent < len(frames) and sent - done < self.window:
                    self._send(sessions, *frames[sent], first=sent == 0)
                    sent += 1
                    continue
                lo, hi = frames[done]
                self._collect(sessions, lo, hi, verdicts, wait)
                done += 1
                if answered is not None:
                    answered(lo, hi, verdicts[lo:hi])
        except _Broken as broken:
            for lo, hi in frames[done:sent]:
                verdicts[lo:hi] = [NoVerdict(f"{broken}; the server may hold the session")] * (hi - lo)
            for lo, hi in frames[sent:]:
                verdicts[lo:hi] = [NotHanded(f"not handed to {self.path}: {broken}")] * (hi - lo)
        return verdicts

    def _frames(self, sessions: list) -> list[tuple[int, int]]:
        """[lo, hi) ranges of `sessions`: at most `batch` each, and MAX_MESSAGE bytes."""
        out, lo, size = [], 0, 0
        for i, (_, _, handover) in enumerate(sessions):
            n = len(handover.tail) + 160
            if i > lo and (i - lo == self.batch or size + n > MAX_MESSAGE - 64):
                out.append((lo, i))
                lo, size = i, 0
            size += n
        if lo < len(sessions):
            out.append((lo, len(sessions)))
        return out

    def _send(self, sessions: list, lo: int, hi: int, *, first: bool) -> None:
        fds: list[int] = []
        for sock, cb_fd, _ in sessions[lo:hi]:
            fds += (sock if isinstance(sock, int) else sock.fileno(), cb_fd)
        batch = HandoverBatch(HANDOVER_VERSION, [h for _, _, h in sessions[lo:hi]])
        self._sock.settimeout(self.timeout)
        try:
            ipc.send(self._sock, batch, fds)
        except OSError as err:
            if first:
                if isinstance(err, (BrokenPipeError, ConnectionResetError)):
                    self._raise_refusal()  # refused at accept: its reason is queued here
                raise AdoptionError(
                    f"hand-over of {hi - lo} sessions to {self.path} failed: {err}") from None
            raise _Broken(f"hand-over to {self.path} broke: {err}") from None

    def _collect(self, sessions: list, lo: int, hi: int, verdicts: list, wait: float) -> None:
        """Read the verdicts on the batch [lo, hi) into `verdicts`; _Broken if none comes."""
        self._sock.settimeout(wait)
        try:
            raw = ipc.recv(self._sock, max_bytes=MAX_REPLY).payload
        except ipc.PeerClosed:
            raise _Broken(f"recovery server at {self.path} closed without answering") from None
        except OSError as err:
            raise _Broken(f"no verdict from {self.path}: {err}") from None
        try:
            reply = _decode_verdicts(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise _Broken(f"bad reply from recovery server at {self.path}: {err}") from None
        if reply.error and not reply.verdicts:
            refused = AdoptionError(f"recovery server at {self.path} refused the hand-over: "
                                    f"{reply.error}")
            verdicts[lo:hi] = [refused] * (hi - lo)
            return
        names = [h.session for _, _, h in sessions[lo:hi]]
        if [v.session for v in reply.verdicts] != names:
            raise _Broken(f"recovery server at {self.path} answered for other sessions than "
                          f"the {hi - lo} it was handed")
        for i, (name, v) in enumerate(zip(names, reply.verdicts)):
            if not v.ok:
                verdicts[lo + i] = AdoptionError(
                    f"recovery server at {self.path} refused session {name}: {v.error}")

    def _raise_refusal(self) -> None:
        """Raise the server's refusal if one waits unread (a server refuses a peer at
        accept with one reply, then closes); return if none does."""
        payload = ipc.recv_queued(self._sock, max_bytes=MAX_REPLY)
        if payload is None:
            return
        try:
            reply = _decode_verdicts(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if reply.error:
            raise AdoptionError(f"recovery server at {self.path} refused the hand-over: "
                                f"{reply.error}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdoptionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Broken(Exception):
    """The hand-over connection broke after frames were sent (their verdicts unknown)."""


def hand_over(path: str, sock: socket.socket | int, cb_fd: int, handover: Handover,
              *, timeout: float = 5.0) -> None:
    """Hand one recovered session to the server listening at `path` (see AdoptionClient)."""
    with AdoptionClient(path, timeout=timeout) as client:
        client.hand_over(sock, cb_fd, handover)


#: the name of every memfd cb_memfd makes: a copy made for one hand-over, which the
#: recovery server may take over as its box (is_handed_copy)
COPY_PREFIX = "bdhand:"


def is_handed_copy(fd: int) -> bool:
    """Whether `fd` is a memfd cb_memfd made (by its name): a copy for one hand-over,
    not a box some process writes (an old server's region is named "bdcb:...")."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:" + COPY_PREFIX)
    except OSError:
        return False


_PAGE = 4096
_ZEROS = bytes(_PAGE)


def cb_memfd(name: str, data: bytes, parts: Sequence[tuple[int, int]] = (),
             size: int | None = None) -> int:
    """A sealed memfd holding a copy of a Continuation Box, to hand over with its session
    (named COPY_PREFIX + `name`: the server takes it over as its box): `data` whole, or
    the pieces (offset, length) of `parts` one after the other in a region of `size`
    bytes, the rest zero (continuations.image.live_parts; checked by the caller). Pages
    of zeros are left holes: a box the node left sparse costs the copy's maker (an
    agent) no more than it cost the node."""
    fd = os.memfd_create(COPY_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data) if size is None else size)
        at, view = 0, memoryview(data)
        for offset, length in parts or [(0, len(data))]:
            for i in range(0, length, _PAGE):
                piece = view[at + i:at + min(length, i + _PAGE)]
                if piece != _ZEROS[:len(piece)]:
                    os.pwrite(fd, piece, offset + i)
            at += length
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd

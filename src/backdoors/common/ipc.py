"""Local IPC: length-framed msgpack over Unix stream sockets, with descriptor passing.

A frame is a 4-byte big-endian length and that many bytes of msgpack. Descriptors
(SCM_RIGHTS) travel with a frame's first byte. A receiver reads one frame at a time and
never past its end, so the descriptors it gets belong to the frame it reads.

The one rule for a socket file already at a listener's path (`remove_stale`, run by
`listen`): nothing there, fine; a socket nobody listens on (its server died), removed; a
live listener, or a file that is not a socket, refused.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

HEADER = 4
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one SCM_RIGHTS message
_UCRED = struct.Struct("3i")
_encode = msgspec.msgpack.Encoder().encode


def ready(fd: int, events: int = select.POLLIN, timeout: float | None = 0) -> bool:
    """Whether `fd` is ready for `events` (select.POLLIN, POLLOUT) within `timeout` s
    (None: wait). poll(2), not select(2): select cannot take a descriptor above 1023,
    which an agent holding many nodes' descriptors reaches."""
    p = select.poll()
    p.register(fd, events)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


class FrameError(OSError):
    """A frame broke the framing rules (too large, too many descriptors)."""

    def __init__(self, message: str):
        super().__init__(errno.EPROTO, message)


class PeerClosed(FrameError):
    """The other end closed the connection (before a complete frame)."""


class SocketInUse(FileExistsError):
    """A live listener answers at the path."""


class NotASocket(FileExistsError):
    """The path exists and is not a socket."""


def pack(message: object) -> bytes:
    """The frame of `message` (msgpack-encoded): header and payload."""
    payload = _encode(message)
    return len(payload).to_bytes(HEADER, "big") + payload


def send(sock: socket.socket, message: object, fds: Sequence[int] = (), *,
         timeout: float = 1.0) -> None:
    """Send `message` as one frame with `fds` attached. A non-blocking socket whose buffer
    is full is waited on for up to `timeout` seconds each time (then BlockingIOError)."""
    data = memoryview(pack(message))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while data:
        try:
            sent = sock.sendmsg([data], ancillary)
        except BlockingIOError:
            if not ready(sock.fileno(), select.POLLOUT, timeout):
                raise
            continue
        data, ancillary = data[sent:], []


@dataclass(eq=False)
class Frame:
    """One received frame: its msgpack payload and the descriptors that came with it
    (the receiver owns them; close them or wrap them)."""

    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class FrameReader:
    """Reads frames from one connection, blocking or not; keeps a partial frame between
    calls. Frames larger than `max_bytes` or with more than `max_fds` descriptors are
    FrameError (the received descriptors are closed)."""

    def __init__(self, *, max_bytes: int, max_fds: int = 0,
                 close: Callable[[int], None] = os.close):
        self.max_bytes, self.max_fds = max_bytes, max_fds
        self.close = close  # how received descriptors are closed when dropped
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size: int | None = None

    @property
    def partial(self) -> bool:
        """True while a frame has begun and is not complete."""
        return self._size is not None or bool(self._buf) or bool(self._fds)

    @property
    def pending_fds(self) -> int:
        """Descriptors received with a frame not complete yet (held here until it is)."""
        return len(self._fds)

    def read(self, sock: socket.socket) -> Frame | None:
        """The next complete frame; None if a non-blocking socket has no more for now.
        PeerClosed at end of stream; OSError of the socket as is."""
        while True:
            want = HEADER - len(self._buf) if self._size is None else self._size - len(self._buf)
            if want:
                try:
                    # room for every descriptor one message can carry: those that do not
                    # fit would be closed by the kernel on this thread
                    data, ancdata, flags, _ = sock.recvmsg(
                        want, socket.CMSG_SPACE(SCM_MAX_FD * 4), socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    return None
                self._take_fds(ancdata)
                truncated = flags & socket.MSG_CTRUNC and len(self._fds) <= self.max_fds
                if truncated or len(self._fds) > self.max_fds:
                    self.discard()
                    raise FrameError("descriptors attached were dropped by the kernel (is this "
                                     "process out of descriptors?)" if truncated else
                                     f"more than {self.max_fds} file descriptors attached")
                if not data:
                    self.discard()
                    raise PeerClosed("the other end closed the connection")
                self._buf += data
            if self._size is None:
                if len(self._buf) < HEADER:
                    continue
                self._size = int.from_bytes(self._buf, "big")
                self._buf.clear()
                if self._size > self.max_bytes:
                    size = self._size
                    self.discard()
                    raise FrameError(f"frame of {size} bytes exceeds {self.max_bytes}")
            if len(self._buf) == self._size:
                frame = Frame(bytes(self._buf), self._fds)
                self._buf, self._fds, self._size = bytearray(), [], None
                return frame

    def _take_fds(self, ancdata: list) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self._fds.extend(fds_in(payload))

    def discard(self) -> None:
        """Drop a partial frame and close its descriptors."""
        for fd in self._fds:
            self.close(fd)
        self._buf, self._fds, self._size = bytearray(), [], None


def fds_in(payload: bytes) -> list[int]:
    """The descriptors of one SCM_RIGHTS control message (a truncated last one ignored)."""
    fds = array.array("i")
    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return fds.tolist()


def recv(sock: socket.socket, *, max_bytes: int, max_fds: int = 0) -> Frame:
    """One frame from a blocking socket (its timeout applies to each read)."""
    frame = FrameReader(max_bytes=max_bytes, max_fds=max_fds).read(sock)
    if frame is None:  # a non-blocking socket
        raise BlockingIOError(errno.EAGAIN, "no complete frame yet")
    return frame


def recv_queued(sock: socket.socket, *, max_bytes: int) -> bytes | None:
    """The payload of a frame already waiting on `sock`, or None if none can be read now:
    a peer's last word before it closed (a server refusing a connection at accept sends
    one reply, then closes, and the client's next send fails with EPIPE)."""
    try:
        sock.settimeout(0.0)
        return recv(sock, max_bytes=max_bytes).payload
    except OSError:
        return None


def listen(path: str, *, mode: int, backlog: int) -> socket.socket:
    """A non-blocking Unix stream listener at `path` with file mode `mode`, once a stale
    file there was removed (`remove_stale`; its errors as they are).

    The mode is set on the socket file as bound, never through a path: whoever may write
    the directory (a node, in its own run directory) could swap a symlink in between bind
    and chmod, and a chmod by path as root would follow it (to the agent's keys). If the
    path no longer holds a socket after bind: NotASocket."""
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        _chmod_socket(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _chmod_socket(path: str, mode: int) -> None:
    """chmod the socket file at `path` without following a symlink: opened O_PATH |
    O_NOFOLLOW, checked to be a socket, changed through /proc/self/fd (Linux has no lchmod)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOENT):  # swapped for a symlink, or moved away
            raise NotASocket(errno.EEXIST, "replaced during bind, not a socket now", path) from None
        raise
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise NotASocket(errno.EEXIST, "replaced during bind, not a socket now", path)
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def unlink_socket(path: str) -> None:
    """Remove a listener's socket file at `path` after closing it (anything else there,
    or nothing, is left alone; a failure too: this is cleanup)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def connect(path: str, *, timeout: float) -> socket.socket:
    """A Unix stream connection to the listener at `path`, with `timeout` on every call."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_stale(path: str) -> None:
    """Make `path` free for a new listener: remove a socket file nobody listens on.

    SocketInUse if a live listener answers there, NotASocket if something else is there.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NotASocket(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):  # nobody listens: a dead server's
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except BlockingIOError:  # a listener with a full backlog
        pass
    except OSError as err:
        if err.errno != errno.EPROTOTYPE:  # EPROTOTYPE: a listener of another socket type
            raise
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, "a live listener answers there", path)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))

"""systemd's notify protocol, both sides: readiness, watchdog and the file descriptor store.

A service tells its supervisor things with datagrams on the Unix socket named by
$NOTIFY_SOCKET ("/path", or "@name" for the abstract namespace): newline-separated
KEY=VALUE lines, with descriptors attached (SCM_RIGHTS) for the fd store:

    READY=1                       serving
    WATCHDOG=1                    still alive (within $WATCHDOG_USEC)
    FDSTORE=1 + FDNAME=<name>     keep the attached descriptors for me, under <name>
    FDSTOREREMOVE=1 + FDNAME=<n>  drop the stored descriptors named <n>

On its next start the supervisor passes the stored descriptors back from fd 3 on, with
$LISTEN_FDS (count), $LISTEN_FDNAMES (colon-separated names) and $LISTEN_PID (the pid
they are meant for). systemd does this with `FileDescriptorStoreMax=`; the lab's keeper
(`backdoors.lab.keeper`) speaks the same protocol. A name is 1-255 printable ASCII
characters without ':'.

Only sendmsg on an unconnected datagram socket: fine for a sealed process. PyPI's
`sdnotify` sends text only, hence this module.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from .ipc import fds_in

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
LISTEN_FDS_START = 3
MAX_NAME = 255
MAX_MESSAGE = 4096
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD
SEND_TIMEOUT_S = 1.0


class NotifyError(OSError):
    """A notify message could not be sent, or a name is not valid for the store."""


def valid_name(name: str) -> bool:
    """Whether `name` may be an FDNAME (systemd's rule)."""
    return (0 < len(name) <= MAX_NAME and name.isascii() and name.isprintable()
            and ":" not in name)  # (printable ASCII: 32 to 126)


def encode_name(prefix: str, meta: Mapping) -> str:
    """An FDNAME carrying `meta` (msgpack, base64url): `<prefix>.<data>`, NotifyError if
    it would not fit 255 characters."""
    data = base64.urlsafe_b64encode(msgspec.msgpack.encode(dict(meta))).decode().rstrip("=")
    name = f"{prefix}.{data}"
    if not valid_name(name):
        raise NotifyError(f"fd store name for {dict(meta)!r} is {len(name)} characters; "
                          f"the limit is {MAX_NAME}")
    return name


def decode_name(name: str) -> tuple[str, dict] | None:
    """(prefix, meta) of a name made by `encode_name`; None for any other name."""
    prefix, _, data = name.partition(".")
    if not data:
        return None
    try:
        meta = msgspec.msgpack.decode(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (ValueError, msgspec.MsgspecError):
        return None
    return (prefix, meta) if isinstance(meta, dict) else None


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        raise NotifyError(f"${NOTIFY_SOCKET_ENV}={path!r}: give an absolute path or @name")
    return path


class Notifier:
    """Sends notify messages to the supervisor at `path` ($NOTIFY_SOCKET when None); with
    no supervisor every call is a no-op returning False. Thread-safe (one sendmsg each)."""

    def __init__(self, path: str | None = None, environ: Mapping[str, str] = os.environ):
        self.path = path if path is not None else environ.get(NOTIFY_SOCKET_ENV) or None
        self._sock: socket.socket | None = None
        if self.path:
            self._address = _address(self.path)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(SEND_TIMEOUT_S)  # a supervisor that stops reading: an error

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str, fds: Iterable[int] = ()) -> bool:
        """Send one message (lines KEY=VALUE) with `fds` attached; NotifyError on failure."""
        if self._sock is None:
            return False
        fds = list(fds)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      b"".join(fd.to_bytes(4, "little", signed=True) for fd in fds))] if fds else []
        try:
            self._sock.sendmsg([message.encode()], ancillary, 0, self._address)
        except OSError as e:
            raise NotifyError(e.errno, f"notify {self.path}: {e.strerror}") from None
        return True

    def ready(self) -> bool:
        return self.send("READY=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def store(self, name: str, fd: int) -> bool:
        """Keep `fd` in the supervisor's store under `name`."""
        if not valid_name(name):
            raise NotifyError(f"{name!r} is not a valid fd store name")
        return self.send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> bool:
        """Drop the stored descriptors named `name`."""
        return self.send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog period in seconds asked by the supervisor ($WATCHDOG_USEC, for this
    pid when $WATCHDOG_PID is set), or None."""
    usec = environ.get(WATCHDOG_USEC_ENV)
    pid = environ.get(WATCHDOG_PID_ENV)
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


@dataclass
class PassedFd:
    fd: int
    name: str


def listen_fds(environ: Mapping[str, str] = os.environ, *, unset: bool = True) -> list[PassedFd]:
    """The descriptors passed to this process ($LISTEN_FDS from fd 3, $LISTEN_FDNAMES),
    made close-on-exec; [] when none or meant for another pid. `unset` removes the
    variables from os.environ (children must not take them for theirs)."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        count, pid = 0, 0
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if unset and environ is os.environ:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if count <= 0 or pid != os.getpid():
        return []
    out = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing to take
        out.append(PassedFd(fd, names[i] if i < len(names) else "unknown"))
    return out


# -- the supervisor's side (the lab's keeper, tests) ------------------------------------


@dataclass
class Message:
    """One received notify datagram: its fields and attached descriptors (owned by the
    receiver: close or keep them), and the sender's pid when SO_PASSCRED is on."""

    fields: dict[str, str]
    fds: list[int]
    pid: int | None = None


def notify_listener(path: str) -> socket.socket:
    """A datagram socket bound at `path` (a stale file there is replaced) receiving notify
    messages with the sender's credentials."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket) -> Message:
    """Read one notify message from `sock` (blocking as the socket is)."""
    fd_size = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
    cred_size = socket.CMSG_SPACE(12)
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, fd_size + cred_size,
                                       getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    fds: list[int] = []
    pid = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(fds_in(payload))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[0:4], "little", signed=True)
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return Message(fields, fds, pid)

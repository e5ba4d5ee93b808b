"""The application side of local registration: hand a region to the node's agent.

Light on purpose (stdlib and msgspec only): services import it. The agent's socket for a
node is <run_dir>/<node>/agent.sock; the node's launcher passes it in the environment
variable BACKDOORS_AGENT_SOCKET. The agent keeps a duplicate of the fd, so the region
outlives this process; it accepts regions only from processes inside its node.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

import msgspec

from .errors import RegistrationError

if TYPE_CHECKING:
    from ..sensors import SensorBox

ENV_SOCKET = "BACKDOORS_AGENT_SOCKET"
MAX_REPLY = 64 * 1024


def register_box(box: SensorBox, *, name: str | None = None, socket_path: str | None = None,
                 timeout: float = 2.0) -> dict:
    """Register a Sensor Box; its region name defaults to the box's own name."""
    if name is None:
        header = os.pread(box.fd, 64, 0)
        name = header[32:].split(b"\0", 1)[0].decode("utf-8")
    return _call({"op": "register", "kind": "sensorbox", "name": name, "writable": False},
                 box.fd, socket_path, timeout)


def register_region(fd: int, name: str, writable: bool = False, *, kind: str = "region",
                    socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """Register a region (a memfd sealed with F_SEAL_SHRINK) of `kind` ("region",
    "sensorbox" or "cb", a Continuation Box named "cb-<session>"). `writable` lets monitors write it through the agent (a mailbox for
    remote access hooks).
    """
    return _call({"op": "register", "kind": kind, "name": name, "writable": writable},
                 fd, socket_path, timeout)


def hold_socket(fd: int, *, name: str, socket_path: str | None = None,
                timeout: float = 2.0) -> dict:
    """Hand the agent a duplicate of a session's TCP socket (Continuation Boxes): the
    connection then survives a crash of this process, for recovery elsewhere."""
    return _call({"op": "hold_socket", "name": name}, fd, socket_path, timeout)


def release(name: str, *, socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """A session ended: the agent drops its Continuation Box and socket."""
    return _call({"op": "release", "name": name}, None, socket_path, timeout)


def unregister(name: str, *, socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """Withdraw a region of this node; the agent closes its copy."""
    return _call({"op": "unregister", "name": name}, None, socket_path, timeout)


class _Channel:
    """One connection to the agent per process and socket path, reused by every call
    (a server registering a box per client session makes thousands of calls)."""

    def __init__(self, path: str):
        self.path, self.pid = path, os.getpid()
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def exchange(self, data: bytes, fd: int | None, timeout: float) -> bytes:
        with self.lock:
            for attempt in (1, 2):
                fresh = self.sock is None
                try:
                    if fresh:
                        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        self.sock.settimeout(timeout)
                        self.sock.connect(self.path)
                    self.sock.settimeout(timeout)
                    if fd is None:
                        self.sock.sendall(data)
                    else:
                        socket.send_fds(self.sock, [data], [fd])
                    return _read_frame(self.sock)
                except OSError:
                    self.close()
                    if fresh or attempt == 2:  # a kept connection may have gone stale: retry once
                        raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_channels: dict[str, _Channel] = {}
_channels_lock = threading.Lock()


def _channel(path: str) -> _Channel:
    with _channels_lock:
        ch = _channels.get(path)
        if ch is None or ch.pid != os.getpid():  # a forked child makes its own
            ch = _channels[path] = _Channel(path)
        return ch


def _call(request: dict, fd: int | None, socket_path: str | None, timeout: float) -> dict:
    path = socket_path or os.environ.get(ENV_SOCKET)
    if not path:
        raise RegistrationError(f"no agent socket: pass socket_path or set {ENV_SOCKET}",
                                "no_agent")
    payload = msgspec.msgpack.encode(request)
    data = len(payload).to_bytes(4, "big") + payload
    try:
        reply = _channel(path).exchange(data, fd, timeout)
    except OSError as e:
        raise RegistrationError(f"agent socket {path}: {e.strerror or e}", "no_agent") from None
    try:
        answer = msgspec.msgpack.decode(reply)
        ok, error = answer["ok"], answer.get("error")
    except (msgspec.MsgspecError, ValueError, RecursionError, KeyError, TypeError):
        raise RegistrationError(f"agent socket {path}: malformed reply", "protocol") from None
    if not ok:
        raise RegistrationError(f"the agent refused {request['op']} of {request['name']!r}: "
                                f"{error}")
    return answer.get("region") or {}


def _read_frame(sock: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        if len(buf) >= 4 and int.from_bytes(buf[:4], "big") > MAX_REPLY:
            raise OSError(0, "reply too large")
        chunk = sock.recv(MAX_REPLY)
        if not chunk:
            raise OSError(0, "the agent closed the connection without a reply")
        buf += chunk
    return buf[4:4 + int.from_bytes(buf[:4], "big")]

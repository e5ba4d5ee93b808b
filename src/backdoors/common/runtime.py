"""The node-side runtime contract: what a service inside a node finds, and how it registers.

The agent serves one registration socket per node, <run_dir>/<node>/agent.sock; recovery
servers of that node receive recovered sessions in the same directory, at adopt.sock (one
server for every port) or adopt-<port>.sock. The node's launcher passes them on in the
environment (`service_env`):

    BACKDOORS_AGENT_SOCKET   the node's registration socket
    BACKDOORS_ADOPT_DIR      where a server on port P listens for sessions (adopt-P.sock)
    BACKDOORS_ADOPT_SOCKET   one server's own adoption socket (overrides the directory)

`AgentWatch` notices a restarted agent (its socket file replaced) so a registrar can
register again. The registration client (`register_box`, `register_region`, `hold_socket`,
`release`, `unregister`) hands regions (sealed memfds) and session sockets to the agent over that
socket (common.ipc frames, one descriptor attached). The agent keeps a duplicate of each
descriptor, so a region or session outlives this process; it accepts them only from
processes inside its node. Each connection is checked the other way before anything is
sent: its listener must be the agent (`common.peers.not_the_agent`), not a process of the
node that replaced `agent.sock` (the run directory is the node's to write). Light on purpose (stdlib and msgspec only): services import it.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Protocol

import msgspec

from ..errors import RegistrationError
from . import ipc
from .peers import not_the_agent

AGENT_SOCKET_ENV = "BACKDOORS_AGENT_SOCKET"
ADOPT_DIR_ENV = "BACKDOORS_ADOPT_DIR"
ADOPT_SOCKET_ENV = "BACKDOORS_ADOPT_SOCKET"
AGENT_SOCKET = "agent.sock"
ADOPT_SOCKET = "adopt.sock"  # a node's single recovery server; else adopt-<port>.sock
MAX_REPLY = 64 * 1024


def agent_socket(run_dir: str, node: str) -> str:
    """The registration socket of `node` under an agent's run directory."""
    return os.path.join(run_dir, node, AGENT_SOCKET)


def adoption_path(directory: str, port: int) -> str:
    """Where the server of `port` receives recovered sessions, in an adoption directory."""
    return os.path.join(directory, f"adopt-{port}.sock")


def service_env(agent_socket_path: str) -> dict[str, str]:
    """The variables a node's launcher sets for its services: the registration socket,
    and its directory as the adoption directory."""
    return {AGENT_SOCKET_ENV: agent_socket_path,
            ADOPT_DIR_ENV: os.path.dirname(agent_socket_path)}


def adoption_socket(port: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """The adoption socket of a server on `port` named by the environment, if any."""
    if path := environ.get(ADOPT_SOCKET_ENV):
        return path
    if directory := environ.get(ADOPT_DIR_ENV):
        return adoption_path(directory, port)
    return None


class NamedRegion(Protocol):
    """A region with a name of its own (a Sensor Box): its memfd and name."""

    @property
    def fd(self) -> int: ...

    @property
    def name(self) -> str: ...


class RegistrationLink(Protocol):
    """What Continuation Boxes need of the registration client (this module, or a fake)."""

    def register_region(self, fd: int, name: str, writable: bool = False, *,
                        kind: str = "region") -> dict: ...

    def hold_socket(self, fd: int, *, name: str) -> dict: ...

    def release(self, name: str) -> dict: ...


def register_box(box: NamedRegion, *, name: str | None = None,
                 socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """Register a Sensor Box; its region name defaults to the box's own name. The box is
    registered again by itself when the agent restarts (its socket replaced), for as long
    as the box lives and its name is not unregistered."""
    name = name or box.name
    reply = _call({"op": "register", "kind": "sensorbox", "name": name, "writable": False},
                  box.fd, socket_path, timeout)
    _remember_box(socket_path or os.environ.get(AGENT_SOCKET_ENV, ""), name, box)
    return reply


def register_region(fd: int, name: str, writable: bool = False, *, kind: str = "region",
                    socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """Register a region (a memfd sealed with F_SEAL_SHRINK) of `kind` ("region",
    "sensorbox" or "cb", a Continuation Box named "cb-<session>"). `writable` lets
    monitors write it through the agent (a mailbox for remote access hooks).
    """
    return _call({"op": "register", "kind": kind, "name": name, "writable": writable},
                 fd, socket_path, timeout)


def hold_socket(fd: int, *, name: str, socket_path: str | None = None,
                timeout: float = 2.0) -> dict:
    """Hand the agent a duplicate of a session's TCP socket (Continuation Boxes): the
    connection then survives a crash of this process, for recovery elsewhere."""
    return _call({"op": "hold_socket", "name": name}, fd, socket_path, timeout)


#: Continuation Boxes one attach request may carry (the agent refuses more)
MAX_ATTACH = 32


def attach_sessions(boxes: Sequence[tuple[str, int, int]], *, socket_path: str | None = None,
                    timeout: float = 2.0) -> dict:
    """Register Continuation Boxes and hand over their sockets in one request: `boxes` is
    (name "cb-<session>", box memfd, session socket) each, 1 to MAX_ATTACH of them. Each is
    held or refused on its own: {"held": [names], "refused": {name: why}, "later": [names
    the agent's turn did not reach: send them again]}. A refusal of the whole request (an
    agent older than this op says "unknown op" or "unknown field") raises."""
    names = [name for name, _, _ in boxes]
    fds = [fd for _, box, sock in boxes for fd in (box, sock)]
    return _call({"op": "attach", "kind": "cb", "names": names}, fds, socket_path, timeout)


def release(name: str, *, socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """A session ended: the agent drops its Continuation Box and socket."""
    return _call({"op": "release", "name": name}, None, socket_path, timeout)


def unregister(name: str, *, socket_path: str | None = None, timeout: float = 2.0) -> dict:
    """Withdraw a region of this node; the agent closes its copy."""
    with _boxes_lock:
        _boxes.get(socket_path or os.environ.get(AGENT_SOCKET_ENV, ""), {}).pop(name, None)
    return _call({"op": "unregister", "name": name}, None, socket_path, timeout)


# Sensor Boxes registered by this process, per agent socket: registered again when the
# agent restarts (a new agent with an fd store holds them already: a replacement in place).
_boxes: dict[str, dict[str, tuple[weakref.ref, tuple[int, int]]]] = {}
_box_watches: dict[str, AgentWatch] = {}
_boxes_lock = threading.Lock()


def _remember_box(path: str, name: str, box: NamedRegion) -> None:
    if not path:
        return
    try:
        st = os.fstat(box.fd)
        ref = weakref.ref(box)
    except (OSError, TypeError):  # not weakly referable: not followed
        return
    with _boxes_lock:
        if os.getpid() != _boxes_pid[0]:  # a forked child follows its own boxes only
            _boxes.clear()
            _box_watches.clear()
            _boxes_pid[0] = os.getpid()
        _boxes.setdefault(path, {})[name] = (ref, (st.st_dev, st.st_ino))
        if path not in _box_watches:
            _box_watches[path] = AgentWatch(path, lambda: _register_boxes_again(path))


_boxes_pid = [os.getpid()]


def _register_boxes_again(path: str) -> None:
    with _boxes_lock:
        boxes = list(_boxes.get(path, {}).items())
    for name, (ref, ident) in boxes:
        box = ref()
        try:
            st = os.fstat(box.fd) if box is not None else None
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != ident:  # closed, its fd reused
            with _boxes_lock:
                _boxes.get(path, {}).pop(name, None)
            continue
        try:
            _call({"op": "register", "kind": "sensorbox", "name": name, "writable": False},
                  box.fd, path, 2.0)
        except RegistrationError as e:
            import logging
            logging.getLogger("backdoors.runtime").warning(
                "Sensor Box %r not registered again with the restarted agent: %s", name, e)


class AgentWatch:
    """Calls `on_back()` (on a daemon thread) whenever the agent's socket at `path` is
    replaced: a restarted agent binds a new one (after a crash the stale file is replaced;
    after a clean stop it went away first). Checked every `period` seconds with one stat;
    the kept connection to the old agent is dropped, so the next call reconnects.
    `close()` stops watching."""

    def __init__(self, path: str, on_back, period: float = 0.1):
        self.path, self.on_back, self.period = path, on_back, period
        self._stop = threading.Event()
        self._seen = self._identity()
        self._thread = threading.Thread(target=self._run, name="bd-agent-watch", daemon=True)
        self._thread.start()

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        # a file system may give the new socket the inode number of the old one: its
        # modification time (set when it is bound) tells them apart
        return st.st_dev, st.st_ino, st.st_mtime_ns

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = self._identity()
            if now == self._seen:
                continue
            self._seen = now
            if now is None:
                continue  # gone: wait for it to come back
            with _channels_lock:
                channel = _channels.get(self.path)
            if channel is not None:
                with channel.lock:
                    channel.close()
            try:
                self.on_back()
            except Exception:  # noqa: BLE001 - keep watching
                import logging
                logging.getLogger("backdoors.runtime").exception("re-registering failed")

    def close(self) -> None:
        self._stop.set()


class NotTheAgent(OSError):
    """Whatever listens at the agent socket path cannot be the agent (common.peers)."""


class _Channel:
    """One connection to the agent per process and socket path, reused by every call
    (a server registering a box per client session makes thousands of calls)."""

    def __init__(self, path: str):
        self.path, self.pid = path, os.getpid()
        self.refused = 0  # listeners refused: not the agent
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def exchange(self, request: dict, fds: Sequence[int], timeout: float) -> bytes:
        with self.lock:
            for attempt in (1, 2):
                fresh = self.sock is None
                try:
                    if fresh:
                        self.sock = ipc.connect(self.path, timeout=timeout)
                        if (why := not_the_agent(self.sock)) is not None:
                            raise NotTheAgent(f"the listener is not the agent: {why}")
                    self.sock.settimeout(timeout)
                    try:
                        ipc.send(self.sock, request, fds)
                    except (BrokenPipeError, ConnectionResetError):
                        # The agent may refuse a connection at accept (one error frame, then
                        # close): that refusal, still queued here, is the answer.
                        refusal = ipc.recv_queued(self.sock, max_bytes=MAX_REPLY)
                        if refusal is None:
                            raise
                        self.close()
                        return refusal
                    return ipc.recv(self.sock, max_bytes=MAX_REPLY).payload
                except NotTheAgent:
                    self.close()
                    self.refused += 1
                    raise
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
        channel = _channels.get(path)
        if channel is None or channel.pid != os.getpid():  # a forked child makes its own
            channel = _channels[path] = _Channel(path)
        return channel


def _call(request: dict, fd: int | Sequence[int] | None, socket_path: str | None,
          timeout: float) -> dict:
    path = socket_path or os.environ.get(AGENT_SOCKET_ENV)
    if not path:
        raise RegistrationError(f"no agent socket: pass socket_path or set {AGENT_SOCKET_ENV}",
                                "no_agent")
    try:
        fds = () if fd is None else (fd,) if isinstance(fd, int) else tuple(fd)
        reply = _channel(path).exchange(request, fds, timeout)
    except NotTheAgent as e:
        raise RegistrationError(f"agent socket {path}: {e}; nothing was sent", "not_agent") from None
    except OSError as e:
        raise RegistrationError(f"agent socket {path}: {e.strerror or e}", "no_agent") from None
    try:
        answer = msgspec.msgpack.decode(reply)
        ok, error = answer["ok"], answer.get("error")
    except (msgspec.MsgspecError, ValueError, RecursionError, KeyError, TypeError):
        raise RegistrationError(f"agent socket {path}: malformed reply", "protocol") from None
    if not ok:
        what = request.get("name") or ", ".join(request.get("names", ()))
        raise RegistrationError(f"the agent refused {request['op']} of {what!r}: {error}")
    return answer.get("region") or {}

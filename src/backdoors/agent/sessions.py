"""Client sessions held by the agent: the socket duplicate of each Continuation Box.

A server that makes a session recoverable hands the agent its CB region (a region of kind
"cb", named "cb-<session>") and a duplicate of the session's TCP socket ("hold_socket",
same name). Holding the duplicate keeps the connection alive in the kernel when the server
crashes: the crash becomes recoverable. At recovery the agent dumps these sockets.

A session restored here by `adopt` remembers the TcpState it was restored from, so a later
dump of it continues the session's byte counts (tcprepair's `since=`). Only its stream
offsets count there (`offsets`); the fd store keeps those, and a restarted agent holds the
session with a stand-in state carrying them (`since_from`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BackdoorsError
from ..tcprepair import TcpOptions, TcpState, TcpWindow
from ..tcprepair.kernel import CLOSE, tcp_info
from .closing import defuse

log = logging.getLogger("backdoors.agent")


class SessionRefused(Exception):
    """A hold or release broke a rule; the message says which."""


@dataclass(eq=False)
class Session:
    node: str
    name: str
    sock: socket.socket
    pid: int
    since: TcpState | None = None  # the state it was restored from, if adopted here

    def describe(self) -> str:
        try:
            local, remote = self.sock.getsockname(), self.sock.getpeername()
            return f"{local[0]}:{local[1]} <-> {remote[0]}:{remote[1]}"
        except OSError:
            return "(disconnected)"


@dataclass
class SessionTable:
    """Held sessions per node, capped; thread-safe."""

    nodes: list[str]
    max_per_node: int
    note: str = "max_sessions_per_node"  # what the cap is (agent.descriptors)
    _sessions: dict[str, dict[str, Session]] = field(init=False)
    _adopted: dict[tuple[str, str], TcpState] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    #: called as observer("add" | "remove", session) after a change (the fd store)
    observer: Callable[[str, Session], None] | None = field(default=None, compare=False)
    #: how a held socket of a node is closed, as closer(node, sock): the local server sets
    #: its Closer's (off its thread, in the node's lane)
    closer: Callable[[str, socket.socket], None] = field(default=lambda node, s: _close(s),
                                                         compare=False)

    def __post_init__(self) -> None:
        self._sessions = {n: {} for n in self.nodes}

    def hold(self, node: str, name: str, fd: int, pid: int,
             since: TcpState | None = None, *, checked: socket.socket | None = None) -> Session:
        """Keep a duplicate of the TCP socket `fd` (the caller keeps its own fd), or the
        one `check` returned for it (`checked`: the table's from then on); `since`: the
        state it was restored from, if not announced by `expect`."""
        sock = checked if checked is not None else self._duplicate(node, fd)
        with self._lock:
            held = self._sessions[node]
            try:
                self._room(node, name)
            except SessionRefused:
                self.closer(node, sock)
                raise
            old = held.pop(name, None)
            since = (self._adopted.pop((node, name), None) or since
                     or (old.since if old else None))
            session = Session(node, name, sock, pid, since)
            held[name] = session
        if self.observer is not None:
            self.observer("add", session)
        if old is not None:
            self.closer(node, old.sock)
        return session

    def check(self, node: str, name: str, fd: int) -> socket.socket:
        """SessionRefused if `hold` would refuse `fd` as `name` now; else the duplicate
        to hold (`hold(checked=)`: then only the cap, reached meanwhile, refuses it) or to
        close with `closer`."""
        sock = self._duplicate(node, fd)
        try:
            with self._lock:
                self._room(node, name)
        except SessionRefused:
            self.closer(node, sock)
            raise
        return sock

    def _duplicate(self, node: str, fd: int) -> socket.socket:
        """A duplicate of `fd`, a connected TCP socket; SessionRefused if it is not one."""
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:  # not a socket
            os.close(dup)
            raise SessionRefused("hold_socket takes a TCP socket") from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            self.closer(node, sock)
            raise SessionRefused("hold_socket takes a TCP socket")
        try:
            sock.getpeername()
        except OSError:
            self.closer(node, sock)
            raise SessionRefused("hold_socket takes a connected socket") from None
        return sock

    def _room(self, node: str, name: str) -> None:
        """SessionRefused if `name` would be a new session past the node's cap (locked)."""
        held = self._sessions[node]
        if name not in held and len(held) >= self.max_per_node:
            raise SessionRefused(f"node {node} holds {len(held)} sessions, the cap is "
                                 f"{self.max_per_node} ({self.note})")

    def release(self, node: str, name: str) -> Session | None:
        """Drop a session (it ended); closes the agent's duplicate."""
        with self._lock:
            session = self._sessions[node].pop(name, None)
        if session is not None:
            if self.observer is not None:
                self.observer("remove", session)
            self.closer(node, session.sock)
        return session

    def take_all(self, node: str) -> list[Session]:
        """Remove and return every held session of `node` (for an evacuation)."""
        with self._lock:
            sessions = list(self._sessions[node].values())
            self._sessions[node].clear()
        if self.observer is not None:
            for s in sessions:
                self.observer("remove", s)
        return sessions

    def take_if(self, session: Session) -> bool:
        """Remove `session` if it is still the one held under its name (not replaced,
        released or moved meanwhile); True if it was taken."""
        with self._lock:
            held = self._sessions[session.node]
            if held.get(session.name) is not session:
                return False
            del held[session.name]
        if self.observer is not None:
            self.observer("remove", session)
        return True

    def put_back(self, session: Session) -> None:
        """Hold a session taken with `take_if` or `take_all` again (unless its name was
        taken meanwhile: then its socket is closed)."""
        with self._lock:
            held = self._sessions[session.node]
            kept = session.name not in held
            if kept:
                held[session.name] = session
        if not kept:
            self.closer(session.node, session.sock)
        elif self.observer is not None:
            self.observer("add", session)

    def holds(self, node: str, name: str, fd: int, pid: int) -> bool:
        """Whether `name` of `node` is held for process `pid` with the very socket `fd`
        refers to (a server holding again a session the agent handed to it)."""
        try:
            # a socket first (its own calls, never a stat: that of a file on a FUSE mount
            # the node serves waits for the node's daemon, for ever if it never answers)
            socket.socket(fileno=fd).detach()
            given = os.fstat(fd)
            with self._lock:
                session = self._sessions[node].get(name)
                if session is None or session.pid != pid:
                    return False
                kept = os.fstat(session.sock.fileno())
        except OSError:
            return False
        return (kept.st_dev, kept.st_ino) == (given.st_dev, given.st_ino)

    def expect(self, node: str, name: str, since: TcpState) -> None:
        """A session restored here will be held again under `name`: remember its origin."""
        with self._lock:
            self._adopted[(node, name)] = since

    def hold_handed(self, node: str, name: str, sock: socket.socket, pid: int) -> bool:
        """Hold a session handed over to server `pid` as the server's, until it registers
        the session itself; False if it cannot be (logged, never raised: the session is
        then the server's alone): it ended already (the server closed it and its peer
        answered, as a spare channel no session took: its `expect`ed state is forgotten),
        or it is refused (the node's cap)."""
        try:
            self.hold(node, name, sock.fileno(), pid)
            return True
        except (SessionRefused, OSError) as e:
            if ended(sock):
                self.forget(node, name)
                log.debug("node %s: handed-over session %s ended before it was held", node,
                          name)
            else:
                log.warning("node %s: could not hold handed-over session %s: %s", node,
                            name, e)
            return False

    def forget(self, node: str, name: str) -> None:
        """A session `expect`ed here that will not be held (it ended, or was refused)."""
        with self._lock:
            self._adopted.pop((node, name), None)

    def list(self, node: str) -> list[Session]:
        with self._lock:
            return list(self._sessions[node].values())

    def count(self, node: str) -> int:
        with self._lock:
            return len(self._sessions[node])

    def close(self) -> None:
        with self._lock:
            for held in self._sessions.values():
                for s in held.values():
                    self.closer(s.node, s.sock)
                held.clear()
            self._adopted.clear()


def ended(sock: socket.socket) -> bool:
    """Whether a connection is over (its socket in CLOSE): reset by its peer, or closed
    by both sides."""
    try:
        return tcp_info(sock).state == CLOSE
    except (BackdoorsError, OSError):
        return False


def offsets(since: TcpState) -> tuple[int, int]:
    """What a later dump needs of the state a session was restored from: the bytes the
    application had written before the restored socket's first, and had read."""
    return since.handed - len(since.send_queue), since.read


def since_from(handed: int, read: int) -> TcpState:
    """A stand-in for the state a session was restored from, with its `offsets` (what
    tcprepair's accounting reads of it: `handed`, `send_queue`, `read`) and nothing else."""
    if not (0 <= handed < 1 << 64 and 0 <= read < 1 << 64):
        raise ValueError(f"stream offsets {handed}, {read} out of range")
    return TcpState(family=2, local_addr="0.0.0.0", local_port=0, remote_addr="0.0.0.0",
                    remote_port=0, snd_seq=0, rcv_seq=0, recv_queue=b"", send_queue=b"",
                    unsent=0, options=TcpOptions(mss=0), window=TcpWindow(0, 0, 0, 0, 0),
                    handed=handed, read=read)


def _close(sock: socket.socket) -> None:
    """Close a held socket with SO_LINGER cleared: the last close of a lingering socket
    with unsent data would block this thread for the linger time."""
    defuse(sock.fileno())
    sock.close()

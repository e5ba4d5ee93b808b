"""One accept loop for new connections and recovered sessions.

    with Listener.tcp("0.0.0.0", 8080, adopt="/run/app/adopt.sock") as listener:
        while conn := listener.accept():
            cb = create_cb(conn)     # a new box, or the recovered one
            ...

accept() returns a connected socket (new client) or a Recovered session (its CB and
restored socket, handed over by the agent); create_cb() takes either. It returns None
once close() was called, from any thread, which ends the loop.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from typing import Iterator

from ..common.accepting import Pause
from ..common.runtime import adoption_socket
from .adoption import AdoptionSource, Recovered, UnixAdoptionSource, resume_in


class Listener:
    """Accepts from a listening socket and an adoption source (either may be absent).

    Recovered sessions come first when both are ready: their clients are already waiting.
    """

    def __init__(self, sock: socket.socket | None = None, *,
                 adopt: AdoptionSource | str | None = None):
        if sock is None and adopt is None:
            raise ValueError("a Listener needs a listening socket, an adoption source, or both")
        self.sock = sock
        self.source = adoption_source(adopt)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._closed = False
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self.source is not None:
            self._sel.register(self.source.fileno(), selectors.EVENT_READ, "adopt")
        self._watching = False  # the listening socket
        self._pause = Pause(listening_name(sock))
        if sock is not None:
            sock.setblocking(False)
            self._watch_sock()

    @classmethod
    def tcp(cls, host: str, port: int, *, adopt: AdoptionSource | str | None = None,
            backlog: int = 128) -> Listener:
        """Listen on host:port (SO_REUSEADDR); `adopt`: a path (Unix adoption socket) or a
        source; default: the path in $BACKDOORS_ADOPT_SOCKET, else adopt-PORT.sock in
        $BACKDOORS_ADOPT_DIR, if either is set."""
        sock = listen_tcp(host, port, backlog)
        try:
            return cls(sock, adopt=adopt if adopt is not None else adoption_socket(port))
        except BaseException:
            sock.close()
            raise

    @property
    def address(self) -> tuple[str, int] | None:
        return self.sock.getsockname()[:2] if self.sock is not None else None

    def accept(self, timeout: float | None = None) -> socket.socket | Recovered | None:
        """The next new connection or recovered session; None when closed or on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self.source is not None and (recovered := self.source.receive()) is not None:
                return recovered  # taken earlier in a batch
            self._watch_sock()
            waits = [t for t in (self._pause.remaining(), resume_in(self.source)) if t]
            paused = bool(waits)  # a pause ends: look again then
            if end is not None:
                waits.append(max(0.0, end - time.monotonic()))
            events = self._sel.select(min(waits) if waits else None)
            if not events and not paused:
                return None  # the timeout
            kinds = {key.data for key, _ in events}
            if "wake" in kinds or self._closed:
                return None
            if "adopt" in kinds and self.source is not None:
                recovered = self.source.receive()
                if recovered is not None:
                    return recovered
            if "accept" in kinds and self.sock is not None:
                try:
                    conn, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as err:
                    if self._closed:
                        return None
                    if not self._pause.absorb(err):
                        raise
                    continue
                self._pause.accepted()
                conn.setblocking(True)
                return conn
            if end is not None and time.monotonic() >= end:
                return None
        return None

    def _watch_sock(self) -> None:
        """The listening socket is watched unless accepting from it is paused."""
        if self.sock is None:
            return
        paused = bool(self._pause.remaining())
        if paused and self._watching:
            self._sel.unregister(self.sock)
        elif not paused and not self._watching:
            self._sel.register(self.sock, selectors.EVENT_READ, "accept")
        self._watching = not paused

    def __iter__(self) -> Iterator[socket.socket | Recovered]:
        while (conn := self.accept()) is not None:
            yield conn

    def close(self) -> None:
        """Stop accepting; a blocked accept() returns None. Safe from any thread."""
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def release(self) -> None:
        """Close the sockets and the adoption source (after the accept loop ended)."""
        self.close()
        if self._wake_r < 0:
            return
        self._sel.close()
        if self.sock is not None:
            self.sock.close()
        if self.source is not None:
            self.source.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def listen_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket listening on host:port with SO_REUSEADDR (IPv6 if `host` has a ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_name(sock: socket.socket | None) -> str:
    """How logs name a listening socket: 'listening socket HOST:PORT'."""
    try:
        host, port = sock.getsockname()[:2]
    except (AttributeError, OSError):
        return "listening socket"
    return f"listening socket {host}:{port}"


def adoption_source(adopt: AdoptionSource | str | None) -> AdoptionSource | None:
    """`adopt` as a source: a path becomes a UnixAdoptionSource listening there."""
    return UnixAdoptionSource(adopt) if isinstance(adopt, str) else adopt

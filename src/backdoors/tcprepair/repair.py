"""A socket in repair mode, as an explicit handle (soccr's pause / resume / release).

    with repair(sock) as r:       # repair mode on: the socket is inert
        state = r.dump()          # under the caller's network lock
        r.close()                 # no FIN, no RST
    new = restore(state)          # elsewhere: a new socket in service

A handle ends with `close()` (silently) or `resume()` (back in service, a window probe
goes out). Leaving a `with` block with the handle still open puts the socket back as the
handle found it (out of repair mode without a probe, if it was in service), and closes a
socket the handle rebuilt itself (`restore_paused`).
"""

from __future__ import annotations

import errno
import socket

from backdoors.errors import TcpRepairError

from . import kernel
from .dump import check_established, check_tcp, snapshot
from .restore import abandon, fin_sender, finish, rebuild
from .state import TcpState


class Repair:
    """One socket held in repair mode; see `repair` and `restore_paused`."""

    def __init__(self, sock: socket.socket, *, was_in_repair: bool,
                 rebuilt: tuple[TcpState, bool] | None = None,
                 fin: socket.socket | None = None):
        self.sock = sock
        self._was_in_repair = was_in_repair
        self._rebuilt = rebuilt  # (state, resend_unacked) of a socket made by restore_paused
        self._fin = fin  # a raw socket of its namespace, for a half-closed peer's FIN
        self._open = True

    def dump(self, *, since: TcpState | None = None) -> TcpState:
        """The connection's state. `since`: the TcpState the socket was itself restored
        from, so byte counts stay continuous. Raises TcpRepairError if the socket is not
        an established connection or cannot be read consistently."""
        self._check_open("dump")
        check_established(self.sock)
        return snapshot(self.sock, since)

    def resume(self) -> socket.socket:
        """Leave repair mode: the socket serves its connection here (a rebuilt one first
        gets its window and the data it has to send). Returns the socket."""
        self._check_open("resume")
        if self._rebuilt is not None:
            state, resend_unacked = self._rebuilt
            try:
                finish(self.sock, state, resend_unacked=resend_unacked, fin=self._fin)
            except BaseException:
                self.close()
                raise
            finally:
                self._close_fin()
        else:
            try:
                kernel.set_int(self.sock, kernel.TCP_REPAIR, kernel.REPAIR_OFF)
            except OSError as err:
                raise kernel.fail("resume: TCP_REPAIR off", err) from None
        self._open = False
        return self.sock

    def close(self) -> None:
        """Close the socket without a FIN or RST reaching the peer. Other descriptors of
        the same socket keep it open, in repair mode: closing the last one is silent too."""
        if self._open:
            self._open = False
            abandon(self.sock)
        self._close_fin()

    def _close_fin(self) -> None:
        if self._fin is not None:
            self._fin.close()
            self._fin = None

    def __enter__(self) -> Repair:
        return self

    def __exit__(self, *exc) -> None:
        if not self._open:
            return
        if self._rebuilt is not None:
            self.close()
            return
        self._open = False
        if not self._was_in_repair:
            try:  # back in service as found: no window probe
                kernel.set_int(self.sock, kernel.TCP_REPAIR, kernel.REPAIR_OFF_NO_PROBE)
            except OSError:
                pass  # the socket is gone or broken: nothing to give back

    def _check_open(self, step: str) -> None:
        if not self._open:
            raise TcpRepairError(f"{step}: the socket's repair handle was already ended "
                                 "(closed or resumed)")


def repair(sock: socket.socket) -> Repair:
    """Put `sock` into repair mode and return its handle (also a context manager).

    Raises TcpRepairError, leaving the socket as it was, if `sock` is not a TCP/IP socket
    or the kernel refuses (a listening socket; no CAP_NET_ADMIN in its network namespace).
    """
    check_tcp(sock, "repair")
    try:
        was_in_repair = kernel.get_u32(sock, kernel.TCP_REPAIR) == 1
        kernel.set_int(sock, kernel.TCP_REPAIR, kernel.REPAIR_ON)
    except OSError as err:
        raise kernel.fail("TCP_REPAIR on", err, _refusal(sock, err)) from None
    return Repair(sock, was_in_repair=was_in_repair)


def close_silently(sock: socket.socket) -> None:
    """Close `sock` without sending FIN or RST: `repair(sock).close()`, in any state but
    LISTEN (TcpRepairError, and the listener stays open). Closed sockets are ignored."""
    if sock.fileno() >= 0:
        repair(sock).close()


def restore_paused(state: TcpState, *, resend_unacked: bool = False) -> Repair:
    """The connection of `state` rebuilt in a new socket of the calling thread's network
    namespace, held in repair mode (inert) until `resume()`: so that many sessions can be
    restored before any of them talks. The peer's packets must be kept away (network
    lock) until then. `resend_unacked`: see the `restore` module."""
    sock = rebuild(state, resend_unacked=resend_unacked)
    try:
        fin = fin_sender(state)
    except BaseException:
        abandon(sock)
        raise
    return Repair(sock, was_in_repair=False, rebuilt=(state, resend_unacked), fin=fin)


def restore(state: TcpState, *, resend_unacked: bool = False) -> socket.socket:
    """A new blocking socket in service carrying the connection of `state`; the second
    of the two calls (`repair(sock).dump()`, `restore(state)`). Raises TcpRepairError
    naming the failed step; the peer then sees nothing and `state` can be restored again."""
    return restore_paused(state, resend_unacked=resend_unacked).resume()


def _refusal(sock: socket.socket, err: OSError) -> str:
    if err.errno != errno.EPERM:
        return ""
    try:
        state = kernel.tcp_info(sock).state_name
    except OSError:
        state = "unknown"
    if state == "LISTEN":
        return ("the socket is LISTEN, not a connection: a socket in LISTEN cannot be closed "
                "silently or dumped (the kernel refuses it repair mode); it is left open")
    return "needs CAP_NET_ADMIN in the socket's network namespace"

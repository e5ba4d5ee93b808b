"""How many bytes the application has written to and read from a TCP socket.

The Continuation Box compares these counts with the ones recorded at the last export, to
know how much regenerated output the client already has and how much input to replay.
They come from the kernel's own counters, so the application pays nothing to keep them.

Kernel semantics, checked by experiment on Linux 6.18:

- `tcpi_bytes_acked` counts every sequence number the peer acknowledged, so it includes
  the SYN of a socket that did connect() (a fresh client socket reads 1, an accepted one
  0) and our FIN once it is acknowledged.
- `tcpi_bytes_received` counts the peer's data and its FIN, never its SYN.
- SIOCOUTQ (`write_seq - snd_una`) includes our FIN while it is unacknowledged; SIOCINQ
  excludes the peer's FIN.

Hence: written = bytes_acked + SIOCOUTQ, minus 1 for our SYN (active open only) and 1
for our FIN; read = bytes_received - SIOCINQ, minus 1 for the peer's FIN. The TCP state
tells which FINs exist, except in CLOSE, where a reset and an orderly close look alike:
the counts are refused there (and in LISTEN and the handshake states).

A socket made by restore() starts its counters at zero: pass `since=` the TcpState it
was restored from and the counts continue those of the dumped socket.
"""

from __future__ import annotations

import socket

from backdoors.errors import TcpRepairError

from . import kernel
from .state import TcpState

# tcpi_state values where our FIN has taken a sequence number
_OUR_FIN_STATES = {4, 5, 9, 11}  # FIN_WAIT1, FIN_WAIT2, LAST_ACK, CLOSING
# tcpi_state values where the peer's FIN has been received
_PEER_FIN_STATES = {8, 9, 11}  # CLOSE_WAIT, LAST_ACK, CLOSING
_COUNTABLE_STATES = {1} | _OUR_FIN_STATES | _PEER_FIN_STATES


def bytes_handed(
    sock: socket.socket, *, since: TcpState | None = None, active_open: bool = False
) -> int:
    """Bytes the application has written to `sock` so far (acknowledged or still queued).

    `active_open`: the socket did connect() itself (its SYN is in bytes_acked). Accepted
    and restored sockets are not active opens.
    """
    info, outq = _consistent(sock, kernel.SIOCOUTQ, "bytes_acked", "bytes_handed")
    return handed_from(info, outq, since) - int(active_open)


def bytes_received(sock: socket.socket, *, since: TcpState | None = None) -> int:
    """Bytes the application has read from `sock` so far (not counting unread ones)."""
    info, inq = _consistent(sock, kernel.SIOCINQ, "bytes_received", "bytes_received")
    return read_from(info, inq, since)


def _consistent(sock: socket.socket, request: int, counter: str,
                what: str) -> tuple[kernel.TcpInfo, int]:
    """TCP_INFO and a queue size (ioctl `request`) taken at one moment: two calls, so an
    ACK or a segment arriving between them would move bytes between the counter and the
    queue; read again until `counter` did not change around the ioctl."""
    info = _info(sock, what)
    for _ in range(100):
        queued = _ioctl(sock, request, what)
        again = _info(sock, what)
        if getattr(again, counter) == getattr(info, counter):
            return again, queued
        info = again
    return info, queued  # a connection this busy: as close as two calls get


def handed_from(info: kernel.TcpInfo, outq: int, since: TcpState | None = None) -> int:
    """bytes_handed of a passive-open socket from its TCP_INFO and SIOCOUTQ."""
    count = info.bytes_acked + outq - int(info.state in _OUR_FIN_STATES)
    if since is not None:
        count += since.handed - len(since.send_queue)
    return count


def read_from(info: kernel.TcpInfo, inq: int, since: TcpState | None = None) -> int:
    """bytes_received from a socket's TCP_INFO and SIOCINQ."""
    count = info.bytes_received - inq - int(info.state in _PEER_FIN_STATES)
    if since is not None:
        count += since.read
    return count


def _info(sock: socket.socket, what: str) -> kernel.TcpInfo:
    try:
        info = kernel.tcp_info(sock)
    except OSError as err:
        raise kernel.fail(f"{what}: TCP_INFO", err, "is this a TCP socket?") from None
    if info.state not in _COUNTABLE_STATES:
        raise TcpRepairError(
            f"{what}: socket is in state {info.state_name}; the count is only defined "
            "while the connection is established or half-closed"
        )
    return info


def _ioctl(sock: socket.socket, request: int, what: str) -> int:
    try:
        return kernel.ioctl_int(sock, request)
    except OSError as err:
        raise kernel.fail(f"{what}: ioctl {request:#x}", err) from None

"""The Linux TCP_REPAIR interface: constants and thin wrappers around the socket calls.

Everything that knows a sockopt number, an ioctl or a `struct tcp_info` offset lives here,
so `dump`, `restore` and `accounting` read as the steps they take. Values are from
include/uapi/linux/tcp.h and sockios.h and were checked on Linux 6.18.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from typing import NamedTuple

from backdoors.errors import TcpRepairError

SOL_TCP = socket.IPPROTO_TCP

# setsockopt(SOL_TCP, ...) options
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

# values of TCP_REPAIR
REPAIR_ON = 1
REPAIR_OFF = 0  # leave repair mode and send a window probe (the peer answers with an ACK)
REPAIR_OFF_NO_PROBE = -1  # leave repair mode silently

# values of TCP_REPAIR_QUEUE
NO_QUEUE = 0
RECV_QUEUE = 1
SEND_QUEUE = 2

# option codes for TCP_REPAIR_OPTIONS (TCPOPT_* on the wire)
OPT_MSS = 2
OPT_WINDOW = 3  # value: snd_wscale | rcv_wscale << 16
OPT_SACK_PERM = 4
OPT_TIMESTAMP = 8

# bits of tcpi_options
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# ioctls
SIOCINQ = 0x541B  # bytes in the receive queue not yet read
SIOCOUTQ = 0x5411  # bytes in the send queue: sent but unacknowledged, plus never sent
SIOCOUTQNSD = 0x894B  # bytes in the send queue never sent

SO_SNDBUFFORCE = 32
SO_PEEK_OFF = 42  # MSG_PEEK from this offset, moved on by each peek (TCP: Linux 6.9+)

# struct tcp_info: offsets checked by experiment on 6.18 (the struct is 280 bytes there)
TCP_INFO_LEN = 280
OFF_BYTES_ACKED = 120  # u64 tcpi_bytes_acked
OFF_BYTES_RECEIVED = 128  # u64 tcpi_bytes_received
TCP_INFO_MIN_LEN = OFF_BYTES_RECEIVED + 8

WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
REPAIR_OPT = struct.Struct("=II")  # struct tcp_repair_opt
U32 = struct.Struct("=I")
INT = struct.Struct("=i")

# tcpi_state values (enum in include/net/tcp_states.h)
STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
ESTABLISHED = 1
FIN_WAIT1 = 4
FIN_WAIT2 = 5
CLOSE = 7
CLOSE_WAIT = 8
LAST_ACK = 9
CLOSING = 11


class TcpInfo(NamedTuple):
    """The fields of `struct tcp_info` this package uses."""

    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    bytes_acked: int
    bytes_received: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"state {self.state}")


def errname(err: OSError) -> str:
    """'EADDRINUSE' for an OSError carrying that errno."""
    return errno.errorcode.get(err.errno or 0, str(err.errno))


def fail(step: str, err: OSError, hint: str = "") -> TcpRepairError:
    """A TcpRepairError naming the step, the errno and, when known, what to do."""
    text = f"{step} failed: {errname(err)} ({err.strerror})"
    return TcpRepairError(f"{text} — {hint}" if hint else text)


def tcp_info(sock: socket.socket) -> TcpInfo:
    """Read TCP_INFO; raises OSError for a socket that is not TCP."""
    raw = sock.getsockopt(SOL_TCP, TCP_INFO, TCP_INFO_LEN)
    if len(raw) < TCP_INFO_MIN_LEN:
        raise TcpRepairError(
            f"TCP_INFO returned {len(raw)} bytes, need {TCP_INFO_MIN_LEN}: "
            "kernel older than 4.1 (no tcpi_bytes_acked)"
        )
    acked, received = struct.unpack_from("=QQ", raw, OFF_BYTES_ACKED)
    return TcpInfo(
        state=raw[0],
        options=raw[5],
        snd_wscale=raw[6] & 0x0F,
        rcv_wscale=raw[6] >> 4,
        bytes_acked=acked,
        bytes_received=received,
    )


def ioctl_int(sock: socket.socket, request: int) -> int:
    return INT.unpack(fcntl.ioctl(sock.fileno(), request, bytes(INT.size)))[0]


def set_int(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(SOL_TCP, option, INT.pack(value))


def get_u32(sock: socket.socket, option: int) -> int:
    return U32.unpack(sock.getsockopt(SOL_TCP, option, U32.size))[0]


def set_u32(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(SOL_TCP, option, U32.pack(value & 0xFFFFFFFF))


def select_queue(sock: socket.socket, queue: int) -> None:
    set_int(sock, TCP_REPAIR_QUEUE, queue)

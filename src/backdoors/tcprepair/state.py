"""TcpState: everything needed to recreate one established TCP socket on another stack
(or one half-closed by either side: the peer's FIN is given to the new socket again, and
the new socket closes its own side again, see `restore`).

It is plain data (a msgspec Struct) so an agent can send it to another agent as msgpack.
Sequence numbers are the kernel's unsigned 32-bit values, taken verbatim.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from backdoors.errors import TcpRepairError


# Ranges checked at decode (a TcpState may come from another agent): what the kernel's
# structs hold, so a hostile value is refused with its field named, never a struct.error
# inside restore.
U32 = Annotated[int, Meta(ge=0, le=0xFFFFFFFF)]
U64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # byte counts (msgspec bounds are int64)
Port = Annotated[int, Meta(ge=1, le=0xFFFF)]
Mss = Annotated[int, Meta(ge=1, le=0xFFFF)]
WScale = Annotated[int, Meta(ge=0, le=14)]  # RFC 7323: a shift above 14 is not a window scale
Address = Annotated[str, Meta(min_length=2, max_length=64)]  # checked as an IP by check()


class TcpWindow(msgspec.Struct, frozen=True):
    """The TCP_REPAIR_WINDOW fields: the send and receive window state at the dump."""

    snd_wl1: U32  # sequence number of the segment that last updated the send window
    snd_wnd: U32  # send window the peer advertised (bytes, already scaled)
    max_window: U32  # largest window the peer ever advertised
    rcv_wnd: U32  # receive window we advertised
    rcv_wup: U32  # rcv_nxt when rcv_wnd was last advertised


class TcpOptions(msgspec.Struct, frozen=True):
    """Options negotiated in the handshake; the new socket must use the same ones."""

    mss: Mss  # MSS clamp (TCP_MAXSEG read in repair mode)
    sack: bool = False
    timestamps: bool = False
    wscale: bool = False
    snd_wscale: WScale = 0  # shift the peer applies to the windows it advertises
    rcv_wscale: WScale = 0  # shift we apply to the windows we advertise


class TcpState(msgspec.Struct, frozen=True):
    """One established TCP socket, as dump() saw it and restore() rebuilds it.

    The byte streams: `recv_queue` holds bytes the peer sent that the application had not
    read yet (it ends at `rcv_seq`, the next byte expected from the peer); `send_queue`
    holds bytes the application wrote that the peer had not acknowledged (it ends at
    `snd_seq`), of which the last `unsent` bytes were never put on the wire.

    `handed` and `read` are the application's stream positions at the dump: bytes it had
    written to and read from the socket (see `accounting`; `handed` assumes an accepted
    or restored socket, a connect()ed one reads 1 more). `bytes_handed(new, since=state)`
    and `bytes_received(new, since=state)` continue them on the restored socket.
    """

    family: Literal[2, 10]  # socket.AF_INET or socket.AF_INET6
    local_addr: Address
    local_port: Port
    remote_addr: Address
    remote_port: Port
    snd_seq: U32  # write_seq: sequence number after the last byte in send_queue
    rcv_seq: U32  # rcv_nxt: sequence number after the last byte in recv_queue
    recv_queue: bytes
    send_queue: bytes
    unsent: U32  # how many bytes at the end of send_queue were never sent
    options: TcpOptions
    window: TcpWindow
    timestamp: U32 = 0  # TCP_TIMESTAMP clock, restored verbatim (PAWS) when timestamps are on
    nodelay: bool = False  # TCP_NODELAY as the application had set it
    keepalive: bool = False  # SO_KEEPALIVE as the application had set it
    handed: U64 = 0  # bytes the application had written to the socket
    read: U64 = 0  # bytes the application had read from the socket
    # the peer had closed its side (CLOSE_WAIT, LAST_ACK, CLOSING): `rcv_seq` is its
    # FIN's sequence number
    peer_fin: bool = False
    # this side had closed its own (FIN_WAIT1/2, LAST_ACK, CLOSING): `snd_seq` is its
    # FIN's sequence number (the FIN is not in the queues: restore sends it again)
    our_fin: bool = False

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_addr, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_addr, self.remote_port)

    @property
    def sent_unacked(self) -> bytes:
        """The part of the send queue the peer may already have: restored as sent."""
        return self.send_queue[: len(self.send_queue) - self.unsent]

    @property
    def never_sent(self) -> bytes:
        """The tail of the send queue that never left: restored as ordinary writes."""
        return self.send_queue[len(self.send_queue) - self.unsent :]

    def describe(self) -> str:
        """'10.0.0.5:80 <-> 10.0.0.9:41000' for messages."""
        local = _fmt(self.local_addr, self.local_port)
        return f"{local} <-> {_fmt(self.remote_addr, self.remote_port)}"

    def check(self) -> None:
        """Raise TcpRepairError if the fields cannot describe a real connection."""
        problems = []
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            problems.append(f"family {self.family} is neither AF_INET nor AF_INET6")
        for name in ("snd_seq", "rcv_seq", "timestamp"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                problems.append(f"{name} {getattr(self, name)} is not a u32")
        for name in ("local_port", "remote_port"):
            if not 0 < getattr(self, name) <= 0xFFFF:
                problems.append(f"{name} {getattr(self, name)} is not a port")
        if not 0 <= self.unsent <= len(self.send_queue):
            problems.append(f"unsent {self.unsent} outside send queue of {len(self.send_queue)}")
        if not 0 < self.options.mss <= 0xFFFF:
            problems.append(f"mss {self.options.mss} out of range")
        for name in ("local_addr", "remote_addr"):
            try:
                ip = ipaddress.ip_address(getattr(self, name))
            except ValueError:
                problems.append(f"{name} {getattr(self, name)[:48]!r} is not an IP address")
                continue
            if ip.version != (4 if self.family == socket.AF_INET else 6):
                problems.append(f"{name} {ip} does not match family {self.family}")
        if problems:
            raise TcpRepairError(f"invalid TcpState for {self.describe()}: " + "; ".join(problems))

    def encode(self) -> bytes:
        """msgpack bytes, for sending to another agent."""
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> TcpState:
        """The TcpState in `data`; raises TcpRepairError naming the field if it is not one
        (every integer is range-checked: it may come from another agent)."""
        try:
            state = _DECODER.decode(data)
        except (msgspec.DecodeError, RecursionError) as err:
            raise TcpRepairError(f"not a TcpState: {err}") from None
        state.check()
        return state


def _fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(TcpState)

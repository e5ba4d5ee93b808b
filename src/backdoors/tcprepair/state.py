"""TcpState: everything needed to recreate one established TCP socket on another stack.

It is plain data (a msgspec Struct) so an agent can send it to another agent as msgpack.
Sequence numbers are the kernel's unsigned 32-bit values, taken verbatim.
"""

from __future__ import annotations

import socket

import msgspec

from backdoors.errors import TcpRepairError


class TcpWindow(msgspec.Struct, frozen=True):
    """The TCP_REPAIR_WINDOW fields: the send and receive window state at the dump."""

    snd_wl1: int  # sequence number of the segment that last updated the send window
    snd_wnd: int  # send window the peer advertised (bytes, already scaled)
    max_window: int  # largest window the peer ever advertised
    rcv_wnd: int  # receive window we advertised
    rcv_wup: int  # rcv_nxt when rcv_wnd was last advertised


class TcpOptions(msgspec.Struct, frozen=True):
    """Options negotiated in the handshake; the new socket must use the same ones."""

    mss: int  # MSS clamp (TCP_MAXSEG read in repair mode)
    sack: bool = False
    timestamps: bool = False
    wscale: bool = False
    snd_wscale: int = 0  # shift the peer applies to the windows it advertises
    rcv_wscale: int = 0  # shift we apply to the windows we advertise


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

    family: int  # socket.AF_INET or socket.AF_INET6
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    snd_seq: int  # write_seq: sequence number after the last byte in send_queue
    rcv_seq: int  # rcv_nxt: sequence number after the last byte in recv_queue
    recv_queue: bytes
    send_queue: bytes
    unsent: int  # how many bytes at the end of send_queue were never sent
    options: TcpOptions
    window: TcpWindow
    timestamp: int = 0  # TCP_TIMESTAMP clock, restored verbatim (PAWS) when timestamps are on
    nodelay: bool = False  # TCP_NODELAY as the application had set it
    keepalive: bool = False  # SO_KEEPALIVE as the application had set it
    handed: int = 0  # bytes the application had written to the socket
    read: int = 0  # bytes the application had read from the socket

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
        if problems:
            raise TcpRepairError(f"invalid TcpState for {self.describe()}: " + "; ".join(problems))

    def encode(self) -> bytes:
        """msgpack bytes, for sending to another agent."""
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> TcpState:
        """The TcpState in `data`; raises TcpRepairError if it is not one."""
        try:
            state = _DECODER.decode(data)
        except msgspec.DecodeError as err:
            raise TcpRepairError(f"not a TcpState: {err}") from None
        state.check()
        return state


def _fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(TcpState)

"""Read an established TCP socket in repair mode into a TcpState (see `repair.Repair.dump`),
or one that either side half-closed: the peer (CLOSE_WAIT: the client shut its writing
down and waits for the rest of the answer), this side (FIN_WAIT1/2: the server shut its
writing down and reads on, a linger before close), or both (LAST_ACK, CLOSING). A FIN
takes a sequence number but is no byte of the queues: the state records which were sent
(`peer_fin`, `our_fin`) with the sequence numbers before them.

The caller holds the network lock: while it is held no segment of the connection reaches
this stack, so the snapshot is consistent and nothing is ACKed after it. A snapshot that
changes while it is taken (the lock is missing) is retried, then refused.

**Urgent data.** Out of line (the default), an urgent byte is left out of the stream the
application reads, and the unread count (SIOCINQ) and a read both stop at its mark:
bytes past it would be missed by the dump, yet counted as received. So a dumped socket is
set SO_OOBINLINE first (an urgent byte is then a byte of the stream, as the sockets of
recoverable sessions have it from the start: continuations.box), and its queue is peeked
on past each mark.
"""

from __future__ import annotations

import socket

import msgspec

from backdoors.errors import TcpRepairError

from . import kernel
from .accounting import handed_from, read_from
from .state import TcpOptions, TcpState, TcpWindow

_ATTEMPTS = 3


def check_tcp(sock: socket.socket, step: str) -> None:
    """Raise TcpRepairError unless `sock` is an IPv4 or IPv6 TCP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise TcpRepairError(f"{step}: {sock!r} is not a TCP/IP socket")


def check_established(sock: socket.socket) -> None:
    """Raise TcpRepairError unless `sock` is an established connection, or one its peer
    half-closed (dumpable)."""
    try:
        info = kernel.tcp_info(sock)
    except OSError as err:
        raise kernel.fail("dump: TCP_INFO", err, "is this a TCP socket?") from None
    if info.state not in DUMPABLE:
        raise TcpRepairError(
            f"dump: socket is {info.state_name}, not a connection; only established or "
            "half-closed connections can be dumped (listening, unconnected and closed "
            "ones, and those in a handshake, cannot)"
        )


#: states dump() takes: established, and half-closed by the peer (its FIN is in rcv_seq),
#: by this side (its FIN is in snd_seq), or both
PEER_FIN = (kernel.CLOSE_WAIT, kernel.LAST_ACK, kernel.CLOSING)
OUR_FIN = (kernel.FIN_WAIT1, kernel.FIN_WAIT2, kernel.LAST_ACK, kernel.CLOSING)
OUR_FIN_UNACKED = (kernel.FIN_WAIT1, kernel.LAST_ACK, kernel.CLOSING)
DUMPABLE = (kernel.ESTABLISHED, *PEER_FIN, kernel.FIN_WAIT1, kernel.FIN_WAIT2)


def snapshot(sock: socket.socket, since: TcpState | None) -> TcpState:
    """Read the state of a socket already in repair mode, retrying if it moves.

    In repair mode the application can neither read nor (with no queue selected) write,
    so the queue sizes change only when segments arrive: equal sizes before and after
    mean the sequence numbers, queues and window belong together.
    """
    try:  # (urgent data: see the module's docstring)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    except OSError as err:
        raise kernel.fail("dump: SO_OOBINLINE", err) from None
    for _ in range(_ATTEMPTS):
        sizes = _queue_sizes(sock)
        state = _read_state(sock, sizes, since)
        if state is not None and _queue_sizes(sock) == sizes:
            try:
                kernel.select_queue(sock, kernel.NO_QUEUE)
            except OSError as err:
                raise kernel.fail("dump: deselecting the repair queue", err) from None
            return state
    raise TcpRepairError(
        f"dump: the connection kept changing during {_ATTEMPTS} snapshots "
        "(segments still arrive): lock the network before dumping"
    )


def _queue_sizes(sock: socket.socket) -> tuple[int, int, int]:
    """(unread, unacknowledged + unsent, unsent) sequence numbers: bytes, and our FIN
    while it is unacknowledged (or unsent)."""
    try:
        return (
            kernel.ioctl_int(sock, kernel.SIOCINQ),
            kernel.ioctl_int(sock, kernel.SIOCOUTQ),
            kernel.ioctl_int(sock, kernel.SIOCOUTQNSD),
        )
    except OSError as err:
        raise kernel.fail("dump: reading queue sizes", err) from None


def _read_state(
    sock: socket.socket, sizes: tuple[int, int, int], since: TcpState | None
) -> TcpState | None:
    """The state, or None if a queue no longer holds the amount `sizes` says, or the
    peer's FIN came meanwhile (it changes no size, but rcv_seq)."""
    inq, outq, unsent = sizes
    try:
        before = kernel.tcp_info(sock).state
        if before in OUR_FIN_UNACKED:  # the queue sizes count our FIN: it is no byte
            outq, unsent = outq - 1, max(0, unsent - 1)
        kernel.select_queue(sock, kernel.RECV_QUEUE)
        rcv_seq = kernel.get_u32(sock, kernel.TCP_QUEUE_SEQ)
        recv_queue = _peek(sock, inq, marks=True)
        kernel.select_queue(sock, kernel.SEND_QUEUE)
        snd_seq = kernel.get_u32(sock, kernel.TCP_QUEUE_SEQ)
        send_queue = _peek(sock, outq)
        if recv_queue is None or send_queue is None:
            return None
        info = kernel.tcp_info(sock)
        mss = kernel.get_u32(sock, kernel.TCP_MAXSEG)  # the MSS clamp, in repair mode
        timestamp = 0
        if info.options & kernel.TCPI_OPT_TIMESTAMPS:
            timestamp = kernel.get_u32(sock, kernel.TCP_TIMESTAMP)
        raw_window = sock.getsockopt(kernel.SOL_TCP, kernel.TCP_REPAIR_WINDOW, kernel.WINDOW.size)
        nodelay = bool(sock.getsockopt(kernel.SOL_TCP, socket.TCP_NODELAY))
        keepalive = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError as err:
        raise kernel.fail("dump: reading queues, options, window and addresses", err) from None
    if info.state not in DUMPABLE:
        raise TcpRepairError(f"dump: connection went to {info.state_name} during the dump")
    if info.state != before:
        return None
    window = TcpWindow(*kernel.WINDOW.unpack(raw_window))
    our_fin = info.state in OUR_FIN
    if our_fin:  # write_seq is past our FIN
        snd_seq = (snd_seq - 1) & 0xFFFFFFFF
    peer_fin = info.state in PEER_FIN
    if peer_fin:  # rcv_nxt is past the FIN, which takes one sequence number
        rcv_seq = (rcv_seq - 1) & 0xFFFFFFFF
        if 0 < (window.rcv_wup - rcv_seq) & 0xFFFFFFFF < 1 << 31:  # advertised past it
            window = msgspec.structs.replace(window, rcv_wup=rcv_seq)
    wscale = bool(info.options & kernel.TCPI_OPT_WSCALE)
    return TcpState(
        family=int(sock.family),
        local_addr=local[0],
        local_port=local[1],
        remote_addr=remote[0],
        remote_port=remote[1],
        snd_seq=snd_seq,
        rcv_seq=rcv_seq,
        recv_queue=recv_queue,
        send_queue=send_queue,
        unsent=unsent,
        options=TcpOptions(
            mss=mss,
            sack=bool(info.options & kernel.TCPI_OPT_SACK),
            timestamps=bool(info.options & kernel.TCPI_OPT_TIMESTAMPS),
            wscale=wscale,
            snd_wscale=info.snd_wscale if wscale else 0,
            rcv_wscale=info.rcv_wscale if wscale else 0,
        ),
        window=window,
        timestamp=timestamp,
        nodelay=nodelay,
        keepalive=keepalive,
        handed=handed_from(info, sizes[1], since),  # (it leaves our FIN out itself)
        read=read_from(info, inq, since),
        peer_fin=peer_fin,
        our_fin=our_fin,
    )


def _peek(sock: socket.socket, size: int, marks: bool = False) -> bytes | None:
    """The `size` bytes of the selected queue, or None if it holds another amount. With
    `marks` (the receive queue), a peek that stops at an urgent mark goes on from there
    (SO_PEEK_OFF: TCP has it from Linux 6.9; before, such a socket is not dumped)."""
    if size == 0:
        return b""
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
    try:
        # one byte more than expected: getting it means the queue grew
        data = sock.recv(size + 1, flags)
    except BlockingIOError:
        return None
    if marks and 0 < len(data) < size:  # (an urgent mark)
        parts = [data]
        try:
            sock.setsockopt(socket.SOL_SOCKET, kernel.SO_PEEK_OFF, len(data))
            while 0 < len(parts[-1]) and (got := sum(map(len, parts))) <= size:
                parts.append(sock.recv(size + 1 - got, flags))
        except BlockingIOError:
            pass
        finally:
            sock.setsockopt(socket.SOL_SOCKET, kernel.SO_PEEK_OFF, -1)
        data = b"".join(parts)
    return data if len(data) == size else None

"""Recreate a dumped TCP connection as a new socket in the current network namespace.

The steps follow the order the kernel requires: repair on first, bind, queue sequence
numbers, connect (sends no SYN), options, timestamp clock, queue contents, window,
repair off, and only then the bytes that were never sent, as ordinary writes. A failure
names the step and the errno, and closes the new socket silently, so the peer sees
nothing and the same TcpState can be restored again.

Data sent but not yet acknowledged is restored as sent (CRIU's way) by default. It then
waits for a retransmission timer, and the new socket has no RTT sample (RTO falls back
to 3 s): a segment lost under the network lock comes back only after the 1 s tail-loss
probe. With `resend_unacked=True` it is queued again as never sent and goes out at once;
the peer drops what it already has. Then the first flight must pass whatever the peer
already acknowledged (Linux ignores an ACK of data not yet sent): give the socket a large
initial window (`segments_needed`, set on its route by the caller: net.route).

A connection the peer had half-closed (`peer_fin`) is rebuilt established, its receive
sequence at the FIN; after repair off the FIN is given to it again: a FIN+ACK segment
from the peer's address and port, written to a raw socket of the namespace, which the
kernel loops back to the new socket (CLOSE_WAIT, and its application reads the end of
the input). It carries no timestamp option: Linux checks PAWS only on segments that have
one. The peer got our ACK of its FIN before the dump; the new socket's ACK of it again
is a duplicate it ignores. A connection whose own side was closed (`our_fin`) is rebuilt
established, its send sequence at its FIN, and shut down for writing again after the data
to send: its FIN goes out again after that data (FIN_WAIT1, or LAST_ACK with the peer's);
a peer that had it already answers with an ACK of it."""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import socket
import struct
from collections.abc import Callable, Iterable

from backdoors.errors import TcpRepairError

from . import kernel
from .state import TcpState

_MIN_SNDBUF = 64 * 1024
MAX_SEGMENTS = 4096  # the largest initial window segments_needed asks for


def rebuild(state: TcpState, *, resend_unacked: bool = False) -> socket.socket:
    """A new socket carrying the connection of `state`, still in repair mode (inert).

    Created in the calling thread's network namespace, which must own `state.local_addr`
    and route to `state.remote_addr`. On failure the socket is closed silently and the
    TcpRepairError names the step.
    """
    state.check()
    sock = socket.socket(state.family, socket.SOCK_STREAM)
    try:
        _rebuild(sock, state, resend_unacked)
    except BaseException:
        abandon(sock)
        raise
    return sock


def finish(sock: socket.socket, state: TcpState, *, resend_unacked: bool = False,
           fin: socket.socket | None = None) -> None:
    """Bring a rebuilt socket to life: window, repair off (a window probe goes out), then
    the data to send, then the peer's FIN if it had sent one (through `fin`, a raw
    socket of the namespace: `fin_sender`), then our own FIN if this side had closed.
    Pass the same `resend_unacked` as to rebuild."""
    step = _Steps(f"restore {state.describe()}")
    step("TCP_REPAIR_WINDOW", sock.setsockopt, kernel.SOL_TCP, kernel.TCP_REPAIR_WINDOW,
         _window(state))
    step("TCP_REPAIR off", sock.setsockopt, kernel.SOL_TCP, kernel.TCP_REPAIR, kernel.REPAIR_OFF)
    if resend_unacked:
        step("write unacknowledged and never-sent data", _write_all, sock, state.send_queue)
    else:
        step("write never-sent data", _write_all, sock, state.never_sent)
    if state.peer_fin:
        if fin is None:
            raise TcpRepairError(f"restore {state.describe()}: the peer had closed its side, "
                                 "and no raw socket was made to give its FIN again")
        step("give the peer's FIN again", fin.sendto, _peer_fin(state),
             _sockaddr(state, (state.local_addr, 0)))
    if state.our_fin:
        step("close our side again", sock.shutdown, socket.SHUT_WR)


def fin_sender(state: TcpState) -> socket.socket | None:
    """A raw socket of the calling thread's network namespace to give `state`'s peer FIN
    again (None when the peer had not closed); make it where the socket is rebuilt."""
    if not state.peer_fin:
        return None
    try:
        return socket.socket(state.family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as err:
        raise kernel.fail(f"restore {state.describe()}: a raw socket for the peer's FIN", err,
                          "needs CAP_NET_RAW in this network namespace") from None


def _peer_fin(state: TcpState) -> bytes:
    """The peer's FIN+ACK segment, IP header included: its sequence number is the FIN's,
    it acknowledges what the peer had acknowledged, and advertises its last window."""
    src, dst = ipaddress.ip_address(state.remote_addr), ipaddress.ip_address(state.local_addr)
    ack = (state.snd_seq - len(state.send_queue)) & 0xFFFFFFFF  # snd_una at the dump
    window = min(state.window.snd_wnd >> state.options.snd_wscale, 0xFFFF)
    tcp = _TCP.pack(state.remote_port, state.local_port, state.rcv_seq, ack,
                    5 << 4, _FIN | _ACK, window, 0, 0)
    if state.family == socket.AF_INET:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        ip = _IP4.pack(0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                       src.packed, dst.packed)  # the kernel fills the checksum and id
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
        ip = _IP6.pack(6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src.packed, dst.packed)
    checksum = _checksum(pseudo + tcp)
    return ip + tcp[:16] + struct.pack("!H", checksum) + tcp[18:]


def _checksum(data: bytes) -> int:
    """The Internet checksum of `data` (an even length: headers only)."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_TCP = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, data offset, flags, window, csum, urg
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_FIN, _ACK = 0x01, 0x10


def segments_needed(states: Iterable[TcpState]) -> int:
    """The initial congestion window (in segments) that lets each restored socket's first
    flight pass what its peer may already have: the resent part plus the peer's advertised
    window. Give it to the restored sockets' route (net.route.initial_window)."""
    need = 10
    for s in states:
        span = len(s.sent_unacked) + s.window.snd_wnd
        need = max(need, math.ceil(span / max(1, s.options.mss)) + 2)
    return min(need, MAX_SEGMENTS)


_MIN_MSS, _MAX_USER_MSS = 88, 32767  # TCP_MAXSEG's bounds (TCP_MIN_MSS, MAX_TCP_WINDOW)


def _rebuild(sock: socket.socket, state: TcpState, resend_unacked: bool) -> None:
    step = _Steps(f"restore {state.describe()}")
    tcp_opt = functools.partial(sock.setsockopt, kernel.SOL_TCP)

    # Repair mode first: it also forces address reuse for bind. SO_REUSEADDR set
    # afterwards would clear that again.
    step("TCP_REPAIR on", tcp_opt, kernel.TCP_REPAIR, kernel.REPAIR_ON)
    step(f"bind {_addr(state.local)}", sock.bind, _sockaddr(state, state.local))

    # The queues start where their saved contents begin; writing the contents moves
    # rcv_nxt and write_seq to the dumped values.
    recv_start = (state.rcv_seq - len(state.recv_queue)) & 0xFFFFFFFF
    send_start = (state.snd_seq - len(state.send_queue)) & 0xFFFFFFFF  # snd_una
    step("select receive queue", kernel.select_queue, sock, kernel.RECV_QUEUE)
    step("set receive sequence", kernel.set_u32, sock, kernel.TCP_QUEUE_SEQ, recv_start)
    step("select send queue", kernel.select_queue, sock, kernel.SEND_QUEUE)
    step("set send sequence", kernel.set_u32, sock, kernel.TCP_QUEUE_SEQ, send_start)

    # The segment size is set at connect, from the MSS clamp: TCP_REPAIR_OPTIONS sets the
    # clamp only after, so without this the restored socket sends 536-byte segments
    # (the default clamp) for good, whatever the path's MTU. (TCP_MAXSEG takes at most
    # 32767: a loopback's clamp is larger.)
    if state.options.mss >= _MIN_MSS:
        step("TCP_MAXSEG", tcp_opt, socket.TCP_MAXSEG, min(state.options.mss, _MAX_USER_MSS))
    step(f"connect {_addr(state.remote)}", sock.connect, _sockaddr(state, state.remote))

    # Options only between connect and the first data (Linux >= 6.1 refuses them later).
    step("TCP_REPAIR_OPTIONS", tcp_opt, kernel.TCP_REPAIR_OPTIONS, _options(state))
    if state.options.timestamps:
        # Without the old clock the peer's PAWS check drops every segment: a hung connection.
        step("TCP_TIMESTAMP", kernel.set_u32, sock, kernel.TCP_TIMESTAMP, state.timestamp)
    if state.nodelay:
        step("TCP_NODELAY", tcp_opt, socket.TCP_NODELAY, 1)
    if state.keepalive:
        step("SO_KEEPALIVE", sock.setsockopt, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # urgent data in the stream, as it was dumped (tcprepair/dump.py)
    step("SO_OOBINLINE", sock.setsockopt, socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    if len(state.send_queue) * 2 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
        # The whole send queue must fit at once: restore never waits for the peer. Only
        # then is the size forced, because a set size ends the kernel's autotuning.
        size = max(len(state.send_queue), _MIN_SNDBUF)
        step("SO_SNDBUFFORCE", sock.setsockopt, socket.SOL_SOCKET, kernel.SO_SNDBUFFORCE, size)

    if state.recv_queue:
        step("select receive queue", kernel.select_queue, sock, kernel.RECV_QUEUE)
        step("write receive queue", _write_all, sock, state.recv_queue)
    if state.sent_unacked and not resend_unacked:  # as sent: waits for a retransmission
        step("select send queue", kernel.select_queue, sock, kernel.SEND_QUEUE)
        step("write sent-unacknowledged data", _write_all, sock, state.sent_unacked)



class _Steps:
    """Runs one restore step, turning an OSError into a TcpRepairError that names it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, name: str, action: Callable[..., object], *args: object) -> None:
        try:
            action(*args)
        except OSError as err:
            raise kernel.fail(f"{self.prefix}: {name}", err, _hint(name, err)) from None


def _hint(step: str, err: OSError) -> str:
    code = err.errno
    if code == errno.EPERM and "TCP_REPAIR" in step:
        return "TCP_REPAIR needs CAP_NET_ADMIN in this network namespace"
    if step.startswith("bind"):
        if code == errno.EADDRNOTAVAIL:
            return "this network namespace does not own the address: move it here first"
        if code == errno.EADDRINUSE:
            return (
                "TCP_REPAIR must be set before SO_REUSEADDR "
                "(setting it afterwards drops the forced reuse)"
            )
    if step.startswith("connect"):
        if code in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            return (
                "a socket with the same addresses and ports exists in this network namespace: "
                "close the dumped socket silently first, or restore in another namespace"
            )
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "no route to the peer from this network namespace"
    if step == "TCP_REPAIR_WINDOW" and code == errno.EINVAL:
        return "the saved window does not fit the restored receive sequence: inconsistent TcpState"
    if step.startswith("write") and code == errno.EAGAIN:
        return "the socket buffer is too small for the saved queue"
    return ""


def abandon(sock: socket.socket) -> None:
    """Close a half-restored socket without a FIN or RST reaching the peer.

    Also after repair off (a failed never-sent write): back in repair mode, close is silent.
    """
    try:
        kernel.set_int(sock, kernel.TCP_REPAIR, kernel.REPAIR_ON)
    except OSError:
        pass
    sock.close()


def _write_all(sock: socket.socket, data: bytes) -> None:
    """Write all of `data` without waiting; the kernel takes a queue in several pieces."""
    view = memoryview(data)
    while view:
        sent = sock.send(view, socket.MSG_DONTWAIT)
        if sent <= 0:
            raise OSError(errno.ENOSPC, "the kernel accepted no more queue data")
        view = view[sent:]


def _options(state: TcpState) -> bytes:
    opts = state.options
    pairs = [(kernel.OPT_MSS, opts.mss)]
    if opts.wscale:
        pairs.append((kernel.OPT_WINDOW, opts.snd_wscale | opts.rcv_wscale << 16))
    if opts.sack:
        pairs.append((kernel.OPT_SACK_PERM, 0))
    if opts.timestamps:
        pairs.append((kernel.OPT_TIMESTAMP, 0))
    return b"".join(kernel.REPAIR_OPT.pack(code, value) for code, value in pairs)


def _window(state: TcpState) -> bytes:
    w = state.window
    return kernel.WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)


def _sockaddr(state: TcpState, endpoint: tuple[str, int]) -> tuple:
    return endpoint if state.family == socket.AF_INET else (*endpoint, 0, 0)


def _addr(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""TCP_REPAIR dump and restore on the real kernel, byte-exact on both sides.

Each test builds its own little network out of fresh network namespaces and removes it:

    client netns C: bridge br0 10.77.0.1/24
      ├── port v-s ── veth ── server netns S: eth0 10.77.0.100/24 (service address)
      └── port v-n ── veth ── new node N:     eth0 10.77.0.3/24 (only for moves)

The network lock: the old node's port is taken off the bridge (its segments are lost,
none reach it, and its own link, routes and neighbours stay as they were), or, for a move
to another namespace, the old node's own eth0 is set down.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyroute2 import IPRoute, netns

from backdoors.errors import TcpRepairError
from backdoors.tcprepair import (
    TcpState,
    bytes_handed,
    bytes_received,
    close_silently,
    repair,
    restore,
    segments_needed,
)
from backdoors.net import netns as bd_netns
from backdoors.net.route import initial_window
from backdoors.tcprepair import kernel

CLIENT_IP = "10.77.0.1"
VIP = "10.77.0.100"
NEW_NODE_IP = "10.77.0.3"
PORT = 8080
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------- namespaces and links


class Netns:
    """A fresh network namespace with loopback up and a worker thread living inside it.

    Sockets are created by `run` in that thread, so they belong to the namespace; they
    can then be used from any thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        netns.create(name)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        try:
            with self.ipr() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            self.run(self._enter)
        except BaseException:
            self.close()
            raise

    def _enter(self) -> None:
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns {self.name}: {os.strerror(code)}")
        finally:
            os.close(fd)

    def run(self, fn, *args):
        return self._pool.submit(fn, *args).result(timeout=30)

    def ipr(self) -> IPRoute:
        return IPRoute(netns=self.name)

    def set_link(self, ifname: str, state: str) -> None:
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state=state)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        netns.remove(self.name)


class Lab:
    """The namespaces and sockets of one test; `close` removes every one of them."""

    def __init__(self, unique: str) -> None:
        self.unique = unique
        self.namespaces: list[Netns] = []
        self.sockets: list[socket.socket] = []

    def netns(self, role: str) -> Netns:
        ns = Netns(f"bdt-{self.unique}{role}-tr")
        self.namespaces.append(ns)
        return ns

    def socket_in(self, ns: Netns, fn, *args) -> socket.socket:
        """fn(*args) run inside `ns`; the socket it returns is closed at teardown."""
        sock = ns.run(fn, *args)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:  # a socket would keep its namespace alive
            sock.close()
        for ns in reversed(self.namespaces):
            try:
                ns.close()
            except Exception:  # remove the others even if one fails
                pass

    def client_switch(self) -> Netns:
        """Netns C with bridge br0 carrying the client address."""
        c = self.netns("c")
        with c.ipr() as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            # A fixed MAC: the bridge must not take over a port's, or a detached port
            # would still deliver to the client.
            ipr.link("set", index=br, address="02:00:00:00:00:01")
            ipr.addr("add", index=br, address=CLIENT_IP, prefixlen=24)
            ipr.link("set", index=br, state="up")
        return c

    def node(self, switch: Netns, role: str, address: str | None) -> Netns:
        """A netns whose eth0 is plugged into the switch's bridge as port v-<role>."""
        ns = self.netns(role)
        port = f"v-{role}"
        with switch.ipr() as ipr:
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.name})
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0])
            ipr.link("set", index=idx, state="up")
        with ns.ipr() as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            if address:
                ipr.addr("add", index=idx, address=address, prefixlen=24)
            ipr.link("set", index=idx, state="up")
        return ns


@pytest.fixture
def lab(root, unique):
    lab = Lab(unique)
    try:
        yield lab
    finally:
        lab.close()
        leftovers = [n for n in netns.listnetns() if n.startswith(f"bdt-{unique}")]
        assert not leftovers, f"namespaces left behind: {leftovers}"


class Connection:
    """One TCP connection from the client netns C to the service address in S.

    With `new_node`, a third netns N on the same bridge is ready to take the address.
    """

    def __init__(self, lab: Lab, server_buffers: int = 0, new_node: bool = False,
                 client_sysctls: dict[str, int] | None = None) -> None:
        self.lab = lab
        self.c = lab.client_switch()
        for key, value in (client_sysctls or {}).items():  # e.g. TCP options it offers
            bd_netns.set_sysctl(self.c.name, key, value)
        self.s = lab.node(self.c, "s", VIP)
        self.n = lab.node(self.c, "n", NEW_NODE_IP) if new_node else None
        listener = lab.socket_in(self.s, _listen, VIP)
        if server_buffers:  # accepted sockets inherit them
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server_buffers)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_buffers)
        self.client = lab.socket_in(self.c, socket.create_connection, (VIP, PORT), 5)
        self.client.settimeout(None)
        self.server = self._keep(listener.accept()[0])
        listener.close()  # a move restores the connection only, not the listener

    def _keep(self, sock: socket.socket) -> socket.socket:
        self.lab.sockets.append(sock)
        return sock

    def lock(self) -> None:
        """Cut the server off at the switch: its segments are lost, none reach it."""
        self._plug(False)

    def unlock(self) -> None:
        self._plug(True)

    def _plug(self, into_bridge: bool) -> None:
        with self.c.ipr() as ipr:
            master = ipr.link_lookup(ifname="br0")[0] if into_bridge else 0
            ipr.link("set", index=ipr.link_lookup(ifname="v-s")[0], master=master)

    def restore_in(self, ns: Netns, state: TcpState, resend: bool = False) -> socket.socket:
        """The connection restored in `ns`, as the new server socket."""
        self.server = self._keep(ns.run(_restore_fast if resend else restore, state))
        return self.server

    def move_address_to_new_node(self) -> None:
        """The service address leaves S for N; the client forgets S's MAC."""
        with self.s.ipr() as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=24)
        with self.n.ipr() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=24)
        with self.c.ipr() as ipr:  # stands in for the gratuitous ARP the net package sends
            ipr.neigh("del", dst=VIP, ifindex=ipr.link_lookup(ifname="br0")[0])


def _restore_fast(state: TcpState) -> socket.socket:
    """Unacknowledged data resent at once, with a first flight large enough to pass it."""
    with initial_window([state.remote_addr], segments_needed([state])):
        return restore(state, resend_unacked=True)


def _listen(address: str, port: int = PORT, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(8)
    return sock


# ---------------------------------------------------------------- numbered byte streams


def numbered(start: int, count: int) -> bytes:
    """Bytes start..start+count of a stream of 8-byte big-endian block numbers.

    A lost, duplicated or reordered block shows up as a wrong byte at a known place.
    """
    first, last = start // 8, (start + count + 7) // 8
    blocks = b"".join(struct.pack(">Q", n) for n in range(first, last))
    skip = start - first * 8
    return blocks[skip : skip + count]


class Reader(threading.Thread):
    """Reads a socket until `expected` bytes have arrived, noting EOF and errors."""

    def __init__(self, sock: socket.socket, expected: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.expected = sock, expected
        self.data = bytearray()
        self.eof = False
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        try:
            while len(self.data) < self.expected:
                chunk = self.sock.recv(min(1 << 16, self.expected - len(self.data)))
                if not chunk:
                    self.eof = True
                    return
                self.data += chunk
        except OSError as err:
            self.error = err

    def result(self, timeout: float = 20) -> bytes:
        self.join(timeout)
        assert not self.is_alive(), f"stalled after {len(self.data)} of {self.expected} bytes"
        assert self.error is None, f"reader saw {self.error!r}"
        assert not self.eof, f"EOF after {len(self.data)} of {self.expected} bytes"
        return bytes(self.data)


def recv_exactly(sock: socket.socket, count: int, timeout: float = 20) -> bytes:
    reader = Reader(sock, count)
    return reader.result(timeout)


def assert_stream(got: bytes, start: int, count: int) -> None:
    """`got` is exactly bytes start..start+count of the numbered stream."""
    assert len(got) == count, f"got {len(got)} bytes, expected {count}"
    want = numbered(start, count)
    if got != want:
        at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        block = slice(at & ~7, (at & ~7) + 8)
        pytest.fail(
            f"stream differs at byte {start + at}: "
            f"block {got[block].hex()}, expected {want[block].hex()}"
        )


def write_until_full(sock: socket.socket, start: int, limit: int = 4_000_000) -> int:
    """Write the numbered stream from `start` until the send buffer is full; the new end."""
    end = start
    try:
        while end - start < limit:
            end += sock.send(numbered(end, 65536), socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    return end


def wait_until(predicate, timeout: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def outq(sock: socket.socket) -> int:
    return kernel.ioctl_int(sock, kernel.SIOCOUTQ)


def inq(sock: socket.socket) -> int:
    return kernel.ioctl_int(sock, kernel.SIOCINQ)


def tcp_state(sock: socket.socket) -> str:
    return kernel.tcp_info(sock).state_name


def move_in_place(conn: Connection, resend: bool = False, *,
                  locked: bool = False) -> tuple[TcpState, socket.socket]:
    """Lock (unless `locked` already), dump, close the old socket silently, restore in
    the same netns, unlock."""
    if not locked:
        conn.lock()
    with repair(conn.server) as handle:
        state = handle.dump()
        handle.close()
    received = TcpState.decode(state.encode())  # (e) as another agent would get it
    assert received == state
    new = conn.restore_in(conn.s, received, resend)
    conn.unlock()
    return state, new


# ---------------------------------------------------------------- tests


def test_restored_socket_continues_both_streams(lab):
    """(a, d) the restored server socket carries on both streams, no loss, no duplicate."""
    conn = Connection(lab)
    total = 3_000_000
    reader = Reader(conn.client, total)

    first = 1_000_000
    conn.server.sendall(numbered(0, first))
    wait_until(lambda: outq(conn.server) == 0, what="first part acknowledged")
    conn.client.sendall(numbered(0, 1000))
    assert_stream(recv_exactly(conn.server, 1000), 0, 1000)

    state, new = move_in_place(conn)
    assert state.handed == first and state.read == 1000

    new.sendall(numbered(first, total - first))
    assert_stream(reader.result(), 0, total)

    conn.client.sendall(numbered(1000, 5000))
    assert_stream(recv_exactly(new, 5000), 1000, 5000)
    assert bytes_handed(new, since=state) == total
    assert bytes_received(new, since=state) == 6000


@pytest.mark.parametrize("resend", [False, True], ids=["unacked-as-sent", "unacked-resent"])
def test_move_while_streaming_under_load(lab, resend):
    """(a, d) dump in the middle of a running transfer: the writer is paused, not stopped."""
    conn = Connection(lab)
    total = 8_000_000
    reader = Reader(conn.client, total)
    sent = 0
    while sent < 2_000_000:  # fill the pipe: data in flight and queued at the dump
        sent = write_until_full(conn.server, sent)
        time.sleep(0.001)

    state, new = move_in_place(conn, resend)
    assert state.handed == sent
    new.sendall(numbered(sent, total - sent))
    assert_stream(reader.result(), 0, total)


def test_unread_receive_queue_is_restored(lab):
    """(b) bytes the server had not read are in the restored socket, then the new ones."""
    conn = Connection(lab)
    conn.client.sendall(numbered(0, 60_000))  # fits the server's initial window
    wait_until(lambda: inq(conn.server) == 60_000, what="data queued at the server")
    assert_stream(recv_exactly(conn.server, 100), 0, 100)

    state, new = move_in_place(conn)
    assert len(state.recv_queue) == 60_000 - 100
    assert state.read == 100

    conn.client.sendall(numbered(60_000, 500_000))
    assert_stream(recv_exactly(new, 560_000 - 100), 100, 560_000 - 100)
    assert bytes_received(new, since=state) == 560_000


@pytest.mark.parametrize("inline", [False, True])
def test_urgent_data_moves_in_the_stream(lab, inline):
    """A client's urgent byte (MSG_OOB) unread at the dump: the unread count and a read
    stop at its mark, so the bytes past it were left out of the dump yet counted as
    received, and the client's next bytes came after zeros (outside review). The dump
    takes the urgent byte in the stream (SO_OOBINLINE), as recoverable sessions' sockets
    have it, and every byte past it."""
    conn = Connection(lab)
    if inline:
        conn.server.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    conn.client.sendall(b"A" * 50)
    conn.client.send(b"U", socket.MSG_OOB)
    conn.client.sendall(b"B" * 50)
    wait_until(lambda: kernel.tcp_info(conn.server).bytes_received == 101,
               what="all queued")
    assert inq(conn.server) == (101 if inline else 50)  # (out of line: up to the mark)
    state, new = move_in_place(conn)
    assert state.recv_queue == b"A" * 50 + b"U" + b"B" * 50 and state.read == 0
    conn.client.sendall(b"z" * 20)
    assert recv_exactly(new, 121) == b"A" * 50 + b"U" + b"B" * 50 + b"z" * 20
    assert bytes_received(new, since=state) == 121


def _snd_mss(sock: socket.socket) -> int:
    """tcp_info's tcpi_snd_mss (the segment size this socket sends)."""
    return struct.unpack_from("=I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104),
                              16)[0]


def test_a_restored_socket_sends_segments_as_large_as_before(lab):
    """The segment size is set at connect from the MSS clamp, which TCP_REPAIR_OPTIONS set
    only after: restored sockets sent 524-byte segments on a 1500-byte path, for good
    (outside review: ~2.8 times the segments after a move)."""
    conn = Connection(lab)
    conn.client.sendall(b"x" * 1000)
    recv_exactly(conn.server, 1000)
    before = _snd_mss(conn.server)
    assert before > 1000
    state, new = move_in_place(conn)
    new.sendall(b"y" * 100_000)
    assert recv_exactly(conn.client, 100_000) == b"y" * 100_000
    assert _snd_mss(new) == before


def test_send_queue_unacked_and_unsent_arrive_once(lab):
    """(c, d) queued output, part sent and lost under the lock, part never sent, arrives once."""
    # a send buffer far beyond what the client's receive window lets be in flight: some of
    # the queue is never sent (with the default one the window, grown a little while the
    # client read the first 10,000 bytes, could take the whole queue)
    conn = Connection(lab, server_buffers=1 << 20)
    conn.server.sendall(numbered(0, 10_000))
    assert_stream(recv_exactly(conn.client, 10_000), 0, 10_000)
    # Under the lock the server transmits what its congestion window allows into the cut
    # link (sent, never acknowledged); the rest waits unsent in the queue.
    conn.lock()
    sent = write_until_full(conn.server, 10_000)

    with repair(conn.server) as handle:
        state = handle.dump()
        assert state.unsent > 0, "expected never-sent bytes in the send queue"
        assert len(state.sent_unacked) > 0, "expected sent-unacknowledged bytes"
        assert len(state.send_queue) == sent - 10_000
        assert state.handed == sent
        handle.close()
    new = conn.restore_in(conn.s, state)
    conn.unlock()

    reader = Reader(conn.client, sent - 10_000 + 1000)
    new.sendall(numbered(sent, 1000))
    assert_stream(reader.result(), 10_000, sent - 10_000 + 1000)
    assert bytes_handed(new, since=state) == sent + 1000


def test_megabyte_queues_in_both_directions(lab):
    """(b, c) several MB unread at the server and queued for the client survive the move."""
    conn = Connection(lab, server_buffers=4 << 20)
    upload = 3_000_000
    data = numbered(0, upload)
    writer = threading.Thread(target=conn.client.sendall, args=(data,), daemon=True)
    writer.start()
    writer.join(20)
    assert not writer.is_alive()
    wait_until(lambda: inq(conn.server) == upload, what="upload queued at the server")
    queued = write_until_full(conn.server, 0)  # the client is not reading
    assert queued > 1_000_000

    conn.lock()
    with repair(conn.server) as handle:
        state = handle.dump()
        handle.close()
    assert len(state.recv_queue) == upload and state.read == 0
    assert state.handed == queued and len(state.send_queue) > 500_000
    new = conn.restore_in(conn.s, state)
    conn.unlock()

    reader = Reader(conn.client, queued)
    assert_stream(recv_exactly(new, upload), 0, upload)
    assert_stream(reader.result(), 0, queued)


def test_client_sees_no_reset_or_eof_and_can_close(lab):
    """(d) after the move the connection closes normally, from both ends."""
    conn = Connection(lab)
    conn.server.sendall(b"x" * 10)
    assert recv_exactly(conn.client, 10) == b"x" * 10
    _, new = move_in_place(conn)
    conn.client.settimeout(2)
    new.sendall(b"y")
    assert conn.client.recv(10) == b"y"
    conn.client.shutdown(socket.SHUT_WR)
    assert new.recv(10) == b""  # the client's FIN, as EOF
    new.close()
    assert conn.client.recv(10) == b""


def test_move_to_another_namespace_with_the_service_address(lab):
    """The service address moves to another netns; the restored socket lives there."""
    conn = Connection(lab, new_node=True)
    total = 2_000_000
    reader = Reader(conn.client, total)
    conn.server.sendall(numbered(0, 500_000))
    conn.client.sendall(numbered(0, 7000))
    wait_until(lambda: inq(conn.server) == 7000, what="request at the old server")

    conn.s.set_link("eth0", "down")  # network lock: the old node is cut off
    with repair(conn.server) as handle:
        state = handle.dump()
        handle.close()
    conn.move_address_to_new_node()
    new = conn.restore_in(conn.n, TcpState.decode(state.encode()))
    assert new.getsockname() == (VIP, PORT)

    new.sendall(numbered(500_000, total - 500_000))
    assert_stream(reader.result(), 0, total)
    conn.client.sendall(numbered(7000, 3000))
    assert_stream(recv_exactly(new, 10_000), 0, 10_000)
    assert bytes_handed(new, since=state) == total
    assert bytes_received(new, since=state) == 10_000


@pytest.mark.parametrize("off", [("tcp_timestamps",), ("tcp_sack",), ("tcp_window_scaling",),
                                 ("tcp_timestamps", "tcp_sack", "tcp_window_scaling")],
                         ids=["no-timestamps", "no-sack", "no-wscale", "none"])
def test_a_client_offering_fewer_tcp_options_moves(lab, off):
    """A client stack that does not offer timestamps, SACK or window scaling (another OS,
    an old one, a middlebox that strips them): the dump keeps what was negotiated, the
    restored socket uses the same, and both streams carry on after a move."""
    conn = Connection(lab, new_node=True,
                      client_sysctls={f"net/ipv4/{name}": 0 for name in off})
    total = 2_000_000
    reader = Reader(conn.client, total)
    conn.server.sendall(numbered(0, 300_000))
    conn.client.sendall(numbered(0, 5000))
    wait_until(lambda: inq(conn.server) == 5000, what="request at the old server")

    conn.s.set_link("eth0", "down")
    with repair(conn.server) as handle:
        state = handle.dump()
        handle.close()
    assert state.options.timestamps == ("tcp_timestamps" not in off)
    assert state.options.sack == ("tcp_sack" not in off)
    assert state.options.wscale == ("tcp_window_scaling" not in off)
    conn.move_address_to_new_node()
    new = conn.restore_in(conn.n, TcpState.decode(state.encode()))
    got = kernel.tcp_info(new).options
    assert bool(got & kernel.TCPI_OPT_TIMESTAMPS) == state.options.timestamps
    assert bool(got & kernel.TCPI_OPT_SACK) == state.options.sack
    assert bool(got & kernel.TCPI_OPT_WSCALE) == state.options.wscale

    new.sendall(numbered(300_000, total - 300_000))
    assert_stream(reader.result(), 0, total)
    conn.client.sendall(numbered(5000, 3000))
    assert_stream(recv_exactly(new, 8000), 0, 8000)


def test_restore_into_a_namespace_without_the_address_fails_cleanly(lab):
    """A restore where the address is missing names bind and errno; a retry then works."""
    conn = Connection(lab, new_node=True)
    conn.s.set_link("eth0", "down")
    with repair(conn.server) as handle:
        state = handle.dump()
        handle.close()

    with pytest.raises(TcpRepairError, match=r"bind 10\.77\.0\.100:8080 failed: EADDRNOTAVAIL"):
        conn.restore_in(conn.n, state)

    conn.move_address_to_new_node()
    new = conn.restore_in(conn.n, state)
    conn.client.sendall(b"ping")
    assert recv_exactly(new, 4) == b"ping"
    new.sendall(b"pong")
    assert recv_exactly(conn.client, 4) == b"pong"


def test_restore_beside_the_live_original_is_refused(lab):
    """Restoring while the dumped socket still exists in the same netns fails at connect."""
    conn = Connection(lab)
    conn.lock()
    handle = repair(conn.server)
    state = handle.dump()
    refused = r"connect 10\.77\.0\.1:\d+ failed: EADDRNOTAVAIL.*close the dumped socket"
    with pytest.raises(TcpRepairError, match=refused):
        conn.s.run(restore, state)
    # Abandoning the move: the original goes back into service.
    handle.resume()
    conn.unlock()
    conn.client.settimeout(5)
    conn.server.sendall(b"still here")
    assert recv_exactly(conn.client, 10) == b"still here"


def test_dump_refuses_sockets_that_are_not_established(lab):
    """(f) listening, unconnected, UDP and closed sockets raise, and stay usable."""
    conn = Connection(lab)
    listener = lab.socket_in(conn.s, _listen, VIP, PORT + 1)
    with pytest.raises(TcpRepairError, match="LISTEN, not a connection"):
        repair(listener).dump()
    with pytest.raises(TcpRepairError, match="EPERM.*LISTEN cannot be closed silently"):
        close_silently(listener)
    lab.socket_in(conn.c, socket.create_connection, (VIP, PORT + 1), 5)
    accepted, _ = listener.accept()  # still listening, not left in repair mode
    accepted.close()

    unconnected = socket.socket()
    with pytest.raises(TcpRepairError, match="CLOSE, not a connection"):
        with repair(unconnected) as handle:
            handle.dump()
    unconnected.close()

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(TcpRepairError, match="not a TCP/IP socket"):
        repair(udp).dump()
    udp.close()

    conn.server.shutdown(socket.SHUT_WR)  # both sides closed: the connection is over
    assert conn.client.recv(1) == b""
    conn.client.close()
    wait_until(lambda: tcp_state(conn.server) == "CLOSE", what="the connection closed")
    with pytest.raises(TcpRepairError, match="CLOSE, not a connection"):
        with repair(conn.server) as handle:
            handle.dump()
    close_silently(conn.server)  # repair mode is allowed in every state but LISTEN


@pytest.mark.parametrize("resend", [False, True], ids=["unacked-as-sent", "unacked-resent"])
def test_a_connection_the_client_half_closed_moves_with_its_end_of_input(lab, resend):
    """The client sent its request and shut its writing down, and reads the rest of the
    answer (the server's socket in CLOSE_WAIT: nc -N, some HTTP/1.0 clients). The
    restored socket has the unread part of the request, then the end of the input (the
    client's FIN, given again); the answer goes on, and the server's close ends it."""
    conn = Connection(lab)
    conn.client.sendall(numbered(0, 3000))
    conn.client.shutdown(socket.SHUT_WR)
    # its FIN acknowledged (the server may delay that ACK): it never sends it again
    wait_until(lambda: kernel.tcp_info(conn.client).state_name == "FIN_WAIT2",
               what="the client's FIN at the server, acknowledged")
    assert_stream(recv_exactly(conn.server, 1000), 0, 1000)
    total, first = 400_000, 100_000
    reader = Reader(conn.client, total + 1)  # one more: it must end at the server's FIN
    conn.server.sendall(numbered(0, first))

    state, new = move_in_place(conn, resend)
    assert state.peer_fin and len(state.recv_queue) == 2000 and state.read == 1000
    new.settimeout(10)  # without the FIN given again the read below would wait for good
    assert_stream(recv_exactly(new, 2000), 1000, 2000)
    assert new.recv(1) == b""  # the end of the input
    assert kernel.tcp_info(new).state == kernel.CLOSE_WAIT
    assert bytes_received(new, since=state) == 3000
    new.sendall(numbered(first, total - first))
    assert bytes_handed(new, since=state) == total
    new.close()
    reader.join(20)
    assert reader.eof and reader.error is None, (reader.eof, reader.error)
    assert_stream(bytes(reader.data), 0, total)


@pytest.mark.parametrize("resend", [False, True], ids=["unacked-as-sent", "unacked-resent"])
def test_a_connection_the_server_half_closed_moves_with_its_fin(lab, resend):
    """The server wrote the end of its answer and shut its writing down, and reads on (a
    linger before close); the last bytes and its FIN were caught by the network lock,
    unacknowledged (FIN_WAIT1). The restored socket sends them again, then its FIN: the
    client reads the whole answer and its end, and what it sends still reaches the
    server, which can write no more."""
    conn = Connection(lab)
    first, total = 100_000, 108_000  # what is written under the lock fits the buffer
    reader = Reader(conn.client, total + 1)  # one more: it must end at the server's FIN
    conn.server.sendall(numbered(0, first))
    wait_until(lambda: outq(conn.server) == 0, what="first part acknowledged")
    conn.lock()
    conn.server.sendall(numbered(first, total - first))
    conn.server.shutdown(socket.SHUT_WR)
    assert tcp_state(conn.server) == "FIN_WAIT1"
    state, new = move_in_place(conn, resend, locked=True)
    assert state.our_fin and not state.peer_fin
    assert len(state.send_queue) == total - first and state.handed == total
    reader.join(20)
    assert reader.eof and reader.error is None, (reader.eof, reader.error)
    assert_stream(bytes(reader.data), 0, total)
    wait_until(lambda: tcp_state(new) == "FIN_WAIT2", what="its FIN acknowledged")
    assert bytes_handed(new, since=state) == total
    conn.client.sendall(numbered(0, 3000))
    assert_stream(recv_exactly(new, 3000), 0, 3000)
    with pytest.raises(BrokenPipeError):
        new.send(b"more")


def test_a_connection_whose_fin_was_acknowledged_moves_and_reads_on(lab):
    """FIN_WAIT2: the client has the whole answer and its end, and goes on sending. The
    restored socket sends its FIN again (the client acknowledges it again) and reads the
    rest of the input, to the client's own FIN."""
    conn = Connection(lab)
    conn.server.sendall(numbered(0, 5000))
    conn.server.shutdown(socket.SHUT_WR)
    assert_stream(recv_exactly(conn.client, 5000), 0, 5000)
    assert conn.client.recv(1) == b""
    wait_until(lambda: tcp_state(conn.server) == "FIN_WAIT2", what="the FIN acknowledged")
    conn.client.sendall(numbered(0, 2000))
    assert_stream(recv_exactly(conn.server, 1000), 0, 1000)
    wait_until(lambda: inq(conn.server) == 1000)

    state, new = move_in_place(conn)
    assert state.our_fin and not state.peer_fin and state.send_queue == b""
    assert (state.handed, state.read) == (5000, 1000)
    wait_until(lambda: tcp_state(new) == "FIN_WAIT2", what="its FIN again, acknowledged")
    assert_stream(recv_exactly(new, 1000), 1000, 1000)
    conn.client.sendall(numbered(2000, 3000))
    assert_stream(recv_exactly(new, 3000), 2000, 3000)
    assert (bytes_handed(new, since=state), bytes_received(new, since=state)) == (5000, 5000)
    conn.client.shutdown(socket.SHUT_WR)
    new.settimeout(10)
    assert new.recv(1) == b""


def test_a_connection_both_sides_closed_moves_to_its_last_ack(lab):
    """LAST_ACK: the client sent its request and its FIN; the server answered and closed,
    the answer and its FIN caught by the network lock. The restored socket gets the
    client's FIN again and sends the answer and its FIN: the client reads both, and its
    ACK ends the connection."""
    conn = Connection(lab)
    conn.client.sendall(numbered(0, 1000))
    conn.client.shutdown(socket.SHUT_WR)
    wait_until(lambda: tcp_state(conn.client) == "FIN_WAIT2", what="the client's FIN acknowledged")
    assert_stream(recv_exactly(conn.server, 1000), 0, 1000)
    assert conn.server.recv(1) == b""
    reader = Reader(conn.client, 3001)
    conn.lock()
    conn.server.sendall(numbered(0, 3000))
    conn.server.shutdown(socket.SHUT_WR)
    assert tcp_state(conn.server) == "LAST_ACK"
    state, new = move_in_place(conn, locked=True)
    assert state.peer_fin and state.our_fin and len(state.send_queue) == 3000
    reader.join(20)
    assert reader.eof and reader.error is None, (reader.eof, reader.error)
    assert_stream(bytes(reader.data), 0, 3000)
    wait_until(lambda: tcp_state(new) == "CLOSE", what="the client's last ACK")


def test_byte_counts_match_what_was_written_and_read(lab):
    """(g) bytes_handed / bytes_received, on both ends, through a half-close and a move."""
    conn = Connection(lab)
    server, client = conn.server, conn.client
    assert (bytes_handed(server), bytes_received(server)) == (0, 0)
    assert bytes_handed(client, active_open=True) == 0

    client.sendall(numbered(0, 123_457))
    recv_exactly(server, 100_000)
    wait_until(lambda: inq(server) == 23_457)
    assert bytes_received(server) == 100_000
    assert bytes_handed(client, active_open=True) == 123_457

    reader = Reader(client, 70_001)
    server.sendall(numbered(0, 70_000))
    assert bytes_handed(server) == 70_000  # whether acknowledged yet or not
    server.sendall(b"!")
    reader.result()
    assert bytes_handed(server) == 70_001
    assert bytes_received(client) == 70_001
    wait_until(lambda: outq(server) == 0, what="output acknowledged")

    state, new = move_in_place(conn)
    assert state.send_queue == b"" and len(state.recv_queue) == 23_457
    assert (state.handed, state.read) == (70_001, 100_000)
    assert (bytes_handed(new), bytes_received(new)) == (0, 0)  # new counters start at zero
    assert bytes_handed(new, since=state) == 70_001
    assert bytes_received(new, since=state) == 100_000
    assert_stream(recv_exactly(new, 23_457), 100_000, 23_457)
    new.sendall(b"abc")
    recv_exactly(client, 3)
    assert bytes_handed(new, since=state) == 70_004
    assert bytes_received(new, since=state) == 123_457

    # A second dump of the restored socket keeps counting from the first one.
    conn.lock()
    with repair(new) as handle:
        again = handle.dump(since=state)
        handle.resume()
    conn.unlock()
    assert (again.handed, again.read) == (70_004, 123_457)

    # The peer's FIN takes a sequence number; the count leaves it out.
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: tcp_state(new) == "CLOSE_WAIT", what="client FIN")
    assert bytes_received(new, since=state) == 123_457
    assert new.recv(10) == b""
    assert bytes_received(new, since=state) == 123_457


def test_byte_counts_leave_out_our_fin(lab):
    """(g) our FIN, unacknowledged (FIN_WAIT1) or acknowledged (FIN_WAIT2), is not a byte."""
    conn = Connection(lab)
    conn.server.sendall(b"0123456789")
    recv_exactly(conn.client, 10)
    conn.lock()
    conn.server.shutdown(socket.SHUT_WR)
    assert tcp_state(conn.server) == "FIN_WAIT1"
    assert bytes_handed(conn.server) == 10
    conn.unlock()
    wait_until(lambda: tcp_state(conn.server) == "FIN_WAIT2", what="FIN acknowledged")
    assert bytes_handed(conn.server) == 10
    conn.client.shutdown(socket.SHUT_WR)
    wait_until(lambda: tcp_state(conn.server) == "CLOSE", what="connection closed")
    with pytest.raises(TcpRepairError, match="bytes_handed: socket is in state CLOSE"):
        bytes_handed(conn.server)


def _ipv6_loopback(lab: Lab, name: str) -> tuple[Netns, socket.socket, socket.socket]:
    """(namespace, client, server) of an IPv6 connection over its loopback."""
    ns = lab.netns(name)
    listener = lab.socket_in(ns, _listen, "::1", PORT, socket.AF_INET6)
    client = lab.socket_in(ns, socket.create_connection, ("::1", PORT), 5)
    return ns, client, listener.accept()[0]


def test_ipv6_connection_moves(lab):
    """An IPv6 connection over loopback is dumped and restored the same way."""
    ns, client, server = _ipv6_loopback(lab, "v6")
    client.sendall(numbered(0, 5000))
    server.sendall(numbered(0, 4000))
    wait_until(lambda: inq(server) == 5000)

    with repair(server) as handle:
        state = handle.dump()
        handle.close()
    assert state.family == socket.AF_INET6 and state.local_addr == "::1"
    new = lab.socket_in(ns, restore, TcpState.decode(state.encode()))
    new.sendall(numbered(4000, 1000))
    assert_stream(recv_exactly(client, 5000), 0, 5000)
    assert_stream(recv_exactly(new, 5000), 0, 5000)


def test_a_half_closed_ipv6_connection_moves(lab):
    """The client's FIN is given again over IPv6 too (its own header and checksum)."""
    ns, client, server = _ipv6_loopback(lab, "v6h")
    client.sendall(numbered(0, 5000))
    client.shutdown(socket.SHUT_WR)
    # its FIN acknowledged (the server may delay that ACK): it never sends it again
    wait_until(lambda: kernel.tcp_info(client).state_name == "FIN_WAIT2")

    with repair(server) as handle:
        state = handle.dump()
        handle.close()
    assert state.peer_fin and len(state.recv_queue) == 5000
    new = lab.socket_in(ns, restore, TcpState.decode(state.encode()))
    wait_until(lambda: kernel.tcp_info(new).state == kernel.CLOSE_WAIT, timeout=2,
               what="the FIN given again (without it the socket stays ESTABLISHED)")
    new.settimeout(10)
    assert_stream(recv_exactly(new, 5000), 0, 5000)
    assert new.recv(1) == b""
    new.sendall(numbered(0, 4000))
    new.close()
    assert_stream(recv_exactly(client, 4000), 0, 4000)
    assert client.recv(1) == b""


def test_close_silently_sends_no_fin(lab):
    """A silently closed socket leaves the peer's connection open: no EOF, no reset."""
    conn = Connection(lab)
    close_silently(conn.server)
    conn.client.settimeout(0.5)
    with pytest.raises(socket.timeout):
        conn.client.recv(1)


def test_dump_without_privilege_names_the_capability(lab):
    """Without CAP_NET_ADMIN, dump says which capability is missing and changes nothing."""
    conn = Connection(lab)

    def dump_unprivileged():
        # capset changes the calling thread only: drop CAP_NET_ADMIN (12) from its
        # effective set, in a throwaway thread.
        header = struct.pack("II", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = ctypes.create_string_buffer(24)
        assert _libc.capget(header, data) == 0
        words = list(struct.unpack("6I", data.raw))
        words[0] &= ~(1 << 12)
        assert _libc.capset(header, struct.pack("6I", *words)) == 0
        with pytest.raises(TcpRepairError, match="TCP_REPAIR on failed: EPERM.*CAP_NET_ADMIN"):
            repair(conn.server).dump()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(dump_unprivileged).result()
    conn.server.sendall(b"ok")
    assert recv_exactly(conn.client, 2) == b"ok"


def test_a_peer_with_no_route_gets_no_window_route_and_fails_nothing(lab):
    """Outside review: a peer the restoring namespace has no route to (a v4-mapped IPv6
    client without an IPv6 route there) made `initial_window` raise for the whole batch,
    and the node's other sessions failed with it. It is now left without the larger
    window (a session to it fails alone, if it must), the routable peers get theirs."""
    ns = lab.node(lab.client_switch(), "s", "10.77.0.2")

    def hosts() -> list:  # host routes of the main table
        with IPRoute() as ipr:
            return [r.get_attr("RTA_DST") for r in ipr.get_routes(table=254)
                    if r["dst_len"] in (32, 128)]

    def routes() -> tuple[list, list]:
        with initial_window(["::ffff:10.7.0.1", CLIENT_IP, "2001:db8::1"], 12):
            inside = hosts()
        return inside, hosts()
    inside, after = ns.run(routes)
    assert inside == [CLIENT_IP] and after == []

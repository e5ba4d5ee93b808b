"""Gratuitous ARP and moving a service address between nodes, seen from a client."""

import threading
import time
from types import SimpleNamespace

import pytest

from backdoors.errors import NetError
from backdoors.net import (
    add_address,
    add_bridge,
    add_veth,
    addresses,
    garp_frame,
    gratuitous_arp,
    link_info,
    move_address,
    neighbours,
    netns,
    remove_link,
)

VIP = "10.88.0.50/24"
VIP_IP = "10.88.0.50"
PORT = 7000


def serve_name(ns, tag, stop):
    """A TCP server in `ns` on all addresses that answers every connection with `tag`."""
    server = netns.socket_in(ns)
    server.bind(("0.0.0.0", PORT))
    server.listen()
    server.settimeout(0.05)

    def run():
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(tag)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def cluster(root, unique):
    """Client c (10.88.0.100) and nodes a, b on one bridge; the VIP starts on a.

    Servers on a and b answer "A" and "B" on port 7000 of any address.
    """
    prefix = f"bdt-{unique}-"
    stop = threading.Event()
    threads = []
    try:
        t = SimpleNamespace(sw=prefix + "sw", c=prefix + "c", a=prefix + "a", b=prefix + "b")
        for name in (t.sw, t.c, t.a, t.b):
            netns.create(name)
        add_bridge(t.sw, "br0")
        for node in ("c", "a", "b"):
            add_veth(t.sw, node, getattr(t, node), "eth0", bridge="br0")
        add_address(t.c, "eth0", "10.88.0.100/24")
        add_address(t.a, "eth0", VIP)
        threads = [serve_name(t.a, b"A", stop), serve_name(t.b, b"B", stop)]
        t.mac_a = link_info(t.a, "eth0").mac
        t.mac_b = link_info(t.b, "eth0").mac
        yield t
    finally:
        stop.set()
        for thread in threads:
            thread.join(2)
        netns.reap(prefix)


def ask_vip(client_ns, timeout=1.0):
    """Connect from the client to the VIP; return the answering node's tag."""
    with netns.socket_in(client_ns) as sock:
        sock.settimeout(timeout)
        sock.connect((VIP_IP, PORT))
        return sock.recv(8)


def test_garp_frame_layout():
    frame = garp_frame("02:00:00:00:00:0b", "10.88.0.50")
    mac, ip = bytes.fromhex("02000000000b"), bytes([10, 88, 0, 50])
    assert len(frame) == 42
    assert frame[0:6] == b"\xff" * 6 and frame[6:12] == mac  # broadcast, from our MAC
    assert frame[12:14] == b"\x08\x06"  # ARP
    assert frame[14:22] == bytes.fromhex("0001 0800 06 04 0002")  # Ethernet/IPv4, reply
    assert frame[22:32] == mac + ip  # sender
    assert frame[32:42] == mac + ip  # target = sender: what Linux calls a gratuitous reply


def wait_mac(c, mac: str, timeout: float = 3.0) -> None:
    """Wait until the client maps the VIP to `mac` (a loaded machine may take a while)."""
    deadline = time.monotonic() + timeout
    while neighbours(c.c, "eth0").get(VIP_IP) != mac:
        assert time.monotonic() < deadline, f"client still maps the VIP to {neighbours(c.c)}"
        time.sleep(0.005)


def test_move_address_redirects_the_client_at_once(cluster):
    c = cluster
    assert ask_vip(c.c) == b"A"
    assert neighbours(c.c)[VIP_IP] == c.mac_a

    timings = move_address(VIP, src=(c.a, "eth0"), dst=(c.b, "eth0"))

    assert VIP not in addresses(c.a, "eth0")
    assert VIP in addresses(c.b, "eth0")
    assert 0 < timings.announced <= timings.total
    wait_mac(c, c.mac_b)
    assert ask_vip(c.c, timeout=2) == b"B"


def test_without_garp_the_client_keeps_the_old_mac(cluster):
    c = cluster
    assert ask_vip(c.c) == b"A"
    move_address(VIP, src=(c.a, "eth0"), dst=(c.b, "eth0"), garp_count=0)
    time.sleep(0.05)
    assert neighbours(c.c)[VIP_IP] == c.mac_a  # stale: this is what the GARP fixes
    gratuitous_arp(c.b, "eth0", VIP_IP)
    wait_mac(c, c.mac_b)
    assert ask_vip(c.c) == b"B"


def test_move_address_from_a_vanished_node(cluster):
    c = cluster
    assert ask_vip(c.c) == b"A"
    remove_link(c.sw, "a")  # the old node's interface, and the address on it, are gone
    move_address(VIP, src=None, dst=(c.b, "eth0"))
    wait_mac(c, c.mac_b)
    assert ask_vip(c.c) == b"B"


def test_gratuitous_arp_errors(cluster):
    with pytest.raises(NetError, match=f"'nope' in network namespace '{cluster.b}'"):
        gratuitous_arp(cluster.b, "nope", VIP_IP)
    with pytest.raises(NetError, match="IPv4"):
        gratuitous_arp(cluster.b, "eth0", "fd00::1")

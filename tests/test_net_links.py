"""Bridges, veths, addresses and routes, with real traffic between namespaces."""

import os
import socket
import time
from types import SimpleNamespace

import pytest

from backdoors.errors import NetError
from backdoors.net import (
    add_address,
    add_bridge,
    add_route,
    add_veth,
    addresses,
    del_address,
    link_info,
    netns,
    remove_link,
    set_master,
    set_up,
)


@pytest.fixture
def topo(root, unique):
    """Switch netns with bridge br0; nodes a (10.77.0.1) and b (10.77.0.2) on it via veths."""
    prefix = f"bdt-{unique}-"
    try:
        t = SimpleNamespace(sw=prefix + "sw", a=prefix + "a", b=prefix + "b")
        for name in (t.sw, t.a, t.b):
            netns.create(name)
        add_bridge(t.sw, "br0")
        add_veth(t.sw, "a", t.a, "eth0", bridge="br0")
        add_veth(t.sw, "b", t.b, "eth0", bridge="br0")
        add_address(t.a, "eth0", "10.77.0.1/24")
        add_address(t.b, "eth0", "10.77.0.2/24")
        yield t
    finally:
        netns.reap(prefix)


def udp_reaches(src_ns, dst_ns, dst_ip, timeout=0.3):
    """True if one UDP datagram from src_ns arrives at dst_ip in dst_ns within timeout."""
    rx = netns.socket_in(dst_ns, socket.AF_INET, socket.SOCK_DGRAM)
    tx = netns.socket_in(src_ns, socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((dst_ip, 0))
        rx.settimeout(timeout)
        token = os.urandom(8)
        tx.sendto(token, rx.getsockname())
        try:
            return rx.recv(64) == token
        except TimeoutError:
            return False


def eventually_reaches(src_ns, dst_ns, dst_ip, within=3.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if udp_reaches(src_ns, dst_ns, dst_ip, timeout=0.2):
            return True
    return False


def test_bridge_and_veth_as_the_kernel_sees_them(topo):
    bridge = link_info(topo.sw, "br0")
    assert (bridge.kind, bridge.state, bridge.master) == ("bridge", "up", None)
    port = link_info(topo.sw, "a")
    assert (port.kind, port.state, port.master, port.operstate) == ("veth", "up", "br0", "UP")
    node = link_info(topo.a, "eth0")
    assert (node.kind, node.state, node.master, node.operstate) == ("veth", "up", None, "UP")
    assert len(node.mac.split(":")) == 6 and node.index > 1


def test_veth_with_chosen_macs(topo):
    add_veth(topo.sw, "c", topo.a, "eth1", bridge="br0", mac="02:00:00:00:00:0c",
             peer_mac="02:00:00:00:01:0c")
    assert link_info(topo.sw, "c").mac == "02:00:00:00:00:0c"
    assert link_info(topo.a, "eth1").mac == "02:00:00:00:01:0c"


def test_tcp_through_the_bridge(topo):
    with netns.socket_in(topo.b) as server, netns.socket_in(topo.a) as client:
        server.bind(("10.77.0.2", 0))
        server.listen()
        client.settimeout(2)
        client.connect(server.getsockname())
        conn, peer = server.accept()
        with conn:
            assert peer[0] == "10.77.0.1"
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.sendall(b"pong")
            assert client.recv(4) == b"pong"


@pytest.mark.parametrize("side", ["switch port", "node interface"])
def test_link_down_cuts_traffic_and_up_restores_it(topo, side):
    where = (topo.sw, "b") if side == "switch port" else (topo.b, "eth0")
    assert udp_reaches(topo.a, topo.b, "10.77.0.2")
    set_up(*where, False)
    assert link_info(*where).state == "down"
    assert not udp_reaches(topo.a, topo.b, "10.77.0.2")
    set_up(*where)
    assert eventually_reaches(topo.a, topo.b, "10.77.0.2")


def test_detach_from_bridge_cuts_traffic_and_reattach_restores_it(topo):
    assert udp_reaches(topo.a, topo.b, "10.77.0.2")
    set_master(topo.sw, "b", None)
    assert link_info(topo.sw, "b").master is None
    assert not udp_reaches(topo.a, topo.b, "10.77.0.2")
    set_master(topo.sw, "b", "br0")
    assert link_info(topo.sw, "b").master == "br0"
    assert eventually_reaches(topo.a, topo.b, "10.77.0.2")


def test_addresses_add_and_delete_idempotently(topo):
    add_address(topo.a, "eth0", "10.77.0.50/24")
    add_address(topo.a, "eth0", "10.77.0.50/24")
    add_address(topo.a, "eth0", "fd00:77::1/64")
    found = addresses(topo.a, "eth0")
    assert found[:2] == ["10.77.0.1/24", "10.77.0.50/24"]
    assert "fd00:77::1/64" in found

    del_address(topo.a, "eth0", "10.77.0.50/24")
    del_address(topo.a, "eth0", "10.77.0.50/24")
    del_address(topo.a, "eth0", "fd00:77::1/64")
    assert [a for a in addresses(topo.a, "eth0") if not a.startswith("fe80:")] == ["10.77.0.1/24"]


@pytest.mark.parametrize("bad", ["10.77.0.9", "10.77.0.300/24", "nonsense/8"])
def test_bad_addresses_are_rejected(topo, bad):
    with pytest.raises(NetError, match=f"{topo.a}"):
        add_address(topo.a, "eth0", bad)


def test_default_route(topo):
    add_route(topo.a, "default", "10.77.0.254")
    add_route(topo.a, "default", "10.77.0.253")  # replaces
    add_route(topo.a, "10.99.0.0/16", "10.77.0.2")
    with netns.iproute(topo.a) as ipr:
        assert ipr.route("get", dst="192.0.2.1")[0].get("gateway") == "10.77.0.253"
        assert ipr.route("get", dst="10.99.1.1")[0].get("gateway") == "10.77.0.2"
    with pytest.raises(NetError, match=f"{topo.a}.*directly connected"):
        add_route(topo.a, "10.98.0.0/16", "192.0.2.1")


def test_errors_name_the_namespace_and_interface(topo):
    with pytest.raises(NetError, match=f"no interface 'nope' in network namespace '{topo.a}'"):
        set_up(topo.a, "nope")
    with pytest.raises(NetError, match=f"no interface 'nope' in network namespace '{topo.sw}'"):
        set_master(topo.sw, "a", "nope")
    with pytest.raises(NetError, match=f"'br0' in network namespace '{topo.sw}'.*name is taken"):
        add_bridge(topo.sw, "br0")
    with pytest.raises(NetError, match="too long"):
        add_bridge(topo.sw, "a-very-long-bridge-name")


def test_failed_veth_setup_leaves_nothing(topo):
    with pytest.raises(NetError, match="no interface 'missing-br'"):
        add_veth(topo.sw, "c", topo.a, "eth1", bridge="missing-br")
    with pytest.raises(NetError):
        link_info(topo.sw, "c")
    with pytest.raises(NetError):
        link_info(topo.a, "eth1")


def test_remove_link_takes_the_peer_and_is_idempotent(topo):
    remove_link(topo.sw, "b")
    remove_link(topo.sw, "b")
    with pytest.raises(NetError):
        link_info(topo.b, "eth0")

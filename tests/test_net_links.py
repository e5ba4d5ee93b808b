"""Bridges, veths, addresses and routes, with real traffic between namespaces."""

import contextlib
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
    cut_off,
    del_address,
    link_info,
    neighbours,
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


def test_cut_off_removes_the_named_addresses_it_has_and_sets_the_link_down(topo):
    add_address(topo.b, "eth0", "10.77.0.60/24")
    assert udp_reaches(topo.a, topo.b, "10.77.0.60")
    got = cut_off(topo.b, "eth0", ["10.77.0.60/24", "10.77.0.61/24"])
    assert got == ["10.77.0.60/24"]  # .61 was not there
    assert addresses(topo.b, "eth0") == ["10.77.0.2/24"] and not link_info(topo.b, "eth0").up
    assert not udp_reaches(topo.a, topo.b, "10.77.0.2")
    assert cut_off(topo.b, "eth0", ["10.77.0.60/24"]) == []  # again: nothing more to do
    with pytest.raises(NetError, match=f"no interface 'eth9' in .*{topo.b}"):
        cut_off(topo.b, "eth9", [])


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


class Vanishing:
    """An IPRoute whose first call of `method` deletes interface `victim` right after
    answering: the interface vanishes between a look-up and the request that uses it, as
    when a namespace at the veth's other end is being destroyed."""

    def __init__(self, ipr, method: str, victim: str):
        self._ipr, self._method, self._victim = ipr, method, victim
        self.vanished = False

    def __getattr__(self, name):
        real = getattr(self._ipr, name)
        if name != self._method or self.vanished:
            return real

        def call(*args, **kwargs):
            answer = real(*args, **kwargs)
            self.vanished = True
            self._ipr.link("del", index=self._ipr.link_lookup(ifname=self._victim)[0])
            return answer

        return call


@pytest.fixture
def vanishing(monkeypatch):
    """vanishing(method, victim): netlink in the next call of net/ loses `victim` after the
    first `method` call; returns the Vanishing to check that it did."""
    real_iproute = netns.iproute
    made = []

    def install(method: str, victim: str) -> list:
        @contextlib.contextmanager
        def iproute(name):
            with real_iproute(name) as ipr:
                proxy = Vanishing(ipr, method, victim)
                made.append(proxy)
                yield proxy

        monkeypatch.setattr(netns, "iproute", iproute)
        return made

    return install


RACES = {
    "set_up": lambda ns: set_up(ns, "gone", False),
    "set_master": lambda ns: set_master(ns, "gone", "br0"),
    "add_address": lambda ns: add_address(ns, "gone", "10.77.9.1/24"),
    "del_address": lambda ns: del_address(ns, "gone", "10.77.9.1/24"),
    "addresses": lambda ns: addresses(ns, "gone"),
    "neighbours": lambda ns: neighbours(ns, "gone"),
}


@pytest.mark.parametrize("op", sorted(RACES))
def test_an_interface_vanishing_after_its_look_up_is_the_usual_error(topo, vanishing, op):
    """Gone between look-up and request: the same NetError as gone before, never a raw
    pyroute2 NetlinkError."""
    add_veth(topo.sw, "gone", topo.a, "gone-peer")
    add_address(topo.sw, "gone", "10.77.9.1/24")
    made = vanishing("link_lookup", "gone")
    with pytest.raises(NetError, match=f"no interface 'gone' in network namespace '{topo.sw}'"):
        RACES[op](topo.sw)
    assert made[0].vanished


def test_remove_link_of_a_vanishing_interface_is_done(topo, vanishing):
    add_veth(topo.sw, "gone", topo.a, "gone-peer")
    made = vanishing("link_lookup", "gone")
    remove_link(topo.sw, "gone")
    assert made[0].vanished


def test_link_info_of_a_port_whose_bridge_vanishes_has_no_bridge(topo, vanishing):
    add_bridge(topo.sw, "br-gone")
    add_veth(topo.sw, "port", topo.a, "port-peer", bridge="br-gone")
    assert link_info(topo.sw, "port").master == "br-gone"
    made = vanishing("link", "br-gone")
    assert link_info(topo.sw, "port").master is None
    assert made[0].vanished

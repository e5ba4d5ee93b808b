"""`listen_interface`: the agent's RPC and metrics sockets, and the monitor's metrics socket,
bound to the private interface (SO_BINDTODEVICE). Real namespaces: a host with a private
and a service interface, a private peer, and a node that reaches the host's private
address through the service side (the weak host model), as a node could without a
firewall."""

import socket

import pytest
from prometheus_client import CollectorRegistry, Counter
from test_agent_support import agent_lab, prefix  # noqa: F401 - fixtures

from backdoors.agent import AgentClient
from backdoors.agent.listening import ListenError, listen_socket
from backdoors.agent.metrics import MetricsServer
from backdoors.net import links, netns

pytestmark = pytest.mark.root

PRIVATE, SERVICE = "10.98.0.1", "10.97.0.1"  # the host's addresses, on "priv" and "svc"


@pytest.fixture
def hosts(root, unique):
    """(host, private peer, node) namespaces: host priv 10.98.0.1 <-> peer 10.98.0.2;
    host svc 10.97.0.1 <-> node 10.97.0.2, which routes 10.98.0.0/24 via the host."""
    names = tuple(f"bdt-{unique}-{x}" for x in ("host", "peer", "node"))
    host, peer, node = names
    try:
        for ns in names:
            netns.create(ns)
        links.set_up(host, "lo")
        links.add_veth(host, "priv", peer, "eth0")
        links.add_veth(host, "svc", node, "eth0")
        links.add_address(host, "priv", f"{PRIVATE}/24")
        links.add_address(peer, "eth0", "10.98.0.2/24")
        links.add_address(host, "svc", f"{SERVICE}/24")
        links.add_address(node, "eth0", "10.97.0.2/24")
        links.add_route(node, "10.98.0.0/24", SERVICE)
        yield names
    finally:
        for ns in names:
            if netns.exists(ns):
                netns.remove(ns)


def connects(ns: str, address: tuple[str, int]) -> bool:
    """Whether a TCP connection from namespace `ns` to `address` is accepted."""
    with netns.socket_in(ns, socket.AF_INET) as s:
        s.settimeout(5)
        try:
            s.connect(address)
        except ConnectionRefusedError:
            return False
        return True


def scrape(ns: str, address: tuple[str, int]) -> bytes:
    with netns.socket_in(ns, socket.AF_INET) as s:
        s.settimeout(5)
        s.connect(address)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_without_it_a_node_reaches_the_private_address(hosts):
    """The problem: a listener on the private address alone answers the node."""
    host, peer, node = hosts
    with listen_socket(f"{PRIVATE}:0", netns=host) as sock:
        address = sock.getsockname()
        assert connects(peer, address) and connects(node, address)


def test_an_agent_bound_to_the_private_interface_refuses_a_node(agent_lab, hosts):  # noqa: F811
    host, peer, node = hosts
    lab = agent_lab(netns=host, listen=f"{PRIVATE}:0", metrics_listen=f"{PRIVATE}:0",
                    listen_interface="priv")
    rpc = lab.agent.address
    metrics = lab.agent.agent.metrics_server.address
    # the node, through the service interface: nothing to talk to, RPC or metrics
    assert not connects(node, rpc) and not connects(node, metrics)
    # the private network: RPC and metrics as usual
    with AgentClient(f"{rpc[0]}:{rpc[1]}", lab.keys["m1"], "h0", lab.agent_key.public,
                     netns=peer) as c:
        assert c.ping().host == "h0"
    assert b"backdoors_agent_rpc_total" in scrape(peer, metrics)
    # a monitor on the agent's own host, to the private address: accepted
    with AgentClient(f"{rpc[0]}:{rpc[1]}", lab.keys["m1"], "h0", lab.agent_key.public,
                     netns=host) as c:
        assert c.ping().host == "h0"


def test_a_monitor_metrics_server_bound_to_the_private_interface(hosts):
    host, peer, node = hosts
    registry = CollectorRegistry()
    Counter("backdoors_monitor_test", "a test counter", registry=registry).inc()
    server = MetricsServer(registry, f"{PRIVATE}:0", netns=host, interface="priv",
                           what="monitor m1 metrics").start()
    try:
        assert not connects(node, server.address)
        assert b"backdoors_monitor_test_total 1.0" in scrape(peer, server.address)
    finally:
        server.stop()


def test_no_such_interface_is_an_error_and_the_wildcard_is_any_of_its_addresses(hosts):
    host, peer, node = hosts
    with pytest.raises(ListenError, match=r"cannot serve agent h0 RPC on 10\.98\.0\.1:0 on "
                       r"interface priv9 in netns .*: SO_BINDTODEVICE: no interface priv9"):
        listen_socket(f"{PRIVATE}:0", netns=host, interface="priv9", what="agent h0 RPC")
    with listen_socket("0.0.0.0:0", netns=host, interface="priv") as sock:
        port = sock.getsockname()[1]
        assert connects(peer, (PRIVATE, port))
        assert not connects(node, (PRIVATE, port)) and not connects(node, (SERVICE, port))


def test_an_address_that_is_not_the_interfaces_is_an_error(hosts):
    """Outside review: `listen = "<the service address>"` with `listen_interface = "priv"`
    started, said it was ready, and no one could ever connect. The listener now tries a
    connection of its own (from this host, one to an address of the interface counts as
    arriving on it) and refuses to start when it is not accepted."""
    host, peer, node = hosts
    with pytest.raises(ListenError, match=r"10\.97\.0\.1 is not an address of interface priv"):
        listen_socket(f"{SERVICE}:0", netns=host, interface="priv", what="agent h0 RPC")
    with listen_socket(f"{PRIVATE}:0", netns=host, interface="priv") as sock:
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.accept()  # its own probe was taken, not left for the server
        assert connects(peer, sock.getsockname()[:2])

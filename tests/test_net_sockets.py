"""A namespace's TCP connections from sock_diag (net.sockets): what an adopt checks to
tell a session already on its node from one it failed to restore."""

import os
import socket

import pytest

from backdoors.errors import NetError
from backdoors.net import netns, set_up, sockets


@pytest.fixture
def ns(root, unique):
    name = f"bdt-{unique}-socks"
    netns.create(name)
    set_up(name, "lo", True)
    yield name
    netns.reap(f"bdt-{unique}-")


def _pair(ns: str, family: int, host: str):
    with netns.enter(ns):
        server = socket.create_server((host, 0), family=family)
        client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_connections_of_a_namespace_by_endpoints(ns, family, host):
    server, client, accepted = _pair(ns, family, host)
    with server, client, accepted:
        found = sockets.connections(ns)
        here = sockets.endpoint(host, accepted.getsockname()[1])
        there = sockets.endpoint(host, client.getsockname()[1])
        assert found[(here, there)] == os.fstat(accepted.fileno()).st_ino
        assert found[(there, here)] == os.fstat(client.fileno()).st_ino
        assert all(local[1] != server.getsockname()[1] or remote[1] != 0
                   for local, remote in found)  # the listener is not a connection
        assert (here, there) not in sockets.connections(None)  # another namespace's
        client.close()  # closed first: its connection stays (FIN_WAIT, TIME_WAIT), no socket
        accepted.close()
        assert sockets.connections(ns)[(there, here)] == 0


def test_endpoint_is_canonical():
    assert sockets.endpoint("0:0:0:0:0:0:0:1", 80) == ("::1", 80)
    assert sockets.endpoint("10.0.0.1", 7100) == ("10.0.0.1", 7100)


def test_a_missing_namespace_is_an_error_naming_it(root, unique):
    with pytest.raises(NetError, match=f"bdt-{unique}-none"):
        sockets.connections(f"bdt-{unique}-none")

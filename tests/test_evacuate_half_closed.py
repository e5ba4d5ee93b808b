"""Sessions whose client shut its writing side down (`nc -N`, some HTTP/1.0 clients: the
server's socket in CLOSE_WAIT) move with the others: the evacuate dumps them with the
client's FIN, the target gives it to each restored socket again, and every stream goes on
byte-exact. Before, the dump refused them ("CLOSE_WAIT, not ESTABLISHED") and they
stayed on the failed node."""

import time

import pytest

from backdoors.lab import Lab, topology
from backdoors.lab.clients import StreamClients
from test_nodes_support import wait_for

pytestmark = pytest.mark.root


def test_half_closed_sessions_are_evacuated_with_the_others(root, unique):
    with Lab(f"hc{unique}", hosts=1, nodes=2, agents=True, services=False) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=30) as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 5, half_close=3) as clients:
            wait_for(lambda: len(c.call("sessions", node="n0")) == 5, 20, "5 held sessions")
            wait_for(lambda: all(o > 0 for o in clients.offsets()), 20, "data on every session")
            at = clients.offsets()
            since = time.monotonic()
            c.call("fence", node="n0")
            moved = c.call("evacuate", node="n0", to=lab.agent_address("h0"),
                           to_agent="h0", to_node="n1")
            assert moved["moved"] == 5 and not moved["failed"], moved
            wait_for(lambda: clients.beyond(at), 30,
                     "every stream to continue")
            report = clients.report(since, progressed_from=at)
            assert report["sessions_ok"] == 5, report
            assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
            assert len(c.call("sessions", node="n1")) == 5


def test_a_session_its_client_reset_during_the_move_is_over_not_failed(root, unique):
    """A client resets its connection (SO_LINGER 0) while its node is fenced: the reset
    is lost under the network lock, the restored socket draws another, and the recovery
    server refuses it ("not connected"). The evacuate called that a failure and kept the
    session's dump in limbo for good, and every later evacuate of the node had to go to
    the same target (outside review). It is over: `ended`, not failed, nothing kept."""
    import socket
    import struct

    from backdoors.net import netns
    with Lab(f"rs{unique}", hosts=1, nodes=2, agents=True, services=False) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=30) as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as clients:
            with netns.enter(lab.plan.client_ns):
                doomed = socket.create_connection((vip, topology.RECOVERABLE_PORT), timeout=10)
            wait_for(lambda: len(c.call("sessions", node="n0")) == 4, 20, "4 held sessions")
            wait_for(lambda: all(o > 0 for o in clients.offsets()), 20, "data on every session")
            doomed.recv(100)
            at, since = clients.offsets(), time.monotonic()
            c.call("fence", node="n0")
            doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            doomed.close()  # a reset, dropped by the fence
            moved = c.call("evacuate", node="n0", to=lab.agent_address("h0"),
                           to_agent="h0", to_node="n1")
            assert not moved["failed"], moved
            assert moved["moved"] + moved["ended"] == moved["sessions"] == 4, moved
            assert c.held("n0").limbo == 0
            wait_for(lambda: clients.beyond(at), 30, "every other stream to continue")
            report = clients.report(since, progressed_from=at)
            assert report["sessions_ok"] == 3, report
            assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report

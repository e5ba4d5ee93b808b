"""An evacuate sends the sessions on while it dumps them: every AHEAD_SESSIONS sessions
dumped go to the target as a batch, which it restores (inert) while the source dumps the
next; the final batch carries the rest and starts them all. Two hosts, 300 verifying
stream clients on n0, fenced and evacuated to n1: three adopt requests (two ahead, the
final one), every session moved and continuing byte-exact, and nothing of them left at
the source (their boxes' regions removed once the final batch is on its way)."""

import time

import pytest

from backdoors.agent.recovery import AHEAD_SESSIONS
from backdoors.lab import Lab, topology
from backdoors.lab.clients import StreamClients
from test_nodes_support import wait_for

pytestmark = pytest.mark.root


def test_an_evacuate_sends_batches_ahead_while_it_dumps(root, unique):
    count = 2 * AHEAD_SESSIONS + 44
    with Lab(f"ea{unique}", hosts=2, nodes=2, agents=True, services=False,
             pids_limit=2 * count + 256) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "2048", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=60) as c, lab.agent_client("h1") as c1, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, count) as clients:
            wait_for(lambda: len(c.call("sessions", node="n0")) == count, 60,
                     f"{count} held sessions")
            wait_for(lambda: all(o > 0 for o in clients.offsets()), 30, "data on every session")
            at = clients.offsets()
            since = time.monotonic()
            c.call("fence", node="n0")
            moved = c.call("evacuate", node="n0", to=lab.agent_address("h1"), to_agent="h1",
                           to_node="n1")
            assert moved["moved"] == count and not moved["failed"], moved["failed"]
            adopts = moved["adopt"]
            assert [a["handed"] for a in adopts] == [0, 0, count], adopts
            assert [a["restored"] for a in adopts[:2]] == [AHEAD_SESSIONS] * 2
            assert c.call("sessions", node="n0") == []
            assert [r.name for r in c.regions("n0") if r.kind == "cb"] == []
            assert c.held("n0").limbo == 0
            wait_for(lambda: clients.beyond(at), 60, "every stream to continue on n1")
            report = clients.report(since, progressed_from=at)
            assert report["sessions_ok"] == count, report
            assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
            wait_for(lambda: len(c1.call("sessions", node="n1")) == count, 30,
                     f"{count} sessions held on n1")

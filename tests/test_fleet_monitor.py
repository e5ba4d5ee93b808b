"""A fleet of real monitors sharing a real agent's nodes through a real etcd: takeover
after a SIGKILL, a paused monitor's late request refused, degraded mode without etcd."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest
from test_agent_support import agent_lab, prefix, read_line
from test_fleet_support import etcd, until

from backdoors.agent.keys import write_key_file
from backdoors.common.configfile import dumps
from backdoors.fleet import EtcdClient, FleetMember, assign
from backdoors.fleet.member import read_fleet
from backdoors.monitor.config import AgentEntry, MonitorConfig

__all__ = ["agent_lab", "etcd", "prefix"]
pytestmark = pytest.mark.root

NODES = [f"n{i}" for i in range(8)]



def monitor_config(lab, etcd, monitor_id: str, **extra) -> MonitorConfig:
    key_file = os.path.join(lab.tmp, f"{monitor_id}.key")
    write_key_file(key_file, lab.keys[monitor_id], overwrite=True)
    host, port = lab.agent.address
    fields = dict(monitor_id=monitor_id, key_file=key_file, events=False,
                  incidents_dir=os.path.join(lab.tmp, f"incidents-{monitor_id}"),
                  agents=[AgentEntry("h0", f"{host}:{port}", lab.agent_key.public_text())],
                  etcd=[etcd.url], fleet_poll_ms=50.0)
    fields.update(extra)
    return MonitorConfig(**fields)


def start_monitor(lab, etcd, monitor_id: str, **extra) -> subprocess.Popen:
    """`python -m backdoors monitor --config FILE` as its own process."""
    path = os.path.join(lab.tmp, f"{monitor_id}.toml")
    with open(path, "w") as f:
        f.write(dumps(monitor_config(lab, etcd, monitor_id, **extra)))
    proc = subprocess.Popen([sys.executable, "-m", "backdoors", "monitor", "--config", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(proc)
    return proc


def owners_at_agent(client) -> dict[str, str | None]:
    """node -> the monitor whose token the agent holds for it."""
    return {i.name: i.owner for i in client.nodes()}


def test_a_killed_monitors_nodes_are_taken_over_and_it_gets_a_share_back(agent_lab, etcd):
    lab = agent_lab(nodes={n: {} for n in NODES})
    c = lab.client()
    want = {n.split("/")[1]: m for n, m in
            assign([f"h0/{n}" for n in NODES], ["m1", "m2", "m3"]).items()}
    assert set(want.values()) == {"m1", "m2", "m3"}  # every monitor has a share
    procs = {m: start_monitor(lab, etcd, m) for m in ("m1", "m2", "m3")}
    until(lambda: owners_at_agent(c) == want, 30, "each node claimed by its assigned monitor",
          show=lambda: (owners_at_agent(c), read_fleet(EtcdClient(etcd.url)), want))
    takeovers = []
    for _ in range(3):
        lost = {n for n, m in want.items() if m == "m2"}
        killed = time.monotonic()
        procs["m2"].send_signal(signal.SIGKILL)
        procs["m2"].wait()
        until(lambda: (o := owners_at_agent(c)) and all(o[n] in ("m1", "m3") for n in lost),
              30, "m2's nodes claimed by m1 and m3", every=0.005,
              show=lambda: (owners_at_agent(c), read_fleet(EtcdClient(etcd.url))))
        takeovers.append((time.monotonic() - killed) * 1000)
        # each of m2's nodes went to its next monitor, nothing else moved (waited for: on a
        # machine loaded enough to starve a monitor's keep-alive for its 1 s lease, its
        # nodes may move and come back meanwhile)
        rest = {n.split("/")[1]: m for n, m in
                assign([f"h0/{n}" for n in NODES], ["m1", "m3"]).items()}
        until(lambda: owners_at_agent(c) == rest, 30, "the nodes owned as assigned to m1, m3",
              show=lambda: (owners_at_agent(c), read_fleet(EtcdClient(etcd.url)), rest))
        etcd_owners = read_fleet(EtcdClient(etcd.url))["owners"]
        assert {k.split("/")[1]: v[0] for k, v in etcd_owners.items()} == rest
        # m2 comes back: its share is given back to it
        procs["m2"] = start_monitor(lab, etcd, "m2")
        until(lambda: owners_at_agent(c) == want, 30, "m2's share back",
              show=lambda: (owners_at_agent(c), read_fleet(EtcdClient(etcd.url)), want))
    takeovers.sort()
    print(f"takeover ms: {[round(t) for t in takeovers]}, p50 {statistics.median(takeovers):.0f}")
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(15)


def test_a_monitor_that_cannot_reach_an_agent_leaves_its_nodes_to_one_that_can(
        agent_lab, etcd):
    """m2's way to the agent is cut (its address for h0 answers nothing): every node goes
    to m1, which reaches it, and none is left unwatched; m2 takes its share once it
    reaches the agent too."""
    lab = agent_lab(nodes={n: {} for n in NODES})
    c = lab.client()
    with socket.socket() as closed:  # a port bound and never listened on: refused
        closed.bind((lab.agent.address[0], 0))
        cut = f"{lab.agent.address[0]}:{closed.getsockname()[1]}"
        procs = [start_monitor(lab, etcd, "m1"),
                 start_monitor(lab, etcd, "m2", agents=[
                     AgentEntry("h0", cut, lab.agent_key.public_text())])]

        def fleet():
            return read_fleet(EtcdClient(etcd.url))
        until(lambda: {m: i.get("reaches") for m, i in fleet()["members"].items()} ==
              {"m1": ["h0"], "m2": []}, 30, "m1 reaching h0, m2 reaching nothing", show=fleet)
        until(lambda: owners_at_agent(c) == {n: "m1" for n in NODES}, 30,
              "every node claimed by m1", show=lambda: (owners_at_agent(c), fleet()))
        assert {n: o[0] for n, o in fleet()["owners"].items()} == \
            {f"h0/{n}": "m1" for n in NODES}
    # m2, started again with the agent's address, takes its share
    procs[1].send_signal(signal.SIGTERM)
    procs[1].wait(15)
    procs[1] = start_monitor(lab, etcd, "m2")
    want = {n.split("/")[1]: m for n, m in assign([f"h0/{n}" for n in NODES],
                                                  ["m1", "m2"]).items()}
    until(lambda: owners_at_agent(c) == want, 30, "the nodes shared by m1 and m2",
          show=lambda: (owners_at_agent(c), fleet()))
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(15)


def test_an_agent_lost_by_every_monitor_moves_none_of_its_nodes(agent_lab, etcd):
    """The agent hangs (its loop blocked) for longer than the fleet's reach and grace:
    every monitor loses it within moments of the others, and its nodes stay with their
    owners, under the same records (no take, no new token)."""
    lab = agent_lab(nodes={n: {} for n in NODES})
    c = lab.client()
    want = {n.split("/")[1]: m for n, m in
            assign([f"h0/{n}" for n in NODES], ["m1", "m2", "m3"]).items()}
    procs = [start_monitor(lab, etcd, m) for m in ("m1", "m2", "m3")]
    etc = EtcdClient(etcd.url)

    def fleet():
        return read_fleet(etc)
    until(lambda: owners_at_agent(c) == want and all(
        i.get("reaches") == ["h0"] for i in fleet()["members"].values()), 30,
        "each node claimed by its monitor, each reaching h0",
        show=lambda: (owners_at_agent(c), fleet()))
    before = fleet()["owners"]
    hung = time.monotonic()
    lab.agent._loop.call_soon_threadsafe(time.sleep, 5.0)  # the agent answers nothing
    until(lambda: all(i.get("reaches") == [] for i in fleet()["members"].values()), 10,
          "every monitor lost h0", show=fleet)
    seen = []
    while time.monotonic() - hung < 6.0:  # past the reach (2 s) and the grace (1 s)
        seen.append(fleet()["owners"])
        time.sleep(0.05)
    assert all(o == before for o in seen), [o for o in seen if o != before][:3]
    # back: each node with its monitor (on a loaded machine, the first monitor to reach
    # h0 again may take a node of one starved past the grace, which takes it back)
    until(lambda: all(i.get("reaches") == ["h0"] for i in fleet()["members"].values()), 30,
          "every monitor reaching h0 again", show=fleet)
    until(lambda: owners_at_agent(c) == want, 30, "each node with its monitor",
          show=lambda: (owners_at_agent(c), fleet()))
    etc.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(15)


# A monitor of the fleet, reduced to what the test needs: it joins, owns its nodes and
# claims them at the agent, prints its tokens; then, for each line on stdin, sends the
# destructive request named there with the token it held before (a request in flight).
HELPER = """
import json, sys, time
from backdoors.agent import AgentClient
from backdoors.agent.keys import decode_public, load_identity
from backdoors.fleet import EtcdClient, FleetMember
url, key_file, address, agent_key, nodes = sys.argv[1:6]
nodes = nodes.split(",")
member = FleetMember(EtcdClient(url), "m1", lambda: nodes, poll_s=0.05).start()
while len(member.snapshot().tokens) < len(nodes):
    time.sleep(0.01)
held = member.snapshot().tokens
client = AgentClient(address, load_identity(key_file, "m1"), "h0",
                     decode_public(agent_key, "h0"), timeout=5.0,
                     tokens=lambda node: held["h0/" + node])
for n in nodes:
    client.claim(n.split("/")[1])
print(json.dumps(held), flush=True)
for line in sys.stdin:
    node, pids = line.split()
    try:
        client.set_limits(node, pids=int(pids))
        print(json.dumps({"ok": True}), flush=True)
    except Exception as e:
        print(json.dumps({"ok": False, "code": getattr(e, "code", ""), "error": str(e)}),
              flush=True)
"""


def test_a_paused_monitors_late_request_is_refused_by_the_agent(agent_lab, etcd):
    lab = agent_lab(nodes={"n0": {"pids_limit": 100}})
    c = lab.client()
    key_file = os.path.join(lab.tmp, "m1.key")
    write_key_file(key_file, lab.keys["m1"], overwrite=True)
    host, port = lab.agent.address
    m1 = subprocess.Popen([sys.executable, "-c", HELPER, etcd.url, key_file, f"{host}:{port}",
                           lab.agent_key.public_text(), "h0/n0"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lab.procs.append(m1)
    held = json.loads(read_line(m1, 20))
    assert owners_at_agent(c) == {"n0": "m1"}
    m1.send_signal(signal.SIGSTOP)  # paused, holding its lease
    try:
        m2 = start_monitor(lab, etcd, "m2")
        until(lambda: owners_at_agent(c) == {"n0": "m2"}, 30, "m2 to take n0 over")
        token = {i.name: i.token for i in c.nodes()}["n0"]
        assert token > held["h0/n0"]
        m1.stdin.write(b"n0 7\n")  # sent as soon as it runs again, with its old token
        m1.stdin.flush()
    finally:
        m1.send_signal(signal.SIGCONT)
    reply = json.loads(read_line(m1, 20))
    assert reply["ok"] is False and reply["code"] == "stale_token", reply
    assert "m2 owns the node now" in reply["error"]
    assert c.status("n0").stats.pids_limit == 100  # not applied
    refused = [r for r in lab.audit() if r.get("error") == "stale_token"]
    assert [(r["monitor"], r["op"]) for r in refused] == [("m1", "set_limits")]
    m1.stdin.close()
    m1.wait(10)
    m2.send_signal(signal.SIGTERM)
    m2.wait(15)


def test_a_monitor_without_etcd_keeps_its_share_and_says_so(agent_lab, etcd):
    from prometheus_client import generate_latest

    from backdoors.monitor.core import Monitor
    from backdoors.monitor.share import NotOurs

    lab = agent_lab(nodes={n: {} for n in NODES})
    other = FleetMember(EtcdClient(etcd.url), "m2", lambda: [f"h0/{n}" for n in NODES],
                        poll_s=0.05).start()
    mon = Monitor(monitor_config(lab, etcd, "m1"), key=lab.keys["m1"])
    try:
        mon.start()
        want = {n.split("/")[1]: m for n, m in
                assign([f"h0/{n}" for n in NODES], ["m1", "m2"]).items()}
        mine = {n for n, m in want.items() if m == "m1"}
        assert mine and mine != set(NODES)
        until(lambda: set(k.split("/")[1] for k in
                          (mon.fleet_status()["nodes"])) == mine and
              all(v["claimed"] for v in mon.fleet_status()["nodes"].values()), 30,
              "m1's share claimed")
        polls = mon.pollers[0].polls
        etcd.proc.send_signal(signal.SIGSTOP)
        try:
            status = until(lambda: (s := mon.fleet_status())["degraded"] and s, 30,
                           "m1 to say it is degraded")
            assert "unreachable" in status["degraded"]
            assert {k.split("/")[1] for k in status["nodes"]} == mine  # its last share
            until(lambda: mon.pollers[0].polls > polls + 5, 30, "polls to go on")
            text = generate_latest(mon.metrics.registry).decode()
            assert "backdoors_monitor_fleet_degraded 1.0" in text
            client = mon._client_for("h0")
            theirs = sorted(set(NODES) - mine)[0]
            with pytest.raises(NotOurs, match=f"node {theirs} of h0 is not this monitor's"):
                client.set_limits(theirs, pids=50)
            ours = sorted(mine)[0]
            assert client.set_limits(ours, pids=50).pids_limit == 50  # its own: still acts
        finally:
            etcd.proc.send_signal(signal.SIGCONT)
        until(lambda: mon.fleet_status()["degraded"] is None, 30, "etcd back")
    finally:
        mon.stop()
        other.stop()


EMPTY_RULE = """
[[rule]]
name = "empty"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["pids"], min = 1 }]
actions = [{ kind = "record" }]
clear_ms = 100
"""


def test_an_open_incident_moves_with_its_node_to_the_next_monitor(agent_lab, etcd):
    """m1 opens an incident on its node and records it in etcd; m1 stops (its lease
    revoked: the node moves at once) while the incident is still open; m2 takes the node
    and carries the incident on under its id; once the condition clears, m2 closes it and
    the record goes."""
    from backdoors.monitor.core import Monitor
    from backdoors.monitor.rules import parse_ruleset

    lab = agent_lab(nodes={"n0": {}})  # an empty node: "empty" fires until a process runs
    rules = parse_ruleset(EMPTY_RULE).rule
    fleet = EtcdClient(etcd.url)
    m1 = Monitor(monitor_config(lab, etcd, "m1", period_ms=50), key=lab.keys["m1"],
                 rules=rules).start()
    m2 = None
    try:
        first = m1.wait_for(lambda i: i.rule == "empty", 30)
        assert first is not None and first.node == "n0"
        record = until(lambda: read_fleet(fleet)["incidents"].get("h0/n0"), 10,
                       "the incident recorded in etcd")
        assert (record["incident"], record["monitor"], record["rule"]) == (first.id, "m1", "empty")
        m1.stop()
        assert read_fleet(fleet)["incidents"]["h0/n0"]["incident"] == first.id  # still open
        m2 = Monitor(monitor_config(lab, etcd, "m2", period_ms=50), key=lab.keys["m2"],
                     rules=rules).start()
        adopted = m2.wait_for(lambda i: i.id == first.id, 30)
        assert adopted is not None and adopted.adopted_from == "m1" and adopted.monitor == "m2"
        until(lambda: read_fleet(fleet)["incidents"].get("h0/n0", {}).get("monitor") == "m2",
              10, "the record rewritten by its new owner")
        assert not [i for i in m2.incidents() if i.rule == "empty" and i.id != first.id]
        proc = lab.run("n0", "import time; time.sleep(60)")  # the node is not empty any more
        try:
            closed = m2.wait_for(lambda i: i.id == first.id and i.outcome == "cleared", 30)
            assert closed is not None
            until(lambda: "h0/n0" not in read_fleet(fleet)["incidents"], 10, "the record gone")
        finally:
            proc.kill()
            proc.wait()
    finally:
        if not m1.stopping.is_set():
            m1.stop()
        if m2 is not None:
            m2.stop()
        fleet.close()


def test_a_node_taken_again_is_taken_anew(agent_lab, etcd):
    """m1 has an incident open on its node when its lease expires (revoked here, as if
    etcd had not heard from it: paused, cut off). It takes the node again under a new
    token: another monitor may have acted on it meanwhile, so what m1 held of it is
    dropped (the incident closed) and the incident is carried on from the record in etcd,
    not from m1's memory."""
    from backdoors.monitor.core import Monitor
    from backdoors.monitor.rules import parse_ruleset

    lab = agent_lab(nodes={"n0": {}})  # an empty node: "empty" fires until a process runs
    fleet = EtcdClient(etcd.url)
    m1 = Monitor(monitor_config(lab, etcd, "m1", period_ms=50), key=lab.keys["m1"],
                 rules=parse_ruleset(EMPTY_RULE).rule).start()
    try:
        first = m1.wait_for(lambda i: i.rule == "empty", 30)
        assert first is not None
        until(lambda: read_fleet(fleet)["incidents"].get("h0/n0"), 10, "the record in etcd")
        token = m1.share.member.token("h0/n0")
        # as after a pause: its next step renews the lease, finds it expired and takes the
        # node again in that same step (so the node never leaves its share; a step just
        # before, seeing no members, may let it go first: closed as another's then)
        m1.share.member._renew_at = 0.0
        fleet.revoke(m1.share.member.share.lease)
        until(lambda: (m1.share.member.token("h0/n0") or 0) > token, 30, "n0 taken again")
        assert first.outcome in ("the node changed hands: taken anew",
                                 "owned by another monitor of the fleet"), first.outcome
        again = m1.wait_for(lambda i: i.id == first.id and i is not first, 10)
        assert again is not None and again.adopted_from == "m1" and again.closed is None
    finally:
        m1.stop()
        fleet.close()


def test_a_response_ends_under_the_ownership_it_began_in(etcd):
    """Within `pinned` (a response), the node's token is the one it began with: once the
    node changed hands, even back to this monitor under a new token, nothing more is
    sent for it; other threads, and the next response, use the new token."""
    import threading

    from backdoors.monitor.share import FleetShare, NotOurs

    share = FleetShare("m1", [etcd.url], lambda: {"h0/n0"}, prefix="/backdoors/fleet/",
                       ttl_s=1, poll_s=0.05)
    try:
        until(lambda: share.member.step().tokens.get("h0/n0"), 10, "m1 owns h0/n0")
        token = share.token("h0", "n0")
        with share.pinned("h0", "n0"):
            assert share.token("h0", "n0") == token
            share.client.revoke(share.member.share.lease)
            until(lambda: share.member.step() and (share.member.token("h0/n0") or 0) > token,
                  10, "h0/n0 taken again")
            with pytest.raises(NotOurs, match="changed hands during this response"):
                share.token("h0", "n0")
            seen = []
            other = threading.Thread(target=lambda: seen.append(share.token("h0", "n0")))
            other.start()
            other.join()
            assert seen[0] > token
        assert share.token("h0", "n0") == seen[0]
    finally:
        share.stop()


def _ran_a_while(etcd) -> None:
    """Revisions in the hundreds, as in a fleet that ran a while."""
    client = EtcdClient(etcd.url)
    for i in range(300):
        client.put("/other/app/key", str(i))
    client.close()


def test_a_fleet_whose_etcd_comes_back_empty_watches_its_nodes_again(agent_lab, etcd):
    """Outside review: etcd made anew on the same address (its data lost) starts its
    revisions again, below the tokens the agents hold: every claim was refused as stale,
    for good, and the monitor judged none of its nodes. Now the tokens are revisions
    within the fleet's epoch, which an etcd without one gets anew from the clock."""
    from backdoors.fleet import EtcdClient
    from backdoors.monitor.core import Monitor

    nodes = ("n0", "n1")
    lab = agent_lab(nodes={n: {} for n in nodes})
    _ran_a_while(etcd)
    mon = Monitor(monitor_config(lab, etcd, "m1"), key=lab.keys["m1"])
    try:
        mon.start()
        until(lambda: all(mon.watches("h0", n) for n in nodes), 30, "m1 watching its nodes")
        before = {i.name: i.token for i in lab.client().nodes()}
        time.sleep(1.0)  # epochs are whole seconds: the new etcd's comes a second later
        etcd.stop()
        etcd.start()  # empty, on the same address
        c = lab.client()

        def again():  # claimed anew at the agent (tokens above the old), and watched
            after = {i.name: i.token for i in c.nodes()}
            return all(after[n] > before[n] and mon.watches("h0", n) for n in nodes)
        until(again, 30, "m1 watching its nodes again",
              show=lambda: (mon.fleet_status()["nodes"], c.nodes()))
    finally:
        mon.stop()


def test_a_fleet_whose_etcd_gives_tokens_below_the_agents_watches_its_nodes_again(
        agent_lab, etcd):
    """Outside review: an etcd restored from a snapshot (an older epoch, revisions gone
    back), or made anew within the second of its predecessor's epoch (the same epoch,
    revisions gone back), or whose epoch a monitor with its clock behind made, gave tokens
    below those the agents hold: every claim refused, for good, unless an operator deleted
    the epoch key. Now a refused claim whose agent holds a token no owner in this etcd was
    given moves the epoch past it."""
    from backdoors.fleet import EtcdClient
    from backdoors.monitor.core import Monitor

    nodes = ("n0", "n1")
    lab = agent_lab(nodes={n: {} for n in nodes})
    _ran_a_while(etcd)
    c = lab.client()
    for back in (0, 100):  # the same epoch, then one 100 s older
        mon = Monitor(monitor_config(lab, etcd, "m1"), key=lab.keys["m1"])
        try:
            mon.start()
            until(lambda: all(mon.watches("h0", n) for n in nodes), 30,
                  "m1 watching its nodes")
            before = {i.name: i.token for i in c.nodes()}
        finally:
            mon.stop()
        etcd.stop()
        etcd.start()  # empty, on the same address, its epoch set before any monitor's
        client = EtcdClient(etcd.url)
        client.put("/backdoors/fleet/epoch", str((max(before.values()) >> 32) - back))
        client.close()
        mon = Monitor(monitor_config(lab, etcd, "m1"), key=lab.keys["m1"])
        try:
            mon.start()

            def again():  # claimed anew at the agent (tokens above the old), and watched
                after = {i.name: i.token for i in c.nodes()}
                return all(after[n] > before[n] and mon.watches("h0", n) for n in nodes)
            until(again, 30, f"m1 watching its nodes again (epoch {back} s back)",
                  show=lambda: (mon.fleet_status()["nodes"], c.nodes()))
        finally:
            mon.stop()

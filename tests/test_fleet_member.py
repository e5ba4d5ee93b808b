"""The fleet's membership and ownership against a real etcd: assignment, tokens, takeover."""

import time

import pytest
from test_fleet_support import etcd, until  # noqa: F401 - etcd is a fixture

from backdoors.fleet import EtcdClient, EtcdUnavailable, FleetMember, assign
from backdoors.fleet.member import read_fleet

NODES = [f"h{h}/n{n}" for h in range(2) for n in range(8)]


def test_rendezvous_moves_only_the_nodes_of_a_member_that_leaves():
    before = assign(NODES, ["m1", "m2", "m3"])
    after = assign(NODES, ["m1", "m3"])
    assert set(before.values()) == {"m1", "m2", "m3"}
    assert all(after[n] == m for n, m in before.items() if m != "m2")
    assert assign(NODES, []) == {}



def test_members_share_the_nodes_and_take_over_a_dead_ones(etcd):  # noqa: F811
    clients = [EtcdClient(etcd.url) for _ in range(3)]
    members = [FleetMember(c, f"m{i + 1}", lambda: NODES, poll_s=0.05) for i, c in
               enumerate(clients)]
    try:
        for m in members:
            m.start()
        want = assign(NODES, ["m1", "m2", "m3"])

        def settled():
            owners = read_fleet(clients[0])["owners"]
            return owners if {n: o[0] for n, o in owners.items()} == want else None
        owners = until(settled, what="every node owned as assigned")
        for m in members:  # each member's tokens are the revisions of its records
            assert m.snapshot().tokens == {n: o[1] for n, o in owners.items()
                                          if o[0] == m.id}
        # m2 dies without a word (its thread stops, its lease is left to expire)
        dead = members[1]
        dead._stop.set()
        dead._thread.join()
        lost = {n for n, o in owners.items() if o[0] == "m2"}
        start = time.monotonic()
        again = until(lambda: (o := read_fleet(clients[0])["owners"]) and
                      all(o.get(n, ["m2"])[0] != "m2" for n in lost) and
                      len(o) == len(NODES) and o, what="m2's nodes taken over")
        took = time.monotonic() - start
        assert took < 5.0  # the lease TTL (1 s, expired by etcd within ~0.5 s more) + a step
        for n in lost:  # taken by the next member of its rendezvous order, with a newer token
            assert again[n][0] == assign([n], ["m1", "m3"])[n]
            assert again[n][1] > owners[n][1]
        assert all(again[n] == owners[n] for n in NODES if n not in lost)  # nothing else moved
        # m2 comes back: it gets its share again, with newer tokens still
        back = FleetMember(clients[1], "m2", lambda: NODES, poll_s=0.05).start()
        members[1] = back
        final = until(lambda: (o := read_fleet(clients[0])["owners"]) and
                      {n: x[0] for n, x in o.items()} == want and o, what="m2's share back")
        assert all(final[n][1] > again[n][1] for n in lost)
    finally:
        for m in members:
            m.stop()
        for c in clients:
            c.close()


def test_a_member_without_etcd_is_degraded_and_keeps_its_share(etcd):  # noqa: F811
    client = EtcdClient(etcd.url)
    m = FleetMember(client, "m1", lambda: NODES, poll_s=0.05)
    try:
        until(lambda: m.step().degraded is None, what="a share from etcd")
        assert set(m.share.tokens) == set(NODES)
        tokens = dict(m.share.tokens)
        etcd.proc.send_signal(19)  # SIGSTOP: etcd does not answer
        share = m.step()
        assert share.degraded and "unreachable" in share.degraded
        assert share.tokens == tokens
        etcd.proc.send_signal(18)
        until(lambda: m.step().degraded is None, what="etcd back")
        assert set(m.share.tokens) == set(NODES)
    finally:
        etcd.proc.send_signal(18)
        m.stop()
        client.close()


def test_unreachable_etcd_is_a_clear_error():
    with EtcdClient("http://127.0.0.1:9", timeout=0.2) as c:
        with pytest.raises(EtcdUnavailable, match="etcd unreachable .*is it running"):
            c.prefix("/")


def test_without_etcd_a_monitor_is_alone_and_sends_no_token(tmp_path):
    """The default path: no fleet, every node watched, clients without tokens."""
    from backdoors.agent.keys import new_identity
    from backdoors.monitor.config import AgentEntry, MonitorConfig
    from backdoors.monitor.core import Monitor

    agent = new_identity("h0")
    config = MonitorConfig(monitor_id="m1", agents=[
        AgentEntry("h0", "127.0.0.1:9", agent.public_text())])
    mon = Monitor(config, key=new_identity("m1"))
    assert mon.share is None and mon.fleet_status() is None
    assert mon.watches("h0", "any-node")
    client = mon._default_client(config.agents[0], 0.2)
    assert client.tokens is None
    payload, _ = client.signed_request("kill_node", {"node": "n0"})
    assert b"token" not in payload


def test_the_monitor_command_refuses_a_bad_etcd_url(tmp_path):
    import subprocess
    import sys

    from backdoors.agent.keys import new_identity, write_key_file
    key = tmp_path / "m1.key"
    write_key_file(str(key), new_identity("m1"))
    config = tmp_path / "m.toml"
    config.write_text(f'monitor_id = "m1"\nkey_file = "{key}"\n[[agents]]\nhost = "h0"\n'
                      f'address = "127.0.0.1:9"\n')
    run = subprocess.run([sys.executable, "-m", "backdoors", "monitor", "--config",
                          str(config), "--etcd", "10.0.0.1:2379"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert "etcd[0]" in run.stderr and "is not a URL" in run.stderr

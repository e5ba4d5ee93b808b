"""`backdoors scenario fleet`: random faults of nodes and monitors; the fencing facts
computed from the agents' audit lines and the monitors' incident spans."""

import pytest

from backdoors.scenarios.fleet import _fencing


def _rpc(op, monitor, token, ts, ok=True, error=None, node="n0"):
    return {"kind": "rpc", "host": "h0", "op": op, "monitor": monitor, "ok": ok,
            "error": error, "ts": ts, "token": {"node": node, "token": token}}


def test_fencing_facts_from_audit_lines():
    audit = [_rpc("claim", "m1", 10, 0.0), _rpc("kill", "m1", 10, 1.0),
             _rpc("claim", "m2", 20, 5.0),
             _rpc("kill", "m1", 10, 5.1, ok=False, error="stale_token"),
             _rpc("kill", "m2", 20, 5.2)]
    assert _fencing(audit, 1.0) == (1, 0, 0, [])
    # an op applied with an older token than one accepted: stale applied; two monitors'
    # kills on one node within the overlap: double acted; each with its audit lines
    audit += [_rpc("kill", "m1", 10, 5.3)]
    refused, stale, double, why = _fencing(audit, 1.0)
    assert (refused, stale, double) == (1, 1, 1)
    assert [(v["why"], v["node"], v["line"]["ts"], v["before"]["ts"]) for v in why] == [
        ("stale", "h0/n0", 5.3, 5.2), ("double", "h0/n0", 5.3, 5.2)]


def op(monitor, ts, incident=None, token=None, op="kill", ok=True, node="n0"):
    r = {"kind": "rpc", "host": "h0", "monitor": monitor, "op": op, "ok": ok, "ts": ts,
         "args": {"node": node}}
    if incident:
        r["incident"] = incident
    if token is not None:
        r["token"] = {"node": node, "token": token}
    return r


def test_two_monitors_acting_on_one_node_at_once_is_a_double_act():
    # m2 acted in the middle of m1's incident's ops on the node
    audit = [op("m1", 10.0, "i1", 5), op("m2", 14.0, "i2", 9), op("m1", 14.5, "i1", 5)]
    refused, stale, double, violations = _fencing(audit, overlap_s=1.0)
    assert (stale, double) == (1, 1)  # m1's last op was also older than m2's token
    [v] = [v for v in violations if v["why"] == "double"]
    assert {v["line"]["incident"], v["before"]["incident"]} == {"i1", "i2"}


def test_one_after_the_other_or_one_incident_carried_on_is_not():
    # m1 fenced off mid-repair (its late ops refused), then m2: one after the other
    fenced = [op("m1", 10.0, "i1", 5), op("m2", 14.0, "i2", 9),
              op("m1", 14.5, "i1", 5, ok=False), op("m2", 15.0, "i2", 9)]
    assert _fencing(fenced, 1.0)[1:3] == (0, 0)
    # m2 took the node and carried m1's incident on (adopted): one incident, two monitors
    adopted = [op("m1", 10.0, "i1", 5), op("m2", 14.0, "i1", 9), op("m2", 15.0, "i1", 9)]
    assert _fencing(adopted, 1.0)[2] == 0
    # ... having opened one of its own there first (seen under stress): m2 acts alone
    own_first = [op("m1", 10.0, "i1", 5), op("m1", 12.0, "i1", 5), op("m2", 13.0, "i2", 9),
                 op("m2", 14.0, "i1", 9), op("m2", 15.0, "i1", 9)]
    assert _fencing(own_first, 1.0)[2] == 0
    # but m1 acting for the carried-on incident while m2 does is a double act
    assert _fencing(own_first + [op("m1", 13.5, "i1", 9)], 1.0)[2] == 1
    # another node's incident at the same time is no concern of this one
    assert _fencing([op("m1", 10.0, "i1"), op("m2", 10.5, "i2", node="n1"),
                     op("m1", 11.0, "i1")], 1.0)[2] == 0


def test_ops_naming_no_incident_pair_by_time_and_stale_tokens_are_counted():
    audit = [op("m1", 10.0, token=5), op("m2", 10.4, token=9), op("m2", 20.0, token=9),
             op("m1", 30.0, token=5), op("m1", 31.0, token=4, ok=False, op="lock")]
    audit[-1]["error"] = "stale_token"
    refused, stale, double, violations = _fencing(audit, overlap_s=1.0)
    assert (refused, stale, double) == (1, 1, 1)
    assert {v["why"] for v in violations} == {"stale", "double"}


@pytest.mark.root
@pytest.mark.slow
def test_fleet_under_random_faults(root):
    from backdoors.fleet.process import available
    from conftest import unavailable
    if available() is None:
        unavailable("etcd is not installed (Debian: etcd-server; make system-deps)")
    from backdoors.net import firewall
    if firewall.available() is None:
        unavailable("nft is not installed (Debian: nftables; make system-deps)")
    from backdoors.scenarios.fleet import fleet
    # a small fleet (the CI's size); each of the fleet's own faults once, then random ones
    r = fleet(hosts=2, nodes=8, etcd_members=3, duration_s=6, interval_s=3, seed=7,
              schedule=["monitor-cut", "etcd-kill", "monitor-kill", "monitor-stop"])
    for key in ("monitors", "hosts", "nodes", "faults_injected", "faults_handled",
                "takeover_ms_p99", "stale_token_ops_refused", "stale_token_ops_applied",
                "double_acted", "missed"):
        assert key in r, key
    assert r["faults_injected"] >= 6, r
    assert all(r["faults_by_kind"][k] >= 1 for k in ("monitor-cut", "etcd-kill",
                                                      "monitor-kill", "monitor-stop")), r
    # the cut monitor said it was degraded and another took its nodes; whatever it did
    # late on them (a fault on one of them while cut) was refused: nothing stale applied
    assert r["cut_degraded"] == 1 and len(r["cut_takeover_ms"]) == 1, r
    assert r["takeover_ms_p99"] is not None, r
    assert r["stale_token_ops_applied"] == 0 and r["double_acted"] == 0, r["fencing_violations"]
    assert r["ops_without_incident"] == 0  # every monitor's op named its incident
    assert r["missed"] == 0, r
    # the timeline holds every fault injected, in order, and the monitors' incidents
    events = r["timeline"]["events"]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    faults = [e for e in events if e["kind"] not in ("incident", "taken-over")]
    assert len(faults) == r["faults_injected"]
    assert {e["lane"] for e in faults if e["kind"] == "etcd-kill"} == {"etcd"}
    assert all("end" in e for e in faults if e["kind"].startswith(("monitor-", "etcd-")))
    assert 1 <= sum(e["kind"] == "incident" for e in events) <= r["incidents"]
    assert any(e["kind"] == "taken-over" for e in events)

"""`backdoors scenario fleet` (skeleton): random faults of nodes and monitors; the fencing
facts computed from the agents' audit lines."""

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
    assert _fencing(audit, 1.0) == (1, 0, 0)
    # an op applied with an older token than one accepted: stale applied; two monitors'
    # kills on one node within the overlap: double acted
    audit += [_rpc("kill", "m1", 10, 5.3)]
    assert _fencing(audit, 1.0) == (1, 1, 1)


@pytest.mark.root
@pytest.mark.slow
def test_fleet_under_random_faults(root):
    from backdoors.fleet.process import available
    from conftest import unavailable
    if available() is None:
        unavailable("etcd is not installed (Debian: etcd-server; make system-deps)")
    from backdoors.scenarios.fleet import fleet
    r = fleet(duration_s=15, interval_s=3, seed=7)
    for key in ("monitors", "hosts", "nodes", "faults_injected", "faults_handled",
                "takeover_ms_p99", "stale_token_ops_refused", "stale_token_ops_applied",
                "double_acted", "missed"):
        assert key in r, key
    assert r["faults_injected"] >= 3
    assert r["stale_token_ops_applied"] == 0 and r["double_acted"] == 0, r
    assert r["missed"] == 0, r

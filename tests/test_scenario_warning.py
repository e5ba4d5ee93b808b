"""`backdoors scenario warning`: a fork bomb repaired in cluster A (its own etcd, two
monitors) warns cluster B (the same) over linked NATS servers; an intruder's replayed and
forged warnings are refused; the same bomb in B is killed on sight, before its pids
limit."""

import pytest
from conftest import unavailable

from backdoors.fleet import nats as natsproc

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_the_second_cluster_kills_the_bomb_before_its_pids_limit(root):
    if natsproc.available() is None:
        unavailable("nats-server is not installed (Debian: nats-server; make system-deps)")
    from backdoors.scenarios.warning import warning
    r = warning()
    for key in ("first_cluster_repair_ms", "second_cluster_repair_ms",
                "second_cluster_service_impact", "warnings_sent", "warnings_rejected"):
        assert key in r, key
    assert r["first_cluster_state"] == "repaired" and r["first_cluster_repair_ms"] > 0, r
    # each cluster a fleet of its own: two monitors, one etcd, one of them owning the node
    for c in ("A", "B"):
        assert r["clusters"][c]["owner"] in r["clusters"][c]["monitors"], r["clusters"]
    assert r["clusters"]["A"]["owner"] == r["warning"]["monitor"]  # the one that repaired
    b_monitors = len(r["clusters"]["B"]["monitors"])
    assert r["warnings_sent"] == 1 and r["warnings_accepted"] == b_monitors, r
    # the intruder's five messages, each refused by each monitor of B for what it is
    assert r["bad_warnings_injected"] == {"replay": 1, "bad_signature": 2,
                                          "unknown_signer": 1, "bad_envelope": 1}
    assert r["warnings_rejected_by_reason"] == {
        k: n * b_monitors for k, n in r["bad_warnings_injected"].items()}, r
    assert r["warnings_rejected"] == 5 * b_monitors
    assert r["forged_rules_armed"] == 0 and r["second_cluster_service_survived"] is True
    assert r["armed_rule"]["comm"] == "bd-forkbomb" and len(r["armed_rule"]["exe_sha256"]) == 64
    assert "forkbomb" in r["warning"]["cmdline"] and r["warning"]["kind"] == "fork-bomb"
    # B: killed by the armed rule, the pids limit never reached, its own detector not needed
    assert r["prearmed_kills"] and r["prearmed_kills"][0]["sent"] >= 1, r
    assert r["second_cluster_fork_failures"] == 0, r
    assert r["second_cluster_peak_pids"] < r["pids_limit"], r
    assert r["second_cluster_killed_before_limit"] is True
    assert r["second_cluster_repair_ms"] > 0 and r["second_cluster_service_impact"] >= 0

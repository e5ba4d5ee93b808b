"""The case study end to end, short: the whole site in a lab (PostgreSQL, 2 middle tiers,
2 front ends, each plain and recoverable), locust's mixes against both kinds side by
side, every answer checked, and the database matching what the clients were told; the
lab gone afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backdoors.casestudy.rubis.dataset import Scale
from backdoors.casestudy.rubis.study import levels, overhead


def test_levels_and_overhead_below_saturation():
    assert levels(64) == [4, 8, 16, 32, 64] and levels(3) == [1, 3] and levels(1) == [1]
    load = [{"users": 4, "plain_rps": 40.0, "recoverable_rps": 39.0, "plain_p99_ms": 10.0,
             "recoverable_p99_ms": 11.0, "plain_steady_p99_ms": 8.0,
             "recoverable_steady_p99_ms": 8.2, "plain_interval_rps": 40.0,
             "recoverable_interval_rps": 41.0, "plain_interval_p99_ms": 6.0,
             "recoverable_interval_p99_ms": 6.3},
            {"users": 8, "plain_rps": 80.0, "recoverable_rps": 76.0, "plain_p99_ms": 10.0,
             "recoverable_p99_ms": 10.0, "plain_steady_p99_ms": 9.0,
             "recoverable_steady_p99_ms": None,  # (no later request in that run)
             "plain_interval_rps": 80.0, "recoverable_interval_rps": 78.0,
             "plain_interval_p99_ms": 7.0, "recoverable_interval_p99_ms": 7.0},
            {"users": 16, "plain_rps": 84.0, "recoverable_rps": 60.0, "plain_p99_ms": 50.0,
             "recoverable_p99_ms": 90.0, "plain_steady_p99_ms": 40.0,
             "recoverable_steady_p99_ms": 80.0},
            {"users": 32, "plain_rps": 100.0, "recoverable_rps": 50.0, "plain_p99_ms": 90.0,
             "recoverable_p99_ms": 200.0}]
    got = overhead(load)
    # 16 users: the plain site grew < 10 %: saturated from there on, whatever follows
    assert [r["saturated"] for r in load] == [False, False, True, True]
    assert got == {"overhead_pct_max": 5.0, "p99_overhead_pct_max": 10.0,
                   "steady_p99_overhead_pct_max": 2.5, "interval_overhead_pct_max": 2.5,
                   "interval_p99_overhead_pct_max": 5.0, "levels_below_saturation": [4, 8]}


def test_the_site_under_load_and_a_front_end_freeze_loses_no_request_nor_bid(root, tmp_path):
    """Then a front-end node hangs under load (fe-freeze): the monitor moves its client
    sessions to the other front end, no request fails, no acknowledged bid is lost or
    applied twice."""
    from backdoors.casestudy.rubis.study import rubis
    from backdoors.lab.lab import running_labs
    from backdoors.scenarios.labkit import unique_name

    name = unique_name("rb")
    work = tmp_path / "run"
    out = rubis(users=3, seconds=3, scale=Scale(users=300, items=500, bids=2000, comments=100),
                name=name, rounds=2, faults=("fe-freeze",), work_dir=str(work))
    failures = {p.name: p.read_text()[-600:] for p in work.glob("*_failures.csv")
                if len(p.read_text().splitlines()) > 1}
    assert [r["users"] for r in out["load"]] == [1, 3] and out["rounds"] == 2
    for row in out["load"]:
        for kind in ("plain", "recoverable"):
            assert row[f"{kind}_requests"] > 0 and row[f"{kind}_failed"] == 0, (row, failures)
            assert row[f"{kind}_rps"] > 0 and row[f"{kind}_p99_ms"] >= row[f"{kind}_p50_ms"]
            # each user's first request opened its session: one per user and round at most
            assert 0 < row[f"{kind}_sessions"] <= row["users"] * 2, row
            assert row[f"{kind}_first_p99_ms"] >= row[f"{kind}_first_p50_ms"] > 0, row
            assert row[f"{kind}_steady_p99_ms"] > 0, row
            # the interval starts after the ramp-up (3 s / 4): its requests, a share of all
            assert row[f"{kind}_interval_p99_ms"] > 0, row
            assert 0 < row[f"{kind}_interval_rps"], row
    assert out["bids_acknowledged"] > 0, out
    assert (out["bids_lost"], out["bids_duplicated"]) == (0, 0), out
    assert (out["writes_lost"], out["writes_duplicated"]) == (0, 0), out
    assert isinstance(out["overhead_pct_max"], float) and out["ramp_s"] == 0.75
    [fault] = out["faults"]
    assert (fault["tier"], fault["fault"], fault["recover_status"]) == ("fe", "freeze", "done"), fault
    assert fault["moved"] >= 1 and fault["detect_ms"] is not None, fault
    assert fault["requests"] > 0 and fault["failed_requests"] == 0, (fault, failures)
    assert (fault["bids_lost"], fault["bids_duplicated"]) == (0, 0), fault
    assert name not in running_labs()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bd-{name}-" not in netns


#: the rule that should move the sessions, by fault (a crashed server's box stalls too);
#: for mt- faults, the failed middle tier's copy of it
RULES = {"fe-lock": ("hang",), "fe-network": ("network-failure",),
         "fe-crash": ("server-died", "hang"), "mt-freeze": ("hang",),
         "mt-lock": ("hang",), "mt-network": ("network-failure",),
         "mt-crash": ("server-died", "hang")}


@pytest.mark.parametrize("fault", list(RULES))
def test_a_node_failing_under_load_loses_no_request_nor_bid(root, tmp_path, fault):
    """A front end (n0) or a middle tier (the one with the most channels) fails under
    load: its cgroup frozen behind the agent's back, its link down, its recoverable
    server killed (nothing restarts it), every process stopped. The site's rules move
    the sessions -- n0's client sessions to the other front end; the middle tier's
    channels to the other one, its database connections terminated first -- no request
    fails, no acknowledged bid is lost or applied twice, and the site's lab is gone
    after."""
    from backdoors.casestudy.rubis.site import Site
    from backdoors.casestudy.rubis.study import check_writes, play_fault
    from backdoors.lab.lab import running_labs
    from backdoors.scenarios.labkit import unique_name

    name = unique_name("rb")
    with Site(name, Scale(users=300, items=500, bids=2000, comments=100)) as site:
        row = play_fault(site, fault, 4, 9.0, tmp_path)
        row.update(check_writes(site, [row.pop("acks")]))
    failures = {p.name: p.read_text()[-600:] for p in tmp_path.glob("*_failures.csv")
                if len(p.read_text().splitlines()) > 1}
    print({k: row[k] for k in ("rule", "detect_ms", "recovery_ms", "moved", "requests",
                               "dip_ms", "bids_acknowledged", "fence_more", "fence_more_ms")})
    tier = fault.split("-")[0]
    assert (row["tier"], row["recover_status"]) == (tier, "done"), row
    if tier == "fe":
        assert row["rule"] in RULES[fault] and (row["node"], row["target"]) == ("n0", "n1"), row
    else:
        assert {row["node"], row["target"]} == {"n2", "n3"}, row
        assert row["rule"] in [f"{r}-{row['node']}" for r in RULES[fault]], row
    assert row["moved"] >= 1 and row["detect_ms"] is not None, row
    if tier == "mt":  # its database connections ended before the move
        assert row["fence_more"]["hook"] == "db-fence", row
    assert row["requests"] > 0 and row["failed_requests"] == 0, (row, failures)
    assert row["bids_acknowledged"] > 0 and (row["bids_lost"], row["bids_duplicated"]) == (0, 0), row
    assert (row["writes_lost"], row["writes_duplicated"]) == (0, 0), row
    assert name not in running_labs()


def test_the_haproxy_baseline_then_the_recoverable_run_on_one_site(root, tmp_path):
    """fe-network's baseline: the plain front ends behind HAProxy (health checks, sessions
    of a DOWN server shut down), n0's link down and up again; then the recoverable run on
    the same site. HAProxy marks n0's server DOWN; every bid it acknowledged is in the
    database once; the recoverable run after it still moves n0's sessions, none failed."""
    from backdoors.casestudy.rubis.site import Site
    from backdoors.casestudy.rubis.study import check_writes, haproxy_fault, play_fault
    from backdoors.errors import LabError
    from backdoors.scenarios.labkit import unique_name

    with Site(unique_name("rb"), Scale(users=300, items=500, bids=2000, comments=100)) as site:
        with pytest.raises(LabError, match="plain_call_timeout"):
            haproxy_fault(site, "mt-crash", 4, 9.0, tmp_path)
        base = haproxy_fault(site, "fe-network", 4, 9.0, tmp_path)
        row = play_fault(site, "fe-network", 4, 9.0, tmp_path)
        row.update(check_writes(site, [row.pop("acks")]))
    print({k: v for k, v in base.items() if k != "haproxy_per_100ms"})
    assert base["haproxy_detect_ms"] is not None and base["haproxy_requests"] > 0, base
    assert base["haproxy_bids_acknowledged"] > 0, base
    assert (base["haproxy_bids_lost"], base["haproxy_bids_duplicated"]) == (0, 0), base
    assert len(base["haproxy_per_100ms"]["ok"]) > 30, base  # from 3 s before the fault
    assert (row["recover_status"], row["failed_requests"]) == ("done", 0), row
    assert row["moved"] >= 1 and (row["bids_lost"], row["bids_duplicated"]) == (0, 0), row


def test_a_middle_tier_s_baseline_is_the_front_ends_own_retry(root, tmp_path):
    """mt-freeze's baseline: the plain site behind HAProxy, its busiest middle tier frozen;
    the plain front ends give up on it after the call timeout and send the calls to the
    other; every bid acknowledged is in the database once. Then the recoverable run on the
    same site moves the channels of its middle tier, none failed."""
    from backdoors.casestudy.rubis.site import Site
    from backdoors.casestudy.rubis.study import (BASELINE_CALL_TIMEOUT_S, check_writes,
                                                 haproxy_fault, play_fault)
    from backdoors.scenarios.labkit import unique_name

    with Site(unique_name("rb"), Scale(users=300, items=500, bids=2000, comments=100),
              plain_call_timeout=BASELINE_CALL_TIMEOUT_S) as site:
        base = haproxy_fault(site, "mt-freeze", 4, 9.0, tmp_path)
        row = play_fault(site, "mt-freeze", 4, 9.0, tmp_path)
        row.update(check_writes(site, [row.pop("acks")]))
    print({k: v for k, v in base.items() if k != "haproxy_per_100ms"})
    assert base["haproxy_node"] in site.MT and base["haproxy_requests"] > 0, base
    assert base["haproxy_failovers"] >= 1, base  # the front ends' own failover ran
    assert base["haproxy_bids_acknowledged"] > 0, base
    assert (base["haproxy_bids_lost"], base["haproxy_bids_duplicated"]) == (0, 0), base
    assert (row["recover_status"], row["failed_requests"]) == ("done", 0), row
    assert row["moved"] >= 1 and (row["bids_lost"], row["bids_duplicated"]) == (0, 0), row


def test_the_command_refuses_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "backdoors", "casestudy", "rubis", "--users", "0"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--users" in (r.stderr + r.stdout)


@pytest.mark.parametrize("bad, match", [({"users": 0}, "users must be"),
                                        ({"seconds": 0}, "users must be"),
                                        ({"rounds": 0}, "users must be"),
                                        ({"faults": ("db-lock",)}, "unknown faults: db-lock")])
def test_rubis_refuses_bad_arguments_before_building_anything(bad, match):
    from backdoors.casestudy.rubis.study import rubis
    from backdoors.errors import LabError

    with pytest.raises(LabError, match=match):
        rubis(**{"users": 2, "seconds": 1, **bad})

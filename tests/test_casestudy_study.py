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
             "recoverable_p99_ms": 11.0},
            {"users": 8, "plain_rps": 80.0, "recoverable_rps": 76.0, "plain_p99_ms": 10.0,
             "recoverable_p99_ms": 10.0},
            {"users": 16, "plain_rps": 84.0, "recoverable_rps": 60.0, "plain_p99_ms": 50.0,
             "recoverable_p99_ms": 90.0},
            {"users": 32, "plain_rps": 100.0, "recoverable_rps": 50.0, "plain_p99_ms": 90.0,
             "recoverable_p99_ms": 200.0}]
    got = overhead(load)
    # 16 users: the plain site grew < 10 %: saturated from there on, whatever follows
    assert [r["saturated"] for r in load] == [False, False, True, True]
    assert got == {"overhead_pct_max": 5.0, "p99_overhead_pct_max": 10.0,
                   "levels_below_saturation": [4, 8]}


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
    assert out["bids_acknowledged"] > 0, out
    assert (out["bids_lost"], out["bids_duplicated"]) == (0, 0), out
    assert isinstance(out["overhead_pct_max"], float)
    [fault] = out["faults"]
    assert (fault["tier"], fault["fault"], fault["recover_status"]) == ("fe", "freeze", "done"), fault
    assert fault["moved"] >= 1 and fault["detect_ms"] is not None, fault
    assert fault["requests"] > 0 and fault["failed_requests"] == 0, (fault, failures)
    assert (fault["bids_lost"], fault["bids_duplicated"]) == (0, 0), fault
    assert name not in running_labs()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bd-{name}-" not in netns


@pytest.mark.parametrize("fault", ["lock", "network", "crash"])
def test_a_front_end_failing_under_load_loses_no_request_nor_bid(root, tmp_path, fault):
    """fe-lock (the node's cgroup frozen behind the agent's back), fe-network (its link
    down), fe-crash (its recoverable server killed; nothing restarts it): the monitor's
    heal ruleset moves n0's client sessions to the other front end, no request fails,
    no acknowledged bid is lost or applied twice, and the site's lab is gone after."""
    from backdoors.casestudy.rubis.site import Site
    from backdoors.casestudy.rubis.study import check_bids, fe_fault
    from backdoors.lab.lab import running_labs
    from backdoors.scenarios.labkit import unique_name

    name = unique_name("rb")
    with Site(name, Scale(users=300, items=500, bids=2000, comments=100)) as site:
        row = fe_fault(site, fault, 4, 9.0, tmp_path)
        row.update(check_bids(site, [row.pop("acks")]))
    failures = {p.name: p.read_text()[-600:] for p in tmp_path.glob("*_failures.csv")
                if len(p.read_text().splitlines()) > 1}
    print({k: row[k] for k in ("rule", "detect_ms", "recovery_ms", "moved", "requests",
                               "dip_ms", "bids_acknowledged")})
    rule = {"lock": "hang", "network": "network-failure", "crash": ("server-died", "hang")}
    assert (row["tier"], row["fault"], row["recover_status"]) == ("fe", fault, "done"), row
    assert row["rule"] in rule[fault], row
    assert row["moved"] >= 1 and row["detect_ms"] is not None, row
    assert row["requests"] > 0 and row["failed_requests"] == 0, (row, failures)
    assert row["bids_acknowledged"] > 0 and (row["bids_lost"], row["bids_duplicated"]) == (0, 0), row
    assert name not in running_labs()


def test_the_command_refuses_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "backdoors", "casestudy", "rubis", "--users", "0"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--users" in (r.stderr + r.stdout)


@pytest.mark.parametrize("bad, match", [({"users": 0}, "users must be"),
                                        ({"seconds": 0}, "users must be"),
                                        ({"rounds": 0}, "users must be"),
                                        ({"faults": ("mt-lock",)}, "mt-lock not built yet")])
def test_rubis_refuses_bad_arguments_before_building_anything(bad, match):
    from backdoors.casestudy.rubis.study import rubis
    from backdoors.errors import LabError

    with pytest.raises(LabError, match=match):
        rubis(**{"users": 2, "seconds": 1, **bad})

"""Requests per 100 ms across a fault and the throughput's dip, from synthetic requests
files written with the load driver's own writer (no site, no load)."""

from __future__ import annotations

import pytest

from backdoors.casestudy.rubis.throughput import RequestLog, dip, per_100ms, read_requests
from backdoors.errors import LabError

FAULT = 1_764_300_000.0  # Unix seconds


def write(path, requests):
    """requests: (ms from the fault, ok, front end)."""
    log = RequestLog(path)
    for ms, ok, fe in requests:
        log.add(ok, fe, at=FAULT + ms / 1000)
    log.close()
    return path


def steady(lo_ms, hi_ms, every_ms, fe=0, ok=True):
    return [(t + 5, ok, fe) for t in range(lo_ms, hi_ms, every_ms)]


def test_requests_are_counted_per_bucket_ok_and_failed_apart(tmp_path):
    # 2 requests per 100 ms on each of two front ends; the fault at 0; from 200 ms, front
    # end 0 fails for 300 ms, then answers nothing until 800 ms
    reqs = steady(-3000, 200, 50) + steady(-3000, 3100, 50, fe=1)
    reqs += steady(200, 500, 50, ok=False) + steady(800, 3100, 50)
    path = write(tmp_path / "r", reqs)
    s = per_100ms(path, FAULT, before_s=2, after_s=2, node=0)
    assert (s["t0"], s["bucket_ms"]) == (-2000, 100)
    assert len(s["ok"]) == len(s["failed"]) == len(s["node_ok"]) == 40
    fault = 20  # the first bucket from the fault on
    assert s["ok"][:fault + 2] == [4] * (fault + 2)
    assert s["failed"][fault + 2:fault + 5] == [2, 2, 2] and sum(s["failed"]) == 6
    assert s["node_ok"][fault + 2:fault + 8] == [0] * 6 and s["node_ok"][fault + 8] == 2
    assert s["ok"][fault + 8:] == [4] * 12
    d = dip(s)
    # the node's throughput (2 per bucket) is low from 200 ms to 800 ms
    assert d == {"dip_ms": 600.0, "dip_from_ms": 200, "dip_recovered": True, "baseline": 2.0,
                 "fraction": 0.5}
    whole = dip({k: v for k, v in s.items() if k != "node_ok"})
    assert whole["dip_ms"] == 0.0 and whole["baseline"] == 4.0  # the site kept half of it


def test_no_dip_is_zero(tmp_path):
    s = per_100ms(write(tmp_path / "r", steady(-3000, 6100, 25)), FAULT)
    assert s["ok"] == [4] * 90 and s["failed"] == [0] * 90
    assert dip(s) == {"dip_ms": 0.0, "dip_from_ms": None, "dip_recovered": True,
                      "baseline": 4.0, "fraction": 0.5}


def test_a_dip_that_never_recovers_runs_to_the_series_end(tmp_path):
    # the node stops at the fault; the other front end goes on, so the load ran to 6 s
    reqs = steady(-3000, 0, 50) + steady(-3000, 6100, 50, fe=1)
    s = per_100ms(write(tmp_path / "r", reqs), FAULT, node=0)
    assert len(s["node_ok"]) == 90
    d = dip(s)
    assert (d["dip_ms"], d["dip_from_ms"], d["dip_recovered"]) == (6000.0, 0, False)


def test_no_request_before_the_fault_says_nothing(tmp_path):
    s = per_100ms(write(tmp_path / "r", steady(300, 3000, 50)), FAULT)
    assert sum(s["ok"][:30]) == 0 and sum(s["ok"]) > 0
    assert dip(s)["dip_ms"] is None and dip(s)["baseline"] is None
    empty = per_100ms(write(tmp_path / "e", []), FAULT)
    assert empty["ok"] == [] and dip(empty)["dip_ms"] is None


def test_the_baseline_leaves_out_a_load_still_starting(tmp_path):
    # the load starts 400 ms before the fault, at 2 per bucket; nothing after 300 ms
    reqs = steady(-400, 300, 50) + steady(1000, 3000, 50, fe=1)
    s = per_100ms(write(tmp_path / "r", reqs), FAULT, node=0)
    d = dip(s)
    assert d["baseline"] == 2.0  # over the 4 buckets with load, not the 10 of the second
    # low from 300 ms to the series' end at 2,900 ms (the last request's bucket is cut)
    assert (d["dip_ms"], d["dip_from_ms"], d["dip_recovered"]) == (2600.0, 300, False)


def test_the_longest_low_run_is_the_dip(tmp_path):
    # one low bucket at 100 ms (noise), then 400 ms low from 1000 ms
    reqs = steady(-2000, 100, 25) + steady(200, 1000, 25) + steady(1400, 4000, 25)
    s = per_100ms(write(tmp_path / "r", reqs), FAULT, before_s=2, after_s=4)
    d = dip(s)
    assert (d["dip_ms"], d["dip_from_ms"], d["dip_recovered"]) == (400.0, 1000, True)
    assert dip(s, fraction=0.0)["dip_ms"] == 0.0  # nothing is below nothing


def test_the_series_stops_where_the_load_ended(tmp_path):
    # the load ended 1,234 ms after the fault: the bucket it ended in is left out, so the
    # series ends at 1,200 ms and shows no dip at its end
    reqs = steady(-3000, 1230, 25)
    s = per_100ms(write(tmp_path / "r", reqs), FAULT)
    assert len(s["ok"]) == 30 + 12 and s["ok"][-1] == 4
    assert dip(s)["dip_ms"] == 0.0
    before = per_100ms(write(tmp_path / "b", steady(-3000, -1000, 25)), FAULT)
    assert len(before["ok"]) == 19 and dip(before)["dip_ms"] is None  # nothing after


def test_a_torn_last_line_is_left_out_and_a_bad_line_named(tmp_path):
    path = write(tmp_path / "r", steady(-100, 100, 50))
    with open(path, "a") as f:
        f.write("17643000001")  # cut short by a kill
    assert len(read_requests(path)) == 4
    bad = tmp_path / "bad"
    bad.write_text("1764300000000 1 0\n1764300000050 yes 0\n")
    with pytest.raises(LabError, match=rf"{bad}:2: not a request line"):
        read_requests(bad)
    bad.write_text("1764300000000 2 0\n")
    with pytest.raises(LabError, match=rf"{bad}:1: "):
        read_requests(bad)
    with pytest.raises(LabError, match="cannot read the requests file"):
        read_requests(tmp_path / "nowhere")

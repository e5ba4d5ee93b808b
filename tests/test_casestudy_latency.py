"""First requests' and later requests' response times apart, and the measurement
interval's, from files written with the load driver's own writer (no site, no load)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backdoors.casestudy.rubis.latency import LatencyLog, percentile, read_latencies, summary
from backdoors.errors import LabError


def write(path, rows):
    """rows: (ms, first) or (ms, first, end in Unix seconds)."""
    log = LatencyLog(path)
    for row in rows:
        log.add(*row)
    log.close()
    return path


def test_first_and_later_requests_are_summed_up_apart(tmp_path):
    # 4 sessions whose first requests took 50-80 ms; 100 later requests of 1-100 ms
    rows = [(50.0 + 10 * i, True) for i in range(4)] + [(float(i), False) for i in range(1, 101)]
    got = summary(write(tmp_path / "l", rows))
    assert {k: v for k, v in got.items() if not k.startswith("interval")} == {
        "sessions": 4, "first_p50_ms": 60.0, "first_p99_ms": 80.0,
        "steady_p50_ms": 50.0, "steady_p99_ms": 99.0}


def test_no_request_of_a_kind_has_no_figure(tmp_path):
    got = summary(write(tmp_path / "l", [(3.5, False, 1000.0)]), ramp_s=1)
    assert got == {"sessions": 0, "first_p50_ms": None, "first_p99_ms": None,
                   "steady_p50_ms": 3.5, "steady_p99_ms": 3.5, "interval_p50_ms": None,
                   "interval_p99_ms": None, "interval_requests": 0, "interval_rps": None}


def test_the_measurement_interval_leaves_out_what_started_in_the_ramp_up(tmp_path):
    """The interval starts ramp_s after the first request's start: a request that started
    before (even one ending after) is left out; its rate runs to the last request's end."""
    t0 = 1_700_000_000.0
    rows = [(400.0, True, t0 + 0.4),  # the first request: started at t0
            (300.0, False, t0 + 1.2),  # started at t0 + 0.9: in the ramp-up of 1 s
            *((10.0 + i, False, t0 + 1.011 + 0.1 * i) for i in range(10)),  # started at >= t0 + 1
            (50.0, True, t0 + 3.0)]  # a session opened later: in the interval
    got = summary(write(tmp_path / "l", rows), ramp_s=1.0)
    assert got["interval_requests"] == 11
    assert got["interval_p50_ms"] == 15.0 and got["interval_p99_ms"] == 50.0
    assert got["interval_rps"] == 5.5  # 11 requests from t0 + 1 to t0 + 3
    assert got["steady_p99_ms"] == 300.0 and got["first_p99_ms"] == 400.0
    assert summary(tmp_path / "l")["interval_requests"] == len(rows)  # no ramp-up: all


def test_a_torn_last_line_is_left_out_and_a_bad_line_named(tmp_path):
    path = write(tmp_path / "l", [(1.0, True), (2.0, False)])
    with open(path, "a") as f:
        f.write("3.0 0")  # the driver killed mid-line
    assert read_latencies(path) == ([1.0], [2.0])
    bad = tmp_path / "bad"
    bad.write_text("1.0 1 1000\n2.0 2 1000\n")
    with pytest.raises(LabError, match=r"bad:2: not a latency line .*'2.0 2 1000'"):
        read_latencies(bad)
    for line in ("nan 0 1", "-1 0 1", "1 0", "1 0 7 8", "x 1 1", "1 1 x", "1 0 7.5"):
        bad.write_text(line + "\n")
        with pytest.raises(LabError, match="bad:1: not a latency line"):
            read_latencies(bad)
    with pytest.raises(LabError, match="cannot read the latencies file"):
        read_latencies(tmp_path / "missing")


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=300), st.sampled_from([50, 90, 99, 100]))
def test_the_percentile_is_the_nearest_rank(values, q):
    got = percentile(values, q)
    # at least q % of the values are <= it, and fewer than q % are below it
    assert sum(v <= got for v in values) >= q / 100 * len(values)
    assert sum(v < got for v in values) < q / 100 * len(values)
    assert percentile([], q) is None

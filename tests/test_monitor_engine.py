"""Detectors over synthetic snapshots, the rule engine over a fake clock, the history."""

import math

import pytest

from backdoors.monitor import rules
from backdoors.monitor.detectors import NodeView, evaluate
from backdoors.monitor.engine import Engine
from backdoors.monitor.history import History
from backdoors.sensors import SensorBox, SensorState, SensorTracker, SensorType, Snapshot, parse_box


def progress(name, value, stalled, deadline=0.2):
    return SensorState(1, name, "progress", value, stalled > deadline, stalled_for=stalled,
                       deadline=deadline)


def level(name, value, lo=None, hi=None):
    bad = (hi is not None and value > hi) or (lo is not None and value < lo)
    return SensorState(2, name, "level", value, bad, min=lo, max=hi)


def pressure(name, value, rate, max_events=20, window=1.0):
    return SensorState(3, name, "pressure", value, rate > max_events, rate=rate,
                       max_events=max_events, window=window)


def view(at=10.0, node="n0", boxes=None, **kw):
    snaps = {b: Snapshot(b, 100, 2, at, sensors) for b, sensors in (boxes or {}).items()}
    return NodeView(node, "h0", at, snaps, **kw)


def det(text):
    return rules.parse_ruleset(f'[[rule]]\nname = "r"\ndetectors = [{text}]\n').rule[0].detectors[0]


# ---- detectors --------------------------------------------------------------------------


def test_progress_uses_the_sensor_deadline_or_the_override():
    v = view(boxes={"svc": [progress("progress", 5, 0.25)]})
    hit = evaluate(det('{ kind = "progress_stalled" }'), 0, v)
    assert hit and hit.violations[0].measure == 0.25 and hit.violations[0].bound == 0.2
    assert "stalled 250 ms > 200 ms" in hit.summary
    assert evaluate(det('{ kind = "progress_stalled", deadline_ms = 300 }'), 0, v) is None
    assert evaluate(det('{ kind = "progress_stalled", box = "other" }'), 0, v) is None
    assert evaluate(det('{ kind = "progress_stalled", sensors = ["prog*"] }'), 0, v)
    assert evaluate(det('{ kind = "progress_stalled", sensors = ["x"] }'), 0, v) is None


def test_level_bounds_and_overrides():
    v = view(boxes={"kernel": [level("memory_mb", 410, 0, 409.6), level("pids", 3, 0, 115)]})
    hit = evaluate(det('{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }'), 0, v)
    assert hit.violations[0].bound == 409.6 and "410 > 409.6" in hit.summary
    assert evaluate(det('{ kind = "level_out_of_bounds", box = "kernel", sensors = ["pids"] }'), 0, v) is None
    assert evaluate(det('{ kind = "level_out_of_bounds", sensors = ["pids"], max = 2 }'), 0, v)
    low = evaluate(det('{ kind = "level_out_of_bounds", sensors = ["pids"], min = 5 }'), 0, v)
    assert low.violations[0].bound == 5 and "< 5" in low.summary
    assert evaluate(det('{ kind = "level_out_of_bounds", sensors = ["memory_mb"], max = 500 }'), 0, v) is None
    nan = view(boxes={"svc": [level("x", math.nan, hi=1)]})
    assert evaluate(det('{ kind = "level_out_of_bounds" }'), 0, nan)


def test_pressure_rate_and_override():
    v = view(boxes={"kernel": [pressure("fork_failures", 100, 35)]})
    hit = evaluate(det('{ kind = "pressure_over_rate", box = "kernel" }'), 0, v)
    assert hit.violations[0].measure == 35 and "35 events/window > 20" in hit.summary
    assert evaluate(det('{ kind = "pressure_over_rate", max_events = 50 }'), 0, v) is None


def test_node_frozen_only_without_a_lock_holder():
    d = det('{ kind = "node_frozen" }')
    assert evaluate(d, 0, view(frozen=True))
    assert evaluate(d, 0, view(frozen=True, locked_by=["m1"])) is None
    assert evaluate(d, 0, view(frozen=False)) is None
    assert evaluate(d, 0, view(frozen=None)) is None


def test_agent_unreachable_and_stale_data():
    d = det('{ kind = "agent_unreachable", after_ms = 1000 }')
    assert evaluate(d, 0, view(agent_ok=False, agent_silent_s=0.5)) is None
    assert "silent for 1500 ms" in evaluate(d, 0, view(agent_ok=False, agent_silent_s=1.5)).summary
    # sensor detectors do not judge from stale data while the agent is silent
    stale = view(boxes={"svc": [progress("p", 1, 9.0)]}, agent_ok=False, agent_silent_s=9)
    assert evaluate(det('{ kind = "progress_stalled" }'), 0, stale) is None


def test_detectors_read_real_box_images():
    """A real Sensor Box, parsed and tracked as the poller does."""
    box = SensorBox.create("svc")
    p = box.progress("progress", deadline=0.1)
    box.level("rss_mb", max=10, initial=50)
    try:
        tracker = SensorTracker()
        raw = bytes(box._mm)
        tracker.update(parse_box(raw), 0.0)
        p.tick()
        snap = tracker.update(parse_box(bytes(box._mm)), 0.05)
        snap = tracker.update(parse_box(bytes(box._mm)), 0.3)
        v = NodeView("n0", "h0", 0.3, {"svc": snap})
        assert evaluate(det('{ kind = "progress_stalled" }'), 0, v).violations[0].measure == pytest.approx(0.25)
        assert evaluate(det('{ kind = "level_out_of_bounds" }'), 0, v).violations[0].value == 50
    finally:
        box.close()


# ---- the engine -------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


RULES = """
[[rule]]
name = "mem"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"], for_ms = 100 }]
clear_ms = 200
cooldown_ms = 1000
retry_after_ms = 500

[[rule]]
name = "hang"
match = "all"
detectors = [{ kind = "progress_stalled" }, { kind = "level_out_of_bounds", sensors = ["rss"] }]
"""


def engine_and_clock():
    clock = Clock()
    closed = []
    eng = Engine(list(rules.parse_ruleset(RULES).rule), "m1", clock=clock, settle_s=0.2,
                 on_close=closed.append)
    return eng, clock, closed


def mem_view(clock, mb, node="n0"):
    return view(at=clock.t, node=node, boxes={"kernel": [level("memory_mb", mb, 0, 400)]})


def test_for_ms_debounces_and_one_incident_opens():
    eng, clock, closed = engine_and_clock()
    assert eng.observe(mem_view(clock, 300)) == []
    assert eng.observe(mem_view(clock, 450)) == []  # condition starts
    clock.t += 0.05
    assert eng.observe(mem_view(clock, 450)) == []  # held 50 ms < 100 ms
    clock.t += 0.06
    [d] = eng.observe(mem_view(clock, 460))
    assert d.incident.rule == "mem" and d.incident.node == "n0"
    assert d.incident.onset_to_detect_ms == pytest.approx(110, abs=1)  # level: start of the run
    assert d.incident.sensors["kernel/memory_mb"][-1] == [0.0, 460]
    clock.t += 0.05
    assert eng.observe(mem_view(clock, 470)) == []  # already open, and the node is busy
    assert [i.rule for i in eng.open_incidents()] == ["mem"]


def test_incident_closes_after_clear_ms_then_cools_down():
    eng, clock, closed = engine_and_clock()
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    [d] = eng.observe(mem_view(clock, 450))
    eng.responded(d, "repaired")
    assert d.incident.state == "repaired"
    clock.t += 0.1
    eng.observe(mem_view(clock, 100))  # clear starts
    clock.t += 0.1
    eng.observe(mem_view(clock, 450))  # fires again: the clear period restarts
    clock.t += 0.1
    eng.observe(mem_view(clock, 100))
    clock.t += 0.15
    eng.observe(mem_view(clock, 100))
    assert closed == []
    clock.t += 0.06
    eng.observe(mem_view(clock, 100))
    assert [c.outcome for c in closed] == ["cleared"] and closed[0].open_ms > 0
    # cooldown: firing again right away opens nothing
    for _ in range(3):
        clock.t += 0.1
        assert eng.observe(mem_view(clock, 450)) == []
    clock.t += 0.8
    assert len(eng.observe(mem_view(clock, 450))) == 1


def test_busy_node_and_settling_suppress_other_rules():
    eng, clock, closed = engine_and_clock()
    both = lambda: view(at=clock.t, boxes={  # noqa: E731
        "kernel": [level("memory_mb", 450, 0, 400)],
        "svc": [progress("progress", 1, 1.0), level("rss", 99, hi=10)]})
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    opened = eng.observe(both())
    assert [d.rule.name for d in opened] == ["mem"]  # one rule per node per poll
    clock.t += 0.05
    assert eng.observe(both()) == []  # busy: the response of "mem" runs
    eng.responded(opened[0], "repaired")
    clock.t += 0.1
    assert eng.observe(both()) == []  # settling after a response
    clock.t += 0.15
    assert [d.rule.name for d in eng.observe(both())] == ["hang"]
    # another node is independent
    eng.observe(mem_view(clock, 450, node="n1"))
    clock.t += 0.2
    assert [d.incident.node for d in eng.observe(mem_view(clock, 450, node="n1"))] == ["n1"]


def test_a_node_taken_over_from_a_monitor_that_just_acted_gets_no_response_meanwhile():
    """hand_over: the former owner acted on the node a moment ago; the new owner opens
    nothing there until the quiet time has passed, then does; other nodes do not wait."""
    eng, clock, closed = engine_and_clock()
    eng.hand_over("n0", "h0", 1.0)
    eng.observe(mem_view(clock, 450))
    for _ in range(5):
        clock.t += 0.19
        assert eng.observe(mem_view(clock, 450)) == []
    clock.t += 0.06
    [d] = eng.observe(mem_view(clock, 450))
    assert d.incident.rule == "mem"
    assert eng.observe(mem_view(clock, 450, node="n1")) == []  # only that node waited
    clock.t += 0.2
    assert len(eng.observe(mem_view(clock, 450, node="n1"))) == 1


def test_the_hand_over_quiet_holds_even_an_urgent_event():
    """A pushed death opens its incident at once, settle or not (urgent): not during a
    hand-over's quiet time (the former owner may be recovering those very sessions)."""
    clock = Clock()
    eng = Engine(list(rules.parse_ruleset(HANG_RULES).rule), "m1", clock=clock)
    died = dict(stall_event(3.0), reason="died", died=0.0)
    eng.hand_over("n0", "h0", 0.5)
    assert eng.observe(NodeView("n0", "h0", clock.t, event=died, via="event")) == []
    clock.t += 0.5
    assert len(eng.observe(NodeView("n0", "h0", clock.t, event=died, via="event"))) == 1


def test_a_response_ending_after_its_node_was_forgotten_updates_only_its_incident():
    eng, clock, closed = engine_and_clock()
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    [d] = eng.observe(mem_view(clock, 450))
    eng.forget("n0", "owned by another monitor of the fleet")
    assert [c.outcome for c in closed] == ["owned by another monitor of the fleet"]
    eng.responded(d, "repaired")
    assert d.incident.state == "repaired" and d.incident.repaired_ms is not None
    assert "n0" not in eng.nodes  # not brought back by the late response


def test_an_adopted_incident_is_carried_on_under_its_id():
    """Engine.adopt: the former owner's open incident goes on here under its id, as if
    its last response had just ended; no second incident opens for it; it closes once its
    condition clears. A record no rule here takes is refused; a malformed one is an error."""
    clock, closed = Clock(), []
    eng = Engine(list(rules.parse_ruleset(RETRY_RULES).rule), "m1", clock=clock, settle_s=0.2,
                 on_close=closed.append)
    record = {"incident": "20261202-n0-7", "monitor": "m2", "rule": "mem", "state": "repaired",
              "attempts": 2, "detected": 1000.0, "onset": 999.5}
    inc = eng.adopt("n0", "h0", record)
    assert (inc.id, inc.monitor, inc.adopted_from, inc.attempts, inc.state) == \
        ("20261202-n0-7", "m1", "m2", 2, "repaired")
    assert eng.adopt("n0", "h0", record) is None  # open here already
    assert eng.adopt("n0", "h0", dict(record, rule="nope")) is None
    with pytest.raises(ValueError, match="20261202-n0-7"):
        eng.adopt("n1", "h0", dict(record, attempts="many"))
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    assert eng.observe(mem_view(clock, 450)) == []  # held, but its retry waits retry_after_ms
    clock.t += 0.35
    [retry] = eng.observe(mem_view(clock, 450))
    assert retry.incident is inc and retry.attempt == 3
    eng.responded(retry, "repaired")
    for _ in range(4):
        clock.t += 0.1
        eng.observe(mem_view(clock, 100))
    assert [c.id for c in closed] == ["20261202-n0-7"] and closed[0].outcome == "cleared"


def test_a_silent_agent_neither_fires_nor_clears_sensor_rules():
    eng, clock, closed = engine_and_clock()
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    [d] = eng.observe(mem_view(clock, 450))
    eng.responded(d, "failed")
    for _ in range(5):  # a second of silence: the incident stays open, not "cleared"
        clock.t += 0.2
        eng.observe(view(at=clock.t, agent_ok=False, agent_silent_s=1.0))
    assert closed == [] and [i.id for i in eng.open_incidents()] == [d.incident.id]


def test_match_all_needs_every_detector():
    eng, clock, _ = engine_and_clock()
    only_one = view(at=clock.t, boxes={"svc": [progress("progress", 1, 1.0), level("rss", 1, hi=10)]})
    assert eng.observe(only_one) == []


def test_close_all_closes_open_incidents():
    eng, clock, closed = engine_and_clock()
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    eng.observe(mem_view(clock, 450))
    eng.close_all("monitor stopped")
    assert [c.outcome for c in closed] == ["monitor stopped"]
    assert eng.open_incidents() == []


def test_onset_of_progress_and_pressure():
    h = History(5.0)
    for i, count in enumerate([10, 10, 10, 30, 60, 60, 90, 120]):
        h.add(view(at=i * 0.05, boxes={"kernel": [pressure("forks", count, 0)]}))
    v = view(at=0.35, boxes={"kernel": [pressure("forks", 120, 110)],
                             "svc": [progress("progress", 7, 0.3)]})
    hits = [evaluate(det('{ kind = "pressure_over_rate", max_events = 100 }'), 0, v),
            evaluate(det('{ kind = "progress_stalled" }'), 1, v)]
    # forks began to rise after the sample at 0.10; progress last moved at 0.35 - 0.3
    assert Engine.onset(h, v, hits[:1]) == pytest.approx(0.10)
    assert Engine.onset(h, v, hits) == pytest.approx(0.05)


# ---- one condition, one incident ----------------------------------------------------------


def stalled_view(clock, stalled_s):
    return view(at=clock.t, boxes={"svc": [progress("progress", 7, stalled_s)]})


def test_a_long_hang_is_one_incident_until_it_clears():
    """Under the default rules a hang of a minute, polled every 50 ms, is one incident
    (it used to be closed "unresolved" and opened again every ~3.6 s); it closes once
    progress resumes, and only then may the next one open."""
    clock = Clock()
    closed = []
    eng = Engine(rules.default_rules(), "m1", clock=clock, on_close=closed.append)
    opened = []
    stalled = 0.0
    for _ in range(1200):  # 60 s
        clock.t += 0.05
        stalled += 0.05
        for d in eng.observe(stalled_view(clock, stalled)):
            opened.append(d)
            eng.responded(d, "recorded")  # the hang rule only records
    assert len(opened) == 1 and closed == [], [d.incident.id for d in opened]
    inc = opened[0].incident
    assert inc.rule == "hang" and inc.closed is None and inc.attempts == 1
    assert inc.detections >= 1100  # every poll that still saw the condition
    assert inc.last_seen >= inc.detected  # Unix time of the last poll that saw it
    assert [a for a in inc.actions] == []  # the engine does not run actions; none were re-run
    for _ in range(6):  # progress resumes: clear for 300 ms > clear_ms (200)
        clock.t += 0.05
        eng.observe(stalled_view(clock, 0.0))
    assert [c.id for c in closed] == [inc.id] and inc.outcome == "cleared"
    assert inc.closed >= inc.last_seen
    clock.t += 1.0  # past the cooldown: a new hang is a new incident
    stalled = 0.0
    new = []
    for _ in range(10):
        clock.t += 0.05
        stalled += 0.05
        new += eng.observe(stalled_view(clock, stalled))
    assert len(new) == 1 and new[0].incident.id != inc.id


RETRY_RULES = """
[[rule]]
name = "mem"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
diagnosis = { kind = "memory_hog" }
actions = [{ kind = "kill_culprit" }]
clear_ms = 200
retry_after_ms = 500
max_attempts = 3
"""


def test_a_repair_that_does_not_help_is_retried_in_the_same_incident():
    clock = Clock()
    closed = []
    eng = Engine(list(rules.parse_ruleset(RETRY_RULES).rule), "m1", clock=clock, settle_s=0.2,
                 on_close=closed.append)
    responses = []
    for _ in range(100):  # 5 s of memory over its bound
        clock.t += 0.05
        for d in eng.observe(mem_view(clock, 450)):
            responses.append(d)
            clock.t += 0.05  # the response takes a while
            eng.responded(d, "repaired")
    assert [d.attempt for d in responses] == [1, 2, 3]  # then no more: max_attempts
    assert len({d.incident.id for d in responses}) == 1 and closed == []
    inc = responses[0].incident
    assert inc.attempts == 3 and inc.state == "unresolved"  # "repaired" was not true
    assert responses[1].detected == responses[0].detected  # timings count from detection
    clock.t += 0.05
    eng.observe(mem_view(clock, 100))
    clock.t += 0.25
    eng.observe(mem_view(clock, 100))
    assert [c.outcome for c in closed] == ["cleared"] and closed[0] is inc


def test_a_record_only_rule_is_not_retried():
    eng, clock, closed = engine_and_clock()  # "mem" has no actions
    eng.observe(mem_view(clock, 450))
    clock.t += 0.2
    [d] = eng.observe(mem_view(clock, 450))
    eng.responded(d, "recorded")
    for _ in range(50):
        clock.t += 0.1
        assert eng.observe(mem_view(clock, 450)) == []
    assert closed == [] and d.incident.state == "recorded" and d.incident.attempts == 1


# ---- history ----------------------------------------------------------------------------


def fill(values, step=0.05):
    h = History(5.0)
    for i, val in enumerate(values):
        h.add(view(at=i * step, boxes={"k": [level("x", val, hi=1e9)]}))
    return h


def test_rise_start_tolerates_short_flat_stretches():
    h = fill([0, 0, 5, 5, 5, 9, 12])  # flat for 0.1 s inside the rise
    assert h.rise_start(("k", "x"), 0.30) == pytest.approx(0.05)
    assert h.rise_start(("k", "x"), 0.30, gap=0.05) == pytest.approx(0.20)
    assert fill([1, 1, 1, 1]).rise_start(("k", "x"), 0.15) is None


def test_violation_start_and_around():
    h = fill([1, 5, 1, 6, 7, 8])
    assert h.violation_start(("k", "x"), lambda v: v > 4, 0.25) == pytest.approx(0.15)
    assert h.violation_start(("k", "x"), lambda v: v > 100, 0.25) is None
    around = h.around([("k", "x")], 0.1, 0.2)
    assert around == {"k/x": [[pytest.approx(0.1), 1], [pytest.approx(0.15), 6],
                              [pytest.approx(0.2), 7]]}
    thin = fill(list(range(500)), step=0.001).around([("k", "x")], 0, 1, max_points=10)
    assert len(thin["k/x"]) == 10 and thin["k/x"][-1][1] == 499


def test_history_is_bounded_by_age():
    h = fill(list(range(200)), step=0.05)  # 10 s of samples, 5 s kept
    assert len(h) in (100, 101) and h.entries()[0][0] >= 4.9
    assert h.copy().entries() == h.entries()


# ---- pushed events ----------------------------------------------------------------------

HANG_RULES = """
[[rule]]
name = "hang"
match = "any"
detectors = [{ kind = "progress_stalled", box = "*" }, { kind = "node_frozen" }]
clear_ms = 200
cooldown_ms = 500
"""


def stall_event(unchanged_ms, deadline_ms=50.0, seq=7):
    """A `violation` as the agent's watcher pushes it (agent/watch.py)."""
    return {"kind": "violation", "seq": seq, "at": 0.0, "detector": "progress_stalled",
            "condition": "progress_stalled", "box": "svc", "sensor": "tick", "value": 42,
            "unchanged_ms": unchanged_ms, "deadline_ms": deadline_ms, "onset": 0.0,
            "owner_pid": 1234}


@pytest.mark.parametrize("unchanged_ms", [50.0, 50.02, 55.0])
def test_a_stall_the_agent_pushes_at_its_deadline_opens_the_incident_by_event(unchanged_ms):
    """The watcher reads counters every 5 ms, so a deadline that is a multiple of 5 ms
    (50, 100, 200 ms) is first passed by a hair: the agent sees 50.02 ms > 50 ms and pushes
    its one violation, whose milliseconds may read 50.0 (rounded). That event must open
    the incident: the agent does not say it again, and a poll would find it up to a poll
    period late (bench_detection's hang trials opened by poll)."""
    clock = Clock()
    eng = Engine(list(rules.parse_ruleset(HANG_RULES).rule), "m1", clock=clock)
    assert eng.observe(view(at=clock.t, boxes={"svc": [progress("tick", 41, 0.01, 0.05)]})) == []
    clock.t += 0.05
    opened = eng.observe(NodeView("n0", "h0", clock.t, event=stall_event(unchanged_ms),
                                  via="event"))
    assert len(opened) == 1
    inc = opened[0].incident
    assert inc.detected_by == "event" and inc.event["seq"] == 7
    v = inc.detectors[0].violations[0]
    assert (v.box, v.sensor, v.bound, v.measure) == ("svc", "tick", 0.05, unchanged_ms / 1000)
    assert inc.onset_to_detect_ms == pytest.approx(unchanged_ms, abs=0.1)


def test_the_time_a_node_was_starved_of_cpu_does_not_count_against_a_rules_deadline():
    """The agent pushes a stall only past the deadline plus the time its node could not
    run (`starved_ms`); a rule's own deadline judges the same effective stall."""
    rule = HANG_RULES.replace('box = "*"', 'box = "*", deadline_ms = 100')
    for starved_ms, opens in ((0.0, True), (350.0, False)):
        event = dict(stall_event(420.0, deadline_ms=50.0), starved_ms=starved_ms)
        eng = Engine(list(rules.parse_ruleset(rule).rule), "m1", clock=Clock())
        opened = eng.observe(NodeView("n0", "h0", 100.0, event=event, via="event"))
        assert bool(opened) is opens, starved_ms


def test_a_polled_stall_counts_without_the_time_the_agent_found_its_node_starved():
    """A monitor's own polls see a counter still for 250 ms; the agent, which reads it
    far more often, found its node starved of CPU for 120 ms of that: not a stall at a
    200 ms deadline. Without starvation, the agent's longer sighting counts."""
    from backdoors.monitor.core import _agent_stalls
    from backdoors.sensors import SensorType

    def judged(unchanged, starved):
        s = SensorState(1, "tick", SensorType.PROGRESS, 7, True, stalled_for=0.25,
                        deadline=0.2)
        _agent_stalls(Snapshot("svc", 100, 2, 10.0, [s]), {"tick": unchanged}, starved)
        return round(s.stalled_for, 3), s.violated

    assert judged(0.11, {"tick": 0.12}) == (0.13, False)
    assert judged(0.21, {"tick": 0.12}) == (0.21, True)  # the agent's longer stretch
    assert judged(0.3, {}) == (0.3, True)
    assert judged(0.1, {}) == (0.25, True)  # the agent saw a move: its polls did not


def test_a_rules_own_deadline_judges_a_pushed_stall_again():
    """A rule's `deadline_ms` replaces the sensor's, for events as for polls: the agent
    pushes at the box's deadline, and a longer one of the rule is left to the polls."""
    for deadline_ms, opens in ((40, True), (50, True), (60, False)):
        rule = HANG_RULES.replace('box = "*"', f'box = "*", deadline_ms = {deadline_ms}')
        eng = Engine(list(rules.parse_ruleset(rule).rule), "m1", clock=Clock())
        opened = eng.observe(NodeView("n0", "h0", 100.0, event=stall_event(50.02), via="event"))
        assert bool(opened) is opens, deadline_ms


def test_a_pushed_death_of_the_registrant_opens_the_incident_whatever_the_deadline():
    """The agent pushes a counter whose registering process died at the death (`reason`
    "died"), long before the deadline: the counter will never move again, so it opens the
    incident at once, even under a rule's own longer deadline; the summary says why."""
    for extra in ("", ", deadline_ms = 5000"):
        rule = HANG_RULES.replace('box = "*"', f'box = "*"{extra}')
        eng = Engine(list(rules.parse_ruleset(rule).rule), "m1", clock=Clock())
        event = dict(stall_event(3.0), reason="died", died=0.0)
        (det,) = eng.observe(NodeView("n0", "h0", 100.0, event=event, via="event"))
        hit = det.incident.detectors[0]
        assert det.incident.detected_by == "event" and hit.violations[0].measure == 0.003
        assert hit.summary == "svc/tick stopped for good: its process 1234 died"


def test_an_oom_kill_the_agent_pushes_opens_an_oom_rule_and_no_other():
    """The agent pushes the first OOM kill in the oom_kills sensor's window as a
    pressure_over_rate violation of the kernel box: a rule watching oom_kills opens its
    incident from it; a rule watching other pressure sensors does not take it."""
    ruleset = """
[[rule]]
name = "oom"
detectors = [{ kind = "pressure_over_rate", box = "kernel", sensors = ["oom_kills"] }]
[[rule]]
name = "forks"
detectors = [{ kind = "pressure_over_rate", box = "kernel", sensors = ["fork*"] }]
"""
    eng = Engine(list(rules.parse_ruleset(ruleset).rule), "m1", clock=Clock())
    event = {"kind": "violation", "seq": 3, "at": 0.0, "detector": "pressure_over_rate",
             "condition": "oom_kill", "box": "kernel", "sensor": "oom_kills", "value": 4,
             "events": 1, "max_events": 0.5, "window_s": 10.0, "onset": 0.0}
    (det,) = eng.observe(NodeView("n0", "h0", 100.0, event=event, via="event"))
    assert det.incident.rule == "oom" and det.incident.detected_by == "event"
    v = det.incident.detectors[0].violations[0]
    assert (v.box, v.sensor, v.bound, v.measure) == ("kernel", "oom_kills", 0.5, 1.0)


def test_a_psi_trigger_the_agent_pushes_opens_the_memory_rule_unless_its_max_is_higher():
    """A PSI trigger's event says the node stalled at least its share of the window (the
    sensor's max): a rule on that sensor opens from it, its summary saying ">=", unless
    the rule's own max is above what the kernel confirmed."""
    event = {"kind": "violation", "seq": 5, "at": 0.0, "detector": "level_out_of_bounds",
             "condition": "psi_memory", "box": "kernel", "sensor": "psi_memory_some",
             "value": 40.0, "max": 40.0, "window_s": 2.0, "trigger": True, "onset": 0.0}
    for extra, opens in (("", True), (", max = 30", True), (", max = 60", False)):
        ruleset = f"""
[[rule]]
name = "memory"
detectors = [{{ kind = "level_out_of_bounds", box = "kernel", sensors = ["psi_memory_some"]{extra} }}]
"""
        eng = Engine(list(rules.parse_ruleset(ruleset).rule), "m1", clock=Clock())
        opened = eng.observe(NodeView("n0", "h0", 100.0, event=event, via="event"))
        assert bool(opened) is opens, extra
        if opens:
            hit = opened[0].incident.detectors[0]
            assert hit.summary == ("kernel/psi_memory_some = 40 >= 40" if not extra
                                   else "kernel/psi_memory_some = 40 > 30")
    # the same value without `trigger` is a level at its bound, not beyond it
    eng = Engine(list(rules.parse_ruleset(ruleset.replace(", max = 60", "")).rule), "m1",
                 clock=Clock())
    plain = {k: v for k, v in event.items() if k != "trigger"}
    assert eng.observe(NodeView("n0", "h0", 100.0, event=plain, via="event")) == []


def test_a_poll_and_an_event_judging_one_node_at_once_open_one_incident():
    """The poller and the event follower call the engine from their own threads. An event
    that arrives while a poll is opening the incident for the same stall must find it
    open (and count as a detection), not open a second one that leaves the first open
    for ever."""
    import threading

    clock = Clock()
    eng = Engine(list(rules.parse_ruleset(HANG_RULES).rule), "m1", clock=clock)
    opened: list = []
    during: list = []

    def the_event_comes_now():  # the clock is read while the poll opens the incident
        if not during:
            t = threading.Thread(target=lambda: opened.extend(eng.observe(
                NodeView("n0", "h0", 100.0, event=stall_event(55.0), via="event"))))
            during.append(t)
            t.start()
            t.join(0.5)  # it runs to its end here unless the node is being judged
        return clock.t

    eng.clock = the_event_comes_now
    poll = view(at=100.0, boxes={"svc": [progress("tick", 41, 0.055, 0.05)]})
    opened.extend(eng.observe(poll))
    during[0].join()
    assert len(opened) == 1 and opened[0].incident.detected_by == "poll"
    assert [i.id for i in eng.open_incidents()] == [opened[0].incident.id]
    assert opened[0].incident.detections == 2  # the poll that opened it, and the event


def test_a_monitor_judges_an_event_of_a_hand_over_quiet_once_the_quiet_ends(tmp_path):
    """Through Monitor.observe: a server's death pushed in the quiet (an event no poll
    tells again) is kept, not judged over and over, and opens its incident once the
    quiet has passed."""
    import time

    from backdoors.agent.keys import new_identity
    from backdoors.monitor.config import AgentEntry, MonitorConfig
    from backdoors.monitor.core import Monitor

    config = MonitorConfig(monitor_id="m1", incidents_dir=str(tmp_path), agents=[
        AgentEntry("h0", "127.0.0.1:9", new_identity("h0").public_text(), nodes=["n0"])])
    orphaned = """
[[rule]]
name = "server-died"
detectors = [{ kind = "sessions_orphaned" }]
actions = [{ kind = "record" }]
"""
    mon = Monitor(config, key=new_identity("m1"), rules=rules.parse_ruleset(orphaned).rule)
    try:
        held = time.monotonic()
        mon.hold_off("n0", "h0", 0.3, "m9 acted on it 1700 ms ago")
        died = {"kind": "owner_died", "seq": 4, "at": time.time(), "pid": 1234,
                "sessions": ["s1"], "died": time.time()}
        mon.observe(NodeView("n0", "h0", mon.clock(), event=died, via="event"))
        assert mon.incidents() == []
        inc = mon.wait_for(lambda i: i.rule == "server-died", 10)
        assert inc is not None and inc.detected_by == "event"
        assert time.monotonic() - held >= 0.3
    finally:
        mon.stop()


def _stall_view(t, stalled, names="abc"):
    sensors = [SensorState(i + 1, n, SensorType.PROGRESS, 5, n in stalled,
                           stalled_for=(t if n in stalled else 0.0), deadline=0.1)
               for i, n in enumerate(names)]
    return NodeView("n0", "h0", t, {"app": Snapshot("app", 42, 2, t, sensors)})


def test_only_a_view_of_the_whole_rule_says_its_condition_is_clear():
    """Outside review: an event (of one sensor) and a silent agent's view (of the stale
    detectors) were judged as "the rule's condition is clear": a `cleared` event of one
    counter closed a hang while another counter was still stalled (then reopened as a new
    incident, past max_attempts), and a silent agent closed a stall it could not see."""
    now, closed = [0.0], []
    hang = rules.parse_ruleset('''
[[rule]]
name = "hang"
detectors = [{ kind = "progress_stalled", box = "*" }, { kind = "agent_unreachable", after_ms = 3000 }]
actions = [{ kind = "refresh", command = ["true"] }]
clear_ms = 200
cooldown_ms = 500
''').rule
    eng = Engine(list(hang), "m", clock=lambda: now[0], settle_s=0.25, on_close=closed.append)

    def at(t, v):
        now[0] = t
        return eng.observe(v)

    [d] = at(1.0, _stall_view(1.0, "abc"))
    eng.responded(d, "repaired")
    at(1.05, _stall_view(1.05, "abc"))
    for t, sensor in ((1.3, "a"), (1.6, "c"), (1.9, "a")):  # b still stalled
        at(t, NodeView("n0", "h0", t, via="event", event={
            "kind": "cleared", "detector": "progress_stalled", "box": "app", "sensor": sensor}))
    for t, silent in ((2.0, 0.4), (2.5, 0.9)):  # the agent silent: nothing is known
        at(t, NodeView("n0", "h0", t, agent_ok=False, agent_silent_s=silent))
    assert closed == []
    assert at(2.6, _stall_view(2.6, "b")) == []  # the same incident, still open
    at(2.7, _stall_view(2.7, ""))
    at(2.95, _stall_view(2.95, ""))  # clear for clear_ms on whole views: closed
    assert [(i.id, i.outcome) for i in closed] == [(d.incident.id, "cleared")]


def test_a_recovery_that_fenced_the_node_but_moved_nothing_is_tried_again():
    """Outside review: a recover whose fence held and whose move failed left an incident
    the next poll closed as "fenced" (its sessions moved away, by the docs' word): the
    sessions stayed on a frozen node, and no response was tried again."""
    now, closed, unresolved = [0.0], [], []
    heal = list(rules.load_ruleset("heal").rule)
    eng = Engine(heal, "m", clock=lambda: now[0], on_close=closed.append,
                 on_unresolved=unresolved.append)

    def poll(t, fenced, stalled=True):
        now[0] = t
        s = SensorState(1, "tick", SensorType.PROGRESS, 5, stalled, stalled_for=t if stalled else 0,
                        deadline=0.1)
        return eng.observe(NodeView("n0", "h0", t, {"app": Snapshot("app", 42, 2, t, [s])},
                                    frozen=fenced, locked_by=["m"] if fenced else [],
                                    fenced=fenced))

    [d] = poll(1.0, False)
    eng.responded(d, "failed")  # fenced, then the evacuation failed
    attempts = []
    for i in range(1, 40):
        for det in poll(1.0 + 0.25 * i, True):
            attempts.append(det.attempt)
            eng.responded(det, "failed")
    assert closed == [] and attempts == list(range(2, d.rule.max_attempts + 1))
    assert [i.id for i in unresolved] == [d.incident.id]
    assert poll(30.0, True) == [] and closed == []  # open, unresolved, while it is stranded
    assert d.incident.state == "unresolved"


def test_a_node_name_is_one_agents(caplog, tmp_path):
    """Outside review: two agents serving a node of the same name were merged into one
    node (one history, one incident: the second node's hang opened nothing, and one
    agent's discovery closed the other's incidents). Listed twice: refused; discovered
    twice: the first agent's is watched, the other said so once."""
    from types import SimpleNamespace

    from backdoors.agent.protocol import SensorsReply
    from backdoors.errors import ConfigError
    from backdoors.monitor.config import parse_config
    from backdoors.monitor.core import Monitor

    two = '''monitor_id = "m1"
[[agents]]
host = "h0"
address = "10.99.0.1:7700"
{0}
[[agents]]
host = "h1"
address = "10.99.0.2:7700"
{0}
'''
    with pytest.raises(ConfigError, match=r"agents\[1\]\.nodes: node 'svc' is listed for agent 'h0' too"):
        parse_config(two.format('nodes = ["svc"]'), "monitor.toml")

    class Agent:
        def nodes(self):
            return [SimpleNamespace(name="svc", fenced=False, frozen=False, locked_by=[])]

        def sensors_many(self, nodes):
            return SimpleNamespace(replies={n: SensorsReply({}, {}) for n in nodes}, errors={})

    cfg = parse_config(two.format(""), "monitor.toml")
    mon = Monitor(cfg, client_factory=lambda entry, timeout: Agent())
    for _ in range(3):
        for p in mon.pollers:
            p.poll_once(Agent())
    assert [p.nodes for p in mon.pollers] == [["svc"], []]
    said = [r for r in caplog.records if "serves a node 'svc'" in r.getMessage()]
    assert len(said) == 1 and "agent h1" in said[0].getMessage()
    mon.pollers[0]._drop("svc")  # gone from h0: h1's may be watched now
    mon.pollers[1]._next_discover = 0.0  # (its next discovery)
    mon.pollers[1].poll_once(Agent())
    assert mon.pollers[1].nodes == ["svc"]


def test_a_stopping_monitor_starts_no_response_it_had_queued():
    """Outside review: stop() let the pool start every response still queued, with their
    kills, fences and moves, after the pollers had stopped, and waited for them all."""
    import threading
    from types import SimpleNamespace as NS

    from backdoors.monitor.config import parse_config
    from backdoors.monitor.core import Monitor

    cfg = parse_config('monitor_id = "m1"\nmax_parallel_repairs = 1\nevents = false\n'
                       '[[agents]]\nhost = "h0"\naddress = "10.99.0.1:7700"\n'
                       'nodes = ["n0", "n1", "n2"]\n', "monitor.toml")
    hog = list(rules.parse_ruleset('''
[[rule]]
name = "hog"
detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
diagnosis = { kind = "largest_rss" }
actions = [{ kind = "kill_culprit", wait_ms = 1 }]
''').rule)
    reading, release, killed = threading.Event(), threading.Event(), []

    class Agent:
        def processes(self, node, **kw):
            reading.set()
            release.wait(10)  # a slow agent: the first response runs while stop() is asked
            return NS(rows=[NS(pid=10, ppid=1, comm="x", state="S", rss_bytes=1, start_time=1.0,
                               age_s=1, rss_rate=0, registered=False, exe="x")],
                      truncated=False, total=1)

        def kill(self, node, pid, start_time):
            killed.append(node)
            return True

        def close(self):
            pass

    mon = Monitor(cfg, rules=hog, client_factory=lambda e, t: Agent())
    for n in ("n0", "n1", "n2"):
        s = SensorState(1, "memory_mb", SensorType.LEVEL, 900.0, True, max=800.0)
        mon.observe(NodeView(n, "h0", mon.clock(), {"kernel": Snapshot("kernel", 1, 2, 0, [s])}))
    assert reading.wait(10)
    threading.Timer(0.3, release.set).start()
    mon.stop()
    assert killed == ["n0"]  # the running one ended; the two queued never started
    states = {i.node: i.state for i in mon._incidents}
    assert states["n1"] == states["n2"] == "not handled: monitor stopping", states


def test_a_box_that_stops_reading_says_nothing_and_is_logged(caplog):
    """Outside review: a box that no longer parsed (a writer stuck mid-add) or that the
    agent could not read dropped out of the view, its sensors with it: the open hang of a
    stalled service closed as cleared, with only a debug line."""
    import os
    from types import SimpleNamespace as NS

    from backdoors.monitor.config import parse_config
    from backdoors.monitor.core import Monitor

    box = SensorBox.create("app")
    box.progress("tick", deadline=0.1)
    good = os.pread(box.fd, 1 << 20, 0)
    box.close()
    torn = b"\0" * 8 + good[8:]
    now, closed = [0.0], []
    cfg = parse_config('monitor_id = "m1"\n[[agents]]\nhost = "h0"\naddress = "10.99.0.1:7700"\n',
                       "monitor.toml")
    poller = Monitor(cfg, client_factory=lambda e, t: None, clock=lambda: now[0]).pollers[0]
    eng = Engine(rules.default_rules(), "m", clock=lambda: now[0], on_close=closed.append)

    def poll(t, **reply):
        now[0] = t
        view = poller._view("n0", NS(**{"boxes": {}, "errors": {}, **reply}), t, None)
        return view, eng.observe(view)

    poll(0.0, boxes={"app": good})
    view, [d] = poll(0.5, boxes={"app": good})
    eng.responded(d, "recorded")
    for t in (1.0, 1.5, 2.0):
        view, _ = poll(t, boxes={"app": torn})
        assert view.unread == ("app",)
    for t in (2.5, 3.0):
        view, _ = poll(t, errors={"app": "layout generation did not settle"})
    assert closed == []
    said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(said) == 1 and "box app unreadable" in said[0]
    poll(3.5, boxes={"app": good})  # readable, its counter still stalled: still open
    assert closed == []


def test_a_node_with_thousands_of_sensors_costs_the_monitor_a_bounded_share():
    """Outside review: a node's boxes (4,096 sensors each) all went into every history
    entry (~70 MB a box at the defaults) and into 4 metric series each per scrape, and a
    node gone kept its last view (and series) for good."""
    from backdoors.monitor.history import MAX_KEYS
    from backdoors.monitor.metrics import MAX_SENSOR_SERIES, MonitorCollector, MonitorMetrics

    boxes = {f"b{j}": Snapshot(f"b{j}", 42, 2, 0.0, [
        SensorState(i + 1, f"s{i}", SensorType.LEVEL, 1.0, False, max=2.0) for i in range(4096)])
        for j in range(3)}
    h = History(60.0)
    for t in range(10):
        h.add(NodeView("n0", "h0", float(t), boxes))
    assert max(len(values) for _, values in h.entries()) == MAX_KEYS
    metrics = MonitorMetrics()
    metrics.saw(NodeView("n0", "h0", 0.0, boxes))
    series = list(MonitorCollector(None, metrics)._sensors(metrics.views()))
    assert max(len(f.samples) for f in series) == MAX_SENSOR_SERIES
    metrics.forget("h0", "n0")
    assert metrics.views() == []

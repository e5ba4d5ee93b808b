"""Orion's predictor on synthetic counter series (pure logic: the readings of a real
guest are taken in tests/test_vm.py and the vm scenario)."""

import math
import random

import pytest

from backdoors.vm.memory import Readings
from backdoors.vm.orion import Predictor, Trend, first_crossing

MiB = 1 << 20
FLOOR, MAX_THREADS = 32 * MiB, 512


def reading(available: float = 200 * MiB, threads: int = 40, running: int = 1) -> Readings:
    return Readings(jiffies=0, free=int(available), file=0, shmem=0, anon=0,
                    slab_unreclaimable=0, threads=int(threads), forks=0, running=int(running))


def run(series, predictor=None):
    p = predictor or Predictor(memory_floor=FLOOR, max_threads=MAX_THREADS)
    samples = []
    for t, r in series:
        p.observe(t, r)
        samples.append((t, r))
    return p, first_crossing(samples, memory_floor=FLOOR, max_threads=MAX_THREADS)


def ticks(seconds: float, period: float = 0.05):
    return [i * period for i in range(int(seconds / period))]


def test_the_line_through_the_window():
    trend = Trend(1.0)
    for t in ticks(3):
        trend.add(t, 100 - 7 * t)
    slope, r2 = trend.fit()
    assert slope == pytest.approx(-7) and r2 == pytest.approx(1)
    assert trend.span == pytest.approx(1.0) and trend.moved() == pytest.approx(7, rel=0.01)
    flat = Trend(1.0)
    for t in ticks(2):
        flat.add(t, 5)
    assert flat.fit() is None


def test_a_memory_leak_is_predicted_before_the_floor():
    rng = random.Random(1)
    series = [(t, reading(200 * MiB - 20 * MiB * t + rng.uniform(-MiB, MiB))) for t in ticks(12)]
    p, crossed = run(series)
    (alarm,) = p.alarms
    assert alarm.kind == "memory-exhaustion" and 0 < alarm.eta_s <= p.horizon_s
    assert alarm.at < crossed["memory-exhaustion"]
    assert crossed["memory-exhaustion"] - alarm.at == pytest.approx(alarm.eta_s, abs=0.5)


def test_a_fork_bomb_is_predicted_before_the_ceiling():
    series = [(t, reading(threads=20 * 2 ** (t / 0.3))) for t in ticks(3)]
    p, crossed = run(series)
    assert [a.kind for a in p.alarms] == ["fork-bomb"]
    assert p.alarms[0].at < crossed["fork-bomb"]


def test_runnable_tasks_piling_up_are_predicted_before_the_run_queue_ceiling():
    """CPU-bound runaways spawning 15 a second: the run queue heads for its ceiling (32)
    and the starvation alarm comes before it is crossed; a run queue that only jitters
    (busy work) raises none; without `max_running` there is no such kind."""
    rng = random.Random(3)
    ramp = [(t, reading(running=1 + 15 * t + rng.randint(-1, 1))) for t in ticks(4)]
    p = Predictor(memory_floor=FLOOR, max_threads=MAX_THREADS, max_running=32)
    samples = []
    for t, r in ramp:
        p.observe(t, r)
        samples.append((t, r))
    crossed = first_crossing(samples, memory_floor=FLOOR, max_threads=MAX_THREADS,
                             max_running=32)
    assert [a.kind for a in p.alarms] == ["starvation"]
    assert p.alarms[0].at < crossed["starvation"]
    busy = Predictor(memory_floor=FLOOR, max_threads=MAX_THREADS, max_running=32)
    for t in ticks(60):
        busy.observe(t, reading(running=rng.randint(0, 6)))
    assert busy.alarms == []
    plain, _ = run(ramp)
    assert plain.alarms == [] and "starvation" not in plain.kinds


@pytest.mark.parametrize("shape", ["noise", "sawtooth", "slow-leak", "busy-processes"])
def test_benign_work_raises_no_alarm(shape):
    """Churn that frees what it takes, a leak that would take minutes, processes that
    come and go: no bound is ever reached and no alarm is raised."""
    rng = random.Random(shape)
    series = []
    for t in ticks(60):
        if shape == "noise":
            r = reading(150 * MiB + rng.gauss(0, 4 * MiB), 40 + rng.randint(-3, 3))
        elif shape == "sawtooth":  # take 64 MiB over 0.5 s, free it at once
            r = reading(180 * MiB - 128 * MiB * (t % 0.75 if t % 0.75 < 0.5 else 0))
        elif shape == "slow-leak":  # 1 MiB/s: 2 minutes from the floor
            r = reading(160 * MiB - MiB * t)
        else:
            r = reading(threads=60 + 40 * math.sin(t * 3) + rng.randint(0, 10))
        series.append((t, r))
    p, crossed = run(series)
    assert crossed == {} and p.alarms == []


def test_one_alarm_per_episode():
    """A leak alarms once while it lasts; freed and quiet for a window, a second leak
    alarms again."""
    series = []
    for t in ticks(20):
        if t < 4:
            level = 120 * MiB - 20 * MiB * t  # down to 40 MiB: ETA well inside the horizon
        elif t < 10:
            level = 150 * MiB
        elif t < 14:
            level = 120 * MiB - 20 * MiB * (t - 10)
        else:
            level = 150 * MiB
        series.append((t, reading(level)))
    p, crossed = run(series)
    assert [a.kind for a in p.alarms] == ["memory-exhaustion"] * 2
    assert crossed == {}  # it never reached the floor: the alarms were early


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_r2"):
        Predictor(memory_floor=FLOOR, max_threads=MAX_THREADS, min_r2=0)


def test_btf_enums_32_and_64_bit():
    """Enumerator values from a hand-made BTF blob: one enum of each width."""
    import struct as st

    from backdoors.errors import VmError
    from backdoors.vm.btf import MAGIC, Btf
    strings = b"\0small\0A\0B\0wide\0C\0"
    at = {name: strings.index(name.encode() + b"\0") for name in ("small", "A", "B", "wide", "C")}
    types = st.pack("<III", at["small"], 6 << 24 | 2, 4) + st.pack("<Ii", at["A"], 0) + \
        st.pack("<Ii", at["B"], -3)
    types += st.pack("<III", at["wide"], 19 << 24 | 1, 8) + st.pack("<III", at["C"], 5, 1)
    blob = st.pack("<HBBIIIII", MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    types_ = Btf(blob + types + strings)
    assert types_.enum_value("small", "B") == -3 and types_.enum_value("small", "A") == 0
    assert types_.enum_value("wide", "C") == 5 + (1 << 32)
    with pytest.raises(VmError, match="enum small has no Z"):
        types_.enum_value("small", "Z")
    with pytest.raises(VmError, match="no enum other"):
        types_.enum_value("other", "A")

"""A hostile node against the agent's one watch thread: its boxes cost it a bounded share.

The watcher (agent/watch.py) reads every node's progress counters on one thread every few
milliseconds, and parses a box again whenever its layout generation changes. A node's
root owns its boxes' memory: it can bump the generation of all of its 64 boxes (up to
4,096 sensors each, ~16 ms to parse) on every tick, and keep up to 262,144 counters. The
ticks here are driven by hand with a given clock (no thread, no timing): what a tick does
for one node is bounded, and another node's stall is still published.
"""

import mmap
import os
import time
from types import SimpleNamespace

from backdoors.agent.config import KernelSensorLimits
from backdoors.agent.regions import RegionTable
from backdoors.agent.tracking import BoxTracking
from backdoors.agent.watch import COUNTERS_PER_TICK, PARSES_PER_TICK, Watcher
from backdoors.sensors import SensorBox, abi

HOUR = 3600.0
BOXES, SENSORS = 64, 256


def _rt(name: str) -> SimpleNamespace:
    cgroup = SimpleNamespace(cpu_full_us=lambda: None, fork_failures=lambda: 0)
    return SimpleNamespace(name=name, tracking=BoxTracking(), node=SimpleNamespace(cgroup=cgroup),
                           sampler=SimpleNamespace(limits=KernelSensorLimits()))


def _bump(maps: list[mmap.mmap]) -> None:
    """What the node's root can do to its own boxes at any time: a new (even) generation."""
    at = abi.OFF_GENERATION
    for m in maps:
        gen = int.from_bytes(m[at:at + 8], "little")
        m[at:at + 8] = (gen + 2).to_bytes(8, "little")


def _victim_and_watcher(regions: RegionTable) -> tuple[SensorBox, Watcher, list]:
    """Node n1's box "v" (one counter, 50 ms deadline) and a watcher of n0 and n1 (5 ms
    ticks, driven by the test) whose events land in the list."""
    victim = SensorBox.create("v")
    victim.progress("p", deadline=0.05)
    regions.keep("n1", "v", "sensorbox", victim.fd, os.getpid())
    events: list = []
    w = Watcher({"n0": _rt("n0"), "n1": _rt("n1")}, regions, period_s=0.005, slow_s=HOUR,
                publish=lambda kind, node, **data: events.append((kind, node, data)),
                held=lambda node: False)
    return victim, w, events


def test_a_node_churning_its_box_layouts_costs_each_tick_a_bounded_share():
    regions = RegionTable(["n0", "n1"], max_regions=BOXES, max_region_bytes=1 << 20,
                          max_node_bytes=64 << 20)
    hostile, maps = [], []
    for i in range(BOXES):
        box = SensorBox.create(f"h{i}", capacity=SENSORS)
        for j in range(SENSORS):
            box.progress(f"p{j}", deadline=HOUR)
        regions.keep("n0", f"h{i}", "sensorbox", box.fd, os.getpid())
        hostile.append(box)
        maps.append(mmap.mmap(box.fd, os.fstat(box.fd).st_size))
    victim, w, events = _victim_and_watcher(regions)
    try:
        now = time.monotonic()
        w._replan(now)
        n0 = list(w._nodes["n0"].boxes.values())
        (v,) = w._nodes["n1"].boxes.values()
        for _ in range(BOXES):  # the first layouts: a bounded number per tick
            w._tick(now)
            assert v.read_at == now and v.counters
        assert all(b.counters for b in n0)
        stalled = []
        for tick in range(1, 40):  # every tick, every layout of n0 changes
            _bump(maps)
            generations = [b.generation for b in n0]
            now += 0.005
            w._tick(now)
            parsed = sum(b.generation != g for b, g in zip(n0, generations))
            assert parsed <= PARSES_PER_TICK, f"tick {tick}: {parsed} of n0's boxes parsed"
            assert v.read_at == now  # n1 is read on every tick all the same
            stalled += [d for kind, node, d in events if node == "n1" and kind == "violation"]
            if stalled:
                break
        assert stalled and stalled[0]["box"] == "v", events  # within its deadline's ticks
        # n0's 16,384 counters are read a budget's worth per tick, in turn
        assert sum(len(b.counters) for b in n0) > COUNTERS_PER_TICK
    finally:
        w._close()
        for m in maps:
            m.close()
        for box in (*hostile, victim):
            box.close()


def test_a_box_held_mid_update_or_relaid_every_tick_costs_the_watch_little(monkeypatch):
    """Outside review: a box whose generation a node held odd (a writer mid-update, for
    ever) made each tick wait out the seqlock's retries (~30 ms against a 5 ms period),
    and one whose layout changed on every tick was parsed on every tick (4,096 sensors:
    22-33 ms): every node's detection waited behind it. A box mid-update is looked at
    again at the next tick, and one is parsed no sooner than PARSE_SPACING times its
    last parse took."""
    from backdoors.agent import watch
    from backdoors.agent.watch import PARSE_SPACING

    reads = []
    read = watch.read_consistent
    monkeypatch.setattr(watch, "read_consistent", lambda region: reads.append(1) or read(region))
    regions = RegionTable(["n0", "n1"], max_regions=4, max_region_bytes=1 << 20,
                          max_node_bytes=4 << 20)
    box = SensorBox.create("h", capacity=64)
    box.progress("p", deadline=HOUR)
    regions.keep("n0", "h", "sensorbox", box.fd, os.getpid())
    m = mmap.mmap(box.fd, os.fstat(box.fd).st_size)
    victim, w, events = _victim_and_watcher(regions)
    try:
        now = time.monotonic()
        w._replan(now)
        w._tick(now)
        (h,) = w._nodes["n0"].boxes.values()
        assert h.counters and h.parse_after > now and len(reads) == 2  # both boxes parsed
        at = abi.OFF_GENERATION
        m[at:at + 8] = (int.from_bytes(m[at:at + 8], "little") + 1).to_bytes(8, "little")
        for _ in range(10):  # held odd: not read, not waited for
            now = max(now, h.parse_after) + 0.005
            w._tick(now)
        assert len(reads) == 2 and h.generation % 2 == 0
        m[at:at + 8] = (int.from_bytes(m[at:at + 8], "little") + 1).to_bytes(8, "little")
        while len(reads) == 2:  # even again, and changed: parsed once its spacing passed
            now += 0.005
            w._tick(now)
        assert h.generation == int.from_bytes(m[at:at + 8], "little")
        last, spacing = now, h.parse_after - now
        assert 0 < spacing and PARSE_SPACING > 1
        _bump([m])
        w._tick(now + spacing / 2)
        assert len(reads) == 3  # not before the spacing ...
        w._tick(h.parse_after)
        assert len(reads) == 4 and last < h.parse_after  # ... and after it
    finally:
        w._close()
        m.close()
        box.close()
        victim.close()


def test_a_node_toggling_its_counters_pushes_a_bounded_number_of_events():
    """Each progress counter that stalls and moves again is two events: 512 counters of
    1 ms deadline, ticked every other tick, were thousands of events a second, pushing
    every other node's out of the bus's history and the monitors' queues (and keeping the
    agent's event loop signing them). A node's progress events are budgeted; beyond,
    they are counted and summarised, and another node's still go out."""
    from backdoors.agent.watch import EVENTS_BURST, EVENTS_PER_S
    regions = RegionTable(["n0", "n1"], max_regions=4, max_region_bytes=1 << 20,
                          max_node_bytes=4 << 20)
    box = SensorBox.create("t", capacity=512)
    counters = [box.progress(f"p{i}", deadline=0.001) for i in range(512)]
    regions.keep("n0", "t", "sensorbox", box.fd, os.getpid())
    victim, w, events = _victim_and_watcher(regions)
    try:
        now = started = time.monotonic()
        w._replan(now)
        for tick in range(200):  # a simulated second
            if tick % 2:
                for c in counters:
                    c.tick()
            now += 0.005
            w._tick(now)
        n0 = [(k, d) for k, node, d in events if node == "n0"]
        progress = [d for k, d in n0 if k in ("violation", "cleared")]
        # the burst, and what the bucket refilled in the (real) time the ticks took
        allowed = EVENTS_BURST + (time.monotonic() - started) * EVENTS_PER_S
        assert len(progress) <= allowed, (len(progress), allowed)
        summaries = [d for k, d in n0 if k == "events_suppressed"]
        assert summaries and summaries[0]["count"] > 0, n0[-3:]
        assert any(k == "violation" and node == "n1" for k, node, _ in events)
    finally:
        w._close()
        box.close()
        victim.close()

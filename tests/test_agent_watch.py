"""The agent's watcher hears the kernel: a link going down (rtnetlink), a v2 freeze
(cgroup.events) and an OOM kill (the memory controller's notification) are pushed
without any read on a timer: its fallback reads are set an hour apart here. Refused
forks, which nothing notifies on a v1 hierarchy, are read on the watcher's ticks."""

import os
import queue
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from backdoors.agent.config import KernelSensorLimits
from backdoors.agent.regions import RegionTable
from backdoors.agent.tracking import BoxTracking
from backdoors.agent.watch import Watcher
from backdoors.net import add_veth, netns, set_up
from backdoors.net.links import LinkWatch
from backdoors.nodes.cgroups import Cgroup
from backdoors.sensors import read_consistent

pytestmark = pytest.mark.root

HOUR = 3600.0


@pytest.fixture
def watched(root, unique, request):
    """A node of its own (netns with eth0, cgroup limited to 48 MiB) watched by a Watcher
    whose events land in `w.events` (kind, node, data); its kernel-sensor limits are the
    defaults, or the test's parameter (indirect)."""
    limits = getattr(request, "param", KernelSensorLimits())
    prefix = f"bdt-{unique}-"
    ns, peer = prefix + "n0", prefix + "sw"
    cg = None
    watcher = None
    try:
        netns.create(ns)
        netns.create(peer)
        add_veth(peer, "v0", ns, "eth0")
        cg = Cgroup.create(f"bdt-{unique}/n0")
        cg.set_memory_limit(48 << 20)
        link = LinkWatch(ns, "eth0")
        end = time.monotonic() + 10
        while not link.up():  # the veth's carrier comes a moment after it is set up
            assert time.monotonic() < end, "the veth never came up"
            time.sleep(0.01)
        rt = SimpleNamespace(name="n0", node=SimpleNamespace(cgroup=cg), tracking=BoxTracking(),
                             sampler=SimpleNamespace(link=link, limits=limits))
        regions = RegionTable(["n0"], max_regions=4, max_region_bytes=1 << 20,
                              max_node_bytes=4 << 20)
        events: queue.Queue = queue.Queue()
        watcher = Watcher({"n0": rt}, regions, period_s=0.005, slow_s=HOUR,
                          publish=lambda kind, node, **data: events.put((kind, node, data)),
                          held=lambda node: False)
        watcher.start()
        yield SimpleNamespace(ns=ns, peer=peer, cg=cg, watcher=watcher, events=events, rt=rt)
    finally:
        if watcher is not None:
            watcher.stop()
        if cg is not None:
            cg.kill_all()
            cg.destroy()
            Cgroup.open(f"bdt-{unique}").destroy()
        netns.reap(prefix)


def _next(w, condition: str, timeout: float = 20.0) -> tuple[str, dict]:
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        assert left > 0, f"no {condition} event within {timeout} s"
        try:
            kind, node, data = w.events.get(timeout=left)
        except queue.Empty:
            continue
        if data.get("condition") == condition:
            assert node == "n0"
            return kind, data


def test_link_down_is_pushed_from_rtnetlink(watched):
    w = watched
    time.sleep(0.2)  # the watcher took its first look (link up: nothing said)
    assert w.events.empty()
    set_up(w.ns, "eth0", False)
    kind, data = _next(w, "link_down")
    assert kind == "violation" and data["sensor"] == "link_up" and data["value"] == 0.0
    set_up(w.ns, "eth0", True)
    kind, data = _next(w, "link_down")
    assert kind == "cleared" and data["value"] == 1.0
    assert w.events.empty()  # once each


def test_a_v2_freeze_is_pushed_from_cgroup_events(watched):
    w = watched
    if w.cg.freezer != "v2":
        pytest.skip("the v1 freezer notifies nothing (the watcher reads it on its ticks)")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        w.cg.attach(sleeper.pid)
        w.cg.freeze()
        kind, _ = _next(w, "node_frozen")
        assert kind == "violation"
        w.cg.thaw()
        kind, _ = _next(w, "node_frozen")
        assert kind == "cleared"
    finally:
        sleeper.kill()
        sleeper.wait()


HOG = "import os\nchunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"


def test_an_oom_kill_is_pushed_from_the_memory_controller(watched):
    w = watched
    r, wr = os.pipe()
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.read({r}, 1)\n" + HOG],
                           pass_fds=[r])
    try:
        w.cg.attach(hog.pid)
        os.write(wr, b"x")  # allocate only once inside the cgroup
        kind, data = _next(w, "oom_kill", timeout=30)
        assert kind == "violation" and data["sensor"] == "oom_kills"
        assert data["value"] >= 1 and data["events"] >= 1
        hog.wait(10)  # the kill the notification told of
    finally:
        hog.kill()
        hog.wait()


FORKER = """import os, sys, time
os.read(int(sys.argv[1]), 1)
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    except BlockingIOError:  # refused by the pids limit
        pass
time.sleep(60)
"""


def test_forks_refused_by_the_pids_limit_are_pushed_within_the_window(watched):
    """A fork bomb against the pids limit: its refused forks (pids.events, read by the
    watcher's ticks: a v1 hierarchy notifies nothing) are one violation past the
    fork_failures sensor's bound, and one clearing once a window passes without them."""
    w = watched
    w.cg.set_pids_limit(8)
    r, wr = os.pipe()
    bomb = subprocess.Popen([sys.executable, "-c", FORKER, str(r)], pass_fds=[r])
    try:
        w.cg.attach(bomb.pid)
        time.sleep(0.2)  # the watcher read the count before: nothing refused yet
        assert w.events.empty()
        os.write(wr, b"x")
        kind, data = _next(w, "fork_failures")
        limit = KernelSensorLimits().fork_failures_per_s
        assert kind == "violation" and data["sensor"] == "fork_failures"
        assert data["events"] > limit and data["value"] >= data["events"]
        assert data["max_events"] == limit and data["window_s"] == 1.0
        kind, data = _next(w, "fork_failures", timeout=10)  # no more forks: it ends
        assert kind == "cleared" and data["events"] <= limit
        assert w.events.empty()
    finally:
        w.cg.kill_all()
        bomb.wait()
        os.close(r)
        os.close(wr)


GROW = """import os, sys
r = int(sys.argv[1])
os.read(r, 1)
held = b"\\1" * (40 << 20)  # past 80 % of the 48 MiB limit (38.4 MiB), short of it
print("held", flush=True)
os.read(r, 1)
del held
print("freed", flush=True)
os.read(r, 1)
"""


def test_memory_use_past_the_high_mark_is_pushed_from_a_usage_threshold(watched):
    """The node's memory use crosses 80 % of its limit (the kernel box's memory_mb max)
    and back: a violation and its clearing, from the v1 threshold's eventfd (the slow
    reads are an hour apart: nothing else would see it)."""
    w = watched
    if w.cg.layout.home("memory") != "v1":
        pytest.skip("v2 has no usage threshold notification (the slow reads judge it)")
    assert w.events.empty()
    r, wr = os.pipe()
    grower = subprocess.Popen([sys.executable, "-c", GROW, str(r)], pass_fds=[r],
                              stdout=subprocess.PIPE, text=True)
    try:
        w.cg.attach(grower.pid)
        os.write(wr, b"x")
        kind, data = _next(w, "memory_high")
        assert kind == "violation" and (data["box"], data["sensor"]) == ("kernel", "memory_mb")
        assert data["max"] == pytest.approx(48 * 0.8) and data["value"] > data["max"]
        assert grower.stdout.readline().strip() == "held"
        os.write(wr, b"x")
        assert grower.stdout.readline().strip() == "freed"
        kind, data = _next(w, "memory_high")
        assert kind == "cleared" and data["value"] <= data["max"]
        os.write(wr, b"x")
        grower.wait(10)
    finally:
        grower.kill()
        grower.wait()
        os.close(r)
        os.close(wr)


@pytest.mark.parametrize("held_sessions", [True, False])
def test_a_dead_registrant_is_told_to_the_owner_watch_before_any_stall(watched, held_sessions):
    """A registrant's death goes to `owner_died` before anything else is said of it. If
    it held sessions, "owner_died" (pushed by the owner watch) comes first and its box
    stalls only at the deadline (for rules without a server-died rule); under load that
    stall used to reach the monitor first, and a hang rule fenced the node the server was
    being restarted in. Else its counters stall at once, reason "died"."""
    from backdoors.sensors import SensorBox

    w = watched

    def owner_died(node, pid):
        w.events.put(("owner_died", node, {"condition": "owner_died", "pid": pid}))
        return held_sessions

    w.watcher.owner_died = owner_died
    box = SensorBox.create("srv")
    progress = box.progress("progress", deadline=0.1)
    owner = subprocess.Popen(["sleep", "60"])
    try:
        w.watcher.regions.keep("n0", "srv", "sensorbox", os.dup(box.fd), owner.pid)
        for _ in range(30):  # progressing while its registrant lives
            progress.tick()
            time.sleep(0.01)
        owner.kill()
        owner.wait()
        said = []
        while len(said) < 2:
            kind, node, data = w.events.get(timeout=10)
            if data.get("condition") in ("owner_died", "progress_stalled"):
                said.append((kind, data))
        assert [d["condition"] for _, d in said] == ["owner_died", "progress_stalled"]
        assert said[0][1]["pid"] == owner.pid
        kind, stall = said[1]
        assert kind == "violation"
        if held_sessions:  # at the deadline, as a hang
            assert "reason" not in stall and stall["unchanged_ms"] >= stall["deadline_ms"]
        else:
            assert stall["reason"] == "died"
    finally:
        owner.kill()
        owner.wait()
        box.close()


def test_each_progress_counter_among_other_sensors_is_judged_on_its_own(watched):
    """A box whose progress counters sit between levels and a pressure counter, all
    written on every round: only the counter that stops is said stalled, with its last
    value, and said cleared when it moves again (the watcher reads a box's counters in
    one call and skips the per-counter judgement while none moved and no deadline is
    near)."""
    from backdoors.sensors import SensorBox

    w = watched
    box = SensorBox.create("mixed")
    busy = box.level("busy", min=0.0)
    p1 = box.progress("p1", deadline=0.1)
    queue_len = box.level("queue", max=1e9)
    p2 = box.progress("p2", deadline=0.1)
    errors = box.pressure("errors", max_events=1e9)
    p3 = box.progress("p3", deadline=0.1)
    try:
        w.watcher.regions.keep("n0", "mixed", "sensorbox", os.dup(box.fd), os.getpid())

        def run(seconds: float, counters) -> None:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                i += 1
                busy.set(i % 7)
                queue_len.set(i)
                errors.add(1)
                for c in counters:
                    c.tick()
                time.sleep(0.005)

        run(0.4, (p1, p2, p3))
        run(0.5, (p1, p3))  # p2 stops: five deadlines
        kind, data = _next(w, "progress_stalled")
        assert (kind, data["sensor"], data["box"]) == ("violation", "p2", "mixed")
        assert data["value"] == p2.value and data["unchanged_ms"] >= 100
        run(0.1, (p1, p2, p3))
        kind, data = _next(w, "progress_stalled")
        assert (kind, data["sensor"]) == ("cleared", "p2")
        said = [e for e in list(w.events.queue) if e[2].get("condition") == "progress_stalled"]
        assert said == [], said  # p1 and p3 never stalled
    finally:
        box.close()


def test_a_box_waits_for_its_deadline_only_while_its_stamps_can_be_trusted(watched):
    """Four boxes, each a counter under a 100 ms deadline written every 5 ms: one
    stamped (StampedProgress.tick), one plain (Progress.tick: no stamp), one stamps 10 s
    ahead and one stamps at boot. Only the honest box is read lazily (once near each deadline);
    the others are polled, and their stamps neither stall a moving counter early nor
    hide a stopped one: each stop is pushed once, after its deadline."""
    from backdoors.sensors import Region, SensorBox, abi

    w = watched
    stamps = {"honest": True, "unstamped": False,
              "ahead": lambda: time.monotonic_ns() + 10**10, "boot": lambda: 1}
    boxes, writers, regions = {}, {}, []
    try:
        for name, stamp in stamps.items():
            box = boxes[name] = SensorBox.create(name)
            counter = box.progress("p", deadline=0.1, stamped=stamp is True)
            if isinstance(stamp, bool):
                writers[name] = counter.tick
            else:
                region = Region(box.fd, writable=True)
                regions.append(region)
                value_at = abi.slot_offset(0) + abi.SLOT_OFF_VALUE
                moved_at = abi.slot_offset(0) + abi.SLOT_OFF_MOVED_NS

                def tick(region=region, stamp=stamp, n=[0]):  # noqa: B006 - its count
                    n[0] += 1
                    region.write(moved_at, stamp().to_bytes(8, "little"))
                    region.write(value_at, n[0].to_bytes(8, "little"))
                writers[name] = tick
            w.watcher.regions.keep("n0", name, "sensorbox", os.dup(box.fd), os.getpid())
        end = time.monotonic() + 0.8
        while time.monotonic() < end:
            for tick in writers.values():
                tick()
            time.sleep(0.005)
        watched_boxes = {key[0]: b for key, b in w.watcher._nodes["n0"].boxes.items()}
        assert {name: b.lazy for name, b in watched_boxes.items()} == {
            "honest": True, "unstamped": False, "ahead": False, "boot": False}
        said = [e for e in list(w.events.queue) if e[2].get("condition") == "progress_stalled"]
        assert said == [], said  # none stalled while moving
        stalls = {}
        while len(stalls) < 4:
            kind, data = _next(w, "progress_stalled")
            assert kind == "violation" and data["box"] not in stalls
            stalls[data["box"]] = data["unchanged_ms"]
        assert all(ms >= 100 for ms in stalls.values()), stalls
    finally:
        for region in regions:
            region.close()
        for box in boxes.values():
            box.close()


TICKER = """
import os, sys, time
from backdoors.sensors import SensorBox
os.sched_setaffinity(0, {0})
box = SensorBox.create("starved")
progress = box.progress("progress", deadline=0.1)
print(box.fd, flush=True)
while True:
    progress.tick()
    time.sleep(0.005)
"""

RT_HOG = """
import os, time
os.sched_setaffinity(0, {0})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
end = time.monotonic() + 0.6
while time.monotonic() < end:
    pass
"""


def test_a_node_denied_the_cpu_is_not_hung_but_a_stopped_one_is(watched):
    """A real-time hog on the CPU the node's only process is pinned to takes the CPU from
    it for 600 ms, six times its deadline: the node could not run (cpu.pressure "full"),
    so its deadline waits, for the watcher and for a poll's reply alike (which counts
    the starvation up to its own read, not the watcher's last judgement); the same
    process stopped (SIGSTOP: not runnable) stalls."""
    w = watched
    ticker = subprocess.Popen([sys.executable, "-c", TICKER], stdout=subprocess.PIPE, text=True)
    try:
        w.cg.attach(ticker.pid)
        box_fd = int(ticker.stdout.readline())
        fd = os.open(f"/proc/{ticker.pid}/fd/{box_fd}", os.O_RDWR)
        w.watcher.regions.keep("n0", "starved", "sensorbox", fd, ticker.pid)
        time.sleep(0.3)  # the watcher follows it ticking
        polled, starved = [], 0.0
        with w.watcher.regions.use_all("n0", "sensorbox") as entries:
            (entry,) = entries
            hog = subprocess.Popen([sys.executable, "-c", RT_HOG])
            while hog.poll() is None:  # polls, as the sensors op's replies would say it
                seen = w.rt.tracking.observe((entry.name, entry.registered_at),
                                             read_consistent(entry.region), time.monotonic())
                polled.append(seen.unchanged["progress"])
                starved = max(starved, seen.starved.get("progress", 0.0))
                time.sleep(0.002)
        assert hog.returncode == 0
        # the stretch a poll counts past half the deadline is the node's own time (none)
        assert max(polled) <= 0.05 + 0.025, str(polled)  # + one starvation sample's period
        assert starved >= 0.3  # and the reply says how much it took off (a monitor's
        # own stretch, polled, is at least as long: agent/protocol.py, SensorsReply)
        time.sleep(0.3)
        said = [e for e in list(w.events.queue) if e[2].get("condition") == "progress_stalled"]
        assert said == [], said
        os.kill(ticker.pid, signal.SIGSTOP)
        kind, data = _next(w, "progress_stalled", timeout=10)
        assert kind == "violation" and data["box"] == "starved"
    finally:
        ticker.kill()
        ticker.wait()


SPIN = "import os, sys\nos.read(int(sys.argv[1]), 1)\nwhile True:\n    pass\n"


@pytest.mark.parametrize("watched", [KernelSensorLimits(psi_triggers=("cpu",), psi_cpu_some=50.0)],
                         indirect=True, ids=["cpu-trigger-50pct"])
def test_cpu_pressure_is_pushed_from_a_psi_trigger(watched):
    """Two busy loops on one CPU in the node: one of them always waits (cpu "some" near
    100 %). The kernel's PSI trigger at 50 % of a 2 s window wakes the watcher, which
    pushes it once, and says it cleared once the loops are gone."""
    w = watched
    r, wr = os.pipe()
    spinners = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", SPIN, str(r)],
                                 pass_fds=[r]) for _ in range(2)]
    try:
        for p in spinners:
            w.cg.attach(p.pid)
        os.write(wr, b"xx")  # they spin only once inside the node
        kind, data = _next(w, "psi_cpu", timeout=30)
        assert kind == "violation" and data["sensor"] == "psi_cpu_some"
        assert data["trigger"] is True and data["value"] == data["max"] == 50.0
        assert data["window_s"] == 2.0
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        os.close(r)
        os.close(wr)
    kind, data = _next(w, "psi_cpu", timeout=30)
    assert kind == "cleared"  # said once while it lasted, then cleared


THRASH = """import os, sys
os.read(int(sys.argv[1]), 1)
keep = bytearray(36 << 20)  # most of the node's 48 MiB: the file's pages cannot all stay
for i in range(0, len(keep), 4096):
    keep[i] = 1
while True:
    with open(sys.argv[2], "rb") as f:
        while f.read(1 << 20):
            pass
"""


@pytest.mark.parametrize("watched", [KernelSensorLimits(psi_memory_some=10.0)], indirect=True,
                         ids=["memory-trigger-10pct"])
def test_memory_pressure_is_pushed_from_a_psi_trigger(watched, tmp_path):
    """A process of the node holds most of its memory limit and reads a file larger than
    the rest, again and again: its reads wait on reclaim and refaults (memory "some",
    about 30 % of the time here). The default trigger (memory) at 10 % of 2 s fires."""
    w = watched
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(80):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read (charged) anew
    r, wr = os.pipe()
    reader = subprocess.Popen([sys.executable, "-c", THRASH, str(r), str(big)], pass_fds=[r])
    try:
        w.cg.attach(reader.pid)
        os.write(wr, b"x")
        kind, data = _next(w, "psi_memory", timeout=30)
        assert kind == "violation" and data["sensor"] == "psi_memory_some"
        assert data["trigger"] is True and data["value"] == data["max"] == 10.0
    finally:
        reader.kill()
        reader.wait()
        os.close(r)
        os.close(wr)
    kind, _ = _next(w, "psi_memory", timeout=30)
    assert kind == "cleared"

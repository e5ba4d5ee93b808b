"""Detection where the facts are: the agent judges its nodes itself and pushes violations.

One thread (`bd-agent-watch`) watches every node. It waits in epoll on what the kernel
notifies, and wakes on a timer only for what is a memory load:

- progress counters: a tick reads the progress counters of the nodes' Sensor Boxes (a
  box's counters with their stamps in one call, a 64-bit load each, from the boxes
  listed when the registrations change; a box is parsed again only when its layout
  generation changes), notes when each last moved, and judges a stall with the
  monitor's judgement (`sensors.judgement`), counter by counter only where one moved
  or a deadline passed. No syscall per node per tick. A counter's move is timed by its
  stamp (the slot's moved_ns, sensors.StampedProgress and the C writer's bd_sb_tick)
  when the stamp lies between the read before, which saw the old value, and this one;
  else by this read (later than true: a stall is then judged late, never early). A box
  whose counters' last moves were all so timed, none stalled, is *lazy*: a tick reads it
  only when a deadline of it falls within LAZY_EARLY_S; while every box is lazy the
  watcher wakes every LAZY_TICK_S (25 ms, for the periodic reads below) or at the next
  deadline, where others keep it ticking every `watch_period_ms` (5 ms), since an
  unstamped move is seen only by polling. A hostile stamp (ahead, behind, zero) only
  makes its own box polled.
- deaths: a pidfd of every process that registered a Sensor Box (EPOLLIN at its exit).
- link state: an rtnetlink socket per node netns bound to the link group
  (`net.links.LinkEvents`); on a message, one `LinkWatch.up()` ioctl says the state.
- frozen state: the v2 freezer's `cgroup.events` (EPOLLPRI, `nodes.notify`). The v1
  freezer notifies nothing: its state is read every FROZEN_READ_S.
- OOM kills: the memory controller's OOM notification (v1 eventfd on
  memory.oom_control, v2 memory.events); the count is read at the wake-up and, since a
  v1 wake-up precedes the kill, again on each tick for OOM_SETTLE_S after it.
- refused forks: pids.events' "max" count, which nothing notifies on a v1 hierarchy,
  is read every FORKS_READ_S (one pread of a kept-open file): a fork bomb against the
  pids limit is pushed within that, not at the sampler's next read and a poll after it.
- memory use: a usage threshold (v1, `nodes.notify.MemoryThreshold`) at the kernel box's
  `memory_mb` max (`memory_high_pct` of the node's memory limit): the kernel wakes the
  watcher when the usage crosses it, not the sampler's next read and a poll after it.
- pressure: a PSI trigger (`nodes.notify.PressureTrigger`) on each resource of the
  kernel box's `psi_triggers` (default: memory), at its `psi_*_some` max as a share of
  `psi_window_s`: the kernel wakes the watcher when the node's tasks stalled that long
  in a window, seconds before the 10 s average the sampler reads would get there.

Every SLOW_S it also reads each node's link, frozen state, OOM count and memory use as a
fallback (a notification source that could not be opened, a lease that ended with the
node still frozen), and moves the memory threshold after a new memory limit: a slow
poll, the way the monitor's poll backs its events.

A node denied the CPU is not hung: the deadline counts only time the node could run.
While a box's node has counters, its v2 `cpu.pressure` "full" total (time during which
the node's runnable tasks all waited for a CPU, none running: a host saturated from
outside the node, not a busy loop inside it) is sampled every PSI_SAMPLE_S while it
moves (every PSI_IDLE_SAMPLE_S while it stands still); when a counter passes its
deadline, the time the node was so starved since the counter last moved is added to
its deadline (`excused`), up to MAX_EXCUSE_S per stall. A stall
published after an excuse says `starved_ms`. Measured beside `stress-ng --cpu 2` on two
cores, the lab's services waited 100 to 450 ms on the run queue with their process
getting no CPU at all: a hang at a 200 ms deadline, fencing a healthy node, before this.

The death of a registrant is published at once: each progress counter of its boxes is
published as stalled (`reason` "died"), rather than at its deadline, and is not
published again when the deadline passes. A registrant already dead when first seen (a
box taken back after an agent restart) is left to its deadline, and so is one that dies
holding sessions: its death is the event "owner_died" (agent/owners.py), which a
server-died rule answers by re-adopting them, and a stall pushed at the same moment
must not let a hang rule take the node first. The exit status is not known: the agent
is not the service's parent.

A condition that begins is published once (event "violation", agent.events) and once
more when it ends ("cleared"); nothing is repeated while it lasts. A node frozen under a
lease (the agent's own lock, asked by a monitor) is not a violation, and stalls that begin
while it is held are not published (the lock stops progress on purpose). Each violation's
`detector` names the monitor's detector kind that judges it, with the facts it judges:

- progress_stalled: box, sensor, value, unchanged_ms, deadline_ms, onset (Unix time),
  owner_pid (the box's registrant, host pid); for a dead registrant also reason "died"
  and died (Unix time), unchanged_ms then being below the deadline; starved_ms when the
  deadline was extended for CPU starvation;
- level_out_of_bounds: box "kernel", sensor "link_up", value 0, min 0.5 (link down);
- node_frozen: the cgroup frozen by nobody's lock;
- pressure_over_rate (condition "oom_kill"): box "kernel", sensor "oom_kills", value (the
  count), events (kills the watcher saw in the sensor's window), max_events, window_s,
  onset: more kills in the window than the sensor allows (by default: any), the moment
  the count rises; cleared once the window holds no more than that.
- pressure_over_rate (condition "fork_failures"): box "kernel", sensor "fork_failures",
  value (the count), events, max_events, window_s (1), onset, as for OOM kills.
- level_out_of_bounds (condition "memory_high"): box "kernel", sensor "memory_mb", value
  (MiB, at the wake-up), max (the threshold, MiB), onset; cleared once below it.
- level_out_of_bounds (condition "psi_<resource>"): box "kernel", sensor
  "psi_<resource>_some", value and max (the trigger's share, %: the node stalled at
  least that share of the window), window_s, trigger true, onset; cleared once the
  trigger has not fired for PSI_CLEAR_WINDOWS windows.

What the watcher saw of the counters also feeds the `sensors` reply's
`progress_unchanged_s` (agent/tracking.py), so a poll judges a stall as early as an event.
"""

from __future__ import annotations

import logging
import math
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BackdoorsError, SensorBoxError
from ..net.links import LinkEvents
from ..nodes.cgfs import Polled
from ..nodes.notify import FrozenNotifier, MemoryThreshold, OomNotifier, PressureTrigger
from ..sensors import GUEST_BOX, SensorType, abi, over_rate, parse_box, read_consistent, stalled
from .events import EventBudget
from .sampler import FORK_WINDOW_S, OOM_WINDOW_S
from .served import NodeRuntime
from .tracking import Key

log = logging.getLogger("backdoors.agent")

SLOW_S = 1.0  # every node's link, frozen state and OOM count read again (fallback)
FROZEN_READ_S = 0.05  # the v1 freezer's state, which nothing notifies, is read this often
OOM_SETTLE_S = 0.5  # after an OOM notification, the count is read on every tick this long
#: pids.events, whose "max" count of refused forks notifies nothing on a v1 hierarchy
#: (checked on 6.18: neither poll nor inotify wakes), is read this often: one pread of a
#: kept-open file, parsed only when it changed, ~1 us (cgfs.Polled)
FORKS_READ_S = 0.025
RETRY_S = 1.0  # a box that did not parse is tried again after this
#: What one tick does for one node at most: a node's root owns its boxes' memory and can
#: change every layout on every tick (a 4,096-sensor box takes ~16-30 ms to parse), and
#: keep 64 x 4,096 counters; the watch thread is every node's. Boxes beyond are read on
#: the next ticks, in turn.
PARSES_PER_TICK = 1
#: And a box is parsed again no sooner than PARSE_SPACING times its last parse took after
#: it (a box whose layout changes on every tick takes at most 1/PARSE_SPACING of the
#: thread, not all of it: every node's detection waits behind a parse). A layout being
#: changed (an odd generation: a writer mid-update) is not waited for but looked at
#: again at the next tick; the old counters wait with it.
PARSE_SPACING = 20
COUNTERS_PER_TICK = 4096
#: Progress events ("violation", "cleared") a node may push at once, and then per second:
#: each counter that stalls and moves again is two events, and a node's root can toggle
#: thousands, pushing every other node's out of the bus's history and the monitors'
#: queues. Beyond, they are counted and said once a second ("events_suppressed" {count}):
#: the monitors' polls judge that node meanwhile.
EVENTS_BURST = 256
EVENTS_PER_S = 64.0
PSI_SAMPLE_S = 0.025  # a node's cpu.pressure "full" total is sampled this often
#: and never more often. The kernel weighs each CPU's share of a read's interval by the
#: cgroup's non-idle time on it in whole jiffies (4 ms here): a read of any of the
#: cgroup's *.pressure files within a jiffy of the last adds nothing and loses that
#: interval (measured: read every 2 ms, the total stayed still through 600 ms of
#: starvation; every 4 ms and up, it counted all of it). Others' reads (the sampler's,
#: the node's own) can still take a few ms away: the excuse errs short there.
PSI_MIN_GAP_S = 0.0125
#: PSI_SAMPLE_S applies while the total moved in the last PSI_KEEP_S; else it is sampled
#: this often: the total stands still while the node is not starved, and each sample is
#: a read (two cores, 32 nodes: 1,280 reads a second at PSI_SAMPLE_S). The first samples
#: of a starvation are this far apart: an excuse may count up to that much starvation
#: from before the counter's last move (errs long: a later detection, never a false one)
PSI_IDLE_SAMPLE_S = 0.25
PSI_KEEP_S = 3.0  # samples are kept this long (a longer stall's excuse counts from the oldest)
MAX_EXCUSE_S = 1.0  # a stall is excused for CPU starvation this long at most
PSI_CLEAR_WINDOWS = 2.5  # a PSI trigger silent this many windows: its pressure has ended
_GEN_WORD = abi.OFF_GENERATION // 8
#: With every progress counter of every box stamped (and no stall, no OOM settling), the
#: watcher wakes this often, for the reads that stay periodic (failed forks, a v1
#: freezer, CPU starvation samples), or at the next deadline if sooner; a tick reads a
#: lazy box only when a deadline of it falls within the next LAZY_EARLY_S.
LAZY_TICK_S = FORKS_READ_S
LAZY_EARLY_S = LAZY_TICK_S
MiB = 1 << 20

Owner = tuple[int, float]  # a registrant: (host pid, start time)


@dataclass(eq=False)
class _Counter:
    name: str
    word_index: int  # of its value word
    deadline: float
    word: int
    changed_at: float  # time.monotonic() the watcher saw it move (or first saw it)
    onset_wall: float
    stalled: bool = False
    excused: float = 0.0  # seconds of this stretch the node was starved of CPU
    stamped: bool = False  # its last move came with a stamp the watcher could trust

    @property
    def due(self) -> float:
        return self.changed_at + self.deadline + self.excused


@dataclass(eq=False)
class _Box:
    node: _Node
    key: Key
    entry: object  # the borrowed regions.Entry
    owner: Owner
    generation: int = -1
    counters: list[_Counter] = field(default_factory=list)
    retry_at: float = 0.0
    parse_after: float = 0.0  # the next parse no sooner (PARSE_SPACING)
    dead: bool = False  # its registrant died and its stalls were published: final
    read_at: float = 0.0  # the watcher's last read (agent/tracking.py reads it)
    unpack: Callable | None = None  # the counters' words in one call (set by _parse)
    words: tuple[int, ...] | None = None  # as last read: (value, moved_ns) per counter
    due: float = -math.inf  # the earliest deadline of a counter not stalled (inf: none)
    lazy: bool = False  # read only near `due` (every counter stamped, none stalled)

    def replan(self) -> None:
        """The earliest moment a counter of the box could stall, and whether the box
        can wait for it: a stalled counter is read every tick (its end is not stamped
        ahead), and so is an unstamped one (its moves are seen only by polling)."""
        self.due = math.inf if self.dead else min(
            (c.due for c in self.counters if not c.stalled), default=math.inf)
        self.lazy = self.dead or (self.entry.region.words is not None and all(
            c.stamped and not c.stalled for c in self.counters))

    def resting(self, words, now: float) -> bool:
        """Whether a tick leaves the box unread: lazy, its layout unchanged, and no
        deadline within the next LAZY_EARLY_S (one word load)."""
        return (self.lazy and now < self.due - LAZY_EARLY_S
                and words[_GEN_WORD] == self.generation)

    def excuse(self, since: float, now: float) -> float:
        """Seconds from `since` to `now` (monotonic) its node was starved of CPU, up to
        MAX_EXCUSE_S; any thread may ask (agent/tracking.py, for a poll's reply)."""
        return min(self.node.starved_since(since, now), MAX_EXCUSE_S)


@dataclass(eq=False)
class _Rate:
    """A kernel event counter (OOM kills, failed forks) and what it rose by in the last
    `window_s`: the pressure sensor's events per window, judged as the monitor does."""

    window_s: float
    count: int | None = None  # at the last read
    rises: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, by)
    events: int = 0  # in the window
    violated: bool = False

    def update(self, count: int, now: float) -> int:
        """Take a reading; the events in the window ending `now`."""
        if self.count is not None and count > self.count:
            self.rises.append((now, count - self.count))
            self.events += count - self.count
        self.count = count
        while self.rises and self.rises[0][0] <= now - self.window_s:
            self.events -= self.rises.popleft()[1]
        return self.events


@dataclass(eq=False)
class _Node:
    rt: NodeRuntime
    boxes: dict[Key, _Box] = field(default_factory=dict)
    entries: list = field(default_factory=list)  # borrowed from the region table
    links: LinkEvents | None = None
    link_down: bool = False
    freezer: FrozenNotifier | None = None
    frozen: bool = False
    frozen_due: float = 0.0  # next read of a v1 freezer's state
    oom: OomNotifier | None = None
    oom_kills: _Rate = field(default_factory=lambda: _Rate(OOM_WINDOW_S))
    fork_failures: _Rate = field(default_factory=lambda: _Rate(FORK_WINDOW_S))
    forks_due: float = 0.0  # next read of the failed-fork count (inf: no pids controller)
    oom_settle_until: float = 0.0  # read the count on every tick until then
    mem: MemoryThreshold | None = None
    mem_at: int | None = None  # the memory threshold wanted (bytes; None: no limit)
    mem_over: bool = False
    owners: dict[Owner, int] = field(default_factory=dict)  # -> its pidfd
    dead: set[Owner] = field(default_factory=set)  # registrants seen dead
    starved: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, full_us)
    starved_due: float = 0.0  # next sample
    starved_moved: float = -math.inf  # when the total was last seen to move
    psi: dict[str, PressureTrigger] = field(default_factory=dict)  # resource -> its trigger
    psi_fired: dict[str, float] = field(default_factory=dict)  # -> last wake (monotonic), while over
    order: list[_Box] = field(default_factory=list)  # its boxes, as a tick visits them
    cursor: int = 0  # where the next tick starts in `order`
    starved_lock: threading.Lock = field(default_factory=threading.Lock)  # the watcher's
    # thread samples `starved`; a poll's reply reads it too (_Box.excuse)
    forks_file: Polled[int] | None = None  # pids.events (set by Watcher._open_sources)
    full_file: Polled[int] | None = None  # cpu.pressure, read under starved_lock

    def quiet(self, now: float) -> bool:
        """Whether a tick finds nothing to do on the node: every box's layout and counters
        as last read (one C call for a box's counters), no deadline passed, no more than
        COUNTERS_PER_TICK counters. Else the tick reads the boxes one by one."""
        counted = 0
        try:
            for box in self.order:
                words = box.entry.region.words
                if words is not None and box.resting(words, now):
                    continue
                if (words is None or box.retry_at or now > box.due
                        or words[_GEN_WORD] != box.generation):
                    return False
                counted += len(box.counters)
                if counted > COUNTERS_PER_TICK or box.unpack(words) != box.words:
                    return False
                box.read_at = now
        except Exception:  # noqa: BLE001 - the box by box read says what is wrong
            return False
        return True

    def sample_starved(self, now: float) -> None:
        """Sample the node's cpu.pressure "full" total (nothing where PSI is missing), if
        the last sample is PSI_MIN_GAP_S old."""
        with self.starved_lock:  # read and stamped in turn: the samples stay in order
            if self.starved and now - self.starved[-1][0] < PSI_MIN_GAP_S:
                return
            total = self._cpu_full_us()
            if total is None:
                self.starved_due = now + PSI_SAMPLE_S
                return
            if not self.starved or total != self.starved[-1][1]:
                self.starved_moved = now
            self.starved_due = now + (PSI_SAMPLE_S if now - self.starved_moved < PSI_KEEP_S
                                      else PSI_IDLE_SAMPLE_S)
            self.starved.append((now, total))
            while self.starved and self.starved[0][0] < now - PSI_KEEP_S:
                self.starved.popleft()

    def _cpu_full_us(self) -> int | None:
        try:
            return self.full_file.read() if self.full_file is not None else None
        except (BackdoorsError, KeyError, ValueError):
            return None  # PSI off, or unreadable for now

    def starved_since(self, since: float, now: float) -> float:
        """Seconds from `since` to `now` during which the node could not run (from the
        last sample at or before `since`, else the oldest; 0 without samples)."""
        self.sample_starved(now)
        with self.starved_lock:
            if not self.starved:
                return 0.0
            base = self.starved[0][1]
            for t, total in self.starved:
                if t > since:
                    break
                base = total
            return max(0, self.starved[-1][1] - base) / 1e6


class Watcher:
    """Watches every node on one thread (`start`, `stop`); `publish(kind, node, **data)`
    pushes an event; `held(node)` says whether a lease holds the node locked;
    `owner_died(node, pid)` is told of a registrant's death and says whether it held
    sessions of the node (the owner watch has then pushed "owner_died"). `slow_s`: the
    fallback reads' period."""

    def __init__(self, nodes: dict[str, NodeRuntime], regions, *, period_s: float,
                 publish: Callable[..., int], held: Callable[[str], bool],
                 owner_died: Callable[[str, int], bool] = lambda node, pid: False,
                 slow_s: float = SLOW_S):
        self.nodes, self.regions, self.period, self.slow_s = nodes, regions, period_s, slow_s
        self.publish, self.held, self.owner_died = publish, held, owner_died
        self._nodes = {name: _Node(rt) for name, rt in nodes.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bd-agent-watch", daemon=True)
        self.errors = 0
        self._tick_failed_at = -math.inf
        self._closed = False
        self._ep = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._handlers: dict[int, Callable[[], None]] = {}  # fd -> what its wake-up means
        self._sources: dict[int, tuple[_Node, str]] = {}  # fd -> (node, its source's attr)
        self._version = -1  # of the region table when the box list was built
        self._counted: list[_Node] = []  # nodes with boxes: their CPU starvation is sampled
        self._read_frozen: list[_Node] = []  # nodes whose frozen state a tick reads (v1)
        self._settling: set[_Node] = set()  # nodes just notified of an OOM
        self._pressed: set[_Node] = set()  # nodes over a PSI trigger: a tick sees it end
        self._budgets: dict[str, EventBudget] = {}  # per node: its progress events

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(2.0)
        if not self._thread.is_alive():
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for n in self._nodes.values():
            for fd in n.owners.values():
                os.close(fd)
            n.owners.clear()
            for src in (n.links, n.freezer, n.oom, n.mem, *n.psi.values()):
                if src is not None:
                    src.close()
            n.links = n.freezer = n.oom = n.mem = None
            with n.starved_lock:  # a poll's reply may sample it still
                for file in (n.forks_file, n.full_file):
                    if file is not None:
                        file.close()
                n.forks_file = n.full_file = None
            n.psi.clear()
            self.regions.give_back(n.entries)
            n.entries = []
        self._handlers.clear()
        self._sources.clear()
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        for n in self._nodes.values():
            try:
                self._open_sources(n)
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                self.errors += 1
                log.warning("node %s: watch failed: %s", n.rt.name, e)
        next_tick = next_slow = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self.regions.box_version != self._version:
                self._replan(now)
            if now >= next_tick:
                try:
                    self._tick(now)
                except Exception as e:  # noqa: BLE001 - the watch must survive anything
                    self.errors += 1
                    if now - self._tick_failed_at >= 1.0:  # said once a second at most
                        self._tick_failed_at = now
                        log.warning("watch: a tick failed (%d errors so far): %r",
                                    self.errors, e)
                next_tick = self._next_tick(next_tick, now)
            if now >= next_slow:
                self._slow(now)
                next_slow = now + self.slow_s
            delay = max(0.0, min(next_tick, next_slow) - time.monotonic())
            try:
                ready = self._ep.poll(delay)
            except InterruptedError:
                continue
            for fd, _ in ready:
                handler = self._handlers.get(fd)
                if handler is None:
                    continue  # the stop pipe, or a source closed meanwhile
                try:
                    handler()
                except Exception as e:  # noqa: BLE001 - the watch must survive anything
                    self.errors += 1
                    self._drop(fd, e)

    def _watch(self, fd: int, mask: int, handler: Callable[[], None]) -> None:
        self._ep.register(fd, mask)
        self._handlers[fd] = handler

    def _drop(self, fd: int, why: Exception) -> None:
        """A notification source that failed is closed (it could wake the loop forever);
        the slow reads stand in for it."""
        node, attr = self._sources.pop(fd, (None, ""))
        if node is None:
            log.warning("watch: handling a notification failed: %s", why)
            return
        self._unwatch(fd)
        if attr.startswith("psi:"):  # kept, closed, to say its pressure cleared
            node.psi[attr[4:]].close()
        else:
            getattr(node, attr).close()
            setattr(node, attr, None)
        if attr == "freezer":
            self._read_frozen.append(node)
        log.warning("node %s: %s notifications failed (%s): read every %g s from now on",
                    node.rt.name, attr, why, self.slow_s)

    def _unwatch(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except OSError:
            pass

    def _open_sources(self, n: _Node) -> None:
        """The node's notifications, and the files a tick reads; what cannot be opened is
        left to the slow reads."""
        rt = n.rt
        n.forks_file = rt.node.cgroup.polled_fork_failures()
        with n.starved_lock:
            n.full_file = rt.node.cgroup.polled_cpu_full_us()
        if rt.sampler.link is not None:
            try:
                n.links = LinkEvents(rt.sampler.link.ns)
                self._watch(n.links.fd, select.EPOLLIN, lambda: self._link(n, True))
                self._sources[n.links.fd] = (n, "links")
            except (OSError, BackdoorsError) as e:
                log.warning("node %s: link changes not notified (%s): read every %g s",
                            rt.name, e, self.slow_s)
        for attr, opener, handler in (("freezer", FrozenNotifier.open, self._frozen_changed),
                                      ("oom", OomNotifier.open, self._oom_notified)):
            try:
                src = opener(rt.node.cgroup)
            except (OSError, BackdoorsError) as e:
                log.warning("node %s: %s not notified (%s): read every %g s", rt.name, attr,
                            e, self.slow_s)
                continue
            setattr(n, attr, src)
            if src is not None:
                self._watch(src.fd, src.mask, lambda n=n, h=handler: h(n))
                self._sources[src.fd] = (n, attr)
        if n.freezer is None:
            self._read_frozen.append(n)
        self._open_triggers(n)
        now = time.monotonic()
        self._link(n, False)
        self._frozen(n, None)
        self._oom(n, now)
        self._memory(n, moved=True)

    def _open_triggers(self, n: _Node) -> None:
        """The node's PSI triggers; one that cannot be set leaves that resource to the
        sampler's 10 s average (read by every poll)."""
        limits = n.rt.sampler.limits
        for resource in limits.psi_triggers:
            share = getattr(limits, f"psi_{resource}_some") / 100
            try:
                trigger = PressureTrigger.open(n.rt.node.cgroup, resource, share,
                                               limits.psi_window_s)
            except (OSError, BackdoorsError) as e:
                log.warning("node %s: no PSI trigger on %s (%s): its 10 s average is "
                            "judged instead", n.rt.name, resource, e)
                continue
            if trigger is None:
                continue
            n.psi[resource] = trigger
            self._watch(trigger.fd, trigger.mask, lambda n=n, t=trigger: self._psi(n, t))
            self._sources[trigger.fd] = (n, f"psi:{resource}")

    # -- what a tick reads: progress counters ----------------------------------------

    def _replan(self, now: float) -> None:
        """The registrations changed: borrow every node's boxes again, follow new
        registrants, drop what was unregistered."""
        self._version = self.regions.box_version
        for n in self._nodes.values():
            try:
                self._replan_node(n, now)
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                self.errors += 1
                log.warning("node %s: watch failed: %s", n.rt.name, e)
        for n in self._nodes.values():
            n.order = list(n.boxes.values())
            n.cursor = n.cursor % len(n.order) if n.order else 0
        self._counted = [n for n in self._nodes.values() if n.boxes]

    def _replan_node(self, n: _Node, now: float) -> None:
        # the registrants' boxes, and a VM node's guest kernel box (owned by its QEMU)
        entries = [e for e in self.regions.borrow_all(n.rt.name, "sensorbox")
                   if not e.internal or e.name == GUEST_BOX]
        old, n.entries = n.entries, entries
        try:
            keys = set()
            for entry in entries:
                key = (entry.name, entry.registered_at)
                keys.add(key)
                box = n.boxes.get(key)
                if box is None:
                    box = n.boxes[key] = _Box(n, key, entry, (entry.pid, entry.start_time))
                    n.rt.tracking.watched(key, box)
                    self._follow(n, entry)
                box.entry = entry
            gone = n.boxes.keys() - keys
            for key in gone:  # unregistered: its stalls end with it
                n.rt.tracking.unwatched(key)
                for c in n.boxes.pop(key).counters:
                    if c.stalled:
                        self._say(n.rt.name, False, detector="progress_stalled",
                                  condition="progress_stalled", box=key[0], sensor=c.name,
                                  why="box unregistered")
            if gone:  # registrants with no box left are not followed any more
                owners = {b.owner for b in n.boxes.values()}
                for owner in n.owners.keys() - owners:
                    fd = n.owners.pop(owner)
                    self._unwatch(fd)
                    os.close(fd)
                n.dead &= owners
        finally:
            self.regions.give_back(old)

    def _tick(self, now: float) -> None:
        for n in self._counted:
            if now >= n.starved_due:
                n.sample_starved(now)
            if not n.quiet(now):
                self._tick_node(n, now)
        for n in list(self._settling):
            if now >= n.oom_settle_until:
                self._settling.discard(n)
            self._oom(n, now)
        for n in list(self._pressed):
            self._psi_ended(n, now)
        for n in self._nodes.values():
            if now >= n.forks_due:
                self._forks(n, now)
        for budget in self._budgets.values():  # the last suppressed, once a flood ended
            if budget.suppressed:
                budget.flush(time.monotonic())
        for n in self._read_frozen:
            if now >= n.frozen_due:
                n.frozen_due = now + FROZEN_READ_S
                self._frozen(n, None)

    def _next_tick(self, last: float, now: float) -> float:
        """The next tick: a period on, while a box must be polled (one not lazy) or an OOM
        count settles; else at the next deadline of a lazy box, LAZY_TICK_S (or the
        period, if longer) on at most."""
        poll, wake = bool(self._settling), now + max(LAZY_TICK_S, self.period)
        for n in self._counted:
            for box in n.order:
                if not box.lazy:
                    poll = True
                    break
                wake = min(wake, box.due)
            if poll:
                break
        if poll:
            wake = last + self.period
        # overran, or a deadline passed but not judged a stall (a lease holds the node)
        return wake if wake > now else now + self.period

    def _tick_node(self, n: _Node, now: float) -> None:
        """Read the node's boxes from where the last tick stopped, within the budget of
        PARSES_PER_TICK layouts and about COUNTERS_PER_TICK counters."""
        parses = counters = 0
        boxes, start = n.order, n.cursor
        waiting = None  # the first box whose new layout waits: the next tick starts there
        for step in range(len(boxes)):
            at = (start + step) % len(boxes)
            if counters >= COUNTERS_PER_TICK:
                n.cursor = at if waiting is None else waiting
                return
            box = boxes[at]
            if box.retry_at and now < box.retry_at:
                continue
            words = box.entry.region.words
            if words is not None and box.resting(words, now):
                continue
            try:
                parsed = self._read_box(box, now, may_parse=parses < PARSES_PER_TICK)
                if parsed is None:
                    waiting = at if waiting is None else waiting
                    continue
                parses += parsed
                counters += len(box.counters)
            except SensorBoxError:
                parses += 1
                box.generation, box.retry_at = -1, now + RETRY_S  # the sampler says why
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                self.errors += 1
                box.retry_at = now + RETRY_S
                log.warning("node %s: watch failed: %s", box.node.rt.name, e)
        n.cursor = start if waiting is None else waiting

    def _read_box(self, box: _Box, now: float, may_parse: bool = True) -> bool | None:
        """Read the box's counters (parsing its layout first if it changed); whether it
        was parsed, or None if its new layout had to wait (`may_parse` false)."""
        region = box.entry.region
        words = region.words
        gen = words[_GEN_WORD] if words is not None else region.load_word(abi.OFF_GENERATION)
        parsed = gen != box.generation
        if parsed:
            if not may_parse or gen & 1 or now < box.parse_after:
                return None  # a later tick parses it; its old counters wait with it
            began = time.monotonic()
            try:
                self._parse(box, region, now)
            finally:
                box.parse_after = now + PARSE_SPACING * (time.monotonic() - began)
        if words is not None:
            values = box.unpack(words)
        else:
            values = tuple(region.load_word((c.word_index + i) * 8)
                           for c in box.counters for i in (0, abi.STAMP_WORDS))
        seen = time.monotonic()  # no honest stamp is later than this
        box.words = values
        for i, c in enumerate(box.counters):
            word = values[2 * i]
            if word != c.word:
                if box.dead:  # a dead process's counters do not resume: a change seen now
                    c.word = word  # is its last tick, written before its death, read late
                    continue
                # when it moved: its stamp, if it lies between the last read (which saw
                # the old value) and this one; else now (later than true: never early)
                moved = values[2 * i + 1] / 1e9
                c.stamped = c.word != -1 and box.read_at < moved <= seen
                at = moved if c.stamped else now
                if c.stalled:
                    c.stalled = False
                    self._say(box.node.rt.name, False, detector="progress_stalled",
                              condition="progress_stalled", box=box.key[0], sensor=c.name,
                              value=word, stalled_ms=round((at - c.changed_at) * 1000, 1))
                c.word, c.changed_at, c.excused = word, at, 0.0
                c.onset_wall = time.time() - (seen - at)
            elif not c.stalled and now > c.due and not box.dead:
                self._stall(box, c, now)
        box.replan()
        box.read_at = now
        box.retry_at = 0.0
        return parsed

    def _parse(self, box: _Box, region, now: float) -> None:
        image = parse_box(read_consistent(region))
        old = {c.name: c for c in box.counters}
        counters = []
        for s in image.sensors:
            if s.type is not SensorType.PROGRESS:
                continue
            index = (abi.slot_offset(s.id - 1) + abi.SLOT_OFF_VALUE) // 8
            c = old.get(s.name) or _Counter(s.name, index, s.threshold, -1, now, time.time())
            c.word_index, c.deadline = index, s.threshold
            counters.append(c)
        box.counters = sorted(counters, key=lambda c: c.word_index)
        box.generation = image.generation
        # the counters' value and moved_ns words in one C call, in that order: a native
        # (aligned) word each, as the memoryview of the mapped region loads them, with
        # padding ("x") between them
        fmt, at = "@", 0
        for c in box.counters:
            fmt += f"{(c.word_index - at) * 8}xQ{(abi.STAMP_WORDS - 1) * 8}xQ"
            at = c.word_index + abi.STAMP_WORDS + 1
        box.unpack = struct.Struct(fmt).unpack_from
        box.words, box.due = None, -math.inf  # the next read judges every counter

    def _stall(self, box: _Box, c: _Counter, now: float) -> None:
        unchanged = now - c.changed_at
        if not stalled(unchanged, c.deadline) or self.held(box.node.rt.name):
            return
        starved = box.excuse(c.changed_at, now)
        if starved > c.excused:  # denied the CPU meanwhile: the deadline moves on
            c.excused = starved
            if not stalled(unchanged - starved, c.deadline):
                return
        c.stalled = True
        extra = {"starved_ms": round(c.excused * 1000, 1)} if c.excused else {}
        # not rounded: a stall seen every period_s first passes a deadline that is
        # a multiple of it by microseconds, which rounding would hide
        self._say(box.node.rt.name, True, detector="progress_stalled",
                  condition="progress_stalled", box=box.key[0], sensor=c.name, value=c.word,
                  unchanged_ms=unchanged * 1000, deadline_ms=c.deadline * 1000,
                  onset=c.onset_wall, owner_pid=box.owner[0], **extra)

    # -- deaths -----------------------------------------------------------------------

    def _follow(self, n: _Node, entry) -> None:
        """Watch the registrant of `entry` for its death (once per process)."""
        owner = (entry.pid, entry.start_time)
        if owner in n.owners or owner in n.dead:
            return
        try:
            fd = os.pidfd_open(entry.pid)
        except OSError:
            n.dead.add(owner)  # already gone: its boxes stall at their deadline
            return
        if not entry.registrant_alive():  # gone, or its pid reused, before the pidfd
            os.close(fd)
            n.dead.add(owner)
            return
        n.owners[owner] = fd
        self._watch(fd, select.EPOLLIN, lambda: self._death(n, owner, fd))

    def _death(self, n: _Node, owner: Owner, fd: int) -> None:
        self._unwatch(fd)
        os.close(fd)
        if n.owners.get(owner) == fd:
            del n.owners[owner]
        self._died(n, owner)

    def _died(self, n: _Node, owner: Owner) -> None:
        """Publish every progress counter of the dead `owner`'s boxes as stalled, once."""
        rt = n.rt
        n.dead.add(owner)
        if self.held(rt.name):
            return  # stalls at the deadline: a lock's doing
        if self.owner_died(rt.name, owner[0]):
            # "owner_died" says it, pushed by now even if the owner watch's own thread has
            # not run yet: the box's stall at the deadline never reaches a monitor first
            return
        now, died = time.monotonic(), time.time()
        mine = [box for box in n.boxes.values() if box.owner == owner]
        for box in mine:
            if not box.counters:  # not parsed yet (or left for a retry): read it now
                try:
                    self._parse(box, box.entry.region, now)
                except SensorBoxError:
                    continue
            box.dead = True
            box.replan()
            for c in box.counters:
                if c.stalled:
                    continue
                c.stalled = True
                self._say(rt.name, True, detector="progress_stalled",
                          condition="progress_stalled", box=box.key[0], sensor=c.name,
                          value=c.word, unchanged_ms=(now - c.changed_at) * 1000,
                          deadline_ms=c.deadline * 1000, onset=c.onset_wall,
                          owner_pid=owner[0], reason="died", died=died)
        log.warning("node %s: process %d that registered a Sensor Box died", rt.name, owner[0])

    # -- link, frozen state, OOM kills ------------------------------------------------

    def _slow(self, now: float) -> None:
        for n in self._nodes.values():
            try:
                self._link(n, False)
                self._frozen(n, None)
                self._oom(n, now)
                self._memory(n, moved=True)
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                self.errors += 1
                log.warning("node %s: watch failed: %s", n.rt.name, e)

    def _link(self, n: _Node, notified: bool) -> None:
        if notified and n.links is not None and not n.links.changed():
            return
        link = n.rt.sampler.link
        if link is None:
            return
        down = not link.up()
        if down != n.link_down:
            n.link_down = down
            self._say(n.rt.name, down, detector="level_out_of_bounds", condition="link_down",
                      box="kernel", sensor="link_up", value=0.0 if down else 1.0, min=0.5,
                      interface=link.ifname, onset=time.time())

    def _frozen_changed(self, n: _Node) -> None:
        self._frozen(n, n.freezer.consume())

    def _frozen(self, n: _Node, frozen: bool | None) -> None:
        """Judge the node's frozen state (`frozen`: as just notified; None: read it)."""
        try:
            if frozen is None:
                frozen = n.freezer.consume() if n.freezer is not None else \
                    n.rt.node.cgroup.is_frozen()
        except (OSError, BackdoorsError):
            return  # unreadable for now: no news
        frozen = frozen and not self.held(n.rt.name)
        if frozen != n.frozen:
            n.frozen = frozen
            self._say(n.rt.name, frozen, detector="node_frozen", condition="node_frozen",
                      onset=time.time())

    def _oom_notified(self, n: _Node) -> None:
        n.oom.consume()
        now = time.monotonic()
        n.oom_settle_until = now + OOM_SETTLE_S
        self._settling.add(n)
        self._oom(n, now)

    def _oom(self, n: _Node, now: float) -> None:
        """Judge the OOM kills of the node's cgroup in the oom_kills sensor's window."""
        try:
            count = n.rt.node.cgroup.oom_kills()
        except (OSError, BackdoorsError):
            return  # unreadable for now: no news
        self._rate(n, n.oom_kills, count, now, "oom_kill", "oom_kills",
                   n.rt.sampler.limits.oom_kills_per_10s)

    def _forks(self, n: _Node, now: float) -> None:
        """Judge the node's failed forks (pids.events "max") in the fork_failures
        sensor's window: a fork bomb against the pids limit, FORKS_READ_S after it hits."""
        n.forks_due = now + FORKS_READ_S
        if n.forks_file is None:
            return  # closed
        try:
            count = n.forks_file.read()
        except (OSError, BackdoorsError):
            if n.rt.node.cgroup.layout.home("pids") is None:
                n.forks_due = math.inf  # no pids controller: no forks refused, ever
            return  # otherwise unreadable for now: no news
        self._rate(n, n.fork_failures, count, now, "fork_failures", "fork_failures",
                   n.rt.sampler.limits.fork_failures_per_s)

    def _rate(self, n: _Node, rate: _Rate, count: int, now: float, condition: str,
              sensor: str, limit: float) -> None:
        """Take a reading of an event counter and say its violation when it changes."""
        if count == rate.count and not rate.rises:
            return  # no new events and none in the window: judged "not violated" before
        events = rate.update(count, now)
        violated = over_rate(events, limit)
        if violated != rate.violated:
            rate.violated = violated
            self._say(n.rt.name, violated, detector="pressure_over_rate", condition=condition,
                      box="kernel", sensor=sensor, value=count, events=events,
                      max_events=limit, window_s=rate.window_s, onset=time.time())

    def _memory(self, n: _Node, moved: bool = False) -> None:
        """Judge the node's memory use against its threshold (`moved`: first register
        the threshold again if the memory limit changed)."""
        rt = n.rt
        try:
            if moved:
                want = rt.sampler.limits.memory_high(rt.node.cgroup.memory_limit())
                if want != n.mem_at:
                    self._threshold(n, want)
            usage = rt.node.cgroup.memory_usage() if n.mem_at is not None else 0
        except (OSError, BackdoorsError):
            return  # unreadable for now: no news
        over = n.mem_at is not None and usage > n.mem_at
        if over != n.mem_over:
            n.mem_over = over
            self._say(rt.name, over, detector="level_out_of_bounds", condition="memory_high",
                      box="kernel", sensor="memory_mb", value=usage / MiB,
                      max=(n.mem_at or 0) / MiB, onset=time.time())

    def _threshold(self, n: _Node, at: int | None) -> None:
        """Register the node's memory threshold at `at` bytes (None: none), in place of
        the one before; one that cannot be leaves it to the slow reads."""
        if n.mem is not None:
            self._unwatch(n.mem.fd)
            self._sources.pop(n.mem.fd, None)
            n.mem.close()
            n.mem = None
        n.mem_at = at
        if at is None:
            return
        try:
            n.mem = MemoryThreshold.open(n.rt.node.cgroup, at)
        except (OSError, BackdoorsError) as e:
            log.warning("node %s: memory use not notified (%s): read every %g s",
                        n.rt.name, e, self.slow_s)
            return
        if n.mem is not None:
            self._watch(n.mem.fd, n.mem.mask, lambda: self._memory_crossed(n))
            self._sources[n.mem.fd] = (n, "mem")

    def _memory_crossed(self, n: _Node) -> None:
        n.mem.consume()
        self._memory(n)

    def _psi(self, n: _Node, trigger: PressureTrigger) -> None:
        """A PSI trigger fired: the node stalled on its resource past the share."""
        trigger.consume()
        first = trigger.resource not in n.psi_fired
        n.psi_fired[trigger.resource] = time.monotonic()
        self._pressed.add(n)
        if first:
            self._say_psi(n, trigger, True)

    def _psi_ended(self, n: _Node, now: float) -> None:
        for resource, at in list(n.psi_fired.items()):
            trigger = n.psi[resource]
            if now - at > PSI_CLEAR_WINDOWS * trigger.window_s:
                del n.psi_fired[resource]
                self._say_psi(n, trigger, False)
        if not n.psi_fired:
            self._pressed.discard(n)

    def _say_psi(self, n: _Node, trigger: PressureTrigger, violated: bool) -> None:
        pct = round(trigger.share * 100, 3)
        self._say(n.rt.name, violated, detector="level_out_of_bounds",
                  condition=f"psi_{trigger.resource}", box="kernel",
                  sensor=f"psi_{trigger.resource}_some", value=pct, max=pct,
                  window_s=trigger.window_s, trigger=True, onset=time.time())

    def _say(self, node: str, violated: bool, **data) -> None:
        if data.get("detector") == "progress_stalled" and not self._budget(node).take():
            return
        self.publish("violation" if violated else "cleared", node, **data)

    def _budget(self, node: str) -> EventBudget:
        budget = self._budgets.get(node)
        if budget is None:
            budget = self._budgets[node] = EventBudget(node, self.publish, "progress",
                                                       EVENTS_BURST, EVENTS_PER_S)
        return budget

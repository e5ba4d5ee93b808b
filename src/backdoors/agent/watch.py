"""Detection where the facts are: the agent judges its nodes itself and pushes violations.

One thread (`bd-agent-watch`) wakes every `watch_period_ms` and, for every node:

- reads each progress counter of the node's Sensor Boxes (one 64-bit memory load per
  counter; the box is parsed again only when its layout generation changes), notes when
  each last moved, and judges a stall with the monitor's judgement (`sensors.judgement`);
- asks whether the node's service interface is up with carrier (one ioctl, the sampler's
  `LinkWatch`);
- every FROZEN_EVERY_S, whether the node's cgroup is frozen, and its count of OOM kills
  (memory.events oom_kill; two cgroupfs reads).

Between passes it waits in poll(2) on a pidfd of every process that registered a Sensor
Box, so the death of a registrant is seen the moment it happens (no thread per process):
each progress counter of its boxes is published at once as stalled (`reason` "died"),
rather than at its deadline, and is not published again when the deadline passes. A
registrant already dead when first seen (a box taken back after an agent restart) is left
to its deadline, and so is one that dies holding sessions: its death is the event
"owner_died" (agent/owners.py), which a server-died rule answers by re-adopting them, and
a stall pushed at the same moment must not let a hang rule take the node first. The exit
status is not known: the agent is not the service's parent.

A condition that begins is published once (event "violation", agent.events) and once
more when it ends ("cleared"); nothing is repeated while it lasts. A node frozen under a
lease (the agent's own lock, asked by a monitor) is not a violation, and stalls that begin
while it is held are not published (the lock stops progress on purpose). Each violation's
`detector` names the monitor's detector kind that judges it, with the facts it judges:

- progress_stalled: box, sensor, value, unchanged_ms, deadline_ms, onset (Unix time),
  owner_pid (the box's registrant, host pid); for a dead registrant also reason "died"
  and died (Unix time), unchanged_ms then being below the deadline;
- level_out_of_bounds: box "kernel", sensor "link_up", value 0, min 0.5 (link down);
- node_frozen: the cgroup frozen by nobody's lock;
- pressure_over_rate (condition "oom_kill"): box "kernel", sensor "oom_kills", value (the
  count), events (kills the watcher saw in the sensor's window), max_events, window_s,
  onset: more kills in the window than the sensor allows (by default: any), the moment
  the count rises; cleared once the window holds no more than that.

What the watcher saw of the counters also feeds the `sensors` reply's
`progress_unchanged_s` (agent/tracking.py), so a poll judges a stall as early as an event.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BackdoorsError, SensorBoxError
from ..sensors import SensorType, abi, over_rate, parse_box, read_consistent, stalled
from .sampler import OOM_WINDOW_S
from .served import NodeRuntime
from .tracking import Key

log = logging.getLogger("backdoors.agent")

FROZEN_EVERY_S = 0.01
RETRY_S = 1.0  # a box that did not parse is tried again after this


@dataclass
class _Counter:
    name: str
    offset: int  # of its value word
    deadline: float
    word: int
    changed_at: float  # time.monotonic() the watcher saw it move (or first saw it)
    onset_wall: float
    stalled: bool = False


Owner = tuple[int, float]  # a registrant: (host pid, start time)


@dataclass
class _Box:
    owner: Owner
    generation: int = -1
    counters: list[_Counter] = field(default_factory=list)
    retry_at: float = 0.0
    dead: bool = False  # its registrant died and its stalls were published: final


@dataclass
class _NodeState:
    boxes: dict[Key, _Box] = field(default_factory=dict)
    link_down: bool = False
    frozen: bool = False
    frozen_due: float = 0.0
    oom_count: int | None = None  # memory.events oom_kill at the last read
    oom_kills: deque[float] = field(default_factory=deque)  # when each was seen (monotonic)
    oom_violated: bool = False
    owners: dict[Owner, int] = field(default_factory=dict)  # -> its pidfd
    dead: set[Owner] = field(default_factory=set)  # registrants seen dead


class Watcher:
    """Watches every node on one thread (`start`, `stop`); `publish(kind, node, **data)`
    pushes an event; `held(node)` says whether a lease holds the node locked;
    `holds_sessions(node, pid)` whether a process holds sessions of the node."""

    def __init__(self, nodes: dict[str, NodeRuntime], regions, *, period_s: float,
                 publish: Callable[..., int], held: Callable[[str], bool],
                 holds_sessions: Callable[[str, int], bool] = lambda node, pid: False):
        self.nodes, self.regions, self.period = nodes, regions, period_s
        self.publish, self.held, self.holds_sessions = publish, held, holds_sessions
        self._states = {name: _NodeState() for name in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bd-agent-watch", daemon=True)
        self.errors = 0
        self._poll = select.poll()  # the registrants' pidfds; the watch thread's own
        self._pidfds: dict[int, tuple[str, Owner]] = {}  # pidfd -> (node, registrant)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        if not self._thread.is_alive():
            for fd in self._pidfds:
                os.close(fd)
            self._pidfds.clear()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            for name, rt in self.nodes.items():
                try:
                    self.check(rt, self._states[name])
                except Exception as e:  # noqa: BLE001 - the watch must survive anything
                    self.errors += 1
                    log.warning("node %s: watch failed: %s", name, e)
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:  # overran: skip the missed periods rather than catch up
                next_at, delay = time.monotonic(), 0.0
            self._wait(delay)

    def _wait(self, delay: float) -> None:
        """Sleep `delay` s, or less when a registrant dies: its death is published now."""
        try:
            ready = self._poll.poll(math.ceil(delay * 1000)) if self._pidfds else None
        except InterruptedError:
            ready = []
        if ready is None:
            self._stop.wait(delay)
            return
        for fd, _ in ready:
            node, owner = self._pidfds.pop(fd)
            self._poll.unregister(fd)
            os.close(fd)
            try:
                self._died(self.nodes[node], self._states[node], owner)
            except Exception as e:  # noqa: BLE001 - the watch must survive anything
                self.errors += 1
                log.warning("node %s: publishing the death of %d failed: %s", node, owner[0], e)

    # -- one pass over a node ----------------------------------------------------------

    def check(self, rt: NodeRuntime, st: _NodeState) -> None:
        now = time.monotonic()
        held = self.held(rt.name)
        self._progress(rt, st, now, held)
        link = rt.sampler.link
        if link is not None:
            down = not link.up()
            if down != st.link_down:
                st.link_down = down
                self._say(rt.name, down, detector="level_out_of_bounds", condition="link_down",
                          box="kernel", sensor="link_up", value=0.0 if down else 1.0, min=0.5,
                          interface=link.ifname, onset=time.time())
        if now >= st.frozen_due:
            st.frozen_due = now + FROZEN_EVERY_S
            try:
                frozen = rt.node.cgroup.is_frozen() and not held
            except (OSError, BackdoorsError):
                frozen = st.frozen  # unreadable for now: no news
            if frozen != st.frozen:
                st.frozen = frozen
                self._say(rt.name, frozen, detector="node_frozen", condition="node_frozen",
                          onset=time.time())
            self._oom(rt, st, now)

    def _oom(self, rt: NodeRuntime, st: _NodeState, now: float) -> None:
        """Judge the OOM kills of the node's cgroup in the oom_kills sensor's window."""
        try:
            count = rt.node.cgroup.oom_kills()
        except (OSError, BackdoorsError):
            return  # unreadable for now: no news
        if st.oom_count is not None and count > st.oom_count:
            st.oom_kills.extend([now] * (count - st.oom_count))
        st.oom_count = count
        while st.oom_kills and st.oom_kills[0] <= now - OOM_WINDOW_S:
            st.oom_kills.popleft()
        limit = rt.sampler.limits.oom_kills_per_10s
        violated = over_rate(len(st.oom_kills), limit)
        if violated != st.oom_violated:
            st.oom_violated = violated
            self._say(rt.name, violated, detector="pressure_over_rate", condition="oom_kill",
                      box="kernel", sensor="oom_kills", value=count, events=len(st.oom_kills),
                      max_events=limit, window_s=OOM_WINDOW_S, onset=time.time())

    def _progress(self, rt: NodeRuntime, st: _NodeState, now: float, held: bool) -> None:
        with self.regions.use_all(rt.name, "sensorbox") as entries:
            keys = set()
            for entry in entries:
                if entry.internal:
                    continue  # the kernel box has no progress counters
                key = (entry.name, entry.registered_at)
                keys.add(key)
                box = st.boxes.get(key)
                if box is None:
                    box = st.boxes[key] = _Box((entry.pid, entry.start_time))
                    self._follow(rt.name, st, entry)
                if now < box.retry_at:
                    continue
                try:
                    self._box(rt, entry, key, box, now, held)
                except SensorBoxError:
                    box.generation, box.retry_at = -1, now + RETRY_S  # the sampler says why
        gone = st.boxes.keys() - keys
        for key in gone:  # unregistered: its stalls end with it
            for c in st.boxes.pop(key).counters:
                if c.stalled:
                    self._say(rt.name, False, detector="progress_stalled",
                              condition="progress_stalled", box=key[0], sensor=c.name,
                              why="box unregistered")
        if gone:  # registrants with no box left are not followed any more
            owners = {b.owner for b in st.boxes.values()}
            for owner in st.owners.keys() - owners:
                fd = st.owners.pop(owner)
                del self._pidfds[fd]
                self._poll.unregister(fd)
                os.close(fd)
            st.dead &= owners

    def _follow(self, node: str, st: _NodeState, entry) -> None:
        """Watch the registrant of `entry` for its death (once per process)."""
        owner = (entry.pid, entry.start_time)
        if owner in st.owners or owner in st.dead:
            return
        try:
            fd = os.pidfd_open(entry.pid)
        except OSError:
            st.dead.add(owner)  # already gone: its boxes stall at their deadline
            return
        if not entry.registrant_alive():  # gone, or its pid reused, before the pidfd
            os.close(fd)
            st.dead.add(owner)
            return
        st.owners[owner] = fd
        self._pidfds[fd] = (node, owner)
        self._poll.register(fd, select.POLLIN)

    def _died(self, rt: NodeRuntime, st: _NodeState, owner: Owner) -> None:
        """Publish every progress counter of the dead `owner`'s boxes as stalled, once."""
        st.owners.pop(owner, None)
        st.dead.add(owner)
        if self.held(rt.name) or self.holds_sessions(rt.name, owner[0]):
            return  # stalls at the deadline: a lock's doing, or "owner_died" says it now
        mine = [box for box in st.boxes.values() if box.owner == owner]
        if any(not box.counters for box in mine):  # not parsed yet (or left for a retry)
            for box in mine:
                box.retry_at = 0.0
            self._progress(rt, st, time.monotonic(), False)
        now, died = time.monotonic(), time.time()
        for key, box in st.boxes.items():
            if box.owner != owner:
                continue
            box.dead = True
            for c in box.counters:
                if c.stalled:
                    continue
                c.stalled = True
                self._say(rt.name, True, detector="progress_stalled",
                          condition="progress_stalled", box=key[0], sensor=c.name,
                          value=c.word, unchanged_ms=(now - c.changed_at) * 1000,
                          deadline_ms=c.deadline * 1000, onset=c.onset_wall,
                          owner_pid=owner[0], reason="died", died=died)
        log.warning("node %s: process %d that registered a Sensor Box died", rt.name, owner[0])

    def _box(self, rt: NodeRuntime, entry, key: Key, box: _Box, now: float, held: bool) -> None:
        region = entry.region
        if region.load_word(abi.OFF_GENERATION) != box.generation:
            image = parse_box(read_consistent(region))
            old = {c.name: c for c in box.counters}
            box.counters = []
            for s in image.sensors:
                if s.type is not SensorType.PROGRESS:
                    continue
                offset = abi.slot_offset(s.id - 1) + abi.SLOT_OFF_VALUE
                c = old.get(s.name) or _Counter(s.name, offset, s.threshold, -1, now, time.time())
                c.offset, c.deadline = offset, s.threshold
                box.counters.append(c)
            box.generation = image.generation
        for c in box.counters:
            word = region.load_word(c.offset)
            if box.dead:  # a dead process's counters do not resume: a change seen now is
                c.word = word  # its last tick, written before its death, read late
                continue
            if word != c.word:
                if c.stalled:
                    c.stalled = False
                    self._say(rt.name, False, detector="progress_stalled",
                              condition="progress_stalled", box=entry.name, sensor=c.name,
                              value=word, stalled_ms=round((now - c.changed_at) * 1000, 1))
                c.word, c.changed_at, c.onset_wall = word, now, time.time()
                continue
            unchanged = now - c.changed_at
            if not c.stalled and not held and stalled(unchanged, c.deadline):
                c.stalled = True
                # not rounded: a stall seen every period_s first passes a deadline that is
                # a multiple of it by microseconds, which rounding would hide
                self._say(rt.name, True, detector="progress_stalled",
                          condition="progress_stalled", box=entry.name, sensor=c.name,
                          value=word, unchanged_ms=unchanged * 1000,
                          deadline_ms=c.deadline * 1000, onset=c.onset_wall,
                          owner_pid=entry.pid)
        rt.tracking.watched(key, now, {c.name: c.changed_at for c in box.counters})

    def _say(self, node: str, violated: bool, **data) -> None:
        self.publish("violation" if violated else "cleared", node, **data)

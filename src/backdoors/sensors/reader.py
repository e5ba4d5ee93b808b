"""Reading Sensor Boxes from outside: validated parsing, consistent copies, tracking.

The reader never trusts the region. `parse_box` checks every field against the ABI and
turns anything unexpected into a SensorBoxError that says what and where. The layout is
copied under the generation seqlock; each value is one aligned word. How long a progress
sensor has stalled, and how many pressure events fell in the last window, is computed
here from successive snapshots, so applications never write timestamps; whether that
is a violation is judged by `judgement`.
"""

from __future__ import annotations

import math
import struct
import time
from collections import deque
from typing import Callable

import msgspec

from ..common.preamble import Preamble, check_preamble
from ..errors import SensorBoxError
from . import abi
from .judgement import out_of_bounds, over_rate, stalled
from .region import Region

READ_RETRIES = 64


class Sensor(msgspec.Struct, frozen=True):
    """One sensor as stored in the region."""

    id: int
    name: str
    type: abi.SensorType
    value: float  # an int for progress and pressure
    threshold: float
    param: float
    flags: int = 0

    @property
    def min(self) -> float | None:
        return self.param if self.flags & abi.FLAG_HAS_MIN else None

    @property
    def max(self) -> float | None:
        return self.threshold if self.flags & abi.FLAG_HAS_MAX else None


class BoxImage(msgspec.Struct, frozen=True):
    """A validated copy of a whole box."""

    name: str
    owner_pid: int
    generation: int
    capacity: int
    sensors: list[Sensor]


class SensorState(msgspec.Struct):
    """A sensor with what the reader derived about it."""

    id: int
    name: str
    type: abi.SensorType
    value: float
    violated: bool
    # progress: seconds since the counter last moved, and its deadline
    stalled_for: float | None = None
    deadline: float | None = None
    # level: bounds
    min: float | None = None
    max: float | None = None
    # pressure: events in the last window, and the allowed maximum
    rate: float | None = None
    max_events: float | None = None
    window: float | None = None


class Snapshot(msgspec.Struct):
    box: str
    owner_pid: int
    generation: int
    taken_at: float
    sensors: list[SensorState]

    @property
    def violations(self) -> list[SensorState]:
        return [s for s in self.sensors if s.violated]

    def get(self, name: str) -> SensorState | None:
        return next((s for s in self.sensors if s.name == name), None)


def _name(raw: bytes, where: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise SensorBoxError(f"{where}: name is not NUL-terminated")
    if end == 0:
        raise SensorBoxError(f"{where}: name is empty")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SensorBoxError(f"{where}: name is not valid UTF-8 ({e.reason})") from None

PREAMBLE = Preamble("Sensor Box", abi.MAGIC, abi.VERSION, abi.HEADER_SIZE, abi.SLOT_SIZE,
                    "slot_size")


def parse_header(data: bytes) -> tuple[int, int, int, int, str]:
    """Check the header; return (capacity, count, owner_pid, generation, name)."""
    check_preamble(data, PREAMBLE, SensorBoxError)
    *_preamble, capacity, count, pid, gen, raw_name = abi.HEADER.unpack_from(data)
    if not 1 <= capacity <= abi.MAX_CAPACITY:
        raise SensorBoxError(f"header: capacity {capacity} is outside 1..{abi.MAX_CAPACITY}")
    if count > capacity:
        raise SensorBoxError(f"header: count {count} exceeds capacity {capacity}")
    return capacity, count, pid, gen, _name(raw_name, "header")


def parse_box(data: bytes) -> BoxImage:
    """Validate a copy of a region and decode it; SensorBoxError on anything malformed."""
    capacity, count, pid, gen, name = parse_header(data)
    if gen & 1:
        raise SensorBoxError(f"header: generation {gen} is odd (copy taken while a sensor was being added)")
    need = abi.region_size(capacity)
    if len(data) < need:
        raise SensorBoxError(
            f"region truncated: {len(data)} bytes, capacity {capacity} needs {need}"
        )
    sensors: list[Sensor] = []
    names: set[str] = set()
    for i in range(count):
        off = abi.slot_offset(i)
        where = f"sensor slot {i} (offset {off})"
        sid, type_, flags, reserved, value, threshold, param, raw_name = abi.SLOT.unpack_from(data, off)
        if sid != i + 1:
            raise SensorBoxError(f"{where}: id {sid}, expected {i + 1}")
        if reserved:
            raise SensorBoxError(f"{where}: reserved field is {reserved}, must be 0")
        try:
            kind = abi.SensorType.from_code(type_)
        except ValueError:
            raise SensorBoxError(f"{where}: unknown sensor type {type_}") from None
        if kind is abi.SensorType.PROGRESS:
            param = 0.0  # its moved_ns (a u64 stamp), read by the agent's watcher
        if not (math.isfinite(threshold) and math.isfinite(param)):
            raise SensorBoxError(f"{where}: threshold/param must be finite")
        sname = _name(raw_name, where)
        if sname in names:
            raise SensorBoxError(f"{where}: duplicate sensor name {sname!r}")
        names.add(sname)
        if kind is abi.SensorType.LEVEL:
            if flags & ~(abi.FLAG_HAS_MIN | abi.FLAG_HAS_MAX) or not flags:
                raise SensorBoxError(f"{where}: level flags {flags:#x} are invalid")
            if flags == abi.FLAG_HAS_MIN | abi.FLAG_HAS_MAX and param > threshold:
                raise SensorBoxError(f"{where}: level min {param} > max {threshold}")
            v: float = struct.unpack("<d", value)[0]
        else:
            if flags:
                raise SensorBoxError(f"{where}: flags {flags:#x} are invalid for {kind.name.lower()}")
            if threshold <= 0 or (kind is abi.SensorType.PRESSURE and param <= 0):
                raise SensorBoxError(f"{where}: {kind.name.lower()} thresholds must be positive")
            v = int.from_bytes(value, "little")
        sensors.append(Sensor(sid, sname, kind, v, threshold, param, flags))
    return BoxImage(name, pid, gen, capacity, sensors)


def read_consistent(region: Region) -> bytes:
    """Copy a box's bytes under the generation seqlock, values as atomic word loads.

    Gives up with SensorBoxError if the generation never settles (a writer that died
    mid-update, or a hostile one); never spins without bound.
    """
    header = region.read(0, abi.HEADER_SIZE)
    capacity, _, _, _, _ = parse_header(header)
    size = abi.region_size(capacity)
    for attempt in range(READ_RETRIES):
        g1 = region.load_word(abi.OFF_GENERATION)
        if g1 & 1:
            time.sleep(0 if attempt < 8 else 0.0005)
            continue
        data = bytearray(region.read(0, size))
        count = int.from_bytes(data[abi.OFF_COUNT:abi.OFF_COUNT + 4], "little")
        if region.words is not None:
            for i in range(min(count, capacity)):
                off = abi.slot_offset(i) + abi.SLOT_OFF_VALUE
                data[off:off + 8] = region.words[off // 8].to_bytes(8, "little")
        if region.load_word(abi.OFF_GENERATION) == g1 and int.from_bytes(
            data[abi.OFF_GENERATION:abi.OFF_GENERATION + 8], "little"
        ) == g1:
            return bytes(data)
    raise SensorBoxError(
        f"{region.label}: layout generation did not settle after {READ_RETRIES} tries "
        "(a writer died while adding a sensor, or the region is being rewritten)"
    )


#: samples a pressure sensor's history keeps per window, at most (its rate is then measured
#: over its window and at most window/HIST_SAMPLES more)
HIST_SAMPLES = 256
#: samples the pressure sensors of one box keep together, at most (a box of 64 keeps
#: HIST_SAMPLES each; a node's box of thousands, down to MIN_HIST_SAMPLES each: ~100
#: bytes a sample, not hundreds of times the box's size)
BOX_HIST_SAMPLES = 16_384
MIN_HIST_SAMPLES = 4


class SensorTracker:
    """Derives stalls and rates from successive images of one box.

    Progress: stalled_for = now - when this tracker last saw the counter move (the first
    sighting counts as a move). Pressure: events in the last `window` seconds, from the
    counter's history. A new owner pid resets everything (the box was recreated).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._owner: int | None = None
        self._last: dict[int, tuple[float, float]] = {}  # id -> (value, changed_at)
        self._hist: dict[int, deque[tuple[float, float]]] = {}

    def update(self, image: BoxImage, now: float | None = None) -> Snapshot:
        now = self._clock() if now is None else now
        if image.owner_pid != self._owner:
            self._owner = image.owner_pid
            self._last.clear()
            self._hist.clear()
        states = []
        pressures = sum(1 for s in image.sensors if s.type is abi.SensorType.PRESSURE)
        keep = max(MIN_HIST_SAMPLES, min(HIST_SAMPLES, BOX_HIST_SAMPLES // max(1, pressures)))
        for s in image.sensors:
            if s.type is abi.SensorType.PROGRESS:
                prev = self._last.get(s.id)
                if prev is None or prev[0] != s.value:
                    prev = (s.value, now)
                    self._last[s.id] = prev
                since = now - prev[1]
                states.append(SensorState(s.id, s.name, s.type, s.value,
                                          stalled(since, s.threshold),
                                          stalled_for=since, deadline=s.threshold))
            elif s.type is abi.SensorType.LEVEL:
                lo, hi = s.min, s.max
                bad = out_of_bounds(s.value, lo, hi) is not None
                states.append(SensorState(s.id, s.name, s.type, s.value, bad, min=lo, max=hi))
            else:
                hist = self._hist.setdefault(s.id, deque())
                # a sample per window/keep at most: the node chooses the window (a day,
                # 1e300 s) and its number of sensors, not how much of the reader's memory
                # their history takes
                if not hist or now - hist[-1][0] >= s.param / keep:
                    hist.append((now, s.value))
                while len(hist) > 1 and hist[1][0] <= now - s.param:
                    hist.popleft()
                # hist[0] is the newest sample at least one window old (or the oldest one)
                rate = float(max(0, s.value - hist[0][1]))
                states.append(SensorState(s.id, s.name, s.type, s.value, over_rate(rate, s.threshold),
                                          rate=rate, max_events=s.threshold, window=s.param))
        return Snapshot(image.name, image.owner_pid, image.generation, now, states)


class SensorBoxReader:
    """Consistent, validated snapshots of one Sensor Box, with derived state.

    `source` is a Region, an fd, or a path to a file-backed box.
    """

    def __init__(self, source: Region | int | str, *, clock: Callable[[], float] = time.monotonic):
        if isinstance(source, Region):
            self.region, self._own = source, False
        elif isinstance(source, int):
            self.region, self._own = Region(source, label=f"fd {source}"), True
        else:
            self.region, self._own = Region.open_path(source), True
        self.tracker = SensorTracker(clock)

    def image(self) -> BoxImage:
        return parse_box(read_consistent(self.region))

    def snapshot(self) -> Snapshot:
        return self.tracker.update(self.image())

    def close(self) -> None:
        if self._own:
            self.region.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

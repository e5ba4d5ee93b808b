"""The application side of a Sensor Box: create a region, add sensors, update them.

An update is plain memory stores into a shared mapping: no system call, no lock, no
allocation. The agent (or any reader) sees the new value without the application doing
anything else. Each sensor has one writer, its owner; the GIL is not held across a
tick, so concurrent ticks of the same sensor from several threads may lose a count (a
progress or pressure counter only needs to move, not to be exact).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
from time import monotonic_ns

from ..errors import SensorBoxError
from . import abi

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class _Counter:
    """A u64 counter sensor: one store per update (the count is kept here too, so an
    update needs no load from the shared page)."""

    __slots__ = ("_words", "_index", "_count", "name")

    def __init__(self, words: memoryview, index: int, name: str):
        self._words, self._index, self._count = words, index, words[index]
        self.name = name

    def add(self, n: int) -> None:
        """Count `n` at once."""
        self._count = c = self._count + n
        self._words[self._index] = c

    @property
    def value(self) -> int:
        return self._count


class Progress(_Counter):
    """A monotonic counter that must move at least once per `deadline` seconds."""

    __slots__ = ("deadline",)

    def __init__(self, words: memoryview, index: int, name: str, deadline: float):
        super().__init__(words, index, name)
        self.deadline = deadline

    def tick(self) -> None:
        """Count one unit of progress: one store into the shared region."""
        self._count = c = self._count + 1
        self._words[self._index] = c


class StampedProgress(Progress):
    """A Progress whose moves also store their time (CLOCK_MONOTONIC ns, the slot's
    moved_ns), before the count: the agent then reads it once per deadline instead of
    polling for its moves (agent/watch.py), for ~80 ns more per tick."""

    __slots__ = ("_stamp",)

    def __init__(self, words: memoryview, index: int, name: str, deadline: float):
        super().__init__(words, index, name, deadline)
        self._stamp = index + abi.STAMP_WORDS

    def tick(self) -> None:
        """Count one unit of progress: its time, then its count, into the shared region."""
        self._count = c = self._count + 1
        self._words[self._stamp] = monotonic_ns()
        self._words[self._index] = c

    def add(self, n: int) -> None:
        """Count `n` units at once."""
        self._count = c = self._count + n
        self._words[self._stamp] = monotonic_ns()
        self._words[self._index] = c


class Pressure(_Counter):
    """An event counter; more than `max_events` per `window` seconds is a failure."""

    __slots__ = ("max_events", "window")

    def __init__(self, words, index, name, max_events, window):
        super().__init__(words, index, name)
        self.max_events, self.window = max_events, window

    def event(self) -> None:
        """Count one event: one store into the shared region."""
        self._count = c = self._count + 1
        self._words[self._index] = c


class Level:
    """A gauge that must stay within [min, max] (either bound may be absent)."""

    __slots__ = ("_doubles", "_index", "name", "min", "max")

    def __init__(self, doubles, index, name, min, max):
        self._doubles, self._index = doubles, index
        self.name, self.min, self.max = name, min, max

    def set(self, value: float) -> None:
        """Set the gauge: one store into the shared region."""
        self._doubles[self._index] = value

    @property
    def value(self) -> float:
        return self._doubles[self._index]


class SensorBox:
    """A writable Sensor Box owned by this process.

    Create it with `SensorBox.create(name)` (an anonymous, sealed memfd) or with
    `path=` (a file, normally in a tmpfs such as /dev/shm). Hand `fd` to the agent to
    have it watched; the region outlives this process as long as someone holds the fd.
    """

    def __init__(self, fd: int, mm: mmap.mmap, capacity: int, path: str | None):
        self.fd, self.path, self.capacity = fd, path, capacity
        self._mm = mm
        self._words = memoryview(mm).cast("Q")
        self._doubles = memoryview(mm).cast("d")
        self._names: dict[str, object] = {}

    @classmethod
    def create(cls, name: str, *, capacity: int = 64, path: str | None = None) -> "SensorBox":
        """Create an empty box with room for `capacity` sensors."""
        raw_name = abi.encode_name(name, "box")
        if not 1 <= capacity <= abi.MAX_CAPACITY:
            raise ValueError(f"capacity must be 1..{abi.MAX_CAPACITY}, got {capacity}")
        size = abi.region_size(capacity)
        if path is None:
            fd = os.memfd_create(f"sensorbox:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if path is None:
                # A reader may then map the region without fear of SIGBUS.
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            if path is not None:
                os.unlink(path)
            raise
        abi.HEADER.pack_into(mm, 0, abi.MAGIC, abi.VERSION, abi.HEADER_SIZE,
                                abi.SLOT_SIZE, capacity, 0, os.getpid(), 0, raw_name)
        return cls(fd, mm, capacity, path)

    @property
    def name(self) -> str:
        """The box's own name (from its header): the region name it registers under."""
        raw = abi.HEADER.unpack_from(self._mm, 0)[-1]
        return raw.split(b"\0", 1)[0].decode("utf-8")

    @property
    def count(self) -> int:
        return self._words[abi.OFF_COUNT // 8] & 0xFFFFFFFF

    @property
    def generation(self) -> int:
        return self._words[abi.OFF_GENERATION // 8]

    def progress(self, name: str, *, deadline: float, stamped: bool = False) -> Progress:
        """Add a progress sensor that must tick at least every `deadline` seconds.
        `stamped`: each tick also stores its time (StampedProgress), so that the agent
        reads the counter once per deadline rather than every few ms."""
        _positive(deadline, "deadline")
        index = self._add(name, abi.SensorType.PROGRESS, 0, 0, float(deadline), 0.0)
        kind = StampedProgress if stamped else Progress
        return self._remember(name, kind(self._words, index, name, deadline))

    def level(self, name: str, *, min: float | None = None, max: float | None = None,
              initial: float = 0.0) -> Level:
        """Add a gauge that must stay within [min, max]."""
        if min is None and max is None:
            raise ValueError(f"level {name!r} needs a min, a max, or both")
        for bound, what in ((min, "min"), (max, "max")):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"level {name!r}: {what} must be finite")
        if min is not None and max is not None and min > max:
            raise ValueError(f"level {name!r}: min {min} > max {max}")
        flags = (abi.FLAG_HAS_MIN if min is not None else 0) | (abi.FLAG_HAS_MAX if max is not None else 0)
        index = self._add(name, abi.SensorType.LEVEL, flags, struct.pack("<d", float(initial)),
                          float(max if max is not None else 0.0),
                          float(min if min is not None else 0.0))
        return self._remember(name, Level(self._doubles, index, name, min, max))

    def pressure(self, name: str, *, max_events: float, window: float = 1.0) -> Pressure:
        """Add an event counter that must not count more than `max_events` per `window` s."""
        _positive(max_events, "max_events")
        _positive(window, "window")
        index = self._add(name, abi.SensorType.PRESSURE, 0, 0, float(max_events), float(window))
        return self._remember(name, Pressure(self._words, index, name, max_events, window))

    def _remember(self, name, sensor):
        self._names[name] = sensor
        return sensor

    def _add(self, name, type_, flags, value, threshold, param) -> int:
        """Write a new slot under the generation seqlock; return its value word index."""
        raw = abi.encode_name(name, "sensor")
        if name in self._names:
            raise ValueError(f"sensor {name!r} already exists in this box")
        count = self.count
        if count >= self.capacity:
            raise SensorBoxError(
                f"sensor box is full ({self.capacity} sensors); create it with a larger capacity"
            )
        if isinstance(value, int):
            value = value.to_bytes(8, "little")
        gen_word = abi.OFF_GENERATION // 8
        gen = self._words[gen_word]
        self._words[gen_word] = gen + 1  # odd: layout changing
        off = abi.slot_offset(count)
        abi.SLOT.pack_into(self._mm, off, count + 1, type_.code, flags, 0, value, threshold, param, raw)
        self._mm[abi.OFF_COUNT:abi.OFF_COUNT + 4] = (count + 1).to_bytes(4, "little")
        self._words[gen_word] = gen + 2  # even: stable again
        return (off + abi.SLOT_OFF_VALUE) // 8

    def close(self, *, unlink: bool = True) -> None:
        """Unmap and close; remove the file of a path-backed box when `unlink`."""
        if self._mm.closed:
            return
        self._words.release()
        self._doubles.release()
        self._mm.close()
        os.close(self.fd)
        if self.path is not None and unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _positive(v: float, what: str) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a positive number, got {v!r}")

"""Reading and writing cgroupfs files, with errors that say what, where and what to do.

Small helpers shared by the Cgroup class: one syscall per write (cgroupfs acts on each
write), parsers for the flat-keyed and pressure formats, waiting on cgroup.events, and
files kept open for readers that read them many times a second (`KeptFiles`, shared by
threads; `Polled`, one file of one thread, parsed only when it changed).
"""

from __future__ import annotations

import errno
import math
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from backdoors.errors import NodeError

T = TypeVar("T")

_HINTS = {
    errno.ENOENT: "it does not exist: the cgroup was removed, or the controller is not "
    "mounted or enabled here",
    errno.EACCES: "permission denied: cgroups need root",
    errno.EPERM: "operation not permitted: cgroups need root",
    errno.EROFS: "cgroupfs is read-only: in a container, run it privileged",
}


def error(action: str, path: Path, exc: OSError, hint: str = "") -> NodeError:
    """A NodeError for a failed cgroupfs access, with the kernel's reason and a hint."""
    reason = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
    return NodeError(f"cannot {action} {path}: {reason}" + (f". {hint}" if hint else ""))


def read(path: Path) -> str:
    """The whole text of a cgroupfs (or procfs) file."""
    return _read_bytes(path).decode()


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except OSError as e:
        raise error("read", path, e) from None


def read_int(path: Path) -> int | None:
    """An integer file; None for "max" (no limit)."""
    return to_int(read(path))


def to_int(text: str) -> int | None:
    """An integer file's text; None for "max" (no limit)."""
    text = text.strip()
    return None if text == "max" else int(text)


class KeptFiles:
    """cgroupfs files kept open once read, and read again with pread (a `Polled` file
    each, keyed by name): ~1 us a read where opening, reading and closing takes ~20 us
    (and a Path to build). For a sampler reading a node's accounting many times a
    second. Thread-safe; after close() every read opens the file as read() does."""

    def __init__(self) -> None:
        self._files: dict[str, Polled[str]] | None = {}
        self._lock = threading.Lock()

    def read(self, key: str, path: Callable[[], Path]) -> str:
        """The text of the file `key` names (its path, built on the first read only)."""
        with self._lock:
            if self._files is not None:
                file = self._files.get(key)
                if file is None:
                    file = self._files[key] = Polled(path, str)
                return file.read()
        return read(path())

    def close(self) -> None:
        with self._lock:
            files, self._files = self._files, None
        for file in (files or {}).values():
            file.close()


class Polled(Generic[T]):
    """One cgroupfs file read many times a second: a pread of a descriptor kept open, its
    text parsed only when its bytes changed (~1 us a read; a parse is 1-3 us more). Not
    thread-safe: one thread reads it (the agent's watcher), or a lock guards it
    (KeptFiles); its owner closes it. A kept file whose cgroup was removed fails its
    pread (ENODEV): the path is opened again, so a cgroup made again under the same name
    is read, and one that is gone gives read()'s error. A text that does not parse
    raises the parser's error and is not kept."""

    _SIZE = 4096  # every accounting file read this way is smaller (else: read whole)

    def __init__(self, path: Callable[[], Path], parse: Callable[[str], T]) -> None:
        self._path, self._parse = path, parse
        self._fd = -1
        self._data: bytes | None = None
        self._value: T

    def read(self) -> T:
        """The file's value now."""
        data = self._pread()
        if data != self._data:
            self._value = self._parse(data.decode())
            self._data = data
        return self._value

    def _pread(self) -> bytes:
        if self._fd >= 0:
            try:
                data = os.pread(self._fd, self._SIZE, 0)
            except OSError:
                self.close()
            else:
                return data if len(data) < self._SIZE else _read_bytes(self._path())
        where = self._path()
        try:
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise error("read", where, e) from None
        try:
            data = os.pread(fd, self._SIZE, 0)
        except OSError as e:
            os.close(fd)
            raise error("read", where, e) from None
        self._fd = fd
        return data if len(data) < self._SIZE else _read_bytes(where)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def write(path: Path, value: str, hint: str = "") -> None:
    """Write `value` to a cgroupfs file in one syscall; `hint` is added to the error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise error("open", path, e, hint) from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise error(f"write {value!r} to", path, e, hint) from None
    finally:
        os.close(fd)


def keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (cgroup.events, memory.events, cpu.stat, oom_control)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def pressure_total(text: str, kind: str) -> int:
    """The total (us) of a PSI file's `kind` line ("some" or "full"): pressure() for one
    number, read many times a second (KeyError without that line)."""
    for line in text.splitlines():
        if line.startswith(kind):
            return int(line[line.rindex("=") + 1:])
    raise KeyError(kind)


def pressure(text: str) -> dict[str, float | int]:
    """Parse a PSI file: "some avg10=0.00 avg60=0.00 avg300=0.00 total=12" lines.

    Gives e.g. {"some_avg10": 0.0, ..., "some_total_us": 12, "full_avg10": ...}.
    """
    out: dict[str, float | int] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "total":
                out[f"{kind}_total_us"] = int(value)
            else:
                out[f"{kind}_{key}"] = float(value)
    return out


def wait_event(path: Path, key: str, want: int, timeout: float) -> bool:
    """Wait until `key` in the events file `path` (e.g. cgroup.events) reads `want`.

    cgroupfs signals a change of an events file with POLLPRI, but at most once per 10 ms
    (later changes are notified late), so the file is also re-read on a backoff from 0.1 ms
    to 10 ms: a v2 freeze under fork load is seen in ~3 ms instead of ~10 ms.
    Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise error("open", path, e) from None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        pause = 0.0001
        while True:
            try:
                text = os.pread(fd, 4096, 0).decode()
            except OSError as e:
                raise error("read", path, e) from None
            if keyed(text).get(key) == want:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            wait = min(pause, remaining)
            if wait < 0.001:  # poll() counts whole milliseconds
                time.sleep(wait)
            else:
                poller.poll(math.ceil(wait * 1000))
            pause = min(pause * 2, 0.01)
    finally:
        os.close(fd)


def wait_until(check, timeout: float) -> bool:
    """Call `check()` until it is true or `timeout` passes, backing off 0.1 ms to 10 ms.

    For state files that give no notification (v1 freezer.state). Returns the last result.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        if check():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.01)


def tree(top: Path) -> list[Path]:
    """`top` and every cgroup below it, deepest first (the order rmdir needs). A cgroup
    directory's link count is 2 + its subdirectories (kernfs), so one without any (a
    node's, nearly always) costs one stat, not a listing of its ~40 files."""
    try:
        st = os.stat(top)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return []
    if st.st_nlink == 2:
        return [top]
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]

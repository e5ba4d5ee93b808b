"""A shared-memory region seen from outside its owner, bounds-checked.

The agent and local readers hold a region by its file descriptor (a memfd handed over
with SCM_RIGHTS, or a file in a tmpfs). A tmpfs memfd sealed against shrinking is mapped
(unless `map=False`) and read with plain loads; anything else is read with pread, so that
a region truncated by a hostile owner gives a short read and an error, never a SIGBUS.
pread of a hole in a tmpfs file allocates nothing (the kernel copies its zero page), while
touching the same hole through a mapping allocates a page, charged to the reader: a reader
that must not pay for a sparse region's size (the agent, for Continuation Boxes) uses
`map=False`. A hugetlbfs memfd is never mapped: a hole punched in it SIGBUSes a reader
when the huge page pool is empty.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from ..errors import SensorBoxError


class Region:
    """Bounds-checked reads (and, when allowed, writes) of a region held by `fd`.

    The Region owns a duplicate of `fd` and closes it in `close()`.
    """

    def __init__(self, fd: int, *, writable: bool = False, label: str = "region",
                 map: bool = True):  # noqa: A002 - the plain word
        self.label = label
        self.writable = writable
        self.fd = os.dup(fd)
        self._mm: mmap.mmap | None = None
        self.words: memoryview | None = None
        try:
            self.size = os.fstat(self.fd).st_size
            if (map and self.size > 0 and _sealed_against_shrink(self.fd)
                    and filesystem(self.fd) == TMPFS_MAGIC):
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot)
                if self.size % 8 == 0:
                    self.words = memoryview(self._mm).cast("Q")
        except OSError as e:
            os.close(self.fd)
            raise SensorBoxError(f"{label}: cannot map region: {e}") from e

    @classmethod
    def open_path(cls, path: str, *, writable: bool = False) -> "Region":
        """Open a region backed by a file (normally in a tmpfs)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise SensorBoxError(f"cannot open region {path}: {e.strerror}") from e
        try:
            return cls(fd, writable=writable, label=path)
        finally:
            os.close(fd)

    @property
    def mapped(self) -> bool:
        return self._mm is not None

    def current_size(self) -> int:
        """The region's size now (a file-backed region can change under us)."""
        if self._mm is not None:
            return self.size
        try:
            return os.fstat(self.fd).st_size
        except OSError as e:
            raise SensorBoxError(f"{self.label}: {e.strerror}") from e

    def _check(self, offset: int, length: int, *, now: bool = False) -> None:
        """The range is inside the region. Without `now`, inside the size seen at open is
        enough (a pread of a file shrunk since comes back short: read() says so); past
        it, or with `now` (a pwrite past the end would grow the file), the size now."""
        if not now and 0 <= offset and 0 <= length and offset + length <= self.size:
            return
        size = self.current_size()
        if offset < 0 or length < 0 or offset + length > size:
            raise SensorBoxError(
                f"{self.label}: range [{offset}, {offset + length}) is outside the region "
                f"of {size} bytes"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or SensorBoxError."""
        self._check(offset, length)
        if self._mm is not None:
            return self._mm[offset:offset + length]
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise SensorBoxError(
                f"{self.label}: short read at {offset} ({len(data)} of {length} bytes): "
                "the region was truncated"
            )
        return data

    def load_word(self, offset: int) -> int:
        """One aligned 64-bit load (atomic against a concurrent aligned store)."""
        if offset % 8:
            raise SensorBoxError(f"{self.label}: unaligned word offset {offset}")
        if self.words is not None:
            self._check(offset, 8)
            return self.words[offset // 8]
        return int.from_bytes(self.read(offset, 8), "little")

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset`; only for regions registered writable."""
        if not self.writable:
            raise SensorBoxError(f"{self.label}: region is not writable")
        self._check(offset, len(data), now=True)
        if self._mm is not None:
            self._mm[offset:offset + len(data)] = data
            return
        try:
            written = _pwrite_at(self.fd, data, offset)
        except OSError as e:
            raise SensorBoxError(f"{self.label}: cannot write at {offset}: {e.strerror}") from None
        if written != len(data):
            raise SensorBoxError(f"{self.label}: short write at {offset}")

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.words is not None:
            self.words.release()
        if self._mm is not None:
            self._mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6

_libc = ctypes.CDLL(None, use_errno=True)


def filesystem(fd: int) -> int:
    """The magic number of the filesystem holding `fd` (fstatfs f_type; TMPFS_MAGIC for a
    plain memfd, HUGETLBFS_MAGIC for an MFD_HUGETLB one)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _sealed_against_shrink(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False  # not a memfd / shmem file: no seals


#: pwritev's flag (Linux 6.9) to write at the offset even if the file is open O_APPEND
RWF_NOAPPEND = getattr(os, "RWF_NOAPPEND", 0x20)


def _pwrite_at(fd: int, data: bytes, offset: int) -> int:
    """pwrite at `offset` whatever the file's flags: the agent's descriptor of a region
    shares its open file description with the node's, which can set O_APPEND on it (a
    plain pwrite then writes at the end, growing the file). A kernel without
    RWF_NOAPPEND: refused while O_APPEND is set."""
    try:
        return os.pwritev(fd, [data], offset, RWF_NOAPPEND)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        raise OSError(errno.EINVAL, "the file was set O_APPEND by its owner: not written")
    return os.pwrite(fd, data, offset)

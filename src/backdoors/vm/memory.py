"""Reading a guest kernel from its RAM, without its help.

The guest's RAM is a memfd (machine.py) that the host maps read-only; with the RAM below
the PCI hole (at most 2 GiB here), an offset in the memfd is a guest-physical address.
Kernel variables in the kernel image (jiffies, init_task, the system call table, ...) are
found from the profile (kernel.py) and the kernel's physical load address, which is
located in memory: the `linux_banner` string lies at a fixed distance from `_text`, and
`_text` is loaded on a 2 MiB boundary (CONFIG_PHYSICAL_ALIGN). So KASLR's physical
randomisation costs one scan; its virtual offset follows from the guest's own `phys_base`
(phys_base = physical _text - (virtual _text - __START_KERNEL_map)).
"""

from __future__ import annotations

import mmap
import os
import struct

from ..errors import VmError
from .kernel import START_KERNEL_MAP, GuestKernel

PHYSICAL_ALIGN = 2 << 20


class GuestMemory:
    """A read-only mapping of a guest's RAM, with the guest kernel located in it."""

    def __init__(self, fd: int, kernel: GuestKernel, *, where: str = "guest RAM"):
        self.kernel, self.where = kernel, where
        size = os.fstat(fd).st_size
        if size == 0:
            raise VmError(f"{where}: the RAM memfd is empty")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.size = size
        self._text_phys: int | None = None

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- where the kernel is -------------------------------------------------------

    @property
    def text_phys(self) -> int:
        """The guest-physical address of `_text` (found once, by its banner)."""
        if self._text_phys is None:
            self._text_phys = self._find_text()
        return self._text_phys

    def _find_text(self) -> int:
        banner = f"Linux version {self.kernel.version} (".encode()
        distance = self.kernel.image_offset("linux_banner")
        at = self._map.find(banner)
        while at >= 0:
            text = at - distance
            if text >= 0 and text % PHYSICAL_ALIGN == 0:
                return text
            at = self._map.find(banner, at + 1)
        raise VmError(f"{self.where}: kernel {self.kernel.version} not found in memory "
                      "(not booted yet, or another kernel runs)")

    @property
    def kaslr_offset(self) -> int:
        """How far the running kernel's virtual addresses are from the link-time ones
        (0 when booted with nokaslr)."""
        phys_base = self.read_u64("phys_base")
        # phys_base is a u64 that may hold a negative delta: compute modulo 2**64
        running_text = (self.text_phys - phys_base + START_KERNEL_MAP) % (1 << 64)
        return running_text - self.kernel.symbol("_text")

    # ---- reading ------------------------------------------------------------------

    def phys(self, symbol: str) -> int:
        """The guest-physical address of a kernel image symbol."""
        addr = self.text_phys + self.kernel.image_offset(symbol)
        if not 0 <= addr < self.size:
            raise VmError(f"{self.where}: {symbol} at physical {addr:#x} is outside the "
                          f"{self.size >> 20} MiB of RAM")
        return addr

    def read(self, phys: int, length: int) -> bytes:
        if phys < 0 or phys + length > self.size:
            raise VmError(f"{self.where}: read of {length} bytes at {phys:#x} outside the RAM")
        return self._map[phys:phys + length]

    def read_u64(self, symbol: str) -> int:
        return struct.unpack("<Q", self.read(self.phys(symbol), 8))[0]

    def jiffies(self) -> int:
        """The guest kernel's tick counter (jiffies_64): it stops when the guest's
        kernel stops ticking (vCPUs stopped, the guest hung)."""
        return self.read_u64("jiffies_64")

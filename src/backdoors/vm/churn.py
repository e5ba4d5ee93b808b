"""Which of a guest kernel's data pages change, and how often: Orion's view of kernel
memory update patterns.

The kernel's writable data -- [_sdata, _edata) and [__bss_start, __bss_stop), ~1,900
pages on the lab's kernel -- is visited a few pages at a time, round-robin, and each
page's CRC-32 compared with the one of its last visit. `share` is the share of pages
that changed between their last two visits over the last full pass (how much of the
kernel's state is moving); `counts` keeps, per page, how many visits found it changed
(which pages are hot: its counters, run queues and allocator state, against the pages
that settle after boot). Read-only on the guest's RAM; a page is 4 KiB of the image.
"""

from __future__ import annotations

import zlib

from ..errors import VmError
from .memory import PAGE, GuestMemory

#: the kernel's writable data sections: (first symbol, end symbol)
SECTIONS = (("_sdata", "_edata"), ("__bss_start", "__bss_stop"))


class DataChurn:
    """Visits `per_visit` pages of the guest kernel's data per `visit()`."""

    def __init__(self, memory: GuestMemory, *, per_visit: int = 64):
        if per_visit < 1:
            raise ValueError("DataChurn: per_visit must be at least 1")
        self.memory, self.per_visit = memory, per_visit
        self.pages: list[int] = []  # guest-physical address of each page
        for first, end in SECTIONS:
            lo = memory.phys(first) & ~(PAGE - 1)
            hi = memory.phys(end)
            self.pages += range(lo, hi, PAGE)
        if not self.pages:
            raise VmError(f"{memory.where}: the kernel image has no data pages")
        self.crcs: list[int | None] = [None] * len(self.pages)
        self.counts = [0] * len(self.pages)
        self.passes = 0
        self.share: float | None = None  # of the last full pass (None before one)
        self._at = 0
        self._changed = 0  # pages found changed in the pass under way

    def visit(self) -> None:
        """Visit the next `per_visit` pages; a pass that ends sets `share`."""
        read, n = self.memory.read, len(self.pages)
        for _ in range(min(self.per_visit, n)):
            i = self._at
            crc = zlib.crc32(read(self.pages[i], PAGE))
            if self.crcs[i] is not None and crc != self.crcs[i]:
                self.counts[i] += 1
                self._changed += 1
            self.crcs[i] = crc
            self._at = (i + 1) % n
            if self._at == 0:
                if self.passes:  # the first pass only learns the pages
                    self.share = self._changed / n
                self.passes += 1
                self._changed = 0

    def hot(self, k: int = 10) -> list[tuple[int, int]]:
        """The `k` pages found changed most often: (guest-physical address, changes)."""
        ranked = sorted(range(len(self.pages)), key=lambda i: -self.counts[i])
        return [(self.pages[i], self.counts[i]) for i in ranked[:k] if self.counts[i]]

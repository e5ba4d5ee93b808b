"""Reading a guest kernel from its RAM, without its help.

The guest's RAM is a memfd (machine.py) that the host maps read-only; with the RAM below
the PCI hole (at most 2 GiB here), an offset in the memfd is a guest-physical address.
Kernel variables in the kernel image (jiffies, init_task, the system call table, ...) are
found from the profile (kernel.py) and the kernel's physical load address, which is
located in memory: the `linux_banner` string lies at a fixed distance from `_text`, and
`_text` is loaded on a 2 MiB boundary (CONFIG_PHYSICAL_ALIGN). So KASLR's physical
randomisation costs one scan; its virtual offset follows from the guest's own `phys_base`
(phys_base = physical _text - (virtual _text - __START_KERNEL_map)). A banner is a string
any process may write: a boundary holds the kernel only if that offset is one KASLR
chooses and the image's bytes, relocated for it, are there (`_candidate`); both are
found once, at attach. Other virtual
addresses (the direct map, slab objects) are translated by walking the kernel's page
tables from `init_top_pgt`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import VmError
from .image import KernelImage
from .kernel import START_KERNEL_MAP, GuestKernel

PHYSICAL_ALIGN = 2 << 20
PAGE = 4096
#: the most RAM read: below the PCI hole all of it, so a memfd offset is a guest-physical
#: address (above it, QEMU maps the rest from 4 GiB: offsets would name other memory)
MAX_RAM = 2 << 30
#: CPUs whose run queues are read at most (a hostile nr_cpu_ids is refused past it)
MAX_CPUS = 512
#: bits 12..51 of a page-table entry: the physical frame (NX and flags masked off)
FRAME = 0x000F_FFFF_FFFF_F000
PRESENT, HUGE = 0x1, 0x80
#: a task's state letter as /proc shows it, by the highest bit of (__state | exit_state) &
#: TASK_REPORT (include/linux/sched.h; fs/proc/array.c); TASK_IDLE shows as "I"
STATES, TASK_REPORT, TASK_IDLE = "RSDTtXZP", 0x7F, 0x402
#: mm_struct.rss_stat's counters that are resident: MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES
RSS_COUNTERS = (0, 1, 3)
#: the task_struct members process_table reads, in its order, with their formats
TASK_MEMBERS = (("__state", "<I"), ("exit_state", "<i"), ("mm", "<Q"), ("real_parent", "<Q"),
                ("start_time", "<Q"), ("pid", "<i"), ("comm", "16s"), ("tgid", "<i"))
FIXED_1 = 1 << 11  # avenrun's fixed point (include/linux/sched/loadavg.h)
#: KASLR offsets a kernel may have: 2 MiB aligned, below the 1 GiB of the kernel image
#: mapping (arch/x86/include/asm/page_64_types.h KERNEL_IMAGE_SIZE)
MAX_KASLR = 1 << 30
#: the pages compared with the image where a banner is found (text, and read-only data
#: with pointers the KASLR offset relocates), and the share of their bytes that must match
CHECKED = ("_text", "sys_call_table")
MATCH = 0.75
#: the most entries a walk of a guest list or map reads; less where the guest's own bound
#: is lower (`_bound`: a list a compromised kernel forges long costs the host per walk)
WALK_LIMIT = 1 << 16


@dataclass(frozen=True)
class GuestTask:
    """A process of the guest, read from its task list."""

    pid: int
    ppid: int  # its parent's (real_parent's tgid; 0 for init and kthreadd)
    comm: str
    state: str  # R, S, D, T, t, X, Z, P or I, as in /proc/PID/stat
    rss: int  # resident bytes of its memory (0: a kernel thread, which has none)
    start_ns: int = 0  # when it was forked, on the guest's monotonic clock
    #: its exec: the address of the struct file it exec'd (mm->exe_file), shared by the
    #: processes forked from it and new at each exec (0: none, a kernel thread)
    exe: int = 0


def task_state(state: int, exit_state: int) -> str:
    """The /proc state letter of a task's `__state` and `exit_state`."""
    if state == TASK_IDLE:
        return "I"
    return STATES[((state | exit_state) & TASK_REPORT).bit_length()]


@dataclass(frozen=True)
class Readings:
    """One sample of a guest kernel's global counters (vmstat, threads, forks).

    `available` is what the guest can still get without reclaiming anything it cannot
    drop: free pages plus the page cache, less the tmpfs/shmem pages in it (the guest's
    root file system is tmpfs: a file written there holds memory like an allocation)."""

    jiffies: int
    free: int  # bytes
    file: int  # page cache, bytes (shmem included)
    shmem: int
    anon: int
    slab_unreclaimable: int
    threads: int  # nr_threads
    forks: int  # total_forks: forks since boot
    refaults: int = 0  # pages evicted and faulted back in since boot (page-cache churn)
    running: int = 0  # runnable tasks on the run queues (rq.nr_running, all CPUs)

    @property
    def available(self) -> int:
        return self.free + max(0, self.file - self.shmem)


class GuestMemory:
    """A guest's RAM, read with pread(2) on its memfd, with the guest kernel located in it.

    Not a mapping: a read fault on a page the guest never touched would allocate it (a
    memfd's hole is no zero page), charged to the reader and, in the agent, locked by its
    mlockall: a guest whose pointers lead across its untouched RAM would move it into
    the agent. pread of a hole copies zeroes and allocates nothing."""

    def __init__(self, fd: int, kernel: GuestKernel, *, where: str = "guest RAM"):
        self.kernel, self.where = kernel, where
        size = os.fstat(fd).st_size
        if size == 0:
            raise VmError(f"{where}: the RAM memfd is empty")
        if size > MAX_RAM:
            raise VmError(f"{where}: {size >> 20} MiB of RAM, over the {MAX_RAM >> 20} MiB "
                          "read (past them the memfd's offsets are not the guest's physical "
                          "addresses): give the guest at most -m 2G")
        self._fd = os.dup(fd)
        self.size = size
        self._text_phys: int | None = None
        self._kaslr = 0  # the KASLR offset, found with _text_phys
        self._direct: int | None = None  # page_offset_base, read once (__ro_after_init)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- where the kernel is -------------------------------------------------------

    @property
    def text_phys(self) -> int:
        """The guest-physical address of `_text` (found once, by its banner, and checked
        against the image: `_find_text`)."""
        if self._text_phys is None:
            self._text_phys, self._kaslr = self._find_text()
        return self._text_phys

    def _find_text(self) -> tuple[int, int]:
        """(physical `_text`, KASLR offset) of the first 2 MiB boundary whose
        `linux_banner` (at its distance) is this kernel's and that holds the kernel
        (`_candidate`): a banner is 36 bytes any process may write in its memory, so a
        boundary with one is a candidate only. One short read per boundary."""
        banner = f"Linux version {self.kernel.version} (".encode()
        distance = self.kernel.image_offset("linux_banner")
        image, refused = None, []
        for text in range(0, self.size - distance - len(banner) + 1, PHYSICAL_ALIGN):
            if self.read(text + distance, len(banner)) != banner:
                continue
            image = image or KernelImage(self.kernel)
            slide, why = self._candidate(text, image)
            if slide is not None:
                return text, slide
            refused.append(f"{text:#x}: {why}")
        raise VmError(f"{self.where}: kernel {self.kernel.version} not found in memory "
                      "(not booted yet, or another kernel runs)"
                      + (f"; banners refused at {'; '.join(refused[:4])}" if refused else ""))

    def _candidate(self, text: int, image: KernelImage) -> tuple[int | None, str]:
        """(the KASLR offset, "") if a kernel is loaded at physical `text`, else (None,
        why not): the offset its `phys_base` gives must be one KASLR chooses (2 MiB
        aligned, in 0..MAX_KASLR), and the image's bytes relocated for it must be there:
        of the pages at CHECKED (text and read-only data; boot patches a few bytes),
        at least MATCH of the bytes."""
        k = self.kernel
        at = text + k.image_offset("phys_base")
        if at + 8 > self.size:
            return None, "phys_base outside the RAM"
        phys_base, = struct.unpack("<Q", self.read(at, 8))
        slide = (text - phys_base + START_KERNEL_MAP - k.symbol("_text")) % (1 << 64)
        if slide >= MAX_KASLR or slide % PHYSICAL_ALIGN:
            return None, f"its phys_base gives KASLR offset {slide:#x}"
        same = total = 0
        for name in CHECKED:
            link = k.symbol(name) - k.symbol(name) % PAGE
            want = image.bytes_at(link, PAGE, slide)
            phys = text + link - k.symbol("_text")
            if phys + PAGE > self.size:
                return None, f"{name} outside the RAM"
            same += sum(a == b for a, b in zip(want, self.read(phys, PAGE)))
            total += PAGE
        if same < MATCH * total:
            return None, f"{same} of {total} bytes of the image there"
        return slide, ""

    @property
    def kaslr_offset(self) -> int:
        """How far the running kernel's virtual addresses are from the link-time ones
        (0 when booted with nokaslr): from the guest's `phys_base` (phys_base = physical
        _text - (virtual _text - __START_KERNEL_map)), read once when the kernel is
        located -- the guest may write it later, the kernel does not move."""
        self.text_phys
        return self._kaslr

    # ---- reading ------------------------------------------------------------------

    def phys(self, symbol: str) -> int:
        """The guest-physical address of a kernel image symbol."""
        addr = self.text_phys + self.kernel.image_offset(symbol)
        if not 0 <= addr < self.size:
            raise VmError(f"{self.where}: {symbol} at physical {addr:#x} is outside the "
                          f"{self.size >> 20} MiB of RAM")
        return addr

    def read(self, phys: int, length: int) -> bytes:
        if phys < 0 or length < 0 or phys + length > self.size:
            raise VmError(f"{self.where}: read of {length} bytes at {phys:#x} outside the RAM")
        data = os.pread(self._fd, length, phys)
        if len(data) != length:
            raise VmError(f"{self.where}: read of {length} bytes at {phys:#x}: got "
                          f"{len(data)} (the RAM memfd shrank?)")
        return data

    def translate(self, virt: int) -> int:
        """The guest-physical address of a running kernel's virtual address: in the direct
        map (page_offset_base up: all of RAM, linearly -- where task_structs and other
        slab objects live) by subtraction, elsewhere by `walk`."""
        if 0 <= virt - self._direct_base() < self.size:
            return virt - self._direct_base()
        return self.walk(virt)

    def _direct_base(self) -> int:
        if self._direct is None:
            self._direct = self.read_u64("page_offset_base")
        return self._direct

    def walk(self, virt: int) -> int:
        """The guest-physical address of a running kernel's virtual address, by walking
        the kernel's own 4-level page tables from `init_top_pgt` (what CR3 holds for
        kernel threads): 1 GiB and 2 MiB pages included."""
        table = self.phys("init_top_pgt")
        for level, shift in enumerate((39, 30, 21, 12)):
            entry = struct.unpack("<Q", self.read(table + 8 * (virt >> shift & 511), 8))[0]
            if not entry & PRESENT:
                raise VmError(f"{self.where}: virtual {virt:#x} not mapped (level {4 - level} "
                              f"entry {entry:#x})")
            if shift in (30, 21) and entry & HUGE or shift == 12:
                size = 1 << shift
                return (entry & FRAME & ~(size - 1)) | (virt & (size - 1))
            table = entry & FRAME
        raise AssertionError("unreachable")

    def read_virt(self, virt: int, length: int) -> bytes:
        """`length` bytes at a kernel virtual address: at once within the direct map (RAM
        there is linear), else page by page."""
        if 0 <= (at := virt - self._direct_base()) and at + length <= self.size:
            return self.read(at, length)
        out = []
        while length > 0:
            n = min(length, 0x1000 - (virt & 0xFFF))
            out.append(self.read(self.translate(virt), n))
            virt, length = virt + n, length - n
        return b"".join(out)

    def virt(self, symbol: str) -> int:
        """The running kernel's virtual address of `symbol` (its link address + KASLR)."""
        return (self.kernel.symbol(symbol) + self.kaslr_offset) % (1 << 64)

    def read_u64(self, symbol: str) -> int:
        return struct.unpack("<Q", self.read(self.phys(symbol), 8))[0]

    def tasks(self, limit: int | None = None) -> list[tuple[int, str]]:
        """(pid, comm) of every task on the kernel's task list (init_task.tasks, a
        circular list of task_structs linked through their `tasks` member), read through
        the page tables; `limit` bounds a list a hostile or changing guest keeps long."""
        ident = self._ident()
        return [ident(t) for t in self._task_list(limit)]

    def _bound(self, symbol: str, extra: int = 0) -> int:
        """WALK_LIMIT, or the guest's own bound if lower: its int `symbol` (max_threads:
        fork refuses a thread past it; pid_max: pids are below it) + `extra`; unreadable
        or not positive, WALK_LIMIT."""
        try:
            value, = struct.unpack("<i", self.read(self.phys(symbol), 4))
        except VmError:
            return WALK_LIMIT
        return min(WALK_LIMIT, value + extra) if value > 0 else WALK_LIMIT

    def _tasks_bound(self, limit: int | None) -> int:
        """A walk's limit of tasks: `limit`, or the guest's threads-max (+ init_task,
        not counted in it), at most WALK_LIMIT."""
        return self._bound("max_threads", 1) if limit is None else limit

    def process_table(self, limit: int | None = None) -> list[GuestTask]:
        """Every process on the task list with its state, resident memory (its mm's
        rss counters: file, anon and shmem pages; they lag the truth by a few dozen
        pages per thread, which the kernel folds in now and then), start time and
        exec (mm->exe_file: what it runs, from which exec; unlike its comm, not its own
        to change)."""
        k = self.kernel
        # each task's members, and its mm's, read at once (a span of each struct), not
        # one read apiece: a few reads a task, and its members as of one moment
        at = {m: k.member("task_struct", m) for m, _ in TASK_MEMBERS}
        lo = min(at.values())
        span = max(at[m] + struct.calcsize(f) for m, f in TASK_MEMBERS) - lo
        tgid_at = at["tgid"]
        rss_at, exe_at = k.member("mm_struct", "rss_stat"), k.member("mm_struct", "exe_file")
        stride, value = k.rss_layout
        counters = [rss_at + stride * i + value for i in RSS_COUNTERS]
        mm_lo = min(*counters, exe_at)
        mm_span = max(*counters, exe_at) + 8 - mm_lo
        out = []
        for task in self._task_list(limit):
            buf = self.read_virt(task + lo, span)
            state, exit_state, mm, parent, start, pid, comm = (
                struct.unpack_from(f, buf, at[m] - lo)[0] for m, f in TASK_MEMBERS if m != "tgid")
            pages, exe = 0, 0
            if mm:
                mm_buf = self.read_virt(mm + mm_lo, mm_span)
                pages = sum(max(0, struct.unpack_from("<q", mm_buf, c - mm_lo)[0])
                            for c in counters)
                exe, = struct.unpack_from("<Q", mm_buf, exe_at - mm_lo)
            pages = min(pages, self.size // PAGE)  # (corrupt counters: no more than the RAM)
            ppid, = struct.unpack("<i", self.read_virt(parent + tgid_at, 4)) if parent != task else (0,)
            name = comm.split(b"\0", 1)[0].decode(errors="replace")
            out.append(GuestTask(pid, ppid, name, task_state(state, exit_state), pages * PAGE,
                                 start, exe))
        return out

    def load(self) -> tuple[float, float, float]:
        """The guest kernel's load averages (1, 5 and 15 minutes: avenrun), to two
        decimals as its /proc/loadavg rounds them."""
        out = []
        for x in struct.unpack("<3Q", self.read(self.phys("avenrun"), 24)):
            x += FIXED_1 // 200
            out.append((x >> 11) + ((x & (FIXED_1 - 1)) * 100 >> 11) / 100)
        return out[0], out[1], out[2]

    def _task_list(self, limit: int | None) -> list[int]:
        """The task_struct addresses on init_task.tasks, in list order."""
        limit = self._tasks_bound(limit)
        link = self.kernel.member("task_struct", "tasks")
        head = self.virt("init_task") + link
        out, node, seen = [], head, {head}
        for _ in range(limit):
            out.append(node - link)
            node = struct.unpack("<Q", self.read_virt(node, 8))[0]
            if node == head:
                return out
            if node in seen:
                break
            seen.add(node)
        raise VmError(f"{self.where}: the task list has more than {limit} entries or loops")

    def _ident(self) -> Callable[[int], tuple[int, str]]:
        """A reader of a task's (pid, comm), the member offsets looked up once a walk."""
        pid_at, comm_at = (self.kernel.member("task_struct", m) for m in ("pid", "comm"))

        def ident(task: int) -> tuple[int, str]:
            pid, = struct.unpack("<i", self.read_virt(task + pid_at, 4))
            comm = self.read_virt(task + comm_at, 16).split(b"\0", 1)[0]
            return pid, comm.decode(errors="replace")
        return ident

    def task_list_settled(self) -> bool:
        """Whether no task list update is under way: `tasklist_lock` (a qrwlock, whose
        first byte is its writer's) is not write-held. A fork adds its task and an exit
        removes one under that lock; vCPUs stopped from outside stop between two
        instructions, maybe in such an update with stores still to come, and a list
        written then is overwritten by them once the guest runs."""
        return self.read(self.phys("tasklist_lock"), 1) == b"\0"

    def process_tree(self, limit: int | None = None) -> list[tuple[int, str, int]]:
        """(pid, comm, task address) of every process reachable from init_task through
        the `children`/`sibling` lists -- the process tree, a second kernel structure
        holding the same thread-group leaders as the task list (a rootkit that unlinks a
        task from `tasks` to hide it rarely unlinks it from its parent's children too)."""
        k = self.kernel
        limit = self._tasks_bound(limit)
        children, sibling = (k.member("task_struct", m) for m in ("children", "sibling"))
        ident = self._ident()
        root = self.virt("init_task")
        out, todo, seen = [], [root], {root}
        links = 2 * limit  # list links followed in all: each task is in one children list
        while todo:
            task = todo.pop()
            out.append((*ident(task), task))
            head = task + children
            node = struct.unpack("<Q", self.read_virt(head, 8))[0]
            in_list = set()
            while node != head:
                links -= 1
                if links < 0 or node in in_list:
                    raise VmError(f"{self.where}: the process tree has more than {limit} "
                                  "tasks or loops")
                in_list.add(node)
                if node - sibling not in seen:  # (else met in another list: re-parented
                    seen.add(node - sibling)  # while the guest ran)
                    todo.append(node - sibling)
                node = struct.unpack("<Q", self.read_virt(node, 8))[0]
        return out

    def pid_table(self, limit: int | None = None) -> dict[int, int]:
        """pid -> task_struct address of every process and thread with a pid in the
        initial pid namespace: the pid allocator's own map (`init_pid_ns.idr`, an xarray
        of `struct pid`), a third kernel structure beside the task list and the process
        tree -- the one the kernel looks pids up in (kill, /proc), so a task unlinked
        from both lists is still here. A pid no task holds (one being freed) is left out."""
        return {pid: task for pid, (task, _) in self._pid_map(limit).items()}

    def _pid_map(self, limit: int | None) -> dict[int, tuple[int, int]]:
        """pid -> (task_struct address, struct pid address): pid_table's, with the pids;
        at most `limit` entries, by default pid_max (at most WALK_LIMIT)."""
        k = self.kernel
        limit = self._bound("pid_max") if limit is None else limit
        idr = self.virt("init_pid_ns") + k.member("pid_namespace", "idr")
        rt = idr + k.member("idr", "idr_rt")
        base, = struct.unpack("<I", self.read_virt(idr + k.member("idr", "idr_base"), 4))
        head, = struct.unpack("<Q", self.read_virt(rt + k.member("xarray", "xa_head"), 8))
        first_at = k.member("pid", "tasks")  # tasks[PIDTYPE_PID].first
        link_at = k.member("task_struct", "pid_links")  # pid_links[PIDTYPE_PID]
        out = {}
        for index, pid in self._xa_entries(head, limit):
            first, = struct.unpack("<Q", self.read_virt(pid + first_at, 8))
            if first:
                out[base + index] = (first - link_at, pid)
        return out

    def _xa_entries(self, head: int, limit: int) -> list[tuple[int, int]]:
        """(index, entry) of every entry of the xarray whose `xa_head` is `head`
        (lib/xarray.c: a node pointer is tagged 2 in its low bits and above 4096; smaller
        tagged values are sibling and retry markers, odd ones values: none a pointer)."""
        def is_node(e: int) -> bool:
            return e & 3 == 2 and e > 4096
        if not head:
            return []
        if not is_node(head):
            return [(0, head)] if head & 3 == 0 else []
        k = self.kernel
        shift_at, slots_at = k.member("xa_node", "shift"), k.member("xa_node", "slots")
        out, todo, seen = [], [(head - 2, 0)], {head - 2}
        while todo:
            node, base = todo.pop()
            if len(seen) > limit or len(out) > limit:
                raise VmError(f"{self.where}: the pid map has more than {limit} nodes or "
                              "entries, or loops")
            shift = self.read_virt(node + shift_at, 1)[0]
            if shift > 58:
                raise VmError(f"{self.where}: a pid map node at {node:#x} has shift {shift}")
            for i, e in enumerate(struct.unpack("<64Q", self.read_virt(node + slots_at, 512))):
                if is_node(e) and shift:
                    if e - 2 in seen:  # a node is in one place of a tree
                        raise VmError(f"{self.where}: the pid map loops (node {e - 2:#x} "
                                      "twice)")
                    seen.add(e - 2)
                    todo.append((e - 2, base + (i << shift)))
                elif e and e & 3 == 0:
                    out.append((base + (i << shift), e))
        return out

    def hidden_tasks(self) -> list[tuple[int, str, int]]:
        """Processes the kernel knows but its task list does not show: hidden ones. Known
        by the process tree (a rootkit that unlinks a task from `tasks` rarely unlinks it
        from its parent's children too) or by the pid map (`pid_table`: one that does
        is still there, as the kernel must find its pid to run it); of the pid map, only
        thread-group leaders (threads are never on the task list): a task is one if it
        is its own `group_leader` or its pid's PIDTYPE_TGID list holds it -- addresses
        compared, not its `tgid`, a number a rootkit rewrites at no cost to the task."""
        listed = {pid for pid, _ in self.tasks()}
        out = [t for t in self.process_tree() if t[0] not in listed]
        seen = listed | {pid for pid, _, _ in out}
        ident = self._ident()
        for pid, (task, pid_struct) in sorted(self._pid_map(None).items()):
            if pid not in seen and self._leads_group(task, pid_struct):
                out.append((*ident(task), task))
        return out

    def _leads_group(self, task: int, pid: int) -> bool:
        """Whether `task`, the holder of `struct pid` at `pid`, leads its thread group."""
        k = self.kernel
        leader, = struct.unpack("<Q", self.read_virt(task + k.member("task_struct", "group_leader"), 8))
        # pid->tasks[PIDTYPE_TGID].first: the leader's pid_links[PIDTYPE_TGID] (an
        # hlist_head is 8 bytes, an hlist_node 16), on a thread's pid empty
        first, = struct.unpack("<Q", self.read_virt(pid + k.member("pid", "tasks") + 8, 8))
        return task in (leader, first - k.member("task_struct", "pid_links") - 16)

    def readings(self) -> Readings:
        """The guest kernel's counters now (vm_zone_stat, vm_node_stat: global sums of
        per-CPU counts, which lag them by a few pages per CPU, and may read below 0)."""
        k = self.kernel

        def stat(array: str, enum: str, item: str) -> int:
            at = self.phys(array) + 8 * k.enum(enum, item)
            return max(0, struct.unpack("<q", self.read(at, 8))[0])

        node = lambda item: stat("vm_node_stat", "node_stat_item", item)  # noqa: E731
        return Readings(
            jiffies=self.jiffies(),
            free=stat("vm_zone_stat", "zone_stat_item", "NR_FREE_PAGES") * PAGE,
            file=node("NR_FILE_PAGES") * PAGE, shmem=node("NR_SHMEM") * PAGE,
            anon=node("NR_ANON_MAPPED") * PAGE,
            slab_unreclaimable=node("NR_SLAB_UNRECLAIMABLE_B") * PAGE,
            threads=struct.unpack("<i", self.read(self.phys("nr_threads"), 4))[0],
            forks=self.read_u64("total_forks"),
            refaults=node("WORKINGSET_REFAULT_ANON") + node("WORKINGSET_REFAULT_FILE"),
            running=self.nr_running())

    def nr_running(self) -> int:
        """Runnable tasks on the guest's run queues: each possible CPU's `runqueues`
        (a per-CPU variable: its symbol is an offset into the CPU's per-CPU area, at
        `__per_cpu_offset[cpu]`) `nr_running`, summed."""
        k = self.kernel
        cpus = struct.unpack("<I", self.read(self.phys("nr_cpu_ids"), 4))[0]
        if not 1 <= cpus <= MAX_CPUS:
            raise VmError(f"{self.where}: nr_cpu_ids is {cpus}, not 1..{MAX_CPUS}")
        areas = struct.unpack(f"<{cpus}Q", self.read(self.phys("__per_cpu_offset"), 8 * cpus))
        at = k.symbol("runqueues") + k.member("rq", "nr_running")
        return sum(struct.unpack("<I", self.read_virt((area + at) % (1 << 64), 4))[0]
                   for area in areas)

    def jiffies(self) -> int:
        """The guest kernel's tick counter (jiffies_64): it stops when the guest's
        kernel stops ticking (vCPUs stopped, the guest hung)."""
        return self.read_u64("jiffies_64")

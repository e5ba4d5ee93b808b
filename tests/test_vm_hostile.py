"""A hostile guest, or a compromised QEMU. The walks of the guest kernel's structures
(task list, process tree, pid map), its counters and its kernel text are read from RAM
the guest writes as it likes: each walk ends with a clear error in work bounded by its
limit (counted in reads, not timed), and nothing a guest writes costs the reader memory
of its own. QMP and the gdbstub are spoken with a QEMU that may flood, nest or stall:
each exchange ends by its deadline with a clear error, and the next one starts clean.

The guests here are crafted memfds: the structures are laid out by hand at the offsets a
small fake kernel profile names (a walk only needs those), the rest of the RAM a hole.
The QEMUs are peers on unix sockets that say what a compromised one would."""

import os
import socket
import struct
import threading

import pytest

from backdoors.errors import VmError
from backdoors.vm.gdb import MAX_PACKET, GdbStub
from backdoors.vm.qmp import Qmp
from backdoors.vm.integrity import PAGE_FINDINGS, Baseline, Checker, Page, Symbols
from backdoors.vm.memory import MAX_RAM, PAGE, GuestMemory

DIRECT = 0xFFFF_8880_0000_0000  # page_offset_base: RAM at DIRECT + physical
INIT = 0x10_0000  # init_task's physical address
BOUNDS = 0x3000  # max_threads, pid_max
MEMBERS = {
    "task_struct.tasks": 0x10, "task_struct.children": 0x20, "task_struct.sibling": 0x30,
    "task_struct.pid": 0x40, "task_struct.tgid": 0x44, "task_struct.comm": 0x50,
    "task_struct.__state": 0x60, "task_struct.exit_state": 0x64, "task_struct.mm": 0x68,
    "task_struct.real_parent": 0x70, "task_struct.pid_links": 0x78,
    "task_struct.start_time": 0x80, "mm_struct.rss_stat": 0x0, "mm_struct.exe_file": 0x40,
    "pid_namespace.idr": 0x0, "idr.idr_rt": 0x0, "idr.idr_base": 0x20,
    "xarray.xa_head": 0x8, "xa_node.shift": 0x0, "xa_node.slots": 0x28, "pid.tasks": 0x8,
    "task_struct.group_leader": 0x88,
}


class Profile:
    """The few facts of a kernel profile the walks use."""

    version = "6.1.0-hostile"
    rss_layout = (8, 0)  # counters 8 bytes apart, the value first
    symbols: dict[str, int] = {}  # (no ops tables to check)

    def member(self, struct_name: str, member: str) -> int:
        return MEMBERS[f"{struct_name}.{member}"]


class Guest(GuestMemory):
    """A crafted guest: its symbols at fixed places (no banner scan, no KASLR)."""

    counted = 0

    def __init__(self, fd: int):
        super().__init__(fd, Profile())
        self._direct = DIRECT

    def virt(self, symbol: str) -> int:
        return DIRECT + {"init_task": INIT, "init_pid_ns": 0x1000}[symbol]

    def phys(self, symbol: str) -> int:  # the guest's bounds of its walks (0: none)
        return {"max_threads": BOUNDS, "pid_max": BOUNDS + 4}[symbol]

    def read(self, phys: int, length: int) -> bytes:
        self.counted += 1
        return super().read(phys, length)


@pytest.fixture
def ram():
    """A 16 MiB guest RAM memfd, written by `put(phys, fmt, *values)`."""
    fd = os.memfd_create("bdt-hostile-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 << 20)

    def put(phys: int, fmt: str, *values) -> None:
        os.pwrite(fd, struct.pack(fmt, *values), phys)
    yield fd, put
    os.close(fd)


def _task(put, phys: int, pid: int, comm: bytes, *, parent: int = INIT) -> None:
    put(phys + MEMBERS["task_struct.pid"], "<ii", pid, pid)
    put(phys + MEMBERS["task_struct.comm"], "16s", comm)
    put(phys + MEMBERS["task_struct.real_parent"], "<Q", DIRECT + parent)
    for member in ("children", "tasks"):  # empty lists: pointing at themselves
        at = phys + MEMBERS[f"task_struct.{member}"]
        put(at, "<Q", DIRECT + at)


def test_a_task_list_that_loops_short_of_its_head_ends_at_once(ram):
    fd, put = ram
    _task(put, INIT, 0, b"swapper")
    a, b = INIT + 0x1000, INIT + 0x2000
    tasks = MEMBERS["task_struct.tasks"]
    put(INIT + tasks, "<Q", DIRECT + a + tasks)  # init -> a -> b -> a -> ...
    put(a + tasks, "<Q", DIRECT + b + tasks)
    put(b + tasks, "<Q", DIRECT + a + tasks)
    with Guest(fd) as g:
        with pytest.raises(VmError, match="task list .* loops"):
            g.tasks()
        assert g.counted < 20  # not the 65,536 reads of the limit


def test_a_process_tree_of_interleaved_rings_ends_in_reads_bounded_by_its_limit(ram):
    """Outside review: two rings of list heads 16 bytes apart make each child's own
    children head the next one's sibling link: every task added the whole ring again to
    the work list, limit**2 entries (hours at the default limit)."""
    fd, put = ram
    ring, base = 400, INIT + 0x10_0000
    children, sibling = MEMBERS["task_struct.children"], MEMBERS["task_struct.sibling"]
    node = lambda i: DIRECT + base + 32 * (i % ring)  # noqa: E731
    for i in range(ring):
        put(base + 32 * i, "<Q", node(i + 1))  # a ring of sibling links
        put(base + 32 * i - (sibling - children), "<Q", node(i + 1) - (sibling - children))
    put(INIT + children, "<Q", node(0))  # init's children: the ring, never back at its head
    with Guest(fd) as g:
        with pytest.raises(VmError, match="process tree"):
            g.process_tree(limit=ring)
        assert g.counted < 20 * ring, g.counted


def test_a_pid_map_whose_nodes_repeat_ends_at_once(ram):
    """Outside review: an xarray node whose slots all point at one other node (or at
    itself) was walked once per pointer: 65,536 nodes, 600 MiB, per call."""
    fd, put = ram
    rt = 0x1000 + MEMBERS["xarray.xa_head"]
    a, b = 0x2000, 0x3000
    put(rt, "<Q", DIRECT + a + 2)
    put(a, "B", 6)
    put(a + MEMBERS["xa_node.slots"], "<64Q", *([DIRECT + a + 2] + [DIRECT + b + 2] * 63))
    put(b, "B", 0)
    with Guest(fd) as g:
        with pytest.raises(VmError, match="pid map loops"):
            g.pid_table()
        assert g.counted < 10


def _pid(put, index: int, struct_pid: int, task: int, *, leader: bool) -> None:
    """Pid map slot `index` (a one-level xarray at 0x2000) -> struct pid at `struct_pid`,
    held by `task` (PIDTYPE_PID), and with `leader` its thread group's (PIDTYPE_TGID)."""
    put(0x1000 + MEMBERS["xarray.xa_head"], "<Q", DIRECT + 0x2000 + 2)
    put(0x2000 + MEMBERS["xa_node.slots"] + 8 * index, "<Q", DIRECT + struct_pid)
    links = DIRECT + task + MEMBERS["task_struct.pid_links"]
    put(struct_pid + MEMBERS["pid.tasks"], "<QQ", links, links + 16 if leader else 0)


def test_a_hidden_process_with_a_forged_tgid_is_still_found_by_the_pid_map(ram):
    """Outside review: a process unlinked from the task list and its parent's children
    counted from the pid map only if task->tgid == its pid: one 4-byte write hid it.
    Leadership is its own `group_leader`, or its pid's PIDTYPE_TGID link: addresses."""
    fd, put = ram
    _task(put, INIT, 0, b"swapper")
    put(INIT + MEMBERS["task_struct.group_leader"], "<Q", DIRECT + INIT)
    hidden, thread = INIT + 0x4000, INIT + 0x8000  # on no list; a thread of init
    _task(put, hidden, 2, b"evil")
    put(hidden + MEMBERS["task_struct.tgid"], "<i", 1)  # the forged tgid
    put(hidden + MEMBERS["task_struct.group_leader"], "<Q", DIRECT + hidden)
    _task(put, thread, 3, b"worker")
    put(thread + MEMBERS["task_struct.tgid"], "<i", 0)
    put(thread + MEMBERS["task_struct.group_leader"], "<Q", DIRECT + INIT)
    _pid(put, 2, 0x9000, hidden, leader=True)
    _pid(put, 3, 0x9100, thread, leader=False)
    with Guest(fd) as g:
        assert g.pid_table() == {2: DIRECT + hidden, 3: DIRECT + thread}
        assert g.hidden_tasks() == [(2, "evil", DIRECT + hidden)]
        # its group_leader pointed elsewhere too: its pid's TGID link still says leader
        put(hidden + MEMBERS["task_struct.group_leader"], "<Q", DIRECT + INIT)
        assert g.hidden_tasks() == [(2, "evil", DIRECT + hidden)]


def test_a_failing_process_table_walk_is_counted_and_logged_by_the_sampler(ram, caplog):
    """Outside review: a VmError of the sampler's task list walk was swallowed: no
    count, no log. (The guest's counters are given; the walk is the crafted RAM's.)"""
    from backdoors.vm.memory import Readings
    from backdoors.vm.sensors import GuestSampler, GuestSensors

    class Counters(Guest):
        def jiffies(self) -> int:
            return 100 + self.counted

        def readings(self) -> Readings:
            return Readings(self.jiffies(), 1 << 30, 0, 0, 0, 0, 10, 10)

        def load(self) -> tuple[float, float, float]:
            return 0.0, 0.0, 0.0

        def phys(self, symbol: str) -> int:  # the data the churn sensor visits
            return {"_sdata": 0x20_0000, "_edata": 0x20_2000}.get(symbol, 0x20_0000)

    fd, put = ram
    _task(put, INIT, 0, b"swapper")
    a, b = INIT + 0x1000, INIT + 0x2000
    tasks = MEMBERS["task_struct.tasks"]
    put(INIT + tasks, "<Q", DIRECT + a + tasks)  # init -> a -> b -> a -> ...: a loop
    put(a + tasks, "<Q", DIRECT + b + tasks)
    put(b + tasks, "<Q", DIRECT + a + tasks)
    with Counters(fd) as g:
        sensors = GuestSensors("hostile", g)  # its first walk fails: it is built all the same
        try:
            sampler = GuestSampler(sensors)
            sensors._tasks_due = 0.0
            with caplog.at_level("WARNING", logger="backdoors.vm"):
                sampler.step()
            assert sampler.errors == 1 and "process table walk" in sampler.last_error
            assert "loops" in caplog.text
        finally:
            sensors.close()


def test_a_forged_long_task_list_is_walked_no_further_than_the_guests_threads_max(ram):
    """Outside review: a compromised kernel that links 65,535 fake tasks into its lists
    cost the host ~1 CPU-second a walk. A walk now stops at the guest's own bound:
    max_threads (fork refuses a thread past it) for the lists, pid_max for the pid map."""
    fd, put = ram
    _task(put, INIT, 0, b"swapper")
    tasks, children, sibling = (MEMBERS[f"task_struct.{m}"] for m in ("tasks", "children", "sibling"))
    base, n = 0x20_0000, 5000
    for i in range(n):  # init -> t0 -> ... -> t4999 -> init, in both lists; no loop
        at, nxt = base + 0x100 * i, base + 0x100 * (i + 1)
        _task(put, at, 1000 + i, b"fake")
        put(at + tasks, "<Q", DIRECT + (nxt + tasks if i + 1 < n else INIT + tasks))
        put(at + sibling, "<Q", DIRECT + (nxt + sibling if i + 1 < n else INIT + children))
    put(INIT + tasks, "<Q", DIRECT + base + tasks)
    put(INIT + children, "<Q", DIRECT + base + sibling)
    with Guest(fd) as g:
        assert len(g.tasks()) == n + 1 and len(g.process_tree()) == n + 1  # no bound: all
        put(BOUNDS, "<i", 200)  # threads-max 200
        for walk in (g.tasks, g.process_table, g.process_tree):
            g.counted = 0
            with pytest.raises(VmError, match="more than 201 "):
                walk()
            assert g.counted < 10 * 201, (walk, g.counted)


def test_corrupt_rss_counters_read_as_at_most_the_ram(ram):
    """Outside review: counters near 2**63 made a resident size past 2**64, which the
    agent's reply could not encode: no process table for that guest at all."""
    fd, put = ram
    _task(put, INIT, 1, b"init", parent=INIT)
    mm = INIT + 0x8000
    put(INIT + MEMBERS["task_struct.mm"], "<Q", DIRECT + mm)
    put(mm, "<qqqq", 2**62, 2**62, 0, 2**62)
    with Guest(fd) as g:
        [task] = g.process_table()
        assert task.rss == g.size


def test_reads_allocate_nothing_of_the_guests_untouched_ram(ram):
    """Outside review: a mapping of the RAM allocated each untouched page it read (a
    memfd's hole is no zero page), charged to the agent and locked by its mlockall."""
    fd, _ = ram
    with Guest(fd) as g:
        for at in range(0, g.size, PAGE):
            assert g.read(at, 8) == bytes(8)
    assert os.fstat(fd).st_blocks == 0


def test_ram_past_the_pci_hole_is_refused():
    """Outside review: with more than 2 GiB, memfd offsets above it are not the guest's
    physical addresses, and a kill wrote a word read from the wrong place."""
    fd = os.memfd_create("bdt-hostile-big", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MAX_RAM + PAGE)  # (a hole: nothing allocated)
        with pytest.raises(VmError, match="over the 2048 MiB read"):
            GuestMemory(fd, Profile())
    finally:
        os.close(fd)


def test_a_page_flipped_all_over_gives_a_bounded_number_of_findings(ram):
    """Outside review: one finding per changed run, 2,048 for a page with every other
    byte flipped, kept open: gigabytes over a kernel's pages. Past PAGE_FINDINGS a page's
    runs are one finding; a clean read of the page closes its findings."""
    fd, put = ram
    phys = 0x20_0000
    clean = bytes(PAGE)
    page = Page(0xFFFF_FFFF_8100_0000, phys, b"", clean, "image", "rodata")
    with Guest(fd) as g:
        baseline = Baseline(g, 0, [page], [], b"", {}, Symbols({"_rodata": page.link},
                                                                page.link))
        checker = Checker(baseline)
        os.pwrite(fd, bytes([0xFF, 0]) * (PAGE // 2), phys)
        found = checker._new(checker._page(page), set())
        assert len(found) == PAGE_FINDINGS and len(checker.current()) == PAGE_FINDINGS
        assert found[-1].detail == f"{PAGE // 2 - PAGE_FINDINGS + 1} bytes differ in " \
                                   f"{PAGE // 2 - PAGE_FINDINGS + 1} runs"
        os.pwrite(fd, clean, phys)
        assert checker._page(page) == [] and checker.current() == []


class Peer:
    """A unix socket server at `path`: each connection is handed to `serve(conn)` on a
    thread of its own."""

    def __init__(self, path, serve):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.serve, self.conns = serve, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()
            n += 1

    def _run(self, conn, n) -> None:
        try:
            self.serve(conn, n)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _greet(conn) -> "socket.SocketIO":
    f = conn.makefile("rb")
    conn.sendall(b'{"QMP": {"version": {}}}\n')
    f.readline()
    conn.sendall(b'{"return": {}}\n')
    f.readline()  # the command
    return f


def test_qmp_events_without_end_do_not_hold_a_command_past_its_deadline(tmp_path):
    """Outside review: the deadline was a per-recv timeout, so a QEMU sending events
    without end held the command (and every other user of the connection) for good."""
    stop = threading.Event()

    def serve(conn, n):
        _greet(conn)
        while not stop.is_set():
            conn.sendall(b'{"event": "RTC_CHANGE", "data": {}}\n' * 50)
    peer = Peer(tmp_path / "qmp.sock", serve)
    try:
        q = Qmp(tmp_path / "qmp.sock", "test", timeout=0.5)
        with pytest.raises(VmError, match="did not answer in time"):
            q.cmd("query-status")
    finally:
        stop.set()
        peer.close()


def test_qmp_json_nested_past_the_parser_is_an_error_and_the_next_command_is_clean(tmp_path):
    """Outside review: a reply nested past the JSON parser's depth raised RecursionError,
    which no caller caught, and left the connection as it was: the next command was
    answered with the reply queued behind it."""
    def serve(conn, n):
        f = _greet(conn)
        if n == 0:
            conn.sendall(b"[" * 100_000 + b"\n" + b'{"return": "stale"}\n')
            f.readline()
        else:
            conn.sendall(b'{"return": "fresh"}\n')
            f.readline()
    peer = Peer(tmp_path / "qmp.sock", serve)
    try:
        q = Qmp(tmp_path / "qmp.sock", "test", timeout=5.0)
        with pytest.raises(VmError, match="QMP query-status failed"):
            q.cmd("query-status")
        assert q.cmd("cont") == "fresh"
    finally:
        peer.close()


def test_a_qmp_command_waits_for_another_no_longer_than_its_own_deadline(tmp_path):
    """Outside review: the connection's lock was taken without a timeout: a command
    behind one that hangs waited as long as that one."""
    def serve(conn, n):
        _greet(conn)
        threading.Event().wait(30)  # never answers
    peer = Peer(tmp_path / "qmp.sock", serve)
    try:
        q = Qmp(tmp_path / "qmp.sock", "test", timeout=20.0)
        hung = threading.Thread(target=lambda: pytest.raises(VmError, q.cmd, "stop"),
                                daemon=True)
        hung.start()
        while not q._lock.locked():
            threading.Event().wait(0.01)
        with pytest.raises(VmError, match="another command held the connection"):
            q.cmd("query-status", timeout=0.2)
    finally:
        peer.close()


def test_a_gdbstub_that_never_ends_a_packet_is_an_error_not_a_growing_buffer(tmp_path):
    """Outside review: bytes without a packet's end were kept without bound, with no
    deadline over the whole reply."""
    stop = threading.Event()

    def serve(conn, n):
        conn.recv(4096)
        while not stop.is_set():
            conn.sendall(b"$" + b"0" * 65536)
    peer = Peer(tmp_path / "gdb.sock", serve)
    try:
        with GdbStub(tmp_path / "gdb.sock", timeout=5.0) as stub:
            with pytest.raises(VmError, match=f"over {MAX_PACKET} bytes without a whole"):
                stub.request("g")
    finally:
        stop.set()
        peer.close()


def test_a_gdbstub_reply_that_is_not_the_bytes_asked_for_is_an_error(tmp_path):
    def serve(conn, n):
        for reply in (b"OK", b"zz" * 4):  # physical mode, then a read answered with junk
            conn.recv(4096)
            conn.sendall(b"+$%s#%02x" % (reply, sum(reply) & 0xFF))
        conn.recv(4096)
    peer = Peer(tmp_path / "gdb.sock", serve)
    try:
        with GdbStub(tmp_path / "gdb.sock", timeout=5.0) as stub:
            with pytest.raises(VmError, match="answered a read of 4 bytes"):
                stub.read_phys(0x1000, 4)
    finally:
        peer.close()


def test_a_tree_kill_spares_the_protected_processes_and_theirs():
    """Outside review: the monitor chose a guest's culprit outside `protect`, but the
    agent's tree kill then took its whole subtree: a protected service started by the
    culprit's shell died with it. The kill now spares the service of `spare` (the
    monitor's protect, vm.service) and what descends from it."""
    from backdoors.nodes import subtree
    from backdoors.vm.memory import GuestTask
    from backdoors.vm.service import service

    rows = [GuestTask(10, 1, "sh", "S", 0, 10, 7), GuestTask(11, 10, "httpd", "S", 0, 11, 7),
            GuestTask(12, 11, "httpd", "S", 0, 12, 7), GuestTask(13, 10, "spin", "R", 0, 13, 7),
            GuestTask(14, 13, "spin", "R", 0, 14, 7)]
    assert subtree(rows, 10) == {10, 11, 12, 13, 14}
    assert subtree(rows, 10, service(rows, {"httpd"})) == {10, 13, 14}

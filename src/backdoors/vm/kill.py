"""Killing a guest's processes from outside: SIGKILL written into its kernel's memory.

There is no agent inside the guest to call kill(2). What kill(2) leaves behind is
written instead, with the vCPUs stopped (QMP `stop`, through QEMU's gdbstub, at a stop
outside any task list update, as healing writes): SIGKILL in the thread group's shared
pending set (`signal->shared_pending.signal`) and, as kill(2) does for a fatal signal, in
each of its threads' own (`task_struct.pending.signal`), with TIF_SIGPENDING in each
thread's flags (`thread_info.flags`, set by an atomic instruction in the guest, so a vCPU
never stops half-way through it). When the guest runs again, a thread going back to user
space -- at its next system call or timer tick, at once for a running one -- sees the
flag, dequeues SIGKILL, and its whole group exits. A signalled parent forks no more:
copy_process refuses at its start while a signal is pending, and one stopped half-way
through a fork is ended before it links the child (a fatal signal, the thread's own
SIGKILL, lets no child slip out), so a fork bomb leaves no orphan behind.

What is not written is the wake-up kill(2) also does (signal_wake_up): a thread asleep
in the guest dies when it next wakes, not before. Runaway processes -- a memory hog, a
fork bomb's forking processes -- are running; `kill()` reports the ones still there.
"""

from __future__ import annotations

import struct

from ..errors import VmError
from ..nodes import subtree
from .machine import settled_session
from .service import service

SIGKILL = 9
TIF_SIGPENDING = 2  # arch/x86/include/asm/thread_info.h
#: threads of one group written at most (a loop in a hostile list ends here)
MAX_THREADS = 1 << 16


def kill(vm, pid: int, *, comm: str | None = None, tree: bool = False,
         spare: frozenset[str] = frozenset(), attempts: int = 200) -> dict[int, int]:
    """SIGKILL the guest's process `pid` -- and with `tree` every descendant of it but
    the service processes of the comms in `spare` (vm.service) and theirs -- through
    `vm` (a machine.Vm or a node.VmNode). `comm`: refuse unless the process's is that
    (the pid was read from an older table). Returns pid -> task_struct address of every
    process signalled; VmError if there is no such process, or it is one to spare."""
    memory = vm.memory()
    with settled_session(vm, attempts, lock=True) as (stub, ok):
        if not ok:
            raise VmError(f"{memory.where}: the task list was mid-update at each of "
                          f"{attempts} stops: nothing killed")
        table = memory.process_table()
        named = next((t.comm for t in table if t.pid == pid), None)
        if named is None:
            raise VmError(f"{memory.where}: no process {pid} in the guest")
        if comm is not None and named != comm:
            raise VmError(f"{memory.where}: process {pid} is {named!r} now, not {comm!r}")
        spared = service(table, spare)
        if pid in spared:
            raise VmError(f"{memory.where}: process {pid} is the guest's service {named!r}, "
                          "one to spare")
        pids = subtree(table, pid, spared) if tree else {pid}
        tasks = {p: t for p, t in memory.pid_table().items() if p in pids}
        writes = []  # all read first (bounded), then written
        for task in tasks.values():
            writes += _writes(memory, task)
            if len(writes) > 2 * MAX_THREADS + len(tasks):
                raise VmError(f"{memory.where}: more than {MAX_THREADS} threads to signal: "
                              "nothing killed")
        for phys, data in writes:
            stub.write_phys(phys, data)
        return tasks


def alive(memory, tasks: dict[int, int]) -> list[int]:
    """The pids of `tasks` (pid -> task_struct address, as `kill` returned) still alive:
    holding their pid with the same task, and not exited (a zombie whose parent has not
    reaped it yet is dead: it holds its pid, not its memory)."""
    now = memory.pid_table()
    exit_at = memory.kernel.member("task_struct", "exit_state")
    return sorted(p for p, task in tasks.items() if now.get(p) == task
                  and not struct.unpack("<i", memory.read_virt(task + exit_at, 4))[0])


def _writes(memory, task: int) -> list[tuple[int, bytes]]:
    """(physical address, bytes) that leave SIGKILL pending for `task`'s thread group."""
    k = memory.kernel
    member = k.member
    u64 = lambda virt: struct.unpack("<Q", memory.read_virt(virt, 8))[0]  # noqa: E731
    signal = u64(task + member("task_struct", "signal"))
    pending = signal + member("signal_struct", "shared_pending") + member("sigpending", "signal")
    out = [(memory.translate(pending), struct.pack("<Q", u64(pending) | 1 << (SIGKILL - 1)))]
    flags_at = member("task_struct", "thread_info") + member("thread_info", "flags")
    own_at = member("task_struct", "pending") + member("sigpending", "signal")
    link = member("task_struct", "thread_node")
    head = signal + member("signal_struct", "thread_head")
    node, seen = u64(head), set()
    for _ in range(MAX_THREADS):
        if node == head:
            return out
        if node in seen:
            break
        seen.add(node)
        thread = node - link
        for at, bit in ((flags_at, 1 << TIF_SIGPENDING), (own_at, 1 << (SIGKILL - 1))):
            out.append((memory.translate(thread + at), struct.pack("<Q", u64(thread + at) | bit)))
        node = u64(node)
    raise VmError(f"{memory.where}: the thread list of task {task:#x} loops")

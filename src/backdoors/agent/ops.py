"""The RPC operations: argument types, where each runs, and what it does.

Each Op has a strict msgspec argument type (decoded from the request's raw args), a
`where` ("inline" on the event loop: memory-only and quick; "memory": a region copy that
may retry, on the node's own read workers, or the shared memory workers for an op without
a node; "node": anything touching /proc or cgroupfs, on the node's own workers under the
op deadline; "each": a "memory" op of one node run for each of several nodes in one
request, each on its own node's read workers under its own deadline, `sensors_many`).
Whether it is destructive (held for votes when the quorum is above 1) is read from the
one table of them, `protocol.DESTRUCTIVE`.
`OPS` is the table of ops; `Agent.add_op` extends it. An op sees the agent only through
`AgentView`: its configuration, nodes and tables.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Protocol

import msgspec

from ..common.procs import (
    exe_sha256, installed_exe, read_cmdline, same_start, unreaped_children, young_threads,
)
from ..errors import BackdoorsError, SensorBoxError, VmError
from ..nodes import KEEP, process_table, subtree
from ..sensors import read_consistent
from ..vm.kill import alive as guest_alive, kill as guest_kill_tasks
from .config import AgentConfig
from .leases import LeaseTable
from .mmreads import MmReads
from .pidmap import box_in_host_terms
from .protocol import (
    DESTRUCTIVE, HEAL_S, MAX_FINDINGS_REPLY, MAX_IO, ClaimReply, GuestFinding, GuestKillReply,
    GuestProcess, GuestProcesses, HealReply, IntegrityReply, KillReply, KillTreeReply,
    LimitsReply, NodeInfo, NodeStatus, Pong, ProcessRow, ProcessTable, RegionInfo, SensorsReply,
    WriteReply,
)
from .regions import Entry, NoSuchRegion, RegionTable
from .served import NodeRuntime
from .sessions import SessionTable
from .tokens import TokenTable

_encode = msgspec.msgpack.Encoder().encode
MAX_LEASE_S = 3600.0
#: What a reply's entries may take of a frame (the rest: the envelope and its fields).
REPLY_BYTES = MAX_IO - 8192
SENSORS_BUDGET = 0.25  # share of the op deadline `sensors` spends before leaving boxes unread
PID_MAX = 1 << 22  # the kernel's largest pid_max
#: `processes` waits this long for the reads of /proc/PID/cmdline it needs (agent/mmreads.py)
MM_READ_BUDGET_S = 0.25
#: /proc/PID/task/TID files one `processes` table reads at most (threads_within_s)
MAX_TASK_READS = 16384


class Room:
    """The bytes left for the entries of one reply (a node's boxes, the nodes of a
    `sensors_many`), so that it fits a frame however many entries there are or however
    large: each entry's short refusal (`FULL`) is reserved up front, and an entry that no
    longer fits is given that refusal instead."""

    FULL = "not read: the reply is full"

    def __init__(self, total: int, names: Iterable[str]):
        # the refusal, and the name once more in another field (`skipped`)
        self._shares = {n: 2 * len(n) + len(self.FULL) + 32 for n in names}
        self.left = total - sum(self._shares.values())

    def take(self, name: str, *parts: Any) -> bool:
        """Whether `parts` (the entry of `name`, as encoded in the reply) fit: if so, they
        are counted."""
        extra = len(name) + sum(len(_encode(p)) + 16 for p in parts) - self._shares[name]
        if extra > self.left:
            return False
        self.left -= extra
        return True


class OpError(Exception):
    """An op failed with a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class AgentView(Protocol):
    """What ops read and act on of their agent (daemon.Agent provides it)."""

    config: AgentConfig
    nodes: Mapping[str, NodeRuntime]
    leases: LeaseTable
    regions: RegionTable
    sessions: SessionTable
    tokens: TokenTable  # the highest fencing token seen per node (agent/tokens.py)
    mmreads: MmReads  # /proc/PID/cmdline reads, under a budget (agent/mmreads.py)
    inner_timeout: float  # node ops give up before the op deadline


@dataclass
class Call:
    """One execution of an op: the agent, decoded args, the node, the monitors asking (or
    the peer agent, `peer`); `warrant` holds their signed requests (what evacuate forwards
    to adopt)."""

    agent: AgentView
    args: Any
    node: NodeRuntime | None
    monitors: frozenset[str]
    warrant: tuple[bytes, ...] = ()
    peer: bool = False


@dataclass(frozen=True)
class Op:
    name: str
    args: type
    run: Callable[[Call], Any]
    where: str = "node"  # "inline" | "memory" | "node" | "each"
    deadline_s: float | None = None  # None: the agent's op_deadline_s
    decoder: msgspec.msgpack.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.where not in ("inline", "memory", "node", "each"):
            raise ValueError(f"op {self.name}: where must be inline, memory, node or each")
        object.__setattr__(self, "decoder", msgspec.msgpack.Decoder(self.args))

    @property
    def destructive(self) -> bool:
        """Held for votes when the quorum is above 1 (protocol.DESTRUCTIVE)."""
        return self.name in DESTRUCTIVE

    @property
    def has_node(self) -> bool:
        return "node" in getattr(self.args, "__struct_fields__", ())


# -- argument types ----------------------------------------------------------------------


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    pass


class NodeArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str


class NodesArgs(msgspec.Struct, forbid_unknown_fields=True):
    nodes: list[str] = []  # empty: every node of the agent


class ProcessesArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    cmdline: bool = False  # each row's command line too (a repair's table, not a poll's)
    comms: list[str] = []  # only the processes of these comms (a pre-armed scan's table)
    hashed: bool = True  # each row's exe_sha256 (false: "", no read that may wait)
    # each row's young_threads (its threads started within the last that many seconds)
    # and unreaped (its zombies): what a bomb holds besides processes (a repair's table)
    threads_within_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class ReadArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    region: str
    offset: int
    length: int


class WriteArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    region: str
    offset: int
    data: bytes


class LockArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    lease_s: float | None  # None: a fence, held until unlock


class UnlockArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    force: bool = False


class KillArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    pid: int
    start_time: float | None = None


class KillTreeArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    pid: int


class GuestKillArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    pid: int
    comm: str | None = None  # refused unless the process's comm is this (an older table's)
    tree: bool = False  # its descendants too
    spare: list[str] = []  # but not the guest's service of these comms (vm.service), nor theirs


class LimitsArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    memory: int | None | msgspec.UnsetType = msgspec.UNSET  # None removes, absent keeps
    pids: int | None | msgspec.UnsetType = msgspec.UNSET


# -- reads ------------------------------------------------------------------------------


def ping(call: Call) -> Pong:
    return Pong(call.agent.config.host, os.getpid(), time.time())


def nodes(call: Call) -> list[NodeInfo]:
    out = []
    for name, rt in call.agent.nodes.items():
        latest = rt.sampler.latest
        lock = call.agent.leases.state(name)
        token, owner = call.agent.tokens.get(name) or (None, None)
        out.append(NodeInfo(name, latest.stats.frozen if latest else None, lock.locked_by,
                            lock.lease_left_s, lock.fenced, rt.sampler.age(), token, owner,
                            rt.sampler.error))
    return out


def claim(call: Call) -> ClaimReply:
    """A fleet monitor's announcement that it owns the node now: its token (checked and
    recorded by the server before this runs, as for every op of TOKENED) fences off the
    previous owner's late requests even if the new owner never acts. The reply says when
    the node was last acted on, and by whom (see monitor.engine.Engine.hand_over)."""
    token, owner = call.agent.tokens.get(call.node.name) or (None, None)  # (at a quorum)
    acted = call.agent.tokens.last_act(call.node.name)
    if acted is None:
        return ClaimReply(token, owner)
    return ClaimReply(token, owner, round(acted[0], 3), acted[1])


def _region_infos(call: Call) -> list[RegionInfo]:
    return [RegionInfo(e.name, e.kind, e.size, e.writable, e.pid, e.registered_at,
                       e.registrant_alive())
            for e in call.agent.regions.entries(call.node.name)]


def regions(call: Call) -> list[RegionInfo]:
    return _region_infos(call)


def status(call: Call) -> NodeStatus:
    rt = call.node
    stats = rt.node.stats()
    return NodeStatus(rt.name, stats, rt.node.cgroup.fork_failures(),
                      call.agent.leases.state(rt.name), _region_infos(call), rt.lane.stuck,
                      rt.lane.misses, rt.sampler.age(), rt.sampler.error)


def _check_range(size: int, offset: int, length: int, what: str) -> None:
    if length > MAX_IO:
        raise OpError("out_of_bounds", f"{what} of {length} bytes exceeds the maximum {MAX_IO}")
    if offset < 0 or length < 0 or offset + length > size:
        raise OpError("out_of_bounds", f"{what} [{offset}, {offset + length}) is outside the "
                                       f"region of {size} bytes")


@contextmanager
def _use(call: Call, name: str) -> Iterator[Entry]:
    try:
        with call.agent.regions.use(call.node.name, name) as entry:
            yield entry
    except NoSuchRegion:
        raise OpError("no_such_region", f"node {call.node.name} has no region "
                                        f"{name[:64]!r}") from None


def read(call: Call) -> bytes:
    a = call.args
    with _use(call, a.region) as entry:
        _check_range(entry.size, a.offset, a.length, "read")
        return entry.region.read(a.offset, a.length)


def sensors(call: Call) -> SensorsReply:
    """Every box of the node, with the agent's tracking of them (`read_boxes`)."""
    return read_boxes(call.agent, call.node)


def read_boxes(agent: AgentView, rt: NodeRuntime) -> SensorsReply:
    """Every box of the node: the agent's own first, then those in good standing, then
    those that failed before. A box that failed is skipped while its back-off runs
    (`agent/backoff.py`), and once the boxes read have taken SENSORS_BUDGET of the op
    deadline, the rest wait for the next call: a node's hostile boxes cannot make its
    own kernel box late, nor hold the node's read workers for long; nor make the reply
    larger than a frame: the boxes that no longer fit are named in its errors (`Room`).
    Each box read is tracked (`agent/tracking.py`): the sensors op and the sampler's
    pass both call this."""
    boxes, errors, skipped, unchanged, events, starved = {}, {}, {}, {}, {}, {}
    start = time.monotonic()
    budget = start + agent.config.op_deadline_s * SENSORS_BUDGET
    with agent.regions.use_all(rt.name, "sensorbox") as entries:
        keys = {e: (e.name, e.registered_at) for e in entries}
        room = Room(REPLY_BYTES, (e.name for e in entries))

        def refuse(name: str, message: str, *more: Any) -> None:
            errors[name] = message if room.take(name, message, *more) else room.FULL

        rt.boxes.keep(set(keys.values()))
        rt.tracking.keep(set(keys.values()))
        rt.tracking.passed_at = start
        for entry in sorted(entries, key=lambda e: (not e.internal, rt.boxes.failures(keys[e]))):
            key = keys[entry]
            if (f := rt.boxes.skipped(key, start)) is not None:
                skipped[entry.name] = until = round(f.until - start, 3)
                refuse(entry.name, f"skipped for {until:.1f} s more: failed {f.failures} "
                                   f"times in a row (last: {f.error})", until)
                continue
            if not entry.internal and time.monotonic() > budget:
                refuse(entry.name, "not read: this call's time went to boxes that did not "
                                   "settle; read first by the next one")
                continue
            try:
                image = read_consistent(entry.region)
            except SensorBoxError as e:
                refuse(entry.name, str(e))
                rt.boxes.failed(key, str(e), time.monotonic())
                continue
            rt.boxes.succeeded(key)
            tracked = rt.tracking.observe(key, image, time.monotonic())
            if not room.take(entry.name, image, *(tracked or ())):
                errors[entry.name] = room.FULL
                continue
            if tracked is not None:
                unchanged[entry.name], events[entry.name] = tracked.unchanged, tracked.events
                if tracked.starved:
                    starved[entry.name] = tracked.starved
            boxes[entry.name] = (image if entry.internal
                                 else box_in_host_terms(image, entry.pid, entry.inner_pid))
    return SensorsReply(boxes, errors, skipped, unchanged, events, starved)


def processes(call: Call) -> ProcessTable:
    rt = call.node
    pids = rt.node.cgroup.procs()
    cap = call.agent.config.max_procs_sampled
    table = process_table(pids[:cap])
    if call.args.comms:  # the rest of each row (its executable's hash) only for those
        table = [p for p in table if p.comm in call.args.comms]
    got, waits = {}, {}  # reads of /proc/PID/cmdline may wait: agent/mmreads.py
    for p in table:
        if call.args.hashed:
            identity = (p.start_time, p.comm)
            digest = exe_sha256(p.pid, identity, via_cmdline=False)
            if digest is None:
                waits["h", p.pid] = partial(exe_sha256, p.pid, identity)
            got["h", p.pid] = digest
        if call.args.cmdline:
            waits["c", p.pid] = partial(read_cmdline, p.pid)
    if waits and rt.node.cgroup.is_frozen():  # frozen processes hold no lock: in line
        got.update((key, read()) for key, read in waits.items())
    elif waits:
        got.update(call.agent.mmreads.run(waits, MM_READ_BUDGET_S))
    now, boot = time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME)
    history = rt.sampler.history
    service = _service_of(table, dict(call.agent.regions.registrants(rt.name)),
                          call.agent.regions.service(rt.name))
    young, unreaped = {}, {}
    if call.args.threads_within_s is not None:
        since, reads, live = boot - call.args.threads_within_s, MAX_TASK_READS, set(pids)
        for p in sorted(table, key=lambda p: -p.threads):  # the most threads first: a bomb
            if p.threads > 1 and reads > 0:
                young[p.pid], read = young_threads(p.pid, since, reads)
                reads -= read
        for p in table:
            if reads > 0:
                unreaped[p.pid], read = unreaped_children(p.pid, live, min(reads, 64))
                reads -= read
    rows, cut = _fitting(
        ProcessRow(p.pid, p.ppid, p.comm, p.state, p.rss_bytes, p.start_time, p.cpu_seconds,
                   p.threads, p.pgid, p.child_faults, age_s=round(boot - p.start_time, 3),
                   rss_rate=history.rate(p, now), registered=p.pid in service,
                   exe=(installed_exe(p.pid) or ("",))[0], exe_sha256=got.get(("h", p.pid)) or "",
                   cmdline=got.get(("c", p.pid)) or [], young_threads=young.get(p.pid, 0),
                   unreaped=unreaped.get(p.pid, 0), reaped_s=history.reaped_s(p, now))
        for p in table)  # long command lines: the rows that fit a frame
    return ProcessTable(rows, len(pids), cut or len(pids) > cap)


def _service_of(table: list, registrants: dict[int, float],
                service: tuple[int, float] | None) -> set[int]:
    """The pids of `table` that count as the node's service (`registered`): its running
    registrants that are the node's service (RegionTable.service) or descend from it;
    every running registrant while that service is not in the table (it ended)."""
    live = {p.pid for p in table if same_start(registrants.get(p.pid, -1.0), p.start_time)}
    root = next((p.pid for p in table if service is not None and p.pid == service[0]
                 and same_start(service[1], p.start_time)), None)
    return live if root is None else live & subtree(table, root)


def _fitting(rows: Iterable[Any]) -> tuple[list[Any], bool]:
    """The first of `rows` while they fit a reply (REPLY_BYTES encoded), and whether any
    was left out."""
    out, room = [], REPLY_BYTES
    for row in rows:
        room -= len(_encode(row))
        if room < 0:
            return out, True
        out.append(row)
    return out, False


# -- actions -----------------------------------------------------------------------------


def write(call: Call) -> WriteReply:
    a = call.args
    with _use(call, a.region) as entry:
        if not entry.writable:
            raise OpError("not_writable", f"region {a.region!r} of node {call.node.name} was "
                                          "registered read-only")
        _check_range(entry.size, a.offset, len(a.data), "write")
        entry.region.write(a.offset, a.data)
    return WriteReply(len(a.data))


def lock(call: Call):
    lease = call.args.lease_s
    if lease is not None and not (math.isfinite(lease) and 0 < lease <= MAX_LEASE_S):
        raise OpError("bad_request", f"lease_s must be within (0, {MAX_LEASE_S:g}] s, or null "
                                     "for a fence")
    return call.agent.leases.lock(call.node.name, call.monitors, lease, call.agent.inner_timeout)


def unlock(call: Call):
    return call.agent.leases.unlock(call.node.name, call.monitors, call.args.force,
                                    call.agent.inner_timeout)


def _refuse_protected(call: Call, pids: set[int]) -> None:
    """Refuse when a process runs a protected executable: an installed one named in
    `protected_comms`, or one of `protected_exes`. Never by comm, which a process sets
    itself (a hog calling itself sshd stays killable)."""
    spec = call.node.spec
    names = set(spec.protected_comms)
    files = set()
    for path in spec.protected_exes:
        try:
            st = os.stat(path)
            files.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    if not (names or files):
        return
    for pid in sorted(pids):
        exe = installed_exe(pid)
        if exe is not None and (exe[0] in names or exe[1] in files):
            raise OpError("failed", f"process {pid} ({exe[0] or 'a protected_exes file'}) of "
                                    f"node {call.node.name} is protected (protected_comms / "
                                    "protected_exes): refused")


def _check_pid(pid: int) -> None:
    if not 0 < pid <= PID_MAX:
        raise OpError("bad_request", f"pid {pid} is not a valid process id")


def kill(call: Call) -> KillReply:
    a = call.args
    _check_pid(a.pid)
    _refuse_protected(call, {a.pid})
    return KillReply(call.node.node.kill(a.pid, signal.SIGKILL, a.start_time))


def kill_tree(call: Call) -> KillTreeReply:
    rt, pid = call.node, call.args.pid
    _check_pid(pid)
    if call.node.spec.protected_comms or call.node.spec.protected_exes:
        _refuse_protected(call, subtree(rt.node.processes(), pid))
    return KillTreeReply(rt.node.kill_tree(pid, call.agent.inner_timeout))


def kill_node(call: Call) -> KillTreeReply:
    rt = call.node
    with call.agent.leases.exclusive(rt.name):
        try:
            pids = rt.node.kill_all(call.agent.inner_timeout)
        finally:
            call.agent.leases.released(rt.name)  # kill_all leaves the node thawed
    return KillTreeReply(pids)


def set_limits(call: Call) -> LimitsReply:
    a = call.args
    for what in ("memory", "pids"):
        v = getattr(a, what)
        if isinstance(v, int) and v < 0:
            raise OpError("bad_request", f"{what} limit must be >= 0, or null to remove it")
    node = call.node.node
    node.set_limits(memory=KEEP if a.memory is msgspec.UNSET else a.memory,
                    pids=KEEP if a.pids is msgspec.UNSET else a.pids)
    return LimitsReply(node.cgroup.memory_limit(), node.cgroup.pids_limit())


def _guest(call: Call):
    rt = call.node
    if rt.guest is None:
        raise OpError("bad_request", f"node {rt.name} is not a VM node")
    return rt.guest.integrity


def _findings(findings) -> list[GuestFinding]:
    return [GuestFinding(**f.to_dict()) for f in findings]


def kernel_integrity(call: Call) -> IntegrityReply:
    guard = _guest(call)
    checker = guard.checker
    findings = guard.findings()
    return IntegrityReply(checker is not None, guard.baseline_s and round(guard.baseline_s, 3),
                          checker.sweeps if checker is not None else 0,
                          _findings(findings[:MAX_FINDINGS_REPLY]), len(findings), guard.errors,
                          guard.last_error)


#: walks of a guest's task list a `guest_processes` makes: the guest runs meanwhile, and a
#: fork or an exit under a walk makes it fail (memory.GuestMemory._task_list)
GUEST_WALKS = 5


def guest_processes(call: Call) -> GuestProcesses:
    """A VM node's guest process table, read from its kernel's task list now."""
    _guest(call)
    rt, began = call.node, time.monotonic()
    for attempt in range(GUEST_WALKS):
        try:
            table = rt.node.memory().process_table()
            break
        except VmError as e:
            if attempt == GUEST_WALKS - 1:
                raise OpError("failed", f"node {rt.name}: the guest's task list could not be "
                              f"read in {GUEST_WALKS} walks: {e}") from None
    rows, cut = _fitting(GuestProcess(t.pid, t.ppid, t.comm, t.state, t.rss, t.start_ns, t.exe)
                           for t in table)
    return GuestProcesses(rows, round((time.monotonic() - began) * 1000, 1), cut)


#: how long `guest_kill` waits for what it signalled to be gone (a sleeper dies when it
#: wakes: this covers one waking once a second)
GUEST_KILL_WAIT_S = 2.0


def guest_kill(call: Call) -> GuestKillReply:
    """SIGKILL a process of a VM node's guest (and its descendants, `tree`) by writing the
    signal into the guest kernel with the vCPUs stopped (vm/kill.py); then wait up to
    GUEST_KILL_WAIT_S for them to be gone. Never the guest's init or a kernel thread."""
    _guest(call)
    a, rt = call.args, call.node
    if a.pid <= 2:
        raise OpError("bad_request", f"guest process {a.pid} is the guest's init, kthreadd "
                      "or idle: killing it would take the guest down")
    began = time.monotonic()
    with call.agent.leases.exclusive(rt.name):
        try:
            tasks = guest_kill_tasks(rt.node, a.pid, comm=a.comm, tree=a.tree,
                                     spare=frozenset(a.spare))
        except BackdoorsError as e:
            raise OpError("failed", f"node {rt.name}: {e}") from None
    memory, left = rt.node.memory(), sorted(tasks)
    while left and time.monotonic() - began < GUEST_KILL_WAIT_S:
        time.sleep(0.01)
        with contextlib.suppress(VmError):  # a walk that a fork or an exit broke: again
            left = guest_alive(memory, tasks)
    return GuestKillReply(sorted(tasks), left, round((time.monotonic() - began) * 1000, 1))


def heal_kernel(call: Call) -> HealReply:
    """Restore the open findings of a VM node's guest kernel: the clean bytes written
    through QEMU's gdbstub with the vCPUs stopped (they stay stopped after if the node's
    lock held them), read back, relinked processes; the lock operations wait meanwhile."""
    guard, rt = _guest(call), call.node
    if guard.checker is None:
        raise OpError("failed", f"node {rt.name}: the integrity baseline is not taken yet")
    began = time.monotonic()
    with call.agent.leases.exclusive(rt.name):
        try:
            healed, failed, left = guard.heal(rt.node)
        except BackdoorsError as e:
            raise OpError("failed", f"node {rt.name}: healing failed: {e}") from None
    return HealReply(_findings(healed), _findings(failed), left,
                     round((time.monotonic() - began) * 1000, 1))


OPS: dict[str, Op] = {op.name: op for op in (
    Op("ping", NoArgs, ping, "inline"),
    Op("nodes", NoArgs, nodes, "inline"),
    Op("claim", NodeArgs, claim, "inline"),
    Op("status", NodeArgs, status),
    Op("regions", NodeArgs, regions),
    Op("read", ReadArgs, read, "inline"),
    Op("sensors", NodeArgs, sensors, "memory"),
    Op("sensors_many", NodesArgs, sensors, "each"),
    Op("processes", ProcessesArgs, processes),
    Op("write", WriteArgs, write, "inline"),
    Op("lock", LockArgs, lock),
    Op("unlock", UnlockArgs, unlock),
    Op("kill", KillArgs, kill),
    Op("kill_tree", KillTreeArgs, kill_tree),
    Op("kill_node", NodeArgs, kill_node),
    Op("set_limits", LimitsArgs, set_limits),
    Op("kernel_integrity", NodeArgs, kernel_integrity),
    Op("heal_kernel", NodeArgs, heal_kernel, deadline_s=HEAL_S),
    Op("guest_processes", NodeArgs, guest_processes),
    Op("guest_kill", GuestKillArgs, guest_kill, deadline_s=HEAL_S),
)}

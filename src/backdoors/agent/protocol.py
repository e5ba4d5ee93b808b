"""The agent's wire protocol: frames, the signed envelope, requests, replies, results.

Shared by the server and the client; docs/agent-protocol.md is the prose version of this
file. A frame is a 4-byte big-endian length and that many bytes of msgpack. The envelope
carries the body as raw bytes and an Ed25519 signature of exactly those bytes (prefixed
with the domain: request, reply or event), so the signature is checked before the body is
decoded.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..common.procs import ProcessInfo

from backdoors.nodes.node import NodeStats

VERSION = 2
#: Largest read length and write payload.
MAX_IO = 1 << 20
#: a fence waits this long for its node to freeze: under a host saturated from outside,
#: the node's tasks must get a CPU to stop, which took over a second beside stress-ng
FENCE_S = 10.0
#: `heal_kernel` may take this long: a gdbstub session and QMP round trips to the guest's QEMU
HEAL_S = 10.0
#: Largest frame, either direction: a full MAX_IO payload plus envelope and header.
MAX_FRAME = MAX_IO + 4096
#: The most nodes one request of an "each" op (sensors_many) names.
MAX_EACH = 1024
NONCE_BYTES = 16
#: A request's ts must be less than this many seconds from the agent's clock.
REPLAY_WINDOW_S = 30.0
#: What a signature covers before the body: a request cannot pass for a reply or an event.
REQUEST_DOMAIN = b"backdoors/2 request\0"
REPLY_DOMAIN = b"backdoors/2 reply\0"
EVENT_DOMAIN = b"backdoors/2 event\0"

#: Every error code the agent sends.
CODES = (
    "bad_frame", "auth", "replay", "bad_request", "unknown_op", "no_such_node",
    "no_such_region", "out_of_bounds", "not_writable", "deadline", "quorum", "busy", "failed",
    "stale_token", "too_large",
)
#: Operations held for votes when the agent's quorum is above 1: the one table, read by
#: the server (ops.Op.destructive) and the client (which waits the vote window for them).
DESTRUCTIVE = frozenset({"write", "kill", "kill_tree", "kill_node", "lock", "unlock", "set_limits",
                         "fence", "unfence", "evacuate", "heal_kernel",
                         "guest_kill"})
#: Operations that only read: not audited unless refused (REFUSED), as a monitor polls
#: them several times a second; every request is counted in backdoors_agent_rpc_total.
#: Every other op (and an unknown one) is audited: it changes or could change a node.
READS = frozenset({"ping", "nodes", "status", "regions", "read", "sensors", "sensors_many",
                   "processes",
                   "sessions", "held", "peers", "subscribe", "orphans", "kernel_integrity",
                   "guest_processes"})
#: Error codes of a request refused for what it asked (not for the agent's own trouble:
#: busy, deadline, failed): a read refused so is audited.
REFUSED = frozenset({"auth", "bad_request", "unknown_op", "no_such_node", "no_such_region",
                     "out_of_bounds", "not_writable", "quorum", "stale_token",
                     "stale_request"})
#: Operations that take a fencing token (Request.token, agent/tokens.py): the destructive
#: ones, the live hand-over of a dead server's sessions, and `claim` (a new owner's
#: announcement). Only these check and record it; a token on another op is refused.
TOKENED = DESTRUCTIVE | {"readopt", "claim"}
#: The only ops a peer agent (an id of the agent's `peers`) may call: session hand-over,
#: the question which sessions a node has already (after an answer was lost) and the
#: peer watch's ping. Peers never vote.
PEER_OPS = frozenset({"stage", "adopt", "present", "ping"})

_HEADER = 4

#: What decoding untrusted msgpack can raise: msgspec's errors, invalid UTF-8 in a key
#: (UnicodeDecodeError, a ValueError) and nesting beyond msgspec's depth limit.
DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


def frame(payload: bytes) -> bytes:
    """`payload` with its length prefix."""
    return len(payload).to_bytes(_HEADER, "big") + payload


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """What travels in a frame: a msgpack body kept as bytes, and its signature ("" if
    none: only the agent's replies to frames it could not authenticate)."""

    body: bytes
    sig: bytes


class MonitorOf(msgspec.Struct):
    """Just the `monitor` field of a request body: picks the key to verify it with."""

    monitor: str


class Token(msgspec.Struct, forbid_unknown_fields=True):
    """A fencing token: the sender owns `node` since etcd revision `token` (a fleet of
    monitors, docs/operations.md). The agent refuses a token older than the highest it
    has seen for the node (agent/tokens.py)."""

    node: str
    token: int


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """A request body; `monitor` is the signer (a monitor, or a peer agent), `agent` the
    agent it is for; `args` stays raw until the op's argument type decodes it. `token`:
    optional, for the ops of TOKENED (a monitor of a fleet sends it, others need not).
    `incident`: optional, the monitor's incident the request acts for (audited: it tells
    one incident's ops from another's)."""

    v: int
    monitor: str
    agent: str
    nonce: bytes
    ts: float
    op: str
    args: msgspec.Raw = msgspec.Raw(b"\x80")
    token: Token | None = None
    incident: str = ""


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class Response(msgspec.Struct):
    """A reply body; `nonce` echoes the request's (empty when it could not be read)."""

    nonce: bytes
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None
    elapsed_ms: float = 0.0


class RawResponse(msgspec.Struct):
    """A reply body as the client decodes it: `result` stays raw for the op's type."""

    nonce: bytes
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"\xc0")
    error: ErrorInfo | None = None
    elapsed_ms: float = 0.0


# -- results ----------------------------------------------------------------------------


class Pong(msgspec.Struct):
    host: str
    pid: int
    time: float
    version: int = VERSION


class LockState(msgspec.Struct):
    """Who holds a node's lock: `locked_by` is empty when free; a fence has no lease."""

    locked_by: list[str]
    lease_left_s: float | None
    fenced: bool


class NodeInfo(msgspec.Struct):
    """One node in `nodes()`; `frozen` is as of the last sample (`sample_age_s` ago)."""

    name: str
    frozen: bool | None
    locked_by: list[str]
    lease_left_s: float | None
    fenced: bool
    sample_age_s: float | None
    token: int | None = None  # the highest fencing token seen for the node (None: none)
    owner: str | None = None  # the monitor that sent it
    sample_error: str | None = None  # why its last sample failed (its cgroup gone?)


class RegionInfo(msgspec.Struct):
    """A registered region; `pid` registered it, `registrant_alive` tells if it still runs."""

    name: str
    kind: str
    size: int
    writable: bool
    pid: int
    registered_at: float
    registrant_alive: bool


class NodeStatus(msgspec.Struct):
    name: str
    stats: NodeStats
    fork_failures: int
    lock: LockState
    regions: list[RegionInfo]
    stuck_ops: int
    deadline_misses: int
    sample_age_s: float | None
    sampler_error: str | None


class ProcessRow(ProcessInfo, frozen=True, kw_only=True):
    """A process of a node; `age_s` is computed by the agent, `rss_rate` in bytes/s.
    Its own fields are keyword-only (they follow ProcessInfo's, which end in defaults)."""

    age_s: float
    rss_rate: float
    registered: bool  # a registrant that is the node's service or descends from it
    exe: str = ""  # the installed executable's name (procs.installed_exe), never the comm
    exe_sha256: str = ""  # sha256 of its executable (procs.exe_sha256); "" if unreadable
    cmdline: list[str] = []  # only when asked (processes(cmdline=True)); bounded
    young_threads: int = 0  # only when asked (processes(threads_within_s=...)): see there
    unreaped: int = 0  # its exited children not reaped yet (zombies); asked as young_threads
    #: seconds since the agent's table first showed it had reaped its latest child (its
    #: child_faults rose); None if it showed none since the process's first table
    reaped_s: float | None = None


class ProcessTable(msgspec.Struct):
    rows: list[ProcessRow]
    total: int
    truncated: bool


class SensorsReply(msgspec.Struct):
    """Consistent copies of every Sensor Box of a node, and the boxes that failed; of
    those, `skipped` were not read (they kept failing): seconds until they are again.
    What the agent tracked of the boxes read (agent/tracking.py), per box and sensor:
    `progress_unchanged_s`, seconds since each progress counter last changed, less
    `progress_starved_s`, the time of that stretch its node was starved of CPU (for the
    counters with any), and `pressure_events`, each pressure counter's events in its
    window."""

    boxes: dict[str, bytes]
    errors: dict[str, str]
    skipped: dict[str, float] = {}
    progress_unchanged_s: dict[str, dict[str, float]] = {}
    pressure_events: dict[str, dict[str, float]] = {}
    progress_starved_s: dict[str, dict[str, float]] = {}


class SensorsManyReply(msgspec.Struct):
    """`sensors` of several nodes in one reply: each node read is its own (on its own
    read workers, under its own deadline); `errors` holds the nodes not read, with the
    code and message a `sensors` call of that node alone would have had, or
    `too_large` when the reply was full: that node is read alone."""

    replies: dict[str, SensorsReply]
    errors: dict[str, ErrorInfo]


class LockReply(msgspec.Struct):
    locked_by: list[str]
    lease_s: float | None
    freeze_ms: float
    renewed: bool


class UnlockReply(msgspec.Struct):
    was_locked: bool
    thaw_ms: float


class KillReply(msgspec.Struct):
    killed: bool


class KillTreeReply(msgspec.Struct):
    pids: list[int]


class LimitsReply(msgspec.Struct):
    memory_limit: int | None
    pids_limit: int | None


class WriteReply(msgspec.Struct):
    written: int


class GuestFinding(msgspec.Struct):
    """A tampered place of a VM node's guest kernel (vm/integrity.py Finding): `kind`
    text | rodata | syscall | idt | ops | process, `where` a symbol + offset, a table
    entry or a pid."""

    kind: str
    where: str
    virt: str
    detail: str


#: findings a `kernel_integrity` reply lists (`open` counts them all)
MAX_FINDINGS_REPLY = 256


class IntegrityReply(msgspec.Struct):
    """`kernel_integrity` of a VM node: whether the clean baseline is taken (and in how
    many seconds), full sweeps of the kernel so far, the open findings, failed checks."""

    ready: bool
    baseline_s: float | None
    sweeps: int
    findings: list[GuestFinding]  # the first MAX_FINDINGS_REPLY
    open: int  # findings open, all told
    errors: int
    last_error: str | None


class GuestProcess(msgspec.Struct):
    """A process of a VM node's guest, read from its kernel's task list (vm/memory.py
    GuestTask): its parent's pid, its state letter as the guest's /proc shows it, its
    resident bytes (0 for a kernel thread), its start (the guest's monotonic clock, ns)
    and its exec (a token: equal for the processes forked from one exec with none since,
    0 for none)."""

    pid: int
    ppid: int
    comm: str
    state: str
    rss_bytes: int
    start_ns: int = 0  # (0 from an agent older than them)
    exe: int = 0


class GuestProcesses(msgspec.Struct):
    """`guest_processes`: the guest's process table, walked when asked (`took_ms`);
    `truncated`: the rows stop where the reply would exceed a frame."""

    rows: list[GuestProcess]
    took_ms: float
    truncated: bool = False


class GuestKillReply(msgspec.Struct):
    """`guest_kill`: the guest pids SIGKILL was written for, those still alive when the
    op stopped waiting, how long it all took."""

    signalled: list[int]
    survivors: list[int]
    took_ms: float


class HealReply(msgspec.Struct):
    """`heal_kernel`: the findings restored, those that would not be, those left for the
    next call (one call restores at most 256), how long it took."""

    healed: list[GuestFinding]
    failed: list[GuestFinding]
    left: int
    took_ms: float


class ClaimReply(msgspec.Struct):
    """`claim`: the node's highest token is now `token`, sent by `owner` (None at a quorum
    above 1 until a vote applied a tokened op); the node's last tokened destructive op
    was applied `last_act_s` ago by `last_act_by` (None: none since the agent started)."""

    token: int | None
    owner: str | None
    last_act_s: float | None = None
    last_act_by: str | None = None


# -- session recovery (agent/recovery.py) -------------------------------------------------


class HeldCount(msgspec.Struct):
    """How many client sessions the agent holds for a node (`sessions` lists them: with
    ~10,000 the list outgrows a reply), and how many wait in limbo."""

    sessions: int
    limbo: int


class SessionInfo(msgspec.Struct):
    """A session held for a node: its Continuation Box name, connection and server pid."""

    name: str
    connection: str
    pid: int
    adopted: bool = False  # moved here from another node by a recovery


class MovedSession(msgspec.Struct, forbid_unknown_fields=True):
    """A session on its way from one agent to another (evacuate -> adopt)."""

    name: str  # "cb-<session>"
    tcp: bytes  # TcpState.encode(); empty when staged (sent before in pieces: op stage)
    cb: bytes  # the Continuation Box region, zlib-compressed (its live parts: cb_parts)
    staged: bool = False
    #: (offset, length) of each piece `cb` holds, in order, of a region of cb_size bytes
    #: whose other bytes are zero (continuations.image.live_parts); [] : the whole region
    cb_parts: list[tuple[int, int]] = []
    cb_size: int = 0


class PresentReply(msgspec.Struct):
    """Which of the sessions asked about the node has: their connections are there."""

    present: list[str]


class FenceReply(msgspec.Struct):
    frozen_ms: float
    network_ms: float
    addresses_removed: list[str]
    sessions: int


class StageReply(msgspec.Struct):
    staged: int


class AdoptReply(msgspec.Struct):
    """One adopt batch: sessions restored (and, on the final batch, handed to the server)."""

    restored: int
    handed: int
    failed: dict[str, str]
    restore_ms: float
    announce_ms: float
    handover_ms: float
    # the final batch's steps, ms: arp_ms (gratuitous ARPs), resume_ms (repair mode
    # released), connect_ms (to the server, its checks), send_ms (batches sent, verdicts
    # read), hold_ms (adopted sessions held as the server's)
    phases: dict[str, float] = {}
    # sessions whose connection the node already has (an earlier evacuate's answer was
    # lost): not restored, not failed; the source drops its stale copies
    present: list[str] = []
    # sessions whose client ended the connection during the move (a reset its restored
    # socket drew): over, nothing to serve; not failed, not kept for another evacuate
    ended: list[str] = []


class EvacuateReply(msgspec.Struct):
    """`sessions` dumped or failed at the dump; `moved` handed over by the target, or
    found there already (`present` of them: moved by an earlier evacuate whose answer was
    lost); `ended` by their clients during the move (moved + ended + failed = sessions)."""

    sessions: int
    moved: int
    failed: dict[str, str]
    dump_ms: float
    transfer_ms: float
    adopt: list[AdoptReply]
    # the dump's steps, ms summed over the sessions: take_ms (out of the session table),
    # repair_ms (TCP_REPAIR dump), cb_ms (CB read, compressed), remove_ms (region dropped)
    phases: dict[str, float] = {}
    present: int = 0
    ended: int = 0

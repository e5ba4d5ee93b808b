"""Session recovery: fence a failed node, evacuate its sessions, adopt them elsewhere.

The monitor asks the failed node's agent to `fence` the node (freeze it and cut its
network: interface down, service addresses removed — fail-stop, and the network lock of
its sessions), then to `evacuate` it to a node of another agent. Evacuation dumps every
held session socket with TCP_REPAIR, reads its Continuation Box, and sends both to the
target agent over the private network (agent to agent, signed with this agent's own key;
the target lists it in its `peers`), with the monitors' signed evacuate requests as the
warrant (agent/warrant.py). The target's `adopt` checks the warrant, adds the service addresses to its node, restores the
sockets inside the node's namespace, announces the addresses (gratuitous ARP) and hands
the sessions (socket + CB each) in batches to the recovery server listening on the node's
adoption socket (continuations.adoption: one frame and one reply per batch).

`Recovery` holds these ops and what they keep between requests: sessions dumped but not
adopted (the target failed, or answered something unreadable) stay in limbo and go with
the next `evacuate` of the same node; whatever goes wrong after the dump, they are kept
there, never dropped, unless a target answers that it has them already (`present`: an
earlier answer was lost after it took them). Limbo and the service addresses each node
took over outlive an agent restart: every change goes to `keep` (the agent's fd store,
agent/fdstore.py) and a new agent takes them back (`take_back`); a session on its way
(between the dump and the target's answer) is in memory only, so that a restart can
never move it twice. What a peer sends is hostile input until checked: session
states are range-checked at decode (TcpState), Continuation Boxes are inflated with a
bound, and what waits for a later request (staged pieces, sessions restored for a final
batch) expires after `PENDING_TTL_S` (freed, counted in `expired`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from .. import net
from ..continuations import cbformat
from ..continuations.adoption import AdoptionClient, Handover, cb_memfd
from ..continuations.errors import NotHanded, NoVerdict
from ..continuations.image import live_parts
from ..common.procs import read_process
from ..common.runtime import ADOPT_SOCKET, adoption_path
from ..errors import AgentError, BackdoorsError
from ..net.route import initial_window
from ..tcprepair import Repair, TcpState, close_silently, repair, restore_paused, segments_needed
from ..tcprepair.kernel import SIOCINQ, SIOCOUTQ, ioctl_int
from .client import AgentClient
from .keys import Identity
from .ops import Call, NodeArgs, Op, OpError
from .errors import RemoteError
from .protocol import (
    FENCE_S, REFUSED, AdoptReply, EvacuateReply, FenceReply, HeldCount, MovedSession, PresentReply,
    SessionInfo, StageReply, UnlockReply,
)
from .membership import outsider
from .regions import REGION_NAME, SESSION_KIND
from .served import NodeRuntime
from .sessions import ended as _ended
from .warrant import Warrants, WarrantError

log = logging.getLogger("backdoors.agent")

BATCH_BYTES = 768 * 1024  # per adopt request, below the 1 MiB frame limit
LONG_OP_S = 30.0
STAGE_PIECE = 512 * 1024  # session states above this go ahead in pieces (op stage)
MAX_MOVED_CB = BATCH_BYTES - 4096  # a moved session's compressed box, at most (it travels
# in the adopt request; a larger one is not dumped: its session alone fails)
STAGE_MAX_BYTES = 512 << 20  # what an agent holds staged at most
ADOPT_MAX_BYTES = 512 << 20  # inflated Continuation Boxes an agent holds for adopts at most
PENDING_TTL_S = 4 * LONG_OP_S  # staged pieces and sessions awaiting a final batch, at most
ADDRESSES_KEY = "addresses"  # durable state: {node: [service addresses taken over]}
LIMBO_KEY = "limbo."  # durable state: + node -> msgpack [MovedSession] dumped, not adopted
UNSURE_KEY = "unsure."  # durable state: + node -> msgpack Unsure
SPENT_KEY = "warrants"  # durable state: the spent warrants still within their life
PRESENT_BATCH = 2048  # sessions per `present` question (well below the frame limit)
AHEAD_SESSIONS = 128  # an evacuate sends a batch on every this many sessions dumped


class EvacuateArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    to: str  # the target agent, "ADDR:PORT" on the private network
    to_agent: str  # its id (host), one of this agent's peers
    to_node: str  # a node of the target agent running the recovery server
    # sessions an earlier evacuate may have moved (its answer was lost) go elsewhere only
    # once its target says which it has ("ask"), or even if it cannot say ("move"); the
    # same for sessions a target refused while it took the node's others
    if_unsure: Literal["ask", "move"] = "ask"


class PresentArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    # session name -> (local address, local port, remote address, remote port)
    sessions: dict[str, tuple[str, int, str, int]]


class Unsure(msgspec.Struct, forbid_unknown_fields=True):
    """Where the sessions kept in limbo must be asked about, or go (durable state, with
    the limbo): the target of a node's evacuate whose answer was lost after its final
    batch was sent, which may serve them; or (`split`) the target that took the node's
    other sessions, with its service addresses, and refused these."""

    to: str
    to_agent: str
    to_node: str
    split: bool = False


class StageArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    name: str  # the session the piece belongs to
    offset: int
    total: int
    data: bytes
    warrant: list[bytes] = []  # the monitors' signed evacuate requests (agent/warrant.py)


class AdoptArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    addresses: list[str]
    sessions: list[MovedSession]
    warrant: list[bytes] = []  # the monitors' signed evacuate requests (agent/warrant.py)
    final: bool = True  # the last batch: announce the addresses, start every session


@dataclass
class Restoring:
    """A session restored in a node, its socket still in repair mode (inert), with a memfd
    copy of its (inflated, checked) Continuation Box."""

    moved: MovedSession
    state: TcpState
    handle: Repair
    cb_fd: int
    cb_bytes: int

    def close(self) -> None:
        self.handle.close()
        os.close(self.cb_fd)


@dataclass
class Started:
    """A restored session in service, with a memfd copy of its Continuation Box."""

    moved: MovedSession
    state: TcpState
    sock: socket.socket
    cb_fd: int


class Recovery:
    """One agent's session recovery: its ops (`ops()`) and the state they keep.

    `run_dir` holds each node's adoption sockets; `peers` (id -> public keys) may hand
    sessions here (adopt, stage) with a warrant of `monitors` meeting `quorum`; `identity`
    signs this agent's requests to its peers (evacuate); `netns` is where the private
    network is.
    """

    def __init__(self, run_dir: str, *, identity: Identity, peers: Mapping[str, tuple],
                 monitors: Mapping[str, tuple], quorum: int = 1, netns: str | None = None,
                 ttl_s: float = PENDING_TTL_S, clock=time.monotonic,
                 started: float | None = None):
        self.run_dir, self.peers, self.netns = run_dir, dict(peers), netns
        self.identity = identity
        self.warrants = Warrants(identity.id, monitors, quorum, started=started)
        self.ttl_s, self.clock = ttl_s, clock
        self.limbo: dict[str, list[MovedSession]] = {}  # node -> dumped, not yet adopted
        self.unsure: dict[str, Unsure] = {}  # node -> where its limbo may be served already
        self.adopting: dict[str, list[Restoring]] = {}  # node -> awaiting the final batch
        self.staged: dict[tuple[str, str], bytearray] = {}  # (node, session) -> state in pieces
        # when each staged entry / each node's adopting list expires (renewed by its requests)
        self.expires: dict[tuple[str, str] | str, float] = {}
        self.expired = {"staged": 0, "adopting": 0}  # entries freed unused, since the start
        self.adopted_addresses: dict[str, set[str]] = {}  # node -> service addresses taken over
        self._lock = threading.Lock()  # stage runs inline, adopt on a worker thread
        self._presenting: set[str] = set()  # peers whose `present` is being answered
        # keeps durable state across a restart: (key, bytes or None to drop) -> None
        self.keep: Callable[[str, bytes | None], None] = lambda key, data: None
        self._keeping = threading.Lock()  # one change of durable state at a time

    # -- durable state (kept in the fd store) --------------------------------------------

    def take_back(self, state: Mapping[str, bytes], nodes: set[str]) -> list[str]:
        """Take back the limbo and adopted addresses a previous agent kept (before any op
        runs); entries of nodes no longer configured, or unreadable, are dropped from the
        store and listed (with why) in the result."""
        dropped = []
        for key, data in state.items():
            try:
                if key == ADDRESSES_KEY:
                    kept = json.loads(data)
                    self.adopted_addresses = {n: set(map(str, c)) for n, c in kept.items()
                                              if n in nodes and c}
                    if gone := sorted(set(kept) - set(self.adopted_addresses)):
                        dropped.append(f"adopted addresses of {', '.join(gone)}: no such node")
                        self._keep_addresses()
                elif key.startswith(LIMBO_KEY):
                    node = key.removeprefix(LIMBO_KEY)
                    if node not in nodes:
                        raise ValueError("no such node")
                    self.limbo[node] = msgspec.msgpack.decode(data, type=list[MovedSession])
                elif key == SPENT_KEY:
                    self.warrants.take_back(data)
                elif key.startswith(UNSURE_KEY):
                    node = key.removeprefix(UNSURE_KEY)
                    if node not in nodes:
                        raise ValueError("no such node")
                    self.unsure[node] = msgspec.msgpack.decode(data, type=Unsure)
            except (ValueError, AttributeError, msgspec.MsgspecError) as e:
                dropped.append(f"{key[:80]}: {e}")
                self.keep(key, None)
        return dropped

    def _adopted(self, node: str, cidr: str) -> None:
        with self._keeping:
            taken = self.adopted_addresses.setdefault(node, set())
            if cidr not in taken:
                taken.add(cidr)
                self._keep_addresses(locked=True)

    def _keep_addresses(self, *, locked: bool = False) -> None:
        if not locked:
            with self._keeping:
                return self._keep_addresses(locked=True)
        kept = {n: sorted(c) for n, c in sorted(self.adopted_addresses.items()) if c}
        self.keep(ADDRESSES_KEY, json.dumps(kept).encode() if kept else None)

    def _keep_limbo(self, node: str) -> None:
        with self._keeping:
            moved = self.limbo.get(node)
            self.keep(LIMBO_KEY + node, msgspec.msgpack.encode(moved) if moved else None)

    def _set_unsure(self, node: str, unsure: Unsure | None) -> None:
        if self.unsure.get(node) == unsure:
            return
        with self._keeping:
            if unsure is None:
                self.unsure.pop(node, None)
            else:
                self.unsure[node] = unsure
            self.keep(UNSURE_KEY + node, msgspec.msgpack.encode(unsure) if unsure else None)

    def ops(self) -> tuple[Op, ...]:
        return (
            Op("sessions", NodeArgs, self.sessions),
            Op("held", NodeArgs, self.held),
            Op("fence", NodeArgs, self.fence, deadline_s=FENCE_S),
            Op("unfence", NodeArgs, self.unfence),
            Op("evacuate", EvacuateArgs, self.evacuate, deadline_s=LONG_OP_S),
            Op("stage", StageArgs, self.stage, "inline"),
            Op("adopt", AdoptArgs, self.adopt, deadline_s=LONG_OP_S),
            Op("present", PresentArgs, self.present),
        )

    def close(self) -> None:
        """Drop what waits for a final adopt batch (at agent stop); sends nothing."""
        with self._lock:
            for pending in self.adopting.values():
                for item in pending:
                    item.close()
            self.adopting.clear()
            self.staged.clear()
            self.expires.clear()

    def expire(self) -> int:
        """Free staged pieces and restored sessions whose adopt never came (a peer that
        died or misbehaves between requests): they would hold memory and sockets forever.
        Called at every recovery op; returns how many entries were freed."""
        now, freed = self.clock(), 0
        with self._lock:
            for key in [k for k, t in self.expires.items() if t <= now]:
                del self.expires[key]
                if isinstance(key, tuple):
                    if self.staged.pop(key, None) is not None:
                        self.expired["staged"] += 1
                        freed += 1
                        log.warning("node %s: staged state of %s expired unused", *key)
                else:
                    for item in self.adopting.pop(key, []):
                        item.close()
                        self.expired["adopting"] += 1
                        freed += 1
                        log.warning("node %s: restored session %s expired without its final "
                                    "adopt batch", key, item.moved.name)
        return freed

    def _adopting_bytes(self) -> int:
        return sum(r.cb_bytes for pending in self.adopting.values() for r in pending)

    # -- ops ---------------------------------------------------------------------------

    def sessions(self, call: Call) -> list[SessionInfo]:
        self.expire()
        return [SessionInfo(s.name, s.describe(), s.pid, s.since is not None)
                for s in call.agent.sessions.list(call.node.name)]

    def held(self, call: Call) -> HeldCount:
        return HeldCount(call.agent.sessions.count(call.node.name),
                         len(self.limbo.get(call.node.name, ())))

    def fence(self, call: Call) -> FenceReply:
        """Freeze the node (held until unlock) and cut it off the service network."""
        rt, agent = call.node, call.agent
        t0 = time.monotonic()
        agent.leases.lock(rt.name, call.monitors, None, FENCE_S * 0.8)
        t1 = time.monotonic()
        removed = []
        if rt.spec.netns:
            try:
                removed = net.cut_off(rt.spec.netns, rt.spec.interface,
                                      self._service_addresses(rt))
            except BackdoorsError as e:
                raise OpError("failed", f"node {rt.name} is frozen but its network could not "
                                        f"be cut: {e}") from None
        return FenceReply(_ms(t0, t1), _ms(t1), removed, agent.sessions.count(rt.name))

    def unfence(self, call: Call) -> UnlockReply:
        """Return a fenced node to service after inspection: thaw it and bring its
        interface up. The service addresses it had stay where its sessions went."""
        rt, agent = call.node, call.agent
        reply = agent.leases.unlock(rt.name, call.monitors, True, agent.inner_timeout)
        if rt.spec.netns:
            net.set_up(rt.spec.netns, rt.spec.interface, True)
        with self._keeping:
            if self.adopted_addresses.pop(rt.name, None):
                self._keep_addresses(locked=True)
        return UnlockReply(reply.was_locked, reply.thaw_ms)

    def evacuate(self, call: Call) -> EvacuateReply:
        """Dump every session of a fenced node and hand them to another agent's node."""
        rt, agent, a = call.node, call.agent, call.args
        if not agent.leases.state(rt.name).fenced:
            raise OpError("failed", f"node {rt.name} is not fenced: fence it first, so that "
                                    "its sessions cannot change while they move")
        if a.to_agent not in self.peers:
            raise OpError("failed", f"agent {a.to_agent[:64]!r} is not among this agent's peers: "
                                    "it cannot check that agent's answers")
        self.expire()
        try:
            return self._evacuate(call)
        finally:
            self._keep_limbo(rt.name)  # what is left in limbo now, if anything

    def _evacuate(self, call: Call) -> EvacuateReply:
        rt, a = call.node, call.args
        t0 = time.monotonic()
        moving = self.limbo.pop(rt.name, [])
        if moving:
            self._keep_limbo(rt.name)  # on its way: not to be moved twice by a new agent
        failed: dict[str, str] = {}
        phases: dict[str, float] = {}
        unsure = self.unsure.get(rt.name)
        # Sessions go as they are dumped (the target restores a batch while the next one
        # is dumped), unless an earlier target must first say which it has.
        ahead = not _elsewhere(unsure, a)
        adopts = _Adopts(self, call)
        dumped: list[str] = []
        try:
            try:
                self._dump_all(call, moving, failed, phases, dumped, adopts if ahead else None)
            except BaseException:
                adopts.abandon()
                self.limbo[rt.name] = moving  # what was dumped so far is not lost
                raise
            dump_failures = len(failed)
            total = len(moving) + dump_failures
            t1 = time.monotonic()
            present = self._drop_present_elsewhere(call, moving)  # (0 when sent ahead)
            if present and not moving:  # all served where an earlier evacuate sent them
                self._set_unsure(rt.name, None)
                return EvacuateReply(total, present, failed, _ms(t0, t1), 0.0, [], phases,
                                     present)
            adopts.send(moving[adopts.queued:], final=True)
        finally:
            # the dumped sessions' boxes travel in `moving`: their regions go (while the
            # target works on the final batch)
            t2 = time.monotonic()
            for name in dumped:
                try:
                    call.agent.regions.remove(rt.name, name)
                except KeyError:
                    pass
            phases["remove_ms"] = _ms(t2)
            adopts.finish()
        if adopts.error is not None:
            e = adopts.error  # whatever the peer did, nothing is dropped
            # Kept whole (not the staged stubs): the next evacuate may go to another agent.
            self.limbo[rt.name] = moving
            if adopts.final_sent and not (isinstance(e, RemoteError) and e.code in REFUSED):
                # no answer, or one unreadable: the target may have started them (a
                # refusal comes before anything is done). Asked before they go elsewhere.
                self._set_unsure(rt.name, Unsure(a.to, a.to_agent, a.to_node))
            log.warning("node %s: %d sessions kept in limbo: %s", rt.name, len(moving), e)
            raise OpError("failed", f"node {rt.name}: {len(moving)} sessions dumped but the "
                                    f"agent at {a.to} did not adopt them ({e}); they are kept "
                                    "for another evacuate (if its answer was lost after it took "
                                    "them, evacuating to it again drops the copies it has)")
        replies = adopts.replies
        for reply in replies:
            failed.update(reply.failed)
        # Sessions the target had already (an earlier evacuate's answer was lost): served
        # there, so this agent's dumps of them are stale and dropped with `moving`.
        present += sum(len(r.present) for r in replies)
        refused = {name for r in replies for name in r.failed}
        split = None
        if kept := [m for m in moving if m.name in refused]:
            # The target did not start these (it closed its copies silently): this agent's
            # dump is their only state. Kept for another evacuate, not dropped; if it took
            # others (and the addresses with them), that evacuate can only be to it.
            self.limbo[rt.name] = kept
            for m in kept:
                failed[m.name] += " (kept here for another evacuate)"
            if present or any(r.handed for r in replies):
                split = Unsure(a.to, a.to_agent, a.to_node, split=True)
        self._set_unsure(rt.name, split)
        return EvacuateReply(total, sum(r.handed for r in replies) + present,
                             failed, _ms(t0, t1), _ms(t1), replies, phases, present,
                             sum(len(r.ended) for r in replies))

    def _drop_present_elsewhere(self, call: Call, moving: list[MovedSession]) -> int:
        """Before sessions go to another target than the one an earlier evacuate of the
        node may have sent them to (its answer was lost), ask that one which it has: those
        are served there, and this agent's copies of them are dropped from `moving` (how
        many: the result). If it has some and not all, the rest may not go elsewhere: that
        node took the service addresses with them (another target taking them too would
        draw those sessions' packets away); they are kept in limbo, and the evacuate fails
        saying to evacuate to it. If it cannot say, the evacuate fails with `moving` kept,
        unless the request says to move them all the same (`if_unsure` "move"). Sessions
        that a target refused while it took the node's others (`split`) are not asked
        about: they can go only there, unless the request says "move"."""
        rt, a = call.node, call.args
        unsure = self.unsure.get(rt.name)
        if unsure is not None and not moving:
            self._set_unsure(rt.name, None)  # nothing left that it could have
            return 0
        if not _elsewhere(unsure, a):
            return 0  # none, or the same target: its adopt answers `present` itself
        where = f"node {unsure.to_node} of agent {unsure.to_agent}"
        if unsure.split:
            if a.if_unsure != "move":
                self.limbo[rt.name] = moving
                raise OpError("failed", f"node {rt.name}: its {len(moving)} sessions kept here "
                                        f"were refused by {where}, which serves its other "
                                        "sessions with its service addresses: another node "
                                        "taking those addresses would draw their packets away, "
                                        "so these can go only there (see why it refused them, "
                                        "then evacuate to it), or with if_unsure \"move\"")
            self._set_unsure(rt.name, None)
            return 0
        asked = {}
        for m in moving:
            st = TcpState.decode(m.tcp)
            asked[m.name] = (st.local_addr, st.local_port, st.remote_addr, st.remote_port)
        names = list(asked)
        try:
            if unsure.to_agent not in self.peers:
                raise AgentError("it is no longer among this agent's peers")
            here: set[str] = set()
            with self._peer_client(unsure.to, unsure.to_agent) as old:
                for i in range(0, len(names), PRESENT_BATCH):
                    chunk = {n: asked[n] for n in names[i:i + PRESENT_BATCH]}
                    here.update(n for n in old.present(unsure.to_node, chunk) if n in chunk)
        except Exception as e:  # noqa: BLE001 - whatever the old target did: it cannot say
            if a.if_unsure != "move":
                self.limbo[rt.name] = moving
                raise OpError("failed", f"node {rt.name}: {len(moving)} sessions may be served "
                                        f"on {where} already (the answer of the evacuate that "
                                        f"sent them there was lost), and it cannot say now "
                                        f"({e}); they are kept: evacuate to it, or here again "
                                        "once it answers, or with if_unsure \"move\" if it is "
                                        "gone for good") from None
            log.warning("node %s: moving %d sessions that may be served on %s (it cannot say: "
                        "%s)", rt.name, len(moving), where, e)
            here = set()
        moving[:] = [m for m in moving if m.name not in here]
        if here and moving:
            self.limbo[rt.name] = moving
            raise OpError("failed", f"node {rt.name}: {len(here)} of its sessions are served on "
                                    f"{where} already (the answer of the evacuate that sent "
                                    f"them there was lost): their copies here are dropped; "
                                    f"the other {len(moving)} are kept: evacuate to it (its "
                                    "node has the service addresses)")
        self._set_unsure(rt.name, None)
        return len(here)

    def _dump_all(self, call: Call, moving: list[MovedSession], failed: dict[str, str],
                  phases: dict[str, float], dumped: list[str],
                  ahead: _Adopts | None = None) -> None:
        """Dump every held session of the node into `moving` (its socket closed silently,
        its name added to `dumped`: its region is the caller's to remove); every
        `AHEAD_SESSIONS` sessions dumped go to `ahead` (sent on while the rest are dumped;
        those from limbo go with the first batch). The time of each step, summed over the
        sessions, goes to `phases`."""
        rt, agent = call.node, call.agent
        clock = time.monotonic
        t = clock()
        taken = agent.sessions.take_all(rt.name)
        spent = {"take_ms": clock() - t, "repair_ms": 0.0, "cb_ms": 0.0}
        cap, held = agent.config.max_evacuate_bytes, sum(_size(m) for m in moving)
        for i, s in enumerate(taken):
            if (queued := _queued(s.sock)) > STAGE_MAX_BYTES:  # no target stages it: it
                # stays (alone, it would fail every batch, and its node's moves with it)
                agent.sessions.put_back(s)
                failed[s.name] = (f"not dumped: its queues hold {queued} bytes, more than "
                                  f"a move carries ({STAGE_MAX_BYTES}); still held here")
                continue
            if moving and held + _queued(s.sock) > cap:
                # the agent's memory is not the node's to fill: the rest wait, held
                for rest in taken[i:]:
                    agent.sessions.put_back(rest)
                    failed[rest.name] = (f"not dumped: this evacuate holds {held} bytes "
                                         f"(max_evacuate_bytes {cap}); still held here: "
                                         "evacuate again")
                break
            t0 = t1 = clock()
            dumped.append(s.name)
            try:
                with repair(s.sock) as handle:
                    state = handle.dump(since=s.since)
                    handle.close()
                t1 = clock()
                # only the box's live parts: the rest is mostly an empty ring
                with agent.regions.use(rt.name, s.name) as entry:
                    parts = live_parts(entry.region.read, entry.size, state.read)
                    cb = zlib.compress(b"".join(entry.region.read(*p) for p in parts), 1)
                if len(cb) > MAX_MOVED_CB:  # (no adopt request could carry it: alone, it
                    # would fail every batch it is in, and its node's evacuations with it)
                    raise AgentError(f"its box compresses to {len(cb)} bytes, more than an "
                                     f"adopt request carries ({MAX_MOVED_CB})")
                moving.append(MovedSession(s.name, state.encode(), cb, cb_parts=parts,
                                           cb_size=entry.size))
                held += _size(moving[-1])
            except (BackdoorsError, OSError, KeyError) as e:
                failed[s.name] = f"dump: {e}"
                agent.sessions.closer(s.node, s.sock)  # (its linger is the node's: off this lane)
            spent["repair_ms"] += t1 - t0
            spent["cb_ms"] += clock() - t1
            if ahead is not None and len(moving) - ahead.queued >= AHEAD_SESSIONS:
                ahead.send(moving[ahead.queued:])
        phases.update({k: round(v * 1000, 3) for k, v in spent.items()})

    def stage(self, call: Call) -> StageReply:
        """A piece of a large session state, sent ahead of the adopt that uses it (a
        request is at most 1 MiB; a session's queues can hold megabytes)."""
        a = call.args
        self._warranted(call, "stage")
        _check_name(a.name)
        self.expire()
        key = (call.node.name, a.name)
        with self._lock:
            buf = self.staged.get(key)
            if buf is None:
                held = sum(len(b) for b in self.staged.values())
                if not 0 < a.total <= STAGE_MAX_BYTES - held:
                    raise OpError("out_of_bounds", f"staging {a.total} bytes would exceed "
                                                   f"{STAGE_MAX_BYTES} (holding {held})")
            size = a.total if buf is None else len(buf)
            if size != a.total or a.offset < 0 or a.offset + len(a.data) > a.total:
                of = (f"a total of {a.total} bytes" if buf is None
                      else f"the {size} bytes staged")
                raise OpError("out_of_bounds", f"piece [{a.offset}, {a.offset + len(a.data)}) "
                                               f"does not fit {of} for {a.name!r}")
            if buf is None:  # only for a piece that fits: a refused one stages nothing
                buf = self.staged[key] = bytearray(a.total)
            buf[a.offset:a.offset + len(a.data)] = a.data
            self.expires[key] = self.clock() + self.ttl_s
        return StageReply(len(a.data))

    def adopt(self, call: Call) -> AdoptReply:
        """Restore sessions in this agent's node; on the final batch announce the service
        addresses, start every session and hand them to the node's recovery server.

        Sockets of earlier batches wait in repair mode (inert): a session restored and
        talking before its peers are restored would draw the client's packets here, to a
        stack without the others' sockets, which answers them with resets.
        """
        rt, a = call.node, call.args
        warrant = self._warranted(call, "adopt")
        if call.agent.leases.state(rt.name).fenced:
            raise OpError("failed", f"node {rt.name} is fenced: it takes no sessions")
        allowed = {_cidr(c) for c in (*rt.spec.addresses, *rt.spec.adopt_addresses)}
        foreign = [c for c in a.addresses if _cidr(c) not in allowed]
        if foreign:
            raise OpError("failed", f"node {rt.name} may not take address(es) "
                                    f"{', '.join(x[:64] for x in foreign[:4])}: not among its "
                                    "addresses or adopt_addresses")
        if not rt.spec.netns:
            raise OpError("failed", f"node {rt.name} has no network namespace to restore into")
        self.expire()
        self._supersede(rt.name, {m.name for m in a.sessions})
        failed: dict[str, str] = {}
        t0 = time.monotonic()
        states = self._decode_all(call, failed)  # each with its CB in a memfd: ours to close
        try:
            restoring = self._restore_all(call, states, failed)
            present = self._present(call, states, restoring, failed)
        finally:
            for _, _, fd, _ in states:
                if fd >= 0:
                    os.close(fd)
        t1 = time.monotonic()
        ns, ifname = rt.spec.netns, rt.spec.interface
        with self._lock:
            self.adopting.setdefault(rt.name, []).extend(restoring)
            self.expires[rt.name] = self.clock() + self.ttl_s
            if not a.final:
                return AdoptReply(len(restoring), 0, failed, _ms(t0, t1), 0.0, 0.0,
                                  present=present)
            self.warrants.spend(warrant)
            self.keep(SPENT_KEY, self.warrants.encode())
            restored = self.adopting.pop(rt.name, [])
            self.expires.pop(rt.name, None)
        _announce(ns, ifname, a.addresses, count=1)  # a failure is logged: sessions go on
        t_arp = time.monotonic()
        started = []
        for r in restored:  # repair mode released: each socket talks again
            try:
                started.append(Started(r.moved, r.state, r.handle.resume(), r.cb_fd))
            except Exception as e:  # noqa: BLE001 - the handle closed the socket silently
                failed[r.moved.name] = f"restore: {e}"
                os.close(r.cb_fd)
        t_resume = time.monotonic()
        _announce(ns, ifname, a.addresses)  # again, in case the first crossed a stale ARP request
        t2 = time.monotonic()
        phases = {"arp_ms": _ms(t1, t_arp) + _ms(t_resume, t2), "resume_ms": _ms(t_arp, t_resume)}
        ended: list[str] = []
        handed = self._hand_over(call, started, failed, phases, ended)
        return AdoptReply(len(started), handed, failed, _ms(t0, t1), _ms(t1, t2), _ms(t2),
                          phases, present, ended)

    # -- helpers -----------------------------------------------------------------------

    def _decode_all(self, call: Call, failed: dict[str, str]) -> list:
        """(moved, TcpState, CB memfd, CB bytes) of each session of an adopt that checks:
        its name, its state (ranges), its CB (inflated within the per-region bound and what
        this agent may hold for adopts). The others go to `failed`, naming the problem."""
        rt, a = call.node, call.args
        limit = call.agent.config.max_region_bytes
        with self._lock:
            budget = ADOPT_MAX_BYTES - self._adopting_bytes()
        served = {_plain_ip(c.split("/")[0]) for c in a.addresses} - {None}
        out: list = []
        try:
            for m in a.sessions:
                try:
                    _check_name(m.name)
                    with self._lock:
                        tcp = self.staged.pop((rt.name, m.name), b"") if m.staged else m.tcp
                        self.expires.pop((rt.name, m.name), None)
                    state = TcpState.decode(bytes(tcp))
                    cb = inflate(m.cb, min(limit, budget), f"session {m.name}: its CB")
                    size = _cb_size(m, len(cb), min(limit, budget))
                    if _plain_ip(state.local_addr) not in served:  # (a node's own making: a
                        # socket of the target's loopback, or of its own service address)
                        raise OpError("failed", f"its local address {state.local_addr} is "
                                                "none of the service addresses moved with it")
                    fd = cb_memfd(m.name, cb, m.cb_parts, size)
                except (BackdoorsError, OpError, OSError) as e:
                    failed[m.name] = f"decode: {e}"
                    continue
                budget -= size
                out.append((m, state, fd, size))
        except BaseException:
            for _, _, fd, _ in out:
                os.close(fd)
            raise
        return out

    def _restore_all(self, call: Call, states: list, failed: dict[str, str]) -> list[Restoring]:
        """Take the service addresses and restore each session paused (inert); a memfd
        that goes into a Restoring is set to -1 in `states` (the Restoring owns it)."""
        rt, a = call.node, call.args
        ns, ifname = rt.spec.netns, rt.spec.interface
        try:
            # A restored socket's own ARP request for its peer must not announce the service
            # address before every session is restored: source it from the node's own address.
            net.netns.set_sysctl(ns, f"net/ipv4/conf/{ifname}/arp_announce", 2)
            net.set_up(ns, ifname, True)
            for cidr in a.addresses:
                net.add_address(ns, ifname, cidr)
                self._adopted(rt.name, cidr)  # kept before any session is restored on it
        except BackdoorsError as e:
            raise OpError("failed", f"node {rt.name}: cannot take the service addresses: "
                                    f"{e}") from None
        restoring: list[Restoring] = []
        try:
            with net.netns.enter(ns):
                with initial_window({s.remote_addr for _, s, _, _ in states},
                                    segments_needed(s for _, s, _, _ in states)):
                    for i, (m, state, fd, size) in enumerate(states):
                        try:
                            handle = restore_paused(state, resend_unacked=True)
                        except Exception as e:  # noqa: BLE001 - one bad session, not the batch
                            failed[m.name] = f"restore: {e}"
                            continue
                        restoring.append(Restoring(m, state, handle, fd, size))
                        states[i] = (m, state, -1, size)
        except BaseException:
            for r in restoring:
                r.close()
            raise
        return restoring

    def present(self, call: Call) -> PresentReply:
        """Which of the sessions named the node has (their connections are there): what
        an evacuating agent asks a target whose answer was lost before it sends the
        sessions elsewhere. Only sessions on addresses the node took over by an adopt can
        be (a peer learns nothing of the node's other connections, and asking of them
        costs no read of its table); one question of a peer at a time (a table read
        takes a node worker: a peer asking without end would take them all)."""
        rt, a = call.node, call.args
        if not rt.spec.netns:
            raise OpError("failed", f"node {rt.name} has no network namespace: it has no "
                                    "sessions of its own")
        with self._keeping:
            adopted = {str(ipaddress.ip_interface(c).ip)
                       for c in self.adopted_addresses.get(rt.name, ())}
        asked = []
        for name, (local, lport, remote, rport) in a.sessions.items():
            _check_name(name)
            try:
                here = (name, net.sockets.endpoint(local, lport),
                        net.sockets.endpoint(remote, rport))
            except ValueError as e:
                raise OpError("bad_request", f"session {name}: {e}") from None
            if here[1][0] in adopted:
                asked.append(here)
        if not asked:
            return PresentReply([])
        peer = min(call.monitors)  # (a peer's request has one signer)
        with self._lock:
            if peer in self._presenting:
                raise OpError("busy", f"a question of {peer} about its sessions is being "
                                      "answered: one at a time")
            self._presenting.add(peer)
        try:
            return PresentReply(self._here(rt, asked))
        except BackdoorsError as e:
            raise OpError("failed", str(e)) from None
        finally:
            with self._lock:
                self._presenting.discard(peer)

    def _present(self, call: Call, states: list, restoring: list[Restoring],
                 failed: dict[str, str]) -> list[str]:
        """The sessions that failed to restore because the node already has their
        connection: an earlier evacuate moved them here and its answer was lost (this agent
        died after the hand-over). Taken out of `failed`: the source's copies are stale, to
        be dropped, not kept for elsewhere."""
        tried = [(m.name, net.sockets.endpoint(*st.local), net.sockets.endpoint(*st.remote))
                 for m, st, fd, _ in states if fd >= 0 and m.name in failed]
        if not tried:
            return []
        try:
            present = self._here(call.node, tried, restoring)
        except BackdoorsError as e:
            log.warning("node %s: cannot tell which sessions it has already: %s",
                        call.node.name, e)
            return []
        for name in present:
            del failed[name]
        return present

    def _here(self, rt: NodeRuntime, asked: list, restoring: list[Restoring] = ()) -> list[str]:
        """The names of `asked` ((name, local, remote) endpoints) whose connection node
        `rt` has, in any state but LISTEN, other than this agent's own inert copies
        (restored for an adopt's final batch): NetError if its table cannot be read."""
        with self._lock:
            paused = [*self.adopting.get(rt.name, ()), *restoring]
        ours = {os.fstat(r.handle.sock.fileno()).st_ino for r in paused}
        here = net.sockets.connections(rt.spec.netns)
        return [name for name, local, remote in asked
                if (local, remote) in here and here[(local, remote)] not in ours]

    def _supersede(self, node: str, names: set[str]) -> None:
        """Close this agent's inert copies of `names` restored for an adopt of `node`
        whose final batch never came (an evacuate that failed after an earlier batch): the
        sessions come again, and the copies would stand in their way until they expire."""
        with self._lock:
            pending = self.adopting.get(node)
            if not pending:
                return
            stale = [r for r in pending if r.moved.name in names]
            pending[:] = [r for r in pending if r.moved.name not in names]
        for r in stale:
            r.close()

    def _hand_over(self, call: Call, started: list[Started], failed: dict[str, str],
                   phases: dict[str, float], ended: list[str]) -> int:
        """Hand each session to the recovery server of its port, in the node's directory
        (adding the time of each step to `phases`; the sessions whose clients ended them
        meanwhile to `ended`)."""
        by_port: dict[int, list[Started]] = {}
        for item in started:  # a channel goes to the server it belongs to (its home port)
            header = os.pread(item.cb_fd, cbformat.HEADER_SIZE, 0)
            port = cbformat.server_port(header, item.state.local_port)
            by_port.setdefault(port, []).append(item)
        directory = os.path.join(self.run_dir, call.node.name)
        handed = 0
        for port, items in sorted(by_port.items()):
            path = adoption_path(directory, port)
            if not os.path.exists(path):
                path = os.path.join(directory, ADOPT_SOCKET)  # one server for every port
            handed += _hand_over_to(call, path, items, failed, phases, ended)
        return handed

    def _service_addresses(self, rt: NodeRuntime) -> list[str]:
        """The node's own service addresses and those it took over with adopted sessions."""
        return sorted(set(rt.spec.addresses) | self.adopted_addresses.get(rt.name, set()))

    def _peer_client(self, address: str, agent: str) -> AgentClient:
        return AgentClient(address, self.identity, agent, self.peers[agent], netns=self.netns,
                           timeout=LONG_OP_S)

    def _warranted(self, call: Call, op: str) -> frozenset:
        """The warrant of a peer's stage or adopt (agent/warrant.py), or OpError auth."""
        if not call.peer:
            raise OpError("auth", f"{op} is for peer agents (this agent's peers) handing "
                                  "sessions over on the monitors' evacuate")
        (peer,) = call.monitors
        try:
            return self.warrants.check(call.args.warrant, peer, call.node.name)
        except WarrantError as e:
            raise OpError("auth", f"{op} from {peer}: {e}") from None


class _Adopts:
    """The adopt requests of one evacuate, sent in order by a thread of their own: the
    target restores a batch while the evacuating agent dumps the next. After the first
    failure nothing more is sent (`error`); `final_sent` says whether the final batch was
    (it may have arrived, its answer not)."""

    def __init__(self, recovery: Recovery, call: Call):
        self.recovery, self.call = recovery, call
        self.replies: list[AdoptReply] = []
        self.error: Exception | None = None
        self.final_sent = False
        self.queued = 0  # sessions given to `send` so far
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def send(self, sessions: list[MovedSession], *, final: bool = False) -> None:
        """Queue `sessions` (in batches within BATCH_BYTES; the final batch may be empty)."""
        self.queued += len(sessions)
        batches = list(_batches(sessions)) or ([[]] if final else [])
        for i, batch in enumerate(batches):
            self._queue.put((batch, final and i == len(batches) - 1))
        if self._thread is None and batches:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"bd-evacuate-{self.call.node.name}")
            self._thread.start()

    def abandon(self) -> None:
        """Send nothing more (what is queued is dropped)."""
        self.error = self.error or AgentError("the evacuate was abandoned")

    def finish(self) -> None:
        """Wait until every queued batch was sent and answered (or the first failed)."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        rt, a = self.call.node, self.call.args
        warrant = list(self.call.warrant)
        peer = None
        try:
            while (item := self._queue.get()) is not None:
                if self.error is not None:
                    continue  # drained, not sent
                batch, final = item
                try:
                    if peer is None:
                        peer = self.recovery._peer_client(a.to, a.to_agent)
                    batch = [_stage(peer, a.to_node, m, warrant) for m in batch]
                    self.final_sent = final
                    self.replies.append(peer.adopt(a.to_node, self.recovery._service_addresses(rt),
                                                   batch, warrant, final=final))
                except Exception as e:  # noqa: BLE001 - the evacuate reports it, keeps all
                    self.error = e
        finally:
            if peer is not None:
                peer.close()


def _hand_over_to(call: Call, path: str, started: list[Started], failed: dict[str, str],
                  phases: dict[str, float], ended: list[str]) -> int:
    """Hand every started session (socket + a memfd copy of its CB) to the server at
    `path` in batch frames (adoption.AdoptionClient: one reply per batch, a window of
    batches in flight), holding the adopted ones here as the server's as each batch's
    verdicts come (while the server takes the next). A session the server refused is
    closed here (its client gets nothing: the restored socket goes silently), unless its
    client ended the connection meanwhile (a reset: `ended`, nothing left to move); one
    without a verdict stays held as the server's, which may serve it."""
    node = call.node.name
    t0 = time.monotonic()
    try:
        client = AdoptionClient(path)
    except BackdoorsError as e:
        for item in started:
            failed[item.moved.name] = f"hand-over: {e} (no recovery server listens at {path}: " \
                                      "see BACKDOORS_ADOPT_DIR / BACKDOORS_ADOPT_SOCKET)"
            close_silently(item.sock)  # the session is lost here; nothing reaches its client
            os.close(item.cb_fd)
        return 0
    accepted = 0
    unanswered: list[BackdoorsError] = []
    spent: dict[str, float] = {}
    with client:
        server = client.server_pid
        if (why := outsider(call.node.node, server)) is not None:
            for item in started:
                failed[item.moved.name] = f"hand-over refused at {path}: {why}"
                close_silently(item.sock)
                os.close(item.cb_fd)
            log.warning("node %s: not handing sessions to %s: %s", node, path, why)
            return 0
        try:  # opened now: if the server dies during the hand-over, its death still shows
            pidfd = os.pidfd_open(server)
        except OSError:
            pidfd = None
        for item in started:
            call.agent.sessions.expect(node, item.moved.name, item.state)
        process = read_process(server)  # once, not once per session
        settled = 0

        def settle(lo: int, hi: int, verdicts: list) -> None:
            """The verdicts on started[lo:hi]: each adopted session held here at once as
            if the server had registered it (recoverable again before the server gets to
            register it itself, which replaces these), each refused one closed."""
            nonlocal accepted, settled
            for item, verdict in zip(started[lo:hi], verdicts):
                if verdict is not None and not isinstance(verdict, (NoVerdict, NotHanded)):
                    if _ended(item.sock):  # (refused as "not connected")
                        ended.append(item.moved.name)
                    else:
                        failed[item.moved.name] = f"hand-over: {verdict}"
                    call.agent.sessions.forget(node, item.moved.name)
                    close_silently(item.sock)
                    os.close(item.cb_fd)
                    continue
                if verdict is not None:
                    # The connection broke: the server may serve it (it reads what was
                    # sent), or died. Held as its own either way: if it died, the session
                    # is an orphan for its successor (agent.owners), never closed here.
                    # Not in `failed`: the evacuating agent would move it a second time.
                    unanswered.append(verdict)
                accepted += 1
                _hold(call, item, server, spent, process)
                item.sock.close()  # the agent and the server hold their own duplicates
                os.close(item.cb_fd)
            settled = hi

        t1 = time.monotonic()
        try:
            verdicts = client.hand_over_all(
                [(item.sock, item.cb_fd,
                  Handover.from_tcp_state(item.moved.name.removeprefix("cb-"), item.state))
                 for item in started], answered=settle)
        except BackdoorsError as e:  # nothing was sent: nothing reached the server
            verdicts = [e] * len(started)
        settle(settled, len(started), verdicts[settled:])  # those without a verdict, if any
    t2 = time.monotonic()
    if unanswered:
        log.warning("node %s: %d sessions held as server %d's without its verdict: %s", node,
                    len(unanswered), server, unanswered[0])
    if pidfd is not None:
        # the server owns what it took: if it dies (even before it registers anything),
        # its sessions are orphans to readopt (agent.owners), never left held for nobody
        if accepted and (owners := getattr(call.agent, "owners", None)) is not None:
            owners.watch(node, server, pidfd)
        os.close(pidfd)
    for key, ms in (("connect_ms", _ms(t0, t1)), ("send_ms", _ms(t1, t2)),
                    *((f"{k}_ms", v * 1000) for k, v in spent.items())):
        phases[key] = round(phases.get(key, 0.0) + ms, 3)
    phases["hold_ms"] = round(phases.get("hold_ms", 0.0) + sum(spent.values()) * 1000, 3)
    return accepted


def _hold(call: Call, item: Started, pid: int, spent: dict[str, float] | None = None,
          process=None) -> None:
    """Register a handed-over session's box and socket under the server's pid (the
    server's own registration of the same name replaces them). The box is a stand-in: if
    the server registered its own first (it attaches on its own thread, racing this), that
    one stays. A server takes the copy handed over as its box (CbRegion.take_over): the
    stand-in is then that box, live; one that made a new box (larger capacities) leaves
    the stand-in at the hand-over's export until it registers its own. A session that
    cannot be held (SessionTable.hold_handed) is the server's alone, never an error of the
    whole hand-over."""
    node, name = call.node.name, item.moved.name
    try:
        t0 = time.monotonic()
        if not call.agent.sessions.hold_handed(node, name, item.sock, pid):
            return
        t1 = time.monotonic()
        call.agent.regions.keep(node, name, SESSION_KIND, item.cb_fd, pid, stand_in=True,
                                process=process)
        if spent is not None:  # seconds in each table, summed over the sessions
            spent["hold_sessions"] = spent.get("hold_sessions", 0.0) + t1 - t0
            spent["hold_regions"] = spent.get("hold_regions", 0.0) + time.monotonic() - t1
    except (BackdoorsError, OSError) as e:
        log.warning("node %s: could not hold handed-over session %s: %s", node, name, e)


def _check_name(name: str) -> None:
    """A session's name as regions carry it ("cb-<session>"); it names kernel objects."""
    if not (name.startswith("cb-") and REGION_NAME.fullmatch(name)):
        raise OpError("bad_request", f"session name {name[:80]!r} is not cb-<session> "
                                     f"({REGION_NAME.pattern})")


def inflate(data: bytes, limit: int, what: str) -> bytes:
    """zlib-decompress `data` to at most `limit` bytes: AgentError if it would inflate
    beyond (a ratio of ~1,000 makes a 768 KiB batch most of a GiB), is not zlib, is
    truncated or has trailing bytes."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, max(limit, 0) + 1)
    except zlib.error as e:
        raise AgentError(f"{what} is not zlib data: {e}") from None
    if len(out) > limit:
        raise AgentError(f"{what} inflates beyond {limit} bytes")
    if not z.eof or z.unused_data:
        raise AgentError(f"{what} is truncated or has trailing bytes")
    return out


def _cb_size(m: MovedSession, inflated: int, limit: int) -> int:
    """The size of the region `m.cb` (`inflated` bytes) is a copy of: its own length, or
    cb_size when it holds cb_parts, which must be in order, apart, within cb_size (at
    most `limit`) and as long as it is. AgentError naming the problem otherwise."""
    if not m.cb_parts:
        return inflated
    what = f"session {m.name}: its CB"
    if not 0 < m.cb_size <= limit:
        raise AgentError(f"{what} has a size of {m.cb_size} bytes, not within (0, {limit}]")
    end = total = 0
    for offset, length in m.cb_parts:
        if offset < end or length <= 0 or offset + length > m.cb_size:
            raise AgentError(f"{what}: part ({offset}, {length}) overlaps the one before it, "
                             f"is empty or ends beyond its {m.cb_size} bytes")
        end, total = offset + length, total + length
    if total != inflated:
        raise AgentError(f"{what}: its parts hold {total} bytes, its data {inflated}")
    return m.cb_size


def _announce(ns: str, ifname: str, addresses: list[str], **kw) -> None:
    for cidr in addresses:
        try:
            net.gratuitous_arp(ns, ifname, cidr.split("/")[0], linger=False, **kw)
        except BackdoorsError as e:
            log.warning("gratuitous ARP for %s in %s failed: %s", cidr, ns, e)



def _plain_ip(text: str):
    """An address as compared: an IPv4-mapped IPv6 one as its IPv4 (None: no address)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _cidr(text: str):
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return text


def _stage(peer: AgentClient, to_node: str, m: MovedSession, warrant: list[bytes]
           ) -> MovedSession:
    """Send a large session state ahead in pieces (one that would not fit an adopt
    request beside its box too); the session then travels without it."""
    if len(m.tcp) <= STAGE_PIECE and _size(m) + 64 <= BATCH_BYTES:
        return m
    for off in range(0, len(m.tcp), STAGE_PIECE):
        peer.stage(to_node, m.name, off, len(m.tcp), m.tcp[off:off + STAGE_PIECE], warrant)
    return msgspec.structs.replace(m, tcp=b"", staged=True)


def _size(m: MovedSession) -> int:
    return len(m.tcp) + len(m.cb)


def _elsewhere(unsure: Unsure | None, args: EvacuateArgs) -> bool:
    """Whether an earlier evacuate that may have sent the node's sessions (`unsure`, or
    None) sent them to another target than this one's (`args`): it must say first which
    it has."""
    return unsure is not None and (unsure.to_agent, unsure.to_node) != (args.to_agent,
                                                                        args.to_node)


def _queued(sock: socket.socket) -> int:
    """Bytes in a session socket's queues (unread input, unsent or unacknowledged output):
    about what its dump will take (0 if it cannot say)."""
    try:
        return ioctl_int(sock, SIOCINQ) + ioctl_int(sock, SIOCOUTQ)
    except OSError:
        return 0


def _batches(moving: list[MovedSession]) -> Iterator[list[MovedSession]]:
    batch, size = [], 0
    for m in moving:
        n = len(m.tcp) + len(m.cb) + 64
        if batch and size + n > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(m)
        size += n
    if batch:
        yield batch


def _ms(start: float, end: float | None = None) -> float:
    """Milliseconds from `start` to `end` (now), rounded as replies carry them."""
    return round(((time.monotonic() if end is None else end) - start) * 1000, 3)

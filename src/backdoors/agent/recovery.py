"""Session recovery ops: fence a failed node, evacuate its sessions, adopt them elsewhere.

The monitor asks the failed node's agent to `fence` the node (freeze it and cut its
network: interface down, service addresses removed — fail-stop, and the network lock of
its sessions), then to `evacuate` it to a node of another agent. Evacuation dumps every
held session socket with TCP_REPAIR, reads its Continuation Box, and sends both to the
target agent over the private network (agent to agent, authenticated with this agent's
`peer_id` key). The target's `adopt` adds the service addresses to its node, restores the
sockets inside the node's namespace, announces the addresses (gratuitous ARP) and hands
each session (socket + CB) to the recovery server listening on the node's adoption socket.

Sessions dumped but not adopted (the target failed) stay in limbo here, in memory, and go
with the next `evacuate` of the same node.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import zlib
from typing import TYPE_CHECKING

import msgspec

from .. import net
from ..errors import AgentError, BackdoorsError
from ..net.route import initial_window
from ..tcprepair import TcpState, close_silently, repair, restore_paused, segments_needed
from ..continuations.listener import adoption_path
from .ops import Call, Op, OpError

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("backdoors.agent")

ADOPT_SOCKET = "adopt.sock"  # a node's single recovery server; else adopt-<port>.sock
BATCH_BYTES = 768 * 1024  # per adopt request, below the 1 MiB frame limit
LONG_OP_S = 30.0
STAGE_PIECE = 512 * 1024  # session states above this go ahead in pieces (op stage)
STAGE_MAX_BYTES = 512 << 20  # what an agent holds staged at most
HANDOVER_BATCH = 64  # sessions per round of hand-overs (verdicts queue up meanwhile)


class NodeArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str


class EvacuateArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    to: str  # the target agent, "ADDR:PORT" on the private network
    to_node: str  # a node of the target agent running the recovery server


class MovedSession(msgspec.Struct, forbid_unknown_fields=True):
    name: str  # "cb-<session>"
    tcp: bytes  # TcpState.encode(); empty when staged (sent before in pieces: op stage)
    cb: bytes  # the Continuation Box region, zlib-compressed
    staged: bool = False


class StageArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    name: str  # the session the piece belongs to
    offset: int
    total: int
    data: bytes


class AdoptArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    addresses: list[str]
    sessions: list[MovedSession]
    final: bool = True  # the last batch: announce the addresses, start every session


class SessionInfo(msgspec.Struct):
    name: str
    connection: str
    pid: int
    adopted: bool = False  # moved here from another node by a recovery


class FenceReply(msgspec.Struct):
    frozen_ms: float
    network_ms: float
    addresses_removed: list[str]
    sessions: int


class EvacuateReply(msgspec.Struct):
    sessions: int
    moved: int
    failed: dict[str, str]
    dump_ms: float
    transfer_ms: float
    adopt: list[dict]


class AdoptReply(msgspec.Struct):
    restored: int
    handed: int
    failed: dict[str, str]
    restore_ms: float
    announce_ms: float
    handover_ms: float


def sessions(call: Call) -> list[SessionInfo]:
    return [SessionInfo(s.name, s.describe(), s.pid, s.since is not None)
            for s in call.agent.sessions.list(call.node.name)]


def fence(call: Call) -> FenceReply:
    """Freeze the node (held until unlock) and cut it off the service network."""
    rt, agent = call.node, call.agent
    t0 = time.monotonic()
    agent.leases.lock(rt.name, call.monitors, None, agent.inner_timeout)
    t1 = time.monotonic()
    removed = []
    if rt.spec.netns:
        try:
            for cidr in _service_addresses(agent, rt):
                if cidr in net.addresses(rt.spec.netns, rt.spec.interface):
                    net.del_address(rt.spec.netns, rt.spec.interface, cidr)
                    removed.append(cidr)
            net.set_up(rt.spec.netns, rt.spec.interface, False)
        except BackdoorsError as e:
            raise OpError("failed", f"node {rt.name} is frozen but its network could not be "
                                    f"cut: {e}") from None
    return FenceReply(round((t1 - t0) * 1000, 3), round((time.monotonic() - t1) * 1000, 3),
                      removed, agent.sessions.count(rt.name))


def unfence(call: Call) -> dict:
    """Return a fenced node to service after inspection: thaw it and bring its interface
    up. The service addresses it had stay where its sessions went."""
    rt, agent = call.node, call.agent
    reply = agent.leases.unlock(rt.name, call.monitors, True, agent.inner_timeout)
    if rt.spec.netns:
        net.set_up(rt.spec.netns, rt.spec.interface, True)
    agent.adopted_addresses.pop(rt.name, None)
    return {"was_locked": reply.was_locked, "thaw_ms": reply.thaw_ms}


def evacuate(call: Call) -> EvacuateReply:
    """Dump every session of a fenced node and hand them to another agent's node."""
    rt, agent, a = call.node, call.agent, call.args
    if not agent.leases.state(rt.name).fenced:
        raise OpError("failed", f"node {rt.name} is not fenced: fence it first, so that its "
                                "sessions cannot change while they move")
    if not agent.config.peer_id:
        raise OpError("failed", "this agent has no peer_id: it cannot talk to other agents")
    t0 = time.monotonic()
    moving = agent.limbo.pop(rt.name, [])
    failed: dict[str, str] = {}
    for s in agent.sessions.take_all(rt.name):
        try:
            with repair(s.sock) as handle:
                state = handle.dump(since=s.since)
                handle.close()
            with agent.regions.use(rt.name, s.name) as entry:
                cb = zlib.compress(entry.region.read(0, entry.size), 1)  # mostly empty log ring
            moving.append(MovedSession(s.name, state.encode(), cb))
        except (BackdoorsError, OSError, KeyError) as e:
            failed[s.name] = f"dump: {e}"
            s.sock.close()
        try:
            agent.regions.remove(rt.name, s.name)
        except KeyError:
            pass
    t1 = time.monotonic()
    replies: list[dict] = []
    try:
        with _peer_client(agent, a.to) as peer:
            moving = [_stage(peer, a.to_node, m) for m in moving]
            batches = list(_batches(moving)) or [[]]
            for i, batch in enumerate(batches):
                reply = peer.call("adopt", node=a.to_node, addresses=_service_addresses(agent, rt),
                                  sessions=batch, final=i == len(batches) - 1)
                replies.append(reply)
                failed.update(reply.get("failed", {}))
    except BackdoorsError as e:
        agent.limbo[rt.name] = moving  # kept for the next evacuate of this node
        raise OpError("failed", f"node {rt.name}: {len(moving)} sessions dumped but the agent "
                                f"at {a.to} did not adopt them ({e}); they are kept for another "
                                "evacuate") from None
    moved = sum(r.get("handed", 0) for r in replies)
    return EvacuateReply(len(moving) + sum(k.startswith("cb-") and v.startswith("dump")
                                           for k, v in failed.items()),
                         moved, failed, round((t1 - t0) * 1000, 3),
                         round((time.monotonic() - t1) * 1000, 3), replies)


def adopt(call: Call) -> AdoptReply:
    """Restore sessions in this agent's node; on the final batch announce the service
    addresses, start every session and hand them to the node's recovery server.

    Sockets of earlier batches wait in repair mode (inert): a session restored and
    talking before its peers are restored would draw the client's packets here, to a
    stack without the others' sockets, which answers them with resets.
    """
    rt, agent, a = call.node, call.agent, call.args
    if not call.monitors <= set(agent.config.peers):
        raise OpError("auth", f"{', '.join(sorted(call.monitors))} may not hand sessions here: "
                              "adopt is for the agents listed in peers")
    if not rt.spec.netns:
        raise OpError("failed", f"node {rt.name} has no network namespace to restore into")
    from ..continuations.adoption import AdoptionClient, Handover
    failed: dict[str, str] = {}
    t0 = time.monotonic()
    states = []
    for m in a.sessions:
        try:
            tcp = agent.staged.pop((rt.name, m.name), b"") if m.staged else m.tcp
            states.append((m, TcpState.decode(bytes(tcp))))
        except BackdoorsError as e:
            failed[m.name] = f"decode: {e}"
    ns, ifname = rt.spec.netns, rt.spec.interface
    try:
        # A restored socket's own ARP request for its peer must not announce the service
        # address before every session is restored: source it from the node's own address.
        net.netns.set_sysctl(ns, f"net/ipv4/conf/{ifname}/arp_announce", 2)
        net.set_up(ns, ifname, True)
        for cidr in a.addresses:
            net.add_address(ns, ifname, cidr)
            agent.adopted_addresses.setdefault(rt.name, set()).add(cidr)
    except BackdoorsError as e:
        raise OpError("failed", f"node {rt.name}: cannot take the service addresses: {e}") from None
    pending = agent.adopting.setdefault(rt.name, [])
    with net.netns.enter(ns):
        with initial_window({s.remote_addr for _, s in states}, segments_needed(s for _, s in states)):
            for m, state in states:
                try:
                    pending.append((m, state, restore_paused(state, resend_unacked=True)))
                except BackdoorsError as e:
                    failed[m.name] = f"restore: {e}"
    t1 = time.monotonic()
    if not a.final:
        return AdoptReply(len(states) - len(failed), 0, failed, round((t1 - t0) * 1000, 3), 0.0, 0.0)
    restored = [(m, state, handle, _memfd(m.name, zlib.decompress(m.cb)))
                for m, state, handle in agent.adopting.pop(rt.name, [])]
    for cidr in a.addresses:
        net.gratuitous_arp(ns, ifname, cidr.split("/")[0], count=1, linger=False)
    started = []
    for m, state, handle, fd in restored:
        try:
            started.append((m, state, handle.resume(), fd))
        except BackdoorsError as e:  # the handle closed the socket silently
            failed[m.name] = f"restore: {e}"
            os.close(fd)
    _announce(ns, ifname, a.addresses)  # again, in case the first crossed a stale ARP request
    t2 = time.monotonic()
    handed = _hand_over(agent, rt.name, started, failed, AdoptionClient, Handover)
    t3 = time.monotonic()
    return AdoptReply(len(started), handed, failed, round((t1 - t0) * 1000, 3),
                      round((t2 - t1) * 1000, 3), round((t3 - t2) * 1000, 3))


def _hand_over(agent: Agent, node: str, started: list, failed: dict[str, str],
               AdoptionClient, Handover) -> int:
    """Hand each session to the recovery server of its port, in the node's directory."""
    by_port: dict[int, list] = {}
    for item in started:
        by_port.setdefault(item[1].local_port, []).append(item)
    handed = 0
    for port, items in sorted(by_port.items()):
        directory = os.path.join(agent.config.run_dir, node)
        path = adoption_path(directory, port)
        if not os.path.exists(path):
            path = os.path.join(directory, ADOPT_SOCKET)  # one server for every port
        handed += _hand_over_to(agent, node, path, items, failed, AdoptionClient, Handover)
    return handed


def _hand_over_to(agent: Agent, node: str, path: str, started: list, failed: dict[str, str],
                  AdoptionClient, Handover) -> int:
    """Hand each started session (socket + a memfd copy of its CB) to the server at `path`,
    then hold them here as the server's (off the sessions' critical path)."""
    try:
        client = AdoptionClient(path)
    except BackdoorsError as e:
        for m, _, sock, _ in started:
            failed[m.name] = f"hand-over: {e} (no recovery server listens at {path}: see " \
                             "BACKDOORS_ADOPT_DIR / BACKDOORS_ADOPT_SOCKET)"
            close_silently(sock)  # the session is lost here; nothing reaches its client
        return 0
    accepted = []
    with client:
        server = client.server_pid
        for start in range(0, len(started), HANDOVER_BATCH):
            batch = started[start:start + HANDOVER_BATCH]
            for m, state, _, _ in batch:
                agent.sessions.expect(node, m.name, state)
            try:
                verdicts = client.hand_over_all(
                    [(sock, fd, Handover.from_tcp_state(m.name.removeprefix("cb-"), state))
                     for m, state, sock, fd in batch])
            except BackdoorsError as e:
                verdicts = [e] * len(batch)
            for (m, state, sock, fd), verdict in zip(batch, verdicts):
                if verdict is None:
                    accepted.append((m, sock, fd))
                else:
                    failed[m.name] = f"hand-over: {verdict}"
                    close_silently(sock)
                    os.close(fd)
    for m, sock, fd in accepted:
        # Held at once as if the server had registered it: recoverable again before the
        # server gets to register it itself (which replaces these).
        _hold(agent, node, m.name, sock, fd, server)
        sock.close()  # the agent and the server hold their own duplicates
        os.close(fd)
    return len(accepted)


def _announce(ns: str, ifname: str, addresses: list[str]) -> None:
    for cidr in addresses:
        try:
            net.gratuitous_arp(ns, ifname, cidr.split("/")[0], linger=False)
        except BackdoorsError as e:
            log.warning("gratuitous ARP for %s in %s failed: %s", cidr, ns, e)


def _hold(agent: Agent, node: str, name: str, sock, cb_fd: int, pid: int) -> None:
    """Register a handed-over session's box and socket under the server's pid (the
    server's own registration of the same name replaces them)."""
    from .regions import SESSION_KIND
    try:
        agent.sessions.hold(node, name, sock.fileno(), pid)
        agent.regions.keep(node, name, SESSION_KIND, cb_fd, pid)
    except (BackdoorsError, OSError) as e:
        log.warning("node %s: could not hold handed-over session %s: %s", node, name, e)


def _service_addresses(agent: Agent, rt) -> list[str]:
    """The node's own service addresses and those it took over with adopted sessions."""
    return sorted(set(rt.spec.addresses) | agent.adopted_addresses.get(rt.name, set()))


def _memfd(name: str, data: bytes) -> int:
    """A sealed memfd holding a copy of a Continuation Box."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd


def stage(call: Call) -> dict:
    """A piece of a large session state, sent ahead of the adopt that uses it (a request
    is at most 1 MiB; a session's queues can hold megabytes)."""
    agent, a = call.agent, call.args
    if not call.monitors <= set(agent.config.peers):
        raise OpError("auth", "stage is for the agents listed in peers")
    key = (call.node.name, a.name)
    buf = agent.staged.get(key)
    if buf is None:
        held = sum(len(b) for b in agent.staged.values())
        if not 0 < a.total <= STAGE_MAX_BYTES - held:
            raise OpError("out_of_bounds", f"staging {a.total} bytes would exceed "
                                           f"{STAGE_MAX_BYTES} (holding {held})")
        buf = agent.staged[key] = bytearray(a.total)
    if len(buf) != a.total or a.offset < 0 or a.offset + len(a.data) > a.total:
        raise OpError("out_of_bounds", f"piece [{a.offset}, {a.offset + len(a.data)}) does not "
                                       f"fit the {a.total} bytes staged for {a.name!r}")
    buf[a.offset:a.offset + len(a.data)] = a.data
    return {"staged": len(a.data)}


def _stage(peer, to_node: str, m: MovedSession) -> MovedSession:
    """Send a large session state ahead in pieces; the session then travels without it."""
    if len(m.tcp) <= STAGE_PIECE:
        return m
    for off in range(0, len(m.tcp), STAGE_PIECE):
        peer.call("stage", node=to_node, name=m.name, offset=off, total=len(m.tcp),
                  data=m.tcp[off:off + STAGE_PIECE])
    return MovedSession(m.name, b"", m.cb, staged=True)


def _batches(moving: list[MovedSession]):
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


def _peer_client(agent: Agent, address: str):
    from .client import AgentClient
    me = agent.config.peer_id
    key = agent.keys.get(me)
    if key is None:
        raise AgentError(f"peer_id {me!r} has no key")
    return AgentClient(address, me, key, netns=agent.config.netns, timeout=LONG_OP_S)


RECOVERY_OPS = (
    Op("sessions", NodeArgs, sessions),
    Op("fence", NodeArgs, fence, destructive=True),
    Op("unfence", NodeArgs, unfence, destructive=True),
    Op("evacuate", EvacuateArgs, evacuate, destructive=True, deadline_s=LONG_OP_S),
    Op("stage", StageArgs, stage, "inline"),
    Op("adopt", AdoptArgs, adopt, deadline_s=LONG_OP_S),
)

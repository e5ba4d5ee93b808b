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
import threading
import time
from typing import TYPE_CHECKING

import msgspec

from .. import net
from ..errors import AgentError, BackdoorsError
from ..tcprepair import TcpState, close_silently, dump, initial_window, restore, segments_needed
from .ops import Call, Op, OpError

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("backdoors.agent")

ADOPT_SOCKET = "adopt.sock"
BATCH_BYTES = 768 * 1024  # per adopt request, below the 1 MiB frame limit
LONG_OP_S = 30.0


class NodeArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str


class EvacuateArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    to: str  # the target agent, "ADDR:PORT" on the private network
    to_node: str  # a node of the target agent running the recovery server


class MovedSession(msgspec.Struct, forbid_unknown_fields=True):
    name: str  # "cb-<session>"
    tcp: bytes  # TcpState.encode()
    cb: bytes  # the Continuation Box region


class AdoptArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    addresses: list[str]
    sessions: list[MovedSession]


class SessionInfo(msgspec.Struct):
    name: str
    connection: str
    pid: int


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
    return [SessionInfo(s.name, s.describe(), s.pid)
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
            for cidr in rt.spec.addresses:
                if cidr in net.addresses(rt.spec.netns, rt.spec.interface):
                    net.del_address(rt.spec.netns, rt.spec.interface, cidr)
                    removed.append(cidr)
            net.set_up(rt.spec.netns, rt.spec.interface, False)
        except BackdoorsError as e:
            raise OpError("failed", f"node {rt.name} is frozen but its network could not be "
                                    f"cut: {e}") from None
    return FenceReply(round((t1 - t0) * 1000, 3), round((time.monotonic() - t1) * 1000, 3),
                      removed, agent.sessions.count(rt.name))


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
            state = dump(s.sock, since=s.since)
            close_silently(s.sock)
            with agent.regions.use(rt.name, s.name) as entry:
                cb = entry.region.read(0, entry.size)
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
            for batch in _batches(moving):
                reply = peer.call("adopt", node=a.to_node, addresses=list(rt.spec.addresses),
                                  sessions=batch)
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
    """Restore sessions in this agent's node and hand them to its recovery server."""
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
            states.append((m, TcpState.decode(m.tcp)))
        except BackdoorsError as e:
            failed[m.name] = f"decode: {e}"
    ns, ifname = rt.spec.netns, rt.spec.interface
    try:
        net.set_up(ns, ifname, True)
        for cidr in a.addresses:
            net.add_address(ns, ifname, cidr)
    except BackdoorsError as e:
        raise OpError("failed", f"node {rt.name}: cannot take the service addresses: {e}") from None
    restored = []
    with net.netns.enter(ns):
        with initial_window({s.remote_addr for _, s in states}, segments_needed(s for _, s in states)):
            for m, state in states:
                try:
                    restored.append((m, state, restore(state, resend_unacked=True)))
                except BackdoorsError as e:
                    failed[m.name] = f"restore: {e}"
    t1 = time.monotonic()
    # Announce the addresses now (closing a packet socket waits for an RCU grace period,
    # ~10 ms: let that happen beside the hand-over).
    announce = threading.Thread(target=_announce, args=(ns, ifname, a.addresses), daemon=True)
    announce.start()
    t2 = time.monotonic()
    handed = 0
    path = os.path.join(agent.config.run_dir, rt.name, ADOPT_SOCKET)
    try:
        client = AdoptionClient(path)
    except BackdoorsError as e:
        for m, _, sock in restored:
            close_silently(sock)  # nothing reaches the client; the sessions are lost here
            failed[m.name] = (f"hand-over: {e} (the recovery server listens at {path}: "
                              "BACKDOORS_ADOPT_SOCKET)")
        restored = []
        client = None
    for m, state, sock in restored:
        cb_fd = _memfd(m.name, m.cb)
        try:
            agent.sessions.expect(rt.name, m.name, state)
            client.hand_over(sock, cb_fd, Handover.from_tcp_state(m.name.removeprefix("cb-"), state))
            handed += 1
        except BackdoorsError as e:
            failed[m.name] = f"hand-over: {e}"
            close_silently(sock)
            sock = None
        finally:
            os.close(cb_fd)
            if sock is not None:
                sock.close()  # the server holds its own duplicate now
    if client is not None:
        client.close()
    t3 = time.monotonic()
    announce.join()
    return AdoptReply(len(restored), handed, failed, round((t1 - t0) * 1000, 3),
                      round((time.monotonic() - t1) * 1000, 3), round((t3 - t2) * 1000, 3))


def _announce(ns: str, ifname: str, addresses: list[str]) -> None:
    for cidr in addresses:
        try:
            net.gratuitous_arp(ns, ifname, cidr.split("/")[0], count=2)
        except BackdoorsError as e:
            log.warning("gratuitous ARP for %s in %s failed: %s", cidr, ns, e)


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
    Op("evacuate", EvacuateArgs, evacuate, destructive=True, deadline_s=LONG_OP_S),
    Op("adopt", AdoptArgs, adopt, deadline_s=LONG_OP_S),
)

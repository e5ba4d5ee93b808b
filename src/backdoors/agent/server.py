"""The RPC server on the private network: frames in, authenticated replies out.

One asyncio task per connection reads a frame, answers it, reads the next (one request in
flight per connection; open more connections for concurrency). Nothing a peer sends can
end the server or another connection: every failure becomes an error reply (and, when the
frame cannot be delimited, a close). Ops run inline, on the memory workers or on the
node's workers under the op deadline: an op still running at its deadline is abandoned,
answered with "deadline", counted as stuck until it returns, and audited when it does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import BackdoorsError
from ..tcprepair.kernel import SIOCINQ, ioctl_int
from .audit import AuditLog
from .auth import Authenticator, Rejected
from .config import NODE_NAME
from .keys import Identity
from .leases import LockBusy
from .metrics import AgentMetrics
from .ops import REPLY_BYTES, AgentView, Call, Op, OpError, Room
from .protocol import (
    DECODE_ERRORS, MAX_EACH, MAX_FRAME, PEER_OPS, READS, REFUSED, REPLY_DOMAIN, TOKENED, Envelope,
    ErrorInfo, Response, SensorsManyReply, Token, frame,
)
from .served import Lane
from .tokens import StaleToken
from .votes import BallotBox, Short

log = logging.getLogger("backdoors.agent")

FRAME_TIMEOUT_S = 5.0  # for the rest of a frame once its header came
#: the ops that set a node's state one way or the other, by what they set: of one signer's
#: requests for one node, one signed before the latest taken is refused (held back on the
#: way and sent late, an `unlock` would undo a later fence). A fence is a lock without a
#: lease (and the network cut): the four share one order.
ORDERED = {"lock": "freeze", "unlock": "freeze", "fence": "freeze", "unfence": "freeze",
           "set_limits": "limits"}
_encode = msgspec.msgpack.Encoder().encode


@dataclass
class Outcome:
    ok: bool
    result: Any = None
    code: str | None = None
    message: str | None = None
    votes: list[str] | None = None


@dataclass(eq=False)
class _Conn:
    """One open connection, as the caps see it."""

    task: asyncio.Task
    reader: asyncio.StreamReader
    address: str  # the peer's source address, without the port
    opened: float  # time.monotonic()
    authenticated: bool = False  # sent a request that authenticated
    signer: str = ""  # who signed its first authentic request
    streaming: bool = False  # subscribed: it carries the agent's events now
    in_request: bool = False  # a request is being answered (never evicted then)
    rejected: str | None = None  # the code, when the request in hand did not authenticate
    closing: str | None = None  # why the server closes it (told to the peer)
    sock: Any = None  # its socket (what the event loop has not read of it yet)


class RpcServer:
    """Serves one agent's RPC on a listening socket it is given: `ops` on `agent`'s nodes,
    requests signed by `monitors` (and `peers`, for PEER_OPS only), replies signed by
    `identity`, counted in `metrics` and written to `audit`."""

    def __init__(self, agent: AgentView, ops: Mapping[str, Op], identity: Identity,
                 monitors: Mapping[str, tuple], peers: Mapping[str, tuple],
                 metrics: AgentMetrics, audit: AuditLog):
        self.agent, self.ops, self.metrics, self.audit = agent, ops, metrics, audit
        self.identity = identity
        config = agent.config
        self.auth = Authenticator(identity.id, monitors, peers,
                                  cache_entries=config.replay_cache_entries)
        self.ballots = BallotBox(config.quorum, config.vote_window_s)
        self.memory_lane = Lane("memory", 2)
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.Task, _Conn] = {}
        self._streams: dict[asyncio.Task, Any] = {}  # subscribed connections: (args, signer)
        self._tokened: dict[str, list[int]] = {}  # node -> tokens of its requests running
        self._vote_tokens: dict[tuple, int] = {}  # (ballot key, voter) -> its fencing token
        self._in_flight: dict[str, int] = {}  # signer -> its requests being answered
        self._order: dict[tuple[str, str, str], float] = {}  # (signer, node, ORDERED) -> ts

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    @property
    def unauthenticated(self) -> int:
        """Open connections that have not yet sent an authenticated request."""
        return sum(not c.authenticated for c in list(self._conns.values()))

    def unauthenticated_from(self, address: str) -> int:
        """Open unauthenticated connections from source `address`."""
        return sum(not c.authenticated and c.address == address
                   for c in list(self._conns.values()))

    async def start(self, sock) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        self.ballots.close()
        self.memory_lane.pool.shutdown(wait=False, cancel_futures=True)

    # -- connections -------------------------------------------------------------------

    def _admit(self, new: _Conn) -> str | None:
        """Count `new` in, making room when a cap is reached by closing the oldest
        unauthenticated connection not in a request, else (all connections open) an idle
        one of a signer over its share; or why it cannot be admitted."""
        c = self.agent.config
        caps = ((c.max_unauthenticated_per_address,
                 lambda x: not x.authenticated and x.address == new.address,
                 f"unauthenticated connections from {new.address}"),
                (c.max_unauthenticated, lambda x: not x.authenticated,
                 "unauthenticated connections"),
                (c.max_connections, lambda x: True, "connections"))
        for cap, counted, what in caps:
            # (counted anew for each cap: a connection evicted for the one before is gone)
            holding = [x for x in self._conns.values() if counted(x)]
            if len(holding) < cap:
                continue
            idle = [x for x in holding if not x.authenticated and not x.in_request]
            if idle:
                # silent ones first (a monitor's new connection has its request on the way),
                # then the address holding the most (a flood's connections may each send a
                # byte), then the oldest
                held = Counter(x.address for x in idle)
                self._evict(min(idle, key=lambda x: (_pending(x), -held[x.address], x.opened)),
                            f"{len(holding)} {what} are open: one without an authenticated "
                            "request (silent, of the address holding the most, the oldest) "
                            "gave way")
            elif (hog := self._over_share(holding)) is not None:
                self._evict(hog, f"{len(holding)} {what} are open: {hog.signer} holds more "
                            "than its share; its oldest idle connection gave way")
            else:
                return f"{len(holding)} {what} are open, the most this agent serves"
        self._conns[new.task] = new
        return None

    def _over_share(self, holding: list[_Conn]) -> _Conn | None:
        """The oldest idle connection of the signer holding the most, if that is more than
        a signer's share of the authenticated connections: one stolen key (a peer's, or a
        monitor's) cannot keep every other signer from connecting."""
        share = self.signer_share()
        held: dict[str, list[_Conn]] = {}
        for x in holding:
            if x.authenticated:
                held.setdefault(x.signer, []).append(x)
        for conns in sorted(held.values(), key=len, reverse=True):  # the most first
            if len(conns) <= share:
                return None
            # (an event stream is a monitor's eyes: never taken for a share)
            idle = [x for x in conns if not x.in_request and not x.streaming]
            if idle:
                return min(idle, key=lambda x: x.opened)
        return None

    def signer_share(self) -> int:
        """A signer's share of the authenticated connections."""
        c = self.agent.config
        signers = max(1, len(self.auth.monitors) + len(self.auth.peers))
        return max(2, (c.max_connections - c.max_unauthenticated) // signers)

    def in_flight_share(self) -> int:
        """The requests a signer may have in flight: its share of the connections, but
        no fewer than a monitor makes at once (`signer_in_flight`)."""
        return max(self.agent.config.signer_in_flight, self.signer_share())

    def _evict(self, conn: _Conn, why: str) -> None:
        self._conns.pop(conn.task, None)
        conn.closing = why
        conn.task.cancel()
        self._closed("evicted")

    def _closed(self, reason: str) -> None:
        self.metrics.closed.labels(reason).inc()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        task = asyncio.current_task()
        c = self.agent.config
        conn = _Conn(task, reader, _address(writer), time.monotonic(),
                     sock=writer.get_extra_info("socket"))
        if (refusal := self._admit(conn)) is not None:
            await self._refuse(writer, peer, "busy", refusal)
            _close(writer)
            return
        try:
            while True:
                if conn.authenticated:
                    wait = c.idle_timeout_s
                else:  # everything up to the first authenticated request: auth_timeout_s
                    wait = conn.opened + c.auth_timeout_s - time.monotonic()
                try:
                    header = await asyncio.wait_for(reader.readexactly(4), wait)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        await self._refuse_frame(writer, peer, f"truncated header of "
                                                 f"{len(e.partial)} bytes")
                    return
                except asyncio.TimeoutError:  # idle: the client reconnects when it needs to
                    self._closed("idle" if conn.authenticated else "auth_timeout")
                    return
                size = int.from_bytes(header, "big")
                if not 0 < size <= MAX_FRAME:
                    await self._refuse_frame(writer, peer, f"frame length {size} is outside "
                                             f"1..{MAX_FRAME}")
                    return
                if not conn.authenticated:
                    wait = min(FRAME_TIMEOUT_S, conn.opened + c.auth_timeout_s - time.monotonic())
                else:
                    wait = FRAME_TIMEOUT_S
                try:
                    payload = await asyncio.wait_for(reader.readexactly(size), wait)
                except asyncio.IncompleteReadError as e:
                    await self._refuse_frame(writer, peer, f"truncated frame: {len(e.partial)} "
                                             f"of {size} bytes")
                    return
                except asyncio.TimeoutError:
                    if not conn.authenticated:
                        self._closed("auth_timeout")
                        return
                    await self._refuse_frame(writer, peer, "timed out waiting for the rest "
                                             "of the frame")
                    return
                conn.in_request, conn.rejected = True, None
                writer.write(frame(await self.handle(payload, peer)))
                conn.in_request = False
                if conn.rejected == "auth":  # a wrong key or signature: no second try
                    self._closed("auth_failed")
                    await self._drain(writer, 1.0)
                    return
                if not await self._drain(writer, c.send_timeout_s):
                    self._closed("send_timeout")
                    return
                if (stream := self._streams.pop(task, None)) is not None:
                    args, signer = stream  # subscribed: the connection carries events only now
                    conn.streaming = True
                    await self.agent.events.stream(reader, writer, self.identity, args, signer)
                    return
        except OSError:
            pass  # the peer went away
        except asyncio.CancelledError:  # evicted, or the server is stopping
            if conn.closing is not None:  # (3.11 streams log a cancelled handler task)
                writer.write(frame(_reply(None, b"", Outcome(False, code="busy",
                                                             message=conn.closing), 0.0)))
        except Exception:  # noqa: BLE001 - one connection's bug must not end the server
            log.exception("connection from %s failed", peer)
        finally:
            self._conns.pop(task, None)
            self._streams.pop(task, None)
            _close(writer)

    @staticmethod
    async def _drain(writer, timeout: float) -> bool:
        """Wait until the peer took the reply (False: not within `timeout`)."""
        transport = writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            await writer.drain()  # not paused: returns at once, without a task
            return True
        try:
            await asyncio.wait_for(writer.drain(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _refuse_frame(self, writer, peer: str, message: str) -> None:
        await self._refuse(writer, peer, "bad_frame", message)

    async def _refuse(self, writer, peer: str, code: str, message: str) -> None:
        """Send an unsigned error reply before closing the connection."""
        self._reject(peer, Rejected(code, message))
        try:
            writer.write(frame(_reply(None, b"", Outcome(False, code=code, message=message),
                                      0.0)))  # unsigned: nothing authentic was read
            await asyncio.wait_for(writer.drain(), 1.0)
        except OSError:
            pass  # gone or not reading (TimeoutError is an OSError)

    def _reject(self, peer: str, r: Rejected) -> None:
        """Count and audit a rejection; the connection it came on learns of it (every
        request that does not authenticate passes here)."""
        if (conn := self._conns.get(asyncio.current_task())) is not None:
            conn.rejected = r.code
        self.metrics.rejected.labels(r.code).inc()
        self.audit.rejected(peer=peer, code=r.code, message=r.message, monitor=r.monitor,
                            op=r.op if r.op in self.ops else "?", verified=r.verified)

    # -- requests ----------------------------------------------------------------------

    async def handle(self, payload: bytes, peer: str = "?") -> bytes:
        """The reply envelope (unframed) for one request frame's payload."""
        start = time.monotonic()
        try:
            opened = self.auth.open(payload)
        except Rejected as r:
            self._reject(peer, r)
            outcome = Outcome(False, code=r.code, message=r.message)
            return _reply(self.identity if r.signed else None, r.nonce, outcome, _ms(start))
        req = opened.request
        if (conn := self._conns.get(asyncio.current_task())) is not None:
            # authenticated from here on, its request running or not: a signer's slow
            # requests count against its share, not against the keyless connections' room
            conn.authenticated, conn.signer = True, conn.signer or req.monitor
        op = self.ops.get(req.op)
        args: Any = None
        in_flight = self._in_flight.get(req.monitor, 0)
        if in_flight >= self.in_flight_share():
            outcome = Outcome(False, code="busy", message=(
                f"{req.monitor} has {in_flight} requests in flight here, a signer's share: "
                "one key cannot take every worker and connection from the others"))
        elif op is None:
            outcome = Outcome(False, code="unknown_op", message=f"unknown op {req.op[:64]!r}; "
                              f"known: {', '.join(sorted(self.ops))}")
        elif opened.peer and op.name not in PEER_OPS:
            outcome = Outcome(False, code="auth", message=f"{req.monitor} is a peer agent: it "
                              f"may call {', '.join(sorted(PEER_OPS))} only")
        else:
            self._in_flight[req.monitor] = in_flight + 1
            try:
                args = op.decoder.decode(req.args)
                outcome = self._out_of_order(op, args, req) or await self._dispatch(
                    op, args, req.monitor, opened.peer, payload, req.token)
            except DECODE_ERRORS as e:
                outcome = Outcome(False, code="bad_request", message=f"{req.op}: bad args: {e}")
            finally:
                if (left := self._in_flight[req.monitor] - 1) > 0:
                    self._in_flight[req.monitor] = left
                else:
                    del self._in_flight[req.monitor]
        if op is not None and op.name == "subscribe" and outcome.ok:
            task = asyncio.current_task()
            if task in self._conns:  # "from now on" = after the last_seq of the reply
                if args.since < 0:
                    args = msgspec.structs.replace(args, epoch=outcome.result.epoch,
                                                   since=outcome.result.last_seq)
                self._streams[task] = (args, req.monitor)
        elapsed = _ms(start)
        label = op.name if op else "?"
        self.metrics.rpc.labels(label, "ok" if outcome.ok else outcome.code).inc()
        self.metrics.rpc_seconds.labels(label).observe(elapsed / 1000)
        if label not in READS or (not outcome.ok and outcome.code in REFUSED):
            self.audit.request(monitor=req.monitor, peer=peer, op=label, args=args,
                               ok=outcome.ok, error=outcome.code, elapsed_ms=elapsed,
                               votes=outcome.votes, message=outcome.message,
                               token=req.token, incident=req.incident)
        return _reply(self.identity, req.nonce, outcome, elapsed)

    def _out_of_order(self, op: Op, args: Any, req) -> Outcome | None:
        """The refusal of a request of ORDERED signed before one its signer sent later
        for the same node and state, which came first; None to go on (and it is the
        latest now)."""
        if (what := ORDERED.get(op.name)) is None or args.node not in self.agent.nodes:
            return None
        key = (req.monitor, args.node, what)
        if req.ts < (latest := self._order.get(key, -math.inf)):
            return Outcome(False, code="stale_request", message=(
                f"{op.name} of node {args.node} signed at {req.ts:.3f}, before the {what} "
                f"request {req.monitor} signed at {latest:.3f}, which came first: not applied "
                "(held back on the way?)"))
        self._order[key] = req.ts
        return None

    async def _dispatch(self, op: Op, args: Any, monitor: str, is_peer: bool,
                        payload: bytes, token: Token | None = None) -> Outcome:
        rt = None
        if op.has_node:
            rt = self.agent.nodes.get(args.node)
            if rt is None:
                return Outcome(False, code="no_such_node",
                               message=f"this agent serves no node {args.node[:64]!r}")
        if token is not None or op.name == "claim":
            # at a quorum, one key alone records no token: a destructive op's once its vote
            # applies it, a claim's never (a fleet's node has one owner: it cannot be voted)
            lone = self.ballots.quorum > 1 and not is_peer
            if (refused := self._check_token(op, args, monitor, token, record=not lone)):
                return refused
            if lone and op.destructive:
                outcome = await self._run(op, args, monitor, is_peer, payload, rt, token.token)
                if outcome.ok:
                    self.agent.tokens.acted(args.node, monitor)
                return outcome
            return await self._owned(op, args, monitor, token.token, lambda: self._run(
                op, args, monitor, is_peer, payload, rt))
        return await self._run(op, args, monitor, is_peer, payload, rt)

    def _voted(self, op: Op, is_peer: bool) -> bool:
        """Whether a request waits for the quorum's votes: a monitor's destructive op."""
        return not is_peer and self.ballots.quorum > 1 and op.destructive

    async def _owned(self, op: Op, args: Any, monitor: str, token: int, run) -> Outcome:
        """Run `run()`, a request with fencing token `token`, once the node's requests
        with older tokens have ended: a new owner's claim (or first op) is answered, and
        its audit line written, only after the former owner's ops still running on the
        node, so that two owners never act on it at once. An older op still running at
        the op deadline is abandoned: the wait ends there. A newer owner that came
        meanwhile makes this request stale."""
        node = args.node
        running = self._tokened.setdefault(node, [])
        end = time.monotonic() + self.agent.config.op_deadline_s
        while any(t < token for t in running) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        seen = self.agent.tokens.get(node)
        if seen is not None and seen[0] > token:
            self.metrics.stale_tokens.labels(node).inc()
            return Outcome(False, code="stale_token", message=(
                f"{op.name}: token {token} of {monitor} for node {node} is older than token "
                f"{seen[0]} of {seen[1]}, which came while it waited: not applied"))
        running.append(token)
        try:
            outcome = await run()
        finally:
            running.remove(token)
        if outcome.ok and op.destructive:
            self.agent.tokens.acted(node, monitor)
        return outcome

    async def _run(self, op: Op, args: Any, monitor: str, is_peer: bool, payload: bytes,
                   rt, token: int | None = None) -> Outcome:
        if not self._voted(op, is_peer):
            # a peer's op is never destructive (PEER_OPS): it never reaches a ballot
            return await self._execute(op, args, rt, {monitor: payload}, is_peer)
        key = (op.name, _encode(args))
        metrics = self.metrics.votes
        metrics.labels(op.name, "cast").inc()
        if token is not None:
            self._vote_tokens[key, monitor] = token
        try:
            outcome = await self.ballots.vote(
                key, monitor, lambda voters: self._execute(op, args, rt, voters, key=key),
                payload)
        except OverflowError as e:
            return Outcome(False, code="busy", message=f"too many pending votes: {e}")
        finally:
            self._vote_tokens.pop((key, monitor), None)
        if isinstance(outcome, Short):
            metrics.labels(op.name, "expired").inc()
            return Outcome(False, code="quorum", votes=outcome.votes, message=(
                f"{len(outcome.votes)} of {outcome.needed} votes for {op.name} within "
                f"{self.ballots.window:g} s (from {', '.join(outcome.votes)}); not applied"))
        metrics.labels(op.name, "applied").inc()
        return outcome

    def _check_token(self, op: Op, args: Any, monitor: str, token: Token | None,
                     record: bool = True) -> Outcome | None:
        """Check and record (unless not `record`) a request's fencing token
        (agent/tokens.py), in one step on the event loop; the refusal, or None to go on."""
        if token is None:
            return Outcome(False, code="bad_request", message="claim needs a token")
        if op.name not in TOKENED or not op.has_node:
            return Outcome(False, code="bad_request", message=f"{op.name} takes no token "
                           f"(only {', '.join(sorted(TOKENED))})")
        if token.node != args.node:
            return Outcome(False, code="bad_request", message=f"the token is for node "
                           f"{token.node[:64]!r}, the request for {args.node[:64]!r}")
        try:
            self.agent.tokens.check(args.node, token.token, monitor, record=record)
        except StaleToken as e:
            self.metrics.stale_tokens.labels(args.node).inc()
            return Outcome(False, code="stale_token", message=f"{op.name}: {e}")
        return None

    async def _execute(self, op: Op, args: Any, rt, voters: dict[str, bytes],
                       is_peer: bool = False, key: tuple | None = None) -> Outcome:
        """Run an op once for `voters` (signer -> signed request; `key`: their ballot's,
        whose voters' fencing tokens are recorded first); every failure becomes an
        Outcome."""
        monitors = frozenset(voters)
        votes = sorted(monitors) if key is not None else None
        for voter in sorted(voters) if key is not None else ():
            if (token := self._vote_tokens.get((key, voter))) is not None:
                try:
                    self.agent.tokens.check(args.node, token, voter, peers=monitors)
                except StaleToken as e:  # a newer owner's came while the vote was open
                    self.metrics.stale_tokens.labels(args.node).inc()
                    return Outcome(False, code="stale_token", message=f"{op.name}: {e}",
                                   votes=votes)
        try:
            if op.destructive and rt is not None and op.name not in ("lock", "unlock"):
                holders = self.agent.leases.holders(rt.name)
                if holders and not holders & monitors:
                    raise LockBusy(f"{self.agent.leases.describe(rt.name)}: only its "
                                   f"holders may {op.name} it until they unlock")
            if op.where == "each":
                return Outcome(True, await self._each(op, args, monitors), votes=votes)
            call = Call(self.agent, args, rt, monitors, tuple(voters.values()), is_peer)
            if op.where == "inline":
                result = op.run(call)
            else:
                lane = (rt.lane if op.where == "node" else self.memory_lane if rt is None
                        else rt.reads)  # a node's region copies wait only for its own
                result = await self.run_blocking(lane, op.name, op.run, call,
                                                 deadline=op.deadline_s,
                                                 who=",".join(sorted(monitors)))
            return Outcome(True, result, votes=votes)
        except OpError as e:
            return Outcome(False, code=e.code, message=e.message, votes=votes)
        except LockBusy as e:
            return Outcome(False, code="busy", message=str(e), votes=votes)
        except BackdoorsError as e:
            return Outcome(False, code="failed", message=str(e), votes=votes)
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            log.exception("op %s failed", op.name)
            return Outcome(False, code="failed", message=f"internal error in {op.name}: {e!r}",
                           votes=votes)

    async def _each(self, op: Op, args: Any, monitors: frozenset[str]) -> SensorsManyReply:
        """`op` (a node's read) for each node of `args.nodes` (every node when empty), all
        at once, each on its own node's read workers under its own deadline: a node whose
        read is stuck or fails costs the others nothing. The replies go in the order
        asked while they fit a frame (`Room`); the nodes after that get `too_large`."""
        if len(args.nodes) > MAX_EACH or len(set(args.nodes)) != len(args.nodes):
            raise OpError("bad_request", f"{op.name}: nodes must be distinct and at most "
                                         f"{MAX_EACH}, got {len(args.nodes)}")
        for name in args.nodes:
            if not NODE_NAME.fullmatch(name):
                raise OpError("bad_request", f"{op.name}: {name[:64]!r} is not a node name")
        names, who = args.nodes or sorted(self.agent.nodes), ",".join(sorted(monitors))

        async def one(name: str) -> Any:
            rt = self.agent.nodes.get(name)
            if rt is None:
                raise OpError("no_such_node", f"this agent serves no node {name[:64]!r}")
            return await self.run_blocking(rt.reads, op.name, op.run,
                                           Call(self.agent, args, rt, monitors),
                                           deadline=op.deadline_s, who=who)

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        replies, errors, room = {}, {}, Room(REPLY_BYTES, names)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                error = _error_info(op, result)
                errors[name] = error if room.take(name, error) else ErrorInfo("too_large",
                                                                                room.FULL)
            elif room.take(name, result):
                replies[name] = result
            else:
                errors[name] = ErrorInfo("too_large", room.FULL)
        return SensorsManyReply(replies, errors)

    async def run_blocking(self, lane: Lane, what: str, fn, *fn_args,
                           deadline: float | None = None, who: str = "") -> Any:
        """fn(*fn_args) on the lane's workers in `who`'s turn (its signers), abandoned
        (code deadline) at the op deadline."""
        if lane.stuck >= lane.workers:
            raise OpError("busy", f"all {lane.workers} workers of {lane.name} are stuck in "
                                  "operations past their deadline (a /proc or cgroupfs access "
                                  "that does not return); retry later")
        deadline = deadline or self.agent.config.op_deadline_s
        loop = asyncio.get_running_loop()
        cf, running = lane.submit(fn, *fn_args, who=who)
        fut = asyncio.wrap_future(cf, loop=loop)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), deadline)
        except asyncio.TimeoutError:
            if cf.cancel():
                raise OpError("deadline", f"{what} on {lane.name} waited {deadline:g} s for a "
                                          "worker and was dropped") from None
            lane.stuck += 1
            lane.misses += 1
            self.metrics.stuck_ops.labels(lane.name).set(lane.stuck)
            started = time.monotonic()
            fut.add_done_callback(lambda f: self._late(lane, what, f, started))
            raise OpError("deadline", f"{what} on {lane.name} did not finish within "
                                      f"{deadline:g} s ({running.where()}); abandoned "
                                      f"({lane.stuck} stuck)") from None

    def _late(self, lane: Lane, what: str, fut: asyncio.Future, started: float) -> None:
        lane.stuck -= 1
        self.metrics.stuck_ops.labels(lane.name).set(lane.stuck)
        error = None if fut.cancelled() or fut.exception() is None else repr(fut.exception())
        self.audit.write(kind="late", lane=lane.name, op=what, ok=error is None,
                               error=error, late_ms=_ms(started))


def _reply(identity: Identity | None, nonce: bytes, outcome: Outcome,
           elapsed_ms: float) -> bytes:
    """A reply envelope, signed by `identity` (None: unsigned)."""
    error = None if outcome.ok else ErrorInfo(outcome.code or "failed", outcome.message or "")
    body = _encode(Response(nonce, outcome.ok, outcome.result if outcome.ok else None, error,
                            round(elapsed_ms, 3)))
    return _encode(Envelope(body, identity.sign(REPLY_DOMAIN, body) if identity else b""))


def _error_info(op: Op, e: BaseException) -> ErrorInfo:
    """What an op's failure on one node of an "each" op says, as _execute would."""
    if isinstance(e, OpError):
        return ErrorInfo(e.code, e.message)
    if isinstance(e, BackdoorsError):
        return ErrorInfo("failed", str(e))
    log.error("op %s failed", op.name, exc_info=e)
    return ErrorInfo("failed", f"internal error in {op.name}: {e!r}")


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000


def _close(writer: asyncio.StreamWriter) -> None:
    """Close now: what the peer did not take is dropped (a peer that reads nothing would
    otherwise keep the socket and its buffer)."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read (StreamReader keeps them in `_buffer`)."""
    return len(getattr(reader, "_buffer", b""))


def _pending(conn: _Conn) -> bool:
    """Whether the peer sent bytes the agent has not read: in the StreamReader, or still
    in the kernel's receive queue (the event loop has not read them yet: a monitor's
    first request, while a flood of connections keeps the loop busy)."""
    if _buffered(conn.reader):
        return True
    if conn.sock is None:
        return False
    try:
        return ioctl_int(conn.sock, SIOCINQ) > 0
    except (OSError, ValueError):
        return False


def _address(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    return str(info[0]) if isinstance(info, tuple) and info else str(info or "?")


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"[{info[0]}]:{info[1]}" if ":" in str(info[0]) else f"{info[0]}:{info[1]}"
    return str(info or "?")

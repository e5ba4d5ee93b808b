"""The monitors' side of the agent RPC: `AgentClient`, with a typed method per op.

A client keeps one connection and reconnects when it has to. It signs each request with
its private key, naming the agent it is for, and accepts a reply only if it carries a
valid signature by that agent's key and echoes the request's nonce (mutual
authentication); an unsigned reply, even an error, is not the agent's word. Errors become AgentError subclasses
with a `.code`: RemoteError ones for the agent's answers, TransportError for the wire.
Thread-safe: calls are serialised on the connection (use one client per thread for
parallel calls).
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import RequestError, TransportError, remote_error
from .protocol import (
    DECODE_ERRORS, DESTRUCTIVE, FENCE_S, HEAL_S, MAX_EACH, MAX_FRAME, NONCE_BYTES, REPLY_DOMAIN, REQUEST_DOMAIN, VERSION,
    AdoptReply, Envelope, EvacuateReply, FenceReply, GuestKillReply, GuestProcesses, HealReply, HeldCount, IntegrityReply,
    KillReply, KillTreeReply, LimitsReply,
    LockReply, MovedSession, NodeInfo, NodeStatus, Pong, PresentReply, ProcessTable, RawResponse, RegionInfo,
    TOKENED, ClaimReply, SensorsManyReply, SensorsReply, SessionInfo, StageReply, UnlockReply, WriteReply,
    frame,
)
from .keys import Identity, verify

_encode = msgspec.msgpack.Encoder().encode
_envelope = msgspec.msgpack.Decoder(Envelope)
_response = msgspec.msgpack.Decoder(RawResponse)
_UNSET = msgspec.UNSET
#: sends of a request again after the agent closed its connection to make room for a
#: newer one before reading it (its reserve of unauthenticated connections full)
EVICTED_RETRIES = 3


class _SigningClock:
    """Request times of this process: the wall clock, but never below the last one given
    (plus 1 us). An agent refuses a lock/unlock or fence/unfence signed before the
    latest it took from the same signer (stale_request): a wall clock stepped back would
    otherwise make this monitor's next ones look older for as long as the step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0.0

    def __call__(self) -> float:
        with self._lock:
            self._last = max(time.time(), self._last + 1e-6)
            return self._last


_signing_time = _SigningClock()


class _GaveWay(TransportError):
    """The agent's word that the connection gave way to a newer one before the request
    was read (unsigned: no request of it was served)."""


class _Closed(Exception):
    """The connection ended before any byte of the reply."""


class AgentClient:
    """A monitor's (or a peer agent's) connection to one agent.

    `address` is (host, port) or "host:port"; `identity` signs the requests (a monitor's
    id and private key); `agent` is the agent's id (its host) and `agent_keys` its public
    key(s), two during a rotation. `netns` makes the socket in that network namespace (the
    private network of a lab). `timeout` bounds each call; with an agent whose quorum is
    above 1, pass its `vote_window` too: destructive calls may wait that long for the
    other monitors' votes. `tokens(node)`, for a monitor of a fleet, gives the fencing
    token sent with each op of protocol.TOKENED on `node` (None: none; it may raise to
    refuse the call, for a node this monitor does not own).
    """

    def __init__(self, address: tuple[str, int] | str, identity: Identity, agent: str,
                 agent_keys: Ed25519PublicKey | tuple[Ed25519PublicKey, ...], *,
                 netns: str | None = None, timeout: float = 1.0, vote_window: float = 0.0,
                 tokens: Callable[[str], int | None] | None = None):
        if isinstance(address, str):
            from ..common.configfile import parse_address
            address = parse_address(address)
        self.address, self.monitor, self.netns = address, identity.id, netns
        self.agent = agent
        self.agent_keys = (agent_keys,) if isinstance(agent_keys, Ed25519PublicKey) \
            else tuple(agent_keys)
        self.timeout, self.vote_window = timeout, vote_window
        self.tokens = tokens
        self.incident: str | None = None  # the incident the requests act for (its owner sets it)
        self._identity = identity
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the generic call --------------------------------------------------------------

    def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Run `op` with `args`; the result as plain msgpack types. Raises AgentError.
        `timeout` overrides the client's for this call (long ops: evacuate)."""
        return self._decode(op, self._request(op, args, timeout), Any)

    def _typed(self, op: str, type_: Any, *, timeout: float | None = None, **args: Any) -> Any:
        raw = self._request(op, {k: v for k, v in args.items() if v is not _UNSET}, timeout)
        return self._decode(op, raw, type_)

    @staticmethod
    def _decode(op: str, raw: msgspec.Raw, type_: Any) -> Any:
        try:
            return msgspec.msgpack.decode(raw, type=type_)
        except DECODE_ERRORS as e:
            raise TransportError(f"{op}: unexpected result from the agent: {e}",
                                 "protocol") from None

    def signed_request(self, op: str, args: dict[str, Any], *, ts: float | None = None,
                       nonce: bytes | None = None, agent: str | None = None,
                       token: int | None = None) -> tuple[bytes, bytes]:
        """(frame payload, nonce) of a request; exposed for tests of the agent's checks.
        `token`: the fencing token for args["node"] (default: from `tokens`)."""
        nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
        request = {"v": VERSION, "monitor": self.monitor, "agent": agent or self.agent,
                   "nonce": nonce, "ts": _signing_time() if ts is None else ts, "op": op,
                   "args": args}
        if token is None and self.tokens is not None and op in TOKENED and "node" in args:
            token = self.tokens(args["node"])
        if token is not None:
            request["token"] = {"node": args["node"], "token": token}
        if self.incident:
            request["incident"] = self.incident
        body = _encode(request)
        return _encode(Envelope(body, self._identity.sign(REQUEST_DOMAIN, body))), nonce

    def _request(self, op: str, args: dict[str, Any], timeout: float | None = None) -> msgspec.Raw:
        payload, nonce = self.signed_request(op, args)
        timeout = (timeout or self.timeout) + (self.vote_window if op in DESTRUCTIVE else 0.0)
        deadline = time.monotonic() + timeout
        for attempt in range(EVICTED_RETRIES + 1):
            with self._lock:
                reply = self._exchange(payload, max(0.001, deadline - time.monotonic()))
                try:
                    return self._open_reply(op, reply, nonce)
                except _GaveWay:
                    if attempt == EVICTED_RETRIES:
                        raise
                    # room made for a newer connection before the request was read (a
                    # keyless flood): it was not served; sent again on a new connection
                    self._disconnect()
        raise AssertionError("unreachable")

    def _open_reply(self, op: str, reply: bytes, nonce: bytes) -> msgspec.Raw:
        try:
            env = _envelope.decode(reply)
            resp = _response.decode(env.body)
        except DECODE_ERRORS as e:
            raise TransportError(f"{op}: malformed reply from the agent: {e}", "protocol") from None
        if not env.sig:
            said = f"{resp.error.code}: {resp.error.message}" if resp.error else \
                ("ok" if resp.ok else "failed")
            gave_way = resp.error is not None and resp.error.code == "busy" \
                and "gave way" in resp.error.message
            raise (_GaveWay if gave_way else TransportError)(
                f"{op}: unsigned reply ({said[:300]}): not the agent's word (it signs every "
                "answer to an authentic, fresh request)", "protocol")
        if not verify(self.agent_keys, REPLY_DOMAIN, env.body, env.sig):
            raise TransportError(f"{op}: the reply's signature is invalid: not agent "
                                 f"{self.agent}, or another key", "protocol")
        if resp.nonce != nonce:
            raise TransportError(f"{op}: the reply does not echo our nonce", "protocol")
        if not resp.ok:
            error = resp.error
            raise remote_error(error.code if error else "failed",
                               f"{op}: {error.message if error else 'failed'}")
        return resp.result

    # -- the wire ----------------------------------------------------------------------

    def exchange(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send one frame payload and return the reply's payload (raw; for tests)."""
        with self._lock:
            return self._exchange(payload, self.timeout if timeout is None else timeout)

    def _exchange(self, payload: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            reused = self._sock is not None
            if not reused:  # (a second connect gets what is left of the call's time)
                self._connect(max(0.001, deadline - time.monotonic()))
            try:
                self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                self._sock.sendall(frame(payload))
                return self._read_frame(deadline)
            except (_Closed, BrokenPipeError, ConnectionResetError) as e:
                self._disconnect()
                # A reused connection may have been closed by the agent while idle: send
                # again once on a new one. The same nonce makes this safe: a request that
                # did arrive the first time is refused the second as a replay.
                if not reused or attempt == 2:
                    raise TransportError(f"agent {self._where()} closed the connection: {e}",
                                         "connect") from None
            except TimeoutError:
                self._disconnect()
                raise TransportError(f"no reply from agent {self._where()} within "
                                     f"{timeout:g} s", "timeout") from None
            except OSError as e:
                self._disconnect()
                raise TransportError(f"agent {self._where()}: {e.strerror or e}",
                                     "connect") from None
        raise AssertionError("unreachable")

    def _read_frame(self, deadline: float) -> bytes:
        header = self._read_exactly(4, deadline, first=True)
        size = int.from_bytes(header, "big")
        if not 0 < size <= MAX_FRAME:
            self._disconnect()
            raise TransportError(f"agent {self._where()} sent a frame of {size} bytes",
                                 "protocol")
        return self._read_exactly(size, deadline)

    def _read_exactly(self, n: int, deadline: float, first: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                if first and not buf:
                    raise _Closed("end of stream")
                raise ConnectionResetError("end of stream inside a frame")
            buf += chunk
        return bytes(buf)

    def _connect(self, timeout: float) -> None:
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            if self.netns:
                from ..net.netns import socket_in  # pyroute2: only when needed
                sock = socket_in(self.netns, family)
            else:
                sock = socket.socket(family, socket.SOCK_STREAM)
        except Exception as e:
            raise TransportError(f"cannot make a socket for agent {self._where()}: {e}",
                                 "connect") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot connect to agent {self._where()}: "
                                 f"{e.strerror or e}", "connect") from None
        self._sock = sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def take_socket(self) -> socket.socket | None:
        """The connection, taken from this client (after `subscribe`: it carries events,
        see agent.events); the next call opens a new one."""
        with self._lock:
            sock, self._sock = self._sock, None
        return sock

    def _where(self) -> str:
        host, port = self.address
        return f"{host}:{port}" + (f" (netns {self.netns})" if self.netns else "")

    # -- typed ops ---------------------------------------------------------------------

    def ping(self) -> Pong:
        return self._typed("ping", Pong)

    def nodes(self) -> list[NodeInfo]:
        return self._typed("nodes", list[NodeInfo])

    def claim(self, node: str, token: int | None = None) -> ClaimReply:
        """Tell the agent this monitor owns `node` since `token` (default: from `tokens`):
        older tokens are refused from now on."""
        payload, nonce = self.signed_request("claim", {"node": node}, token=token)
        with self._lock:
            reply = self._exchange(payload, self.timeout)
        return self._decode("claim", self._open_reply("claim", reply, nonce), ClaimReply)

    def status(self, node: str) -> NodeStatus:
        return self._typed("status", NodeStatus, node=node)

    def regions(self, node: str) -> list[RegionInfo]:
        return self._typed("regions", list[RegionInfo], node=node)

    def read(self, node: str, region: str, offset: int, length: int) -> bytes:
        return self._typed("read", bytes, node=node, region=region, offset=offset,
                           length=length)

    def sensors(self, node: str) -> SensorsReply:
        return self._typed("sensors", SensorsReply, node=node)

    def sensors_many(self, nodes: list[str] | None = None) -> SensorsManyReply:
        """`sensors` of each of `nodes` (default: every node) in one request, or one per
        MAX_EACH nodes (the most a request names); the nodes not read are in `.errors`
        with their code."""
        nodes = list(nodes or [])
        if len(nodes) <= MAX_EACH:
            return self._typed("sensors_many", SensorsManyReply, nodes=nodes)
        nodes = list(dict.fromkeys(nodes))  # a node named twice is read once, in one request
        out = SensorsManyReply({}, {})
        for i in range(0, len(nodes), MAX_EACH):
            part = self._typed("sensors_many", SensorsManyReply, nodes=nodes[i:i + MAX_EACH])
            out.replies.update(part.replies)
            out.errors.update(part.errors)
        return out

    def write(self, node: str, region: str, offset: int, data: bytes) -> int:
        return self._typed("write", WriteReply, node=node, region=region, offset=offset,
                           data=bytes(data)).written

    def processes(self, node: str, *, cmdline: bool = False,
                  comms: list[str] | None = None, hashed: bool = True,
                  threads_within_s: float | None = None) -> ProcessTable:
        """The node's process table; `cmdline`: each row's command line too; `comms`:
        only the rows of processes whose comm is one of these; `hashed` false: no
        executable hashes; `threads_within_s`: each row's `young_threads`, its threads
        started within the last that many seconds, and `unreaped`, its zombies (0 from an
        agent too old to count)."""
        extra: dict = {"cmdline": True} if cmdline else {}
        if comms:
            extra["comms"] = list(comms)
        if not hashed:
            extra["hashed"] = False
        if threads_within_s is not None:
            try:
                return self._typed("processes", ProcessTable, node=node, **extra,
                                   threads_within_s=threads_within_s)
            except RequestError as e:
                if "unknown field `threads_within_s`" not in str(e):  # else an older agent
                    raise
        return self._typed("processes", ProcessTable, node=node, **extra)

    def lock(self, node: str, lease_s: float | None) -> LockReply:
        """Freeze `node` for `lease_s` seconds (renewable), or as a fence if None."""
        return self._typed("lock", LockReply, node=node, lease_s=lease_s)

    def unlock(self, node: str, *, force: bool = False) -> UnlockReply:
        return self._typed("unlock", UnlockReply, node=node, force=force)

    def kill(self, node: str, pid: int, start_time: float | None = None) -> bool:
        """SIGKILL one process; `start_time` (from processes()) guards against pid reuse."""
        return self._typed("kill", KillReply, node=node, pid=pid, start_time=start_time).killed

    def kill_tree(self, node: str, pid: int) -> list[int]:
        return self._typed("kill_tree", KillTreeReply, node=node, pid=pid).pids

    def kill_node(self, node: str) -> list[int]:
        return self._typed("kill_node", KillTreeReply, node=node).pids

    def kernel_integrity(self, node: str) -> IntegrityReply:
        """A VM node's guest kernel integrity: baseline, sweeps, open findings."""
        return self._typed("kernel_integrity", IntegrityReply, node=node)

    def guest_processes(self, node: str) -> GuestProcesses:
        """A VM node's guest process table, read from its kernel's memory."""
        return self._typed("guest_processes", GuestProcesses, node=node)

    def guest_kill(self, node: str, pid: int, *, comm: str | None = None,
                   tree: bool = False, spare: list[str] | None = None) -> GuestKillReply:
        """SIGKILL a process of a VM node's guest (`tree`: its descendants too, but the
        guest's service of each comm in `spare`, vm.service, and theirs), written into the
        guest kernel; `comm` guards against a pid reused since it was read."""
        more = {"spare": list(spare)} if spare else {}  # (an older agent knows no spare)
        return self._typed("guest_kill", GuestKillReply, node=node, pid=pid, comm=comm,
                           tree=tree, timeout=HEAL_S + 1.0, **more)

    def heal_kernel(self, node: str) -> HealReply:
        """Restore the open findings of a VM node's guest kernel."""
        return self._typed("heal_kernel", HealReply, node=node, timeout=HEAL_S + 1.0)

    def set_limits(self, node: str, *, memory: int | None | Any = _UNSET,
                   pids: int | None | Any = _UNSET) -> LimitsReply:
        """Set limits; None removes one, leaving an argument out keeps it."""
        return self._typed("set_limits", LimitsReply, node=node, memory=memory, pids=pids)

    # -- session recovery (docs/recovery.md) -------------------------------------------

    def sessions(self, node: str) -> list[SessionInfo]:
        """The client sessions the agent holds for `node`."""
        return self._typed("sessions", list[SessionInfo], node=node)

    def held(self, node: str) -> HeldCount:
        """How many sessions the agent holds for `node` (and keeps in limbo)."""
        return self._typed("held", HeldCount, node=node)

    def fence(self, node: str) -> FenceReply:
        """Freeze `node` until unfenced and cut its network: fail-stop before evacuate.
        Waits up to FENCE_S for the node to freeze (its tasks must get a CPU to stop)."""
        return self._typed("fence", FenceReply, node=node, timeout=FENCE_S + 1.0)

    def unfence(self, node: str) -> UnlockReply:
        """Thaw a fenced node and bring its interface up again."""
        return self._typed("unfence", UnlockReply, node=node)

    def evacuate(self, node: str, to: str, to_agent: str, to_node: str, *,
                 if_unsure: str | Any = _UNSET, timeout: float | None = None) -> EvacuateReply:
        """Move the sessions of fenced `node` to `to_node` of agent `to_agent` (one of this
        agent's peers) at `to` ("ADDR:PORT" on the private network). `if_unsure` "move":
        move sessions that an earlier evacuate may have moved already (its answer was
        lost) even if that evacuate's target cannot say (default "ask": refused then).
        `timeout` overrides the client's (a long op)."""
        return self._typed("evacuate", EvacuateReply, node=node, to=to, to_agent=to_agent,
                           to_node=to_node, if_unsure=if_unsure, timeout=timeout)

    def present(self, node: str, sessions: dict[str, tuple[str, int, str, int]]) -> list[str]:
        """Agent to agent: which of `sessions` (name -> local address and port, remote
        address and port) `node` has: an evacuate's target asked after its answer was lost."""
        return self._typed("present", PresentReply, node=node, sessions=sessions).present

    def stage(self, node: str, name: str, offset: int, total: int, data: bytes,
              warrant: list[bytes]) -> int:
        """Agent to agent: a piece of session `name`'s large state, ahead of its adopt;
        `warrant` is the monitors' signed evacuate requests it belongs to."""
        return self._typed("stage", StageReply, node=node, name=name, offset=offset,
                           total=total, data=bytes(data), warrant=warrant).staged

    def adopt(self, node: str, addresses: list[str], sessions: list[MovedSession],
              warrant: list[bytes], *, final: bool = True) -> AdoptReply:
        """Agent to agent: restore `sessions` in `node` with the service `addresses`; the
        `final` batch starts them all and hands them to the node's recovery server.
        `warrant`: the monitors' signed evacuate requests naming this agent and node."""
        return self._typed("adopt", AdoptReply, node=node, addresses=addresses,
                           sessions=sessions, warrant=warrant, final=final)

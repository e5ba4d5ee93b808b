"""The local registration server: one Unix socket per node, served by one thread.

A process inside a node connects to <run_dir>/<node>/agent.sock (common.runtime) and sends
a request frame (common.ipc: length + msgpack) with a region's fd attached. The caller
is identified by SO_PEERCRED (and SO_PEERPIDFD, so a recycled pid is noticed) and
accepted only if /proc/PID/cgroup puts it inside that node's cgroup in every hierarchy:
a node registers regions for itself only. Regions must be tmpfs memfds (not hugetlbfs) sealed against
shrinking (no SIGBUS for the agent); Sensor Boxes and Continuation Boxes are validated
before they are kept, Continuation Boxes with pread only (a sparse box costs the agent
nothing). Continuation Boxes use more ops: "hold_socket" hands over a duplicate of the
session's TCP socket (kept in the SessionTable, so a crashed server's connections live
on), "attach" does both for up to MAX_ATTACH boxes in one request (each box kept or
refused on its own), and "release" drops a session's box and socket when it ends normally.

A hostile caller must not stall or crowd out the others: membership is checked at accept
too (an outsider's connection is answered and closed at once), connections are capped per
node and per process, request strings are bounded, refusals are logged at most at a
rate per node (common.ratelimit; the rest summarised), every descriptor a node handed
over is closed by the Closer thread with SO_LINGER cleared (agent.closing), and the
descriptors of a node's unfinished requests are capped (MAX_PENDING_FDS; its sessions
are capped by its share of the agent's descriptors: agent.descriptors). Out of
descriptors all the same, the sockets are not watched for a while (common.accepting).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import math
import os
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec

from .. import net
from ..common import ipc
from ..common.accepting import Pause
from ..common.peers import SO_PEERPIDFD
from ..common.procs import ProcessInfo, read_process
from ..common.ratelimit import LogLimiter
from ..common.runtime import MAX_ATTACH, agent_socket
from ..continuations.errors import ContinuationError
from ..continuations.image import check_cb
from ..errors import AgentError, NetError, SensorBoxError
from ..nodes import Node
from ..sensors import Region, parse_box, read_consistent
from ..tcprepair.kernel import SIOCINQ, ioctl_int
from ..sensors.region import HUGETLBFS_MAGIC, TMPFS_MAGIC, filesystem
from ..common.text import clip
from .audit import AuditLog
from .closing import Closer
from .membership import misplaced, outside_message, read_cgroups
from .metrics import AgentMetrics
from .protocol import DECODE_ERRORS
from .regions import SESSION_KIND, RegionRefused, RegionTable
from .sessions import SessionRefused, SessionTable

log = logging.getLogger("backdoors.agent")

MAX_FRAME = 64 * 1024
#: an "attach" request carries a memfd and a socket for each of its MAX_ATTACH boxes at most
MAX_FDS = 2 * MAX_ATTACH
CONN_TIMEOUT_S = 10.0
MAX_CONNS_PER_NODE = 64  # each process keeps one connection
#: descriptors a node's unfinished requests may hold at once (two whole attaches): 64
#: connections each holding a frame's worth would be 4,096 (agent/descriptors.py)
MAX_PENDING_FDS = 2 * MAX_FDS
MAX_CONNS_PER_PID = 8  # so that one process of a node cannot take all of its node's
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1+
CLAIM_TRIES = 3  # a node racing the agent for its socket path
#: a node's requests may take this share of the registration thread's CPU time, after a
#: burst of NODE_CPU_BURST_S; beyond, the node's connections rest until it is earned back
NODE_CPU_SHARE = 0.5
NODE_CPU_BURST_S = 1.0
#: a node's successful registrations audited one by one, at once and then per second:
#: beyond, counted in a `local_suppressed` line (ok true); the metrics count every one
OK_AUDIT_BURST = 1000
OK_AUDIT_PER_S = 200.0
#: how long a caller found inside its node is believed to stay there (while its pidfd
#: says it lives): only the host moves a process between nodes' cgroups
CALLER_RECHECK_S = 1.0
CB_CHECK_BUDGET_S = 0.03  # a CB being registered must settle this fast (the turn is shared)
REST_LOG_S = 10.0  # a node's rests are logged and audited at most this often

Word = Annotated[str, msgspec.Meta(max_length=32)]
Name = Annotated[str, msgspec.Meta(max_length=64)]


class LocalRequest(msgspec.Struct, forbid_unknown_fields=True):
    op: Word
    kind: Word = "sensorbox"
    name: Name = ""
    writable: bool = False
    names: Annotated[list[Name], msgspec.Meta(max_length=MAX_ATTACH)] = []  # "attach"


class LocalReply(msgspec.Struct):
    ok: bool
    region: dict | None = None
    error: str | None = None


_decode_request = msgspec.msgpack.Decoder(LocalRequest).decode


@dataclass(eq=False)
class _CpuBudget:
    """A token bucket of CPU seconds: refilled at `share` per second, up to `burst`."""

    share: float
    burst: float
    at: float
    tokens: float
    rests: int = 0  # since the last one logged
    logged_at: float = -math.inf

    def charge(self, spent: float, now: float) -> float:
        """Take `spent` seconds; how long the node must rest to earn them back (0: none)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.share)
        self.at = now
        self.tokens -= spent
        return max(0.0, -self.tokens / self.share)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    node: str
    pid: int
    uid: int
    pidfd: int | None
    deadline: float
    reader: ipc.FrameReader
    served: int = 0  # the registration thread's turn that last served it
    # the caller's, read at its first registration: only its start_time is used (fixed
    # for the process's life; the other fields go stale)
    process: ProcessInfo | None = None
    checked: float = -math.inf  # when its cgroups were last found inside its node
    #: time its request spent waiting on its node's box (a generation held odd: the
    #: seqlock's retries sleep), charged with its CPU time
    waited: float = 0.0


class LocalServer:
    """Serves every node's registration socket from one thread; `start()`, `stop()`."""

    def __init__(self, nodes: dict[str, Node], run_dir: str, table: RegionTable, *,
                 audit: AuditLog, metrics: AgentMetrics, sessions: SessionTable | None = None):
        self.nodes, self.run_dir, self.table = nodes, run_dir, table
        self.sessions = sessions or SessionTable(list(nodes), 4096)
        self.audit, self.metrics = audit, metrics
        self.owners = None  # an owners.OwnerWatch, set by the agent
        self.paths = {n: agent_socket(run_dir, n) for n in nodes}
        self._sel = selectors.DefaultSelector()
        self._listeners: dict[socket.socket, str] = {}
        self._conns: dict[socket.socket, _Conn] = {}
        self._made_dirs: list[str] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._closer = Closer()
        self.sessions.closer = self._closer.close_socket
        self._limiter = LogLimiter()  # refusals
        self._ok_limiter = LogLimiter(rate=OK_AUDIT_PER_S, burst=OK_AUDIT_BURST)
        self.cpu_share, self.cpu_burst_s = NODE_CPU_SHARE, NODE_CPU_BURST_S
        self._cpu: dict[str, _CpuBudget] = {}
        self._resting: dict[str, float] = {}  # node -> until (monotonic): not served
        self._turns = 0
        self._reported_at = 0.0
        self._stopping = False
        self._listening = False
        self._listeners_watched = True  # not while out of descriptors (common.accepting)
        self._accept_pause = Pause("the agent's registration sockets")
        self._thread = threading.Thread(target=self._run, name="bd-agent-local", daemon=True)
        self.ops = {"register": self._register, "unregister": self._unregister,
                    "hold_socket": self._hold_socket, "release": self._release,
                    "attach": self._attach}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Serve on the serving thread; the sockets are made now unless `listen()` made
        them already."""
        if not self._listening:
            self.listen()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._closer.start()
        self._thread.start()

    def listen(self) -> None:
        """Create the sockets (replacing stale ones of a killed agent; refused if another
        agent serves one); no thread yet."""
        try:
            self._mkdir(self.run_dir)
            for node, path in self.paths.items():
                self._mkdir(os.path.dirname(path))
                sock = self._claim(node, path)
                if sock is None:
                    continue
                self._listeners[sock] = node
                self._sel.register(sock, selectors.EVENT_READ, None)
            self._listening = True
        except OSError as e:
            self._close_all()
            raise AgentError(f"cannot create the registration socket under {self.run_dir}: "
                             f"{e.strerror} ({e.filename or ''})") from None

    def _claim(self, node: str, path: str) -> socket.socket | None:
        """The listener at node `node`'s socket path. The directory is the node's own (its
        processes write there; a container binds it in), so whatever the node left at the
        path -- a directory, a file, a symlink, a listener of its own -- must not keep the
        agent from starting for every node: anything that is not a socket file of this
        agent's uid is moved aside (renamed within the directory: never followed, deleted
        or read). A live listener of this uid (another agent) is refused as ever. A node
        that keeps planting things faster than they are moved gets no socket (logged)."""
        for _ in range(CLAIM_TRIES):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and not (stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()):
                what = ("a socket of uid %d" % st.st_uid if stat.S_ISSOCK(st.st_mode)
                        else _file_kind(st.st_mode))
                aside = f"{path}.displaced-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(path, aside)  # rename(2) never follows the last component
                log.warning("node %s: moved %s found at its socket path %s aside to %s",
                            node, what, path, os.path.basename(aside))
                self.audit.write(kind="socket_displaced", node=node, path=path, found=what,
                                 moved_to=aside)
            try:
                # mode 0666: anyone may connect; the cgroup check decides
                return ipc.listen(path, mode=0o666, backlog=256)
            except ipc.NotASocket:
                continue  # replaced under our feet (by the node): again
            except OSError as e:
                if e.errno != errno.EADDRINUSE or isinstance(e, ipc.SocketInUse):
                    raise
        log.error("node %s: something keeps reappearing at its socket path %s; it gets no "
                  "registration socket until the agent restarts", node, path)
        self.audit.write(kind="socket_unclaimed", node=node, path=path, tries=CLAIM_TRIES)
        return None

    def alive(self) -> bool:
        """Whether the serving thread runs (for the watchdog)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving; remove the sockets (their directories stay for the next agent)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._close_all()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        for sock, node in self._listeners.items():  # only the sockets this server made
            sock.close()
            ipc.unlink_socket(self.paths[node])
        self._listeners.clear()
        # The directories stay: a node may have them bound in (a container), and a removed
        # and recreated directory would stay invisible there after an agent restart.
        self._made_dirs.clear()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()
        self._closer.stop()

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o755)
            self._made_dirs.append(path)
        except FileExistsError:
            pass

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - housekeeping must not end every node's registrations
                log.exception("local registration: unexpected error in the loop")
                time.sleep(0.05)

    def _turn(self) -> None:
        """One turn of the loop: serve the ready connections, wake resting nodes, report
        suppressed requests, answer overdue connections."""
        timeout = 1.0
        if self._resting:
            timeout = max(0.0, min(timeout, min(self._resting.values()) - time.monotonic()))
        if not self._listeners_watched:
            if (paused := self._accept_pause.remaining()) > 0:
                timeout = min(timeout, paused)
            else:
                self._watch_listeners(True)
        # one request per node per turn: a node keeping all its connections busy delays
        # another node's request by one of its own, not by 64 (the others stay
        # readable: the next select returns at once); and of a node's ready
        # connections, the one served longest ago, so that none of them waits for ever
        turn: dict[str, _Conn] = {}
        for key, _ in self._sel.select(timeout=timeout):
            if key.data == "wake":
                continue
            if key.data is None:
                self._serve(self._accept, key.fileobj)
                continue
            best = turn.get(key.data.node)
            if best is None or key.data.served < best.served:
                turn[key.data.node] = key.data
        for conn in turn.values():
            self._turns += 1
            conn.served = self._turns
            spent = time.thread_time()
            self._serve(self._readable, conn)
            self._charge(conn.node, time.thread_time() - spent + conn.waited)
            conn.waited = 0.0
        now = time.monotonic()
        for node, until in list(self._resting.items()):
            if until <= now:
                self._wake_node(node)
        if now - self._reported_at >= 1.0:
            self._reported_at = now
            for node, count in self._limiter.pending():
                self._suppressed(node, count)
            for node, count in self._ok_limiter.pending():
                self.audit.local_suppressed(node=node, count=count, ok=True)
        for conn in [c for c in self._conns.values() if c.deadline < now]:
            if not conn.reader.partial and _unread(conn.sock):
                # its request waits unread: the agent's backlog, not a slow caller
                conn.deadline = now + CONN_TIMEOUT_S
                continue
            self._reply(conn, LocalReply(False, error=f"no complete request within "
                                                      f"{CONN_TIMEOUT_S:g} s"))
            self._drop(conn)

    def _serve(self, handler, arg) -> None:
        try:
            handler(arg)
        except Exception:  # noqa: BLE001 - one caller must not stop registrations
            log.exception("local registration: unexpected error")
            if isinstance(arg, _Conn):
                self._drop(arg)

    def _charge(self, node: str, spent: float) -> None:
        """Count the time a request of `node` took (its CPU, and its waits on the node's
        box: the registration thread's time either way); a node over its share rests: its
        connections are not read until it has earned the time back (its requests wait in
        its sockets, and the other nodes' are served meanwhile)."""
        now = time.monotonic()
        budget = self._cpu.get(node)
        if budget is None:
            budget = self._cpu[node] = _CpuBudget(self.cpu_share, self.cpu_burst_s, now,
                                                  self.cpu_burst_s)
        rest = budget.charge(spent, now)
        if rest <= 0 or node in self._resting:
            return
        self._resting[node] = now + rest
        for conn in self._conns.values():
            if conn.node == node:
                try:
                    self._sel.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass
        self.metrics.registration_rests.labels(node).inc()
        budget.rests += 1
        if now - budget.logged_at >= REST_LOG_S:
            budget.logged_at = now
            log.warning("node %s: its registrations took more than %g%% of the registration "
                        "thread's CPU; they wait (%d rest(s) since the last report)", node,
                        budget.share * 100, budget.rests)
            self.audit.write(kind="local_rested", node=node, rests=budget.rests,
                             share=budget.share)
            budget.rests = 0

    def _wake_node(self, node: str) -> None:
        """A rested node's connections are read again."""
        del self._resting[node]
        for conn in self._conns.values():
            if conn.node == node:
                try:
                    self._sel.register(conn.sock, selectors.EVENT_READ, conn)
                except KeyError:  # registered already
                    pass

    def _accept(self, listener) -> None:
        node = self._listeners[listener]
        try:
            sock, _ = listener.accept()
        except OSError as err:
            # out of descriptors: the listeners stay readable; not watched for a while
            if self._accept_pause.absorb(err) and self._accept_pause.remaining():
                self._watch_listeners(False)
            return
        self._accept_pause.accepted()
        sock.setblocking(False)
        pid, uid, _ = ipc.peer_credentials(sock)
        try:
            pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:  # older kernel: pid reuse during the check goes unnoticed
            pidfd = None
        conn = _Conn(sock, node, pid, uid, pidfd, time.monotonic() + CONN_TIMEOUT_S,
                     ipc.FrameReader(max_bytes=MAX_FRAME, max_fds=MAX_FDS,
                                     close=functools.partial(self._closer.close, node)))
        mine = [c for c in self._conns.values() if c.node == node]
        try:
            self._check_caller(conn)  # at accept: an outsider holds no connection slot
            if len(mine) >= MAX_CONNS_PER_NODE:
                raise RegionRefused(f"node {node} has {len(mine)} connections open, the cap "
                                    f"is {MAX_CONNS_PER_NODE}: reuse one per process")
            if sum(c.pid == pid for c in mine) >= MAX_CONNS_PER_PID:
                raise RegionRefused(f"process {pid} has {MAX_CONNS_PER_PID} connections open, "
                                    "the cap: reuse one")
        except RegionRefused as e:
            return self._fail(conn, str(e), op="connect")
        self._conns[sock] = conn
        if node not in self._resting:  # else read once its rest ends
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _watch_listeners(self, on: bool) -> None:
        for sock in self._listeners:
            if on:
                self._sel.register(sock, selectors.EVENT_READ, None)
            else:
                self._sel.unregister(sock)
        self._listeners_watched = on

    def _readable(self, conn: _Conn) -> None:
        started = conn.reader.partial
        try:
            frame = conn.reader.read(conn.sock)
        except ipc.PeerClosed:
            return self._drop(conn)
        except ipc.FrameError as e:
            return self._fail(conn, e.strerror)
        except OSError:
            return self._drop(conn)
        if frame is None:
            if not started and conn.reader.partial:  # it must be complete within CONN_TIMEOUT_S
                conn.deadline = time.monotonic() + CONN_TIMEOUT_S
            if conn.reader.pending_fds and (held := self._pending_fds(conn.node)) > MAX_PENDING_FDS:
                self._fail(conn, f"node {conn.node} has {held} descriptors in unfinished "
                                 f"requests, the cap is {MAX_PENDING_FDS}: send a request whole "
                                 "before the next")
            return
        try:
            reply = self._dispatch(conn, frame.payload, frame.fds)
        finally:
            for fd in frame.fds:  # what the handlers kept, they duplicated
                self._closer.close(conn.node, fd)
            frame.fds = []
        self._reply(conn, reply)
        conn.deadline = math.inf  # idle between requests: a process keeps its connection

    def _pending_fds(self, node: str) -> int:
        """Descriptors the node's connections have sent with requests not complete yet:
        held by the agent until they are (or CONN_TIMEOUT_S), so capped per node."""
        return sum(c.reader.pending_fds for c in self._conns.values() if c.node == node)

    def _fail(self, conn: _Conn, message: str, op: str = "?") -> None:
        self._refused(conn, op, "", message)  # on record before the caller can see it
        self._reply(conn, LocalReply(False, error=message))
        self._drop(conn)

    def _reply(self, conn: _Conn, reply: LocalReply) -> None:
        try:
            ipc.send(conn.sock, reply, timeout=0)  # a caller that does not read is not waited for
        except OSError:
            pass

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.reader.discard()
        self._closer.close_socket(conn.node, conn.sock)
        if conn.pidfd is not None:
            os.close(conn.pidfd)
            conn.pidfd = None

    # -- requests ----------------------------------------------------------------------

    def _dispatch(self, conn: _Conn, payload: bytes, fds: list[int]) -> LocalReply:
        try:
            req = _decode_request(payload)
        except DECODE_ERRORS as e:
            self._refused(conn, "?", "", f"malformed request: {e}")
            return LocalReply(False, error=f"malformed request: {e}")
        handler = self.ops.get(req.op)
        if handler is None:
            message = f"unknown op {req.op!r}; this agent knows {', '.join(sorted(self.ops))}"
            self._refused(conn, req.op, req.name, message)
            return LocalReply(False, error=message)
        try:
            self._check_caller(conn)
            region = handler(conn, req, fds)
        except (RegionRefused, SessionRefused, SensorBoxError) as e:
            self._refused(conn, req.op, req.name, str(e))
            return LocalReply(False, error=str(e))
        if req.op != "attach":  # (which accounts for each of its boxes)
            self._audit_ok(conn, req.op, req.name, req.kind)
        self._count_regions(conn.node)
        return LocalReply(True, region=region)

    def _audit_ok(self, conn: _Conn, op: str, name: str, kind: str | None) -> None:
        """Count a success; audit it unless the node is over its rate (a register and
        unregister loop: thousands of lines a second, gigabytes a day)."""
        self.metrics.registrations.labels(conn.node, op, "ok").inc()
        logged, suppressed = self._ok_limiter.admit(conn.node)
        if suppressed:
            self.audit.local_suppressed(node=conn.node, count=suppressed, ok=True)
        if logged:
            self.audit.local(node=conn.node, pid=conn.pid, op=op, name=name, kind=kind,
                             ok=True)

    def _refused(self, conn: _Conn, op: str, name: str, message: str) -> None:
        """Count a refusal; log and audit it unless the node is over its refusal rate."""
        self.metrics.registrations.labels(conn.node, op if op in self.ops else "?",
                                          "refused").inc()
        logged, suppressed = self._limiter.admit(conn.node)
        if suppressed:
            self._suppressed(conn.node, suppressed)
        if not logged:
            return
        log.warning("node %s: %s of %r by pid %d refused: %s", conn.node, clip(op, 64),
                    clip(name), conn.pid, clip(message))
        self.audit.local(node=conn.node, pid=conn.pid, op=op, name=name, ok=False,
                         error=message)

    def _suppressed(self, node: str, count: int) -> None:
        log.warning("%d more refusals from node %s suppressed (over %g per s)", count, node,
                    self._limiter.rate)
        self.audit.local_suppressed(node=node, count=count)

    def _count_regions(self, node: str) -> None:
        self.metrics.regions.labels(node).set(self.table.usage(node)[0])

    def _check_caller(self, conn: _Conn) -> None:
        """The caller (the pid that connected) is alive and inside its node. Its cgroups
        are read at most every CALLER_RECHECK_S (reading /proc/PID/cgroup was a quarter
        of a registration's cost here): a process leaves its node's cgroups only by a
        write to a cgroup.procs outside the node, which only the host can make; in
        between, its pidfd (one poll) says whether it still lives, so a pid reused by
        another process is noticed at once. Without a pidfd (older kernel) every request
        reads them."""
        now = time.monotonic()
        if conn.pidfd is not None and now - conn.checked < CALLER_RECHECK_S:
            if ipc.ready(conn.pidfd):
                raise RegionRefused(f"the caller (pid {conn.pid}) has exited")
            return
        node = self.nodes[conn.node]
        try:
            cgroups = read_cgroups(conn.pid)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                raise RegionRefused(f"the caller (pid {conn.pid}) has exited") from None
            raise RegionRefused(f"cannot check the caller (pid {conn.pid}): {e.strerror}; "
                                "try again") from None
        if conn.pidfd is not None and ipc.ready(conn.pidfd):
            raise RegionRefused(f"the caller (pid {conn.pid}) exited during the check")
        wrong = misplaced(node.cgroup.layout, cgroups, node.cgroup.relpath)
        if wrong is not None:
            raise RegionRefused(
                "a node registers only for itself: "
                + outside_message(conn.pid, conn.node, node.cgroup.paths, wrong,
                                  node.cgroup.relpath))
        conn.checked = now

    def _register(self, conn: _Conn, req: LocalRequest, fds: list[int]) -> dict:
        if len(fds) != 1:
            raise RegionRefused(f"attach exactly one file descriptor (SCM_RIGHTS), got {len(fds)}")
        region = self._keep(conn, req.name, req.kind, req.writable, fds[0])
        return {"name": req.name, "kind": req.kind, "size": region.size,
                "writable": req.writable}

    def _keep(self, conn: _Conn, name: str, kind: str, writable: bool, fd: int):
        """Check the memfd `fd` and keep it as `name` of `kind` (validated as such)."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            st = os.fstat(fd)
        except OSError:
            raise RegionRefused("the fd is not a memfd (memfd_create with "
                                "MFD_ALLOW_SEALING)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise RegionRefused("the memfd is not sealed against shrinking: add F_SEAL_SHRINK "
                                "(fcntl F_ADD_SEALS) before registering")
        fs = filesystem(fd)
        if fs == HUGETLBFS_MAGIC:
            raise RegionRefused("the memfd is on hugetlbfs (MFD_HUGETLB): register a plain "
                                "memfd (a hole punched in a huge page region faults its readers)")
        if fs != TMPFS_MAGIC:
            raise RegionRefused("the fd is not a memfd (memfd_create with MFD_ALLOW_SEALING)")
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if mode == os.O_WRONLY:  # (reopened so through /proc/self/fd: the agent reads it)
            raise RegionRefused("the memfd is open write-only: the agent must read it")
        if writable and (seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)
                         or mode != os.O_RDWR):
            raise RegionRefused(f"region {name!r} is registered writable, but the fd is "
                                "read-only or sealed against writes")
        if not stat.S_ISREG(st.st_mode) or st.st_size <= 0:
            raise RegionRefused("the memfd is empty: size it (ftruncate) before sealing")
        if st.st_size > self.table.max_region_bytes:
            raise RegionRefused(f"region {name!r} has {st.st_size} bytes; the cap is "
                                f"{self.table.max_region_bytes} per region")
        def check(region: Region) -> None:
            # the time spent waiting for a box held mid-update is the node's (it rests
            # for it), not only the CPU time: the Sensor Box's seqlock as the CB's slots
            began, cpu = time.monotonic(), time.thread_time()
            try:
                if kind == "sensorbox":
                    parse_box(read_consistent(region))
                elif kind == SESSION_KIND:
                    _check_cb(region, name)
            except OSError as e:  # (whatever the node made of the file: a refusal)
                raise RegionRefused(f"region {name!r} cannot be read: "
                                    f"{e.strerror or e}") from None
            finally:
                conn.waited += max(0.0, time.monotonic() - began - (time.thread_time() - cpu))

        return self.table.keep(conn.node, name, kind, fd, conn.pid, writable=writable,
                               check=check, process=self._process(conn))

    @staticmethod
    def _process(conn: _Conn) -> ProcessInfo | None:
        """The caller's pid and start time, read once per connection (a pid's start time
        is fixed; /proc/PID/stat costs a step per thread of PID); None if it has exited."""
        if conn.process is None:
            conn.process = read_process(conn.pid)
        return conn.process

    def _attach(self, conn: _Conn, req: LocalRequest, fds: list[int]) -> dict:
        """Continuation Boxes and their sockets, many in one request: the descriptors are
        each box's memfd then its socket, in the order of `names`. Each box is kept and its
        socket held as by register (kind "cb") and hold_socket, or refused on its own
        (nothing of it kept). The request's turn is shared: boxes it did not reach within
        CB_CHECK_BUDGET_S (a node's boxes that never settle) are left for the caller to
        send again ("later")."""
        names = req.names
        if not names or len(fds) != 2 * len(names):
            raise RegionRefused(f"attach takes a memfd and a socket (SCM_RIGHTS) for each of "
                                f"1 to {MAX_ATTACH} names, got {len(fds)} descriptors for "
                                f"{len(names)} names")
        if len(set(names)) != len(names):
            raise RegionRefused("attach names a session twice")
        held: list[str] = []
        refused: dict[str, str] = {}
        later: list[str] = []
        end = time.monotonic() + CB_CHECK_BUDGET_S
        for i, name in enumerate(names):
            if i and time.monotonic() > end:
                later = names[i:]
                break
            try:
                # one this agent handed over and holds for it since is not checked again
                if not self._holds(conn, name, fds[2 * i], fds[2 * i + 1]):
                    # its socket checked first: a refused one leaves what is held as it was
                    sock = self._check_socket(conn, name, fds[2 * i + 1])
                    try:
                        self._keep(conn, name, SESSION_KIND, False, fds[2 * i])
                    except BaseException:
                        self.sessions.closer(conn.node, sock)
                        raise
                    try:  # (refused now only by the cap, reached meanwhile: a new name)
                        self._hold(conn, name, fds[2 * i + 1], checked=sock)
                    except SessionRefused:
                        self._drop_session(conn.node, name)
                        raise
            except (RegionRefused, SessionRefused) as e:
                refused[name] = str(e)
                self._refused(conn, "attach", name, str(e))
                continue
            held.append(name)
            self._audit_ok(conn, "attach", name, SESSION_KIND)
        return {"kind": SESSION_KIND, "held": held, "refused": refused, "later": later}

    def _holds(self, conn: _Conn, name: str, box_fd: int, sock_fd: int) -> bool:
        """Whether the agent holds session `name` for the caller with these very files
        already: a session this agent handed over and held as the caller's (its box taken
        over), attached by the server in its turn. Nothing more to check or store then."""
        process = self._process(conn)
        if not (self.table.holds(conn.node, name, SESSION_KIND, box_fd, conn.pid,
                                 process.start_time if process else None)
                and self.sessions.holds(conn.node, name, sock_fd, conn.pid)):
            return False
        if self.owners is not None:
            self.owners.watch(conn.node, conn.pid, conn.pidfd)
        return True

    def _unregister(self, conn: _Conn, req: LocalRequest, fds: list[int]) -> dict:
        try:
            entry = self.table.remove(conn.node, req.name)
        except KeyError:
            raise RegionRefused(f"node {conn.node} has no region {req.name!r}") from None
        return {"name": entry.name, "kind": entry.kind, "size": entry.size,
                "writable": entry.writable}

    def _hold_socket(self, conn: _Conn, req: LocalRequest, fds: list[int]) -> dict:
        if len(fds) != 1:
            raise RegionRefused(f"attach exactly one socket (SCM_RIGHTS), got {len(fds)}")
        session = self._hold(conn, req.name, fds[0])
        return {"name": req.name, "kind": "socket", "session": session.describe()}

    def _check_socket(self, conn: _Conn, name: str, fd: int) -> socket.socket:
        """SessionRefused if `_hold` would refuse `fd` as `name` now; else the duplicate
        to hold (`_hold(checked=)`) or to close (`sessions.closer`)."""
        sock = self.sessions.check(conn.node, name, fd)
        try:
            self._check_netns(conn, sock.fileno())
        except SessionRefused:
            self.sessions.closer(conn.node, sock)
            raise
        return sock

    def _check_netns(self, conn: _Conn, fd: int) -> None:
        """A session socket must live in its node's network namespace: one a node made in
        a namespace of its own (unshare) would be moved, its addresses taken, as the
        node's. (A node without a namespace of its own: not checked.)"""
        ns = self.nodes[conn.node].netns
        if ns is None:
            return
        try:
            same = net.netns.same_as_socket(ns, fd)
        except NetError as e:
            raise SessionRefused(str(e)) from None
        if not same:
            raise SessionRefused(f"the socket is not of node {conn.node}'s network "
                                 f"namespace {ns!r}")

    def _hold(self, conn: _Conn, name: str, fd: int, *, checked: socket.socket | None = None):
        """Hold the session socket `fd` as `name` (`checked`: `_check_socket`'s duplicate
        of it, taken over); its server's death becomes an event."""
        if checked is None:
            checked = self._check_socket(conn, name, fd)
        session = self.sessions.hold(conn.node, name, fd, conn.pid, checked=checked)
        if self.owners is not None:  # (agent.owners)
            self.owners.watch(conn.node, conn.pid, conn.pidfd)
        return session

    def _release(self, conn: _Conn, req: LocalRequest, fds: list[int]) -> dict:
        """The session ended: drop its socket and its box (either may be gone already)."""
        held, box = self._drop_session(conn.node, req.name)
        if held is None and not box:
            raise RegionRefused(f"node {conn.node} holds no session {req.name!r}")
        return {"name": req.name, "kind": SESSION_KIND, "socket": held is not None, "box": box}

    def _drop_session(self, node: str, name: str) -> tuple:
        """Drop session `name`'s socket and box: (the session or None, whether a box was)."""
        held = self.sessions.release(node, name)
        try:
            self.table.remove(node, name)
        except KeyError:
            return held, False
        return held, True


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (0 if it cannot say)."""
    try:
        return ioctl_int(sock, SIOCINQ)
    except OSError:
        return 0


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a fifo")):
        if test(mode):
            return name
    return "a special file"


def _check_cb(region: Region, name: str) -> None:
    """A Continuation Box's header and active slot must parse, and it must be named after
    its session."""
    try:
        session = check_cb(region, budget_s=CB_CHECK_BUDGET_S)
    except ContinuationError as e:
        raise RegionRefused(f"region {name!r} is not a valid Continuation Box: {e}") from None
    if name != f"cb-{session}":
        raise RegionRefused(f"a Continuation Box must be named cb-<session>: "
                            f"cb-{session}, not {name!r}")

"""The owners of held sessions: their death is an event, their orphans never hang.

Every process that hands the agent a session socket (`hold_socket`) is watched through a
pidfd (the one SO_PEERPIDFD gave the registration connection, else pidfd_open). When it
dies holding sessions, the agent at once publishes the event "owner_died" {pid,
sessions} for the node (agent.events) and audits it: the monitor recovers the sessions
(op `readopt` to a restarted server of the same node, or fence + evacuate elsewhere).

A session whose owner died and that nobody adopted within `orphan_timeout_s` is closed:
with an RST when its client sent input no server will read (it must not take the
silence for an answer), else with a FIN after what the dead server had written. Counted
(backdoors_agent_orphans_total), audited ("orphans_closed") and published (event
"orphans_closed"). A client of a dead server therefore never hangs silently.

One thread waits on every pidfd (select on a wakeup socket and the pidfds) and on the
next orphan deadline; it never forks or executes anything. Every PRUNE_S it stops
watching the processes that hold no session any more (released, or moved away), so that
a node whose processes each hold a session, release it and live on keeps no pidfd of
the agent's per process.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

import msgspec

from ..common.procs import alive
from ..common.runtime import ADOPT_SOCKET, adoption_path
from ..continuations import cbformat
from ..continuations.adoption import AdoptionClient, Handover, cb_memfd
from ..continuations.errors import NoVerdict
from ..errors import BackdoorsError
from ..tcprepair import repair
from ..tcprepair.kernel import SIOCINQ, ioctl_int
from .events import EventBudget
from .membership import outsider
from .ops import Call, Op, OpError
from .sessions import Session, SessionTable

log = logging.getLogger("backdoors.agent")

VERDICT_WAIT_S = 10.0  # readopt waits this long for a server's verdicts once all are sent
#: owner_died events a node may push at once, then per second: beyond, they are counted
#: and said ("events_suppressed"), and the monitors ask the node's orphans instead
OWNER_EVENTS_BURST = 64
OWNER_EVENTS_PER_S = 16.0
PRUNE_S = 5.0  # how often owners that hold no session any more stop being watched


class ReadoptArgs(msgspec.Struct, forbid_unknown_fields=True):
    node: str
    pid: int = 0  # the dead owner whose sessions go; 0: every dead owner's of the node


class ReadoptReply(msgspec.Struct):
    server: bool  # a recovery server answered on the node's adoption socket
    server_pid: int
    sessions: int  # orphaned sessions of `pid` found
    handed: int
    failed: dict[str, str]
    ms: float
    left: int = 0  # orphaned sessions still held after this call (no server took them)


class Orphan(msgspec.Struct):
    pid: int
    sessions: list[str]
    died: float  # Unix time the agent saw the death
    closes_in_s: float


@dataclass(eq=False)
class _Death:
    node: str
    pid: int
    died: float  # wall
    deadline: float  # monotonic
    sessions: list[Session]


class OwnerWatch:
    """Watches session owners; `start()`, `watch(...)` from the registration thread,
    `stop()`. `publish(kind, node, **data)` pushes an event; `audit` writes records."""

    def __init__(self, sessions: SessionTable, regions, *, publish, audit, timeout_s: float,
                 run_dir: str, registry=None):
        self.sessions, self.regions, self.publish, self.audit = sessions, regions, publish, audit
        self.timeout_s, self.run_dir = timeout_s, run_dir
        self._sel = selectors.DefaultSelector()
        self._watched: dict[tuple[str, int], int] = {}  # (node, pid) -> pidfd
        self._deaths: list[_Death] = []
        self._recent: dict[tuple[str, int], float] = {}  # dead owners -> until (monotonic)
        self._budgets: dict[str, EventBudget] = {}  # per node: its owner_died events
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # (a full pair holds a wake-up already)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.prune_s = PRUNE_S
        self._thread = threading.Thread(target=self._run, name="bd-agent-owners", daemon=True)
        self.closed = None
        if registry is not None:
            from prometheus_client import Counter
            self.closed = Counter("backdoors_agent_orphans", "Held sessions whose server died, "
                                  "by node and outcome: adopted (by a server of the same node), "
                                  "fin or rst (closed at orphan_timeout_s)",
                                  ["node", "outcome"], registry=registry)

    def ops(self) -> tuple[Op, ...]:
        from .ops import NodeArgs
        return (Op("readopt", ReadoptArgs, self.readopt, deadline_s=30.0),
                Op("orphans", NodeArgs, self.orphans, "inline"))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self._lock:
            for fd in self._watched.values():
                os.close(fd)
            self._watched.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- watching ----------------------------------------------------------------------

    def watch(self, node: str, pid: int, pidfd: int | None) -> None:
        """Watch `pid` of `node` (its pidfd is duplicated; without one, opened by pid)."""
        with self._lock:
            if (node, pid) in self._watched or self._stopping:
                return
            try:
                fd = os.dup(pidfd) if pidfd is not None else os.pidfd_open(pid)
            except OSError as e:
                log.warning("node %s: cannot watch session owner %d: %s", node, pid, e)
                return
            self._watched[(node, pid)] = fd
            self._sel.register(fd, selectors.EVENT_READ, (node, pid))
        self._wake()

    def _run(self) -> None:
        next_prune = time.monotonic() + self.prune_s
        while not self._stopping:
            if time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + self.prune_s
            timeout = self._next_deadline()
            until_prune = max(0.0, next_prune - time.monotonic())
            timeout = until_prune if timeout is None else min(timeout, until_prune)
            with self._lock:  # a flood's last suppressed deaths, said within a second
                for budget in self._budgets.values():
                    budget.flush(time.monotonic())
                if any(b.suppressed for b in self._budgets.values()):
                    timeout = min(timeout, 1.0)
            for key, _ in self._sel.select(timeout):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                try:
                    self._died(*key.data)
                except Exception:  # noqa: BLE001 - one owner must not stop the watch
                    log.exception("owner watch: unexpected error")
            try:
                self._close_expired()
            except Exception:  # noqa: BLE001
                log.exception("owner watch: closing orphans failed")

    def _prune(self) -> None:
        """Stop watching the processes that hold no session of their node any more.
        Under the lock: one that holds a session after the table was read here is watched
        again (`watch` comes after the hold)."""
        with self._lock:
            nodes = {node for node, _ in self._watched}
            holders = {(node, s.pid) for node in nodes for s in self.sessions.list(node)}
            for key in [k for k in self._watched if k not in holders]:
                fd = self._watched.pop(key)
                self._sel.unregister(fd)
                os.close(fd)

    def _next_deadline(self) -> float | None:
        with self._lock:
            if not self._deaths:
                return None
            return max(0.0, min(d.deadline for d in self._deaths) - time.monotonic())

    def owned(self, node: str, pid: int) -> bool:
        """Whether `pid` holds sessions of `node`, or held some when it died (within the
        orphan timeout): its death is then the owner_died event's, whoever took them since."""
        now = time.monotonic()
        with self._lock:
            self._recent = {k: t for k, t in self._recent.items() if t > now}
            return (node, pid) in self._watched or (node, pid) in self._recent

    def seen_dead(self, node: str, pid: int) -> bool:
        """`pid` of `node` died, as another watch saw first: its owner_died is pushed now
        (once, whichever thread comes first). Whether it held sessions of the node."""
        self._died(node, pid)
        return self.owned(node, pid)

    def _died(self, node: str, pid: int) -> None:
        with self._lock:
            fd = self._watched.pop((node, pid), None)
            if fd is None:
                return
            self._recent[(node, pid)] = time.monotonic() + self.timeout_s
            self._sel.unregister(fd)
            os.close(fd)
        died = time.time()
        orphans = [s for s in self.sessions.list(node) if s.pid == pid]
        if not orphans:
            return
        names = sorted(s.name for s in orphans)
        with self._lock:
            self._deaths.append(_Death(node, pid, died, time.monotonic() + self.timeout_s,
                                       orphans))
            budget = self._budgets.get(node)
            if budget is None:
                budget = self._budgets[node] = EventBudget(
                    node, self.publish, "owner_died", OWNER_EVENTS_BURST, OWNER_EVENTS_PER_S)
            pushed = budget.take()
        self._wake()  # told by another thread: the loop must take this deadline in
        if pushed:  # (else the monitors ask the node's orphans, told of the suppression)
            self.publish("owner_died", node, pid=pid, sessions=names, died=died,
                         orphan_timeout_s=self.timeout_s)
        self.audit.write(kind="owner_died", node=node, pid=pid, sessions=len(names))
        log.warning("node %s: server %d died holding %d sessions", node, pid, len(names))

    def _close_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [d for d in self._deaths if d.deadline <= now]
            self._deaths = [d for d in self._deaths if d.deadline > now]
        for d in due:
            fin, rst = [], []
            for s in d.sessions:
                if not self.sessions.take_if(s):
                    continue  # adopted, moved or released meanwhile
                (rst if _close(s, self.sessions.closer) else fin).append(s.name)
                try:
                    self.regions.remove(d.node, s.name)
                except KeyError:
                    pass
            if not fin and not rst:
                continue
            if self.closed is not None:
                self.closed.labels(d.node, "fin").inc(len(fin))
                self.closed.labels(d.node, "rst").inc(len(rst))
            self.publish("orphans_closed", d.node, pid=d.pid, fin=fin, rst=rst,
                         after_s=self.timeout_s)
            self.audit.write(kind="orphans_closed", node=d.node, pid=d.pid, fin=len(fin),
                             rst=len(rst), sessions=fin + rst, after_s=self.timeout_s)
            log.warning("node %s: closed %d sessions of dead server %d nobody adopted in "
                        "%g s (%d with RST)", d.node, len(fin) + len(rst), d.pid,
                        self.timeout_s, len(rst))

    # -- ops ---------------------------------------------------------------------------

    def orphans(self, call: Call) -> list[Orphan]:
        """The node's sessions whose server died and that still wait here."""
        now = time.monotonic()
        with self._lock:
            deaths = [d for d in self._deaths if d.node == call.node.name]
        out = []
        for d in deaths:
            held = {s.name for s in self.sessions.list(d.node) if s.pid == d.pid}
            names = sorted(s.name for s in d.sessions if s.name in held)
            if names:
                out.append(Orphan(d.pid, names, d.died, round(max(0.0, d.deadline - now), 3)))
        return out

    def readopt(self, call: Call) -> ReadoptReply:
        """Hand the sessions of dead `pid` to the recovery server now listening on the
        node's adoption socket (a restarted server): the held sockets go over as they are,
        live, with their byte counts from a TCP_REPAIR dump (no restore, no move)."""
        node, pid = call.node.name, call.args.pid
        t0 = time.monotonic()
        if pid and alive(pid):
            raise OpError("failed", f"process {pid} is alive: readopt is for the sessions of "
                                    "a dead server")
        mine = self._orphaned(node, pid)
        failed: dict[str, str] = {}
        by_port: dict[int, list[Session]] = {}
        for s in mine:
            try:
                by_port.setdefault(self._port(s), []).append(s)
            except OSError as e:
                failed[s.name] = f"socket: {e}"
        directory = os.path.join(self.run_dir, node)
        handed, server_pid, answered = 0, 0, False
        for port, sessions in sorted(by_port.items()):
            path = adoption_path(directory, port)
            if not os.path.exists(path):
                path = os.path.join(directory, ADOPT_SOCKET)
            try:
                client = AdoptionClient(path, timeout=2.0)
            except BackdoorsError:
                continue  # no server (yet): the sessions stay held
            answered = True
            with client:
                server_pid = client.server_pid
                if (why := outsider(call.node.node, server_pid)) is not None:
                    for s in sessions:  # still held here: a real server may come
                        failed[s.name] = f"not handed to {path}: {why}"
                    continue
                handed += self._hand(call, client, server_pid, sessions, failed)
        if self.closed is not None and handed:
            self.closed.labels(node, "adopted").inc(handed)
        if handed:
            self.audit.write(kind="readopt", node=node, pid=pid, server_pid=server_pid,
                             handed=handed, failed=len(failed))
        return ReadoptReply(answered, server_pid, len(mine), handed, failed,
                            round((time.monotonic() - t0) * 1000, 3),
                            len(self._orphaned(node, pid)))

    def _port(self, s: Session) -> int:
        """The port of the server `s` goes to: its box's home port (a channel: its
        server's), else its socket's local port."""
        try:
            with self.regions.use(s.node, s.name) as entry:
                header = entry.region.read(0, cbformat.HEADER_SIZE)
        except KeyError:  # no box registered
            header = b""  # (its hand-over fails on the missing box, with the reason)
        return cbformat.server_port(header, s.sock.getsockname()[1])

    def _orphaned(self, node: str, pid: int) -> list[Session]:
        """Sessions of `node` held for dead `pid` (0: any dead owner) not adopted yet."""
        if pid:
            return [s for s in self.sessions.list(node) if s.pid == pid]
        with self._lock:
            dead = {d.pid for d in self._deaths if d.node == node}
        return [s for s in self.sessions.list(node) if s.pid in dead and not alive(s.pid)]

    def _hand(self, call: Call, client: AdoptionClient, server_pid: int,
              sessions: list[Session], failed: dict[str, str]) -> int:
        items = []
        for s in sessions:
            if not self.sessions.take_if(s):
                continue
            try:
                with repair(s.sock) as handle:  # back in service, as found, on exit
                    state = handle.dump(since=s.since)
                with self.regions.use(s.node, s.name) as entry:  # (its holes stay holes)
                    cb_fd = cb_memfd(s.name, entry.region.read(0, entry.size))
            except (BackdoorsError, OSError, KeyError) as e:
                failed[s.name] = f"dump: {e}"
                self.sessions.put_back(s)
                continue
            items.append((s, cb_fd, Handover.from_tcp_state(s.name.removeprefix("cb-"), state)))
        for s, _, _ in items:
            if s.since is not None:  # the socket's counters keep the offset it had
                self.sessions.expect(s.node, s.name, s.since)
        if items:  # what it takes is held as its own: its death orphans them again
            self.watch(call.node.name, server_pid, None)
        try:
            verdicts = client.hand_over_all([(s.sock, fd, h) for s, fd, h in items],
                                            timeout=VERDICT_WAIT_S)
        except BackdoorsError as e:  # sending broke: the server did not get them
            verdicts = [e] * len(items)
        handed = 0
        for (s, fd, _), verdict in zip(items, verdicts):
            os.close(fd)
            # The server's verdict is authoritative. Without one (late, or the connection
            # broke) a living server may still take the session (it reads what was sent):
            # it stays the server's, never an orphan offered again or closed under it.
            unanswered = isinstance(verdict, NoVerdict) and alive(server_pid)
            if verdict is None or unanswered:
                handed += verdict is None
                if unanswered:
                    failed[s.name] = (f"hand-over: {verdict}; held as server {server_pid}'s "
                                      "(orphaned again if it dies)")
                # held as the new server's until it registers the session itself
                self.sessions.hold_handed(s.node, s.name, s.sock, server_pid)
                s.sock.close()
            else:
                failed[s.name] = f"hand-over: {verdict}"
                self.sessions.put_back(s)
        return handed


def _close(session: Session, closer) -> bool:
    """Close an orphaned session's socket: RST if input waits unread, else FIN after the
    output queued. True if it was reset. The close itself is `closer`'s (the agent's
    Closer: with SO_LINGER the node set, the last close waits for the peer to take the
    output, for as long as the node chose -- not on this thread, which registrations
    wake)."""
    sock = session.sock
    try:
        unread = ioctl_int(sock, SIOCINQ)
    except OSError:
        unread = 0
    try:
        if unread:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    closer(session.node, sock)
    return bool(unread)


"""Pre-armed rules: kill on first sight what another cluster already repaired (DINA).

An `Armed` rule names a culprit by the sha256 of its executable *and* its comm (an
interpreter's hash alone would name every Python or shell process of a node; a bomb's
comm alone is anyone's to choose), its kind, and when it expires. Rules come from
verified warnings of other clusters (monitor/warning.py, over NATS: `Warnings`) or from the
config (`[[monitor.warnings.armed]]`, an operator's own). While a rule is armed, the
`Scanner` looks at every node this monitor watches every `scan_ms` for processes of an
armed comm (comm alone: the agent then reads nothing a forking process makes wait, see
agent/mmreads.py); a node with one is read whole with executable hashes, and a process
that matches is killed at once, before the usual detectors could see it: for a fork
bomb the node is frozen first (a lease of `lease_s`; frozen, every hash is read at once),
every matching process is killed frozen (whole trees where the tree is the bomb's), and
the node is thawed; a memory hog is killed by pid and start time. A process of an armed
comm that does not match (another executable, or one whose hash the agent could not read)
is remembered and not looked at again. Each kill is
counted, and the latest KILLS_KEPT are kept in `kills`.

`Warnings` is the monitor's side of the bus: it publishes a signed warning when one of
its incidents of kind fork bomb or memory hog is repaired and its diagnosis names the
culprit's executable hash, and arms a rule for each verified warning of another cluster.
A repair of a culprit it was warned of is not published again (every cluster on the bus
got that warning; an echo would bounce between clusters for as long as the bomb runs).
Refusals (bad signature, unknown signer, replay, outside the window, expired) are counted
in `rejected`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from ..common.ratelimit import LogLimiter
from ..common.text import clip
from ..errors import AgentError
from .warning import DIAGNOSIS_KINDS, KINDS, AttackWarning, Verifier, WarningRejected, issue, seal

log = logging.getLogger("backdoors.monitor")
CLEARED_MAX = 4096  # processes remembered as not matching (then forgotten at once)
KILLS_KEPT = 1024  # the latest pre-armed kills kept for status (a node may start a match
                   # again and again: each scan's kill is one more)
REJECT_LOG_S = 1.0  # rejected warnings are logged at most once this often (all counted)


class Armed(msgspec.Struct, frozen=True):
    """A pre-armed rule: processes running `exe_sha256` with comm `comm` (and, when
    given, command line `cmdline`) are killed on sight until `expires_at` (Unix time; 0:
    never). A process registered with its agent (a node's service) never matches: a
    culprit run by an interpreter has the interpreter's hash and comm (python3), which
    the node's own Python service shares; its command line tells them apart."""

    exe_sha256: str
    comm: str
    kind: str = "fork-bomb"
    expires_at: float = 0.0
    source: str = "config"  # "config", or "<cluster>/<monitor>: warning <id>"
    cmdline: tuple[str, ...] = ()

    @property
    def key(self) -> tuple:
        return self.exe_sha256, self.comm, self.cmdline

    def matches(self, row) -> bool:
        return (row.exe_sha256 == self.exe_sha256 and row.comm == self.comm
                and not row.registered
                and (not self.cmdline or tuple(row.cmdline) == self.cmdline))


class Kill(msgspec.Struct):
    """One pre-armed kill: when (Unix time), where, the kills sent (trees and single
    processes) and the processes the agent saw die, by which rule."""

    at: float
    host: str
    node: str
    killed: int
    kind: str
    source: str
    froze: bool
    error: str | None = None
    sent: int = 0


def matching_roots(rows, match: Callable) -> tuple[list, list]:
    """The matching processes as (roots of trees made only of matches, other matches)."""
    by_parent: dict[int, list] = {}
    for r in rows:
        by_parent.setdefault(r.ppid, []).append(r)
    hit = {r.pid for r in rows if match(r)}

    def whole(pid: int) -> bool:
        todo = [pid]
        while todo:
            cur = todo.pop()
            if cur not in hit:
                return False
            todo.extend(c.pid for c in by_parent.get(cur, ()))
        return True

    roots = [r for r in rows if r.pid in hit and r.ppid not in hit and whole(r.pid)]
    covered: set[int] = set()
    todo = [r.pid for r in roots]
    while todo:
        cur = todo.pop()
        covered.add(cur)
        todo.extend(c.pid for c in by_parent.get(cur, ()))
    return roots, [r for r in rows if r.pid in hit and r.pid not in covered]


class Scanner:
    """Kills what the armed rules name in the nodes `targets()` gives ((host, client,
    [node]) per agent), on a thread of its own, every `scan_s` while a rule is armed."""

    def __init__(self, targets: Callable[[], Iterable[tuple[str, object, list[str]]]], *,
                 scan_s: float = 0.02, lease_s: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.targets, self.scan_s, self.lease_s, self.clock = targets, scan_s, lease_s, clock
        self._rules: dict[tuple[str, str], Armed] = {}
        self._lock = threading.Lock()
        self.kills: deque[Kill] = deque(maxlen=KILLS_KEPT)  # the latest
        self.kill_events = 0  # all of them
        self.killed = 0  # processes
        self._cleared: set[tuple[int, float]] = set()  # (pid, start time): not a match
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bd-mon-prearm", daemon=True)

    def arm(self, rule: Armed) -> None:
        with self._lock:
            self._rules[rule.key] = rule
        log.warning("pre-armed: processes running %s… as %r%s are killed on sight (%s, %s)",
                    rule.exe_sha256[:12], rule.comm,
                    f" with command line {clip(' '.join(rule.cmdline))!r}" if rule.cmdline
                    else "", rule.kind, rule.source)
        self._wake.set()

    def warned_of(self, exe_sha256: str, comm: str, cmdline=()) -> Armed | None:
        """The armed rule for this culprit that came from another cluster's warning."""
        rule = next((r for r in self.rules() if (r.exe_sha256, r.comm) == (exe_sha256, comm)
                     and r.cmdline in ((), tuple(cmdline))), None)
        return rule if rule is not None and rule.source != "config" else None

    def rules(self) -> list[Armed]:
        now = self.clock()
        with self._lock:
            for k, r in list(self._rules.items()):
                if r.expires_at and r.expires_at <= now:
                    del self._rules[k]
            return list(self._rules.values())

    def start(self) -> Scanner:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            rules = self.rules()
            if not rules:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.scan(rules)
            except Exception:  # noqa: BLE001 - the scanner must survive anything
                log.exception("pre-armed scan failed")
            self._stop.wait(self.scan_s)

    def scan(self, rules: list[Armed]) -> int:
        """One pass over every node; the processes killed. A first look names the
        suspects by comm alone (no executable hash: the agent reads nothing that a
        forking process makes wait); a node with one is then read whole, locked for a
        fork bomb's rule, and what matches is killed."""
        killed = 0
        comms = sorted({r.comm for r in rules})
        for host, client, nodes in self.targets():
            for node in nodes:
                try:
                    rows = client.processes(node, comms=comms, hashed=False).rows
                except AgentError as e:
                    log.debug("pre-armed scan of %s/%s: %s", host, node, e)
                    continue
                suspects = [r for r in rows if (r.pid, r.start_time) not in self._cleared]
                if suspects:
                    killed += self._kill(host, client, node, rules, suspects)
        return killed

    def _kill(self, host: str, client, node: str, rules: list[Armed], suspects: list) -> int:
        match = lambda r: any(x.matches(r) for x in rules)  # noqa: E731
        named = [x for x in rules if any(s.comm == x.comm for s in suspects)]
        rule = named[0]
        froze, errors, n, sent, hits = False, [], 0, 0, []
        try:
            if any(x.kind == "fork-bomb" for x in named):  # frozen, nothing forks while
                client.lock(node, self.lease_s)            # the trees are killed
                froze = True
            # frozen, every hash is read at once (and command lines, if a rule names one)
            rows = client.processes(node, cmdline=any(x.cmdline for x in named)).rows
            hits = [r for r in rows if match(r)]
            # what does not match is not looked at again, its hash unreadable too (it
            # can never match; looked at again, its node would be frozen at every scan)
            self._clear(r for r in rows if not match(r) and any(r.comm == x.comm for x in rules))
            if hits:
                rule = next(x for x in rules if x.matches(hits[0]))
            roots, singles = matching_roots(rows, match)
            # every kill is sent while frozen: one that fails (a tree slow to exit under
            # load) must not spare the others; the next scan finds what is left
            for r in roots:
                sent += 1
                try:
                    n += len(client.kill_tree(node, r.pid))
                except AgentError as e:
                    errors.append(f"kill_tree {r.pid}: {e}")
            for r in singles:
                sent += 1
                try:
                    n += bool(client.kill(node, r.pid, r.start_time))
                except AgentError as e:
                    errors.append(f"kill {r.pid}: {e}")
        except AgentError as e:
            errors.append(str(e))
        finally:
            if froze:
                try:
                    client.unlock(node)
                except AgentError as e:
                    errors.append(f"unlock: {e}")
        if not hits and not errors:
            return 0  # the suspects run something else under that name: cleared
        error = "; ".join(errors[:3]) or None
        self.killed += n
        k = Kill(self.clock(), host, node, n, rule.kind, rule.source, froze, error, sent)
        with self._lock:
            self.kills.append(k)
            self.kill_events += 1
        log.warning("pre-armed rule (%s, %s) on %s/%s: %d kill(s) sent, %d process(es) "
                    "gone%s", rule.kind, rule.source, host, node, sent, n,
                    f"; error: {error}" if error else "")
        return n

    def _clear(self, rows) -> None:
        """Processes seen to run another executable under an armed comm: not suspects."""
        if len(self._cleared) > CLEARED_MAX:
            self._cleared.clear()
        self._cleared.update((r.pid, r.start_time) for r in rows)


class Warnings:
    """Publishes this monitor's warnings and arms the verified ones of other clusters.

    `bus_factory(on_message)` makes a started fleet.bus.Bus-like object (publish(data,
    subject)); messages on `subject`.<cluster> are this cluster's own and skipped."""

    def __init__(self, signer, cluster: str, subject: str, verifier: Verifier,
                 scanner: Scanner, *, ttl_s: float = 3600.0, publish: bool = True,
                 arm: bool = True):
        self.signer, self.cluster, self.subject = signer, cluster, subject
        self.verifier, self.scanner, self.ttl_s = verifier, scanner, ttl_s
        self.publishing, self.arming = publish, arm
        self.bus = None
        self.sent = 0
        self.echoes = 0  # repairs of a culprit another cluster warned of: not published
        self.received = 0
        self.rejected: dict[str, int] = {}
        self.accepted: list[AttackWarning] = []
        self._lock = threading.Lock()
        self._log_limit = LogLimiter(rate=1 / REJECT_LOG_S, burst=1)  # rejections' lines
        # publishing waits for the server (a hung one: its timeout): not on the repair
        # worker that reported the incident, which would hold the node meanwhile
        self._outbox = ThreadPoolExecutor(1, thread_name_prefix="bd-warn-out")

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the warnings handed over so far are published (or failed)."""
        self._outbox.submit(lambda: None).result(timeout)

    @property
    def rejected_total(self) -> int:
        with self._lock:
            return sum(self.rejected.values())

    def on_message(self, subject: str, data: bytes) -> None:
        """A message of the bus: verified, then armed (or counted as rejected)."""
        if subject == f"{self.subject}.{self.cluster}":
            return  # this cluster's own
        with self._lock:
            self.received += 1
        try:
            w = self.verifier.check(data)
        except WarningRejected as e:
            with self._lock:
                self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            logged, quiet = self._log_limit.admit("rejected")
            if logged:  # (a flood of forgeries: counted, not logged one by one)
                log.warning("warning on %s rejected (%s): %s%s", subject, e.reason, e,
                            f" ({quiet} more rejected before it, not logged)" if quiet else "")
            return
        with self._lock:
            self.accepted.append(w)
        log.warning("warning %s from %s/%s: %s %s (%s) repaired there", w.id, w.cluster,
                    w.monitor, w.kind, w.comm, w.exe_sha256[:12])
        if self.arming:
            self.scanner.arm(Armed(w.exe_sha256, w.comm, w.kind, w.expires_at,
                                   f"{w.cluster}/{w.monitor}: warning {w.id}",
                                   tuple(w.cmdline)))

    def incident(self, event: str, inc) -> AttackWarning | None:
        """An incident event of this monitor: a repaired fork bomb or memory hog whose
        diagnosis names the culprit's executable hash is published (the warning)."""
        from .diagnosis import culprit_of
        if event != "responded" or inc.state != "repaired" or not self.publishing or \
                self.bus is None or inc.diagnosis is None:
            return None
        kind = DIAGNOSIS_KINDS.get(inc.diagnosis.kind)
        culprit = culprit_of(inc.diagnosis)
        if kind not in KINDS or culprit is None:
            return None
        given = self.scanner.warned_of(culprit["exe_sha256"], culprit["comm"],
                                       culprit.get("cmdline") or ())
        if given is not None:
            with self._lock:
                self.echoes += 1
            log.warning("incident %s repaired %s %s, which %s already told the fleet of: "
                        "no warning sent", inc.id, kind, culprit["comm"], given.source)
            return None
        w = issue(self.signer, self.cluster, kind, culprit["exe_sha256"], culprit["comm"],
                  cmdline=culprit.get("cmdline") or (), exe=culprit.get("exe") or "",
                  node=f"{inc.host}/{inc.node}", incident=inc.id, ttl_s=self.ttl_s)
        try:
            self._outbox.submit(self._publish, w)
        except RuntimeError:  # (shut down: the monitor is stopping)
            log.warning("warning for incident %s not published: the monitor is stopping",
                        inc.id)
            return None
        return w

    def _publish(self, w: AttackWarning) -> None:
        try:
            self.bus.publish(seal(self.signer, w), f"{self.subject}.{self.cluster}")
        except Exception as e:  # noqa: BLE001 - a bus down must not fail the repair
            log.warning("warning for incident %s not published: %s", w.incident, e)
            return
        with self._lock:
            self.sent += 1
        log.warning("warning %s published: %s %s (%s…) repaired on %s", w.id, w.kind,
                    w.comm, w.exe_sha256[:12], w.node)

    def collect(self):
        """Prometheus: warnings sent, received, rejected (by reason), rules armed, kills."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.status()
        sent = CounterMetricFamily("backdoors_monitor_warnings_sent",
                                   "Warnings this monitor published to other clusters")
        sent.add_metric([], s["sent"])
        rejected = CounterMetricFamily("backdoors_monitor_warnings_rejected",
                                       "Warnings refused: bad signature, unknown signer, "
                                       "replay, outside the window, expired",
                                       labels=["reason"])
        for reason, n in sorted(s["rejected"].items()):
            rejected.add_metric([reason], n)
        accepted = CounterMetricFamily("backdoors_monitor_warnings_accepted",
                                       "Warnings of other clusters verified and armed")
        accepted.add_metric([], s["accepted"])
        armed = GaugeMetricFamily("backdoors_monitor_prearmed_rules",
                                  "Rules armed now (processes killed on sight)")
        armed.add_metric([], s["armed"])
        killed = CounterMetricFamily("backdoors_monitor_prearmed_killed",
                                     "Processes killed on sight by an armed rule")
        killed.add_metric([], s["prearmed_killed"])
        yield from (sent, rejected, accepted, armed, killed)

    def status(self) -> dict:
        with self._lock:
            return {"cluster": self.cluster, "sent": self.sent, "echoes": self.echoes,
                    "received": self.received,
                    "rejected": dict(self.rejected), "accepted": len(self.accepted),
                    "armed": len(self.scanner.rules()), "prearmed_kills": self.scanner.kill_events,
                    "prearmed_killed": self.scanner.killed}


def attach(monitor) -> Warnings:
    """The warnings of `monitor` (config.warnings set): its scanner over the nodes it
    watches (clients of its own), its verifier, its config's armed rules; `start` and
    `stop` with the monitor."""
    from ..agent.keys import decode_publics
    cfg = monitor.config.warnings
    clients: dict[str, object] = {}

    def targets():
        for p in monitor.pollers:
            if p.error is not None:
                continue
            host = p.entry.host
            if host not in clients:
                clients[host] = monitor.client_factory(
                    p.entry, monitor.config.action_timeout_ms / 1000)
            yield host, clients[host], [n for n in list(p.nodes) if monitor.watches(host, n)]

    scanner = Scanner(targets, scan_s=cfg.scan_ms / 1000, lease_s=cfg.lease_s)
    scanner.clients = clients
    for a in cfg.armed:
        scanner.arm(Armed(a.exe_sha256, a.comm, a.kind, 0.0, "config", tuple(a.cmdline)))
    verifier = Verifier(decode_publics(cfg.trusted_keys, "[monitor.warnings] trusted_keys"),
                        window_s=cfg.window_s)
    return Warnings(getattr(monitor, "key", None), cfg.cluster, cfg.subject, verifier,
                    scanner, ttl_s=cfg.ttl_s, publish=cfg.publish, arm=cfg.arm)


def start(w: Warnings, cfg) -> None:
    """Connect `w` to NATS (subscribed to every cluster's warnings) and start its scanner."""
    from ..fleet.bus import Bus
    within = None
    if cfg.netns is not None:
        from ..net.netns import enter
        within = lambda: enter(cfg.netns)  # noqa: E731
    w.bus = Bus(cfg.nats, f"{cfg.subject}.*", w.on_message, name=f"backdoors-{cfg.cluster}",
                within=within).start(wait=False)  # a bus away must not stop the monitor
    w.scanner.start()


def stop(w: Warnings) -> None:
    w.scanner.stop()
    w._outbox.shutdown(wait=True, cancel_futures=True)  # (the one being sent ends first)
    if w.bus is not None:
        w.bus.stop()
        w.bus = None
    for c in getattr(w.scanner, "clients", {}).values():
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass

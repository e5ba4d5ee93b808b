"""The monitor: polls every node of every agent, applies the rules, responds, logs.

    with Monitor(config, key=key) as mon:     # or run_monitor(config, stop_event)
        mon.wait_ready()
        ...
        mon.incidents()

One poller thread per agent, each with its own connection: an agent that is down or slow
costs only its own thread (its calls time out after `timeout_ms`), and shows up as the
`agent_unreachable` condition of its nodes. Each poll makes one `sensors_many()` call for
the agent's nodes (a request per 1024 of them; plus one `nodes()` when a rule watches for
frozen nodes or nodes are discovered). Responses (diagnosis and actions) run on a bounded
pool of repair workers, each with its own connections, so polling goes on during a repair.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

from ..common.text import clip
from ..agent.errors import remote_error
from ..errors import AgentError, ConfigError, SensorBoxError
from ..sensors import SensorTracker, SensorType, parse_box, stalled
from .rules import Rule, load_rulesets
from .config import (
    AgentEntry, MonitorConfig, agent_keys, etcd_client, load_config, load_monitor_key,
    reach_ms, validate,
)
from .detectors import NodeView
from .engine import Detection, Engine
from .incidents import Incident, IncidentLog
from .metrics import MonitorMetrics
from .repair import context, respond

log = logging.getLogger("backdoors.monitor")

ClientFactory = Callable[[AgentEntry, float], Any]
#: Event kinds whose condition a poll judges too: not judged again after a busy node's
#: response (the next poll does), unlike a server's death
POLLED_TOO = ("violation", "cleared")
#: a new owner does not respond on a node for this long after its former owner's last
#: destructive op there (the settle a monitor keeps after its own response, kept across a
#: hand-over: what the former owner did needs time to show)
HANDOVER_QUIET_S = 2.0
#: Where `run_monitor` (the `backdoors monitor` command) writes incidents by default.
DEFAULT_INCIDENTS_DIR = "/var/lib/backdoors/incidents"


class AgentPoller:
    """Polls one agent's nodes every period on a thread of its own."""

    def __init__(self, monitor: Monitor, entry: AgentEntry):
        self.monitor, self.entry = monitor, entry
        self.nodes: list[str] = list(entry.nodes or [])
        self.fenced: set[str] = set()  # from the last nodes() answer
        self.discover = entry.nodes is None
        self.polls = 0  # successful polls
        self.failures = 0
        self.error: str | None = None
        self.last_ok: float | None = None
        self.answered = -math.inf  # when the agent last answered a request (the fleet's reach)
        self.started = monitor.clock()
        self._next_discover = 0.0
        self.peers_supported = True  # False once the agent says it has no op peers
        self.many_supported = True  # False once the agent says it has no op sensors_many
        self._trackers: dict[tuple[str, str], SensorTracker] = {}
        self._unread: set[tuple[str, str]] = set()  # (node, box) last seen unreadable
        self._thread = threading.Thread(target=self._run, name=f"bd-mon-poll-{entry.host}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def _run(self) -> None:
        m = self.monitor
        client = m.client_factory(self.entry, m.config.timeout_ms / 1000)
        period = m.config.period_ms / 1000
        next_at = m.clock()
        try:
            while not m.stopping.is_set():
                try:
                    self.poll_once(client)
                except Exception:  # noqa: BLE001 - a poller must survive anything
                    log.exception("agent %s: poll failed", self.entry.host)
                next_at += period
                delay = next_at - m.clock()
                if delay < 0:  # overran: skip the missed periods rather than catch up
                    next_at, delay = m.clock(), 0.0
                m.stopping.wait(delay)
        finally:
            client.close()

    def poll_once(self, client) -> list[NodeView]:
        """Poll this agent once and hand every node's view to the monitor's engine.

        Asks `nodes()` when nodes are discovered (every `discover_s`) or a rule needs the
        nodes' state (frozen, locked, fenced), then the sensors of every node it watches
        (`_read`), tracking each box for stalls and rates. An agent that does not answer
        gives views with `agent_ok=False` for each of its nodes (or one pseudo-node "@HOST"
        before any node was known); an error about one node only skips that node.
        Returns the views.
        """
        m = self.monitor
        now = m.clock()
        started = time.perf_counter()
        views: list[NodeView] = []
        try:
            infos = {}
            discover = self.discover and now >= self._next_discover
            if discover or m.needs_node_state:
                infos = {i.name: i for i in client.nodes()}
                self.fenced = {n for n, i in infos.items() if i.fenced}
                if discover:
                    for gone in set(self.nodes) - set(infos):
                        self._drop(gone)
                    self.nodes = m.names.take(self.entry.host, sorted(infos))
                    self._next_discover = now + m.config.discover_s
            watched = []
            for node in self.nodes:
                if not m.owns(self.entry.host, node):
                    continue  # another monitor's in the fleet
                try:
                    m.claim(client, self.entry.host, node)
                except AgentError as e:
                    _raise_if_agent_wide(e)
                    self._node_error(node, e)
                    continue
                if m.watches(self.entry.host, node):  # else the agent knows a newer owner
                    watched.append(node)
            for node, reply in self._read(client, watched):
                views.append(self._view(node, reply, m.clock(), infos.get(node)))
            asked = discover or m.needs_node_state or bool(watched)
            if m.needs_peers and self.peers_supported:
                self._poll_peers(client)
                asked = True
            elif not asked and m.share is not None and (
                    now - self.answered >= reach_ms(m.config) / 4000):
                client.ping()  # nothing was asked of it: whether it answers (the fleet's reach)
                asked = True
        except AgentError as e:
            self.failures += 1
            if self.error is None:
                log.warning("agent %s unreachable: %s", self.entry.host, e)
            self.error = str(e)
            now = m.clock()
            silent = now - (self.last_ok if self.last_ok is not None else self.started)
            down = m.down_reports(self.entry.host) if m.needs_peers else []
            views = [NodeView(n, self.entry.host, now, agent_ok=False, agent_silent_s=silent,
                              agent_error=self.error, down_reports=down)
                     for n in (self.nodes or [self._pseudo]) if m.owns(self.entry.host, n)]
        else:
            if self.error is not None:
                log.info("agent %s reachable again", self.entry.host)
            self.error, self.last_ok = None, m.clock()
            if asked:
                self.answered = self.last_ok
            self.polls += 1
            if self._pseudo in m.engine.nodes:  # it was silent before any node was known
                m.engine.forget(self._pseudo, "agent reachable again")
        m.metrics.poll_seconds.labels(self.entry.host).observe(time.perf_counter() - started)
        for view in views:
            m.observe(view)
        m.polled()
        return views

    def _read(self, client, nodes: list[str]) -> list[tuple[str, Any]]:
        """The sensors replies of `nodes`: one `sensors_many` call for them all, and a
        `sensors` call for each node it left out as too large (or for every node, with
        an agent that has no sensors_many or when it failed). A node's own error skips
        that node."""
        many = {}
        if self.many_supported and nodes:
            try:
                got = client.sensors_many(nodes)
            except AgentError as e:
                _raise_if_agent_wide(e)
                if getattr(e, "code", "") == "unknown_op":  # older agent: node by node now on
                    self.many_supported = False
                    log.info("agent %s has no op sensors_many: its nodes are read one by "
                             "one", self.entry.host)
                else:  # this poll node by node
                    log.warning("agent %s: sensors_many failed (%s)", self.entry.host, e)
            else:
                many = got.replies
                for node, error in got.errors.items():
                    if error.code != "too_large":
                        self._node_error(node, remote_error(error.code, error.message))
                nodes = [n for n in nodes if n not in many and (
                    n not in got.errors or got.errors[n].code == "too_large")]
        out = [(n, many[n]) for n in many]
        for node in nodes:
            try:
                out.append((node, client.sensors(node)))
            except AgentError as e:
                _raise_if_agent_wide(e)
                self._node_error(node, e)
        return out

    def _poll_peers(self, client) -> None:
        """This agent's view of its peer agents (op peers), for the agent_down detector."""
        try:
            view = client.call("peers")
        except AttributeError:  # a client without call(): no peer views
            self.peers_supported = False
            return
        except AgentError as e:
            if getattr(e, "code", "") in ("connect", "timeout", "protocol", "auth"):
                raise
            self.peers_supported = False  # an older agent: say it once, then stop asking
            log.warning("agent %s does not report its peers (%s): agent_down cannot use it",
                        self.entry.host, e)
            return
        with self.monitor.peer_lock:
            self.monitor.peer_views[self.entry.host] = (self.monitor.clock(), view)

    @property
    def _pseudo(self) -> str:
        """The node name of an agent silent before any of its nodes was known."""
        return f"@{self.entry.host}"

    def _drop(self, node: str) -> None:
        self.nodes = [n for n in self.nodes if n != node]
        self._unread = {(n, b) for n, b in self._unread if n != node}
        self.monitor.names.release(self.entry.host, node)
        for key in [k for k in self._trackers if k[0] == node]:
            del self._trackers[key]
        self.monitor.engine.forget(node)
        self.monitor.metrics.forget(self.entry.host, node)

    def _node_error(self, node: str, e: AgentError) -> None:
        if getattr(e, "code", "") == "no_such_node" and self.discover:
            self._drop(node)
        log.debug("agent %s node %s: %s", self.entry.host, node, e)

    def _view(self, node: str, reply, at: float, info) -> NodeView:
        snapshots = {}
        agent_unchanged = getattr(reply, "progress_unchanged_s", None) or {}
        agent_starved = getattr(reply, "progress_starved_s", None) or {}
        unread = dict(getattr(reply, "errors", None) or {})  # box -> why
        for box, data in reply.boxes.items():
            tracker = self._trackers.get((node, box))
            if tracker is None:
                tracker = self._trackers[(node, box)] = SensorTracker(self.monitor.clock)
            try:
                snapshots[box] = snap = tracker.update(parse_box(data), at)
            except SensorBoxError as e:
                unread[box] = str(e)
                continue
            _agent_stalls(snap, agent_unchanged.get(box, {}), agent_starved.get(box, {}))
        for key in [k for k in self._trackers
                    if k[0] == node and k[1] not in reply.boxes and k[1] not in unread]:
            del self._trackers[key]
        self._say_unread(node, unread)
        return NodeView(node, self.entry.host, at, snapshots,
                        frozen=info.frozen if info else None,
                        locked_by=list(info.locked_by) if info else [],
                        fenced=bool(info.fenced) if info else False,
                        unread=tuple(sorted(unread)))

    def _say_unread(self, node: str, unread: dict[str, str]) -> None:
        """Log a box of `node` once when it becomes unreadable (and once readable again)."""
        was = {b for n, b in self._unread if n == node}
        for box in sorted(set(unread) - was):
            log.warning("agent %s node %s: box %s unreadable (%s): no rule of the node is "
                        "judged clear until it reads again", self.entry.host, node, box,
                        clip(str(unread[box])))
        for box in sorted(was - set(unread)):
            log.info("agent %s node %s: box %s reads again", self.entry.host, node, box)
        self._unread = {(n, b) for n, b in self._unread if n != node} | {(node, b) for b in unread}


def _raise_if_agent_wide(e: AgentError) -> None:
    """Re-raise an error of the agent as a whole (not of one node): it is unreachable."""
    if getattr(e, "code", "") in ("connect", "timeout", "protocol", "auth"):
        raise e


def _agent_stalls(snap, unchanged: dict[str, float], starved: dict[str, float]) -> None:
    """Judge each progress counter's stall with what the agent saw. The agent reads the
    counters far more often (its watcher): where it saw one unchanged for longer than
    this monitor's polls could, the stall counts from its sighting (a poll then judges
    a stall as early as an event). And the time the agent found the node starved of CPU
    in its stretch (`starved`) does not count against the deadline here either: the
    agent's stretch lies within this monitor's, so that much of this one is excused."""
    for s in snap.sensors:
        if s.type is not SensorType.PROGRESS or s.stalled_for is None:
            continue
        u, excused = unchanged.get(s.name), starved.get(s.name, 0.0)
        own = s.stalled_for - (excused if isinstance(excused, (int, float)) else 0.0)
        best = max(own, float(u)) if isinstance(u, (int, float)) else own
        if best != s.stalled_for:
            s.stalled_for = max(best, 0.0)
            s.violated = stalled(s.stalled_for, s.deadline)


class NodeNames:
    """Which agent serves each node name: the monitor knows a node by its name, so a name
    is one agent's (the first to list it; the config's lists first). Another agent's node
    of a taken name is not watched, and said so once."""

    def __init__(self, listed: dict[str, str]):
        self._host = dict(listed)
        self._said: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def take(self, host: str, names: list[str]) -> list[str]:
        """The names of `names` that are `host`'s (taken for it if free)."""
        out = []
        with self._lock:
            for n in names:
                owner = self._host.setdefault(n, host)
                if owner == host:
                    out.append(n)
                elif (host, n) not in self._said:
                    self._said.add((host, n))
                    log.error("agent %s serves a node %r, and so does agent %s: only %s's is "
                              "watched (node names must be unique across a monitor's agents)",
                              host, n, owner, owner)
        return out

    def release(self, host: str, name: str) -> None:
        with self._lock:
            if self._host.get(name) == host:
                del self._host[name]


def check_hooks(rules: list[Rule], hooks: dict[str, Callable[[dict], Any]]) -> None:
    """Every in-process hook the rules name is among `hooks` (ConfigError otherwise)."""
    for rule in rules:
        for a in rule.actions:
            if (missing := a.missing_hook(hooks)) is not None:
                raise ConfigError(f"rule {rule.name}: {a.kind_name()} hook {missing!r} is "
                                  f"not registered (hooks: {', '.join(hooks) or 'none'})")


def check_agent_keys(config: MonitorConfig) -> None:
    """Every agent entry has a good public key: fail at start, not at each poll."""
    for entry in config.agents:
        agent_keys(entry)


class Monitor:
    """Watches the nodes of `config.agents` with `rules` (default: config.rulesets).

    `key` is this monitor's signer, an agent.keys.Identity (default: read from
    config.key_file); each agent entry carries the agent's public key. `hooks` are
    the in-process callables refresh actions may name. `client_factory(entry, timeout)`
    makes agent clients (default: AgentClient over the network).
    """

    def __init__(self, config: MonitorConfig, *, key=None,
                 rules: list[Rule] | None = None,
                 hooks: dict[str, Callable[[dict], Any]] | None = None,
                 client_factory: ClientFactory | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = validate(config)
        self.rules = list(rules) if rules is not None else load_rulesets(config.rulesets)
        self.hooks = dict(hooks or {})
        check_hooks(self.rules, self.hooks)
        self.clock = clock
        if client_factory is None:
            self.key = key if key is not None else load_monitor_key(config)
            check_agent_keys(config)
            client_factory = self._default_client
        self.client_factory = client_factory
        # a unit that watches frozen or fenced nodes makes every poll ask nodes()
        self.needs_node_state = any(u.needs_node_state for r in self.rules
                                    for u in (*r.detectors, *r.actions))
        # a unit that asks the agents about each other (agent_down) makes polls ask peers()
        self.needs_peers = any(getattr(d, "needs_peers", False) for r in self.rules
                               for d in r.detectors)
        self.peer_views: dict[str, tuple[float, dict]] = {}  # reporter host -> (at, view)
        self.peer_lock = threading.Lock()
        self.stopping = threading.Event()
        self.log = IncidentLog(config.incidents_dir)
        self.engine = Engine(self.rules, config.monitor_id, history_s=config.history_s,
                             settle_s=config.settle_ms / 1000, clock=clock,
                             on_close=self._closed,
                             on_unresolved=lambda inc: self._emit("unresolved", inc, record=inc))
        self.names = NodeNames({n: e.host for e in config.agents for n in e.nodes or ()})
        self.pollers = [AgentPoller(self, e) for e in config.agents]
        self.share = None  # this monitor's share of a fleet (monitor/share.py), with etcd
        if config.etcd:
            from .share import FleetShare
            self.share = FleetShare(config.monitor_id, etcd_client(config), self._fleet_nodes,
                                    prefix=config.fleet_prefix, ttl_s=config.lease_ttl_s,
                                    poll_s=config.fleet_poll_ms / 1000,
                                    on_change=self._share_changed, netns=config.etcd_netns,
                                    hold=self._responding, on_take=self._take,
                                    listed=self._listed_hosts, reach=self._reached_hosts,
                                    # (the others lose a dead host within a ping of it,
                                    # and say so at their next fleet step)
                                    reach_grace_s=max(1.0, reach_ms(config) / 2000)
                                    + 2 * config.fleet_poll_ms / 1000)
            self._shared: set[str] = set()
        self.followers: list = []  # monitor.events.EventFollower per agent, while running
        self._deferred: list[NodeView] = []  # events that came while their node was busy
        self._in_response: set[str] = set()  # nodes whose response has not yet been told
        self._pool = ThreadPoolExecutor(config.max_parallel_repairs,
                                        thread_name_prefix="bd-mon-repair")
        self._queued: dict[Future, Detection] = {}  # responses submitted, not yet ended
        self._queued_lock = threading.Lock()
        self._local = threading.local()
        self._worker_clients: list[Any] = []
        self._cond = threading.Condition()
        self._listeners: list[Callable[[str, Incident], None]] = []
        self._incidents: deque[Incident] = deque(maxlen=1000)
        self._started = False
        self.metrics = MonitorMetrics()  # served at config.metrics_listen while running
        self.metrics.watch(self)
        if self.share is not None:
            self.metrics.registry.register(self.share)
        self.metrics_server = None
        self.warnings = None  # warnings between clusters (monitor/prearm.py), if configured
        if config.warnings is not None:
            from . import prearm
            self.warnings = prearm.attach(self)
            self.subscribe(self.warnings.incident)
            self.metrics.registry.register(self.warnings)
        if self.share is not None:
            self.subscribe(self.share.incident)

    def _default_client(self, entry: AgentEntry, timeout: float):
        from ..agent.client import AgentClient
        return AgentClient(entry.address, self.key, entry.host, agent_keys(entry),
                           netns=entry.netns, timeout=timeout,
                           vote_window=self.config.vote_window_s,
                           tokens=self.share.tokens_for(entry.host) if self.share else None)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> Monitor:
        if not self._started:
            if self.config.metrics_listen:
                from ..agent.metrics import MetricsServer
                self.metrics_server = MetricsServer(
                    self.metrics.registry, self.config.metrics_listen,
                    interface=self.config.listen_interface,
                    what=f"monitor {self.config.monitor_id} metrics").start()
            self._started = True
            log.info("monitor %s starting: %s", self.config.monitor_id, self.summary())
            if self.share is not None:
                self.share.start()
            for p in self.pollers:
                p.start()
            self._follow_events()
            if self.warnings is not None:
                from . import prearm
                prearm.start(self.warnings, self.config.warnings)
        return self

    def summary(self) -> str:
        """One line saying what this monitor watches: agents, nodes, rules, where it logs."""
        agents = ", ".join(
            f"{e.host} at {e.address} ({', '.join(e.nodes) if e.nodes is not None else 'nodes discovered'})"
            for e in self.config.agents)
        rules = ", ".join(r.name for r in self.rules if r.enabled) or "none"
        where = self.log.path or "not written (no incidents_dir)"
        return (f"{len(self.config.agents)} agent(s): {agents}; rules: {rules} "
                f"(rulesets {', '.join(self.config.rulesets)}); polling every "
                f"{self.config.period_ms:g} ms; incidents: {where}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling, let running repairs finish (start no queued one), close open
        incidents, close the log."""
        self.stopping.set()
        for p in self.pollers:
            p.join(timeout)
        for f in self.followers:
            f.stop(timeout)
        if self.warnings is not None and self._started:
            from . import prearm
            prearm.stop(self.warnings)
        # running responses end under this monitor's tokens; those not started never do
        # (a stopping monitor starts no kill, fence or move: its pollers have stopped)
        with self._queued_lock:
            queued = dict(self._queued)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fut, det in queued.items():
            if fut.cancelled():
                self._in_response.discard(det.view.node)
                self.engine.responded(det, "not handled: monitor stopping")
        if self.share is not None and self._started:
            self.share.stop()  # its lease revoked: the others take its nodes at once
        still_open = len(self.engine.open_incidents())
        self.engine.close_all("monitor stopped")
        for c in self._worker_clients:
            c.close()
        self.log.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._started:
            log.info("monitor %s stopped: %d incident(s) opened, %d still open closed as "
                     "'monitor stopped'", self.config.monitor_id, len(self._incidents), still_open)

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- observing -----------------------------------------------------------------------

    def observe(self, view: NodeView) -> None:
        if view.event is None:
            self.metrics.saw(view)
        opened = self.engine.observe(view)
        if view.event is not None and not opened and view.event["kind"] not in POLLED_TOO:
            st = self.engine.nodes.get(view.node)
            if st is not None and (st.busy is not None or self.clock() < st.quiet_until):
                # judged again when the node is free (its response ended, its hand-over
                # quiet over: Engine.hand_over)
                with self._cond:
                    self._deferred.append(view)
                if st.busy is None and self.clock() >= st.quiet_until:  # free meanwhile
                    self._judge_deferred(view.node)
        for det in opened:
            inc = det.incident
            if det.attempt == 1:
                with self._cond:
                    self._incidents.append(inc)
                log.warning("incident %s opened: rule %s on node %s (host %s): %s", inc.id,
                            det.rule.name, view.node, view.host,
                            "; ".join(h.summary for h in det.hits))
                self._emit("opened", inc, record=inc)
            else:
                log.warning("incident %s: rule %s still fires on node %s after its response "
                            "(%s): attempt %d of %d", inc.id, det.rule.name, view.node,
                            inc.state, det.attempt, det.rule.max_attempts)
                self._emit("retry", inc, record=inc)
            self._in_response.add(view.node)
            try:
                fut = self._pool.submit(self._respond, det)
            except RuntimeError:  # shutting down
                self._in_response.discard(view.node)
                self.engine.responded(det, "not handled: monitor stopping")
            else:
                with self._queued_lock:
                    self._queued[fut] = det
                fut.add_done_callback(self._ended)

    def _ended(self, fut: Future) -> None:
        with self._queued_lock:
            self._queued.pop(fut, None)

    def _follow_events(self) -> None:
        """Subscribe to every agent's events (with the monitor's own key: agents of a
        custom client_factory are polled only)."""
        key = getattr(self, "key", None)
        if key is None or not self.config.events:
            return
        from .events import EventFollower
        self.followers = [EventFollower(self, e, agent_keys(e)) for e in self.config.agents]
        for f in self.followers:
            f.start()

    def on_event(self, host: str, ev, *, received: float, via: str = "event") -> None:
        """An agent's pushed event (agent.events.EventFrame): judged at once by the rules
        whose detectors take events (see Detector.takes)."""
        if not ev.node or not self.watches(host, ev.node):
            return
        event = {"kind": ev.kind, "seq": ev.seq, "at": ev.at, **ev.data}
        self.observe(NodeView(ev.node, host, received, event=event, via=via))

    # -- the fleet (monitor/share.py) ----------------------------------------------------

    def owns(self, host: str, node: str) -> bool:
        """Whether `node` of `host` is this monitor's: every node without a fleet, its
        share with one."""
        return self.share is None or self.share.owns(host, node)

    def watches(self, host: str, node: str) -> bool:
        """Whether this monitor judges `node` of `host`: every node without a fleet, with
        one those of its share that its agent acknowledged (`claim`)."""
        return self.share is None or self.share.watches(host, node)

    def claim(self, client, host: str, node: str) -> None:
        """Claim a newly owned node at its agent with its token (once per token): the
        agent refuses the previous owner's requests from then on."""
        token = self.share.unclaimed(host, node) if self.share is not None else None
        if token is None:
            return
        from ..agent.errors import StaleTokenError
        try:
            reply = client.claim(node, token)
        except StaleTokenError as e:
            log.warning("fleet: node %s of %s: claim refused: %s", node, host, e)
            # the fleet checks whether that token can be of its etcd (fleet/member.py); if
            # the agent cannot say now, the claim is tried again at the next poll
            info = next((i for i in client.nodes() if i.name == node), None)
            if info is not None and info.token is not None:
                self.share.outranked(host, node, info.token, info.owner or "")
            self.share.claimed(host, node, token, refused=True)
            return
        if reply.last_act_by not in (None, reply.owner) and reply.last_act_s < HANDOVER_QUIET_S:
            self.hold_off(node, host, HANDOVER_QUIET_S - reply.last_act_s,
                          f"{reply.last_act_by} acted on it {reply.last_act_s * 1000:.0f} ms ago")
        self.share.claimed(host, node, token)
        log.info("fleet: claimed node %s of %s with token %d", node, host, token)

    def hold_off(self, node: str, host: str, quiet_s: float, why: str) -> None:
        """No response on `node` for `quiet_s` (Engine.hand_over); the events that come
        meanwhile are judged once it ends."""
        log.info("node %s of %s: no response on it for %.0f ms (%s)", node, host,
                 quiet_s * 1000, why)
        self.engine.hand_over(node, host, quiet_s)
        later = threading.Timer(quiet_s, self._judge_deferred, [node])
        later.daemon = True
        later.start()

    def _listed_hosts(self) -> set[str]:
        """The agents polled since this monitor started: their nodes are known."""
        return {p.entry.host for p in self.pollers if p.last_ok is not None}

    def _reached_hosts(self) -> set[str]:
        """The agents that answered this monitor within fleet_reach_ms: the fleet gives
        each node to a monitor that reaches its agent."""
        since = self.clock() - reach_ms(self.config) / 1000
        return {p.entry.host for p in self.pollers if p.answered >= since}

    def _fleet_nodes(self) -> set[str]:
        from .share import node_key
        return {node_key(p.entry.host, n) for p in self.pollers for n in list(p.nodes)}

    def _share_changed(self, share) -> None:
        """Forget the nodes that left this monitor's share (their incidents closed here,
        carried on by their next owner)."""
        now = set(share.tokens)
        for key in self._shared - now:
            self.engine.forget(key.split("/", 1)[1], "owned by another monitor of the fleet")
        self._shared = now

    def _take(self, key: str, record: dict | None) -> None:
        """Fleet node `key` was just taken (called before the share shows its token:
        nothing judges it here meanwhile). What this monitor held of it from an earlier
        ownership is dropped (its incidents closed: another monitor may have acted on the
        node since); the open incident recorded in etcd, if any, is adopted and becomes
        this monitor's. A record no rule here can carry on is deleted."""
        host, node = key.split("/", 1)
        self.engine.forget(node, "the node changed hands: taken anew")
        if record is None:
            return
        try:
            inc = self.engine.adopt(node, host, record)
        except ValueError as e:
            log.warning("fleet: node %s of %s: a bad incident record, deleted: %s", node, host, e)
            self.share.member.publish(key, None)
            return
        if inc is None:  # no rule here for it: nobody carries it on
            self.share.member.publish(key, None)
            log.info("fleet: node %s of %s: incident %s of %s not adopted (rule %s not here "
                     "for the node)", node, host, record.get("incident"),
                     record.get("monitor"), record.get("rule"))
            return
        self.share.member.publish(key, self.share.record(inc))
        with self._cond:
            self._incidents.append(inc)
        log.warning("incident %s adopted from monitor %s: rule %s on node %s (host %s), %s, "
                    "%d response(s) so far", inc.id, inc.adopted_from, inc.rule, node, host,
                    inc.state, inc.attempts)
        self._emit("adopted", inc, record=inc)

    def responding(self, node: str) -> bool:
        """Whether a response (a repair, a retry of one, a recovery) runs on `node`, or
        has not yet been told (its `responded` event, which records the incident)."""
        return node in self._in_response

    def _responding(self, key: str) -> bool:
        """`responding` for fleet node `key` (host/node)."""
        return self.responding(key.split("/", 1)[1])

    def fleet_status(self) -> dict | None:
        """This monitor's share of the fleet (None without etcd)."""
        return self.share.status() if self.share is not None else None

    def polled(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _client_for(self, host: str):
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if host not in clients:
            entry = next(e for e in self.config.agents if e.host == host)
            clients[host] = self.client_factory(entry, self.config.action_timeout_ms / 1000)
            self._worker_clients.append(clients[host])
        return clients[host]

    def _respond(self, det: Detection) -> None:
        state, client = "failed", None
        try:
            client = self._client_for(det.view.host)
            client.incident = det.incident.id  # in the agent's audit of each request
            ctx = context(det, client, self.clock, self.hooks, self.placement(), self.fleet())

            def step(kind: str, payload) -> None:
                if kind == "diagnosis":
                    self._emit("diagnosis", det.incident, diagnosis=payload)
                else:
                    self._emit("action", det.incident, action=payload)

            with (self.share.pinned(det.view.host, det.view.node) if self.share is not None
                  else nullcontext()):
                state = respond(det, ctx, step)
        except Exception as e:  # noqa: BLE001 - recorded; the worker must survive
            log.exception("incident %s: response failed", det.incident.id)
            det.incident.actions.append(_failure(str(e)))
        finally:
            if client is not None:
                client.incident = None
            self.engine.responded(det, state)
            log.warning("incident %s: %s %.0f ms after detection%s", det.incident.id, state,
                        det.incident.repaired_ms or 0,
                        f" ({det.incident.diagnosis.summary})" if det.incident.diagnosis else "")
            self._emit("responded", det.incident, record=det.incident)
            self._in_response.discard(det.view.node)
            self._judge_deferred(det.view.node)

    def _judge_deferred(self, node: str) -> None:
        """Judge again the events of `node` that came while it was busy."""
        with self._cond:
            again = [v for v in self._deferred if v.node == node]
            self._deferred = [v for v in self._deferred if v.node != node]
        for view in again:
            self.observe(view)

    def _closed(self, inc: Incident) -> None:
        log.info("incident %s closed: %s, rule %s on node %s, open %.1f s (%d detections, "
                 "%d response(s), state %s)", inc.id, inc.outcome, inc.rule, inc.node,
                 (inc.open_ms or 0) / 1000, inc.detections, inc.attempts, inc.state)
        self._emit("closed", inc, record=inc)

    def _emit(self, event: str, incident: Incident, **payload) -> None:
        try:
            self.log.write(event, incident, **payload)
        except Exception:  # noqa: BLE001 - a full disk must not stop repairs
            log.exception("cannot write incident event")
        for fn in list(self._listeners):
            try:
                fn(event, incident)
            except Exception:  # noqa: BLE001
                log.exception("incident listener failed")
        with self._cond:
            self._cond.notify_all()

    # -- for callers ---------------------------------------------------------------------

    def down_reports(self, host: str, fresh_s: float = 1.0) -> list[str]:
        """The peer agents whose view, polled within `fresh_s`, says `host`'s agent does
        not answer them."""
        now = self.clock()
        with self.peer_lock:
            views = list(self.peer_views.items())
        return sorted(reporter for reporter, (at, view) in views
                      if reporter != host and now - at <= fresh_s and isinstance(view, dict)
                      and isinstance(view.get(host), dict) and not view[host].get("answering", True))

    def subscribe(self, fn: Callable[[str, Incident], None]) -> None:
        """Call `fn(event, incident)` on every incident event (from monitor threads)."""
        self._listeners.append(fn)

    def incidents(self) -> list[Incident]:
        """Every incident this monitor opened (the latest 1000), oldest first."""
        with self._cond:
            return list(self._incidents)

    def wait_for(self, predicate: Callable[[Incident], bool], timeout: float) -> Incident | None:
        """The first incident satisfying `predicate`, waiting up to `timeout` s for it."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for inc in self._incidents:
                    if predicate(inc):
                        return inc
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 10.0, polls: int = 3) -> None:
        """Wait until every agent has answered `polls` polls; AgentError if one did not."""
        end = time.monotonic() + timeout
        with self._cond:
            while not all(p.polls >= polls and p.nodes for p in self.pollers):
                left = end - time.monotonic()
                if left <= 0:
                    bad = [f"{p.entry.host}: {p.error or 'no nodes'}" for p in self.pollers
                           if p.polls < polls or not p.nodes]
                    raise AgentError(f"monitor not ready within {timeout:g} s: {'; '.join(bad)}")
                self._cond.wait(left)

    def placement(self) -> dict[str, tuple[str, str]]:
        """node -> (host, agent address) for the nodes of reachable agents that are in
        service (not fenced): where sessions may be recovered to."""
        return {n: (p.entry.host, p.entry.address) for p in self.pollers
                if p.error is None for n in p.nodes if n not in p.fenced}

    def fleet(self) -> dict[str, tuple[str | None, dict[str, bool]]]:
        """Every agent of the config: host -> (its last poll error, None when it answers;
        {node: fenced} as last known), for saying why no node can take sessions."""
        return {p.entry.host: (p.error if p.last_ok is not None or p.error else "not polled yet",
                               {n: n in p.fenced for n in p.nodes}) for p in self.pollers}

    def status(self) -> dict[str, dict]:
        """Per agent: reachable, polls, failures, last error, nodes."""
        now = self.clock()
        return {p.entry.host: {
            "reachable": p.error is None and p.last_ok is not None, "polls": p.polls,
            "failures": p.failures, "error": p.error, "nodes": list(p.nodes),
            "last_ok_s_ago": None if p.last_ok is None else round(now - p.last_ok, 3),
        } for p in self.pollers}


def _failure(error: str):
    from .incidents import ActionRecord
    return ActionRecord("response", "failed", 0.0, 0.0, {}, error)


def run_monitor(config: MonitorConfig | str, stop_event: threading.Event, *,
                hooks: dict[str, Callable[[dict], Any]] | None = None) -> list[Incident]:
    """Run a monitor until `stop_event` is set (the CLI's `backdoors monitor`).

    `config` is a MonitorConfig or the path of its TOML file; incidents go to its
    incidents_dir, DEFAULT_INCIDENTS_DIR when it has none. Returns its incidents.
    """
    if isinstance(config, str):
        config = load_config(config)
    if config.incidents_dir is None:
        import msgspec
        config = msgspec.structs.replace(config, incidents_dir=DEFAULT_INCIDENTS_DIR)
    mon = Monitor(config, hooks=hooks)
    with mon:
        stop_event.wait()
    return mon.incidents()

"""The monitor's Prometheus metrics, in a registry of its own.

Counters come from the monitor's incident events (`on_event`, subscribed by the Monitor):
detections, responses and recoveries by rule. The poll latency histogram is observed by
the pollers. Everything else is read at scrape time by `MonitorCollector`: the latest
view of every node (sensor values, frozen, fenced), agent reachability and the open
incidents. Label values are bounded by the configured agents, their nodes, their boxes'
sensors and the loaded rules. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .detectors import NodeView
from .incidents import Incident


class Monitor(Protocol):
    """What the metrics read of a monitor (monitor.core.Monitor), without importing it."""

    rules: list[Any]
    pollers: list[Any]
    engine: Any
    clock: Callable[[], float]

    def subscribe(self, fn: Callable[[str, Incident], None]) -> None: ...


#: sensors of one node exported (4 series each): a node chooses how many it has (up to
#: 4,096 a box), not how many series every scrape of the monitor carries
MAX_SENSOR_SERIES = 256
_POLL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_REPAIR_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(state: str | None) -> str:
    """An incident state or outcome as a label value ("nothing to do" -> "nothing_to_do")."""
    return (state or "unknown").replace(" ", "_")


class MonitorMetrics:
    """The metrics of one monitor; `registry` holds them all."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.poll_seconds = Histogram(
            "backdoors_monitor_poll_seconds",
            "Duration of one poll of an agent (nodes() and sensors() of each node)",
            ["host"], buckets=_POLL_BUCKETS, registry=r)
        self.detections = Counter("backdoors_monitor_detections",
                                  "Incidents opened, by rule", ["rule", "node"], registry=r)
        self.detection_seconds = Histogram(
            "backdoors_monitor_detection_latency_seconds",
            "From the onset found in the sensor history to detection, by rule",
            ["rule"], buckets=_REPAIR_BUCKETS, registry=r)
        self.repairs = Counter("backdoors_monitor_repairs",
                               "Responses finished, by rule and outcome (repaired, recorded, "
                               "nothing_to_do, failed)", ["rule", "outcome"], registry=r)
        self.repair_seconds = Histogram(
            "backdoors_monitor_repair_seconds", "From detection to the end of the response",
            ["rule"], buckets=_REPAIR_BUCKETS, registry=r)
        self.recoveries = Counter("backdoors_monitor_recoveries",
                                  "Recover actions (fence + evacuate), by rule and outcome "
                                  "(done, failed)", ["rule", "outcome"], registry=r)
        self.sessions_moved = Counter("backdoors_monitor_sessions_recovered",
                                      "Client sessions moved to another node by recoveries",
                                      ["rule"], registry=r)
        self.sessions_failed = Counter("backdoors_monitor_sessions_failed",
                                       "Client sessions a recovery could not move",
                                       ["rule"], registry=r)
        self.closed = Counter("backdoors_monitor_incidents_closed",
                              "Incidents closed, by rule and outcome (cleared, "
                              "fenced, node_gone, monitor_stopped)", ["rule", "outcome"],
                              registry=r)
        self._views: dict[tuple[str, str], NodeView] = {}
        self._lock = threading.Lock()

    def watch(self, monitor: Monitor) -> None:
        """Collect `monitor`'s state at every scrape, and count its incident events."""
        self.registry.register(MonitorCollector(monitor, self))
        for rule in monitor.rules:  # a zero per rule from the start, not at first use
            self.detection_seconds.labels(rule.name)
            self.repair_seconds.labels(rule.name)
        for p in monitor.pollers:
            self.poll_seconds.labels(p.entry.host)
        monitor.subscribe(self.on_event)

    def saw(self, view: NodeView) -> None:
        """Keep the latest view of a node (called on every poll)."""
        with self._lock:
            self._views[(view.host, view.node)] = view

    def forget(self, host: str, node: str) -> None:
        """A node gone from its agent: its series go with it."""
        with self._lock:
            self._views.pop((host, node), None)

    def views(self) -> list[NodeView]:
        with self._lock:
            return list(self._views.values())

    def on_event(self, event: str, inc: Incident) -> None:
        """Count one incident event (Monitor.subscribe)."""
        if event == "opened":
            self.detections.labels(inc.rule, inc.node).inc()
            self.detection_seconds.labels(inc.rule).observe(inc.onset_to_detect_ms / 1000)
        elif event == "action" and inc.actions and inc.actions[-1].kind == "recover":
            a = inc.actions[-1]
            if a.status == "skipped":  # when = "unrepaired", and an earlier action repaired
                return
            self.recoveries.labels(inc.rule, a.status).inc()
            moved = int(a.detail.get("moved", 0) or 0)
            self.sessions_moved.labels(inc.rule).inc(moved)
            self.sessions_failed.labels(inc.rule).inc(len(a.detail.get("failed", {}) or {}))
        elif event == "responded":
            self.repairs.labels(inc.rule, _label(inc.state)).inc()
            if inc.repaired_ms is not None:
                self.repair_seconds.labels(inc.rule).observe(inc.repaired_ms / 1000)
        elif event == "closed":
            self.closed.labels(inc.rule, _label(inc.outcome)).inc()


class MonitorCollector(Collector):
    """Reads a monitor's latest views, pollers and engine when scraped."""

    def __init__(self, monitor: Monitor, metrics: MonitorMetrics):
        self.monitor, self.metrics = monitor, metrics

    def collect(self):
        m = self.monitor
        yield from self._agents(m)
        polled = {(p.entry.host, n) for p in m.pollers for n in p.nodes}
        yield from self._sensors([v for v in self.metrics.views() if (v.host, v.node) in polled])
        open_ = GaugeMetricFamily("backdoors_monitor_incidents_open",
                                  "Incidents open now, by rule and node", labels=["rule", "node"])
        counts: dict[tuple[str, str], int] = {}
        for inc in m.engine.open_incidents():
            counts[(inc.rule, inc.node)] = counts.get((inc.rule, inc.node), 0) + 1
        for (rule, node), n in sorted(counts.items()):
            open_.add_metric([rule, node], float(n))
        yield open_

    @staticmethod
    def _agents(m: Monitor):
        reachable = GaugeMetricFamily("backdoors_monitor_agent_reachable",
                                      "1 if the agent answered its last poll", labels=["host"])
        silent = GaugeMetricFamily("backdoors_monitor_agent_silent_seconds",
                                   "Seconds since the agent last answered a poll",
                                   labels=["host"])
        failures = CounterMetricFamily("backdoors_monitor_poll_failures",
                                       "Polls of the agent that failed (timeout, refused, "
                                       "protocol)", labels=["host"])
        nodes = GaugeMetricFamily("backdoors_monitor_agent_nodes",
                                  "Nodes polled on the agent", labels=["host"])
        now = m.clock()
        for p in m.pollers:
            host = p.entry.host
            ok = p.error is None and p.last_ok is not None
            reachable.add_metric([host], float(ok))
            since = p.last_ok if p.last_ok is not None else p.started
            silent.add_metric([host], max(0.0, now - since))
            failures.add_metric([host], float(p.failures))
            nodes.add_metric([host], float(len(p.nodes)))
        yield from (reachable, silent, failures, nodes)

    @staticmethod
    def _sensors(views: list[NodeView]):
        labels = ["host", "node", "box", "sensor"]
        value = GaugeMetricFamily("backdoors_monitor_sensor_value",
                                  "A sensor's value at the last poll: a level's gauge, a "
                                  "progress or pressure sensor's counter", labels=labels + ["type"])
        violated = GaugeMetricFamily("backdoors_monitor_sensor_violated",
                                     "1 if the sensor was beyond its bound at the last poll",
                                     labels=labels)
        stalled = GaugeMetricFamily("backdoors_monitor_sensor_stalled_seconds",
                                    "Progress sensors: seconds since the counter last moved",
                                    labels=labels)
        events = GaugeMetricFamily("backdoors_monitor_sensor_window_events",
                                   "Pressure sensors: events in the sensor's last window",
                                   labels=labels)
        frozen = GaugeMetricFamily("backdoors_monitor_node_frozen",
                                   "1 if the agent reported the node's cgroup frozen",
                                   labels=["host", "node"])
        fenced = GaugeMetricFamily("backdoors_monitor_node_fenced",
                                   "1 if the node is fenced (out of service after a recovery)",
                                   labels=["host", "node"])
        for v in sorted(views, key=lambda v: (v.host, v.node)):
            if not v.agent_ok:
                continue  # its agent is silent: no fresh values to show
            if v.frozen is not None:  # the poll asked nodes(): lock state known
                frozen.add_metric([v.host, v.node], float(v.frozen))
                fenced.add_metric([v.host, v.node], float(v.fenced))
            shown = ((box, s) for box, snap in sorted(v.snapshots.items()) for s in snap.sensors)
            for box, s in itertools.islice(shown, MAX_SENSOR_SERIES):
                key = [v.host, v.node, box, s.name]
                value.add_metric(key + [str(s.type)], float(s.value))
                violated.add_metric(key, float(s.violated))
                if s.stalled_for is not None:
                    stalled.add_metric(key, s.stalled_for)
                if s.rate is not None:
                    events.add_metric(key, s.rate)
        yield from (value, violated, stalled, events, frozen, fenced)

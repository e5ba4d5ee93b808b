"""The agent's Prometheus metrics, and the small HTTP server that exposes a registry.

`AgentMetrics` holds the counters and histograms the request paths update, in a registry
of its own (never the global one); `watch(agent)` adds a collector that reads the
agent's state at scrape time: sessions and regions per node, lock state, the kernel
sensor boxes, the workers' deadline misses. `MetricsServer` serves a registry at
`GET /metrics` on one thread, from a socket made in a given network namespace.

Label values are bounded: op labels are known op names or "?", node labels are the
configured nodes, lanes are the nodes, "<node>:memory" (a node's read workers) and
"memory", codes are the protocol's codes.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..errors import BackdoorsError
from .config import AgentConfig
from .leases import LeaseTable
from .listening import listen_socket
from .regions import RegionTable
from .served import Lane, NodeRuntime
from .sessions import SessionTable

log = logging.getLogger("backdoors.agent")

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)


class RecoveryView(Protocol):
    """What the collector reads of the agent's session recovery (recovery.Recovery)."""

    limbo: Mapping[str, list]  # node -> sessions dumped and not adopted yet
    expired: Mapping[str, int]  # "staged" | "adopting" -> entries freed unused


class Watched(Protocol):
    """What the collector reads of an agent at scrape time (daemon.Agent provides it)."""

    config: AgentConfig
    nodes: Mapping[str, NodeRuntime]
    sessions: SessionTable
    regions: RegionTable
    leases: LeaseTable | None
    recovery: RecoveryView

    def lanes(self) -> list[Lane]:
        """Every worker lane: the nodes' and the memory lane."""

    def connections(self) -> int:
        """Open RPC connections."""


class AgentMetrics:
    """Counters, histograms and gauges of one agent; `registry` holds them all."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "backdoors_agent_rpc_seconds", "RPC latency from decoded request to reply, by op",
            ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc = Counter("backdoors_agent_rpc",
                           "RPC requests that reached dispatch, by op and result (ok or the "
                           "error code)", ["op", "result"], registry=r)
        self.rejected = Counter("backdoors_agent_rejected",
                                "Requests rejected before dispatch (bad frame, auth, replay, "
                                "malformed body, busy), by code", ["code"], registry=r)
        self.closed = Counter("backdoors_agent_connections_closed",
                              "RPC connections the agent closed to protect its slots: "
                              "auth_timeout, auth_failed, evicted, send_timeout, idle",
                              ["reason"], registry=r)
        self.votes = Counter("backdoors_agent_votes",
                             "Quorum votes of destructive ops: cast, applied (quorum reached), "
                             "expired (window passed)", ["op", "outcome"], registry=r)
        self.regions = Gauge("backdoors_agent_regions",
                             "Application regions registered by a node (kernel box and "
                             "Continuation Boxes not counted)", ["node"], registry=r)
        self.registrations = Counter("backdoors_agent_registrations",
                                     "Local registration requests by node, op and result",
                                     ["node", "op", "result"], registry=r)
        self.registration_rests = Counter(
            "backdoors_agent_registration_rests",
            "Times a node's registrations were paused for taking more than its share of the "
            "registration thread's CPU, by node", ["node"], registry=r)
        self.stuck_ops = Gauge("backdoors_agent_stuck_ops",
                               "Operations abandoned at their deadline and still running, "
                               "by worker lane", ["lane"], registry=r)
        self.stale_tokens = Counter("backdoors_agent_stale_tokens",
                                    "Requests refused for a fencing token older than the "
                                    "node's highest (stale_token), by node", ["node"],
                                    registry=r)
        self.sample_seconds = Gauge("backdoors_agent_sample_seconds",
                                    "Duration of the node's last kernel-sensor sample",
                                    ["node"], registry=r)

    def watch(self, agent: Watched) -> None:
        """Collect `agent`'s state at every scrape (sessions, locks, kernel sensors)."""
        self.registry.register(AgentCollector(agent))
        for spec in agent.config.nodes:  # a series per node from the start, not at first use
            self.regions.labels(spec.name).set(0)
            self.stuck_ops.labels(spec.name).set(0)
            self.stuck_ops.labels(f"{spec.name}:memory").set(0)
        self.stuck_ops.labels("memory").set(0)


class AgentCollector(Collector):
    """Reads an agent's state when scraped; never blocks on a node (only memory reads)."""

    def __init__(self, agent: Watched):
        self.agent = agent
        self.started = time.time()

    def collect(self):
        a = self.agent
        info = GaugeMetricFamily("backdoors_agent_info", "The agent: 1, with its host",
                                 labels=["host"])
        info.add_metric([a.config.host], 1.0)
        yield info
        yield GaugeMetricFamily("backdoors_agent_start_time_seconds",
                                "Unix time the agent started", value=self.started)
        conns = GaugeMetricFamily("backdoors_agent_rpc_connections",
                                  "Open RPC connections on the private network")
        conns.add_metric([], float(a.connections()))
        yield conns
        yield from self._nodes(a)
        yield from self._lanes(a)
        yield from self._recovery(a.recovery)
        yield from self._kernel(a)

    def _nodes(self, a: Watched):
        sessions = GaugeMetricFamily("backdoors_agent_sessions",
                                     "Client sessions (socket + Continuation Box) held for a "
                                     "node", labels=["node"])
        region_bytes = GaugeMetricFamily("backdoors_agent_region_bytes",
                                         "Bytes of the application regions of a node",
                                         labels=["node"])
        frozen = GaugeMetricFamily("backdoors_agent_node_frozen",
                                   "1 if the node's cgroup was frozen at the last sample",
                                   labels=["node"])
        locked = GaugeMetricFamily("backdoors_agent_node_locked",
                                   "1 if monitors hold the node's lock (lease or fence)",
                                   labels=["node"])
        fenced = GaugeMetricFamily("backdoors_agent_node_fenced",
                                   "1 if the node is fenced (frozen until an operator or "
                                   "monitor unlocks it)", labels=["node"])
        age = GaugeMetricFamily("backdoors_agent_sample_age_seconds",
                                "Seconds since the node's last kernel-sensor sample",
                                labels=["node"])
        skipped = GaugeMetricFamily("backdoors_agent_boxes_skipped",
                                    "Sensor Boxes of the node that kept failing to read (a "
                                    "generation that never settles), skipped for now",
                                    labels=["node"])
        now = time.monotonic()
        errors = CounterMetricFamily("backdoors_agent_sample_errors",
                                     "Kernel-sensor samples of the node that failed",
                                     labels=["node"])
        for name, rt in list(a.nodes.items()):
            sessions.add_metric([name], float(a.sessions.count(name)))
            region_bytes.add_metric([name], float(a.regions.usage(name)[1]))
            latest = rt.sampler.latest
            if latest is not None:
                frozen.add_metric([name], float(bool(latest.stats.frozen)))
                age.add_metric([name], max(0.0, time.monotonic() - latest.taken_at))
            if a.leases is not None:
                state = a.leases.state(name)
                locked.add_metric([name], float(bool(state.locked_by)))
                fenced.add_metric([name], float(state.fenced))
            errors.add_metric([name], float(rt.sampler.errors))
            skipped.add_metric([name], float(rt.boxes.count(now)))
        yield from (sessions, region_bytes, frozen, locked, fenced, age, errors, skipped)

    def _recovery(self, r: RecoveryView):
        limbo = GaugeMetricFamily("backdoors_agent_sessions_in_limbo",
                                  "Sessions of a node dumped by an evacuate that no target "
                                  "adopted yet (kept for the next evacuate)", labels=["node"])
        for node, kept in list(r.limbo.items()):
            limbo.add_metric([node], float(len(kept)))
        expired = CounterMetricFamily("backdoors_agent_recovery_expired",
                                      "Hand-over state a peer left unused and the agent freed "
                                      "after its TTL: staged pieces, restored sessions that "
                                      "never got their final adopt", labels=["what"])
        for what, count in list(r.expired.items()):
            expired.add_metric([what], float(count))
        yield from (limbo, expired)

    def _lanes(self, a: Watched):
        misses = CounterMetricFamily("backdoors_agent_deadline_misses",
                                     "Operations abandoned at their deadline, by worker lane",
                                     labels=["lane"])
        for lane in a.lanes():
            misses.add_metric([lane.name], float(lane.misses))
        yield misses

    def _kernel(self, a: Watched):
        from ..sensors import KERNEL_BOX, SensorType, parse_box, read_consistent

        level = GaugeMetricFamily("backdoors_agent_kernel_sensor",
                                  "A level sensor of the node's kernel box (memory_mb, pids, "
                                  "psi_*_some, link_up)", labels=["node", "sensor"])
        bound = GaugeMetricFamily("backdoors_agent_kernel_sensor_max",
                                  "The max bound of a kernel level sensor (from the limits "
                                  "and [kernel_sensors])", labels=["node", "sensor"])
        events = CounterMetricFamily("backdoors_agent_kernel_events",
                                     "A pressure sensor of the node's kernel box: forks, "
                                     "fork_failures, oom_kills since the agent started",
                                     labels=["node", "sensor"])
        for name in list(a.nodes):
            try:
                with a.regions.use(name, KERNEL_BOX) as entry:
                    image = parse_box(read_consistent(entry.region))
            except (KeyError, BackdoorsError, ValueError, OSError):
                continue  # not sampled yet, or being replaced: the next scrape has it
            for s in image.sensors:
                if s.type is SensorType.LEVEL:
                    level.add_metric([name, s.name], float(s.value))
                    if s.max is not None:
                        bound.add_metric([name, s.name], float(s.max))
                elif s.type is SensorType.PRESSURE:
                    events.add_metric([name, s.name], float(s.value))
        yield from (level, bound, events)


# -- serving -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics; anything else is 404. One request at a time, 5 s for the whole
    exchange: a client that sends its request a byte at a time (each within the socket
    timeout) is cut off then, so it cannot hold the one thread from the scrapers."""

    timeout = 5.0
    registry: CollectorRegistry
    server_version = "backdoors-metrics"

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.timeout, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
        except OSError:
            pass

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"only /metrics is served here\n", "text/plain; charset=utf-8")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        try:
            body = encoder(self.registry)
        except Exception as e:  # noqa: BLE001 - a broken collector must not kill the server
            log.exception("metrics collection failed")
            self._reply(500, f"metrics collection failed: {e}\n".encode(),
                        "text/plain; charset=utf-8")
            return
        self._reply(200, body, content_type)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("metrics %s: " + fmt, self.client_address[0], *args)


class MetricsServer:
    """Serves `registry` at http://LISTEN/metrics on a thread; `start()`, `stop()`.

    `listen` is "ADDR:PORT" (port 0 picks one: see `address`); with `netns`, the listening
    socket is made in that network namespace (the process stays where it is); with
    `interface`, it accepts only connections arriving there (agent/listening.py). Requests are
    served one at a time, so a scraper cannot make it use more than one thread.
    """

    def __init__(self, registry: CollectorRegistry, listen: str, *, netns: str | None = None,
                 interface: str | None = None, what: str = "metrics"):
        self.registry, self.listen, self.netns, self.what = registry, listen, netns, what
        self.interface = interface
        self.address: tuple[str, int] | None = None
        self._httpd: http.server.HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Serve on a thread of its own; the socket is bound now unless `bind()` did."""
        if self._httpd is None:
            self.bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="bd-metrics",
                                        daemon=True)
        self._thread.start()
        where = (f" on interface {self.interface}" if self.interface else "") + \
            (f" in netns {self.netns}" if self.netns else "")
        log.info("%s served at http://%s/metrics%s", self.what, self.url_host, where)
        return self

    def bind(self) -> MetricsServer:
        """Bind and listen (in `netns`, bound to `interface`, if set); no thread yet."""
        sock = listen_socket(self.listen, netns=self.netns, interface=self.interface,
                             backlog=16, what=self.what)
        host, port = sock.getsockname()[:2]
        handler = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        httpd = http.server.HTTPServer((host, port), handler, bind_and_activate=False)
        httpd.socket.close()  # made in this thread's netns: use ours instead
        httpd.socket = sock
        httpd.server_address = sock.getsockname()
        httpd.server_name, httpd.server_port = host, httpd.server_address[1]
        self.address = httpd.server_address[:2]
        self._httpd = httpd
        return self

    @property
    def url_host(self) -> str:
        """"ADDR:PORT" actually listened on ("[V6]:PORT" for IPv6)."""
        if self.address is None:
            return self.listen
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the socket (waits for a request in progress, <= 5 s)."""
        if self._httpd is not None:
            if self._thread is not None:  # (shutdown() waits for serve_forever to return)
                self._httpd.shutdown()
                self._thread.join(5.0)
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

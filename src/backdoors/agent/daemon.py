"""The agent: nodes, regions, samplers, the local registration socket and the RPC server.

`Agent` assembles the parts on an asyncio loop (`await start()`, `await stop()`); it does
not change the process (cgroup, mlockall, priority: see `hardening`, applied by the daemon
entry point). `BackgroundAgent` runs an Agent on a loop of its own in a thread, for tests,
benchmarks and embedding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from ..common.fdstore import Notifier, listen_fds, watchdog_interval
from ..common.ratelimit import LogLimiter
from ..common.runtime import agent_socket
from ..errors import AgentError, BackdoorsError
from ..nodes import Layout, Node, detect, read_process
from ..sensors import GUEST_BOX, KERNEL_BOX, Region
from ..vm.guard import GuestWatch
from ..vm.node import VmNode
from ..vm.sensors import PREDICTED
from .audit import AuditLog
from .config import AgentConfig, validate
from .descriptors import session_cap
from .fdstore import AgentStore
from .isolation import refuse_unisolated
from .leases import LeaseTable
from .listening import listen_socket
from .local import LocalServer
from .events import EventBus
from .metrics import AgentMetrics, MetricsServer
from .mmreads import MmReads
from .ops import OPS, Op, read_boxes
from .peerwatch import PeerWatch
from .recovery import Recovery
from .regions import Entry, RegionTable
from .served import Lane, NodeRuntime
from .sampler import KernelSensors, NodeSampler
from .sessions import SessionTable
from .tokens import TokenTable
from .watch import Watcher
from .server import RpcServer

log = logging.getLogger("backdoors.agent")

NODE_WORKERS = 2
LEASE_CHECK_S = 0.02
#: how long a stopping agent keeps trying to thaw the nodes it holds under a lease: a
#: stop has no deadline to meet, and a node left frozen by it stays frozen
STOP_THAW_S = 10.0
FENCES_KEY = "fences"  # durable state (fd store): {node: [monitors holding its fence]}
TOKENS_KEY = "tokens"  # durable state: {node: [highest fencing token, its monitor]}
MARKS_KEY = "marks"  # durable, shared: each signer's latest request time (agent/auth.py)
SERVICES_KEY = "services"  # durable state: {node: [pid, start_time] of its service}
GUEST_RETRY_S = 5.0  # a VM node whose guest kernel cannot be read is tried again this often


class Agent:
    """One host's agent. Every kernel object it creates is removed by `stop()`."""

    def __init__(self, config: AgentConfig, *, layout: Layout | None = None,
                 on_set_up: Callable[[Agent], None] | None = None,
                 on_serving: Callable[[Agent], None] | None = None):
        validate(config)
        # called in start() once everything is opened and bound, before any thread starts
        # (the agent's Landlock confinement: agent/sealing.py)
        self.on_set_up = on_set_up
        # called once it serves, before it tells its supervisor so (READY=1): the seccomp
        # part of a seal, so that a supervised agent is never seen ready and unsealed
        self.on_serving = on_serving
        self.config = config
        self.identity = config.identity()
        self.monitor_keys = config.monitor_keys()
        # itself among its peers: a recovery from one of its nodes to another (evacuate to
        # its own address) signs and checks with its own key
        self.peer_keys = {**config.peer_keys(), config.host: (self.identity.public,)}
        self.layout = layout or detect()
        self.metrics = AgentMetrics()
        self.recovery = Recovery(config.run_dir, identity=self.identity, peers=self.peer_keys,
                                 monitors=self.monitor_keys, quorum=config.quorum,
                                 netns=config.netns)
        self.ops: dict[str, Op] = dict(OPS)
        self.ops.update((op.name, op) for op in self.recovery.ops())
        self.peerwatch = PeerWatch(config.watch_peers, identity=self.identity,
                                   peer_keys=self.peer_keys, netns=config.netns,
                                   period_s=config.peer_check_ms / 1000)
        self.ops.update((op.name, op) for op in self.peerwatch.ops())
        self.inner_timeout = config.op_deadline_s * 0.8  # node ops give up before the deadline
        self.nodes: dict[str, NodeRuntime] = {}
        self._tracking: dict[str, concurrent.futures.Future] = {}  # per node, the pass queued
        cap = session_cap(config.max_sessions_per_node, len(config.nodes),
                          config.max_regions_per_node)
        if cap.lowered:
            log.warning("sessions per node: %d, not %d: %s", cap.sessions, cap.configured,
                        cap.note)
        self.regions = RegionTable([n.name for n in config.nodes],
                                   max_regions=config.max_regions_per_node,
                                   max_region_bytes=config.max_region_bytes,
                                   max_node_bytes=config.max_node_bytes,
                                   max_sessions=cap.sessions, sessions_note=cap.note)
        self.sessions = SessionTable([n.name for n in config.nodes], cap.sessions, cap.note)
        self.mmreads = MmReads()
        self._setup_events()
        self.watcher: Watcher | None = None  # violations pushed as events (agent/watch.py)
        self.leases: LeaseTable | None = None
        self.tokens = TokenTable()  # fencing tokens of a fleet of monitors (agent/tokens.py)
        self.audit: AuditLog | None = None
        self.local: LocalServer | None = None
        self.rpc: RpcServer | None = None
        self._rpc_sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self.metrics_server: MetricsServer | None = None  # GET /metrics, with metrics_listen
        self._reaper: asyncio.Task | None = None
        self._stopping = threading.Event()
        self._guest_retry: threading.Thread | None = None
        self._guest_logs = LogLimiter(rate=1 / 60, burst=1)  # a node's unreadable guest
        self._expiring: set[str] = set()
        self._expire_errors: dict[str, str] = {}
        # the supervisor (systemd, the lab's keeper): fd store, readiness, watchdog
        self.store = AgentStore(Notifier())
        self._watchdog: asyncio.Task | None = None

    def add_op(self, op: Op) -> None:
        """Add (or replace) an RPC op: the extension point, also used by tests."""
        self.ops[op.name] = op

    def _setup_events(self) -> None:
        """Events pushed to subscribed monitors (agent.events), and the watch of session
        owners that publishes their deaths and closes their orphans (agent.owners)."""
        from .events import SubscribeArgs
        from .owners import OwnerWatch
        self.events = EventBus(self.metrics.registry)
        self.owners = OwnerWatch(self.sessions, self.regions, publish=self.events.publish,
                                 audit=None, timeout_s=self.config.orphan_timeout_s,
                                 run_dir=self.config.run_dir, registry=self.metrics.registry)
        self.ops.update((op.name, op) for op in self.owners.ops())
        self.add_op(Op("subscribe", SubscribeArgs, lambda call: self.events.subscribe(
            call.args, min(call.monitors, default="")), "inline"))

    def socket_path(self, node: str) -> str:
        """The registration socket of `node` (give it to the node's apps)."""
        return agent_socket(self.config.run_dir, node)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the nodes, start sampling and serving; undone again if anything fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self._set_up()
        if self.on_set_up is not None:  # the path part of a seal: before any thread starts
            self.on_set_up(self)
        await self.rpc.start(self._rpc_sock)  # (yields to the loop: may serve from here on)
        self._run()

    def _set_up(self) -> None:
        """Everything that opens or binds, and no thread: the audit log, the nodes (each
        sampled once, so its kernel box exists), the fd store's regions and sessions, the
        registration sockets, the RPC and metrics listening sockets."""
        c = self.config
        try:
            self.audit = AuditLog(c.audit_log)
        except OSError as e:
            raise AgentError(f"cannot open the audit log {c.audit_log}: {e.strerror}") from None
        for spec in c.nodes:
            try:
                if spec.vm is not None:
                    node = VmNode.open(spec.name, spec.cgroup, netns=spec.netns,
                                       freezer=spec.freezer, layout=self.layout,
                                       guest=spec.vm.guest, qmp=spec.vm.qmp,
                                       kernel=spec.vm.kernel)
                else:
                    node = Node.open(spec.name, spec.cgroup, netns=spec.netns,
                                     freezer=spec.freezer, layout=self.layout)
            except BackdoorsError as e:
                raise AgentError(f"node {spec.name}: {e}") from None
            if spec.isolation != "trusted":  # could the node reach us? (agent/isolation.py)
                refuse_unisolated(spec.name, node, own_cgroup=c.own_cgroup, netns=c.netns)
            sampler = NodeSampler(
                node, c.kernel_sensors, period=c.sample_period_s, max_procs=c.max_procs_sampled,
                on_new_box=lambda ks, n=spec.name: self._show_kernel_box(n, ks),
                gauge=self.metrics.sample_seconds.labels(spec.name), interface=spec.interface)
            self.nodes[spec.name] = rt = NodeRuntime(spec, node, sampler,
                                                     Lane(spec.name, NODE_WORKERS))
            sampler.after = lambda rt=rt: self._track(rt)
            if isinstance(node, VmNode):
                rt.guest = self._open_guest(spec, node)
        self.leases = LeaseTable({n: rt.node for n, rt in self.nodes.items()})
        if c.watch_period_ms > 0:  # (its thread starts in _run)
            self.watcher = Watcher(self.nodes, self.regions, period_s=c.watch_period_ms / 1000,
                                   publish=self.events.publish,
                                   held=lambda node: bool(self.leases.holders(node)),
                                   owner_died=lambda node, pid: self.owners.seen_dead(
                                       node, pid) or any(
                                       s.pid == pid for s in self.sessions.list(node)))
        for rt in self.nodes.values():
            try:
                rt.sampler.sample_once()
            except BackdoorsError as e:
                raise AgentError(f"node {rt.name}: cannot sample it: {e}") from None
        self.metrics.watch(self)
        self._take_back()
        self.local = LocalServer({n: rt.node for n, rt in self.nodes.items()}, c.run_dir,
                                 self.regions, audit=self.audit, metrics=self.metrics,
                                 sessions=self.sessions)
        self.local.owners = self.owners
        self.owners.audit = self.audit
        self.events.attach(asyncio.get_running_loop())
        self.local.listen()
        self.rpc = RpcServer(self, self.ops, self.identity, self.monitor_keys, self.peer_keys,
                             self.metrics, self.audit)
        for why in self.rpc.auth.resume(self._kept_marks,
                                        lambda data: self.store.keep_shared(MARKS_KEY, data)):
            log.warning("not taken back from the fd store: %s", why)
            self.audit.write(kind="readopted", host=c.host, dropped=[why])
        self._rpc_sock = self._listen_socket()
        self.address = self._rpc_sock.getsockname()[:2]
        if c.metrics_listen:
            self.metrics_server = MetricsServer(self.metrics.registry, c.metrics_listen,
                                                netns=c.netns, interface=c.listen_interface,
                                                what=f"agent {c.host} metrics")
            self.metrics_server.bind()

    def _open_guest(self, spec, node: VmNode) -> GuestWatch | None:
        """Map a VM node's guest RAM and show its guest kernel box (`GUEST_BOX`), owned by
        the node's QEMU: its death is the guest's (agent/watch.py follows it). Its
        integrity guard's changes are pushed as events (vm/guard.py). None when the
        guest kernel cannot be read (not booted yet, or its memory is not what a kernel
        holds: a hostile guest must not keep the agent from serving the host's other
        nodes): the node is served without its box, and tried again (`_retry_guests`)."""
        try:
            vm = spec.vm
            watch = GuestWatch(spec.name, node.memory(), sample_period=vm.sample_period_s,
                               jiffies_deadline=vm.jiffies_deadline_s,
                               min_available_mb=vm.min_available_mb, max_threads=vm.max_threads,
                               max_running=vm.max_running,
                               on_change=lambda *a, n=spec.name: self._tampered(n, *a),
                               on_predicted=(lambda *a, n=spec.name: self._predicted(n, *a))
                               if vm.orion else None)
        except BackdoorsError as e:
            if self._guest_logs.admit(spec.name)[0]:
                log.error("node %s: cannot read its guest kernel (tried again every %g s; "
                          "the node is served without its guest box meanwhile): %s",
                          spec.name, GUEST_RETRY_S, e)
                self.audit.write(kind="guest_unreadable", node=spec.name, error=str(e)[:200])
            return None
        region = Region(watch.sensors.box.fd, label=f"node {spec.name} guest kernel sensors")
        self.regions.add(Entry(spec.name, GUEST_BOX, "sensorbox", region, False, node.pid,
                               node.start_time, internal=True))
        return watch

    def _tampered(self, node: str, violated: bool, new: list, count: int) -> None:
        """A VM node's kernel integrity went bad (or good again): pushed like a level out
        of bounds of its guest box, with the findings."""
        self.events.publish("violation" if violated else "cleared", node,
                            detector="level_out_of_bounds", condition="kernel_tampered",
                            box=GUEST_BOX, sensor="tampered", value=float(count), max=0.5,
                            findings=[f.to_dict() for f in new], onset=time.time())
        self.audit.write(kind="kernel_tampered" if violated else "kernel_clean", node=node,
                         findings=[f.to_dict() for f in new], open=count)

    def _predicted(self, node: str, kind: str, alarm) -> None:
        """Orion foresaw a VM node's guest going unstable (or that episode ended): pushed
        like a level out of bounds of its guest box, with the trend behind it."""
        sensor = PREDICTED[kind]
        if alarm is None:
            self.events.publish("cleared", node, detector="level_out_of_bounds",
                                condition="unstable_predicted", box=GUEST_BOX, sensor=sensor,
                                predicted=kind, value=0.0, max=0.5)
            return
        self.events.publish("violation", node, detector="level_out_of_bounds",
                            condition="unstable_predicted", box=GUEST_BOX, sensor=sensor,
                            predicted=kind, value=1.0, max=0.5, eta_s=alarm.eta_s,
                            slope=round(alarm.slope, 1), r2=alarm.r2, reading=alarm.value,
                            onset=time.time())
        self.audit.write(kind="unstable_predicted", node=node, predicted=kind,
                         eta_s=alarm.eta_s)

    def _run(self) -> None:
        """Start the threads and tasks that serve: samplers, owners, the watcher,
        registration, lease reaper, metrics, the supervisor's watchdog, peer watch."""
        c = self.config
        for rt in self.nodes.values():
            rt.sampler.start()
            if rt.guest is not None:
                rt.guest.start()
        if any(isinstance(rt.node, VmNode) and rt.guest is None for rt in self.nodes.values()):
            self._guest_retry = threading.Thread(target=self._retry_guests, daemon=True,
                                                 name="bd-guest-retry")
            self._guest_retry.start()
        self.owners.start()
        if self.watcher is not None:
            self.watcher.start()
        self.local.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_leases())
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.audit.write(kind="start", host=c.host, listen=f"{self.address[0]}:{self.address[1]}",
                         nodes=[n.name for n in c.nodes], quorum=c.quorum)
        log.info("agent %s listening on %s:%d for %d nodes", c.host, *self.address, len(self.nodes))
        if self.on_serving is not None:
            self.on_serving(self)
        self._supervised()
        self.peerwatch.start()

    def _retry_guests(self) -> None:
        """Open the guest kernels that could not be read, until all are."""
        while not self._stopping.wait(GUEST_RETRY_S):
            waiting = [rt for rt in self.nodes.values()
                       if isinstance(rt.node, VmNode) and rt.guest is None]
            if not waiting:
                return
            for rt in waiting:
                if (watch := self._open_guest(rt.spec, rt.node)) is not None:
                    rt.guest = watch
                    watch.start()
                    log.warning("node %s: its guest kernel is read now", rt.name)

    # -- supervisor: fd store, readiness, watchdog (see agent/fdstore.py) ---------------

    def _take_back(self) -> None:
        """Re-adopt the regions, sessions and durable state (fences, adopted addresses,
        limbo) a previous agent kept in the fd store, then mirror every later change
        there."""
        passed = listen_fds()
        self._kept_marks = None
        if passed:
            r = self.store.readopt(passed, self.regions, self.sessions)
            self._kept_marks = r.state.get(MARKS_KEY)
            r.dropped += self.recovery.take_back(r.state, set(self.nodes))
            r.dropped += self._refence(r.state.get(FENCES_KEY))
            r.dropped += self.tokens.take_back(r.state.get(TOKENS_KEY), set(self.nodes))
            r.dropped += self._take_back_services(r.state.get(SERVICES_KEY))
            self.audit.write(kind="readopted", host=self.config.host, regions=r.regions,
                             sessions=r.sessions, dropped=r.dropped,
                             fenced=self.leases.fences(),
                             tokens={n: list(t) for n, t in self.tokens.snapshot().items()},
                             adopted_addresses={n: sorted(c) for n, c in
                                                self.recovery.adopted_addresses.items()},
                             limbo={n: len(m) for n, m in self.recovery.limbo.items()})
            log.info("took back %d regions and %d sessions from the fd store (%d dropped)",
                     r.regions, r.sessions, len(r.dropped))
        self.store.attach(self.regions, self.sessions)
        self.recovery.keep = self.store.keep
        self.leases.observer = self._keep_fences
        self.tokens.observer = lambda _: self.store.keep(TOKENS_KEY, self.tokens.encode())
        self.regions.service_observer = self._keep_services
        self._keep_services({n: who for n in self.nodes
                             if (who := self.regions.service(n)) is not None})

    def _take_back_services(self, data: bytes | None) -> list[str]:
        """The nodes' services a previous agent kept; what could not be read, with why."""
        if not data:
            return []
        try:
            kept = {str(n): (int(pid), float(start))
                    for n, (pid, start) in json.loads(data).items()}
        except (ValueError, AttributeError, TypeError) as e:
            return [f"services: {e}"]
        self.regions.take_back_services(kept)
        return []

    def _keep_services(self, services: dict[str, tuple[int, float]]) -> None:
        self.store.keep(SERVICES_KEY, json.dumps(services, sort_keys=True).encode()
                        if services else None)

    def _refence(self, data: bytes | None) -> list[str]:
        """Fence again the nodes a previous agent held fenced; what could not be taken
        back, with why. (A fence is kept even if the freeze fails: fail-stop.)"""
        if not data:
            return []
        dropped = []
        try:
            fences = {str(n): [str(h) for h in holders] for n, holders in json.loads(data).items()}
        except (ValueError, AttributeError, TypeError) as e:
            fences = {}
            dropped.append(f"fences: {e}")
        for node, holders in fences.items():
            if node not in self.nodes:
                dropped.append(f"fence of {node[:64]}: no such node")
                continue
            try:
                self.leases.refence(node, holders, self.inner_timeout)
            except BackdoorsError as e:
                log.warning("node %s: fenced again, but it would not freeze: %s", node, e)
        if dropped:
            self._keep_fences(self.leases.fences())
        return dropped

    def _keep_fences(self, fences: dict[str, list[str]]) -> None:
        self.store.keep(FENCES_KEY, json.dumps(fences, sort_keys=True).encode() if fences
                        else None)

    def _supervised(self) -> None:
        """Tell the supervisor we serve (READY=1) and ping its watchdog, if it has one."""
        if not self.store.enabled:
            return
        self.store.notifier.ready()
        interval = watchdog_interval()
        if interval:
            self._watchdog = asyncio.get_running_loop().create_task(self._keep_alive(interval))

    async def _keep_alive(self, interval: float) -> None:
        """WATCHDOG=1 every quarter interval while the event loop runs (this task), the
        registration thread lives and every lane gets through its work: a probe queued
        on each lane must run within the longest op deadline (ops may fill a lane that
        long), unless the lane's workers are known stuck (abandoned at their deadline).
        A lane is probed again a quarter of that after its last probe, not every ping:
        two lanes per node, each probe a thread wake-up and a loop wake-up. A stopped or
        wedged agent stops pinging and is replaced."""
        period = interval / 4
        grace = max([self.config.op_deadline_s,
                     *(op.deadline_s or 0 for op in self.ops.values())]) + interval
        refresh = grace / 4
        loop = asyncio.get_running_loop()
        probes: dict[int, tuple[float, asyncio.Future]] = {}  # by id(lane)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            healthy = self.local is not None and self.local.alive()
            for lane in self.lanes():
                probe = probes.get(id(lane))
                if probe is None or (probe[1].done() and now - probe[0] >= refresh):
                    try:
                        probes[id(lane)] = (now, loop.run_in_executor(lane.pool, _nothing))
                    except RuntimeError:  # the pool shut down: we are stopping
                        return
                elif not lane.stuck and now - probe[0] > grace:
                    if healthy:
                        log.warning("lane %s has not run anything for %.1f s: no watchdog "
                                    "ping", lane.name, now - probe[0])
                    healthy = False
            if not healthy:
                continue
            try:
                self.store.notifier.watchdog()
            except OSError as e:
                log.warning("watchdog ping failed: %s", e)

    def _listen_socket(self) -> socket.socket:
        c = self.config
        sock = listen_socket(c.listen, netns=c.netns, interface=c.listen_interface,
                             what=f"agent {c.host} RPC")
        sock.setblocking(False)
        return sock

    def _track(self, rt: NodeRuntime) -> None:
        """Queue the node's box tracking pass (ops.read_boxes, agent/tracking.py) on its
        read workers, unless the last one is still queued or running (one at a time), or
        a pass ran within the sampling period: a monitor's sensors call is one, and a
        monitor polling as often leaves the sampler's passes nothing to add."""
        if time.monotonic() - rt.tracking.passed_at < rt.sampler.period:
            return
        queued = self._tracking.get(rt.name)
        if queued is None or queued.done():
            self._tracking[rt.name] = rt.reads.pool.submit(read_boxes, self, rt)

    def _show_kernel_box(self, node: str, sensors: KernelSensors) -> None:
        region = Region(sensors.box.fd, label=f"node {node} kernel sensors")
        me = read_process(os.getpid())
        self.regions.add(Entry(node, KERNEL_BOX, "sensorbox", region, False, os.getpid(),
                               me.start_time if me else 0.0, internal=True))

    async def stop(self) -> None:
        """Stop serving; thaw nodes locked under a lease (fences stay); remove sockets."""
        await asyncio.to_thread(self.peerwatch.stop)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
            self.metrics_server = None
        if self.rpc is not None:
            await self.rpc.stop()
        if self._rpc_sock is not None:  # (closed by the server if it started)
            self._rpc_sock.close()
            self._rpc_sock = None
        if self._reaper is not None:
            self._reaper.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.leases is not None:
            await self._release_leases()
        if self.local is not None:
            self.local.stop()
            self.local = None
        self.owners.stop()
        if self.watcher is not None:
            self.watcher.stop()
        self._stopping.set()
        if self._guest_retry is not None:  # (an open under way ends first)
            await asyncio.to_thread(self._guest_retry.join)
        for rt in self.nodes.values():
            rt.sampler.stop()
            if rt.guest is not None:  # (may be taking its baseline: seconds)
                await asyncio.to_thread(rt.guest.stop)
            rt.lane.pool.shutdown(wait=False, cancel_futures=True)
            rt.reads.pool.shutdown(wait=False, cancel_futures=True)
        self.regions.close()
        self.sessions.close()
        self.recovery.close()
        self.store.close()
        for rt in self.nodes.values():
            rt.sampler.close()
            if rt.guest is not None:
                rt.guest.close()
            if isinstance(rt.node, VmNode):
                rt.node.close()
        if self.audit is not None:
            self.audit.write(kind="stop", host=self.config.host)
            self.audit.close()
        self.rpc = None

    def lanes(self) -> list[Lane]:
        """Every worker lane: the nodes' (ops and reads) and, while serving, the memory lane."""
        lanes = [lane for rt in list(self.nodes.values()) for lane in (rt.lane, rt.reads)]
        if self.rpc is not None:
            lanes.append(self.rpc.memory_lane)
        return lanes

    def connections(self) -> int:
        """Open RPC connections."""
        return self.rpc.connections if self.rpc is not None else 0

    def stuck_ops(self) -> int:
        """Operations abandoned at their deadline and still running."""
        return sum(lane.stuck for lane in self.lanes())

    # -- leases ------------------------------------------------------------------------

    async def _reap_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            for name in self.leases.expired():
                if name not in self._expiring:
                    self._expiring.add(name)
                    asyncio.get_running_loop().create_task(self._expire(name))

    async def _expire(self, name: str) -> None:
        try:
            released = await self.rpc.run_blocking(self.nodes[name].lane, "lease expiry",
                                                   self.leases.expire, name, self.inner_timeout)
            if released:
                self.audit.write(kind="lease_expired", node=name, ok=True)
            self._expire_errors.pop(name, None)
        except Exception as e:  # noqa: BLE001 - retried on the next check
            if self._expire_errors.get(name) != str(e):  # say it once, not every 20 ms
                self._expire_errors[name] = str(e)
                self.audit.write(kind="lease_expired", node=name, ok=False, error=str(e))
                log.warning("node %s: lease expired but the thaw failed (retrying): %s", name, e)
        finally:
            self._expiring.discard(name)

    async def _release_leases(self) -> None:
        """Thaw every node held under a lease, tried again until STOP_THAW_S (a thaw under
        load may take longer than an op's deadline); a node that stays frozen is said in
        the log and the audit log."""
        end = time.monotonic() + STOP_THAW_S
        for name in self.leases.leased():
            node = self.nodes[name].node
            while True:
                try:
                    await asyncio.to_thread(node.unlock, max(self.inner_timeout, 1.0))
                except Exception as e:  # noqa: BLE001 - tried again until the end
                    # (unless the node is gone: its cgroup removed, its QEMU exited)
                    gone = not node.cgroup.exists() or (isinstance(node, VmNode)
                                                        and not node.alive())
                    if time.monotonic() < end and not gone:
                        await asyncio.sleep(0.05)
                        continue
                    log.warning("node %s: could not thaw it at shutdown: %s", name, e)
                    self.audit.write(kind="lease_released", node=name, ok=False,
                                     why="agent stop", error=str(e))
                    break
                self.leases.released(name)
                self.audit.write(kind="lease_released", node=name, ok=True, why="agent stop")
                break


def _nothing() -> None:
    pass


class BackgroundAgent:
    """An Agent on its own event loop in a daemon thread; a context manager."""

    def __init__(self, config: AgentConfig, **kwargs):
        self.agent = Agent(config, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bd-agent-loop", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.agent.address

    def start(self, timeout: float = 10.0) -> BackgroundAgent:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AgentError(f"the agent did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("agent %s: still stopping after %g s", self.agent.config.host,
                            timeout)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self.agent.start()
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.agent.stop()

    def __enter__(self) -> BackgroundAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


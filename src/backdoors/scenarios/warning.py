"""`backdoors scenario warning`: two clusters warn each other (DINA), end to end.

Two labs are two clusters. Each has its agent, its node under a pids limit, its service,
its own etcd and two monitors (in-process, the default rules) sharing its nodes through
that etcd, and its own NATS server; cluster B's server is linked to A's by a leaf-node
connection. A fork bomb is started in A: the monitor of A that owns the node repairs it
(the default fork-bomb rule), then publishes a signed warning naming the bomb's executable
hash and comm. B's monitors verify it (A's monitors' keys are in their `[monitor.warnings]
trusted_keys`) and arm a rule.

An intruder on A's NATS server, which heard the warning go by, then tries to turn the
link against B: it replays the warning, alters it to name B's service (its executable
hash and comm) under A's signature, signs such a warning with a key of its own (once under
a name of its own, once under the name of A's monitor), and sends bytes that are no
warning. B's monitors must refuse each (replay, bad_signature, unknown_signer,
bad_signature, bad_envelope) and arm nothing more: B's service lives on.

The same bomb is then started in B: the armed rule kills it on sight, before it reaches
the node's pids limit (B's node must count no fork refused by its pids limit) and before
B's own fork-bomb rule needs to.

Keys: first_cluster_repair_ms (A: the bomb's first forks, seen in the node's task count,
to repaired), second_cluster_repair_ms (B: its first forks to its last process gone; from
its start if it was killed before a fork was seen: second_cluster_bomb_forked false),
second_cluster_service_impact (the longest standstill of B's service's progress counter,
ms, while the bomb ran), warnings_sent, warnings_accepted, warnings_rejected (every
monitor's; bad signature, unknown signer, replay, window) and warnings_rejected_by_reason,
bad_warnings_injected (what the intruder sent, by the reason it should be refused for, per
monitor of B), forged_rules_armed (rules armed for B's service: must be 0),
second_cluster_service_survived; clusters (each one's monitors, etcd members, and the
monitor that owned its node); and what shows how B's bomb ended:
second_cluster_fork_failures, second_cluster_peak_pids, pids_limit, prearmed_kills,
second_cluster_detector_incidents.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from contextlib import ExitStack

import msgspec

from ..agent.keys import new_identity
from ..common.procs import alive
from ..errors import BackdoorsError
from ..fleet.bus import Bus
from ..lab import hogs
from ..monitor import Monitor
from ..monitor.config import WarningsConfig
from ..monitor.warning import AttackWarning, Sealed, seal
from .labkit import AgentLab, unique_name, wait_until
from .repair import NodeInit, _count_comm, _hog_argv, _mono, _ms
from .watch import ProgressWatch

MiB = 1 << 20
SUBJECT = "backdoors.warnings"
CLUSTERS = {"A": ("a1", "a2"), "B": ("b1", "b2")}  # each cluster's monitors


class PidsWatch(threading.Thread):
    """A node's task count, sampled every millisecond or so: its peak, and when it first
    rose `rise` above where it was at the start (a bomb's first forks: its interpreter's
    start-up before them is not the bomb yet). It reads pids.current alone: the monitors
    it measures share this process (and its GIL) with it."""

    def __init__(self, node, rise: int = 2):
        super().__init__(name="bd-pids-watch", daemon=True)
        self.node, self.rise = node, rise
        self.base = node.cgroup.pids_current()
        self.peak, self.rose_at = self.base, None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            try:
                pids = self.node.cgroup.pids_current()
            except BackdoorsError:
                continue
            self.peak = max(self.peak, pids)
            if self.rose_at is None and pids >= self.base + self.rise:
                self.rose_at = time.monotonic()

    def stop(self) -> int:
        self._done.set()
        self.join(5)
        return self.peak


def forgeries(genuine: bytes, exe_sha256: str, comm: str) -> list[tuple[str, bytes]]:
    """What an intruder who heard `genuine` (a sealed warning) can send to make its
    receivers kill processes running `exe_sha256` with comm `comm`, each with the reason
    a Verifier must refuse it for."""
    sealed = msgspec.msgpack.decode(genuine, type=Sealed)
    w = msgspec.msgpack.decode(sealed.body, type=AttackWarning)
    aimed = msgspec.structs.replace(w, id=uuid.uuid4().hex, exe_sha256=exe_sha256, comm=comm,
                                    cmdline=[], exe="", issued_at=time.time())
    altered = msgspec.msgpack.encode(Sealed(msgspec.msgpack.encode(aimed), sealed.signer,
                                            sealed.sig))  # the signature of other bytes
    own, posing = new_identity("intruder"), new_identity(w.monitor)  # keys of its own
    return [("replay", genuine),
            ("bad_signature", altered),
            ("unknown_signer", seal(own, msgspec.structs.replace(aimed, monitor=own.id))),
            ("bad_signature", seal(posing, msgspec.structs.replace(aimed, id=uuid.uuid4().hex))),
            ("bad_envelope", b"\x92\xa4kill\xa3all")]


def _first_incident(monitors: list[Monitor], pred, timeout: float):
    """The first incident of any of `monitors` for which `pred` holds; None after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in monitors:
            for inc in m.incidents():
                if pred(inc):
                    return inc
        time.sleep(0.02)
    return None


def _exe_of(pid: int) -> tuple[str, str]:
    """The sha256 of process `pid`'s executable, and its comm."""
    with open(f"/proc/{pid}/exe", "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    with open(f"/proc/{pid}/comm") as f:
        return sha, f.read().strip()


def warning(*, pids_limit: int = 256, period_ms: float = 50, scan_ms: float = 20,
            timeout_s: float = 20.0, settle_s: float = 1.0) -> dict:
    """Run the scenario (see the module's docstring); a JSON-ready dict."""
    node = "n0"
    names = {"A": unique_name("wa"), "B": unique_name("wb")}
    out: dict = {"pids_limit": pids_limit}
    with ExitStack() as stack:
        labs = {c: stack.enter_context(AgentLab(names[c], nodes=1, memory_limit=1024 * MiB,
                                                pids_limit=pids_limit, etcd=True,
                                                monitors=("m1", *CLUSTERS[c])))
                for c in CLUSTERS}
        hub = labs["A"].lab.start_nats()
        spoke = labs["B"].lab.start_nats(remotes=[hub.leaf_url])
        spoke.wait_linked()
        base = (hub.subscriptions(), spoke.subscriptions())
        keys = {m: labs[c].monitor_key(m) for c, ms in CLUSTERS.items() for m in ms}
        mons: dict[str, list[Monitor]] = {}
        inits, owner = {}, {}
        try:
            for c, other in (("A", "B"), ("B", "A")):
                labs[c].wait_registered(node)
                inits[c] = NodeInit(labs[c], node)
                server = hub if c == "A" else spoke
                mons[c] = []
                for m in CLUSTERS[c]:
                    cfg = labs[c].monitor_config(m, period_ms=period_ms, fleet_poll_ms=50.0,
                                                 warnings=WarningsConfig(
                        nats=[server.url], cluster=c, subject=SUBJECT, scan_ms=scan_ms,
                        trusted_keys={o: keys[o].public_text() for o in CLUSTERS[other]}))
                    mons[c].append(stack.enter_context(Monitor(cfg, key=keys[m])))
                for mon in mons[c]:
                    mon.wait_ready(timeout=10)
                host = labs[c].plan.node(node).host
                owner[c] = wait_until(
                    lambda: next((mon for mon in mons[c] if mon.watches(host, node)), None),
                    15.0, f"a monitor of cluster {c} watching {node} (its etcd's share)")
            out["clusters"] = {c: {"monitors": list(CLUSTERS[c]), "etcd_members": 1,
                                   "owner": owner[c].config.monitor_id} for c in CLUSTERS}
            heard: list[tuple[str, bytes]] = []  # the intruder's ear on A's server
            intruder = stack.enter_context(
                Bus([hub.url], f"{SUBJECT}.*", lambda s, d: heard.append((s, d)),
                    name="intruder"))
            # every monitor's interest, and the other cluster's across the link
            hub.wait_subscriptions(base[0] + len(CLUSTERS["A"]) + 2)
            spoke.wait_subscriptions(base[1] + len(CLUSTERS["B"]) + 1)
            time.sleep(settle_s)  # nodes in their steady state

            # cluster A: the usual detector and repair, then the warning
            rise_a = PidsWatch(labs["A"].lab.node(node))
            rise_a.start()
            inits["A"].spawn(_hog_argv("forkbomb"))
            # repaired, at its first attempt or a later one (under load one may fail)
            inc = _first_incident(mons["A"], lambda i: i.rule == "fork-bomb"
                                  and i.state == "repaired", timeout_s)
            out["first_cluster_state"] = inc.state if inc else None
            rise_a.stop()
            out["first_cluster_repair_ms"] = (
                _ms(rise_a.rose_at, _mono(inc.detected) + (inc.repaired_ms or 0) / 1000)
                if inc is not None else None)
            if inc is not None:
                wait_until(lambda: all(m.warnings.scanner.rules() for m in mons["B"]), 10.0,
                           "the warning armed in every monitor of B")
            armed = mons["B"][0].warnings.scanner.rules()
            out["armed_rule"] = ({"exe_sha256": armed[0].exe_sha256, "comm": armed[0].comm,
                                  "kind": armed[0].kind} if armed else None)

            # the intruder: the warning it heard, replayed and forged against B's service
            service = labs["B"].lab.service(node).pid
            genuine = wait_until(lambda: next((d for s, d in heard if s == f"{SUBJECT}.A"),
                                              None), 5.0, "the warning heard on A's server")
            sha, svc_comm = _exe_of(service)
            bad = forgeries(genuine, sha, svc_comm)
            injected: dict[str, int] = {}
            for reason, data in bad:
                intruder.publish(data, f"{SUBJECT}.A")
                injected[reason] = injected.get(reason, 0) + 1
            want = len(bad) * len(mons["B"])
            wait_until(lambda: sum(m.warnings.rejected_total for m in mons["B"]) >= want, 10.0,
                       f"B's monitors refusing the intruder's {len(bad)} messages")
            time.sleep(2 * scan_ms / 1000)  # a scan or two: what a forged rule would kill
            out["bad_warnings_injected"] = injected
            out["forged_rules_armed"] = sum(  # the genuine rule may name the same interpreter
                1 for m in mons["B"] for r in m.warnings.scanner.rules()
                if (r.exe_sha256, r.comm) == (sha, svc_comm))
            out["second_cluster_service_survived"] = alive(service)

            # cluster B: the same bomb, killed on sight
            n_b = labs["B"].lab.node(node)
            failures_before = n_b.cgroup.fork_failures()
            watch = ProgressWatch(labs["B"].lab, node, {"service": service}).start()
            peak = PidsWatch(n_b)
            peak.start()
            t_spawn = time.monotonic()
            inits["B"].spawn(_hog_argv("forkbomb"))
            comm = hogs.COMM["forkbomb"]

            def kills() -> list:
                return [k for m in mons["B"] for k in m.warnings.scanner.kills]

            # its first forks, or a kill: it may be killed between taking its name and
            # forking (the scanner sees the name), before a fork was counted
            wait_until(lambda: peak.rose_at or kills(), timeout_s, "the bomb forking in B")
            t_gone = wait_until(
                lambda: (kills() and _count_comm(labs["B"], node, comm) == 0
                         and time.monotonic()), timeout_s, "the bomb gone from B", step=0.002)
            t_end = time.monotonic()
            start = peak.rose_at or t_spawn
            out.update(
                second_cluster_bomb_forked=peak.rose_at is not None,
                second_cluster_repair_ms=_ms(start, t_gone),
                second_cluster_service_impact=watch.max_gap_ms(start, t_end),
                second_cluster_fork_failures=n_b.cgroup.fork_failures() - failures_before,
                second_cluster_peak_pids=peak.stop(),
                prearmed_kills=[{"sent": k.sent, "killed": k.killed, "froze": k.froze,
                                 "error": k.error} for k in kills()],
                second_cluster_detector_incidents=sum(
                    1 for m in mons["B"] for i in m.incidents() if i.rule == "fork-bomb"),
            )
            watch.stop()
            out["second_cluster_killed_before_limit"] = (
                out["second_cluster_fork_failures"] == 0
                and out["second_cluster_peak_pids"] < pids_limit)
            every = [m for ms in mons.values() for m in ms]
            out["warnings_sent"] = sum(m.warnings.sent for m in every)
            out["warnings_accepted"] = sum(len(m.warnings.accepted) for m in every)
            out["warnings_rejected"] = sum(m.warnings.rejected_total for m in every)
            by_reason: dict[str, int] = {}
            for m in every:
                for reason, n in m.warnings.status()["rejected"].items():
                    by_reason[reason] = by_reason.get(reason, 0) + n
            out["warnings_rejected_by_reason"] = by_reason
            accepted = next((m.warnings.accepted for m in mons["B"] if m.warnings.accepted), [])
            if accepted:
                w = accepted[0]
                out["warning"] = {"kind": w.kind, "comm": w.comm, "exe": w.exe,
                                  "cmdline": w.cmdline, "cluster": w.cluster,
                                  "node": w.node, "monitor": w.monitor}
        finally:
            for c in CLUSTERS:  # never leave a bomb behind, whatever happened above
                try:
                    labs[c].lab.node(node).kill_all(5.0)
                except BackdoorsError:
                    pass
                if c in inits:
                    inits[c].close()
    return out

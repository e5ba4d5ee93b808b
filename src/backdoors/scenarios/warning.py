"""`backdoors scenario warning`: two clusters warn each other (DINA), end to end.

Two labs are two clusters, each with its agent, its node under a pids limit, its service
and its monitor (in-process, the default rules), and its own NATS server; cluster B's
server is linked to A's by a leaf-node connection. A fork bomb is started in A: A's
monitor repairs it (the default fork-bomb rule), then publishes a signed warning naming
the bomb's executable hash and comm. B's monitor verifies it (A's monitor key is in its
`[monitor.warnings] trusted_keys`) and arms a rule. The same bomb is then started in B:
the armed rule kills it on first sight, before it reaches the node's pids limit (B's node
must count no fork refused by its pids limit) and before B's own fork-bomb rule needs to.

Keys: first_cluster_repair_ms (A: the bomb's first forks, seen in the node's task count,
to repaired), second_cluster_repair_ms (B: its first forks to its last process gone), second_cluster_service_impact (the longest stand-
still of B's service's progress counter, ms, while the bomb ran), warnings_sent,
warnings_rejected (both monitors; bad signature, unknown signer, replay, window), and
what shows how B's bomb ended: second_cluster_fork_failures, second_cluster_peak_pids,
pids_limit, prearmed_kills, second_cluster_detector_incidents.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

from ..errors import BackdoorsError
from ..lab import hogs
from ..monitor import Monitor
from ..monitor.config import WarningsConfig
from .labkit import AgentLab, unique_name, wait_until
from .repair import NodeInit, _count_comm, _hog_argv, _mono, _ms
from .watch import ProgressWatch

MiB = 1 << 20
SUBJECT = "backdoors.warnings"


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


def warning(*, pids_limit: int = 256, period_ms: float = 50, scan_ms: float = 20,
            timeout_s: float = 20.0, settle_s: float = 1.0) -> dict:
    """Run the scenario (see the module's docstring); a JSON-ready dict."""
    node = "n0"
    names = {"A": unique_name("wa"), "B": unique_name("wb")}
    ids = {"A": "ma", "B": "mb"}
    out: dict = {"pids_limit": pids_limit}
    with ExitStack() as stack:
        labs = {c: stack.enter_context(AgentLab(names[c], nodes=1, memory_limit=1024 * MiB,
                                                pids_limit=pids_limit, monitors=("m1", ids[c])))
                for c in ("A", "B")}
        hub = labs["A"].lab.start_nats()
        spoke = labs["B"].lab.start_nats(remotes=[hub.leaf_url])
        spoke.wait_linked()
        base = (hub.subscriptions(), spoke.subscriptions())
        keys = {c: labs[c].monitor_key(ids[c]) for c in labs}
        mons, inits, bombs = {}, {}, []
        try:
            for c, other in (("A", "B"), ("B", "A")):
                labs[c].wait_registered(node)
                inits[c] = NodeInit(labs[c], node)
                server = hub if c == "A" else spoke
                cfg = labs[c].monitor_config(ids[c], period_ms=period_ms, warnings=WarningsConfig(
                    nats=[server.url], cluster=c, subject=SUBJECT, scan_ms=scan_ms,
                    trusted_keys={ids[other]: keys[other].public_text()}))
                mons[c] = stack.enter_context(Monitor(cfg, key=keys[c]))
                mons[c].wait_ready(timeout=10)
            hub.wait_subscriptions(base[0] + 2)  # both monitors' interest, across the link
            spoke.wait_subscriptions(base[1] + 2)
            time.sleep(settle_s)  # nodes in their steady state

            # cluster A: the usual detector and repair, then the warning
            rise_a = PidsWatch(labs["A"].lab.node(node))
            rise_a.start()
            inits["A"].spawn(_hog_argv("forkbomb"))
            # repaired, at its first attempt or a later one (under load one may fail)
            inc = mons["A"].wait_for(lambda i: i.rule == "fork-bomb" and i.state == "repaired",
                                     timeout_s)
            out["first_cluster_state"] = inc.state if inc else None
            rise_a.stop()
            out["first_cluster_repair_ms"] = (
                _ms(rise_a.rose_at, _mono(inc.detected) + (inc.repaired_ms or 0) / 1000)
                if inc is not None and inc.state == "repaired" else None)
            wb = mons["B"].warnings
            armed = wait_until(lambda: wb.scanner.rules(), 10.0, "the warning armed in B",
                               ) if inc is not None else None
            out["armed_rule"] = ({"exe_sha256": armed[0].exe_sha256, "comm": armed[0].comm,
                                  "kind": armed[0].kind} if armed else None)

            # cluster B: the same bomb, killed on sight
            n_b = labs["B"].lab.node(node)
            failures_before = n_b.cgroup.fork_failures()
            watch = ProgressWatch(labs["B"].lab, node,
                                  {"service": labs["B"].lab.service(node).pid}).start()
            peak = PidsWatch(n_b)
            peak.start()
            inits["B"].spawn(_hog_argv("forkbomb"))
            bombs.append("B")
            comm = hogs.COMM["forkbomb"]
            wait_until(lambda: peak.rose_at, timeout_s, "the bomb forking in B")
            t_gone = wait_until(
                lambda: (wb.scanner.kills and _count_comm(labs["B"], node, comm) == 0
                         and time.monotonic()), timeout_s, "the bomb gone from B", step=0.002)
            t_end = time.monotonic()
            out.update(
                second_cluster_repair_ms=_ms(peak.rose_at, t_gone),
                second_cluster_service_impact=watch.max_gap_ms(peak.rose_at, t_end),
                second_cluster_fork_failures=n_b.cgroup.fork_failures() - failures_before,
                second_cluster_peak_pids=peak.stop(),
                prearmed_kills=[{"sent": k.sent, "killed": k.killed, "froze": k.froze,
                                 "error": k.error} for k in wb.scanner.kills],
                second_cluster_detector_incidents=sum(
                    1 for i in mons["B"].incidents() if i.rule == "fork-bomb"),
            )
            watch.stop()
            out["second_cluster_killed_before_limit"] = (
                out["second_cluster_fork_failures"] == 0
                and out["second_cluster_peak_pids"] < pids_limit)
            out["warnings_sent"] = sum(m.warnings.sent for m in mons.values())
            out["warnings_rejected"] = sum(m.warnings.rejected_total for m in mons.values())
            out["warnings_accepted"] = sum(len(m.warnings.accepted) for m in mons.values())
            if wb.accepted:
                w = wb.accepted[0]
                out["warning"] = {"kind": w.kind, "comm": w.comm, "exe": w.exe,
                                  "cmdline": w.cmdline, "cluster": w.cluster,
                                  "node": w.node}
        finally:
            for c in ("A", "B"):  # never leave a bomb behind, whatever happened above
                try:
                    labs[c].lab.node(node).kill_all(5.0)
                except BackdoorsError:
                    pass
                if c in inits:
                    inits[c].close()
    return out

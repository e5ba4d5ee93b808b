"""The vm scenario: a VM node's kernel watched from outside, tampered with, healed.

    vm_integrity(benign_s=600) -> {"boot_s", "accel", "guest_hang_detect_ms",
        "tamper_detect_ms": {"p50", "p99"}, "tamper_healed", "hidden_process_found",
        "false_positives", "benign_minutes", "overhead_pct", "tampers": [...],
        "prediction_lead_ms": {"memory-leak", "fork-bomb", "runaways"},
        "prediction_false_alarms", ...}

A lab with one VM node. The guest kernel's jiffies sensor (vm.sensors) times a hang: the
vCPUs stopped by QMP, seen stalled by deadline. Then the integrity baseline is taken from
the kernel image (vm.integrity) and a Watch checks the guest a slice per tick. While a
benign workload runs in the guest (file copies, compression, memory churn, processes:
the guest's /cgi-bin/work) every finding is a false positive; the scan's cost is measured
side by side: a STREAM-like benchmark in the guest (vm/stream.c: copy, scale, add, triad,
the best of `stream_times` passes each) run alternately with the Watch paused and running. Then the `rootkit` fault (vm.rootkit, through QEMU's
gdbstub) redirects a system call table entry, patches the first bytes of the uname system
call's function (uname then fails in the guest) and unlinks a process from the task list
and from its parent's children (found by the pid map the kernel looks pids up in),
`tamper_rounds` times; each is timed from the start of its gdbstub session to the Watch's
finding and healed at once by the rule (write the clean bytes back with the vCPUs
stopped, relink the process, verify). `tamper_healed`: every tamper restored, a full
sweep clean, uname works again, the processes are back on both lists and the guest
still serves HTTP. `scan_cpu_pct`: the Watch's CPU time per wall time (one host core).

Orion (vm.orion) samples the guest's counters every 20 ms throughout: its alarms during
the benign work are `prediction_false_alarms`. Then three faults in the guest, a memory
leak into its tmpfs (/cgi-bin/hog), a fork bomb (/cgi-bin/bomb) and CPU-bound workers
(/cgi-bin/workers: 64 spinning processes started one every 100 ms, the livelock of a
starved service, killed from outside once measured), each run until the plain bound
detector fires on the same samples (available memory below 32 MiB; threads 256 and
runnable tasks 32 above the guest's idle count): `prediction_lead_ms` is, per fault, how
long before that the predictor's alarm came (negative: after; None: no alarm).
`prediction.inputs` gives Orion's other inputs during the benign work and each fault
(OrionWatch.inputs: the run queues' runnable tasks, page-cache refaults per second, and
the share of the kernel's data pages changed per pass of churn.DataChurn).
"""

from __future__ import annotations

import contextlib
import statistics
import time

from ..errors import BackdoorsError
from ..lab import Lab, topology
from ..sensors import SensorBoxReader
from ..vm import rootkit
from ..vm.churn import DataChurn
from ..vm.integrity import Baseline, Checker, Healer, Watch
from ..vm.kill import kill
from ..vm.orion import OrionWatch, Predictor
from ..vm.sensors import GuestSampler, GuestSensors
from .labkit import unique_name


def guest_get(lab: Lab, vm: str, path: str, timeout: float = 120.0) -> str:
    """GET `path` from VM node `vm`'s httpd, from the lab's client namespace; the body."""
    with lab.client_socket() as s:
        s.settimeout(timeout)
        s.connect((lab.plan.vm(vm).vip, topology.SERVICE_PORT))
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    # the header ends at the first empty line (CGI programs end theirs with bare \n)
    head, _, body = reply.replace(b"\r\n", b"\n").partition(b"\n\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\n", 1)[0]:
        raise BackdoorsError(f"VM node {vm}: GET {path} answered {head[:80]!r}")
    return body.decode(errors="replace")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


TAMPERS = ("syscall-table", "function-patch", "hidden-process")
MEMORY_FLOOR = 32 << 20
THREADS_ABOVE_IDLE = 256
RUNNING_ABOVE_IDLE = 32


class _Timeline:
    """The scenario's events on one clock (seconds since the guest was up): the report's
    integrity timeline. A lane per tamper kind, per Orion fault, and the guest's own."""

    def __init__(self) -> None:
        self.t0, self.events = time.monotonic(), []

    def add(self, lane: str, kind: str, at: float, end: float | None = None) -> None:
        event = {"t": round(at - self.t0, 3), "lane": lane, "kind": kind}
        if end is not None:
            event["end"] = round(end - self.t0, 3)
        self.events.append(event)


def _predicted(lab: Lab, orion: OrionWatch, fault: str, path: str, kind: str,
               timeout: float, timeline: _Timeline, stop=None) -> dict:
    """Start a fault in the guest; wait for the plain bound to be crossed; the alarm's
    lead over it. Then `stop(body)` (the CGI's answer) the fault if it does not end by
    itself, and wait until the guest is back below its bounds."""
    began = time.monotonic()
    body = guest_get(lab, "v0", path)
    crossed: dict = {}
    while kind not in crossed and time.monotonic() - began < timeout:
        time.sleep(0.05)
        alarms, crossed = orion.since(began)
    alarms = [a for a in alarms if a.kind == kind]
    timeline.add(fault, "fault", began, crossed.get(kind, time.monotonic()))
    inputs = orion.inputs(began, time.monotonic())
    if alarms:
        timeline.add(fault, "alarm", alarms[0].at)
    seen = [r for _, r in orion.samples_since(began)]
    first = alarms[0] if alarms else None
    row: dict = {"fault": fault, "path": path, "bound_crossed": kind in crossed,
                 "lowest_available_mb": min((r.available >> 20 for r in seen), default=None),
                 "peak_threads": max((r.threads for r in seen), default=None),
                 "peak_running": max((r.running for r in seen), default=None),
                 "alarm": first and {"eta_s": first.eta_s, "r2": first.r2,
                                     "after_start_ms": round(1000 * (first.at - began))},
                 "inputs": inputs}
    if kind in crossed:
        row["bound_after_start_ms"] = round(1000 * (crossed[kind] - began))
        row["lead_ms"] = round(1000 * (crossed[kind] - alarms[0].at)) if alarms else None
    p = orion.predictor
    if stop is not None:
        stop(body)
    end = time.monotonic() + 30
    while time.monotonic() < end:  # the fault ends (freed, processes gone)
        r = orion.last()
        if r is not None and r.available > 2 * p.memory_floor and \
                r.threads < p.max_threads - THREADS_ABOVE_IDLE // 2 and \
                r.running < p.max_running - RUNNING_ABOVE_IDLE // 2:
            break
        time.sleep(0.1)
    time.sleep(2 * p.window_s)  # the episode closes
    return row


def adopted_process(lab: Lab, name: str = "v0", timeout: float = 30.0) -> int:
    """A long-lived process of VM node `name`'s guest (the one the rootkit hides), once its
    CGI shell has exited and init adopted it: hidden from its parent's children before
    that, it would be left to a parent that exits, and healed into a list that is no more."""
    pid = int(guest_get(lab, name, "/cgi-bin/spawn").strip())
    memory = lab.vm(name).memory()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(BackdoorsError):  # a walk that a fork or an exit broke
            if any(t.pid == pid and t.ppid == 1 for t in memory.process_table()):
                return pid
        time.sleep(0.02)
    raise BackdoorsError(f"VM node {name}: process {pid} was not adopted by init in "
                         f"{timeout:.0f} s")


STREAM_KERNELS = ("copy", "scale", "add", "triad")


def _stream(lab: Lab, n: int, times: int) -> dict[str, float]:
    """One run of the guest's STREAM: each kernel's best time (us) and its rate (MB/s)."""
    fields = guest_get(lab, "v0", f"/cgi-bin/streambench?{n},{times}").split()
    if len(fields) != 6:
        raise BackdoorsError(f"VM node v0: /bin/stream printed {' '.join(fields)!r}")
    best = dict(zip(STREAM_KERNELS, map(float, fields[:4])))
    moved = {"copy": 2, "scale": 2, "add": 3, "triad": 3}  # arrays each kernel reads + writes
    return {**{f"{k}_us": v for k, v in best.items()},
            **{f"{k}_mb_s": round(moved[k] * 8 * n / best[k], 1) for k in STREAM_KERNELS}}


def _stream_overhead(lab: Lab, watch: Watch, pairs: int, n: int, times: int) -> dict:
    """The scan's cost to the guest: STREAM run `pairs` times with the Watch paused and
    running, back to back in alternating order (so each pair shares the rest of the
    machine's load). Each run's time is the sum of its four kernels' best times (STREAM's
    best-of-NTIMES already drops passes hit by a host hiccup); the overhead is the median
    over the pairs of each pair's ratio, with its spread."""
    off, on = [], []
    for i in range(pairs):
        for paused in ((True, False) if i % 2 == 0 else (False, True)):
            watch.paused = paused
            (off if paused else on).append(_stream(lab, n, times))
    watch.paused = False
    total = lambda run: sum(run[f"{k}_us"] for k in STREAM_KERNELS)  # noqa: E731
    ratios = sorted(100 * (total(a) / total(b) - 1) for a, b in zip(on, off))
    triad = lambda runs: round(statistics.median(r["triad_mb_s"] for r in runs), 1)  # noqa: E731
    return {"overhead_pct": round(statistics.median(ratios), 2),
            "overhead_pct_iqr": [round(_percentile(ratios, 0.25), 2),
                                 round(_percentile(ratios, 0.75), 2)],
            "n": n, "times": times, "pairs": pairs,
            "triad_mb_s": {"without_scan": triad(off), "with_scan": triad(on)},
            "runs_without": off, "runs_with": on}


def _tamper_round(lab: Lab, vm, watch: Watch, healer: Healer, pid: int, uname: str,
                  round_: int, timeline: _Timeline) -> list[dict]:
    """The three tampers, one after the other, each timed from its write to the Watch's
    finding and healed at once (the monitor's rule); one row each."""
    cases = (
        (lambda: rootkit.redirect_syscall(vm, rootkit.NR_UNAME, "__x64_sys_ni_syscall"),
         lambda f: f.kind == "syscall" and f.where == f"sys_call_table[{rootkit.NR_UNAME}]"),
        (lambda: rootkit.patch_function(vm, "__x64_sys_newuname"),
         lambda f: f.kind == "text" and f.where.startswith("__x64_sys_newuname+")),
        (lambda: rootkit.hide_process(vm, pid, deep=True),
         lambda f: f.kind == "process" and f.where == f"pid {pid}"),
    )
    rows = []
    for name, (tamper, match) in zip(TAMPERS, cases):
        # timed from the start of the tamper's gdbstub session (a few ms before its write):
        # the Watch may see the write before the session ends
        began = time.monotonic()
        timeline.add(name, "tamper", began)
        tamper()
        row: dict = {"name": name, "round": round_}
        if name == "function-patch":
            row["uname_hijacked"] = guest_get(lab, "v0", "/cgi-bin/uname").strip() != uname
        if name == "hidden-process":
            row["pid"] = pid
            row["on_task_list_while_hidden"] = pid in dict(vm.memory().tasks())
            row["in_process_tree_while_hidden"] = pid in [p for p, _c, _t in vm.memory().process_tree()]
        seen = watch.wait_for(match, began, timeout=30)
        row["detected"] = seen is not None
        if seen is not None:
            row["detect_ms"] = round(1000 * (seen - began))
            timeline.add(name, "detected", seen)
            finding = next(f for at, f in watch.seen if at == seen and match(f))
            row["finding"] = finding.to_dict()
            heal_began = time.monotonic()
            row["healed"] = not healer.heal([finding])
            if row["healed"]:
                watch.checker.forget([finding])
            row["heal_ms"] = round(1000 * (time.monotonic() - heal_began))
            if row["healed"]:
                timeline.add(name, "healed", time.monotonic())
        rows.append(row)
    return rows


def vm_integrity(benign_s: float = 600.0, *, tick_s: float = 0.02, pages_per_tick: int = 128,
                 overhead_pairs: int = 10, stream_n: int = 2 << 20, stream_times: int = 20,
                 tamper_rounds: int = 5) -> dict:
    with Lab(unique_name("vm"), hosts=1, nodes=1, services=False, vm_nodes=1) as lab:
        vm = lab.vm("v0")
        memory = vm.memory()
        out: dict = {"boot_s": round(vm.boot_s, 2), "accel": vm.accel}
        timeline = _Timeline()
        # a hung guest kernel: the vCPUs stopped, its jiffies stall past the deadline
        box = GuestSensors("v0", memory, jiffies_deadline=0.5)
        try:
            with GuestSampler(box, period=0.02), SensorBoxReader(box.box.fd) as reader:
                time.sleep(0.3)
                vm.lock()
                stopped = time.monotonic()
                while not reader.snapshot().get("jiffies").violated \
                        and time.monotonic() - stopped < 10:
                    time.sleep(0.002)
                out["guest_hang_detect_ms"] = round(1000 * (time.monotonic() - stopped))
                timeline.add("guest", "hang", stopped, time.monotonic())
                out["guest_hang_deadline_ms"] = 500
                vm.unlock()
        finally:
            box.close()
        # the baseline, from the image; the Watch
        began = time.monotonic()
        baseline = Baseline.take(memory)
        out["baseline"] = {"take_s": round(time.monotonic() - began, 2), "pages": baseline.sources,
                           "syscalls": len(baseline.syscalls),
                           "unexplained_at_attach": [f.to_dict() for f in baseline.unexplained],
                           "idt_unexplained": baseline.idt_unexplained}
        checker = Checker(baseline, pages_per_tick=pages_per_tick)
        out["sweep_s"] = round(len(baseline.pages) / pages_per_tick * tick_s, 2)
        with Watch(checker, tick_s=tick_s) as watch, contextlib.ExitStack() as stack:
            # overhead: STREAM in the guest with the scan paused and running, alternately
            out["stream"] = _stream_overhead(lab, watch, overhead_pairs, stream_n, stream_times)
            out["overhead_pct"] = out["stream"]["overhead_pct"]
            out["overhead_pct_iqr"] = out["stream"]["overhead_pct_iqr"]
            # Orion, from here on: its bounds from the guest's idle counters
            idle = memory.readings()
            predictor = Predictor(memory_floor=MEMORY_FLOOR,
                                  max_threads=idle.threads + THREADS_ABOVE_IDLE,
                                  max_running=idle.running + RUNNING_ABOVE_IDLE)
            orion = stack.enter_context(OrionWatch(memory, predictor, period=0.02,
                                                   churn=DataChurn(memory)))
            # benign work: every finding meanwhile is a false positive
            benign_from = time.monotonic()
            guest_get(lab, "v0", f"/cgi-bin/work?{int(benign_s)}")
            time.sleep(benign_s)
            benign = [f for at, f in watch.seen if at >= benign_from]
            out["prediction_false_alarms"] = len(orion.since(benign_from)[0])
            out["false_positives"] = len(benign)
            out["false_positive_findings"] = [f.to_dict() for f in benign[:10]]
            out["benign_minutes"] = round((time.monotonic() - benign_from) / 60, 2)
            benign_inputs = orion.inputs(benign_from, time.monotonic())
            timeline.add("guest", "benign work", benign_from, time.monotonic())
            out["sweeps"] = checker.sweeps
            out["static_key_flips_followed"] = checker.benign_flips
            out["scan_cpu_pct"] = round(100 * watch.cpu_s / (watch.ticks * tick_s), 2) if watch.ticks else None
            time.sleep(1.0)  # the workload's last round ends
            # the rootkit, and the rule that heals it
            uname_before = guest_get(lab, "v0", "/cgi-bin/uname").strip()
            healer, tampers, pids = Healer(vm), [], []
            for round_ in range(tamper_rounds):
                pids.append(adopted_process(lab))
                tampers += _tamper_round(lab, vm, watch, healer, pids[-1], uname_before, round_,
                                         timeline)
            time.sleep(3 * tick_s)
            # Orion against the plain bounds, on two faults that reach them
            leak_mb = (orion.last().available - MEMORY_FLOOR) // (1 << 20) + 8
            faults = [_predicted(lab, orion, "memory-leak", f"/cgi-bin/hog?{leak_mb}",
                                 "memory-exhaustion", 0.2 * leak_mb + 60, timeline),
                      _predicted(lab, orion, "fork-bomb", "/cgi-bin/bomb?8", "fork-bomb", 60,
                                 timeline),
                      _predicted(lab, orion, "runaways", "/cgi-bin/workers?64,100", "starvation",
                                 60, timeline, stop=lambda body: kill(vm, int(body), tree=True))]
            orion.stop()
            out["prediction"] = {"faults": faults, "window_s": predictor.window_s,
                                 "horizon_s": predictor.horizon_s,
                                 "fork_horizon_s": predictor.fork_horizon_s,
                                 "memory_floor_mb": MEMORY_FLOOR >> 20,
                                 "max_threads": predictor.max_threads, "idle_threads": idle.threads,
                                 "max_running": predictor.max_running,
                                 "samples": len(orion.samples), "missed_samples": orion.misses,
                                 "inputs": {"benign": benign_inputs,
                                            **{f["fault"]: f.pop("inputs") for f in faults}}}
            out["prediction_lead_ms"] = {f["fault"]: f.get("lead_ms") for f in faults}
        leftover = checker.sweep()
        out["tampers"] = tampers
        detect = [t["detect_ms"] for t in tampers if "detect_ms" in t]
        out["tamper_detect_ms"] = ({"p50": _percentile(detect, 0.5), "p99": _percentile(detect, 0.99)}
                                   if detect else None)
        out["tamper_detect_ms_by_kind"] = {
            name: {"p50": _percentile(v, 0.5), "max": max(v)}
            for name in TAMPERS if (v := [t["detect_ms"] for t in tampers
                                          if t["name"] == name and "detect_ms" in t])}
        hidden = [t for t in tampers if t["name"] == "hidden-process"]
        out["hidden_process_found"] = bool(hidden) and all(t["detected"] for t in hidden)
        uname_after = guest_get(lab, "v0", "/cgi-bin/uname").strip()
        listed = dict(memory.tasks())
        tree = {p for p, _c, _t in memory.process_tree()}
        relisted = all(p in listed and p in tree for p in pids)
        serves = guest_get(lab, "v0", "/").strip() == f"vm {lab.plan.vm('v0').netns}"
        out["after_healing"] = {"sweep_findings": [f.to_dict() for f in leftover],
                                "uname": uname_after, "uname_before": uname_before,
                                "processes_relisted": relisted, "serves_http": serves}
        out["tamper_healed"] = (all(t.get("healed") for t in tampers) and not leftover
                                and uname_after == uname_before and relisted and serves)
        out["timeline"] = {"events": timeline.events}
        out["gibraltar"] = {"detect_s": 20, "false_positive_pct": 0.65, "overhead_pct": 0.49}
        return out

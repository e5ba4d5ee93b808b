"""The report's figures: each function takes loaded inputs and returns one PNG (bytes).

Figures are drawn on their own matplotlib Figure with the Agg canvas (no pyplot, no
display, no global state beyond a style context while drawing).
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Sequence
from functools import wraps

from ..monitor.incidents import Incident
from ..sensors import SensorType
from .data import (
    BenchSensors,
    CasestudyFault,
    CasestudyLoad,
    DetectionRow,
    FleetEvent,
    VmEvent,
    MissingExtraError,
    MonitorRow,
    Overhead,
    Per100ms,
    RecoveryRow,
    RepairPolicy,
)

try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
except ImportError as e:
    raise MissingExtraError(
        "the report draws its plots with matplotlib, of the 'report' extra: "
        f"pip install 'backdoors[report]' (import failed: {e})"
    ) from e

DPI = 100
MAX_SENSORS = 4  # sensor panels per timeline

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.framealpha": 0.9,
}

BLUE, RED, ORANGE, GREEN, PURPLE, GREY = \
    "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f"

POLICIES = {  # policy -> (label, colour, line style)
    "backdoors": ("with backdoors", BLUE, "-"),
    "kernel_oom": ("kernel OOM killer alone", RED, "--"),
    "largest_rss": ('"kill the largest" (earlyoom)', ORANGE, ":"),
    "pids_limit_only": ("pids limit alone", RED, "--"),
}
STATUS_COLOURS = {"done": GREEN, "failed": RED, "skipped": GREY}


def _policy(name: str, i: int) -> tuple[str, str, str]:
    return POLICIES.get(name, (name, f"C{i % 10}", "-"))


def _styled(fn: Callable[..., bytes]) -> Callable[..., bytes]:
    @wraps(fn)
    def draw(*args, **kw) -> bytes:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kw)
    return draw


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _log_if_wide(ax, values: Sequence[float | None], ratio: float = 30.0) -> None:
    vs = [v for v in values if v is not None and v > 0]
    if vs and max(vs) / min(vs) > ratio:
        ax.set_yscale("log")


def _label_bars(ax, bars, values, fmt: Callable[[float], str]) -> None:
    for bar, v in zip(bars, values):
        if v is None:
            continue
        ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7)


# ---- 1. repairing timeline ------------------------------------------------------------------


def _unit(sensor: str, type_: SensorType | None) -> str:
    if sensor.endswith("_mb"):
        return "MB"
    if sensor.startswith("psi_"):
        return "% of time (avg10)"
    if sensor.endswith("_ms"):
        return "ms"
    if sensor == "pids":
        return "tasks"
    if sensor == "link_up":
        return "1 up / 0 down"
    return {SensorType.PROGRESS: "count", SensorType.PRESSURE: "events (total)"}.get(
        type_, "value")


@_styled
def timeline(inc: Incident, diagnosis_ms: float | None = None) -> bytes:
    """Sensor values around an incident (left) and its response in ms (right), with
    onset, detection, diagnosis, each action and the repair marked."""
    keys = list(inc.sensors)[:MAX_SENSORS]
    n = max(1, len(keys))
    fig = _figure(9.5, 1.6 * n + 1.4)
    gs = fig.add_gridspec(n, 2, width_ratios=[3, 2])
    axes = [fig.add_subplot(gs[0, 0])]
    axes += [fig.add_subplot(gs[i, 0], sharex=axes[0]) for i in range(1, n)]
    levels = {f"{v.box}/{v.sensor}": v for h in inc.detectors for v in h.violations}
    onset = -inc.onset_to_detect_ms
    for ax, key in zip(axes, keys):
        pts = inc.sensors[key]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=BLUE, lw=1.4, marker=".",
                ms=3, label=key)
        v = levels.get(key)
        if v is not None and v.type == SensorType.LEVEL and v.bound is not None:
            ax.axhline(v.bound, color=GREY, ls=":", lw=1.2, label=f"bound ({v.bound:g})")
        ax.set_ylabel(f"{key.split('/')[-1]}\n({_unit(key.split('/')[-1], v and v.type)})")
    if not keys:
        axes[0].text(0.5, 0.5, "no sensor history in this incident", ha="center",
                     va="center", transform=axes[0].transAxes, color=GREY)
    for k, ax in enumerate(axes):  # onset and detection named once, in the first legend
        ax.axvline(onset, color=ORANGE, ls="--", lw=1.3,
                   label=f"onset ({round(onset)} ms)" if k == 0 else None)
        ax.axvline(0, color=RED, lw=1.5, label="detection (0 ms)" if k == 0 else None)
        if k < len(axes) - 1:
            ax.tick_params(labelbottom=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", ncols=2)
    axes[-1].set_xlabel("time relative to detection (ms)")
    axes[0].set_title("sensors before detection")
    _response(fig.add_subplot(gs[:, 1]), inc, diagnosis_ms)
    repaired = f", response done in {inc.repaired_ms:.0f} ms" if inc.repaired_ms is not None else ""
    fig.suptitle(f"{inc.rule} on node {inc.node}: detected {inc.onset_to_detect_ms:.0f} ms "
                 f"after onset{repaired} ({inc.state}, {inc.outcome or 'open'})",
                 fontsize=10, fontweight="bold")
    return _png(fig)


def _response(ax, inc: Incident, diagnosis_ms: float | None) -> None:
    """The response after detection as bars: diagnosis, then each action."""
    rows: list[tuple[str, float, float, str, str]] = []  # label, start, width, colour, text
    if diagnosis_ms is not None:
        kind = inc.diagnosis.kind if inc.diagnosis else "?"
        rows.append((f"diagnosis\n({kind})", 0.0, diagnosis_ms, PURPLE, f"{diagnosis_ms:.0f} ms"))
    for a in inc.actions:
        rows.append((a.kind, a.started_ms, a.duration_ms, STATUS_COLOURS.get(a.status, GREY),
                     f"{a.status}, {a.duration_ms:.0f} ms"))
    ax.set_title("response (after detection)")
    ax.set_xlabel("time after detection (ms)")
    if not rows:
        ax.text(0.5, 0.5, "no response recorded", ha="center", va="center",
                transform=ax.transAxes, color=GREY)
        ax.set_yticks([])
        return
    end = max([s + w for _, s, w, _, _ in rows] + [inc.repaired_ms or 0.0, 1.0])
    for y, (label, start, width, colour, text) in enumerate(rows):
        ax.barh(y, max(width, end * 0.004), left=start, color=colour, height=0.5)
        ax.annotate(text, (start + width, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(len(rows) + 0.1, -0.6)  # room below the last row for the legend
    ax.axvline(0, color=RED, lw=1.5)
    if inc.repaired_ms is not None:
        ax.axvline(inc.repaired_ms, color=GREEN, lw=1.5,
                   label=f"{'repaired' if inc.state == 'repaired' else inc.state} "
                         f"({inc.repaired_ms:.0f} ms)")
        ax.legend(loc="lower right")
    ax.set_xlim(-end * 0.03, end * 1.35)
    ax.grid(axis="y", visible=False)


# ---- 2. effectiveness of remote repair --------------------------------------------------------


def _at(series: Sequence[Sequence], t: float) -> float | None:
    """`series` ([t, v], sorted; v None: no value) at time t, linearly interpolated
    between its neighbours; the nearest value outside them."""
    before = next((p for p in reversed(series) if p[0] <= t and p[1] is not None), None)
    after = next((p for p in series if p[0] >= t and p[1] is not None), None)
    if before is None or after is None:
        return (before or after or (None, None))[1]
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (t - before[0]) / (after[0] - before[0])


def _base(series: Sequence[Sequence]) -> float:
    v = _at(series, 0.0)
    return 0.0 if v is None else v


def _zoom(policies: dict[str, RepairPolicy]) -> tuple[float, float] | None:
    """A window (s) on the shortest run when another one lasts much longer, else None."""
    spans = [(p.progress_series[0][0] / 1000, p.progress_series[-1][0] / 1000)
             for p in policies.values() if p.progress_series]
    if len(spans) < 2:
        return None
    start = min(a for a, _ in spans)
    ends = sorted(b for _, b in spans)
    if ends[-1] - start <= 2.5 * (ends[0] - start):
        return None
    return start, ends[0] + 0.08 * (ends[0] - start)


@_styled
def repair_effect(title: str, fault: str, policies: dict[str, RepairPolicy]) -> bytes:
    """Service progress over time per policy (and, when measured, whether a process in
    the node could fork), the fault's start at 0; with a zoom on the shortest run when
    another lasts much longer."""
    with_fork = any(p.fork_series for p in policies.values())
    zoom = _zoom(policies)
    windows = [None, zoom] if zoom else [None]
    fig = _figure(11 if zoom else 9, 5.4 if with_fork else 3.8)
    grid = fig.subplots(2 if with_fork else 1, len(windows), squeeze=False,
                        height_ratios=[3, 1.5] if with_fork else None,
                        width_ratios=[3, 2] if zoom else None)
    for col, window in enumerate(windows):
        ax = grid[0][col]
        _progress_panel(ax, policies, fault, window)
        ax.set_title("whole run" if window is None
                     else f"zoom: {window[0]:.1f} to {window[1]:.1f} s")
        if with_fork:
            _fork_strip(grid[1][col], policies, window, labels=col == 0)
            grid[0][col].sharex(grid[1][col])
            grid[0][col].tick_params(labelbottom=False)
        grid[-1][col].set_xlabel("time relative to fault start (s)")
    grid[0][0].set_ylabel("service progress\n(ticks since fault start)")
    grid[0][0].legend(loc="upper left")
    if with_fork:
        fig.legend(handles=[Patch(color=GREEN, label="fork works"),
                            Patch(color=RED, label="fork fails"),
                            Patch(color=FROZEN, label="no attempt (node frozen)")],
                   loc="outside lower center", ncols=3)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    return _png(fig)


def _progress_panel(ax, policies: dict[str, RepairPolicy], fault: str,
                    window: tuple[float, float] | None) -> None:
    seen: list[float] = []
    for i, (name, p) in enumerate(policies.items()):
        if not p.progress_series:
            continue
        label, colour, style = _policy(name, i)
        base = _base(p.progress_series)
        xs = [t / 1000 for t, _ in p.progress_series]
        ys = [math.nan if v is None else v - base for _, v in p.progress_series]
        ax.plot(xs, ys, color=colour, ls=style, lw=1.8 - 0.3 * i,
                label=label)
        seen += [y for x, y in zip(xs, ys) if not math.isnan(y)
                 and (window is None or window[0] <= x <= window[1])]
        deaths = sorted(p.deaths_ms.items(), key=lambda kv: kv[1])
        for j, (who, t) in enumerate(deaths):
            if window is not None and not window[0] <= t / 1000 <= window[1]:
                continue
            y = _at(p.progress_series, t)
            y = (y - base) if y is not None else next(
                (v for v in reversed(ys) if not math.isnan(v)), 0.0)
            ax.plot([t / 1000], [y], marker="X", color=colour, ms=8, ls="none")
            ax.annotate(f"{who} killed ({t / 1000:.2f} s)", (t / 1000, y),
                        xytext=(8, -16 - 12 * (i + j)), textcoords="offset points",
                        fontsize=7, color=colour,
                        arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6})
    ax.axvline(0, color="black", ls="--", lw=1.2, label=f"fault start ({fault})")
    if window is not None:
        ax.set_xlim(*window)
        if seen:
            lo, hi = min(seen), max(seen)
            pad = (hi - lo) * 0.08 or 1.0
            ax.set_ylim(lo - pad, hi + pad)


FROZEN = "#dddddd"


def _fork_strip(ax, policies: dict[str, RepairPolicy], window: tuple[float, float] | None,
                labels: bool = True) -> None:
    """Per policy, a bar coloured by whether a fork inside the node worked."""
    names = [n for n, p in policies.items() if p.fork_series]
    for y, name in enumerate(names):
        pts = policies[name].fork_series
        steps = [b[0] - a[0] for a, b in zip(pts, pts[1:])]
        typical = statistics.median(steps) if steps else 20.0
        spans: dict[str, list[tuple[float, float]]] = {GREEN: [], RED: [], FROZEN: []}
        for k, (t, ok) in enumerate(pts):
            nxt = pts[k + 1][0] if k + 1 < len(pts) else t + typical
            colour = GREEN if ok else RED
            if nxt - t > max(5 * typical, 60.0):  # no attempt: the node was frozen
                spans[colour].append((t / 1000, typical / 1000))
                spans[FROZEN].append(((t + typical) / 1000, (nxt - t - typical) / 1000))
            else:
                spans[colour].append((t / 1000, (nxt - t) / 1000))
        for colour, segs in spans.items():
            if segs:
                ax.broken_barh(segs, (y - 0.3, 0.6), color=colour, linewidth=0)
    ax.set_yticks(range(len(names)), [_policy(n, i)[0] for i, n in enumerate(names)]
                  if labels else [])
    ax.set_ylim(len(names) - 0.4, -0.6)
    ax.axvline(0, color="black", ls="--", lw=1.2)
    ax.set_title("can a process in the node fork?")
    ax.grid(axis="y", visible=False)
    if window is not None:
        ax.set_xlim(*window)


@_styled
def repair_bars(title: str, policies: dict[str, RepairPolicy], metric: str,
                ylabel: str) -> bytes:
    """The fallback when a benchmark file has no time series: one bar per policy."""
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    names = list(policies)
    values = [getattr(policies[n], metric) for n in names]
    bars = ax.bar([_policy(n, i)[0] for i, n in enumerate(names)],
                  [v or 0 for v in values], color=[_policy(n, i)[1] for i, n in enumerate(names)])
    notes = [f"{v:.0f} ms" + (f"\nfirst killed: {policies[n].victim}" if policies[n].victim else "")
             if v is not None else "" for n, v in zip(names, values)]
    for bar, text in zip(bars, notes):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    _log_if_wide(ax, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.25)
    return _png(fig)


# ---- 3. recovery is fast ----------------------------------------------------------------------


@_styled
def stall_cdf(cases: list[tuple[str, list[float], float | None]]) -> bytes:
    """The distribution (CDF) of per-session client stall, one line per scenario, its
    detection time marked; cases are (label, stalls_ms, detect_ms)."""
    fig = _figure(8, 3.6)
    ax = fig.subplots()
    for i, (label, stalls, detect) in enumerate(cases):
        xs = sorted(stalls)
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        colour = f"C{i % 10}"
        ax.step([0.0] + xs, [0.0] + ys, where="post", color=colour, lw=1.8,
                label=f"{label}: {len(xs)} sessions, median {statistics.median(xs):.0f} ms")
        if detect is not None:
            ax.axvline(detect, color=colour, ls="--", lw=1.1,
                       label=f"{label}: detected at {detect:.0f} ms")
    ax.set_xlabel("client stall per session (ms)")
    ax.set_ylabel("fraction of sessions")
    ax.set_ylim(0, 1.03)
    ax.set_xlim(left=0)
    ax.set_title("Client stall during session recovery (CDF)")
    ax.legend(loc="upper left")
    return _png(fig)


@_styled
def takeover(takeover_ms: list[float], anchors_s: dict[str, float]) -> bytes:
    """Takeover times in a fleet (one dot per monitor kill, in order) and their CDF, with
    the target (`anchors_s["target_takeover"]`, default 2 s) as a dashed line."""
    fig = _figure(8, 3.4)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    xs = list(range(1, len(takeover_ms) + 1))
    left.plot(xs, takeover_ms, "o-", color="C0", lw=1, ms=5, label="takeover")
    left.set_xlabel("monitor SIGKILL (in order)")
    left.set_ylabel("takeover (ms)")
    ordered = sorted(takeover_ms)
    right.step([0.0] + ordered, [0.0] + [(k + 1) / len(ordered) for k in range(len(ordered))],
               where="post", color="C0", lw=1.8,
               label=f"{len(ordered)} kills, median {statistics.median(ordered):.0f} ms")
    right.set_xlabel("takeover (ms)")
    right.set_ylabel("fraction of kills")
    right.set_ylim(0, 1.03)
    target = anchors_s.get("target_takeover", 2) * 1000
    top = max(max(takeover_ms), target) * 1.12  # the target line always in view
    left.set_ylim(0, top)
    right.set_xlim(0, top)
    left.axhline(target, color="C3", ls="--", lw=1.1, label=f"target {target / 1000:g} s")
    right.axvline(target, color="C3", ls="--", lw=1.1, label=f"target {target / 1000:g} s")
    left.set_title("Takeover after a monitor's SIGKILL")
    right.set_title("CDF")
    left.legend(loc="lower right")
    right.legend(loc="upper left")
    return _png(fig)


def _lanes(lanes: list[str]):
    """A timeline's figure: one row per lane, top to bottom; `label(text)` gives each
    legend entry once."""
    y = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    fig = _figure(10, 0.55 * len(lanes) + 1.6)
    shown: set[str] = set()

    def label(text: str) -> str | None:
        if text in shown:
            return None
        shown.add(text)
        return text
    return fig, fig.subplots(), y, label


FLEET_FAULTS = {  # fault kind -> colour in the fleet timeline
    "fork-bomb": RED, "memory-hog": ORANGE, "freeze": PURPLE, "monitor-kill": RED,
    "monitor-stop": ORANGE, "monitor-cut": PURPLE, "etcd-kill": GREY,
}


@_styled
def fleet_timeline(events: list[FleetEvent]) -> bytes:
    """The fleet scenario on one clock: a lane per monitor (its own faults as spans, the
    incidents it opened as dots, its nodes taken over by the others as triangles), a lane
    of node faults and one of etcd members killed."""
    monitors = sorted({e.lane for e in events} - {"nodes", "etcd"})
    lanes = ["nodes", *monitors] + (["etcd"] if any(e.lane == "etcd" for e in events) else [])
    fig, ax, y, label = _lanes(lanes)
    for e in events:
        row = y[e.lane]
        if e.kind == "incident":
            ax.plot(e.t, row, "o", color=BLUE, ms=5, label=label("incident opened"))
        elif e.kind == "taken-over":
            ax.plot(e.t, row, "v", color=GREEN, ms=7, label=label("its nodes taken over"))
        else:
            colour = FLEET_FAULTS.get(e.kind, GREY)
            if e.end is not None and e.end > e.t:
                ax.broken_barh([(e.t, e.end - e.t)], (row - 0.3, 0.6), color=colour,
                               alpha=0.35, label=label(e.kind))
            else:
                ax.plot(e.t, row, "X", color=colour, ms=8, label=label(e.kind))
    ax.set_yticks(list(y.values()), [f"monitor {lane}" if lane in monitors else lane
                                     for lane in y])
    ax.set_ylim(-0.7, len(y) - 0.3)
    ax.set_xlabel("seconds since the first fault")
    ax.set_title("Fleet scenario: faults, incidents and takeovers")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


VM_MARKS = {  # event kind -> (marker, colour, legend)
    "tamper": ("X", RED, "tamper written (gdbstub)"),
    "detected": ("o", BLUE, "detected by the integrity scan"),
    "healed": ("s", GREEN, "healed (vCPUs stopped, clean bytes)"),
    "alarm": ("v", PURPLE, "Orion's alarm"),
}
VM_SPANS = {"hang": (ORANGE, "guest hung (vCPUs stopped) until seen"),
            "benign work": (GREY, "benign work in the guest"),
            "fault": (RED, "fault in the guest, until its plain bound")}


@_styled
def integrity_timeline(events: list[VmEvent]) -> bytes:
    """The vm scenario on one clock: a lane for the guest (the hang, the benign work), one
    per tamper kind (written, detected, healed: every round) and one per Orion fault (the
    fault until its bound, the alarm)."""
    fig, ax, y, label = _lanes(list(dict.fromkeys(e.lane for e in events)))
    for e in events:
        row = y[e.lane]
        if e.kind in VM_SPANS and e.end is not None:
            colour, text = VM_SPANS[e.kind]
            ax.broken_barh([(e.t, max(e.end - e.t, 0.05))], (row - 0.3, 0.6), color=colour,
                           alpha=0.35, label=label(text))
        else:
            marker, colour, text = VM_MARKS.get(e.kind, ("d", GREY, e.kind))
            ax.plot(e.t, row, marker, color=colour, ms=7, label=label(text))
    ax.set_yticks(list(y.values()), list(y))
    ax.set_ylim(-0.7, len(y) - 0.3)
    ax.set_xlabel("seconds since the guest was up")
    ax.set_title("The VM backdoor: hang, tampers healed, Orion's alarms")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


@_styled
def recovery_bench(rows: list[RecoveryRow]) -> bytes:
    """Per session count, on log axes: backdoors' detection, recovery and stall vs
    HAProxy's resume time (left); broken sessions of each (right)."""
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    labels = [f"{r.sessions:.0f}" for r in rows]
    series = [("backdoors detection", "backdoors_detect_ms", "#aec7e8", ":"),
              ("backdoors recovery", "backdoors_recovery_ms", "#6baed6", "-"),
              ("backdoors stall p50", "backdoors_stall_p50_ms", BLUE, "--"),
              ("backdoors stall p99", "backdoors_stall_p99_ms", "#08519c", "-"),
              ("HAProxy: new connections served", "haproxy_resume_ms", RED, "-")]
    for label, key, colour, style in series:
        pts = [(r.sessions, getattr(r, key)) for r in rows
               if getattr(r, key) is not None and getattr(r, key) > 0]
        if pts:
            left.plot(*zip(*pts), style, marker="o", color=colour, label=label)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("concurrent sessions (log scale)")
    left.set_ylabel("time (ms, log scale)")
    left.set_title("Time to heal vs sessions (node frozen)")
    left.legend(loc="upper left", fontsize=7)
    for k, (label, key, colour) in enumerate([("backdoors", "backdoors_broken", BLUE),
                                              ("HAProxy", "haproxy_broken", RED)]):
        vals = [getattr(r, key) for r in rows]
        xs = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
        bars = right.bar(xs, [v or 0 for v in vals], 0.38, color=colour, label=label)
        _label_bars(right, bars, vals, lambda v: f"{v:.0f}")
    right.set_xticks(range(len(rows)), labels)
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("broken sessions")
    right.set_title("Sessions broken by the fault")
    right.legend(loc="upper left")
    right.margins(y=0.2)
    return _png(fig)


MODES = {"event": ("pushed by the agent (event)", BLUE), "poll": ("monitor's poll", ORANGE)}


def _mode(name: str, i: int) -> tuple[str, str]:
    return MODES.get(name, (name, f"C{(i + 2) % 10}"))


@_styled
def detection(rows: list[DetectionRow]) -> bytes:
    """Detection latency by fault and mode: one panel per fault, a bar group per deadline,
    p99 as bars and p50 as a black tick; the deadline as a dashed line."""
    faults = list(dict.fromkeys(r.fault for r in rows))
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig = _figure(max(6.0, 3.0 * len(faults)), 3.4)
    axes = fig.subplots(1, len(faults), squeeze=False)[0]
    for ax, fault in zip(axes, faults):
        mine = [r for r in rows if r.fault == fault]
        deadlines = list(dict.fromkeys(r.deadline_ms for r in mine))
        width = 0.8 / max(1, len(modes))
        for k, mode in enumerate(modes):
            label, colour = _mode(mode, k)
            for i, d in enumerate(deadlines):
                r = next((r for r in mine if r.mode == mode and r.deadline_ms == d), None)
                if r is None or r.p99_ms is None:
                    continue
                x = i + (k - (len(modes) - 1) / 2) * width
                ax.bar(x, r.p99_ms, width, color=colour, label=label if i == 0 else None)
                if r.p50_ms is not None:
                    ax.plot([x - width / 2, x + width / 2], [r.p50_ms] * 2, color="black", lw=1.2)
        for i, d in enumerate(deadlines):
            if d:
                ax.plot([i - 0.45, i + 0.45], [d, d], "--", color=GREY, lw=1)
        ax.set_xticks(range(len(deadlines)),
                      [f"{d:.0f} ms" if d else "none" for d in deadlines])
        ax.set_xlabel("deadline")
        ax.set_title(fault.replace("_", " "))
        ax.margins(y=0.15)
    axes[0].set_ylabel("detection p99 (bars), p50 (ticks), ms")
    axes[0].legend(loc="upper left", fontsize=7)
    return _png(fig)


@_styled
def monitor_cost(rows: list[MonitorRow], *, monitor_target_pct: float = 10.0,
                 agent_target_pct: float = 0.2) -> bytes:
    """Cost of watching N nodes, by mode: monitor CPU (% of one core), agent CPU per node,
    detection p99; the issue's targets as dashed lines."""
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig = _figure(10, 3.2)
    axes = fig.subplots(1, 3)
    panels = [("monitor_cpu_pct", "monitor CPU (% of a core)", monitor_target_pct),
              ("agent_cpu_pct_per_node", "agent CPU per node (% of a core)", agent_target_pct),
              ("detect_p99_ms", "detection p99 (ms)", None)]
    for ax, (key, title, target) in zip(axes, panels):
        for k, mode in enumerate(modes):
            label, colour = _mode(mode, k)
            pts = sorted((r.nodes, getattr(r, key)) for r in rows
                         if r.mode == mode and getattr(r, key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour, label=label)
        if target is not None:
            ax.axhline(target, ls="--", color=GREY, lw=1, label="target")
        ax.set_xscale("log", base=2)
        sizes = sorted({r.nodes for r in rows})
        ax.set_xticks(sizes, [f"{n:.0f}" for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("nodes watched (log scale)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend(loc="upper left", fontsize=7)
    return _png(fig)


@_styled
def casestudy_faults(faults: list[CasestudyFault]) -> bytes:
    """RUBiS: requests per 100 ms across each fault, a panel each: the site's ok requests
    as bars with its failed ones stacked in red, the failed node's users' ok requests as a
    line, HAProxy's baseline when measured; the fault's injection, detection and the end
    of the move as vertical lines, the dip shaded."""
    cols = 1 if len(faults) == 1 else 2
    rows = -(-len(faults) // cols)
    fig = _figure(9 if cols == 1 else 12, 3.0 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    legend: dict[str, object] = {}
    for ax, f in zip(axes, faults):
        _fault_panel(ax, f)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    for ax in axes[len(faults):]:
        ax.set_visible(False)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=5)
    fig.suptitle("Requests per 100 ms across each fault", fontsize=10, fontweight="bold")
    return _png(fig)


def _starts(s: Per100ms) -> list[float]:
    return [(s.t0 + i * s.bucket_ms) / 1000 for i in range(len(s.ok))]


def _fault_panel(ax, f: CasestudyFault) -> None:
    s = f.per_100ms
    xs, width = _starts(s), s.bucket_ms / 1000
    failed = (s.failed + [0.0] * len(xs))[:len(xs)]
    ax.bar(xs, s.ok, width, align="edge", color="#9ecae1", label="ok (whole site)")
    ax.bar(xs, failed, width, bottom=s.ok, align="edge", color=RED, label="failed")
    if s.node_ok:
        node = (s.node_ok + [0.0] * len(xs))[:len(xs)]
        ax.step(xs + [xs[-1] + width], node + node[-1:], where="post", color="#08519c",
                lw=1.4, label="ok (the failed node's users)")
    h = f.haproxy_per_100ms
    if h is not None and h.ok:
        hx = _starts(h)
        ax.step(hx + [hx[-1] + h.bucket_ms / 1000], h.ok + h.ok[-1:], where="post",
                color=ORANGE, lw=1.4, label="ok, baseline (plain, HAProxy)")
        bad = [(x + h.bucket_ms / 2000, n) for x, n in zip(hx, h.failed) if n]
        if bad:
            ax.plot(*zip(*bad), "x", color=RED, ms=6, mew=1.5, label="failed, baseline")
    ax.axvline(0, color="black", ls="--", lw=1.2, label="fault injected")
    facts = []
    if f.detect_ms is not None:
        ax.axvline(f.detect_ms / 1000, color=PURPLE, ls=":", lw=1.4, label="detected")
        facts.append(f"detected {f.detect_ms:.0f} ms")
        if f.recovery_ms is not None:
            end = f.detect_ms + f.recovery_ms
            ax.axvline(end / 1000, color=GREEN, ls=":", lw=1.4, label="sessions moved")
            facts.append(f"moved {end:.0f} ms")
    if f.dip_ms is not None:
        facts.append(f"dip {'≥ ' if s.dip_recovered is False else ''}{f.dip_ms:.0f} ms")
    if f.dip_ms and s.dip_from_ms is not None:
        ax.axvspan(s.dip_from_ms / 1000, (s.dip_from_ms + f.dip_ms) / 1000, color=RED,
                   alpha=0.1, label="dip")
    if s.baseline is not None and s.fraction is not None:
        ax.axhline(s.baseline * s.fraction, color=GREY, ls=":", lw=1,
                   label=f"{s.fraction:.0%} of the mean before"
                   f"{' (the node’s users)' if s.node_ok else ''}")
    failed_n = "-" if f.failed_requests is None else f"{f.failed_requests:.0f}"
    requests = "-" if f.requests is None else f"{f.requests:.0f}"
    ax.set_title(f"{f.tier.upper()} {f.fault}: {requests} requests, {failed_n} failed"
                 + (f"\n{', '.join(facts)}" if facts else ""))
    ax.set_xlabel("time from the fault (s)")
    ax.set_ylabel(f"requests per {s.bucket_ms:.0f} ms")
    ax.set_xlim(xs[0], xs[-1] + width)
    ax.set_ylim(0, 1.1 * max([o + b for o, b in zip(s.ok, failed)]
                             + (h.ok if h is not None else []) + [1.0]))


# ---- 4. low overhead under load -----------------------------------------------------------------


@_styled
def overhead(o: Overhead) -> bytes:
    """Requests/s and latency of the HTTP example with and without Continuation Boxes."""
    fig = _figure(8.5, 3.3)
    thr, lat = fig.subplots(1, 2)
    names = ["without CBs (plain)", "with Continuation Boxes"]
    bars = thr.bar(names, [o.plain_rps or 0, o.cb_rps or 0], color=[GREY, BLUE], width=0.55)
    _label_bars(thr, bars, [o.plain_rps, o.cb_rps], lambda v: f"{v:.0f}")
    thr.set_ylabel("throughput (requests/s)")
    pct = f" (overhead of CBs: {o.overhead_pct:.1f}%)" if o.overhead_pct is not None else ""
    thr.set_title(f"Throughput{pct}")
    thr.margins(y=0.15)
    for k, (label, colour, vals) in enumerate([
            ("without CBs", GREY, [o.plain_p50_ms, o.plain_p99_ms]),
            ("with CBs", BLUE, [o.cb_p50_ms, o.cb_p99_ms])]):
        xs = [i + (k - 0.5) * 0.38 for i in range(2)]
        bars = lat.bar(xs, [v or 0 for v in vals], 0.38, color=colour, label=label)
        _label_bars(lat, bars, vals, lambda v: f"{v:.2f}")
    lat.set_xticks(range(2), ["p50", "p99"])
    lat.set_ylabel("request latency (ms)")
    lat.set_title("Latency per request (keep-alive)")
    lat.legend(loc="upper left")
    lat.margins(y=0.15)
    return _png(fig)


@_styled
def casestudy_load(rows: list[CasestudyLoad]) -> bytes:
    """RUBiS: throughput (left) and p50/p99 latency (right; and the p99 of the
    measurement interval, after the ramp-up) vs locust users, plain vs recoverable, each recoverable point
    labelled with its throughput loss; the levels at saturation shaded."""
    fig = _figure(10, 3.6)
    thr, lat = fig.subplots(1, 2)
    kinds = [("plain", "plain", GREY), ("recoverable", "recoverable", BLUE)]
    for kind, label, colour in kinds:
        pts = [(r.users, getattr(r, f"{kind}_rps")) for r in rows
               if getattr(r, f"{kind}_rps") is not None]
        if pts:
            thr.plot(*zip(*pts), "o-", color=colour, label=label)
        for q, style, name in (("p50", "--", "p50"), ("p99", "-", "p99"),
                               ("interval_p99", ":", "p99, measurement interval")):
            pts = [(r.users, getattr(r, f"{kind}_{q}_ms")) for r in rows
                   if getattr(r, f"{kind}_{q}_ms") is not None]
            if pts:
                lat.plot(*zip(*pts), style, marker="o", color=colour, label=f"{label} {name}")
    for r in rows:
        if r.overhead_pct is not None and r.recoverable_rps is not None:
            thr.annotate(f"{r.overhead_pct:+.1f} %", (r.users, r.recoverable_rps),
                         xytext=(4, -12), textcoords="offset points", fontsize=7, color=BLUE)
    _log_if_wide(lat, [getattr(r, f"{k}_{q}_ms") for r in rows for k, _, _ in kinds
                       for q in ("p50", "p99")])
    users = sorted({r.users for r in rows})
    first = next((r.users for r in sorted(rows, key=lambda r: r.users) if r.saturated), None)
    for ax in (thr, lat):
        if first is not None:
            ax.axvspan(first / 2 ** 0.5, users[-1] * 2 ** 0.5, color=GREY, alpha=0.12,
                       label="saturated")
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [f"{u:.0f}" for u in users])
        ax.minorticks_off()
        ax.set_xlim(users[0] / 2 ** 0.5, users[-1] * 2 ** 0.5)
        ax.set_xlabel("locust users (log scale)")
        ax.legend(loc="upper left", fontsize=7)
    thr.set_ylim(bottom=0)
    thr.set_ylabel("throughput (requests/s)")
    thr.set_title("Throughput (labels: recoverable's loss vs plain)")
    lat.set_ylabel("latency (ms)")
    lat.set_title("Latency: p50 (dashed), p99, p99 of later requests (dotted)")
    return _png(fig)


SENSOR_COSTS = [
    ("progress_tick_ns", "Sensor Box: progress tick", BLUE),
    ("stamped_progress_tick_ns", "Sensor Box: stamped progress tick", BLUE),
    ("level_set_ns", "Sensor Box: level set", BLUE),
    ("pressure_event_ns", "Sensor Box: pressure event", BLUE),
    ("prometheus_counter_inc_ns", "prometheus_client Counter.inc", ORANGE),
    ("prometheus_gauge_set_ns", "prometheus_client Gauge.set", ORANGE),
    ("notify_datagram_ns", "notify datagram (sd_notify style)", RED),
]


@_styled
def sensor_cost(s: BenchSensors) -> bytes:
    """ns per update: Sensor Box operations vs in-process metrics and a notify syscall."""
    rows = [(label, getattr(s, key), colour) for key, label, colour in SENSOR_COSTS
            if getattr(s, key) is not None]
    fig = _figure(8, 0.42 * len(rows) + 1.2)
    ax = fig.subplots()
    bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], color=[r[2] for r in rows])
    for bar, (_, v, _) in zip(bars, rows):
        ax.annotate(f"{v:.0f} ns", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("cost per update (ns, log scale)")
    ax.set_title("Cost of one sensor update")
    ax.margins(x=0.15)
    ax.grid(axis="y", visible=False)
    return _png(fig)

"""`backdoors demo`: a lab with sample services, their sensors shown live, a fault injected.

This first version shows the foundation: Sensor Boxes read from outside the nodes while a
progress stall is injected into one service and detected from its sensor alone.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .errors import require_root
from .lab import Lab, inject

console = Console()


def _table(lab: Lab, snaps: dict, phase: str) -> Table:
    t = Table(title=f"lab {lab.name} - {phase}", expand=False)
    for col in ("node", "host", "progress", "stalled ms", "rss MB", "errors/s", "node MB", "pids"):
        t.add_column(col, justify="right")
    for n in lab.plan.nodes:
        s = snaps.get(n.name)
        st = lab.node(n.name).stats()
        if s is None:
            t.add_row(n.name, n.host, "-", "-", "-", "-", f"{st.memory_bytes / 2**20:.0f}", str(st.pids))
            continue
        p, r, e = s.get("progress"), s.get("rss_mb"), s.get("errors")
        style = "bold red" if p.violated else ""
        t.add_row(n.name, n.host, str(int(p.value)), f"[{style}]{p.stalled_for * 1000:.0f}[/]" if style
                  else f"{p.stalled_for * 1000:.0f}", f"{r.value:.1f}", f"{e.rate:.0f}",
                  f"{st.memory_bytes / 2**20:.0f}", str(st.pids))
    return t


def run_demo(name: str = "demo", seconds: float = 12.0, poll: float = 0.05) -> dict:
    """Run the demo; returns the verdict it prints."""
    require_root("the demo (it builds a lab of namespaces and cgroups)")
    verdict = {"stall_injected_at_ms": None, "stall_detected_after_ms": None}
    with Lab(name, hosts=2, nodes=4) as lab:
        readers = {n.name: lab.sensor_reader(n.name) for n in lab.plan.nodes}
        victim = lab.plan.nodes[1].name
        t0 = time.monotonic()
        fault = None
        with Live(console=console, refresh_per_second=10) as live:
            while (now := time.monotonic()) - t0 < seconds:
                elapsed = now - t0
                if fault is None and elapsed > seconds * 0.25:
                    fault = inject(lab, "stall", victim)
                    verdict["stall_injected_at_ms"] = round(elapsed * 1000)
                elif fault is not None and elapsed > seconds * 0.7 and fault.options.get("stopped") is None:
                    fault.stop()
                    fault.options["stopped"] = True
                snaps = {k: r.snapshot() for k, r in readers.items()}
                if fault and verdict["stall_detected_after_ms"] is None and snaps[victim].get("progress").violated:
                    verdict["stall_detected_after_ms"] = round((time.monotonic() - fault.started_at) * 1000)
                phase = ("watching" if fault is None else
                         f"progress stall injected into {victim}" if not fault.options.get("stopped")
                         else f"stall in {victim} stopped")
                live.update(_table(lab, snaps, phase))
                time.sleep(poll)
        for r in readers.values():
            r.close()
    ok = verdict["stall_detected_after_ms"] is not None
    console.print(f"[{'green' if ok else 'red'}]verdict:[/] progress stall in {victim} "
                  + (f"detected from its Sensor Box {verdict['stall_detected_after_ms']} ms after injection"
                     if ok else "was NOT detected"))
    console.print(f"lab {name} torn down; nothing left behind")
    return verdict

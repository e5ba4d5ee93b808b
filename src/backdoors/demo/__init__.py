"""`backdoors demo`: everything the Backdoors design promises, on the embedded lab.

A lab of 2 hosts and 4 nodes with their agents and a monitor; recoverable stream and
HTTP servers with live client sessions; then, in turn: a memory hog (repaired), a fork
bomb (locked and repaired), a service deadlock (detected, diagnosed, refreshed), a node
freeze, a server crash and a network driver failure (each moving the live sessions on,
byte-exact), and an agent restart (its agent SIGKILLed while the sessions stream, restarted
by its keeper holding them, then its node frozen and the sessions moved on). A verdict per scenario, a results file and an HTML report at the end.

`--scenario auction` plays the case study's auction site instead (demo/auction.py): a
front end freezing under locust's load, its sessions moved, no request nor bid lost.
`--scenario vm` plays the VM backdoor (demo/guest.py): a rootkit in a guest kernel
healed; a memory hog, a fork bomb and CPU runaways in the guest foreseen and killed from
outside.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from rich.console import Console

from ..errors import BackdoorsError, require_root
from . import steps
from .view import View
from .world import World

AUCTION, VM = "auction", "vm"


def run_demo(*, name: str = "demo", quick: bool = False, scenario: str | None = None,
             out_root: str = "out/demo", report: bool = True,
             console: Console | None = None) -> dict:
    """Play the scenarios; returns {"passed", "results", "report", ...}."""
    require_root("the demo", "it builds a lab of network namespaces and cgroups")
    console = console or Console()
    plays, world_of = dict(steps.SCENARIOS), None
    if scenario == AUCTION:  # (the extras: imported only when played)
        from .auction import Auction, auction
        plays, world_of = {AUCTION: auction}, Auction
    elif scenario == VM:
        from .guest import PLAYS, GuestWorld
        plays, world_of = PLAYS, GuestWorld
    elif scenario is not None and scenario not in plays:
        raise BackdoorsError(f"unknown scenario {scenario!r}; choose one of "
                             f"{', '.join((*steps.ORDER, AUCTION, VM))}")
    order = (list(plays) if world_of else [scenario] if scenario else
             list(steps.QUICK if quick else steps.ORDER))
    out_dir = Path(out_root).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records: list[dict] = []
    world = (world_of(name, out_dir, say=console.print) if world_of else
             World(name, out_dir, stream_sessions=24, downloads=4, say=console.print))
    view = None
    quiet = logging.getLogger("backdoors.monitor")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the view shows the incident timeline itself
    try:
        world.up()
        view = View(world, console)
        world.watch(view.on_incident)
        world.note = view.say
        view.start()
        for i, key in enumerate(order):
            nxt = order[i + 1] if i + 1 < len(order) else "report"
            view.set_phase(f"[{i + 1}/{len(order)}] {key}", nxt)
            record = plays[key](world)
            records.append(record)
            view.verdict(record)
        view.set_phase("done", "report")
    finally:
        quiet.setLevel(level)
        if view is not None:
            view.stop()
        console.print("tearing the lab down")
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not
        try:                                                     # cut the teardown short
            world.close()
        finally:
            signal.signal(signal.SIGINT, previous)
    results = {"started": started, "lab": name, "duration_s": round(time.time() - started, 1),
               "incidents": str(out_dir / "incidents" / "incidents.jsonl"), "scenarios": records}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    passed = bool(records) and all(r["passed"] for r in records)
    report_path = None
    if report:
        report_path = _report(out_dir, console)
    console.print()
    for r in records:
        mark = "[green]PASS[/]" if r["passed"] else "[red]FAIL[/]"
        console.print(f"{mark} {r['title']}: {r['verdict']}", highlight=False)
        for c in r["checks"]:
            if not c["ok"]:
                console.print(f"      [red]✗[/] {c['what']}: {c['detail']}", highlight=False)
    console.print(f"\nresults: {out_dir / 'results.json'}")
    if report_path:
        console.print(f"report:  {report_path}")
    console.print(f"lab {name} torn down; nothing left behind")
    return {"passed": passed, "results": str(out_dir / "results.json"),
            "report": str(report_path) if report_path else None, "scenarios": records}


def _report(out_dir: Path, console: Console) -> Path | None:
    try:
        from ..report import build_report
    except ImportError as e:  # the "report" extra is not installed: say which to install
        console.print(f"(no report: {e})", markup=False)
        return None
    bench = Path("out/bench")
    return build_report(demo_dir=str(out_dir), bench_dir=str(bench) if bench.is_dir() else None,
                        incidents=None, out=str(out_dir / "report.html"))

"""The backdoors report: one self-contained HTML page with PNG plots (matplotlib).

    from backdoors.report import build_report
    path = build_report(demo_dir=None, bench_dir=None, incidents=None, out="out/report.html")

It reads the demo's results (`out/demo/<run>/results.json`), the monitor's incident log
and the benchmarks' JSON (`out/bench/<module>.json`); it never measures anything itself.
A missing input is a note in its section saying which command produces it; a malformed
one is a ReportError naming the file (and line).

Modules: `data` (inputs, their shapes and loading), `plots` (one PNG per figure), `html`
(page building blocks), `build` (the sections and `build_report`).
"""

from .build import SECTIONS, build_report, render
from .data import Inputs, ReportError, load_inputs

__all__ = ["SECTIONS", "Inputs", "ReportError", "build_report", "load_inputs", "render"]

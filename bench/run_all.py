"""Run every benchmark in this folder and write its JSON to out/bench/<name>.json.

    python bench/run_all.py [NAME ...]      # e.g. bench_sensors bench_tcprepair

Each bench_*.py module exposes run(**params) -> dict; this runner uses the defaults.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out" / "bench"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = set(argv)
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        if wanted and path.stem not in wanted:
            continue
        mod = load(path)
        if not hasattr(mod, "run"):
            continue
        print(f"== {path.stem}", flush=True)
        t0 = time.monotonic()
        try:
            result = mod.run()
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
            failed.append(path.stem)
            continue
        (OUT / f"{path.stem}.json").write_text(json.dumps(result, indent=2))
        print(f"   {time.monotonic() - t0:.1f} s -> {OUT / (path.stem + '.json')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

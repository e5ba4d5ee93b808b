"""python -m backdoors.monitor --config FILE: run a monitor until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..errors import BackdoorsError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backdoors.monitor",
                                 description="Poll agents, detect, diagnose and repair nodes.")
    ap.add_argument("--config", required=True, help="monitor config TOML (docs/monitor.md)")
    ap.add_argument("--check", action="store_true",
                    help="only load and check the config and its rulesets, then exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every poll problem")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .config import load_config
    from .core import run_monitor
    from .rules import load_rulesets

    try:
        config = load_config(a.config)
        rules = load_rulesets(config.rulesets)
        if a.check:
            print(f"{a.config}: ok ({len(config.agents)} agents, {len(rules)} rules: "
                  f"{', '.join(r.name for r in rules)})")
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        run_monitor(config, stop)
    except BackdoorsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

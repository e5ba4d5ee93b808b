"""The lightest watched process: a Sensor Box of --sensors sensors kept ticking, nothing else.

    python -m backdoors.lab.ticker --name tick-n0 --sensors 16 --tick 0.02 --deadline 0.2

A quarter of the sensors are progress counters (each must move within --deadline s;
stamped, so the agent reads them once per deadline), the rest levels and pressures; every --tick s the loop ticks every progress counter and sets
every level. It serves nothing (the registration client's thread that notices a
restarted agent aside): what watching a node costs is then the watcher's cost. SIGSTOP is a hang (every progress counter stalls).
The box is registered with the node's agent (BACKDOORS_AGENT_SOCKET); once it is, a
JSON line {"pid", "box_fd"} is written on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from backdoors.common.runtime import AGENT_SOCKET_ENV, register_box
from backdoors.sensors import SensorBox


def build(box: SensorBox, sensors: int, deadline: float) -> tuple[list, list]:
    """Add `sensors` sensors to `box`: (progress counters, levels); pressures are only
    added (they count nothing while all is well)."""
    n_progress = max(1, sensors // 4)
    n_pressure = (sensors - n_progress) // 3
    n_level = sensors - n_progress - n_pressure
    progress = [box.progress(f"progress{i}", deadline=deadline, stamped=True)
                for i in range(n_progress)]
    levels = [box.level(f"level{i}", min=0.0, max=1e9) for i in range(n_level)]
    for i in range(n_pressure):
        box.pressure(f"pressure{i}", max_events=1000, window=1.0)
    return progress, levels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backdoors.lab.ticker", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="ticker")
    ap.add_argument("--sensors", type=int, default=16)
    ap.add_argument("--tick", type=float, default=0.02, help="seconds between ticks")
    ap.add_argument("--deadline", type=float, default=0.2, help="progress deadline (s)")
    a = ap.parse_args(argv)
    if a.sensors < 1:
        ap.error(f"--sensors must be at least 1, got {a.sensors}")

    box = SensorBox.create(a.name, capacity=a.sensors)
    progress, levels = build(box, a.sensors, a.deadline)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"pid": os.getpid(), "box_fd": box.fd}), flush=True)
    n = 0
    while True:
        n += 1
        for p in progress:
            p.tick()
        for level in levels:
            level.set(n % 1000)
        time.sleep(a.tick)


if __name__ == "__main__":
    sys.exit(main())

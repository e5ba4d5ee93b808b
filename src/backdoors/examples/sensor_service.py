"""A Python service with a Sensor Box, registered with the agent of the node it runs in.

    backdoors node run web0 --user web --init -- python3 -m backdoors.examples.sensor_service web-box

The Python twin of examples/c/sensor_service.c. The node's launcher sets
BACKDOORS_AGENT_SOCKET. The service registers its box (named argv[1], default
"py-service"), prints "registered NAME", then ticks "requests" (a progress sensor: a stop
of more than 1 s is a hang) every 10 ms and sets "queue_depth". On SIGTERM or SIGINT it
unregisters the box and exits 0. Refused (run outside a node, say): the agent's reason on
stderr, exit status 1. docs/examples/operator-walkthrough.sh runs it.
"""

from __future__ import annotations

import signal
import sys
import threading

from backdoors.common.runtime import register_box, unregister
from backdoors.errors import BackdoorsError
from backdoors.sensors import SensorBox


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "py-service"
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with SensorBox.create(name, capacity=8) as box:
        requests = box.progress("requests", deadline=1.0)
        queue = box.level("queue_depth", max=100.0)
        try:
            register_box(box)
        except BackdoorsError as e:
            print(f"register: {e}", file=sys.stderr)
            return 1
        print(f"registered {name}", flush=True)
        i = 0
        while not stopping.wait(0.01):
            requests.tick()  # one memory store each: no system call
            queue.set(i % 10)
            i += 1
        try:
            unregister(name)
        except BackdoorsError as e:
            print(f"unregister: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recoverable example servers, each with its client, to read and to run.

    python -m backdoors.examples.file_server --port 8080 --root /srv/files
    python -m backdoors.examples.http_server --port 8080 --root /srv/www
    python -m backdoors.examples.line_server --port 7000
    python -m backdoors.examples.sensor_service web-box

Each server is a plain threaded server made recoverable with a few lines marked `# CB`
(see docs/continuations.md). They are installed with the package because the demo and
the benchmarks run them (the HTTP server, as a module, from any working directory).
They use only the public `backdoors.continuations` API; nothing in backdoors imports them.
`sensor_service` (and its C twin, examples/c/sensor_service.c) is a service with a Sensor
Box registered with its node's agent: the operator walkthrough runs both
(docs/operations.md §15).
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import threading
from collections.abc import Callable


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every example server takes: --host, --port and --adopt."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--adopt", help="Unix socket path where recovered sessions arrive")
    return parser


def serve_forever(listener, name: str, serve_session: Callable, *args) -> None:
    """Serve every session `listener` accepts on a thread of its own, until SIGTERM.

    Prints "<name> listening on ADDR:PORT" once ready (the lab waits for that line).
    """
    log = logging.getLogger(name)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 3 descriptors per session:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # socket, box, its mapping

    def session(conn) -> None:
        try:
            serve_session(conn, *args)
        except OSError as err:  # the client went away
            log.info("session ended: %s", err)

    with listener:
        signal.signal(signal.SIGTERM, lambda *_: listener.close())
        print("%s listening on %s:%d" % (name, *listener.address), flush=True)
        while conn := listener.accept():
            threading.Thread(target=session, args=(conn,), daemon=True).start()

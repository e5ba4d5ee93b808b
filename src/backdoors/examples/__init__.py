"""Recoverable example servers, each with its client, to read and to run.

    python -m backdoors.examples.file_server --port 8080 --root /srv/files
    python -m backdoors.examples.http_server --port 8080 --root /srv/www
    python -m backdoors.examples.line_server --port 7000
    python -m backdoors.examples.sensor_service web-box

Each server is a plain asyncio server made recoverable with a few lines marked `# CB`
(see docs/continuations.md): one task per session, none of them a thread, so a recovery
that brings back a thousand sessions at once costs no thread start. They are installed with the package because the demo and
the benchmarks run them (the HTTP server, as a module, from any working directory).
They use only the public `backdoors.continuations` API; nothing in backdoors imports them.
`sensor_service` (and its C twin, examples/c/sensor_service.c) is a service with a Sensor
Box registered with its node's agent: the operator walkthrough runs both
(docs/operations.md §15).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from backdoors.common import fdtable
from backdoors.continuations import SESSION_FDS, AsyncListener, run


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every example server takes: --host, --port, --adopt and
    --limit-concurrency."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--adopt", help="Unix socket path where recovered sessions arrive")
    parser.add_argument("--limit-concurrency", type=_sessions, metavar="N",
                        help="serve at most N sessions at once; past them new clients wait "
                             "to be accepted, recovered sessions are still taken (default: "
                             f"half the descriptor limit at {SESSION_FDS} a session)")
    return parser


def _sessions(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of sessions (1 or more)")
    return int(text)


def serve_forever(listener: AsyncListener, name: str,
                  serve_session: Callable[..., Awaitable[None]], *args,
                  limit: int | None = None) -> None:
    """Serve every session `listener` accepts as a task of its own
    (`serve_session(conn, *args)`), at most `limit` at once (None: the default of
    --limit-concurrency), until SIGTERM; on uvloop when it is installed.

    Prints "<name> listening on ADDR:PORT" once ready (the lab waits for that line).
    """
    default = fdtable.session_limit(SESSION_FDS)  # raises the descriptor limit: needed anyway
    limit = limit or default

    async def main() -> None:
        async with listener:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, listener.close)
            print("%s listening on %s:%d" % (name, *listener.address), flush=True)
            await listener.serve(serve_session, *args, limit=limit)  # a client gone away is logged

    run(main())

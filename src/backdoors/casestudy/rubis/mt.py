"""The middle-tier server: RUBiS's application logic (middle.serve_session) per front-end
channel, recoverable, with a PostgreSQL connection pool.

    RUBIS_DSN='host=... password=...' python -m backdoors.casestudy.rubis.mt --port 7300
        [--name mt-n1] [--pool 8] [--plain]

Every front-end channel is a Continuation Box session (AsyncListener + create_cb_async, as
backdoors.lab.recoverable): new channels and recovered ones come through one listener, and
a session exports its state with the reply in it before writing it (middle.py), so a
channel moved here from a failed node resumes where its last export left it, the calls
read after it replayed (a replayed write finds its idempotency key). `--plain` serves the
same logic without boxes (asyncio.start_server): the baseline a user would run today.

The DSN comes from the environment (RUBIS_DSN: it holds the database's password, which a
command line would show to every process of the node), and so does the front ends' secret
(RUBIS_SECRET): a channel logs in again without a password (`resume`) only with its proof. The pool's connections carry
`application_name` = --name, so a fence can end a failed node's transactions by name
(Postgres.terminate). A Sensor Box (--name) holds a progress sensor ticked by the event
loop every 10 ms and a level of open sessions; it is registered with the node's agent when
there is one. Prints one JSON line when ready: {"pid", "port", "box_fd", "plain"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys

from ...common import fdtable
from ...common.runtime import AGENT_SOCKET_ENV, register_box
from ...continuations import (
    SESSION_FDS, AsyncListener, ContinuationError, Recovered, create_cb_async, run,
)
from ...sensors import SensorBox
from . import middle

log = logging.getLogger("backdoors.casestudy")

DSN_ENV = "RUBIS_DSN"
SECRET_ENV = "RUBIS_SECRET"  # the front ends' secret (front.SECRET_ENV)
PORT = 7300
#: a session's exported state holds the reply being sent: a page of 25 items is ~3 KiB
STATE_CAPACITY = 256 * 1024


class MiddleTier:
    """The sessions of one middle-tier process, and the pool they share."""

    def __init__(self, pool, sessions_level=None):
        self.pool = pool
        self.sessions = 0
        self.level = sessions_level

    def _count(self, delta: int) -> None:
        self.sessions += delta
        if self.level is not None:
            self.level.set(self.sessions)

    async def serve(self, conn) -> None:
        """One recoverable channel: its box, then middle.serve_session until it ends."""
        if isinstance(conn, socket.socket):  # no Nagle delay on replies (a recovered
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # socket keeps it)
        try:
            cb = await create_cb_async(conn, state_capacity=STATE_CAPACITY)
        except (ContinuationError, OSError, ValueError) as err:
            if not isinstance(conn, Recovered):  # (a recovered one is closed and released)
                conn.close()
            log.warning("middle tier: a channel could not get its box: %s", err)
            return
        self._count(1)
        try:
            async with cb:
                await middle.serve_session(cb.reader, cb.writer, self.pool, box=cb)
        except OSError:
            pass  # the front end went away
        finally:
            self._count(-1)

    async def serve_plain(self, reader, writer) -> None:
        self._count(1)
        try:
            await middle.serve_session(reader, writer, self.pool)
        except OSError:
            pass
        finally:
            self._count(-1)
            writer.close()


async def _tick(progress) -> None:
    """The event loop's heartbeat: a loop stuck (or frozen) stops it."""
    while True:
        progress.tick()
        await asyncio.sleep(0.01)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backdoors.casestudy.rubis.mt",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--name", default="rubis-mt", help="Sensor Box and application_name")
    ap.add_argument("--pool", type=int, default=8, help="database connections at most")
    ap.add_argument("--deadline", type=float, default=0.2, help="progress deadline (s)")
    ap.add_argument("--plain", action="store_true", help="no Continuation Boxes (baseline)")
    ap.add_argument("--lock-timeout", type=float, default=0.0,
                    help="give up on a database lock after this many seconds (0: never)")
    a = ap.parse_args(argv)
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        ap.error(f"${DSN_ENV} must hold the database's connection string")
    # the front ends' secret: a channel's `resume` must prove it (without: resume is off)
    middle.SECRET = os.environ.get(SECRET_ENV, "").encode()
    if not 1 <= a.pool <= 100:
        ap.error("--pool must be 1..100")
    if not 0 <= a.lock_timeout < 3600:
        ap.error("--lock-timeout must be 0 or more seconds, under an hour")
    session = {"autocommit": True, "application_name": a.name,
               **({"options": f"-c lock_timeout={round(a.lock_timeout * 1000)}"}
                  if a.lock_timeout else {})}
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    limit = fdtable.session_limit(SESSION_FDS)  # it raises the descriptor limit

    box = SensorBox.create(a.name)
    progress = box.progress("progress", deadline=a.deadline, stamped=True)
    level = box.level("sessions", max=100_000)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)

    async def serve() -> None:
        from psycopg_pool import AsyncConnectionPool

        loop = asyncio.get_running_loop()
        ticker = asyncio.create_task(_tick(progress))
        async with AsyncConnectionPool(dsn, min_size=min(2, a.pool), max_size=a.pool,
                                       kwargs=session,
                                       open=False) as pool:
            await pool.wait(timeout=30)
            tier = MiddleTier(pool, level)
            if a.plain:
                server = await asyncio.start_server(tier.serve_plain, "0.0.0.0", a.port,
                                                    backlog=1024, reuse_address=True)
                for s in server.sockets:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stop = asyncio.Event()
                loop.add_signal_handler(signal.SIGTERM, stop.set)
                _ready(a, box)
                async with server:
                    await stop.wait()
            else:
                async with AsyncListener.tcp("0.0.0.0", a.port, backlog=1024) as listener:
                    loop.add_signal_handler(signal.SIGTERM, listener.close)
                    _ready(a, box)
                    await listener.serve(tier.serve, limit=limit)
        ticker.cancel()

    run(serve())
    return 0


def _ready(a, box) -> None:
    print(json.dumps({"pid": os.getpid(), "port": a.port, "box_fd": box.fd, "plain": a.plain}),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())

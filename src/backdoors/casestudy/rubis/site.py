"""The RUBiS site's servers in lab nodes: middle tiers and front ends, recoverable or plain.

    mt = start_mt(lab, "n2", db)                       # python -m ...rubis.mt, in node n2
    fe = start_fe(lab, "n0", [mt.address], secret)      # python -m backdoors.asgi ...front:app
    fe_plain = start_fe(lab, "n0", [...], secret, plain=True)   # the same app under uvicorn

A server listens on its node's service address (VIP): the address a recovery moves with
the node's sessions. Recoverable and plain servers of one site use different ports, so
both run side by side on the same nodes. A server is ready once its port accepts a
connection from the client namespace; one that exits or stays silent is a LabError with
the tail of its node's log.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

from ...common.logs import log_tail
from ...errors import LabError
from . import mt

MT_PORT, MT_PLAIN_PORT = mt.PORT, mt.PORT + 1
FE_PORT, FE_PLAIN_PORT = 8080, 8081
#: progress deadlines of the servers' Sensor Boxes (their event loops tick every 10 ms):
#: generous, for a 2-core machine running the whole site and its load at once
FE_DEADLINE_S, MT_DEADLINE_S = 0.5, 1.0
#: spare channels a recoverable front end keeps to each middle tier (asgi --spare-channels):
#: the users' first requests wait for no connect (docs/casestudy.md)
FE_SPARES = 16


@dataclass
class Server:
    """One server process of the site, in `node`, listening on `vip`:`port`."""

    tier: str  # "mt" or "fe"
    node: str
    vip: str
    port: int
    plain: bool
    name: str
    proc: object  # NodeProcess

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{self.vip}:{self.port}"

    def stop(self) -> None:
        """SIGKILL and reap (the lab's teardown ends the node's processes anyway)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - a frozen node's process: the lab reaps it
            pass


def mt_name(node: str, plain: bool = False) -> str:
    """The middle tier's Sensor Box and database application_name in `node`."""
    return f"rubis-mt{'p' if plain else ''}-{node}"


def start_mt(lab, node: str, db, *, secret: str = "", plain: bool = False, pool: int = 8,
             lock_timeout: float | None = None, timeout: float = 30.0) -> Server:
    """The middle tier in `node`, connected to Postgres `db` (over TCP, its password); its
    database sessions give up on a lock after `lock_timeout` s (None: never); `secret`:
    the front ends' (a channel's resume proves it; none: resume is off)."""
    port = MT_PLAIN_PORT if plain else MT_PORT
    name = mt_name(node, plain)
    argv = [sys.executable, "-m", "backdoors.casestudy.rubis.mt", "--port", str(port),
            "--name", name, "--pool", str(pool), "--deadline", str(MT_DEADLINE_S)] + \
        (["--plain"] if plain else []) + \
        (["--lock-timeout", f"{lock_timeout:g}"] if lock_timeout else [])
    proc = lab.run_in_node(node, argv, env={mt.DSN_ENV: db.dsn(), mt.SECRET_ENV: secret})
    return _ready(lab, Server("mt", node, lab.plan.node(node).vip, port, plain, name, proc),
                  timeout)


def start_fe(lab, node: str, mts: list[str], secret: str, *, plain: bool = False,
             call_timeout: float | None = None, spares: int = FE_SPARES,
             timeout: float = 30.0) -> Server:
    """The front end in `node`: the recoverable ASGI server, or (`plain`) uvicorn, serving
    front:app, whose channels go to the middle tiers `mts` ("ADDR:PORT"); a call with no
    answer in `call_timeout` s goes to the next one (None: front.CALL_TIMEOUT_S); the
    recoverable one keeps `spares` spare channels to each middle tier its sessions call."""
    from . import front

    port = FE_PLAIN_PORT if plain else FE_PORT
    if plain:
        argv = [sys.executable, "-m", "uvicorn", "backdoors.casestudy.rubis.front:app",
                "--host", "0.0.0.0", "--port", str(port), "--http", "h11", "--no-access-log",
                "--log-level", "warning"]
    else:
        argv = [sys.executable, "-m", "backdoors.asgi", "backdoors.casestudy.rubis.front:app",
                "--port", str(port), "--state-capacity", str(front.STATE_CAPACITY),
                "--sensor-box", f"rubis-fe-{node}", "--deadline", str(FE_DEADLINE_S),
                "--spare-channels", str(spares)]
    env = {front.MT_ENV: ",".join(mts), front.SECRET_ENV: secret,
           **({front.TIMEOUT_ENV: f"{call_timeout:g}"} if call_timeout else {})}
    proc = lab.run_in_node(node, argv, env=env)
    return _ready(lab, Server("fe", node, lab.plan.node(node).vip, port, plain,
                              f"rubis-fe{'p' if plain else ''}-{node}", proc), timeout)


def _ready(lab, server: Server, timeout: float) -> Server:
    end = time.monotonic() + timeout
    log = lab.plan.run_dir / server.node / "stderr.log"
    while True:
        if server.proc.poll() is not None:
            raise LabError(f"the {server.name} server exited ({server.proc.returncode}) while "
                           f"starting in node {server.node}: {log_tail(log)}")
        try:
            with lab.client_socket() as s:
                s.settimeout(1.0)
                s.connect((server.vip, server.port))
            return server
        except OSError:
            pass
        if time.monotonic() > end:
            server.stop()
            raise LabError(f"the {server.name} server did not listen on {server.address} "
                           f"within {timeout:g} s: {log_tail(log)}")
        time.sleep(0.1)


def connect(lab, server: Server, timeout: float = 10.0) -> socket.socket:
    """A connected socket from the client namespace to `server`."""
    s = lab.client_socket()
    s.settimeout(timeout)
    s.connect((server.vip, server.port))
    return s


class Site:
    """The whole site in a lab of two hosts, recoverable and plain side by side:

        n0 FE a (h0)   n1 FE b (h1)   n2 MT a (h0)   n3 MT b (h1)   n4 PostgreSQL (h0)

    Each FE node runs the recoverable front end (FE_PORT) and the plain one (uvicorn,
    FE_PLAIN_PORT); each MT node the recoverable middle tier (MT_PORT) and the plain one
    (MT_PLAIN_PORT). A front end's channels go to both middle tiers of its kind. With
    `plain_call_timeout`, the plain site is deployed for failing middle tiers: its front
    ends give up on a call after that many seconds and send it to the other middle tier
    (else the front end's default, 30 s), and its middle tiers give up on a database
    lock after half of it (a call stuck behind a failed node's locks frees its
    connection). A context manager: up() builds the lab, starts and loads the database
    and the servers; down() tears everything down (the lab's, so also on errors)."""

    FE, MT, DB = ("n0", "n1"), ("n2", "n3"), "n4"

    def __init__(self, name: str, scale, *, secret: str | None = None,
                 plain_call_timeout: float | None = None):
        from ...lab.lab import Lab

        self.lab = Lab(name, hosts=2, nodes=5, agents=True, services=False)
        self.scale = scale
        self.secret = secret or os.urandom(16).hex()
        self.plain_call_timeout = plain_call_timeout
        self.db = None
        self.servers: dict[tuple[str, str, bool], Server] = {}  # (tier, node, plain)
        self.timings: dict[str, float] = {}

    def up(self) -> Site:
        import psycopg

        from ..postgres import Postgres
        from .dataset import load

        t0 = time.monotonic()
        self.lab.up()
        try:
            self.db = Postgres(self.lab, self.DB).start()
            t1 = time.monotonic()
            with psycopg.connect(self.db.local_dsn()) as c:
                load(c, self.scale)
            t2 = time.monotonic()
            for plain in (False, True):
                for n in self.MT:
                    self.servers["mt", n, plain] = self.start_middle_tier(n, plain)
                for n in self.FE:
                    self.servers["fe", n, plain] = self.start_front_end(n, plain)
            self.timings = {"lab_and_db_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1),
                            "servers_s": round(time.monotonic() - t2, 1)}
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        try:
            for s in self.servers.values():
                s.stop()
            self.servers.clear()
            if self.db is not None:
                self.db.stop()
                self.db = None
        finally:
            self.lab.down()

    def __enter__(self) -> Site:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def db_fence(self, node: str) -> int:
        """End the database connections of middle-tier node `node`'s servers (their open
        transactions roll back, their locks go): the fence of a failed middle tier
        before its channels are replayed elsewhere. Returns how many."""
        return self.db.terminate(mt_name(node), mt_name(node, plain=True))

    def start_middle_tier(self, node: str, plain: bool) -> Server:
        """(Re)start the middle tier of `node` of that kind."""
        lock = self.plain_call_timeout / 2 if plain and self.plain_call_timeout else None
        return start_mt(self.lab, node, self.db, secret=self.secret, plain=plain,
                        lock_timeout=lock)

    def start_front_end(self, node: str, plain: bool) -> Server:
        """(Re)start the front end of `node` of that kind."""
        mts = [self.servers["mt", n, plain].address for n in self.MT]
        return start_fe(self.lab, node, mts, self.secret, plain=plain,
                        call_timeout=self.plain_call_timeout if plain else None)

    def front_ends(self, plain: bool) -> list[Server]:
        return [self.servers["fe", n, plain] for n in self.FE]

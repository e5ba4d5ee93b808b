"""A real PostgreSQL server inside a lab node: the case study's back end.

    with Postgres(lab, "n3") as db:             # initdb, start, wait until it answers
        dsn = db.dsn()                            # for servers in other nodes (TCP, password)
        with psycopg.connect(db.local_dsn()) as c: ...   # from the host (its Unix socket)

The cluster lives in the node's run directory (a tmpfs charged to the node, grown to
`data_bytes`), runs as the node's service uid with all the node's namespaces, and listens on
the node's service address and on a Unix socket in that directory. Local connections (the
socket: only root on the host and the node itself reach it) are trusted; TCP connections
need the password, generated per cluster (scram-sha-256). Everything goes with the lab:
the node's processes die with its cgroup and its run directory with the lab's files.
"""

from __future__ import annotations

import glob
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from ..errors import LabError

#: the server's port, on the node's service address
PORT = 5432
USER = "rubis"
DATABASE = "rubis"
#: the node's run directory holds the cluster: an empty one takes ~40 MB, the default data
#: set ~60 MB more
DATA_BYTES = 512 << 20
_ERR_TAIL = 2000


def bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if not found:
        raise LabError("no PostgreSQL server installed (/usr/lib/postgresql/*/bin/postgres): "
                       "`make` installs Debian's postgresql, or apt-get install postgresql")
    return Path(found[-1]).parent


class Postgres:
    """A PostgreSQL cluster in lab node `node`; start() / stop(), or a context manager."""

    def __init__(self, lab, node: str, *, port: int = PORT, data_bytes: int = DATA_BYTES):
        self.lab, self.node, self.port, self.data_bytes = lab, node, port, data_bytes
        self.address = lab.plan.node(node).address
        self.run_dir = lab.node_run_dir(node)
        self.data = self.run_dir / "pgdata"
        self.password = ""
        self.proc = None

    # ---- addresses ------------------------------------------------------------------------

    def dsn(self, *, database: str = DATABASE) -> str:
        """For a server in another node: TCP to the node's address, with the password."""
        return (f"host={self.address} port={self.port} dbname={database} user={USER} "
                f"password={self.password} connect_timeout=5")

    def local_dsn(self, *, database: str = DATABASE) -> str:
        """For the host (the lab's own set-up and checks): the Unix socket, trusted."""
        return f"host={self.run_dir} port={self.port} dbname={database} user={USER}"

    # ---- life -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Postgres:
        """initdb (once), start the server, wait until it accepts connections, create the
        database. Raises LabError with the server's own words when any step fails."""
        bins = bin_dir()
        self.lab.grow_run_dir(self.node, self.data_bytes)
        if not (self.data / "PG_VERSION").exists():
            self._initdb(bins, timeout)
        else:
            self.password = (self.run_dir / "pgpass").read_text().strip()
        with open(self.run_dir / "postgres.log", "ab") as log:
            self.proc = self.lab.run_in_node(self.node, [
                str(bins / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", f"listen_addresses={self.address}",
                "-c", f"unix_socket_directories={self.run_dir}",
                # a lab's database on a tmpfs, lost with the host anyway: no fsync and no
                # full pages (they guard against a host crash). A commit still writes its
                # WAL before it returns (synchronous_commit): a backend killed (the OOM
                # killer, a memory hog's kill) restarts the server, which must keep every
                # write it acknowledged
                "-c", "max_connections=200", "-c", "fsync=off",
                "-c", "full_page_writes=off"], stderr=log, new_session=True)
        try:
            self._wait_ready(timeout)
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: active transactions roll back), SIGKILL past `timeout`."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- steps ----------------------------------------------------------------------------

    def _initdb(self, bins: Path, timeout: float) -> None:
        self.password = secrets.token_urlsafe(18)
        pwfile = self.run_dir / "pgpass"  # 0600, the node's service uid's: initdb reads it
        pwfile.write_text(self.password + "\n")
        self.lab.isolation(self.node).grant(pwfile, 0o600)
        proc = self.lab.run_in_node(self.node, [
            str(bins / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--locale=C", "-E", "UTF8",
            "--no-sync"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise LabError(f"initdb in node {self.node} did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise LabError(f"initdb in node {self.node} failed (exit {proc.returncode}): "
                           f"{out.decode(errors='replace')[-_ERR_TAIL:]}")
        with open(self.data / "pg_hba.conf", "a") as f:  # TCP from the lab's networks only
            f.write("host all all 10.0.0.0/8 scram-sha-256\n")

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"PostgreSQL in node {self.node} exited ({self.proc.returncode}) "
                               f"while starting: {self.log_tail()}")
            try:
                with psycopg.connect(self.local_dsn(database="postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as e:
                last = str(e).strip()
            time.sleep(0.1)
        raise LabError(f"PostgreSQL in node {self.node} did not accept connections within "
                       f"{timeout:.0f} s ({last}): {self.log_tail()}")

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.local_dsn(database="postgres"), autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                c.execute(f'CREATE DATABASE "{DATABASE}"')

    def terminate(self, *application_names: str, timeout: float = 5.0) -> int:
        """End every connection of these `application_names` and wait until their
        backends are gone (their open transactions rolled back, their locks released):
        the fence of a failed middle tier, before its sessions are replayed elsewhere (a
        frozen server's transaction would otherwise hold its idempotency key's row lock,
        and the replay would wait on it). All are signalled at once and polled every few
        ms (pg_terminate_backend's own wait polls each in turn every 100 ms). Returns how
        many; LabError if some outlive `timeout`."""
        import psycopg

        with psycopg.connect(self.local_dsn(), autocommit=True) as c:
            # the pids first, then the signals: the planner orders a WHERE's conditions by
            # cost, and pg_terminate_backend is cheaper than ANY over three names or more
            ended = [pid for (pid,) in c.execute(
                "WITH chosen AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE "
                "application_name = ANY(%s) AND pid <> pg_backend_pid()) "
                "SELECT pid FROM chosen WHERE pg_terminate_backend(pid)",
                (list(application_names),)).fetchall()]
            end = time.monotonic() + timeout
            while left := [pid for (pid,) in c.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (ended,)).fetchall()]:
                if time.monotonic() > end:
                    raise LabError(f"PostgreSQL backends {left} of {', '.join(application_names)} "
                                   f"still run {timeout:g} s after they were told to end")
                time.sleep(0.005)
        return len(ended)

    def log_tail(self) -> str:
        try:
            return (self.run_dir / "postgres.log").read_text(errors="replace")[-_ERR_TAIL:]
        except OSError:
            return "(no log)"

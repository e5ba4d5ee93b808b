"""The measured case study: the RUBiS site under locust's load, plain and recoverable side
by side in one run, and the database checked against what the clients were told.

    rubis(users=64, seconds=10) -> {"load": [{users, plain_rps, recoverable_rps,
        plain_p50_ms, recoverable_p50_ms, plain_p99_ms, recoverable_p99_ms, ...}, ...],
        "overhead_pct_max", "bids_acknowledged", "bids_lost", "bids_duplicated", ...}

The site (site.Site: 2 front ends, 2 middle tiers, PostgreSQL) runs both kinds of server
on the same nodes. At each load level (users/16, /8, /4, /2, users) locust runs headless
in the lab's client namespace for `seconds` against the plain front ends, then against the
recoverable ones (the order alternates from level to level, and from round to round:
`rounds` pairs per level, averaged), with both mixes (browsing and bidding,
locustfile.py). A level is below saturation while the plain site's
throughput still grows by at least 10 % from the level before; `overhead_pct_max` is the
largest throughput loss of recoverable vs plain among those levels (all levels if none).
Besides locust's p50 and p99 (of every request), each row has those of the users' first
requests apart (`*_first_p50_ms`, `*_first_p99_ms`: the requests that open a session)
and the p99 of the later ones (`*_steady_p99_ms`: requests on sessions already set up),
from the driver's own record of every response time (latency.py). As TPC-W measures, the
rows also have the figures of each run's measurement interval, after a ramp-up (`ramp_s`,
by default RAMP_S or a quarter of the run, the less) in which the users open their
sessions: `*_interval_rps` and `*_interval_p99_ms`, and their overheads below saturation
(`interval_overhead_pct_max`, `interval_p99_overhead_pct_max`).

With `faults` (FAULTS: fe- and mt- freeze, lock, network, crash; see play_fault), each
fault is then played under load on a recoverable site of its own (a fault leaves its
node fenced); `faults` in the result has one row each, with the requests per 100 ms
across the fault (`per_100ms`) and the throughput's dip (`dip_ms`). Before it, on the
same site, its baseline (haproxy_fault: the plain site behind HAProxy, the same fault,
then undone) adds the same facts named haproxy_*.

Every write a client was answered (bid, buy, comment, register; accepted or refused) is
recorded with its key, and every row a write makes carries its key: at the end an
acknowledged write must have exactly one row (a bid's with its user, item and price), a
refused one none (count_writes). `bids_lost` / `writes_lost` count the acknowledged ones
missing, `bids_duplicated` / `writes_duplicated` the rows past one, a refused write's rows
and rows no acknowledged record accounts for: per fault row, and in all at the top.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ...errors import LabError
from .dataset import Scale
from .front import FAILOVER
from .latency import summary
from .site import Site, mt_name
from .throughput import dip, per_100ms

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MIXES = ("Browsing", "Bidding")
#: a level is saturated once the plain site's throughput grows less than this from the
#: level before
GROWTH = 1.10
#: the ramp-up left out of a run's measurement interval at most, seconds (every locust
#: user starts in the first second and opens its session with its first request)
RAMP_S = 2.0


def levels(users: int) -> list[int]:
    """users/16, /8, /4, /2, users (at least 1 each, no repeats)."""
    return sorted({max(1, users >> k) for k in (4, 3, 2, 1, 0)})


def run_locust(site: Site, plain: bool, users: int, seconds: float, work: Path,
               think: tuple[float, float] = (0.05, 0.15), tag: str = "",
               ramp_s: float = 0.0) -> dict:
    """One headless locust run against the plain or recoverable front ends: its
    aggregated figures (and those of its measurement interval, after `ramp_s`) and the
    file of acknowledged writes."""
    return Locust(site, plain, users, seconds, work, think, tag, ramp_s=ramp_s).finish()


class Locust:
    """A headless locust run in the lab's client namespace, started at once; finish()
    waits for it and reads its figures. With `requests`, each request's end and outcome
    go to `self.requests` (throughput.py), front end i being site.front_ends(plain)[i]
    (or `hosts`[i]: URLs to load instead of the front ends, e.g. a balancer's)."""

    def __init__(self, site: Site, plain: bool, users: int, seconds: float, work: Path,
                 think: tuple[float, float] = (0.05, 0.15), tag: str = "",
                 requests: bool = False, hosts: list[str] | None = None, ramp_s: float = 0.0):
        self.tag = tag = f"{'plain' if plain else 'recoverable'}-{users}{'-' + tag if tag else ''}"
        self.seconds, self.work, self.ramp_s = seconds, work, ramp_s
        self.prefix, self.acks = work / tag, work / f"{tag}.acks"
        self.requests = work / f"{tag}.requests" if requests else None
        self.latencies = work / f"{tag}.latencies"
        self.unanswered = work / f"{tag}.unanswered"
        hosts = ",".join(hosts or [f"http://{s.vip}:{s.port}" for s in site.front_ends(plain)])
        env = {"RUBIS_HOSTS": hosts, "RUBIS_ACKS": str(self.acks),
               "RUBIS_LATENCIES": str(self.latencies), "RUBIS_UNANSWERED": str(self.unanswered),
               **({"RUBIS_REQUESTS": str(self.requests)} if requests else {}),
               "RUBIS_DATA_USERS": str(site.scale.users),
               "RUBIS_DATA_ITEMS": str(site.scale.items),
               "RUBIS_THINK_MIN": str(think[0]), "RUBIS_THINK_MAX": str(think[1])}
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--only-summary",
                "--csv", str(self.prefix), "--exit-code-on-error", "0",
                "--host", hosts.split(",")[0], "--stop-timeout", "5", *MIXES]
        self.log_path = work / f"{tag}.log"
        with open(self.log_path, "wb") as log:
            self.proc = site.lab.run_in_client(argv, env={**os.environ, **env}, stdout=log,
                                               stderr=log)

    def __enter__(self) -> Locust:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """End locust if it still runs (an error on the way: it is in no node, and the
        lab's teardown would not end it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def finish(self, timeout: float | None = None) -> dict:
        tag = self.tag
        try:
            self.proc.wait(timeout or self.seconds + 60)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)
            raise LabError(f"locust ({tag}) did not finish: {_tail(self.log_path)}") from None
        stats = Path(f"{self.prefix}_stats.csv")
        if self.proc.returncode != 0 or not stats.exists():
            raise LabError(f"locust ({tag}) failed ({self.proc.returncode}): "
                           f"{_tail(self.log_path)}")
        rows = {r["Name"]: r for r in csv.DictReader(stats.open())}
        total = rows.get("Aggregated")
        if total is None:
            raise LabError(f"locust ({tag}) wrote no aggregated figures: {_tail(self.log_path)}")
        writes = sum(int(r["Request Count"]) for n, r in rows.items()
                     if n in ("/bid", "/buy", "/comment", "/register"))
        requests = int(total["Request Count"])
        if requests == 0:  # (locust writes N/A for the percentiles)
            raise LabError(f"locust ({tag}): no request completed in {self.seconds:g} s: "
                           f"{_tail(self.log_path)}")
        try:  # requests killed waiting for their answer: failed, though locust counts none
            unanswered = int(self.unanswered.read_text())
        except (OSError, ValueError):
            raise LabError(f"locust ({tag}) did not say how many requests it left "
                           f"unanswered: {_tail(self.log_path)}") from None
        return {"rps": float(total["Requests/s"]), "p50_ms": float(total["50%"]),
                "p99_ms": float(total["99%"]), "requests": requests + unanswered,
                "failed": int(total["Failure Count"]) + unanswered, "unanswered": unanswered,
                "writes": writes, "acks": self.acks,
                "max_ms": float(total["Max Response Time"]),
                **summary(self.latencies, self.ramp_s)}


#: the faults built so far (issue 13's list: fe- and mt- freeze, lock, network, crash)
FAULTS = tuple(f"{tier}-{kind}" for tier in ("fe", "mt")
               for kind in ("freeze", "lock", "network", "crash"))
#: how long a fault waits for the load to bring the sessions it is to move (locust itself
#: takes seconds to start on a loaded machine)
HELD_WAIT_S = 30.0
#: the baseline's plain front ends give up on a call to a middle tier after this long and
#: send it to the other: twice the recoverable middle tier's progress deadline, and well
#: above the site's healthy answer times (the longest seen under the fault runs' load:
#: 735 ms), so that a slow but healthy call is not taken for a failure
BASELINE_CALL_TIMEOUT_S = 2.0


def play_fault(site: Site, fault: str, users: int, seconds: float, work: Path,
               think: tuple[float, float] = (0.05, 0.15), period_ms: float = 50, *,
               on_incident=None, incidents_dir: str | None = None) -> dict:
    """The recoverable site under load while a node of one tier fails, once the sessions
    are held by the agents: `fe-*` front-end node n0, `mt-*` the middle-tier node holding
    the most channels (n2 on a tie). `freeze`: every process SIGSTOPped (a hang);
    `lock`: the node's cgroup frozen behind the agent's back (the original's emulated
    freeze by remote OS locking); `network`: its service link down (a failed network
    driver); `crash`: its recoverable server SIGKILLed, nothing restarting it. A monitor
    with the site's rules (site_rules: the "heal" ruleset) sees it (progress stalled,
    node frozen by nobody's lock, link down, sessions orphaned), fences the node and
    moves its sessions: n0's client sessions to FE b (n1); a middle tier's channels (the
    middle-tier ends of the front ends' channels) to the other one, after its database
    connections are terminated (their open transactions hold the locks the replayed
    calls need). Leaves the node fenced: one fault per site.

    Facts: requests and failed ones (locust's), the longest answer, detect_ms (the fault
    to the incident), recovery_ms (the incident to the end of the move), moved, the rule
    that acted; `per_100ms`, the requests completed per 100 ms from 3 s before the fault
    to 6 s after (throughput.per_100ms; `node_ok`: n0's users, for a front end's fault;
    a middle tier's stalls channels of both front ends, so the whole site's), and
    `dip_ms`, how long that throughput stayed below half of what it was before the fault
    (throughput.dip: its details are in per_100ms).

    `on_incident(event, incident)` is subscribed to the monitor's incidents (the demo's
    live view); `incidents_dir` keeps the monitor's incident log."""
    from ...monitor import Monitor

    if fault not in FAULTS:
        raise LabError(f"fault {fault!r}; choose one of {', '.join(FAULTS)}")
    tier, kind = fault.split("-", 1)
    node = site.FE[0] if tier == "fe" else site.MT[0]
    lab = site.lab
    cfg = lab.monitor_config("m1", period_ms=period_ms, rulesets=["heal"],
                             incidents_dir=incidents_dir)
    with Monitor(cfg, key=lab.monitor_key("m1"), rules=site_rules(site),
                 hooks={"db-fence": lambda info: site.db_fence(info["node"])}) as mon:
        if on_incident is not None:
            mon.subscribe(on_incident)
        mon.wait_ready(timeout=10)
        with Locust(site, False, users, seconds, work, think, tag=fault, requests=True) as run:
            # every session to move held by the agent first: a connection still in the accept
            # queue of a frozen server is not the server's yet, nor held by the agent, and is
            # not moved (see docs/casestudy.md)
            # (users take the front ends in turn, n0 first; each client connection has its
            # channel to one middle tier, by a hash of its session; a front end's agent holds
            # the channels too, counted apart: their local port is not the server's)
            held, want = ((node,), (users + 1) // 2) if tier == "fe" else (site.MT, users)
            port = site.servers[tier, held[0], False].port
            end = time.monotonic() + HELD_WAIT_S
            while sum((counts := {n: _sessions(lab, n, port) for n in held}).values()) < want:
                if time.monotonic() > end or run.proc.poll() is not None:
                    run.proc.kill()
                    seen = [(i.node, i.rule, i.state) for i in mon.incidents()]
                    raise LabError(f"{fault}: the load brought {counts} sessions, not {want}, in "
                                   f"{HELD_WAIT_S:g} s (incidents so far: {seen}; locust: "
                                   f"{_tail(run.log_path)[-300:]})")
                time.sleep(0.05)
            if tier == "mt":  # the middle tier holding the most channels (a tie: n2)
                node = max(site.MT, key=lambda n: counts[n])
            time.sleep(1.0)
            wall = time.time()
            _fail(site, kind, site.servers[tier, node, False])
            inc = mon.wait_for(lambda i: i.node == node and any(a.kind == "recover"
                                                                for a in i.actions), seconds + 30)
            got = run.finish()
    facts = {"tier": tier, "fault": kind, "node": node, "users": users,
             "requests": got["requests"], "failed_requests": got["failed"],
             "max_response_ms": got["max_ms"], "detect_ms": None, "recovery_ms": None,
             "moved": None, "rule": None, "acks": got["acks"]}
    series = per_100ms(run.requests, wall, node=0 if tier == "fe" else None)
    series.update(dip(series))
    facts.update(dip_ms=series.pop("dip_ms"), per_100ms=series)
    if inc is not None:
        rec = next(a for a in inc.actions if a.kind == "recover")
        facts.update(incident=inc.id, detect_ms=round((inc.detected - wall) * 1000, 1),
                     recovery_ms=round(rec.started_ms + rec.duration_ms, 1),
                     moved=rec.detail.get("moved"), recover_status=rec.status,
                     target=rec.detail.get("target"), rule=inc.rule,
                     fence_more=rec.detail.get("fence_more"),
                     fence_more_ms=rec.detail.get("fence_more_ms"))
    return facts


def haproxy_fault(site: Site, fault: str, users: int, seconds: float, work: Path,
                  think: tuple[float, float] = (0.05, 0.15)) -> dict:
    """The baseline of a fault: what a user would deploy today, the plain site behind
    HAProxy (balancer.py), under the same load while the same fault is done to its plain
    servers -- front end n0 (HAProxy's health checks take it out), or the plain middle
    tier holding the most channels (the front ends' own reconnect-and-retry: a call with
    no answer within the site's `plain_call_timeout` goes to the other middle tier) --
    then undone, so that the recoverable run can follow on the same site. Facts, named
    haproxy_*: requests, failed_requests (locust's), max_response_ms, detect_ms (a front
    end's fault: until HAProxy marked n0's server DOWN; None for a middle tier's),
    failovers (calls the front ends sent again to the other middle tier, from their
    logs), per_100ms and dip_ms (the whole site's: the balancer is its only address),
    and the bids checked like the recoverable run's."""
    from ...lab import faults
    from .balancer import Balancer

    tier, kind = fault.split("-", 1)
    if tier == "mt" and not site.plain_call_timeout:
        raise LabError(f"{fault}: the baseline of a middle tier's fault needs a site whose "
                       "plain front ends give up on a middle tier in time (plain_call_timeout"
                       f", e.g. BASELINE_CALL_TIMEOUT_S = {BASELINE_CALL_TIMEOUT_S:g} s)")
    lab = site.lab
    logs = [lab.plan.run_dir / n / "stderr.log" for n in site.FE]
    with Balancer(site) as lb:
        with Locust(site, True, users, seconds, work, think, tag=f"{fault}-haproxy",
                    requests=True, hosts=[lb.url]) as run:
            end = time.monotonic() + HELD_WAIT_S
            # both front ends in use; for a middle tier's fault, channels to a middle tier
            while not (all(n > 0 for n in lb.sessions_total().values())
                       and (tier == "fe" or sum((held := _plain_channels(site)).values()) > 0)):
                if time.monotonic() > end or run.proc.poll() is not None:
                    run.proc.kill()
                    raise LabError(f"{fault} (HAProxy): the load reached {lb.sessions_total()} "
                                   f"in {HELD_WAIT_S:g} s ({_tail(run.log_path)})")
                time.sleep(0.05)
            node = site.FE[0] if tier == "fe" else max(site.MT, key=lambda n: held[n])
            time.sleep(1.0)
            logged = [_size(p) for p in logs]
            wall, began = time.time(), time.monotonic()
            _fail(site, kind, site.servers[tier, node, True])
            down_ms = lb.marked_down("fe0", began) if tier == "fe" else None
            got = run.finish()
    failovers = sum(_read_from(p, at).count(FAILOVER) for p, at in zip(logs, logged))
    if kind == "lock":
        lab.node(node).unlock(5.0)
    elif kind == "crash":
        site.servers[tier, node, True] = (site.start_front_end(node, plain=True) if tier == "fe"
                                          else site.start_middle_tier(node, plain=True))
    else:
        faults.stop(lab, kind, node)
    _until_healthy(site, node, time.monotonic())
    series = per_100ms(run.requests, wall)
    series.update(dip(series))
    out = {"haproxy_requests": got["requests"], "haproxy_failed_requests": got["failed"],
           "haproxy_max_response_ms": got["max_ms"], "haproxy_detect_ms": down_ms,
           "haproxy_node": node, "haproxy_failovers": failovers,
           "haproxy_dip_ms": series.pop("dip_ms"), "haproxy_per_100ms": series}
    out.update({f"haproxy_{k}": v for k, v in check_writes(site, [got["acks"]]).items()})
    return out


def _fail(site: Site, kind: str, server) -> None:
    """Fault `kind` done to `server`'s node: its cgroup frozen behind the agent's back
    (lock), `server` killed (crash), or the lab's fault of that name (freeze, network)."""
    from ...lab import inject

    if kind == "lock":
        site.lab.node(server.node).lock(5.0)
    elif kind == "crash":
        server.stop()
    else:
        inject(site.lab, kind, server.node)


def _until_healthy(site: Site, node: str, since: float, timeout: float = 10.0) -> None:
    """Until `node`'s agent shows it healthy again, in a sample taken after `since`
    (time.monotonic()): not frozen, its link up, every progress counter moving. Else the
    next run's monitor may act on what the agent saw of a fault already undone (found:
    a link_up of 0 sampled before the link came back fenced the node at its first poll)."""
    from ...sensors import KERNEL_BOX, parse_box

    lab = site.lab
    end = time.monotonic() + timeout
    with lab.agent_client(lab.plan.node(node).host) as c:
        while True:
            info = next(n for n in c.nodes() if n.name == node)
            got = c.sensors(node)
            kernel = ({x.name: x.value for x in parse_box(got.boxes[KERNEL_BOX]).sensors}
                      if KERNEL_BOX in got.boxes else {})
            still = [v for box in got.progress_unchanged_s.values() for v in box.values()]
            if (info.sample_age_s is not None and info.sample_age_s < time.monotonic() - since
                    and info.frozen is False and kernel.get("link_up", 1.0) >= 0.5
                    and all(v < 0.2 for v in still)):
                return
            if time.monotonic() > end:
                raise LabError(f"node {node} not healthy {timeout:g} s after a fault was undone: "
                               f"frozen {info.frozen}, link_up {kernel.get('link_up')}, progress "
                               f"unchanged {got.progress_unchanged_s}")
            time.sleep(0.05)


def _plain_channels(site: Site) -> dict[str, int]:
    """The channels each plain middle tier serves (its Sensor Box's `sessions` level)."""
    from ...sensors import parse_box

    out = {}
    for node in site.MT:
        with site.lab.agent_client(site.lab.plan.node(node).host) as c:
            data = c.sensors(node).boxes.get(mt_name(node, plain=True))
        values = {s.name: s.value for s in parse_box(data).sensors} if data else {}
        out[node] = int(values.get("sessions", 0))
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _sessions(lab, node: str, port: int) -> int:
    """Sessions the node's agent holds whose local port is `port` (a server's)."""
    with lab.agent_client(lab.plan.node(node).host) as c:
        return sum(s.connection.split(" <-> ")[0].endswith(f":{port}")
                   for s in c.sessions(node))


def site_rules(site: Site) -> list:
    """The "heal" ruleset, fitted to the site. Its rules that move sessions apply to a
    front end (and the database node) as they are; for each middle-tier node a copy
    (named `<rule>-<node>`) moves them to the other middle tier, and fences the node's
    database connections first (the monitor hook `db-fence`). And nothing restarts the
    site's servers, so the sessions of a crashed one move at once rather than after
    waiting for it to come back on its node (`same_node_wait_ms` 0, as the ruleset says
    to set it where nothing restarts servers)."""
    import msgspec

    from ...monitor.actions import Recover
    from ...monitor.rules import load_ruleset

    def moving(rule, **change):
        return msgspec.structs.replace(rule, actions=[
            msgspec.structs.replace(a, same_node_wait_ms=0.0, **change)
            if isinstance(a, Recover) else a for a in rule.actions])

    out = []
    for r in load_ruleset("heal").rule:
        if not any(isinstance(a, Recover) for a in r.actions):
            out.append(r)
            continue
        out.append(msgspec.structs.replace(moving(r), nodes=[*site.FE, site.DB]))
        for mt, other in zip(site.MT, reversed(site.MT)):
            out.append(msgspec.structs.replace(moving(r, target=other, fence_hook="db-fence"),
                                               name=f"{r.name}-{mt}", nodes=[mt]))
    return out


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-1500:]
    except OSError:
        return "(no log)"


#: the table a write of each kind (as the pages name it) adds its row to, and the kind its
#: key is recorded under (store.py)
WRITES = {"bid": ("bids", "bid"), "buy": ("buy_now", "buy_now"),
          "comment": ("comments", "comment"), "register": ("users", "register")}


def check_writes(site: Site, ack_files: list[Path]) -> dict:
    """What the clients were told (the acknowledgement files) against the database."""
    import psycopg

    told = []
    for path in ack_files:
        if path.exists():
            told += [json.loads(line) for line in path.read_text().splitlines()]
    with psycopg.connect(site.db.local_dsn()) as c:
        return count_writes(c, told)


def count_writes(c, told: list[dict]) -> dict:
    """Every write a client was answered, by its idempotency key (each row a write makes
    carries it): an acknowledged one has its recorded result and exactly one row (a bid's
    with its user, item and price), a refused one none. Over the whole database, each
    kind's rows of a key are as many as its acknowledged records. {bids_acknowledged,
    bids_lost, bids_duplicated} and the same over every kind as writes_*:
    `lost`, an acknowledged write with no row or no record; `duplicated`, its rows past one,
    a refused write's rows, and rows no acknowledged record accounts for."""
    out = {f"{what}_{n}": 0 for what in ("bids", "writes")
           for n in ("acknowledged", "refused", "lost", "duplicated")}
    seen = dict.fromkeys(WRITES, 0)  # rows counted as duplicates, by kind
    for a in told:
        table, kind = WRITES[a["kind"]]
        rows = c.execute(f"SELECT count(*) FROM {table} WHERE key = %s", (a["key"],)).fetchone()[0]
        record = c.execute("SELECT result->>'ok' FROM requests WHERE key = %s AND kind = %s",
                           (a["key"], kind)).fetchone()
        if a["ok"]:
            lost = rows == 0 or record is None or record[0] != "true"
            if a["kind"] == "bid" and not lost:
                lost = c.execute("SELECT user_id, item_id, bid::text FROM bids WHERE key = %s",
                                 (a["key"],)).fetchone() != (a["user"], a["item"], a["price"])
            counts = {"acknowledged": 1, "lost": int(lost), "duplicated": max(0, rows - 1)}
        else:
            counts = {"refused": 1, "duplicated": rows}
        seen[a["kind"]] += counts["duplicated"]
        for n, v in counts.items():
            out[f"writes_{n}"] += v
            if a["kind"] == "bid":
                out[f"bids_{n}"] += v
    for kind, (table, recorded) in WRITES.items():
        rows = c.execute(f"SELECT count(*) FROM {table} WHERE key IS NOT NULL").fetchone()[0]
        oks = c.execute("SELECT count(*) FROM requests WHERE kind = %s AND result->>'ok' = "
                        "'true'", (recorded,)).fetchone()[0]
        extra = max(0, rows - oks - seen[kind])
        out["writes_duplicated"] += extra
        if kind == "bid":
            out["bids_duplicated"] += extra
    return out


def rubis(users: int = 64, seconds: float = 10.0, *, scale: Scale | None = None,
          name: str | None = None, think: tuple[float, float] = (0.05, 0.15),
          rounds: int = 1, faults: tuple[str, ...] = (), work_dir: str | None = None,
          ramp_s: float | None = None) -> dict:
    """Run the case study (root); returns the facts of the module docstring. The run's
    files (locust's figures and logs, the acknowledged writes) are kept in `work_dir`
    when given."""
    ramp_s = min(RAMP_S, seconds / 4) if ramp_s is None else ramp_s
    if unknown := set(faults) - set(FAULTS):
        raise LabError(f"unknown faults: {', '.join(sorted(unknown))}; choose from "
                       f"{', '.join(FAULTS)}")
    if users < 1 or seconds <= 0 or rounds < 1 or not 0 <= ramp_s < seconds:
        raise LabError(f"users must be >= 1, seconds > 0, rounds >= 1 and the ramp-up in "
                       f"[0, seconds), got {users}, {seconds}, {rounds} and {ramp_s}")
    scale = scale or Scale()
    work = Path(work_dir or tempfile.mkdtemp(prefix="bd-rubis-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = _run(users, seconds, scale, name, think, rounds, tuple(faults), work, ramp_s)
    finally:
        if work_dir is None:  # a directory of its own: the run's files go with it
            shutil.rmtree(work, ignore_errors=True)
    if work_dir is not None:
        out["work_dir"] = str(work)
    return out


def _run(users: int, seconds: float, scale: Scale, name: str | None,
         think: tuple[float, float], rounds: int, faults: tuple[str, ...],
         work: Path, ramp_s: float) -> dict:
    out: dict = {"users": users, "seconds": seconds, "ramp_s": ramp_s, "rounds": rounds,
                 "mixes": list(MIXES),
                 "think_s": list(think), "data": {"users": scale.users, "items": scale.items,
                                                  "bids": scale.bids}, "load": []}
    acks = []
    t0 = time.monotonic()
    name = name or f"rb{os.urandom(3).hex()}"
    with Site(name, scale) as site:
        out["setup"] = site.timings
        for i, n in enumerate(levels(users)):
            runs: dict[str, list[dict]] = {"plain": [], "recoverable": []}
            for r in range(rounds):  # ABBA...: a drift of the machine hits both alike
                for plain in ((True, False) if (i + r) % 2 == 0 else (False, True)):
                    got = run_locust(site, plain, n, seconds, work, think, tag=f"r{r}",
                                     ramp_s=ramp_s)
                    acks.append(got["acks"])
                    runs["plain" if plain else "recoverable"].append(got)
            row: dict = {"users": n}
            for kind, got in runs.items():
                requests = sum(g["requests"] for g in got)
                row.update({f"{kind}_rps": round(_mean(got, "rps"), 1),
                            f"{kind}_p50_ms": round(_mean(got, "p50_ms"), 1),
                            f"{kind}_p99_ms": round(_mean(got, "p99_ms"), 1),
                            f"{kind}_first_p50_ms": _mean_of(got, "first_p50_ms"),
                            f"{kind}_first_p99_ms": _mean_of(got, "first_p99_ms"),
                            f"{kind}_steady_p99_ms": _mean_of(got, "steady_p99_ms"),
                            f"{kind}_interval_rps": _mean_of(got, "interval_rps"),
                            f"{kind}_interval_p99_ms": _mean_of(got, "interval_p99_ms"),
                            f"{kind}_sessions": sum(g["sessions"] for g in got),
                            f"{kind}_requests": requests,
                            f"{kind}_failed": sum(g["failed"] for g in got),
                            f"{kind}_write_pct": round(100 * sum(g["writes"] for g in got)
                                                       / max(1, requests), 1)})
            out["load"].append(row)
        out.update(check_writes(site, acks))
    if faults:
        out["faults"] = []
    for i, fault in enumerate(f for f in FAULTS if f in faults):
        # a site of its own for each: a fault leaves its node fenced, its address moved
        with Site(f"{name[:9]}{i + 1}", scale,
                  plain_call_timeout=BASELINE_CALL_TIMEOUT_S) as site:
            load = (max(1, users // 2), max(seconds, 9.0), work, think)
            baseline = haproxy_fault(site, fault, *load)
            row = play_fault(site, fault, *load)
            row.update(check_writes(site, [row.pop("acks")]), **baseline)
            row["setup"] = site.timings
        out["faults"].append(row)
        for key in out:
            if key.startswith(("bids_", "writes_")):
                out[key] += row[key]
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out.update(overhead(out["load"]))
    return out


def _mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _mean_of(runs: list[dict], key: str) -> float | None:
    """The mean of the runs that have `key` (a run with no request of that kind has None)."""
    values = [r[key] for r in runs if r[key] is not None]
    return round(sum(values) / len(values), 1) if values else None


def overhead(load: list[dict]) -> dict:
    """overhead_pct_max (throughput), p99_overhead_pct_max and steady_p99_overhead_pct_max
    below saturation; the same of the measurement intervals (interval_overhead_pct_max,
    interval_p99_overhead_pct_max)."""
    below, prev, saturated = [], None, False
    for row in load:
        row["overhead_pct"] = round(100 * (row["plain_rps"] - row["recoverable_rps"])
                                    / row["plain_rps"], 1) if row["plain_rps"] else None
        saturated = saturated or (prev is not None and row["plain_rps"] < GROWTH * prev)
        row["saturated"] = saturated
        prev = row["plain_rps"]
        if not row["saturated"]:
            below.append(row)
    rows = below or load
    return {"overhead_pct_max": max((r["overhead_pct"] for r in rows
                                     if r["overhead_pct"] is not None), default=None),
            "p99_overhead_pct_max": _largest_excess(rows, "p99_ms"),
            "steady_p99_overhead_pct_max": _largest_excess(rows, "steady_p99_ms"),
            "interval_overhead_pct_max": _largest_loss(rows, "interval_rps"),
            "interval_p99_overhead_pct_max": _largest_excess(rows, "interval_p99_ms"),
            "levels_below_saturation": [r["users"] for r in below]}


def _largest_loss(rows: list[dict], figure: str) -> float | None:
    """The largest loss (%) of recoverable_<figure> against plain_<figure> among rows."""
    excess = _excess(rows, figure)
    return round(-min(excess), 1) if excess else None


def _largest_excess(rows: list[dict], figure: str) -> float | None:
    """The largest excess (%) of recoverable_<figure> over plain_<figure> among rows."""
    excess = _excess(rows, figure)
    return round(max(excess), 1) if excess else None


def _excess(rows: list[dict], figure: str) -> list[float]:
    return [100 * (r[f"recoverable_{figure}"] - r[f"plain_{figure}"]) / r[f"plain_{figure}"]
            for r in rows if r.get(f"plain_{figure}") and r.get(f"recoverable_{figure}") is not None]

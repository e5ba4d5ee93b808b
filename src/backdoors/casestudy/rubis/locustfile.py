"""The load on the RUBiS site, for locust (`locust -f locustfile.py --headless ...`): not
imported by backdoors itself (importing locust patches the standard library for gevent).

Two mixes, modelled after TPC-W's: `Browsing` (read-only pages) and `Bidding` (logs in,
then the same pages plus bids, purchases, comments and the odd registration: about 15 %
of its requests write). Every user keeps one keep-alive connection, with its cookie, to
one front end of RUBIS_HOSTS (users are spread over them in turn), thinks between
RUBIS_THINK_MIN and RUBIS_THINK_MAX seconds, and checks every answer: its status and the
page's marker. Every write the site answered (accepted or refused) is appended to
RUBIS_ACKS as a JSON line {kind, key, ok, user, item, price, bid}: what the clients were
told, to compare with the database afterwards. With RUBIS_UNANSWERED, the number of
requests still waiting for their answer when locust stopped their users (it kills those
still in a task --stop-timeout after the run's end, and counts them nowhere) is written to
that file when locust quits: a request that hangs is a failure too. With RUBIS_REQUESTS, every request's end (Unix ms), whether it
passed its check and its front end (an index in RUBIS_HOSTS) go to that file, one line each
(throughput.py; buffered, flushed when locust quits): the requests per 100 ms across a fault.
With RUBIS_LATENCIES, every request's response time, whether it was its user's first
(the one that opened the session) and its end go to that file (latency.py): the p99 of
sessions set up apart from that of the requests on them, and that of the measurement
interval after the ramp-up.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import random
import re
import time

import gevent
from gevent import GreenletExit
from locust import FastHttpUser, between, events, task

from backdoors.casestudy.rubis.latency import LatencyLog
from backdoors.casestudy.rubis.throughput import RequestLog

HOSTS = [h for h in os.environ.get("RUBIS_HOSTS", "").split(",") if h]
DATA_USERS = int(os.environ.get("RUBIS_DATA_USERS", "100"))
DATA_ITEMS = int(os.environ.get("RUBIS_DATA_ITEMS", "100"))
THINK = (float(os.environ.get("RUBIS_THINK_MIN", "0.05")),
         float(os.environ.get("RUBIS_THINK_MAX", "0.15")))
_acks = open(os.environ["RUBIS_ACKS"], "a", buffering=1) if os.environ.get("RUBIS_ACKS") else None
_requests = RequestLog(os.environ["RUBIS_REQUESTS"]) if os.environ.get("RUBIS_REQUESTS") else None
_latencies = LatencyLog(os.environ["RUBIS_LATENCIES"]) if os.environ.get("RUBIS_LATENCIES") else None
for _log in (_requests, _latencies):
    if _log is not None:
        events.quit.add_listener(lambda _log=_log, **_: _log.flush())  # the users are stopped
        atexit.register(_log.close)
_next_host = itertools.count()
_unanswered = 0
_stopping_at = float("inf")  # when locust began to stop its users (monotonic)


@events.test_stopping.add_listener
def _stopping(**_) -> None:
    global _stopping_at
    _stopping_at = time.monotonic()


@events.quit.add_listener
def _say_unanswered(**_) -> None:
    if os.environ.get("RUBIS_UNANSWERED"):
        with open(os.environ["RUBIS_UNANSWERED"], "w") as f:
            f.write(f"{_unanswered}\n")


def _asked(request):
    """`request()` (a request made with catch_response), counted as unanswered if its
    user is killed while it waits for an answer it asked before the stop began (it had
    --stop-timeout more to come). A request begun after (a user stopped while it slept
    is killed at its next switch, which may be its next request) was cut by locust."""
    global _unanswered
    began = time.monotonic()
    try:
        return request()
    except GreenletExit:
        _unanswered += began < _stopping_at
        raise


@events.init.add_listener
def _clock_now(**_) -> None:
    """Bring gevent's loop clock to now before locust sets its --run-time timer: a loop
    that has not run yet keeps the time it was created (at import), and a timer set from
    it fires early by every second the start-up took -- on a loaded machine the whole
    run time, leaving a level with no request completed."""
    gevent.get_hub().loop.update_now()

_MAX = re.compile(r'data-max="([0-9.]+)" data-initial="([0-9.]+)" data-quantity="(\d+)" '
                  r'data-seller="(\d+)"')
_KEY = re.compile(r'data-key="([^"]+)"')
_BID = re.compile(r'data-bid="(\d+)"')


class Site(FastHttpUser):
    abstract = True
    wait_time = between(*THINK)
    host = HOSTS[0] if HOSTS else "http://127.0.0.1"

    def on_start(self) -> None:
        self.fe = next(_next_host) % len(HOSTS) if HOSTS else 0
        self.base = HOSTS[self.fe] if HOSTS else self.host
        self.user = None
        self.first = True  # its next request opens its session (its keep-alive connection)

    def checked(self, r, ok: bool, why: str) -> None:
        if ok:
            r.success()
        else:
            r.failure(why)
        if _requests is not None:
            _requests.add(ok, self.fe)
        if _latencies is not None:
            _latencies.add(r.request_meta["response_time"], self.first)
        self.first = False

    def page(self, path: str, marker: str, name: str, status: int = 200) -> str | None:
        with _asked(lambda: self.client.get(self.base + path, name=name,
                                            catch_response=True)) as r:
            text = r.text or ""
            ok = r.status_code == status and marker in text
            self.checked(r, ok, f"{r.status_code}, marker {marker!r} missing")
            return text if ok else None

    def post(self, path: str, form: dict, markers: tuple[str, ...], name: str) -> str | None:
        with _asked(lambda: self.client.post(
                self.base + path, data=form, name=name, catch_response=True,
                headers={"Content-Type": "application/x-www-form-urlencoded"})) as r:
            text = r.text or ""
            ok = r.status_code == 200 and any(m in text for m in markers)
            self.checked(r, ok, f"{r.status_code}: {text[-200:]!r}")
            return text if ok else None

    def item_id(self) -> int:
        return random.randint(1, DATA_ITEMS)

    # ---- reads ------------------------------------------------------------------------

    @task(5)
    def home(self) -> None:
        self.page("/", 'id="who"', "/")

    @task(10)
    def categories(self) -> None:
        self.page("/categories", 'class="list"', "/categories")

    @task(5)
    def regions(self) -> None:
        self.page("/regions", 'class="list"', "/regions")

    @task(15)
    def category(self) -> None:
        self.page(f"/category?id={random.randint(1, 20)}&page={random.randint(0, 3)}",
                  'class="items"', "/category")

    @task(5)
    def region(self) -> None:
        self.page(f"/region?id={random.randint(1, 62)}&category={random.randint(1, 20)}",
                  'class="items"', "/region")

    @task(25)
    def item(self) -> None:
        i = self.item_id()
        self.page(f"/item?id={i}", f'data-id="{i}"', "/item")

    @task(8)
    def user_page(self) -> None:
        u = random.randint(1, DATA_USERS)
        self.page(f"/user?id={u}", f'class="user" data-id="{u}"', "/user")

    @task(7)
    def bids(self) -> None:
        self.page(f"/bids?item={self.item_id()}", 'class="bids"', "/bids")

    @task(5)
    def search(self) -> None:
        self.page(f"/search?q={random.choice(('lamp', 'rare', 'piano', 'old', 'jade'))}",
                  'class="items"', "/search")


class Browsing(Site):
    """Read-only pages."""


class Bidding(Site):
    """Logged in; about 15 % of its requests write (bid, buy now, comment, register)."""

    def on_start(self) -> None:
        super().on_start()
        u = random.randint(1, DATA_USERS)
        if self.post("/login", {"nickname": f"user{u}", "password": f"password{u}"},
                     ('id="login"',), "/login") is not None:
            self.user = u

    def ack(self, kind: str, text: str | None, **facts) -> None:
        """Record what a write was answered (accepted or refused), by its key."""
        key = text and _KEY.search(text)
        if _acks is not None and key:
            bid = _BID.search(text)
            _acks.write(json.dumps({"kind": kind, "key": key.group(1), "user": self.user,
                                    "ok": 'class="ok"' in text,
                                    "bid": bid and int(bid.group(1)), **facts}) + "\n")

    @task(12)
    def place_bid(self) -> None:
        i = self.item_id()
        text = self.page(f"/item?id={i}", f'data-id="{i}"', "/item")
        m = text and _MAX.search(text)
        if not m or self.user is None:
            return
        price = f"{max(float(m.group(1)), float(m.group(2))) + random.randint(1, 500) / 100:.2f}"
        out = self.post("/bid", {"item": str(i), "bid": price},
                        ('class="ok" id="bid"', 'class="refused" id="bid"'), "/bid")
        if out is not None:
            self.ack("bid", out, item=i, price=price)

    @task(2)
    def buy(self) -> None:
        if self.user is not None:
            i = self.item_id()
            out = self.post("/buy", {"item": str(i)},
                            ('class="ok" id="buy"', 'class="refused" id="buy"'), "/buy")
            if out is not None:
                self.ack("buy", out, item=i)

    @task(2)
    def comment(self) -> None:
        if self.user is not None:
            to = random.randint(1, DATA_USERS - 1)
            to += to >= self.user  # another user (one does not rate oneself)
            self.ack("comment", self.post(
                "/comment", {"to_user": str(to), "item": str(self.item_id()), "rating": "3",
                             "comment": "fine"}, ('class="ok" id="comment"',), "/comment"))

    @task(1)
    def register(self) -> None:
        nick = f"new-{random.getrandbits(64):016x}"
        self.ack("register", self.post(
            "/register", {"firstname": "A", "lastname": "B", "nickname": nick, "password": "pw",
                          "email": f"{nick}@rubis.lab", "region": str(random.randint(1, 62))},
            ('class="ok" id="register"',), "/register"))

"""The front end: RUBiS's pages as a Starlette application, talking to the middle tier.

    RUBIS_MT=10.77.100.3:7300,10.77.100.4:7300 RUBIS_SECRET=... \\
        python -m backdoors.asgi backdoors.casestudy.rubis.front:app --port 8080
    ... python -m uvicorn backdoors.casestudy.rubis.front:app --port 8081   # plain

Pages (small HTML, each with markers a load driver checks): / (home), /categories,
/regions, /category?id=&page=, /region?id=&category=&page=, /item?id=, /user?id=,
/bids?item=, /search?q=&page=; forms posted to /login, /logout, /register, /bid, /buy,
/comment (application/x-www-form-urlencoded).

Each client connection has its own persistent channel to a middle tier (wire.py), picked
by the connection's identity among RUBIS_MT, opened on its first request and closed
after IDLE_S without one. A call whose channel breaks, or that gets no answer within
RUBIS_CALL_TIMEOUT seconds (30 by default), is sent again once on a new channel to the
next middle tier: the front end's own reconnect-and-retry, what a plain deployment has
for a failing middle tier. The login is a signed cookie (HMAC with RUBIS_SECRET, shared by
every front end): a channel logged in as someone else (or not at all) is told who its
user is (the middle tier's `resume`) before the call. So a channel opened again — after
the middle tier went away, or on another front end after a recovery — is logged in again
from the request itself.

Writes carry an idempotency key. Under the recoverable server it is the session's
(`scope["extensions"]["backdoors.session"]["key"]`: the session id and the request's
number, the same when the request is replayed on another node), so a replayed bid finds
its key at the middle tier and is answered with the recorded result, never applied
twice. Under a plain server it is random per request. A call sent again (above) carries
the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import os
import secrets
import time
import uuid
import zlib
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from .wire import Answer, Call, WireError, frame, proof, read_answer

log = logging.getLogger("backdoors.casestudy")

MT_ENV = "RUBIS_MT"
SECRET_ENV = "RUBIS_SECRET"
TIMEOUT_ENV = "RUBIS_CALL_TIMEOUT"
#: what the log says when a call is sent again to another middle tier
FAILOVER = "the call sent again to"
COOKIE = "rubis"
#: a session's exported state holds the response being sent: pages are a few KiB
STATE_CAPACITY = 256 * 1024
#: a channel unused this long is closed (the client connection went away)
IDLE_S = 60.0
#: a call that gets no answer this long is sent again on a new channel (by default)
CALL_TIMEOUT_S = 30.0


class MtUnavailable(Exception):
    """No middle tier answered (after one retry on a new channel)."""


class CallTooLarge(Exception):
    """A call that no frame can carry: the request's fault, not the channel's."""


class Channel:
    """One client session's channel to a middle tier, `addresses`[`first`] at first;
    calls one at a time, in order. A channel that breaks or times out (`timeout`) is
    opened again to the next middle tier of `addresses`.

    Under the recoverable server (`connect`: the session's, from the backdoors.session
    extension) the channel is the session's own: it moves with the client session, and
    what a replay needs to make the same calls (the middle tier's index, the user it has
    the channel logged in as, the last call's id) is kept in the channel's exported
    state. A recovered channel carries on from that state."""

    def __init__(self, addresses: list[tuple[str, int]], first: int = 0,
                 timeout: float = CALL_TIMEOUT_S, connect=None, secret: bytes = b""):
        self.addresses, self.at, self.timeout = addresses, first % len(addresses), timeout
        self.connect, self.secret = connect, secret
        self.conn = None  # the session's channel (under the recoverable server)
        self.reader = self.writer = None
        self.user: int | None = None  # who the middle tier has this channel logged in as
        self.lock = asyncio.Lock()
        self.next_id = 0
        self.used = time.monotonic()

    @property
    def address(self) -> tuple[str, int]:
        return self.addresses[self.at]

    @property
    def ended(self) -> bool:
        """Its session's channel ended with the session (recoverable server only)."""
        return self.conn is not None and self.conn.closed

    async def _open(self) -> None:
        self.user = None
        if self.connect is None:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(*self.address), self.timeout)
            return
        conn = await asyncio.wait_for(self.connect("mt", *self.address), self.timeout)
        if conn.recovered and conn.state.get("at", len(self.addresses)) < len(self.addresses):
            self.at, self.user, self.next_id = (conn.state["at"], conn.state["user"],
                                                conn.state["next_id"])
        self.conn, self.reader, self.writer = conn, conn.reader, conn.writer
        self._keep()

    def _keep(self) -> None:
        """What a replay on another node needs, into the channel's exported state."""
        if self.conn is not None:
            self.conn.state.update(at=self.at, user=self.user, next_id=self.next_id)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        elif self.writer is not None:
            self.writer.close()
        self.conn = self.reader = self.writer = None

    async def _call(self, op: str, args: dict, key: str) -> Answer:
        try:
            data = frame(Call(self.next_id + 1, op, args, key))
        except (WireError, OverflowError) as e:
            raise CallTooLarge(str(e)) from None
        self.next_id += 1
        self.writer.write(data)
        await self.writer.drain()
        answer = await asyncio.wait_for(read_answer(self.reader), self.timeout)
        if answer is None or answer.id != self.next_id:
            raise WireError(f"the middle tier answered {answer!r} to call {self.next_id}")
        return answer

    async def call(self, user: int | None, op: str, args: dict, key: str = "") -> Answer:
        """`op` as `user` (None: logged out); on a broken channel, once more on a new one."""
        async with self.lock:
            self.used = time.monotonic()
            for attempt in (1, 2):
                try:
                    if self.writer is None:
                        await self._open()
                    if self.user != user and op != "login":
                        if user is None:
                            told = await self._call("logout", {}, "")
                        else:
                            told = await self._call("resume", {"user": user, "proof": proof(
                                self.secret, user)}, "")
                        if not told.ok:  # (the channel is still someone else's: the call
                            # must not run as them; the front ends' setup is at fault)
                            log.error("front end: middle tier %s:%d refused this session's "
                                      "user: %s", *self.address, told.error)
                            return Answer(told.id, False, error="the middle tier did not take "
                                          "this session's user", server=True)
                        self.user = user
                    answer = await self._call(op, args, key)
                    if op == "login" and answer.ok:
                        self.user = answer.result.get("user")
                    self._keep()
                    return answer
                except (OSError, WireError, asyncio.TimeoutError) as e:
                    self.close()
                    host, port = self.address
                    what = str(e) or f"no answer in {self.timeout:g} s"
                    if attempt == 2:
                        raise MtUnavailable(f"middle tier {host}:{port}: {what}") from None
                    self.at = (self.at + 1) % len(self.addresses)
                    log.warning("front end: channel to %s:%d broke (%s): %s %s:%d", host,
                                port, what, FAILOVER, *self.address)
        raise AssertionError("unreachable")


class Channels:
    """The channels of this front end, by client session."""

    def __init__(self, addresses: list[tuple[str, int]], timeout: float = CALL_TIMEOUT_S,
                 secret: bytes = b""):
        self.addresses, self.timeout, self.secret = addresses, timeout, secret
        self.open: dict[str, Channel] = {}

    def get(self, session: str, connect=None) -> Channel:
        """The session's channel; `connect`: the recoverable server's, for channels that
        move with their session."""
        ch = self.open.get(session)
        if ch is None:
            ch = self.open[session] = Channel(self.addresses, zlib.crc32(session.encode()),
                                              self.timeout, connect, self.secret)
        return ch

    async def reap(self) -> None:
        """Close channels unused for IDLE_S. A session's own channel (recoverable server)
        stays open as long as its session: it is only forgotten once it ended with it."""
        while True:
            await asyncio.sleep(IDLE_S / 4)
            now = time.monotonic()
            for session, ch in list(self.open.items()):
                if now - ch.used > IDLE_S and not ch.lock.locked() and (
                        ch.connect is None or ch.conn is None or ch.ended):
                    ch.close()
                    del self.open[session]


def parse_mts(text: str) -> list[tuple[str, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"${MT_ENV}: expected HOST:PORT[,HOST:PORT...], got {part!r}")
        out.append((host, int(port)))
    if not out:
        raise ValueError(f"${MT_ENV} names no middle tier (HOST:PORT[,HOST:PORT...])")
    return out


def parse_timeout(text: str) -> float:
    """$RUBIS_CALL_TIMEOUT: seconds, more than 0 and less than 3600 (empty:
    CALL_TIMEOUT_S)."""
    if not text.strip():
        return CALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise ValueError(f"${TIMEOUT_ENV}: expected seconds, more than 0 and less than 3600, "
                         f"got {text!r}")
    return value


# ---- the session: channel, key, login ----------------------------------------------------


class Bad(Exception):
    """A request answered with `status` and a short page."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def _session(request: Request) -> tuple[str, str, object]:
    """(the client session's identity, an idempotency key for this request, the
    recoverable server's channel opener or None)."""
    ext = request.scope.get("extensions", {}).get("backdoors.session")
    if ext is not None:
        return ext["id"], ext["key"], ext.get("connect")
    host, port = request.scope.get("client") or ("?", 0)
    return f"{host}:{port}", f"fe-{uuid.uuid4().hex}", None


def _sign(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:32]


def _cookie_user(request: Request) -> int | None:
    raw = request.cookies.get(COOKIE, "")
    uid, _, sig = raw.partition(".")
    if _digits(uid, 9) and hmac.compare_digest(sig.encode(), _sign(request.app.state.secret,
                                                                   uid).encode()):
        return int(uid)
    return None


def _digits(value: str, most: int) -> bool:
    """1 to `most` ASCII digits (str.isdigit takes ² and other scripts' digits)."""
    return 0 < len(value) <= most and value.isascii() and value.isdigit()


def _int(params, name: str, default: int | None = None, low: int = 0) -> int:
    value = params.get(name)
    if value is None or value == "":
        if default is None:
            raise Bad(400, f"{name} is missing")
        return default
    if not _digits(value, 9) or int(value) < low:
        raise Bad(400, f"{name} must be a whole number >= {low}, got {value[:40]!r}")
    return int(value)


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    try:
        return {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        raise Bad(400, "the form is not UTF-8") from None


async def _call(request: Request, op: str, *, write: bool = False, **args):
    """The middle tier's result of `op` for this request's session and user."""
    session, key, connect = _session(request)
    user = _cookie_user(request)
    if write and user is None and op != "register":
        raise Bad(403, "log in first")
    try:
        answer = await request.app.state.channels.get(session, connect).call(
            user, op, args, key if write else "")
    except MtUnavailable as e:  # (the middle tiers' addresses are for the log, not the client)
        log.warning("front end: %s", e)
        raise Bad(503, "no middle tier answers now: try again") from None
    except CallTooLarge as e:
        raise Bad(413, f"the request is too large: {e}") from None
    if not answer.ok:  # the database's failure is the server's; a refusal, the request's
        raise Bad(503 if answer.server else 400, answer.error)
    return answer.result, key


# ---- pages ----------------------------------------------------------------------------------

e = html.escape


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><title>RUBiS: {e(title)}</title></head><body>"
        f'<p><a href="/">home</a> <a href="/categories">categories</a> '
        f'<a href="/regions">regions</a></p><h1>{e(title)}</h1>{body}</body></html>',
        status_code=status)


def _items(rows: list[dict]) -> str:
    return "<table class=\"items\">" + "".join(
        f'<tr><td><a href="/item?id={r["id"]}">{e(r["name"])}</a></td>'
        f'<td>{e(r["max_bid"] or "-")}</td><td>{r["nb_of_bids"]}</td>'
        f'<td>{e(r["end_date"])}</td></tr>' for r in rows) + "</table>"


def _links(rows: list[dict], href: str) -> str:
    return "<ul class=\"list\">" + "".join(
        f'<li><a href="{href}{r["id"]}">{e(r["name"])}</a></li>' for r in rows) + "</ul>"


async def home(request: Request):
    user = _cookie_user(request)
    who = f'<p id="who" data-user="{user}">logged in as user {user}</p>' if user else \
        '<p id="who">not logged in</p>'
    return _page("home", who + '<form method="post" action="/login"><input name="nickname">'
                 '<input name="password" type="password"><button>log in</button></form>')


async def categories(request: Request):
    rows, _ = await _call(request, "categories")
    return _page("categories", _links(rows, "/category?id="))


async def regions(request: Request):
    rows, _ = await _call(request, "regions")
    return _page("regions", _links(rows, "/region?id="))


async def category(request: Request):
    q = request.query_params
    cat, page = _int(q, "id", low=1), _int(q, "page", 0)
    rows, _ = await _call(request, "category_items", category=cat, page=page)
    return _page(f"category {cat}", _items(rows))


async def region(request: Request):
    q = request.query_params
    reg, cat, page = _int(q, "id", low=1), _int(q, "category", 1, low=1), _int(q, "page", 0)
    rows, _ = await _call(request, "region_items", region=reg, category=cat, page=page)
    return _page(f"region {reg}", _items(rows))


async def search(request: Request):
    q = request.query_params
    words, page = q.get("q", ""), _int(q, "page", 0)
    rows, _ = await _call(request, "search", words=words, page=page)
    return _page(f"search {words}", _items(rows))


async def item(request: Request):
    iid = _int(request.query_params, "id", low=1)
    it, _ = await _call(request, "item", item=iid)
    if it is None:
        raise Bad(404, f"no item {iid}")
    return _page(f"item {iid}", (
        f'<div class="item" data-id="{it["id"]}" data-max="{e(it["max_bid"] or "0")}" '
        f'data-initial="{e(it["initial_price"])}" data-quantity="{it["quantity"]}" '
        f'data-seller="{it["seller"]["id"]}"><h2>{e(it["name"])}</h2>'
        f'<p>{e(it["description"])}</p><p>bids: {it["nb_of_bids"]}, best '
        f'{e(it["max_bid"] or "-")}, buy now {e(it["buy_now"])}, ends {e(it["end_date"])}</p>'
        f'<p>seller <a href="/user?id={it["seller"]["id"]}">{e(it["seller"]["nickname"])}'
        f'</a> <a href="/bids?item={iid}">bid history</a></p></div>'
        f'<form method="post" action="/bid"><input type="hidden" name="item" value="{iid}">'
        f'<input name="bid"><button>bid</button></form>'))


async def user(request: Request):
    uid = _int(request.query_params, "id", low=1)
    u, _ = await _call(request, "user", user=uid)
    if u is None:
        raise Bad(404, f"no user {uid}")
    comments = "".join(f'<li>{e(c["nickname"])} ({c["rating"]}): {e(c["comment"])}</li>'
                       for c in u["comments"])
    return _page(f"user {uid}", f'<div class="user" data-id="{u["id"]}"><h2>'
                 f'{e(u["nickname"])}</h2><p>rating {u["rating"]}, since {e(u["since"])}</p>'
                 f'<ul class="comments">{comments}</ul></div>')


async def bids(request: Request):
    iid = _int(request.query_params, "item", low=1)
    rows, _ = await _call(request, "bids", item=iid)
    return _page(f"bids on item {iid}", "<table class=\"bids\">" + "".join(
        f'<tr><td>{e(b["nickname"])}</td><td>{e(b["bid"])}</td><td>{e(b["date"])}</td></tr>'
        for b in rows) + "</table>")


def _outcome(kind: str, result: dict, key: str, **data) -> HTMLResponse:
    """A write's answer page: accepted (with what the site recorded) or refused."""
    if result.get("ok"):
        attrs = " ".join(f'data-{k}="{e(str(v))}"' for k, v in data.items())
        return _page(f"{kind} accepted", f'<p class="ok" id="{kind}" data-key="{e(key)}" '
                     f'{attrs}>{kind} accepted</p>')
    return _page(f"{kind} refused", f'<p class="refused" id="{kind}" data-key="{e(key)}">'
                 f'{e(result.get("reason", "refused"))}</p>')


async def login(request: Request):
    f = await _form(request)
    result, _ = await _call(request, "login", nickname=f.get("nickname", ""),
                            password=f.get("password", ""))
    if not result["ok"]:
        return _page("login refused", '<p class="refused" id="login">wrong nickname or '
                     'password</p>', status=403)
    uid = result["user"]
    response = _page("logged in", f'<p class="ok" id="login" data-user="{uid}">welcome, user '
                     f'{uid}</p>')
    response.set_cookie(COOKIE, f"{uid}.{_sign(request.app.state.secret, str(uid))}",
                        httponly=True, samesite="lax")
    return response


async def logout(request: Request):
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE)
    return response


async def register(request: Request):
    f = await _form(request)
    fields = {k: f.get(k, "") for k in ("firstname", "lastname", "nickname", "password",
                                         "email")}
    result, key = await _call(request, "register", write=True, region=_int(f, "region", low=1),
                              **fields)
    return _outcome("register", result, key, user=result.get("user", ""))


async def bid(request: Request):
    f = await _form(request)
    args = {"item": _int(f, "item", low=1), "bid": f.get("bid", "")}
    if f.get("max_bid"):
        args["max_bid"] = f["max_bid"]
    result, key = await _call(request, "bid", write=True, qty=_int(f, "qty", 1, low=1), **args)
    return _outcome("bid", result, key, bid=result.get("bid", ""), item=args["item"],
                    price=result.get("price", ""))


async def buy(request: Request):
    f = await _form(request)
    result, key = await _call(request, "buy", write=True, item=_int(f, "item", low=1),
                              qty=_int(f, "qty", 1, low=1))
    return _outcome("buy", result, key, purchase=result.get("purchase", ""))


async def comment(request: Request):
    f = await _form(request)
    rating = f.get("rating", "0")
    if not _digits(rating.removeprefix("-"), 1):
        raise Bad(400, f"rating must be a whole number from -5 to 5, got {rating[:40]!r}")
    result, key = await _call(request, "comment", write=True, to_user=_int(f, "to_user", low=1),
                              item=_int(f, "item", low=1), rating=int(rating),
                              comment=f.get("comment", ""))
    return _outcome("comment", result, key, comment=result.get("comment", ""))


async def _bad(request: Request, exc: Bad) -> HTMLResponse:
    return _page("error", f'<p class="error">{e(str(exc))}</p>', status=exc.status)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    """Read the configuration; reap idle channels while serving."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        log.warning("front end: $%s not set: a random secret (cookies of this front end "
                    "only, and middle tiers refuse its channels' resume)", SECRET_ENV)
    app.state.secret = (secret or secrets.token_hex(16)).encode()
    app.state.channels = Channels(parse_mts(os.environ.get(MT_ENV, "")),
                                  parse_timeout(os.environ.get(TIMEOUT_ENV, "")),
                                  app.state.secret)
    reaper = asyncio.create_task(app.state.channels.reap())
    try:
        yield
    finally:
        reaper.cancel()
        for ch in app.state.channels.open.values():
            ch.close()


app = Starlette(routes=[
    Route("/", home), Route("/categories", categories), Route("/regions", regions),
    Route("/category", category), Route("/region", region), Route("/search", search),
    Route("/item", item), Route("/user", user), Route("/bids", bids),
    Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
    Route("/register", register, methods=["POST"]), Route("/bid", bid, methods=["POST"]),
    Route("/buy", buy, methods=["POST"]), Route("/comment", comment, methods=["POST"]),
], exception_handlers={Bad: _bad}, lifespan=lifespan)

"""RUBiS's interactions as queries: what the middle tier does for each request.

Every function takes a psycopg 3 AsyncConnection in autocommit mode (a read is its own
statement; a write opens its one transaction) and returns plain
JSON-able values (money as strings, times as ISO 8601), so a result can be recorded,
replayed and compared byte for byte.

State-changing interactions (register, place_bid, buy_now, leave_comment) are
exactly-once: each takes the request's idempotency `key` and records the key with its
result in the same transaction as its effect (table `requests`). A request replayed after
a recovery finds its key and returns the recorded result without applying anything again;
a replay racing the original waits on the key's row lock and then reads its result. A
refused request (a bid too low, no stock left) is recorded too, so its replay is refused
the same way. Returns (result, replayed).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from ...errors import BackdoorsError

PAGE = 25
KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
MAX_TEXT = 2000


class RequestError(BackdoorsError):
    """A request the middle tier refuses before touching the database (bad field, bad key,
    or a key reused for another kind of request)."""


def _money(v: Decimal | None) -> str | None:
    return None if v is None else f"{v:.2f}"


def _when(v: datetime) -> str:
    return v.astimezone(timezone.utc).isoformat()


def _price(text: str | int | float | Decimal, what: str) -> Decimal:
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        raise RequestError(f"{what} must be a price, got {text!r}") from None
    for _ in range(2):  # before rounding (which a huge exponent would fail), and after it
        # (9999999999.995 rounds to 10^10, past numeric(12, 2); 0.001 to 0)
        if not value.is_finite() or not 0 < value < Decimal(10) ** 10:
            raise RequestError(f"{what} must be a positive price below 10^10, got {text!r}")
        value = value.quantize(Decimal("0.01"))
    return value


def _whole(value: Any, what: str, low: int = 1, high: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{what} must be a whole number in {low}..{high}, got {value!r}")
    return value


whole = _whole  # for the middle tier's own fields


def _text(value: Any, what: str, most: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > most or "\x00" in value:
        raise RequestError(f"{what} must be text of 1..{most} characters")
    return value


# ---- reads ------------------------------------------------------------------------------


async def _rows(conn, sql: str, args: tuple = ()) -> list[tuple]:
    cur = await conn.execute(sql, args)
    return await cur.fetchall()


async def browse_categories(conn) -> list[dict]:
    return [{"id": i, "name": n} for i, n in
            await _rows(conn, "SELECT id, name FROM categories ORDER BY id")]


async def browse_regions(conn) -> list[dict]:
    return [{"id": i, "name": n} for i, n in
            await _rows(conn, "SELECT id, name FROM regions ORDER BY id")]


def _item_rows(rows) -> list[dict]:
    return [{"id": i, "name": n, "max_bid": _money(m), "nb_of_bids": b, "end_date": _when(e)}
            for i, n, m, b, e in rows]


async def items_in_category(conn, category: int, page: int = 0) -> list[dict]:
    category, page = _whole(category, "category"), _whole(page, "page", 0, 10_000)
    return _item_rows(await _rows(
        conn, "SELECT id, name, max_bid, nb_of_bids, end_date FROM items WHERE category = %s "
              "ORDER BY end_date, id LIMIT %s OFFSET %s", (category, PAGE, page * PAGE)))


async def items_in_region(conn, region: int, category: int, page: int = 0) -> list[dict]:
    region, category = _whole(region, "region"), _whole(category, "category")
    page = _whole(page, "page", 0, 10_000)
    return _item_rows(await _rows(
        conn, "SELECT i.id, i.name, i.max_bid, i.nb_of_bids, i.end_date FROM items i "
              "JOIN users u ON u.id = i.seller WHERE u.region = %s AND i.category = %s "
              "ORDER BY i.end_date, i.id LIMIT %s OFFSET %s",
        (region, category, PAGE, page * PAGE)))


async def search(conn, words: str, page: int = 0) -> list[dict]:
    words, page = _text(words, "search words", 100), _whole(page, "page", 0, 10_000)
    pattern = "%" + words.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return _item_rows(await _rows(
        conn, "SELECT id, name, max_bid, nb_of_bids, end_date FROM items WHERE name ILIKE %s "
              "ORDER BY end_date, id LIMIT %s OFFSET %s", (pattern, PAGE, page * PAGE)))


async def view_item(conn, item: int) -> dict | None:
    rows = await _rows(
        conn, "SELECT i.id, i.name, i.description, i.initial_price, i.quantity, i.buy_now, "
              "i.nb_of_bids, i.max_bid, i.end_date, u.id, u.nickname FROM items i "
              "JOIN users u ON u.id = i.seller WHERE i.id = %s", (_whole(item, "item"),))
    if not rows:
        return None
    i, n, d, p, q, b, nb, m, e, sid, snick = rows[0]
    return {"id": i, "name": n, "description": d, "initial_price": _money(p), "quantity": q,
            "buy_now": _money(b), "nb_of_bids": nb, "max_bid": _money(m), "end_date": _when(e),
            "seller": {"id": sid, "nickname": snick}}


async def view_user(conn, user: int) -> dict | None:
    rows = await _rows(conn, "SELECT id, nickname, rating, creation_date, region FROM users "
                             "WHERE id = %s", (_whole(user, "user"),))
    if not rows:
        return None
    i, nick, rating, created, region = rows[0]
    comments = await _rows(
        conn, "SELECT c.from_user_id, u.nickname, c.rating, c.comment FROM comments c "
              "JOIN users u ON u.id = c.from_user_id WHERE c.to_user_id = %s "
              "ORDER BY c.id DESC LIMIT %s", (i, PAGE))
    return {"id": i, "nickname": nick, "rating": rating, "since": _when(created),
            "region": region, "comments": [{"from": f, "nickname": n, "rating": r, "comment": c}
                                           for f, n, r, c in comments]}


async def bid_history(conn, item: int) -> list[dict]:
    return [{"user": u, "nickname": n, "bid": _money(b), "date": _when(d)} for u, n, b, d in
            await _rows(conn, "SELECT b.user_id, u.nickname, b.bid, b.date FROM bids b "
                              "JOIN users u ON u.id = b.user_id WHERE b.item_id = %s "
                              "ORDER BY b.bid DESC, b.id LIMIT %s", (_whole(item, "item"), PAGE))]


async def login(conn, nickname: str, password: str) -> int | None:
    """The user's id when the password matches, else None."""
    rows = await _rows(conn, "SELECT id FROM users WHERE nickname = %s AND password = %s",
                       (_text(nickname, "nickname", 64), _text(password, "password", 128)))
    return rows[0][0] if rows else None


# ---- exactly-once writes ---------------------------------------------------------------------


async def once(conn, key: str, kind: str, request: dict,
               effect: Callable[[Any], Awaitable[dict]]) -> tuple[dict, bool]:
    """Run `effect(conn)` once per `key`, in one transaction with the key's record:
    (result, replayed). `request` is what it asks (its user and arguments): the key's
    replay must ask the same, or it is refused."""
    from psycopg.types.json import Jsonb

    if not isinstance(key, str) or not KEY_RE.match(key):
        raise RequestError("idempotency key must be 8..128 characters of [A-Za-z0-9._:-]")
    asked = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO requests (key, kind, request, result) VALUES (%s, %s, %s, 'null') "
            "ON CONFLICT (key) DO NOTHING", (key, kind, asked))
        if cur.rowcount == 0:
            old_kind, old_request, result = (await _rows(
                conn, "SELECT kind, request, result FROM requests WHERE key = %s", (key,)))[0]
            if old_kind != kind:
                raise RequestError(f"idempotency key {key} was used for a {old_kind} request, "
                                   f"not {kind}")
            if old_request != asked:
                raise RequestError(f"idempotency key {key} was used for another {kind} "
                                   "request (another user, or other arguments)")
            return result, True
        result = await effect(conn)
        # what was stored (jsonb orders keys its own way): the original answer and every
        # replay of it are then the same, byte for byte
        stored = await _rows(conn, "UPDATE requests SET result = %s WHERE key = %s "
                                   "RETURNING result", (Jsonb(result), key))
        return stored[0][0], False


async def register(conn, key: str, *, firstname: str, lastname: str, nickname: str,
                   password: str, email: str, region: int) -> tuple[dict, bool]:
    fields = (_text(firstname, "firstname", 64), _text(lastname, "lastname", 64),
              _text(nickname, "nickname", 64), _text(password, "password", 128),
              _text(email, "email", 128), _whole(region, "region"))

    async def effect(c) -> dict:
        taken = await _rows(c, "SELECT 1 FROM users WHERE nickname = %s", (fields[2],))
        if taken:
            return {"ok": False, "reason": "nickname taken"}
        if not await _rows(c, "SELECT 1 FROM regions WHERE id = %s", (fields[5],)):
            return {"ok": False, "reason": "no such region"}
        made = await _rows(  # (a registration of the same nickname under way: its end
            # is waited for, and if it took the nickname, nothing is made)
            c, "INSERT INTO users (firstname, lastname, nickname, password, email, "
               "creation_date, region, key) VALUES (%s, %s, %s, %s, %s, now(), %s, %s) "
               "ON CONFLICT (nickname) DO NOTHING RETURNING id", (*fields, key))
        if not made:
            return {"ok": False, "reason": "nickname taken"}
        return {"ok": True, "user": made[0][0]}

    return await once(conn, key, "register", {"fields": fields}, effect)


async def place_bid(conn, key: str, *, user: int, item: int, bid: str, max_bid: str | None = None,
                    qty: int = 1) -> tuple[dict, bool]:
    user, item, qty = _whole(user, "user"), _whole(item, "item"), _whole(qty, "qty", 1, 1000)
    price = _price(bid, "bid")
    ceiling = _price(max_bid, "max_bid") if max_bid is not None else price
    if ceiling < price:
        raise RequestError("max_bid must be at least the bid")

    async def effect(c) -> dict:
        rows = await _rows(c, "SELECT initial_price, max_bid, quantity FROM items WHERE id = %s "
                              "FOR UPDATE", (item,))
        if not rows:
            return {"ok": False, "reason": "no such item"}
        initial, current, stock = rows[0]
        if qty > stock:
            return {"ok": False, "reason": "not enough items"}
        if price < initial or price <= current:
            return {"ok": False, "reason": "bid too low", "max_bid": _money(max(initial, current))}
        bid_id = (await _rows(
            c, "INSERT INTO bids (user_id, item_id, qty, bid, max_bid, date, key) "
               "VALUES (%s, %s, %s, %s, %s, now(), %s) RETURNING id",
            (user, item, qty, price, ceiling, key)))[0][0]
        await c.execute("UPDATE items SET max_bid = %s, nb_of_bids = nb_of_bids + 1 WHERE id = %s",
                        (price, item))
        return {"ok": True, "bid": bid_id, "item": item, "price": _money(price)}

    return await once(conn, key, "bid", {"user": user, "item": item, "qty": qty,
                                         "bid": str(price), "max_bid": str(ceiling)}, effect)


async def buy_now(conn, key: str, *, user: int, item: int, qty: int = 1) -> tuple[dict, bool]:
    user, item, qty = _whole(user, "user"), _whole(item, "item"), _whole(qty, "qty", 1, 1000)

    async def effect(c) -> dict:
        rows = await _rows(c, "SELECT quantity, buy_now FROM items WHERE id = %s FOR UPDATE",
                           (item,))
        if not rows:
            return {"ok": False, "reason": "no such item"}
        stock, price = rows[0]
        if qty > stock:
            return {"ok": False, "reason": "not enough items", "quantity": stock}
        purchase = (await _rows(
            c, "INSERT INTO buy_now (buyer_id, item_id, qty, date, key) "
               "VALUES (%s, %s, %s, now(), %s) RETURNING id", (user, item, qty, key)))[0][0]
        await c.execute("UPDATE items SET quantity = quantity - %s WHERE id = %s", (qty, item))
        return {"ok": True, "purchase": purchase, "item": item, "qty": qty,
                "price": _money(price)}

    return await once(conn, key, "buy_now", {"user": user, "item": item, "qty": qty}, effect)


async def leave_comment(conn, key: str, *, user: int, to_user: int, item: int, rating: int,
                        comment: str) -> tuple[dict, bool]:
    fields = (_whole(user, "user"), _whole(to_user, "to_user"), _whole(item, "item"),
              _whole(rating, "rating", -5, 5), _text(comment, "comment"))

    async def effect(c) -> dict:
        if fields[0] == fields[1]:
            return {"ok": False, "reason": "a user does not rate themselves"}
        if len(await _rows(c, "SELECT 1 FROM users WHERE id = ANY(%s)",
                           ([fields[0], fields[1]],))) != len({fields[0], fields[1]}):
            return {"ok": False, "reason": "no such user"}
        if not await _rows(c, "SELECT 1 FROM items WHERE id = %s", (fields[2],)):
            return {"ok": False, "reason": "no such item"}
        cid = (await _rows(
            c, "INSERT INTO comments (from_user_id, to_user_id, item_id, rating, date, comment, "
               "key) VALUES (%s, %s, %s, %s, now(), %s, %s) RETURNING id", (*fields, key)))[0][0]
        await c.execute("UPDATE users SET rating = rating + %s WHERE id = %s",
                        (fields[3], fields[1]))
        return {"ok": True, "comment": cid}

    return await once(conn, key, "comment", {"fields": fields}, effect)

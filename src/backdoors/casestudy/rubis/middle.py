"""The middle tier: RUBiS's application logic behind the wire protocol, one session per
front-end channel, each holding its user's login.

    await serve_session(reader, writer, pool)               # plain streams
    await serve_session(cb.reader, cb.writer, pool, box=cb)  # a Continuation Box's

A session answers calls in order. With a box, it exports its state — the logged-in user,
the calls served, and the reply about to be sent — after the call's effect is committed
and before the reply's first byte is written. A recovered session therefore resumes with
the reply in hand and re-sends it (the box skips what the front end already has), and
input read after that export is replayed: a replayed write finds its idempotency key and
gets its recorded result, a replayed read runs again (none of its answer had been sent).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psycopg

from ...common.text import clip
from ...continuations.errors import StateTooLargeError
from . import store
from .wire import Answer, Call, WireError, frame, proof, read_call

log = logging.getLogger("backdoors.casestudy")

#: the front ends' shared secret (RUBIS_SECRET): `resume` needs its proof (mt.py sets it)
SECRET = b""
#: a session's calls: none for this long and it is closed (a front end closes an idle
#: client's session, and its channel with it, after 75 s); a call begun must be whole
#: within CALL_S (a peer that sends half a frame holds nothing for long)
IDLE_S = 300.0
CALL_S = 10.0
#: an error answer quotes at most this much of what it refuses (the answer must fit a
#: frame and the box)
ERROR_CHARS = 300


class SessionState(msgspec.Struct):
    user: int | None = None
    served: int = 0
    pending: bytes = b""  # the reply being sent when the state was exported


def _need_user(state: SessionState) -> int:
    if state.user is None:
        raise store.RequestError("log in first")
    return state.user


def _takes(*names: str):
    """Mark an op with the argument names it accepts (others are refused by name)."""
    def mark(op):
        op.takes = frozenset(names)
        return op
    return mark


@_takes("nickname", "password")
async def _login(conn, state: SessionState, a: dict) -> Any:
    user = await store.login(conn, a.get("nickname"), a.get("password"))
    state.user = user
    return {"ok": user is not None, "user": user}


@_takes("user", "proof")
async def _resume(conn, state: SessionState, a: dict) -> Any:
    """Log the channel in as `user` without a password: the front end's word, after it
    checked the user's signed cookie, with its proof of the front ends' secret. For a
    channel the front end opens again (after its own recovery, or a reconnect)."""
    user = store.whole(a.get("user"), "user")
    if not SECRET:
        raise store.RequestError("resume is off: this middle tier has no $RUBIS_SECRET")
    if not hmac.compare_digest(str(a.get("proof", "")).encode(), proof(SECRET, user).encode()):
        raise store.RequestError("resume refused: its proof is not of the front ends' secret")
    state.user = user
    return {"ok": True, "user": state.user}


@_takes()
async def _logout(conn, state: SessionState, a: dict) -> Any:
    state.user = None
    return {"ok": True}


def _read(fn: Callable[..., Awaitable[Any]], *names: str):
    @_takes(*names)
    async def op(conn, state: SessionState, a: dict) -> Any:
        return await fn(conn, *(a.get(n, 0 if n == "page" else None) for n in names))
    return op


def _write(fn: Callable[..., Awaitable[tuple[dict, bool]]], *names: str, as_user: str = "user"):
    @_takes(*names)
    async def op(conn, state: SessionState, a: dict, key: str) -> Any:
        kw = {n: a[n] for n in names if n in a}
        if as_user:
            kw[as_user] = _need_user(state)
        result, _ = await fn(conn, key, **kw)
        return result
    return op


READS = {
    "categories": _read(store.browse_categories),
    "regions": _read(store.browse_regions),
    "category_items": _read(store.items_in_category, "category", "page"),
    "region_items": _read(store.items_in_region, "region", "category", "page"),
    "item": _read(store.view_item, "item"),
    "user": _read(store.view_user, "user"),
    "bids": _read(store.bid_history, "item"),
    "search": _read(store.search, "words", "page"),
    "login": _login,
    "resume": _resume,
    "logout": _logout,
}
WRITES = {
    "register": _write(store.register, "firstname", "lastname", "nickname", "password",
                       "email", "region", as_user=""),
    "bid": _write(store.place_bid, "item", "bid", "max_bid", "qty"),
    "buy": _write(store.buy_now, "item", "qty"),
    "comment": _write(store.leave_comment, "to_user", "item", "rating", "comment"),
}


async def dispatch(conn, state: SessionState, call: Call) -> Answer:
    """The answer to one call; a refused call is an answer with ok False, never a crash."""
    try:
        op = READS.get(call.op) or WRITES.get(call.op)
        if op is not None and (extra := set(call.args) - op.takes):
            raise store.RequestError(f"{call.op} takes {sorted(op.takes)}, not {sorted(extra)}")
        if call.op in READS:
            return Answer(call.id, True, await READS[call.op](conn, state, call.args))
        if call.op in WRITES:
            if not call.key:
                raise store.RequestError(f"{call.op} needs an idempotency key")
            return Answer(call.id, True, await WRITES[call.op](conn, state, call.args, call.key))
        return Answer(call.id, False, error=clip(f"unknown op {call.op!r}", ERROR_CHARS))
    except store.RequestError as e:
        return Answer(call.id, False, error=clip(str(e), ERROR_CHARS))
    except TypeError as e:  # a required argument missing
        return Answer(call.id, False,
                      error=clip(f"bad arguments for {call.op!r}: {e}", ERROR_CHARS))
    except psycopg.Error as e:  # rolled back: nothing of a write was applied
        log.warning("middle tier: %s failed in the database: %s", clip(call.op, 64), e)
        return Answer(call.id, False, error=f"database: {type(e).__name__}", server=True)


async def serve_session(reader, writer, pool, *, box=None) -> int:
    """Answer calls until the front end closes; returns the calls served. `pool`: a
    psycopg_pool AsyncConnectionPool of autocommit connections; `box`: the session's
    AsyncContinuationBox (recoverable) or None."""
    state = (box.import_state(SessionState) if box is not None else None) or SessionState()
    if state.pending:  # recovered: the reply being sent when the old server stopped
        writer.write(state.pending)
        await writer.drain()
    while True:
        try:
            call = await read_call(reader, idle_s=IDLE_S, call_s=CALL_S)
        except WireError as e:
            log.warning("middle tier: closing the session of %s: %s", _peer(writer), e)
            return state.served
        if call is None:
            return state.served
        try:
            conn = await pool.getconn()
        except psycopg.Error as e:  # none free in time (PoolTimeout: all held, say by calls
            # waiting on a frozen peer's row lock), or none could be made: the call's answer
            log.warning("middle tier: no database connection for %s: %s", clip(call.op, 64), e)
            answer = Answer(call.id, False, error=f"database: {type(e).__name__}", server=True)
        else:
            try:
                answer = await dispatch(conn, state, call)
            finally:
                await pool.putconn(conn)
        reply = _reply(answer)
        state.served += 1
        if box is not None:
            state.pending = reply
            try:
                await box.export(state)
            except StateTooLargeError as e:  # applied, and not answerable as it is
                log.warning("middle tier: call %d of %s: %s", call.id, _peer(writer), e)
                state.pending = reply = frame(Answer(call.id, False, server=True, error=(
                    "the answer is over the session's state capacity")))
                await box.export(state)
        writer.write(reply)
        await writer.drain()


def _reply(answer: Answer) -> bytes:
    """The answer's frame; one too large for a frame becomes an error answer."""
    try:
        return frame(answer)
    except WireError as e:
        return frame(Answer(answer.id, False, server=True, error=f"the answer: {e}"))


def _peer(writer) -> str:
    """Who is at the other end of a session (for the logs)."""
    try:
        peer = writer.get_extra_info("peername")
    except Exception:  # noqa: BLE001 - a closed transport
        peer = None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a front end"

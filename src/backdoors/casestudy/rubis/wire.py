"""The front end ↔ middle tier protocol: length-prefixed msgpack frames on a persistent
TCP connection, one request then its reply, in order.

    frame:   u32 big-endian length, then msgpack (at most MAX_FRAME bytes)
    request: Call {id, op, args, key}     key: the idempotency key of a write, else ""
    reply:   Answer {id, ok, result, error}

A reply is a pure function of what the database recorded for its request (writes) or of
the database at the time (reads), so the middle tier can export its session state with
the reply in it before sending it (see middle.py) and a recovered session re-sends it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from typing import Any

import msgspec

from ...errors import BackdoorsError

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class WireError(BackdoorsError):
    """A frame that is too long, truncated or not a Call/Answer."""


class Call(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    op: str
    args: dict[str, Any] = {}
    key: str = ""


class Answer(msgspec.Struct):
    id: int
    ok: bool
    result: Any = None
    error: str = ""
    server: bool = False  # the error is the server's (its database), not the call's


def proof(secret: bytes, user: int) -> str:
    """What a front end shows for `resume` as `user`: a middle tier trusts a proof of the
    front ends' secret (RUBIS_SECRET), not whoever reaches its port."""
    return hmac.new(secret, f"resume:{user}".encode(), hashlib.sha256).hexdigest()[:32]


_enc = msgspec.msgpack.Encoder()
_dec_call = msgspec.msgpack.Decoder(Call).decode
_dec_answer = msgspec.msgpack.Decoder(Answer).decode


def frame(msg: Call | Answer) -> bytes:
    body = _enc.encode(msg)
    if len(body) > MAX_FRAME:
        raise WireError(f"a frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


async def _read_frame(reader, idle_s: float | None, call_s: float | None) -> bytes | None:
    """The next frame's body; None at a clean end of stream (between frames). Its first
    byte must come within `idle_s`, the rest within `call_s` of it (None: no limit)."""
    try:
        head = await asyncio.wait_for(reader.read(_LEN.size), idle_s)
    except asyncio.TimeoutError:
        raise WireError(f"no call for {idle_s:g} s") from None
    if not head:
        return None
    try:
        async with asyncio.timeout(call_s):
            while len(head) < _LEN.size:
                more = await reader.read(_LEN.size - len(head))
                if not more:
                    raise WireError("the stream ended inside a frame header")
                head += more
            (n,) = _LEN.unpack(head)
            if n > MAX_FRAME:
                raise WireError(f"a frame of {n} bytes announced, over the {MAX_FRAME}-byte limit")
            try:
                return await reader.readexactly(n)
            except asyncio.IncompleteReadError:
                raise WireError(f"the stream ended inside a frame of {n} bytes") from None
            except (OSError, BackdoorsError) as e:  # the socket's, or the CB reader's (log full)
                raise WireError(f"a frame of {n} bytes could not be read: {e}") from None
    except TimeoutError:
        raise WireError(f"a frame not whole {call_s:g} s after its first byte") from None


async def _read(reader, decode, what: str, idle_s: float | None = None,
                call_s: float | None = None):
    body = await _read_frame(reader, idle_s, call_s)
    if body is None:
        return None
    try:
        return decode(body)
    except msgspec.ValidationError as e:
        raise WireError(f"not {what}: {str(e)[:300]}") from None
    except msgspec.DecodeError as e:
        raise WireError(f"not msgpack: {e}") from None
    except RecursionError:
        raise WireError(f"not {what}: nested too deep") from None


async def read_call(reader, *, idle_s: float | None = None,
                    call_s: float | None = None) -> Call | None:
    """The next call; None at a clean end of stream. WireError when none begins within
    `idle_s`, or one begun is not whole within `call_s` (None: no limit)."""
    return await _read(reader, _dec_call, "a call", idle_s, call_s)


async def read_answer(reader) -> Answer | None:
    """The next answer; None at a clean end of stream."""
    return await _read(reader, _dec_answer, "an answer")

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


_enc = msgspec.msgpack.Encoder()
_dec_call = msgspec.msgpack.Decoder(Call).decode
_dec_answer = msgspec.msgpack.Decoder(Answer).decode


def frame(msg: Call | Answer) -> bytes:
    body = _enc.encode(msg)
    if len(body) > MAX_FRAME:
        raise WireError(f"a frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


async def _read_frame(reader) -> bytes | None:
    """The next frame's body; None at a clean end of stream (between frames)."""
    head = await reader.read(_LEN.size)
    if not head:
        return None
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
    except Exception as e:  # asyncio.IncompleteReadError, or the CB reader's
        raise WireError(f"the stream ended inside a frame of {n} bytes") from e


async def _read(reader, decode, what: str):
    body = await _read_frame(reader)
    if body is None:
        return None
    try:
        return decode(body)
    except msgspec.ValidationError as e:
        raise WireError(f"not {what}: {e}") from None
    except msgspec.DecodeError as e:
        raise WireError(f"not msgpack: {e}") from None


async def read_call(reader) -> Call | None:
    """The next call; None at a clean end of stream."""
    return await _read(reader, _dec_call, "a call")


async def read_answer(reader) -> Answer | None:
    """The next answer; None at a clean end of stream."""
    return await _read(reader, _dec_answer, "an answer")

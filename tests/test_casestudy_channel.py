"""The front end's channel to the middle tiers: a call whose middle tier breaks the channel
or does not answer in time is sent once more, with its key, to the next middle tier."""

from __future__ import annotations

import asyncio

import pytest

from backdoors.casestudy.rubis.front import Channel, MtUnavailable, parse_timeout
from backdoors.casestudy.rubis.wire import Answer, frame, read_call


async def _server(behaviour: str, seen: list):
    """A middle tier on localhost: "answer" each call, "close" the channel on the first
    call, or stay "silent"."""

    async def handle(reader, writer):
        while (call := await read_call(reader)) is not None:
            seen.append((behaviour, call.op, call.key))
            if behaviour == "close":
                writer.close()
                return
            if behaviour == "answer":
                writer.write(frame(Answer(call.id, True, {"op": call.op})))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


@pytest.mark.parametrize("first", ["close", "silent"])
def test_a_call_goes_once_more_to_the_next_middle_tier(first):
    async def main():
        seen: list = []
        bad, bad_addr = await _server(first, seen)
        good, good_addr = await _server("answer", seen)
        async with bad, good:
            ch = Channel([bad_addr, good_addr], first=0, timeout=2.0)
            answer = await ch.call(None, "bid", {"item": 1}, key="k-1")
            assert answer.ok and answer.result == {"op": "bid"}
            assert ch.address == good_addr
            # the next call stays on the middle tier that answered
            assert (await ch.call(None, "item", {})).ok
            ch.close()
        return seen

    seen = asyncio.run(main())
    # sent again with its key, to the other middle tier
    assert [s for s in seen if s[1] == "bid"] == [(first, "bid", "k-1"), ("answer", "bid", "k-1")]
    assert [s[0] for s in seen if s[1] == "item"] == ["answer"]


def test_a_call_fails_after_its_second_attempt():
    async def main():
        seen: list = []
        a, a_addr = await _server("silent", seen)
        b, b_addr = await _server("close", seen)
        async with a, b:
            ch = Channel([a_addr, b_addr], first=0, timeout=1.0)
            with pytest.raises(MtUnavailable, match=f"middle tier {b_addr[0]}:{b_addr[1]}"):
                await ch.call(None, "bid", {}, key="k-2")
        return seen

    seen = asyncio.run(main())
    assert [s for s in seen if s[1] == "bid"] == [("silent", "bid", "k-2"), ("close", "bid", "k-2")]


def test_the_call_timeout_setting():
    assert parse_timeout("") == 30.0 and parse_timeout("1.5") == 1.5
    for bad in ("0", "-1", "nan", "inf", "soon", "7200"):
        with pytest.raises(ValueError, match="RUBIS_CALL_TIMEOUT"):
            parse_timeout(bad)

"""Channels recovered on a node wait for their session (continuations.channels.Handed):
claimed in either order of arrival, a missing one given up after the wait, and the ones
no session claims closed. The moves themselves are tested on real sockets in
test_asgi.py and test_casestudy_fe.py."""

from __future__ import annotations

import asyncio

from backdoors.continuations import channels
from backdoors.continuations.channels import ChannelState, Handed


class Box:
    """What Handed needs of a channel's box: its id, and close()."""

    def __init__(self, session: str):
        self.session, self.closed = session, False

    def close(self) -> None:
        self.closed = True


def test_a_session_claims_its_channels_whichever_comes_first():
    async def go() -> None:
        handed = Handed()
        early, late = Box("c1"), Box("c2")
        handed.put(early, ChannelState("s1", "mt"))
        claim_late = asyncio.create_task(handed.claim("c2", wait=5))
        await asyncio.sleep(0.01)
        handed.put(late, ChannelState("s1", "db", {"n": 1}))
        assert (await handed.claim("c1", wait=5))[0] is early
        box, kept = await claim_late
        assert box is late and kept.state == {"n": 1}
        assert not early.closed and not late.closed
    asyncio.run(go())


def test_a_channel_that_never_comes_is_given_up_and_one_nobody_claims_is_closed(monkeypatch):
    monkeypatch.setattr(channels, "ORPHAN_S", 0.05)

    async def go() -> None:
        handed = Handed()
        assert await handed.claim("gone", wait=0.05) is None
        late = Box("gone")  # it comes after all: nobody waits for it any more
        opened_after, other = Box("c3"), Box("c4")
        handed.put(late, ChannelState("s1", "mt"))
        handed.put(opened_after, ChannelState("s1", "mt"))
        handed.put(other, ChannelState("s2", "mt"))
        handed.drop_group("s1")  # s1 resumed: what it did not claim is closed now
        assert late.closed and opened_after.closed and not other.closed
        await asyncio.sleep(0.2)  # s2 never came
        assert other.closed
        assert await handed.claim("c4", wait=0.01) is None
    asyncio.run(go())


def test_a_channel_handed_twice_keeps_the_newer():
    async def go() -> None:
        handed = Handed()
        first, second = Box("c1"), Box("c1")
        handed.put(first, ChannelState("s1", "mt"))
        handed.put(second, ChannelState("s1", "mt"))
        assert first.closed and (await handed.claim("c1", wait=1))[0] is second
        handed.put(Box("c5"), ChannelState("s9", "mt"))
        handed.close()
    asyncio.run(go())

"""Quorum votes ("delayed writes"): a destructive op runs once k distinct monitors ask.

Requests for the same op with the same arguments within `window` seconds share a ballot.
When the k-th distinct monitor votes, the op runs once and every waiting request gets its
outcome; a monitor voting twice counts once. If the window passes first, every waiting
request gets a quorum failure saying how many votes came. Each vote keeps its signed
request (its `proof`): an op may forward them as its warrant (evacuate -> adopt).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

MAX_OPEN_BALLOTS = 1024


@dataclass
class Short:
    """The outcome of a ballot that did not reach the quorum."""

    votes: list[str]
    needed: int


@dataclass
class _Ballot:
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    voters: dict[str, bytes] = field(default_factory=dict)  # monitor -> its signed request


class BallotBox:
    """Open ballots of one agent; lives on its event loop."""

    def __init__(self, quorum: int, window: float):
        self.quorum, self.window = quorum, window
        self._open: dict[tuple[str, bytes], _Ballot] = {}

    def __len__(self) -> int:
        return len(self._open)

    async def vote(self, key: tuple[str, bytes], monitor: str,
                   execute: Callable[[dict[str, bytes]], Awaitable[Any]],
                   proof: bytes = b"") -> Any:
        """Cast `monitor`'s vote (`proof`: its signed request); returns
        execute({voter: proof})'s outcome, or Short.

        Raises OverflowError when too many ballots are open (the caller answers "busy").
        """
        loop = asyncio.get_running_loop()
        ballot = self._open.get(key)
        if ballot is None:
            if len(self._open) >= MAX_OPEN_BALLOTS:
                raise OverflowError(f"{len(self._open)} ballots are open")
            ballot = _Ballot(loop.create_future())
            ballot.timer = loop.call_later(self.window, self._expire, key, ballot)
            self._open[key] = ballot
        ballot.voters.setdefault(monitor, proof)
        if len(ballot.voters) >= self.quorum:
            ballot.timer.cancel()
            del self._open[key]
            loop.create_task(self._run(ballot, execute))
        return await asyncio.shield(ballot.future)

    async def _run(self, ballot: _Ballot, execute) -> None:
        try:
            outcome = await execute(dict(ballot.voters))
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            if not ballot.future.done():
                ballot.future.set_exception(e)
            return
        if not ballot.future.done():
            ballot.future.set_result(outcome)

    def _expire(self, key, ballot: _Ballot) -> None:
        if self._open.get(key) is ballot:
            del self._open[key]
        if not ballot.future.done():
            ballot.future.set_result(Short(sorted(ballot.voters), self.quorum))

    def close(self) -> None:
        """Fail every open ballot (at shutdown)."""
        for key, ballot in list(self._open.items()):
            ballot.timer.cancel()
            self._expire(key, ballot)

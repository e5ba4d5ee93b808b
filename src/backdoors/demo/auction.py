"""`backdoors demo --scenario auction`: the case study's auction site under load while a
front end freezes, in the live view.

The site of `backdoors casestudy rubis` (casestudy/rubis/site.py: front ends n0 and n1,
middle tiers n2 and n3, PostgreSQL in n4, an agent per host) with a small data set;
locust's browsing and bidding users on both front ends; once n0's client sessions are
held by its agent, every process of n0 is stopped. The monitor (the site's rules) sees
n0's progress stall, fences n0 and moves its client sessions to n1. The verdict: the
sessions moved, no request failed, and every bid a client was told was taken is in the
database once.
"""

from __future__ import annotations

from pathlib import Path

from ..casestudy.rubis.dataset import Scale
from ..casestudy.rubis.site import Site
from ..casestudy.rubis.study import check_writes, play_fault
from ..errors import LabError
from .steps import Step

USERS, SECONDS = 8, 16
#: small enough to load in a few seconds, large enough that users rarely bid on one item
SCALE = Scale(users=1000, items=2000, bids=10000, comments=500)


class Auction:
    """The demo's auction world: the site and its lab, torn down by `close()`."""

    def __init__(self, name: str, out_dir: Path, *, say=print):
        self.site = Site(name, SCALE)
        self.lab = self.site.lab
        self.out_dir, self.say = out_dir, say
        self.session_node = Site.FE[0]  # where the view marks the sessions
        self.progress_boxes = ("rubis-fe-", "rubis-mt-")  # the recoverable servers' boxes
        self.note = lambda text: None  # a line for the view's timeline (set by the runner)
        self._listeners: list = []

    def up(self) -> Auction:
        self.say("building the auction site: front ends n0 n1, middle tiers n2 n3, "
                 "PostgreSQL in n4, an agent per host")
        self.site.up()
        return self

    def watch(self, fn) -> None:
        """Call `fn(event, incident)` on the monitor's incidents (the monitor is made
        when the load starts)."""
        self._listeners.append(fn)

    def _on_incident(self, event: str, inc) -> None:
        for fn in self._listeners:
            fn(event, inc)

    def summary(self) -> str:
        return (f"load: {USERS} locust users (browsing and bidding mixes) on front ends "
                f"{' and '.join(Site.FE)}, {SECONDS} s; each bid acknowledged is checked "
                "in the database at the end")

    def close(self) -> None:
        self.site.down()


def auction(w: Auction) -> dict:
    """Front end n0 freezes under load; its sessions must move with nothing lost."""
    step = Step("auction", "auction site: a front end freezes under load", "recovery",
                Site.FE[0])
    work = w.out_dir / "load"
    work.mkdir(parents=True, exist_ok=True)
    w.note(f"load started; {Site.FE[0]} freezes once its client sessions are held by its agent")
    try:
        facts = play_fault(w.site, "fe-freeze", USERS, SECONDS, work,
                           on_incident=w._on_incident, incidents_dir=str(w.out_dir / "incidents"))
    except LabError as e:  # the load did not start, or did not end: no verdict on the move
        step.check("the load ran and the freeze was played", False, str(e))
        return step.done("the scenario could not be played")
    facts.update(check_writes(w.site, [facts.pop("acks")]))
    moved = facts.get("recover_status") == "done"
    if moved:
        w.session_node = facts["target"]
    step.record.update(incident=facts.get("incident"), detect_ms=facts["detect_ms"],
                       recovery_ms=facts["recovery_ms"], sessions=facts["moved"])
    if facts["rule"]:
        how = (f"rule {facts['rule']}, detected {facts['detect_ms']} ms after the freeze, "
               f"{facts['moved']} sessions moved to {facts['target']} in "
               f"{facts['recovery_ms']} ms ({facts['recover_status']})")
    else:
        how = f"no recovery within {SECONDS + 30} s"
    step.check(f"the freeze detected and {Site.FE[0]}'s client sessions moved", moved, how)
    step.check("no request failed", facts["failed_requests"] == 0,
               f"{facts['requests']} requests, {facts['failed_requests']} failed, the "
               f"longest {facts['max_response_ms']:.0f} ms")
    step.check("every acknowledged bid is in the database once",
               facts["bids_lost"] == facts["bids_duplicated"] == 0,
               f"{facts['bids_acknowledged']} acknowledged, {facts['bids_lost']} lost, "
               f"{facts['bids_duplicated']} duplicated")
    w.note(f"{facts['requests']} requests, {facts['failed_requests']} failed; "
           f"{facts['bids_acknowledged']} bids acknowledged, {facts['bids_lost']} lost")
    return step.done(f"{facts['moved']} sessions moved in {facts['recovery_ms']} ms, "
                     f"{facts['failed_requests']} requests failed" if moved else
                     "the sessions did not move")

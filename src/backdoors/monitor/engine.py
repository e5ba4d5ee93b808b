"""The rule engine: from a node's successive views to opened and closed incidents.

For each node it keeps the sensor history and, per rule, how long each detector has
held (`for_ms`), the open incident and the cooldown. `observe(view)` is called by the
node's poller thread after every poll; it returns the responses to run (a new incident,
or another attempt of an open one), which the monitor hands to a repair worker. Only one
rule responds on a node at a time, and the node settles for `settle_ms` after a response
(a repair's freeze stalls progress).

One ongoing condition is one incident: while the rule's condition holds on the node the
incident stays open and is updated (`detections`, `last_seen`); a response that did not
clear it is run again in the same incident (`attempts`, up to the rule's `max_attempts`,
`retry_after_ms` apart; rules that only record are not re-run). It closes when the
condition has been clear for `clear_ms`; only then may the rule open another on the node.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .rules import Rule
from .detectors import BY_KIND, Hit, NodeView, evaluate
from .history import History, Key
from .incidents import Incident

_seq = itertools.count(1)
log = logging.getLogger("backdoors.monitor")


@dataclass
class RuleState:
    since: list[float | None]
    incident: Incident | None = None
    hits: list[Hit] = field(default_factory=list)
    clear_since: float | None = None
    acted_at: float | None = None  # when its last response finished (None: none to judge)
    cooldown_until: float = 0.0
    detected_at: float = 0.0  # the open incident's detection, on the engine's clock
    onset: float = 0.0  # its onset, on the engine's clock


@dataclass
class NodeState:
    node: str
    host: str
    history: History
    rules: dict[str, RuleState] = field(default_factory=dict)
    busy: str | None = None  # id of the incident being responded to
    settle_until: float = 0.0
    quiet_until: float = 0.0  # no response before (engine clock): its former owner acted on it
    #: held while the node is judged: its poller, its agent's event follower and the repair
    #: workers all call in, and two of them must not both open the same rule's incident
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass
class Detection:
    """A response to run: an incident just opened (`attempt` 1), or another attempt of
    an open one whose condition outlived its last response. `onset` and `detected` are
    the incident's, on the engine's clock."""

    incident: Incident
    rule: Rule
    view: NodeView
    hits: list[Hit]
    onset: float
    detected: float
    history: History
    attempt: int = 1


def _urgent(view: NodeView) -> bool:
    """An event that opens an incident during the settling after a repair: a server's
    death, not a violation (a repair's freeze stalls progress, as it does for polls)."""
    return view.event is not None and view.event.get("kind") not in ("violation", "cleared")


class Engine:
    """Rules applied to the views of every node; thread-safe (one node is judged by one
    thread at a time)."""

    def __init__(self, rules: list[Rule], monitor_id: str, *, history_s: float = 5.0,
                 settle_s: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 on_close: Callable[[Incident], None] | None = None,
                 on_unresolved: Callable[[Incident], None] | None = None):
        self.rules, self.monitor_id = rules, monitor_id
        self.history_s, self.settle_s, self.clock = history_s, settle_s, clock
        self.on_close = on_close or (lambda inc: None)
        self.on_unresolved = on_unresolved or (lambda inc: None)
        self.nodes: dict[str, NodeState] = {}
        self._lock = threading.Lock()

    def state(self, node: str, host: str) -> NodeState:
        with self._lock:
            st = self.nodes.get(node)
            if st is None:
                st = self.nodes[node] = NodeState(node, host, History(self.history_s))
            return st

    def hand_over(self, node: str, host: str, quiet_s: float) -> None:
        """`node` was just taken over from a monitor that acted on it: open or retry no
        response on it for `quiet_s`."""
        st = self.state(node, host)
        with st.lock:
            st.quiet_until = max(st.quiet_until, self.clock() + quiet_s)

    def adopt(self, node: str, host: str, record: dict) -> Incident | None:
        """Carry on the open incident a former owner of `node` recorded in the fleet
        (`{"incident", "monitor", "rule", "onset", "detected", "state", "attempts"}`): open
        here under its id, as if its last response had just ended (retried after the
        rule's retry_after_ms if its condition holds, closed once it is clear). None when
        this monitor has no such rule for the node, or that rule's incident is open on the
        node; ValueError when the record is not one."""
        rule = next((r for r in self.rules if r.name == record.get("rule")), None)
        if rule is None or not rule.applies_to(node):
            return None
        wall = time.time()
        try:
            detected = float(record.get("detected") or wall)
            onset = float(record.get("onset") or detected)
            attempts = max(1, int(record.get("attempts") or 1))
        except (TypeError, ValueError) as e:
            raise ValueError(f"incident record {record.get('incident')!r}: {e}") from None
        st = self.state(node, host)
        with st.lock:
            rs = st.rules.get(rule.name)
            if rs is None:
                rs = st.rules[rule.name] = RuleState([None] * len(rule.detectors))
            if rs.incident is not None:
                return None
            now = self.clock()
            inc = Incident(
                id=str(record["incident"]), monitor=self.monitor_id, rule=rule.name, node=node,
                host=host, onset=onset, detected=detected,
                onset_to_detect_ms=round((detected - onset) * 1000, 1), detectors=[],
                state=str(record.get("state") or "detected"),
                attempts=attempts, last_seen=wall,
                adopted_from=str(record.get("monitor") or "?"))
            rs.incident, rs.hits, rs.clear_since, rs.acted_at = inc, [], None, now
            rs.detected_at, rs.onset = now - (wall - detected), now - (wall - onset)
            return inc

    def open_incidents(self) -> list[Incident]:
        with self._lock:
            states = list(self.nodes.values())
        return [rs.incident for st in states for rs in list(st.rules.values()) if rs.incident]

    # -- per poll ------------------------------------------------------------------------

    def observe(self, view: NodeView) -> list[Detection]:
        st = self.state(view.node, view.host)
        with st.lock:
            return self._observe(st, view)

    def _observe(self, st: NodeState, view: NodeView) -> list[Detection]:
        if view.agent_ok and view.event is None:
            st.history.add(view)
        now = view.at
        opened: list[Detection] = []
        for rule in self.rules:
            if not rule.applies_to(view.node):
                continue
            if view.event is not None and not any(d.takes(view.event) for d in rule.detectors):
                continue  # an event view tells only the rules that judge events
            if not view.agent_ok and not any(d.judges_stale for d in rule.detectors):
                continue  # stale data cannot judge this rule: hold its state as it is
            rs = st.rules.get(rule.name)
            if rs is None:
                rs = st.rules[rule.name] = RuleState([None] * len(rule.detectors))
            hits, raw, whole = self._hits(rule, rs, view)
            stranded = (view.fenced and rs.incident is not None
                        and rs.incident.state in ("failed", "unresolved"))
            if rs.incident is not None and view.fenced and st.busy != rs.incident.id \
                    and not stranded:
                self.close(st, rule, "fenced", now)  # recovered away; the node is out of service
            elif rs.incident is not None:  # held open by the raw condition: for_ms debounces
                # fenced by a response that then failed (its sessions not moved): it holds
                again = self._follow(rule, rs, st, view, raw, whole or stranded,
                                     retry_ok=not opened, holds=stranded)
                if again is not None:
                    opened.append(again)
            elif (self._fired(rule, hits) and not opened and st.busy is None
                  and (now >= st.settle_until or _urgent(view))
                  and self.clock() >= st.quiet_until
                  and now >= rs.cooldown_until and not view.fenced):
                det = self._open(rule, rs, st, view, hits)
                opened.append(det)
        return opened

    @staticmethod
    def _fired(rule: Rule, hits: list[Hit]) -> bool:
        return bool(hits) if rule.match == "any" else len(hits) == len(rule.detectors)

    def _hits(self, rule: Rule, rs: RuleState,
              view: NodeView) -> tuple[list[Hit], list[Hit], bool]:
        """(hits held for their for_ms, every hit now, whether the view judged the whole
        rule). Only a poll with fresh data judges every detector: an event tells of one
        sensor, a silent agent's view only of what judges stale data, and a box the agent
        could not read says nothing, so none says the rule's condition is clear (nor
        restarts a detector's for_ms)."""
        hits, raw = [], []
        whole = view.event is None and view.agent_ok and not view.unread
        for i, det in enumerate(rule.detectors):
            if not view.agent_ok and not det.judges_stale:
                whole = False
                continue  # no fresh data: neither fired nor cleared
            if view.event is not None and not det.takes(view.event):
                continue  # an event tells only the detectors that judge it
            hit = evaluate(det, i, view)
            if hit is None:
                if whole:
                    rs.since[i] = None
                continue
            raw.append(hit)
            if rs.since[i] is None:
                rs.since[i] = view.at
            if (view.at - rs.since[i]) * 1000 >= det.hold_ms:
                hits.append(hit)
        return hits, raw, whole

    def _follow(self, rule: Rule, rs: RuleState, st: NodeState, view: NodeView,
                raw: list[Hit], whole: bool, retry_ok: bool,
                holds: bool = False) -> Detection | None:
        """Update the open incident of `rule` from this view: count the condition while
        it holds (or `holds`), close it once clear for clear_ms (as judged by `whole` views
        only), or return another attempt of its response when it still holds
        retry_after_ms after the last one."""
        inc, now = rs.incident, view.at
        fired = self._fired(rule, raw) or holds
        if fired:
            inc.detections += 1
            inc.last_seen = self._wall(now)
        if st.busy == inc.id:
            return None  # its response is running: judge it afterwards
        if not fired:
            if not whole:
                return None  # a part of the rule said nothing: not that it is clear
            if rs.clear_since is None:
                rs.clear_since = now
            if (now - rs.clear_since) * 1000 >= rule.clear_ms:
                self.close(st, rule, "cleared", now)
            return None
        rs.clear_since = None
        if rs.acted_at is None or (now - rs.acted_at) * 1000 < rule.retry_after_ms:
            return None
        if not any(a.effect != "record" for a in rule.actions):
            rs.acted_at = None  # recording it again would add nothing: it stays open
            return None
        if inc.attempts >= rule.max_attempts:
            rs.acted_at = None  # open until it clears; its last response did not help
            inc.state = "unresolved"
            log.warning("incident %s: rule %s still fires on node %s after %d responses "
                        "(max_attempts); it stays open, unresolved, until the condition clears",
                        inc.id, rule.name, inc.node, inc.attempts)
            self.on_unresolved(inc)
            return None
        if not retry_ok or st.busy is not None or now < st.settle_until \
                or self.clock() < st.quiet_until:
            return None  # another response on the node first; retried at a later poll
        inc.attempts += 1
        rs.acted_at = None
        st.busy = inc.id
        return Detection(inc, rule, view, raw, rs.onset, rs.detected_at, st.history.copy(),
                         attempt=inc.attempts)

    def _wall(self, t: float) -> float:
        """A time of the engine's clock as Unix time."""
        return time.time() - (self.clock() - t)

    def _open(self, rule: Rule, rs: RuleState, st: NodeState, view: NodeView,
              hits: list[Hit]) -> Detection:
        onset = self.onset(st.history, view, hits)
        now_wall, now = time.time(), self.clock()
        wall = lambda t: now_wall - (now - t)  # noqa: E731
        keys: list[Key] = list(dict.fromkeys((v.box, v.sensor) for h in hits for v in h.violations))
        series = st.history.around(keys, onset - 1.0, view.at)
        sensors = {k: [[round((t - view.at) * 1000, 1), v] for t, v in pts]
                   for k, pts in series.items()}
        inc = Incident(
            id=f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now_wall))}-{view.node}-{next(_seq)}",
            monitor=self.monitor_id, rule=rule.name, node=view.node, host=view.host,
            onset=wall(onset), detected=wall(view.at),
            onset_to_detect_ms=round((view.at - onset) * 1000, 1), detectors=hits,
            sensors=sensors, detected_by=view.via, event=view.event)
        inc.last_seen = inc.detected
        rs.incident, rs.hits, rs.clear_since, rs.acted_at = inc, hits, None, None
        rs.detected_at, rs.onset = view.at, onset
        st.busy = inc.id
        return Detection(inc, rule, view, hits, onset, view.at, st.history.copy())

    def responded(self, det: Detection, state: str) -> None:
        """Called by the repair worker when the response of `det` has finished (the
        node may have been forgotten meanwhile: then only the incident is updated)."""
        now = self.clock()
        det.incident.state = state
        det.incident.repaired_ms = round((now - det.detected) * 1000, 1)
        with self._lock:
            st = self.nodes.get(det.view.node)
        if st is None:
            return
        with st.lock:
            rs = st.rules.get(det.rule.name)
            if rs is not None and rs.incident is det.incident:
                rs.acted_at = now
            if st.busy == det.incident.id:  # not a newer state of a node forgotten and back
                st.busy = None
                st.settle_until = now + self.settle_s

    def close(self, st: NodeState, rule: Rule, outcome: str, now: float) -> None:
        rs = st.rules[rule.name]
        inc = rs.incident
        if inc is None:
            return
        inc.closed = self._wall(now)
        inc.outcome = outcome
        inc.open_ms = round((inc.closed - inc.detected) * 1000, 1)
        rs.incident, rs.clear_since, rs.acted_at = None, None, None
        rs.cooldown_until = now + rule.cooldown_ms / 1000
        self.on_close(inc)

    def forget(self, node: str, outcome: str = "node gone") -> None:
        """Drop a node no longer served (closing its open incidents)."""
        with self._lock:
            st = self.nodes.pop(node, None)
        if st is None:
            return
        rules = {r.name: r for r in self.rules}
        with st.lock:
            for name, rs in list(st.rules.items()):
                if rs.incident is not None:
                    self.close(st, rules[name], outcome, self.clock())

    def close_all(self, outcome: str) -> None:
        """Close every open incident (the monitor is stopping)."""
        now = self.clock()
        with self._lock:
            states = list(self.nodes.values())
        rules = {r.name: r for r in self.rules}
        for st in states:
            with st.lock:
                for name, rs in list(st.rules.items()):
                    if rs.incident is not None:
                        self.close(st, rules[name], outcome, now)

    # -- onset ---------------------------------------------------------------------------

    @staticmethod
    def onset(history: History, view: NodeView, hits: list[Hit]) -> float:
        """When the trouble began: the earliest onset of the hits, each judged by the
        detector unit of its kind from the history (see Detector.onset)."""
        return min([view.at] + [BY_KIND[h.kind].onset(h, view, history) for h in hits])

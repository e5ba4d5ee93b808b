"""One monitor's place in the fleet: membership under a lease, and the nodes it owns.

In etcd, under `prefix` (default "/backdoors/fleet/"):

    members/<monitor id>   {"id", "since", "reaches", "knows", ...info}   under its lease
    owners/<node>          <monitor id>                under the owner's lease
    incidents/<node>       the node's open incident    {"incident", "monitor", "rule", ...}

Each step (every `poll_s`) the member renews its lease (every third of the TTL), reads the
live members and the ownership records, assigns every node by rendezvous hashing over the
live members that reach its host (fleet/assign.py: all members compute the same; with
`reach`, a member's record lists the hosts it reaches now, put again when they change),
gives up the nodes it owns
that are no longer its own (a delete guarded by the record's revision), and takes the free
nodes assigned to it (a txn: create only if the record does not exist, or replace one
under no lease, which no member wrote and which would never expire). Its own member key
is put back when it is missing or under another lease (deleted by hand, or taken away by a
second monitor with its id), and only leased keys right under members/ are members: a key
no monitor wrote neither takes a share of the nodes nor holds one. The revision of
that txn is its **fencing token** for the node: etcd revisions only grow, so whoever owns a
node later holds a higher token, and agents refuse the older ones (agent/tokens.py). An
etcd made anew (or emptied) starts its revisions again, below the tokens the agents hold:
so the token sent is the revision within the fleet's **epoch** (`fencing_token`), a number
kept in etcd (`epoch`, under no lease) and made from the clock by the first member of an
etcd without one; a later etcd's tokens outrank an earlier one's. A token a member holds
at an agent that this etcd never gave (`outranked`: a snapshot's etcd, one made anew
within its predecessor's epoch second, an epoch made by a clock behind) moves the epoch
past it (`_past`). Every take is a txn that the epoch is still the one read, and a record
of an earlier epoch is taken again in the new one: a token's epoch is the one in force at
its revision.

A member that dies stops renewing: after the TTL its lease expires, its member key and
ownership records go with it, and the others take its nodes at their next step. One that
loses etcd keeps its last share (`degraded` says why): it cannot learn it lost its nodes,
but its tokens then are older than the new owners', so the agents refuse it.

**Incident ownership.** The owner of a node records the node's open incident under
`incidents/` (`publish`, written at its next step, only while its ownership record is the
one of its token: a former owner cannot write it) and deletes it once the incident
closes. The record is under no lease: it outlives its monitor, and the next owner of the
node finds it when it takes the node (`on_take`) and carries the incident on (the
monitor adopts it). A node taken again with a new token (its lease expired meanwhile: a
paused or cut-off member) is taken anew: what the member knew of it before is stale,
another may have acted on it since. A member does not give up a node while `hold(node)`
says a response runs there (at most HOLD_MAX_S): the response ends under one owner.
Nor, for `reach_grace_s`, a node of a host it stopped reaching: when the host died, every
member loses it within moments, and the node then stays with its owner (fleet/assign.py).

**Nodes that leave.** A node the owner's own `nodes()` has not listed for `gone_s` (its
agent answered without it: it was removed) is let go with its incident record, so etcd
does not keep the records of nodes that are no more. The incident record of a node
removed while its owner was away (no owner record, not in `nodes()`) is deleted
by the member that finds it so for `gone_s` (`_sweep`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from .assign import assign, host_of
from .etcd import Compare, EtcdClient, EtcdError, delete_op, put_op

log = logging.getLogger("backdoors.fleet")

PREFIX = "/backdoors/fleet/"
EPOCH_BASE = 1_700_000_000  # an epoch is whole seconds since this unix time
EPOCH_SLACK_S = 86_400  # a refusing agent's epoch this far ahead of the clock is no clock's
HOLD_MAX_S = 10.0  # the longest a member keeps a node assigned elsewhere for a running response
REACH_GRACE_S = 1.0  # how long a member keeps a node of a host it stopped reaching
GONE_S = 10.0  # how long an owned node is missing from the owner's nodes() before it is let go


@dataclass
class Share:
    """What a member holds as of its last step: the live members, its nodes with their
    tokens, its lease; `degraded` is why etcd could not be reached (None: it could)."""

    member: str
    members: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # node -> fencing token
    assigned: dict[str, str] = field(default_factory=dict)  # every node -> its member
    lease: int | None = None
    ttl_s: int = 0
    degraded: str | None = None
    steps: int = 0
    epoch: int = 0  # the fleet's epoch in its etcd (fencing_token)


def fencing_token(epoch: int, revision: int) -> int:
    """The token sent to agents for an ownership record of `revision` in `epoch`: a later
    epoch's outranks any of an earlier one (an etcd made anew does not continue the old
    one's revisions); within an epoch, the later revision's."""
    return epoch << 32 | revision


class FleetMember:
    """Keeps `member_id` in the fleet on a thread of its own (`start`, `stop`), or one
    `step()` at a time. `nodes()` gives every node of the fleet (names unique in it, like
    "h0/n0"); `on_change(share)` is called after a step that changed this member's nodes
    or its degraded state. `within()`, a context manager, is entered by the member's thread
    around everything it does (e.g. a network namespace, where etcd is reachable).
    `hold(node)`: keep a node assigned elsewhere a while (a response runs there);
    `on_take(node, record)`: a node just taken (new to this member, or taken again with a
    new token) and its open incident record (None: none), told before the share shows the
    node's token. `gone_s`: how long a node this member owns may be missing from `nodes()`
    before it is let go (it left the fleet). `listed()`: the hosts whose nodes `nodes()`
    has listed since the start (None: every host's; see `_sweep`). `reach()`: the hosts
    this member reaches now (None: it reaches every host), published in its record so
    that each node goes to a member that can watch it; a node of a host it stopped
    reaching is kept `reach_grace_s` more (the others may lose the host too)."""

    def __init__(self, client: EtcdClient, member_id: str, nodes: Callable[[], Iterable[str]],
                 *, prefix: str = PREFIX, ttl_s: int = 1, poll_s: float = 0.1,
                 info: dict | None = None, on_change: Callable[[Share], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 within: Callable[[], AbstractContextManager] | None = None,
                 hold: Callable[[str], bool] | None = None,
                 on_take: Callable[[str, dict | None], None] | None = None,
                 gone_s: float = GONE_S, listed: Callable[[], set[str]] | None = None,
                 reach: Callable[[], Iterable[str]] | None = None,
                 reach_grace_s: float = REACH_GRACE_S):
        if "/" in member_id or not member_id:
            raise ValueError(f"fleet member id {member_id!r}: must be non-empty, without '/'")
        self.client, self.id, self.nodes = client, member_id, nodes
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.ttl_s, self.poll_s, self.info = max(1, int(ttl_s)), poll_s, dict(info or {})
        self.on_change, self.clock, self.within, self.hold = on_change, clock, within, hold
        self.on_take, self.gone_s, self.listed, self.reach = on_take, gone_s, listed, reach
        self.reach_grace_s = reach_grace_s
        self._since = 0.0  # when this member joined under its lease (its record's "since")
        self._pending: dict[str, str | None] = {}  # node -> incident record to write, None: delete
        self._held: dict[str, float] = {}  # node assigned elsewhere -> since when it is held
        self._lost: dict[str, float] = {}  # owned node of a host it stopped reaching -> since
        self._missing: dict[str, float] = {}  # owned node not in nodes() -> since when
        #: incident record of a node nobody owns nor lists -> (since when, its revision)
        self._unowned: dict[str, tuple[float, int]] = {}
        self._sweep_at = 0.0
        self._release = False
        self._outranked: dict[str, tuple[int, str]] = {}  # node -> (token, holder) its
        # agent refused this member's claim with
        self.share = Share(member_id)
        self._lock = threading.Lock()  # guards `share` (read by the monitor's threads)
        self._renew_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- for callers -----------------------------------------------------------------------

    def token(self, node: str) -> int | None:
        """This member's fencing token for `node` (what agents are sent), None when it
        does not own it."""
        with self._lock:
            revision = self.share.tokens.get(node)
            return None if revision is None else fencing_token(self.share.epoch, revision)

    def outranked(self, node: str, token: int, holder: str) -> None:
        """`node`'s agent refused this member's claim: it holds `token`, of monitor
        `holder`. Checked at the next step (`_past`)."""
        with self._lock:
            self._outranked[node] = (token, holder)

    def snapshot(self) -> Share:
        with self._lock:
            s = self.share
            return Share(s.member, list(s.members), dict(s.tokens), dict(s.assigned), s.lease,
                         s.ttl_s, s.degraded, s.steps, s.epoch)

    def publish(self, node: str, record: dict | None) -> None:
        """Record `node`'s open incident in etcd (None: it closed) at the next step, if
        the node is still this member's then; the latest record of a node wins."""
        with self._lock:
            self._pending[node] = None if record is None else json.dumps(record)

    def start(self) -> FleetMember:
        self._thread = threading.Thread(target=self._run, name=f"bd-fleet-{self.id}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop stepping; with `release`, revoke the lease so that the others take this
        member's nodes at once (not after the TTL)."""
        self._release = release
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        else:
            self._leave()
        with self._lock:
            self.share.tokens, self.share.lease = {}, None

    def _leave(self) -> None:
        lease = self.share.lease
        if self._release and lease is not None:
            try:
                self.client.revoke(lease)
            except EtcdError as e:
                log.warning("fleet member %s: cannot revoke its lease: %s", self.id, e)

    def _run(self) -> None:
        with self.within() if self.within is not None else nullcontext():
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - the member must keep stepping
                    log.exception("fleet member %s: step failed", self.id)
                self._stop.wait(self.poll_s)
            self._leave()

    # -- one step --------------------------------------------------------------------------

    def step(self) -> Share:
        before = (set(self.share.tokens.items()), self.share.degraded)
        try:
            self._step()
        except EtcdError as e:
            if self.share.degraded is None:
                log.warning("fleet member %s: degraded, keeping its last %d node(s) and "
                            "acting on no other: %s", self.id, len(self.share.tokens), e)
            with self._lock:
                self.share.degraded = str(e)
        else:
            if self.share.degraded is not None:
                log.warning("fleet member %s: etcd reachable again", self.id)
            with self._lock:
                self.share.degraded = None
                self.share.steps += 1
        if self.on_change is not None and before != (set(self.share.tokens.items()),
                                                     self.share.degraded):
            self.on_change(self.snapshot())
        return self.share

    def _step(self) -> None:
        try:
            self._step_once()
        except EtcdError as e:
            if "lease not found" not in str(e):
                raise
            # the lease expired (a member slowed or cut off past its TTL): what it owned
            # is others' now; join again with a new lease
            log.warning("fleet member %s: its lease expired (etcd did not hear from it "
                        "within %d s): its nodes are others' now; joining again", self.id,
                        self.ttl_s)
            with self._lock:
                self.share.lease, self.share.tokens = None, {}
            self._step_once()

    def _renew(self) -> None:
        """Renew the lease if a third of its TTL passed since it was: a step that takes
        many nodes, or on a slow etcd, outlasts the lease (EtcdError "lease not found"
        when it expired: `_step` joins again)."""
        now = self.clock()
        if self.share.lease is None or now < self._renew_at:
            return
        if self.client.keepalive(self.share.lease) <= 0:
            raise EtcdError(f"requested lease not found: it expired (etcd did not hear "
                            f"from it within {self.ttl_s} s)")
        self._renew_at = now + self.ttl_s / 3

    def _step_once(self) -> None:
        c, now = self.client, self.clock()
        self._renew()
        mine = self._member_key(self.id)
        if self.share.lease is None:
            if (held := c.get(mine)) is not None and held.lease:
                raise EtcdError(f"its key {mine} is held under another lease: a second "
                                f"monitor with id {self.id} runs (or this one's last run, "
                                "until its lease expires); waiting for it to go")
            lease, ttl = c.grant(self.ttl_s)
            self._since = time.time()
            c.put(mine, self._record(set(self.nodes())), lease)
            with self._lock:
                self.share.lease, self.share.ttl_s = lease, ttl
            self._renew_at = self.clock() + self.ttl_s / 3
        lease = self.share.lease
        _, kvs = c.prefix(self.prefix + "members/")
        if any(kv.key == mine and kv.lease not in (0, lease) for kv in kvs):
            raise EtcdError(f"its key {mine} was put again under another lease: a second "
                            f"monitor with id {self.id} runs (refused: two cannot share one)")
        known = set(self.nodes())
        record = self._record(known)
        kept = next((kv for kv in kvs if kv.key == mine and kv.lease == lease), None)
        if kept is None or kept.value != record:
            if kept is None:  # deleted (by hand): it would be gone from the fleet for good
                log.warning("fleet member %s: its key %s was gone: registered again",
                            self.id, mine)
            c.put(mine, record, lease)  # (or the hosts it reaches changed)
            _, kvs = c.prefix(self.prefix + "members/")
        # a member is a key right under members/ with a lease (what no monitor wrote
        # cannot hold a node: it would never expire)
        live = [kv for kv in kvs if kv.lease
                and "/" not in kv.key[len(self.prefix) + len("members/"):]]
        members = sorted({kv.key.rsplit("/", 1)[1] for kv in live})
        reaches = {kv.key.rsplit("/", 1)[1]: _hosts(kv.value, "reaches") for kv in live}
        knows = {kv.key.rsplit("/", 1)[1]: _hosts(kv.value, "knows") for kv in live}
        epoch, at = self._epoch()
        _, kvs = c.prefix(self.prefix + "owners/")
        owners = {kv.key[len(self.prefix) + len("owners/"):]: kv for kv in kvs}
        epoch, at = self._past(epoch, at, owners, members, lease)
        # every take is a txn that the epoch is still the one read (`at`, its mod revision):
        # so a token's epoch is the one in force at its revision, and a later take's token
        # is the higher, whatever epoch a member read before it
        same_epoch = Compare(self.prefix + "epoch", "MOD", at)
        self._sweep(known, owners, now)
        assigned = assign(known | set(owners), members, reaches,
                          {n: kv.value for n, kv in owners.items() if kv.lease}, knows)
        tokens, held = {}, set()
        for node, kv in owners.items():
            if kv.value != self.id or kv.lease != lease:
                continue
            self._renew()
            if self._left(node, node in known, now):
                self._let_go(node, kv.mod_revision, None)
            elif (assigned.get(node) == self.id or self._holds(node, now)
                  or self._unreached(node, reaches, now)):
                if assigned.get(node) != self.id:
                    held.add(node)
                if kv.mod_revision > at:
                    tokens[node] = kv.mod_revision
                else:  # taken in an earlier epoch: taken again in this one, unless the
                    # record changed since it was read (this member's lease expired)
                    got = c.txn([Compare(kv.key, "MOD", kv.mod_revision), same_epoch],
                                [put_op(kv.key, self.id, lease)])
                    if got.succeeded:
                        tokens[node] = got.revision
            else:  # no longer ours: stop acting on it first, then let it go, with the last
                # word on its incident (the next owner reads it)
                self._let_go(node, kv.mod_revision, ...)
        self._held = {n: t for n, t in self._held.items() if n in held}
        self._lost = {n: t for n, t in self._lost.items() if n in held}
        self._missing = {n: t for n, t in self._missing.items() if n in tokens}
        for node, member in sorted(assigned.items()):
            if member != self.id or (node in owners and owners[node].lease):
                continue
            self._renew()
            key = self._owner_key(node)
            if node in owners:  # a record without a lease (not a member's): it never expires
                log.warning("fleet member %s: node %s's owner record has no lease: taken",
                            self.id, node)
                cond = Compare(key, "MOD", owners[node].mod_revision)
            else:
                cond = Compare(key, "CREATE", 0)
            got = c.txn([cond, same_epoch], [put_op(key, self.id, lease)])
            if got.succeeded:
                tokens[node] = got.revision
        if any(r >= 1 << 32 for r in tokens.values()):  # (fencing_token's 32 bits)
            raise EtcdError(f"etcd revision {max(tokens.values())} does not fit a fencing "
                            "token's 32 bits, so a newer owner's token would rank below an "
                            "older one's: give the fleet an etcd of its own (a new epoch)")
        # the nodes taken at this step (new, or taken again: a new token), with their open
        # incidents, handed to `on_take` before the share shows their tokens (so nothing
        # judges or acts on them before their past is settled)
        if epoch != self.share.epoch and self.share.tokens:
            log.warning("fleet member %s: the fleet's epoch is %d, not %d: every node is "
                        "taken anew", self.id, epoch, self.share.epoch)
        for node in sorted(n for n, t in tokens.items()
                           if self.share.tokens.get(n) != t or epoch != self.share.epoch):
            if self.on_take is None:
                break
            self._renew()
            record = self._incident(node, tokens[node])  # etcd unreachable: taken next step
            try:
                self.on_take(node, record)
            except Exception:  # noqa: BLE001 - one node must not stop the others
                log.exception("fleet member %s: taking node %s failed", self.id, node)
        with self._lock:
            self.share.members, self.share.assigned = members, assigned
            self.share.tokens, self.share.epoch = tokens, epoch
        self._flush(tokens)

    def _epoch(self) -> tuple[int, int]:
        """The fleet's epoch and the revision it was written at: kept in etcd (under no
        lease), made by the first member of an etcd without one (new, or emptied: its
        revisions start again, below what the agents hold) from the clock, so that the
        tokens of a later etcd outrank those of an earlier one (in whole seconds: one made
        in the same second as its predecessor's epoch gets the same: `_past` moves it)."""
        key = self.prefix + "epoch"
        for _ in range(3):  # (another member may make it at the same time)
            kv = self.client.get(key)
            if kv is not None:
                epoch = int(kv.value) if kv.value.isdigit() else -1
                if 0 < epoch < 1 << 31:
                    return epoch, kv.mod_revision
                log.warning("fleet member %s: %s is not an epoch (%r): made anew", self.id,
                            key, kv.value[:64])
                cond = Compare(key, "MOD", kv.mod_revision)
            else:
                cond = Compare(key, "CREATE", 0)
            epoch = int(time.time()) - EPOCH_BASE
            if epoch < 1:  # a clock reset (no RTC, before NTP): its epoch would be the lowest
                raise EtcdError(f"the clock says {time.time():.0f}: too early to make the "
                                "fleet's epoch (set the clock)")
            got = self.client.txn([cond], [put_op(key, str(epoch))])
            if got.succeeded:
                (log.warning if self.share.epoch else log.info)(
                    "fleet member %s: the fleet's epoch is %d now (etcd had none: a new or "
                    "emptied etcd)", self.id, epoch)
                return epoch, got.revision
        raise EtcdError(f"{key}: changed by others at each of 3 reads")

    def _past(self, epoch: int, at: int, owners: dict, members: list[str],
              lease: int) -> tuple[int, int]:
        """The fleet's epoch (and its revision), moved past the tokens agents refused this
        member's claims with (`outranked`) that this etcd never gave. Such a token is one
        a member of this fleet (the member itself, or another now live) holds from a
        later epoch, or, in this epoch, from a revision after that of this member's own
        record of the node (equal: another member's), which a newer owner's take would
        have replaced. So an etcd whose tokens fall below those the agents hold (restored
        from a snapshot, made anew within the second of its predecessor's epoch, its
        epoch made by a clock behind) heals; a newer owner's token leaves the epoch as it
        is, and so does one held by a monitor of no member's name (a fleet on another
        etcd, where it outranks this one: the operator ends one of the two), or from an
        epoch more than EPOCH_SLACK_S ahead of this clock (what no clock made)."""
        with self._lock:
            refused, self._outranked = self._outranked, {}
        beyond, ahead = [], int(time.time()) - EPOCH_BASE + EPOCH_SLACK_S
        for node, (held, holder) in sorted(refused.items()):
            e, r, kv = held >> 32, held & 0xFFFFFFFF, owners.get(node)
            mine = kv is not None and kv.value == self.id and kv.lease == lease
            after = mine and (r > kv.mod_revision or (r == kv.mod_revision
                                                      and holder != self.id))
            if not (e > epoch or (e == epoch and after)):
                continue  # a newer owner's, in this etcd
            if holder != self.id and holder not in members:
                log.warning("fleet member %s: node %s's agent holds token %d of %s, no "
                            "member of this fleet: left to it (a fleet on another etcd?)",
                            self.id, node, held, holder)
            elif e > ahead:
                log.error("fleet member %s: node %s's agent holds token %d of %s, of an "
                          "epoch no clock has made yet (a stolen key?): the node stays "
                          "refused until its agent's kept tokens are cleared "
                          "(docs/operations.md, section 13)", self.id, node, held, holder)
            else:
                beyond.append((held, node))
        if not beyond:
            return epoch, at
        held, node = max(beyond)
        key, new = self.prefix + "epoch", max(int(time.time()) - EPOCH_BASE, (held >> 32) + 1)
        got = None
        try:
            got = self.client.txn([Compare(key, "MOD", at)], [put_op(key, str(new))])
        finally:
            if got is None or not got.succeeded:  # checked again at the next step
                with self._lock:
                    for n, h in refused.items():
                        self._outranked.setdefault(n, h)
        if not got.succeeded:  # another member moved it first (past this token, or not yet)
            return self._epoch()
        log.warning("fleet member %s: node %s's agent holds token %d (epoch %d, revision "
                    "%d), which this etcd never gave (restored from a snapshot, made anew "
                    "within the same second, or its epoch made by a clock behind): the "
                    "fleet's epoch is %d now", self.id, node, held, held >> 32,
                    held & 0xFFFFFFFF, new)
        return new, got.revision

    def _sweep(self, known: set[str], owners: dict, now: float) -> None:
        """Every gone_s / 2, delete the incident records of nodes that have had no owner
        and been in no nodes() of this member for gone_s, unchanged: nodes removed while
        their owner was away, whose records no owner would ever let go (a node of that
        name added later would adopt the incident, its attempts counted). With `listed`,
        only of the hosts ("host/node") whose nodes it says were listed since the start."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + self.gone_s / 2
        at = self.prefix + "incidents/"
        _, kvs = self.client.prefix(at)
        seen, listed = {}, self.listed() if self.listed is not None else None
        for kv in kvs:
            node = kv.key[len(at):]
            if node in known or node in owners or (
                    listed is not None and node.split("/", 1)[0] not in listed):
                continue  # (a host not listed yet, its agent away: not known to be gone)
            since, revision = self._unowned.get(node, (now, kv.mod_revision))
            if revision != kv.mod_revision:
                since = now
            seen[node] = (since, kv.mod_revision)
            if now - since >= self.gone_s and self.client.txn(
                    [Compare(kv.key, "MOD", kv.mod_revision),
                     Compare(self._owner_key(node), "CREATE", 0)], [delete_op(kv.key)]).succeeded:
                log.warning("fleet member %s: the incident record of node %s, which nobody has "
                            "owned or listed for %.0f s, deleted", self.id, node, now - since)
                del seen[node]
        self._unowned = seen

    def _left(self, node: str, listed: bool, now: float) -> bool:
        """Whether owned `node` left the fleet: missing from nodes() for gone_s."""
        if listed:
            self._missing.pop(node, None)
            return False
        since = self._missing.setdefault(node, now)
        if now - since < self.gone_s:
            return False
        log.warning("fleet member %s: node %s not seen for %.0f s: it left the fleet, its "
                    "records go", self.id, node, now - since)
        return True

    def _let_go(self, node: str, token: int, record) -> None:
        """Give up `node` (its ownership record, if still the one of `token`), writing
        its incident record last: `record` (None: deleted; ...: the pending one, if any)."""
        with self._lock:
            self.share.tokens.pop(node, None)
            pending = self._pending.pop(node, ...)
        record = pending if record is ... else record
        ops = [delete_op(self._owner_key(node))]
        if record is not ...:
            key = self._incident_key(node)
            ops.append(delete_op(key) if record is None else put_op(key, record))
        self.client.txn([Compare(self._owner_key(node), "MOD", token)], ops)

    def _holds(self, node: str, now: float) -> bool:
        """Whether to keep `node`, assigned to another member now, a while longer: a
        response runs there (`hold`), for at most HOLD_MAX_S."""
        if self.hold is None or not self.hold(node):
            return False
        since = self._held.setdefault(node, now)
        if now - since < HOLD_MAX_S:
            return True
        log.warning("fleet member %s: node %s held %.0f s for its running response: let go",
                    self.id, node, now - since)
        return False

    def _unreached(self, node: str, reaches: dict, now: float) -> bool:
        """Whether to keep `node`, assigned elsewhere because this member stopped reaching
        its host, a while longer (reach_grace_s): a host that died is lost by every member
        within moments of each other, and then its nodes stay where they are."""
        mine = reaches.get(self.id)
        if mine is None or host_of(node) in mine:
            return False
        since = self._lost.setdefault(node, now)
        return now - since < self.reach_grace_s

    def _incident(self, node: str, token: int) -> dict | None:
        """The open incident recorded for `node` (by its former owner), if any; one that
        is not a record is deleted (while `token` is the node's)."""
        key = self._incident_key(node)
        kv = self.client.get(key)
        if kv is None:
            return None
        try:
            record = json.loads(kv.value)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("incident"), str):
            log.warning("fleet member %s: the incident record of node %s is not one, "
                        "deleted: %r", self.id, node, kv.value[:200])
            self.client.txn([Compare(self._owner_key(node), "MOD", token),
                             Compare(key, "MOD", kv.mod_revision)], [delete_op(key)])
            return None
        return record

    def _flush(self, tokens: dict[str, int]) -> None:
        """Write the pending incident records of the nodes this member owns, each only if
        the node's ownership record is still the one of its token."""
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            for node, value in list(pending.items()):
                token = tokens.get(node)
                if token is not None:
                    key = self._incident_key(node)
                    self.client.txn([Compare(self._owner_key(node), "MOD", token)],
                                    [delete_op(key) if value is None else put_op(key, value)])
                del pending[node]
        finally:
            with self._lock:  # what could not be written goes again, unless newer came
                self._pending = {**pending, **self._pending}

    def _record(self, known: set[str]) -> str:
        """This member's record under members/: its id, since when it is a member, the
        hosts it reaches and those whose nodes it knows (with `reach`), and its info."""
        record = {"id": self.id, "since": self._since, **self.info}
        if self.reach is not None:
            record["reaches"] = sorted(set(self.reach()))
            record["knows"] = sorted({host_of(n) for n in known})
        return json.dumps(record)

    def _member_key(self, member: str) -> str:
        return f"{self.prefix}members/{member}"

    def _owner_key(self, node: str) -> str:
        return f"{self.prefix}owners/{node}"

    def _incident_key(self, node: str) -> str:
        return f"{self.prefix}incidents/{node}"


def _hosts(value: str, key: str) -> frozenset[str] | None:
    """The hosts a member's record lists under `key` ("reaches", "knows"); None (every
    host) for a record without the list, or not a record."""
    try:
        hosts = json.loads(value).get(key)
    except (ValueError, AttributeError):
        return None
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        return None
    return frozenset(hosts)


def read_fleet(client: EtcdClient, prefix: str = PREFIX) -> dict:
    """The fleet as etcd holds it: {"members": {id: info, with "lease", "lease_ttl_s" and
    "lease_left_s" (whole seconds)},
    "owners": {node: [member, token]}, "incidents": {node: its open incident's record},
    "revision"} (for `backdoors status` and the tests)."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    rev, kvs = client.prefix(prefix)
    members, owners, incidents = {}, {}, {}
    for kv in kvs:
        rest = kv.key[len(prefix):]
        if rest.startswith("members/"):
            try:
                info = json.loads(kv.value)
            except ValueError:
                info = {"raw": kv.value[:200]}
            info = info if isinstance(info, dict) else {"raw": str(info)[:200]}
            info["lease"] = kv.lease
            info["lease_left_s"], info["lease_ttl_s"] = \
                client.time_to_live(kv.lease) if kv.lease else (None, None)
            members[rest[len("members/"):]] = info
        elif rest.startswith("owners/"):
            owners[rest[len("owners/"):]] = [kv.value, kv.mod_revision]
        elif rest.startswith("incidents/"):
            try:
                record = json.loads(kv.value)
            except ValueError:
                record = {"raw": kv.value[:200]}
            incidents[rest[len("incidents/"):]] = (
                record if isinstance(record, dict) else {"raw": str(record)[:200]})
    return {"members": members, "owners": owners, "incidents": incidents, "revision": rev}

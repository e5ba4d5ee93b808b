"""The agent's held descriptors in its supervisor's fd store, and taken back on start.

Every region a node registers (its memfd) and every session socket the agent holds is
also handed to the supervisor (systemd with `FileDescriptorStoreMax=`, or the lab's
keeper) with `FDSTORE=1`, under a name that carries what the agent needs to take it back:

    bd1.<base64url(msgpack {t: "r", n: node, r: name, k: kind, w: writable, p: pid, s: start})>
    bd1.<base64url(msgpack {t: "s", n: node, r: name, p: pid[, h: handed, d: read]})>
    bd1.<base64url(msgpack {t: "d", k: key, g: generation})>

(h, d: the stream offsets of a session restored here, see agent/sessions.py), so a
crashed, killed or restarted agent loses nothing: the next one gets the descriptors
back ($LISTEN_FDS) and re-adopts them into its RegionTable and SessionTable. Dropping a
region or session removes it from the store (`FDSTOREREMOVE=1`). The agent's own kernel
sensor boxes are not stored: a new agent makes new ones.

The third kind is the agent's own small durable state (`keep`): bytes it must not forget
across a restart and that no node's descriptor carries (the service addresses a node took
over, fences, sessions dumped but not yet adopted: agent/recovery.py), each key in a
memfd of its own. A new generation is stored before the old one is removed, so a crash
in between leaves both: the next agent takes the newest and drops the others.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from ..common.fdstore import Notifier, NotifyError, PassedFd, decode_name, encode_name
from ..sensors import Region
from .regions import MAPPED_KINDS, Entry, RegionTable
from .sessions import Session, SessionTable, offsets, since_from

log = logging.getLogger("backdoors.agent")

PREFIX = "bd1"


@dataclass
class Readopted:
    """What a starting agent took back from the store."""

    regions: int = 0
    sessions: int = 0
    dropped: list[str] = field(default_factory=list)  # names refused, with why
    state: dict[str, bytes] = field(default_factory=dict)  # key -> what `keep` kept


class AgentStore:
    """Mirrors the tables into the supervisor's fd store (a no-op without a supervisor)."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self._names: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()
        self._generation = 0  # of `keep`'s entries, above every one taken back
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def attach(self, regions: RegionTable, sessions: SessionTable) -> None:
        """Follow every later change of the tables."""
        if self.enabled:
            regions.observer = self.region_changed
            sessions.observer = self.session_changed

    # -- table changes -----------------------------------------------------------------

    def region_changed(self, what: str, entry: Entry) -> None:
        if entry.internal:
            return
        key = ("r", entry.node, entry.name)
        if what == "remove":
            return self._drop(key)
        name = encode_name(PREFIX, {"t": "r", "n": entry.node, "r": entry.name, "k": entry.kind,
                                    "w": entry.writable, "p": entry.pid, "s": entry.start_time})
        self._put(key, name, entry.region.fd)

    def session_changed(self, what: str, session: Session) -> None:
        key = ("s", session.node, session.name)
        if what == "remove":
            return self._drop(key)
        meta = {"t": "s", "n": session.node, "r": session.name, "p": session.pid}
        if session.since is not None:
            meta["h"], meta["d"] = offsets(session.since)
        name = encode_name(PREFIX, meta)
        self._put(key, name, session.sock.fileno())

    def keep(self, key: str, data: bytes | None) -> None:
        """Keep `data` under `key` (replacing what was kept there) in a memfd in the store;
        None or empty drops it. A failure is logged and counted, not raised."""
        if not self.enabled:
            return
        skey = ("d", key, "")
        with self._lock:
            old = self._names.get(skey)
            try:
                if data:
                    self._generation += 1
                    name = encode_name(PREFIX, {"t": "d", "k": key, "g": self._generation})
                    fd = os.memfd_create(f"bd-state-{key}"[:249], os.MFD_CLOEXEC)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        self.notifier.store(name, fd)
                    finally:
                        os.close(fd)
                    self._names[skey] = name
                else:
                    self._names.pop(skey, None)
                if old is not None:
                    self.notifier.remove(old)
            except (NotifyError, OSError) as e:
                self._failed(f"cannot keep the agent's state {key!r} in the fd store: {e}")

    def _put(self, key, name: str, fd: int) -> None:
        with self._lock:
            old = self._names.get(key)
            try:
                if old is not None:
                    self.notifier.remove(old)
                self.notifier.store(name, fd)
                self._names[key] = name
            except (NotifyError, OSError) as e:
                self._names.pop(key, None)
                self._failed(f"cannot keep {key[1]}/{key[2]} in the fd store: {e}")

    def _drop(self, key) -> None:
        with self._lock:
            name = self._names.pop(key, None)
            if name is None:
                return
            try:
                self.notifier.remove(name)
            except (NotifyError, OSError) as e:
                self._failed(f"cannot remove {key[1]}/{key[2]} from the fd store: {e}")

    def _failed(self, message: str) -> None:
        self.errors += 1
        log.warning("%s (it is not kept across an agent restart)", message)

    def count(self) -> int:
        with self._lock:
            return len(self._names)

    # -- start -------------------------------------------------------------------------

    def readopt(self, passed: list[PassedFd], regions: RegionTable,
                sessions: SessionTable) -> Readopted:
        """Take back the descriptors a previous agent stored (before `attach`); each passed
        fd is closed here (the tables keep duplicates). Entries that do not fit any more
        (node gone, name taken) are removed from the store."""
        out = Readopted()
        kept: dict[str, tuple[int, str]] = {}  # state key -> (generation, name) taken
        for p in passed:
            decoded = decode_name(p.name)
            try:
                if decoded is None or decoded[0] != PREFIX:
                    continue  # not ours (a socket of socket activation?): leave it closed
                meta = decoded[1]
                if meta["t"] == "d":
                    self._take_state(p, str(meta["k"]), int(meta["g"]), kept, out)
                    continue
                key = (meta["t"], meta["n"], meta["r"])
                if meta["t"] == "r":
                    region = Region(p.fd, writable=bool(meta["w"]),
                                    label=f"node {meta['n']} region {meta['r']!r}",
                                    map=meta["k"] in MAPPED_KINDS)
                    try:
                        regions.add(Entry(meta["n"], meta["r"], meta["k"], region,
                                          bool(meta["w"]), int(meta["p"]), float(meta["s"])))
                    except BaseException:
                        region.close()
                        raise
                    out.regions += 1
                elif meta["t"] == "s":
                    since = since_from(int(meta["h"]), int(meta["d"])) if "h" in meta else None
                    sessions.hold(meta["n"], meta["r"], p.fd, int(meta["p"]), since)
                    out.sessions += 1
                else:
                    raise ValueError(f"unknown entry type {meta['t']!r}")
                with self._lock:
                    self._names[key] = p.name
            except Exception as e:  # noqa: BLE001 - one bad entry must not stop the agent
                out.dropped.append(f"{p.name[:40]}…: {e}")
                log.warning("fd store entry %s not taken back: %s", p.name[:40], e)
                try:
                    self.notifier.remove(p.name)
                except (NotifyError, OSError):
                    pass
            finally:
                os.close(p.fd)
        with self._lock:
            for k, (_, name) in kept.items():
                self._names[("d", k, "")] = name
        return out

    def _take_state(self, p: PassedFd, key: str, generation: int,
                    kept: dict[str, tuple[int, str]], out: Readopted) -> None:
        """Read a `keep` entry; of several generations of one key the newest is taken and
        the others are removed from the store (a crash between store and remove)."""
        size = os.fstat(p.fd).st_size
        data = os.pread(p.fd, size, 0)
        if len(data) != size:
            raise ValueError(f"state {key!r}: read {len(data)} of {size} bytes")
        self._generation = max(self._generation, generation)
        older = kept.get(key)
        if older is not None and older[0] > generation:
            self.notifier.remove(p.name)
            return
        if older is not None:
            self.notifier.remove(older[1])
        kept[key] = (generation, p.name)
        out.state[key] = data

    def close(self) -> None:
        self.notifier.close()

"""The agent's held descriptors in its supervisor's fd store, and taken back on start.

Every region a node registers (its memfd) and every session socket the agent holds is
also handed to the supervisor (systemd with `FileDescriptorStoreMax=`, or the lab's
keeper) with `FDSTORE=1`, under a name that carries what the agent needs to take it back:

    bd1.<base64url(msgpack {t: "r", n: node, r: name, k: kind, w: writable, p: pid, s: start})>
    bd1.<base64url(msgpack {t: "s", n: node, r: name, p: pid})>

so a crashed, killed or restarted agent loses nothing: the next one gets the descriptors
back ($LISTEN_FDS) and re-adopts them into its RegionTable and SessionTable. Dropping a
region or session removes it from the store (`FDSTOREREMOVE=1`). The agent's own kernel
sensor boxes are not stored: a new agent makes new ones.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from ..common.fdstore import Notifier, NotifyError, PassedFd, decode_name, encode_name
from ..sensors import Region
from .regions import MAPPED_KINDS, Entry, RegionTable
from .sessions import Session, SessionTable

log = logging.getLogger("backdoors.agent")

PREFIX = "bd1"


@dataclass
class Readopted:
    """What a starting agent took back from the store."""

    regions: int = 0
    sessions: int = 0
    dropped: list[str] = field(default_factory=list)  # names refused, with why


class AgentStore:
    """Mirrors the tables into the supervisor's fd store (a no-op without a supervisor)."""

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self._names: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()
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
        name = encode_name(PREFIX, {"t": "s", "n": session.node, "r": session.name,
                                    "p": session.pid})
        self._put(key, name, session.sock.fileno())

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
        for p in passed:
            decoded = decode_name(p.name)
            try:
                if decoded is None or decoded[0] != PREFIX:
                    continue  # not ours (a socket of socket activation?): leave it closed
                meta = decoded[1]
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
                    sessions.hold(meta["n"], meta["r"], p.fd, int(meta["p"]))
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
        return out

    def close(self) -> None:
        self.notifier.close()

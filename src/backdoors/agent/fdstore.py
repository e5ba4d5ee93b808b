"""The agent's held descriptors in its supervisor's fd store, and taken back on start.

Every region a node registers (its memfd) and every session socket the agent holds is
also handed to the supervisor (systemd with `FileDescriptorStoreMax=`, or the lab's
keeper) with `FDSTORE=1`, under a name that carries what the agent needs to take it back:

    bd1.<base64url(msgpack {t: "r", n: node, r: name, k: kind, w: writable, p: pid, s: start, g})>
    bd1.<base64url(msgpack {t: "s", n: node, r: name, p: pid[, h: handed, d: read], g})>
    bd1.<base64url(msgpack {t: "d", k: key, g: generation})>

(h, d: the stream offsets of a session restored here, see agent/sessions.py), so a
crashed, killed or restarted agent loses nothing: the next one gets the descriptors
back ($LISTEN_FDS) and re-adopts them into its RegionTable and SessionTable. Dropping a
region or session removes it from the store (`FDSTOREREMOVE=1`). The agent's own kernel
sensor boxes are not stored: a new agent makes new ones.

Every name carries a generation `g`, so that an entry replaced by another file (a server
registering its own box over the agent's stand-in) is stored before the old one is
removed: a crash in between leaves both, and the next agent takes the newest of each
(node, name). The supervisor keeps one copy of a file, so the same file under new
metadata (a session held again by another pid) must be removed first: only that case has
a window, two messages wide. The same file under the same metadata (a server registering
what the agent already holds for it) does not touch the store.

The third kind is the agent's own small durable state (`keep`): bytes it must not forget
across a restart and that no node's descriptor carries (the service addresses a node took
over, fences, sessions dumped but not yet adopted: agent/recovery.py), each key in a
memfd of its own. A new generation is stored before the old one is removed, so a crash
in between leaves both: the next agent takes the newest and drops the others.
"""

from __future__ import annotations

import logging
import mmap
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
        self._files: dict[tuple[str, str, str], tuple[dict, tuple[int, int]]] = {}  # (meta, file)
        self._lock = threading.Lock()
        self._generation = 0  # of the entries' names, above every one taken back
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
        self._put(key, {"t": "r", "n": entry.node, "r": entry.name, "k": entry.kind,
                        "w": entry.writable, "p": entry.pid, "s": entry.start_time},
                  entry.region.fd)

    def session_changed(self, what: str, session: Session) -> None:
        key = ("s", session.node, session.name)
        if what == "remove":
            return self._drop(key)
        meta = {"t": "s", "n": session.node, "r": session.name, "p": session.pid}
        if session.since is not None:
            meta["h"], meta["d"] = offsets(session.since)
        self._put(key, meta, session.sock.fileno())

    def keep(self, key: str, data: bytes | None) -> None:
        """Keep `data` under `key` (replacing what was kept there) in a memfd in the store;
        None or empty drops it. A failure is logged and counted, not raised."""
        if self.enabled:
            self._keep(key, data, None)

    def keep_shared(self, key: str, data: bytes) -> mmap.mmap | None:
        """Keep `data` under `key` as `keep` does, and return a shared writable mapping of
        the kept copy: state changed too often to keep by copy (at every request) is
        written there and is in the store at once; the next agent reads it back as any
        kept state. None without a store, or on failure (logged and counted)."""
        if not self.enabled:
            return None
        return self._keep(key, data, lambda fd: mmap.mmap(fd, len(data)))

    def _keep(self, key: str, data: bytes | None, mapping) -> mmap.mmap | None:
        skey = ("d", key, "")
        mapped = None
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
                        if mapping is not None:
                            mapped = mapping(fd)
                        self.notifier.store(name, fd)
                    finally:
                        os.close(fd)
                    self._names[skey] = name
                else:
                    self._names.pop(skey, None)
                if old is not None:
                    self.notifier.remove(old)
            except (NotifyError, OSError) as e:
                if mapped is not None:
                    mapped.close()
                self._failed(f"cannot keep the agent's state {key!r} in the fd store: {e}")
                return None
        return mapped

    def _put(self, key, meta: dict, fd: int) -> None:
        """Store `fd` under `meta` (and a new generation) in place of what `key` had."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            return self._failed(f"cannot keep {key[1]}/{key[2]} in the fd store: {e}")
        file = (st.st_dev, st.st_ino)
        with self._lock:
            old = self._names.get(key)
            before = self._files.get(key)
            if old is not None and before == (meta, file):
                return  # stored so already
            same_file = old is not None and before is not None and before[1] == file
            self._generation += 1
            name = encode_name(PREFIX, {**meta, "g": self._generation})
            try:
                if same_file:  # the supervisor would keep the old name's copy: it goes first
                    self.notifier.remove(old)
                    self._forget(key)
                self.notifier.store(name, fd)
            except (NotifyError, OSError) as e:
                return self._failed(f"cannot keep {key[1]}/{key[2]} in the fd store: {e}")
            self._names[key], self._files[key] = name, (meta, file)
            if old is not None and not same_file:
                try:
                    self.notifier.remove(old)
                except (NotifyError, OSError) as e:
                    self._failed(f"cannot remove the replaced {key[1]}/{key[2]} from the fd "
                                 f"store: {e}")

    def _forget(self, key) -> str | None:
        self._files.pop(key, None)
        return self._names.pop(key, None)

    def _drop(self, key) -> None:
        with self._lock:
            name = self._forget(key)
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
        for p, decoded in self._newest(passed):
            try:
                if decoded is None or decoded[0] != PREFIX:
                    continue  # not ours (a socket of socket activation?): leave it closed
                meta = decoded[1]
                if meta["t"] == "d":
                    self._take_state(p, str(meta["k"]), int(meta["g"]), kept, out)
                    continue
                key = (meta["t"], meta["n"], meta["r"])
                self._generation = max(self._generation, int(meta.get("g", 0)))
                meta.pop("g", None)
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
                st = os.fstat(p.fd)
                with self._lock:
                    self._names[key] = p.name
                    self._files[key] = (meta, (st.st_dev, st.st_ino))
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

    def _newest(self, passed: list[PassedFd]) -> list[tuple[PassedFd, tuple | None]]:
        """`passed` with each name decoded, without the older generations of a region or
        session stored twice (a crash between storing a replacement and removing the old
        one): those are removed from the store and closed."""
        newest: dict[tuple, tuple[int, PassedFd, tuple]] = {}
        out = []
        for p in passed:
            decoded = decode_name(p.name)
            meta = decoded[1] if decoded is not None and decoded[0] == PREFIX else None
            if not isinstance(meta, dict) or meta.get("t") not in ("r", "s"):
                out.append((p, decoded))
                continue
            key, g = (meta["t"], meta.get("n"), meta.get("r")), meta.get("g", 0)
            g = g if isinstance(g, int) else 0
            other = newest.get(key)
            if other is None:
                newest[key] = (g, p, decoded)
                continue
            older = other[1] if g > other[0] else p
            newest[key] = max(other, (g, p, decoded), key=lambda entry: entry[0])
            log.warning("fd store entry %s: a newer one of %s/%s was stored, dropped",
                        older.name[:40], key[1], key[2])
            try:
                self.notifier.remove(older.name)
            except (NotifyError, OSError):
                pass
            os.close(older.fd)
        return out + [(p, decoded) for _, p, decoded in newest.values()]

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

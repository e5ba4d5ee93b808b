"""The seam between Continuation Boxes and the agent: the Registrar.

create_cb() calls `registrar.attach(box)` once the box exists, and box.close() calls
`registrar.detach(box)`. Attaching is the original design's registration of the CB and
"association of the I/O channel": the agent keeps the CB region (a memfd) and a duplicate
of the session socket, so both outlive a crashed server.

Without an agent (BACKDOORS_AGENT_SOCKET unset: tests, servers run outside backdoors)
the default registrar does nothing and the server runs as usual, just not recoverable.
With it, `AgentRegistrar` calls the registration client (`backdoors.common.runtime`, or any
object with the same calls, a `RegistrationLink`):

    register_region(fd, *, name, kind)   kind "cb": the CB memfd, named "cb-<session>"
    hold_socket(fd, *, name)             the session socket, under the same name
    release(name)                        the session ended: drop region and socket
    attach_sessions([(name, fd, sock)])  optional: both for many boxes in one request

Boxes attached in the background (`box.attach_in_background`: every box of an asyncio
server, recovered ones of any server) are attached in batches: the attaches queued on the
worker one after another go in one `attach_sessions` request (up to runtime.MAX_ATTACH
each), so a burst of new sessions, or a thousand recovered ones, waits for a few round
trips to the agent rather than two per box. An agent without that op (older) is sent
register_region and hold_socket per box, as is a batch it refuses as a whole.

When the agent restarts (its socket file replaced), the registrar registers every live
box again (`runtime.AgentWatch`), including one whose registration the agent's death cut
short (it may hold part of it: nothing is released then). An agent that refuses does not
stop the session: the box is served unregistered (`box.registered` is False) and a
warning is logged.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from ..common import runtime
from ..common.runtime import AGENT_SOCKET_ENV, RegistrationLink
from ..errors import BackdoorsError
from .errors import ContinuationError

KIND = "cb"
_NEEDED = ("register_region", "hold_socket", "release")

log = logging.getLogger("backdoors.continuations")


class _Channel(Protocol):
    def fileno(self) -> int: ...


class ContinuationBox(Protocol):
    """What a registrar uses of a box (`box.ContinuationBox`): its region's memfd and name,
    its session id, its connection, and the flag saying whether the agent holds it."""

    session: str
    conn: _Channel
    registered: bool

    @property
    def fd(self) -> int: ...

    @property
    def name(self) -> str: ...


class Registrar(Protocol):
    """Hands a box's region and socket to the agent, and takes them back."""

    def attach(self, box: ContinuationBox) -> bool:
        """Register `box.fd` (kind "cb", name `box.name`) and hold `box.conn.sock`;
        True if the agent now holds both."""

    def detach(self, box: ContinuationBox) -> None:
        """The session ended normally: the agent drops the region and the socket."""


class Worker:
    """One daemon thread running calls in the order submitted: the agent calls that must
    not hold up a session (recovered sessions' registration, every call of an asyncio
    server) run here, and their order is kept (a session's release after its attach)."""

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on the worker thread after everything submitted before."""
        return self._put(fn, args, None)

    def submit_batched(self, many: Callable[[list], list], item: Any) -> Future:
        """Run many([item, ...]) on the worker thread after everything submitted before,
        with the items of the calls of the same `many` queued right after this one (up to
        MAX_BATCH): one call for a run of them, each future getting its item's result."""
        return self._put(many, (item,), many)

    def _put(self, fn: Callable[..., Any], args: tuple, many: Callable | None) -> Future:
        future: Future = Future()
        with self._lock:
            if self._pid != os.getpid():  # a forked child starts its own thread and queue
                self._pid, self._thread, self._queue = os.getpid(), None, queue.SimpleQueue()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)
                self._thread.start()
            self._queue.put((future, fn, args, many))
        return future

    def _run(self) -> None:
        carried = None  # taken from the queue while gathering a batch, not of it
        while True:
            entry, carried = carried or self._queue.get(), None
            many = entry[3]
            if many is None:
                future, fn, args, _ = entry
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as err:  # noqa: BLE001 - handed to whoever waits
                        future.set_exception(err)
                continue
            batch = [entry]
            while len(batch) < MAX_BATCH:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following[3] != many:
                    carried = following
                    break
                batch.append(following)
            batch = [e for e in batch if e[0].set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = many([e[2][0] for e in batch])
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits
                for e in batch:
                    e[0].set_exception(err)
            else:
                for e, result in zip(batch, results):
                    e[0].set_result(result)


#: items one batched call of the worker takes at most (a thousand recovered sessions'
#: attaches: a few calls, each sending runtime.MAX_ATTACH boxes per request)
MAX_BATCH = 256


#: the worker of this process's registrars (one connection to the agent: one thread)
WORKER = Worker("bd-cb-register")


class NullRegistrar:
    """No agent: sessions are served but not recoverable by an agent."""

    def attach(self, box: ContinuationBox) -> bool:
        return False

    def detach(self, box: ContinuationBox) -> None:
        pass


class AgentRegistrar:
    """Registers boxes through a registration client offering register_region, hold_socket
    and release (the `backdoors.common.runtime` module, or any object with those calls)."""

    def __init__(self, client: RegistrationLink, *, socket_path: str | None = None):
        missing = [name for name in _NEEDED if not callable(getattr(client, name, None))]
        if missing:
            raise ContinuationError(
                f"agent client {getattr(client, '__name__', client)!r} lacks {', '.join(missing)}: "
                f"Continuation Boxes need {', '.join(_NEEDED)} (see continuations/agent_link.py)"
            )
        self.client = client
        # boxes the agent holds now, by name: registered again when the agent restarts
        self._held: weakref.WeakValueDictionary[str, ContinuationBox] = weakref.WeakValueDictionary()
        self._held_lock = threading.Lock()
        self.socket_path = socket_path
        self._watch: runtime.AgentWatch | None = None
        self.reattached = 0
        self.batches = callable(getattr(client, "attach_sessions", None))

    def attach(self, box: ContinuationBox) -> bool:
        """True if the agent holds the box, or may (cut short by the agent's death: the
        box is registered again when the agent is back); False if the agent refused."""
        return self.attach_many([box])[0]

    def attach_many(self, boxes: list[ContinuationBox]) -> list[bool]:
        """attach() for each box, in as few requests as the agent takes."""
        replaced: dict[str, ContinuationBox] = {}  # a box held before under the same name
        with self._held_lock:  # first: an agent restarting from now on registers them again
            for box in boxes:
                old = self._held.get(box.name)
                if old is not None and old is not box:
                    replaced[box.name] = old
                self._held[box.name] = box
            if self._watch is None and self.socket_path:
                self._watch = runtime.AgentWatch(self.socket_path, self._agent_back)
        outcome = self._attach_all(boxes)
        refused = [box for box in boxes if outcome[box] == "refused"]
        if refused:
            with self._held_lock:
                for box in refused:  # (the agent keeps what it held under that name)
                    if self._held.get(box.name) is box:
                        if box.name in replaced:
                            self._held[box.name] = replaced[box.name]
                        else:
                            del self._held[box.name]
        return [outcome[box] != "refused" for box in boxes]

    def _agent_back(self) -> None:
        """The agent restarted: register every live box again. A new agent that took
        them back from its fd store already holds them (same process: replaced in place);
        one started without the store learns them here."""
        with self._held_lock:
            boxes = [box for box in self._held.values() if box.fd >= 0]
        for box, got in self._attach_all(boxes).items():
            if got == "held":
                box.registered = True
                self.reattached += 1
        if boxes:
            log.info("agent restarted: registered %d sessions again", len(boxes))

    def _attach_all(self, boxes: list[ContinuationBox]) -> dict[ContinuationBox, str]:
        """_attach() of each box, runtime.MAX_ATTACH boxes per request while the agent
        takes attach_sessions."""
        out: dict[ContinuationBox, str] = {}
        todo = list(boxes)
        while todo:
            if not self.batches:
                out.update((box, self._attach(box)) for box in todo)
                break
            chunk, todo = todo[:runtime.MAX_ATTACH], todo[runtime.MAX_ATTACH:]
            for box in [b for b in chunk if b.fd < 0 or b.conn.fileno() < 0]:
                out[box] = "refused"  # closed meanwhile: nothing of it to hand over
                chunk.remove(box)
            if not chunk:
                continue
            by_name = {box.name: box for box in chunk}
            try:
                reply = self.client.attach_sessions(
                    [(box.name, box.fd, box.conn.fileno()) for box in chunk])
            except (BackdoorsError, OSError) as err:
                if _unanswered(err):
                    log.warning("%d sessions: the agent did not answer their attach: %s",
                                len(chunk), err)
                    out.update((box, "cut") for box in chunk)
                    continue
                if "unknown op" in str(err) or "unknown field" in str(err):
                    log.info("the agent does not take attach_sessions (older): boxes are "
                             "registered one by one")
                    self.batches = False
                out.update((box, self._attach(box)) for box in chunk)  # each on its own
                continue
            for name, why in dict(reply.get("refused") or {}).items():
                if (box := by_name.get(name)) is not None:
                    log.warning("session %s: agent did not attach it: %s", box.session, why)
                    out[box] = "refused"
            out.update((by_name[n], "held") for n in reply.get("held") or () if n in by_name)
            later = [by_name[n] for n in reply.get("later") or () if n in by_name]
            if later and len(later) < len(chunk):  # the agent's turn ended: sent again
                todo[:0] = later
        for box in boxes:  # a box the reply did not name (a confused agent): as if cut
            out.setdefault(box, "cut")
        return out

    def _attach(self, box: ContinuationBox) -> str:
        """"held", "refused" (the agent said no: nothing of it held) or "cut" (no answer:
        the agent died or is unreachable, and may hold the region)."""
        try:
            self.client.register_region(box.fd, name=box.name, kind=KIND)
        except (BackdoorsError, OSError) as err:
            log.warning("session %s: agent did not register its box: %s", box.session, err)
            return "cut" if _unanswered(err) else "refused"
        try:
            self.client.hold_socket(box.conn.fileno(), name=box.name)
        except (BackdoorsError, OSError) as err:
            log.warning("session %s: agent did not take its socket: %s", box.session, err)
            if _unanswered(err):
                return "cut"
            self._release(box)
            return "refused"
        return "held"

    def release_later(self, name: str) -> Future:
        """The agent drops session `name` (one this process will not serve), on the worker."""
        return WORKER.submit(self._release_name, name, name)

    def detach(self, box: ContinuationBox) -> None:
        with self._held_lock:
            if self._held.get(box.name) is box:
                del self._held[box.name]
        self._release(box)

    def _release(self, box: ContinuationBox) -> None:
        self._release_name(box.name, box.session)

    def _release_name(self, name: str, session: str) -> None:
        try:
            self.client.release(name)
        except (BackdoorsError, OSError) as err:
            log.warning("session %s: agent did not release it: %s", session, err)


def _unanswered(err: Exception) -> bool:
    """The agent did not answer (gone, restarting or too slow), as opposed to refusing."""
    return isinstance(err, OSError) or getattr(err, "code", None) == "no_agent"


NULL = NullRegistrar()
_cached: tuple[str, Registrar] | None = None


def default_registrar(environ: Mapping[str, str] = os.environ) -> Registrar:
    """NULL when $BACKDOORS_AGENT_SOCKET is unset, else an AgentRegistrar over the
    registration client `backdoors.common.runtime`."""
    global _cached
    path = environ.get(AGENT_SOCKET_ENV, "")
    if not path:
        return NULL
    if _cached is None or _cached[0] != path:
        _cached = (path, AgentRegistrar(runtime, socket_path=path))
    return _cached[1]

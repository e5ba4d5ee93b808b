"""The batched hand-over (continuations.adoption, hand-over v2), with real sockets and CBs.

- a batch larger than one SCM_RIGHTS message (SCM_MAX_FD descriptors) is split into
  frames of at most MAX_BATCH sessions, each socket arriving with its own CB;
- a batch with one bad session: the others are adopted, the bad one is refused by name
  and the sender still holds it (the readopt path puts it back in the agent's table);
- a server that dies mid-batch: nothing is lost; the agent holds every session not
  refused as the dead server's, so they are orphans for its successor (agent.owners).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from backdoors.agent import recovery
from backdoors.agent.owners import OwnerWatch
from backdoors.agent.protocol import MovedSession
from backdoors.agent.recovery import Started, _hand_over_to
from backdoors.agent.regions import RegionTable
from backdoors.agent.sessions import SessionTable
from backdoors.common import ipc
from backdoors.continuations import AdoptionClient, Handover, create_cb
from backdoors.continuations.adoption import (
    MAX_BATCH, HandoverVerdicts, UnixAdoptionSource, _decode_batch,
)
from backdoors.continuations.agent_link import NULL
from backdoors.continuations.errors import AdoptionError, NotHanded, NoVerdict
from backdoors.tcprepair import bytes_handed, bytes_received

NODE = "n0"


class Sessions:
    """`count` live loopback TCP sessions, each with its CB (exported once)."""

    def __init__(self, count: int):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=count)
        self.clients, self.cbs = [], []
        for _ in range(count):
            self.clients.append(socket.create_connection(self.listener.getsockname()))
            conn, _ = self.listener.accept()
            cb = create_cb(conn, registrar=NULL)
            cb.conn.sendall(b"x")
            cb.export({"n": 1})
            self.cbs.append(cb)

    def handover(self, cb, session: str | None = None) -> Handover:
        sock = cb.conn.sock
        return Handover(session or cb.session, bytes_handed(sock), bytes_received(sock))

    def items(self) -> list:
        return [(cb.conn.sock, cb.fd, self.handover(cb)) for cb in self.cbs]

    def close(self) -> None:
        for cb in self.cbs:
            cb.close()
        for c in self.clients:
            c.close()
        self.listener.close()


@pytest.fixture
def live():
    made: list[Sessions] = []

    def make(count: int) -> Sessions:
        made.append(Sessions(count))
        return made[-1]

    yield make
    for s in made:
        s.close()


class Server:
    """A recovery server (UnixAdoptionSource) on a thread; keeps what it recovers."""

    def __init__(self, path: str):
        self.source = UnixAdoptionSource(path)
        self.recovered = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()  # descriptors here go beyond select's 1024
        poller.register(self.source.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            if any(fd == self._stop_r for fd, _ in poller.poll()):
                return
            while (r := self.source.receive()) is not None:
                self.recovered.append(r)

    def taken(self, count: int) -> list:
        """What it recovered, once `count` sessions are (a verdict precedes the taking)."""
        deadline = time.monotonic() + 10
        while len(self.recovered) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.recovered

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for r in self.recovered:
            r.close()
        self.source.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def test_a_batch_beyond_one_message_is_split_and_each_socket_keeps_its_cb(live, tmp_path):
    """300 sessions (600 descriptors, over twice SCM_MAX_FD): frames of at most MAX_BATCH
    sessions, each batch's verdicts given to `answered` as they come; every session
    adopted, with its own socket (the peer its client is)."""
    sessions = live(300)
    path = str(tmp_path / "adopt.sock")
    frames: list[tuple[int, int]] = []
    listener = ipc.listen(path, mode=0o600, backlog=1)
    listener.setblocking(True)

    def record() -> None:  # a scripted server: counts each frame's sessions and fds
        conn, _ = listener.accept()
        with conn:
            reader = ipc.FrameReader(max_bytes=1 << 20, max_fds=2 * MAX_BATCH)
            while sum(n for n, _ in frames) < 300:
                frame = reader.read(conn)
                batch = _decode_batch(frame.payload)
                frames.append((len(batch.sessions), len(frame.fds)))
                frame.close_fds()
                ipc.send(conn, HandoverVerdicts([
                    {"session": h.session, "ok": True} for h in batch.sessions]))

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    with AdoptionClient(path) as client:
        assert client.hand_over_all(sessions.items()) == [None] * 300
    thread.join(5)
    listener.close()
    assert frames == [(MAX_BATCH, 2 * MAX_BATCH), (MAX_BATCH, 2 * MAX_BATCH),
                      (300 - 2 * MAX_BATCH, 2 * (300 - 2 * MAX_BATCH))]

    server = Server(str(tmp_path / "real.sock"))
    answered: list = []  # each batch's verdicts, as they come
    try:
        with AdoptionClient(server.source.path) as client:
            assert client.hand_over_all(
                sessions.items(), answered=lambda *batch: answered.append(batch)) == [None] * 300
        assert answered == [(lo, hi, [None] * (hi - lo)) for lo, hi in
                            ((0, MAX_BATCH), (MAX_BATCH, 2 * MAX_BATCH), (2 * MAX_BATCH, 300))]
        expected = {cb.session: cb.conn.sock.getpeername() for cb in sessions.cbs}
        assert {r.session: r.sock.getpeername() for r in server.taken(300)} == expected
    finally:
        server.stop()


def test_one_bad_session_is_refused_and_the_others_adopted(live, tmp_path):
    sessions = live(5)
    items = sessions.items()
    wrong = sessions.cbs[0].session  # session 2 claims another session's id: its CB disagrees
    items[2] = (items[2][0], items[2][1], sessions.handover(sessions.cbs[2], wrong))
    server = Server(str(tmp_path / "adopt.sock"))
    try:
        with AdoptionClient(server.source.path) as client:
            verdicts = client.hand_over_all(items)
        assert [v is None for v in verdicts] == [True, True, False, True, True]
        assert isinstance(verdicts[2], AdoptionError) and not isinstance(verdicts[2], NoVerdict)
        assert "names session" in str(verdicts[2]) and sessions.cbs[2].session in str(verdicts[2])
        assert sorted(r.session for r in server.taken(4)) == sorted(
            cb.session for i, cb in enumerate(sessions.cbs) if i != 2)
        # the sender's copy of the refused session is intact: it still talks to its client
        sessions.cbs[2].conn.sendall(b"still here")
        assert sessions.clients[2].recv(64).endswith(b"still here")
    finally:
        server.stop()


def test_readopt_puts_back_the_refused_session_of_a_batch(live, tmp_path):
    """The readopt path (agent.owners): a batch of orphans of which one is refused; the
    adopted ones are held as the server's, the refused one is held again as before."""
    sessions = live(3)
    regions = RegionTable([NODE], max_regions=8, max_region_bytes=1 << 20, max_node_bytes=1 << 24)
    table = SessionTable([NODE], max_per_node=8)
    watch = OwnerWatch(table, regions, publish=lambda *a, **k: None,
                       audit=SimpleNamespace(write=lambda **k: None), timeout_s=60.0,
                       run_dir=str(tmp_path))
    dead = 2**22 + 1  # a pid that is no process (pid_max is at most 2**22)
    names = [f"cb-{cb.session}" for cb in sessions.cbs]
    server = Server(str(tmp_path / "adopt.sock"))
    try:
        held = []
        for i, cb in enumerate(sessions.cbs):
            # session 1's box is session 0's: the server finds another session id in it
            regions.keep(NODE, names[i], "cb", sessions.cbs[0 if i == 1 else i].fd, dead)
            held.append(table.hold(NODE, names[i], cb.conn.sock.fileno(), dead))
        failed: dict[str, str] = {}
        call = SimpleNamespace(node=SimpleNamespace(name=NODE))
        with AdoptionClient(server.source.path) as client:
            handed = watch._hand(call, client, os.getpid(), held, failed)
        assert handed == 2 and list(failed) == [names[1]]
        assert {s.name: s.pid for s in table.list(NODE)} == {
            names[0]: os.getpid(), names[1]: dead, names[2]: os.getpid()}
    finally:
        server.stop()
        watch.stop()
        table.close()
        for entry in regions.entries(NODE):
            regions.remove(NODE, entry.name)


def test_a_server_dying_mid_batch_loses_nothing(live, tmp_path, monkeypatch):
    """The server reads the first batch frame and dies without a verdict. Every session
    (sent or not) stays held by the agent as the dead server's; the owner watch sees the
    death, so they are orphans for a restarted server to readopt."""
    count = MAX_BATCH + 10  # two frames
    sessions = live(count)
    regions = RegionTable([NODE], max_regions=8, max_region_bytes=1 << 20,
                          max_node_bytes=1 << 28, max_sessions=count)
    table = SessionTable([NODE], max_per_node=count)
    died = threading.Event()
    watch = OwnerWatch(table, regions, publish=lambda *a, **k: died.set(),
                       audit=SimpleNamespace(write=lambda **k: None), timeout_s=60.0,
                       run_dir=str(tmp_path))
    watch.start()
    path = str(tmp_path / "adopt.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server (its pid is the listener's credentials): one frame, then gone
        try:
            listener = ipc.listen(path, mode=0o600, backlog=1)
            listener.settimeout(60)  # (a parent that failed first never connects)
            os.write(ready_w, b"r")
            conn, _ = listener.accept()
            ipc.FrameReader(max_bytes=1 << 20, max_fds=2 * MAX_BATCH).read(conn)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    monkeypatch.setattr(recovery, "outsider", lambda node, pid: None)  # no node here
    started = [Started(MovedSession(f"cb-{cb.session}", b"", b""),
                       SimpleNamespace(send_queue=b"", handed=bytes_handed(cb.conn.sock),
                                       read=bytes_received(cb.conn.sock)),
                       socket.socket(fileno=os.dup(cb.conn.sock.fileno())), os.dup(cb.fd))
               for cb in sessions.cbs]
    call = SimpleNamespace(
        node=SimpleNamespace(name=NODE, node=None),
        agent=SimpleNamespace(sessions=table, regions=regions, owners=watch))
    failed: dict[str, str] = {}
    try:
        handed = _hand_over_to(call, path, started, failed, {}, [])
        os.waitpid(pid, 0)
        assert failed == {} and handed == count
        assert {s.pid for s in table.list(NODE)} == {pid}
        assert sorted(s.name for s in table.list(NODE)) == sorted(f"cb-{cb.session}"
                                                                 for cb in sessions.cbs)
        assert died.wait(10)  # the watch saw the server die holding them
        assert len(watch._orphaned(NODE, pid)) == count
    finally:
        watch.stop()
        table.close()
        for entry in regions.entries(NODE):
            regions.remove(NODE, entry.name)


def test_sessions_after_a_broken_window_are_not_handed(live, tmp_path):
    """The client side of the same death: the first frame's sessions have no verdict
    (NoVerdict: the server may have taken them), the rest were never sent (NotHanded)."""
    sessions = live(MAX_BATCH + 10)
    path = str(tmp_path / "adopt.sock")
    listener = ipc.listen(path, mode=0o600, backlog=1)
    listener.setblocking(True)

    def die_after_one() -> None:
        conn, _ = listener.accept()
        ipc.FrameReader(max_bytes=1 << 20, max_fds=2 * MAX_BATCH).read(conn).close_fds()
        conn.close()

    thread = threading.Thread(target=die_after_one, daemon=True)
    thread.start()
    with AdoptionClient(path, window=1) as client:
        verdicts = client.hand_over_all(sessions.items())
    thread.join(5)
    listener.close()
    assert all(isinstance(v, NoVerdict) for v in verdicts[:MAX_BATCH])
    assert all(isinstance(v, NotHanded) for v in verdicts[MAX_BATCH:])


def test_client_refuses_a_batch_size_beyond_one_message(tmp_path):
    with pytest.raises(ValueError, match="batch"):
        AdoptionClient(str(tmp_path / "none.sock"), batch=MAX_BATCH + 1)


def test_readopt_sends_a_channel_to_its_server_s_port(tmp_path):
    """A channel (a socket the server connect()ed for a client session) goes to the
    adoption socket of the server it belongs to (its box's home port), not to one named
    after its own ephemeral port; an accepted session goes by its local port."""
    from backdoors.continuations.box import new_box

    regions = RegionTable([NODE], max_regions=8, max_region_bytes=1 << 20, max_node_bytes=1 << 24)
    table = SessionTable([NODE], max_per_node=8)
    watch = OwnerWatch(table, regions, publish=lambda *a, **k: None,
                       audit=SimpleNamespace(write=lambda **k: None), timeout_s=60.0,
                       run_dir=str(tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        out = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        channel = new_box(out, state_capacity=256, log_capacity=256, registrar=NULL,
                          channel_of=8080)
        client = create_cb(accepted, registrar=NULL)
        try:
            held = {}
            for name, cb in (("cb-channel", channel), ("cb-client", client)):
                regions.keep(NODE, name, "cb", cb.fd, os.getpid())
                held[name] = table.hold(NODE, name, cb.conn.sock.fileno(), os.getpid())
            assert watch._port(held["cb-channel"]) == 8080
            assert watch._port(held["cb-client"]) == listener.getsockname()[1]
            assert out.getsockname()[1] not in (8080, listener.getsockname()[1])
        finally:
            watch.stop()
            table.close()
            for entry in regions.entries(NODE):
                regions.remove(NODE, entry.name)
            channel.close()
            client.close()


def _ending_server(path: str, end: int) -> threading.Thread:
    """A scripted recovery server: takes one frame, ends session `end` at once (its
    client had shut its side: the connection is over, CLOSED, once the client's kernel
    acknowledges) before its verdicts, all of them ok; as a front end closes a spare
    channel no session took the moment it arrives."""
    from backdoors.tcprepair.kernel import CLOSE, tcp_info

    listener = ipc.listen(path, mode=0o600, backlog=1)
    listener.setblocking(True)

    def run() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            frame = ipc.FrameReader(max_bytes=1 << 20, max_fds=2 * MAX_BATCH).read(conn)
            batch = _decode_batch(frame.payload)
            with socket.socket(fileno=os.dup(frame.fds[2 * end])) as sock:
                sock.shutdown(socket.SHUT_RDWR)
                deadline = time.monotonic() + 10
                while tcp_info(sock).state != CLOSE and time.monotonic() < deadline:
                    time.sleep(0.001)
            frame.close_fds()
            ipc.send(conn, HandoverVerdicts([
                {"session": h.session, "ok": True} for h in batch.sessions]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("path", ["adopt", "readopt"])
def test_a_session_the_server_ends_at_once_fails_nothing_else(live, tmp_path, monkeypatch,
                                                              path):
    """The server takes a batch and ends one of its sessions before the agent holds them
    (seen with spare channels: the front end closed each at once, the middle tier closed
    its end, and the agent's duplicate was no longer connected). Holding that one was
    refused ("not connected"), and the refusal failed the whole adopt: every session of
    the move stayed in limbo until the next attempt, 3 s later. Now the others are held
    as the server's and the ended one is only the server's."""
    sessions = live(4)
    sessions.clients[1].shutdown(socket.SHUT_WR)
    names = [f"cb-{cb.session}" for cb in sessions.cbs]
    regions = RegionTable([NODE], max_regions=8, max_region_bytes=1 << 20,
                          max_node_bytes=1 << 24)
    table = SessionTable([NODE], max_per_node=8)
    adopt = str(tmp_path / "adopt.sock")
    thread = _ending_server(adopt, end=1)
    failed: dict[str, str] = {}
    try:
        if path == "adopt":
            monkeypatch.setattr(recovery, "outsider", lambda node, pid: None)  # no node here
            started = [Started(MovedSession(name, b"", b""),
                               SimpleNamespace(send_queue=b"", handed=bytes_handed(cb.conn.sock),
                                               read=bytes_received(cb.conn.sock)),
                               socket.socket(fileno=os.dup(cb.conn.sock.fileno())), os.dup(cb.fd))
                       for name, cb in zip(names, sessions.cbs)]
            call = SimpleNamespace(node=SimpleNamespace(name=NODE, node=None), agent=SimpleNamespace(
                sessions=table,
                regions=regions))
            handed = _hand_over_to(call, adopt, started, failed, {}, [])
        else:
            watch = OwnerWatch(table, regions, publish=lambda *a, **k: None,
                               audit=SimpleNamespace(write=lambda **k: None), timeout_s=60.0,
                               run_dir=str(tmp_path))
            held = [table.hold(NODE, name, cb.conn.sock.fileno(), 2**22 + 1)
                    for name, cb in zip(names, sessions.cbs)]
            for name, cb in zip(names, sessions.cbs):
                regions.keep(NODE, name, "cb", cb.fd, 2**22 + 1)
            with AdoptionClient(adopt) as client:
                handed = watch._hand(SimpleNamespace(node=SimpleNamespace(name=NODE)), client,
                                     os.getpid(), held, failed)
        thread.join(10)
        assert handed == 4 and failed == {}
        assert sorted(s.name for s in table.list(NODE)) == sorted(names[:1] + names[2:])
        assert {s.pid for s in table.list(NODE)} == {os.getpid()}
        assert not table._adopted  # no restored state is kept for the ended one
    finally:
        table.close()
        for entry in regions.entries(NODE):
            regions.remove(NODE, entry.name)

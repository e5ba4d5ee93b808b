"""The asyncio core of recoverable servers, on real loopback sockets: AsyncListener takes
new connections and recovered sessions on one accept path, and the reader/writer pair of
create_cb_async resumes a session byte-exact (output skipped, input replayed) from a box
handed over as the agent hands it (live kernel byte counts, SCM_RIGHTS on the adoption
socket). A bad hand-over is refused and the server goes on; a recovered session whose
box cannot be opened is closed and released, never left hanging; registration with the
agent never stops the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import tempfile
import threading

import msgspec
import pytest

from backdoors.continuations import (
    AdoptionClient,
    AdoptionError,
    AgentRegistrar,
    AsyncListener,
    Handover,
    Recovered,
    create_cb_async,
    hand_over,
    read_cb,
    run,
)
from backdoors.continuations.agent_link import NULL, WORKER
from test_continuations_conn import live_handover


@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="bdt-acb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def numbered(count: int) -> bytes:
    """`count` bytes of 8-byte big-endian block numbers (a lost or repeated block shows)."""
    return b"".join(struct.pack(">Q", n) for n in range((count + 7) // 8))[:count]


def abandon(cb) -> None:
    """What a frozen or dead server leaves: its descriptors go, no FIN (the recovery
    server holds a duplicate of the socket)."""
    cb.box.region.close()
    cb.box.conn.sock.close()


async def hand_over_soon(path: str, cb, handover: Handover | None = None) -> None:
    """Hand `cb`'s session to the server at `path` from a thread, as the agent does."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, hand_over, path, cb.conn.sock, cb.fd,
                               handover or live_handover(cb))


async def connected(listener: AsyncListener):
    """A client socket and the server's box of its connection (a new session)."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, listener.address)
    conn = await listener.accept()
    assert isinstance(conn, socket.socket)
    return client, await create_cb_async(conn, registrar=NULL)


async def read_all(client: socket.socket, count: int) -> bytes:
    loop, got = asyncio.get_running_loop(), bytearray()
    while len(got) < count and (chunk := await loop.sock_recv(client, 65536)):
        got += chunk
    return bytes(got)


def test_new_and_recovered_sessions_share_one_accept_path(short_tmp):
    path = os.path.join(short_tmp, "adopt.sock")

    async def main():
        async with AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            client, old = await connected(listener)
            await asyncio.get_running_loop().sock_sendall(client, b"request\nnext\n")
            assert await old.reader.readline() == b"request\n"
            old.writer.write(b"reply-1 ")
            assert await old.export({"step": 1}) == 1
            old.writer.write(b"reply-2 ")  # after the export: regenerated, then skipped
            assert await old.reader.readline() == b"next\n"  # after it: replayed
            await old.writer.drain()

            accepted, _ = await asyncio.gather(listener.accept(), hand_over_soon(path, old))
            assert isinstance(accepted, Recovered) and accepted.session == old.session
            abandon(old)
            async with await create_cb_async(accepted, registrar=NULL) as new:
                assert new.recovered and new.import_state() == {"step": 1}
                assert await new.reader.readline() == b"next\n"
                new.writer.write(b"reply-2 ")
                assert new.conn.skipping == 0
                new.writer.write(b"reply-3")
                await new.writer.drain()
                assert await read_all(client, 23) == b"reply-1 reply-2 reply-3"
                assert read_cb(new.fd).recoveries == 1
            assert await read_all(client, 1) == b""  # closed: FIN

            other, fresh = await connected(listener)  # a new session after it, same path
            fresh.writer.write(b"hello")
            await fresh.writer.drain()
            assert await read_all(other, 5) == b"hello"
            fresh.close()
            for s in (client, other):
                s.close()

    run(main())


def test_a_reader_stays_registered_between_waits_and_never_outlives_its_socket(short_tmp):
    """A session's reader keeps its socket registered with the loop from one wait to the
    next (no epoll_ctl per request); closing the box drops it; and a socket closed
    without its box's close (a server abandoning it) leaves nothing that stops the next
    socket given that descriptor number from being woken."""

    def watched(loop, fd: int) -> bool:
        try:
            return loop._selector.get_key(fd).data[0] is not None  # (reader, writer)
        except KeyError:
            return False

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncListener.tcp("127.0.0.1", 0) as listener:
            client, cb = await connected(listener)
            fd = cb.conn.fileno()
            for i in range(3):  # a reply-request exchange: the read waits each time
                reading = asyncio.create_task(cb.reader.readline())
                await asyncio.sleep(0.01)
                assert not reading.done() and watched(loop, fd)
                await loop.sock_sendall(client, b"line %d\n" % i)
                assert await reading == b"line %d\n" % i
                assert watched(loop, fd)  # still: the next wait costs no system call
            cb.close()
            assert not watched(loop, fd)

            client2, cb2 = await connected(listener)
            reading = asyncio.create_task(cb2.reader.readline())
            await asyncio.sleep(0.01)
            reading.cancel()  # the session's task ends ...
            await asyncio.sleep(0)
            stale = cb2.conn.fileno()
            abandon(cb2)  # ... and its socket is closed without the box's close()
            client3, cb3 = await connected(listener)  # one of them gets its number back
            assert stale in (client3.fileno(), cb3.conn.fileno(), cb3.fd)
            reading = asyncio.create_task(cb3.reader.readline())
            await asyncio.sleep(0.01)
            await loop.sock_sendall(client3, b"woken\n")
            assert await asyncio.wait_for(reading, 5) == b"woken\n"
            cb3.close()
            for s in (client, client2, client3):
                s.close()

    run(main())


class Offset(msgspec.Struct):
    offset: int = 0


async def stream_numbers(cb, total: int, chunk: int, export_every: int, stop_at: int = -1):
    """Send numbered(total) from the box's exported offset; stop (as a frozen server)
    after `stop_at` bytes, without closing anything."""
    state = cb.import_state(Offset) or Offset()
    data = numbered(total)
    while state.offset < total:
        if state.offset == stop_at:
            return
        n = min(chunk - state.offset % chunk, total - state.offset)
        cb.writer.write(data[state.offset:state.offset + n])
        state.offset += n
        if state.offset % export_every == 0:
            await cb.export(state)
        else:
            await cb.writer.drain()


def test_a_stream_resumes_byte_exact_after_a_recovery(short_tmp):
    """The old server stops between exports with output in the client's socket buffers;
    the recovering one regenerates from the export and the client gets one stream."""
    path = os.path.join(short_tmp, "adopt.sock")
    total, chunk, export_every = 4 << 20, 1000, 8000

    async def main():
        async with AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            client, old = await connected(listener)
            reading = asyncio.create_task(read_all(client, total))
            stop_at = 1_234_000  # a chunk boundary, 2 chunks past an export
            await stream_numbers(old, total, chunk, export_every, stop_at)
            assert old.conn.sent == stop_at and old.box.version == stop_at // export_every
            accepted, _ = await asyncio.gather(listener.accept(), hand_over_soon(path, old))
            abandon(old)
            async with await create_cb_async(accepted, registrar=NULL) as new:
                assert new.import_state(Offset).offset == stop_at - stop_at % export_every
                assert new.conn.skipping == stop_at % export_every
                await stream_numbers(new, total, chunk, export_every)
            got = await reading
            assert len(got) == total and got == numbered(total)
            client.close()

    run(main())


def test_input_read_after_the_last_export_is_replayed(short_tmp):
    """A running total over pipelined commands: the commands the old server had read
    after its last export come back from the receive log, so every answer stays right."""
    path = os.path.join(short_tmp, "adopt.sock")

    async def tally(cb, stop_after: int = -1) -> None:
        total, count = cb.import_state() or (0, 0)
        while line := await cb.reader.readline(100):
            count += 1
            total += int(line)
            cb.writer.write(b"%d\n" % total)
            if count % 5 == 0:
                await cb.export((total, count))
            if count == stop_after:
                await cb.writer.drain()
                return

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            client, old = await connected(listener)
            await loop.sock_sendall(client, b"".join(b"%d\n" % i for i in range(1, 41)))
            await tally(old, stop_after=13)  # exported at 10, read 11..13 (and read ahead)
            assert old.box.version == 2 and old.conn.buffered > 0
            accepted, _ = await asyncio.gather(listener.accept(), hand_over_soon(path, old))
            assert accepted.plan.replay.startswith(b"11\n12\n13\n")
            abandon(old)
            async with await create_cb_async(accepted, registrar=NULL) as new:
                client.shutdown(socket.SHUT_WR)
                await tally(new)
            got = (await read_all(client, 1 << 20)).split()
            assert got == [b"%d" % (i * (i + 1) // 2) for i in range(1, 41)]
            client.close()

    run(main())


@pytest.mark.parametrize("spoil, match", [
    (lambda h: msgspec.structs.replace(h, session="00" * 16), "names session"),
    (lambda h: msgspec.structs.replace(h, handed=0), "newer than the socket"),
])
def test_a_bad_box_is_refused_and_the_server_goes_on(short_tmp, spoil, match):
    path = os.path.join(short_tmp, "adopt.sock")

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            client, old = await connected(listener)
            old.writer.write(b"x")
            await old.export(b"s")
            accepting = asyncio.create_task(listener.accept())

            def agent() -> None:
                with AdoptionClient(path) as sender:
                    with pytest.raises(AdoptionError, match=match):
                        sender.hand_over(old.conn.sock, old.fd, spoil(live_handover(old)))
                    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    raw.connect(path)  # garbage: refused too
                    raw.send(len(b"\x93junk").to_bytes(4, "big") + b"\x93junk")
                    assert b"does not decode" in raw.recv(4096)
                    raw.close()
                    sender.hand_over(old.conn.sock, old.fd, live_handover(old))

            await loop.run_in_executor(None, agent)
            recovered = await accepting  # only the good one came through
            assert isinstance(recovered, Recovered) and recovered.session == old.session
            recovered.close()
            other, fresh = await connected(listener)  # and new sessions still come
            fresh.close()
            old.close()
            for s in (client, other):
                s.close()

    run(main())


class FakeAgent:
    """The registration client's calls, recorded; `gate` holds register_region."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.gate = gate

    def register_region(self, fd, *, name, kind):
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        self.calls.append(("register_region", name))

    def hold_socket(self, fd, *, name):
        self.calls.append(("hold_socket", name))

    def release(self, name):
        self.calls.append(("release", name))


def test_a_recovered_session_whose_box_fails_is_closed_and_released(short_tmp):
    path = os.path.join(short_tmp, "adopt.sock")
    agent = FakeAgent()

    async def main():
        async with AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            client, old = await connected(listener)
            await old.export(b"s")
            accepted, _ = await asyncio.gather(listener.accept(), hand_over_soon(path, old))
            abandon(old)
            with pytest.raises(ValueError, match="capacity"):
                await create_cb_async(accepted, state_capacity=0,
                                      registrar=AgentRegistrar(agent))
            assert accepted.sock.fileno() < 0
            assert await read_all(client, 1) == b""  # the client is not left waiting
            client.close()
            return old.name

    name = run(main())
    WORKER.submit(lambda: None).result(10)  # the release queued before it has run
    assert agent.calls == [("release", name)]


def test_registration_runs_beside_the_event_loop():
    """A new session's box comes once the agent holds it, and while the agent takes its
    time the loop serves others (here: the task that lets the agent answer)."""
    gate = threading.Event()
    agent = FakeAgent(gate)
    registrar = AgentRegistrar(agent)

    async def main():
        async with AsyncListener.tcp("127.0.0.1", 0) as listener:
            loop = asyncio.get_running_loop()
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.address)
            conn = await listener.accept()
            creating = asyncio.create_task(create_cb_async(conn, registrar=registrar))
            await asyncio.sleep(0)
            assert not creating.done() and agent.calls == []
            gate.set()  # only runs if the loop is not blocked by the registration
            cb = await creating
            assert cb.registered
            assert agent.calls == [("register_region", cb.name), ("hold_socket", cb.name)]
            cb.close()
            assert await read_all(client, 1) == b""
            client.close()
            return cb.name

    name = run(main())
    WORKER.submit(lambda: None).result(10)
    assert agent.calls[-1] == ("release", name)


def test_past_its_limit_a_server_leaves_new_clients_waiting_and_still_takes_recovered_ones(
        short_tmp):
    """serve(limit=1): a second client waits in the backlog, not accepted, while a
    session runs; a recovered session is taken all the same, and counts: once both
    sessions end, and not before, the waiting client is served."""
    path = os.path.join(short_tmp, "adopt.sock")
    accepted: list[str] = []

    async def echo(conn) -> None:
        async with await create_cb_async(conn, registrar=NULL) as cb:
            accepted.append("recovered" if cb.recovered else "new")
            while data := await cb.reader.read(100):
                cb.writer.write(data)
                await cb.writer.drain()

    async def round_trip(client: socket.socket, word: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, word)
        return await asyncio.wait_for(read_all(client, len(word)), 20)

    async def main():
        loop = asyncio.get_running_loop()
        async with AsyncListener.tcp("127.0.0.1", 0) as elsewhere, \
                AsyncListener.tcp("127.0.0.1", 0, adopt=path) as listener:
            moving_client, moving = await connected(elsewhere)  # a session to recover
            serving = asyncio.create_task(listener.serve(echo, limit=1))
            first, second = socket.socket(), socket.socket()
            for c in (first, second):
                c.setblocking(False)
                await loop.sock_connect(c, listener.address)  # both in its backlog
            assert await round_trip(first, b"one") == b"one"
            await hand_over_soon(path, moving)
            abandon(moving)
            assert await round_trip(moving_client, b"moved") == b"moved"
            await loop.sock_sendall(second, b"two")
            await asyncio.sleep(0.3)  # time enough to take it, were it not at its limit
            assert accepted == ["new", "recovered"]
            first.close()  # two sessions still past the limit: the recovered one counts
            await asyncio.sleep(0.3)
            assert accepted == ["new", "recovered"]
            moving_client.close()  # room for the one waiting
            assert await asyncio.wait_for(read_all(second, 3), 20) == b"two"
            assert accepted == ["new", "recovered", "new"]
            listener.close()
            await serving
            second.close()

    run(main())

    with pytest.raises(ValueError, match="limit must be 1 or more"):
        run(AsyncListener(adopt=path).serve(echo, limit=0))


def test_close_ends_a_waiting_accept_from_another_thread():
    async def main():
        listener = AsyncListener.tcp("127.0.0.1", 0)
        waiting = asyncio.create_task(listener.accept())
        await asyncio.sleep(0)
        threading.Thread(target=listener.close).start()
        assert await asyncio.wait_for(waiting, 10) is None
        listener.release()

    run(main())


class _ClosedInAccept:
    """A listening socket whose first accept() runs the listener's close() inside it, as a
    signal.signal handler run during the accept(2) call would."""

    def __init__(self, sock: socket.socket, listener: AsyncListener):
        self._sock, self._listener, self._fired = sock, listener, False

    def accept(self):
        if not self._fired:
            self._fired = True
            self._listener.close()
        return self._sock.accept()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_a_close_during_accept_is_not_lost():
    async def main():
        listener = AsyncListener.tcp("127.0.0.1", 0)
        real = listener.sock
        listener.sock = _ClosedInAccept(real, listener)

        async def never(conn):
            raise AssertionError("no connection was made")

        try:
            await asyncio.wait_for(listener.serve(never), 10)  # returns: not lost
        finally:
            listener.sock = real
            listener.release()

    run(main())


def test_a_new_connections_handler_starts_before_the_next_is_taken():
    """So that a limit a handler checks when it starts (asgi's) holds during a burst."""
    burst = 50

    class Counting(AsyncListener):
        taken = 0

        async def accept(self):
            conn = await super().accept()
            if conn is not None:
                self.taken += 1
            return conn

    async def main():
        listener = Counting.tcp("127.0.0.1", 0, backlog=burst)
        clients = [socket.create_connection(listener.address) for _ in range(burst)]
        seen: list[int] = []

        async def handler(conn):
            seen.append(listener.taken)
            conn.close()
            if len(seen) == burst:
                listener.close()

        try:
            await asyncio.wait_for(listener.serve(handler), 20)
        finally:
            listener.release()
            for c in clients:
                c.close()
        assert seen == list(range(1, burst + 1))

    run(main())


def test_a_channel_handed_to_a_session_cancelled_meanwhile_is_closed():
    from backdoors.continuations.channels import ChannelState, Handed

    class Box:
        session, closed = "ch-1", False

        def close(self):
            self.closed = True

    async def main():
        handed, box = Handed(), Box()
        claiming = asyncio.create_task(handed.claim(box.session))
        await asyncio.sleep(0)  # waiting for it
        handed.put(box, ChannelState("s-1", "mt"))
        claiming.cancel()  # before the claim resumes with it
        with pytest.raises(asyncio.CancelledError):
            await claiming
        assert box.closed

    run(main())


def test_run_uses_uvloop_only_when_asked_and_installed():
    async def kind():
        return type(asyncio.get_running_loop()).__module__

    assert run(kind(), use_uvloop=False).startswith("asyncio")
    try:
        import uvloop  # noqa: F401
    except ImportError:
        never = kind()
        with pytest.raises(ImportError):
            run(never, use_uvloop=True)
        never.close()
    else:
        assert run(kind()).startswith("uvloop")

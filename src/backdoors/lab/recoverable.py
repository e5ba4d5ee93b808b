"""The lab's recoverable service: the numbered stream, with Continuation Boxes.

    python -m backdoors.lab.recoverable --name rsvc-n0 --port 7100

Every client session receives the stream of `backdoors.lab.stream`, paced at --rate
bytes/s, from offset 0 (or from where a recovered session left off). The state of a
session is its offset; it is exported every --export-every bytes. After a recovery, the
output regenerated from the last export that the client already has is not paced (it is
discarded, not sent). The sessions are tasks of one asyncio loop (`AsyncListener`,
`create_cb_async`): a recovery that brings a thousand sessions starts no thread. A
recovered session whose box cannot be opened is closed and released at the agent
(counted in the log), never left hanging. A heartbeat thread ticks a progress sensor
every 10 ms while the process runs; its Sensor Box, the sessions' boxes and sockets are
registered with the node's agent, and recovered sessions arrive on the node's adoption
socket (BACKDOORS_AGENT_SOCKET, BACKDOORS_ADOPT_DIR). Prints one JSON line when ready:
{"pid", "port", "box_fd"}. SIGUSR1 makes it leak memory (a service that is itself the
memory hog: not repairable by killing it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading

import msgspec

from ..common import fdtable
from ..common.runtime import AGENT_SOCKET_ENV, register_box
from ..continuations import (
    SESSION_FDS, AsyncListener, ContinuationError, Recovered, create_cb_async, run,
)
from ..sensors import SensorBox
from . import stream

log = logging.getLogger("backdoors.lab.recoverable")


class StreamState(msgspec.Struct):
    offset: int = 0
    pad: bytes = b""  # a session's own data, kept with it (--state-pad)


class Service:
    """The sessions of the stream service: each a task streaming from its offset."""

    def __init__(self, rate: int, chunk: int, export_every: int, pad: int = 0):
        self.rate, self.chunk, self.export_every, self.pad = rate, chunk, export_every, pad
        self.unopened = 0  # recovered sessions whose box could not be opened (dropped)

    async def serve(self, conn) -> None:
        try:
            cb = await create_cb_async(conn, **({"state_capacity": -(-(self.pad + 4096) // 8) * 8}
                                                if self.pad else {}))
        except (ContinuationError, OSError, ValueError) as err:
            if isinstance(conn, Recovered):  # closed and released by create_cb_async
                self.unopened += 1
                log.warning("recovered session %s dropped (%d so far): its box did not "
                            "open: %s", conn.session, self.unopened, err)
            else:
                conn.close()
                log.warning("new session refused: %s", err)
            return
        try:
            async with cb:
                await self.stream(cb)
        except OSError:
            pass  # the client went away

    async def stream(self, cb) -> None:
        chunk, loop = self.chunk, asyncio.get_running_loop()
        state = cb.import_state(StreamState) or StreamState(pad=os.urandom(self.pad))
        interval = chunk / self.rate
        next_at = loop.time()
        while True:
            # a chunk ends on a multiple of `chunk`, whatever offset a recovery resumed at
            n = chunk - state.offset % chunk
            if skip := cb.conn.skipping:
                # what the client already has is discarded, not sent: regenerate it in
                # one piece up to the next export, unpaced (pacing is of the client's stream)
                n = min(n + (max(0, skip - n) + chunk - 1) // chunk * chunk,
                        self.export_every - state.offset % self.export_every)
            cb.writer.write(stream.expected(state.offset, n))
            state.offset += n
            if state.offset % self.export_every == 0:
                await cb.export(state)  # drains first
            else:
                await cb.writer.drain()
            if cb.conn.skipping or skip >= n:  # still catching up (stopped at an export),
                next_at = loop.time()  # or all of it discarded: no pacing before new bytes
                continue
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()


def heartbeat(progress, stop: threading.Event, leak: threading.Event, leak_mb_s: float) -> None:
    """Tick progress every 10 ms; once `leak` is set (SIGUSR1), also leak memory."""
    leaked = []
    while not stop.wait(0.01):
        progress.tick()
        if leak.is_set():
            leaked.append(bytearray(b"\3") * int(leak_mb_s * 2**20 / 100))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backdoors.lab.recoverable", description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="rsvc")
    ap.add_argument("--port", type=int, default=7100)
    ap.add_argument("--rate", type=int, default=16 * 1024, help="bytes/s per session")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--export-every", type=int, default=8 * 1024, help="a multiple of --chunk")
    ap.add_argument("--deadline", type=float, default=0.2, help="progress deadline (s)")
    ap.add_argument("--state-pad", type=int, default=0, metavar="BYTES",
                    help="random bytes each session keeps in its exported state (a service "
                         "with large sessions)")
    ap.add_argument("--leak-mb-s", type=float, default=50.0,
                    help="after SIGUSR1, leak this many MB/s (the service itself as memory hog)")
    a = ap.parse_args(argv)
    if a.export_every % a.chunk:
        ap.error("--export-every must be a multiple of --chunk")
    limit = fdtable.session_limit(SESSION_FDS)  # it raises the descriptor limit

    box = SensorBox.create(a.name)
    progress = box.progress("progress", deadline=a.deadline, stamped=True)
    if os.environ.get(AGENT_SOCKET_ENV):
        register_box(box)
    stop, leak = threading.Event(), threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: leak.set())  # the lab's "the service leaks" fault
    threading.Thread(target=heartbeat, args=(progress, stop, leak, a.leak_mb_s), daemon=True).start()
    service = Service(a.rate, a.chunk, a.export_every, a.state_pad)

    async def serve() -> None:
        async with AsyncListener.tcp("0.0.0.0", a.port, backlog=1024) as listener:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, listener.close)
            print(json.dumps({"pid": os.getpid(), "port": a.port, "box_fd": box.fd}), flush=True)
            await listener.serve(service.serve, limit=limit)

    run(serve())
    stop.set()
    return 0

if __name__ == "__main__":
    sys.exit(main())

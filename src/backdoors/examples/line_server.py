"""A stateful line protocol, recoverable: a per-session running total.

Commands, one per line; every one is answered with one line:

    ADD n   ->  TOTAL <total after adding n>
    SUB n   ->  TOTAL <total after subtracting n>
    GET     ->  TOTAL <total>
    QUIT    ->  BYE <total>, then the server closes
    other   ->  ERR <reason>

Clients may send without waiting for answers, so the server reads ahead; the state
{total, count} is exported every EXPORT_EVERY commands. After a recovery the commands
read since that export are replayed from the Continuation Box's receive log.

    python -m backdoors.examples.line_server --port 7000 [--adopt /run/ls.adopt]
"""

from __future__ import annotations

import logging

import msgspec

from backdoors.continuations import AsyncListener, create_cb_async
from backdoors.examples import arguments, serve_forever

EXPORT_EVERY = 16
MAX_LINE = 1024

log = logging.getLogger("line_server")


class Tally(msgspec.Struct):
    total: int = 0
    count: int = 0  # commands handled


async def serve_session(conn) -> None:
    async with await create_cb_async(conn) as cb:  # CB (was: reader, writer = ...)
        tally = cb.import_state(Tally) or Tally()  # CB
        while line := await cb.reader.readline(MAX_LINE):  # CB (was: reader.readline)
            reply, done = execute(tally, line)
            cb.writer.write(reply)  # CB (was: writer.write)
            await cb.writer.drain()  # CB (was: writer.drain)
            if done:
                return
            if tally.count % EXPORT_EVERY == 0:  # CB
                await cb.export(tally)  # CB


def execute(tally: Tally, line: bytes) -> tuple[bytes, bool]:
    """Apply one command; (reply line, whether the session ends)."""
    tally.count += 1
    words = line.decode("ascii", "replace").split()
    verb = words[0].upper() if words else ""
    if verb in ("ADD", "SUB") and len(words) == 2:
        try:
            n = int(words[1])
        except ValueError:
            return b"ERR not a number\n", False
        tally.total += n if verb == "ADD" else -n
        return b"TOTAL %d\n" % tally.total, False
    if verb == "GET" and len(words) == 1:
        return b"TOTAL %d\n" % tally.total, False
    if verb == "QUIT" and len(words) == 1:
        return b"BYE %d\n" % tally.total, True
    return b"ERR unknown command\n", False


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    listener = AsyncListener.tcp(args.host, args.port, adopt=args.adopt)  # CB
    serve_forever(listener, "line_server", serve_session, limit=args.limit_concurrency)


if __name__ == "__main__":
    main()

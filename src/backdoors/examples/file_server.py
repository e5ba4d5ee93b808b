"""The original Backdoors design's recoverable file server.

A client sends a file name and a newline; the server streams that file and closes the
connection. The session state is {file_name, offset}; it is exported every
EXPORT_EVERY bytes. After a recovery the server resumes from its last export and the
Continuation Box skips the bytes the client already has: the client sees one stream.

    python -m backdoors.examples.file_server --port 8080 --root /srv/files [--adopt /run/fs.adopt]

The lines marked `# CB` are all it takes to make the plain server recoverable.
"""

from __future__ import annotations

import logging
import os

import msgspec

from backdoors.continuations import AsyncListener, create_cb_async
from backdoors.examples import arguments, serve_forever

CHUNK = 64 * 1024
EXPORT_EVERY = 256 * 1024  # a multiple of CHUNK

log = logging.getLogger("file_server")


class FileState(msgspec.Struct):
    file_name: str
    offset: int = 0


async def serve_session(conn, root: str) -> None:
    async with await create_cb_async(conn) as cb:  # CB (was: reader, writer = ...)
        state = cb.import_state(FileState) or FileState(await read_name(cb.reader))  # CB
        path = resolve(root, state.file_name)
        if path is None:
            return  # no such file: close at once
        with open(path, "rb") as f:
            f.seek(state.offset)
            while chunk := f.read(CHUNK):
                cb.writer.write(chunk)  # CB (was: writer.write)
                await cb.writer.drain()  # CB (was: writer.drain)
                state.offset += len(chunk)
                if state.offset % EXPORT_EVERY == 0:  # CB
                    await cb.export(state)  # CB


async def read_name(reader) -> str:
    line = await reader.readline(1024)
    return line.rstrip(b"\r\n").decode("utf-8", "replace")


def resolve(root: str, name: str) -> str | None:
    """The regular file `name` inside `root`, or None (no escaping the root)."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, name.lstrip("/")))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="directory of the files served")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    listener = AsyncListener.tcp(args.host, args.port, adopt=args.adopt)  # CB (was: a server socket)
    serve_forever(listener, "file_server", serve_session, args.root,
                  limit=args.limit_concurrency)  # accept() gives CB conns


if __name__ == "__main__":
    main()

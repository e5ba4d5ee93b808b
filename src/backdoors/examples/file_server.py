"""The original Backdoors design's recoverable file server.

A client sends a file name and a newline; the server streams that file and closes the
connection. The session state is {file_name, offset}; it is exported every
EXPORT_EVERY bytes. After a recovery the server resumes from its last export and the
Continuation Box skips the bytes the client already has: the client sees one stream.

    python -m backdoors.examples.file_server --port 8080 --root /srv/files [--adopt /run/fs.adopt]

The lines marked `# CB` are all it takes to make the plain server recoverable.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import threading

import msgspec

from backdoors.continuations import Listener, create_cb

CHUNK = 64 * 1024
EXPORT_EVERY = 256 * 1024  # a multiple of CHUNK

log = logging.getLogger("file_server")


class FileState(msgspec.Struct):
    file_name: str
    offset: int = 0


def serve_session(conn, root: str) -> None:
    with create_cb(conn) as cb:  # CB
        state = cb.import_state(FileState) or FileState(read_name(cb.conn))  # CB
        path = resolve(root, state.file_name)
        if path is None:
            return  # no such file: close at once
        with open(path, "rb") as f:
            f.seek(state.offset)
            while chunk := f.read(CHUNK):
                cb.conn.sendall(chunk)  # CB (was: conn.sendall)
                state.offset += len(chunk)
                if state.offset % EXPORT_EVERY == 0:  # CB
                    cb.export(state)  # CB


def read_name(conn) -> str:
    return conn.readline(1024).rstrip(b"\r\n").decode("utf-8", "replace")


def resolve(root: str, name: str) -> str | None:
    """The regular file `name` inside `root`, or None (no escaping the root)."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, name.lstrip("/")))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        return None
    return path


def session_thread(conn, root: str) -> None:
    try:
        serve_session(conn, root)
    except OSError as err:  # the client went away
        log.info("session ended: %s", err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=".", help="directory of the files served")
    parser.add_argument("--adopt", help="Unix socket path where recovered sessions arrive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 3 descriptors per session:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # socket, box, its mapping
    with Listener.tcp(args.host, args.port, adopt=args.adopt) as listener:  # CB
        signal.signal(signal.SIGTERM, lambda *_: listener.close())
        print("file_server listening on %s:%d" % listener.address, flush=True)
        while conn := listener.accept():  # CB (was: sock.accept()[0])
            threading.Thread(target=session_thread, args=(conn, args.root), daemon=True).start()


if __name__ == "__main__":
    main()

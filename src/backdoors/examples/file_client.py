"""Client of backdoors.examples.file_server: ask for a file, read the stream to the end.

    python -m backdoors.examples.file_client --host 10.0.0.5 --port 8080 NAME [-o OUT]
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable


def fetch(sock: socket.socket, name: str, progress: Callable[[int], None] | None = None,
          half_close: bool = False) -> bytes:
    """Send `name`, return every byte until the server closes; `progress(total)` is called
    after each chunk. `half_close`: shut the writing side down after the name (as
    `nc -N` does), the connection half-closed while the file comes."""
    sock.sendall(name.encode() + b"\n")
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    parts, total = [], 0
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
        total += len(chunk)
        if progress is not None:
            progress(total)
    return b"".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("name")
    parser.add_argument("-o", "--out", help="output file (default: stdout)")
    args = parser.parse_args(argv)
    with socket.create_connection((args.host, args.port)) as sock:
        data = fetch(sock, args.name)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)


if __name__ == "__main__":
    main()

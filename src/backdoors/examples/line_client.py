"""Client of backdoors.examples.line_server that keeps sending: ADD 1..N without waiting, and
checks every answer against the running total it expects.

    python -m backdoors.examples.line_client --host 10.0.0.5 --port 7000 --count 10000
"""

from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Callable


class Mismatch(Exception):
    """An answer differs from what the protocol requires."""


def run(sock: socket.socket, count: int, progress: Callable[[int], None] | None = None,
        pace: Callable[[int], None] | None = None) -> int:
    """Send ADD 1..count then QUIT from a thread while checking every answer here.

    Returns the final total (count*(count+1)/2); raises Mismatch at the first wrong answer.
    `progress(i)` is called after answer i; `pace(i)` before sending command i.
    """
    error: list[BaseException] = []

    def send() -> None:
        try:
            for i in range(1, count + 1):
                if pace is not None:
                    pace(i)
                sock.sendall(b"ADD %d\n" % i)
            sock.sendall(b"QUIT\n")
        except BaseException as err:  # noqa: BLE001 - reported by the reader
            error.append(err)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    rfile = sock.makefile("rb")
    total = 0
    for i in range(1, count + 1):
        total += i
        line = rfile.readline()
        if line != b"TOTAL %d\n" % total:
            raise Mismatch(f"answer {i}: got {line!r}, expected TOTAL {total}")
        if progress is not None:
            progress(i)
    line = rfile.readline()
    if line != b"BYE %d\n" % total:
        raise Mismatch(f"after QUIT: got {line!r}, expected BYE {total}")
    if rfile.read(1):
        raise Mismatch("bytes after BYE")
    sender.join(5)
    if error:
        raise error[0]
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    args = parser.parse_args(argv)
    with socket.create_connection((args.host, args.port)) as sock:
        print(run(sock, args.count))


if __name__ == "__main__":
    main()

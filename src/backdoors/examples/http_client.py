"""Client of backdoors.examples.http_server built on the standard library's http.client: several
requests over one keep-alive connection, optionally with byte ranges.

    python -m backdoors.examples.http_client --host 10.0.0.5 --port 8080 /a.bin /b.bin:100-199
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys


def connection(sock: socket.socket, host: str = "service", timeout: float | None = 30) -> http.client.HTTPConnection:
    """An HTTPConnection over an already connected socket (made in any namespace)."""
    conn = http.client.HTTPConnection(host, timeout=timeout)
    sock.settimeout(timeout)
    conn.sock = sock
    return conn


def get(conn: http.client.HTTPConnection, path: str, byte_range: tuple[int, int] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request on `conn`; `byte_range` is inclusive."""
    headers = {}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("paths", nargs="+", help="PATH or PATH:FIRST-LAST")
    args = parser.parse_args(argv)
    conn = connection(socket.create_connection((args.host, args.port)), args.host)
    for item in args.paths:
        path, _, span = item.partition(":")
        rng = tuple(int(x) for x in span.split("-")) if span else None
        status, headers, body = get(conn, path, rng)
        print(f"{path}: {status} {len(body)} bytes", file=sys.stderr)
        sys.stdout.buffer.write(body)
    conn.close()


if __name__ == "__main__":
    main()

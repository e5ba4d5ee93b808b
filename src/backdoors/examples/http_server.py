"""A recoverable HTTP/1.1 static file server: keep-alive, Range requests, large files.

GET and HEAD of regular files under --root; one byte range per request ("bytes=a-b",
"a-", "-n"; several ranges, or an If-Range, get the whole file). Persistent connections
as HTTP/1.1 says (HTTP/1.0 only with "Connection: keep-alive"); pipelined requests work.

Recoverability: once a request is read, the whole response (status line and headers,
with their Date, and the file range of its body) is decided and exported *before* any
byte of it is sent, then exported again every EXPORT_EVERY bytes of body. A recovery
mid-response resumes the body where the last export was; a recovery between requests
replays the next request from the receive log. The files must be the same on the
recovery node (the server is deterministic given its state, its input and its files).

    python -m backdoors.examples.http_server --port 8080 --root /srv/www [--adopt /run/http.adopt]
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import mimetypes
import os
import socket
import urllib.parse

import msgspec

from backdoors.continuations import AsyncListener, LogFullError, create_cb_async
from backdoors.examples import arguments, serve_forever

EXPORT_EVERY = 1 << 20
MAX_LINE = 8192
MAX_HEADERS = 100
MAX_HEAD = 32 * 1024  # request line and headers: half the receive log (64 KiB)
SERVER = "backdoors-example/1"

log = logging.getLogger("http_server")


class Response(msgspec.Struct):
    """A response, fully decided: `head`, then bytes [start, end) of `path`."""

    head: bytes
    path: str = ""
    start: int = 0
    end: int = 0
    close: bool = False

    @property
    def length(self) -> int:
        return len(self.head) + self.end - self.start


class Session(msgspec.Struct):
    response: Response | None = None  # the one being sent, None between requests
    done: int = 0  # bytes of it already sent
    served: int = 0  # responses completed


class Request(msgspec.Struct):
    method: str
    target: str
    version: str
    headers: dict[str, str]


class PlainBox:
    """The same server without Continuation Boxes (--plain): what they cost is measured
    against this (bench/bench_recovery.py, overhead_pct). Its reader and writer are one
    PlainStream over the bare socket."""

    def __init__(self, sock):
        self.reader = self.writer = PlainStream(sock)

    def import_state(self, type=None):  # noqa: A002 - mirrors ContinuationBox
        return None

    async def export(self, state) -> None:
        await self.writer.drain()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.sock.close()


class PlainStream:
    """readline/write/drain/sendfile of a session reader and writer, on a bare socket."""

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock, self.buffer, self.pending = sock, bytearray(), bytearray()

    async def readline(self, limit: int = -1) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            end = self.buffer.find(b"\n", 0, limit if limit >= 0 else None)
            if end >= 0 or 0 <= limit <= len(self.buffer):
                end = end + 1 if end >= 0 else limit
                break
            chunk = await loop.sock_recv(self.sock, 16384)
            if not chunk:
                end = len(self.buffer)
                break
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def write(self, data) -> None:
        self.pending += data

    async def drain(self) -> None:
        if self.pending:
            await asyncio.get_running_loop().sock_sendall(self.sock, self.pending)
            self.pending.clear()

    async def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        await self.drain()
        return await asyncio.get_running_loop().sock_sendfile(self.sock, file, offset, count)


async def serve_session(conn, root: str, plain: bool = False) -> None:
    async with (PlainBox(conn) if plain else await create_cb_async(conn)) as cb:
        state = cb.import_state(Session) or Session()
        while True:
            if state.response is None:
                request = await read_request(cb.reader)
                if request is None:
                    return
                state.response, state.done = respond(request, root), 0
                await cb.export(state)  # decided before a byte of it leaves
            await send_response(cb, state)
            close = state.response.close
            state.response = None
            state.served += 1
            if close:
                return


async def send_response(cb, state: Session) -> None:
    """Send state.response from state.done on, exporting every EXPORT_EVERY bytes."""
    r = state.response
    if state.done < len(r.head):
        cb.writer.write(r.head[state.done:])
        state.done = len(r.head)
    if state.done >= r.length:
        await cb.writer.drain()
        return
    with open(r.path, "rb") as f:
        while state.done < r.length:
            pos = r.start + state.done - len(r.head)
            count = min(EXPORT_EVERY, r.end - pos)
            if await cb.writer.sendfile(f, pos, count) != count:  # drains the head first
                raise OSError(f"{r.path} shrank while being sent")
            state.done += count
            await cb.export(state)


async def read_request(reader) -> Request | Response | None:
    """The next request, a ready error Response if it is malformed or its head is larger
    than MAX_HEAD (the head stays in the session's receive log until the response is
    decided), None at EOF."""
    try:
        return await _read_request(reader)
    except LogFullError:  # (pipelined requests read ahead fill the log too)
        return error(431, "Request Header Fields Too Large", close=True)


async def _read_request(reader) -> Request | Response | None:
    line = await reader.readline(MAX_LINE)
    while line in (b"\r\n", b"\n"):  # robustness: blank lines before a request
        line = await reader.readline(MAX_LINE)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if not line.endswith(b"\n") or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return error(400, "Bad Request", close=True)
    headers: dict[str, str] = {}
    size = len(line)
    for _ in range(MAX_HEADERS):
        line = await reader.readline(MAX_LINE)
        if line in (b"\r\n", b"\n"):
            return Request(parts[0], parts[1], parts[2], headers)
        size += len(line)
        if size > MAX_HEAD:
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not line.endswith(b"\n"):
            return error(400, "Bad Request", close=True)
        headers[name.strip().lower()] = value.strip()
    return error(431, "Request Header Fields Too Large", close=True)


def respond(request: Request | Response, root: str) -> Response:
    """Decide the whole response to `request` (a Response is an early error)."""
    if isinstance(request, Response):
        return request
    close, head_only = wants_close(request), request.method == "HEAD"
    if request.headers.get("transfer-encoding") or int_or(request.headers.get("content-length"), 0):
        return error(413, "Payload Too Large", close=True)  # no request bodies here
    if request.method not in ("GET", "HEAD"):
        return error(405, "Method Not Allowed", close=close, extra=[("Allow", "GET, HEAD")])
    path = resolve(root, request.target)
    if path is None:
        return error(404, "Not Found", close=close, head_only=head_only)
    st = os.stat(path)
    size = st.st_size
    headers = [
        ("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream"),
        ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
        ("Accept-Ranges", "bytes"),
    ]
    start, end, status = 0, size, (200, "OK")
    wanted = request.headers.get("range")
    if wanted is not None and "if-range" not in request.headers:
        span = parse_range(wanted, size)
        if span == "unsatisfiable":
            return error(416, "Range Not Satisfiable", close=close, head_only=head_only,
                         extra=[("Content-Range", f"bytes */{size}")])
        if span is not None:
            start, end = span
            status = (206, "Partial Content")
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    headers.append(("Content-Length", str(end - start)))
    head = make_head(status, headers, close)
    if head_only:
        return Response(head, close=close)
    return Response(head, path, start, end, close)


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """[start, end) of a single "bytes=" range; None to ignore it; "unsatisfiable"."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if not first:  # suffix: the last n bytes
        n = int_or(last, None)
        if n is None:
            return None
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    a, b = int_or(first, None), int_or(last, None) if last else size - 1
    if a is None or b is None:
        return None
    if a >= size:
        return "unsatisfiable"
    if b < a:
        return None
    return a, min(b, size - 1) + 1


def wants_close(request: Request) -> bool:
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.version == "HTTP/1.0":
        return "keep-alive" not in tokens
    return "close" in tokens


def error(code: int, reason: str, *, close: bool, head_only: bool = False,
          extra: list | None = None) -> Response:
    body = f"{code} {reason}\n".encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *(extra or [])]
    head = make_head((code, reason), headers, close)
    return Response(head if head_only else head + body, close=close)


def make_head(status: tuple[int, str], headers: list, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status[0]} {status[1]}",
             f"Date: {email.utils.formatdate(usegmt=True)}", f"Server: {SERVER}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def resolve(root: str, target: str) -> str | None:
    """The regular file a request target names inside `root`, or None."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, path.lstrip("/")))
    if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
        return None
    return full


def int_or(text: str | None, default):
    try:
        return int(text) if text is not None and text.strip().isdigit() else default
    except ValueError:
        return default


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="directory of the files served")
    parser.add_argument("--plain", action="store_true",
                        help="serve without Continuation Boxes (a baseline: not recoverable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    listener = (AsyncListener(socket.create_server((args.host, args.port), backlog=128))
                if args.plain else AsyncListener.tcp(args.host, args.port, adopt=args.adopt))
    serve_forever(listener, "http_server", serve_session, args.root, args.plain,
                  limit=args.limit_concurrency)


if __name__ == "__main__":
    main()

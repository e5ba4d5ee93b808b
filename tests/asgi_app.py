"""A Starlette application for the recoverable ASGI server's tests: it keeps a counter in
the session state the server exports, and answers with numbered bodies of any size."""

import os
import signal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


def numbered(count: int) -> bytes:
    return b"".join((i).to_bytes(8, "big") for i in range((count + 7) // 8))[:count]


async def count(request: Request) -> Response:
    session = request.scope["extensions"]["backdoors.session"]
    session["state"]["n"] = n = session["state"].get("n", 0) + 1
    size = int(request.query_params.get("size", "0"))
    head = f"n={n} seq={session['seq']} key={session['key']}\n".encode()
    return Response(head + numbered(size), media_type="application/octet-stream")


async def echo(request: Request) -> Response:
    return PlainTextResponse((await request.body()).decode().upper())


async def fail(request: Request) -> Response:
    raise RuntimeError("the application fails on purpose")


async def relay(request: Request) -> Response:
    """One call to the backend ($ASGI_BACKEND) on the session's channel, its answer in
    the page. `?stop=sent|read` stops this process (SIGSTOP) once the call is sent, or
    once its answer is read -- on the first node only: a replay does not stop."""
    session = request.scope["extensions"]["backdoors.session"]
    host, _, port = os.environ["ASGI_BACKEND"].rpartition(":")
    ch = await session["connect"]("backend", host, int(port))
    ch.state["calls"] = calls = ch.state.get("calls", 0) + 1
    stop = request.query_params.get("stop", "") if not ch.recovered else ""
    ch.writer.write(b"GET /hit HTTP/1.1\r\nHost: backend\r\n\r\n")
    await ch.writer.drain()
    if stop == "sent":
        os.kill(os.getpid(), signal.SIGSTOP)
    length = 0
    while (line := await ch.reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    answer = (await ch.reader.readexactly(length)).decode()
    if stop == "read":
        os.kill(os.getpid(), signal.SIGSTOP)
    return PlainTextResponse(f"calls={calls} recovered={ch.recovered} {answer}")


async def hit(request: Request) -> Response:
    """The backend: hits on this connection (its session state) and the connection's id."""
    session = request.scope["extensions"]["backdoors.session"]
    session["state"]["hits"] = hits = session["state"].get("hits", 0) + 1
    return PlainTextResponse(f"hits={hits} conn={session['id']}")


app = Starlette(routes=[Route("/count", count), Route("/echo", echo, methods=["POST"]),
                        Route("/fail", fail), Route("/relay", relay)])
backend = Starlette(routes=[Route("/hit", hit)])

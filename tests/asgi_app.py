"""A Starlette application for the recoverable ASGI server's tests: it keeps a counter in
the session state the server exports, and answers with numbered bodies of any size."""

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


app = Starlette(routes=[Route("/count", count), Route("/echo", echo, methods=["POST"]),
                        Route("/fail", fail)])

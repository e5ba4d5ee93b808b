"""The recoverable HTTP/1.1 example recovered mid-response and between requests, with
unmodified curl and with the standard library's http.client, in network namespaces."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_continuations_support import (  # noqa: F401 - rlab is a fixture
    PORT,
    VIP,
    Background,
    assert_exact,
    numbered,
    rlab,
    wait_for,
)

from backdoors.examples import http_client

BIG = 32 << 20


@pytest.fixture
def site(rlab):
    """A document root with a big numbered file and a small one."""
    root = os.path.join(rlab.tmp, "www")
    os.mkdir(root)
    files = {"big.bin": numbered(BIG), "small.txt": b"small file\n" * 10}
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return root, files


def servers(rlab, root):
    return (rlab.server("a", "http_server", "--root", root),
            rlab.server("b", "http_server", "--root", root))


def wait_size(path: str, size: int, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) >= size):
        assert proc.poll() is None, f"curl ended early ({proc.returncode}): {proc.stderr.read()!r}"
        assert time.monotonic() < deadline, f"{path} did not reach {size} bytes"
        time.sleep(0.002)


@pytest.mark.parametrize("fault", ["freeze", "crash"])
def test_curl_download_survives_recovery_mid_response(rlab, site, fault):
    """Unmodified curl: two URLs on one keep-alive connection, the server fails during
    the second (large) response; both output files equal the sources."""
    root, files = site
    a, b = servers(rlab, root)
    out_small, out_big = (os.path.join(rlab.tmp, n) for n in ("out-small", "out-big"))
    url = f"http://{VIP}:{PORT}"
    curl = rlab.run_in_client(
        "curl", "--silent", "--show-error", "--fail", "--limit-rate", "24M",
        "--write-out", "%{num_connects}\n",
        f"{url}/small.txt", "-o", out_small, f"{url}/big.bin", "-o", out_big,
        stdout=-1, stderr=-1,
    )
    wait_size(out_big, 4 << 20, curl)
    if fault == "crash":
        held = a.sessions()
        a.kill()
    else:
        a.freeze()
        held = a.sessions()
    assert len(held) == 1
    move = rlab.recover(held[0], b)
    assert move.state.handed < len(files["small.txt"]) + BIG, "must fail mid-response"

    out, err = curl.communicate(timeout=60)
    assert curl.returncode == 0, f"curl failed: {err!r}\n{rlab.logs()}"
    assert out.split() == [b"1", b"0"], "curl must reuse its one connection"
    with open(out_small, "rb") as f:
        assert f.read() == files["small.txt"]
    with open(out_big, "rb") as f:
        assert_exact(f.read(), files["big.bin"])


def test_http_client_between_requests_and_mid_range(rlab, site):
    """http.client on one connection: recovery between two requests (the next request
    goes to the new server), then again in the middle of a ranged response."""
    root, files = site
    a, b = servers(rlab, root)
    d = rlab.server("d", "http_server", "--root", root)
    conn = http_client.connection(rlab.connect(), VIP)

    status, _, body = http_client.get(conn, "/small.txt")
    assert (status, body) == (200, files["small.txt"])
    a.freeze()  # between requests (it may not have exported the end of the response yet)
    (held,) = a.sessions()
    move1 = rlab.recover(held, b)
    assert move1.replay == 0 and move1.state.read == move1.image.log_end

    first, last = 1_000_003, 30_000_000
    conn.request("GET", "/big.bin", headers={"Range": f"bytes={first}-{last}"})
    response = conn.getresponse()
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes {first}-{last}/{BIG}"
    frozen = threading.Event()

    def read_body() -> bytes:
        parts, total = [], 0
        while chunk := response.read(1 << 16):
            parts.append(chunk)
            total += len(chunk)
            if total >= 4 << 20 and not frozen.is_set():
                b.freeze()
                frozen.set()
        return b"".join(parts)

    reader = Background(read_body)
    wait_for(frozen, "the second fault", client=reader)
    (held,) = b.sessions()
    move2 = rlab.recover(held, d, since=move1.state)
    assert move2.image.recoveries == 1
    assert_exact(reader.result(), files["big.bin"][first:last + 1])

    # the connection goes on, served by the third server
    status, headers, body = http_client.get(conn, "/small.txt", (5, 14))
    assert (status, body) == (206, files["small.txt"][5:15])
    conn.close()


def test_request_read_ahead_is_replayed(rlab, site):
    """Two pipelined requests: the server fails while sending the first response, with
    the second request already read into its receive log; both responses arrive."""
    root, files = site
    a, b = servers(rlab, root)
    sock = rlab.connect()
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    frozen = threading.Event()

    def read_all() -> bytes:
        parts, total = [], 0
        while chunk := sock.recv(1 << 16):
            parts.append(chunk)
            total += len(chunk)
            if total >= 4 << 20 and not frozen.is_set():
                a.freeze()
                frozen.set()
        return b"".join(parts)

    reader = Background(read_all)
    wait_for(frozen, "the fault", client=reader)
    (held,) = a.sessions()
    move = rlab.recover(held, b)
    assert move.image.log_end > move.image.export.received, "second request read ahead"
    assert move.replay == move.image.log_end - move.image.export.received

    data = reader.result()
    head1, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and head1.startswith(b"HTTP/1.1 200 OK")
    assert_exact(rest[:BIG], files["big.bin"])
    head2, sep, body2 = rest[BIG:].partition(b"\r\n\r\n")
    assert head2.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head2
    assert body2 == files["small.txt"]

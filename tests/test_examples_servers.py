"""The three example servers as plain servers on loopback (no failure, no root): their
protocols, with their own clients, curl and http.client."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys

import pytest

from backdoors.examples import file_client, http_client, line_client


@pytest.fixture
def docroot(tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(3_000_001))
    (tmp_path / "small.txt").write_bytes(b"hello, world\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.fixture
def start(tmp_path):
    """start(example, *args) -> port of the running server; all stopped at the end."""
    procs = []

    def start(example: str, *args: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "BACKDOORS_AGENT_SOCKET"}
        proc = subprocess.Popen(
            [sys.executable, "-m", f"backdoors.examples.{example}", "--host", "127.0.0.1",
             "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else b""
        match = re.search(rb"listening on [\d.]+:(\d+)", line)
        assert match, f"{example} did not start: {line!r} {proc.stderr.read1() if not ready else b''!r}"
        return int(match.group(1))

    yield start
    for proc in procs:
        proc.terminate()  # SIGTERM: the accept loop ends cleanly
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()


def test_file_server_streams_files_and_nothing_else(start, docroot):
    port = start("file_server", "--root", str(docroot))
    for name, want in [("big.bin", (docroot / "big.bin").read_bytes()),
                       ("small.txt", b"hello, world\n"), ("missing", b""),
                       ("../../etc/passwd", b""), ("sub", b""), ("/small.txt", b"hello, world\n")]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            assert file_client.fetch(sock, name) == want, name


def test_line_server_protocol(start):
    port = start("line_server")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"ADD 5\nSUB 7\nGET\nMUL 2\nADD x\nQUIT\n")
        f = sock.makefile("rb")
        assert f.read() == (b"TOTAL 5\nTOTAL -2\nTOTAL -2\nERR unknown command\n"
                            b"ERR not a number\nBYE -2\n")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert line_client.run(sock, 5000) == 5000 * 5001 // 2


def test_line_server_past_its_limit_leaves_new_clients_waiting(start):
    """--limit-concurrency 2: a third client is not served while two sessions run, and
    is once one ends; a bad limit is refused with a clear message."""
    port = start("line_server", "--limit-concurrency", "2")
    a, b, c = (socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(3))
    for sock in (a, b, c):
        sock.sendall(b"ADD 1\n")
    assert a.recv(100) == b"TOTAL 1\n" and b.recv(100) == b"TOTAL 1\n"
    assert select.select([c], [], [], 0.3)[0] == []  # waiting to be accepted
    a.sendall(b"QUIT\n")
    assert a.recv(100) == b"BYE 1\n"
    assert c.recv(100) == b"TOTAL 1\n"
    for sock in (a, b, c):
        sock.close()
    bad = subprocess.run([sys.executable, "-m", "backdoors.examples.line_server", "--port",
                          "0", "--limit-concurrency", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a number of sessions" in bad.stderr


def test_http_keep_alive_ranges_and_errors(start, docroot):
    port = start("http_server", "--root", str(docroot))
    big = (docroot / "big.bin").read_bytes()
    conn = http_client.connection(socket.create_connection(("127.0.0.1", port)))
    status, headers, body = http_client.get(conn, "/big.bin")
    assert (status, body == big, headers["accept-ranges"]) == (200, True, "bytes")
    assert http_client.get(conn, "/big.bin", (10, 19))[2] == big[10:20]
    status, headers, body = http_client.get(conn, "/big.bin", (2_999_990, 9_999_999))
    assert (status, body, headers["content-range"]) == (206, big[-11:], "bytes 2999990-3000000/3000001")
    status, headers, _ = http_client.get(conn, "/big.bin", (3_000_001, 3_000_005))
    assert (status, headers["content-range"]) == (416, "bytes */3000001")
    assert http_client.get(conn, "/nope")[0] == 404
    assert http_client.get(conn, "/../../etc/passwd")[0] == 404
    assert http_client.get(conn, "/sub")[0] == 404
    assert http_client.get(conn, "/small.txt?x=1")[2] == b"hello, world\n"
    status, headers, body = http_client.get(conn, "/small.txt", method="HEAD")
    assert (status, headers["content-length"], body) == (200, "13", b"")
    assert http_client.get(conn, "/small.txt", method="DELETE")[0] == 405
    conn.close()


def test_http_suffix_range_pipelining_and_http10(start, docroot):
    port = start("http_server", "--root", str(docroot))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /small.txt HTTP/1.1\r\nRange: bytes=-6\r\n\r\n"
                     b"GET /small.txt HTTP/1.0\r\n\r\n")
        data = sock.makefile("rb").read()  # HTTP/1.0 without keep-alive: the server closes
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 206") and rest.startswith(b"world\nHTTP/1.1 200 OK")
    assert rest.endswith(b"Connection: close\r\n\r\nhello, world\n")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 400 Bad Request")


def test_http_a_head_too_large_gets_431(start, docroot):
    """A head larger than the session's receive log (64 KiB), where it stays until
    answered, is refused with 431 (from MAX_HEAD on), not dropped with the session."""
    port = start("http_server", "--root", str(docroot))
    head = b"GET /small.txt HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(10)) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /small.txt HTTP/1.1\r\n\r\n")  # the server goes on
        assert sock.recv(64).startswith(b"HTTP/1.1 200 OK")


def test_http_with_curl(start, docroot, tmp_path):
    port = start("http_server", "--root", str(docroot))
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "out"
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-w", "%{num_connects}\n", f"{url}/big.bin", "-o", str(out),
         f"{url}/small.txt", "-o", str(tmp_path / "s")], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (docroot / "big.bin").read_bytes()
    assert (tmp_path / "s").read_bytes() == b"hello, world\n"
    assert result.stdout.split() == [b"1", b"0"]  # keep-alive: one connection
    ranged = subprocess.run(["curl", "-sS", "-r", "7-11", f"{url}/small.txt"],
                            capture_output=True, timeout=60)
    assert ranged.stdout == b"world"

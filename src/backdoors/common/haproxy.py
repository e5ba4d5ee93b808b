"""A running HAProxy's stats socket, as the baselines use it (the recovery benchmark's
and the case study's): one command and its answer, and `show stat` of a backend's servers.
"""

from __future__ import annotations

import csv
import io
import socket

from ..errors import BackdoorsError


def command(path: str, line: str, timeout: float = 2.0,
            error: type[BackdoorsError] = BackdoorsError) -> str:
    """One command on HAProxy's stats socket `path`; its whole answer (`error` if the
    socket fails)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise error(f"HAProxy stats socket {path}: {line!r} failed: {e}") from None
    return b"".join(chunks).decode(errors="replace")


def server_stats(path: str, backend: str, servers, *,
                 error: type[BackdoorsError] = BackdoorsError) -> dict[str, dict[str, str]]:
    """`show stat` of `backend`'s `servers`, by server name (status, stot, ...)."""
    text = command(path, "show stat", error=error).lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
            if row.get("pxname") == backend and row.get("svname") in servers}

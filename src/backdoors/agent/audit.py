"""The append-only audit log: one JSON line per request that acts or is refused (reads
only when refused: protocol.READS, REFUSED) and per local registration.

Opened with O_APPEND, each line written with one write(2), so lines of concurrent writers
never interleave. Bulk data never enters the log: byte strings are summarised by length.
Rejections are rate-limited (a flood on the private network must not fill the disk):
beyond `max_rejects_per_s`, they are counted and summarised in one line; those of
requests a signer did sign (a replay, one for another agent) each signer apart, so that
keyless noise cannot hide a stolen key's. Refused
local registrations are limited per node the same way (`common.ratelimit`), and every string
a caller chose is cut to MAX_STRING characters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import msgspec

from ..common.ratelimit import LogLimiter
from ..common.text import clip

log = logging.getLogger("backdoors.agent")

_encode = msgspec.json.Encoder().encode
MAX_STRING = 200


def summarise(value: Any, depth: int = 0) -> Any:
    """A small, JSON-safe picture of request arguments: no bulk bytes, short strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "..."
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth > 3:
        return "..."
    if isinstance(value, dict):
        return {str(summarise(k, depth + 1)): summarise(v, depth + 1)
                for k, v in list(value.items())[:32]}
    if isinstance(value, (list, tuple)):
        return [summarise(v, depth + 1) for v in value[:32]]
    if isinstance(value, msgspec.Struct):
        return summarise(msgspec.structs.asdict(value), depth)
    return repr(value)[:MAX_STRING]


class AuditLog:
    """Append-only JSONL; write failures are logged and counted, never raised."""

    def __init__(self, path: str, *, max_rejects_per_s: float = 100.0):
        self.path = path
        self.failures = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()
        self._rejects = LogLimiter(rate=max_rejects_per_s, burst=max(1, int(max_rejects_per_s)))

    def write(self, **fields: Any) -> None:
        fields.setdefault("ts", round(time.time(), 6))
        line = _encode(fields) + b"\n"
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.write(self._fd, line)
            except OSError as e:
                self.failures += 1
                log.warning("audit log %s: write failed: %s", self.path, e.strerror)

    def request(self, *, monitor: str, peer: str, op: str, args: Any, ok: bool,
                error: str | None, elapsed_ms: float, votes: list[str] | None = None,
                message: str | None = None, token: Any = None, incident: str = "") -> None:
        """One line for an RPC request that reached dispatch (`token`: its fencing token,
        `incident`: the monitor's incident it acted for; each written only when given)."""
        extra: dict[str, Any] = {} if token is None else {
            "token": {"node": str(token.node)[:200], "token": token.token}}
        if incident:
            extra["incident"] = incident[:200]
        self.write(kind="rpc", monitor=monitor, peer=peer, op=op, args=summarise(args), ok=ok,
                   error=error, message=message, elapsed_ms=round(elapsed_ms, 3), votes=votes,
                   **extra)

    def rejected(self, *, peer: str, code: str, message: str, monitor: str = "?",
                 op: str = "?", verified: bool = False) -> None:
        """One line for a request rejected before dispatch, rate-limited: those signed by
        a signer (`verified`: a replay, a request for another agent) each signer apart
        from the rest, so that keyless noise cannot hide a stolen key's."""
        admit, suppressed = self._rejects.admit(f"signer {monitor}" if verified else "rejected")
        if not admit:
            return
        if suppressed:
            self.write(kind="rejected_suppressed", count=suppressed,
                       **({"monitor": monitor} if verified else {}))
        self.write(kind="rejected", monitor=monitor, peer=peer, op=op, ok=False, error=code,
                   message=message[:MAX_STRING])

    def local(self, *, node: str, pid: int, op: str, name: str, ok: bool,
              kind: str | None = None, error: str | None = None) -> None:
        """One line for a local registration (or its refusal); strings cut to MAX_STRING."""
        self.write(kind="local", node=node, pid=pid, op=clip(op, 64), name=clip(name),
                   region_kind=clip(kind, 64), ok=ok, error=clip(error))

    def local_suppressed(self, *, node: str, count: int, ok: bool = False) -> None:
        """One line for `count` refusals (`ok`: successes) of `node` not logged one by one."""
        self.write(kind="local_suppressed", node=node, count=count, ok=ok)

    def close(self) -> None:
        for key, count in self._rejects.pending(every=True):
            signer = key.removeprefix("signer ") if key.startswith("signer ") else None
            self.write(kind="rejected_suppressed", count=count,
                       **({"monitor": signer} if signer else {}))
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

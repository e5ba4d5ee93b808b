"""A QMP connection to one QEMU, usable from any thread, with no thread or loop of its own.

QMP is JSON lines over a socket: a greeting, `qmp_capabilities`, then one request and
its reply at a time, QEMU's events interleaved. This speaks it directly, synchronously,
rather than through qemu.qmp, whose client needs an asyncio loop: the agent locks a VM
node from its event loop's thread before its seal (a fence taken back at start), when
no other thread may exist yet (Landlock confines only threads started after it), and
from worker threads after. Events are read past and dropped (nothing is kept); a line
longer than MAX_LINE ends the connection.

QEMU serves one client per QMP socket at a time: each party that controls a guest (the
process that started it, the agent that locks it) has a socket of its own (machine.py).
Given the QEMU's `pid`, the connection checks that the peer is that process (SO_PEERCRED):
a socket swapped for another guest's, or a QEMU restarted since, is refused. The
connection is made on first use and again after any failure.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

from ..errors import VmError

MAX_LINE = 1 << 20


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[0]


class Qmp:
    """The QMP socket at `path` of QEMU `pid` (None: not checked); `where` names the guest
    in errors."""

    def __init__(self, path: Path, where: str, *, pid: int | None = None, timeout: float = 5.0):
        self.path, self.where, self.pid, self.timeout = path, where, pid, timeout
        self._lock = threading.Lock()  # one exchange at a time
        self._sock: socket.socket | None = None
        self._buf = b""

    def __call__(self, command: str, **args) -> object:
        """Run one QMP command; its "return" value. VmError if it fails."""
        return self.cmd(command, args)

    def cmd(self, command: str, args: dict | None = None, timeout: float | None = None) -> object:
        """Run `command` with `args`, waiting at most `timeout` (default: the connection's)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            raise VmError(f"{self.where}: QMP {command}: another command held the connection "
                          "past this one's deadline")
        try:
            if self._sock is None:
                self._connect(deadline)
            return self._exchange({"execute": command, **({"arguments": args} if args else {})},
                                  deadline)
        except (OSError, ValueError, RecursionError) as e:  # the socket, or what came over
            self._drop()  # it (JSON nested past the parser's depth: RecursionError)
            what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:200]
            raise VmError(f"{self.where}: QMP {command} failed: {what}") from None
        except VmError:
            self._drop()
            raise
        finally:
            self._lock.release()

    def running(self, timeout: float | None = None) -> bool:
        """Whether the guest's vCPUs run (QMP query-status)."""
        status = self.cmd("query-status", timeout=timeout)
        if not isinstance(status, dict) or "running" not in status:
            raise VmError(f"{self.where}: QMP query-status answered {status!r}")
        return bool(status["running"])

    def close(self) -> None:
        if self._lock.acquire(timeout=self.timeout):  # (else a command's deadline ends it)
            try:
                self._drop()
            finally:
                self._lock.release()

    # -- the protocol ------------------------------------------------------------------

    def _connect(self, deadline: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock, self._buf = sock, b""
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(str(self.path))
        if self.pid is not None and (peer := peer_pid(sock)) != self.pid:
            raise VmError(f"{self.where}: {self.path} is served by pid {peer}, not by the "
                          f"guest's QEMU (pid {self.pid}): was the guest restarted? (restart "
                          "the agent to follow it)")
        greeting = self._line(deadline)
        if "QMP" not in greeting:
            raise VmError(f"{self.where}: {self.path} is not a QMP socket (it said "
                          f"{str(greeting)[:80]})")
        self._exchange({"execute": "qmp_capabilities"}, deadline)

    def _exchange(self, request: dict, deadline: float) -> object:
        assert self._sock is not None
        self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._line(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise VmError(f"{self.where}: QMP {request['execute']}: {desc}")
            # an event (or anything else): not what we wait for

    def _line(self, deadline: float) -> dict:
        """The next line, as a JSON object; VmError past `deadline`, however many lines
        (events) came before it."""
        assert self._sock is not None
        if time.monotonic() > deadline:
            raise VmError(f"{self.where}: QMP did not answer in time (it sent other lines)")
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise VmError(f"{self.where}: QMP sent a line over {MAX_LINE} bytes")
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self._sock.recv(65536)
            if not chunk:
                raise VmError(f"{self.where}: QEMU closed the QMP connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise VmError(f"{self.where}: QMP sent {line[:80]!r}, not an object")
        return message

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

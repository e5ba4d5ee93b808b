"""Writing into a guest through QEMU's debug interface: its gdbstub, spoken directly.

QEMU's gdbstub (started on a unix socket by `Vm.gdb_socket`) speaks gdb's Remote Serial
Protocol: packets `$payload#checksum`, each acknowledged with `+`. A client connecting
stops the vCPUs; `D` (detach) resumes them, closing without it leaves them stopped (for
a caller that holds the node lock and resumes with QMP `cont`). Writes go through QEMU's
memory API (`M` packets, here in physical-address mode, `Qqemu.PhyMemMode:1`), so QEMU
invalidates the code it translated from the written bytes (TCG) -- which a write into the
RAM memfd from outside QEMU would not.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..errors import VmError
from .qmp import peer_pid

#: bytes of guest memory per M packet (QEMU's packet buffer holds 4 KiB of hex and more)
CHUNK = 1024
#: the longest packet taken (a reply holds at most CHUNK bytes as hex, and little more)
MAX_PACKET = 64 << 10


class GdbStub:
    """One connection to a QEMU gdbstub (the guest's vCPUs stop while it is open)."""

    def __init__(self, path: Path, *, where: str = "guest", timeout: float = 10.0,
                 pid: int | None = None):
        """Connect to the gdbstub at `path`; given QEMU's `pid`, refuse any other peer."""
        self.where = where
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise VmError(f"{where}: cannot reach QEMU's gdbstub at {path}: {e.strerror or e}") from None
        if pid is not None and (peer := peer_pid(self._sock)) != pid:
            self._sock.close()
            raise VmError(f"{where}: {path} is served by pid {peer}, not by the guest's QEMU "
                          f"(pid {pid})")
        self._buf = b""
        self._physical = False
        self.timeout = timeout

    def close(self) -> None:
        """Disconnect without detaching (the vCPUs may stay stopped)."""
        self._sock.close()

    def detach(self) -> None:
        """Detach and disconnect."""
        try:
            self.request("D")
        finally:
            self.close()

    def __enter__(self) -> "GdbStub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- memory ---------------------------------------------------------------------

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write `data` at guest-physical `addr` (QEMU marks the code translated from it stale)."""
        self._phys_mode()
        for at in range(0, len(data), CHUNK):
            chunk = data[at:at + CHUNK]
            reply = self.request(f"M{addr + at:x},{len(chunk):x}:{chunk.hex()}")
            if reply != "OK":
                raise VmError(f"{self.where}: gdbstub refused a write of {len(chunk)} bytes at "
                              f"physical {addr + at:#x}: {reply}")

    def read_phys(self, addr: int, length: int) -> bytes:
        self._phys_mode()
        out = []
        for at in range(0, length, CHUNK):
            n = min(CHUNK, length - at)
            reply = self.request(f"m{addr + at:x},{n:x}")
            if reply.startswith("E") and len(reply) == 3:
                raise VmError(f"{self.where}: gdbstub refused a read at physical {addr + at:#x}: {reply}")
            try:
                data = bytes.fromhex(reply)
            except ValueError:
                data = b""
            if len(data) != n:
                raise VmError(f"{self.where}: gdbstub answered a read of {n} bytes at "
                              f"physical {addr + at:#x} with {reply[:40]!r}")
            out.append(data)
        return b"".join(out)

    def _phys_mode(self) -> None:
        if not self._physical:
            reply = self.request("Qqemu.PhyMemMode:1")
            if reply != "OK":
                raise VmError(f"{self.where}: this QEMU's gdbstub has no physical memory mode "
                              f"(it answered {reply!r})")
            self._physical = True

    # ---- the protocol ---------------------------------------------------------------

    def request(self, payload: str) -> str:
        """Send one packet, wait for its reply packet's payload (at most the connection's
        timeout in all). Stop notifications (`T...`/`S...`, sent when the vCPUs stop on
        connection) are acknowledged and skipped: no request here is answered by one."""
        raw = payload.encode()
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(b"$%s#%02x" % (raw, sum(raw) & 0xFF))
            while True:
                reply = self._packet(deadline)
                self._sock.sendall(b"+")
                if reply[:1] not in ("T", "S"):
                    return reply
        except OSError as e:
            raise VmError(f"{self.where}: gdbstub connection failed: {e}") from None

    def _packet(self, deadline: float) -> str:
        """The next packet's payload (acknowledgements skipped)."""
        while True:
            if time.monotonic() > deadline:
                raise VmError(f"{self.where}: gdbstub did not answer in time")
            if len(self._buf) > MAX_PACKET:
                raise VmError(f"{self.where}: gdbstub sent over {MAX_PACKET} bytes without "
                              "a whole packet")
            self._buf = self._buf.lstrip(b"+")
            if self._buf.startswith(b"-"):
                raise VmError(f"{self.where}: gdbstub asked for a retransmission (bad checksum)")
            start = self._buf.find(b"$")
            end = self._buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self._buf) >= end + 3:
                payload = self._buf[start + 1:end]
                self._buf = self._buf[end + 3:]
                return payload.decode("latin-1")
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            more = self._sock.recv(65536)
            if not more:
                raise VmError(f"{self.where}: gdbstub closed the connection")
            self._buf += more

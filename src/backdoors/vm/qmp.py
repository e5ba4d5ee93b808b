"""A QMP connection to one QEMU, usable from any thread (qemu.qmp's QMPClient).

QEMU serves one client per QMP socket at a time: each party that controls a guest (the
process that started it, the agent that locks it) has a socket of its own (machine.py).
The client runs on an event loop of this connection's own, in a thread started on first
use, so callers may be plain threads or an event loop's thread (the agent's) alike; each
call waits for its reply. The connection is made on first use and made again after a
failure: a caller never holds a broken one.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from qemu.qmp import QMPClient

from ..errors import VmError


class Qmp:
    """The QMP socket at `path`; `where` names the guest in errors."""

    def __init__(self, path: Path, where: str, timeout: float = 5.0):
        self.path, self.where, self.timeout = path, where, timeout
        self._lock = threading.Lock()  # one exchange at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None

    def __call__(self, command: str, **args) -> object:
        """Run one QMP command; its "return" value. VmError if it fails."""
        return self.cmd(command, args)

    def cmd(self, command: str, args: dict | None = None, timeout: float | None = None) -> object:
        """Run `command` with `args`, waiting at most `timeout` (default: the connection's)."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever,
                                                name="qmp", daemon=True)
                self._thread.start()
            future = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self._execute(command, args or {}), timeout), self._loop)
            try:
                return future.result()
            except Exception as e:  # qemu.qmp raises its own hierarchy (and OSError)
                asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result()
                what = str(e) or type(e).__name__  # a timeout says nothing itself
                raise VmError(f"{self.where}: QMP {command} failed: {what}") from None

    def running(self) -> bool:
        """Whether the guest's vCPUs run (QMP query-status)."""
        status = self("query-status")
        if not isinstance(status, dict) or "running" not in status:
            raise VmError(f"{self.where}: QMP query-status answered {status!r}")
        return bool(status["running"])

    def close(self) -> None:
        """Disconnect and stop the connection's thread; a later call starts them again."""
        with self._lock:
            if self._loop is None:
                return
            asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None

    async def _execute(self, command: str, args: dict) -> object:
        if self._client is None:
            client = QMPClient(self.where)
            await client.connect(str(self.path))
            self._client = client
        try:
            return await self._client.execute(command, args or None)
        finally:
            self._client.events.clear()  # (nobody reads QEMU's events here)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - QEMU may be gone already
                pass

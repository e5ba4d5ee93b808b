"""The end of a child process's log, quoted in an error: its run directory may be gone
by the time anyone reads the message."""

from __future__ import annotations

from pathlib import Path

TAIL_BYTES = 4096  # read at most this much from the end


def log_tail(path: str | Path, lines: int = 5) -> str:
    """'<path> ends: a | b | c' (its last `lines` lines), '<path> is empty', or
    '<path> is missing'."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL_BYTES))
            text = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return f"{path} is missing"
    return f"{path} ends: " + " | ".join(text[-lines:]) if text else f"{path} is empty"

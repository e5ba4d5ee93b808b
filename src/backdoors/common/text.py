"""Strings a node chose, made safe to show on an operator's terminal.

A node writes its sensor names, its processes' names (comm) and, through errors, parts of
what the tools print. Shown as they are, an ESC starts a terminal sequence (clear the
screen, move the cursor over a state column, set the title or the clipboard) and a rich
markup tag restyles the line or stops the command. `printable` makes the controls visible
instead; `cell` is that as rich Text, which is never read as markup. `clip` cuts such a
string for a log line or an error answer.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the bidirectional overrides and isolates (which reorder
# what follows them on the screen)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clip(text: str | None, limit: int = 200) -> str | None:
    """`text` cut to `limit` characters (marked), for logs of attacker-chosen strings."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more)"


def printable(text: object) -> str:
    """`text` as a string with every control character shown as an escape (\\x1b, \\u202e)."""
    s = str(text)
    return _UNSAFE.sub(_escape, s) if _UNSAFE.search(s) else s


def _escape(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def cell(text: object, style: str = "", **options):
    """`text` made printable, as rich Text (no markup is read in it)."""
    from rich.text import Text

    return Text(printable(text), style=style, **options)

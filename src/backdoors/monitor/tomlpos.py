"""Where a key sits in a TOML file: from a decoder's path back to a line number.

tomllib reports the line of a syntax error, but a schema error (msgspec's
`$.rule[0].detectors[1].kind`) only names a path in the decoded document. `locate` scans
the text once, recording the line of every key, array element and table header by its
path, and returns the line of the deepest part of the path it found. The text has
already been parsed by tomllib, so the scanner may assume it is valid TOML.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ERROR_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def parse_error_path(message: str) -> tuple[Path, str]:
    """Split a msgspec ValidationError message into (path, message without the path).

    "Invalid value 'c' - at `$.rule[0].kind`" -> (("rule", 0, "kind"), "Invalid value 'c'").
    For an unknown field the field itself is appended to the path, so it can be located.
    """
    m = _ERROR_PATH.search(message)
    path: list[str | int] = []
    bare = message
    if m:
        bare = message[: m.start()]
        for part in re.finditer(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]", m.group(1)[1:]):
            if part.group(1) is not None:
                path.append(part.group(1))
            elif part.group(2) is not None:
                path.append(int(part.group(2)))
            else:
                break  # a dict key msgspec does not name: stop at its parent
    unknown = _UNKNOWN_FIELD.search(bare)
    if unknown:
        path.append(unknown.group(1))
    return tuple(path), bare


def dotted(path: Path) -> str:
    """A path as a TOML-ish key: ("rule", 0, "kind") -> "rule[0].kind"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def locate(text: str, path: Path) -> int | None:
    """The 1-based line of the deepest located prefix of `path` in TOML `text`, or None."""
    lines = _Scanner(text).scan()
    for n in range(len(path), 0, -1):
        line = lines.get(tuple(path[:n]))
        if line is not None:
            return line
    return None


class _Scanner:
    """A structure-only TOML scanner: values are skipped, their positions recorded."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.lines: dict[Path, int] = {}
        self.array_tables: dict[Path, int] = {}  # absolute path -> index of the last entry

    def line(self) -> int:
        return self.s.count("\n", 0, self.i) + 1

    def scan(self) -> dict[Path, int]:
        table: Path = ()
        while self.i < len(self.s):
            self.skip_space(newlines=True)
            if self.i >= len(self.s):
                break
            if self.s.startswith("[[", self.i):
                line = self.line()
                self.i += 2
                key = self.key("]]")
                self.i += 2
                parent = self.resolve(key[:-1])
                full = parent + (key[-1],)
                index = self.array_tables.get(full, -1) + 1
                self.array_tables[full] = index
                table = full + (index,)
                self.lines.setdefault(full, line)
                self.lines[table] = line
            elif self.s[self.i] == "[":
                line = self.line()
                self.i += 1
                key = self.key("]")
                self.i += 1
                table = self.resolve(key)
                self.lines.setdefault(table, line)
            else:
                self.pair(table)
            self.skip_line()
        return self.lines

    def resolve(self, key: Path) -> Path:
        """A header key with the current index inserted after each array of tables."""
        out: Path = ()
        for part in key:
            out += (part,)
            if out in self.array_tables:
                out += (self.array_tables[out],)
        return out

    def pair(self, table: Path) -> None:
        line = self.line()
        key = self.key("=")
        self.i += 1  # '='
        path = table
        for part in key:
            path += (part,)
            self.lines.setdefault(path, line)
        self.value(path)

    def key(self, stop: str) -> Path:
        parts: list[str] = []
        while True:
            self.skip_space()
            c = self.s[self.i]
            if c in "\"'":
                start = self.i
                self.skip_string()
                parts.append(_unquote(self.s[start:self.i]))
            else:
                m = _BARE.match(self.s, self.i)
                if not m:
                    break
                parts.append(m.group())
                self.i = m.end()
            self.skip_space()
            if self.s.startswith(".", self.i):
                self.i += 1
                continue
            break
        if not self.s.startswith(stop, self.i):  # not valid TOML after all: stop scanning
            self.i = len(self.s)
        return tuple(parts)

    def value(self, path: Path) -> None:
        self.skip_space()
        c = self.s[self.i] if self.i < len(self.s) else ""
        if c == "[":
            self.i += 1
            index = 0
            while True:
                self.skip_space(newlines=True, comments=True)
                if self.i >= len(self.s) or self.s[self.i] == "]":
                    self.i += 1
                    return
                self.lines[path + (index,)] = self.line()
                self.value(path + (index,))
                index += 1
                self.skip_space(newlines=True, comments=True)
                if self.s.startswith(",", self.i):
                    self.i += 1
        elif c == "{":
            self.i += 1
            while True:
                self.skip_space()
                if self.i >= len(self.s) or self.s[self.i] == "}":
                    self.i += 1
                    return
                self.pair(path)
                self.skip_space()
                if self.s.startswith(",", self.i):
                    self.i += 1
        elif c in "\"'":
            self.skip_string()
        else:
            m = re.compile(r"[^,\]}\n#]*").match(self.s, self.i)
            self.i = m.end()

    def skip_string(self) -> None:
        q = self.s[self.i]
        if self.s.startswith(q * 3, self.i):
            end = self.s.find(q * 3, self.i + 3)
            while q == '"' and end > 0 and _escaped(self.s, end):
                end = self.s.find(q * 3, end + 1)
            self.i = len(self.s) if end < 0 else end + 3
            while self.s.startswith(q, self.i):  # up to two quotes may close the string
                self.i += 1
            return
        j = self.i + 1
        while j < len(self.s) and self.s[j] != q and self.s[j] != "\n":
            j += 2 if q == '"' and self.s[j] == "\\" else 1
        self.i = j + 1

    def skip_space(self, newlines: bool = False, comments: bool = False) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.i += 1
            elif c == "#" and (newlines or comments):
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return

    def skip_line(self) -> None:
        end = self.s.find("\n", self.i)
        self.i = len(self.s) if end < 0 else end + 1


def _escaped(s: str, i: int) -> bool:
    n = 0
    while i - n - 1 >= 0 and s[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _unquote(raw: str) -> str:
    if raw.startswith('"'):
        import json
        try:
            return json.loads(raw)
        except ValueError:
            return raw[1:-1]
    return raw[1:-1]

"""The TOML config-file layer: read a file, decode it into typed msgspec Structs, and say
where an error is, as `FILE:LINE: key K: message`.

A config class documents each of its keys in its type: `Annotated[int, doc("...")]`
(`descriptions` reads them back, for `backdoors config show` and the docs' test).
Decoding is strict and forbids unknown keys (the Structs say `forbid_unknown_fields`).
Checks a type cannot express raise `Invalid(path, message)`; `Document.decode` turns that
into a ConfigError with the file, the line and the key.

tomllib reports the line of a syntax error, but a schema error (msgspec's
`$.rule[0].detectors[1].kind`) only names a path in the decoded document. `locate` scans
the text once, recording the line of every key, array element and table header by its
path, and returns the line of the deepest part of the path it found.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import tomllib
import typing
from typing import Any, Callable, TypeVar

import msgspec

from ..errors import ConfigError

T = TypeVar("T")
Path = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ERROR_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


class Invalid(Exception):
    """A value a type cannot reject by itself; `path` is where it sits in the document."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path, self.message = tuple(path), message

    def error(self, source: str) -> ConfigError:
        """The ConfigError of a config built in code (no file): "SOURCE: key K: message"."""
        return ConfigError(f"{source}: key {dotted(self.path)}: {self.message}")


# -- documenting keys --------------------------------------------------------------------


def doc(text: str) -> msgspec.Meta:
    """The description of a config key, for its type: `Annotated[int, doc("...")]`."""
    return msgspec.Meta(description=text)


@functools.cache
def descriptions(struct: type) -> dict[str, str]:
    """Field name -> description, for the fields of `struct` that have one."""
    hints = typing.get_type_hints(struct, include_extras=True)
    out = {}
    for name in struct.__struct_fields__:
        for meta in getattr(hints[name], "__metadata__", ()):
            if isinstance(meta, msgspec.Meta) and meta.description:
                out[name] = meta.description
    return out


# -- reading and decoding ----------------------------------------------------------------


def read(path: str, what: str = "config") -> str:
    """The text of the file at `path`; ConfigError naming `what` it was meant to be."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 (byte {e.start})") from None


class Document:
    """A TOML text parsed: `source` (its file name), `text` and the top `table`."""

    def __init__(self, source: str, text: str):
        self.source, self.text = source, text
        try:
            self.table: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
            raise ConfigError(f"{source}: not valid TOML: {e}") from None

    @classmethod
    def read(cls, path: str, what: str = "config") -> Document:
        return cls(path, read(path, what))

    @property
    def folder(self) -> str:
        """The folder relative paths in the file are taken from."""
        return os.path.dirname(os.path.abspath(self.source))

    def where(self, path: Path) -> str:
        """"FILE:LINE: key K" (the line when it can be found)."""
        line = locate(self.text, path) if path else None
        at = f"{self.source}:{line}" if line else self.source
        return f"{at}: key {dotted(path)}" if path else at

    def decode(self, decode: Callable[[Any], T], at: Path = ()) -> T:
        """`decode(the table at path `at`)`; its Invalid becomes a ConfigError at file, line
        and key, another ConfigError (from a file it read) is prefixed with this file."""
        table: Any = self.table
        for part in at:
            table = table[part]
        try:
            return decode(table)
        except Invalid as e:
            raise ConfigError(f"{self.where(at + e.path)}: {e.message}") from None
        except ConfigError as e:
            inside = f" [{dotted(at)}]:" if at else ""
            raise ConfigError(f"{self.source}:{inside} {e}") from None


def convert(table: Any, type_: type[T], hint: Callable[[Path, str], str] | None = None) -> T:
    """`table` (parsed TOML) as `type_`, strictly; Invalid naming the key at fault.

    `hint(path, message)` may return a sentence appended to a schema error.
    """
    try:
        value = msgspec.convert(table, type_, strict=True)
    except msgspec.ValidationError as e:
        path, message = parse_error_path(str(e))
        extra = hint(path, message) if hint else ""
        raise Invalid(path, f"{message}; {extra}" if extra else message) from None
    for path, number in _nonfinite(value, ()):  # TOML has inf and nan; no key means them
        raise Invalid(path, f"must be a finite number, not {number}")
    return value


def _nonfinite(value: Any, path: Path):
    """(key path, value) of every float in `value` that is inf or nan."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path, value
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from _nonfinite(getattr(value, name), path + (name,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _nonfinite(item, path + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nonfinite(item, path + (key,))


def decode(text: str, type_: type[T], source: str,
           hint: Callable[[Path, str], str] | None = None,
           check: Callable[[T], None] | None = None) -> T:
    """Parse TOML `text` (from `source`, a file name) into `type_`, then `check(value)`
    (which raises Invalid); ConfigError naming file, line and key on any error."""
    def convert_and_check(table: Any) -> T:
        value = convert(table, type_, hint)
        if check is not None:
            check(value)
        return value
    return Document(source, text).decode(convert_and_check)


def dumps(value: msgspec.Struct) -> str:
    """A config as TOML text, as it is read back (absent optionals are left out: TOML has
    no null)."""
    import tomli_w

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return tomli_w.dumps(strip(msgspec.to_builtins(value)))


# -- values shared by several config classes -------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """("addr", port) from "ADDR:PORT" or "[V6ADDR]:PORT"; ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ":" in host and not bracketed:  # "::1:7700": which colon ends the address?
        raise ValueError(f"{text!r}: an IPv6 address takes brackets: [V6ADDR]:PORT")
    ipaddress.ip_address(host)
    return host, int(port)


# -- locating a key in the text ----------------------------------------------------------


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

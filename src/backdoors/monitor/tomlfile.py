"""Decoding a TOML file into typed Structs, with errors that name file, line and key."""

from __future__ import annotations

import tomllib
from typing import Any, Callable, TypeVar

import msgspec

from ..errors import ConfigError
from .tomlpos import Path, dotted, locate, parse_error_path

T = TypeVar("T")


class Invalid(Exception):
    """A value a type cannot reject by itself; `path` is where it sits in the document."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path, self.message = tuple(path), message


def where(source: str, text: str | None, path: Path) -> str:
    """"FILE:LINE: key K" (the line when it can be found)."""
    line = locate(text, path) if text is not None and path else None
    at = f"{source}:{line}" if line else source
    return f"{at}: key {dotted(path)}" if path else at


def decode(text: str, type_: type[T], source: str,
           hint: Callable[[Path, str], str] | None = None) -> T:
    """Parse TOML `text` (from `source`, a file name) into `type_`; ConfigError on any error.

    `hint(path, message)` may return a sentence appended to a schema error.
    """
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as e:
        path, message = parse_error_path(str(e))
        extra = hint(path, message) if hint else ""
        message = f"{message}; {extra}" if extra else message
        raise ConfigError(f"{where(source, text, path)}: {message}") from None


def read(path: str, what: str) -> str:
    """The text of the file at `path`; ConfigError naming `what` it was meant to be."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 (byte {e.start})") from None

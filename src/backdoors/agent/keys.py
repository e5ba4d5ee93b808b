"""Monitor keys: the shared secrets of the HMAC authentication, one per monitor.

A keys file is TOML with one line per monitor, `monitor_id = "hex key"`, mode 0600. The
agent's config names it (or holds the same table inline); each monitor loads its own key.
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib

from ..errors import ConfigError
from .protocol import MIN_KEY_BYTES

KEY_BYTES = 32
MONITOR_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def new_key() -> bytes:
    """A fresh random key."""
    return secrets.token_bytes(KEY_BYTES)


def decode_key(monitor: str, text: str, where: str) -> bytes:
    """The key of `monitor` from its hex text; ConfigError naming `where` if unusable."""
    if not MONITOR_ID.fullmatch(monitor):
        raise ConfigError(f"{where}: monitor id {monitor!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    try:
        key = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: key of monitor {monitor!r} is not hex") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{where}: key of monitor {monitor!r} has {len(key)} bytes, at least "
            f"{MIN_KEY_BYTES} are needed (generate one with backdoors.agent.keys.generate_keys)"
        )
    return key


def load_keys(path: str) -> dict[str, bytes]:
    """Every monitor's key from a keys file."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read keys file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"keys file {path}: {e}") from None
    keys = {}
    for monitor, text in table.items():
        if not isinstance(text, str):
            raise ConfigError(f"keys file {path}: key {monitor!r}: expected a hex string")
        keys[monitor] = decode_key(monitor, text, f"keys file {path}")
    return keys


def load_key(path: str, monitor: str) -> bytes:
    """The key of one monitor from a keys file."""
    keys = load_keys(path)
    if monitor not in keys:
        raise ConfigError(f"keys file {path} has no key for monitor {monitor!r}")
    return keys[monitor]


def generate_keys(path: str, monitors: list[str], *, overwrite: bool = False) -> dict[str, bytes]:
    """Write a new keys file (mode 0600) with a fresh key per monitor; return the keys."""
    keys = {m: new_key() for m in monitors}
    for m in keys:
        decode_key(m, keys[m].hex(), f"keys file {path}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"keys file {path} exists: remove it or pass overwrite=True") from None
    with os.fdopen(fd, "w") as f:
        f.write("# backdoors monitor keys: monitor_id = hex HMAC-SHA256 key. Keep secret.\n")
        f.writelines(f'{m} = "{k.hex()}"\n' for m, k in keys.items())
    return keys

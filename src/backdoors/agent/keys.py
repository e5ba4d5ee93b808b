"""Keys of the agent RPC: one Ed25519 keypair per monitor and per agent.

Whoever signs holds a private key; whoever checks holds only public keys. A monitor signs
its requests, an agent its replies, its events and its requests to other agents (session
hand-over, peer pings). An agent keeps its monitors' and its peers' public keys, a monitor
its agents' public keys: reading an agent's files no longer lets anyone act as a monitor.

A private key file is TOML, mode 0600 (a file readable by group or others is refused):

    id = "m1"
    private_key = "<64 hex digits: the Ed25519 seed>"
    next_private_key = "<64 hex digits>"      # only during a rotation (`keys rotate`)

A public key is written "ed25519:<64 hex digits>"; a public keys file is TOML with one
`id = "ed25519:..."` line (or a list of two, during a rotation) per signer. `backdoors keys
generate|show|rotate` writes and shows them (cli.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError

KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PUBLIC_PREFIX = "ed25519:"
SIGNATURE_BYTES = 64
#: Most public keys one id may have at once: the current one and, during a roll, the next.
MAX_KEYS_PER_ID = 2

_RAW = serialization.Encoding.Raw


@dataclass(frozen=True)
class Identity:
    """One signer: its id and its private key."""

    id: str
    private: Ed25519PrivateKey

    def sign(self, domain: bytes, body: bytes) -> bytes:
        """The signature of `body` in `domain` (a request, a reply, an event)."""
        return self.private.sign(domain + body)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def public_text(self) -> str:
        return public_text(self.public)


def new_identity(id: str) -> Identity:
    """A fresh keypair for `id`."""
    _check_id(id, "a key")
    return Identity(id, Ed25519PrivateKey.generate())


def public_text(key: Ed25519PublicKey) -> str:
    """"ed25519:<hex>": how a public key is written in configs."""
    return PUBLIC_PREFIX + key.public_bytes(_RAW, serialization.PublicFormat.Raw).hex()


def verify(keys: Sequence[Ed25519PublicKey], domain: bytes, body: bytes, sig: bytes) -> bool:
    """True if `sig` is a signature of `body` in `domain` by one of `keys`."""
    if len(sig) != SIGNATURE_BYTES:
        return False
    for key in keys:
        try:
            key.verify(sig, domain + body)
            return True
        except InvalidSignature:
            pass
    return False


# -- public keys ---------------------------------------------------------------------------


def decode_public(text: object, where: str) -> Ed25519PublicKey:
    """One public key from its "ed25519:<hex>" text; ConfigError naming `where`."""
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"{where}: expected a public key \"{PUBLIC_PREFIX}<64 hex digits>\" "
                          "(backdoors keys show FILE prints it)")
    try:
        raw = bytes.fromhex(text[len(PUBLIC_PREFIX):])
        if len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError(f"{where}: {text[:80]!r} is not an Ed25519 public key "
                          f"(\"{PUBLIC_PREFIX}\" and 64 hex digits)") from None


def decode_publics(table: Mapping[str, object], where: str) -> dict[str, tuple[Ed25519PublicKey, ...]]:
    """id -> its public keys, from a table of `id = "ed25519:..."` (or a list of up to two
    during a rotation). Refuses bad ids, bad keys, and one key under two ids (two ids with
    one key are one signer: a quorum could be met by one key holder)."""
    out: dict[str, tuple[Ed25519PublicKey, ...]] = {}
    owner: dict[bytes, str] = {}
    for id, value in table.items():
        at = f"{where}: {id}"
        _check_id(id, where)
        texts = value if isinstance(value, list) else [value]
        if not 1 <= len(texts) <= MAX_KEYS_PER_ID:
            raise ConfigError(f"{at}: give 1 or {MAX_KEYS_PER_ID} public keys (two only "
                              "during a rotation)")
        keys = tuple(decode_public(t, at) for t in texts)
        for key in keys:
            raw = key.public_bytes(_RAW, serialization.PublicFormat.Raw)
            if raw in owner and owner[raw] != id:
                raise ConfigError(f"{at}: has the same public key as {owner[raw]}: each "
                                  "signer needs its own keypair")
            owner[raw] = id
        out[id] = keys
    return out


def load_publics(path: str) -> dict[str, tuple[Ed25519PublicKey, ...]]:
    """Every id's public keys from a public keys file (not writable by group or others)."""
    check_mode(path, "public keys file", writable_only=True)
    return decode_publics(_read_toml(path, "public keys file"), f"public keys file {path}")


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, serialization.PublicFormat.Raw)


# -- private key files ---------------------------------------------------------------------


def check_mode(path: str, what: str, *, writable_only: bool = False) -> None:
    """ConfigError naming `path` and the chmod to run if group or others may read it (or,
    with `writable_only`, write it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path} is not a file ({stat.filemode(mode)})")
    lax = mode & (stat.S_IWGRP | stat.S_IWOTH) if writable_only else mode & 0o077
    if lax:
        fix = "chmod go-w" if writable_only else "chmod 600"
        raise ConfigError(f"{what} {path} is {'writable' if writable_only else 'readable'} by "
                          f"group or others (mode {stat.filemode(mode)}): run `{fix} {path}`")


def load_identity(path: str, id: str | None = None) -> Identity:
    """The signer of a private key file (mode 0600); `id`, if given, must be the file's."""
    check_mode(path, "private key file")
    table = _read_toml(path, "private key file")
    where = f"private key file {path}"
    file_id = table.get("id")
    if not isinstance(file_id, str):
        raise ConfigError(f"{where}: no id = \"...\" line")
    _check_id(file_id, where)
    if id is not None and file_id != id:
        raise ConfigError(f"{where} is the key of {file_id!r}, not of {id!r}")
    return Identity(file_id, _decode_private(table.get("private_key"), f"{where}: private_key"))


def read_key_file(path: str) -> tuple[Identity, Identity | None]:
    """(current, next) of a private key file; next is set during a rotation."""
    current = load_identity(path)
    table = _read_toml(path, "private key file")
    nxt = table.get("next_private_key")
    if nxt is None:
        return current, None
    return current, Identity(current.id, _decode_private(nxt, f"{path}: next_private_key"))


def write_key_file(path: str, current: Identity, next: Identity | None = None, *,
                   overwrite: bool = False) -> None:
    """Write a private key file, mode 0600 (atomically replaced when `overwrite`, keeping
    the replaced file's owner: a monitor running as its own user reads its key still)."""
    lines = [f"# backdoors private key (Ed25519) of {current.id!r}. Secret: keep it mode 0600.\n",
             f"# Its public key, for the configs that check it: {current.public_text()}\n",
             f'id = "{current.id}"\n', f'private_key = "{_seed(current).hex()}"\n']
    if next is not None:
        lines.append(f"# rotation under way: next public key {next.public_text()}\n")
        lines.append(f'next_private_key = "{_seed(next).hex()}"\n')
    target = path + ".new" if overwrite else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        if overwrite and os.path.exists(target):
            os.unlink(target)
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file {path} exists: remove it first, or rotate it") from None
    except OSError as e:
        raise ConfigError(f"cannot write key file {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            if overwrite and os.path.exists(path):
                owner = os.stat(path)
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(target, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise ConfigError(f"cannot write key file {path}: {e.strerror}") from None


def _fsync_dir(path: str) -> None:
    """Make a rename in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate(path: str, id: str) -> Identity:
    """Write a new private key file for `id` (refuses to overwrite); returns its signer."""
    identity = new_identity(id)
    write_key_file(path, identity)
    return identity


def public_entry(id: str, keys: Iterable[Ed25519PublicKey]) -> str:
    """The TOML line that lists `id`'s public keys in a config (`[agent.monitors]`, ...)."""
    texts = [public_text(k) for k in keys]
    value = f'"{texts[0]}"' if len(texts) == 1 else "[" + ", ".join(f'"{t}"' for t in texts) + "]"
    return f"{id} = {value}"


def _seed(identity: Identity) -> bytes:
    return identity.private.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())


def _decode_private(text: object, where: str) -> Ed25519PrivateKey:
    try:
        if not isinstance(text, str):
            raise ValueError
        raw = bytes.fromhex(text)
        if len(raw) != 32:
            raise ValueError
        return Ed25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise ConfigError(f"{where}: expected 64 hex digits (an Ed25519 seed; "
                          "backdoors keys generate writes one)") from None


def _check_id(id: str, where: str) -> None:
    if not KEY_ID.fullmatch(id):
        raise ConfigError(f"{where}: id {id!r} must be 1-64 of A-Z a-z 0-9 _ . -")


def _read_toml(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: {e}") from None

"""Signed early warnings between clusters (DINA): what one cluster's monitor repaired, so
that the others' monitors pre-arm against it (monitor/prearm.py).

A `AttackWarning` describes an attack-like incident's culprit: the sha256 of its executable (as
the agent read it through /proc/PID/exe), its comm, its command line when known, and the
kind ("fork-bomb", "memory-hog"). It carries a unique id, the time it was issued and the
time it expires. On the wire (NATS, the `[monitor.warnings]` subject) it is a `Sealed`
envelope: the warning's msgpack bytes, the signer's id and its Ed25519 signature of
DOMAIN + body (the domain keeps a warning's signature from passing for an RPC request's,
and the reverse).

`Verifier.check(data)` opens an envelope and refuses (WarningRejected, with the reason):
an unknown signer or a bad signature, a malformed body, one issued outside the timestamp
window of now (from the future or too old), an expired one, and a replay (an id already
accepted; ids are remembered until their warning would be refused as too old anyway).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import msgspec

from ..agent.keys import Identity, verify
from ..errors import BackdoorsError

DOMAIN = b"backdoors-warning-v1\0"
KINDS = ("fork-bomb", "memory-hog")
#: The incident rule kinds that publish a warning when repaired (diagnosis kind -> kind).
DIAGNOSIS_KINDS = {"fork_bomb": "fork-bomb", "memory_hog": "memory-hog"}


class WarningRejected(BackdoorsError):
    """A warning refused: `reason` is one of bad_envelope, unknown_signer, bad_signature,
    bad_body, future, too_old, expired, replay."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class AttackWarning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A culprit one cluster repaired; see the module's docstring."""

    id: str
    cluster: str  # the issuing cluster's name
    monitor: str  # the issuing monitor's id (the signer)
    issued_at: float  # Unix time
    expires_at: float  # Unix time
    kind: str  # one of KINDS
    exe_sha256: str  # 64 hex digits
    comm: str
    cmdline: list[str] = []
    exe: str = ""  # the installed executable's name, when it is one
    node: str = ""  # where it was repaired ("host/node")
    incident: str = ""


class Sealed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed warning on the wire: `body` is a msgpack-encoded AttackWarning."""

    body: bytes
    signer: str
    sig: bytes


_encode = msgspec.msgpack.Encoder().encode
_sealed = msgspec.msgpack.Decoder(Sealed)
_warning = msgspec.msgpack.Decoder(AttackWarning)


def issue(signer: Identity, cluster: str, kind: str, exe_sha256: str, comm: str, *,
          cmdline: Sequence[str] = (), exe: str = "", node: str = "", incident: str = "",
          ttl_s: float = 3600.0, now: float | None = None) -> AttackWarning:
    """A new warning with a fresh id, issued now."""
    if kind not in KINDS:
        raise ValueError(f"warning kind {kind!r}: one of {', '.join(KINDS)}")
    if len(exe_sha256) != 64:
        raise ValueError(f"exe_sha256 {exe_sha256!r}: 64 hex digits")
    now = time.time() if now is None else now
    return AttackWarning(uuid.uuid4().hex, cluster, signer.id, now, now + ttl_s, kind, exe_sha256,
                   comm, list(cmdline)[:64], exe, node, incident)


def seal(signer: Identity, warning: AttackWarning) -> bytes:
    """The wire bytes of `warning`, signed by `signer` (who must be its `monitor`)."""
    if warning.monitor != signer.id:
        raise ValueError(f"warning of monitor {warning.monitor!r} signed by {signer.id!r}")
    body = _encode(warning)
    return _encode(Sealed(body, signer.id, signer.sign(DOMAIN, body)))


class Verifier:
    """Checks sealed warnings against `trusted` (signer id -> its public keys).

    `window_s`: how far a warning's issued_at may be from now (both ways); `clock`: Unix
    time. Thread-safe."""

    def __init__(self, trusted: Mapping[str, Sequence], *, window_s: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self.trusted = {k: tuple(v) for k, v in trusted.items()}
        self.window_s, self.clock = window_s, clock
        self._seen: dict[str, float] = {}  # id -> until when it is remembered
        self._lock = threading.Lock()

    def check(self, data: bytes) -> AttackWarning:
        """The warning in `data`, verified; WarningRejected saying why not."""
        try:
            sealed = _sealed.decode(data)
        except msgspec.DecodeError as e:
            raise WarningRejected("bad_envelope", f"not a sealed warning: {e}") from None
        keys = self.trusted.get(sealed.signer)
        if keys is None:
            raise WarningRejected("unknown_signer", f"warning signed by {sealed.signer!r}, "
                                  "not a trusted key of [monitor.warnings] trusted_keys")
        if not verify(keys, DOMAIN, sealed.body, sealed.sig):
            raise WarningRejected("bad_signature", f"warning of {sealed.signer!r}: the "
                                  "signature does not match its trusted key")
        try:
            w = _warning.decode(sealed.body)
        except msgspec.DecodeError as e:
            raise WarningRejected("bad_body", f"warning of {sealed.signer!r}: {e}") from None
        if w.monitor != sealed.signer or w.kind not in KINDS or len(w.exe_sha256) != 64:
            raise WarningRejected("bad_body", f"warning {w.id} of {sealed.signer!r}: signer, "
                                  "kind or exe_sha256 not as a warning has them")
        if not (math.isfinite(w.issued_at) and math.isfinite(w.expires_at)):
            raise WarningRejected("bad_body", f"warning {w.id} of {sealed.signer!r}: its "
                                  "times are not finite (NaN passes every comparison)")
        now = self.clock()
        if w.issued_at > now + self.window_s:
            raise WarningRejected("future", f"warning {w.id}: issued {w.issued_at - now:.0f} s "
                                  f"in the future (window {self.window_s:g} s: clocks apart?)")
        if w.issued_at < now - self.window_s:
            raise WarningRejected("too_old", f"warning {w.id}: issued {now - w.issued_at:.0f} "
                                  f"s ago, beyond the {self.window_s:g} s window")
        if w.expires_at <= now:
            raise WarningRejected("expired", f"warning {w.id}: expired "
                                  f"{now - w.expires_at:.0f} s ago")
        with self._lock:
            for old in [i for i, until in self._seen.items() if until < now]:
                del self._seen[old]
            if w.id in self._seen:
                raise WarningRejected("replay", f"warning {w.id} of {w.monitor!r} was "
                                      "accepted before: a replay")
            self._seen[w.id] = w.issued_at + self.window_s
        return w

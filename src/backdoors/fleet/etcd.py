"""A small etcd v3 client over etcd's JSON gateway (httpx), for a fleet of monitors.

etcd (3.4 and later) serves its v3 API as JSON on the client URL: POST /v3/kv/range,
/v3/kv/put, /v3/kv/deleterange, /v3/kv/txn, /v3/lease/grant, /v3/lease/keepalive,
/v3/lease/revoke; keys and values are base64, 64-bit numbers are strings, and fields at
their default (false, 0, empty) are left out. Only what the fleet uses is here: leases,
ranges by prefix, puts and deletes, and transactions comparing a key's value, create or
mod revision. (python-etcd3 fails with current protobuf; aetcd is asyncio and gRPC, and
the monitor's fleet thread is synchronous: the gateway needs nothing but HTTP.)

Several endpoints may be given: a request that cannot reach one tries the next.
`EtcdUnavailable` says none answered; `EtcdError` is an answer that is an error.

An etcd anyone on its network can write to lets anyone blind the fleet (a leased member or
owner record no monitor wrote takes nodes from every monitor): give the fleet's etcd
authentication (`user`, `password`: etcd's simple or JWT tokens, taken again when one
expires) and, over https, its CA (`ca`) and a client certificate (`cert`, `key`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import BackdoorsError


class EtcdError(BackdoorsError):
    """etcd answered with an error (the message is etcd's, with the request's path)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout: etcd is down or unreachable from here."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Compare:
    """One condition of a txn: `target` is "VALUE", "CREATE" (create_revision) or "MOD"
    (mod_revision); `result` "EQUAL", "NOT_EQUAL", "GREATER" or "LESS"."""

    key: str
    target: str
    value: str | int
    result: str = "EQUAL"

    def wire(self) -> dict:
        field = {"VALUE": "value", "CREATE": "create_revision", "MOD": "mod_revision"}[self.target]
        v = _b64(self.value) if self.target == "VALUE" else str(int(self.value))
        return {"key": _b64(self.key), "target": self.target, "result": self.result, field: v}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the txn (the put's, when it put)
    responses: list[dict]


def put_op(key: str, value: str, lease: int = 0) -> dict:
    """A put inside a txn."""
    req = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def delete_op(key: str) -> dict:
    """A delete inside a txn."""
    return {"request_delete_range": {"key": _b64(key)}}


class EtcdClient:
    """Synchronous etcd v3 over the JSON gateway; one httpx connection pool, thread-safe.

    `endpoints`: client URLs ("http://10.99.0.250:2379"). `timeout`: per request, seconds.
    `user`, `password`: etcd authentication; `ca`, `cert`, `key`: TLS files (https).
    """

    def __init__(self, endpoints: list[str] | str, *, timeout: float = 1.0,
                 user: str | None = None, password: str | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None):
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise EtcdError("no etcd endpoint given (like http://127.0.0.1:2379)")
        for e in endpoints:
            if not e.startswith(("http://", "https://")):
                raise EtcdError(f"etcd endpoint {e!r} is not a URL (like http://127.0.0.1:2379)")
        if (user is None) != (password is None):
            raise EtcdError("etcd authentication needs both a user and a password")
        if (cert is None) != (key is None):
            raise EtcdError("an etcd client certificate needs both its cert and key files")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        try:
            self._http = httpx.Client(timeout=timeout, verify=ca if ca else True,
                                      cert=(cert, key) if cert else None)
        except (OSError, ValueError) as e:  # (ssl's errors are OSErrors)
            raise EtcdError(f"etcd TLS files (ca {ca}, cert {cert}, key {key}): {e}") from None
        self._first = 0  # the endpoint that answered last
        self._user, self._password = user, password
        self._token: str | None = None  # etcd's auth token, while it holds

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, path: str, body: dict) -> dict:
        """POST `body` to `path` on the first endpoint that answers; etcd's JSON reply
        (authenticated first, and again once if etcd says the token expired)."""
        if self._user is None:
            return self._post(path, body)
        if self._token is None:
            self._authenticate()
        try:
            return self._post(path, body, self._token)
        except EtcdError as e:
            if "invalid auth token" not in str(e):
                raise
        self._authenticate()
        return self._post(path, body, self._token)

    def _authenticate(self) -> None:
        self._token = None
        data = self._post("/v3/auth/authenticate", {"name": self._user,
                                                    "password": self._password})
        if not data.get("token"):
            raise EtcdError(f"etcd gave user {self._user!r} no token: is authentication "
                            "enabled on it (etcdctl auth enable)?")
        self._token = data["token"]

    def _post(self, path: str, body: dict, token: str | None = None) -> dict:
        problems = []
        n = len(self.endpoints)
        for i in range(n):
            at = (self._first + i) % n
            url = self.endpoints[at] + path
            try:
                r = self._http.post(url, json=body,
                                    headers={"Authorization": token} if token else None)
            except httpx.HTTPError as e:
                problems.append(f"{self.endpoints[at]}: {e or type(e).__name__}")
                continue
            self._first = at
            try:
                data = r.json()
            except ValueError:
                raise EtcdError(f"etcd {url}: HTTP {r.status_code}, not JSON: "
                                f"{r.text[:200]!r}") from None
            if r.status_code != 200 or "error" in data:
                raise EtcdError(f"etcd {url}: {data.get('message') or data.get('error') or r.status_code}")
            return data
        raise EtcdUnavailable(f"etcd unreachable ({'; '.join(problems)}): is it running, and "
                              "is its client URL right?")

    # -- kv ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kvs = self._range({"key": _b64(key)})[1]
        return kvs[0] if kvs else None

    def prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(the store's revision, every key under `prefix`)."""
        return self._range({"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})

    def _range(self, body: dict) -> tuple[int, list[KeyValue]]:
        data = self.call("/v3/kv/range", body)
        return _revision(data), [_kv(kv) for kv in data.get("kvs", [])]

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Put; the revision of the put."""
        return _revision(self.call("/v3/kv/put", put_op(key, value, lease)["request_put"]))

    def delete(self, key: str) -> int:
        """Delete; how many keys went."""
        return int(self.call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        return int(self.call("/v3/kv/deleterange", {
            "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}).get("deleted", 0))

    def txn(self, compare: list[Compare], success: list[dict],
            failure: list[dict] | None = None) -> TxnResult:
        data = self.call("/v3/kv/txn", {"compare": [c.wire() for c in compare],
                                        "success": success, "failure": failure or []})
        return TxnResult(bool(data.get("succeeded", False)), _revision(data),
                         data.get("responses", []))

    # -- leases --------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (its id, the TTL etcd granted, seconds; it may raise a small one)."""
        data = self.call("/v3/lease/grant", {"TTL": str(int(ttl_s))})
        return int(data["ID"]), int(data.get("TTL", ttl_s))

    def keepalive(self, lease: int) -> int:
        """Renew `lease`; its TTL, 0 when it has expired (its keys are gone)."""
        data = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", data).get("TTL", 0))

    def time_to_live(self, lease: int) -> tuple[int, int]:
        """(whole seconds `lease` has left, -1 when expired; the TTL it was granted)."""
        data = self.call("/v3/kv/lease/timetolive", {"ID": str(lease)})
        return int(data.get("TTL", 0)), int(data.get("grantedTTL", 0))

    def revoke(self, lease: int) -> None:
        """End `lease` now (its keys are deleted); an expired one is not an error."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except EtcdError as e:
            if "not found" not in str(e):
                raise


def _b64(text: Any) -> str:
    raw = text if isinstance(text, bytes) else str(text).encode()
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode(errors="replace")


def _prefix_end(prefix: str) -> str:
    """The key just after every key starting with `prefix` (its last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return "\0"
    raw[-1] += 1
    return raw.decode(errors="surrogateescape")


def _revision(data: dict) -> int:
    return int(data.get("header", {}).get("revision", 0))


def _kv(kv: dict) -> KeyValue:
    return KeyValue(_unb64(kv.get("key")), _unb64(kv.get("value")),
                    int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                    int(kv.get("lease", 0)))

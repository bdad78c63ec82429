"""etcd v3 through its JSON gateway, over httpx under trio, with failover between endpoints.

Why this client: the Python gRPC clients do not fit the daemon (lab notes, docs/ha.md):
``etcd3`` is unmaintained and breaks with protobuf >= 4, ``etcd3gw`` is synchronous and
talks to one endpoint, ``aetcd`` is asyncio gRPC and does not run under trio. Every etcd v3
server also serves the same API as JSON over HTTP (``/v3/kv/txn``, ``/v3/kv/range``,
``/v3/kv/put``, ``/v3/kv/deleterange``, ``/v3/kv/compaction``, ``/v3/lease/grant``);
``httpx.AsyncClient`` runs natively under trio, and owning the endpoint loop lets us fail
over exactly as the nonce store needs.

Gateway facts this module handles: keys and values are base64; 64-bit numbers come back as
JSON strings; fields with default values are omitted (no ``succeeded`` on a failed compare,
no ``kvs`` for a missing key); during an election followers answer 503 or do not answer at
all, so such a request is retried on the next endpoint until an overall deadline.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from pqtunnel.errors import StoreDataError, StoreError, StoreUnavailableError

REQUEST_TIMEOUT = 1.0
"""One endpoint's chance to answer; a frozen or partitioned member must not hold us longer."""
DEADLINE = 8.0
"""All endpoints' chances together: longer than an etcd election (~2-3 s in the lab)."""
RETRY_PAUSE = (0.05, 0.5)
"""Pause between rounds over all endpoints, growing from the first to the second value."""


class EtcdRequestRefused(StoreError):
    """etcd answered, and refused the request itself (4xx): retrying it elsewhere cannot help."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise StoreDataError(f"etcd answered a {what} that is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise StoreDataError(f"etcd answered a {what} that is not base64") from None


def number(value: Any, what: str) -> int:
    """A gateway int64: a JSON string of digits (an omitted field means 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).lstrip("-").isdigit():
        raise StoreDataError(f"etcd answered a {what} that is not a number: {str(value)[:40]!r}")
    return int(value)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def kvs_of(range_response: dict[str, Any]) -> list[KeyValue]:
    """The key-values of a range response (none: the key does not exist)."""
    found = range_response.get("kvs", [])
    if not isinstance(found, list) or not all(isinstance(kv, dict) for kv in found):
        raise StoreDataError("etcd answered a range whose kvs is not a list of key-values")
    return [KeyValue(unb64(kv.get("key"), "key"), unb64(kv.get("value", ""), "value"),
                     number(kv.get("mod_revision"), "mod_revision"), number(kv.get("lease"), "lease"))
            for kv in found]


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    responses: list[dict[str, Any]]

    def range(self, index: int) -> list[KeyValue]:
        """The key-values of the ``index``-th operation, which must be a range."""
        try:
            response = self.responses[index]["response_range"]
        except (IndexError, KeyError, TypeError):
            raise StoreDataError("etcd answered a transaction without the range it was asked for") from None
        return kvs_of(response if isinstance(response, dict) else {})


class EtcdGateway:
    """POSTs JSON to the first endpoint that answers; the one that answered is tried first next time."""

    def __init__(self, endpoints: tuple[str, ...], *, request_timeout: float = REQUEST_TIMEOUT,
                 deadline: float = DEADLINE) -> None:
        if not endpoints:
            raise StoreError("etcd needs at least one endpoint")
        self.endpoints = endpoints
        self.deadline = deadline
        self._preferred = 0
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), trust_env=False)

    @property
    def preferred(self) -> str:
        """The endpoint asked first: the one that answered last."""
        return self.endpoints[self._preferred]

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer of one endpoint; StoreUnavailableError when none answered in time.

        Retrying a request on another endpoint after a timeout is only safe because every
        request this module makes is idempotent or a compare-and-swap whose retry cannot
        commit twice (docs/ha.md, "lost reply").
        """
        last = "no endpoint tried"
        pause = RETRY_PAUSE[0]
        with trio.move_on_after(self.deadline):
            while True:
                for offset in range(len(self.endpoints)):
                    index = (self._preferred + offset) % len(self.endpoints)
                    answer, last = await self._try(self.endpoints[index], path, body)
                    if answer is not None:
                        self._preferred = index
                        return answer
                await trio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE[1])
        raise StoreUnavailableError(f"etcd: no endpoint answered {path} within {self.deadline:g} s ({last})")

    async def _try(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """(answer, None) or (None, why this endpoint failed); a refusal of the request itself raises."""
        try:
            response = await self._client.post(endpoint + path, json=body)
        except httpx.TimeoutException:
            return None, f"{endpoint} timed out"
        except httpx.TransportError as exc:
            return None, f"{endpoint}: {type(exc).__name__}: {exc}"[:200]
        if response.status_code in (429, 500, 502, 503, 504):  # election, overload, no leader: elsewhere
            return None, f"{endpoint} answered {response.status_code} {_gateway_error(response)}"
        if response.status_code != 200:
            raise EtcdRequestRefused(f"etcd refused {path}: {response.status_code} {_gateway_error(response)}")
        try:
            answer = response.json()
        except ValueError:
            raise StoreDataError(f"etcd answered {path} with something that is not JSON") from None
        if not isinstance(answer, dict):
            raise StoreDataError(f"etcd answered {path} with JSON that is not an object")
        return answer, ""

    async def health(self) -> tuple[int, list[str]]:
        """How many endpoints report ``/health`` true now, and what the others said."""
        problems: list[str] = []
        healthy = 0

        async def probe(endpoint: str) -> None:
            nonlocal healthy
            try:
                response = await self._client.get(endpoint + "/health")
                ok = response.status_code == 200 and response.json().get("health") == "true"
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                problems.append(f"{endpoint}: {type(exc).__name__}")
                return
            if ok:
                healthy += 1
            else:
                problems.append(f"{endpoint}: unhealthy")

        async with trio.open_nursery() as nursery:
            for endpoint in self.endpoints:
                nursery.start_soon(probe, endpoint)
        return healthy, sorted(problems)

    # --- the v3 operations the nonce store uses -------------------------------------------------------

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]]) -> TxnResult:
        answer = await self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})
        responses = answer.get("responses", [])
        if not isinstance(responses, list):
            raise StoreDataError("etcd answered a transaction whose responses are not a list")
        return TxnResult(answer.get("succeeded") is True, responses)

    async def range(self, key: bytes) -> list[KeyValue]:
        return kvs_of(await self.call("/v3/kv/range", {"key": b64(key)}))

    async def delete(self, key: bytes) -> int:
        return number((await self.call("/v3/kv/deleterange", {"key": b64(key)})).get("deleted"), "deleted")

    async def put(self, key: bytes, value: bytes) -> None:
        await self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    async def keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        """Every key that starts with ``prefix`` (a non-empty prefix), sorted; no values."""
        range_end = prefix[:-1] + bytes([prefix[-1] + 1])  # our prefixes end in printable ASCII
        answer = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(range_end), "keys_only": True})
        return sorted(kv.key for kv in kvs_of(answer))

    async def revision(self) -> int:
        """The cluster's current revision (a linearizable read: every commit before it is included)."""
        answer = await self.call("/v3/kv/range", {"key": b64(b"\0"), "count_only": True})
        header = answer.get("header")
        revision = number(header.get("revision") if isinstance(header, dict) else None, "revision")
        if revision <= 0:
            raise StoreDataError("etcd answered a range without the cluster's revision")
        return revision

    async def compact(self, revision: int) -> None:
        """Drop every key version older than ``revision`` from history, on disk before it returns
        (physical). Already compacted that far (another replica did): nothing left to do."""
        try:
            await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        except EtcdRequestRefused as exc:
            if "required revision has been compacted" not in str(exc):
                raise

    async def grant_lease(self, ttl_s: float) -> tuple[int, int]:
        """A new etcd lease: (id, granted TTL in seconds)."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(math.ceil(ttl_s))})
        lease_id, ttl = number(answer.get("ID"), "lease ID"), number(answer.get("TTL"), "lease TTL")
        if lease_id <= 0 or ttl <= 0:
            raise StoreError(f"etcd did not grant a lease: {str(answer.get('error', answer))[:120]}")
        return lease_id, ttl


def _gateway_error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", ""))[:120]
    except (ValueError, AttributeError):
        return response.text[:120]

"""Spec for reading etcd's JSON gateway answers (daemon/etcd.py), without a cluster.

The quirks (lab notes): keys and values are base64, 64-bit numbers are JSON strings, and
fields with default values are left out (no ``succeeded`` on a failed compare, no ``kvs``
for a missing key). Anything else is refused as data we cannot trust.
"""

from __future__ import annotations

import pytest

from pqtunnel.errors import StoreDataError
from pqtunneld.etcd import TxnResult, b64, kvs_of, number, unb64

FAILED_COMPARE = {  # a real answer of etcd 3.4.23 to a txn whose compare failed on an existing key
    "header": {"cluster_id": "7064108435156676309", "member_id": "17816417458783192821", "revision": "2"},
    "responses": [{"response_range": {"header": {"revision": "2"}, "kvs": [
        {"key": "L3gvaw==", "create_revision": "2", "mod_revision": "2", "version": "1", "value": "djE="}],
        "count": "1"}}],
}


def test_a_failed_compare_has_no_succeeded_field_and_carries_the_current_value() -> None:
    result = TxnResult(FAILED_COMPARE.get("succeeded") is True, FAILED_COMPARE["responses"])
    assert not result.succeeded
    (kv,) = result.range(0)
    assert (kv.key, kv.value, kv.mod_revision, kv.lease) == (b"/x/k", b"v1", 2, 0)


def test_a_missing_key_is_a_range_without_kvs() -> None:
    assert kvs_of({"header": {"revision": "3"}}) == []
    assert TxnResult(False, [{"response_range": {"header": {}}}]).range(0) == []


def test_numbers_are_strings_and_omitted_numbers_are_zero() -> None:
    assert number("18446744073709551615", "x") == 2**64 - 1
    assert number(None, "x") == 0
    for bad in ("12a", "", True, 1.5, [], "1e3"):
        with pytest.raises(StoreDataError):
            number(bad, "x")


def test_keys_and_values_are_base64_and_anything_else_is_refused() -> None:
    assert unb64(b64(b"\x00\xffkey"), "key") == b"\x00\xffkey"
    for bad in ("not base64!", 5, None):
        with pytest.raises(StoreDataError):
            unb64(bad, "value")


@pytest.mark.parametrize("responses", [[], [{"response_put": {}}], ["x"], [{"response_range": {"kvs": "x"}}]])
def test_a_transaction_answer_without_the_expected_range_is_refused(responses: list) -> None:
    with pytest.raises(StoreDataError):
        TxnResult(False, responses).range(0)

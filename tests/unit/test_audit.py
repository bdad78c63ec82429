"""The audit chain (pqtunnel/audit.py): the line format, what verification catches, the report.

Chains are built in memory exactly as the daemon writes them (``encode_line``), split into
"files" where a rotation would split them, then damaged the way an attacker or a crash would.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunnel import audit
from pqtunnel.audit import RawLine, build_report, decode_line, encode_line, split_lines, verify
from pqtunnel.events import HandshakeFailed, PeerUnreachable, SessionDown, SessionUp, StreamAllowed, StreamDenied
from pqtunnel.events import Fault
from pqtunnel.mux import ErrorCode
from pqtunnel.policy import PeerRequest, Policy, StreamRequest

pytestmark = pytest.mark.unit

ANCHOR = "a5" * 32
HYBRID = {"suite": "hybrid", "kem": "X25519+ML-KEM-768", "signature": "Ed25519+ML-DSA-65", "aead": "chacha20-poly1305"}
STRONG = {"suite": "pq-strong", "kem": "X25519+ML-KEM-1024", "signature": "Ed25519+ML-DSA-87", "aead": "aes-256-gcm"}
CLASSICAL = {"suite": "classical", "kem": "X25519", "signature": "Ed25519", "aead": "chacha20-poly1305"}


def records(n: int) -> list[dict]:
    """A chain's records: the opening line, then ``n - 1`` stream events."""
    opened = {"ts": "2026-12-01T10:00:00.000Z", "event": "audit_opened", "chain": "new", "node": "bob",
              "fingerprint": "pq1:bob"}
    return [opened] + [{"ts": f"2026-12-01T10:00:{i:02d}.000Z", "event": "stream_allowed", "peer": "alice",
                        "stream_id": i, "service": "web", "rule": "service:web", "decision": "allow"}
                       for i in range(1, n)]


def chain_bytes(recs: list[dict], anchor: str = ANCHOR) -> list[bytes]:
    """The stored lines (each ending in a newline) of ``recs`` chained from ``anchor``."""
    lines, prev = [], anchor
    for record in recs:
        line, prev = encode_line(record, prev)
        lines.append(line)
    return lines


def as_files(lines: list[bytes], *sizes: int) -> list[RawLine]:
    """Split stored lines into rotated files of the given line counts (the rest in the last),
    named like the daemon names them, oldest first."""
    names = [f"audit.jsonl.{i}" for i in range(len(sizes), 0, -1)] + ["audit.jsonl"]
    raws, start = [], 0
    for name, size in zip(names, [*sizes, len(lines)]):
        raws += split_lines(name, b"".join(lines[start:start + size]))
        start += size
    return raws


# --- the line format --------------------------------------------------------------------------------


def test_a_line_is_the_canonical_body_with_its_sha256_inserted_last() -> None:
    line, digest = encode_line({"ts": "2026-12-01T10:00:00.000Z", "event": "x", "peer": "bob"}, ANCHOR)
    body = ('{"event":"x","peer":"bob","prev":"' + ANCHOR + '","ts":"2026-12-01T10:00:00.000Z"}').encode()
    assert digest == hashlib.sha256(body).hexdigest()
    assert line == body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def test_the_body_is_ascii_with_sorted_keys_and_no_spaces() -> None:
    line, _ = encode_line({"z": 1, "a": "crème", "m": [1, 2]}, ANCHOR)
    assert line.decode("ascii").startswith('{"a":"cr\\u00e8me","m":[1,2],"prev":')


def test_decoding_gives_back_the_record_prev_and_hash() -> None:
    line, digest = encode_line({"event": "x", "bytes_in": 7}, ANCHOR)
    decoded = decode_line(line.rstrip(b"\n"))
    assert decoded.hash == digest and decoded.hash_ok
    assert decoded.fields == {"event": "x", "bytes_in": 7, "prev": ANCHOR}


@pytest.mark.parametrize("record", [{"prev": ANCHOR}, {"hash": "x"}])
def test_a_record_cannot_carry_the_chain_fields(record: dict) -> None:
    with pytest.raises(ValueError):
        encode_line(record, ANCHOR)


def test_the_same_record_after_the_same_line_always_encodes_the_same() -> None:
    assert chain_bytes(records(5)) == chain_bytes(records(5))


def test_different_anchors_give_different_chains() -> None:
    assert chain_bytes(records(3), "00" * 32)[-1] != chain_bytes(records(3), "11" * 32)[-1]


def test_anchors_are_256_random_bits() -> None:
    first, second = audit.new_anchor(), audit.new_anchor()
    assert len(first) == 64 and first != second


# --- verification -----------------------------------------------------------------------------------


def test_an_intact_chain_verifies_and_reports_its_anchor_and_last_hash() -> None:
    lines = chain_bytes(records(6))
    result = verify(as_files(lines))
    assert result.ok and result.lines == 6
    assert result.anchor == ANCHOR
    assert result.last_hash == json.loads(lines[-1])["hash"]


def test_a_chain_spans_rotated_files_in_order() -> None:
    result = verify(as_files(chain_bytes(records(9)), 3, 4))
    assert result.ok and result.lines == 9


def test_an_empty_chain_verifies_with_nothing_to_show() -> None:
    result = verify([])
    assert result.ok and result.lines == 0 and result.last_hash is None


def test_an_edited_line_is_named_as_changed() -> None:
    lines = chain_bytes(records(6))
    lines[3] = lines[3].replace(b'"peer":"alice"', b'"peer":"mallory"')
    problem = verify(as_files(lines)).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl", 4, "changed")


def test_an_edited_line_in_a_rotated_file_is_named_in_that_file() -> None:
    lines = chain_bytes(records(9))
    lines[1] = lines[1].replace(b'"stream_id":1', b'"stream_id":7')
    problem = verify(as_files(lines, 3, 4)).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl.2", 2, "changed")


def test_an_edited_line_with_a_recomputed_hash_breaks_the_link_after_it() -> None:
    recs = records(6)
    lines = chain_bytes(recs)
    forged = dict(recs[2], peer="mallory")
    lines[2], _ = encode_line(forged, json.loads(lines[1])["hash"])
    problem = verify(as_files(lines)).problem
    assert problem is not None and problem.number == 4 and problem.kind == "removed"


def test_an_inserted_line_is_named_as_inserted() -> None:
    lines = chain_bytes(records(6))
    forged, _ = encode_line({"event": "stream_allowed", "peer": "mallory"}, json.loads(lines[2])["hash"])
    lines.insert(3, forged)
    problem = verify(as_files(lines)).problem
    assert problem is not None and (problem.number, problem.kind) == (4, "inserted")


def test_a_deleted_line_is_named_by_the_line_that_lost_its_predecessor() -> None:
    lines = chain_bytes(records(6))
    del lines[2]
    problem = verify(as_files(lines)).problem
    assert problem is not None and (problem.number, problem.kind) == (3, "removed")


def test_deleting_the_first_lines_is_detected() -> None:
    problem = verify(as_files(chain_bytes(records(6))[2:])).problem
    assert problem is not None and (problem.number, problem.kind) == (1, "removed")


def test_a_deleted_rotated_file_is_detected() -> None:
    raws = as_files(chain_bytes(records(9)), 3, 4)
    without_middle = [raw for raw in raws if raw.source != "audit.jsonl.1"]
    problem = verify(without_middle).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl", 1, "removed")


def test_deleting_the_oldest_rotated_file_is_detected() -> None:
    raws = as_files(chain_bytes(records(9)), 3, 4)
    problem = verify([raw for raw in raws if raw.source != "audit.jsonl.2"]).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl.1", 1, "removed")


def test_two_swapped_lines_are_named_as_reordered() -> None:
    lines = chain_bytes(records(6))
    lines[2], lines[3] = lines[3], lines[2]
    problem = verify(as_files(lines)).problem
    assert problem is not None and (problem.number, problem.kind) == (3, "reordered")


def test_rotated_files_verified_in_the_wrong_order_are_caught() -> None:
    raws = as_files(chain_bytes(records(9)), 3, 4)
    newer_first = [r for r in raws if r.source == "audit.jsonl.1"] + [r for r in raws if r.source != "audit.jsonl.1"]
    assert not verify(newer_first).ok


def test_a_truncated_last_line_is_named_as_truncated() -> None:
    data = b"".join(chain_bytes(records(4)))[:-30]
    problem = verify(split_lines("audit.jsonl", data)).problem
    assert problem is not None and (problem.number, problem.kind) == (4, "truncated")


def test_a_last_line_that_lost_only_its_newline_is_truncated() -> None:
    data = b"".join(chain_bytes(records(4)))[:-1]
    problem = verify(split_lines("audit.jsonl", data)).problem
    assert problem is not None and (problem.number, problem.kind) == (4, "truncated")


def test_a_truncated_line_inside_a_rotated_file_is_truncated_there() -> None:
    lines = chain_bytes(records(6))
    raws = split_lines("audit.jsonl.1", b"".join(lines[:3])[:-10]) + split_lines("audit.jsonl", b"".join(lines[3:]))
    problem = verify(raws).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl.1", 3, "truncated")


def test_a_line_that_is_not_an_audit_line_is_changed() -> None:
    lines = chain_bytes(records(4))
    lines[1] = b'{"event":"stream_allowed"}\n'
    problem = verify(as_files(lines)).problem
    assert problem is not None and (problem.number, problem.kind) == (2, "changed")


def test_removing_the_last_line_cannot_be_seen_without_an_external_anchor() -> None:
    """What the chain does not prove (docs/audit.md): the tail, unless its hash was shipped off-host."""
    lines = chain_bytes(records(6))
    shortened = verify(as_files(lines[:-1]))
    assert shortened.ok
    assert shortened.last_hash != verify(as_files(lines)).last_hash


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_line_modification_is_detected(data: st.DataObject) -> None:
    lines = chain_bytes(records(5))
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    original = lines[index].rstrip(b"\n")
    replacement = data.draw(st.binary(max_size=len(original) + 8).filter(lambda b: b"\n" not in b and b != original),
                            label="replacement")
    lines[index] = replacement + b"\n"
    problem = verify(as_files(lines, 2)).problem
    assert problem is not None
    first_line_of_current = 2
    expected = ("audit.jsonl.1", index + 1) if index < first_line_of_current else ("audit.jsonl", index - 1)
    assert (problem.source, problem.number) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_detected_at_its_line(data: st.DataObject) -> None:
    lines = chain_bytes(records(4))
    index = data.draw(st.integers(0, len(lines) - 1))
    position = data.draw(st.integers(0, len(lines[index]) - 2))  # not the newline
    bit = data.draw(st.integers(0, 7))
    changed = bytearray(lines[index])
    changed[position] ^= 1 << bit
    if b"\n" in changed[:-1]:
        return  # that would split one line into two: a different modification
    lines[index] = bytes(changed)
    problem = verify(as_files(lines)).problem
    assert problem is not None and problem.number == index + 1


# --- records from events -----------------------------------------------------------------------------


def test_a_session_event_becomes_a_record_with_its_algorithms_and_decision() -> None:
    event = SessionUp("alice", "pq1:a", "127.0.0.1:5000", "inbound", "5e55", "hybrid", "X25519+ML-KEM-768",
                      "Ed25519+ML-DSA-65", "chacha20-poly1305", "pinned")
    record = audit.record_for(event, "2026-12-01T10:00:00.000Z")
    assert record == {"ts": "2026-12-01T10:00:00.000Z", "event": "session_up", "peer": "alice",
                      "fingerprint": "pq1:a", "addr": "127.0.0.1:5000", "direction": "inbound", "session_id": "5e55",
                      **HYBRID, "trust": "pinned", "decision": "allow"}


def test_a_denied_stream_records_its_rule_and_target_and_leaves_out_unknowns() -> None:
    event = StreamDenied("alice", "pq1:a", 3, "port 9", "default-deny", "port 9 is not allowed", port=9,
                         addr="127.0.0.1:5000", **HYBRID)
    record = audit.record_for(event, "t")
    assert record is not None
    assert record["decision"] == "deny" and record["rule"] == "default-deny" and record["port"] == 9
    assert "service" not in record and record["kem"] == "X25519+ML-KEM-768"


def test_a_session_down_event_carries_bytes_duration_and_algorithms() -> None:
    event = SessionDown("alice", "pq1:a", "127.0.0.1:5000", "5e55", "peer closed", 100, 200, 1.5, "inbound", **HYBRID)
    record = audit.record_for(event, "t")
    assert record is not None and (record["bytes_in"], record["bytes_out"], record["duration"]) == (100, 200, 1.5)
    assert record["suite"] == "hybrid" and record["aead"] == "chacha20-poly1305"


def test_a_handshake_refused_by_a_rule_is_a_deny_and_a_network_failure_is_not() -> None:
    failure = HandshakeFailed("bob", "10.0.0.2:7330", "outbound", "connection lost", Fault.NETWORK)
    record = audit.record_for(failure, "t")
    assert record is not None and "decision" not in record and record["fault"] == "network"


def test_a_handshake_refused_by_a_rule_names_the_rule_and_the_fingerprint() -> None:
    refusal = HandshakeFailed("unknown peer", "10.0.0.9:4000", "inbound", "peer pq1:m is not pinned", Fault.PEER,
                              fingerprint="pq1:m", suite="hybrid", rule="default-deny")
    record = audit.record_for(refusal, "t")
    assert record is not None and (record["decision"], record["rule"], record["fingerprint"]) == \
        ("deny", "default-deny", "pq1:m")


def test_dial_failures_are_not_audited() -> None:
    assert audit.record_for(PeerUnreachable("bob", "10.0.0.2:7330", "refused"), "t") is None


def test_stream_events_keep_their_log_messages() -> None:
    event = StreamAllowed("alice", "pq1:a", 1, "service web", "service:web", service="web", **HYBRID)
    assert event.message() == "stream 1: alice -> service web allowed (service:web)"


# --- the required-audit rule -----------------------------------------------------------------------


def test_a_required_audit_that_cannot_be_written_refuses_sessions_and_streams() -> None:
    reason = "audit log /x cannot be written (No space left on device) and [audit] required = true"
    rule = audit.audit_required_rule(lambda: reason)
    policy = Policy("bob", pins={"alice": "pq1:a"}, services={"web": "127.0.0.1:80"},
                    extra_rules={PeerRequest: [rule], StreamRequest: [rule]})
    peer = policy.decide(PeerRequest(fingerprint="pq1:a", now=0, dialled="alice"))
    stream = policy.decide(StreamRequest(peer="alice", target={"service": "web"}))
    assert not peer.allowed and peer.rule == "audit-required" and "No space left" in peer.reason
    assert not stream.allowed and stream.rule == "audit-required" and stream.code == ErrorCode.NOT_ALLOWED


def test_a_writable_audit_leaves_every_decision_to_the_other_rules() -> None:
    rule = audit.audit_required_rule(lambda: None)
    policy = Policy("bob", pins={"alice": "pq1:a"}, services={"web": "127.0.0.1:80"},
                    extra_rules={PeerRequest: [rule], StreamRequest: [rule]})
    assert policy.decide(PeerRequest(fingerprint="pq1:a", now=0, dialled="alice")).rule == "pin:alice"
    assert policy.decide(StreamRequest(peer="alice", target={"service": "web"})).rule == "service:web"


# --- the report --------------------------------------------------------------------------------------


def session(sid: str, peer: str, algorithms: dict, bytes_in: int, bytes_out: int, ended: bool = True) -> list[dict]:
    up = {"event": "session_up", "ts": f"2026-12-01T10:{sid}:00.000Z", "session_id": sid, "peer": peer,
          "fingerprint": f"pq1:{peer}", "addr": "10.0.0.9:7330", "decision": "allow", **algorithms}
    down = {"event": "session_down", "ts": f"2026-12-01T11:{sid}:00.000Z", "session_id": sid, "peer": peer,
            "fingerprint": f"pq1:{peer}", "bytes_in": bytes_in, "bytes_out": bytes_out, "duration": 60.0, **algorithms}
    return [up, down] if ended else [up]


def test_the_report_counts_sessions_and_bytes_per_kem_signature_and_aead() -> None:
    report = build_report(session("01", "alice", HYBRID, 100, 50) + session("02", "alice", HYBRID, 10, 0)
                          + session("03", "carol", STRONG, 1000, 0))
    assert report["sessions"] == 3 and report["bytes"] == 1160
    assert report["by_kem"] == {"X25519+ML-KEM-1024": {"sessions": 1, "bytes": 1000},
                                "X25519+ML-KEM-768": {"sessions": 2, "bytes": 160}}
    assert report["by_signature"]["Ed25519+ML-DSA-65"] == {"sessions": 2, "bytes": 160}
    assert report["by_aead"] == {"aes-256-gcm": {"sessions": 1, "bytes": 1000},
                                 "chacha20-poly1305": {"sessions": 2, "bytes": 160}}
    assert report["post_quantum"]["share_of_bytes"] == 100.0 and report["legacy_sessions"] == []


def test_the_report_names_legacy_sessions_and_peers_never_seen_with_pq() -> None:
    report = build_report(session("01", "alice", HYBRID, 300, 0) + session("02", "dave", CLASSICAL, 100, 0)
                          + session("03", "erin", CLASSICAL, 0, 0) + session("04", "erin", HYBRID, 0, 0))
    assert report["post_quantum"] == {"sessions": 2, "bytes": 300, "share_of_sessions": 50.0, "share_of_bytes": 75.0}
    assert [(row["peer"], row["suite"]) for row in report["legacy_sessions"]] == [("dave", "classical"),
                                                                                  ("erin", "classical")]
    assert report["peers_never_post_quantum"] == [{"peer": "dave", "sessions": 1, "fingerprints": ["pq1:dave"]}]


def test_the_report_counts_denials_by_rule_and_streams_by_outcome() -> None:
    recs = [{"event": "stream_allowed", "decision": "allow", "rule": "service:web"},
            {"event": "stream_denied", "decision": "deny", "rule": "default-deny"},
            {"event": "stream_denied", "decision": "deny", "rule": "unknown-service"},
            {"event": "stream_denied", "decision": "deny", "rule": "default-deny"},
            {"event": "stream_closed"},
            {"event": "handshake_failed", "decision": "deny", "rule": "audit-required"}]
    report = build_report(recs)
    assert report["denials"] == {"total": 4, "by_rule": {"audit-required": 1, "default-deny": 2, "unknown-service": 1}}
    assert report["streams"] == {"allowed": 1, "denied": 3, "closed": 1}
    assert report["handshakes_failed"] == 1


def test_a_session_still_up_counts_with_the_algorithms_of_its_start() -> None:
    report = build_report(session("01", "alice", STRONG, 0, 0, ended=False))
    assert report["sessions"] == 1 and report["by_suite"] == {"pq-strong": {"sessions": 1, "bytes": 0}}
    assert report["post_quantum"]["share_of_bytes"] is None  # no bytes yet: no share to speak of


def test_the_report_counts_policies_loaded_and_refused_by_reloads() -> None:
    recs = [{"event": "config_reloaded", "ok": True, "policy": "2 grants"},
            {"event": "config_reloaded", "ok": False, "reason": "policy test 1 failed"},
            {"event": "config_reloaded", "ok": True, "policy": "3 grants"}]
    assert build_report(recs)["reloads"] == {"applied": 2, "refused": 1}


def test_the_report_sums_lost_events_from_gap_records_and_spans_the_period() -> None:
    recs = [{"event": "audit_opened", "ts": "2026-12-01T10:00:00.000Z"},
            {"event": "audit_gap", "ts": "2026-12-01T10:05:00.000Z", "lost": 3},
            {"event": "audit_gap", "ts": "2026-12-01T10:09:00.000Z", "lost": 2}]
    report = build_report(recs)
    assert report["lost_events"] == 5
    assert (report["first"], report["last"]) == ("2026-12-01T10:00:00.000Z", "2026-12-01T10:09:00.000Z")


# --- the documentation's worked example is a real, intact chain ------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


def test_the_worked_example_in_the_docs_verifies_and_its_numbers_match() -> None:
    text = DOC.read_text()
    example = text[text.index("## Worked example"):]
    stored = re.search(r"```\n(.*?)\n```", example, re.S).group(1).encode() + b"\n"
    result = verify(split_lines("audit.jsonl", stored))
    assert result.ok and f"chain intact: {result.lines} line(s)" in example
    assert f"last hash {result.last_hash}" in example and f'"last_hash": "{result.last_hash}"' in example
    records = [decode_line(line).fields for line in stored.splitlines()]
    report = build_report(records)
    assert f"post-quantum: 1 of 2 session(s) ({report['post_quantum']['share_of_sessions']:g} %)" in example
    assert f"sessions: {report['sessions']}, {report['bytes']} B" in example


def test_the_format_example_in_the_docs_hashes_as_stated() -> None:
    text = DOC.read_text()
    body, line = re.search(r"has this body.*?```\n(.*?)\n```.*?stored line is\s*```\n(.*?)\n```", text, re.S).groups()
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert f"`{digest}`" in text and f"{len(body.encode())} bytes" in text
    assert line.encode() == body.encode()[:-1] + b',"hash":"' + digest.encode() + b'"}'

"""Transition records: classical trust (SSH host keys) handed over to a hybrid identity.

A record says "the holder of classical key K is node NAME with hybrid identity FP, from T1
until T2". It is signed twice over the same body: by the classical private key (proof of
possession: whoever a peer already trusts through K vouches for FP) and by the node's
hybrid identity (Ed25519 + ML-DSA-65: FP agrees to be bound to NAME and K). The record
carries the identity's public keys, so it verifies on its own whatever suite the handshake
uses; the policy then checks that FP is the identity that signed the handshake and that a
legacy anchor (a known_hosts entry) lists K for NAME. Layout: docs/PROTOCOL.md, "Transition
records".

Sans-IO: keys come in as ``cryptography`` key objects; reading files is the daemon's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .crypto import backend as prim
from .crypto.suites import HYBRID
from .errors import MigrationError, TransitionError
from .identity import MLDSA_CONTEXT, PQ_ALGORITHMS, Identity, fingerprint_from_parts
from .names import validate_name

CLASSICAL_LABEL = b"pqtunnel/1 transition classical\x00"
HYBRID_LABEL = b"pqtunnel/1 transition hybrid\x00"
MAX_TRANSITION = 12 * 1024
"""Bound on an encoded record, as carried in a handshake (an RSA-4096 key and signature plus
the ML-DSA-65 key and signature take about 6.5 KiB; an X.509 chain of a few certificates fits
in the rest)."""
MAX_CHAIN = 4
MIN_RSA_BITS = 2048
KINDS = ("ssh", "x509")

ClassicalPrivateKey = Union[ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
ClassicalPublicKey = Union[ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey]
_CURVE_HASHES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}


@dataclass(frozen=True)
class TransitionRecord:
    """A decoded record; ``signature`` holds ``classical``, ``ed`` and ``pq`` over ``body``."""

    kind: str
    name: str
    fingerprint: str
    classical_key: bytes
    not_before: int
    not_after: int
    body: bytes = field(repr=False)
    signature: dict[str, bytes] = field(repr=False, compare=False)
    ed25519: bytes = field(repr=False, default=b"")
    pq_key_hashes: dict[str, bytes] = field(repr=False, default_factory=dict, compare=False)
    mldsa65: bytes = field(repr=False, default=b"")
    chain: tuple[bytes, ...] = field(repr=False, default=(), compare=False)
    """kind x509: the DER certificates, leaf first (unsigned here: they verify to a CA)."""

    def encode(self) -> bytes:
        outer: dict[str, Any] = {"body": self.body, "sig": self.signature}
        if self.chain:
            outer["chain"] = list(self.chain)
        return msgpack.packb(outer, use_bin_type=True)

    def public_key(self) -> ClassicalPublicKey:
        """K as a key object (the body holds its DER SubjectPublicKeyInfo)."""
        return load_classical_public(self.classical_key)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint,
                "classical_key": classical_fingerprint(self.classical_key),
                "not_before": self.not_before, "not_after": self.not_after}


def classical_fingerprint(spki: bytes) -> str:
    """A short name for a classical key in messages: SHA-256 of its SubjectPublicKeyInfo."""
    return "spki-sha256:" + prim.sha256(spki).hex()[:32]


def spki_of(key: ClassicalPublicKey) -> bytes:
    """The canonical bytes of a classical public key (DER SubjectPublicKeyInfo)."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_classical_public(spki: bytes) -> ClassicalPublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError) as exc:
        raise TransitionError(f"transition record key is malformed ({type(exc).__name__})") from None
    try:
        check_classical_key(key)
    except MigrationError as exc:
        raise TransitionError(f"transition record key: {exc}") from None
    return key  # type: ignore[return-value]


def check_classical_key(key: Any) -> None:
    """Only keys a transition may rest on: Ed25519, ECDSA P-256/P-384, RSA >= 2048 bits.

    DSA and short RSA are breakable classically already; vouching with them proves nothing.
    """
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name not in _CURVE_HASHES:
            raise MigrationError(f"ECDSA curve {key.curve.name} is not supported (P-256 or P-384)")
        return
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < MIN_RSA_BITS:
            raise MigrationError(f"RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS})")
        return
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "")
    raise MigrationError(f"{kind} keys are not supported "
                          "(Ed25519, ECDSA P-256/P-384 or RSA >= 2048)")


def _classical_sign(key: ClassicalPrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_CURVE_HASHES[key.curve.name]()))
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def _classical_verify(key: ClassicalPublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(_CURVE_HASHES[key.curve.name]()))
        else:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def _body(kind: str, name: str, identity: Identity, spki: bytes, not_before: int, not_after: int) -> bytes:
    public = identity.public
    return msgpack.packb({"v": 1, "kind": kind, "name": name, "fp": identity.fingerprint, "key": spki,
                          "nb": not_before, "na": not_after, "ed": public.ed25519,
                          "h": public.pq_key_hashes, "pq": public.pq_keys["ML-DSA-65"]}, use_bin_type=True)


def make_transition(identity: Identity, classical: ClassicalPrivateKey, backend: prim.CryptographyBackend, *,
                    kind: str, not_before: int, not_after: int, name: str | None = None,
                    chain: tuple[bytes, ...] = ()) -> TransitionRecord:
    """Sign a record binding ``classical`` to ``identity`` (under the identity's name by default)."""
    if kind not in KINDS:
        raise MigrationError(f"unknown transition kind {kind!r}")
    check_classical_key(classical)
    if not_after <= not_before:
        raise MigrationError("transition validity must end after it starts")
    name = validate_name(name or identity.name, "node name")
    spki = spki_of(classical.public_key())
    body = _body(kind, name, identity, spki, not_before, not_after)
    signature = {"classical": _classical_sign(classical, CLASSICAL_LABEL + body),
                 **identity.sign(backend, HYBRID, HYBRID_LABEL + body)}
    outer: dict[str, Any] = {"body": body, "sig": signature}
    if chain:
        outer["chain"] = list(chain)
    encoded = msgpack.packb(outer, use_bin_type=True)
    if len(encoded) > MAX_TRANSITION:
        raise MigrationError(f"the transition record would take {len(encoded)} bytes (at most {MAX_TRANSITION}): "
                             "use a smaller classical key")
    return decode_transition(encoded)


def decode_transition(data: Any) -> TransitionRecord:
    """Parse (not verify) a record; any malformation is a TransitionError."""
    if not isinstance(data, bytes) or len(data) > MAX_TRANSITION:
        raise TransitionError("transition record is missing or too large")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
        body = outer["body"]
        inner = msgpack.unpackb(body, raw=False, strict_map_key=True)
        record = TransitionRecord(kind=inner["kind"], name=inner["name"], fingerprint=inner["fp"],
                                  classical_key=inner["key"], not_before=inner["nb"], not_after=inner["na"],
                                  body=body, signature=outer["sig"], ed25519=inner["ed"],
                                  pq_key_hashes=inner["h"], mldsa65=inner["pq"],
                                  chain=tuple(outer.get("chain", ())))
    except Exception as exc:  # msgpack and shape errors come in many types
        raise TransitionError(f"transition record is malformed ({type(exc).__name__})") from None
    _check_shape(record, inner)
    return record


def _check_shape(record: TransitionRecord, inner: dict[str, Any]) -> None:
    if inner.get("v") != 1 or record.kind not in KINDS:
        raise TransitionError("transition record has an unknown version or kind")
    if not isinstance(record.name, str) or not isinstance(record.fingerprint, str):
        raise TransitionError("transition record name or fingerprint is malformed")
    if not all(isinstance(v, int) for v in (record.not_before, record.not_after)):
        raise TransitionError("transition record validity is malformed")
    if not all(isinstance(v, bytes) for v in (record.classical_key, record.ed25519, record.mldsa65)):
        raise TransitionError("transition record keys are malformed")
    hashes_ok = isinstance(record.pq_key_hashes, dict) and set(record.pq_key_hashes) == set(PQ_ALGORITHMS)
    if not hashes_ok or not all(isinstance(v, bytes) and len(v) == 32 for v in record.pq_key_hashes.values()):
        raise TransitionError("transition record key hashes are malformed")
    if len(record.ed25519) != prim.ED25519_KEY_SIZE or len(record.mldsa65) != prim.PQ_PUBLIC_KEY_SIZES["ML-DSA-65"]:
        raise TransitionError("transition record identity keys have the wrong size")
    if len(record.chain) > MAX_CHAIN or not all(isinstance(c, bytes) for c in record.chain):
        raise TransitionError("transition record certificate chain is malformed")
    sig = record.signature
    if not isinstance(sig, dict) or not all(isinstance(sig.get(k), bytes) for k in ("classical", "ed", "pq")):
        raise TransitionError("transition record signatures are malformed")


def transition_kind(data: Any) -> str:
    """The kind a record claims (for naming the rule that refuses it); "ssh" when unreadable."""
    try:
        return decode_transition(data).kind
    except TransitionError:
        return "ssh"


def verify_transition(data: Any, presented_fingerprint: str, now: int,
                      backend: prim.CryptographyBackend) -> TransitionRecord:
    """The record, if it binds its key to exactly the identity that signed this handshake now.

    Checks: the identity keys in the body hash to FP and FP is the presented fingerprint;
    both hybrid halves and the classical signature verify; now is within [T1, T2); the name
    is canonical. Whether K is trusted for the name is the caller's question (anchors).
    """
    record = decode_transition(data)
    if prim.sha256(record.mldsa65) != record.pq_key_hashes["ML-DSA-65"]:
        raise TransitionError("transition record ML-DSA-65 key does not match its hash")
    if fingerprint_from_parts(record.ed25519, record.pq_key_hashes) != record.fingerprint:
        raise TransitionError("transition record identity keys do not match its fingerprint")
    if record.fingerprint != presented_fingerprint:
        raise TransitionError(f"transition record for {record.name} belongs to {record.fingerprint}, "
                              f"not {presented_fingerprint}")
    _verify_signatures(record, backend)
    if now < record.not_before:
        raise TransitionError(f"transition record for {record.name} is not valid yet")
    if now >= record.not_after:
        raise TransitionError(f"transition record for {record.name} expired")
    try:
        canonical = validate_name(record.name) == record.name
    except Exception:
        canonical = False
    if not canonical:
        raise TransitionError("transition record name is not a canonical node name")
    return record


def _verify_signatures(record: TransitionRecord, backend: prim.CryptographyBackend) -> None:
    hybrid_message = HYBRID_LABEL + record.body
    if not (prim.ed25519_verify(record.ed25519, record.signature["ed"], hybrid_message)
            and backend.mldsa_verify("ML-DSA-65", record.mldsa65, record.signature["pq"], hybrid_message,
                                     MLDSA_CONTEXT)):
        raise TransitionError(f"transition record for {record.name} has an invalid hybrid signature")
    if not _classical_verify(record.public_key(), record.signature["classical"], CLASSICAL_LABEL + record.body):
        raise TransitionError(f"transition record for {record.name} is not signed by its classical key")

"""Named cipher suites and AEADs that the handshake negotiates.

A suite fixes the key exchange (X25519, plus ML-KEM for post-quantum secrecy) and the
signatures that authenticate both ends (Ed25519, plus ML-DSA for post-quantum
authentication). Suites are ranked so that a policy can say "at least hybrid".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from ..errors import ConfigError


@dataclass(frozen=True)
class Suite:
    """One negotiable suite; ``wire_id`` is what travels in the handshake."""

    name: str
    wire_id: int
    rank: int
    kem: str | None
    pq_signature: str | None
    noise_name: bytes

    @property
    def kem_label(self) -> str:
        """Human/audit label of the key exchange, e.g. ``X25519+ML-KEM-768``."""
        return "X25519" if self.kem is None else f"X25519+{self.kem}"

    @property
    def signature_label(self) -> str:
        """Human/audit label of the authentication, e.g. ``Ed25519+ML-DSA-65``."""
        return "Ed25519" if self.pq_signature is None else f"Ed25519+{self.pq_signature}"

    @property
    def is_hybrid(self) -> bool:
        return self.kem is not None


CLASSICAL = Suite(
    name="classical",
    wire_id=1,
    rank=0,
    kem=None,
    pq_signature=None,
    noise_name=b"Noise_XX_25519_ChaChaPoly_BLAKE2s",
)
HYBRID = Suite(
    name="hybrid",
    wire_id=2,
    rank=1,
    kem="ML-KEM-768",
    pq_signature="ML-DSA-65",
    noise_name=b"Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s",
)
PQ_STRONG = Suite(
    name="pq-strong",
    wire_id=3,
    rank=2,
    kem="ML-KEM-1024",
    pq_signature="ML-DSA-87",
    noise_name=b"Noise_XXhfs_25519+MLKEM1024_ChaChaPoly_BLAKE2s",
)

SUITES: dict[str, Suite] = {s.name: s for s in (CLASSICAL, HYBRID, PQ_STRONG)}
SUITES_BY_WIRE_ID: dict[int, Suite] = {s.wire_id: s for s in SUITES.values()}
DEFAULT_SUITE = HYBRID
#: Suites a node allows unless configured otherwise: classical is never on by default.
DEFAULT_ALLOWED_SUITES: tuple[Suite, ...] = (HYBRID, PQ_STRONG)


class Aead(IntEnum):
    """Record-layer AEADs; the value is the wire id."""

    CHACHA20_POLY1305 = 1
    AES_256_GCM = 2

    @property
    def label(self) -> str:
        return _AEAD_LABELS[self]

    @classmethod
    def from_label(cls, label: str) -> Aead:
        for aead, text in _AEAD_LABELS.items():
            if text == label.lower():
                return aead
        raise ConfigError(f"unknown AEAD {label!r}; choose one of: {', '.join(_AEAD_LABELS.values())}")


_AEAD_LABELS = {Aead.CHACHA20_POLY1305: "chacha20-poly1305", Aead.AES_256_GCM: "aes-256-gcm"}
#: The library's default order. The daemon passes its own, chosen by the CPU (aead_preference).
DEFAULT_AEADS: tuple[Aead, ...] = (Aead.CHACHA20_POLY1305, Aead.AES_256_GCM)
#: Fast on every CPU in software; AES-256-GCM is faster only with AES instructions and much
#: slower without them, so ChaCha20-Poly1305 settles a disagreement between two nodes.
PORTABLE_AEAD = Aead.CHACHA20_POLY1305


def aead_preference(aes_instructions: bool) -> tuple[Aead, ...]:
    """A node's AEAD order when its configuration names none: the faster one on its CPU first."""
    if aes_instructions:
        return (Aead.AES_256_GCM, Aead.CHACHA20_POLY1305)
    return (Aead.CHACHA20_POLY1305, Aead.AES_256_GCM)


def best_common_aead(initiator: Sequence[int], responder: Sequence[Aead]) -> Aead | None:
    """The AEAD the responder picks: the one both orders rank best, None if none is shared.

    Each side lists the fastest AEAD on its own CPU first, and both sides pay for the
    record layer, so the pick minimises the sum of the two positions. A tie means the
    nodes disagree (say AES instructions on one side only): PORTABLE_AEAD wins it, as it
    is never slow, then the initiator's order.
    """
    ours = [int(a) for a in responder]
    common = [wire_id for wire_id in initiator if wire_id in ours]
    if not common:
        return None

    def rank(wire_id: int) -> tuple[int, bool, int]:
        mine, theirs = ours.index(wire_id), initiator.index(wire_id)
        return mine + theirs, wire_id != PORTABLE_AEAD, theirs

    return Aead(min(common, key=rank))


def suite_by_name(name: str) -> Suite:
    """Look a suite up by its configuration name, with a clear error for typos."""
    try:
        return SUITES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}") from None


def suites_at_least(minimum: Suite) -> tuple[Suite, ...]:
    """All suites ranked at or above ``minimum``, strongest last."""
    return tuple(s for s in sorted(SUITES.values(), key=lambda s: s.rank) if s.rank >= minimum.rank)

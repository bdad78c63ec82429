"""Noise token processing for XX and XXhfs on top of noiseprotocol's SymmetricState.

noiseprotocol implements the symmetric state (MixHash, MixKey, EncryptAndHash, HKDF) but
not the KEM tokens of the Hybrid Forward Secrecy extension, so this module processes the
tokens itself: ``e``, ``e1`` (KEM public key), ``ekem1`` (KEM ciphertext, its shared secret
fed to MixKey), ``s``, ``ee``, ``es``, ``se``. The classical XX path is checked against the
published cacophony test vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from noise.backends.default import noise_backend
from noise.noise_protocol import NoiseProtocol
from noise.state import SymmetricState

from .crypto import backend as prim
from .errors import HandshakeDecryptError, MalformedHandshakeError

DHLEN = 32
TAGLEN = 16
_BASE_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"


@dataclass
class KemHooks:
    """How this side makes KEM keys and encapsulates: injectable for test vectors."""

    algorithm: str
    keypair: Callable[[], prim.KemPrivateKey]
    encapsulate: Callable[[bytes], tuple[bytes, bytes]]


class NoiseState:
    """One side's handshake state for one protocol name (sans-IO, no randomness inside)."""

    def __init__(self, protocol_name: bytes, *, initiator: bool, static_private: bytes, ephemeral_private: bytes,
                 prologue: bytes, kem: KemHooks | None = None) -> None:
        protocol = NoiseProtocol(_BASE_NAME, noise_backend)
        protocol.name = protocol_name  # h is initialised from our (hybrid) name, not the base
        self._protocol = protocol
        self.symmetric = SymmetricState.initialize_symmetric(protocol)
        self.symmetric.mix_hash(prologue)
        self.initiator = initiator
        self.s = static_private
        self.e = ephemeral_private
        self.rs: bytes | None = None
        self.re: bytes | None = None
        self.kem = kem
        self.kem_key: prim.KemPrivateKey | None = None
        self.remote_kem_public: bytes | None = None
        self._key_objects: dict[bytes, prim.X25519Key] = {}

    # --- hashing and encryption --------------------------------------------------------------

    @property
    def h(self) -> bytes:
        return self.symmetric.h

    @property
    def ck(self) -> bytes:
        return self.symmetric.ck

    def _has_key(self) -> bool:
        return self._protocol.cipher_state_handshake.has_key()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        return self.symmetric.encrypt_and_hash(plaintext)

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            return self.symmetric.decrypt_and_hash(ciphertext)
        except InvalidTag:
            raise HandshakeDecryptError("handshake message failed authentication (tampered, truncated or replayed)") from None

    def encrypted_size(self, plaintext_size: int) -> int:
        return plaintext_size + (TAGLEN if self._has_key() else 0)

    def hkdf(self, chaining_key: bytes, material: bytes, outputs: int) -> tuple[bytes, ...]:
        return tuple(self._protocol.hkdf(chaining_key, material, outputs))

    def split(self) -> tuple[bytes, bytes]:
        """Noise Split(): (initiator->responder key, responder->initiator key)."""
        k1, k2 = self._protocol.hkdf(self.symmetric.ck, b"", 2)
        return k1, k2

    # --- tokens -------------------------------------------------------------------------------

    def _key(self, private: bytes) -> prim.X25519Key:
        """e and s are each used in two or three tokens: load each key object once."""
        key = self._key_objects.get(private)
        if key is None:
            key = self._key_objects[private] = prim.x25519_key(private)
        return key

    def write_e(self) -> bytes:
        public = prim.x25519_public(self._key(self.e))
        self.symmetric.mix_hash(public)
        return public

    def read_e(self, data: bytes) -> None:
        self.re = bytes(data)
        self.symmetric.mix_hash(self.re)

    def write_e1(self) -> bytes:
        assert self.kem is not None
        self.kem_key = self.kem.keypair()
        return self.encrypt_and_hash(self.kem_key.public_bytes())

    def read_e1(self, data: bytes) -> None:
        self.remote_kem_public = self.decrypt_and_hash(data)

    def write_ekem1(self) -> bytes:
        assert self.kem is not None and self.remote_kem_public is not None
        try:
            secret, ciphertext = self.kem.encapsulate(self.remote_kem_public)
        except ValueError:
            raise MalformedHandshakeError("peer's ML-KEM public key is invalid") from None
        out = self.encrypt_and_hash(ciphertext)
        self.symmetric.mix_key(secret)
        return out

    def read_ekem1(self, data: bytes) -> None:
        assert self.kem_key is not None
        ciphertext = self.decrypt_and_hash(data)
        try:
            secret = self.kem_key.decapsulate(ciphertext)
        except ValueError:
            raise MalformedHandshakeError("peer's ML-KEM ciphertext is malformed") from None
        self.symmetric.mix_key(secret)

    def write_s(self) -> bytes:
        return self.encrypt_and_hash(prim.x25519_public(self._key(self.s)))

    def read_s(self, data: bytes) -> None:
        self.rs = self.decrypt_and_hash(data)

    def _dh(self, private: bytes, public: bytes | None) -> None:
        assert public is not None
        try:
            shared = prim.x25519_dh(self._key(private), public)
        except ValueError:
            raise MalformedHandshakeError("peer sent a low-order X25519 key") from None
        self.symmetric.mix_key(shared)

    def ee(self) -> None:
        self._dh(self.e, self.re)

    def es(self) -> None:
        if self.initiator:
            self._dh(self.e, self.rs)
        else:
            self._dh(self.s, self.re)

    def se(self) -> None:
        if self.initiator:
            self._dh(self.s, self.re)
        else:
            self._dh(self.e, self.rs)


class Reader:
    """Cuts a handshake message into token-sized pieces; any shortfall is malformed."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    def take(self, size: int) -> bytes:
        if self._pos + size > len(self._data):
            raise MalformedHandshakeError(f"{self._what} is truncated")
        chunk = bytes(self._data[self._pos : self._pos + size])
        self._pos += size
        return chunk

    def rest(self) -> bytes:
        chunk = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return chunk

"""Exception hierarchy: one specific class per failure, so callers log a precise reason.

Whose fault, as in h11: the peer's mistakes (bad bytes on the wire) raise
``RemoteProtocolError`` subclasses (``ProtocolError`` is the same class); the I/O shell
logs ``str(exc)`` in one line as the peer's fault and closes only the affected connection.
Our own mistakes (a state machine driven in the wrong order, a bug) raise
``LocalProtocolError`` subclasses and are logged as internal errors, never blamed on the
peer. User mistakes (bad config, missing home) raise ``UserError`` subclasses; the CLI
prints them in one line and exits non-zero.
"""

from __future__ import annotations


class PqtunnelError(Exception):
    """Base of every error pqtunnel raises on purpose."""


# --- user-facing -----------------------------------------------------------------------------


class UserError(PqtunnelError):
    """A mistake the user can fix: printed as one line, never as a traceback."""


class IdentityError(UserError):
    """The identity files are missing, unreadable, malformed or unsafe."""


class InsecureKeyFileError(IdentityError):
    """A private key file is readable by group or others (ssh refuses these too)."""


class IdentityExistsError(IdentityError):
    """``init`` would overwrite an identity."""


class TrustStoreError(UserError):
    """The pinned-peer file is malformed or an entry is invalid."""


class ConfigError(UserError):
    """The configuration file or a command-line setting is invalid."""


class BackendUnavailableError(UserError):
    """An optional crypto backend was asked for but is not installed."""


# --- protocol ----------------------------------------------------------------------------------


class RemoteProtocolError(PqtunnelError):
    """The peer sent something we must refuse; the connection is closed. The peer's fault."""


ProtocolError = RemoteProtocolError
"""The name most of the code uses: every ProtocolError is the peer's fault."""


class LocalProtocolError(PqtunnelError):
    """We drove a state machine wrongly (a bug of ours, or a call after close). Our fault."""


class SessionStateError(LocalProtocolError):
    """A session operation that its current state does not allow (e.g. send before keys)."""


class FramingError(ProtocolError):
    """The byte stream cannot be split into frames (bad kind, bad or oversized length)."""


class HandshakeError(ProtocolError):
    """The handshake failed; no session keys exist."""


class ResumeRefusedError(HandshakeError):
    """A replica cannot continue the session a RESUME names (unknown, replayed, or its state unusable)."""


class TicketError(HandshakeError):
    """A resumption ticket cannot be used: unknown, already used, expired, or not this peer's."""


class TicketExpiredError(TicketError):
    """The ticket's lifetime is over: the initiator makes a full handshake instead."""


class TicketMismatchError(TicketError):
    """The ticket was issued for another ticket id, peer, node, suite or AEAD than this resumption."""


class TicketAuthError(TicketError):
    """A RESUME_HELLO or RESUME_ACCEPT MAC did not verify (tampered, or a key the ticket does not hold)."""


class MalformedHandshakeError(HandshakeError):
    """A handshake message has the wrong length or an undecodable payload."""


class HandshakeDecryptError(HandshakeError):
    """A handshake message did not authenticate (tampered, truncated or replayed)."""


class UnsupportedVersionError(HandshakeError):
    """No protocol version in common."""


class NoCommonSuiteError(HandshakeError):
    """The peers' allowed suites or AEADs do not intersect."""


class DowngradeError(HandshakeError):
    """The negotiation was tampered with or a weaker suite than allowed was forced."""


class BadSignatureError(HandshakeError):
    """A hybrid signature over the transcript did not verify (both halves must)."""


class UntrustedPeerError(HandshakeError):
    """The peer authenticated, but its identity is not trusted for this name."""


class ReplayError(HandshakeError):
    """A handshake message was seen before, or its timestamp is outside the window."""


class CookieError(HandshakeError):
    """A retry cookie is missing, forged, expired or already used."""


class HandshakeBusyError(HandshakeError):
    """The responder's budget for expensive handshake work is spent; try again later."""


class RecordError(ProtocolError):
    """An encrypted record was refused; the session is closed."""


class RecordAuthError(RecordError):
    """A record did not authenticate under the current key."""


class CounterReplayError(RecordError):
    """A record counter did not strictly increase (replay or reordering)."""


class OversizedRecordError(RecordError):
    """A record exceeds the maximum record size."""


class SessionIdMismatchError(RecordError):
    """A record names a session other than this one."""


class RekeyError(RecordError):
    """An in-band rekey message was malformed or arrived out of order."""


class HandshakeRefusedError(HandshakeError):
    """The peer sent an ALERT refusing the handshake (reason included)."""


class CertificateError(UntrustedPeerError):
    """A network-CA certificate is malformed, forged, expired, revoked or for another node."""


class CaError(UserError):
    """The CA directory or a CA command's input is unusable."""


class TransitionError(UntrustedPeerError):
    """A peer's transition record is malformed, forged, expired or binds another identity."""


class MigrationError(UserError):
    """A classical key, known_hosts file or migration input is unusable (named with file:line)."""


# --- counter leases and shared stores (docs/ha.md) ------------------------------------------------


class LeaseError(PqtunnelError):
    """A counter lease cannot hand out a counter."""


class NoCounterError(LeaseError):
    """No reserved counter is in hand right now: the sender waits for the store's answer."""


class LeaseStoppedError(NoCounterError):
    """This lease will never hand out another counter (state gone, store rolled back, exhausted)."""


class StoreError(PqtunnelError):
    """A shared store (nonce marks, single-use records) failed; the message names it."""


class StoreUnavailableError(StoreError):
    """The store did not answer in time: the outcome of the request is unknown."""


class StoreDataError(StoreError):
    """The store holds data that is corrupt or not ours: refused, never trusted."""


class StoreKeyError(LocalProtocolError):
    """A key id or record id the store cannot hold (our mistake, not the store's)."""


class StateTooLargeError(StoreKeyError, ValueError):
    """A session-state blob larger than the store holds (``MAX_STATE_SIZE``): our bug."""


class StoreOpenError(UserError):
    """The configured store cannot be opened (bad path, a file of another format)."""

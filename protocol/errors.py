"""Why a message or request was refused, as one exception per cause.

Each error carries a stable ``code`` (snake_case, part of the wire contract in docs/protocol.md)
and the HTTP ``status`` the cloud answers with, so the ingest turns any of them into the same JSON
error body and the device can decide what to do from the code alone (retry, re-enroll, fix the
clock, drop the event). They are PermanentErrors: sending the same bytes again cannot succeed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from edgekeeper.errors import PermanentError


class ProtocolError(PermanentError, ValueError):
    """A message or request that the protocol refuses. Subclasses fix ``code`` and ``status``."""

    code: ClassVar[str] = "protocol_error"
    status: ClassVar[int] = 400
    default_fix: ClassVar[str | None] = None

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message, fix=fix if fix is not None else self.default_fix)

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``{"error": {"code", "message", "fix"}}``."""
        return {"error": {"code": self.code, "message": self.message, "fix": self.fix or ""}}


class MalformedEnvelope(ProtocolError):
    code = "malformed_envelope"
    default_fix = "send exactly one envelope built by edgekeeper.protocol.envelope.seal_event"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"
    default_fix = "upgrade edgekeeper on the side that sent it (device and cloud must share v1)"


class PayloadTooLarge(ProtocolError):
    code = "payload_too_large"
    status = 413
    default_fix = "send fewer or smaller frames/audio, or raise cloud.max_event_bytes"


class InvalidBody(ProtocolError):
    """The decrypted body does not decode, breaks a limit, or disagrees with its header."""

    code = "invalid_body"
    default_fix = "build the body with edgekeeper.protocol.messages (EventBody / ResultBody)"


class UnknownDevice(ProtocolError):
    code = "unknown_device"
    status = 401
    default_fix = "enroll the device: edgekeeper device enroll --cloud URL --token=TOKEN"


class DeviceRevoked(ProtocolError):
    code = "device_revoked"
    status = 401
    default_fix = "this device was revoked; an operator must issue a new token and re-enroll it"


class AuthenticationFailed(ProtocolError):
    code = "auth_failed"
    status = 401
    default_fix = (
        "the device keys do not match the ones enrolled, or the message was altered in transit; "
        "check that the device uses the keys it enrolled with"
    )


class StaleMessage(ProtocolError):
    """The signed timestamp is outside the freshness window (clock skew or a replayed capture)."""

    code = "stale"
    status = 401
    default_fix = "synchronise the device clock (NTP); compare with the response's Date header"


class SeqConflict(ProtocolError):
    """The sequence number was already accepted with a different payload."""

    code = "seq_conflict"
    status = 409
    default_fix = (
        "the device reused a sequence number (restored state?); its sequence counter must "
        "only ever grow"
    )


class MissingSignature(ProtocolError):
    code = "missing_signature"
    status = 401
    default_fix = "sign the request with edgekeeper.protocol.envelope.sign_request"


class InvalidToken(ProtocolError):
    """An enrollment token that is unknown, expired or already used."""

    code = "invalid_token"
    status = 401
    default_fix = "ask the operator for a fresh token: edgekeeper cloud token"


class DeviceExists(ProtocolError):
    code = "device_exists"
    status = 409
    default_fix = "this device id is enrolled with other keys; enroll under a new device id"


class InvalidJson(ProtocolError):
    code = "invalid_json"
    default_fix = "send a UTF-8 JSON object as documented in docs/protocol.md"


class InvalidRequest(ProtocolError):
    code = "invalid_request"
    default_fix = "see docs/protocol.md for the fields and ranges this endpoint accepts"


class UnsupportedMediaType(ProtocolError):
    code = "unsupported_media_type"
    status = 415


class RequestTimeout(ProtocolError):
    code = "request_timeout"
    status = 408
    default_fix = "send the whole body without pausing; retry (the event is kept)"


# Every code a client may see, with its status: docs/protocol.md lists the same table and
# tests/test_envelope.py checks they agree.
ALL_ERRORS: tuple[type[ProtocolError], ...] = (
    MalformedEnvelope,
    UnsupportedVersion,
    PayloadTooLarge,
    InvalidBody,
    UnknownDevice,
    DeviceRevoked,
    AuthenticationFailed,
    StaleMessage,
    SeqConflict,
    MissingSignature,
    InvalidToken,
    DeviceExists,
    InvalidJson,
    InvalidRequest,
    UnsupportedMediaType,
    RequestTimeout,
)

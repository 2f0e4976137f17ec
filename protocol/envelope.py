"""The envelope: an event body leaving the device, or a result body coming back, encrypted end to
end (crypto_box) and bound to its sender; plus Ed25519 signatures for the device's other HTTP
requests. The wire format is in docs/protocol.md, the reasoning in docs/architecture.md.

* ``seal_event`` / ``open_event`` (``open_event`` raises the ProtocolError subclasses of
  protocol/errors.py; ``now=None`` skips the freshness check, ``decode_body=False`` stops after
  decryption) and ``peek_header`` (parse without crypto: never trust it before opening).
* ``seal_result`` / ``open_result``.
* ``sign_request`` -> headers / ``verify_request`` -> the device's public keys.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import msgpack
import nacl.bindings
import nacl.exceptions
from nacl.public import PrivateKey
from nacl.signing import VerifyKey

from edgekeeper.protocol.device_id import DEVICE_ID_RULE, valid_device_id
from edgekeeper.protocol.errors import (
    AuthenticationFailed,
    DeviceRevoked,
    InvalidBody,
    MalformedEnvelope,
    MissingSignature,
    PayloadTooLarge,
    ProtocolError,
    StaleMessage,
    UnknownDevice,
    UnsupportedVersion,
)
from edgekeeper.protocol.keys import DeviceKeys, DevicePublicKeys, b64d, b64e
from edgekeeper.protocol.messages import (
    MAX_SEQ,
    EventBody,
    ResultBody,
    payload_digest,
)

PROTOCOL_VERSION = 1
KIND_EVENT = 1
KIND_RESULT = 2
CONTENT_TYPE = "application/vnd.edgekeeper.envelope+msgpack"
NONCE_BYTES = 24
SEED_BYTES = 24
HASH_BYTES = 32
MAC_BYTES = 16
MAX_HEADER_BYTES = 512
MAX_TAG = 128
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
_NONCE_DOMAIN = b"edgekeeper-envelope-v1"

# Request signing (docs/protocol.md, "Signed requests").
HEADER_DEVICE = "X-Edgekeeper-Device"
HEADER_TIMESTAMP = "X-Edgekeeper-Timestamp"
HEADER_SIGNATURE = "X-Edgekeeper-Signature"
_REQUEST_DOMAIN = b"edgekeeper-request-v1"
# What format_timestamp writes. Checked before float(): float() also takes "1_000", " 1e3 "
# and non-ASCII digits (full-width ones), which the signed message (ASCII) cannot hold.
_TIMESTAMP_TEXT = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?")

Lookup = Callable[[str], "DevicePublicKeys | None"]


class EnvelopeHeader(NamedTuple):
    # A NamedTuple, not a dataclass: it is built for every envelope on the ingest's hot path.
    version: int
    kind: int
    device_id: str
    seq: int
    timestamp: float
    tag: str
    payload_hash: bytes


@dataclass(frozen=True, init=False)
class OpenedEvent:
    """An authenticated, decrypted event. ``envelope`` is the original bytes (the queue stores
    those, so queue and storage only ever hold ciphertext). ``body`` decodes ``body_bytes`` and
    checks it against the header on first access (``open_event`` does so unless told not to)."""

    device_id: str
    seq: int
    sent_at: float
    model_version: str
    payload_hash: bytes
    body_bytes: bytes
    envelope: bytes

    def __init__(self, device_id: str, seq: int, sent_at: float, model_version: str,
                 payload_hash: bytes, body_bytes: bytes, envelope: bytes) -> None:
        # Frozen, but filled in one step: a frozen dataclass's generated __init__ costs a
        # microsecond per field, which shows on the ingest's per-event budget.
        self.__dict__.update(
            device_id=device_id, seq=seq, sent_at=sent_at, model_version=model_version,
            payload_hash=payload_hash, body_bytes=body_bytes, envelope=envelope,
        )

    @cached_property
    def body(self) -> EventBody:
        body = EventBody.decode(self.body_bytes)
        if body.device_id != self.device_id or body.seq != self.seq:
            raise InvalidBody(
                f"the body says {body.device_id!r} seq {body.seq}, the header "
                f"{self.device_id!r} seq {self.seq}"
            )
        return body


@dataclass(frozen=True)
class OpenedResult:
    device_id: str
    seq: int
    produced_at: float
    reasoner: str
    payload_hash: bytes
    body: ResultBody


@functools.lru_cache(maxsize=4096)
def _shared_key(secret_key: bytes, public_key: bytes) -> bytes:
    # crypto_box = crypto_box_beforenm (X25519 + HSalsa20) then XSalsa20-Poly1305 under that key.
    # The X25519 step costs as much as encrypting ~25 KB, so it is done once per key pair.
    return nacl.bindings.crypto_box_beforenm(public_key, secret_key)


def _box_nonce(version: int, kind: int, header: bytes, seed: bytes) -> bytes:
    """The crypto_box nonce, derived from everything that travels in clear (see the docstring)."""
    return hashlib.sha256(_NONCE_DOMAIN + bytes((version, kind)) + header + seed).digest()[
        :NONCE_BYTES
    ]


# libsodium's *_easy_afternm calls (MAC || ciphertext, no zero padding) through PyNaCl's own cffi
# binding: the same bytes nacl.bindings.crypto_box_afternm returns, but written straight into the
# envelope and read straight out of it, without the three extra copies of the whole message that
# the public binding and a msgpack round trip would make. Falls back to the public bindings if a
# PyNaCl build lacks them.
try:
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib

    _HAVE_EASY = hasattr(_lib, "crypto_box_easy_afternm") and hasattr(
        _lib, "crypto_box_open_easy_afternm"
    )
    # Output buffers are written in full by libsodium (or discarded), so skip zeroing them.
    _alloc = _ffi.new_allocator(should_clear_after_alloc=False)
except ImportError:  # pragma: no cover
    _HAVE_EASY = False


def _bin_marker(n: int) -> bytes:
    """msgpack's bin header for ``n`` bytes, smallest form first (as msgpack.packb writes it)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _raw_key(key: PrivateKey | bytes) -> bytes:
    return bytes(key)


def _encode_header(device_id: str, seq: int, timestamp: float, tag: str, phash: bytes) -> bytes:
    return msgpack.packb([device_id, seq, float(timestamp), tag, phash], use_bin_type=True)


def _seal(kind: int, header: bytes, body: bytes, secret_key: bytes, public_key: bytes) -> bytes:
    seed = os.urandom(SEED_BYTES)
    nonce = _box_nonce(PROTOCOL_VERSION, kind, header, seed)
    key = _shared_key(secret_key, public_key)
    if not _HAVE_EASY:  # pragma: no cover
        box = nacl.bindings.crypto_box_afternm(body, nonce, key)
        return msgpack.packb([PROTOCOL_VERSION, kind, header, seed, box], use_bin_type=True)
    # Byte for byte what msgpack.packb([1, kind, header, seed, box]) produces (tests check it).
    prefix = b"".join(
        (
            bytes((0x95, PROTOCOL_VERSION, kind)),
            _bin_marker(len(header)),
            header,
            _bin_marker(SEED_BYTES),
            seed,
            _bin_marker(len(body) + MAC_BYTES),
        )
    )
    total = len(prefix) + len(body) + MAC_BYTES
    out = _alloc("unsigned char[]", total)
    _ffi.memmove(out, prefix, len(prefix))
    if _lib.crypto_box_easy_afternm(out + len(prefix), body, len(body), nonce, key) != 0:
        raise RuntimeError("crypto_box_easy_afternm failed")  # pragma: no cover
    return bytes(_ffi.buffer(out, total))


_LENGTH_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _read_bin(data: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    """(start, end) of the msgpack bin item at ``pos``; MalformedEnvelope if it is not one."""
    size = len(data)
    if pos >= size:
        raise MalformedEnvelope(f"the envelope ends before {what}")
    width = _LENGTH_WIDTH.get(data[pos])
    if width is None:
        raise MalformedEnvelope(
            f"{what} must be msgpack bin (0xc4/0xc5/0xc6), got 0x{data[pos]:02x}"
        )
    start = pos + 1 + width
    if start > size:
        raise MalformedEnvelope(f"the envelope ends inside the length of {what}")
    end = start + (data[pos + 1] if width == 1 else int.from_bytes(data[pos + 1 : start], "big"))
    if end > size:
        raise MalformedEnvelope(f"the envelope ends inside {what} (truncated)")
    return start, end


def _parse(data: bytes, max_bytes: int) -> tuple[EnvelopeHeader, bytes, bytes, memoryview]:
    """Split an envelope into (header, header bytes, seed, box) with every shape check.

    The outer array has a fixed shape, so it is read by hand: that lets the box (nearly the
    whole envelope) be handed to libsodium as a view instead of being copied out by msgpack.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedEnvelope("the envelope must be bytes")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the envelope is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) < 3 or data[0] != 0x95:
        raise MalformedEnvelope("the envelope must be a msgpack array of 5 items (0x95 ...)")
    version, kind = data[1], data[2]
    if version >= 0x80:  # not a positive fixint
        raise MalformedEnvelope("envelope item 0 (version) must be a small positive integer")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"envelope version {version} is not supported; this side speaks {PROTOCOL_VERSION}"
        )
    if kind not in (KIND_EVENT, KIND_RESULT):
        raise MalformedEnvelope(f"envelope item 1 (kind) must be 1 or 2, got byte 0x{kind:02x}")
    h0, h1 = _read_bin(data, 3, "item 2 (header)")
    s0, s1 = _read_bin(data, h1, "item 3 (seed)")
    b0, b1 = _read_bin(data, s1, "item 4 (box)")
    if b1 != len(data):
        raise MalformedEnvelope(f"{len(data) - b1} bytes follow the envelope")
    if not 0 < h1 - h0 <= MAX_HEADER_BYTES:
        raise MalformedEnvelope(f"envelope item 2 (header) must be 1-{MAX_HEADER_BYTES} bytes")
    if s1 - s0 != SEED_BYTES:
        raise MalformedEnvelope(f"envelope item 3 (seed) must be {SEED_BYTES} bytes")
    if b1 - b0 <= MAC_BYTES:
        raise MalformedEnvelope("envelope item 4 (box) is too short to hold a sealed body")
    header_bytes = bytes(data[h0:h1])
    seed = bytes(data[s0:s1])
    box = memoryview(data)[b0:b1]
    try:
        fields = msgpack.unpackb(
            header_bytes,
            raw=False,
            use_list=True,
            max_bin_len=HASH_BYTES,
            max_str_len=MAX_TAG,
            max_array_len=5,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise MalformedEnvelope(f"the envelope header is not valid msgpack: {err}") from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise MalformedEnvelope("the envelope header must be an array of 5 items")
    device_id, seq, timestamp, tag, phash = fields
    if not valid_device_id(device_id):
        raise MalformedEnvelope(f"header device_id: expected {DEVICE_ID_RULE}")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise MalformedEnvelope("header seq must be an integer in [0, 2^63)")
    if type(timestamp) is not float or not math.isfinite(timestamp):
        raise MalformedEnvelope("header timestamp must be a finite float64")
    if not isinstance(tag, str) or len(tag) > MAX_TAG:
        raise MalformedEnvelope(f"header tag must be a string of at most {MAX_TAG} characters")
    if not isinstance(phash, bytes) or len(phash) != HASH_BYTES:
        raise MalformedEnvelope(f"header payload_hash must be {HASH_BYTES} bytes")
    header = EnvelopeHeader(version, kind, device_id, seq, timestamp, tag, phash)
    return header, header_bytes, seed, box


def _open(header: EnvelopeHeader, header_bytes: bytes, seed: bytes, box: memoryview,
          secret_key: bytes, public_key: bytes) -> bytes:
    nonce = _box_nonce(header.version, header.kind, header_bytes, seed)
    key = _shared_key(secret_key, public_key)
    if _HAVE_EASY:
        size = len(box) - MAC_BYTES
        out = _alloc("unsigned char[]", size)
        status = _lib.crypto_box_open_easy_afternm(out, _ffi.from_buffer(box), len(box), nonce, key)
        ok = status == 0
        body = _ffi.buffer(out, size)[:] if ok else b""
    else:  # pragma: no cover
        try:
            body, ok = nacl.bindings.crypto_box_open_afternm(bytes(box), nonce, key), True
        except nacl.exceptions.CryptoError:
            ok = False
    if not ok:
        raise AuthenticationFailed(
            f"the envelope from {header.device_id!r} seq {header.seq} does not authenticate "
            "(wrong keys, or altered in transit)"
        )
    return body


def peek_header(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> EnvelopeHeader:
    """Parse an envelope's cleartext header (untrusted until opened)."""
    return _parse(data, max_bytes)[0]


_IDENTITY_PREFIX = b"\x8a\xa9device_id"  # fixmap(10), fixstr "device_id"
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _identity(encoded: bytes) -> tuple[str, int]:
    """(device_id, seq) of an encoded EventBody without decoding its frames.

    EventBody.encode writes ``device_id`` and ``seq`` first, so the first ~80 bytes are read by
    hand; any other layout falls back to a full (validating) decode.
    """
    if encoded.startswith(_IDENTITY_PREFIX) and len(encoded) > 100:
        pos = len(_IDENTITY_PREFIX)
        marker = encoded[pos]
        if 0xA0 <= marker <= 0xBF:
            n, pos = marker & 0x1F, pos + 1
        elif marker == 0xD9:
            n, pos = encoded[pos + 1], pos + 2
        else:
            n = -1
        if n > 0 and encoded[pos + n : pos + n + 4] == b"\xa3seq":
            device_id = encoded[pos : pos + n].decode("ascii", "replace")
            pos += n + 4
            marker = encoded[pos]
            seq = -1
            if marker < 0x80:
                seq = marker
            elif marker in _UINT_WIDTH:
                seq = int.from_bytes(encoded[pos + 1 : pos + 1 + _UINT_WIDTH[marker]], "big")
            if valid_device_id(device_id) and 0 <= seq <= MAX_SEQ:
                return device_id, seq
    body = EventBody.decode(encoded)
    return body.device_id, body.seq


def seal_event(
    body: EventBody | bytes,
    *,
    device: DeviceKeys,
    cloud_box_pk: bytes,
    sent_at: float,
    model_version: str,
    payload_hash: bytes | None = None,
) -> bytes:
    """Encrypt ``body`` from the device to the cloud, binding id, seq, sent_at, model version
    and payload hash. Seal again on every upload attempt (fresh ``sent_at``).

    ``body`` may be the EventBody or its ``encode()`` bytes as the outbox stored them (validated
    when the EventBody was built); ``payload_hash`` the digest stored with them.
    """
    if isinstance(body, EventBody):
        encoded = body.encode()
        device_id, seq = body.device_id, body.seq
    else:
        encoded = bytes(body)
        device_id, seq = _identity(encoded)
    if payload_hash is None:
        payload_hash = payload_digest(encoded)
    elif len(payload_hash) != HASH_BYTES:
        raise ValueError("payload_hash must be the 32-byte payload_digest of the encoded body")
    if not isinstance(model_version, str) or len(model_version) > MAX_TAG:
        raise ValueError(f"model_version must be a string of at most {MAX_TAG} characters")
    if not math.isfinite(sent_at):
        raise ValueError("sent_at must be a finite time")
    header = _encode_header(device_id, seq, sent_at, model_version, payload_hash)
    return _seal(KIND_EVENT, header, encoded, device.box_sk, bytes(cloud_box_pk))


def open_event(
    data: bytes,
    *,
    cloud_box_sk: PrivateKey | bytes,
    lookup: Lookup,
    now: float | None,
    window_s: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
    verify_payload_hash: bool = False,
    decode_body: bool = True,
) -> OpenedEvent:
    """Authenticate and decrypt an event envelope; raise a ProtocolError subclass if refused.

    ``verify_payload_hash``: recompute SHA-256 over the body and compare. The ingest leaves it
    off: the box already proves the device sent this header with this body, so a mismatch can
    only come from the authenticated device itself; the worker turns it on.
    ``decode_body``: decode and check the body now (InvalidBody) rather than on first access
    of ``.body``.
    """
    header, header_bytes, seed, box = _parse(data, max_bytes)
    if header.kind != KIND_EVENT:
        raise MalformedEnvelope("expected an event envelope (kind 1)")
    device = lookup(header.device_id)
    if device is None:
        raise UnknownDevice(f"device {header.device_id!r} is not enrolled")
    if device.revoked:
        raise DeviceRevoked(f"device {header.device_id!r} has been revoked")
    body_bytes = _open(header, header_bytes, seed, box, _raw_key(cloud_box_sk), device.box_pk)
    if now is not None and abs(header.timestamp - now) > window_s:
        raise StaleMessage(
            f"sent_at {header.timestamp:.3f} is {header.timestamp - now:+.1f} s from the "
            f"cloud's clock; the window is ±{window_s:g} s"
        )
    if verify_payload_hash and payload_digest(body_bytes) != header.payload_hash:
        raise InvalidBody("the body does not match the payload_hash in its header")
    opened = OpenedEvent(
        device_id=header.device_id,
        seq=header.seq,
        sent_at=header.timestamp,
        model_version=header.tag,
        payload_hash=header.payload_hash,
        body_bytes=body_bytes,
        envelope=data if isinstance(data, bytes) else bytes(data),
    )
    if decode_body:
        _ = opened.body
    return opened


def seal_result(
    body: ResultBody, *, cloud_box_sk: PrivateKey | bytes, device_box_pk: bytes
) -> bytes:
    """Encrypt a result from the cloud to the device that sent the event."""
    encoded = body.encode()
    header = _encode_header(
        body.device_id, body.seq, body.produced_at, body.reasoner[:MAX_TAG], payload_digest(encoded)
    )
    return _seal(KIND_RESULT, header, encoded, _raw_key(cloud_box_sk), bytes(device_box_pk))


def open_result(
    data: bytes,
    *,
    device: DeviceKeys,
    device_id: str,
    cloud_box_pk: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> OpenedResult:
    """Authenticate (against the pinned cloud key) and decrypt a result meant for this device."""
    header, header_bytes, seed, box = _parse(data, max_bytes)
    if header.kind != KIND_RESULT:
        raise MalformedEnvelope("expected a result envelope (kind 2)")
    if header.device_id != device_id:
        raise AuthenticationFailed(
            f"the result is addressed to {header.device_id!r}, not to this device {device_id!r}"
        )
    body_bytes = _open(header, header_bytes, seed, box, device.box_sk, bytes(cloud_box_pk))
    if payload_digest(body_bytes) != header.payload_hash:
        raise InvalidBody("the result body does not match the payload_hash in its header")
    body = ResultBody.decode(body_bytes)
    if body.device_id != header.device_id or body.seq != header.seq:
        raise InvalidBody("the result body disagrees with its header (device_id/seq)")
    return OpenedResult(
        device_id=header.device_id,
        seq=header.seq,
        produced_at=header.timestamp,
        reasoner=header.tag,
        payload_hash=header.payload_hash,
        body=body,
    )


# --- signed requests ---------------------------------------------------------------------


def _request_message(
    device_id: str, method: str, path: str, query: str, body: bytes, timestamp: str
) -> bytes:
    return b"\n".join(
        (
            _REQUEST_DOMAIN,
            method.upper().encode("ascii"),
            path.encode("utf-8"),
            query.encode("utf-8"),
            device_id.encode("ascii"),
            timestamp.encode("ascii"),
            hashlib.sha256(body).hexdigest().encode("ascii"),
        )
    )


def format_timestamp(ts: float) -> str:
    """The X-Edgekeeper-Timestamp text: seconds since the epoch, 3 decimals."""
    return f"{ts:.3f}"


def sign_request(
    device: DeviceKeys,
    *,
    device_id: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    timestamp: float,
) -> dict[str, str]:
    """Headers that authenticate one HTTP request as coming from ``device_id``.

    ``path`` and ``query`` must be exactly what goes on the wire (percent-encoded, query without
    the '?'); keep them plain ASCII (``/v1/results``, ``cursor=12&wait=30``) so no client
    re-encodes them.
    """
    ts = format_timestamp(timestamp)
    message = _request_message(device_id, method, path, query, body, ts)
    signature = device.signing_key.sign(message).signature
    return {HEADER_DEVICE: device_id, HEADER_TIMESTAMP: ts, HEADER_SIGNATURE: b64e(signature)}


def verify_request(
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    lookup: Lookup,
    now: float,
    window_s: float,
) -> DevicePublicKeys:
    """Check a signed request; return the device it came from or raise a ProtocolError."""
    device_id = headers.get(HEADER_DEVICE)
    ts_text = headers.get(HEADER_TIMESTAMP)
    sig_text = headers.get(HEADER_SIGNATURE)
    if not device_id or not ts_text or not sig_text:
        raise MissingSignature(
            f"the request lacks {HEADER_DEVICE}, {HEADER_TIMESTAMP} or {HEADER_SIGNATURE}"
        )
    if not valid_device_id(device_id):
        raise MissingSignature(f"{HEADER_DEVICE}: expected {DEVICE_ID_RULE}")
    if not _TIMESTAMP_TEXT.fullmatch(ts_text):
        raise MissingSignature(
            f"{HEADER_TIMESTAMP} {ts_text[:40]!r} is not seconds since the epoch "
            "written as ASCII digits with an optional fraction (e.g. 1764556800.125)"
        )
    ts = float(ts_text)
    try:
        signature = b64d(sig_text, what=HEADER_SIGNATURE, length=64)
    except ValueError as err:
        raise MissingSignature(f"malformed signature headers: {err}") from None
    device = lookup(device_id)
    if device is None:
        raise UnknownDevice(f"device {device_id!r} is not enrolled")
    if device.revoked:
        raise DeviceRevoked(f"device {device_id!r} has been revoked")
    try:
        message = _request_message(device_id, method, path, query, body, ts_text)
    except UnicodeEncodeError:  # a path or method no signer could have produced
        raise AuthenticationFailed(
            f"the request from {device_id!r} cannot be verified: its method or path is not "
            "plain text"
        ) from None
    try:
        VerifyKey(device.sign_pk).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        raise AuthenticationFailed(
            f"the request signature of {device_id!r} does not verify"
        ) from None
    if abs(ts - now) > window_s:
        raise StaleMessage(
            f"{HEADER_TIMESTAMP} is {ts - now:+.1f} s from the cloud's clock; "
            f"the window is ±{window_s:g} s"
        )
    return device


__all__ = [
    "CONTENT_TYPE",
    "HEADER_DEVICE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "KIND_EVENT",
    "KIND_RESULT",
    "PROTOCOL_VERSION",
    "EnvelopeHeader",
    "OpenedEvent",
    "OpenedResult",
    "ProtocolError",
    "format_timestamp",
    "open_event",
    "open_result",
    "peek_header",
    "seal_event",
    "seal_result",
    "sign_request",
    "verify_request",
]

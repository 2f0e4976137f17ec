"""The plaintext bodies that travel inside envelopes: EventBody (device -> cloud) and ResultBody
(cloud -> device).

Each is a frozen dataclass with ``encode() -> bytes`` and ``decode(bytes)``. The encoding is a
msgpack map with the field names as keys (self-describing, so a body is easy to inspect, and
binary frames/audio travel as raw bytes, not base64). Decoding is strict, because a body is
attacker-shaped input until proven otherwise: unknown or missing keys, wrong types, values
out of range, non-JSON metadata, and anything beyond the size limits below raise ``InvalidBody``
(a ProtocolError with code ``invalid_body``) naming the field. The constructors validate too,
so a body that encodes is a body the other side will accept.

``payload_digest(encoded)`` is the SHA-256 the envelope binds as the payload hash. The outbox
may compute it once at capture, store it beside the body and hand it to ``seal_event`` on every
attempt (hashing 50 KB costs about a third of the encryption itself).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from edgekeeper.protocol.device_id import device_id_problem
from edgekeeper.protocol.device_id import valid_device_id as valid_device_id  # its old home
from edgekeeper.protocol.errors import InvalidBody

# Limits (bodies are bounded again by cloud.max_event_bytes on the wire).
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_FRAMES = 64
MAX_TEXT = 16 * 1024  # label, summary, action, reasoner ...
MAX_JSON_DEPTH = 8
MAX_JSON_ITEMS = 4096
MAX_SEQ = 2**63 - 1
PRIORITY_RANGE = (-128, 127)
FEATURE_DTYPES: dict[str, int] = {
    "": 0,  # no features
    "float32": 4,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
}


def payload_digest(encoded: bytes) -> bytes:
    """SHA-256 of an encoded body: the payload hash bound into its envelope."""
    return hashlib.sha256(encoded).digest()


def _check_json(value: Any, where: str, depth: int = 0, budget: list[int] | None = None) -> None:
    """Refuse anything JSON cannot carry: bytes, NaN/inf, non-string keys, deep nesting."""
    budget = [MAX_JSON_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidBody(f"{where} has more than {MAX_JSON_ITEMS} items")
    if depth > MAX_JSON_DEPTH:
        raise InvalidBody(f"{where} nests deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise InvalidBody(f"{where} holds an integer out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidBody(f"{where} holds {value!r}, which JSON cannot carry")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1, budget)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidBody(f"{where} has a non-string key {key!r}")
            _check_json(item, f"{where}.{key}", depth + 1, budget)
        return
    raise InvalidBody(f"{where} holds a {type(value).__name__}, which JSON cannot carry")


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidBody(f"{where} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidBody(f"{where} must be finite, got {out!r}")
    return out


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidBody(f"{where} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidBody(f"{where} = {value} is out of range [{lo}, {hi}]")
    return value


def _text(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise InvalidBody(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidBody(f"{where} is longer than {limit} characters")
    return value


def _unpack_map(data: bytes, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidBody(f"{what} must be bytes")
    if len(data) > MAX_BODY_BYTES:
        raise InvalidBody(f"{what} is larger than {MAX_BODY_BYTES} bytes")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_TEXT * 4,
            max_bin_len=len(data),
            max_array_len=MAX_JSON_ITEMS,
            max_map_len=MAX_JSON_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        # ExtraData, FormatError, StackError are ValueError subclasses; bad UTF-8 too.
        raise InvalidBody(f"{what} is not a valid msgpack body: {err}") from None
    if not isinstance(obj, dict):
        raise InvalidBody(f"{what} must be a msgpack map, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise InvalidBody(f"{what} has unknown field {unknown[0]!r}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InvalidBody(f"{what} lacks field {missing[0]!r}")
    return obj


@dataclass(frozen=True)
class EventBody:
    """One captured event, as the device sends it. Built by the device runtime (device/events.py).

    ``meta`` is JSON-able (trigger label, scores, rule fired, model versions, clip start/end,
    counts); ``frames`` are JPEG key frames; ``features`` are the gate's input or embedding as raw
    little-endian ``features_dtype`` of ``features_shape``; ``priority`` decides what the outbox
    evicts first when full (lowest first).
    """

    device_id: str
    seq: int
    captured_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    frames: tuple[bytes, ...] = ()
    audio_wav: bytes | None = None
    features: bytes | None = None
    features_dtype: str = ""
    features_shape: tuple[int, ...] = ()
    priority: int = 0

    KEYS: ClassVar[tuple[str, ...]] = (
        "device_id",
        "seq",
        "captured_at",
        "meta",
        "frames",
        "audio_wav",
        "features",
        "features_dtype",
        "features_shape",
        "priority",
    )

    def __post_init__(self) -> None:
        problem = device_id_problem(self.device_id, "device_id")
        if problem:
            raise InvalidBody(problem)
        _int(self.seq, "seq", 0, MAX_SEQ)
        _finite(self.captured_at, "captured_at")
        if not isinstance(self.meta, dict):
            raise InvalidBody("meta must be a JSON object (dict)")
        _check_json(self.meta, "meta")
        if not isinstance(self.frames, tuple):
            object.__setattr__(self, "frames", tuple(self.frames))
        if len(self.frames) > MAX_FRAMES:
            raise InvalidBody(f"frames holds {len(self.frames)} frames, at most {MAX_FRAMES}")
        for i, frame in enumerate(self.frames):
            if not isinstance(frame, bytes) or not frame.startswith(b"\xff\xd8"):
                raise InvalidBody(f"frames[{i}] is not a JPEG (must start with FF D8)")
        if self.audio_wav is not None and (
            not isinstance(self.audio_wav, bytes)
            or len(self.audio_wav) < 12
            or self.audio_wav[:4] != b"RIFF"
            or self.audio_wav[8:12] != b"WAVE"
        ):
            raise InvalidBody("audio_wav is not a RIFF/WAVE file")
        if self.features_dtype not in FEATURE_DTYPES:
            raise InvalidBody(
                f"features_dtype {self.features_dtype!r} is not one of "
                + ", ".join(repr(k) for k in FEATURE_DTYPES if k)
            )
        if not isinstance(self.features_shape, tuple):
            object.__setattr__(self, "features_shape", tuple(self.features_shape))
        for i, dim in enumerate(self.features_shape):
            _int(dim, f"features_shape[{i}]", 0, 2**31)
        if len(self.features_shape) > 8:
            raise InvalidBody("features_shape has more than 8 dimensions")
        if self.features is None:
            if self.features_dtype or self.features_shape:
                raise InvalidBody("features_dtype/features_shape are set but features is None")
        else:
            if not isinstance(self.features, bytes):
                raise InvalidBody("features must be bytes or None")
            if not self.features_dtype:
                raise InvalidBody("features are present but features_dtype is empty")
            count = math.prod(self.features_shape) if self.features_shape else 0
            expected = count * FEATURE_DTYPES[self.features_dtype]
            if expected != len(self.features):
                raise InvalidBody(
                    f"features holds {len(self.features)} bytes but shape "
                    f"{self.features_shape} of {self.features_dtype} needs {expected}"
                )
        _int(self.priority, "priority", *PRIORITY_RANGE)

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "device_id": self.device_id,
                "seq": self.seq,
                "captured_at": float(self.captured_at),
                "meta": self.meta,
                "frames": list(self.frames),
                "audio_wav": self.audio_wav,
                "features": self.features,
                "features_dtype": self.features_dtype,
                "features_shape": list(self.features_shape),
                "priority": self.priority,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> EventBody:
        obj = _unpack_map(data, "event body", cls.KEYS)
        frames = obj["frames"]
        if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
            raise InvalidBody("frames must be a list of byte strings")
        shape = obj["features_shape"]
        if not isinstance(shape, list):
            raise InvalidBody("features_shape must be a list of integers")
        for name in ("audio_wav", "features"):
            if obj[name] is not None and not isinstance(obj[name], bytes):
                raise InvalidBody(f"{name} must be bytes or nil")
        return cls(
            device_id=obj["device_id"],
            seq=obj["seq"],
            captured_at=_finite(obj["captured_at"], "captured_at"),
            meta=obj["meta"],
            frames=tuple(frames),
            audio_wav=obj["audio_wav"],
            features=obj["features"],
            features_dtype=_text(obj["features_dtype"], "features_dtype", 16),
            features_shape=tuple(shape),
            priority=obj["priority"],
        )


@dataclass(frozen=True)
class ResultBody:
    """The cloud's verdict on one event, sent back to the device that captured it.

    ``provisional`` is true when no real reasoner produced it (the echo reasoner, or the device's
    own edge fallback); ``gate_correct`` is the reasoner's opinion of the gate's decision (None
    when it cannot tell); ``extra`` is JSON-able.
    """

    device_id: str
    seq: int
    reasoner: str
    label: str
    confidence: float
    summary: str
    action: str
    gate_correct: bool | None
    provisional: bool
    produced_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = device_id_problem(self.device_id, "device_id")
        if problem:
            raise InvalidBody(problem)
        _int(self.seq, "seq", 0, MAX_SEQ)
        if not self.reasoner or not isinstance(self.reasoner, str):
            raise InvalidBody("reasoner must name who produced the result")
        for name in ("reasoner", "label", "summary", "action"):
            _text(getattr(self, name), name)
        conf = _finite(self.confidence, "confidence")
        if not 0.0 <= conf <= 1.0:
            raise InvalidBody(f"confidence = {conf} is outside [0, 1]")
        if self.gate_correct is not None and not isinstance(self.gate_correct, bool):
            raise InvalidBody("gate_correct must be true, false or nil")
        if not isinstance(self.provisional, bool):
            raise InvalidBody("provisional must be true or false")
        _finite(self.produced_at, "produced_at")
        if not isinstance(self.extra, dict):
            raise InvalidBody("extra must be a JSON object (dict)")
        _check_json(self.extra, "extra")

    def encode(self) -> bytes:
        return msgpack.packb(
            {f.name: getattr(self, f.name) for f in fields(self)}, use_bin_type=True
        )

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object (what device actions receive)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def decode(cls, data: bytes) -> ResultBody:
        keys = tuple(f.name for f in fields(cls))
        obj = _unpack_map(data, "result body", keys)
        return cls(**obj)

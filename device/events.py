"""Events: what the device keeps and, when allowed, sends.

An Event is built by the capture stage (device/capture.py) when a trigger fires and its post-roll
has been recorded. It carries only what the data-minimisation settings allow ([event] config):
key frames as JPEG, the audio segment as 16-bit PCM WAV, the gate's features, scores and times.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Event:
    device_id: str
    seq: int  # per-device, monotonic, survives restarts: the idempotency key upstream
    label: str
    modality: str
    captured_at: float  # device wall-clock (epoch seconds) of the trigger
    trigger_t: float  # pipeline seconds (media time in a replay)
    start_t: float
    end_t: float
    decision: dict[str, Any]  # the trigger rule that fired, with its numbers
    scores: dict[str, float]  # peak score per label over the clip
    models: dict[str, str]  # modality -> name@version
    frames: tuple[bytes, ...] = ()
    frame_times: tuple[float, ...] = ()
    audio_wav: bytes | None = None
    features: np.ndarray | None = field(default=None, compare=False)
    priority: int = 0

    def meta(self) -> dict[str, Any]:
        """JSON-able description (no media): the index line, and the envelope's metadata."""
        return {
            "device_id": self.device_id,
            "seq": self.seq,
            "label": self.label,
            "modality": self.modality,
            "captured_at": round(self.captured_at, 3),
            "trigger_t": round(self.trigger_t, 3),
            "start_t": round(self.start_t, 3),
            "end_t": round(self.end_t, 3),
            "decision": self.decision,
            "scores": {k: round(v, 4) for k, v in sorted(self.scores.items())},
            "models": dict(sorted(self.models.items())),
            "frame_times": [round(t, 3) for t in self.frame_times],
            "frames": len(self.frames),
            "audio_seconds": round(wav_seconds(self.audio_wav), 3) if self.audio_wav else 0.0,
            "features_shape": list(self.features.shape) if self.features is not None else None,
            "priority": self.priority,
        }

    @property
    def payload_bytes(self) -> int:
        """Bytes of media and features this event would send."""
        n = sum(len(f) for f in self.frames) + len(self.audio_wav or b"")
        return n + (self.features.nbytes if self.features is not None else 0)

    def to_body(self) -> Any:
        """The protocol's EventBody (what the outbox stores and the uplink seals)."""
        from edgekeeper.protocol.messages import EventBody

        feats = self.features
        return EventBody(
            device_id=self.device_id,
            seq=self.seq,
            captured_at=self.captured_at,
            meta=self.meta(),
            frames=self.frames,
            audio_wav=self.audio_wav,
            features=feats.astype("<f4").tobytes() if feats is not None else None,
            features_dtype="float32" if feats is not None else "",
            features_shape=tuple(feats.shape) if feats is not None else (),
            priority=self.priority,
        )


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """Float mono samples in [-1, 1] -> 16-bit PCM WAV bytes."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnframes() / float(w.getframerate())

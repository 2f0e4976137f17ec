"""The echo reasoner: repeats the gate's own decision back, plainly labelled as such.

It exists so the whole link (seal, ingest, queue, worker, results, device actions) runs end to
end without an LLM. Every result it makes says ``reasoner="echo"`` and ``provisional=True`` and
gives no opinion on the gate (``gate_correct=None``), so nothing downstream mistakes it for a
judgement or trains on it.
"""

from __future__ import annotations

from typing import Any

from edgekeeper.cloud.reasoners.base import NO_USAGE, Usage, Verdict
from edgekeeper.protocol.messages import EventBody


class EchoReasoner:
    name = "echo"

    def __init__(self, **_: Any) -> None:
        pass

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        meta = event.meta
        raw_label, raw_scores = meta.get("label"), meta.get("scores")
        label = raw_label if isinstance(raw_label, str) else ""
        scores: dict[str, Any] = raw_scores if isinstance(raw_scores, dict) else {}
        score = scores.get(label) if label else None
        confidence = float(score) if isinstance(score, (int, float)) else 0.0
        confidence = min(1.0, max(0.0, confidence))
        return Verdict(
            label=label or "unknown",
            confidence=confidence,
            summary=(
                f"echo: the gate ({model_version or 'unknown model'}) reported "
                f"{label or 'an event'}; no reasoner has looked at it"
            ),
            action="none",
            gate_correct=None,
            provisional=True,
            extra={
                "echo": True,
                "frames": len(event.frames),
                "audio": event.audio_wav is not None,
                "features_shape": list(event.features_shape),
            },
        )

    async def probe(self) -> Usage:
        return NO_USAGE

    async def close(self) -> None:
        return None

"""Training examples: every reasoned event, kept as what a retrain needs (docs/model-updates.md).

An example is the gate's *features* the event already carried (the vision model's embedding, the
audio head's input window), the gate's scores and the label that fired, the teacher's judgement
(its label, confidence, ``gate_correct``), where it came from (device, group, model version,
reasoner, provisional or not) and when. No raw media by default: a retrain of the gate's head
needs none. Key frames or audio are kept only when the fleet opts in (``[training] keep_media``),
and deleted after the retention period.

The store keeps examples (``ExampleStore``: SQLite and PostgreSQL backends beside the other
stores); a retrain reads them by model and scope and records the ids it used in its report, so
it can be reproduced from exactly those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgekeeper.protocol.release import Scope


@dataclass(frozen=True)
class TrainingExample:
    device_id: str
    seq: int
    model: str  # model family: "person", "sound"
    model_version: str  # the version that scored it ("1.1.0")
    modality: str  # "vision" | "audio"
    features: np.ndarray = field(compare=False)  # float32, the shape the event carried
    scores: dict[str, float]  # the gate's scores per label
    gate_label: str  # the label that fired
    teacher_label: str  # the reasoner's label, free text as it said it
    target: str | None  # the gate label this example teaches (None: it teaches nothing)
    teacher_confidence: float
    gate_correct: bool | None
    reasoner: str
    provisional: bool
    weight: float  # the training weight by the documented rule (0: left out)
    captured_at: float
    reasoned_at: float
    group: str = ""  # the device's group ("" none)
    media_path: str | None = None  # opt-in raw media kept for full fine-tuning
    id: int | None = None  # the store's row id (None before it is stored)


class ExampleStore(Protocol):
    """Where examples live: a table beside the results, in the same database as the store."""

    async def add_example(self, example: TrainingExample) -> int | None:
        """Store one example; None when this (device, seq, model) is already stored."""
        ...

    async def examples(
        self,
        *,
        model: str,
        scope: Scope,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100_000,
    ) -> list[TrainingExample]:
        """Examples of ``model`` within ``scope`` (a group's devices, one device, or all),
        reasoned in [since, until), oldest first, with their ids."""
        ...

    async def examples_by_ids(self, ids: Sequence[int]) -> list[TrainingExample]:
        """Exactly these rows (reproducing a retrain from its report)."""
        ...

    async def forget_media(self, *, before: float) -> int:
        """Delete kept media of examples reasoned before ``before``; return how many."""
        ...


def features_of(example: TrainingExample) -> np.ndarray:
    """The features as float32 (a copy the caller may change)."""
    return np.asarray(example.features, dtype=np.float32).copy()

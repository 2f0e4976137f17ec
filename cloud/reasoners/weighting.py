"""How much a teacher's judgement counts as a training label for the gate (the learning loop).

The rule (docs/reasoning.md, "Labels for training"), in order:

1. A judgement that gives no opinion of the gate's decision (``gate_correct`` is None, or the
   label is empty, "unknown" or "uncertain") weighs 0: it is left out.
2. A judgement whose confidence is below ``MIN_CONFIDENCE`` (0.6) weighs 0: a coin flip
   teaches the gate noise.
3. A result of the echo reasoner weighs 0 whatever it says: it repeats the gate, so training
   on it would only reinforce the gate's own mistakes.
4. Otherwise the weight is the confidence, times ``PROVISIONAL_FACTOR`` (0.5) when the label
   is provisional (the offline teacher, a fallback or a cheaper path), times 1.0 for an LLM's
   judgement. So an LLM at 0.9 weighs 0.9; the offline teacher at 0.8 weighs 0.4.

The function takes a ``Verdict`` (the worker's view), a ``ResultBody``-like object or a mapping
with the same fields (what the example store keeps), so the retrain can call it on stored rows.
It is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_CONFIDENCE = 0.6
PROVISIONAL_FACTOR = 0.5
LLM_FACTOR = 1.0
NO_OPINION_LABELS = frozenset({"", "unknown", "uncertain"})
# Reasoners that only repeat the gate (``reasoner`` field of a result): never a teacher.
NOT_TEACHERS = frozenset({"echo"})


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def training_weight(judgement: Any) -> float:
    """The weight in [0, 1] of one judgement as a training label (see the module docstring).

    ``judgement``: a Verdict, a ResultBody, or a mapping with ``label``, ``confidence``,
    ``gate_correct``, ``provisional`` and optionally ``reasoner``. A missing or malformed field
    counts as "no opinion" (weight 0), never as a confident label."""
    label = _field(judgement, "label")
    confidence = _field(judgement, "confidence")
    gate_correct = _field(judgement, "gate_correct")
    provisional = _field(judgement, "provisional")
    reasoner = _field(judgement, "reasoner")
    if not isinstance(label, str) or label.strip().lower() in NO_OPINION_LABELS:
        return 0.0
    if gate_correct is None or not isinstance(gate_correct, bool):
        return 0.0
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        return 0.0
    conf = float(confidence)
    if not math.isfinite(conf) or not 0.0 <= conf <= 1.0 or conf < MIN_CONFIDENCE:
        return 0.0
    if isinstance(reasoner, str) and reasoner.split(":", 1)[0] in NOT_TEACHERS:
        return 0.0
    # Anything not explicitly an LLM's judgement is treated as provisional.
    factor = LLM_FACTOR if provisional is False else PROVISIONAL_FACTOR
    return round(conf * factor, 4)

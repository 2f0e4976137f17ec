"""What the worker asks about each event: the Reasoner protocol and its answer, the Verdict.

A reasoner sees the decrypted EventBody and returns a Verdict; the worker, not the reasoner,
fills in the device id, seq, reasoner name and time, so a reasoner cannot address a result to the
wrong device. Backends are picked by name (cloud.reasoner) from REASONERS, a table of lazy
imports, so the echo reasoner never imports the anthropic SDK.

Errors: raise ``ReasonerUnavailable`` (retryable: rate limits, timeouts, 5xx) and the worker
nacks the event for a later attempt; raise a ``PermanentError`` (the event can never be reasoned
about, e.g. the provider refuses its content) and it goes to the dead-letter list.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edgekeeper.errors import ConfigError, RetryableError
from edgekeeper.protocol.messages import EventBody


class ReasonerUnavailable(RetryableError):
    """The reasoner could not answer now; the event will be tried again."""


@dataclass(frozen=True)
class Verdict:
    label: str
    confidence: float
    summary: str
    action: str
    # The reasoner's opinion of the gate's decision (None: it cannot tell). Feeds retraining.
    gate_correct: bool | None
    # True when no real judgement was made (echo, fallbacks): never train on those.
    provisional: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.confidence) or not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence!r}")


@runtime_checkable
class Reasoner(Protocol):
    name: str

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict: ...

    async def close(self) -> None: ...


# name -> (module, class). Explicit beats discovery.
REASONERS: dict[str, tuple[str, str]] = {
    "echo": ("edgekeeper.cloud.reasoners.echo", "EchoReasoner"),
}


def load_reasoner(name: str, **kwargs: Any) -> Reasoner:
    try:
        module, cls = REASONERS[name]
    except KeyError:
        raise ConfigError(
            f"cloud.reasoner = {name!r} is not a known reasoner",
            fix=f"use one of: {', '.join(sorted(REASONERS))}",
        ) from None
    reasoner: Reasoner = getattr(importlib.import_module(module), cls)(**kwargs)
    return reasoner

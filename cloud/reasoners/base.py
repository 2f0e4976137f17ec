"""What the worker asks about each event: the Reasoner protocol, its answer (the Verdict, with
the Usage it cost) and how a reasoner is chosen.

A reasoner sees the decrypted EventBody and returns a Verdict; the worker, not the reasoner,
fills in the device id, seq, reasoner name and time, so a reasoner cannot address a result to the
wrong device. Backends are picked by name from REASONERS, a table of lazy imports, so the echo
and offline reasoners never import the anthropic SDK and the device never imports any of them.

Errors, shaped by what the worker should do:

* ``ProviderUnavailable`` (retryable): the provider as a whole cannot answer now (5xx, 529,
  timeouts, 429 once the SDK's own retries are spent, a rejected key). The worker puts the
  event back, stops leasing and probes the provider (``Reasoner.probe``) until it answers.
* ``ReasonerUnavailable`` (retryable): this event could not be answered now (e.g. a malformed
  answer: ``MalformedAnswer``); it is retried with a growing delay and dead-lettered after
  ``cloud.queue_max_attempts`` deliveries.
* a ``PermanentError``: the event can never be reasoned about (the provider refuses its
  content); it goes to the dead-letter list at once.
* ``ProviderRefused`` (a FatalError): the provider refuses the worker itself (a rejected or
  unauthorised API key, a model it does not know). No event can pass, so the worker stops with
  the fix instead of retrying forever.

Any of them may carry the ``usage`` of a provider call that was paid for and still failed (a
malformed answer costs tokens), so the worker records it against the budget.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edgekeeper.errors import ConfigError, FatalError, RetryableError
from edgekeeper.protocol.messages import EventBody

if TYPE_CHECKING:
    from edgekeeper.config import Config


@dataclass(frozen=True)
class Usage:
    """What one provider call used. ``model`` is the priced model; "" for a local reasoner
    (free). ``call_id`` names the call (the provider's message id) so recording is idempotent."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    model: str = ""
    call_id: str = ""

    @property
    def tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_write_tokens
                + self.cache_read_tokens)

    @property
    def billable(self) -> bool:
        return bool(self.model) and self.tokens > 0


NO_USAGE = Usage()


class ReasonerUnavailable(RetryableError):
    """The reasoner could not answer now; the event will be tried again."""

    def __init__(self, message: str, *, fix: str | None = None,
                 usage: Usage | None = None) -> None:
        super().__init__(message, fix=fix)
        self.usage = usage or NO_USAGE


class ProviderUnavailable(ReasonerUnavailable):
    """The provider as a whole is failing (not this event): back off, then probe.

    ``retry_after`` is the provider's own hint in seconds (429/529 ``retry-after``), if any."""

    def __init__(self, message: str, *, fix: str | None = None, usage: Usage | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, fix=fix, usage=usage)
        self.retry_after = retry_after


class ProviderRefused(FatalError):
    """The provider refuses this worker (401/403: the key; 404: the model): stop, show the fix."""

    def __init__(self, message: str, *, fix: str | None = None,
                 usage: Usage | None = None) -> None:
        super().__init__(message, fix=fix)
        self.usage = usage or NO_USAGE


class MalformedAnswer(ReasonerUnavailable):
    """The provider answered, but not with a valid judgement (no tool call, wrong types, values
    out of range). Retried like any transient failure; the tokens were still spent."""


@dataclass(frozen=True)
class Verdict:
    label: str
    confidence: float
    summary: str
    action: str
    # The reasoner's opinion of the gate's decision (None: it cannot tell). Feeds retraining.
    gate_correct: bool | None
    # True when no real judgement was made (echo, offline teacher, fallbacks): never train on
    # those as if an LLM had labelled them, and never give them more authority.
    provisional: bool
    extra: dict[str, Any] = field(default_factory=dict)
    usage: Usage = NO_USAGE

    def __post_init__(self) -> None:
        if not math.isfinite(self.confidence) or not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence!r}")


@runtime_checkable
class Reasoner(Protocol):
    # Written into every result (``reasoner``): "anthropic:<model>", "offline:hog+haar", "echo".
    name: str

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict: ...

    async def probe(self) -> Usage:
        """One small call to learn whether the provider answers again (after a
        ProviderUnavailable); raise ProviderUnavailable if not. Local reasoners return at once."""
        ...

    async def close(self) -> None: ...


# name -> (module, class). Explicit beats discovery.
REASONERS: dict[str, tuple[str, str]] = {
    "echo": ("edgekeeper.cloud.reasoners.echo", "EchoReasoner"),
    "offline": ("edgekeeper.cloud.reasoners.offline", "OfflineReasoner"),
    "anthropic": ("edgekeeper.cloud.reasoners.anthropic", "AnthropicReasoner"),
}
CHOICES = ("auto", *REASONERS)


def resolve_name(name: str, environ: Mapping[str, str] | None = None) -> str:
    """``auto`` -> ``anthropic`` when ANTHROPIC_API_KEY is set (non-empty), else ``offline``."""
    env = os.environ if environ is None else environ
    if name == "auto":
        return "anthropic" if env.get("ANTHROPIC_API_KEY", "").strip() else "offline"
    return name


def load_reasoner(name: str, config: Config | None = None, **kwargs: Any) -> Reasoner:
    """Build the reasoner called ``name`` (``cloud.reasoner``; ``auto`` resolved here), tuned
    by ``config``'s [reasoner] and [budget] sections (defaults when None)."""
    environ = kwargs.pop("environ", None)
    resolved = resolve_name(name, environ)
    try:
        module, cls = REASONERS[resolved]
    except KeyError:
        raise ConfigError(
            f"cloud.reasoner = {name!r} is not a known reasoner",
            fix=f"use one of: {', '.join(CHOICES)}",
        ) from None
    if environ is not None:
        kwargs["environ"] = environ
    reasoner: Reasoner = getattr(importlib.import_module(module), cls)(config=config, **kwargs)
    return reasoner

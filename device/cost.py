"""What reasoning about a replay's events would cost in the cloud: an estimate, on the device side.

The cloud prices real calls from the provider's reported usage (cloud/budget.py). A replay makes
no call, so this module rebuilds the size of the request the cloud worker would send for each
event (cloud/reasoners/anthropic.py ``build_request``, described in docs/reasoning.md "What the
model sees") and prices it with the same table, ``[budget.prices]`` for ``reasoner.model``
(edgekeeper/config.py ``DEFAULT_PRICES``). The device never imports the cloud (import-linter),
so the figures it needs are restated here, each with where it comes from:

* ``PREFIX_TOKENS``: the tools and system prompt, "about 1,100 tokens" (docs/reasoning.md), the
  same for every event: written to the prompt cache on the first call and read from it (a tenth
  of the input price) by every call within ``CACHE_SECONDS`` of the previous one;
* ``CACHE_SECONDS``: the 5-minute ephemeral cache the system prompt uses (docs/reasoning.md,
  ``ModelPrice.cache_write`` in edgekeeper/config.py);
* images: up to ``reasoner.max_frames`` key frames, each scaled so its longer side is at most
  ``reasoner.image_max_side``, at "about width x height / 750 input tokens" each
  (docs/reasoning.md, from Anthropic's vision documentation);
* text: the event's metadata as JSON (capped at ``MAX_META_CHARS``, as the worker caps it) inside
  the worker's description of the event (``TEXT_OVERHEAD_CHARS``: device id, times, frames shown,
  the audio summary), at ``CHARS_PER_TOKEN`` characters a token (the usual rule of thumb for
  English and JSON; tests/fake_anthropic.py bills text the same way);
* ``OUTPUT_TOKENS``: the forced ``record_judgement`` tool call, five fields with a one- or
  two-sentence summary. An assumption, not a measurement: about 150 tokens.

It is an estimate for comparing two models on the same recordings (more events, more frames:
more cost), not a bill.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgekeeper.config import Config

PREFIX_TOKENS = 1100
CACHE_SECONDS = 300.0
PIXELS_PER_IMAGE_TOKEN = 750
MAX_META_CHARS = 6000
TEXT_OVERHEAD_CHARS = 600
CHARS_PER_TOKEN = 4
OUTPUT_TOKENS = 150


@dataclass(frozen=True)
class CostEstimate:
    model: str
    events: int
    input_tokens: int  # uncached input: the event's text and images
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    usd: float | None  # None: reasoner.model has no row in [budget.prices]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "events": self.events,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "usd": None if self.usd is None else round(self.usd, 6),
            "usd_per_event": (
                round(self.usd / self.events, 6) if self.usd is not None and self.events else None
            ),
        }


def image_tokens(width: int, height: int, max_side: int) -> int:
    """Input tokens of one frame after the worker scales its longer side to ``max_side``."""
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return max(1, round(width * height / PIXELS_PER_IMAGE_TOKEN))


def event_input_tokens(meta: dict[str, Any], frame_sizes: list[tuple[int, int]],
                       config: Config) -> int:
    """Uncached input tokens of one event's request: the images shown and the text."""
    shown = frame_sizes[: config.reasoner.max_frames] if config.reasoner.max_frames else []
    images = sum(image_tokens(w, h, config.reasoner.image_max_side) for w, h in shown)
    text = len(json.dumps(meta, sort_keys=True, ensure_ascii=False))
    text = min(text, MAX_META_CHARS) + TEXT_OVERHEAD_CHARS
    return images + -(-text // CHARS_PER_TOKEN)


def estimate(
    runs: Iterable[tuple[list[dict[str, Any]], dict[int, list[tuple[int, int]]]]],
    config: Config,
) -> CostEstimate:
    """The cost of reasoning about every event of ``runs``: per recording, its event metadata
    (in capture order) and each event's key-frame sizes. Each recording is its own session for
    the prompt cache (the first event writes it; a gap over CACHE_SECONDS writes it again)."""
    model = config.reasoner.model
    events = inp = write = read = 0
    for metas, sizes in runs:
        last: float | None = None
        for meta in metas:
            events += 1
            gate_meta = {k: v for k, v in meta.items() if k != "payload_bytes"}
            inp += event_input_tokens(gate_meta, sizes.get(int(meta["seq"]), []), config)
            t = float(meta["trigger_t"])
            if last is None or t - last > CACHE_SECONDS:
                write += PREFIX_TOKENS
            else:
                read += PREFIX_TOKENS
            last = t
    out = events * OUTPUT_TOKENS
    price = config.budget.prices.get(model)
    usd = None
    if price is not None:
        usd = (inp * price.input + out * price.output + write * price.cache_write
               + read * price.cache_read) / 1_000_000
    return CostEstimate(model, events, inp, out, write, read, usd)

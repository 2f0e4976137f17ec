"""Held-out evaluation of the converted .tflite files with ai_edge_litert (what devices run).

Keras scores are never reported: quantisation and conversion can change a model's behaviour, so
every figure on a model card comes from the exact bytes that ship. No TensorFlow here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.errors import ModelError

SMOOTH_K, SMOOTH_N = 3, 5  # trigger when 3 of the last 5 gate windows pass the threshold


class TFLiteModel:
    """One .tflite file behind a float-in, float-out call, quantising as docs/models.md says."""

    def __init__(self, path: Path, *, num_threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        if not path.is_file():
            raise ModelError(f"model file {path} does not exist", fix="run the recipe first")
        self.path = path
        self._it: Any = Interpreter(model_path=str(path), num_threads=num_threads)
        self._it.allocate_tensors()
        self.input = self._it.get_input_details()[0]
        self.outputs = self._it.get_output_details()

    @property
    def input_dtype(self) -> type:
        return self.input["dtype"]  # type: ignore[no-any-return]

    def _quantise(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype in (np.int8, np.uint8):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            q: np.ndarray = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
            return q
        return x.astype(np.float32)

    def _dequantise(self, y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
        if detail["dtype"] in (np.int8, np.uint8):
            scale, zero = detail["quantization"]
            real: np.ndarray = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
            return real
        return y.astype(np.float32)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one example (without batch axis); outputs in get_output_details() order."""
        self._it.set_tensor(self.input["index"], self._quantise(x[None]))
        self._it.invoke()
        return [self._dequantise(self._it.get_tensor(d["index"]), d)[0] for d in self.outputs]

    def batch(self, xs: np.ndarray, output: int) -> np.ndarray:
        return np.stack([self(x)[output] for x in xs])

    def output_roles(self, n_labels: int) -> dict[str, int]:
        """Which output index is ``scores`` and which ``embedding``, decided by shape.

        The converter does not promise to keep Keras' output order, so the manifest's
        ``outputs`` is written from what the converted file actually contains.
        """
        roles: dict[str, int] = {}
        for i, d in enumerate(self.outputs):
            size = int(np.prod(d["shape"][1:]))
            role = "scores" if size == n_labels else "embedding"
            if role in roles:
                raise ModelError(f"{self.path}: two outputs look like {role!r} (size {size})")
            roles[role] = i
        if "scores" not in roles:
            raise ModelError(f"{self.path}: no output has {n_labels} values for the labels")
        return roles

    def latency_ms(self, x: np.ndarray, runs: int = 200) -> dict[str, float]:
        """p50/p99 of single inferences (set, invoke, get), after a warm-up."""
        for _ in range(10):
            self(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self(x)
            times.append((time.perf_counter() - t0) * 1000)
        return {
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
        }


def precision_recall(p: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision/recall of ``p >= threshold`` against boolean ground truth ``positive``."""
    pred = p >= threshold
    tp = int(np.sum(pred & positive))
    fp = int(np.sum(pred & ~positive))
    fn = int(np.sum(~pred & positive))
    return {
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def smoothed(
    passes: Sequence[bool] | np.ndarray, k: int = SMOOTH_K, n: int = SMOOTH_N
) -> np.ndarray:
    """Per-step state of a k-of-n vote over the last n threshold decisions."""
    passes = np.asarray(passes, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(passes)])
    idx = np.arange(1, len(passes) + 1)
    votes: np.ndarray = csum[idx] - csum[np.maximum(0, idx - n)]
    return votes >= k


def trigger_onsets(state: np.ndarray) -> np.ndarray:
    """Indices where the smoothed state switches on: each is one trigger (one event sent)."""
    state = np.asarray(state, dtype=bool)
    prev = np.concatenate([[False], state[:-1]])
    return np.nonzero(state & ~prev)[0]


def triggers_per_hour(p: np.ndarray, threshold: float, step_seconds: float) -> dict[str, float]:
    """False triggers on a stream with no events, with and without 3-of-5 smoothing."""
    hours = len(p) * step_seconds / 3600
    raw = trigger_onsets(p >= threshold)
    smooth = trigger_onsets(smoothed(p >= threshold))
    return {
        "hours": round(hours, 4),
        "per_window_triggers_per_hour": round(len(raw) / hours, 2),
        "smoothed_triggers_per_hour": round(len(smooth) / hours, 2),
    }


def event_recall(
    p: np.ndarray,
    end_times: np.ndarray,
    window_seconds: float,
    events: Sequence[tuple[str, float, float]],
    label: str,
    threshold: float,
) -> dict[str, float]:
    """Share of ``label`` events caught by a smoothed trigger while the event is in the window.

    A trigger counts for an event when its window overlaps the event (up to 2 s after it ends,
    which is how long the event stays inside a 2 s window).
    """
    state = smoothed(p >= threshold)
    onsets = end_times[trigger_onsets(state)]
    on_times = end_times[state]
    evs = [(s, e) for lab, s, e in events if lab == label]
    caught = sum(bool(np.any((on_times > s) & (on_times <= e + window_seconds))) for s, e in evs)
    inside = np.zeros(len(onsets), dtype=bool)
    for _lab, s, e in events:
        inside |= (onsets > s) & (onsets <= e + window_seconds)
    return {
        "events": len(evs),
        "caught": int(caught),
        "recall": round(caught / len(evs), 4) if evs else 1.0,
        "triggers_outside_events": int(np.sum(~inside)),
    }


# ----------------------------------------------- event figures through the device's trigger rule


def policy_fires(
    scores: np.ndarray,
    ends: np.ndarray,
    labels: Sequence[str],
    thresholds: dict[str, float] | None = None,
) -> list[tuple[str, float]]:
    """``(label, time)`` of every fire of the device's default trigger rules over a stream.

    Runs the real ``TriggerPolicy`` (k-of-n, min_span_seconds, hysteresis) with the default
    ``[trigger.labels]`` thresholds, as a deployed gate would, except that cooldowns and the
    hourly cap are off: every activation counts, so a figure here can only be worse than a
    device's. ``thresholds`` overrides some labels' thresholds (release scales with them), to
    trace an operating curve.
    """
    from dataclasses import replace

    from edgekeeper.config import TriggerSection
    from edgekeeper.device.trigger import TriggerPolicy

    base = TriggerSection()
    rules = {k: replace(r, cooldown_seconds=0.0) for k, r in base.labels.items()}
    for k, thr in (thresholds or {}).items():
        r = rules[k]
        rules[k] = replace(r, threshold=thr, release=r.release * thr / r.threshold)
    policy = TriggerPolicy(replace(base, labels=rules, max_events_per_hour=1_000_000))
    fires = []
    for t, row in zip(ends, scores, strict=True):
        named = {lab: float(s) for lab, s in zip(labels, row, strict=True)}
        fires += [(d.label, float(t)) for d in policy.update(float(t), named) if d.fired]
    return fires


def fired_events(
    fires: Sequence[tuple[str, float]],
    events: Sequence[tuple[str, float, float]],
    label: str,
    window_seconds: float,
) -> dict[str, float]:
    """Events of ``label`` caught by a fire of ``label`` while in the window, and the other fires.

    A fire counts for an event when it comes after the event starts and at most one window
    length after it ends (the event is still inside the window). A fire of ``label`` that
    overlaps no event of ``label`` is a false trigger.
    """
    times = np.array([t for lab, t in fires if lab == label])
    evs = [(s, e) for lab, s, e in events if lab == label]
    caught = sum(bool(np.any((times > s) & (times <= e + window_seconds))) for s, e in evs)
    false = sum(
        not any(s < t <= e + window_seconds for s, e in evs) for t in times
    )
    return {
        "events": len(evs),
        "caught": int(caught),
        "recall": round(caught / len(evs), 4) if evs else 1.0,
        "fires": len(times),
        "false_fires": int(false),
    }

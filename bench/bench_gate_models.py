"""Latency of the shipped gate models with ai_edge_litert, as ratios against a baseline.

    python bench/bench_gate_models.py [--runs 300] [--threads 2]

Runs, interleaved round by round so background load hits every variant alike:

* person: ``person-int8.tflite`` vs ``person-float.tflite`` on a real held-out frame of the
  bundled sample (one invoke: set input, invoke, read both outputs);
* sound head: ``sound-int8.tflite`` vs ``sound-float.tflite`` on real features of the sample;
* sound window: the whole audio gate on one 2 s window (mel + 16 embeddings + int8 head), as
  the baseline for what the head adds, and a 0.48 s hop's share (mel + 6 new embeddings + head),
  which is what the device pays when it reuses embeddings across overlapping windows.

Prints one JSON object with p50 in ms (context) and the ratios (the figures to record).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgekeeper.cloud.training.evaluate import TFLiteModel
from edgekeeper.cloud.training.features import AudioFrontend, frame_to_input

MODELS = Path(__file__).resolve().parent.parent / "models"


def _p50(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="invokes per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    sample = MODELS / "samples" / "street"
    cap = cv2.VideoCapture(str(sample / "video.avi"))
    ok, frame = cap.read()
    assert ok, "cannot read the sample video"
    manifest = json.loads((MODELS / "person" / "manifest-int8.json").read_text())
    v = manifest["vision"]
    image = frame_to_input(frame, v["width"], v["height"])
    with wave.open(str(sample / "audio.wav"), "rb") as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    window = audio[12 * 16000 : 14 * 16000]
    fe = AudioFrontend(MODELS / "frontends", num_threads=args.threads)
    feats = fe.features(window)
    mel = fe.mel(window)

    person = {
        k: TFLiteModel(MODELS / "person" / f"person-{k}.tflite", num_threads=args.threads)
        for k in ("float", "int8")
    }
    sound = {
        k: TFLiteModel(MODELS / "sound" / f"sound-{k}.tflite", num_threads=args.threads)
        for k in ("float", "int8")
    }
    hop_fe = AudioFrontend(MODELS / "frontends", num_threads=args.threads)
    new_rows = mel[-(76 + 5 * 8) :]  # the 6 embeddings a 0.48 s hop adds

    def whole_window() -> None:
        sound["int8"](fe.features(window))

    def hop_share() -> None:
        fe.mel(window)
        hop_fe.embeddings(new_rows)
        sound["int8"](feats)

    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in (
            ("person_float", lambda: person["float"](image)),
            ("person_int8", lambda: person["int8"](image)),
            ("sound_head_float", lambda: sound["float"](feats)),
            ("sound_head_int8", lambda: sound["int8"](feats)),
            ("sound_window_from_scratch", whole_window),
            ("sound_window_hop_reuse", hop_share),
        ):
            fn()
            results.setdefault(name, []).append(_p50(fn, args.runs))
    p50 = {k: round(statistics.median(v), 3) for k, v in results.items()}
    out = {
        "machine": platform.machine(),
        "threads": args.threads,
        "p50_ms": p50,
        "ratios": {
            "person_int8_over_float": round(p50["person_int8"] / p50["person_float"], 3),
            "sound_head_int8_over_float": round(
                p50["sound_head_int8"] / p50["sound_head_float"], 3
            ),
            "sound_head_over_whole_window": round(
                p50["sound_head_int8"] / p50["sound_window_from_scratch"], 3
            ),
            "hop_reuse_over_from_scratch": round(
                p50["sound_window_hop_reuse"] / p50["sound_window_from_scratch"], 3
            ),
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

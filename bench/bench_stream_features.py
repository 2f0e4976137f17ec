"""Featurising a long recording: ``AudioFrontend.stream`` (shared mel rows and embeddings) vs
one ``features()`` call per window, as a ratio measured in one run.

    python bench/bench_stream_features.py [--seconds 120] [--rounds 3] [--threads 2]

The signal is the bundled sample recording (real audio) looped to ``--seconds``; both ways
give every 2 s window every 0.48 s, and the script checks they are bit-identical before timing.
The recipe featurises about an hour of held-out streams this way (models/sound/MODEL_CARD.md).
Prints one JSON object: seconds per way (context) and stream / per-window (the figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import wave
from pathlib import Path

import numpy as np

from edgekeeper.cloud.training.features import AudioFrontend

MODELS = Path(__file__).resolve().parent.parent / "models"
WIN, HOP = 32_000, 7_680


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with wave.open(str(MODELS / "samples" / "street" / "audio.wav"), "rb") as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    signal = np.resize(audio, int(args.seconds * 16_000))
    # One front end per way, so neither pays for re-sizing the other's interpreter tensors.
    fe = AudioFrontend(MODELS / "frontends", num_threads=args.threads)
    fs = AudioFrontend(MODELS / "frontends", num_threads=args.threads)

    def per_window() -> list[np.ndarray]:
        return [fe.features(signal[e - WIN : e]) for e in range(WIN, len(signal) + 1, HOP)]

    def shared() -> list[np.ndarray]:
        return [wf.features for wf in fs.stream(signal)]

    a, b = per_window(), shared()
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    times: dict[str, list[float]] = {"per_window": [], "stream": []}
    for _ in range(args.rounds):  # interleaved, so background load hits both alike
        for name, fn in (("per_window", per_window), ("stream", shared)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "machine": platform.machine(),
        "threads": args.threads,
        "windows": len(a),
        "seconds": {k: round(v, 2) for k, v in med.items()},
        "stream_over_per_window": round(med["stream"] / med["per_window"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()

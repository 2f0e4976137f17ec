"""p50/p99 latency of one gate inference for each default model (float and int8).

Inputs are real: frames of vtest.avi (or the bundled sample) and 2-second windows of the sample's
audio. Each model runs in its runner exactly as the gate runs it (preprocessing included), with
num_threads from the default config. Goal (issue 3): under 10 ms on this machine.

    python bench/bench_gate_latency.py [--n 300] [--baseline-models DIR]

``--baseline-models DIR`` also runs the person and sound gates of another models folder (say
main's, from ``git archive main models | tar -x -C /tmp/main``) in the same run, and reports
each default gate's p50 against that baseline's (``p50_vs_baseline``): a retrained model is
compared on the same machine at the same moment.
"""

from __future__ import annotations

import argparse
import time
import wave
from pathlib import Path

import numpy as np

from edgekeeper import config as config_mod
from edgekeeper.device.gate import ModelRunner

from _common import SAMPLE, decode, emit, percentiles, video_path


def interleaved(baseline: Path, pcm: np.ndarray, n: int, threads: int) -> dict[str, float]:
    """p50 of the default sound gate and the baseline's, one window each in turn (the order
    alternating), so a load that comes and goes hits both alike: the fair same-run ratio."""
    out: dict[str, float] = {}
    for variant in ("float", "int8"):
        runners = {
            "default": ModelRunner.load(
                config_mod.resolve_model("builtin:sound", variant), threads),
            "baseline": ModelRunner.load(baseline / "sound" / f"manifest-{variant}.json", threads),
        }
        a = runners["default"].manifest.audio
        assert a is not None
        stream = np.tile(pcm, 1 + ((n + 10) * a.hop_samples) // len(pcm) + 1)
        ms: dict[str, list[float]] = {k: [] for k in runners}
        for i in range(n + 10):
            end = a.window_samples + i * a.hop_samples
            for k in (("default", "baseline") if i % 2 == 0 else ("baseline", "default")):
                t0 = time.perf_counter()
                runners[k].classify(stream[end - a.window_samples : end], end)
                ms[k].append((time.perf_counter() - t0) * 1000)
        p50 = {k: percentiles(v[10:])["p50"] for k, v in ms.items()}  # after a warm-up
        out[f"sound:{variant}:default_p50_ms"] = round(p50["default"], 2)
        out[f"sound:{variant}:baseline_p50_ms"] = round(p50["baseline"], 2)
        out[f"sound:{variant}:p50_vs_baseline"] = round(p50["default"] / p50["baseline"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--baseline-models", type=Path, default=None,
                    help="another models/ folder to run in the same process, e.g. main's")
    args = ap.parse_args()
    from edgekeeper import log

    log.configure("error", "json")
    cfg = config_mod.load(None, env={})
    frames = decode(video_path(), min(args.n, 200))
    with wave.open(str(SAMPLE / "audio.wav"), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        rate = w.getframerate()
    figures = {}
    gates = [("", config_mod.resolve_model(spec, variant), variant)
             for spec in (cfg.gate.vision_model, cfg.gate.audio_model)
             for variant in ("float", "int8")]
    if args.baseline_models is not None:
        gates += [("baseline:", args.baseline_models / name / f"manifest-{variant}.json", variant)
                  for name in ("person", "sound") for variant in ("float", "int8")]
    for prefix, manifest_path, variant in gates:
        runner = ModelRunner.load(manifest_path, cfg.gate.num_threads)
        runs: dict[str, list[tuple[object, int | None]]] = {}
        if runner.manifest.modality == "vision":
            runs["frame"] = [(frames[i % len(frames)], None) for i in range(args.n)]
        else:
            a = runner.manifest.audio
            assert a is not None and a.sample_rate == rate
            # As the loop runs it: consecutive windows one hop apart, with their stream
            # position, so the embeddings of the overlap are reused.
            stream = np.tile(pcm, 1 + (args.n * a.hop_samples) // len(pcm) + 1)
            ends = [a.window_samples + i * a.hop_samples for i in range(args.n)]
            runs["window, as in the loop"] = [
                (stream[e - a.window_samples : e], e) for e in ends]
            # Worst case: a window sharing nothing with the previous one.
            runs["cold window"] = [(stream[e - a.window_samples : e], None) for e in ends]
        for name, inputs in runs.items():
            for x, pos in inputs[:10]:  # warm-up
                runner.classify(x, pos)
            if name != "cold window":
                runner = ModelRunner.load(runner.manifest.path, cfg.gate.num_threads)
            ms = []
            for x, pos in inputs:
                t0 = time.perf_counter()
                runner.classify(x, pos)
                ms.append((time.perf_counter() - t0) * 1000)
            p = percentiles(ms)
            figures[f"{prefix}{runner.manifest.tag}:{variant}:{name}"] = {
                "p50_ms": round(p["p50"], 2), "p99_ms": round(p["p99"], 2), "n": len(ms)}
    # The same-run baseline for audio: a window as the loop runs it against a cold one (nothing
    # cached), which is what every hop cost before the gate cached front-end frames and
    # embeddings.
    for key, fig in figures.items():
        cold = figures.get(key.replace("window, as in the loop", "cold window"))
        if cold is not None and cold is not fig:
            fig["p50_vs_cold_window"] = round(fig["p50_ms"] / cold["p50_ms"], 3)
    # The same-run baseline for a retrained model: the same gate and variant from the other
    # models folder (tags may differ in version only).
    for key, fig in figures.items():
        if key.startswith("baseline:"):
            continue
        name, _, rest = key.partition("@")
        rest = rest.split(":", 1)[1]
        base = [f for k, f in figures.items()
                if k.startswith(f"baseline:{name}@") and k.split(":", 2)[2] == rest]
        if base:
            fig["p50_vs_baseline"] = round(fig["p50_ms"] / base[0]["p50_ms"], 3)
    if args.baseline_models is not None:
        figures["interleaved_vs_baseline"] = interleaved(args.baseline_models, pcm, args.n,
                                                         cfg.gate.num_threads)
    emit("gate_latency", {"num_threads": cfg.gate.num_threads, "models": figures,
                          "goal": "p50 < 10 ms"})


if __name__ == "__main__":
    main()

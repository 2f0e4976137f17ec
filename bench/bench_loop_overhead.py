"""Loop overhead: the whole device loop (pre-gate off) vs a bare invoke loop, same frames/model.

Bare loop: for each decoded frame, the minimum any classifier needs: resize/normalise/quantise
(the same ModelRunner.preprocess_image), set_tensor, invoke, read the output. Whole loop: the
same frames through a reader thread, the handoff queue, the gate's own thread, the trigger policy,
the capture rings and the sink. Both in one run, alternating rounds; the ratio is what matters.

    python bench/bench_loop_overhead.py [--frames 300] [--rounds 3] [--variant int8]
Target (issue 3): ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekeeper import config as config_mod
from edgekeeper.device.gate import Gate, ModelRunner
from edgekeeper.device.loop import Pipeline
from edgekeeper.device.sink import LocalSink

from _common import MemoryFrames, decode, emit, video_path


def bare(runner: ModelRunner, frames: list) -> float:
    stage = runner.stages[0]
    t0 = time.perf_counter()
    for img in frames:
        stage.run(runner.preprocess_image(img))
    return len(frames) / (time.perf_counter() - t0)


async def whole(cfg: config_mod.Config, manifest: Path, frames: list) -> float:
    gate = Gate("vision", cfg.gate.num_threads)
    await gate.load(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(cfg, LocalSink(Path(tmp)), video=MemoryFrames(frames),
                        vision_gate=gate, ordered=False)
        t0 = time.perf_counter()
        stats = await pipe.run()
        elapsed = time.perf_counter() - t0
    gate.close()
    assert stats.frames_scored == len(frames), "pre-gate must be off for this benchmark"
    return len(frames) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--threads", type=int, default=0, help="gate.num_threads (default: config)")
    ap.add_argument("--manifest", default="",
                    help="another vision manifest (default: the built-in)")
    args = ap.parse_args()
    from edgekeeper import log

    log.configure("error", "json")
    cfg = config_mod.load(None, env={})
    cfg = dataclasses.replace(cfg, pregate=dataclasses.replace(cfg.pregate, motion=False),
                              gate=dataclasses.replace(cfg.gate, variant=args.variant,
                                                       num_threads=args.threads
                                                       or cfg.gate.num_threads))
    manifest = (Path(args.manifest) if args.manifest
                else config_mod.resolve_model(cfg.gate.vision_model, args.variant))
    frames = decode(video_path(), args.frames)
    runner = ModelRunner.load(manifest, cfg.gate.num_threads)
    bare_fps, loop_fps = [], []
    for _ in range(args.rounds):
        bare_fps.append(bare(runner, frames))
        loop_fps.append(asyncio.run(whole(cfg, manifest, frames)))
    # Each round's ratio compares two runs a second apart; the median of those is robust to
    # the shared machine's load changing during the benchmark.
    ratios = sorted(lp / bp for lp, bp in zip(loop_fps, bare_fps, strict=True))
    emit("loop_overhead", {
        "video": str(video_path()), "frames": len(frames), "model": runner.manifest.tag,
        "variant": args.variant, "num_threads": cfg.gate.num_threads,
        "bare_fps": [round(x, 1) for x in bare_fps],
        "loop_fps": [round(x, 1) for x in loop_fps],
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_loop_over_bare_median": round(float(np.median(ratios)), 3), "target": ">= 0.90",
    })


if __name__ == "__main__":
    main()

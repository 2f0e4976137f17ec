"""How long one retrain round takes: 10,000 examples per model family (target: 5 minutes).

    python bench/bench_retrain.py [--n 10000] [--only person|sound]

Examples are real gate features (the recipe's own, models/NAME/rehearsal.npz) with a little
noise, spread over two days, labelled with their true class; a round on 1,000 examples runs
first in the same process as the baseline the ratio is printed against (what grows with the
examples, and what does not). Wall time of ``retrain()`` end to end: loading, the check of the
current head, training, float and int8 conversion, evaluation, the candidate folder and its
report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekeeper import config as config_mod
from edgekeeper.cloud.training import rehearsal
from edgekeeper.cloud.training.examples import TrainingExample
from edgekeeper.cloud.training.retrain import RetrainSettings, retrain

BUDGET_S = 300.0


def examples(model: str, n: int, seed: int) -> list[TrainingExample]:
    folder = config_mod.MODELS_DIR / model
    reh = rehearsal.load(folder)
    labels = [x for x in (folder / "labels.txt").read_text().split() if x]
    x = np.concatenate([reh.train_x, reh.heldout_x])
    y = np.concatenate([reh.train_y, reh.heldout_y])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(y), n)
    times = np.sort(rng.uniform(0, 2 * 86400, n))
    scale = float(np.std(x)) * 0.05
    out = []
    for i, (j, t) in enumerate(zip(pick, times, strict=True)):
        feats = (x[j] + rng.normal(0, scale, x[j].shape)).astype(np.float32)
        out.append(TrainingExample(
            device_id=f"dev-{i % 20}", seq=i, model=model, model_version="1.1.0",
            modality="vision" if model == "person" else "audio", features=feats, scores={},
            gate_label=labels[-1], teacher_label=labels[int(y[j])], target=labels[int(y[j])],
            teacher_confidence=0.9, gate_correct=None, reasoner="bench", provisional=False,
            weight=1.0, captured_at=float(t), reasoned_at=float(t) + 5, id=i + 1))
    return out


def one(model: str, n: int, tmp: Path) -> dict[str, float]:
    exs = examples(model, n, 0)
    t0 = time.perf_counter()
    res = retrain(exs, RetrainSettings(model=model, current=config_mod.MODELS_DIR / model),
                  tmp / f"{model}-{n}")
    wall = time.perf_counter() - t0
    return {"examples": n, "wall_s": round(wall, 1),
            "train_s": res.report["training"]["seconds"], "accepted": res.accepted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--only", choices=("person", "sound"))
    args = ap.parse_args()
    out = {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2), "models": {}}
    with tempfile.TemporaryDirectory() as d:
        for model in ("person", "sound"):
            if args.only and args.only != model:
                continue
            base = one(model, 1000, Path(d))
            big = one(model, args.n, Path(d))
            out["models"][model] = {
                "baseline_1000": base, "round": big,
                "ratio_vs_1000": round(big["wall_s"] / base["wall_s"], 2),
                "share_of_budget": round(big["wall_s"] / BUDGET_S, 3),
                "met": big["wall_s"] <= BUDGET_S,
            }
    out["load_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

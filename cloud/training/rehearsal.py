"""The recipe's own training and held-out features, kept small beside each model (rehearsal.npz).

A retrain mixes a sample of what the model was first trained on into the new examples so it
does not forget it, and checks the candidate on the recipe's held-out set as well as on the
scope's. Both are stored as gate *features* (what events carry), never media:

- ``models/person/rehearsal.npz``: 32-value embeddings of the recipe's training images and of
  its held-out images (held-out vtest frames, people removed, other scenes, whole unseen
  wallpaper packages with and without pasted walkers), from the int8 backbone devices run; plus
  ``check_x`` / ``check_scores``, float32 embeddings and scores of the float model, which let a
  retrain prove it read the scores layer right.
- ``models/sound/rehearsal.npz``: (16, 96) windows of the recipe's training and held-out mixes.

Arrays: ``train_x`` (float16), ``train_y`` (label index), ``heldout_x``, ``heldout_y``,
``heldout_source`` (str), and ``meta`` (JSON: sources used, counts, the sha256 of the float
model they were computed with, seed). Regenerate with::

    python -m edgekeeper.cloud.training.rehearsal --models models/ [--only person|sound]

It needs the ``train`` extra's numpy/LiteRT and the Debian packages of the recipe
(docs/models.md); a missing audio package only narrows the sources (recorded in ``meta``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.errors import ModelError

FILENAME = "rehearsal.npz"
PERSON_TRAIN_ROWS = 4000
PERSON_CHECK_ROWS = 200
SOUND_TRAIN_PER_LABEL = 40
SOUND_HELDOUT_PER_LABEL = 200


@dataclass(frozen=True)
class Rehearsal:
    train_x: np.ndarray  # float32
    train_y: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray
    heldout_source: np.ndarray
    meta: dict[str, Any]
    check_x: np.ndarray | None = None
    check_scores: np.ndarray | None = None


def load(folder: Path) -> Rehearsal:
    path = folder / FILENAME
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ModelError(
            f"{path} does not exist: a retrain needs the recipe's features beside the model",
            fix="copy it from models/NAME/ or run python -m edgekeeper.cloud.training.rehearsal",
        ) from None
    return Rehearsal(
        train_x=arrays["train_x"].astype(np.float32),
        train_y=arrays["train_y"].astype(np.int64),
        heldout_x=arrays["heldout_x"].astype(np.float32),
        heldout_y=arrays["heldout_y"].astype(np.int64),
        heldout_source=arrays["heldout_source"].astype(str),
        meta=json.loads(str(arrays["meta"])),
        check_x=arrays.get("check_x"),
        check_scores=arrays.get("check_scores"),
    )


def save(folder: Path, r: Rehearsal) -> Path:
    """Compressed, written to a temp file then renamed (never a half-written npz)."""
    arrays: dict[str, np.ndarray] = {
        "train_x": r.train_x.astype(np.float16),
        "train_y": r.train_y.astype(np.int8),
        "heldout_x": r.heldout_x.astype(np.float16),
        "heldout_y": r.heldout_y.astype(np.int8),
        "heldout_source": np.asarray(r.heldout_source, dtype=str),
        "meta": np.asarray(json.dumps(r.meta, sort_keys=True)),
    }
    if r.check_x is not None and r.check_scores is not None:
        arrays["check_x"] = r.check_x.astype(np.float32)
        arrays["check_scores"] = r.check_scores.astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    path = folder / FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- generation


def build_person(models: Path, seed: int, progress: bool) -> Rehearsal:
    from edgekeeper.cloud.training import data_vision as dv
    from edgekeeper.cloud.training.evaluate import TFLiteModel

    folder = models / "person"
    dv.check_backgrounds()
    data = dv.build(seed, progress=progress)
    int8 = TFLiteModel(folder / "person-int8.tflite")
    flt = TFLiteModel(folder / "person-float.tflite")
    r8 = int8.output_roles(2)
    rf = flt.output_roles(2)
    rng = np.random.default_rng(seed)
    tx, ty, _ = data.train
    pick = np.sort(rng.choice(len(ty), min(PERSON_TRAIN_ROWS, len(ty)), replace=False))

    def emb(x: np.ndarray) -> np.ndarray:
        xf = x.astype(np.float32) / 255.0
        return int8.batch(xf, r8["embedding"])

    hx, hy, hs = data.heldout
    parts_x, parts_y, parts_s = [emb(hx)], [hy], [hs]
    for name, (x, y) in data.heldout_sources.items():
        parts_x.append(emb(x))
        parts_y.append(y)
        parts_s.append(np.full(len(y), name))
    check = tx[pick[:PERSON_CHECK_ROWS]].astype(np.float32) / 255.0
    outs = [flt(c) for c in check]
    return Rehearsal(
        train_x=emb(tx[pick]),
        train_y=ty[pick],
        heldout_x=np.concatenate(parts_x),
        heldout_y=np.concatenate(parts_y),
        heldout_source=np.concatenate(parts_s),
        check_x=np.stack([o[rf["embedding"]] for o in outs]),
        check_scores=np.stack([o[rf["scores"]] for o in outs]),
        meta={
            "model": "person",
            "features": "int8 backbone embedding (train_x, heldout_x); float for check_x",
            "float_sha256": sha256(folder / "person-float.tflite"),
            "int8_sha256": sha256(folder / "person-int8.tflite"),
            "seed": seed,
            "train_rows_of": len(ty),
            "sources": "data_vision.build (all of the recipe's vision sources)",
        },
    )


def build_sound(models: Path, seed: int, progress: bool) -> Rehearsal:
    from edgekeeper.cloud.training import data_audio as da
    from edgekeeper.cloud.training import features as F

    # The recipe's sources, less those whose Debian package is not installed here.
    missing = sorted(k for k, s in da.SOURCES.items() if not s.root.exists() or not s.files())
    for k in missing:
        del da.SOURCES[k]
    frontend = F.AudioFrontend(models / "frontends")
    train_pools = da.load_pools(False, np.random.default_rng(seed), progress=progress)
    held_pools = da.load_pools(True, np.random.default_rng(seed + 1), progress=progress)
    tw = da.make_windows(train_pools, SOUND_TRAIN_PER_LABEL, seed, progress=progress,
                         desc="train windows")
    hw = da.make_windows(held_pools, SOUND_HELDOUT_PER_LABEL, seed + 7, progress=progress,
                         desc="held-out windows")
    return Rehearsal(
        train_x=np.stack([frontend.features(a) for a in tw.audio]),
        train_y=tw.labels,
        heldout_x=np.stack([frontend.features(a) for a in hw.audio]),
        heldout_y=hw.labels,
        heldout_source=np.full(len(hw.labels), "recipe held-out pools"),
        meta={
            "model": "sound",
            "features": "(16, 96) head input windows (features.AudioFrontend)",
            "float_sha256": sha256(models / "sound" / "sound-float.tflite"),
            "seed": seed,
            "sources_missing": missing,
            "sources": sorted(da.SOURCES),
        },
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--only", choices=("person", "sound"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    for name, build in (("person", build_person), ("sound", build_sound)):
        if args.only and args.only != name:
            continue
        t0 = time.perf_counter()
        r = build(args.models, args.seed, not args.quiet)
        path = save(args.models / name, r)
        print(f"[rehearsal] {path}: {path.stat().st_size} bytes, train {len(r.train_y)}, "
              f"held-out {len(r.heldout_y)}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

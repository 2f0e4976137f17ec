"""Rebuild the default gate models, their manifests, metrics, model cards and the sample.

    python -m edgekeeper.cloud.training.recipe --out models/

Needs the ``train`` extra (TensorFlow) and the Debian packages opencv-doc, espeak-ng, ffmpeg
and the sound sources of ``data_audio.SOURCES`` (docs/models.md lists them all). Everything is
offline except one ``pip download`` of the openWakeWord wheel when models/frontends/ lacks the
pinned files. Same seed, same data, initial weights and batch order (see train.seed_everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.cloud.training import cards, frontends, sample, sources
from edgekeeper.cloud.training.evaluate import (
    TFLiteModel,
    policy_fires,
    precision_recall,
    smoothed,
    trigger_onsets,
    triggers_per_hour,
)
from edgekeeper.errors import EdgekeeperError

VERSION = "1.0.0"
# 1.1.0: trained for low light and night, with people-like negatives; cards on unseen sources.
PERSON_VERSION = "1.1.0"
# 1.1.0: trained with music, chimes, repeated real alerts and speech labels without tones.
SOUND_VERSION = "1.1.0"
PERSON_LABELS = ("no_person", "person")
THRESHOLDS = {"person": 0.7, "speech": 0.8, "alarm": 0.6}
VISION_EPOCHS = 8
AUDIO_EPOCHS = 40
# Training windows per label (background, speech, alarm): background is the most varied.
AUDIO_TRAIN_COUNTS = (2400, 1400, 1400)
AUDIO_HELDOUT_PER_SOURCE = 150  # held-out windows per speech source
AUDIO_HELDOUT_BACKGROUND = 600
AUDIO_HELDOUT_ALARM = 300
# Continuous event-free held-out material (minutes of each part, played one after the other).
QUIET_MINUTES = {"music": 20, "broadcast": 10, "household": 10}
EVENT_STREAM_SECONDS = 10 * 60  # unseen sources: speech and repeated alerts alternating
SAME_SOURCE_EVENT_SECONDS = 5 * 60  # held-out files of the training sources
EVENT_EVERY_SECONDS = 12.0
ALARM_CURVE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # thresholds traced on the card's curve
VIDEO_FPS = 10.0


def _write(path: Path, data: bytes | str) -> None:
    """Temp file then os.replace: a crash never leaves a half-written model or manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _json(path: Path, obj: Any) -> None:
    _write(path, json.dumps(obj, indent=2) + "\n")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[recipe] {msg}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    """Versions of what decides the trained weights: another TF, Keras or LiteRT gives other bytes.

    Read from the installed distributions, so nothing is imported for it.
    """
    from importlib import metadata

    out = {"python": platform.python_version()}
    for key, dists in (
        ("tensorflow", ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu")),
        ("keras", ("keras",)),
        ("ai_edge_litert", ("ai-edge-litert", "ai-edge-litert-nightly")),
        ("numpy", ("numpy",)),
        ("opencv", ("opencv-python-headless", "opencv-python")),
    ):
        for dist in dists:
            try:
                out[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[key] = "not installed"
    return out


def _sha256(*arrays: np.ndarray) -> str:
    """Fingerprint of the exact training arrays: tells "other data" from "other training"."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data.cast("B"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------ vision


def vision_manifest(variant: str, roles: dict[str, int], width: int, height: int) -> dict[str, Any]:
    return {
        "schema": 1,
        "name": "person",
        "version": PERSON_VERSION,
        "modality": "vision",
        "labels": "labels.txt",
        "postprocess": "none",
        "vision": {
            "width": width,
            "height": height,
            "color": "rgb",
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
        },
        "stages": [{"model": f"person-{variant}.tflite", "outputs": roles}],
    }


def _video_frames_scores(
    model: TFLiteModel, video: Path, width: int, height: int, scores_index: int
) -> np.ndarray:
    """Person probability of every frame of a video, frames read back through OpenCV."""
    import cv2

    from edgekeeper.cloud.training.features import frame_to_input

    cap = cv2.VideoCapture(str(video))
    out = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        out.append(model(frame_to_input(frame, width, height))[scores_index][1])
    cap.release()
    return np.asarray(out)


def build_vision(out_dir: Path, seed: int, progress: bool) -> dict[str, Any]:
    from edgekeeper.cloud.training import data_vision as dv
    from edgekeeper.cloud.training import train

    folder = out_dir / "person"
    dv.check_backgrounds()
    t0 = time.perf_counter()
    data = dv.build(seed, progress=progress)
    tx, ty, _ = data.train
    hx, hy, hs = data.heldout
    _log(progress, f"vision data {data.summary} in {time.perf_counter() - t0:.0f} s")

    train.seed_everything(seed)
    train_model, export_model = train.vision_model(dv.WIDTH, dv.HEIGHT)
    t0 = time.perf_counter()
    history = train.fit(
        train_model,
        tx,
        ty,
        epochs=VISION_EPOCHS,
        batch_size=64,
        learning_rate=2e-3,
        progress=progress,
        preprocess=lambda a: a.astype(np.float32) / 255.0,
    )
    train_seconds = time.perf_counter() - t0
    rep = tx[np.random.default_rng(seed).choice(len(tx), 500, replace=False)]
    blobs = {
        "float": train.to_tflite_float(export_model),
        "int8": train.to_tflite_int8(export_model, rep.astype(np.float32) / 255.0),
    }
    _write(folder / "labels.txt", "\n".join(PERSON_LABELS) + "\n")

    hxf = hx.astype(np.float32) / 255.0
    neg_sources = ("vtest-people-removed", "tree", "photo")
    metrics: dict[str, Any] = {
        "model": f"person@{PERSON_VERSION}",
        "input": {"width": dv.WIDTH, "height": dv.HEIGHT, "color": "rgb", "scale": "pixel/255"},
        "data": data.summary,
        "training": {
            "epochs": VISION_EPOCHS,
            "inputs_sha256": _sha256(tx, ty),
            "seconds": round(train_seconds, 1),
            "final_loss": round(history["loss"][-1], 4),
            "final_accuracy": round(history["accuracy"][-1], 4),
        },
        "threshold": THRESHOLDS["person"],
        "variants": {},
    }
    for variant, blob in blobs.items():
        path = folder / f"person-{variant}.tflite"
        _write(path, blob)
        model = TFLiteModel(path)
        roles = model.output_roles(len(PERSON_LABELS))
        _json(
            folder / f"manifest-{variant}.json",
            vision_manifest(variant, roles, dv.WIDTH, dv.HEIGHT),
        )
        p = model.batch(hxf, roles["scores"])[:, 1]
        thr = THRESHOLDS["person"]
        per_source = {
            str(s): {
                "images": int(np.sum(hs == s)),
                "label": "person" if hy[hs == s][0] else "no_person",
                "share_over_threshold": round(float(np.mean(p[hs == s] >= thr)), 4),
            }
            for s in np.unique(hs)
        }
        # Smoothed triggers, as if each sequence were played at 10 fps through the gate.
        seq_pos = p[hs == "vtest"]
        seq_neg = {s: p[hs == s] for s in ("vtest-people-removed", "tree")}
        neg_p = np.concatenate(list(seq_neg.values()))
        onsets_pos = trigger_onsets(smoothed(seq_pos >= thr))
        metrics["variants"][variant] = {
            "file": path.name,
            "bytes": len(blob),
            "outputs": roles,
            "heldout_all": precision_recall(p, hy == 1, thr),
            "heldout_vtest_vs_scene_negatives": precision_recall(
                p[np.isin(hs, ["vtest", *neg_sources])],
                hy[np.isin(hs, ["vtest", *neg_sources])] == 1,
                thr,
            ),
            "per_source": per_source,
            "smoothed": {
                "vtest_heldout_first_trigger_frame": int(onsets_pos[0])
                if len(onsets_pos)
                else None,
                "vtest_heldout_share_of_frames_triggered": round(
                    float(np.mean(smoothed(seq_pos >= thr))), 4
                ),
                "person_free_video": triggers_per_hour(neg_p, thr, 1 / VIDEO_FPS),
            },
            "latency": model.latency_ms(hxf[0]),
        }
        _log(progress, f"person-{variant}: {metrics['variants'][variant]['heldout_all']}")
    models = {}
    for variant in blobs:
        model = TFLiteModel(folder / f"person-{variant}.tflite")
        models[variant] = (model, model.output_roles(len(PERSON_LABELS))["scores"])
    metrics.update(_vision_unseen(models, data, seed, progress))
    cards.person_plot(metrics, folder / "heldout.png")
    return metrics


def _person_fires(p: np.ndarray, times: np.ndarray) -> list[float]:
    """Times the device's default ``person`` rule fires (cooldown off) on these scores."""
    scores = np.stack([1.0 - p, p], axis=1)
    return [t for _lab, t in policy_fires(scores, times, PERSON_LABELS)]


def _vision_unseen(
    models: dict[str, tuple[TFLiteModel, int]], data: Any, seed: int, progress: bool
) -> dict[str, Any]:
    """Figures on material no training example came from: whole held-out sources, brightness
    sweeps of held-out vtest frames, and 36 minutes of person-free video from held-out stills.

    Video figures go through the device's own pieces: the motion pre-gate
    (``device.pregate`` with the default ``[pregate]``) decides which frames the model sees,
    and the default ``person`` trigger rule (``TriggerPolicy``, cooldown off, so every
    activation counts) decides what fires.
    """
    from tqdm import tqdm

    from edgekeeper.cloud.training import data_vision as dv
    from edgekeeper.cloud.training.features import frame_to_input
    from edgekeeper.config import PregateSection
    from edgekeeper.device.pregate import MotionMeter, VideoPregate

    thr = THRESHOLDS["person"]
    w, h = dv.WIDTH, dv.HEIGHT
    out: dict[str, Any] = {"heldout_sources": {}, "brightness_sweep": {}, "pregate": {}}
    # Whole sources never trained on.
    for name, (x, y) in data.heldout_sources.items():
        xf = x.astype(np.float32) / 255.0
        out["heldout_sources"][name] = {
            "images": len(y),
            "label": "person" if y[0] else "no_person",
            **{
                v: round(float(np.mean(m.batch(xf, i)[:, 1] >= thr)), 4)
                for v, (m, i) in models.items()
            },
        }
    # Brightness sweeps: held-out vtest frames (full resolution, darkened and noised as a
    # sensor would, then shrunk as on a device) and the held-out-source composites.
    frames = dv.read_video(sources.OPENCV_DATA / dv.VTEST)[data.heldout_vtest_frames.start :]
    times = np.arange(len(frames)) / VIDEO_FPS
    walkers = np.concatenate(
        [x for name, (x, _y) in data.heldout_sources.items() if name.endswith("+walkers")]
    )
    for name, kw in tqdm(dv.SWEEP, desc="brightness sweep", disable=not progress):
        rng = np.random.default_rng(seed + 17)
        dark = [dv.darken(f, rng=rng, **kw) for f in frames]
        comp = np.stack([dv.darken(x, rng=rng, **kw) for x in walkers]).astype(np.float32) / 255
        row: dict[str, Any] = {}
        for v, (m, i) in models.items():
            p = np.array([m(frame_to_input(f, w, h))[i][1] for f in dark])
            fires = _person_fires(p, times)
            row[v] = {
                "vtest_frame_recall": round(float(np.mean(p >= thr)), 4),
                "vtest_first_fire_s": fires[0] if fires else None,
                "vtest_share_of_frames_triggered": round(
                    float(np.mean(smoothed(p >= thr))), 4
                ),
                "other_scenes_walkers_recall": round(
                    float(np.mean(m.batch(comp, i)[:, 1] >= thr)), 4
                ),
            }
        meter = MotionMeter(PregateSection())
        wakes = [meter.measure(f) > PregateSection().motion_min_area for f in dark]
        row["pregate_motion_share"] = round(float(np.mean(wakes[1:])), 4)
        out["brightness_sweep"][name] = row
    # 36 minutes of person-free video, every frame scored, then replayed through the pre-gate
    # and the trigger rule.
    cfg = PregateSection()
    meter = MotionMeter(cfg)
    scores: dict[str, list[float]] = {v: [] for v in models}
    motion, package = [], []
    for pkg, frame in dv.person_free_video(VIDEO_FPS, seed, progress=progress):
        motion.append(meter.measure(frame))
        package.append(pkg)
        x = frame_to_input(frame, w, h)
        for v, (m, i) in models.items():
            scores[v].append(m(x)[i][1])
    t = np.arange(len(motion)) / VIDEO_FPS
    gate = VideoPregate(cfg)
    seen = np.array(
        [gate.decide(float(tt), mo) is not None for tt, mo in zip(t, motion, strict=True)]
    )
    hours = len(t) / VIDEO_FPS / 3600
    pkgs = np.asarray(package)
    video: dict[str, Any] = {
        "minutes": round(len(t) / VIDEO_FPS / 60, 1),
        "frames": len(t),
        "pregate_share_of_frames_run": round(float(seen.mean()), 4),
        "packages": {pk: round(float(np.mean(pkgs == pk)) * hours * 60, 1) for pk in set(package)},
    }
    for v in models:
        p = np.asarray(scores[v])
        every = _person_fires(p, t)
        gated = _person_fires(p[seen], t[seen])
        video[v] = {
            "frames_over_threshold": round(float(np.mean(p >= thr)), 5),
            "fires_per_hour_every_frame": round(len(every) / hours, 2),
            "fires_per_hour_with_pregate": round(len(gated) / hours, 2),
            "fires_by_package_every_frame": {
                pk: int(sum(1 for f in every if pkgs[round(f * VIDEO_FPS)] == pk))
                for pk in sorted(set(package))
            },
        }
    out["person_free_video_unseen"] = video
    return out


# ------------------------------------------------------------------------------------- audio


def audio_manifest(variant: str) -> dict[str, Any]:
    from edgekeeper.cloud.training import features as F

    return {
        "schema": 1,
        "name": "sound",
        "version": SOUND_VERSION,
        "modality": "audio",
        "labels": "labels.txt",
        "postprocess": "none",
        "audio": {
            "sample_rate": F.SAMPLE_RATE,
            "window_seconds": F.WINDOW_SECONDS,
            "hop_seconds": F.HOP_SECONDS,
        },
        "stages": [
            {
                "model": f"../frontends/{F.MEL_MODEL}",
                "input": "pcm",
                "pcm_scale": F.PCM_SCALE,
                "scale": F.MEL_SCALE,
                "offset": F.MEL_OFFSET,
                "frame_samples": F.MEL_FRAME_SAMPLES,
            },
            {
                "model": f"../frontends/{F.EMBEDDING_MODEL}",
                "window": F.EMBEDDING_WINDOW,
                "step": F.EMBEDDING_STEP,
            },
            {"model": f"sound-{variant}.tflite", "window": F.HEAD_WINDOW, "outputs": {"scores": 0}},
        ],
    }


def _featurise(frontend: Any, audio: np.ndarray, progress: bool, desc: str) -> np.ndarray:
    from tqdm import tqdm

    return np.stack([frontend.features(a) for a in tqdm(audio, desc=desc, disable=not progress)])


def _stream_features(
    frontend: Any, signal: np.ndarray, progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    from edgekeeper.cloud.training import features as F

    n = (len(signal) - int(F.WINDOW_SECONDS * F.SAMPLE_RATE)) // int(
        F.HOP_SECONDS * F.SAMPLE_RATE
    ) + 1
    ends, feats = [], []
    for wf in tqdm(frontend.stream(signal), total=n, desc=desc, disable=not progress):
        ends.append(wf.end_seconds)
        feats.append(wf.features)
    return np.asarray(ends), np.stack(feats)


def build_audio(out_dir: Path, seed: int, progress: bool) -> dict[str, Any]:
    from dataclasses import replace

    from edgekeeper.cloud.training import data_audio as da
    from edgekeeper.cloud.training import features as F
    from edgekeeper.cloud.training import train
    from edgekeeper.cloud.training.evaluate import fired_events, policy_fires

    folder = out_dir / "sound"
    frontend = F.AudioFrontend(out_dir / "frontends")
    t0 = time.perf_counter()
    train_pools = da.load_pools(False, np.random.default_rng(seed), progress=progress)
    held_pools = da.load_pools(True, np.random.default_rng(seed + 1), progress=progress)
    train_w = da.make_windows(
        train_pools, AUDIO_TRAIN_COUNTS, seed, progress=progress, desc="train windows"
    )
    tx, ty = _featurise(frontend, train_w.audio, progress, "train features"), train_w.labels
    del train_w  # ~600 MB of raw audio, not needed once featurised

    # Held-out windows, one group per source. Every bed (music, chimes, room tone) comes from
    # sources never trained on, so only the event differs from group to group.
    unseen = tuple(sorted(da.HELDOUT_SOURCES))
    beds = held_pools.only(
        singles=unseen, quiet=unseen, music=unseen, speech=unseen, alerts=unseen
    )
    groups: dict[str, tuple[da.Pools, tuple[int, int, int]]] = {
        "background (unseen sources)": (beds, (AUDIO_HELDOUT_BACKGROUND, 0, 0)),
        "alarm: yaru + deepin alerts repeated (unseen)": (
            replace(beds, synth_alarms=False),
            (0, 0, AUDIO_HELDOUT_ALARM),
        ),
        "alarm: held-out files of training themes": (
            replace(beds, synth_alarms=False, alerts=[
                c for c in held_pools.alerts if c.source not in da.HELDOUT_SOURCES
            ]),
            (0, 0, AUDIO_HELDOUT_PER_SOURCE),
        ),
        "alarm: synthetic (fresh draws)": (
            replace(beds, alerts=[]),
            (0, 0, AUDIO_HELDOUT_PER_SOURCE),
        ),
    }
    for src in ("asterisk-fr", "asterisk-es", "espeak-ng-heldout", "asterisk-en"):
        speech = [c for c in held_pools.speech if c.source == src]
        kind = "held-out files" if src == "asterisk-en" else "unseen"
        groups[f"speech: {src} ({kind})"] = (
            replace(beds, speech=speech),
            (0, AUDIO_HELDOUT_PER_SOURCE, 0),
        )
    held_x, held_y, held_g = [], [], []
    for i, (name, (pools, counts)) in enumerate(groups.items()):
        w = da.make_windows(pools, counts, seed + 7 + i, progress=progress, desc=name)
        held_x.append(_featurise(frontend, w.audio, progress, "features"))
        held_y.append(w.labels)
        held_g += [name] * len(w.labels)
    hx, hy, hg = np.concatenate(held_x), np.concatenate(held_y), np.asarray(held_g)

    # Streams, scored through the device's trigger rule.
    quiet = da.make_quiet_stream(
        beds,
        seed + 11,
        music_s=QUIET_MINUTES["music"] * 60,
        broadcast_s=QUIET_MINUTES["broadcast"] * 60,
        household_s=QUIET_MINUTES["household"] * 60,
    )
    singles = da.make_singles_stream(held_pools, seed + 12)
    events = da.make_event_stream(
        replace(beds, synth_alarms=False), EVENT_STREAM_SECONDS, seed + 13,
        every=EVENT_EVERY_SECONDS,
    )
    same = held_pools.only(
        speech=("asterisk-en", "freedesktop"), alerts=("freedesktop", "oxygen", "gnome-audio")
    )
    same_events = da.make_event_stream(
        replace(beds, speech=same.speech, alerts=same.alerts, synth_alarms=False),
        SAME_SOURCE_EVENT_SECONDS, seed + 14, every=EVENT_EVERY_SECONDS,
    )
    streams = {"quiet": quiet, "singles": singles, "events": events, "same_events": same_events}
    stream_x = {
        k: _stream_features(frontend, st.audio, progress, f"{k} stream")
        for k, st in streams.items()
    }
    data_seconds = time.perf_counter() - t0

    train.seed_everything(seed)
    train_model, export_model = train.audio_head(F.HEAD_WINDOW, F.EMBEDDING_SIZE, len(da.LABELS))
    t0 = time.perf_counter()
    history = train.fit(
        train_model,
        tx,
        ty,
        epochs=AUDIO_EPOCHS,
        batch_size=64,
        learning_rate=1e-3,
        progress=progress,
    )
    train_seconds = time.perf_counter() - t0
    rep = tx[np.random.default_rng(seed).choice(len(tx), min(600, len(tx)), replace=False)]
    blobs = {
        "float": train.to_tflite_float(export_model),
        "int8": train.to_tflite_int8(export_model, rep),
    }
    _write(folder / "labels.txt", "\n".join(da.LABELS) + "\n")

    def clip_counts(pools: da.Pools) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for role in ("speech", "alerts", "singles", "quiet", "music"):
            for c in getattr(pools, role):
                out.setdefault(c.source, {}).setdefault(role, 0)
                out[c.source][role] += 1
        return out

    sources_info = {
        name: {"package": s.package, "licence": s.licence,
               "split": "held out whole" if name in da.HELDOUT_SOURCES
               else "train (a quarter of files held out by name)"}
        for name, s in da.SOURCES.items()
    }
    metrics: dict[str, Any] = {
        "model": f"sound@{SOUND_VERSION}",
        "data": {
            "sources": sources_info,
            "not_speech": sorted(da.NOT_SPEECH),
            "train_clips": clip_counts(train_pools),
            "heldout_clips": clip_counts(held_pools),
            "train_windows": dict(zip(da.LABELS, AUDIO_TRAIN_COUNTS, strict=True)),
            "heldout_windows": {g: int(np.sum(hg == g)) for g in groups},
            "quiet_stream": [
                {"part": k, "minutes": round((e - s) / 60, 2)} for k, s, e in quiet.parts
            ],
            "singles_stream_sounds": len(singles.events),
            "event_stream_seconds": EVENT_STREAM_SECONDS,
            "event_stream_events": len(events.events),
            "same_source_event_stream_events": len(same_events.events),
            "seconds": round(data_seconds, 1),
        },
        "training": {
            "epochs": AUDIO_EPOCHS,
            "inputs_sha256": _sha256(tx, ty),
            "seconds": round(train_seconds, 1),
            "final_loss": round(history["loss"][-1], 4),
            "final_accuracy": round(history["accuracy"][-1], 4),
        },
        "thresholds": {k: THRESHOLDS[k] for k in ("speech", "alarm")},
        "trigger": _trigger_rules(),
        "variants": {},
    }
    window = np.zeros(int(F.WINDOW_SECONDS * F.SAMPLE_RATE), dtype=np.float32)
    for variant, blob in blobs.items():
        path = folder / f"sound-{variant}.tflite"
        _write(path, blob)
        _json(folder / f"manifest-{variant}.json", audio_manifest(variant))
        model = TFLiteModel(path)
        p_held = model.batch(hx, 0)
        per_label: dict[str, Any] = {}
        for label in ("speech", "alarm"):
            k = da.LABELS.index(label)
            thr = THRESHOLDS[label]
            per_group = {}
            for g in groups:
                sel = hg == g
                per_group[g] = {
                    "windows": int(sel.sum()),
                    "share_over_threshold": round(float(np.mean(p_held[sel, k] >= thr)), 4),
                    "truth": da.LABELS[int(hy[sel][0])],
                }
            per_label[label] = {
                "heldout_windows": precision_recall(p_held[:, k], hy == k, thr),
                "per_group": per_group,
            }
        confusion = np.zeros((3, 3), dtype=int)
        for t, pr in zip(hy, p_held.argmax(axis=1), strict=True):
            confusion[t, pr] += 1
        fires = {
            name: policy_fires(model.batch(x, 0), ends, da.LABELS)
            for name, (ends, x) in stream_x.items()
        }
        # Operating curve of the alarm label through the trigger rule: recall on repeated real
        # alerts of unseen themes against false fires per hour on music and broadcast.
        curve = []
        music_bc_hours = sum(e - s for p, s, e in quiet.parts if p != "household") / 3600
        p_events = model.batch(stream_x["events"][1], 0)
        p_quiet = model.batch(stream_x["quiet"][1], 0)
        for thr in ALARM_CURVE:
            fe = policy_fires(p_events, stream_x["events"][0], da.LABELS, {"alarm": thr})
            fq = policy_fires(p_quiet, stream_x["quiet"][0], da.LABELS, {"alarm": thr})
            false_q = sum(
                1 for lab, t in fq
                if lab == "alarm" and any(p != "household" and s < t <= e + F.WINDOW_SECONDS
                                          for p, s, e in quiet.parts)
            )
            curve.append({
                "threshold": thr,
                "event_recall": fired_events(fe, events.events, "alarm", F.WINDOW_SECONDS)[
                    "recall"],
                "music_broadcast_per_hour": round(false_q / music_bc_hours, 2),
            })
        quiet_parts = {}
        for part, s, e in quiet.parts:
            hours = (e - s) / 3600
            inside = [(lab, t) for lab, t in fires["quiet"] if s < t <= e + F.WINDOW_SECONDS]
            quiet_parts[part] = {
                "minutes": round((e - s) / 60, 2),
                **{
                    f"{lab}_fires": sum(1 for x, _ in inside if x == lab)
                    for lab in ("speech", "alarm")
                },
                **{
                    f"{lab}_per_hour": round(sum(1 for x, _ in inside if x == lab) / hours, 2)
                    for lab in ("speech", "alarm")
                },
            }
        quiet_hours = sum(e - s for _, s, e in quiet.parts) / 3600
        no_speech = [p for p, _, _ in quiet.parts if p != "broadcast"]
        singles_fired = [
            (lab, name)
            for lab, t in fires["singles"]
            for name, s, e in singles.events
            if s < t <= e + F.WINDOW_SECONDS
        ]
        t_front = []
        for _ in range(50):
            s0 = time.perf_counter()
            feats = frontend.features(window)
            model(feats)
            t_front.append((time.perf_counter() - s0) * 1000)
        metrics["variants"][variant] = {
            "file": path.name,
            "bytes": len(blob),
            "per_label": per_label,
            "heldout_confusion_argmax": {
                "rows_true_cols_pred": list(da.LABELS),
                "matrix": confusion.tolist(),
            },
            "trigger": {
                "events_unseen_sources": {
                    lab: fired_events(fires["events"], events.events, lab, F.WINDOW_SECONDS)
                    for lab in ("speech", "alarm")
                },
                "events_heldout_files": {
                    lab: fired_events(fires["same_events"], same_events.events, lab,
                                      F.WINDOW_SECONDS)
                    for lab in ("speech", "alarm")
                },
                "alarm_curve": curve,
                "singles": {
                    "sounds": len(singles.events),
                    "fires": len(fires["singles"]),
                    "fired": sorted(f"{lab}: {name}" for lab, name in singles_fired),
                },
                "quiet": {
                    "parts": quiet_parts,
                    "hours": round(quiet_hours, 4),
                    "alarm_per_hour": round(
                        sum(1 for lab, _ in fires["quiet"] if lab == "alarm") / quiet_hours, 2
                    ),
                    "speech_per_hour_without_broadcast": round(
                        sum(quiet_parts[p]["speech_fires"] for p in no_speech)
                        / (sum(quiet_parts[p]["minutes"] for p in no_speech) / 60),
                        2,
                    ),
                },
            },
            "latency_head": model.latency_ms(hx[0]),
            "latency_full_window": {
                "p50_ms": float(np.percentile(t_front, 50)),
                "p99_ms": float(np.percentile(t_front, 99)),
            },
        }
        _log(
            progress,
            f"sound-{variant}: { {k: v['heldout_windows'] for k, v in per_label.items()} } "
            f"trigger {metrics['variants'][variant]['trigger']}",
        )
    cards.sound_plot(metrics, folder / "heldout.png")
    return metrics


def _trigger_rules() -> dict[str, Any]:
    """The default audio trigger rules the event figures were measured with."""
    from edgekeeper.config import TriggerSection

    base = TriggerSection()
    return {
        "k": base.k,
        "n": base.n,
        "labels": {
            lab: {"threshold": r.threshold, "release": r.release,
                  "min_span_seconds": r.min_span_seconds}
            for lab, r in base.labels.items() if lab in ("speech", "alarm")
        },
        "cooldown": "off (every activation counted)",
    }


# ------------------------------------------------------------------------------------ sample


def check_sample(out_dir: Path, person: dict[str, Any], sound: dict[str, Any]) -> dict[str, Any]:
    """Run both int8 gates over the bundled sample, as a device would, and summarise."""
    from edgekeeper.cloud.training import data_vision as dv
    from edgekeeper.cloud.training import features as F

    folder = out_dir / "samples" / "street"
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    out: dict[str, Any] = {"labels": labels}
    manifest = json.loads((out_dir / "person" / "manifest-int8.json").read_text())
    pm = TFLiteModel(out_dir / "person" / "person-int8.tflite")
    p = _video_frames_scores(
        pm, folder / "video.avi", dv.WIDTH, dv.HEIGHT, manifest["stages"][0]["outputs"]["scores"]
    )
    out["person_int8"] = {
        "frames": len(p),
        "share_over_threshold": round(float(np.mean(p >= THRESHOLDS["person"])), 4),
        "min_probability": round(float(p.min()), 4),
    }
    sm = TFLiteModel(out_dir / "sound" / "sound-int8.tflite")
    from edgekeeper.cloud.training.sources import decode_audio

    audio = decode_audio(folder / "audio.wav", F.SAMPLE_RATE)
    ends, feats = _stream_features(F.AudioFrontend(out_dir / "frontends"), audio, False, "")
    ps = sm.batch(feats, 0)
    from edgekeeper.cloud.training.evaluate import policy_fires

    fires = policy_fires(ps, ends, ("background", "speech", "alarm"))  # the device's rule
    triggers = {
        label: [round(t, 2) for lab, t in fires if lab == label] for label in ("speech", "alarm")
    }
    out["sound_int8_smoothed_triggers_at_window_end_s"] = triggers
    out["sound_int8_window_top_label"] = [
        [
            round(float(e), 2),
            ("background", "speech", "alarm")[int(np.argmax(q))],
            round(float(np.max(q)), 3),
        ]
        for e, q in zip(ends, ps, strict=True)
    ]
    return out


def build_all(
    out_dir: Path, *, seed: int = 0, progress: bool = True, only: str | None = None
) -> dict[str, Any]:
    """Build both gates, their manifests, metrics and cards, and the sample, into ``out_dir``.

    ``only="person"`` or ``only="sound"`` retrains one gate and keeps the other's files and
    metrics as they are (the sample check and both cards are refreshed either way).
    Returns ``{"person": metrics, "sound": metrics, "sample": sanity}`` (also written to the
    metrics.json files).
    """
    if only not in (None, "person", "sound"):
        raise EdgekeeperError(f"only={only!r}: expected 'person' or 'sound'")
    sources.check_all()
    if only != "person":
        from edgekeeper.cloud.training import data_audio

        data_audio.check_sources()
    out_dir.mkdir(parents=True, exist_ok=True)
    _log(progress, "front-ends")
    frontends.ensure(out_dir / "frontends")
    _log(progress, "sample recording")
    sample.build(out_dir, seed)
    env = {
        **_versions(),
        "machine": platform.machine(),
        "processor_count": os.cpu_count(),
        "seed": seed,
    }
    kept = {}
    for name in ("person", "sound"):
        if only not in (None, name):
            path = out_dir / name / "metrics.json"
            if not path.is_file():
                raise EdgekeeperError(
                    f"{path} does not exist, so the {name} gate cannot be kept",
                    fix="run the recipe without --only first",
                )
            kept[name] = json.loads(path.read_text())
    person = kept.get("person") or build_vision(out_dir, seed, progress)
    sound = kept.get("sound") or build_audio(out_dir, seed, progress)
    sanity = check_sample(out_dir, person, sound)
    # A kept gate keeps the environment it was built in: its bytes came from those versions.
    for name, m in (("person", person), ("sound", sound)):
        if name not in kept or "environment" not in m:
            m["environment"] = env
    person["sample_check"] = {k: v for k, v in sanity.items() if k.startswith("person")}
    sound["sample_check"] = {k: v for k, v in sanity.items() if k.startswith("sound")}
    _json(out_dir / "person" / "metrics.json", person)
    _json(out_dir / "sound" / "metrics.json", sound)
    _write(out_dir / "person" / "MODEL_CARD.md", cards.person_card(person))
    _write(out_dir / "sound" / "MODEL_CARD.md", cards.sound_card(sound))
    _write(out_dir / "samples" / "NOTICE", cards.SAMPLES_NOTICE)
    return {"person": person, "sound": sound, "sample": sanity}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgekeeper.cloud.training.recipe",
        description="Rebuild the default person and sound gates from Debian-packaged data.",
    )
    parser.add_argument("--out", type=Path, required=True, help="models folder, e.g. models/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--only", choices=("person", "sound"), help="retrain one gate, keep the other as built"
    )
    args = parser.parse_args(argv)
    try:
        result = build_all(args.out, seed=args.seed, progress=not args.quiet, only=args.only)
    except EdgekeeperError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    summary = {
        name: {
            v: m.get("heldout_all") or {k: x["heldout_windows"] for k, x in m["per_label"].items()}
            for v, m in result[name]["variants"].items()
        }
        for name in ("person", "sound")
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

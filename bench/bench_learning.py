"""Does the learning loop move the gate? One vision and one audio deployment where it misfires.

    python bench/bench_learning.py [--only vision|audio] [--out bench-learning/] [--quick]

Each deployment is real material the shipped models were never trained on, split by time:

- audio: the Singularity soundtrack (singularity-music, a whole held-out source of the recipe)
  played end to end; the sound gate fires ``alarm`` on it;
- vision: the recipe's held-out wallpapers (lomiri-wallpapers, ukui-wallpapers) filmed as a
  camera sees them (pans, zooms, light changes, sensor noise; data_vision.person_free_video),
  all 30 views in turn, three rounds: the person gate fires on some views.

The first part is replayed through the real device loop (device/replay.py, default config)
and its events are judged by a teacher; the examples (target and weight by the documented rule)
retrain the gate (cloud/training/retrain.py); the later part is replayed with the current and
the retrained model. Recall is measured on held-out material that has events: for audio, speech
(Asterisk French prompts, held-out espeak-ng voices) and repeated alerts (held-out
freedesktop files) over held-out beds; for vision, held-out vtest walkers pasted into the same
scenes. Teachers: ``truth`` (a stand-in for Claude answering from ground truth with a declared
share of wrong labels, ``--wrong``) and ``offline`` (cloud/reasoners/offline.py). Their
judgements become examples through the worker's own path (ExampleRecorder into a real SQLite
store: target and weight by the product's rules, and for audio one row per ``--clip-hop``
seconds of the event's clip, examples.clip_features).

Target: >= 50 % fewer false triggers per hour, recall at most 0.02 lower.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import traceback
import wave
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from edgekeeper import config as config_mod  # noqa: E402
from edgekeeper.cloud.training.examples import CLIP_HOP_SECONDS, TrainingExample  # noqa: E402
from edgekeeper.device.events import Event  # noqa: E402

FPS = 10.0
# The whole 61-minute soundtrack: the first 30 minutes gave 13 events to learn from.
AUDIO_MINUTES = 61.0
# The held-out event stream recall is measured on: an event every 12 s or so. 6 minutes gave 29
# events, so one event was 0.034 of recall, more than the 0.02 the target allows; 20 minutes
# give about a hundred.
RECALL_SECONDS = 1200.0
# Rounds of the 30 held-out views (16 s each, 8 minutes a round): the first ones deployed, the
# last one evaluated. Three rounds gave 4 events in 16 minutes, too few to judge the loop.
VISION_ROUNDS = 6
MODELS = config_mod.MODELS_DIR


# ------------------------------------------------------------------------------ recordings


def write_audio_recording(folder: Path, pcm: np.ndarray, labels: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with wave.open(str(folder / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    (folder / "recording.json").write_text(json.dumps(
        {"schema": 1, "audio": "audio.wav", "started_at": "2026-12-03T08:00:00Z"}))
    (folder / "labels.json").write_text(json.dumps({"schema": 1, "labels": labels}))
    return folder


class VideoRecording:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.writer = cv2.VideoWriter(str(folder / "video.avi"), cv2.VideoWriter.fourcc(*"MJPG"),
                                      FPS, (320, 240))
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        self.writer.write(cv2.resize(frame, (320, 240), interpolation=cv2.INTER_AREA))
        self.frames += 1

    def close(self, labels: list[dict[str, Any]]) -> Path:
        self.writer.release()
        (self.folder / "recording.json").write_text(json.dumps(
            {"schema": 1, "video": "video.avi", "started_at": "2026-12-03T08:00:00Z"}))
        (self.folder / "labels.json").write_text(json.dumps({"schema": 1, "labels": labels}))
        return self.folder


def audio_material(work: Path, quick: bool, minutes: float, recall_seconds: float) -> (
        dict[str, Path]):
    from edgekeeper.cloud.training import data_audio as da

    for k in [k for k, s in da.SOURCES.items() if not s.root.exists() or not s.files()]:
        del da.SOURCES[k]  # the recipe's sources less what is not installed here
    tracks = sorted(da.SOURCES["singularity-music"].files())
    pcm = np.concatenate([da._decoded(p) for p in tracks])
    pcm = pcm[: int(16000 * 60 * (10 if quick else minutes))]
    cut = int(len(pcm) * 0.6)
    print(f"[bench] singularity soundtrack: {len(tracks)} tracks, {len(pcm) / 16000 / 60:.1f} "
          f"min; first {cut / 16000 / 60:.1f} min deployed, the rest evaluated", file=sys.stderr)
    out = {
        "deploy": write_audio_recording(work / "audio-deploy", pcm[:cut], []),
        "later": write_audio_recording(work / "audio-later", pcm[cut:], []),
    }
    held = da.load_pools(True, np.random.default_rng(1), progress=False)
    beds = dataclasses.replace(held.only(music=("asc-music", "frozen-bubble-music"),
                                         speech=("asterisk-fr", "espeak-ng-heldout")),
                               synth_alarms=False)
    # Music beds from the other soundtracks' held-out files (not the deployment's), alerts
    # from the held-out freedesktop files.
    stream = da.make_event_stream(beds, 240 if quick else recall_seconds, 31, every=12.0)
    labels = [{"label": lab, "start": round(s, 3), "end": round(e, 3)}
              for lab, s, e in stream.events]
    out["recall"] = write_audio_recording(work / "audio-recall", stream.audio, labels)
    return out


def cached(make: Any, folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The recordings under ``folder`` if a previous run finished them (each has its
    labels.json, written last), else made there now: the vision footage takes about half an
    hour to render on the shared machine, so it is made once and reused."""
    out = {n: folder / n for n in names}
    if all((p / "labels.json").is_file() for p in out.values()):
        print(f"[bench] reusing the recordings in {folder}", file=sys.stderr)
        return out
    made: dict[str, Path] = make(folder)
    return made


def vision_material(work: Path, quick: bool, rounds: int) -> dict[str, Path]:
    from edgekeeper.cloud.training import data_vision as dv
    from edgekeeper.cloud.training import sources

    rounds, per_still = (2, 8.0) if quick else (rounds, 16.0)
    stills = {pkg: list(names) * rounds for pkg, names in dv.HELDOUT_SOURCES.items()}
    n_stills = sum(len(v) for v in stills.values())
    # Interleave the packages' views so each round shows every view once.
    orig, orig_s = dv.HELDOUT_SOURCES, dv.SECONDS_PER_STILL
    order = [(pkg, name) for r in range(rounds) for pkg, names in orig.items() for name in names]
    dv.HELDOUT_SOURCES = {}
    for pkg, name in order:  # one key per view, in order (dicts keep insertion order)
        dv.HELDOUT_SOURCES.setdefault(f"{pkg}\0{len(dv.HELDOUT_SOURCES)}", [name])
    real_background = dv._background
    dv._background = lambda name, package: real_background(name, package.split("\0")[0])
    dv.SECONDS_PER_STILL = per_still
    # All rounds but the last deployed, the last one evaluated.
    cut_frame = int(n_stills * per_still * FPS * (rounds - 1) / rounds)
    deploy, later = VideoRecording(work / "deploy"), VideoRecording(work / "later")
    try:
        for i, (_pkg, frame) in enumerate(dv.person_free_video(FPS, 0, progress=False)):
            (deploy if i < cut_frame else later).add(frame)
    finally:
        dv.HELDOUT_SOURCES, dv.SECONDS_PER_STILL, dv._background = orig, orig_s, real_background
    print(f"[bench] person-free views: {len(order)} shots of {per_still:.0f} s, "
          f"{deploy.frames / FPS / 60:.1f} min deployed, {later.frames / FPS / 60:.1f} min later",
          file=sys.stderr)
    out = {"deploy": deploy.close([]), "later": later.close([])}

    # Recall: walkers cut from held-out vtest frames, pasted into the same views: 6 s of the
    # empty view, then 6 s with 1-3 people moving across it.
    vtest = dv.read_video(sources.OPENCV_DATA / dv.VTEST)
    _, held = dv.time_split(len(vtest))
    plate = dv.background_plate(vtest[held.start : held.stop])
    people = [c for i in held for c in dv.cutouts(vtest[i], plate)]
    rng = np.random.default_rng(5)
    rec = VideoRecording(work / "recall")
    labels = []
    views = [(pkg, name) for pkg, names in orig.items() for name in names]
    for k, (pkg, name) in enumerate(views[: 12 if quick else len(views)]):
        img = dv.fit_frame(dv._background(name, pkg))
        crop = dv.random_crop(img, rng, 1.6)
        for _ in range(int(6 * FPS)):
            rec.add(dv.darken(crop, 1.0, rng, shot=0.5, read=2.0, gain=1.0))
        chosen = [people[int(j)] for j in rng.integers(0, len(people), int(rng.integers(1, 4)))]
        start = rec.frames / FPS
        prng = np.random.default_rng(1000 + k)
        for _ in range(int(6 * FPS)):
            prng_state = np.random.default_rng(1000 + k)  # same positions, small drift
            frame = dv.paste(crop, chosen, prng_state)
            shift = np.float32([[1, 0, prng.integers(-3, 4)], [0, 1, 0]])
            frame = cv2.warpAffine(frame, shift, (frame.shape[1], frame.shape[0]),
                                   borderMode=cv2.BORDER_REFLECT)
            rec.add(dv.darken(frame, 1.0, rng, shot=0.5, read=2.0, gain=1.0))
        labels.append({"label": "person", "start": round(start, 2),
                       "end": round(rec.frames / FPS, 2)})
    out["recall"] = rec.close(labels)
    return out


# ------------------------------------------------------------------------------ the loop


class Collect:
    """A device Sink that keeps the events (with their features) in memory."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._seq = 0

    async def next_seq(self) -> int | None:
        self._seq += 1
        return self._seq

    async def deliver(self, event: Event) -> None:
        self.events.append(event)

    async def aclose(self) -> None:
        return None


def replay(rec: Path, modality: str, manifest: Path) -> tuple[list[Event], dict[str, Any], float]:
    from edgekeeper.device.replay import replay_recording

    config = config_mod.load(None)
    gate = dataclasses.replace(config.gate, **{f"{modality}_model": str(manifest)})
    config = dataclasses.replace(config, gate=gate)
    labels = json.loads((rec / "labels.json").read_text())["labels"]
    sink = Collect()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(replay_recording(rec, config, events_dir=Path(tmp), labels=labels,
                                              progress=False, sink=sink))
    duration = max(result.recording.duration, result.stats.media_seconds)
    return sink.events, result.metrics, duration


def fires_per_hour(metrics: dict[str, Any], labels: tuple[str, ...]) -> float:
    return float(sum(metrics.get(lab, {}).get("triggers_per_hour") or 0.0 for lab in labels))


def recall(metrics: dict[str, Any], labels: tuple[str, ...]) -> float:
    caught = total = 0.0
    for lab in labels:
        m = metrics.get(lab) or {}
        if m.get("labelled_ranges"):
            total += m["labelled_ranges"]
            caught += (m.get("event_recall") or 0.0) * m["labelled_ranges"]
    return round(caught / total, 4) if total else float("nan")


@dataclasses.dataclass(frozen=True)
class Judgement:
    label: str
    confidence: float
    gate_correct: bool | None
    provisional: bool
    reasoner: str


def stored_examples(events: list[Event], judged: list[Judgement], family: str,
                    hop: float) -> list[TrainingExample]:
    """The examples the worker would store for these judged events: its ExampleRecorder (target
    and weight by the product's rules; for audio, one row per ``hop`` seconds of the clip)
    writing to a real SQLite store, read back as a retrain reads them."""
    from edgekeeper.cloud.backends import open_store
    from edgekeeper.cloud.training.examples import ExampleRecorder
    from edgekeeper.config import TrainingSection
    from edgekeeper.protocol.messages import ResultBody
    from edgekeeper.protocol.release import Scope

    async def run(data: Path) -> list[TrainingExample]:
        store = await open_store("sqlite", data)
        try:
            recorder = ExampleRecorder(store, TrainingSection(), data, clip_hop=hop)
            for ev, j in zip(events, judged, strict=True):
                result = ResultBody(device_id=ev.device_id, seq=ev.seq, reasoner=j.reasoner,
                                    label=j.label, confidence=j.confidence, summary="",
                                    action="log", gate_correct=j.gate_correct,
                                    provisional=j.provisional, produced_at=ev.captured_at + 5)
                await recorder.record(ev.to_body(), result, ev.models.get(ev.modality, ""))
            out: list[TrainingExample] = await store.examples(model=family, scope=Scope())
            return out
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run(Path(tmp)))


def truth_teacher(events: list[Event], labels: tuple[str, ...], negative: str, wrong: float,
                  seed: int) -> tuple[list[Judgement], int]:
    """Claude stand-in: the deployment has no events, so the truth for every event is the
    negative label; a ``wrong`` share of answers (seeded) names another label instead."""
    rng = np.random.default_rng(seed)
    out, n_wrong = [], 0
    for ev in events:
        label, correct = negative, False
        if rng.random() < wrong:
            n_wrong += 1
            label = str(rng.choice([lab for lab in labels if lab != negative]))
            correct = label == ev.label
        out.append(Judgement(label, 0.9, correct, False, "truth-stand-in"))
    return out, n_wrong


def offline_teacher(events: list[Event], family: str) -> list[Judgement]:
    """cloud/reasoners/offline.py as on main."""
    from edgekeeper.cloud.reasoners.offline import OfflineReasoner

    async def judge() -> list[Any]:
        r = OfflineReasoner(transcriber=False)
        try:
            return [await r.reason(ev.to_body(), model_version=family) for ev in events]
        finally:
            await r.close()

    return [Judgement(v.label, v.confidence, v.gate_correct, v.provisional, "offline")
            for v in asyncio.run(judge())]


# ------------------------------------------------------------------------------ main


FAMILIES = {"vision": ("person", ("person",), "no_person"),
            "audio": ("sound", ("alarm", "speech"), "background")}


def run_modality(modality: str, work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:

    family, positives, negative = FAMILIES[modality]
    t0 = time.perf_counter()
    if modality == "vision":
        rounds = 2 if args.quick else args.vision_rounds
        where = (args.cache or work) / f"vision-{rounds}-rounds{'-quick' if args.quick else ''}"
        rec = cached(lambda f: vision_material(f, args.quick, rounds), where,
                     ("deploy", "later", "recall"))
    else:
        rec = audio_material(work, args.quick, args.audio_minutes, args.recall_seconds)
    if args.material_only:
        return {"material": {k: str(v) for k, v in rec.items()}}
    material_s = time.perf_counter() - t0
    current = MODELS / family
    cur_manifest = current / "manifest-int8.json"
    events, deploy_m, deploy_s = replay(rec["deploy"], modality, cur_manifest)
    print(f"[bench] {modality}: {len(events)} events in {deploy_s / 60:.1f} min deployed "
          f"({fires_per_hour(deploy_m, positives):.1f} per hour)", file=sys.stderr)
    _, later_before, later_s = replay(rec["later"], modality, cur_manifest)
    _, recall_before, _ = replay(rec["recall"], modality, cur_manifest)
    row: dict[str, Any] = {
        "material_seconds": round(material_s, 1),
        "deployed_minutes": round(deploy_s / 60, 1),
        "later_minutes": round(later_s / 60, 1),
        "events_deployed": len(events),
        "events_by_label": {lab: sum(e.label == lab for e in events) for lab in
                            sorted({e.label for e in events})},
        "before": {"false_triggers_per_hour": fires_per_hour(later_before, positives),
                   "recall": recall(recall_before, positives),
                   "recall_by_label": {lab: recall_before.get(lab, {}).get("event_recall")
                                       for lab in positives}},
        "teachers": {},
    }
    teachers = {"truth": lambda: truth_teacher(events, _labels(current), negative, args.wrong, 7)}
    teachers["offline"] = lambda: (offline_teacher(events, family), 0)
    for name, teach in teachers.items():
        try:
            row["teachers"][name] = one_teacher(name, teach, row, rec, modality, out, current,
                                                events, args.clip_hop, args.rehearsal_share)
        except Exception as err:  # one teacher's failure must not lose the other's figures
            traceback.print_exc()
            row["teachers"][name] = {"error": repr(err)}
    return row


def one_teacher(name: str, teach: Any, row: dict[str, Any], rec: dict[str, Path],
                modality: str, out: Path, current: Path, events: list[Event],
                hop: float, share: float | None) -> dict[str, Any]:
    from edgekeeper.cloud.training.retrain import RetrainSettings, retrain

    family, positives, _ = FAMILIES[modality]
    judged, n_wrong = teach()
    examples = stored_examples(events, judged, family, hop)
    usable = [e for e in examples if e.target is not None and e.weight > 0]
    rows = sum(len(e.features) if e.features.ndim == 3 else 1 for e in usable)
    entry: dict[str, Any] = {"examples": len(examples), "usable": len(usable),
                             "usable_rows": rows, "wrong_labels": n_wrong,
                             "clip_hop_seconds": hop if modality == "audio" else None,
                             "targets": {t: sum(e.target == t for e in usable)
                                         for t in sorted({str(e.target) for e in usable})}}
    if not usable:
        entry["result"] = "no example teaches anything: nothing to retrain"
        return entry
    cand = out / f"{modality}-{name}-candidate"
    settings = RetrainSettings(model=family, current=current)
    if share is not None:
        settings = dataclasses.replace(settings, rehearsal_share=share)
    res = retrain(examples, settings, cand)
    entry["decision"] = {"accepted": res.accepted, "reason": res.reason}
    entry["retrain_seconds"] = res.report["seconds"]
    entry["training"] = res.report["training"]
    entry["scope_heldout"] = {k: res.report["metrics"][k]["scope_heldout"].get("false_triggers")
                              for k in ("before", "after")}
    entry["recipe_heldout_recall"] = {k: res.report["metrics"][k]["recipe_heldout"]["recall"]
                                      for k in ("before", "after")}
    _, later_after, _ = replay(rec["later"], modality, cand / "manifest-int8.json")
    _, recall_after, _ = replay(rec["recall"], modality, cand / "manifest-int8.json")
    entry["after"] = {"false_triggers_per_hour": fires_per_hour(later_after, positives),
                      "recall": recall(recall_after, positives),
                      "recall_by_label": {lab: recall_after.get(lab, {}).get("event_recall")
                                          for lab in positives}}
    b, a = row["before"], entry["after"]
    entry["false_triggers_ratio"] = (round(a["false_triggers_per_hour"]
                                           / b["false_triggers_per_hour"], 3)
                                     if b["false_triggers_per_hour"] else None)
    entry["recall_change"] = round(a["recall"] - b["recall"], 4)
    entry["target_met"] = bool(entry["false_triggers_ratio"] is not None
                               and entry["false_triggers_ratio"] <= 0.5
                               and entry["recall_change"] >= -0.02)
    print(f"[bench] {modality}/{name}: {json.dumps(entry)}", file=sys.stderr)
    return entry


def _labels(folder: Path) -> tuple[str, ...]:
    return tuple(x for x in (folder / "labels.txt").read_text().split() if x)


def plot(results: dict[str, Any], path: Path) -> None:
    from edgekeeper.device.report import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names, fth, rec = [], [], []
    for modality, row in results.items():
        names.append(f"{modality}\nbefore")
        fth.append(row["before"]["false_triggers_per_hour"])
        rec.append(row["before"]["recall"])
        for t, e in row["teachers"].items():
            if "after" in e:
                names.append(f"{modality}\nafter ({t})")
                fth.append(e["after"]["false_triggers_per_hour"])
                rec.append(e["after"]["recall"])
    colors = ["tab:red" if "before" in n else "tab:blue" for n in names]
    for ax, vals, title in ((axes[0], fth, "false triggers per hour (later part)"),
                            (axes[1], rec, "event recall (held-out events)")):
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("vision", "audio"))
    ap.add_argument("--out", type=Path, default=Path("bench-learning"))
    ap.add_argument("--wrong", type=float, default=0.15,
                    help="share of wrong labels of the ground-truth teacher (>= 0.10)")
    ap.add_argument("--quick", action="store_true", help="short material (a smoke run)")
    ap.add_argument("--clip-hop", type=float, default=CLIP_HOP_SECONDS,
                    help="audio: also one example per this many seconds of each event's clip "
                    "(0: the trigger window only)")
    ap.add_argument("--rehearsal-share", type=float, default=None,
                    help="the round's rehearsal_share (default: RetrainSettings')")
    ap.add_argument("--audio-minutes", type=float, default=AUDIO_MINUTES,
                    help="audio: minutes of the soundtrack used (60% deployed, the rest later)")
    ap.add_argument("--recall-seconds", type=float, default=RECALL_SECONDS,
                    help="audio: length of the held-out event stream recall is measured on")
    ap.add_argument("--vision-rounds", type=int, default=VISION_ROUNDS,
                    help="vision: rounds of the 30 views (all but the last deployed)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the vision footage here and reuse it in later runs")
    ap.add_argument("--material-only", action="store_true",
                    help="make (and cache) the recordings, then stop")
    args = ap.parse_args(argv)
    if args.wrong < 0.10:
        ap.error("--wrong must be at least 0.10")
    args.out.mkdir(parents=True, exist_ok=True)
    from edgekeeper import log

    log.configure("warning", config_mod.load(None).log.format)  # not every trigger decision
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for modality in ("audio", "vision"):
            if args.only and args.only != modality:
                continue
            results[modality] = run_modality(modality, Path(tmp), args.out, args)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wrong": args.wrong,
           "quick": args.quick, "results": results}
    (args.out / "learning.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, args.out / "learning.png")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

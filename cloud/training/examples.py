"""Training examples: every reasoned event, kept as what a retrain needs (docs/model-updates.md).

An example is the gate's *features* the event already carried (the vision model's embedding, the
audio head's input window), the gate's scores and the label that fired, the teacher's judgement
(its label, confidence, ``gate_correct``), where it came from (device, group, model version,
reasoner, provisional or not) and when. No raw media by default: a retrain of the gate's head
needs none. Key frames or audio are kept only when the fleet opts in (``[training] keep_media``),
and deleted after the retention period.

The store keeps examples (``ExampleStore``: SQLite and PostgreSQL backends beside the other
stores); a retrain reads them by model and scope and records the ids it used in its report, so
it can be reproduced from exactly those rows.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import shutil
import threading
import time
import wave
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekeeper import fs, runtime
from edgekeeper.cloud.reasoners.weighting import training_weight
from edgekeeper.config import MODELS_DIR, TrainingSection
from edgekeeper.log import get_logger
from edgekeeper.protocol.messages import EventBody
from edgekeeper.protocol.release import Scope

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainingExample:
    device_id: str
    seq: int
    model: str  # model family: "person", "sound"
    model_version: str  # the version that scored it ("1.1.0")
    modality: str  # "vision" | "audio"
    features: np.ndarray = field(compare=False)  # float32, the shape the event carried
    scores: dict[str, float]  # the gate's scores per label
    gate_label: str  # the label that fired
    teacher_label: str  # the reasoner's label, free text as it said it
    target: str | None  # the gate label this example teaches (None: it teaches nothing)
    teacher_confidence: float
    gate_correct: bool | None
    reasoner: str
    provisional: bool
    weight: float  # the training weight by the documented rule (0: left out)
    captured_at: float
    reasoned_at: float
    group: str = ""  # the device's group ("" none)
    media_path: str | None = None  # opt-in raw media kept for full fine-tuning
    id: int | None = None  # the store's row id (None before it is stored)


class ExampleStore(Protocol):
    """Where examples live: a table beside the results, in the same database as the store."""

    async def add_example(self, example: TrainingExample) -> int | None:
        """Store one example; None when this (device, seq, model) is already stored."""
        ...

    async def examples(
        self,
        *,
        model: str,
        scope: Scope,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100_000,
    ) -> list[TrainingExample]:
        """Examples of ``model`` within ``scope`` (a group's devices, one device, or all),
        reasoned in [since, until), oldest first, with their ids."""
        ...

    async def examples_by_ids(self, ids: Sequence[int]) -> list[TrainingExample]:
        """Exactly these rows (reproducing a retrain from its report)."""
        ...

    async def forget_media(self, *, before: float) -> int:
        """Delete kept media of examples reasoned before ``before``; return how many."""
        ...

    async def example_counts(self, *, model: str | None, scope: Scope) -> list[ExampleCount]:
        """How many examples per (model, device, reasoner, target, gate_correct, provisional),
        without reading their features (``edgekeeper cloud examples``)."""
        ...

    async def count_new_examples(self, *, model: str, scope: Scope, after: float | None
                                 ) -> tuple[int, float | None]:
        """Of ``model``'s examples in ``scope`` reasoned after ``after`` (None: all), how many
        are usable (a target, weight > 0), and the newest ``reasoned_at`` of any of them (None
        when there is none): one query, no row read (the retrain schedule)."""
        ...


@dataclass(frozen=True)
class ExampleCount:
    model: str
    device_id: str
    reasoner: str
    target: str | None
    gate_correct: bool | None
    provisional: bool
    count: int
    weighted: int  # of which weight > 0


def features_of(example: TrainingExample) -> np.ndarray:
    """The features as float32 (a copy the caller may change)."""
    return np.asarray(example.features, dtype=np.float32).copy()


def feature_rows(example: TrainingExample, shape: tuple[int, ...]) -> np.ndarray | None:
    """The head-input rows an example holds, ``(n, *shape)`` float32: one row when its features
    are the trigger window alone (``shape``), n when it also carries its clip's windows
    (``(n, *shape)``, see ``clip_features``); None when its features fit neither."""
    feats = features_of(example)
    if feats.shape == shape:
        return feats[None]
    if feats.ndim == len(shape) + 1 and feats.shape[1:] == shape and feats.shape[0] > 0:
        return feats
    return None


# --- audio: one row per clip_hop seconds of the event's clip ----------------------------------

# An audio event carries its clip (the trigger with its pre- and post-roll, [output]) besides
# the trigger window's features: one row per CLIP_HOP_SECONDS of it gives a retrain about ten
# times the rows of the same judgement, computed here with the front ends every sound version
# ships unchanged (models/frontends), so nothing but features is kept. Measured on the audio
# deployment (docs/benchmarks.md, Retraining): with the trigger window alone a dozen events
# hardly moved the head.
# The gate's own hop (features.HOP_SECONDS): the rows are the windows a device gate scores, and
# the front ends share 10 of 16 embeddings between neighbours at this hop (features.stream's
# shared path), six times cheaper for the worker than an arbitrary hop such as 0.5 s.
CLIP_HOP_SECONDS = 0.48
AUDIO_HEAD_SHAPE = (16, 96)  # features.HEAD_WINDOW x features.EMBEDDING_SIZE
_frontends = threading.local()  # AudioFrontend holds TFLite state: one per thread


def clip_features(trigger: np.ndarray, wav: bytes, hop: float,
                  frontends_dir: Path | None = None) -> np.ndarray:
    """``(1 + k, 16, 96)``: the trigger window's features first, then the head-input window of
    every ``hop`` seconds of the clip ``wav``. The trigger features alone, ``(16, 96)``, when the
    clip cannot give windows (not 16-bit 16 kHz, shorter than a window, unreadable): the event
    still teaches what the device saw. Blocking: call in a thread."""
    from edgekeeper.cloud.training import features as F

    trigger = np.asarray(trigger, dtype=np.float32)
    try:
        with wave.open(io.BytesIO(wav)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError):
        return trigger
    if rate != F.SAMPLE_RATE or width != 2 or hop <= 0:
        return trigger
    pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        pcm = pcm[: len(pcm) - len(pcm) % channels].reshape(-1, channels).mean(axis=1)
    if len(pcm) < F.WINDOW_SECONDS * F.SAMPLE_RATE:
        return trigger
    folder = frontends_dir or (MODELS_DIR / "frontends")
    fe = getattr(_frontends, str(folder), None)
    if fe is None:
        fe = F.AudioFrontend(folder, num_threads=1)
        setattr(_frontends, str(folder), fe)
    # Windows end on the clip's end, as the trigger window does, and every hop before it.
    win, step = round(F.WINDOW_SECONDS * F.SAMPLE_RATE), round(hop * F.SAMPLE_RATE)
    start = (len(pcm) - win) % step if step > 0 else 0
    windows = [wf.features for wf in fe.stream(pcm[start:], hop_seconds=hop)]
    if not windows:
        return trigger
    return np.stack([trigger, *windows]).astype(np.float32)


# --- what an example teaches ------------------------------------------------------------------

# The labels of each model family, negative class first (models/*/labels.txt). A family not
# named here has an unknown label set: its examples are kept but teach nothing (target None).
MODEL_LABELS: dict[str, tuple[str, ...]] = {
    "person": ("no_person", "person"),
    "sound": ("background", "speech", "alarm"),
}

# The teacher's free-text label -> the model's label, used when the teacher says the gate was
# wrong (docs/model-updates.md "Training data" prints this table). Keys are normalised
# (lowercase, '_' and '-' as spaces); matched whole, never by substring: "no person" must not
# match "person". A label not found falls back to the model's negative class, because the
# teacher said the label the gate fired on is not there.
SYNONYMS: dict[str, dict[str, str]] = {
    "person": {
        **dict.fromkeys(("person", "people", "persons", "human", "humans", "man", "woman",
                         "child", "children", "pedestrian", "pedestrians", "someone",
                         "visitor", "intruder", "courier", "delivery person", "cyclist",
                         "crowd"), "person"),
        # Anything without a person in it is the negative class.
        **dict.fromkeys(("no person", "no_person", "nobody", "no one", "empty", "nothing",
                         "background", "empty scene", "vehicle", "car", "animal", "cat",
                         "dog", "bird", "shadow", "shadows", "lighting change", "rain",
                         "tree", "insect", "reflection"), "no_person"),
    },
    "sound": {
        **dict.fromkeys(("background", "music", "tv", "television", "radio", "noise",
                         "silence", "quiet", "chime", "doorbell", "traffic", "wind", "rain",
                         "fan", "hum", "footsteps", "dog barking", "bark", "birdsong",
                         "engine", "applause", "laughter"), "background"),
        **dict.fromkeys(("speech", "talking", "conversation", "voice", "voices", "speaking",
                         "people talking", "shouting", "yelling", "person speaking"),
                        "speech"),
        **dict.fromkeys(("alarm", "siren", "beep", "beeping", "smoke alarm", "fire alarm",
                         "car alarm", "alarm clock", "buzzer", "smoke detector",
                         "carbon monoxide alarm"), "alarm"),
    },
}


def _normal(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").replace("-", " ").split())


def map_label(model: str, teacher_label: str) -> str | None:
    """The model's label the teacher's ``teacher_label`` names, or None if none (or the model's
    label set is unknown)."""
    labels = MODEL_LABELS.get(model)
    if labels is None:
        return None
    text = _normal(teacher_label)
    for label in labels:
        if text == _normal(label):
            return label
    table = {_normal(k): v for k, v in SYNONYMS.get(model, {}).items()}
    return table.get(text)


def target_of(model: str, gate_label: str, teacher_label: str,
              gate_correct: bool | None) -> str | None:
    """The gate label an example teaches (module docs, docs/model-updates.md):

    * gate right: the label it fired on;
    * gate wrong: the teacher's label mapped onto the model's labels, else the negative class;
      a mapped label equal to the one the gate fired on contradicts "wrong": None;
    * the teacher could not tell, or the model's labels are unknown: None.
    """
    labels = MODEL_LABELS.get(model)
    if labels is None or gate_correct is None:
        return None
    if gate_correct:
        return gate_label if gate_label in labels else None
    mapped = map_label(model, teacher_label) or labels[0]
    return None if mapped == gate_label else mapped


def _weight(*, target: str | None, label: str, provisional: bool, confidence: float,
            gate_correct: bool | None, reasoner: str) -> float:
    """The documented rule (cloud/reasoners/weighting.py, docs/reasoning.md "Labels for
    training"), and 0 for a judgement that teaches none of the model's labels."""
    if target is None:
        return 0.0
    return training_weight({"label": label, "confidence": confidence, "provisional": provisional,
                            "gate_correct": gate_correct, "reasoner": reasoner})


def _split_tag(tag: str) -> tuple[str, str]:
    name, _, version = tag.strip().partition("@")
    return name, version


def _model_of(meta: Mapping[str, Any], modality: str, tag: str) -> tuple[str, str]:
    """(family, version) of the model that scored the event: the event's own
    ``meta['models'][modality]``, else the envelope's model version tag (one ``name@version``
    or several joined by ',')."""
    models = meta.get("models")
    if isinstance(models, dict) and isinstance(models.get(modality), str):
        return _split_tag(models[modality])
    named = (list(models.values()) if isinstance(models, dict) and modality not in models
             else [])
    tags = [_split_tag(t) for t in (named or tag.split(",")) if isinstance(t, str) and t.strip()]
    gate_label = meta.get("label")
    for name, version in tags:
        if gate_label in MODEL_LABELS.get(name, ()):
            return name, version
    return tags[0] if len(tags) == 1 else ("", "")


def features_array(body: EventBody) -> np.ndarray | None:
    """The event's features as float32 of their shape, or None when it carried none."""
    if body.features is None or not body.features_dtype:
        return None
    raw = np.frombuffer(body.features, dtype=np.dtype(body.features_dtype).newbyteorder("<"))
    return raw.astype(np.float32).reshape(body.features_shape)


def example_from(event_body: EventBody, result_or_verdict: Any, model_version_tag: str,
                 group: str = "", weight: float | None = None, *, reasoner: str | None = None,
                 reasoned_at: float | None = None) -> TrainingExample | None:
    """The training example of one reasoned event, or None when it carried no features.

    ``result_or_verdict`` is the ResultBody the worker stored (or a reasoner's Verdict, then
    ``reasoner`` names it). ``weight`` None: the documented rule (``_weight``).
    """
    feats = features_array(event_body)
    if feats is None:
        return None
    r = result_or_verdict
    meta = event_body.meta
    modality = str(meta.get("modality") or "")
    model, version = _model_of(meta, modality, model_version_tag)
    gate_label = str(meta.get("label") or "")
    raw_scores = meta.get("scores")
    scores = ({str(k): float(v) for k, v in raw_scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
              if isinstance(raw_scores, dict) else {})
    gate_correct: bool | None = r.gate_correct
    target = target_of(model, gate_label, r.label, gate_correct)
    provisional = bool(r.provisional)
    confidence = float(r.confidence)
    reasoner_name = reasoner if reasoner is not None else str(getattr(r, "reasoner", ""))
    if weight is None:
        weight = _weight(target=target, label=r.label, provisional=provisional,
                         confidence=confidence, gate_correct=gate_correct, reasoner=reasoner_name)
    return TrainingExample(
        device_id=event_body.device_id,
        seq=event_body.seq,
        model=model,
        model_version=version,
        modality=modality,
        features=feats,
        scores=scores,
        gate_label=gate_label,
        teacher_label=r.label,
        target=target,
        teacher_confidence=confidence,
        gate_correct=gate_correct,
        reasoner=reasoner_name,
        provisional=provisional,
        weight=weight,
        captured_at=event_body.captured_at,
        reasoned_at=(reasoned_at if reasoned_at is not None
                     else float(getattr(r, "produced_at", 0.0) or time.time())),
        group=group,
    )


# --- how both stores keep an example ----------------------------------------------------------

# Features are kept as little-endian float32 bytes plus their shape: exactly what the device
# computed (float16 would halve the bytes but change the values a retrain sees;
# docs/model-updates.md gives the figures).
EXAMPLE_COLUMNS = (
    "device_id", "seq", "model", "model_version", "modality", "features", "features_shape",
    "scores", "gate_label", "teacher_label", "target", "teacher_confidence", "gate_correct",
    "reasoner", "provisional", "weight", "captured_at", "reasoned_at", "group_name",
    "media_path",
)


def example_row(e: TrainingExample) -> tuple[Any, ...]:
    """The values of EXAMPLE_COLUMNS (booleans as they are: each backend adapts them)."""
    feats = np.ascontiguousarray(e.features, dtype="<f4")
    return (e.device_id, e.seq, e.model, e.model_version, e.modality, feats.tobytes(),
            json.dumps(list(feats.shape)), json.dumps(e.scores, sort_keys=True), e.gate_label,
            e.teacher_label, e.target, e.teacher_confidence, e.gate_correct, e.reasoner,
            e.provisional, e.weight, e.captured_at, e.reasoned_at, e.group, e.media_path)


def example_of_row(row: Sequence[Any]) -> TrainingExample:
    """A row of ``id`` then EXAMPLE_COLUMNS back into an example."""
    (rid, device_id, seq, model, version, modality, feats, shape, scores, gate_label,
     teacher_label, target, confidence, gate_correct, reasoner, provisional, weight,
     captured_at, reasoned_at, group, media_path) = row
    array = np.frombuffer(bytes(feats), dtype="<f4").astype(np.float32)
    return TrainingExample(
        device_id=device_id, seq=int(seq), model=model, model_version=version,
        modality=modality, features=array.reshape(tuple(json.loads(shape))),
        scores=json.loads(scores), gate_label=gate_label, teacher_label=teacher_label,
        target=target, teacher_confidence=float(confidence),
        gate_correct=None if gate_correct is None else bool(gate_correct), reasoner=reasoner,
        provisional=bool(provisional), weight=float(weight), captured_at=float(captured_at),
        reasoned_at=float(reasoned_at), group=group, media_path=media_path, id=int(rid),
    )


def scope_filter(scope: Scope) -> tuple[str, tuple[str, ...]]:
    """(SQL condition with one '?' per value, values) selecting ``scope``'s examples. A group is
    the group the device was in when the example was made (recorded with it), so a retrain's
    rows do not change when devices move between groups later."""
    if scope.kind == "group":
        return "group_name = ?", (scope.name,)
    if scope.kind == "device":
        return "device_id = ?", (scope.name,)
    return "1 = 1", ()


def examples_filter(model: str, scope: Scope, since: float | None, until: float | None
                    ) -> tuple[str, tuple[object, ...]]:
    """(SQL condition with one '?' per value, values) for ``ExampleStore.examples``: the model,
    its scope and the [since, until) window of ``reasoned_at``. Both stores build their query
    from it (PostgreSQL turns each '?' into '%s')."""
    where, args = scope_filter(scope)
    sql = f"model = ? AND {where}"
    params: tuple[object, ...] = (model, *args)
    if since is not None:
        sql, params = sql + " AND reasoned_at >= ?", (*params, since)
    if until is not None:
        sql, params = sql + " AND reasoned_at < ?", (*params, until)
    return sql, params


MEDIA_DIR = "training-media"


def delete_media(paths: Iterable[str]) -> None:
    """Delete the kept media folders ``paths`` (blocking: call in a thread). Only folders laid
    out by ``write_media`` (``.../training-media/<device>/<seq>``) are touched: a path in the
    table is never trusted to point anywhere else."""
    for text in paths:
        path = Path(text)
        if path.parent.parent.name != MEDIA_DIR:
            log.warning("training.media_path_refused", path=text)
            continue
        shutil.rmtree(path, ignore_errors=True)


def write_media(root: Path, body: EventBody) -> str | None:
    """Keep ``body``'s key frames and audio under ``root/<device>/<seq>/`` (0700 folders, 0600
    files), written to a temporary folder and renamed, so a folder is whole or absent. Returns
    the folder, or None when the event carried no media. Blocking: call in a thread."""
    if not body.frames and body.audio_wav is None:
        return None
    final = root / body.device_id / str(body.seq)
    if final.is_dir():  # kept on an earlier delivery of this event
        return str(final)
    tmp = fs.private_dir(root / body.device_id / f".tmp-{body.seq}-{os.getpid()}")
    for i, frame in enumerate(body.frames):
        fs.write_private(tmp / f"frame-{i:02d}.jpg", frame)
    if body.audio_wav is not None:
        fs.write_private(tmp / "audio.wav", body.audio_wav)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker kept it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# --- the worker's side ------------------------------------------------------------------------

RETENTION_EVERY_S = 3600.0


class ExampleRecorder:
    """Turns each reasoned event into an example (``cloud/worker.py`` calls ``record`` right
    after storing the result) and deletes kept media after the retention (``retention``, a task
    of the worker's). Never fails an event: an error is logged ``worker.example_failed``."""

    def __init__(self, store: ExampleStore, settings: TrainingSection, data_dir: Path, *,
                 clock: Any = time.time, clip_hop: float = CLIP_HOP_SECONDS,
                 frontends_dir: Path | None = None) -> None:
        self.store = store
        self.clip_hop = clip_hop  # 0: the trigger window alone
        self.frontends_dir = frontends_dir
        self.settings = settings
        self.media_root = Path(data_dir) / MEDIA_DIR
        self.clock = clock
        self.added = 0
        self.failed = 0

    async def _group(self, device_id: str) -> str:
        # The store learns device groups with releases; until it has them every device is in
        # no group ("").
        lookup = getattr(self.store, "device_group", None)
        if lookup is None:
            return ""
        group = lookup(device_id)
        if inspect.isawaitable(group):
            group = await group
        return str(group or "")

    async def record(self, body: EventBody, result: Any, model_version_tag: str) -> int | None:
        """Store the example of ``body`` judged by ``result`` (a ResultBody); its id, or None
        when nothing was stored (off, no features, already stored, or an error)."""
        if not self.settings.examples or body.features is None:
            return None
        try:
            example = example_from(body, result, model_version_tag,
                                   await self._group(body.device_id))
            if example is None:
                return None
            if (example.modality == "audio" and body.audio_wav is not None
                    and self.clip_hop > 0 and example.features.shape == AUDIO_HEAD_SHAPE):
                example = replace(example, features=await asyncio.to_thread(
                    clip_features, example.features, body.audio_wav, self.clip_hop,
                    self.frontends_dir))
            if self.settings.keep_media:
                kept = await asyncio.to_thread(write_media, self.media_root, body)
                example = replace(example, media_path=kept)
            rid = await self.store.add_example(example)
        except Exception as err:
            self.failed += 1
            log.warning("worker.example_failed", device_id=body.device_id, seq=body.seq,
                        error=repr(err)[:300])
            return None
        self.added += rid is not None
        return rid

    async def forget_old_media(self) -> int:
        """Delete media kept longer than ``media_retention_days``, and any folder the table no
        longer names (a store write that failed after the media was written) once it is as
        old. Returns how many examples lost their media."""
        cutoff = self.clock() - self.settings.media_retention_days * 86400.0
        try:
            n = await self.store.forget_media(before=cutoff)
            await asyncio.to_thread(_sweep_orphans, self.media_root, cutoff)
        except Exception as err:
            # Housekeeping: the store being away must not stop the worker; next hour again.
            log.warning("worker.media_retention_failed", error=repr(err)[:300],
                        retry_in_s=RETENTION_EVERY_S)
            return 0
        if n:
            log.info("worker.media_forgotten", count=n, before=round(cutoff))
        return n

    async def retention(self, done: asyncio.Event) -> None:
        """Run the media retention now, then every hour until ``done`` is set."""
        while True:
            await self.forget_old_media()
            await runtime.sleep(done, RETENTION_EVERY_S)
            if done.is_set():
                return


def _sweep_orphans(root: Path, cutoff: float) -> None:
    if not root.is_dir():
        return
    for device in root.iterdir():
        if not device.is_dir():
            continue
        for folder in device.iterdir():
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)


# --- the summary (``edgekeeper cloud examples``) ------------------------------------------------


def summarise(counts: Sequence[ExampleCount]) -> dict[str, Any]:
    """Per model: totals, counts per target label, device and reasoner, and the gate's
    precision as the teacher sees it (share of judged examples with gate_correct True)."""
    out: dict[str, Any] = {}
    for c in counts:
        m = out.setdefault(c.model, {"examples": 0, "weighted": 0, "provisional": 0,
                                     "judged": 0, "gate_correct": 0, "by_target": {},
                                     "by_device": {}, "by_reasoner": {}})
        m["examples"] += c.count
        m["weighted"] += c.weighted
        m["provisional"] += c.count if c.provisional else 0
        if c.gate_correct is not None:
            m["judged"] += c.count
            m["gate_correct"] += c.count if c.gate_correct else 0
        for key, value in (("by_target", c.target or "(none)"), ("by_device", c.device_id),
                           ("by_reasoner", c.reasoner)):
            m[key][value] = m[key].get(value, 0) + c.count
    for m in out.values():
        m["gate_precision"] = (round(m["gate_correct"] / m["judged"], 4) if m["judged"]
                               else None)
    return out


def format_summary(summary: Mapping[str, Any], scope: Scope) -> str:
    if not summary:
        return f"no training examples in scope {scope}"
    lines: list[str] = []
    for model, m in sorted(summary.items()):
        precision = ("-" if m["gate_precision"] is None
                     else f"{m['gate_precision']:.2f} ({m['gate_correct']} of {m['judged']} "
                          "judged)")
        lines.append(f"{model or '(unknown model)'} ({scope}): {m['examples']} examples, "
                     f"{m['weighted']} with weight > 0, {m['provisional']} provisional; "
                     f"gate precision as the teacher sees it {precision}")
        for key, title in (("by_target", "target"), ("by_device", "device"),
                           ("by_reasoner", "reasoner")):
            parts = ", ".join(f"{k} {v}" for k, v in
                              sorted(m[key].items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  by {title}: {parts}")
    return "\n".join(lines)


def summary_command(args: Any, config: Any, with_store: Any) -> int:
    """``edgekeeper cloud examples`` (parsed in cloud/cli.py, which opens the store)."""
    from edgekeeper.errors import InputError

    try:
        scope = Scope.parse(args.scope)
    except ValueError as err:
        raise InputError(f"--scope: {err}", fix="use fleet, group:NAME or device:ID") from None
    counts = asyncio.run(with_store(
        config, lambda store: store.example_counts(model=args.model, scope=scope)))
    summary = summarise(counts)
    print(json.dumps({"scope": str(scope), "models": summary}) if args.json
          else format_summary(summary, scope))
    return 0

"""The local canary set and the shadow evaluation a candidate model must pass before a swap.

The ring (``<state_dir>/canary.sqlite``, 0600) keeps a few recent gate inputs per modality: a
frame (downscaled, JPEG) or an audio window (16-bit PCM), the scores the running model gave it,
and, once the cloud's result for an event arrives, the teacher's label and ``gate_correct``. It
is sampled, not a recording: one input every ``SAMPLE_SECONDS`` per modality, plus inputs that
scored a hit (at most one a second), the newest ``size`` per modality, bounded in bytes too.

``shadow_evaluate`` runs the current and the candidate model side by side on those inputs (or on
the bundled sample, models/samples/street, while the ring is empty) and refuses a candidate that
does not load, raises, emits a non-finite score, does not match its release (labels, input
spec), or flips the hit/no-hit decision on more than ``max_flip`` of the inputs where no teacher
said the current model was wrong.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
import wave
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgekeeper.config import MODELS_DIR
from edgekeeper.device.gate import GateOutput, ModelRunner
from edgekeeper.device.manifest import load_manifest
from edgekeeper.errors import EdgekeeperError
from edgekeeper.log import get_logger
from edgekeeper.protocol.release import ReleaseBody
from edgekeeper.sqlite import Database, Pragmas

log = get_logger(__name__)

SAMPLE_SECONDS = 20.0  # one routine input per modality this often
HIT_SAMPLE_SECONDS = 1.0  # inputs that scored a hit: at most one a second
_FRAME_WIDTH = 320  # stored frames are downscaled to this width (the gates take 160x120)
SAMPLE_RECORDING = MODELS_DIR / "samples" / "street"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id           INTEGER PRIMARY KEY,
    modality     TEXT NOT NULL,
    at           REAL NOT NULL,
    model        TEXT NOT NULL,      -- the model that scored it
    data         BLOB NOT NULL,      -- vision: JPEG; audio: int16 PCM
    rate         INTEGER NOT NULL,   -- audio sample rate (0 for vision)
    scores       TEXT NOT NULL,      -- JSON {label: score}
    seq          INTEGER,            -- the event it opened, if any
    label        TEXT,               -- the teacher's label, once its result arrived
    gate_correct INTEGER             -- the teacher's opinion of the gate (NULL: none)
);
CREATE INDEX IF NOT EXISTS inputs_modality ON inputs (modality, id);
"""


@dataclass(frozen=True)
class CanaryInput:
    modality: str
    data: np.ndarray  # vision: BGR frame; audio: float32 window
    scores: Mapping[str, float] | None = None
    gate_correct: bool | None = None


class CanaryRing:
    """Recent gate inputs, kept for shadow evaluation. ``offer`` is called on the event loop
    for every inference and must stay cheap: it samples, copies and hands off to ``run``."""

    def __init__(self, path: Path, *, size: int = 64, max_bytes: int = 16 << 20,
                 thresholds: Mapping[str, float] | None = None) -> None:
        self.path = Path(path)
        self.size = size
        self.max_bytes = max_bytes
        self.thresholds = dict(thresholds or {})
        self._db: Database | None = None
        self._last: dict[tuple[str, bool], float] = {}
        self._queue: deque[tuple[str, np.ndarray, GateOutput, int]] = deque(maxlen=8)
        self._tags: deque[tuple[str, int]] = deque(maxlen=64)
        self._wake = asyncio.Event()

    async def open(self) -> CanaryRing:
        self._db = await Database.open(self.path, name="canary ring", schema=_SCHEMA,
                                       pragmas=Pragmas(synchronous="NORMAL"),
                                       setting="device.state_dir")
        return self

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def hit(self, scores: Mapping[str, float]) -> bool:
        return any(s >= self.thresholds.get(k, 0.5) for k, s in scores.items())

    def offer(self, modality: str, data: np.ndarray, out: GateOutput, rate: int = 0) -> None:
        now = time.monotonic()
        hit = self.hit(out.scores)
        every = HIT_SAMPLE_SECONDS if hit else SAMPLE_SECONDS
        if now - self._last.get((modality, hit), -math.inf) < every:
            return
        self._last[(modality, hit)] = now
        self._queue.append((modality, data.copy(), out, rate))
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write offered inputs (encoding off the loop) until ``stop``."""
        while not stop.is_set():
            while self._queue:
                await self._store(*self._queue.popleft())
            while self._tags:
                await self.tag_latest_hit(*self._tags.popleft())
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            self._wake.clear()

    async def _store(self, modality: str, data: np.ndarray, out: GateOutput, rate: int) -> None:
        blob = await asyncio.to_thread(_encode, modality, data)
        if self._db is None or blob is None:
            return
        await self._db.run(self._insert, modality, blob, rate, out)

    def _insert(self, conn: sqlite3.Connection, modality: str, blob: bytes, rate: int,
                out: GateOutput) -> None:
        with conn:
            conn.execute(
                "INSERT INTO inputs (modality, at, model, data, rate, scores) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (modality, time.time(), out.model, blob, rate, json.dumps(out.scores)))
            conn.execute(
                "DELETE FROM inputs WHERE modality = ? AND id NOT IN (SELECT id FROM inputs "
                "WHERE modality = ? ORDER BY id DESC LIMIT ?)", (modality, modality, self.size))
            # The byte bound: the oldest go first, whatever their modality.
            total = conn.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM inputs").fetchone()
            excess = int(total[0]) - self.max_bytes
            for row_id, length in conn.execute(
                    "SELECT id, LENGTH(data) FROM inputs ORDER BY id").fetchall():
                if excess <= 0:
                    break
                conn.execute("DELETE FROM inputs WHERE id = ?", (row_id,))
                excess -= int(length)

    def event_opened(self, modality: str, seq: int) -> None:
        """An event was captured: its trigger input is the newest stored hit (linked in
        ``run``, so the teacher's verdict on ``seq`` can be recorded against it)."""
        self._tags.append((modality, seq))
        self._wake.set()

    async def note_result(self, seq: int, label: str, gate_correct: bool | None) -> None:
        """The teacher's verdict on the event ``seq`` opened."""
        if self._db is None:
            return

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("UPDATE inputs SET label = ?, gate_correct = ? WHERE seq = ?",
                             (label, None if gate_correct is None else int(gate_correct), seq))

        await self._db.run(update)

    async def tag_latest_hit(self, modality: str, seq: int) -> None:
        """Link the newest stored hit of ``modality`` to the event ``seq`` it opened."""
        if self._db is None:
            return

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("UPDATE inputs SET seq = ? WHERE id = (SELECT MAX(id) FROM inputs "
                             "WHERE modality = ? AND seq IS NULL)", (seq, modality))

        await self._db.run(update)

    async def inputs(self, modality: str) -> list[CanaryInput]:
        if self._db is None:
            return []

        def read(conn: sqlite3.Connection) -> list[tuple[bytes, int, str, int | None]]:
            return conn.execute(
                "SELECT data, rate, scores, gate_correct FROM inputs WHERE modality = ? "
                "ORDER BY id", (modality,)).fetchall()

        rows = await self._db.run(read)
        return await asyncio.to_thread(_decode_rows, modality, rows)

    async def count(self, modality: str) -> int:
        if self._db is None:
            return 0
        row = await self._db.run(lambda conn: conn.execute(
            "SELECT COUNT(*) FROM inputs WHERE modality = ?", (modality,)).fetchone())
        return int(row[0])


def _encode(modality: str, data: np.ndarray) -> bytes | None:
    if modality == "vision":
        h, w = data.shape[:2]
        if w > _FRAME_WIDTH:
            data = cv2.resize(data, (_FRAME_WIDTH, max(1, h * _FRAME_WIDTH // w)),
                              interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, 90])
        encoded: bytes = buf.tobytes()
        return encoded if ok else None
    pcm = np.clip(np.asarray(data, np.float32) * 32768.0, -32768, 32767).astype("<i2")
    raw: bytes = pcm.tobytes()
    return raw


def _decode_rows(modality: str,
                 rows: Sequence[tuple[bytes, int, str, int | None]]) -> list[CanaryInput]:
    out = []
    for blob, _rate, scores, correct in rows:
        if modality == "vision":
            img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                continue
            data = img
        else:
            data = np.frombuffer(blob, "<i2").astype(np.float32) / 32768.0
        out.append(CanaryInput(modality, data, json.loads(scores),
                               None if correct is None else bool(correct)))
    return out


def sample_inputs(modality: str, *, window_samples: int = 32000, count: int = 16,
                  recording: Path = SAMPLE_RECORDING) -> list[CanaryInput]:
    """Inputs from the bundled sample recording: the canary set of a device with no ring yet."""
    out = []
    if modality == "vision":
        cap = cv2.VideoCapture(str(recording / "video.avi"))
        try:
            frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or count
            for i in range(count):
                cap.set(cv2.CAP_PROP_POS_FRAMES, i * frames // count)
                ok, frame = cap.read()
                if ok:
                    out.append(CanaryInput("vision", frame))
        finally:
            cap.release()
        return out
    with wave.open(str(recording / "audio.wav"), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    step = max(1, (len(pcm) - window_samples) // count)
    for start in range(0, max(1, len(pcm) - window_samples + 1), step)[:count]:
        out.append(CanaryInput("audio", pcm[start : start + window_samples]))
    return out


@dataclass(frozen=True)
class ShadowReport:
    ok: bool
    reason: str
    inputs: int
    compared: int = 0
    flips: int = 0


def shadow_evaluate(current: Path, candidate: Path, body: ReleaseBody,
                    inputs: Sequence[CanaryInput], *, thresholds: Mapping[str, float],
                    max_flip: float, num_threads: int = 1) -> ShadowReport:
    """Run both models on ``inputs`` (blocking: call in a thread). ``ok`` False says why."""
    n = len(inputs)

    def fail(reason: str, **kw: int) -> ShadowReport:
        return ShadowReport(False, reason, n, **kw)

    try:
        manifest = load_manifest(candidate)
        if manifest.modality != body.input.modality:
            return fail(f"wrong_input: the manifest is {manifest.modality}, the release "
                        f"{body.input.modality}")
        base = candidate.parent.resolve()
        declared = {(base / f.path).resolve() for f in body.files}
        outside = [str(st.model) for st in manifest.stages if st.model.resolve() not in declared]
        if outside:
            # Only the release's own, verified files may run: not a file beside the slot.
            return fail(f"wrong_files: {outside[0]} is not a file of the release")
        if manifest.tag != body.tag:
            return fail(f"wrong_version: the manifest is {manifest.tag}, the release {body.tag}")
        if tuple(manifest.labels) != tuple(body.labels):
            return fail(f"wrong_labels: the model outputs {list(manifest.labels)}, the release "
                        f"says {list(body.labels)}")
        new = ModelRunner(manifest, num_threads)
        old = ModelRunner.load(current, num_threads)
    except (EdgekeeperError, ValueError, RuntimeError) as err:
        return fail(f"load_failed: {getattr(err, 'message', err)}")
    v, a = new.manifest.vision, new.manifest.audio
    if v is not None and (v.width, v.height) != (body.input.width, body.input.height):
        return fail(f"wrong_input: the model takes {v.width}x{v.height}, the release says "
                    f"{body.input.width}x{body.input.height}")
    oa = old.manifest.audio
    if a is not None and oa is not None and (
            a.sample_rate, a.window_seconds, a.hop_seconds) != (
            oa.sample_rate, oa.window_seconds, oa.hop_seconds):
        # The running loop cut its windows for the old model: a new window needs a restart.
        return fail("wrong_input: the audio window or hop differs from the running model's")
    compared = flips = 0
    for i, item in enumerate(inputs):
        try:
            got = new.classify(item.data)
        except Exception as err:  # any failure of the candidate on real input refuses it
            return fail(f"error: input {i}: {type(err).__name__}: {err}"[:500])
        bad = [k for k, s in got.scores.items() if not math.isfinite(s)]
        if bad:
            return fail(f"non_finite: input {i}: {bad[0]} = {got.scores[bad[0]]}")
        if item.gate_correct is False:
            continue  # the teacher says the current model was wrong: a flip is welcome here
        ref = old.classify(item.data).scores
        common = set(ref) & set(got.scores)
        compared += 1
        if any((ref[k] >= thresholds.get(k, 0.5)) != (got.scores[k] >= thresholds.get(k, 0.5))
               for k in common):
            flips += 1
    if compared and flips / compared > max_flip:
        return fail(f"disagrees: flips the decision on {flips} of {compared} inputs "
                    f"(bound {max_flip:.0%})", compared=compared, flips=flips)
    return ShadowReport(True, "", n, compared, flips)

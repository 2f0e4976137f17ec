"""The offline reasoner: a stronger local model than the gate stands in as the teacher when no
LLM is configured (the embedded default without ANTHROPIC_API_KEY, ``edgekeeper demo``, tests).

Frames: OpenCV's HOG people detector (Dalal-Triggs linear SVM, shipped inside OpenCV) looks for
whole people, and the frontal-face Haar cascade (cv2.data.haarcascades, shipped with
opencv-python-headless 4.x) for faces close to the camera, on the same key frames the LLM would
see. Audio: the clip's level, a transcript from PocketSphinx when installed
(cloud/reasoners/transcribe.py), and a DSP judgement of the sound (cloud/reasoners/audio_judge.py:
periodic narrow-band beeps or a sustained tone or siren = alarm; a harmonic voice-band stack
broken into syllable bursts = speech; sustained harmonic texture = music; else background).
For an audio event (the gate's label is one of the sound model's, or there is no frame) that
judgement confirms or denies the gate's label; music counts as background to the gate, which
has no music label. Its accuracy per label is measured by bench/bench_teacher.py.

Every result says ``reasoner = "offline:hog+haar[+pocketsphinx]"`` and ``provisional = True``,
and recommends at most "log": no one mistakes it for an LLM's judgement, and it never has the
authority of one. The detectors are CPU work (about 0.4 s per 768x576 frame); they run on a
small thread pool (OpenCV parallelises inside each call too) with one detector set per
thread (OpenCV objects are not shared across threads).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import cv2.data  # the bundled Haar cascades (a submodule the cv2 stubs do not list)
import numpy as np

from edgekeeper.cloud.reasoners.audio_judge import AudioJudgement, judge_pcm
from edgekeeper.cloud.reasoners.base import NO_USAGE, Usage, Verdict
from edgekeeper.cloud.reasoners.media import audio_summary, decode_jpeg, pick_frames, read_wav
from edgekeeper.cloud.reasoners.transcribe import Transcriber, make_transcriber
from edgekeeper.config import ReasonerSection
from edgekeeper.protocol.messages import EventBody

if TYPE_CHECKING:
    from edgekeeper.config import Config

# HOG: an SVM margin above this is a detection. 0.5 keeps none on person-free scenes (street
# background plates, buildings, still lifes) while finding the pedestrians of vtest.avi.
HOG_MIN_WEIGHT = 0.5
HOG_SCALE = 1.1  # pyramid step: 1.05 finds a few more people at twice the time
HOG_MIN_HEIGHT = 128  # the detector's window: smaller frames are upscaled to it
FACE_MIN_SIZE = 32
FACE_SCALE = 1.2  # 1.1 finds the same faces here at three times the cost
# How sure the teacher is when it finds nothing: HOG misses small, sitting or occluded people.
NOTHING_FOUND_CONFIDENCE = 0.55
# The sound gate's labels (models/sound/labels.txt); an event on one of them is judged by ear.
AUDIO_LABELS = frozenset({"background", "speech", "alarm"})
# What each of the audio judge's labels is in the gate's vocabulary (it has no music label).
GATE_VIEW = {"speech": "speech", "alarm": "alarm", "music": "background",
             "background": "background"}


def judge_wav(wav: bytes, transcript: str | None) -> AudioJudgement | None:
    """The audio judge on a WAV clip, None when it does not read (blocking: call in a thread)."""
    try:
        pcm, rate = read_wav(wav)
    except ValueError:
        return None
    if pcm.size == 0:
        return None
    return judge_pcm(pcm, rate, transcript)


@dataclass(frozen=True)
class FrameFindings:
    index: int
    people: int
    faces: int
    best_weight: float  # strongest HOG margin, 0 when none
    readable: bool = True


class _Detectors(threading.local):
    def __init__(self) -> None:
        self.hog = cv2.HOGDescriptor()
        # Already a float32 array at run time; the stubs say Sequence[float].
        people = np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector(), np.float32)
        self.hog.setSVMDetector(people)
        self.face = cv2.CascadeClassifier(
            os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        )
        if self.face.empty():  # pragma: no cover - the wheel ships it
            raise RuntimeError("OpenCV's frontal face cascade is missing from cv2.data")


_detectors = _Detectors()


def examine_frame(index: int, jpeg: bytes) -> FrameFindings:
    """Run the people detector and the face cascade on one JPEG (blocking; call in a thread)."""
    img = decode_jpeg(jpeg)
    if img is None:
        return FrameFindings(index, 0, 0, 0.0, readable=False)
    h, w = img.shape[:2]
    if h < HOG_MIN_HEIGHT or w < 64:
        k = max(HOG_MIN_HEIGHT / h, 64 / w)
        img = cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_LINEAR)
    det = _detectors
    _, weights = det.hog.detectMultiScale(img, winStride=(8, 8), padding=(8, 8), scale=HOG_SCALE)
    margins = [float(x) for x in np.asarray(weights).ravel() if float(x) > HOG_MIN_WEIGHT]
    gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    faces = det.face.detectMultiScale(gray, scaleFactor=FACE_SCALE, minNeighbors=6,
                                      minSize=(FACE_MIN_SIZE, FACE_MIN_SIZE))
    return FrameFindings(index, len(margins), len(faces), max(margins, default=0.0))


def _confidence(best_weight: float, faces: int) -> float:
    """SVM margin -> a probability-like score: 0.5 margin ~0.6, 1.0 ~0.75, 2.0+ ~0.95."""
    p = 1.0 / (1.0 + math.exp(-2.0 * (best_weight - 0.3)))
    if faces:
        p = max(p, 0.8)
    return round(min(0.97, p), 3)


class OfflineReasoner:
    """Stand-in teacher; see the module docstring."""

    def __init__(self, *, config: Config | None = None,
                 transcriber: Transcriber | bool | None = True, **_: Any) -> None:
        section = config.reasoner if config is not None else ReasonerSection()
        self.max_frames = max(1, section.max_frames)
        if transcriber is True:
            self._transcriber: Transcriber | None = make_transcriber(section.transcriber)
            self._owns_transcriber = True
        else:
            self._transcriber = transcriber or None
            self._owns_transcriber = False
        self.name = "offline:hog+haar" + (
            f"+{self._transcriber.name}" if self._transcriber is not None else "")
        self._executor = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1),
                                            thread_name_prefix="offline-reasoner")

    async def reason(self, event: EventBody, *, model_version: str) -> Verdict:
        loop = asyncio.get_running_loop()
        picked = pick_frames(event.frames, self.max_frames)
        findings = list(await asyncio.gather(*(
            loop.run_in_executor(self._executor, examine_frame, i, f) for i, f in picked)))
        audio: dict[str, Any] | None = None
        heard: AudioJudgement | None = None
        if event.audio_wav is not None:
            audio = await loop.run_in_executor(self._executor, audio_summary, event.audio_wav)
            transcript: str | None = None
            if self._transcriber is not None:
                transcript = await self._transcriber.transcribe(event.audio_wav)
                if transcript is not None:
                    audio["transcript"] = transcript
            heard = await loop.run_in_executor(self._executor, judge_wav, event.audio_wav,
                                               transcript)
        return self.judge(event, findings, audio, heard)

    def judge(self, event: EventBody, findings: list[FrameFindings],
              audio: dict[str, Any] | None, heard: AudioJudgement | None = None) -> Verdict:
        meta = event.meta
        gate_label = meta.get("label") if isinstance(meta.get("label"), str) else ""
        with_people = [f for f in findings if f.people or f.faces]
        people = max((f.people for f in findings), default=0)
        faces = max((f.faces for f in findings), default=0)
        best = max((f.best_weight for f in findings), default=0.0)
        transcript = (audio or {}).get("transcript") or ""
        seen = sum(1 for f in findings if f.readable)
        parts: list[str] = []
        if findings:
            parts.append(
                f"people detector found up to {people} person(s) and {faces} face(s) in "
                f"{len(with_people)} of {seen} frame(s)" if with_people
                else f"people detector found no one in {seen} frame(s)")
        if audio is not None:
            if audio.get("readable"):
                parts.append(f"audio {audio.get('seconds')} s at {audio.get('rms_dbfs')} dBFS")
            if transcript:
                parts.append(f"recognizer heard: {transcript[:200]!r}")
        label, gate_correct, confidence, action = gate_label or "unknown", None, 0.0, "none"
        if heard is not None and gate_label in AUDIO_LABELS:
            # A sound event: judged by ear, whatever the frames show.
            label, confidence = heard.label, heard.confidence
            gate_correct = GATE_VIEW[heard.label] == gate_label
            action = "log" if heard.label in ("alarm", "speech") else "none"
        elif with_people:
            label, confidence, action = "person", _confidence(best, faces), "log"
            gate_correct = True if gate_label == "person" else None
        elif gate_label == "person" and seen:
            label, confidence = "background", NOTHING_FOUND_CONFIDENCE
            gate_correct = False
        elif heard is not None and not seen:
            # Audio only, on a label the sound model does not have: an opinion, no verdict.
            label, confidence = heard.label, heard.confidence
            action = "log" if heard.label in ("alarm", "speech") else "none"
        if heard is not None:
            parts.append(f"sounds like {heard.label} ({heard.reason})")
        summary = "offline teacher (no LLM): " + ("; ".join(parts) or "nothing to examine")
        return Verdict(
            label=label,
            confidence=confidence,
            summary=summary,
            action=action,
            gate_correct=gate_correct,
            provisional=True,
            extra={
                "teacher": self.name,
                "frames": [{"index": f.index, "people": f.people, "faces": f.faces,
                            "hog_margin": round(f.best_weight, 3), "readable": f.readable}
                           for f in findings],
                "audio": audio,
                "audio_judgement": heard.as_dict() if heard is not None else None,
            },
            usage=NO_USAGE,
        )

    async def probe(self) -> Usage:
        return NO_USAGE

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_transcriber and self._transcriber is not None:
            await self._transcriber.close()

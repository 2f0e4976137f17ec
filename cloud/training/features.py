"""Features exactly as the device gate computes them (docs/models.md, "Audio stages").

This module is the reference the device runtime can be compared against: plain numpy plus
ai_edge_litert, no TensorFlow, so it imports on a board too. The audio head is trained on what
:meth:`AudioFrontend.features` returns, so any drift between this code and ``device/gate.py``
would silently cost accuracy; keep the two in step with the manifest contract, not with each
other's quirks.

Pipeline for one gate window (2.0 s of 16 kHz mono floats in [-1, 1]):

1. ``melspectrogram.tflite`` over the whole window: input ``pcm * 32768`` as ``[1, N]``; output
   squeezed to ``(T, 32)`` and mapped ``y * 0.1 + 2.0`` (openWakeWord's ``x / 10 + 2``).
   For N = 32000, T = 197.
2. ``embedding_model.tflite`` over windows of 76 mel rows, the last ending at the last row and
   earlier ones every 8 rows before it, in time order: ``(n, 96)``. For T = 197, n = 16.
3. The head sees the last 16 embeddings: ``(16, 96)``, the event's *features*.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekeeper.errors import InputError, ModelError

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 2.0
# 0.48 s, not 0.5 s: a multiple of 8 embedding steps x 160 samples per mel row (0.08 s), so the
# device gate, which caches embeddings by absolute mel row ("frame_samples"), computes only 6 new
# embeddings per hop instead of all 16. With 0.5 s the rows never line up and nothing is reused.
HOP_SECONDS = 0.48
MEL_FRAME_SAMPLES = 160  # the mel front end emits one row per 160 samples (shift-invariant)
PCM_SCALE = 32768.0
MEL_SCALE = 0.1
MEL_OFFSET = 2.0
EMBEDDING_WINDOW = 76
EMBEDDING_STEP = 8
HEAD_WINDOW = 16
EMBEDDING_SIZE = 96

MEL_MODEL = "melspectrogram.tflite"
EMBEDDING_MODEL = "embedding_model.tflite"


def window_starts(n_rows: int, window: int, step: int) -> list[int]:
    """Start rows of the sliding windows the contract defines, in time order.

    The last window ends at the last row; earlier ones start every ``step`` rows before it, as
    many as fit. Anchoring at the end (not the start) keeps the newest audio in every window,
    which is what a live gate cares about.
    """
    if window <= 0 or step <= 0:
        raise ValueError(f"window and step must be positive, got window={window} step={step}")
    if n_rows < window:
        return []
    last = n_rows - window
    return list(range(last % step, last + 1, step))


def _interpreter(path: Path, num_threads: int) -> object:
    # Imported here so that importing this module (e.g. for window_starts) needs no runtime.
    from ai_edge_litert.interpreter import Interpreter

    if not path.is_file():
        raise ModelError(
            f"audio front-end model {path} does not exist",
            fix="rebuild with `python -m edgekeeper.cloud.training.recipe --out models/` "
            "or reinstall edgekeeper (the front-ends ship in models/frontends/)",
        )
    try:
        return Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as err:
        raise ModelError(
            f"{path} is not a TFLite model the runtime can load: {err}",
            fix="restore the file from the openwakeword==0.5.1 wheel (see models/frontends/NOTICE)",
        ) from err


@dataclass(frozen=True)
class WindowFeatures:
    """Features of one gate window and when the window ends (seconds into the signal)."""

    end_seconds: float
    features: np.ndarray  # (HEAD_WINDOW, EMBEDDING_SIZE) float32


class AudioFrontend:
    """Runs the openWakeWord mel and embedding stages the way the gate manifest describes.

    Not thread-safe (TFLite interpreters hold state); make one per thread.
    """

    def __init__(self, frontends_dir: Path, *, num_threads: int = 2) -> None:
        self._mel: object = _interpreter(frontends_dir / MEL_MODEL, num_threads)
        self._emb: object = _interpreter(frontends_dir / EMBEDDING_MODEL, num_threads)
        self._mel_len = -1
        self._emb_batch = -1

    def mel(self, pcm: np.ndarray) -> np.ndarray:
        """``(T, 32)`` mel rows of mono floats in [-1, 1], scaled as the manifest says."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise InputError(
                f"audio must be mono 1-D samples, got shape {pcm.shape}",
                fix="mix channels down to mono before computing features",
            )
        it = self._mel
        if pcm.shape[0] != self._mel_len:
            it.resize_tensor_input(it.get_input_details()[0]["index"], [1, pcm.shape[0]])  # type: ignore[attr-defined]
            it.allocate_tensors()  # type: ignore[attr-defined]
            self._mel_len = pcm.shape[0]
        it.set_tensor(it.get_input_details()[0]["index"], (pcm * PCM_SCALE)[None, :])  # type: ignore[attr-defined]
        it.invoke()  # type: ignore[attr-defined]
        out: np.ndarray = it.get_tensor(it.get_output_details()[0]["index"])  # type: ignore[attr-defined]
        seq = np.squeeze(out)
        if seq.ndim == 1:  # a single mel row squeezes to 1-D; keep it a sequence
            seq = seq[None, :]
        return (seq * MEL_SCALE + MEL_OFFSET).astype(np.float32)

    def embeddings(self, mel: np.ndarray) -> np.ndarray:
        """``(n, 96)`` embeddings over the contract's 76-row windows of ``mel``."""
        starts = window_starts(mel.shape[0], EMBEDDING_WINDOW, EMBEDDING_STEP)
        if not starts:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        # One batched call gives bit-identical results to one call per window (checked in
        # tests) and is several times faster when featurising a training set.
        return self._embed(mel, starts)

    def features(self, window: np.ndarray) -> np.ndarray:
        """The head's input for one gate window: the last 16 embeddings, ``(16, 96)``.

        A window shorter than 2.0 s yields fewer than 16 embeddings; it is an error rather than
        silently padded, because the device never runs the head on a partial window.
        """
        emb = self.embeddings(self.mel(window))
        if emb.shape[0] < HEAD_WINDOW:
            raise InputError(
                f"a window of {len(window)} samples gives {emb.shape[0]} embeddings, "
                f"the head needs {HEAD_WINDOW}",
                fix=f"pass windows of {WINDOW_SECONDS} s at {SAMPLE_RATE} Hz "
                f"({int(WINDOW_SECONDS * SAMPLE_RATE)} samples)",
            )
        return emb[-HEAD_WINDOW:]

    def stream(
        self,
        signal: np.ndarray,
        *,
        window_seconds: float = WINDOW_SECONDS,
        hop_seconds: float = HOP_SECONDS,
        sample_rate: int = SAMPLE_RATE,
    ) -> Iterator[WindowFeatures]:
        """Features of every full window of a long signal, one every ``hop_seconds``.

        The first window ends ``window_seconds`` into the signal: the gate waits for a full
        window before it classifies anything.
        """
        win = round(window_seconds * sample_rate)
        hop = round(hop_seconds * sample_rate)
        shared = MEL_FRAME_SAMPLES * EMBEDDING_STEP
        if (win, sample_rate) == (round(WINDOW_SECONDS * SAMPLE_RATE), SAMPLE_RATE) and (
            hop % shared == 0
        ):
            yield from self._stream_shared(np.asarray(signal, dtype=np.float32), win, hop)
            return
        for end in range(win, len(signal) + 1, hop):
            yield WindowFeatures(end / sample_rate, self.features(signal[end - win : end]))

    def _stream_shared(self, signal: np.ndarray, win: int, hop: int) -> Iterator[WindowFeatures]:
        """:meth:`stream` computing each mel row and each embedding once, as the device gate's
        cache does (docs/models.md, ``frame_samples``): every window starts on a mel row and
        its embedding windows on a multiple of ``EMBEDDING_STEP`` rows from the first one, so
        consecutive windows share 10 of their 16 embeddings and all but 48 of their mel rows.

        Bit-identical to ``features(window)`` per window (a mel row depends only on its own
        512 samples; a batched embedding call equals one call per window; both checked in
        tests), and several times faster over the recipe's 40-minute held-out streams.
        """
        n_windows = (len(signal) - win) // hop + 1 if len(signal) >= win else 0
        if n_windows <= 0:
            return
        rows_per_window = self.mel(signal[:win]).shape[0]  # 197 for 2 s
        frame = win - (rows_per_window - 1) * MEL_FRAME_SAMPLES  # samples under one mel row
        local = window_starts(rows_per_window, EMBEDDING_WINDOW, EMBEDDING_STEP)[-HEAD_WINDOW:]
        hop_rows = hop // MEL_FRAME_SAMPLES
        n_rows = (n_windows - 1) * hop_rows + rows_per_window
        # Mel rows in chunks (one call over 40 minutes of audio would need gigabytes).
        chunk = 6000
        mel = np.concatenate([
            self.mel(signal[r * MEL_FRAME_SAMPLES : (min(r + chunk, n_rows) - 1)
                            * MEL_FRAME_SAMPLES + frame])
            for r in range(0, n_rows, chunk)
        ])
        # Every embedding any window needs: rows local[0], local[0] + 8, ... of the stream.
        starts = range(local[0], (n_windows - 1) * hop_rows + local[-1] + 1, EMBEDDING_STEP)
        # Batches of 16: larger ones cost more per embedding on XNNPACK (1.8 ms each at 16,
        # 3.3 ms at 256 on the build machine), presumably as they outgrow the CPU cache.
        emb = np.concatenate([
            self._embed(mel, list(starts[i : i + HEAD_WINDOW]))
            for i in range(0, len(starts), HEAD_WINDOW)
        ])
        per_hop = hop_rows // EMBEDDING_STEP
        for j in range(n_windows):
            first = j * per_hop
            yield WindowFeatures(
                (j * hop + win) / SAMPLE_RATE, emb[first : first + HEAD_WINDOW].copy()
            )

    def _embed(self, mel: np.ndarray, starts: list[int]) -> np.ndarray:
        batch = np.stack([mel[s : s + EMBEDDING_WINDOW] for s in starts])[..., None]
        it = self._emb
        if batch.shape[0] != self._emb_batch:
            it.resize_tensor_input(it.get_input_details()[0]["index"], list(batch.shape))  # type: ignore[attr-defined]
            it.allocate_tensors()  # type: ignore[attr-defined]
            self._emb_batch = batch.shape[0]
        it.set_tensor(it.get_input_details()[0]["index"], batch.astype(np.float32))  # type: ignore[attr-defined]
        it.invoke()  # type: ignore[attr-defined]
        out: np.ndarray = it.get_tensor(it.get_output_details()[0]["index"])  # type: ignore[attr-defined]
        return out.reshape(len(starts), -1).astype(np.float32)


def frame_to_input(
    frame_bgr: np.ndarray, width: int, height: int, color: str = "rgb"
) -> np.ndarray:
    """A camera frame (BGR uint8, OpenCV order) as the vision model's float input in [0, 1].

    Stretched (not letterboxed) to ``width`` x ``height`` like the gate does, channels reordered
    to ``color``; mean 0 / std 1 as our manifests declare. ``INTER_AREA`` because the gate
    shrinks large frames and area averaging keeps small, distant people visible.
    """
    import cv2

    small = cv2.resize(frame_bgr, (width, height), interpolation=cv2.INTER_AREA)
    if color == "rgb":
        small = small[..., ::-1]
    elif color == "gray":
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)[..., None]
    return np.ascontiguousarray(small, dtype=np.float32) / 255.0

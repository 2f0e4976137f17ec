"""The gatekeeper: a TFLite classifier per modality, run in its own thread, swappable live.

``ModelRunner`` holds one manifest's interpreters and turns a frame (vision) or a window of
samples (audio) into label scores plus the features the learning loop trains on. It is not
thread-safe (TFLite interpreters are not); ``Gate`` gives each runner one dedicated thread and an
async ``classify``. ``Gate.swap`` loads a new model in a new thread while the old one keeps
answering, then replaces it between two inferences: the loop never stops.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgekeeper.device.inference import load_interpreter
from edgekeeper.device.manifest import Manifest, Stage, load_manifest
from edgekeeper.errors import ModelError
from edgekeeper.log import get_logger

log = get_logger(__name__)

_SUPPORTED = (np.float32, np.int8, np.uint8)
# The least audio a cached front end is run on (0.25 s at 16 kHz): XNNPACK refuses the mel
# spectrogram on a few hundred samples, and tiny inputs cost more per sample anyway.
_MIN_FRONT_END_SAMPLES = 4096


@dataclass(frozen=True, slots=True)
class GateOutput:
    """One inference: probabilities per label and the features behind them."""

    scores: dict[str, float]
    features: np.ndarray | None
    model: str
    # Wall-clock time of the inference itself (stats only; never enters events or decisions).
    latency_ms: float


def quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float input -> the tensor's type, using the tensor's own (scale, zero_point)."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x.astype(np.float32, copy=False)
    scale, zero_point = _quantization(detail)
    info = np.iinfo(dtype)
    q = np.round(x / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y.astype(np.float32, copy=False)
    scale, zero_point = _quantization(detail)
    return (y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
    """A tensor's (scale, zero_point), as the interpreter reports them."""
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def _postprocess(kind: str, y: np.ndarray) -> np.ndarray:
    if kind == "softmax":
        # numpy's stubs type these operators' results as Any: name the array type once.
        e: np.ndarray = np.exp(y - y.max())
        probs: np.ndarray = e / e.sum()
        return probs
    if kind == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-y))
        return probs
    return y


class _StageRunner:
    """One stage's interpreter plus the tensor facts checked once at load."""

    def __init__(self, stage: Stage, manifest: Manifest, num_threads: int) -> None:
        self.stage = stage
        shape = None
        if stage.input == "pcm" and manifest.audio is not None:
            shape = (1, manifest.audio.window_samples)
        self.interp = load_interpreter(stage.model, num_threads, shape)
        inputs = self.interp.get_input_details()
        outputs = self.interp.get_output_details()
        if len(inputs) != 1:
            raise ModelError(
                f"model {stage.model} has {len(inputs)} inputs; the gate feeds exactly one",
                fix="export the model with a single input tensor",
            )
        for d in (*inputs, *outputs):
            if d["dtype"] not in _SUPPORTED:
                raise ModelError(
                    f"model {stage.model}: tensor '{d['name']}' has unsupported type "
                    f"{np.dtype(d['dtype']).name}",
                    fix="use float32, int8 or uint8 input and output tensors",
                )
            if d["dtype"] != np.float32 and d["quantization"][0] == 0:
                raise ModelError(
                    f"model {stage.model}: quantised tensor '{d['name']}' has no scale",
                    fix="re-export the model with per-tensor quantisation parameters",
                )
        for name, index in stage.outputs.items():
            if index >= len(outputs):
                raise ModelError(
                    f"model manifest {manifest.path}: output '{name}' index {index} but "
                    f"{stage.model.name} has {len(outputs)} outputs"
                )
        self.input = inputs[0]
        self.outputs = outputs
        self.shape = tuple(int(x) for x in self.input["shape"])
        signature = self.input.get("shape_signature", self.input["shape"])
        self.dynamic_batch = len(signature) > 0 and int(signature[0]) == -1

    def resize(self, shape: tuple[int, ...]) -> None:
        if shape != self.shape:
            self.interp.resize_tensor_input(self.input["index"], list(shape))
            self.interp.allocate_tensors()
            self.input = self.interp.get_input_details()[0]
            self.outputs = self.interp.get_output_details()
            self.shape = shape

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.interp.set_tensor(self.input["index"], quantize(x, self.input))
        self.interp.invoke()
        return [dequantize(self.interp.get_tensor(d["index"]), d) for d in self.outputs]


class ModelRunner:
    """All interpreters of one manifest. Use from one thread only."""

    def __init__(self, manifest: Manifest, num_threads: int = 2) -> None:
        self.manifest = manifest
        self.stages = [_StageRunner(s, manifest, num_threads) for s in manifest.stages]
        self._cache: dict[int, dict[int, np.ndarray]] = {}
        # The pcm front end's frames of the previous window: (absolute index of the first, rows).
        self._frames: tuple[int, np.ndarray] | None = None
        self._frames_per_window: dict[int, int] = {}  # window length in samples -> frames
        self._last_position: int | None = None
        last = self.stages[-1]
        n_scores = int(np.prod(last.outputs[manifest.stages[-1].outputs["scores"]]["shape"]))
        if n_scores != len(manifest.labels):
            raise ModelError(
                f"labels file for {manifest.path} lists {len(manifest.labels)} labels but the "
                f"model's scores output has {n_scores} values",
                fix="make labels.txt list exactly one label per model output, in order",
            )
        if manifest.vision is not None:
            v = manifest.vision
            expected = (1, v.height, v.width, v.channels)
            if self.stages[0].shape != expected:
                raise ModelError(
                    f"model manifest {manifest.path}: vision block says input {expected} but "
                    f"{manifest.stages[0].model.name} takes {self.stages[0].shape}",
                    fix="make the manifest's vision width/height/color match the model",
                )
            self._mean = np.asarray(v.mean, np.float32)
            self._std = np.asarray(v.std, np.float32)

    @classmethod
    def load(cls, path: Path, num_threads: int = 2) -> ModelRunner:
        return cls(load_manifest(path), num_threads)

    # -- vision ----------------------------------------------------------------------------
    def preprocess_image(self, frame_bgr: np.ndarray) -> np.ndarray:
        v = self.manifest.vision
        assert v is not None
        img = cv2.resize(frame_bgr, (v.width, v.height), interpolation=cv2.INTER_AREA)
        if v.color == "rgb":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif v.color == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[..., None]
        x = img.astype(np.float32) * np.float32(1.0 / 255.0)
        x = (x - self._mean) / self._std
        return x[None, ...]

    def _vision(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The backbone on the image, then each head on the named output of the stage before.

        The features are the first stage's ``embedding`` (the backbone's), not a head's: a
        retrained head changes only the scores, so examples of every version share one
        feature space and a retrain can learn from all of them (docs/model-updates.md).
        """
        outputs = self.stages[0].run(x)
        features: np.ndarray | None = None
        for i, runner in enumerate(self.stages):
            st = runner.stage
            if i:
                prev = self.manifest.stages[i - 1].outputs[st.input]
                outputs = runner.run(outputs[prev].reshape(runner.shape))
            if features is None and "embedding" in st.outputs:
                features = outputs[st.outputs["embedding"]].reshape(-1).copy()
        return outputs, features

    # -- audio -----------------------------------------------------------------------------
    def _audio_features(self, samples: np.ndarray, position: int | None) -> np.ndarray:
        """Run every stage but the last; return the last stage's input.

        ``position`` is the absolute index (in samples since the stream began) one past the
        window's last sample. When the front end declares ``frame_samples`` and the window
        starts on a frame boundary, the windowed stage's outputs are cached by absolute frame
        index: overlapping windows reuse them (exact, because the front end is shift-invariant
        at frame boundaries), so a hop costs only the new embeddings.
        """
        seq: np.ndarray | None = None
        base_frame: int | None = None
        last = self._last_position
        if position is None or last is None or position <= last:
            # A new stream, a rewind, or no position: cached frames belong to other audio.
            self._cache.clear()
            self._frames = None
        self._last_position = position
        for i, runner in enumerate(self.stages):
            st = runner.stage
            last = i == len(self.stages) - 1
            if st.input == "pcm":
                start = None if position is None else position - len(samples)
                if st.frame_samples and start is not None and start % st.frame_samples == 0:
                    base_frame = start // st.frame_samples
                seq = self._front_end(runner, samples, base_frame)
                if last:
                    return seq
                continue
            if seq is None:  # load_manifest requires a pcm first stage; say so if one slips by
                raise ModelError(
                    f"model manifest {self.manifest.path}: stage {i} has no input (no 'pcm' "
                    "stage before it)",
                    fix="make the first audio stage take 'pcm' input",
                )
            w = st.window or len(seq)
            if len(seq) < w:
                raise ModelError(
                    f"model manifest {self.manifest.path}: stage {i} needs {w} rows but the "
                    f"audio window yields {len(seq)}",
                    fix="raise audio.window_seconds in the manifest",
                )
            if st.step and not last:
                starts = list(range(len(seq) - w, -1, -st.step))[::-1]
                item_shape = runner.shape[1:]
                cache = self._cache.setdefault(i, {}) if base_frame is not None else None
                rows = []
                for s0 in starts:
                    key = None if base_frame is None else base_frame + s0 + w
                    if cache is not None and key is not None and key in cache:
                        rows.append(cache[key])
                        continue
                    win = seq[s0 : s0 + w].reshape((1, *item_shape))
                    out = runner.run(win)[0].reshape(-1)
                    out = out * np.float32(st.scale) + np.float32(st.offset)
                    if cache is not None and key is not None:
                        cache[key] = out
                    rows.append(out)
                if cache is not None and base_frame is not None:
                    oldest = base_frame + starts[0] + w
                    for k in [k for k in cache if k < oldest]:
                        del cache[k]
                seq = np.stack(rows)
                base_frame = None  # later stages index windows, not frames
                continue
            window = seq[-w:]
            if last:
                return window
            y = runner.run(window.reshape(runner.shape))[0]
            seq = y.reshape(1, -1) * np.float32(st.scale) + np.float32(st.offset)
        raise AssertionError("unreachable")

    def _front_end(
        self, runner: _StageRunner, samples: np.ndarray, base_frame: int | None
    ) -> np.ndarray:
        """The pcm stage's frames for this window, computing only those the last one lacked.

        Frame j of a shift-invariant front end depends only on samples [j*F, j*F + L) (F =
        ``frame_samples``), so the frames of a tail of the window that starts on a frame
        boundary are exactly the window's last frames, whatever L is. A hop of 0.48 s then runs
        the front end on 0.48 s of audio instead of the whole 2 s window (bench_gate_latency:
        the mel spectrogram took ~3.5 of the ~10.8 ms per hop).
        """
        st = runner.stage
        fs = st.frame_samples
        cached = self._frames if base_frame is not None else None
        offset = 0  # where, in samples from the window's start, the front end starts reading
        keep: np.ndarray | None = None
        if cached is not None and base_frame is not None and fs:
            first, rows = cached
            have_until = first + len(rows)  # one past the last cached absolute frame
            if first <= base_frame < have_until:
                # Reuse frames base_frame..have_until-1; compute from have_until on, but give
                # the front end at least _MIN_FRONT_END_SAMPLES (tiny inputs are slower per
                # sample, and some delegates refuse them): recompute a few cached frames if so.
                offset = (have_until - base_frame) * fs
                shortfall = _MIN_FRONT_END_SAMPLES - (len(samples) - offset)
                if shortfall > 0:
                    offset = max(0, offset - -(-shortfall // fs) * fs)
                keep = rows[base_frame - first : base_frame - first + offset // fs]
        seq = self._run_front_end(runner, samples[offset:])
        if keep is not None and len(keep):
            seq = np.concatenate([keep, seq])
        if offset and len(seq) != self._frames_per_window.get(len(samples)):
            # Not the frame count of a whole window: the front end is not shift-invariant as
            # its manifest claims. Compute the window whole (always correct), keep no cache.
            seq = self._run_front_end(runner, samples)
            base_frame = None
        self._frames_per_window[len(samples)] = len(seq)
        self._frames = (base_frame, seq) if base_frame is not None and fs else None
        return seq

    @staticmethod
    def _run_front_end(runner: _StageRunner, samples: np.ndarray) -> np.ndarray:
        st = runner.stage
        x = (samples.astype(np.float32) * np.float32(st.pcm_scale))[None, :]
        runner.resize(tuple(x.shape))
        y = np.squeeze(runner.run(x)[0])
        if y.ndim == 1:
            y = y[:, None]
        return y * np.float32(st.scale) + np.float32(st.offset)

    def classify(self, data: np.ndarray, position: int | None = None) -> GateOutput:
        """Frame (H, W, 3 BGR uint8) or audio window (float32 mono) -> GateOutput.

        ``position``: for audio, the absolute sample index one past the window's end, which lets
        overlapping windows share work (see _audio_features). Results are identical either way.
        """
        started = time.perf_counter()
        m = self.manifest
        last = self.stages[-1]
        out_map = m.stages[-1].outputs
        if m.modality == "vision":
            outputs, features = self._vision(self.preprocess_image(data))
        else:
            if len(self.stages) == 1:
                window = data.astype(np.float32)[None, :]
                last.resize(tuple(window.shape))
                outputs = last.run(window)
                features = None
            else:
                features_in = self._audio_features(data, position)
                outputs = last.run(features_in.reshape(last.shape))
                features = (
                    outputs[out_map["embedding"]].reshape(-1)
                    if "embedding" in out_map
                    else features_in.astype(np.float32)
                )
        probs = _postprocess(m.postprocess, outputs[out_map["scores"]].reshape(-1))
        scores = {label: float(p) for label, p in zip(m.labels, probs, strict=True)}
        return GateOutput(
            scores=scores,
            features=features,
            model=m.tag,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )


class Gate:
    """One modality's classifier with its own thread; ``swap`` replaces it between inferences."""

    def __init__(self, modality: str, num_threads: int = 2) -> None:
        self.modality = modality
        self.num_threads = num_threads
        self._runner: ModelRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.inferences = 0
        # Called with (input, future) once each inference is done (on the event loop): the
        # updater's canary ring and trial watch (device/update/). Keep them cheap.
        self.observers: list[Callable[[np.ndarray, asyncio.Future[GateOutput]], None]] = []

    @property
    def manifest(self) -> Manifest:
        if self._runner is None:
            raise RuntimeError("gate used before load()")
        return self._runner.manifest

    async def _load(self, path: Path) -> tuple[ModelRunner, ThreadPoolExecutor]:
        # Each runner gets its own thread for its whole life: interpreters are built, used and
        # dropped on that thread only.
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"gate-{self.modality}")
        try:
            runner = await asyncio.get_running_loop().run_in_executor(
                executor, ModelRunner.load, path, self.num_threads
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        if runner.manifest.modality != self.modality:
            executor.shutdown(wait=False)
            raise ModelError(
                f"model manifest {path} is a {runner.manifest.modality} model, "
                f"but it was given as the {self.modality} gate",
                fix=f"use a {self.modality} manifest for gate.{self.modality}_model",
            )
        return runner, executor

    async def load(self, path: Path) -> Manifest:
        self._runner, self._executor = await self._load(path)
        log.info("gate.loaded", modality=self.modality, model=self.manifest.tag, path=str(path))
        return self.manifest

    async def swap(self, path: Path) -> Manifest:
        """Load ``path`` while the current model keeps serving, then switch atomically.

        Inferences already running finish on the old model; the next one uses the new model.
        If loading fails the old model stays and the error propagates (the caller rolls back).
        """
        runner, executor = await self._load(path)
        old_tag = self._runner.manifest.tag if self._runner else None
        old_executor = self._executor
        # One assignment each, no await in between: no inference can see a mixed state.
        self._runner, self._executor = runner, executor
        if old_executor is not None:
            old_executor.shutdown(wait=False)  # pending work still completes on the old model
        log.info("gate.swapped", modality=self.modality, old=old_tag, new=runner.manifest.tag)
        return runner.manifest

    def submit(self, data: np.ndarray, position: int | None = None) -> asyncio.Future[GateOutput]:
        """Queue one inference on the model's thread; the future resolves with its output.

        The model in place *now* answers, even if a swap lands before it runs. Submitting the
        next frame before awaiting this one lets the loop's own work overlap the inference.
        """
        runner, executor = self._runner, self._executor
        if runner is None or executor is None:
            raise RuntimeError("gate used before load()")
        self.inferences += 1
        fut = asyncio.get_running_loop().run_in_executor(executor, runner.classify, data, position)
        for observe in self.observers:
            fut.add_done_callback(functools.partial(observe, data))
        return fut

    async def classify(self, data: np.ndarray, position: int | None = None) -> GateOutput:
        return await self.submit(data, position)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._runner = self._executor = None

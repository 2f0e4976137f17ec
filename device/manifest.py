"""Model manifests: what the gate needs to know to run a TFLite classifier (docs/models.md).

Loading a manifest checks everything that can be checked without running the model; the gate
checks the tensors once the interpreters exist. Every problem is a ModelError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekeeper.errors import ModelError


@dataclass(frozen=True)
class VisionInput:
    width: int
    height: int
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3


@dataclass(frozen=True)
class AudioInput:
    sample_rate: int
    window_seconds: float
    hop_seconds: float

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sample_rate)

    @property
    def hop_samples(self) -> int:
        return round(self.hop_seconds * self.sample_rate)


@dataclass(frozen=True)
class Stage:
    model: Path
    # "tensor", "pcm" (audio front end) or, for a vision stage after the first, the name of an
    # output of the stage before it (a head on the backbone's "embedding").
    input: str = "tensor"
    pcm_scale: float = 1.0
    scale: float = 1.0
    offset: float = 0.0
    window: int = 0
    step: int = 0
    # pcm stages only: samples per output frame when the front end is shift-invariant (a mel
    # spectrogram with a fixed hop). It lets the gate reuse the next stage's outputs across
    # overlapping windows instead of recomputing them (docs/models.md).
    frame_samples: int = 0
    outputs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    version: str
    modality: Literal["vision", "audio"]
    labels: tuple[str, ...]
    postprocess: Literal["none", "softmax", "sigmoid"]
    stages: tuple[Stage, ...]
    vision: VisionInput | None = None
    audio: AudioInput | None = None

    @property
    def tag(self) -> str:
        """``name@version``: how events and logs name the model."""
        return f"{self.name}@{self.version}"

    @property
    def sample_rate(self) -> int:
        """The rate an audio model takes its samples at (what the microphone is opened with)."""
        if self.audio is None:
            raise ModelError(
                f"model manifest {self.path} is a {self.modality} model: it has no audio input",
                fix="give an audio manifest for gate.audio_model",
            )
        return self.audio.sample_rate


def _need(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in data:
        raise ModelError(f"model manifest {where}: missing key '{key}'", fix="see docs/models.md")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelError(
            f"model manifest {where}: key '{key}' = {value!r} has the wrong type",
            fix="see docs/models.md for the expected types",
        )
    return value


def _stage(raw: Any, base: Path, where: Path, index: int) -> Stage:
    if not isinstance(raw, dict):
        raise ModelError(f"model manifest {where}: stages[{index}] must be a table")
    known = {"model", "input", "pcm_scale", "scale", "offset", "window", "step", "frame_samples",
             "outputs"}
    unknown = set(raw) - known
    if unknown:
        raise ModelError(
            f"model manifest {where}: stages[{index}] has unknown keys {sorted(unknown)}",
            fix=f"known keys are {sorted(known)} (docs/models.md)",
        )
    model = base / str(_need(raw, "model", str, where))
    if not model.is_file():
        raise ModelError(
            f"model manifest {where}: stages[{index}].model {model} does not exist",
            fix="restore the file or correct the path (relative to the manifest's folder)",
        )
    inp = raw.get("input", "tensor")
    if not isinstance(inp, str) or not inp:
        raise ModelError(
            f"model manifest {where}: stages[{index}].input must be 'tensor', 'pcm' or the name "
            "of an output of the stage before it"
        )
    outputs = raw.get("outputs", {})
    if not isinstance(outputs, dict) or not all(
        isinstance(v, int) and v >= 0 for v in outputs.values()
    ):
        raise ModelError(
            f"model manifest {where}: stages[{index}].outputs must map names to indices"
        )
    return Stage(
        model=model,
        input=inp,
        pcm_scale=float(raw.get("pcm_scale", 1.0)),
        scale=float(raw.get("scale", 1.0)),
        offset=float(raw.get("offset", 0.0)),
        window=int(raw.get("window", 0)),
        step=int(raw.get("step", 0)),
        frame_samples=int(raw.get("frame_samples", 0)),
        outputs=dict(outputs),
    )


def _check_vision_chain(stages: tuple[Stage, ...], path: Path) -> None:
    """A vision model: the backbone takes the image; each later stage (a head) takes one named
    output of the stage before it, e.g. ``{"model": "head-int8.tflite", "input": "embedding"}``."""
    if stages[0].input != "tensor":
        raise ModelError(
            f"model manifest {path}: stages[0].input {stages[0].input!r}: the first vision "
            "stage takes the image ('tensor')"
        )
    for i in range(1, len(stages)):
        if stages[i].input not in stages[i - 1].outputs:
            raise ModelError(
                f"model manifest {path}: stages[{i}].input {stages[i].input!r} is not an "
                f"output of stages[{i - 1}] (it names {sorted(stages[i - 1].outputs)})",
                fix=f'name the output in stages[{i - 1}].outputs, e.g. "outputs": '
                '{"embedding": 0}, and set the head\'s "input" to it (docs/models.md)',
            )


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest JSON; raise ModelError naming the file on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"model manifest {path} does not exist",
            fix="point gate.vision_model / gate.audio_model at a manifest JSON (docs/models.md)",
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"model manifest {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model manifest {path}: the top level must be a JSON object")
    if data.get("schema") != 1:
        raise ModelError(
            f"model manifest {path}: schema {data.get('schema')!r} is not supported (expected 1)",
            fix="upgrade edgekeeper or rebuild the model for schema 1",
        )
    base = path.parent
    modality = _need(data, "modality", str, path)
    if modality not in ("vision", "audio"):
        raise ModelError(f"model manifest {path}: modality must be 'vision' or 'audio'")
    labels_path = base / str(_need(data, "labels", str, path))
    try:
        labels = tuple(
            line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        )
    except FileNotFoundError:
        raise ModelError(
            f"labels file {labels_path} (named by {path}) does not exist",
            fix="restore the labels file: one label per line, in the model's output order",
        ) from None
    if not labels or len(set(labels)) != len(labels):
        raise ModelError(f"labels file {labels_path} must list distinct labels, one per line")
    postprocess = data.get("postprocess", "none")
    if postprocess not in ("none", "softmax", "sigmoid"):
        raise ModelError(f"model manifest {path}: postprocess must be none, softmax or sigmoid")
    raw_stages = _need(data, "stages", list, path)
    if not raw_stages:
        raise ModelError(f"model manifest {path}: stages must list at least one model")
    stages = tuple(_stage(s, base, path, i) for i, s in enumerate(raw_stages))
    if "scores" not in stages[-1].outputs:
        stages = (
            *stages[:-1],
            Stage(**{**stages[-1].__dict__, "outputs": {**stages[-1].outputs, "scores": 0}}),
        )
    vision = audio = None
    if modality == "vision":
        v = _need(data, "vision", dict, path)
        try:
            vision = VisionInput(
                width=int(v["width"]),
                height=int(v["height"]),
                color=v.get("color", "rgb"),
                mean=tuple(float(x) for x in v.get("mean", (0.0,))),
                std=tuple(float(x) for x in v.get("std", (1.0,))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"model manifest {path}: bad 'vision' block ({err})") from None
        if vision.color not in ("rgb", "bgr", "gray") or min(vision.width, vision.height) < 1:
            raise ModelError(f"model manifest {path}: vision needs width, height >= 1 and a color")
        if any(s == 0 for s in vision.std):
            raise ModelError(f"model manifest {path}: vision.std must not contain 0")
        _check_vision_chain(stages, path)
    else:
        a = _need(data, "audio", dict, path)
        try:
            audio = AudioInput(
                sample_rate=int(a["sample_rate"]),
                window_seconds=float(a["window_seconds"]),
                hop_seconds=float(a["hop_seconds"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"model manifest {path}: bad 'audio' block ({err})") from None
        if audio.sample_rate < 4000 or audio.window_seconds <= 0 or audio.hop_seconds <= 0:
            raise ModelError(
                f"model manifest {path}: audio needs sample_rate >= 4000, window, hop > 0"
            )
        named = [i for i, s in enumerate(stages) if s.input not in ("tensor", "pcm")]
        if named:
            raise ModelError(
                f"model manifest {path}: stages[{named[0]}].input "
                f"{stages[named[0]].input!r}: an audio stage takes 'pcm' or 'tensor'",
                fix="only vision heads take a named output of the stage before them",
            )
        if stages[0].input != "pcm" and len(stages) > 1:
            raise ModelError(f"model manifest {path}: the first audio stage must take 'pcm' input")
    return Manifest(
        path=path,
        name=str(_need(data, "name", str, path)),
        version=str(_need(data, "version", str, path)),
        modality=modality,
        labels=labels,
        postprocess=postprocess,
        stages=stages,
        vision=vision,
        audio=audio,
    )

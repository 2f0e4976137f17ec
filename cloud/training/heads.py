"""The current gate's head, read back from its float .tflite, as a trainable Keras model.

A retrain starts from the model devices run now, never from scratch: the vision head (the
``scores`` Dense on the backbone's 32-value embedding) and the whole audio head (``train.
audio_head`` on the (16, 96) window) are rebuilt in Keras with the weights found in the float
.tflite, and checked to reproduce the current scores within ``TOLERANCE`` before any training.

Weights are found by shape among the file's constant tensors (a converted Dense keeps its
kernel transposed, ``(out, in)``; a Conv1D becomes a CONV_2D with ``(out, 1, k, in)``). Where two
tensors share a shape (the audio head's two 64-value biases) every assignment is tried and the
one that reproduces the file's own outputs is kept: the check decides, not the tensor names.

TensorFlow is imported inside functions only (the ``train`` extra).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.errors import ModelError

TOLERANCE = 1e-4


def constant_tensors(path: Path) -> list[np.ndarray]:
    """Every float32 constant (weights, biases) stored in a .tflite file, in tensor order."""
    from ai_edge_litert.interpreter import Interpreter

    it: Any = Interpreter(model_path=str(path))
    it.allocate_tensors()
    out = []
    for d in it.get_tensor_details():
        if d["dtype"] != np.float32 or not len(d["shape"]):
            continue
        try:
            value = np.array(it.get_tensor(d["index"]))
        except ValueError:  # an activation buffer with no data yet
            continue
        out.append(value)
    return out


def _by_shape(tensors: list[np.ndarray], shape: tuple[int, ...], path: Path) -> list[np.ndarray]:
    found = [t for t in tensors if t.shape == shape]
    if not found:
        raise ModelError(
            f"{path} holds no {shape} weight tensor: it is not a head this retrain knows",
            fix="retrain from a model the recipe or an earlier retrain built (docs/models.md)",
        )
    return found


def softmax(z: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(z - z.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


@dataclass(frozen=True)
class DenseHead:
    """``softmax(x @ kernel + bias)``: the vision gate's scores layer, in float."""

    kernel: np.ndarray  # (in, out), Keras' layout
    bias: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return softmax(x.astype(np.float32) @ self.kernel + self.bias)


def vision_head_weights(path: Path, n_labels: int, embedding: int) -> list[DenseHead]:
    """Every (kernel, bias) pair in ``path`` shaped like the scores layer (the caller checks
    which one reproduces the model)."""
    tensors = constant_tensors(path)
    kernels = _by_shape(tensors, (n_labels, embedding), path)
    biases = _by_shape(tensors, (n_labels,), path)
    return [DenseHead(k.T.copy(), b.copy()) for k in kernels for b in biases]


def pick_vision_head(
    candidates: list[DenseHead], embeddings: np.ndarray, reference: np.ndarray, path: Path
) -> tuple[DenseHead, float]:
    """The candidate that reproduces ``reference`` scores from ``embeddings`` within
    TOLERANCE, and its largest difference; ModelError (with the best difference) if none."""
    errors = [float(np.max(np.abs(h(embeddings) - reference))) for h in candidates]
    best = int(np.argmin(errors))
    if errors[best] > TOLERANCE:
        raise ModelError(
            f"the scores layer read from {path} does not reproduce its scores (max difference "
            f"{errors[best]:.2e} > {TOLERANCE})",
            fix="retrain from the float model the manifest names (the int8 one cannot be read "
            "back exactly)",
        )
    return candidates[best], errors[best]


def keras_dense_head(head: DenseHead) -> Any:
    """Input(embedding) -> Dense(labels, softmax) named ``scores``, holding ``head``'s weights."""
    import keras
    from keras import layers

    inp = keras.Input((head.kernel.shape[0],), name="embedding")
    out = layers.Dense(head.kernel.shape[1], activation="softmax", name="scores")(inp)
    model = keras.Model(inp, out, name="head")
    model.get_layer("scores").set_weights([head.kernel, head.bias])
    return model


def keras_audio_head(path: Path, windows: np.ndarray, n_labels: int) -> tuple[Any, float]:
    """``train.audio_head`` with the weights of the float head at ``path``; checked on
    ``windows`` against the file's own outputs. Returns (export model, max difference)."""
    from edgekeeper.cloud.training import train
    from edgekeeper.cloud.training.evaluate import TFLiteModel

    window, features = windows.shape[1:]
    _, model = train.audio_head(window, features, n_labels)
    reference = TFLiteModel(path).batch(windows, 0)
    tensors = constant_tensors(path)
    shapes = [tuple(w.shape) for w in model.get_weights()]
    options: list[list[np.ndarray]] = []
    for shape in shapes:
        if len(shape) == 2:  # Dense kernel (in, out) <- (out, in)
            options.append([t.T for t in _by_shape(tensors, (shape[1], shape[0]), path)])
        elif len(shape) == 3:  # Conv1D kernel (k, in, out) <- CONV_2D (out, 1, k, in)
            conv = _by_shape(tensors, (shape[2], 1, shape[0], shape[1]), path)
            options.append([np.transpose(t[:, 0], (1, 2, 0)) for t in conv])
        else:
            options.append(_by_shape(tensors, shape, path))
    best: tuple[float, list[np.ndarray]] | None = None
    for combo in itertools.product(*options):
        if any(a is b for a, b in itertools.combinations(combo, 2)):
            continue  # one tensor cannot be two layers' weights
        model.set_weights(list(combo))
        err = float(np.max(np.abs(model.predict(windows, verbose=0) - reference)))
        if best is None or err < best[0]:
            best = (err, list(combo))
        if err <= TOLERANCE:
            break
    if best is None or best[0] > TOLERANCE:
        raise ModelError(
            f"the audio head rebuilt from {path} does not reproduce its scores (max difference "
            f"{best[0] if best else float('nan'):.2e} > {TOLERANCE})",
            fix="retrain from a float head built by the recipe's train.audio_head",
        )
    model.set_weights(best[1])
    return model, best[0]

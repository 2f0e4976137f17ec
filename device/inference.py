"""Pick the TFLite interpreter that is installed, once, and say which.

Order: LiteRT (``ai_edge_litert``, the maintained runtime with x86_64 and aarch64 wheels), then
``tflite_runtime`` (32-bit boards where LiteRT ships no wheel; it needs numpy<2), then full
TensorFlow's ``tf.lite`` (a cloud box that trains). A device never needs TensorFlow.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from edgekeeper.errors import ModelError
from edgekeeper.log import get_logger, native_output

log = get_logger(__name__)

_CANDIDATES = (
    ("ai_edge_litert.interpreter", "Interpreter", "litert"),
    ("tflite_runtime.interpreter", "Interpreter", "tflite_runtime"),
    ("tensorflow.lite", "Interpreter", "tensorflow"),
)


@functools.cache
def interpreter_class() -> tuple[Any, str]:
    """Return (Interpreter class, runtime name). Raises ModelError if none is installed."""
    tried = []
    for module, attr, name in _CANDIDATES:
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ImportError as err:
            tried.append(f"{module}: {err}")
            continue
        log.info("inference.runtime_selected", runtime=name, module=module)
        return cls, name
    raise ModelError(
        "no TFLite runtime is installed (" + "; ".join(tried) + ")",
        fix="pip install ai-edge-litert (or tflite-runtime with numpy<2 on 32-bit ARM)",
    )


def runtime_name() -> str:
    return interpreter_class()[1]


def load_interpreter(
    path: Path, num_threads: int, input_shape: tuple[int, ...] | None = None
) -> Any:
    """Build and allocate an interpreter for ``path``, turning every failure into ModelError.

    ``input_shape`` resizes the first input before allocation: models with a dynamic input
    (the mel-spectrogram front end takes any number of samples) cannot allocate their
    placeholder shape under XNNPACK.
    """
    if not path.is_file():
        raise ModelError(
            f"model file {path} does not exist",
            fix="check the manifest's 'model' entry or rebuild the model (docs/models.md)",
        )
    cls, _ = interpreter_class()
    data = path.read_bytes()
    # A TFLite flatbuffer carries the identifier "TFL3" at bytes 4..8; checking it first turns
    # "a truncated download" or "a JPEG named .tflite" into a clear message instead of a crash
    # deep inside the runtime.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(
            f"model file {path} is not a TFLite model (no TFL3 identifier; {len(data)} bytes)",
            fix="the file is corrupt or not a .tflite; restore it or rebuild the model",
        )
    try:
        # TFLite prints "INFO: Created ... XNNPACK delegate" straight to fd 2: logged instead.
        with native_output("tflite"):
            interp = cls(model_content=data, num_threads=num_threads)
            if input_shape is not None:
                interp.resize_tensor_input(interp.get_input_details()[0]["index"],
                                           list(input_shape))
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ModelError(
            f"model file {path} cannot be loaded by the TFLite runtime: {err}",
            fix="the file is corrupt or uses ops this runtime lacks; rebuild it",
        ) from None
    return interp

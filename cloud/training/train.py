"""Keras models for the two gates and their conversion to float and full-integer TFLite.

TensorFlow is imported inside the functions: this module belongs to the ``train`` extra and must
never be pulled in by anything a device imports (``import edgekeeper.cloud.training.recipe`` for
``--help`` stays cheap too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Vision: small CNN, depthwise-separable like MobileNet but a fraction of its width.
VISION_BLOCKS = ((32, 1), (48, 2), (64, 1), (96, 2), (96, 1), (128, 2))
VISION_EMBEDDING = 32
AUDIO_EMBEDDING = 32


@dataclass(frozen=True)
class Trained:
    """A trained model ready to export: Keras model with outputs (scores, embedding?)."""

    export_model: Any
    history: dict[str, list[float]]


def seed_everything(seed: int) -> None:
    """Fresh Keras state, one seed for everything, deterministic kernels: same seed, same bytes.

    Called before each model is built. ``keras.backend.clear_session()`` drops what the previous
    model left behind (the person model is trained in the same process before the sound head);
    ``keras.utils.set_random_seed`` seeds Python, numpy, TensorFlow and Keras' own generators at
    once (initial weights, batch order, dropout); ``enable_op_determinism()`` makes TensorFlow use
    deterministic kernels. It stays on for the rest of the process, so both heads get it: on
    TF 2.21 / Keras 3.15 with 2 cores the person model trained in 261-405 s with it and 469 s
    without, so it costs nothing measurable. With it, full rebuilds that trained on the same
    arrays gave bit-identical .tflite files for both gates (docs/models.md, Reproducibility).
    """
    import keras
    import tensorflow as tf

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def vision_model(width: int, height: int) -> tuple[Any, Any]:
    """(train model with scores only, export model with [scores, embedding])."""
    import keras
    from keras import layers

    inp = keras.Input((height, width, 3), name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    for filters, stride in VISION_BLOCKS:
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU(6.0)(x)
        x = layers.Conv2D(filters, 1, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU(6.0)(x)
    # Max, not average, pooling: one distant walker covers a handful of the 8x10 cells, and an
    # average would dilute them into the lawn.
    x = layers.GlobalMaxPooling2D()(x)
    emb = layers.Dense(VISION_EMBEDDING, activation="relu", name="embedding")(x)
    scores = layers.Dense(2, activation="softmax", name="scores")(layers.Dropout(0.2)(emb))
    return keras.Model(inp, scores), keras.Model(inp, [scores, emb], name="person")


def audio_head(window: int, features: int, n_labels: int) -> tuple[Any, Any]:
    """Head over the last ``window`` embeddings: per-step projection, then max+mean over time.

    Max over time catches a short beep or word anywhere in the 2 s window; the mean keeps the
    overall texture (steady noise). No normalisation layer: it quantises poorly to int8.
    """
    import keras
    from keras import layers

    inp = keras.Input((window, features), name="embeddings")
    x = layers.Dense(64, activation="relu")(inp)
    x = layers.Conv1D(64, 3, padding="same", activation="relu")(x)
    x = layers.Concatenate()([layers.GlobalMaxPooling1D()(x), layers.GlobalAveragePooling1D()(x)])
    emb = layers.Dense(AUDIO_EMBEDDING, activation="relu", name="embedding")(x)
    scores = layers.Dense(n_labels, activation="softmax", name="scores")(layers.Dropout(0.3)(emb))
    return keras.Model(inp, scores), keras.Model(inp, scores, name="sound")


def fit(
    train_model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    progress: bool,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, list[float]]:
    """Class-balanced training with a cosine learning-rate decay; returns the loss history."""
    import keras

    n_classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=n_classes)
    weights = {c: float(len(y) / (n_classes * max(1, counts[c]))) for c in range(n_classes)}
    steps = epochs * int(np.ceil(len(y) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    train_model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    data = preprocess(x) if preprocess else x
    hist = train_model.fit(
        data,
        y,
        epochs=epochs,
        batch_size=batch_size,
        class_weight=weights,
        verbose=2 if progress else 0,
        shuffle=True,
    )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def to_tflite_float(model: Any) -> bytes:
    import tensorflow as tf

    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def to_tflite_int8(model: Any, representative: np.ndarray) -> bytes:
    """Full-integer model: int8 weights, activations, input and output tensors.

    ``representative`` is real training input (already in the model's float domain); its range
    sets each tensor's (scale, zero_point), which the manifest never repeats.
    """
    import tensorflow as tf

    def samples() -> Iterator[list[np.ndarray]]:
        for row in representative:
            yield [row[None].astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = samples
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return bytes(conv.convert())

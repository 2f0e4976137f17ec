"""Rebuild the tiny odd models the bad-input tests load (needs the `train` extra).

    python tests/data/make_odd_models.py

- int16_io.tflite: 16x8 quantised, so its input/output tensors are int16, which the gate refuses.
- two_inputs.tflite: a float model with two inputs, which the gate refuses.
Both are a few KB and committed, so the tests never need TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent


def int16_model() -> bytes:
    inp = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Flatten()(inp)
    out = tf.keras.layers.Dense(2, activation="softmax")(x)
    model = tf.keras.Model(inp, out)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((1, 8, 8, 3), np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    ]
    conv.inference_input_type = tf.int16
    conv.inference_output_type = tf.int16
    return conv.convert()


def two_inputs() -> bytes:
    a, b = tf.keras.Input((4,)), tf.keras.Input((4,))
    out = tf.keras.layers.Dense(2, activation="softmax")(tf.keras.layers.Concatenate()([a, b]))
    return tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model([a, b], out)).convert()


if __name__ == "__main__":
    tf.keras.utils.set_random_seed(0)
    (HERE / "int16_io.tflite").write_bytes(int16_model())
    (HERE / "two_inputs.tflite").write_bytes(two_inputs())
    print("wrote", sorted(p.name for p in HERE.glob("*.tflite")))

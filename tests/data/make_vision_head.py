"""Rebuild the tiny vision heads the two-stage gate tests load (needs the `train` extra).

    python tests/data/make_vision_head.py

- person_head-float.tflite: Dense(32 -> 2, softmax) holding the scores layer of
  models/person/person-float.tflite, read back with edgekeeper.cloud.training.heads and checked
  to reproduce that model's scores from its own embeddings on the bundled sample's frames.
- person_head-int8.tflite: the same head, full-integer, calibrated on those embeddings.

So backbone + head must score exactly like the single model: what test_gate checks. Both files
are under 2 KB and committed, so the tests never need TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgekeeper.cloud.training import heads, train
from edgekeeper.cloud.training.evaluate import TFLiteModel
from edgekeeper.cloud.training.features import frame_to_input

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "models"


def main() -> None:
    backbone = MODELS / "person" / "person-float.tflite"
    model = TFLiteModel(backbone)
    roles = model.output_roles(2)
    cap = cv2.VideoCapture(str(MODELS / "samples" / "street" / "video.avi"))
    emb, scores = [], []
    while len(emb) < 200:
        ok, frame = cap.read()
        if not ok:
            break
        out = model(frame_to_input(frame, 160, 120))
        emb.append(out[roles["embedding"]])
        scores.append(out[roles["scores"]])
    x, ref = np.stack(emb), np.stack(scores)
    head, err = heads.pick_vision_head(heads.vision_head_weights(backbone, 2, 32), x, ref, backbone)
    print(f"scores layer reproduces the model within {err:.1e} on {len(x)} frames")
    keras_head = heads.keras_dense_head(head)
    (HERE / "person_head-float.tflite").write_bytes(train.to_tflite_float(keras_head))
    (HERE / "person_head-int8.tflite").write_bytes(train.to_tflite_int8(keras_head, x))


if __name__ == "__main__":
    main()

"""The audio gate's frozen front-end: openWakeWord 0.5.1's mel and embedding TFLite models.

Taken from the PyPI wheel (``pip download --no-deps openwakeword==0.5.1``), never from a model
hub, and checked against the sha256 the wheel's own RECORD lists, so a rebuild gets bit-identical
files or fails loudly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgekeeper.errors import InputError

WHEEL_REQUIREMENT = "openwakeword==0.5.1"
WHEEL_NAME = "openwakeword-0.5.1-py3-none-any.whl"
INSIDE_WHEEL = "openwakeword/resources/models/"
# sha256 (urlsafe base64, as in the wheel's RECORD) of the two files we ship.
PINNED = {
    "melspectrogram.tflite": "lvoK3MtujPlcsURlQJoaKJjuSpaoW7ntPH6w5ovxY-g",
    "embedding_model.tflite": "wK6iHrhKTOkKCMhw2kG3pxc7RSaeajIHxx1nxA86Wdg",
}

NOTICE = """\
Audio front-end models (melspectrogram.tflite, embedding_model.tflite)
======================================================================

Origin: the openWakeWord 0.5.1 wheel on PyPI (https://pypi.org/project/openwakeword/0.5.1/),
files openwakeword/resources/models/melspectrogram.tflite and embedding_model.tflite, copied
byte for byte (sha256 checked against the wheel's RECORD by edgekeeper.cloud.training.frontends).
Project: https://github.com/dscripka/openWakeWord, author David Scripka.

- melspectrogram.tflite: a TFLite export of torchaudio's MelSpectrogram with fixed parameters
  (32 mel bands, one row per ~10 ms of 16 kHz audio). openWakeWord scales its output as x / 10 + 2.
- embedding_model.tflite: openWakeWord's re-implementation of Google's speech_embedding model
  (https://tfhub.dev/google/speech_embedding/1, arXiv:2002.01322), which Google published under
  Apache-2.0. 76 mel rows in, 96 floats out.

Licence, stated as honestly as the sources allow:
- The wheel's metadata and LICENSE file say Apache-2.0 ("License :: OSI Approved :: Apache
  Software License").
- The project README (also in the wheel's METADATA) says: "All of the code in this repository is
  licensed under the Apache 2.0 license. All of the included pre-trained models are licensed
  under the Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International license due
  to the inclusion of datasets with unknown or restrictive licensing as part of the training
  data." The README describes the embedding model as Google's Apache-2.0 model and the mel model
  as an export of torchaudio's function, but does not exempt these two files from that sentence.
- We therefore treat both files as CC BY-NC-SA 4.0 (non-commercial) unless and until the
  openWakeWord author states otherwise. Anyone shipping edgekeeper commercially should replace
  the audio front-end or obtain clarification; the vision gate does not depend on these files.
"""


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(into),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = into / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        raise InputError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI: {proc.stderr.strip()[-500:]}",
            fix="check network access to PyPI, or put the wheel's two files into "
            "models/frontends/ by hand (the recipe verifies their sha256)",
        )
    return wheel


def ensure(frontends_dir: Path, *, wheel: Path | None = None) -> dict[str, str]:
    """Make ``frontends_dir`` hold the two pinned files and the NOTICE; returns name -> sha256.

    Files already present with the right hash are kept (rebuilds work offline); anything else is
    re-extracted from the wheel, downloaded with pip when not given.
    """
    frontends_dir.mkdir(parents=True, exist_ok=True)
    missing = [
        n
        for n, h in PINNED.items()
        if not (frontends_dir / n).is_file() or _digest((frontends_dir / n).read_bytes()) != h
    ]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            wheel_path = wheel if wheel is not None else _download_wheel(Path(tmp))
            with zipfile.ZipFile(wheel_path) as zf:
                for name in missing:
                    data = zf.read(INSIDE_WHEEL + name)
                    if _digest(data) != PINNED[name]:
                        raise InputError(
                            f"{name} in {wheel_path} does not match the pinned sha256",
                            fix=f"use the genuine {WHEEL_NAME} from PyPI",
                        )
                    tmp_file = frontends_dir / (name + ".tmp")
                    tmp_file.write_bytes(data)
                    os.replace(tmp_file, frontends_dir / name)
    notice = frontends_dir / "NOTICE"
    if not notice.is_file() or notice.read_text() != NOTICE:
        tmp_notice = frontends_dir / "NOTICE.tmp"
        tmp_notice.write_text(NOTICE)
        os.replace(tmp_notice, notice)
    return {name: PINNED[name] for name in PINNED}

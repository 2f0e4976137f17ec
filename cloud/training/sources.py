"""Where the recipe's raw material lives: Debian packages installed on the build machine.

Nothing is downloaded at run time. Every file the recipe reads is checked here first, so a
missing package gives one error naming the file and the ``apt-get install`` that provides it,
never a traceback deep inside OpenCV or ffmpeg.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import soxr

from edgekeeper.errors import InputError

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")
FREEDESKTOP_SOUNDS = Path("/usr/share/sounds/freedesktop/stereo")

# Which Debian package provides each root, for the error message.
_PACKAGES = {
    OPENCV_DATA: "opencv-doc",
    ASTERISK_SOUNDS: "asterisk-core-sounds-en-wav",
    FREEDESKTOP_SOUNDS: "sound-theme-freedesktop",
}
_TOOLS = {"ffmpeg": "ffmpeg", "espeak-ng": "espeak-ng"}


def require(path: Path) -> Path:
    """``path`` if it exists, else an InputError naming the Debian package that ships it."""
    if path.exists():
        return path
    package = next((pkg for root, pkg in _PACKAGES.items() if path.is_relative_to(root)), None)
    fix = f"apt-get install {package}" if package else "restore the file"
    raise InputError(f"training data file {path} does not exist", fix=fix)


def require_tool(name: str) -> str:
    """Absolute path of a command-line tool the recipe shells out to."""
    found = shutil.which(name)
    if found is None:
        raise InputError(
            f"the recipe needs the `{name}` command, which is not on PATH",
            fix=f"apt-get install {_TOOLS.get(name, name)}",
        )
    return found


def check_all() -> None:
    """Fail fast, before any slow step, if a package or tool is missing."""
    for root in _PACKAGES:
        require(root)
    for tool in _TOOLS:
        require_tool(tool)


def _read_pcm_wav(path: Path, sample_rate: int) -> np.ndarray | None:
    """16-bit PCM WAV via the stdlib (60x faster than spawning ffmpeg); None if not that format."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getcomptype() != "NONE":
                return None
            rate, channels = w.getframerate(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError):
        return None
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    x = x.reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        x = soxr.resample(x, rate, sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32)


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Any file ffmpeg reads (wav, oga) as mono float32 in [-1, 1] at ``sample_rate``.

    Plain PCM WAV (Asterisk prompts, espeak-ng output) is read directly and resampled with soxr;
    everything else (the freedesktop theme's Ogg Vorbis) goes through ffmpeg. Both resamplers
    are deterministic, which keeps the recipe reproducible.
    """
    require(path)
    if path.suffix.lower() == ".wav":
        pcm = _read_pcm_wav(path, sample_rate)
        if pcm is not None:
            return pcm
    cmd = [
        require_tool("ffmpeg"),
        "-v",
        "error",
        "-nostdin",
        "-i",
        str(path),
        "-ac",
        "1",
        "-ar",
        str(sample_rate),
        "-f",
        "f32le",
        "-",
    ]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise InputError(
            f"ffmpeg cannot decode {path}: {proc.stderr.decode(errors='replace').strip()}",
            fix="reinstall the package that ships it",
        )
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()

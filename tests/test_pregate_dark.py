"""The motion pre-gate in the dark: it must wake the model for a walker at a few % exposure and
keep sparing frames of a still scene whose only change is sensor noise.

Real footage: the bundled sample (held-out frames of opencv-doc's vtest.avi, walkers in every
frame), darkened and noised with the recipe's own sensor model (``data_vision.darken``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgekeeper.cloud.training.data_vision import darken, read_video
from edgekeeper.config import PregateSection
from edgekeeper.device.pregate import MotionMeter, VideoPregate

pytestmark = pytest.mark.slow  # CI runs it on the main Python only (.ci/run)

MODELS = Path(__file__).resolve().parent.parent / "models"
SAMPLE_VIDEO = MODELS / "samples" / "street" / "video.avi"
FPS = 10.0
FRAMES = 60  # 6 s at 10 fps


# (name, darken arguments): dusk, night through a camera at high gain (noisy, infrared-like grey),
# and night without gain (a few grey levels of signal under the noise).
DARK = {
    "35%": {"exposure": 0.35},
    "10%": {"exposure": 0.1},
    "night": {"exposure": 0.05, "shot": 1.0, "read": 2.0, "gain": 6.0, "grey": True},
    "night-dark": {"exposure": 0.05, "shot": 1.0, "read": 2.0, "grey": True},
    "night-noisy": {"exposure": 0.04, "shot": 2.0, "read": 4.0, "gain": 10.0, "grey": True},
}


@pytest.fixture(scope="module")
def street() -> np.ndarray:
    return read_video(SAMPLE_VIDEO)  # raises, naming the file, when nothing decodes


def wake_share(frames: list[np.ndarray], cfg: PregateSection) -> tuple[float, int]:
    """(share of frames with motion, frames the pre-gate let through incl. heartbeats)."""
    meter, gate = MotionMeter(cfg), VideoPregate(cfg)
    motion = [meter.measure(f) for f in frames]
    for i, m in enumerate(motion):
        gate.decide(i / FPS, m)
    moving = float(np.mean([m > cfg.motion_min_area for m in motion[1:]]))
    return moving, gate.stats.seen - gate.stats.spared


@pytest.mark.parametrize("setting", list(DARK))
def test_walkers_in_the_dark_wake_the_model(street: np.ndarray, setting: str) -> None:
    rng = np.random.default_rng(0)
    frames = [darken(f, rng=rng, **DARK[setting]) for f in street[:FRAMES]]
    moving, _ = wake_share(frames, PregateSection())
    # The noisiest setting (4 % light, strong noise at 10x gain) buries the farthest walkers.
    least = 0.85 if setting == "night-noisy" else 0.9
    assert moving >= least, f"{setting}: only {moving:.2f} of frames with walkers count as motion"


@pytest.mark.parametrize("setting", ["100%", *DARK])
def test_still_scene_with_sensor_noise_is_spared(street: np.ndarray, setting: str) -> None:
    """A person-free plate (median of the footage) with fresh sensor noise every frame."""
    plate = np.median(street[::4], axis=0).astype(np.uint8)
    kw = DARK.get(setting, {"exposure": 1.0})
    rng = np.random.default_rng(1)
    # Noise on every frame, even at full exposure: no two frames of a real camera are equal.
    noisy = {**kw, "shot": kw.get("shot", 0.5), "read": kw.get("read", 2.0)}
    frames = [darken(plate, rng=rng, **noisy) for _ in range(FRAMES)]
    moving, run = wake_share(frames, PregateSection())
    assert moving <= 0.02, f"{setting}: noise alone counted as motion in {moving:.2f} of frames"
    # 6 s at 10 fps: the first frame and one heartbeat after 5 s, nothing else.
    assert run == 2


def test_absolute_threshold_alone_misses_the_night(street: np.ndarray) -> None:
    """Why the normalisation exists: the raw grey change of a night walker is under 25 levels."""
    rng = np.random.default_rng(0)
    a, b = (
        cv2.cvtColor(darken(f, rng=rng, **DARK["night-dark"]), cv2.COLOR_BGR2GRAY)
        for f in street[:2]
    )
    raw = np.count_nonzero(cv2.absdiff(a, b) > PregateSection().motion_pixel_threshold) / a.size
    meter = MotionMeter(PregateSection())
    meter.measure(darken(street[0], rng=rng, **DARK["night-dark"]))
    assert raw <= PregateSection().motion_min_area
    assert meter.measure(darken(street[1], rng=rng, **DARK["night-dark"])) > 0.002


@pytest.mark.parametrize("setting", ["35%", "night"])
async def test_replay_of_the_sample_at_night_fires_person(
    tmp_path: Path, setting: str, make_config
) -> None:
    """End to end, as a device sees it: the bundled recording darkened (a few % exposure, sensor
    noise, camera gain, infrared-like grey), through the pre-gate, the shipped int8 person model
    and the default trigger rule. People are in every frame, so a person event must fire."""
    import json
    import shutil

    from edgekeeper.device.replay import replay_recording

    sample = SAMPLE_VIDEO.parent
    rec = tmp_path / "dark"
    rec.mkdir()
    for name in ("recording.json", "audio.wav", "labels.json"):
        shutil.copy(sample / name, rec / name)
    cap = cv2.VideoCapture(str(SAMPLE_VIDEO))
    writer = None
    rng = np.random.default_rng(3)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if writer is None:
            h, w = frame.shape[:2]
            writer = cv2.VideoWriter(str(rec / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"),
                                     FPS, (w, h))
        writer.write(darken(frame, rng=rng, **({"exposure": 0.35} | DARK.get(setting, {}))))
    cap.release()
    assert writer is not None
    writer.release()
    labels = json.loads((rec / "labels.json").read_text())["labels"]
    res = await replay_recording(rec, make_config(), events_dir=tmp_path / "ev", labels=labels,
                                 progress=False)
    person = res.metrics["person"]
    assert person["labelled_ranges"] >= 1
    assert person["event_recall"] == 1.0, f"{setting}: {person}"
    # One range covers the whole recording, so one lucky trigger would do: the frames count too
    # (the targets: 0.95 down to 35 % exposure, 0.8 at night).
    assert person["window_recall"] >= (0.95 if setting == "35%" else 0.8), f"{setting}: {person}"
    # The pre-gate let the dark walkers through: the model scored most frames, not heartbeats.
    assert person["windows"] >= 0.8 * res.stats.frames, f"{setting}: {person}"

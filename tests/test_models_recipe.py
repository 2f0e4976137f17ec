"""The recipe's TensorFlow-free parts and the models it shipped, checked with ai_edge_litert.

No TensorFlow here: these run in the ordinary test environment. The shipped .tflite files,
manifests and sample recording are real artefacts in models/; the tests load them as a device
would and check the contract in docs/models.md holds.
"""

from __future__ import annotations

import json
import wave
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgekeeper.cloud.training import data_audio, data_vision, features, frontends
from edgekeeper.cloud.training.evaluate import (
    TFLiteModel,
    event_recall,
    precision_recall,
    smoothed,
    trigger_onsets,
    triggers_per_hour,
)
from edgekeeper.cloud.training.sources import require
from edgekeeper.errors import InputError, ModelError

MODELS = Path(__file__).resolve().parent.parent / "models"
FRONTENDS = MODELS / "frontends"
SAMPLE = MODELS / "samples" / "street"


# ------------------------------------------------------------------- windowing and smoothing


@pytest.mark.parametrize(
    ("rows", "window", "step", "expected"),
    [
        (197, 76, 8, list(range(1, 122, 8))),  # the 2 s gate window: 16 embeddings
        (76, 76, 8, [0]),
        (75, 76, 8, []),
        (20, 16, 100, [4]),  # "no step" in practice: only the last window
        (10, 3, 4, [3, 7]),
    ],
)
def test_window_starts_end_at_last_row(
    rows: int, window: int, step: int, expected: list[int]
) -> None:
    starts = features.window_starts(rows, window, step)
    assert starts == expected
    if starts:
        assert starts[-1] + window == rows


def test_window_starts_rejects_nonpositive() -> None:
    with pytest.raises(ValueError, match="window and step must be positive"):
        features.window_starts(10, 0, 1)


def test_smoothing_needs_three_of_five() -> None:
    passes = [1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    state = smoothed(np.array(passes, dtype=bool))
    assert state.tolist() == [False] * 6 + [True, True, True, True, False, False, False, False]
    assert trigger_onsets(state).tolist() == [6]


def test_triggers_per_hour_counts_onsets_not_windows() -> None:
    p = np.zeros(7200)  # one hour of 0.5 s hops
    p[100:110] = 0.9  # one long event: one trigger, ten windows
    p[5000] = 0.9  # an isolated blip: smoothing removes it
    rates = triggers_per_hour(p, 0.8, 0.5)
    assert rates["hours"] == 1.0
    assert rates["per_window_triggers_per_hour"] == 2.0
    assert rates["smoothed_triggers_per_hour"] == 1.0


def test_precision_recall_and_event_recall() -> None:
    p = np.array([0.9, 0.8, 0.2, 0.95, 0.1])
    truth = np.array([True, False, True, True, False])
    assert precision_recall(p, truth, 0.7) == {
        "precision": 0.6667,
        "recall": 0.6667,
        "tp": 2,
        "fp": 1,
        "fn": 1,
    }
    ends = np.arange(2.0, 12.0, 0.5)
    p = np.zeros(len(ends))
    p[(ends >= 4.0) & (ends <= 6.0)] = 0.99  # event at 3-4 s seen in windows ending 4-6 s
    out = event_recall(p, ends, 2.0, [("alarm", 3.0, 4.0), ("alarm", 9.0, 9.5)], "alarm", 0.6)
    assert out == {"events": 2, "caught": 1, "recall": 0.5, "triggers_outside_events": 0}


# ----------------------------------------------------------------------------- data helpers


def test_heldout_split_is_stable_and_partial() -> None:
    names = [f"clip-{i}.wav" for i in range(400)]
    held = [n for n in names if data_audio.heldout_file(n)]
    assert held == [n for n in names if data_audio.heldout_file(n)]  # no hidden randomness
    assert 60 < len(held) < 140  # about a quarter
    # The sample's alarm is forced out of training whatever its hash says.
    assert "alarm-clock-elapsed.oga" in data_audio.FORCED_HELDOUT


def test_audio_roles_keep_tones_and_animals_out_of_speech() -> None:
    src = data_audio.SOURCES
    en, fr = src["asterisk-en"], src["asterisk-fr"]
    for name in ("beep.wav", "beeperr.wav", "confbridge-join.wav", "tt-monkeys.wav"):
        assert data_audio.roles_of(en, en.root / name) == ("singles",)
        assert data_audio.roles_of(fr, fr.root / name) == ("singles",)
    assert data_audio.roles_of(en, en.root / "tt-weasels.wav") == ("speech",)  # spoken
    assert data_audio.roles_of(en, en.root / "digits" / "7.wav") == ("speech",)
    assert data_audio.roles_of(en, en.root / "silence" / "1.wav") == ("quiet",)
    fd, yaru = src["freedesktop"], src["yaru"]
    # An alert is an alarm when repeated and background when played once; a chime only the latter.
    assert data_audio.roles_of(fd, fd.root / "dialog-warning.oga") == ("alerts", "singles")
    assert data_audio.roles_of(yaru, yaru.root / "battery-low.oga") == ("alerts", "singles")
    assert data_audio.roles_of(fd, fd.root / "complete.oga") == ("singles",)
    assert data_audio.roles_of(fd, fd.root / "alarm-clock-elapsed.oga") == ("alerts",)
    assert data_audio.roles_of(fd, fd.root / "audio-channel-front-left.oga") == ("speech",)
    music = src["singularity-music"]
    assert data_audio.roles_of(music, music.root / "Nebula.ogg") == ("music",)


def test_heldout_sources_never_reach_training() -> None:
    for name in data_audio.HELDOUT_SOURCES:
        assert not data_audio._in_split(name, "anything.wav", heldout=False)
        assert data_audio._in_split(name, "anything.wav", heldout=True)
    # Two other themes, another music collection, two other Asterisk voices/languages.
    assert {"yaru", "deepin", "singularity-music", "asterisk-fr", "asterisk-es"} <= set(
        data_audio.HELDOUT_SOURCES
    )
    assert not data_audio._in_split("freedesktop", "dialog-warning.oga", heldout=False)
    for s in data_audio.SOURCES.values():
        assert s.package and s.licence  # every source names its package and licence


def _pools() -> data_audio.Pools:
    rng = np.random.default_rng(3)
    t = np.arange(8000) / 16000
    tone = (np.sin(2 * np.pi * 1000 * t) * 0.5).astype(np.float32)
    noise = (rng.normal(size=16000 * 30) * 0.1).astype(np.float32)
    clip = data_audio.Clip
    return data_audio.Pools(
        speech=[clip(noise[:24000], "test", "test:speech")],
        alerts=[clip(tone, "test", "test:alert")],
        singles=[clip(tone, "test", "test:chime"), clip(tone[:800], "test", "test:click")],
        quiet=[clip(noise[:16000] * 0.01, "test", "test:quiet")],
        music=[clip(noise, "test", "test:music")],
    )


def test_repeated_alert_and_streams_are_built_as_described() -> None:
    rng = np.random.default_rng(0)
    tone = _pools().alerts[0].audio
    rep = data_audio.repeat_alert(tone, 4.0, rng)
    assert len(rep) == 64000
    loud = np.abs(rep).reshape(-1, 800).max(axis=1) > 0.1  # 50 ms frames
    assert np.sum(np.diff(loud.astype(int)) == 1) >= 3  # goes off again and again

    quiet = data_audio.make_quiet_stream(_pools(), 0, music_s=20, broadcast_s=20, household_s=20)
    assert [p[0] for p in quiet.parts] == ["music", "broadcast", "household"]
    assert len(quiet.audio) == 60 * 16000 and quiet.events == []
    singles = data_audio.make_singles_stream(_pools(), 0, every=8.0)
    assert [e[0] for e in singles.events] == ["test:chime", "test:click"]
    assert len(singles.audio) == 16 * 16000
    events = data_audio.make_event_stream(
        data_audio.replace(_pools(), synth_alarms=False), 60, 0, every=12.0
    )
    assert [e[0] for e in events.events] == ["speech", "alarm"] * 2
    assert all(e - s >= 3.0 for lab, s, e in events.events if lab == "alarm")


def test_policy_fires_uses_the_device_rule() -> None:
    from edgekeeper.cloud.training.evaluate import fired_events, policy_fires

    ends = np.arange(2.0, 30.0, 0.48)
    labels = ("background", "speech", "alarm")
    p = np.zeros((len(ends), 3))
    p[:, 0] = 1.0
    chime = (ends > 4.0) & (ends <= 6.0)  # a short sound: 4 windows, 1.4 s apart
    alarm = (ends > 12.0) & (ends <= 18.0)  # a repeated alert: hits over 6 s
    p[chime | alarm] = [0.0, 0.0, 1.0]
    fires = policy_fires(p, ends, labels)
    assert [lab for lab, _ in fires] == ["alarm"]
    assert 14.5 <= fires[0][1] <= 15.5  # once the hits spread over 2.5 s
    out = fired_events(fires, [("alarm", 10.5, 16.0), ("alarm", 4.0, 4.5)], "alarm", 2.0)
    assert out == {"events": 2, "caught": 1, "recall": 0.5, "fires": 1, "false_fires": 0}
    assert fired_events(fires, [], "alarm", 2.0)["false_fires"] == 1


def test_person_training_scenes_stay_apart_from_the_heldout_wallpapers() -> None:
    scenes = data_vision.SCENES
    assert set(scenes) == set(data_vision.SCENE_LICENCES)  # every scene package has a licence
    assert not set(scenes) & set(data_vision.HELDOUT_SOURCES)
    trained = {data_vision.SCENE_ROOT / n for names in scenes.values() for n in names}
    held = {
        data_vision.BACKGROUNDS / n for names in data_vision.HELDOUT_SOURCES.values() for n in names
    }
    assert len(trained) == sum(len(n) for n in scenes.values()) >= 30
    assert not trained & held
    # lomiri and ukui install into /usr/share/backgrounds itself; training scenes come from
    # sub-folders (gnome/, sway/) or /usr/share/wallpapers, never next to the held-out files.
    assert all(p.parent != data_vision.BACKGROUNDS for p in trained)


def test_time_split_keeps_a_gap_and_the_tail() -> None:
    train, held = data_vision.time_split(795)
    assert train.stop + data_vision.GAP_FRAMES == held.start
    assert held.stop == 795
    assert len(held) / 795 == pytest.approx(0.25, abs=0.01)


def test_trim_cuts_silence_only() -> None:
    x = np.zeros(16000, dtype=np.float32)
    x[4000:8000] = np.sin(np.arange(4000) / 5) * 0.5
    y = data_audio.trim(x)
    assert 3800 <= len(y) <= 4400
    assert data_audio.trim(np.zeros(1000, dtype=np.float32)).size == 0


def test_synthetic_alarms_are_deterministic_and_audible() -> None:
    a = [data_audio.synth_alarm(np.random.default_rng(5), 2.0) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    assert a[0].shape == (32000,)
    assert 0.05 < float(np.sqrt(np.mean(a[0] ** 2))) <= 1.0


def test_missing_debian_file_names_the_package() -> None:
    from edgekeeper.cloud.training.sources import ASTERISK_SOUNDS

    with pytest.raises(InputError, match="asterisk-core-sounds-en-wav") as info:
        require(ASTERISK_SOUNDS / "no-such-prompt.wav")
    assert "no-such-prompt.wav" in str(info.value)


def test_frame_to_input_stretches_and_reorders() -> None:
    frame = np.zeros((576, 768, 3), dtype=np.uint8)
    frame[..., 0] = 255  # pure blue in BGR
    x = features.frame_to_input(frame, 160, 120)
    assert x.shape == (120, 160, 3)
    assert x.dtype == np.float32
    assert np.allclose(x[..., 2], 1.0)
    assert np.allclose(x[..., 0], 0.0)


# ---------------------------------------------------------------------------- front-ends


def _fake_wheel(tmp_path: Path, tamper: bool = False) -> Path:
    wheel = tmp_path / frontends.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in frontends.PINNED:
            data = (FRONTENDS / name).read_bytes()
            zf.writestr(frontends.INSIDE_WHEEL + name, data + (b"x" if tamper else b""))
    return wheel


def test_frontends_extracted_from_wheel_and_verified(tmp_path: Path) -> None:
    out = tmp_path / "frontends"
    frontends.ensure(out, wheel=_fake_wheel(tmp_path))
    for name in frontends.PINNED:
        assert (out / name).read_bytes() == (FRONTENDS / name).read_bytes()
    assert "CC BY-NC-SA 4.0" in (out / "NOTICE").read_text()
    assert (FRONTENDS / "NOTICE").read_text() == frontends.NOTICE


def test_tampered_wheel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not match the pinned sha256"):
        frontends.ensure(tmp_path / "frontends", wheel=_fake_wheel(tmp_path, tamper=True))
    assert not list((tmp_path / "frontends").glob("*.tflite"))  # nothing half-written


# ------------------------------------------------------------------------ audio features


@pytest.fixture(scope="module")
def frontend() -> features.AudioFrontend:
    return features.AudioFrontend(FRONTENDS, num_threads=1)


def test_features_shape_and_batched_equals_per_window(frontend: features.AudioFrontend) -> None:
    rng = np.random.default_rng(0)
    window = (rng.normal(size=32000) * 0.1).astype(np.float32)
    mel = frontend.mel(window)
    assert mel.shape == (197, 32)
    feats = frontend.features(window)
    assert feats.shape == (16, 96)
    # One call per window, as the contract words it, gives the same numbers as our batch.
    single = features.AudioFrontend(FRONTENDS, num_threads=1)
    starts = features.window_starts(197, 76, 8)
    per_window = np.stack([single.embeddings(mel[s : s + 76])[0] for s in starts])
    np.testing.assert_array_equal(per_window, feats)


@pytest.mark.parametrize("seconds", [2.0, 2.47, 2.48, 9.7])
def test_stream_shares_rows_and_equals_each_window(
    frontend: features.AudioFrontend, seconds: float
) -> None:
    """The stream computes each mel row and embedding once (as the device's cache does) and
    still gives every window exactly the features of that window alone."""
    rng = np.random.default_rng(1)
    signal = (rng.normal(size=round(seconds * 16000)) * 0.1).astype(np.float32)
    got = list(frontend.stream(signal))
    ends = range(32000, len(signal) + 1, 7680)
    assert [w.end_seconds for w in got] == [e / 16000 for e in ends]
    for w, end in zip(got, ends, strict=True):
        np.testing.assert_array_equal(w.features, frontend.features(signal[end - 32000 : end]))
    # A hop that is no multiple of 8 mel rows takes the per-window path, with the same meaning.
    odd = list(frontend.stream(signal, hop_seconds=0.5))
    assert [w.end_seconds for w in odd] == [e / 16000 for e in range(32000, len(signal) + 1, 8000)]


def test_short_window_is_an_error_not_padding(frontend: features.AudioFrontend) -> None:
    with pytest.raises(InputError, match="the head needs 16"):
        frontend.features(np.zeros(16000, dtype=np.float32))


def test_missing_frontend_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"melspectrogram\.tflite does not exist"):
        features.AudioFrontend(tmp_path)


# ----------------------------------------------------------------- shipped models and sample


@pytest.mark.parametrize(
    ("name", "labels"),
    [("person", ["no_person", "person"]), ("sound", ["background", "speech", "alarm"])],
)
@pytest.mark.parametrize("variant", ["float", "int8"])
def test_shipped_manifests_follow_the_contract(name: str, labels: list[str], variant: str) -> None:
    folder = MODELS / name
    manifest = json.loads((folder / f"manifest-{variant}.json").read_text())
    assert manifest["schema"] == 1
    assert manifest["name"] == name
    assert manifest["postprocess"] == "none"
    assert (folder / manifest["labels"]).read_text().splitlines() == labels
    for stage in manifest["stages"]:
        assert (folder / stage["model"]).is_file()
    last = manifest["stages"][-1]
    head = TFLiteModel(folder / last["model"], num_threads=1)
    assert (folder / last["model"]).stat().st_size < 1_000_000
    assert head.output_roles(len(labels)) == last["outputs"]
    int8 = variant == "int8"
    assert (head.input["dtype"] == np.int8) == int8
    assert all((o["dtype"] == np.int8) == int8 for o in head.outputs)
    if name == "person":
        v = manifest["vision"]
        assert list(head.input["shape"]) == [1, v["height"], v["width"], 3]
        assert 16 <= int(np.prod(head.outputs[last["outputs"]["embedding"]]["shape"])) <= 64
    else:
        assert manifest["audio"] == {
            "sample_rate": 16000,
            "window_seconds": 2.0,
            "hop_seconds": 0.48,
        }
        # The hop is a whole number of embedding steps, so the device's cache can reuse rows.
        pcm = manifest["stages"][0]
        rows_per_hop = 0.48 * 16000 / pcm["frame_samples"]
        assert rows_per_hop % manifest["stages"][1]["step"] == 0
        assert list(head.input["shape"]) == [1, 16, 96]


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def test_sample_recording_formats() -> None:
    rec = json.loads((SAMPLE / "recording.json").read_text())
    assert rec["schema"] == 1 and rec["video"] == "video.avi" and rec["audio"] == "audio.wav"
    assert rec["started_at"] == "2026-11-23T12:00:00Z"
    labels = json.loads((SAMPLE / "labels.json").read_text())
    assert labels["schema"] == 1
    cap = cv2.VideoCapture(str(SAMPLE / "video.avi"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FPS)) == (768, 10)
    duration = n / 10
    audio = _read_wav(SAMPLE / "audio.wav")
    assert len(audio) / 16000 == pytest.approx(duration, abs=0.05)
    for lab in labels["labels"]:
        assert lab["label"] in {"person", "speech", "alarm"}
        assert 0 <= lab["start"] < lab["end"] <= duration + 1e-6
    total = sum((SAMPLE / f).stat().st_size for f in ("video.avi", "audio.wav"))
    assert total < 4_000_000


def test_int8_gates_fire_on_the_sample_where_the_labels_say() -> None:
    """The end-to-end sanity check: shipped int8 models on the shipped held-out recording."""
    labels = json.loads((SAMPLE / "labels.json").read_text())["labels"]
    person = TFLiteModel(MODELS / "person" / "person-int8.tflite", num_threads=1)
    pm = json.loads((MODELS / "person" / "manifest-int8.json").read_text())
    v, scores = pm["vision"], pm["stages"][0]["outputs"]["scores"]
    cap = cv2.VideoCapture(str(SAMPLE / "video.avi"))
    probs = []
    for i in range(0, 199, 10):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, frame = cap.read()
        assert ok
        probs.append(person(features.frame_to_input(frame, v["width"], v["height"]))[scores][1])
    assert np.mean(np.array(probs) >= 0.7) >= 0.9  # people are in every frame

    sound = TFLiteModel(MODELS / "sound" / "sound-int8.tflite", num_threads=1)
    fe = features.AudioFrontend(FRONTENDS, num_threads=1)
    audio = _read_wav(SAMPLE / "audio.wav")
    ends, p = [], []
    for wf in fe.stream(audio):
        ends.append(wf.end_seconds)
        p.append(sound(wf.features)[0])
    ends_a, p_a = np.array(ends), np.stack(p)
    for lab in labels:
        if lab["label"] == "person":
            continue
        k = ["background", "speech", "alarm"].index(lab["label"])
        inside = (ends_a > lab["start"] + 0.5) & (ends_a <= lab["end"] + 0.5)
        assert p_a[inside, k].max() >= 0.5, lab
    # Far from any event (only noise and, at 8.5 s, a click) nothing should fire.
    quiet = (ends_a >= 9.5) & (ends_a <= 11.5)
    assert p_a[quiet, 1:].max() < 0.5


def test_darken_models_exposure_noise_gain_and_grey() -> None:
    img = np.full((8, 8, 3), (200, 100, 40), np.uint8)
    assert data_vision.darken(img, 0.5)[0, 0].tolist() == [100, 50, 20]
    # Linear light: half the light is brighter than half the pixel value (gamma 2.2).
    assert data_vision.darken(img, 0.5, linear=True)[0, 0, 0] > 100
    grey = data_vision.darken(img, 0.1, grey=True, gain=4.0)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[0, 0, 0] == round(np.mean([200, 100, 40]) * 0.1 * 4.0)
    noisy = data_vision.darken(img, 0.05, np.random.default_rng(0), shot=1.0, read=2.0, gain=6.0)
    assert noisy.std() > 3  # the camera's gain amplifies the sensor noise
    with pytest.raises(ValueError, match="noise needs an rng"):
        data_vision.darken(img, 0.5, shot=1.0)

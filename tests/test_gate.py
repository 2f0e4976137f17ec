"""The gate with the real default models (float and int8), bad models refused, live swap."""

from __future__ import annotations

import asyncio
import json
import shutil
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.device.gate import Gate, ModelRunner
from edgekeeper.errors import ModelError

DATA = Path(__file__).resolve().parent / "data"


def manifest(name: str, variant: str) -> Path:
    return config_mod.resolve_model(f"builtin:{name}", variant)


def sample_frames(sample: Path, n: int = 30) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(sample / "video.avi"))
    frames = []
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    return frames


def sample_windows(sample: Path, seconds: float = 2.0) -> list[np.ndarray]:
    with wave.open(str(sample / "audio.wav"), "rb") as w:
        assert w.getframerate() == 16000
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    n = int(seconds * 16000)
    return [pcm[s : s + n] for s in range(0, len(pcm) - n, n // 2)]


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_vision_model_scores_real_frames(variant: str, sample_recording: Path) -> None:
    runner = ModelRunner.load(manifest("person", variant))
    assert runner.manifest.labels == ("no_person", "person")
    if variant == "int8":
        assert runner.stages[0].input["dtype"] == np.int8
    outs = [runner.classify(f) for f in sample_frames(sample_recording)]
    for o in outs:
        assert sum(o.scores.values()) == pytest.approx(1.0, abs=0.02)
        assert o.features is not None and o.features.ndim == 1
    # The sample street scene has people in it: the gate must see them in most frames.
    assert np.mean([o.scores["person"] > 0.5 for o in outs]) > 0.8


def test_int8_and_float_agree(sample_recording: Path) -> None:
    f = ModelRunner.load(manifest("person", "float"))
    q = ModelRunner.load(manifest("person", "int8"))
    frames = sample_frames(sample_recording, 40)
    a = np.array([f.classify(x).scores["person"] for x in frames])
    b = np.array([q.classify(x).scores["person"] for x in frames])
    assert np.mean((a > 0.5) == (b > 0.5)) >= 0.9
    assert np.abs(a - b).mean() < 0.1


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_audio_model_multi_stage(variant: str, sample_recording: Path) -> None:
    runner = ModelRunner.load(manifest("sound", variant))
    assert runner.manifest.labels == ("background", "speech", "alarm")
    assert len(runner.stages) == 3
    outs = [runner.classify(w) for w in sample_windows(sample_recording)]
    for o in outs:
        assert sum(o.scores.values()) == pytest.approx(1.0, abs=0.02)
        assert o.features is not None and o.features.shape == (16, 96)
    # Silence is background.
    quiet = runner.classify(np.zeros(32000, np.float32))
    assert max(quiet.scores, key=quiet.scores.get) == "background"


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_cached_audio_windows_match_fresh_computation(
    sample_recording: Path, variant: str
) -> None:
    cached = ModelRunner.load(manifest("sound", variant))
    fresh = ModelRunner.load(manifest("sound", variant))
    a = cached.manifest.audio
    assert a is not None
    frame = cached.manifest.stages[0].frame_samples
    with wave.open(str(sample_recording / "audio.wav"), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    # The shipped hop, then hops too short for the front end's minimum input (some cached
    # frames are recomputed), a jump past the cache, and a rewind (a new stream).
    ends = [a.window_samples + k * a.hop_samples for k in range(6)]
    ends += [ends[-1] + k * 8 * frame for k in range(1, 4)]
    ends += [ends[-1] + a.window_samples + 3 * frame, a.window_samples + frame]
    front_end_inputs = []
    for end in ends:
        win = pcm[end - a.window_samples : end]
        x, y = cached.classify(win, end), fresh.classify(win)
        front_end_inputs.append(cached.stages[0].shape[-1])
        assert np.array_equal(x.features, y.features)
        assert x.scores == y.scores
    # The cache did its job: after the first window, a hop ran the front end on about a hop
    # of audio, not the whole window; the jump and the rewind computed whole windows.
    assert front_end_inputs[0] == a.window_samples
    assert all(n < a.window_samples // 2 for n in front_end_inputs[1:9])
    assert front_end_inputs[9:] == [a.window_samples, a.window_samples]


# -- bad models ---------------------------------------------------------------------------
def copy_model(tmp_path: Path, name: str = "person", variant: str = "int8") -> Path:
    src = manifest(name, variant)
    data = json.loads(src.read_text())
    for stage in data["stages"]:
        target = tmp_path / Path(stage["model"]).name
        shutil.copy(src.parent / stage["model"], target)
        stage["model"] = target.name
    shutil.copy(src.parent / data["labels"], tmp_path / "labels.txt")
    data["labels"] = "labels.txt"
    out = tmp_path / "manifest.json"
    out.write_text(json.dumps(data))
    return out


def edit(path: Path, **changes: object) -> Path:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_missing_manifest_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        ModelRunner.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelError, match=r"bad\.json.*not valid JSON"):
        ModelRunner.load(tmp_path / "bad.json")


def test_missing_model_file(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (tmp_path / "person-int8.tflite").unlink()
    with pytest.raises(ModelError, match=r"person-int8\.tflite does not exist"):
        ModelRunner.load(m)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_model_file(tmp_path: Path, damage: str) -> None:
    m = copy_model(tmp_path)
    f = tmp_path / "person-int8.tflite"
    data = f.read_bytes()
    if damage == "random":
        f.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "truncated":
        f.write_bytes(data[: len(data) // 3])
    else:
        f.write_bytes(b"")
    with pytest.raises(ModelError, match=r"person-int8\.tflite") as err:
        ModelRunner.load(m)
    assert err.value.fix


def test_label_count_must_match_outputs(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    (tmp_path / "labels.txt").write_text("no_person\nperson\ncat\n")
    with pytest.raises(ModelError, match=r"3 labels.*2 values"):
        ModelRunner.load(m)
    (tmp_path / "labels.txt").write_text("")
    with pytest.raises(ModelError, match="labels"):
        ModelRunner.load(m)


def test_unsupported_tensor_type_and_two_inputs(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    shutil.copy(DATA / "int16_io.tflite", tmp_path / "odd.tflite")
    edit(m, stages=[{"model": "odd.tflite"}], vision={"width": 8, "height": 8, "color": "rgb"})
    with pytest.raises(ModelError, match="unsupported type int16"):
        ModelRunner.load(m)
    shutil.copy(DATA / "two_inputs.tflite", tmp_path / "odd.tflite")
    with pytest.raises(ModelError, match="2 inputs"):
        ModelRunner.load(m)


def test_manifest_input_size_must_match_model(tmp_path: Path) -> None:
    m = copy_model(tmp_path)
    edit(m, vision={"width": 7, "height": 7, "color": "rgb"})
    with pytest.raises(ModelError, match="vision block says input"):
        ModelRunner.load(m)


async def test_gate_refuses_a_model_of_the_other_modality() -> None:
    gate = Gate("vision")
    with pytest.raises(ModelError, match="audio model"):
        await gate.load(await asyncio.to_thread(manifest, "sound", "int8"))


def test_cli_bad_model_is_one_clear_error(tmp_path: Path, sample_recording: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    m = copy_model(tmp_path)
    (tmp_path / "labels.txt").write_text("only_one\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[gate]\nvision_model = "{m}"\n')
    report = tmp_path / "report"
    code = main(["--config", str(cfg), "replay", str(sample_recording / "video.avi"),
                 "--report", str(report), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert "labels" in err and "fix:" in err and "Traceback" not in err
    assert not (report / "report.json").exists()


# -- live swap ----------------------------------------------------------------------------
async def test_swap_between_two_inferences_without_stopping(tmp_path: Path,
                                                            sample_recording: Path) -> None:
    frames = sample_frames(sample_recording, 10)
    candidate = edit(await asyncio.to_thread(copy_model, tmp_path), version="9.9.9-candidate")
    gate = Gate("vision")
    await gate.load(await asyncio.to_thread(manifest, "person", "float"))
    tags: list[str] = []
    warmed_up = asyncio.Event()

    async def infer_forever() -> None:
        for i in range(200):
            out = await gate.classify(frames[i % len(frames)])
            tags.append(out.model)
            if len(tags) == 20:
                warmed_up.set()

    task = asyncio.create_task(infer_forever())
    await warmed_up.wait()
    new = await gate.swap(candidate)
    await task
    await asyncio.to_thread(gate.close)  # joins the model thread: off the loop
    assert len(tags) == 200  # no inference failed or was lost across the swap
    switch = tags.index(tags[-1]) if tags[0] != tags[-1] else None
    assert switch is not None, "the swap never took effect"
    # Old model before, new after: exactly one switch point, nothing interleaved.
    assert all(t == tags[0] for t in tags[:switch]) and all(t == tags[-1] for t in tags[switch:])
    assert new.tag == tags[-1] == "person@9.9.9-candidate"


async def test_failed_swap_keeps_the_old_model(tmp_path: Path, sample_recording: Path) -> None:
    gate = Gate("vision")
    old = await gate.load(await asyncio.to_thread(manifest, "person", "int8"))
    bad = await asyncio.to_thread(copy_model, tmp_path)
    (tmp_path / "person-int8.tflite").write_bytes(b"garbage")
    with pytest.raises(ModelError):
        await gate.swap(bad)
    out = await gate.classify(sample_frames(sample_recording, 1)[0])
    assert out.model == old.tag
    await asyncio.to_thread(gate.close)

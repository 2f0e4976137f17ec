"""Retraining: the two-stage vision gate (backbone + head), the retrain round and its CLI.

The gate tests run with the committed heads in tests/data (made by make_vision_head.py); the
retrain tests need TensorFlow (the ``train`` extra) and skip cleanly without it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.cloud.training.examples import TrainingExample
from edgekeeper.cloud.training.retrain import (
    RetrainSettings,
    decide,
    forgetting,
    score_set,
    split_by_time,
    usable,
)
from edgekeeper.device.gate import ModelRunner
from edgekeeper.device.manifest import load_manifest
from edgekeeper.errors import ConfigError, ModelError

DATA = Path(__file__).resolve().parent / "data"
MODELS = Path(config_mod.MODELS_DIR)


def frames(sample: Path, n: int = 20) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(sample / "video.avi"))
    out = []
    while len(out) < n:
        ok, img = cap.read()
        if not ok:
            break
        out.append(img)
    return out


def two_stage(tmp_path: Path, variant: str, **head: object) -> Path:
    """A person manifest: the shipped backbone, then the committed head on its embedding."""
    shutil.copy(MODELS / "person" / f"person-{variant}.tflite", tmp_path)
    shutil.copy(DATA / f"person_head-{variant}.tflite", tmp_path)
    shutil.copy(MODELS / "person" / "labels.txt", tmp_path)
    raw = json.loads((MODELS / "person" / f"manifest-{variant}.json").read_text())
    emb = raw["stages"][0]["outputs"]["embedding"]
    raw["stages"] = [
        {"model": f"person-{variant}.tflite", "outputs": {"embedding": emb}},
        {"model": f"person_head-{variant}.tflite", "input": "embedding", **head},
    ]
    path = tmp_path / f"manifest-{variant}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_head_stage_scores_like_the_single_model(
    variant: str, tmp_path: Path, sample_recording: Path
) -> None:
    single = ModelRunner.load(MODELS / "person" / f"manifest-{variant}.json")
    staged = ModelRunner.load(two_stage(tmp_path, variant))
    assert len(staged.stages) == 2
    if variant == "int8":
        assert staged.stages[1].input["dtype"] == np.int8
    tol = 1e-5 if variant == "float" else 0.05  # int8: the head re-quantises the embedding
    for f in frames(sample_recording):
        a, b = single.classify(f), staged.classify(f)
        assert b.scores["person"] == pytest.approx(a.scores["person"], abs=tol)
        # The features stay the backbone's embedding: one feature space across versions.
        assert b.features is not None and a.features is not None
        np.testing.assert_array_equal(b.features, a.features)


def test_head_stage_on_a_missing_output_is_refused(tmp_path: Path) -> None:
    path = two_stage(tmp_path, "float")
    raw = json.loads(path.read_text())
    raw["stages"][1]["input"] = "features"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"stages\[1\]\.input 'features' is not an output"):
        load_manifest(path)


def test_audio_stage_cannot_take_a_named_output(tmp_path: Path) -> None:
    for name in ("melspectrogram.tflite", "embedding_model.tflite"):
        shutil.copy(MODELS / "frontends" / name, tmp_path)
    shutil.copy(MODELS / "sound" / "sound-float.tflite", tmp_path)
    shutil.copy(MODELS / "sound" / "labels.txt", tmp_path)
    raw = json.loads((MODELS / "sound" / "manifest-float.json").read_text())
    for st in raw["stages"]:
        st["model"] = Path(st["model"]).name
    raw["stages"][2]["input"] = "embedding"
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="an audio stage takes 'pcm' or 'tensor'"):
        load_manifest(tmp_path / "m.json")


def test_scores_layer_read_from_the_float_model_reproduces_it(sample_recording: Path) -> None:
    from edgekeeper.cloud.training import heads
    from edgekeeper.cloud.training.evaluate import TFLiteModel
    from edgekeeper.cloud.training.features import frame_to_input

    path = MODELS / "person" / "person-float.tflite"
    model = TFLiteModel(path)
    roles = model.output_roles(2)
    outs = [model(frame_to_input(f, 160, 120)) for f in frames(sample_recording)]
    emb = np.stack([o[roles["embedding"]] for o in outs])
    ref = np.stack([o[roles["scores"]] for o in outs])
    candidates = heads.vision_head_weights(path, 2, 32)
    head, err = heads.pick_vision_head(candidates, emb, ref, path)
    assert err <= heads.TOLERANCE
    assert head.kernel.shape == (32, 2) and head.bias.shape == (2,)
    # A wrong head (another model's numbers) is refused, naming the file.
    with pytest.raises(ModelError, match="does not reproduce its scores"):
        heads.pick_vision_head([heads.DenseHead(head.kernel[::-1].copy(), head.bias)], emb,
                               ref[:, ::-1] * 0 + 0.5, path)


# ------------------------------------------------------------------ the round, without TF


def example(i: int, t: float, target: str | None, *, weight: float = 1.0,
            features: np.ndarray | None = None, model: str = "person") -> TrainingExample:
    return TrainingExample(
        device_id="cam-1", seq=i, model=model, model_version="1.1.0", modality="vision",
        features=np.zeros(32, np.float32) if features is None else features,
        scores={"no_person": 0.2, "person": 0.8}, gate_label="person",
        teacher_label=target or "?", target=target, teacher_confidence=0.9,
        gate_correct=target == "person", reasoner="offline", provisional=False,
        weight=weight, captured_at=t, reasoned_at=t + 5, id=i,
    )


def test_usable_says_why_examples_are_left_out() -> None:
    exs = [example(1, 0, "person"), example(2, 1, None), example(3, 2, "no_person", weight=0),
           example(4, 3, "cat"), example(5, 4, "person", features=np.zeros(8, np.float32)),
           example(6, 5, "person", model="sound")]
    kept, skipped = usable(exs, "person", ("no_person", "person"), (32,))
    assert [e.id for e in kept] == [1]
    assert skipped == {"no target": 1, "weight 0": 1, "target 'cat' not a label": 1,
                       "features shape (8,)": 1, "other model": 1}


def test_split_by_time_keeps_a_gap_and_never_mixes_a_minute() -> None:
    # Bursts of 10 examples a minute apart: the held-out part is the newest quarter by time.
    exs = [example(i, 600.0 * (i // 10) + i % 10, "no_person") for i in range(100)]
    split = split_by_time(exs, 0.25, 60.0)
    assert split.cut is not None
    assert max(e.captured_at for e in split.train) < split.cut - 60
    assert min(e.captured_at for e in split.heldout) >= split.cut
    assert len(split.heldout) == 30  # whole bursts: 7, 8, 9
    assert {int(e.captured_at // 600) for e in split.heldout} == {7, 8, 9}


def test_score_set_counts_false_triggers_and_recall() -> None:
    labels = ("background", "speech", "alarm")
    thr = {"speech": 0.8, "alarm": 0.6}
    p = np.array([[0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.5, 0.0, 0.5],
                  [0.0, 0.3, 0.7]])
    y = np.array([0, 0, 1, 2, 1])
    m = score_set(p, y, labels, thr, hours=0.5)
    assert m["false_triggers"] == 2  # the first (alarm on background), the last (alarm on speech)
    assert m["false_triggers_per_hour"] == 4.0
    assert m["recall"] == pytest.approx(1 / 3, abs=1e-4)  # speech caught once of twice, alarm 0/1
    assert m["recall_by_label"] == {"speech": 0.5, "alarm": 0.0}


def _m(false: int, recall: float | None, rate: float = 0.0, rows: int = 100) -> dict[str, object]:
    return {"rows": rows, "false_triggers": false, "recall": recall, "false_trigger_rate": rate}


def test_decide_publishes_only_a_better_candidate() -> None:
    s = RetrainSettings(model="person", current=Path("."), margin=0.5)
    before = {"scope_heldout": _m(40, 0.9), "recipe_heldout": _m(3, 0.95, 0.01)}
    ok = {"scope_heldout": _m(10, 0.89), "recipe_heldout": _m(3, 0.94, 0.012)}
    assert decide(before, ok, s)[0]
    assert "not at least 50% fewer" in decide(before, {**ok, "scope_heldout": _m(25, 0.9)}, s)[1]
    assert "recipe held-out recall" in decide(
        before, {**ok, "recipe_heldout": _m(3, 0.9, 0.01)}, s)[1]
    assert "scope held-out recall" in decide(before, {**ok, "scope_heldout": _m(5, 0.85)}, s)[1]
    assert "false positives" in decide(
        before, {**ok, "recipe_heldout": _m(9, 0.95, 0.05)}, s)[1]
    assert "no false triggers" in decide({**before, "scope_heldout": _m(0, 0.9)}, ok, s)[1]
    with pytest.raises(ConfigError, match="recall_tolerance"):
        replace(s, recall_tolerance=2.0)


def test_forgetting_counts_only_recall_lost() -> None:
    assert forgetting(0.9, 0.95) == 0.0  # a gain is not a loss
    assert forgetting(0.9, 0.8) == pytest.approx(0.1)
    assert forgetting(None, 0.8) == 0.0 and forgetting(0.9, None) == 0.0  # nothing to recall


def test_recipe_held_out_rows_split_in_two_disjoint_halves_per_label() -> None:
    """The guard stops on one half, the decision judges the other: no row in both, every label
    in each, and the sound file's 200 per label give 100 each (a row is 0.005 of a half's
    recall, the guard's 0.01 two rows)."""
    from edgekeeper.cloud.training import rehearsal
    from edgekeeper.cloud.training.retrain import recipe_halves

    reh = rehearsal.load(MODELS / "sound")
    (gx, gy), (cx, cy) = recipe_halves(reh)
    assert len(gy) + len(cy) == len(reh.heldout_y)
    assert list(np.bincount(gy)) == list(np.bincount(cy)) == [100, 100, 100]
    both = {r.tobytes() for r in gx} & {r.tobytes() for r in cx}
    assert not both


# ------------------------------------------------------------------ with TensorFlow


def _person_examples(n: int, seed: int = 0) -> list[TrainingExample]:
    """Examples near the recipe's own held-out embeddings (real features), half of the
    people-free ones relabelled wrongly-fired so the round has false triggers to fix."""
    from edgekeeper.cloud.training import rehearsal

    reh = rehearsal.load(MODELS / "person")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(reh.train_y), n)
    out = []
    for i, j in enumerate(pick):
        target = "person" if reh.train_y[j] == 1 else "no_person"
        out.append(example(i + 1, 30.0 * i, target, features=reh.train_x[j]))
    return out


def test_retrain_person_writes_a_loadable_candidate(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow", reason="retraining needs the train extra")
    from edgekeeper.cloud.training.retrain import retrain

    out = tmp_path / "cand"
    settings = RetrainSettings(model="person", current=MODELS / "person", epochs=3)
    result = retrain(_person_examples(400), settings, out)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["head-float.tflite", "head-int8.tflite", "labels.txt",
                            "manifest-float.json", "manifest-int8.json", "metrics.json",
                            "person-float.tflite", "person-int8.tflite", "rehearsal.npz",
                            "report.html", "retrain.json"])
    # The backbone is copied byte for byte; the manifests name only files inside the folder.
    assert (out / "person-int8.tflite").read_bytes() == (
        MODELS / "person" / "person-int8.tflite").read_bytes()
    raw = json.loads((out / "manifest-int8.json").read_text())
    assert all("/" not in st["model"] for st in raw["stages"])
    assert raw["version"] == "1.2.0" and raw["stages"][1]["input"] == "embedding"
    report = json.loads((out / "retrain.json").read_text())
    assert report["current_check"]["max_difference"] <= 1e-4
    assert report["parent_version"] == "1.1.0" and report["scope"] == "fleet"
    assert len(report["examples"]["train_ids"]) + len(report["examples"]["heldout_ids"]) <= 400
    assert report["decision"]["accepted"] == result.accepted
    assert "<img" in (out / "report.html").read_text()
    runner = ModelRunner.load(out / "manifest-int8.json")
    assert runner.manifest.tag == "person@1.2.0"


def test_guard_keeps_the_last_epoch_that_has_not_forgotten() -> None:
    """Examples that all say "no person", pushed hard: unguarded the head forgets people on
    the recipe's own rows; guarded it keeps the last epoch within the tolerance."""
    pytest.importorskip("tensorflow", reason="retraining needs the train extra")
    from edgekeeper.cloud.training import rehearsal
    from edgekeeper.cloud.training.retrain import (
        Current,
        current_heads,
        guard_recall,
        thresholds_for,
        train_head,
    )

    cur = Current.load(MODELS / "person")
    reh = rehearsal.load(MODELS / "person")
    labels, thr = cur.labels, thresholds_for(cur.labels)
    x = reh.train_x[reh.train_y == labels.index("person")][:300]
    y = np.full(len(x), labels.index("no_person"))
    w = np.ones(len(x), np.float32)
    guard = (reh.train_x, reh.train_y, labels, thr)

    def lost(model: object) -> float:
        return forgetting(start, guard_recall(model.predict(reh.train_x, verbose=0),  # type: ignore[attr-defined]
                                              reh.train_y, labels, thr))

    start = guard_recall(current_heads(cur, reh)[0].predict(reh.train_x, verbose=0),
                         reh.train_y, labels, thr)
    free, _, _ = current_heads(cur, reh)
    train_head(free, x, y, w, epochs=6, learning_rate=0.05, batch=64, seed=0)
    assert lost(free) > 0.05  # the push really makes it forget, so the guard has work to do

    kept, _, _ = current_heads(cur, reh)
    hist = train_head(kept, x, y, w, epochs=6, learning_rate=0.05, batch=64, seed=0,
                      guard=guard, tolerance=0.01)
    assert len(hist["guard_recall_lost"]) == 6  # every epoch ran and was measured
    assert lost(kept) <= 0.01
    within = [e + 1 for e, v in enumerate(hist["guard_recall_lost"]) if v <= 0.01]
    assert hist["kept_epoch"] == (within[-1] if within else 0)
    assert hist["guard_recall_lost"][-1] > 0.01  # the last epoch went too far: not kept


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def cloud_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "cloud"
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(data))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    return data


def test_cli_without_the_train_extra_says_one_line(
    cloud_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: the message for its absence cannot show")
    from edgekeeper.cli import main

    code = main(["cloud", "retrain", "--model", "person"])
    err = capsys.readouterr().err
    assert code != 0
    assert "pip install 'edgekeeper[train]'" in err and "Traceback" not in err


def test_cli_refuses_a_bad_scope_and_since(
    cloud_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorflow", reason="the command checks for TensorFlow first")
    from edgekeeper.cli import main

    assert main(["cloud", "retrain", "--model", "person", "--scope", "room:1"]) != 0
    assert "use fleet, group:NAME or device:ID" in capsys.readouterr().err
    assert main(["cloud", "retrain", "--model", "person", "--since", "yesterday"]) != 0
    assert "is not a date" in capsys.readouterr().err
    assert main(["cloud", "retrain", "--model", "cat"]) != 0
    assert "holds no manifest-float.json" in capsys.readouterr().err


def test_cli_retrains_from_the_real_sqlite_store(
    cloud_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorflow", reason="retraining needs the train extra")
    import asyncio

    from edgekeeper.cli import main
    from edgekeeper.cloud.backends import open_store

    made = _person_examples(300)

    async def fill() -> None:
        store = await open_store("sqlite", cloud_env)
        try:
            for e in made:
                await store.add_example(replace(e, id=None, reasoned_at=1_800_000_000.0 + e.seq))
        finally:
            await store.close()

    asyncio.run(fill())
    out = tmp_path / "cand"
    code = main(["cloud", "retrain", "--model", "person", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"candidate: {out}" in printed
    report = json.loads((out / "retrain.json").read_text())
    assert report["examples"]["read"] == 300
    # The ids recorded are the store's own rows: the round can be reproduced from them.
    assert len(report["examples"]["train_ids"]) > 150
    assert all(isinstance(i, int) for i in report["examples"]["train_ids"])

"""``replay --compare A B``: two real models over the bundled sample in one command, one report.

Every run here is a real replay of models/samples/street (its video, scored against its
labels.json) with the shipped TFLite models or copies of them; release folders are real signed
DSSE envelopes (protocol/release.py) over the copied files."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from nacl.signing import SigningKey

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.device import compare as compare_mod
from edgekeeper.device import cost, identity
from edgekeeper.protocol import release
from edgekeeper.protocol.keys import CloudPublicKeys

pytestmark = pytest.mark.slow  # CI runs it on the main Python only (.ci/run)

STREET = config_mod.MODELS_DIR / "samples" / "street"
VIDEO, LABELS = STREET / "video.avi", STREET / "labels.json"
PERSON = config_mod.MODELS_DIR / "person"


def write_config(root: Path, extra: str = "") -> Path:
    """A config whose state dir is in ``root`` (no enrollment: no pinned release key)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "device.toml"
    path.write_text(f'[device]\nstate_dir = "{root / "state"}"\n{extra}')
    return path


def compare(root: Path, a: str, b: str, *extra: str, as_json: bool = True) -> dict[str, Any]:
    cfg = write_config(root)
    argv = ["--config", str(cfg), "replay", "--compare", a, b, str(VIDEO), "--labels",
            str(LABELS), "--report", str(root / "report"), "--no-progress", *extra]
    argv += ["--json"] if as_json else []
    assert main(argv) == 0
    data: dict[str, Any] = json.loads((root / "report" / "report.json").read_text())
    return data


def replay_alone(root: Path, manifest: Path) -> dict[str, Any]:
    """A plain ``edgekeeper replay`` with ``manifest`` configured as the vision model."""
    cfg = write_config(root, f'[gate]\nvision_model = "{manifest}"\n')
    argv = ["--config", str(cfg), "replay", str(VIDEO), "--labels", str(LABELS), "--report",
            str(root / "report"), "--no-progress", "--json"]
    assert main(argv) == 0
    run: dict[str, Any] = json.loads((root / "report" / "report.json").read_text())["runs"][0]
    return run


def copy_person(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("manifest-int8.json", "labels.txt", "person-int8.tflite"):
        shutil.copy(PERSON / name, dest / name)
    return dest / "manifest-int8.json"


def expected_disagreements(run_a: dict[str, Any], run_b: dict[str, Any],
                           labels: set[str]) -> set[tuple[str, int]]:
    """From the two runs' events alone: (side, seq) of each event of a compared label with no
    event of the same label overlapping its clip in the other run."""
    out = set()
    for side, mine, other in (("A", run_a, run_b), ("B", run_b, run_a)):
        for e in mine["events"]:
            if e["label"] in labels and not any(
                o["label"] == e["label"] and o["start_t"] <= e["end_t"]
                and e["start_t"] <= o["end_t"] for o in other["events"]
            ):
                out.add((side, e["seq"]))
    return out


@pytest.fixture(scope="module")
def int8_float(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("int8-float")
    return root, compare(root, "builtin:person:int8", "builtin:person:float")


def test_int8_against_float_reports_both_side_by_side(
        int8_float: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    root, data = int8_float
    capsys.readouterr()
    a, b = data["models"]["A"], data["models"]["B"]
    assert (Path(a["manifest"]).name, Path(b["manifest"]).name) == (
        "manifest-int8.json", "manifest-float.json")
    rec = data["recordings"][0]
    # Each run names the files it ran: the float and int8 TFLite files differ by hash.
    sha = {side: {f["sha256"] for f in rec[side]["gates"]["vision"]["files"]}
           for side in ("A", "B")}
    assert sha["A"] != sha["B"]
    for side in ("A", "B"):
        t = data["totals"][side]
        m = t["labels"]["person"]
        # The sample's person is labelled throughout: both builds find it, nothing false.
        assert m["event_recall"] == 1.0 and m["event_precision"] == 1.0
        assert m["false_triggers_per_hour"] == 0.0
        assert t["events"] == len(rec[side]["events"]) > 0
        assert 0 < t["bytes_sent"] == rec[side]["bytes_sent"] < t["bytes_streaming_everything"]
        assert t["llm_cost"]["usd"] > 0 and t["llm_cost"]["events"] == t["events"]
    assert {(d["fired"], d["seq"]) for d in rec["disagreements"]} == expected_disagreements(
        rec["A"], rec["B"], {"person"})
    html = (root / "report" / "report.html").read_text()
    assert "Side by side" in html and "Where they disagree" in html
    assert "manifest-int8.json" in html and "manifest-float.json" in html
    assert "data:image/png;base64," in html  # the score timeline of both


def test_each_side_equals_a_separate_replay(int8_float: tuple[Path, dict[str, Any]],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, data = int8_float
    rec = data["recordings"][0]
    for side, name in (("A", "manifest-int8.json"), ("B", "manifest-float.json")):
        alone = replay_alone(tmp_path / side, PERSON / name)
        for key in ("decisions", "events", "frames_scored", "event_bytes", "metrics", "gates"):
            assert rec[side][key] == alone[key], (side, key)
    capsys.readouterr()


def test_a_changed_model_shows_where_they_disagree(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # A copy whose labels file lists the outputs in the wrong order: a real packaging mistake
    # that changes behaviour (its "person" is the shipped model's "no_person"). (Feeding 'bgr'
    # instead of 'rgb' moves the scores by too little to change any event on this sample.)
    manifest = copy_person(tmp_path / "swapped")
    (tmp_path / "swapped" / "labels.txt").write_text("person\nno_person\n")
    data = compare(tmp_path, "builtin:person", str(manifest))
    capsys.readouterr()
    rec = data["recordings"][0]
    rows = rec["disagreements"]
    assert rows, "a model that swaps person and no_person must disagree somewhere"
    assert {(d["fired"], d["seq"]) for d in rows} == expected_disagreements(
        rec["A"], rec["B"], {"person"})
    for d in rows:
        assert d["label"] == "person" and d["start"] <= d["trigger_t"] <= d["end"]
        # The sample is all person, so whoever fired on person was right.
        assert d["truth"] == "person" and d["right"] == d["fired"] == "A"
        # B's person score stayed under the threshold over the whole moment.
        assert d["silent_peak"] < data["config"]["trigger"]["labels"]["person"]["threshold"]
    assert data["totals"]["A"]["labels"]["person"]["event_recall"] == 1.0
    assert data["totals"]["B"]["labels"]["person"]["event_recall"] == 0.0
    assert data["totals"]["B"]["llm_cost"]["usd"] < data["totals"]["A"]["llm_cost"]["usd"]
    html = (tmp_path / "report" / "report.html").read_text()
    table = html.split("Where they disagree", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == len(rows) + 1  # a head row and one per moment
    assert "data:image/jpeg;base64," in table  # A's key frames at that moment
    # each linked to the full-size frame A's run wrote beside the report
    hrefs = re.findall(r'href="([^"]+)"', table)
    assert hrefs and all((tmp_path / "report" / unquote(h)).is_file() for h in hrefs)


def signed_release(folder: Path, key: SigningKey) -> Path:
    copy_person(folder)
    manifest = json.loads((folder / "manifest-int8.json").read_text())
    now = time.time()
    body = release.ReleaseBody(
        model="person", version="1.2.0", parent="1.1.0", scope=release.Scope(),
        entry="manifest-int8.json",
        files=release.describe_files(folder, [p.name for p in folder.iterdir()]),
        labels=("no_person", "person"),
        input=release.InputSpec("vision", width=manifest["vision"]["width"],
                                height=manifest["vision"]["height"], color="rgb"),
        created_at=now, expires_at=now + 86400,
    )
    (folder / release.RELEASE_FILE).write_bytes(release.sign(body, key))
    return folder


def test_release_folder_checked_and_compared(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.generate()
    folder = signed_release(tmp_path / "release", key)
    (tmp_path / "release.pub").write_text(bytes(key.verify_key).hex() + "\n")
    data = compare(tmp_path, "builtin:person", str(folder),
                   "--release-key", str(tmp_path / "release.pub"))
    capsys.readouterr()
    rel = data["models"]["B"]["release"]
    assert rel["tag"] == "person@1.2.0" and rel["signature_checked"] is True
    assert release.key_id(bytes(key.verify_key)) in rel["signature"]
    # The same files as the shipped model: the same events, nothing to disagree about.
    rec = data["recordings"][0]
    assert rec["A"]["events"] == rec["B"]["events"] and rec["disagreements"] == []

    # No key given and none pinned (the state dir holds no enrollment): it runs, and says so.
    data = compare(tmp_path / "nokey", "builtin:person", str(folder), as_json=False)
    printed = capsys.readouterr().out
    assert "signature not checked" in printed and "they disagree at 0 moments" in printed
    assert data["models"]["B"]["release"]["signature_checked"] is False
    html = (tmp_path / "nokey" / "report" / "report.html").read_text()
    assert "signature not checked" in html


def test_release_key_from_the_pinned_enrollment_or_a_keys_file(tmp_path: Path) -> None:
    key = SigningKey.generate()
    folder = signed_release(tmp_path / "release", key)
    state = tmp_path / "state"
    assert compare_mod.load_release_key(None, state) == (None, "")  # not enrolled: no key
    cloud = CloudPublicKeys(box_pk=bytes(32), release_pk=bytes(key.verify_key))
    identity.save_enrollment(state, identity.Enrollment("dev-1", "https://127.0.0.1:1", cloud,
                                                        time.time()))
    pk, where = compare_mod.load_release_key(None, state)
    assert pk == bytes(key.verify_key) and "pinned" in where
    cand = compare_mod.resolve("B", str(folder), variant="int8", release_pk=pk, key_source=where)
    assert cand.kind == "release" and cand.modality == "vision"
    assert cand.release is not None and cand.release["signature_checked"] is True
    # --release-key takes the cloud keys JSON a device pins (CloudPublicKeys.save), or hex.
    cloud.save(tmp_path / "cloud.json")
    assert compare_mod.load_release_key(tmp_path / "cloud.json", tmp_path / "none")[0] == pk
    (tmp_path / "key.hex").write_text(pk.hex().upper())
    assert compare_mod.load_release_key(tmp_path / "key.hex", tmp_path / "none")[0] == pk


def run_error(tmp_path: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    cfg = write_config(tmp_path)
    code = main(["--config", str(cfg), "replay", *argv, str(VIDEO), "--report",
                 str(tmp_path / "report"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err and err.count("edgekeeper: error:") == 1
    assert not (tmp_path / "report" / "report.json").exists()  # refused before any replay
    return err


def test_tampered_or_foreign_release_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.generate()
    folder = signed_release(tmp_path / "release", key)
    pub = tmp_path / "release.pub"
    pub.write_text(bytes(key.verify_key).hex())
    model = folder / "person-int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one byte changed
    model.write_bytes(bytes(data))
    for extra in ([], ["--release-key", str(pub)]):  # checked whether or not a key is known
        err = run_error(tmp_path, "--compare", "builtin:person", str(folder), *extra,
                        capsys=capsys)
        assert f"--compare B ({folder})" in err and "person-int8.tflite" in err
        assert "fix:" in err
    # Signed by another key than the one given: refused, and told which key to pass.
    shutil.rmtree(folder)
    signed_release(folder, SigningKey.generate())
    err = run_error(tmp_path, "--compare", str(folder), "builtin:person", "--release-key",
                    str(pub), capsys=capsys)
    assert "--compare A" in err and "--release-key" in err.split("fix:", 1)[1]


def test_bad_arguments_name_the_argument_and_the_fix(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "manifest.json"
    err = run_error(tmp_path, "--compare", "builtin:person", str(missing), capsys=capsys)
    assert f"--compare B ({missing})" in err and "does not exist" in err and "fix:" in err

    err = run_error(tmp_path, "--compare", "builtin:person", "builtin:sound", capsys=capsys)
    assert "vision" in err and "audio" in err and "--compare A" in err and "fix:" in err

    err = run_error(tmp_path, "--compare", "builtin:persn", "builtin:person", capsys=capsys)
    assert "--compare A (builtin:persn)" in err and "person" in err.split("fix:", 1)[1]

    err = run_error(tmp_path, "--compare", "builtin:person:fp16", "builtin:person",
                    capsys=capsys)
    assert "builtin:NAME[:int8|float]" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = run_error(tmp_path, "--compare", "builtin:person", str(empty), capsys=capsys)
    assert "release.json" in err and "--compare B" in err

    bad_key = tmp_path / "key.txt"
    bad_key.write_text("not a key")
    err = run_error(tmp_path, "--compare", "builtin:person", "builtin:person", "--release-key",
                    str(bad_key), capsys=capsys)
    assert f"--release-key {bad_key}" in err and "fix:" in err


def test_cost_estimate_follows_the_documented_figures() -> None:
    config = config_mod.Config()
    price = config.budget.prices[config.reasoner.model]
    # A 640x480 key frame: 640 * 480 / 750 = 409.6 tokens; a 1600x1200 one is scaled to
    # image_max_side (1024x768) first.
    assert cost.image_tokens(640, 480, 1024) == 410
    assert cost.image_tokens(1600, 1200, 1024) == round(1024 * 768 / 750)
    meta = {"seq": 1, "label": "person", "trigger_t": 0.0}
    metas = [meta, {**meta, "seq": 2, "trigger_t": 60.0}, {**meta, "seq": 3, "trigger_t": 900.0}]
    # Text at 4 characters a token (rounded up), three 410-token frames, per event.
    inp = sum(-(-(len(json.dumps(m, sort_keys=True)) + cost.TEXT_OVERHEAD_CHARS) // 4) + 3 * 410
              for m in metas)
    sizes = {seq: [(640, 480)] * 3 for seq in (1, 2, 3)}
    est = cost.estimate([(metas, sizes)], config)
    # The prompt cache: written by the first event, read 60 s later, written again after the
    # 5-minute cache has lapsed.
    assert (est.cache_write_tokens, est.cache_read_tokens) == (2 * 1100, 1100)
    assert est.input_tokens == inp and est.output_tokens == 3 * cost.OUTPUT_TOKENS
    assert est.usd == pytest.approx((inp * price.input + 450 * price.output
                                     + 2200 * price.cache_write + 1100 * price.cache_read) / 1e6)
    unpriced = config_mod.Config(reasoner=config_mod.ReasonerSection(model="no-such-model"))
    assert cost.estimate([(metas, sizes)], unpriced).usd is None

"""Config: defaults work, bad values are refused with the key and the fix, docs list every key."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_load_without_a_file() -> None:
    cfg = config_mod.load(None, env={})
    assert cfg.source == "defaults"
    assert cfg.trigger.labels["person"].threshold == 0.7
    assert config_mod.resolve_model(cfg.gate.vision_model).is_file()
    assert config_mod.resolve_model(cfg.gate.audio_model).is_file()


def test_file_values_and_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[device]\nid = "porch"\n[trigger.labels.person]\nthreshold = 0.9\n')
    env = {"EDGEKEEPER_LOG_LEVEL": "debug", "EDGEKEEPER_GATE_NUM_THREADS": "3"}
    cfg = config_mod.load(f, env=env)
    assert cfg.device.id == "porch"
    assert cfg.trigger.labels["person"].threshold == 0.9
    assert cfg.log.level == "debug" and cfg.gate.num_threads == 3
    # A label table given in the file overrides only its own keys; the other labels stay.
    assert set(cfg.trigger.labels) == {"person", "alarm", "speech"}
    cfg = config_mod.load(None, env={"EDGEKEEPER_CONFIG": str(f)})
    assert cfg.source == str(f)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[camera]\nfps = 'fast'\n", "camera.fps"),
        ("[camera]\nfsp = 10\n", "camera.fsp"),
        ("[nope]\nx = 1\n", "'nope'"),
        ("[trigger]\nk = 6\nn = 5\n", "trigger"),
        ("[trigger.labels.person]\nthreshold = 0.3\nrelease = 0.5\n", "trigger.labels.person"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[device]\nid = 'has space'\n", "device"),
        ("[gate]\nnum_threads = true\n", "gate.num_threads"),
        ("[event\n", "not valid TOML"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path: Path, toml: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config_mod.load(f, env={})
    text = str(err.value)
    assert str(f) in text and needle in text
    assert err.value.fix


def test_bad_env_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"gate\.num_threads"):
        config_mod.load(None, env={"EDGEKEEPER_GATE_NUM_THREADS": "many"})


def test_cli_reports_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[camera]\nfps = -1\n")
    assert main(["--config", str(f), "replay", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "camera" in err and "fix:" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path / "missing.toml"), "replay", str(tmp_path)]) == 2


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^## \[(\w+)\]\n(.*?)(?=^## |\Z)", doc, re.M | re.S))
    missing = []
    for key in _keys(config_mod.Config):
        section, name = key.split(".", 1)
        if f"`{name}`" not in sections.get(section, ""):
            missing.append(key)
    rule_doc = doc.split("[trigger.labels.NAME]", 1)[-1]
    for f in dataclasses.fields(config_mod.LabelRule):
        if f"`{f.name}`" not in rule_doc:
            missing.append(f"trigger.labels.*.{f.name}")
    for var in config_mod.ENV_OVERRIDES:
        if f"`{var}`" not in doc:
            missing.append(var)
    assert not missing, f"undocumented in docs/configuration.md: {missing}"


# --- [trigger.labels.NAME]: merged with the defaults, checked against the models' labels -----


def _doc_example() -> str:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    return doc.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_doc_example_keeps_the_other_labels(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(_doc_example())
    cfg = config_mod.load(f, env={})
    default = config_mod.TriggerSection().labels
    assert set(cfg.trigger.labels) == {"person", "alarm", "speech"}
    assert cfg.trigger.labels["alarm"] == default["alarm"]
    assert cfg.trigger.labels["speech"] == default["speech"]


def test_a_label_table_overrides_only_the_keys_it_sets(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[trigger.labels.person]\nthreshold = 0.75\n"
                 "[trigger.labels.speech]\ncooldown_seconds = 5\n"
                 "[trigger.labels.alarm]\nenabled = false\n"
                 "[trigger.labels.glass]\nthreshold = 0.9\n")
    labels = config_mod.load(f, env={}).trigger.labels
    default = config_mod.TriggerSection().labels
    # person keeps its own defaults (priority 1, cooldown 30), not LabelRule's generic ones
    assert labels["person"] == dataclasses.replace(default["person"], threshold=0.75)
    assert labels["speech"] == dataclasses.replace(default["speech"], cooldown_seconds=5.0)
    assert "alarm" not in labels  # switched off, explicitly
    assert labels["glass"] == config_mod.LabelRule(threshold=0.9)  # a new label: rule defaults
    # a key set against the label's defaults is still validated (release above threshold)
    f.write_text("[trigger.labels.person]\nrelease = 0.8\n")
    with pytest.raises(ConfigError, match=r"trigger\.labels\.person"):
        config_mod.load(f, env={})


def test_labels_must_be_output_by_a_configured_model() -> None:
    cfg = config_mod.build_from_dict(
        {"trigger": {"labels": {"persn": {"threshold": 0.7}}}}, source="c.toml")
    outputs = {"vision model person@1.0.0": ("no_person", "person"),
               "audio model sound@1.0.0": ("background", "speech", "alarm")}
    with pytest.raises(ConfigError) as err:
        config_mod.check_labels(cfg, outputs)
    line = err.value.message
    assert "\n" not in line and "c.toml" in line and "trigger.labels.persn" in line
    assert "person@1.0.0: no_person, person" in line and "speech" in line
    assert err.value.fix and "enabled = false" in err.value.fix
    config_mod.check_labels(config_mod.build_from_dict({}, source="defaults"), outputs)


@pytest.mark.parametrize("command", ["replay", "run"])
def test_run_and_replay_refuse_a_misspelt_label_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sample_recording: Path, command: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n'
                 f'[camera]\nsource = "{sample_recording / "video.avi"}"\n'
                 '[uplink]\nmode = "local-only"\n'
                 "[trigger.labels.persn]\nthreshold = 0.7\n")
    tail = ([str(sample_recording), "--report", str(tmp_path / "r"), "--no-progress"]
            if command == "replay" else ["--seconds", "5"])
    assert main(["--config", str(f), command, *tail]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "trigger.labels.persn" in err
    assert "no_person, person" in err and "background, speech, alarm" in err
    message = err[err.index("edgekeeper: error: "):]  # after run's "gate loaded" log lines
    assert message.count("\n") == 2 and "\n  fix: " in message  # the error line and its fix
    assert not (tmp_path / "r").exists()

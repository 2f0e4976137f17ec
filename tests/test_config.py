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
    # A label table given in the file replaces the default set of rules.
    assert set(cfg.trigger.labels) == {"person"}
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

"""The learning loop wired end to end (docs/model-updates.md): an accepted retrain candidate is
built, signed with the cloud's real release key and published into a real SQLite store
(``cloud retrain --publish``); with the key offline only the unsigned release is written.

Parts that retrain need TensorFlow (the ``train`` extra) and skip cleanly without it; the
publishing and the device side run on a copy of a shipped model folder in every CI job.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from edgekeeper import config as config_mod
from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.retrain_cli import publish_candidate
from edgekeeper.protocol.release import RELEASE_FILE, verify

MODELS = Path(config_mod.MODELS_DIR)


def candidate_like(tmp_path: Path, model: str = "person") -> Path:
    """A folder in a retrain candidate's layout: a copy of the shipped model and the
    ``retrain.json`` the round writes (its parent and scope are what the builder reads)."""
    out = tmp_path / f"{model}-fleet-cand"
    shutil.copytree(MODELS / model, out)
    parent = json.loads((MODELS / model / "manifest-int8.json").read_text())["version"]
    (out / "retrain.json").write_text(json.dumps({"parent": parent, "scope": "fleet"}))
    return out


@pytest.fixture
def cloud_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config_mod.Config:
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(tmp_path / "cloud"))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    return config_mod.load(None)


def test_publish_candidate_signs_and_publishes_to_the_canary_stage(
    cloud_config: config_mod.Config, tmp_path: Path
) -> None:
    cand = candidate_like(tmp_path)

    async def go() -> tuple[object, list[object]]:
        store = await open_store("sqlite", cloud_config.cloud_data_dir)
        try:
            done = await publish_candidate(store, cloud_config, cand)
            return done, list(await store.releases("person"))
        finally:
            await store.close()

    done, releases = asyncio.run(go())
    assert done.stage == "canary" and done.version == "1.2.0" and done.scope == "fleet"
    [record] = releases
    assert (record.version, record.stage) == ("1.2.0", "canary")
    # Signed by the cloud's own key: the public half devices pin verifies it.
    pub = bytes.fromhex((cloud_config.cloud_data_dir / "keys" / "release-sign.pub")
                        .read_text().strip())
    body = verify((done.folder / RELEASE_FILE).read_bytes(), pub)
    assert body.tag == "person@1.2.0" and str(body.scope) == "fleet"
    assert (cloud_config.cloud_data_dir / "releases" / "person" / "1.2.0" / RELEASE_FILE).is_file()


def test_publish_candidate_with_the_key_offline_writes_the_unsigned_release(
    cloud_config: config_mod.Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgekeeper.cloud.keys import CloudKeys
    from edgekeeper.cloud.retrain_cli import print_published

    CloudKeys.ensure(cloud_config.cloud_data_dir)
    key = cloud_config.cloud_data_dir / "keys" / "release-sign.key"
    offline = tmp_path / "usb-release-sign.key"
    shutil.move(key, offline)  # the operator keeps the key on a USB stick
    cand = candidate_like(tmp_path)

    async def go() -> tuple[object, list[object]]:
        store = await open_store("sqlite", cloud_config.cloud_data_dir)
        try:
            return await publish_candidate(store, cloud_config, cand), list(
                await store.releases("person"))
        finally:
            await store.close()

    done, releases = asyncio.run(go())
    assert done.stage is None and releases == []
    assert (done.folder / "release.unsigned.json").is_file()
    assert not (done.folder / RELEASE_FILE).exists()
    print_published(done)
    printed = capsys.readouterr().out
    assert f"edgekeeper cloud release sign {done.folder} --key PATH" in printed
    assert f"edgekeeper cloud release publish {done.folder}" in printed
    # The two printed steps finish it: sign with the key file alone, then publish here.
    from edgekeeper.cli import main

    assert main(["cloud", "release", "sign", str(done.folder), "--key", str(offline)]) == 0
    assert main(["cloud", "release", "publish", str(done.folder)]) == 0

    async def stages() -> list[str]:
        store = await open_store("sqlite", cloud_config.cloud_data_dir)
        try:
            return [r.stage for r in await store.releases("person")]
        finally:
            await store.close()

    assert asyncio.run(stages()) == ["canary"]

"""A wrong ANTHROPIC_API_KEY, as an operator meets it: the REAL anthropic SDK against the fake
Messages API on 127.0.0.1 answering 401. The worker stops with one log line carrying the fix,
records the refusal in the store, the ingest's /healthz answers 503 with the reason,
`edgekeeper cloud status` shows it, a worker started with the right key clears it, and
`edgekeeper demo` prints the key's fix (not "a longer --timeout")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
from edgekeeper.cloud.reasoners.base import ProviderRefused
from edgekeeper.cloud.worker import Worker

from cloudkit import Cloud, running_cloud
from fake_anthropic import FakeAnthropic

KEY = "fake-key-provider-refused-0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as server:
        yield server


def reasoner(fake: FakeAnthropic, key: str) -> AnthropicReasoner:
    cfg = config_mod.build_from_dict(
        {"reasoner": {"transcriber": "none", "max_retries": 0}}, source="test")
    return AnthropicReasoner(config=cfg, environ={"ANTHROPIC_API_KEY": key,
                                                  "ANTHROPIC_BASE_URL": fake.url})


async def health(cloud: Cloud) -> tuple[int, dict[str, Any]]:
    async with cloud.session.get(f"{cloud.url}/healthz") as resp:
        return resp.status, await resp.json()


async def test_a_refused_key_stops_the_worker_and_shows_in_healthz_and_status(
    tmp_path: Path, fake: FakeAnthropic, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudkit import make_event

    async with running_cloud(tmp_path) as cloud:
        device = await cloud.enroll("pi-key")
        status, _, _ = await cloud.post_envelope(device.seal(make_event("pi-key", 1)))
        assert status == 202
        assert (await health(cloud))[0] == 200

        wrong = reasoner(fake, KEY + "-wrong")
        worker = Worker(queue=cloud.queue, store=cloud.store, reasoner=wrong, keys=cloud.keys)
        with capture_logs() as logs, pytest.raises(ProviderRefused, match="refused the API key"):
            await worker.run(burst=True)
        await wrong.close()
        assert fake.answered(401), "the SDK never reached the fake"
        refused = [e for e in logs if e["event"] == "worker.provider_refused"]
        assert len(refused) == 1 and "check ANTHROPIC_API_KEY" in refused[0]["fix"]
        assert KEY not in json.dumps(logs, default=str)
        # The event was put back untouched, for the worker that has the right key.
        assert (await cloud.queue.stats()).ready == 1

        code, doc = await health(cloud)
        assert code == 503 and doc["status"] == "unavailable"
        assert doc["checks"]["provider"].startswith("refused: provider refused the API key")
        assert "check ANTHROPIC_API_KEY" in doc["checks"]["provider"]
        assert doc["checks"]["store"] == "ok" and doc["checks"]["queue"] == "ok"

        monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(cloud.data_dir))
        monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
        code_s = await asyncio.to_thread(main, ["cloud", "status"])
        out = capsys.readouterr().out
        assert code_s == 0 and "provider: REFUSED" in out and "check ANTHROPIC_API_KEY" in out
        code_s = await asyncio.to_thread(main, ["cloud", "status", "--json"])
        prov = json.loads(capsys.readouterr().out)["provider"]
        assert prov["state"] == "refused" and prov["worker"] == worker.consumer

        # The operator fixes the key and restarts: the new worker asks the provider first,
        # clears the refusal, and reasons about the event that waited.
        right = reasoner(fake, KEY)
        try:
            stats = await Worker(queue=cloud.queue, store=cloud.store, reasoner=right,
                                 keys=cloud.keys).run(burst=True)
        finally:
            await right.close()
        assert stats.done == 1
        code, doc = await health(cloud)
        assert (code, doc["checks"]["provider"]) == (200, "ok")
        assert (await cloud.store.provider_state()).state == "ok"  # type: ignore[union-attr]


@contextlib.contextmanager
def fake_in_a_thread(api_key: str) -> Iterator[str]:
    """The fake on a loop of its own, for a command that runs its own asyncio.run."""
    loop = asyncio.new_event_loop()
    fake = FakeAnthropic(api_key=api_key)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-anthropic", daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield fake.url
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.mark.slow
def test_the_demo_names_the_key_when_the_provider_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_in_a_thread(KEY) as url:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY + "-wrong")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
        monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
        code = main(["demo", "--workdir", str(tmp_path / "demo"), "--timeout", "60"])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "check ANTHROPIC_API_KEY" in err
    assert "--timeout" not in err and "Traceback" not in err

"""Prometheus metrics as a scraper reads them: `GET /metrics` of a real ingest on 127.0.0.1
after real uploads, a real `edgekeeper cloud worker --metrics-port` process, and a worker asking
the real anthropic SDK (against the fake Messages API) for its tokens and cost; every page is
parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgekeeper import config as config_mod
from edgekeeper import metrics as metrics_mod
from edgekeeper.cloud.budget import Budget, utc_day
from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.worker import Worker
from edgekeeper.metrics import WorkerMetrics
from edgekeeper.protocol.keys import DeviceKeys, b64e

from cloudkit import Device, make_event, running_cloud, until
from fake_anthropic import FakeAnthropic

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


async def test_ingest_metrics_count_real_uploads_refusals_and_polls(tmp_path: Path) -> None:
    async with running_cloud(tmp_path) as cloud:
        a = await cloud.enroll("pi-a")
        b = await cloud.enroll("pi-b")
        envelopes = [a.seal(make_event("pi-a", 1)), a.seal(make_event("pi-a", 2)),
                     b.seal(make_event("pi-b", 1))]
        for env in envelopes:
            assert (await cloud.post_envelope(env))[0] == 202
        assert (await cloud.post_envelope(envelopes[0]))[0] == 200  # a retry: duplicate
        stranger = Device("pi-stranger", DeviceKeys.generate(), a.cloud)
        status, body, _ = await cloud.post_envelope(stranger.seal(make_event("pi-stranger", 1)))
        assert (status, body["error"]["code"]) == (401, "unknown_device")
        status, body, _ = await cloud.post_envelope(b"{}", content_type="application/json")
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
        async with cloud.session.post(f"{cloud.url}/v1/enroll", json={
                "token": "nope", "device_id": "pi-c", "sign_pk": b64e(b"\0" * 32),
                "box_pk": b64e(b"\0" * 32)}) as resp:
            assert resp.status in (400, 401)
            refused_enroll = (await resp.json())["error"]["code"]

        # A results long-poll held open shows while it waits.
        query = "wait=3"
        headers = a.signed("GET", "/v1/results", query)
        poll = asyncio.create_task(cloud.session.get(f"{cloud.url}/v1/results?{query}",
                                                     headers=headers))
        url = f"{cloud.url}/metrics"

        async def polling() -> bool:
            return value(await scrape(cloud.session, url),
                         "edgekeeper_ingest_results_polls_open") == 1

        await until(polling)
        samples = await scrape(cloud.session, url)
        async with await poll as resp:  # nothing for pi-a: it ends empty after its wait
            assert resp.status == 200 and (await resp.json())["results"] == []
        assert value(await scrape(cloud.session, url),
                     "edgekeeper_ingest_results_polls_open") == 0

        assert value(samples, "edgekeeper_ingest_events_total", status="queued") == 3
        assert value(samples, "edgekeeper_ingest_events_total", status="duplicate") == 1
        assert value(samples, "edgekeeper_ingest_event_bytes_total") == sum(map(len, envelopes))
        assert value(samples, "edgekeeper_ingest_refused_total", reason="unknown_device") == 1
        assert value(samples, "edgekeeper_ingest_refused_total",
                     reason="unsupported_media_type") == 1
        assert value(samples, "edgekeeper_ingest_refused_total", reason=refused_enroll) == 1
        assert value(samples, "edgekeeper_ingest_enrollments_total", outcome="enrolled") == 2
        assert value(samples, "edgekeeper_ingest_queue_events", state="ready") == 3
        assert value(samples, "edgekeeper_ingest_queue_events", state="dead") == 0
        assert value(samples, "edgekeeper_ingest_queue_oldest_seconds") > 0
        assert value(samples, "edgekeeper_ingest_uploads_inflight") == 0
        # Six uploads answered; each has its latency observed under its route.
        assert value(samples, "edgekeeper_ingest_request_seconds_count", route="/v1/events") == 6
        assert value(samples, "edgekeeper_ingest_request_seconds_bucket", route="/v1/events",
                     le="+Inf") == 6
        assert value(samples, "edgekeeper_ingest_request_seconds_sum", route="/v1/events") > 0
        # Enrolled devices come from the cache; the stranger is read from the store once.
        assert value(samples, "edgekeeper_ingest_registry_lookups_total", result="hit") >= 4
        assert value(samples, "edgekeeper_ingest_registry_lookups_total", result="miss") == 1
        assert cloud.server.state.registry.store_reads == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


async def test_cloud_worker_serves_its_metrics_on_127_0_0_1(tmp_path: Path) -> None:
    async with running_cloud(tmp_path) as cloud:
        device = await cloud.enroll("pi-w")
        for seq in (1, 2, 3):
            assert (await cloud.post_envelope(device.seal(make_event("pi-w", seq))))[0] == 202
        data_dir = cloud.data_dir
    port = free_port()
    env = {**os.environ, "EDGEKEEPER_CLOUD_DATA_DIR": str(data_dir),
           "EDGEKEEPER_REASONER": "echo", "EDGEKEEPER_LOG_FORMAT": "json"}
    env.pop("EDGEKEEPER_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekeeper.cli", "cloud", "worker", "--metrics-port", str(port),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        samples: Samples = {}
        while time.monotonic() < deadline:
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            try:
                samples = parse(await asyncio.to_thread(get_text, url))
            except OSError:
                samples = {}
            if value(samples, "edgekeeper_worker_events_reasoned_total", reasoner="echo",
                     label="person", path="primary") == 3:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"3 events were not reasoned in time: {samples}")
        assert value(samples, "edgekeeper_worker_reason_seconds_count", reasoner="echo") == 3
        assert value(samples, "edgekeeper_worker_provider", edgekeeper_worker_provider="ok") == 1
        assert value(samples, "edgekeeper_worker_failures_total", kind="crashed") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    lines = [json.loads(ln) for ln in stderr.decode().splitlines() if ln.startswith("{")]
    # Bound to loopback by default; each finished event logged at INFO with its timing.
    assert any(e["event"] == "metrics.listening" and e["url"] == url for e in lines)
    done = [e for e in lines if e["event"] == "worker.reasoned"]
    assert sorted(e["seq"] for e in done) == [1, 2, 3]
    assert all(e["level"] == "info" and e["reasoner"] == "echo" and e["ms"] >= 0 for e in done)


async def test_worker_metrics_count_llm_tokens_and_cost(tmp_path: Path) -> None:
    key = "fake-key-metrics-0123456789"
    async with running_cloud(tmp_path) as cloud, FakeAnthropic(api_key=key) as fake:
        device = await cloud.enroll("pi-t")
        for seq in (1, 2):
            assert (await cloud.post_envelope(device.seal(make_event("pi-t", seq))))[0] == 202
        cfg = config_mod.build_from_dict(
            {"reasoner": {"transcriber": "none", "max_retries": 0}}, source="test")
        claude = AnthropicReasoner(config=cfg, environ={"ANTHROPIC_API_KEY": key,
                                                        "ANTHROPIC_BASE_URL": fake.url})
        metrics = WorkerMetrics()
        worker = Worker(queue=cloud.queue, store=cloud.store, reasoner=claude, keys=cloud.keys,
                        budget=Budget(cfg.budget, cloud.store), metrics=metrics)
        try:
            stats = await worker.run(burst=True)
        finally:
            await claude.close()
        async with metrics_mod.serve(metrics.registry, 0, service="test") as url:
            assert url is not None and url.startswith("http://127.0.0.1:")
            samples = await scrape(cloud.session, url)
        billed = await cloud.store.usage_totals(day=utc_day(time.time()))
    assert stats.done == 2 and len(fake.answered(200)) == 2
    name = claude.name
    assert value(samples, "edgekeeper_worker_events_reasoned_total", reasoner=name,
                 label="person", path="primary") == 2
    assert value(samples, "edgekeeper_worker_reason_seconds_count", reasoner=name) == 2
    # What the provider billed, by kind, as the store's usage rows have it.
    tokens = {dict(labels)["kind"]: v for (n, labels), v in samples.items()
              if n == "edgekeeper_worker_llm_tokens_total"}
    assert tokens["cache_write"] > 0 and tokens["cache_read"] > 0 and tokens["output"] > 0
    assert sum(tokens.values()) == billed.tokens
    cost = value(samples, "edgekeeper_worker_llm_cost_usd_total", reasoner=name)
    assert cost > 0 and cost == stats.cost_usd
    assert cost == pytest.approx(billed.cost_usd)
    # The same, by device (capped at MAX_DEVICES series; the store keeps every device).
    assert value(samples, "edgekeeper_worker_llm_device_tokens_total", device="pi-t") == \
        billed.tokens
    assert value(samples, "edgekeeper_worker_llm_device_cost_usd_total", device="pi-t") == \
        pytest.approx(billed.cost_usd)
    capped = WorkerMetrics()
    assert [capped.device(f"d{i}") for i in range(metrics_mod.MAX_DEVICES + 2)][-2:] == \
        ["other", "other"]
    assert capped.device("d0") == "d0"


@pytest.mark.slow
async def test_edgekeeper_run_serves_the_device_metrics(
    tmp_path: Path, sample_recording: Path
) -> None:
    from edgekeeper.device import identity

    state = tmp_path / "state"
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        f'[device]\nid = "cam-metrics"\nstate_dir = "{state}"\n'
        f'[camera]\nsource = "{sample_recording / "video.avi"}"\n'
        '[microphone]\nenabled = false\n'
        '[trigger]\nk = 1\nn = 1\n[trigger.labels.person]\nthreshold = 0.0\nrelease = 0.0\n'
        '[event]\npost_roll_seconds = 0.5\n[results]\npoll_wait_seconds = 1.0\n')
    async with running_cloud(tmp_path) as cloud:
        await identity.enroll(cloud.url, await cloud.token(), device_id="cam-metrics",
                              state_dir=state)
        port = free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKEEPER_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "run",
            "--metrics-port", str(port), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        worker_stop = asyncio.Event()
        worker = asyncio.create_task(Worker(
            queue=cloud.queue, store=cloud.store, reasoner=EchoReasoner(), keys=cloud.keys,
            poll_s=0.05).run(stop=worker_stop))
        samples: Samples = {}

        async def settled() -> bool:
            nonlocal samples
            assert proc.returncode is None, (await proc.communicate())[1].decode()[-3000:]
            try:
                samples = parse(await asyncio.to_thread(get_text, url))
            except OSError:
                return False
            return (value(samples, "edgekeeper_device_uploads_total", outcome="delivered") >= 1
                    # the echo reasoner's answers are provisional, and say so
                    and value(samples, "edgekeeper_device_results_total", label="person",
                              provisional="true") >= 1)

        try:
            await until(settled, timeout=90, every=0.2)
        except TimeoutError:
            raise AssertionError(f"no result came back: {samples}") from None
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            worker_stop.set()
            await worker
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert value(samples, "edgekeeper_device_windows_total", modality="video") > 0
    assert value(samples, "edgekeeper_device_inferences_total", modality="video") > 0
    assert value(samples, "edgekeeper_device_gate_seconds_count", modality="video") > 0
    assert value(samples, "edgekeeper_device_gate_seconds_sum", modality="video") > 0
    assert value(samples, "edgekeeper_device_gate_seconds_bucket", modality="video",
                 le="+Inf") == value(samples, "edgekeeper_device_gate_seconds_count",
                                     modality="video")
    assert value(samples, "edgekeeper_device_triggers_total", label="person") >= 1
    assert value(samples, "edgekeeper_device_events_total") >= 1
    assert value(samples, "edgekeeper_device_bytes_sent_total") > 0  # a delivered envelope
    assert value(samples, "edgekeeper_device_event_bytes_total") > 0
    assert value(samples, "edgekeeper_device_outbox_quota_bytes") > 0
    assert ("edgekeeper_device_outbox_events", frozenset({("state", "pending")})) in samples
    # The camera's state and the model each gate runs; a disabled microphone has no series.
    assert ("edgekeeper_device_source_up", frozenset({("source", "camera")})) in samples
    assert not any(name == "edgekeeper_device_source_up" and ("source", "microphone") in labels
                   for name, labels in samples)
    shipped = json.loads((Path(__file__).parent.parent / "models" / "person"
                          / "manifest-int8.json").read_text())
    assert value(samples, "edgekeeper_device_model_info", modality="vision", model="person",
                 version=shipped["version"]) == 1.0
    # The same numbers the run's own report gives (counted once, read twice).
    assert value(samples, "edgekeeper_device_windows_total", modality="video") <= report["frames"]
    assert report["frames_scored"] >= value(samples, "edgekeeper_device_inferences_total",
                                            modality="video")

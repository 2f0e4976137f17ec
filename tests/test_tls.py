"""The link over HTTPS: the real ingest terminating TLS itself with a certificate from a private
CA (trustme), a device that trusts that CA through ``uplink.ca_file``: enrollment, uploads and
results all verify the server; without the CA, enrollment refuses the server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import trustme
from test_results import publish, result
from test_uplink import DEVICE, capture, device_config, make_uplink, opened_outbox, start_cloud

from edgekeeper.cloud.enroll import issue_token
from edgekeeper.device import identity
from edgekeeper.device.outbox import OutboxSink
from edgekeeper.device.results import ResultActions, ResultsClient
from edgekeeper.errors import ConfigError
from edgekeeper.tls import client_context, server_context


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(files["cert"]), append=i > 0)
    return files


async def test_enroll_upload_and_results_over_https_with_a_private_ca(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    cloud = await start_cloud(tmp_path / "cloud", tls_cert_file=str(pki["cert"]),
                              tls_key_file=str(pki["key"]))
    try:
        assert cloud.url.startswith("https://127.0.0.1:")
        config = device_config(tmp_path, uplink={"ca_file": str(pki["ca"])})
        state = config.device.state_dir

        # The system's CAs alone do not know this cloud: enrollment refuses it.
        untrusting = device_config(tmp_path / "other")
        with pytest.raises(identity.CloudUnreachable, match=r"(?i)certificate"):
            await identity.enroll(cloud.url, await issue_token(cloud.store, ttl_s=60,
                                                               now=time.time()),
                                  device_id=DEVICE, state_dir=untrusting.device.state_dir,
                                  ca_file=untrusting.uplink.ca_file)

        token = await issue_token(cloud.store, ttl_s=60, now=time.time())
        enrollment = await identity.enroll(cloud.url, token, device_id=DEVICE, state_dir=state,
                                           ca_file=config.uplink.ca_file)
        assert enrollment.cloud_url == cloud.url

        outbox = await opened_outbox(config)
        seqs = await capture(OutboxSink(outbox), 3)
        async with make_uplink(config, outbox, enrollment) as up:
            report = await up.run_burst(give_up_after=5)
        assert report.delivered == 3 and await cloud.queued() == [(DEVICE, s) for s in seqs]

        await publish(cloud, result(seqs[0]))
        actions = ResultActions.from_config(config)
        keys = await asyncio.to_thread(identity.load_keys, state)
        async with ResultsClient(
            actions, keys=keys, device_id=DEVICE, cloud_url=cloud.url,
            cloud_box_pk=enrollment.cloud.box_pk, section=config.results,
            ssl_context=client_context(config.uplink.ca_file),
        ) as rc:
            polled = await rc.poll_once()
        assert (polled.handled, polled.acked) == (1, 1)
        await actions.close()
    finally:
        await cloud.close()


def test_tls_settings_that_cannot_work_are_refused_with_the_file_named(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    with pytest.raises(ConfigError, match=r"ca_file .*missing\.pem does not exist"):
        client_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"junk\.pem holds no usable CA certificate"):
        client_context(str(junk))
    with pytest.raises(ConfigError, match="must be set together"):
        server_context(str(pki["cert"]), "")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        server_context(str(pki["cert"]), str(pki["ca"]))  # a certificate is not its key
    assert client_context("") is None and server_context("", "") is None

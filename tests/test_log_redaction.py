"""Secrets are redacted by exact field name; counts that merely contain "token" are not."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from edgekeeper import log


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """The real pipeline (processors, JSON renderer) writing to a buffer; restored afterwards."""
    buffer = io.StringIO()
    log.configure("info", "json", stream=buffer)
    try:
        yield buffer
    finally:
        log.configure("warning", "json")  # what conftest's session fixture set


def _records(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_secret_fields_are_redacted(lines: io.StringIO) -> None:
    log.get_logger("test").info(
        "enroll.requested",
        token="tok-123",
        enrollment_token="tok-456",
        api_key="fake-provider-key-1",
        Authorization="Bearer fake-provider-key-1",
        password="hunter2",
        private_key="k" * 64,
    )
    (record,) = _records(lines)
    for name in ("token", "enrollment_token", "api_key", "Authorization", "password",
                 "private_key"):
        assert record[name] == log.REDACTED, name
    assert "fake-provider-key-1" not in lines.getvalue()
    assert "hunter2" not in lines.getvalue()


def test_token_counts_and_other_fields_are_kept(lines: io.StringIO) -> None:
    log.get_logger("test").info(
        "worker.event_done",
        input_tokens=1200,
        output_tokens=80,
        max_tokens=1024,
        cache_read_tokens=0,
        token_ttl_seconds=3600,
        device_id="cam-1",
        seq=7,
    )
    (record,) = _records(lines)
    assert record["input_tokens"] == 1200
    assert record["output_tokens"] == 80
    assert record["max_tokens"] == 1024
    assert record["cache_read_tokens"] == 0
    assert record["token_ttl_seconds"] == 3600
    assert (record["device_id"], record["seq"]) == ("cam-1", 7)


def test_bound_context_is_redacted_too(lines: io.StringIO) -> None:
    log.bind_context(api_key="fake-provider-key-2")
    try:
        log.get_logger("test").info("test.bound")
    finally:
        structlog.contextvars.unbind_contextvars("api_key")
    (record,) = _records(lines)
    assert record["api_key"] == log.REDACTED


"""`edgekeeper demo` end to end: the README's first command, on the bundled sample."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgekeeper.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # No LLM here: without a key the demo's worker uses the offline teacher.
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--timeout", "90"]) == 0
    out = capsys.readouterr().out
    events = int(re.search(r"events sent\s+(\d+)", out).group(1))
    results = int(re.search(r"results received\s+(\d+)", out).group(1))
    assert events >= 2  # the sample has a person, speech and an alarm
    assert results == events
    assert "offline:" in out and "provisional" in out  # never mistaken for an LLM's answer
    sent, streamed = (int(x.replace(",", "")) for x in
                      re.search(r"bytes off the device ([\d,]+) vs streaming everything ([\d,]+)",
                                out).groups())
    assert 0 < sent < streamed
    # The device's result log holds each result once.
    lines = (tmp_path / "demo" / "device" / "results.jsonl").read_text().splitlines()
    assert len(lines) == results

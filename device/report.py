"""Replay reports: report.json for machines, report.html (with plots) for people.

Plots (matplotlib, the ``report`` extra): per recording, the gate's score over time for each
triggering label with its threshold and release lines and the moments it fired or was held back;
and the bytes that left the device against streaming everything. Without matplotlib the HTML
still carries every number and says how to get the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from edgekeeper.config import Config
from edgekeeper.device.replay import ReplayResult


def _plot_png(result: ReplayResult, config: Config) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timeline = result.stats.timeline
    labels = [lb for lb in config.trigger.labels if any(lb in s for _, _, s in timeline)]
    rows = max(1, len(labels)) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.2 * rows), squeeze=False)
    truth = result.recording.labels or []
    for ax, label in zip(axes[:-1, 0], labels, strict=False):
        rule = config.trigger.labels[label]
        pts = [(t, s[label]) for t, _, s in timeline if label in s]
        for r in truth:
            if r["label"] == label:
                ax.axvspan(r["start"], r["end"], color="tab:green", alpha=0.12, lw=0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, color="tab:blue", label="score")
        ax.axhline(rule.threshold, color="tab:red", ls="--", lw=1, label="threshold")
        ax.axhline(rule.release, color="tab:orange", ls=":", lw=1, label="release")
        for d in result.stats.decisions:
            if d["label"] != label:
                continue
            if d["action"] == "fire":
                ax.axvline(d["t"], color="tab:red", lw=2)
            elif d["action"] == "hold":
                ax.axvline(d["t"], color="grey", lw=1, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=7, ncol=3)
    axes[-2, 0].set_xlabel("media time (s)   green: labelled truth, red bar: trigger, grey: held")
    ax = axes[-1, 0]
    sent = result.stats.event_bytes
    stream = result.streaming_bytes
    ax.barh(["sent (events)", "streaming everything"], [max(sent, 1), max(stream, 1)],
            color=["tab:green", "tab:grey"])
    ax.set_xscale("log")
    ax.set_xlabel("bytes leaving the device (log scale)")
    for y, v in enumerate([sent, stream]):
        ax.text(max(v, 1), y, f" {v:,} B", va="center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return json.dumps(v) if isinstance(v, (dict, list)) else str(v)

    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(text(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def write_report(results: list[ReplayResult], config: Config, out_dir: Path) -> dict[str, Path]:
    """Write report.json and report.html into ``out_dir`` (atomically); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": 1,
        "config": config.source,
        "runs": [
            {
                **r.summary(),
                "decisions": r.stats.decisions,
                "events": r.events,
            }
            for r in results
        ],
    }
    sections = []
    for r in results:
        s = r.summary()
        png = _plot_png(r, config)
        plot = (
            '<img alt="scores over time" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">'
            if png
            else "<p><em>Plots need matplotlib: pip install 'edgekeeper[report]'.</em></p>"
        )
        metrics = "".join(
            f"<h3>{html.escape(label)}</h3>{_table(m)}" for label, m in s.pop("metrics").items()
        ) or "<p>No ground-truth labels given (replay --labels FILE).</p>"
        sections.append(
            f"<section><h2>{html.escape(str(r.recording.path))}</h2>{plot}"
            f"<h3>Summary</h3>{_table(s)}<h3>Gate quality</h3>{metrics}</section>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>edgekeeper replay report</title>"
        "<style>body{font:14px sans-serif;max-width:1000px;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}"
        "</style><h1>edgekeeper replay report</h1>" + "".join(sections)
    )
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    for key, content in (("json", json.dumps(data, indent=2, sort_keys=True)), ("html", page)):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths

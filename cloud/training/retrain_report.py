"""report.html of a retrain round: the decision, the figures and plots before and after.

Plots need matplotlib (the ``report`` extra, part of ``train``); without it the page says so.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.device.report import _img, _png, pyplot

SETS = {"scope_heldout": "scope held-out examples", "recipe_heldout": "recipe held-out set"}


def _scores_figure(plt: Any, scores: dict[str, dict[str, np.ndarray]],
                   sets: dict[str, Any], labels: Sequence[str], thr: dict[str, float]) -> Any:
    """Per set: the highest triggering-label score of rows whose target is not that label
    (what makes false triggers), before and after, with the thresholds."""
    fig, axes = plt.subplots(1, len(SETS), figsize=(11, 3.4))
    for ax, name in zip(axes, SETS, strict=True):
        y = sets[name][1]
        for when, color in (("before", "tab:red"), ("after", "tab:blue")):
            p = scores[when][name]
            if not len(p):
                continue
            worst = np.full(len(y), 0.0)
            for i, lab in enumerate(labels):
                if lab in thr:
                    worst = np.where(y != i, np.maximum(worst, p[:, i]), worst)
            ax.hist(worst, bins=np.linspace(0, 1, 41), alpha=0.55, color=color, label=when)
        for lab, t in thr.items():
            ax.axvline(t, color="grey", ls="--", lw=0.8)
            ax.text(t, ax.get_ylim()[1] * 0.9, f" {lab}", fontsize=7, color="grey")
        ax.set_title(f"{SETS[name]}: wrong-label score", fontsize=9)
        ax.set_xlabel("highest score of a label that is not the target")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bars_figure(plt: Any, metrics: dict[str, dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = list(SETS)
    xs = np.arange(len(names))
    for ax, key, title in ((axes[0], "false_trigger_rate", "false triggers per row"),
                           (axes[1], "recall", "recall")):
        for j, (when, color) in enumerate((("before", "tab:red"), ("after", "tab:blue"))):
            vals = [metrics[when][n].get(key) or 0.0 for n in names]
            ax.bar(xs + (j - 0.5) * 0.38, vals, 0.38, color=color, label=when)
            for x0, v in zip(xs, vals, strict=True):
                ax.text(x0 + (j - 0.5) * 0.38, v, f"{v:.3f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(xs, [SETS[n] for n in names], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(path: Path, report: dict[str, Any], scores: dict[str, dict[str, np.ndarray]],
          sets: dict[str, Any], labels: Sequence[str], thr: dict[str, float]) -> None:
    plt = pyplot()
    if plt is None:
        plots = "<p>Plots are missing: install the <code>report</code> extra (matplotlib).</p>"
    else:
        plots = (_img(_png(_scores_figure(plt, scores, sets, labels, thr), plt),
                      "score distributions before and after")
                 + _img(_png(_bars_figure(plt, report["metrics"]), plt),
                        "false triggers and recall before and after"))
    d = report["decision"]
    rows = []
    for name, title in SETS.items():
        for when in ("before", "after"):
            m = report["metrics"][when][name]
            rows.append(
                f"<tr><td>{title}</td><td>{when}</td><td>{m['rows']}</td>"
                f"<td>{m['false_triggers']}</td><td>{m.get('false_triggers_per_hour', '-')}</td>"
                f"<td>{m['recall']}</td><td>{html.escape(json.dumps(m['recall_by_label']))}"
                "</td></tr>"
            )
    verdict = "accepted" if d["accepted"] else "not accepted"
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>retrain {html.escape(report['model'])}@{html.escape(report['version'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}
td,th{{border:1px solid #ccc;padding:2px 6px}} table{{border-collapse:collapse}}
img.plot{{max-width:100%}}</style></head><body>
<h1>Retrain {html.escape(report['model'])} {html.escape(report['parent_version'])} &rarr;
{html.escape(report['version'])} ({html.escape(report['scope'])})</h1>
<p><b>{verdict}</b>: {html.escape(d['reason'])} (margin {d['margin']}, recall tolerance
{d['recall_tolerance']})</p>
<p>Examples: {report['examples']['read']} read, {len(report['examples']['train_ids'])} trained on
{html.escape(json.dumps(report['examples']['train_by_label']))},
{len(report['examples']['heldout_ids'])} held out (by time); rehearsal rows
{report['rehearsal']['rows']}; skipped {html.escape(json.dumps(report['examples']['skipped']))}.
Before: {html.escape(report['evaluated']['before'])}; after:
{html.escape(report['evaluated']['after'])}.</p>
<table><tr><th>set</th><th></th><th>rows</th><th>false triggers</th><th>per hour</th>
<th>recall</th><th>recall by label</th></tr>{''.join(rows)}</table>
{plots}
</body></html>
"""
    path.write_text(page, encoding="utf-8")

"""Replay reports: report.json for machines, report.html for people.

report.json holds the effective configuration (per-label threshold, release and cooldown, k-of-n,
pre-gate and event settings) and, per recording, the counts, the gate metrics, every trigger
decision, every event and the model files that ran (variant, sha256).

report.html shows the same, readable: per recording, each label's score over time (linear, 0 to 1)
with its threshold and release, the labelled truth, the triggers and the hold-backs; an events
table with key-frame thumbnails (embedded, each linked to its full-size frame beside the report)
and the rule that fired; the bytes sent against streaming everything (linear, from 0); gate
quality; then the configuration and model files. Plots need matplotlib (the ``report`` extra);
without it the page says so and how to get them, and still carries every number.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from edgekeeper.config import Config
from edgekeeper.device.manifest import Manifest
from edgekeeper.device.replay import ReplayResult

SCHEMA = 2  # 2: "config" is the effective config (was the file name); runs carry "gates"

PLOTS_MISSING = (
    "Plots are missing: matplotlib is not installed. They come with the <code>report</code> "
    "extra: <code>pip install -e '.[report]'</code> in a checkout, or "
    "<code>pip install 'edgekeeper[report]'</code>; then replay again."
)

_esc = html.escape


# -- what the report records ------------------------------------------------------------------
def effective_config(config: Config) -> dict[str, Any]:
    """The settings that decide what a replay does, after defaults, file and environment.

    Only the device pipeline's sections: the camera's source (a URL may carry credentials) and
    the uplink/cloud sections (keys, addresses) stay out of a report people pass around.
    """
    return {
        "source": config.source,
        "gate": dataclasses.asdict(config.gate),
        "pregate": dataclasses.asdict(config.pregate),
        "trigger": dataclasses.asdict(config.trigger),
        "event": dataclasses.asdict(config.event),
        "camera": {"fps": config.camera.fps},
        "microphone": {"block_seconds": config.microphone.block_seconds},
    }


def decision_rule(decision: dict[str, Any]) -> str:
    """Which trigger rule a decision came from, in a word or two (device/trigger.py)."""
    action, reason = decision.get("action"), str(decision.get("reason", ""))
    if action == "fire":
        return "k-of-n over threshold"
    if action == "hold":
        # The trigger names the rule that held it back in its reason (cooldown, hourly cap, or
        # a run of hits too short for min_span_seconds: one short sound).
        if "cooldown" in reason:
            return "cooldown"
        if "cap" in reason:
            return "hourly cap"
        if "min_span" in reason:
            return "too short (min span)"
        return "held back"
    if action == "release":
        return "release (hysteresis)"
    return str(action)


# -- units --------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """Decimal units, 3 significant digits: 960198 -> '960 KB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}" if v < 100 else (
                f"{v:.0f} {unit}"
            )
    return f"{n:.0f} B"


def _tick_bytes(v: float) -> str:
    """Axis ticks: round values without trailing zeros (1 MB, 2.5 MB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:g} {unit}"
    return f"{v:g} B"


def fmt_ms(v: float) -> str:
    return f"{v:.2f} ms" if v < 1 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def fmt_s(v: float) -> str:
    return f"{v:.1f} s"


def fmt_share(v: float | None) -> str:
    """A ratio as a percentage; a dash when undefined (nothing to divide by)."""
    if v is None:
        return "–"
    pct = 100.0 * v
    return f"{pct:.0f} %" if pct in (0.0, 100.0) or pct >= 99.95 else f"{pct:.1f} %"


def fmt_num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# Readable names for config keys; the value's unit comes from the key's suffix (_fmt_setting).
_SETTING_NAMES = {
    "motion": "Motion pre-gate",
    "motion_method": "Motion method",
    "motion_width": "Motion measured at width",
    "motion_pixel_threshold": "Pixel counts as changed above",
    "motion_min_area": "Motion when changed area exceeds",
    "max_skip_seconds": "Model runs at least every",
    "energy": "Audio energy pre-gate",
    "energy_threshold_dbfs": "Audio quieter than this skips the model",
    "vision_model": "Vision model",
    "audio_model": "Audio model",
    "variant": "Built-in model variant",
    "num_threads": "Threads per interpreter",
    "pre_roll_seconds": "Pre-roll",
    "post_roll_seconds": "Post-roll",
    "key_frames": "Key frames per event",
    "jpeg_width": "JPEG width",
    "jpeg_quality": "JPEG quality",
    "include_frames": "Events carry frames",
    "include_audio": "Events carry audio",
    "include_features": "Events carry gate features",
    "thumbnails_only": "Thumbnails only",
    "thumbnail_width": "Thumbnail width",
    "fps": "Camera frames per second kept",
    "block_seconds": "Microphone block",
}


def _fmt_setting(key: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.endswith("_seconds"):
            return f"{value:g} s"
        if key.endswith("_dbfs"):
            return f"{value:g} dBFS"
        if key.endswith("_width"):
            return f"{value} px"
        if key == "motion_min_area":
            return f"{100 * value:g} % of pixels"
        if key == "motion_pixel_threshold":
            return f"{value} grey levels"
        if key == "fps":
            return "every frame" if value == 0 else f"{value:g}"
    return fmt_num(value)


def _setting_name(key: str) -> str:
    return _SETTING_NAMES.get(key) or key.replace("_", " ").capitalize()


# -- plots --------------------------------------------------------------------------------------
def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None without the ``report`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig: Any | None, plt: Any) -> bytes | None:
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def scores_figure(plt: Any, result: ReplayResult, config: Config) -> Any | None:
    """One row per triggering label: score, threshold, release, truth, triggers, hold-backs."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    timeline = result.stats.timeline
    labels = [lb for lb in sorted(config.trigger.labels) if any(lb in s for _, _, s in timeline)]
    if not labels:
        return None
    duration = max(result.recording.duration, result.stats.media_seconds, 1.0)
    truth = result.recording.labels or []
    decisions = result.stats.decisions
    height = 0.55 + 1.75 * len(labels)
    fig, axes = plt.subplots(len(labels), 1, figsize=(11, height), sharex=True, squeeze=False)
    for ax, label in zip(axes[:, 0], labels, strict=True):
        rule = config.trigger.labels[label]
        for r in truth:
            if r["label"] == label:
                ax.axvspan(r["start"], r["end"], color="tab:green", alpha=0.15, lw=0)
        pts = [(t, s[label]) for t, _, s in timeline if label in s]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color="tab:blue")
        ax.axhline(rule.threshold, color="tab:red", ls="--", lw=1)
        ax.axhline(rule.release, color="tab:orange", ls=":", lw=1.2)
        for d in decisions:
            if d["label"] == label and d["action"] == "fire":
                ax.axvline(d["t"], color="tab:red", lw=2)
            elif d["label"] == label and d["action"] == "hold":
                ax.axvline(d["t"], color="dimgrey", lw=1.2, ls="-.")
        ax.set_xlim(0, duration)
        ax.set_ylim(0, 1.05)  # linear from 0; a little headroom so a score of 1 stays visible
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("score")
        ax.set_title(
            f"{label}   threshold {rule.threshold:g}, release {rule.release:g}, "
            f"cooldown {rule.cooldown_seconds:g} s",
            loc="left", fontsize=10,
        )
    axes[-1, 0].set_xlabel("media time (s)")
    handles: list[Any] = [
        Line2D([], [], color="tab:blue", lw=1.2, label="gate score"),
        Line2D([], [], color="tab:red", ls="--", lw=1, label="threshold"),
        Line2D([], [], color="tab:orange", ls=":", lw=1.2, label="release"),
        Line2D([], [], color="tab:red", lw=2, label="trigger fired"),
    ]
    if any(d["action"] == "hold" for d in decisions):
        handles.append(Line2D([], [], color="dimgrey", ls="-.", lw=1.2, label="held back"))
    if truth:
        handles.append(Patch(color="tab:green", alpha=0.15, label="labelled truth"))
    # The legend sits above the plots, outside every axis, so it hides no curve.
    top = 1 - 0.42 / height
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def bytes_figure(plt: Any, result: ReplayResult) -> Any:
    """Sent against streaming everything, on a linear axis from 0 (lengths compare honestly)."""
    from matplotlib.ticker import FuncFormatter

    sent, stream = result.stats.event_bytes, result.streaming_bytes
    fig, ax = plt.subplots(figsize=(11, 1.7))
    ax.barh([1, 0], [stream, sent], color=["tab:grey", "tab:green"], height=0.6)
    ax.set_yticks([1, 0], ["streaming everything", "sent as events"])
    ax.set_xlim(0, max(stream, sent, 1) * 1.3)  # room for the value printed after each bar
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_bytes(v)))
    ax.set_xlabel("bytes leaving the device")
    ax.grid(axis="x", alpha=0.3)
    ax.text(stream, 1, f"  {fmt_bytes(stream)}", va="center", fontsize=9)
    share = f" ({fmt_share(sent / stream)} of streaming)" if stream else ""
    ax.text(sent, 0, f"  {fmt_bytes(sent)}{share}", va="center", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode()
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


# -- HTML pieces ----------------------------------------------------------------------------------
def _table(
    head: Iterable[str], rows: Iterable[Iterable[str]], num: Iterable[int] = (), cls: str = ""
) -> str:
    """Cells are HTML already (escape before); ``num`` columns are right-aligned."""
    nums = set(num)
    th = "".join(f'<th{" class=num" if i in nums else ""}>{h}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(
            f'<td{" class=num" if i in nums else ""}>{c}</td>' for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(rows: Iterable[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="pairs">{cells}</table>'


def _rel_link(target: Path, out_dir: Path) -> str | None:
    """A URL to ``target`` relative to the report, or None when the file is not there."""
    if not target.is_file():
        return None
    rel = os.path.relpath(target.resolve(), out_dir.resolve())
    return quote(Path(rel).as_posix())


def _model_names(gates: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{g['tag']} ({g['variant'] or 'manifest ' + Path(g['manifest']).name})"
        for g in gates.values()
    )


def _kpis(r: ReplayResult) -> str:
    s = r.stats
    holds = [decision_rule(d) for d in s.decisions if d["action"] == "hold"]
    why = ", ".join(f"{holds.count(rule)} by {rule}" for rule in sorted(set(holds)))
    share = (
        f"{fmt_share(s.event_bytes / r.streaming_bytes)} of streaming everything"
        if r.streaming_bytes
        else "nothing to compare with"
    )
    cards = [
        ("Media duration", fmt_s(max(r.recording.duration, s.media_seconds)), ""),
        ("Events", str(s.events), f"{s.events_lost} lost" if s.events_lost else ""),
        ("Held back", str(len(holds)), why or "by cooldown, hourly cap or min span"),
        ("Bytes sent", fmt_bytes(s.event_bytes), share),
    ]
    return '<div class="kpis">' + "".join(
        f'<div class="kpi"><span>{_esc(k)}</span><b>{_esc(v)}</b><small>{_esc(note)}</small></div>'
        for k, v, note in cards
    ) + "</div>"


def _events_table(r: ReplayResult, config: Config, out_dir: Path) -> str:
    if not r.events:
        return "<p class=muted>No event fired in this recording.</p>"
    rows = []
    for e in r.events:
        d = e.get("decision") or {}
        seq = e["seq"]
        folder = r.events_dir / f"{seq:010d}" if r.events_dir is not None else None
        thumbs = []
        times = e.get("frame_times") or []
        for i, jpeg in enumerate(r.thumbnails.get(seq, [])):
            at = f" at {fmt_s(times[i])}" if i < len(times) else ""
            img = (
                f'<img class="thumb" alt="event {seq} key frame {i + 1}{at}" title="key frame '
                f'{i + 1}{at}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
            )
            link = _rel_link(folder / f"frame-{i}.jpg", out_dir) if folder else None
            thumbs.append(f'<a href="{link}">{img}</a>' if link else img)
        if e.get("audio_seconds"):
            link = _rel_link(folder / "audio.wav", out_dir) if folder else None
            audio = f"{fmt_s(e['audio_seconds'])} audio"
            thumbs.append(f'<a class="audio" href="{link}">{audio}</a>' if link else audio)
        rule = config.trigger.labels.get(e["label"])
        reason = _esc(str(d.get("reason", "")).replace(">=", "≥"))
        cooldown = (
            f"<br><small>then no {_esc(e['label'])} event for {rule.cooldown_seconds:g} s "
            "(cooldown)</small>"
            if rule is not None
            else ""
        )
        score = d.get("score")
        peak = (e.get("scores") or {}).get(e["label"])
        rows.append([
            str(seq),
            f"{fmt_s(e['trigger_t'])}<br><small>clip {e['start_t']:.1f}–{e['end_t']:.1f} s"
            "</small>",
            f"{_esc(e['label'])}<br><small>{_esc(e['modality'])}</small>",
            (f"{score:.2f}" if isinstance(score, (int, float)) else "–")
            + (f"<br><small>peak {peak:.2f}</small>" if isinstance(peak, (int, float)) else ""),
            f'<span class="fire">{_esc(decision_rule(d))}</span><br><small>{reason}</small>'
            + cooldown,
            fmt_bytes(e.get("payload_bytes", 0)),
            "".join(thumbs) or "<small class=muted>no frames</small>",
        ])
    return _table(
        ["#", "Time", "Label", "Score", "Decision that fired", "Bytes", "Key frames"],
        rows, num=(0, 5), cls="events",
    )


def _decisions_table(r: ReplayResult) -> str:
    ds = r.stats.decisions
    if not ds:
        return ""
    counts = {a: sum(1 for d in ds if d["action"] == a) for a in ("fire", "hold", "release")}
    rows = [
        [
            fmt_s(d["t"]),
            _esc(d["label"]),
            f'<span class="{_esc(d["action"])}">{_esc(d["action"])}</span>',
            _esc(decision_rule(d)),
            f"{d['score']:.2f}",
            f"{d['hits']} of {d['n']} ≥ {d['threshold']:g}",
            f"<small>{_esc(str(d['reason']).replace('>=', '≥'))}</small>",
        ]
        for d in ds
    ]
    table = _table(["Time", "Label", "Action", "Rule", "Score", "Windows ≥ threshold",
                    "Why"], rows, num=(4,), cls="decisions")
    summary = (
        f"All trigger decisions ({counts['fire']} fired, {counts['hold']} held back, "
        f"{counts['release']} released)"
    )
    opened = " open" if len(ds) <= 12 else ""
    return f"<details{opened}><summary>{summary}</summary>{table}</details>"


def _quality_table(r: ReplayResult) -> str:
    if not r.metrics:
        if r.recording.labels is None:
            return (
                "<p class=muted>No ground truth given, so no precision or recall: pass "
                "<code>--labels FILE</code> or put a <code>labels.json</code> in the recording "
                "folder.</p>"
            )
        return "<p class=muted>None of the triggering labels was scored.</p>"
    rows = [
        [
            _esc(label),
            f"{m['threshold']:g}",
            str(m["windows"]),
            fmt_share(m["window_precision"]),
            fmt_share(m["window_recall"]),
            str(m["labelled_ranges"]),
            str(m["triggers"]),
            fmt_share(m["event_precision"]),
            fmt_share(m["event_recall"]),
            "–" if m["triggers_per_hour"] is None else f"{m['triggers_per_hour']:.1f}",
        ]
        for label, m in r.metrics.items()
    ]
    table = _table(
        ["Label", "Threshold", "Scored windows", "Window precision", "Window recall",
         "Labelled ranges", "Triggers", "Event precision", "Event recall", "Triggers / hour"],
        rows, num=range(1, 10), cls="quality",
    )
    return table + (
        "<p class=muted><small>Window: a scored window at or above the threshold, counted right "
        "when it lies inside a labelled range. Event: a trigger, counted right when it falls in a "
        "labelled range or its post-roll; recall is the share of ranges that got one.</small></p>"
    )


def _counts_table(r: ReplayResult) -> str:
    s = r.stats
    rows = [("Recording", f"<code>{_esc(str(r.recording.path))}</code>"),
            ("Models", _esc(_model_names(r.gates) or "none"))]
    if s.frames or r.recording.video is not None:
        rows.append((
            "Video frames",
            f"{s.frames} read: {s.frames_scored} scored by the gate, {s.frames_spared} spared "
            f"by the pre-gate, {s.frames_dropped} dropped",
        ))
    if s.audio_blocks or r.recording.audio is not None:
        rows.append((
            "Audio",
            f"{s.audio_blocks} blocks read ({s.audio_dropped} dropped); {s.audio_windows} "
            f"windows: {s.audio_scored} scored by the gate, {s.audio_spared} spared by the "
            "pre-gate",
        ))
    for modality, v in s.latencies_ms.items():
        if v:
            lat = s.as_dict()["gate_latency_ms"][modality]
            rows.append((
                f"Gate latency ({modality})",
                f"median {fmt_ms(lat['p50'])}, 99th percentile {fmt_ms(lat['p99'])} over "
                f"{lat['n']} inferences (this machine)",
            ))
    ratio = f" = {fmt_share(s.event_bytes / r.streaming_bytes)}" if r.streaming_bytes else ""
    events = f"{s.events} event{'' if s.events == 1 else 's'}"
    rows.append((
        "Bytes leaving the device",
        f"{fmt_bytes(s.event_bytes)} in {events}{ratio} of the {fmt_bytes(r.streaming_bytes)} "
        "that streaming everything would send",
    ))
    return _pairs(rows)


def _config_section(config: Config, results: list[ReplayResult]) -> str:
    eff = effective_config(config)
    trig = eff["trigger"]
    source = eff["source"]
    parts = [
        "<h2>Effective configuration</h2>",
        "<p>From <code>" + _esc(source) + "</code>" + (" (built-in defaults)" if source ==
                                                        "defaults" else "")
        + ", after environment overrides; all of it is in <code>report.json</code>.</p>",
        "<h3>Trigger</h3>",
        f"<p>A label fires when <b>{trig['k']} of its last {trig['n']}</b> scored windows reach "
        f"its threshold (k-of-n); it stays active until fewer than {trig['k']} reach its "
        "release (hysteresis); after an event, no new one for that label during its cooldown. "
        f"At most <b>{trig['max_events_per_hour']} events per hour</b> across labels.</p>",
        _table(
            ["Label", "Threshold", "Release", "Cooldown", "Priority (outbox)"],
            [
                [_esc(label), f"{rule['threshold']:g}", f"{rule['release']:g}",
                 f"{rule['cooldown_seconds']:g} s", str(rule["priority"])]
                for label, rule in sorted(trig["labels"].items())
            ],
            num=(1, 2, 3, 4),
        ),
    ]
    columns = []
    for title, keys in (("Pre-gate", ("pregate",)), ("Events", ("event",)),
                        ("Gate and sources", ("gate", "camera", "microphone"))):
        pairs = _pairs(
            (_setting_name(k), _esc(_fmt_setting(k, v)))
            for key in keys
            for k, v in eff[key].items()
        )
        columns.append(f"<div><h3>{title}</h3>{pairs}</div>")
    parts.append('<div class="cols">' + "".join(columns) + "</div>")
    seen: set[tuple[str, str]] = set()
    rows = []
    for r in results:
        for modality, g in r.gates.items():
            for f in g["files"]:
                if (modality, f["sha256"]) in seen:
                    continue
                seen.add((modality, f["sha256"]))
                rows.append([
                    _esc(modality),
                    _esc(g["tag"]),
                    _esc(g["variant"] or "from manifest"),
                    f'<code title="{_esc(f["path"])}">{_esc(Path(f["path"]).name)}</code>'
                    f"<br><small>{_esc(f['role'])}</small>",
                    fmt_bytes(f["bytes"]),
                    f'<code title="{_esc(f["sha256"])}">{_esc(f["sha256"][:16])}…</code>',
                ])
    if rows:
        parts.append("<h3>Model files</h3><p>What the gates ran (full paths and SHA-256 in "
                     "<code>report.json</code>):</p>")
        parts.append(_table(["Modality", "Model", "Variant", "File", "Size", "SHA-256"], rows,
                            num=(4,)))
    return "<section>" + "".join(parts) + "</section>"


_CSS = """
body{font:14px/1.45 "DejaVu Sans",system-ui,sans-serif;color:#1d232a;max-width:1140px;
  margin:24px auto;padding:0 20px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:34px 0 4px;border-top:2px solid #e3e7ec;padding-top:18px}
h3{font-size:15px;margin:22px 0 8px}
.muted,small{color:#5b6673}
code{font-size:12px;background:#f3f5f7;padding:0 3px;border-radius:3px;white-space:nowrap}
table{border-collapse:collapse;width:100%;margin:4px 0}
th,td{border-bottom:1px solid #e3e7ec;padding:5px 8px;text-align:left;vertical-align:top}
thead th{background:#f5f7f9;font-weight:600}
table.pairs th{width:40%;font-weight:600;background:none}
.cols{display:grid;grid-template-columns:repeat(3,1fr);gap:22px}
.cols table.pairs th{width:58%}
.num{text-align:right;font-variant-numeric:tabular-nums}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.kpi{border:1px solid #e3e7ec;border-radius:6px;padding:8px 14px;min-width:170px}
.kpi span{font-size:12px;color:#5b6673}.kpi b{display:block;font-size:21px}
.kpi small{display:block;font-size:12px}
.notice{background:#fff6e0;border:1px solid #f0c36d;border-radius:6px;padding:10px 14px}
img.plot{max-width:100%;display:block;margin:4px 0}
img.thumb{width:120px;border-radius:3px;margin:0 4px 4px 0;vertical-align:top}
a.audio{display:inline-block;margin-top:2px}
.fire{color:#b42318;font-weight:600}.hold{color:#52606d;font-weight:600}
.release{color:#9a6700}
details summary{cursor:pointer;margin:6px 0}
"""


def render_html(results: list[ReplayResult], config: Config, out_dir: Path) -> str:
    plt = pyplot()
    sections = []
    for r in results:
        if plt is not None:
            scores = _img(_png(scores_figure(plt, r, config), plt), "gate score over time")
            sent = _img(_png(bytes_figure(plt, r), plt), "bytes sent against streaming everything")
        else:
            scores = sent = ""
        sections.append(
            "<section>"
            f"<h2>{_esc(r.recording.path.name or str(r.recording.path))}</h2>"
            f"<div class=muted><code>{_esc(str(r.recording.path))}</code> · models "
            f"{_esc(_model_names(r.gates) or 'none')}</div>"
            + _kpis(r)
            + ("<h3>Gate score over time</h3>" + scores if scores else "")
            + f"<h3>Events ({len(r.events)})</h3>" + _events_table(r, config, out_dir)
            + _decisions_table(r)
            + ("<h3>Bytes leaving the device</h3>" + sent if sent else "")
            + "<h3>Counts and timings</h3>" + _counts_table(r)
            + "<h3>Gate quality against the labels</h3>" + _quality_table(r)
            + "</section>"
        )
    notice = "" if plt is not None else f'<p class="notice">{PLOTS_MISSING}</p>'
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>edgekeeper replay report</title><style>{_CSS}</style>"
        "<h1>edgekeeper replay report</h1>"
        f"<div class=muted>{len(results)} recording{'s' if len(results) != 1 else ''} through "
        "the device loop · config <code>" + _esc(config.source) + "</code></div>"
        + notice + "".join(sections) + _config_section(config, results)
    )


def write_report(results: list[ReplayResult], config: Config, out_dir: Path) -> dict[str, Path]:
    """Write report.json and report.html into ``out_dir`` (each atomically); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": SCHEMA,
        "config": effective_config(config),
        "runs": [
            {
                **r.summary(),
                "gates": r.gates,
                "decisions": r.stats.decisions,
                "events": r.events,
            }
            for r in results
        ],
    }
    page = render_html(results, config, out_dir)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    for key, content in (("json", json.dumps(data, indent=2, sort_keys=True)), ("html", page)):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths


# -- replay --compare ----------------------------------------------------------------------------
# The two sides keep one colour each everywhere: curves, fire marks and the tables' headings.
_SIDE_COLOURS = {"A": "tab:blue", "B": "tab:orange"}
COMPARE_SCHEMA = 1


# What the compare report reads of device/compare.py's Candidate and Comparison. Protocols, so
# this module does not import compare.py (which imports it to write the report: no cycle).
class CompareSide(Protocol):
    @property
    def side(self) -> str: ...
    @property
    def arg(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def manifest(self) -> Manifest: ...
    @property
    def release(self) -> dict[str, Any] | None: ...
    @property
    def modality(self) -> str: ...
    def to_json(self) -> dict[str, Any]: ...


class ComparisonView(Protocol):
    @property
    def a(self) -> CompareSide: ...
    @property
    def b(self) -> CompareSide: ...
    @property
    def runs(self) -> dict[str, list[ReplayResult]]: ...
    @property
    def disagreements(self) -> list[list[dict[str, Any]]]: ...
    @property
    def totals(self) -> dict[str, dict[str, Any]]: ...
    @property
    def labels(self) -> set[str]: ...


def compare_scores_figure(plt: Any, ra: ReplayResult, rb: ReplayResult, config: Config,
                          labels: set[str]) -> Any | None:
    """One row per triggering label of the compared models: A's and B's scores over time, the
    threshold, the labelled truth and each side's triggers; linear axes from 0, legend above."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [lb for lb in sorted(config.trigger.labels) if lb in labels and any(
        lb in s for r in (ra, rb) for _, _, s in r.stats.timeline)]
    if not rows:
        return None
    duration = max(ra.recording.duration, ra.stats.media_seconds, rb.stats.media_seconds, 1.0)
    truth = ra.recording.labels or []
    height = 0.6 + 1.9 * len(rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, height), sharex=True, squeeze=False)
    for ax, label in zip(axes[:, 0], rows, strict=True):
        rule = config.trigger.labels[label]
        for span in truth:
            if span["label"] == label:
                ax.axvspan(span["start"], span["end"], color="tab:green", alpha=0.15, lw=0)
        for side, run in (("A", ra), ("B", rb)):
            pts = [(t, s[label]) for t, _, s in run.stats.timeline if label in s]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2,
                    color=_SIDE_COLOURS[side], alpha=0.9)
            for d in run.stats.decisions:
                if d["label"] == label and d["action"] == "fire":
                    ax.axvline(d["t"], color=_SIDE_COLOURS[side], lw=2.2,
                               ls="-" if side == "A" else (0, (3, 2)))
        ax.axhline(rule.threshold, color="tab:red", ls="--", lw=1)
        ax.set_xlim(0, duration)
        ax.set_ylim(0, 1.05)  # linear from 0; headroom so a score of 1 stays visible
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("score")
        ax.set_title(f"{label}   threshold {rule.threshold:g}", loc="left", fontsize=10)
    axes[-1, 0].set_xlabel("media time (s)")
    handles: list[Any] = [
        Line2D([], [], color=_SIDE_COLOURS["A"], lw=1.2, label="A score"),
        Line2D([], [], color=_SIDE_COLOURS["B"], lw=1.2, label="B score"),
        Line2D([], [], color="tab:red", ls="--", lw=1, label="threshold"),
        Line2D([], [], color=_SIDE_COLOURS["A"], lw=2.2, label="A fired"),
        Line2D([], [], color=_SIDE_COLOURS["B"], lw=2.2, ls=(0, (3, 2)), label="B fired"),
    ]
    if truth:
        handles.append(Patch(color="tab:green", alpha=0.15, label="labelled truth"))
    top = 1 - 0.42 / height  # the legend sits above every axis, so it hides no curve
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def _side(side: str) -> str:
    return f'<span class="side side{side}">{side}</span>'


def _usd(v: float | None) -> str:
    if v is None:
        return "–"
    return f"${v:.4f}" if v < 1 else f"${v:.2f}"


def _delta(a: float | None, b: float | None, fmt: Any, *, better: str = "") -> str:
    """B minus A, signed, in the row's unit; blank when either side is undefined or equal.
    ``better`` ("higher" / "lower") colours a quality figure; counts, bytes and cost stay
    uncoloured: fewer events is only better when precision and recall hold."""
    if a is None or b is None or a == b:
        return ""
    d = b - a
    cls = ""
    if better:
        cls = ' class="better"' if (d > 0) == (better == "higher") else ' class="worse"'
    return f'<span{cls}>{"+" if d > 0 else "−"}{fmt(abs(d))}</span>'


def _compare_models(comp: ComparisonView) -> str:
    cards = []
    for cand in (comp.a, comp.b):
        runs = comp.runs[cand.side]
        gates = runs[0].gates.get(cand.modality, {}) if runs else {}
        files = "".join(
            f"<tr><td><code>{_esc(Path(f['path']).name)}</code> <small>{_esc(f['role'])}"
            f"</small></td><td class=num>{fmt_bytes(f['bytes'])}</td><td><code title="
            f"\"{_esc(f['sha256'])}\">{_esc(f['sha256'][:12])}…</code></td></tr>"
            for f in gates.get("files", [])
        )
        rel = cand.release
        release = ""
        if rel is not None:
            cls = "ok" if rel["signature_checked"] else "warn"
            release = (
                f"<p>Release <b>{_esc(rel['tag'])}</b> (scope {_esc(rel['scope'])}, trained "
                f"from {_esc(str(rel['parent'] or 'nothing'))}): {rel['files_verified']} files "
                f"match their sha256; <span class={cls}>{_esc(rel['signature'])}</span>.</p>"
            )
        cards.append(
            f'<div class="model">{_side(cand.side)} <b>{_esc(cand.manifest.tag)}</b> '
            f"<small>{_esc(cand.modality)} · {_esc(cand.kind)}</small>"
            f"<div><code>{_esc(cand.arg)}</code></div>{release}"
            f'<table class="files">{files}</table></div>'
        )
    return '<div class="models">' + "".join(cards) + "</div>"


def _compare_summary(comp: ComparisonView) -> str:
    ta, tb = comp.totals["A"], comp.totals["B"]
    ca, cb = ta["llm_cost"], tb["llm_cost"]
    rows: list[list[str]] = [
        ["Events (all labels)", str(ta["events"]), str(tb["events"]),
         _delta(ta["events"], tb["events"], lambda v: f"{v:g}")],
        ["Bytes that would leave",
         f"{fmt_bytes(ta['bytes_sent'])}<br><small>{fmt_share(ta['bytes_ratio'])} of "
         "streaming</small>",
         f"{fmt_bytes(tb['bytes_sent'])}<br><small>{fmt_share(tb['bytes_ratio'])} of "
         "streaming</small>",
         _delta(ta["bytes_sent"], tb["bytes_sent"], fmt_bytes)],
        [f"Estimated LLM cost<br><small>{_esc(ca['model'])}, {ca['events']} vs "
         f"{cb['events']} events</small>",
         f"{_usd(ca['usd'])}<br><small>{_usd(ca['usd_per_event'])} per event</small>",
         f"{_usd(cb['usd'])}<br><small>{_usd(cb['usd_per_event'])} per event</small>",
         _delta(ca["usd"], cb["usd"], _usd)],
    ]
    for label in sorted(comp.labels):
        ma, mb = ta["labels"].get(label), tb["labels"].get(label)
        if ma is None and mb is None:
            continue
        na, nb = ta["events_by_label"].get(label, 0), tb["events_by_label"].get(label, 0)
        rows.append([f"<b>{_esc(label)}</b> events", str(na), str(nb),
                     _delta(na, nb, lambda v: f"{v:g}")])
        for key, name, better in (
            ("event_precision", "precision (events)", "higher"),
            ("event_recall", "recall (labelled ranges hit)", "higher"),
            ("false_triggers_per_hour", "false triggers per hour", "lower"),
            ("window_precision", "window precision", "higher"),
            ("window_recall", "window recall", "higher"),
        ):
            va = None if ma is None else ma[key]
            vb = None if mb is None else mb[key]
            fmt: Any = (lambda v: f"{v:.1f}") if key.endswith("hour") else fmt_share
            rows.append([f"<b>{_esc(label)}</b> {name}",
                         "–" if va is None else fmt(va), "–" if vb is None else fmt(vb),
                         _delta(va, vb, fmt, better=better)])
    table = _table(["", _side("A"), _side("B"), "B − A"], rows, num=(1, 2, 3), cls="compare")
    note = ("" if any(t["labels"] for t in (ta, tb)) else
            "<p class=muted>No ground truth given, so no precision, recall or false triggers: "
            "pass <code>--labels FILE</code> or put a <code>labels.json</code> in the recording "
            "folder.</p>")
    return table + note + (
        "<p class=muted><small>Precision: the share of triggers inside a labelled range (or its "
        "post-roll); recall: the share of labelled ranges that got a trigger; false triggers: "
        "the others, per hour of media. LLM cost: an estimate of the cloud's request per event "
        "(key frames as images, the event as text, the cached system prompt; "
        "<code>device/cost.py</code>) priced from <code>[budget.prices]</code>.</small></p>"
    )


def _disagreement_table(comp: ComparisonView, index: int, out_dir: Path) -> str:
    rows_in = comp.disagreements[index]
    if not rows_in:
        return ("<p class=ok>They agree: every event of one has an event of the same label at "
                "the same moment in the other.</p>")
    rows = []
    for d in rows_in:
        run = comp.runs[d["fired"]][index]
        folder = run.events_dir / f"{d['seq']:010d}" if run.events_dir is not None else None
        thumbs = ""
        for i, jpeg in enumerate(run.thumbnails.get(d["seq"], [])):
            img = (f'<img class="thumb" alt="{d["fired"]} event {d["seq"]} key frame {i + 1}" '
                   f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">')
            link = _rel_link(folder / f"frame-{i}.jpg", out_dir) if folder else None
            thumbs += f'<a href="{link}">{img}</a>' if link else img
        held = (f"<br><small>held back: {_esc('; '.join(d['silent_held_back']))}</small>"
                if d["silent_held_back"] else "")
        peak = "no score" if d["silent_peak"] is None else f"peak {d['silent_peak']:.2f}"
        if d["truth"] is None:
            truth = "<small class=muted>not labelled</small>"
        else:
            truth = f"{_esc(d['truth'])}<br><small>{_side(d['right'])} is right</small>"
        score = d["score"]
        rows.append([
            f"{d['start']:.1f}–{d['end']:.1f} s<br><small>trigger {d['trigger_t']:.1f} s</small>",
            _esc(d["label"]),
            f"{_side(d['fired'])} fires<br><small>score {score:.2f}</small>"
            if isinstance(score, (int, float)) else f"{_side(d['fired'])} fires",
            f"{_side(d['silent'])} does not<br><small>{peak}</small>{held}",
            truth,
            thumbs or "<small class=muted>no frames</small>",
        ])
    return _table(["Moment", "Label", "Fires", "Silent", "Truth", "Key frames"], rows,
                  cls="events")


_COMPARE_CSS = """
.side{display:inline-block;min-width:1.4em;text-align:center;border-radius:3px;color:#fff;
  font-weight:700;padding:0 4px}
.sideA{background:#1f77b4}.sideB{background:#d46a00}
.models{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin:14px 0}
.model{border:1px solid #e3e7ec;border-radius:6px;padding:10px 14px}
.model p{margin:6px 0}
table.files td{border:none;padding:1px 8px 1px 0}
table.compare td:first-child{width:38%}
.better{color:#067647;font-weight:600}.worse{color:#b42318;font-weight:600}
.ok{color:#067647}.warn{color:#9a6700;font-weight:600}
"""


def _shown_config(comp: ComparisonView, config: Config) -> Config:
    """The config as both runs used it: the compared modality's model is A's or B's."""
    which = f"A or B ({comp.a.manifest.tag} / {comp.b.manifest.tag})"
    if comp.a.modality == "vision":
        return dataclasses.replace(config, gate=dataclasses.replace(config.gate,
                                                                    vision_model=which))
    return dataclasses.replace(config, gate=dataclasses.replace(config.gate, audio_model=which))


def render_compare_html(comp: ComparisonView, config: Config, out_dir: Path) -> str:
    plt = pyplot()
    sections = []
    for i, (ra, rb) in enumerate(zip(comp.runs["A"], comp.runs["B"], strict=True)):
        scores = ""
        if plt is not None:
            scores = _img(_png(compare_scores_figure(plt, ra, rb, config, comp.labels), plt),
                          "A's and B's gate scores over time")
        n = len(comp.disagreements[i])
        sections.append(
            "<section>"
            f"<h2>{_esc(ra.recording.path.name or str(ra.recording.path))}</h2>"
            f"<div class=muted><code>{_esc(str(ra.recording.path))}</code> · "
            f"{fmt_s(max(ra.recording.duration, ra.stats.media_seconds))} · A: {ra.stats.events}"
            f" events, B: {rb.stats.events} events</div>"
            + ("<h3>Scores over time</h3>" + scores if scores else "")
            + f"<h3>Where they disagree ({n})</h3>" + _disagreement_table(comp, i, out_dir)
            + "</section>"
        )
    notice = "" if plt is not None else f'<p class="notice">{PLOTS_MISSING}</p>'
    results = [*comp.runs["A"], *comp.runs["B"]]
    n_rec = len(comp.runs["A"])
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>edgekeeper replay: A against B</title><style>{_CSS}{_COMPARE_CSS}</style>"
        f"<h1>edgekeeper replay: {_side('A')} against {_side('B')}</h1>"
        f"<div class=muted>The same {'recording' if n_rec == 1 else f'{n_rec} recordings'}"
        " through the "
        f"same device loop and config (<code>{_esc(config.source)}</code>); only the "
        f"{_esc(comp.a.modality)} model differs.</div>"
        + notice + _compare_models(comp)
        + "<h2>Side by side</h2>" + _compare_summary(comp)
        + "".join(sections) + _config_section(_shown_config(comp, config), results)
    )


def _run_json(r: ReplayResult) -> dict[str, Any]:
    return {**r.summary(), "gates": r.gates, "decisions": r.stats.decisions, "events": r.events}


def write_compare_report(comp: ComparisonView, config: Config, out_dir: Path) -> dict[str, Path]:
    """report.json and report.html of ``replay --compare`` (device/compare.py's Comparison)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": COMPARE_SCHEMA,
        "kind": "replay-compare",
        "config": effective_config(_shown_config(comp, config)),
        "models": {"A": comp.a.to_json(), "B": comp.b.to_json()},
        "totals": comp.totals,
        "recordings": [
            {"recording": str(ra.recording.path), "A": _run_json(ra), "B": _run_json(rb),
             "disagreements": comp.disagreements[i]}
            for i, (ra, rb) in enumerate(zip(comp.runs["A"], comp.runs["B"], strict=True))
        ],
    }
    page = render_compare_html(comp, config, out_dir)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    for key, content in (("json", json.dumps(data, indent=2, sort_keys=True)), ("html", page)):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths

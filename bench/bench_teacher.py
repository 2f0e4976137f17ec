"""How right each teacher is, per label, on labelled real clips (issue 11: the teacher's
judgements become the gate's training labels).

    python bench/bench_teacher.py [--pocketsphinx] [--json]

The clips: edgekeeper.cloud.reasoners.teacher_accuracy.labelled_clips() -- Debian's freedesktop
sound theme and Asterisk prompts (English), chromium-bsu and frozen-bubble game music and
effects, generated noise ("tuning": the audio judge's rules were set looking at these), and the
held-out sources never looked at while tuning: the Yaru sound theme, the Spanish Asterisk
voice, singularity-music (apt-get install yaru-theme-sound asterisk-core-sounds-es-wav
singularity-music frozen-bubble-data chromium-bsu-data; missing optional ones are skipped and
named).

Offline teacher: each clip becomes a real 4 s WAV event with the gate label set to the clip's
true label and, in a second pass, to a wrong one, and goes through OfflineReasoner.reason (the
path the worker runs). Printed per split: the confusion matrix over speech / alarm / music /
background with per-label precision and recall; accuracy in the gate's vocabulary (music counts
as background: the gate has no music label); gate_correct accuracy and coverage (share of
events where the teacher gives an opinion) against the baseline measured in the same run, the
offline teacher before this judge (no opinion on alarms, speech only from a transcript); and
the judge's CPU time per clip as a ratio to the level summary every event already paid.

Claude: nothing here can measure its accuracy (there is no real model on this machine, and the
fake Messages API answers what it is told). The bench only checks that for every label the
request carries what Claude needs to judge it: the spectrogram PNG (its size) beside the level
and the transcript slot, and reports the image's pixel cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from edgekeeper.cloud.reasoners import teacher_accuracy as ta
from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
from edgekeeper.cloud.reasoners.audio_judge import judge_pcm
from edgekeeper.cloud.reasoners.media import audio_summary
from edgekeeper.cloud.reasoners.offline import GATE_VIEW, OfflineReasoner
from edgekeeper.cloud.reasoners.spectrogram import HEIGHT, WIDTH
from edgekeeper.cloud.reasoners.transcribe import make_transcriber
from edgekeeper.cloud.reasoners.weighting import training_weight
from edgekeeper.protocol.messages import EventBody

WRONG = {"speech": "alarm", "alarm": "speech", "music": "alarm", "background": "alarm"}


def event(clip: ta.Clip, gate_label: str, seq: int) -> EventBody:
    return EventBody(device_id="bench-pi", seq=seq, captured_at=1_790_000_000.0,
                     meta={"label": gate_label, "scores": {gate_label: 0.9}},
                     audio_wav=ta.to_wav(clip.pcm))


async def run_offline(clips: list[ta.Clip], pocketsphinx: bool) -> dict[str, Any]:
    transcriber = make_transcriber("pocketsphinx") if pocketsphinx else None
    teacher = OfflineReasoner(transcriber=transcriber)
    out: dict[str, Any] = {"teacher": teacher.name}
    try:
        for split in ("tuning", "heldout"):
            sub = [c for c in clips if c.heldout == (split == "heldout")]
            if not sub:
                continue
            labels, gate_ok, base_ok, opinions, base_opinions = [], 0, 0, 0, 0
            n_gate, kept, kept_ok = 0, 0, 0
            for seq, clip in enumerate(sub):
                for gate in (GATE_VIEW[clip.label], WRONG[clip.label]):
                    v = await teacher.reason(event(clip, gate, seq), model_version="sound@1")
                    if gate == GATE_VIEW[clip.label]:
                        labels.append(v.label)
                        if training_weight(v) > 0:  # what the retrain would keep
                            kept += 1
                            kept_ok += v.label == clip.label
                    truth = gate == GATE_VIEW[clip.label]
                    n_gate += 1
                    if v.gate_correct is not None:
                        opinions += 1
                        gate_ok += v.gate_correct == truth
                    # Baseline: the offline teacher before the audio judge. It judged speech
                    # events only, from a transcript (needs pocketsphinx), and nothing else.
                    transcript = (v.extra.get("audio") or {}).get("transcript")
                    if gate == "speech" and transcript is not None:
                        base_opinions += 1
                        base_ok += bool(transcript) == truth
            s = ta.score([c.label for c in sub], labels)
            gate_view = ta.score([GATE_VIEW[c.label] for c in sub],
                                 [GATE_VIEW.get(x, x) for x in labels],
                                 labels=("speech", "alarm", "background"))
            out[split] = {
                "clips": len(sub),
                "sources": sorted({c.source for c in sub}),
                "four_labels": s.as_dict(),
                "table": s.table(),
                "gate_vocabulary": gate_view.as_dict(),
                "gate_correct": {
                    "events": n_gate,
                    "coverage": round(opinions / n_gate, 3),
                    "accuracy_when_given": round(gate_ok / max(1, opinions), 3),
                    "baseline_coverage": round(base_opinions / n_gate, 3),
                    "baseline_accuracy_when_given": round(base_ok / max(1, base_opinions), 3),
                    "coverage_ratio_vs_baseline": (round(opinions / base_opinions, 2)
                                                   if base_opinions else None),
                },
                "training_weight": {"kept": round(kept / len(sub), 3),
                                    "accuracy_of_kept": round(kept_ok / max(1, kept), 3)},
                "wrong": [f"{c.source}/{c.name}: {c.label} -> {p}"
                          for c, p in zip(sub, labels, strict=True) if p != c.label],
            }
    finally:
        await teacher.close()
        if transcriber is not None:
            await transcriber.close()
    return out


def cpu_cost(clips: list[ta.Clip]) -> dict[str, Any]:
    """The judge's CPU per 4 s clip against the level summary (measured in the same run)."""
    wavs = [ta.to_wav(c.pcm) for c in clips[:40]]
    t0 = time.perf_counter()
    for w in wavs:
        audio_summary(w)
    base = (time.perf_counter() - t0) / len(wavs)
    t0 = time.perf_counter()
    for c in clips[:40]:
        judge_pcm(c.pcm, ta.RATE)
    judge = (time.perf_counter() - t0) / len(wavs)
    return {"summary_ms": round(base * 1e3, 2), "judge_ms": round(judge * 1e3, 2),
            "judge_vs_summary": round(judge / base, 1)}


async def claude_request(clips: list[ta.Clip]) -> dict[str, Any]:
    """What the request carries per label (no call is made: build_request only)."""
    r = AnthropicReasoner(environ={"ANTHROPIC_API_KEY": "bench-no-call",
                                   "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"},
                          transcriber=False)
    out: dict[str, Any] = {"image_pixels": [WIDTH, HEIGHT],
                           "image_tokens_estimate": round(WIDTH * HEIGHT / 750)}
    try:
        for label in ta.LABELS:
            clip = next(c for c in clips if c.label == label)
            req = await r.build_request(event(clip, GATE_VIEW[label], 1), model_version="s")
            blocks = req["messages"][0]["content"]
            pngs = [b for b in blocks if b["type"] == "image"
                    and b["source"]["media_type"] == "image/png"]
            text = blocks[-1]["text"]
            out[label] = {"spectrogram_blocks": len(pngs),
                          "png_base64_kb": round(len(pngs[0]["source"]["data"]) / 1024, 1)
                          if pngs else 0,
                          "level_in_text": "rms_dbfs" in text,
                          "spectrogram_described": '"spectrogram"' in text}
    finally:
        await r.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pocketsphinx", action="store_true",
                    help="give the offline teacher a PocketSphinx transcript (slower)")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    clips = ta.labelled_clips()
    missing = [f"{p} ({pkg})" for p, pkg in ta.PACKAGES.items() if not p.is_dir()]
    figures: dict[str, Any] = {"bench": "teacher", "date": time.strftime("%Y-%m-%d"),
                               "clips": len(clips), "missing_optional_sources": missing,
                               "build_s": round(time.perf_counter() - t0, 1)}
    figures["offline"] = asyncio.run(run_offline(clips, args.pocketsphinx))
    figures["cpu"] = cpu_cost(clips)
    figures["claude_request"] = asyncio.run(claude_request(clips))
    figures["claude_accuracy"] = ("not measurable here: no real model; the fake Messages API "
                                  "answers what it is told")
    if not args.json:
        for split in ("tuning", "heldout"):
            part = figures["offline"].get(split)
            if part is None:
                continue
            print(f"== offline teacher, {split} clips ({part['clips']}; "
                  f"{', '.join(part['sources'])})", file=sys.stderr)
            print(part["table"], file=sys.stderr)
            gv = part["gate_vocabulary"]
            print(f"gate vocabulary (music = background): accuracy {gv['accuracy']:.3f}",
                  file=sys.stderr)
            print(f"gate_correct: {part['gate_correct']}", file=sys.stderr)
            print(f"training_weight > 0: {part['training_weight']}", file=sys.stderr)
    for split in ("tuning", "heldout"):
        figures["offline"].get(split, {}).pop("table", None)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

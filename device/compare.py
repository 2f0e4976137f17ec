"""``replay --compare A B``: two models over the same recordings, one report side by side.

A and B are each a model manifest JSON, ``builtin:NAME[:int8|float]`` or a signed release
folder (``release.json`` and its files, protocol/release.py). Each replaces the configured model
of its modality (``gate.vision_model`` or ``gate.audio_model``); everything else (trigger rules,
pre-gates, events, the other modality's model) stays as configured. The runs are plain replays,
one after the other (A over every recording, then B), through ``replay_recording``: the very
same loop, so each side's results are exactly what ``edgekeeper replay`` gives with that model
configured (tests/test_replay_compare.py checks it).

What is compared: per label precision and recall, false triggers per hour, events, bytes that
would leave the device, the estimated LLM cost of those events (device/cost.py) and the moments
where one model fires and the other does not (``disagreements``). device/report.py writes the
report (``write_compare_report``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekeeper import config as config_mod
from edgekeeper.config import Config
from edgekeeper.device import cost
from edgekeeper.device.manifest import Manifest, load_manifest
from edgekeeper.device.replay import ReplayResult, replay_recording
from edgekeeper.errors import EdgekeeperError, InputError
from edgekeeper.protocol import release
from edgekeeper.protocol.keys import CloudPublicKeys

Side = Literal["A", "B"]
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Candidate:
    """One side of the comparison: what the user named and the manifest it comes down to."""

    side: Side
    arg: str
    kind: Literal["manifest", "builtin", "release"]
    manifest: Manifest
    # For a release folder: its tag, scope, dates, and how far it was checked.
    release: dict[str, Any] | None = None

    @property
    def modality(self) -> str:
        return self.manifest.modality

    @property
    def label(self) -> str:
        """How the report names it: ``A: person@1.1.0 (manifest-int8.json)``."""
        return f"{self.side}: {self.manifest.tag} ({self.manifest.path.name})"

    def to_json(self) -> dict[str, Any]:
        return {
            "argument": self.arg,
            "kind": self.kind,
            "modality": self.modality,
            "tag": self.manifest.tag,
            "manifest": str(self.manifest.path.resolve()),
            "labels": list(self.manifest.labels),
            "release": self.release,
        }


def _reword(err: EdgekeeperError) -> tuple[str, str | None]:
    """The message of ``err`` without the fix line its str() carries, and the fix."""
    return str(err).partition("\n  fix: ")[0], err.fix


def _arg_error(side: Side, arg: str, err: EdgekeeperError, fix: str | None = None) -> InputError:
    message, own_fix = _reword(err)
    return InputError(f"--compare {side} ({arg}): {message}", fix=fix or own_fix or (
        "give a model manifest JSON, builtin:NAME[:int8|float] or a release folder "
        "(docs/model-updates.md)"))


def load_release_key(path: Path | None, state_dir: Path) -> tuple[bytes | None, str]:
    """The release public key to check release folders with, and where it came from.

    ``--release-key FILE`` (64 hex digits, or a JSON of the cloud's public keys: the device's
    pinned ``cloud`` block, alone or inside enrollment.json) wins; else the key this device
    pinned when it enrolled; else none (signatures are then not checked, and the report says so).
    """
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--release-key {path}: cannot read it ({err})",
                             fix="give the file holding the cloud's release public key") from None
        if _HEX_KEY.match(text):
            return bytes.fromhex(text), f"--release-key {path}"
        try:
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("cloud"), dict):
                data = data["cloud"]  # an enrollment.json
            return CloudPublicKeys.from_json(data).release_pk, f"--release-key {path}"
        except ValueError as err:  # JSONDecodeError is a ValueError, so are bad keys
            raise InputError(
                f"--release-key {path} is neither 64 hex digits nor the cloud's public keys "
                f"as JSON ({err})",
                fix="pass the release public key as hex, or the device's pinned cloud keys JSON "
                '({"box_pk": ..., "release_pk": ...})',
            ) from None
    from edgekeeper.device import identity

    if (Path(state_dir) / identity.ENROLLMENT_FILE).is_file():
        pinned = identity.load_enrollment(state_dir).cloud.release_pk
        return pinned, f"this device's pinned key ({identity.ENROLLMENT_FILE} in its state dir)"
    return None, ""


def _unverified_body(data: bytes) -> release.ReleaseBody:
    """The body of a release.json whose signature cannot be checked (no key known)."""
    try:
        env = json.loads(data.decode("utf-8"))
        payload = base64.b64decode(str(env["payload"]), validate=True)
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        raise release.ReleaseRefused(
            "malformed", "release.json is not an edgekeeper DSSE envelope",
            fix="rebuild the release with edgekeeper cloud release (docs/model-updates.md)",
        ) from None
    return release.body_from_json(body)


def manifest_files(manifest: Manifest) -> list[Path]:
    """Every file a manifest makes the gate read: itself, its labels and its stage models."""
    files = [manifest.path]
    labels = json.loads(manifest.path.read_bytes()).get("labels")  # load_manifest checked it
    files.append(manifest.path.parent / str(labels))
    files += [s.model for s in manifest.stages]
    return files


def _open_release(folder: Path, release_pk: bytes | None, key_source: str
                  ) -> tuple[Manifest, dict[str, Any]]:
    path = folder / release.RELEASE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(
            f"folder {folder} has no {release.RELEASE_FILE}",
            fix="give a release folder (release.json and its files), a manifest JSON or "
            "builtin:NAME",
        ) from None
    if len(data) > release.MAX_RELEASE_BYTES:
        raise release.ReleaseRefused("malformed", f"{path} is over "
                                                  f"{release.MAX_RELEASE_BYTES} bytes")
    if release_pk is not None:
        body = release.verify(data, release_pk)
        signature = f"verified with release key {release.key_id(release_pk)} from {key_source}"
    else:
        body = _unverified_body(data)
        signature = ("signature not checked: no release key (pass --release-key FILE, or "
                     "replay on an enrolled device)")
    release.verify_files(body, folder)
    manifest = load_manifest(folder / body.entry)
    # The hashes cover the files release.json lists; the gate must read nothing else.
    listed = {(folder / f.path).resolve() for f in body.files}
    for used in manifest_files(manifest):
        if used.resolve() not in listed:
            raise release.ReleaseRefused(
                "file_mismatch", f"{used.name}, used by {body.entry}, is not among the files "
                "the release lists (its hash is not checked)",
                fix="rebuild the release so it lists every file the manifest uses",
            )
    if manifest.modality != body.input.modality:
        raise release.ReleaseRefused(
            "malformed", f"{body.entry} is a {manifest.modality} model; the release says "
            f"{body.input.modality}")
    info = {
        "tag": body.tag, "parent": body.parent, "scope": str(body.scope),
        "created_at": body.created_at, "expires_at": body.expires_at,
        "files_verified": len(body.files), "signature": signature,
        "signature_checked": release_pk is not None,
    }
    return manifest, info


def resolve(side: Side, arg: str, *, variant: str, release_pk: bytes | None = None,
            key_source: str = "") -> Candidate:
    """What ``--compare`` names, loaded and checked; a clear InputError naming the argument."""
    info = None
    try:
        if arg.startswith("builtin:"):
            kind: Literal["manifest", "builtin", "release"] = "builtin"
            _, name, *rest = arg.split(":")
            chosen = rest[0] if rest else variant
            if len(rest) > 1 or chosen not in ("int8", "float") or not name:
                raise InputError(f"--compare {side} ({arg}) is not builtin:NAME[:int8|float]",
                                 fix="e.g. builtin:person or builtin:person:float")
            path = config_mod.resolve_model(f"builtin:{name}", chosen)
            if not path.is_file() or (rest and path.name != f"manifest-{chosen}.json"):
                known = sorted(p.name for p in config_mod.MODELS_DIR.iterdir()
                               if any(p.glob("manifest*.json")))
                raise InputError(
                    f"--compare {side} ({arg}): there is no built-in model {name!r}"
                    + (f" in variant {chosen}" if path.is_file() else ""),
                    fix=f"built-in models: {', '.join(known)}; variants int8 and float",
                )
            manifest = load_manifest(path)
        elif Path(arg).expanduser().is_dir():
            kind = "release"
            manifest, info = _open_release(Path(arg).expanduser(), release_pk, key_source)
        else:
            kind = "manifest"
            manifest = load_manifest(Path(arg).expanduser())
    except InputError as err:  # ModelError (a manifest's problem) is one too
        if str(err).startswith(f"--compare {side}"):
            raise
        raise _arg_error(side, arg, err) from None
    except release.ReleaseRefused as err:
        if err.reason == "unknown_key":
            raise _arg_error(side, arg, err, fix="pass --release-key FILE with the public key "
                             "of the cloud that signed it") from None
        raise _arg_error(side, arg, err, fix=err.fix or (
            "the release's files differ from what it signed: fetch or rebuild the release, and "
            "never edit files inside it")) from None
    return Candidate(side, arg, kind, manifest, info)


def check_pair(a: Candidate, b: Candidate) -> None:
    if a.modality != b.modality:
        raise InputError(
            f"--compare A ({a.arg}) is a {a.modality} model and B ({b.arg}) a {b.modality} "
            "model: a comparison replaces one modality's model with each",
            fix="compare two vision models or two audio models",
        )


def candidate_config(config: Config, cand: Candidate) -> Config:
    """``config`` with the candidate's manifest as the model of its modality, nothing else."""
    path = str(cand.manifest.path)
    if cand.modality == "vision":
        gate = dataclasses.replace(config.gate, vision_model=path)
    else:
        gate = dataclasses.replace(config.gate, audio_model=path)
    return dataclasses.replace(config, gate=gate)


# -- what differs --------------------------------------------------------------------------------
def _overlaps(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 <= b1 and b0 <= a1


def disagreements(ra: ReplayResult, rb: ReplayResult, config: Config,
                  labels: set[str] | None = None) -> list[dict[str, Any]]:
    """Moments where one model's run has an event and the other's has none of the same label
    whose clip overlaps it. Each row: the clip's time range, who fired, the firing decision's
    score, the silent model's peak score over the same range and what it decided there, and
    the truth when the recording is labelled (the trigger inside a labelled range or its
    post-roll, as ``evaluate`` counts a true trigger)."""
    post = config.event.post_roll_seconds
    truth = ra.recording.labels
    rows = []
    for fired, silent, rf, rs in (("A", "B", ra, rb), ("B", "A", rb, ra)):
        for e in rf.events:
            label = e["label"]
            if labels is not None and label not in labels:
                continue
            start, end = float(e["start_t"]), float(e["end_t"])
            if any(o["label"] == label and _overlaps(start, end, o["start_t"], o["end_t"])
                   for o in rs.events):
                continue
            peaks = [s[label] for t, _, s in rs.stats.timeline
                     if label in s and start <= t <= end]
            held = sorted({d["reason"] for d in rs.stats.decisions
                           if d["label"] == label and d["action"] == "hold"
                           and start <= d["t"] <= end})
            t = float(e["trigger_t"])
            row: dict[str, Any] = {
                "label": label, "start": start, "end": end, "trigger_t": t,
                "fired": fired, "silent": silent, "seq": e["seq"],
                "score": (e.get("decision") or {}).get("score"),
                "silent_peak": round(max(peaks), 4) if peaks else None,
                "silent_held_back": held,
                "truth": None,
            }
            if truth is not None:
                present = any(r["label"] == label and r["start"] <= t <= r["end"] + post
                              for r in truth)
                row["truth"] = label if present else f"no {label}"
                row["right"] = fired if present else silent
            rows.append(row)
    return sorted(rows, key=lambda r: (r["start"], r["label"], r["fired"]))


def _share(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def totals(results: list[ReplayResult], config: Config) -> dict[str, Any]:
    """One side's figures pooled over every recording (counts summed, then divided)."""
    seconds = sum(max(r.recording.duration, r.stats.media_seconds) for r in results)
    sent = sum(r.stats.event_bytes for r in results)
    streaming = sum(r.streaming_bytes for r in results)
    per_label: dict[str, dict[str, Any]] = {}
    for r in results:
        duration = max(r.recording.duration, r.stats.media_seconds)
        for label, m in r.metrics.items():
            acc = per_label.setdefault(label, {
                "threshold": m["threshold"], "seconds": 0.0, "triggers": 0, "true_triggers": 0,
                "false_triggers": 0, "hit_ranges": 0, "labelled_ranges": 0, "window_tp": 0,
                "window_fp": 0, "window_fn": 0,
            })
            acc["seconds"] += duration
            for k in ("triggers", "true_triggers", "false_triggers", "hit_ranges",
                      "labelled_ranges", "window_tp", "window_fp", "window_fn"):
                acc[k] += m[k]
    for acc in per_label.values():
        acc["event_precision"] = _share(acc["true_triggers"], acc["triggers"])
        acc["event_recall"] = _share(acc["hit_ranges"], acc["labelled_ranges"])
        acc["window_precision"] = _share(acc["window_tp"], acc["window_tp"] + acc["window_fp"])
        acc["window_recall"] = _share(acc["window_tp"], acc["window_tp"] + acc["window_fn"])
        hours = acc["seconds"] / 3600.0
        acc["false_triggers_per_hour"] = round(acc["false_triggers"] / hours, 2) if hours else None
    estimate = cost.estimate(((r.events, r.frame_sizes) for r in results), config)
    return {
        "recordings": len(results),
        "media_seconds": round(seconds, 3),
        "events": sum(r.stats.events for r in results),
        "events_by_label": _count_labels(results),
        "bytes_sent": sent,
        "bytes_streaming_everything": streaming,
        "bytes_ratio": round(sent / streaming, 5) if streaming else None,
        "labels": per_label,
        "llm_cost": estimate.to_json(),
    }


def _count_labels(results: list[ReplayResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for e in r.events:
            out[e["label"]] = out.get(e["label"], 0) + 1
    return dict(sorted(out.items()))


@dataclass
class Comparison:
    a: Candidate
    b: Candidate
    runs: dict[str, list[ReplayResult]]  # "A" / "B" -> one result per recording, in order
    disagreements: list[list[dict[str, Any]]] = field(default_factory=list)  # per recording
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def labels(self) -> set[str]:
        """The labels the compared models output (the other modality's are the same twice)."""
        return set(self.a.manifest.labels) | set(self.b.manifest.labels)


async def run_compare(
    paths: list[Path], config: Config, a: Candidate, b: Candidate, *, report_dir: Path,
    labels: list[dict[str, Any]] | None = None, realtime: bool = False, progress: bool = True,
) -> Comparison:
    """Replay every recording with A's model, then with B's; compare."""
    runs: dict[str, list[ReplayResult]] = {}
    for cand in (a, b):
        cfg = candidate_config(config, cand)
        runs[cand.side] = []
        for i, path in enumerate(paths):
            sub = f"{i:02d}-{path.stem}" if len(paths) > 1 else ""
            runs[cand.side].append(await replay_recording(
                path, cfg, events_dir=report_dir / "events" / cand.side / sub,
                realtime=realtime, labels=labels, progress=progress,
            ))
    comp = Comparison(a, b, runs)
    comp.disagreements = [disagreements(ra, rb, config, comp.labels)
                          for ra, rb in zip(runs["A"], runs["B"], strict=True)]
    comp.totals = {side: totals(results, config) for side, results in runs.items()}
    return comp


def format_summary(comp: Comparison) -> str:
    lines = []
    for cand in (comp.a, comp.b):
        t = comp.totals[cand.side]
        usd = t["llm_cost"]["usd"]
        lines.append(
            f"{cand.label}: {t['events']} events, {t['bytes_sent']:,} bytes would leave, "
            f"LLM cost ~{'unknown' if usd is None else f'${usd:.4f}'}"
            + (f"; {cand.release['signature']}" if cand.release else "")
        )
        for label, m in sorted(t["labels"].items()):
            if label in comp.labels:
                lines.append(f"  {label}: precision {m['event_precision']}, recall "
                             f"{m['event_recall']}, false triggers/hour "
                             f"{m['false_triggers_per_hour']}")
    n = sum(len(d) for d in comp.disagreements)
    lines.append(f"they disagree at {n} moment{'' if n == 1 else 's'}")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace, config: Config) -> int:
    """The CLI's ``replay --compare A B PATH...`` (device/cli.py hands over here)."""
    from edgekeeper.device.report import write_compare_report
    from edgekeeper.device.sources import load_labels

    key, where = None, ""
    if args.release_key is not None or any(Path(x).expanduser().is_dir() for x in args.compare):
        key, where = load_release_key(args.release_key, config.device.state_dir)
    a = resolve("A", args.compare[0], variant=config.gate.variant, release_pk=key,
                key_source=where)
    b = resolve("B", args.compare[1], variant=config.gate.variant, release_pk=key,
                key_source=where)
    check_pair(a, b)
    labels = load_labels(args.labels) if args.labels else None
    comp = asyncio.run(run_compare(
        list(args.paths), config, a, b, report_dir=args.report, labels=labels,
        realtime=args.realtime, progress=not args.no_progress,
    ))
    paths = write_compare_report(comp, config, args.report)
    if args.json:
        print(json.dumps(comp.totals, indent=2, sort_keys=True))
    else:
        print(format_summary(comp))
        print(f"report: {paths['html']}  ({paths['json'].name} beside it)")
    return 0

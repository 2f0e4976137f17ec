"""Model cards rendered from metrics.json, so every number on a card is one the recipe measured."""

from __future__ import annotations

from typing import Any

REBUILD = (
    "```sh\n"
    "python3 -m venv /tmp/trainvenv\n"
    "/tmp/trainvenv/bin/pip install tensorflow-cpu ai-edge-litert 'opencv-python-headless<5' \\\n"
    "    soxr tqdm msgpack structlog pynacl aiohttp\n"
    "/tmp/trainvenv/bin/pip install --no-deps -e .\n"
    "apt-get install opencv-doc asterisk-core-sounds-en-wav sound-theme-freedesktop \\\n"
    "    espeak-ng ffmpeg asterisk-core-sounds-fr-wav asterisk-core-sounds-es-wav \\\n"
    "    oxygen-sounds gnome-audio yaru-theme-sound deepin-sound-theme \\\n"
    "    asc-music fb-music-high hyperrogue-music drascula-music singularity-music \\\n"
    "    mate-backgrounds lomiri-wallpapers ukui-wallpapers\n"
    "/tmp/trainvenv/bin/python -m edgekeeper.cloud.training.recipe --out models/\n"
    "```\n"
)


def _pr(d: dict[str, Any]) -> str:
    return f"{d['precision']:.3f} / {d['recall']:.3f} (tp {d['tp']}, fp {d['fp']}, fn {d['fn']})"


def _lat(d: dict[str, Any]) -> str:
    return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f} ms"


def _machine(m: dict[str, Any]) -> str:
    env = m.get("environment", {})
    return f"{env.get('machine', '?')}, {env.get('processor_count', '?')} CPUs"


def person_card(m: dict[str, Any]) -> str:
    v = m["variants"]
    w, h = m["input"]["width"], m["input"]["height"]
    rows_src = []
    for src in v["float"]["per_source"]:
        f, i = v["float"]["per_source"][src], v["int8"]["per_source"][src]
        rows_src.append(
            f"| {src} | {f['images']} | {f['label']} | "
            f"{f['share_over_threshold']:.3f} | {i['share_over_threshold']:.3f} |"
        )
    src_table = "\n".join(rows_src)
    sm = {k: v[k]["smoothed"] for k in ("float", "int8")}
    sc = m.get("sample_check", {}).get("person_int8", {})
    d = m["data"]
    scene_f = _pr(v["float"]["heldout_vtest_vs_scene_negatives"])
    scene_i = _pr(v["int8"]["heldout_vtest_vs_scene_negatives"])
    free_seconds = sm["float"]["person_free_video"]["hours"] * 3600
    machine = _machine(m)
    unseen = _person_unseen(m)
    return f"""# Model card: person gate (`person@{m["model"].split("@")[1]}`)

## Intended use
Decides whether **a person is anywhere in the whole camera frame**, as a cheap on-device gate
in front of the cloud reasoner. It does not localise, count or identify anyone. Threshold
{m["threshold"]} on `person`, with 3-of-5 frame smoothing, is the default trigger.

Labels (`labels.txt`, in order): `no_person`, `person`.

## Architecture and input
- Input: the frame stretched to **{w}x{h} RGB**, `x = pixel / 255` (mean 0, std 1). 4:3 like
  the cameras it was built for, and larger than 96x96 on purpose: walkers in a street camera are
  25-150 px tall in a 576-line frame, which is 4-25 rows at 96 lines but 5-31 at {h}.
- A 3x3 stride-2 convolution (16 ch) then six depthwise-separable blocks (32, 48, 64, 96, 96,
  128 channels; strides 1, 2, 1, 2, 1, 2), BatchNorm + ReLU6, **global max pooling** (one small
  walker must not be averaged away), a 32-unit ReLU layer (`embedding`) and a 2-way softmax
  (`scores`, so `"postprocess": "none"`).
- Outputs, verified by shape after conversion: float `{v["float"]["outputs"]}`, int8
  `{v["int8"]["outputs"]}` (index in `get_output_details()` order).
- Files: `person-float.tflite` {v["float"]["bytes"]:,} bytes; `person-int8.tflite`
  {v["int8"]["bytes"]:,} bytes (full integer: int8 input and outputs, calibrated on 500
  training images).

## Data (all offline, from Debian packages)
- `opencv-doc` `samples/data/vtest.avi`: 795 frames, 768x576 at 10 fps, of a campus walkway with
  pedestrians in every frame. **Split by time**: frames 0-{d["vtest_train_frames"] - 1} train,
  a 1 s gap, the last {d["vtest_heldout_frames"]} frames (about 20 s) held out.
- Negatives the video lacks: a person-free background plate (per-pixel temporal median of the
  training frames) with jitter; training frames with every moving blob painted over by the
  plate ("people removed"); `tree.avi` (68 decodable frames, split by time) and ~40 person-free
  photos from the same folder, split by file (about a quarter held out), with random crops.
- Extra positives: {d["person_cutouts"]} walkers cut out of training frames by background
  subtraction and pasted (1-6 at a time, often a single one) onto negatives; close-up photos of
  people (messi5, basketball, the chessboard calibration shots), split by file.
- People-like negatives: {d.get("train_mate-backgrounds", 0)} random crops of the 19 wallpapers
  of `mate-backgrounds` (flowers, leaves, drops, a ladybird, abstract art) and
  {d.get("train_shapes", 0)} still scenes (plates, frames with people removed, photos) with 1-5
  textured discs, ellipses, rounded boxes, blobs and stacked discs pasted in (textures cut from
  person-free photos, sometimes shaded like a round object); the same shapes appear beside
  people in 30 % of the composites, so a shape never means "no person" either.
- Low light and night: about half of all training images, of both labels, are darkened to
  2.5-80 % exposure (log-uniform; in pixel or linear sensor space), 70 % of them with shot and
  read noise, 35 % with a camera gain of up to 10x that brings the noise up with the level,
  35 % as infrared-like greyscale (`data_vision.low_light`).
- Totals: {d["train_images"]} training images ({d["train_person"]} person), {d["heldout_images"]}
  held-out images ({d["heldout_person"]} person).
- Licences: OpenCV's sample data is distributed by Debian under OpenCV's licence
  (Apache-2.0 AND BSD-3-Clause per `/usr/share/doc/opencv-doc/copyright`); vtest.avi appears
  to come from the PETS 2009 benchmark (University of Reading), whose own terms the package
  does not restate. `mate-backgrounds`: GPL-2+ (per file in its copyright). Held out, never
  trained on: `lomiri-wallpapers` (per file CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0) and
  `ukui-wallpapers` (CC-BY-SA-3.0). Nothing from them ships: only the trained weights do.

{unseen}

## Held-out results (ai_edge_litert on the shipped .tflite files, threshold {m["threshold"]})
Precision / recall for `person`:

| set | float | int8 |
| --- | --- | --- |
| all held-out images | {_pr(v["float"]["heldout_all"])} | {_pr(v["int8"]["heldout_all"])} |
| vtest frames vs scene negatives | {scene_f} | {scene_i} |

Share of images at or over the threshold, by source (for `no_person` sources this is the false
positive rate):

| source | images | truth | float | int8 |
| --- | --- | --- | --- | --- |
{src_table}

Smoothed (3 of 5 frames, frames played at 10 fps):
- held-out vtest (people throughout): first trigger at frame
  {sm["float"]["vtest_heldout_first_trigger_frame"]} (float) /
  {sm["int8"]["vtest_heldout_first_trigger_frame"]} (int8); share of frames in the triggered
  state {sm["float"]["vtest_heldout_share_of_frames_triggered"]:.3f} /
  {sm["int8"]["vtest_heldout_share_of_frames_triggered"]:.3f}.
- person-free held-out video (people-removed vtest + tree.avi, only
  {free_seconds:.0f} s): {sm["float"]["person_free_video"]["smoothed_triggers_per_hour"]}
  (float) / {sm["int8"]["person_free_video"]["smoothed_triggers_per_hour"]} (int8) triggers per
  hour smoothed; {sm["float"]["person_free_video"]["per_window_triggers_per_hour"]} /
  {sm["int8"]["person_free_video"]["per_window_triggers_per_hour"]} per frame without smoothing.
  The footage is short, so these rates are coarse.
- Bundled sample `models/samples/street/video.avi` (re-encoded held-out frames) through the int8
  model: {sc.get("share_over_threshold", "n/a")} of {sc.get("frames", "n/a")} frames over the
  threshold, lowest person probability {sc.get("min_probability", "n/a")}.

## Latency
Single inference (set input, invoke, read outputs), ai_edge_litert, `num_threads=2`, on the
build machine ({machine}), p50 / p99:
float {_lat(v["float"]["latency"])}; int8 {_lat(v["int8"]["latency"])}.
On x86 XNNPACK runs float faster than int8; on ARM boards int8 is usually
the faster and is the default. Expect several times more on a Raspberry Pi 4.

## Limitations
- One real scene with people: every real person it saw comes from one camera (vtest.avi). The
  unseen-source recall above pastes held-out walkers from that camera into unseen scenes; real
  people seen by another camera, from another angle, in rain or crowds, or smaller than ~25 px
  in a 576-line frame are untested. No Debian or PyPI package found offers such footage.
- Night here is simulated from daytime footage with a sensor model (exposure, shot and read
  noise, gain, greyscale); real infrared footage (lit by IR LEDs, with glowing eyes and hot
  spots) may differ.
- Close-ups of people indoors are missed: both held-out basketball photos (grayscale, people
  filling the frame) score below the threshold. The model has learned small full-body figures
  outdoors, which is what a street or yard camera sees.
- "People removed" held-out negatives are real frames with the walkers painted over by the
  held-out median plate: realistic, but synthetic where the people were.
- Anything person-sized and person-coloured that moves (a dog, a bin bag) may trigger it; the
  cloud reasoner is the second opinion.
- Retrain from LLM labels on your own camera's events to improve it (the learning loop does this).

## Rebuild
{REBUILD}"""


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _person_unseen(m: dict[str, Any]) -> str:
    """The card's section on sources never trained on (empty for metrics without it)."""
    if "brightness_sweep" not in m:
        return ""
    thr = m["threshold"]
    src = m["heldout_sources"]
    src_rows = "\n".join(
        f"| {name} | {r['images']} | {r['label']} | {r['float']:.3f} | {r['int8']:.3f} |"
        for name, r in src.items()
    )
    sweep = m["brightness_sweep"]
    sweep_rows = "\n".join(
        f"| {name} | {r['float']['vtest_frame_recall']:.3f} / {r['int8']['vtest_frame_recall']:.3f}"
        f" | {r['float']['vtest_share_of_frames_triggered']:.3f} / "
        f"{r['int8']['vtest_share_of_frames_triggered']:.3f}"
        f" | {r['float']['other_scenes_walkers_recall']:.3f} / "
        f"{r['int8']['other_scenes_walkers_recall']:.3f}"
        f" | {r['pregate_motion_share']:.3f} |"
        for name, r in sweep.items()
    )
    sweep_head = (
        f"| exposure | vtest frames >= {thr} | vtest frames in triggered state (device rule) "
        f"| walkers in unseen scenes >= {thr} | pre-gate: frames with motion |"
    )
    video = m["person_free_video_unseen"]
    down_to_35 = ("100%", "70%", "50%", "35%")
    worst = {
        v: min(min(sweep[n][v]["vtest_frame_recall"], sweep[n][v]["other_scenes_walkers_recall"])
               for n in down_to_35)
        for v in ("float", "int8")
    }
    night = {
        v: min(sweep["night"][v]["vtest_frame_recall"],
               sweep["night"][v]["other_scenes_walkers_recall"])
        for v in ("float", "int8")
    }
    fph = {v: video[v]["fires_per_hour_every_frame"] for v in ("float", "int8")}
    vt = {v: min(sweep[n][v]["vtest_frame_recall"] for n in down_to_35) for v in ("float", "int8")}
    pkg_rows = "\n".join(
        f"| {pk} | {video['packages'][pk]} | {video['float']['fires_by_package_every_frame'][pk]}"
        f" | {video['int8']['fires_by_package_every_frame'][pk]} |"
        for pk in sorted(video["packages"])
    )
    return f"""## On sources never trained on

Targets (issue 12), int8 (the device default) / float, measured below:
- recall >= 0.95 down to 35 % exposure (worst of the 100-35 % rows, vtest frames and walkers in
  unseen scenes): {worst["int8"]:.3f} / {worst["float"]:.3f}, {_met(worst["int8"] >= 0.95)};
- recall >= 0.8 on night-like footage (row `night`): {night["int8"]:.3f} /
  {night["float"]:.3f}, {_met(night["int8"] >= 0.8)};
- <= 5 false triggers per hour on person-free video of unseen scenes (every frame scored):
  {fph["int8"]} / {fph["float"]}, {_met(fph["int8"] <= 5)}.

On the held-out vtest frames alone (the training camera, later minutes) the worst frame recall
from 100 % to 35 % is {vt["int8"]:.3f} / {vt["float"]:.3f} and at `night`
{sweep["night"]["int8"]["vtest_frame_recall"]:.3f} /
{sweep["night"]["float"]["vtest_frame_recall"]:.3f}: low light and night on the camera it knows
are handled. What it **cannot** do yet: find walkers pasted into scenes it never saw (about half
are missed even at full light), stay quiet on unseen textured scenes (about one crop in ten
scores as a person; tens of false triggers per hour on the person-free video), or see anyone in
a dark picture the camera did not amplify (`night-dark`). Until it is retrained on a camera's
own events, expect false events in new scenes; the cloud reasoner is the second opinion.

![recall against exposure and the pre-gate in the dark](heldout.png)

**Whole held-out sources** (two Debian packages no training example came from; 8 random crops
of each wallpaper, and the same crops with 1-3 walkers cut from held-out vtest frames pasted
in). Share of images at or over {thr} (false positive rate for `no_person` rows, recall for
`person` rows):

| source | images | truth | float | int8 |
| --- | --- | --- | --- | --- |
{src_rows}

**Brightness sweep** of the {m["data"]["vtest_heldout_frames"]} held-out vtest frames (people
in every frame), darkened at full resolution by `data_vision.darken` (pixel values times the
exposure; `night` is 5 % exposure, shot noise 1.0 x level, read noise 2 grey levels, camera
gain 6x, greyscale; `night-dark` the same without the gain) and shrunk as on a device; and of
the unseen-source composites above (darkened at model size). Float / int8:

{sweep_head}
| --- | --- | --- | --- | --- |
{sweep_rows}

"Triggered state" is the device's default `person` rule (`TriggerPolicy`, 3 of 5 over
{thr}, release under 0.4) run over the frame scores at 10 fps. The pre-gate column is the
default `[pregate]` motion measure (`device/pregate.py`) on the same darkened frames.

**Person-free video**: {video["minutes"]} minutes at 10 fps, continuous, made from the
{len(video["packages"])} held-out
packages' stills (`data_vision.person_free_video`): each still shown for 72 s as shots of
6-20 s, each shot a slow pan across the picture, a slow zoom, a still shot or a light change
(exposure falling to 5-30 % and back, with camera gain in the darkest part), fresh sensor noise
on every frame (shot 0.5, read 1-3 grey levels), rendered at 320x240. Every frame scored by both
models, then the device's default `person` rule (cooldown off, so every activation counts):

- every frame scored (pre-gate off): {fph["float"]} (float) / {fph["int8"]} (int8) false
  triggers per hour; frames over {thr}: {video["float"]["frames_over_threshold"]} /
  {video["int8"]["frames_over_threshold"]};
- through the default motion pre-gate (it let {video["pregate_share_of_frames_run"]:.3f} of the
  frames through; pans, zooms and light changes are motion): {video["float"][
      "fires_per_hour_with_pregate"]} / {video["int8"]["fires_per_hour_with_pregate"]} per hour.

| package | minutes | false triggers, float | false triggers, int8 |
| --- | --- | --- | --- |
{pkg_rows}

**Close-ups of people in photos** (not a goal; a street or yard camera sees whole small
figures): the `photo-person` row of the by-source table below (held-out opencv-doc photos of
people filling the frame).

These figures come from `python -m edgekeeper.cloud.training.recipe --out models/ --only person`
(seed {m.get("environment", {}).get("seed", 0)}; `--only person` keeps the sound gate as built;
a full rebuild without `--only` trains the person gate the same way).
"""


def person_plot(m: dict[str, Any], path: Any) -> None:
    """Recall against exposure (held-out vtest frames and walkers in unseen scenes), next to
    the card, and the pre-gate's wake rate on the same darkened frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = m["brightness_sweep"]
    names = list(sweep)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for v, style in (("float", "-o"), ("int8", "--s")):
        ax.plot(names, [sweep[n][v]["vtest_frame_recall"] for n in names], style,
                label=f"{v}: held-out vtest frames")
        ax.plot(names, [sweep[n][v]["other_scenes_walkers_recall"] for n in names], style,
                label=f"{v}: held-out walkers in unseen scenes", alpha=0.6)
    ax.axhline(0.95, color="k", lw=0.8, ls="--")
    ax.axhline(0.8, color="k", lw=0.8, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("exposure (night: 5 % + shot/read noise + gain, grey)")
    ax.set_ylabel(f"share of frames >= {m['threshold']}")
    ax.set_title("person recall against exposure\n(dashed: 0.95 target to 35 %; dotted: 0.8 at "
                 "night)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.bar(names, [sweep[n]["pregate_motion_share"] for n in names], color="#48a")
    ax.set_ylim(0, 1.02)
    ax.set_title("motion pre-gate: share of held-out vtest frames that wake the model",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def sound_plot(m: dict[str, Any], path: Any) -> None:
    """Bar charts of the int8 gate's held-out figures by source, next to the card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = m["variants"]["int8"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    groups = v["per_label"]["speech"]["per_group"]
    names = list(groups)
    share = [
        v["per_label"][g_truth]["per_group"][g]["share_over_threshold"]
        if (g_truth := groups[g]["truth"]) != "background"
        else max(v["per_label"][lab]["per_group"][g]["share_over_threshold"]
                 for lab in ("speech", "alarm"))
        for g in names
    ]
    colours = ["#c44" if groups[g]["truth"] == "background" else "#48a" for g in names]
    ax = axes[0]
    ax.barh(range(len(names)), share, color=colours)
    ax.set_yticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title("2 s windows over threshold (int8)\nblue: recall of the true label; "
                 "red: background windows\nscored speech or alarm", fontsize=8)
    ev = v["trigger"]
    labels, recalls = [], []
    for key, title in (
        ("events_unseen_sources", "unseen"),
        ("events_heldout_files", "held-out files"),
    ):
        for lab in ("speech", "alarm"):
            labels.append(f"{lab}\n{title}")
            recalls.append(ev[key][lab]["recall"])
    ax = axes[1]
    ax.bar(range(len(labels)), recalls, color="#48a")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_title("events caught through the trigger rule\n(dashed: alarm target 0.9)", fontsize=8)
    parts = ev["quiet"]["parts"]
    ax = axes[2]
    xs = list(parts)
    ax.bar([i - 0.2 for i in range(len(xs))], [parts[p]["alarm_per_hour"] for p in xs], 0.4,
           label="alarm", color="#c44")
    ax.bar([i + 0.2 for i in range(len(xs))], [parts[p]["speech_per_hour"] for p in xs], 0.4,
           label="speech (real speech in broadcast)", color="#888")
    ax.set_xticks(range(len(xs)), [f"{p}\n{parts[p]['minutes']:.0f} min" for p in xs], fontsize=8)
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.set_title("fires per hour on event-free held-out audio\n(dashed: target 2/h)", fontsize=8)
    ax = axes[3]
    curve = ev["alarm_curve"]
    ax.plot([c["music_broadcast_per_hour"] for c in curve], [c["event_recall"] for c in curve],
            "o-", color="#c44")
    for c in curve:
        ax.annotate(f"{c['threshold']}", (c["music_broadcast_per_hour"], c["event_recall"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("false alarm fires per hour, music + broadcast", fontsize=8)
    ax.set_ylabel("alarm event recall, unseen themes", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("alarm operating curve through the trigger rule\n(labels: threshold; "
                 f"default {m['thresholds']['alarm']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def sound_card(m: dict[str, Any]) -> str:
    v = m["variants"]
    d = m["data"]
    q = v["int8"]["trigger"]
    tr = m["trigger"]
    rows = []
    for label in ("speech", "alarm"):
        f, i = v["float"]["per_label"][label], v["int8"]["per_label"][label]
        rows.append(
            f"| {label} | {m['thresholds'][label]} | {_pr(f['heldout_windows'])} | "
            f"{_pr(i['heldout_windows'])} |"
        )
    pr_table = "\n".join(rows)
    group_rows = []
    for g, gi in v["int8"]["per_label"]["speech"]["per_group"].items():
        truth = gi["truth"]
        sh = {
            var: {lab: v[var]["per_label"][lab]["per_group"][g]["share_over_threshold"]
                  for lab in ("speech", "alarm")}
            for var in ("float", "int8")
        }
        group_rows.append(
            f"| {g} | {gi['windows']} | {truth} | {sh['float']['speech']:.3f} / "
            f"{sh['int8']['speech']:.3f} | {sh['float']['alarm']:.3f} / {sh['int8']['alarm']:.3f} |"
        )
    group_table = "\n".join(group_rows)

    def ev_row(key: str, title: str) -> str:
        out = []
        for lab in ("speech", "alarm"):
            f, i = v["float"]["trigger"][key][lab], v["int8"]["trigger"][key][lab]
            out.append(
                f"| {title} | {lab} | {f['caught']}/{f['events']} / {i['caught']}/{i['events']} | "
                f"{f['false_fires']} / {i['false_fires']} |"
            )
        return "\n".join(out)

    ev_table = ev_row("events_unseen_sources", "unseen sources") + "\n" + ev_row(
        "events_heldout_files", "held-out files, training sources"
    )
    quiet_rows = []
    for part, pi in q["quiet"]["parts"].items():
        pf = v["float"]["trigger"]["quiet"]["parts"][part]
        quiet_rows.append(
            f"| {part} | {pi['minutes']:.0f} | {pf['alarm_fires']} / {pi['alarm_fires']} "
            f"({pi['alarm_per_hour']}/h int8) | {pf['speech_fires']} / {pi['speech_fires']} "
            f"({pi['speech_per_hour']}/h int8) |"
        )
    quiet_table = "\n".join(quiet_rows)
    quiet_min = sum(p["minutes"] for p in q["quiet"]["parts"].values())
    sources_rows = "\n".join(
        f"| {name} | `{si['package']}` | {si['licence']} | {si['split']} |"
        for name, si in d["sources"].items()
    )
    speech_groups = {
        g: gi for g, gi in v["int8"]["per_label"]["speech"]["per_group"].items()
        if gi["truth"] == "speech" and "unseen" in g
    }
    worst_speech = min(gi["share_over_threshold"] for gi in speech_groups.values())
    sp = v["int8"]["per_label"]["speech"]["heldout_windows"]
    al_ev = q["events_unseen_sources"]["alarm"]
    sc = m.get("sample_check", {})
    conf = v["int8"]["heldout_confusion_argmax"]["matrix"]
    machine = _machine(m)
    music_bc = max(q["quiet"]["parts"][p]["alarm_per_hour"] for p in ("music", "broadcast"))
    target_rows = [
        ("speech precision >= 0.98 (2 s windows, all held-out groups)",
         f"{sp['precision']:.3f}", sp["precision"] >= 0.98),
        ("speech recall >= 0.98 on unseen speakers / languages (worst unseen source, windows)",
         f"{worst_speech:.3f}", worst_speech >= 0.98),
        ("alarm event recall >= 0.9, repeated real alerts of unseen themes",
         f"{al_ev['caught']}/{al_ev['events']} = {al_ev['recall']:.3f}", al_ev["recall"] >= 0.9),
        ("<= 2 false alarm triggers/h on music and broadcast",
         f"music {q['quiet']['parts']['music']['alarm_per_hour']}/h, broadcast "
         f"{q['quiet']['parts']['broadcast']['alarm_per_hour']}/h", music_bc <= 2),
        (f"a single chime or click fires nothing ({q['singles']['sounds']} held-out sounds "
         "<= 2.5 s, each once)", f"{q['singles']['fires']} fires", q["singles"]["fires"] == 0),
    ]
    targets = "\n".join(
        f"| {t} | {val} | {_met(ok)} |" for t, val, ok in target_rows
    )
    fired_list = ": " + "; ".join(q["singles"]["fired"]) if q["singles"]["fired"] else ""
    espeak_row = (
        "| espeak-ng | `espeak-ng` | GPL-3+ (synthetic voices) | 8 voices and 20 sentences "
        "train; 5 other voices and 6 other sentences held out whole (`espeak-ng-heldout`) |"
    )
    curve = {c["threshold"]: c for c in q["alarm_curve"]}
    at08 = curve.get(0.8)
    default = curve.get(m["thresholds"]["alarm"], {"music_broadcast_per_hour": "?",
                                                   "event_recall": float("nan")})
    n_alerts = sum(c.get("alerts", 0) for c in d["train_clips"].values())
    same_al = q["events_heldout_files"]["alarm"]
    speech_rec = ", ".join(
        f"{g.split(': ')[1].split(' (')[0]} {gi['share_over_threshold']:.2f}"
        for g, gi in speech_groups.items()
    )
    limits = [
        f"- **Music still sets off `alarm`**: {q['quiet']['parts']['music']['alarm_fires']} "
        f"fires in {q['quiet']['parts']['music']['minutes']:.0f} min of the held-out soundtrack "
        f"({q['quiet']['parts']['music']['alarm_per_hour']}/h, int8, cooldown off); sustained "
        "synthesiser tones and arpeggios look like sirens and beep trains to this head.",
        f"- **Repeated alerts it has not heard are often missed**: {al_ev['caught']} of "
        f"{al_ev['events']} repeated Yaru / Deepin alerts fired `alarm`, against "
        f"{same_al['caught']} of {same_al['events']} for held-out files of the training themes: "
        f"{n_alerts} real alert sounds are too few to generalise from.",
        f"- **Speech on unseen voices**, share of 2 s windows over the threshold: {speech_rec}.",
    ]
    if at08 is not None:
        limits.append(
            f"- A higher alarm threshold trades recall for quiet (curve above): at 0.8, "
            f"{at08['music_broadcast_per_hour']} false fires/h on music and broadcast and "
            f"event recall {at08['event_recall']:.2f}; at the default "
            f"{m['thresholds']['alarm']}, {default['music_broadcast_per_hour']}/h and "
            f"{default['event_recall']:.2f}. Set it per room with "
            "`[trigger.labels.alarm] threshold`."
        )
    measured_limits = "\n".join(limits)
    rules = ", ".join(
        f"{lab} >= {r['threshold']} (release {r['release']}, span {r['min_span_seconds']} s)"
        for lab, r in tr["labels"].items()
    )
    return f"""# Model card: sound gate (`sound@{m["model"].split("@")[1]}`)

## Intended use
Flags **speech** and **alarms** (an alert that repeats or rings on: smoke-alarm beeps, sirens,
ringing, a battery or error alert left sounding) in a microphone stream, so only those leave the
device. Everything else is `background`: music, the radio's jingles, a single chime, click or
notification tone. It does not transcribe, identify speakers or tell one alarm from another.
Labels (`labels.txt`, in order): `background`, `speech`, `alarm`.

**Trigger rule** (the defaults, `[trigger]` in docs/configuration.md): {tr["k"]}-of-{tr["n"]}
windows over the threshold, and the hits of one run must spread over `min_span_seconds`: {rules}.
Windows are 2 s long every 0.48 s, so one short sound hits several windows in a row; a sound of
d seconds can only hit windows ending within d + 2 s of each other, so no sound of 0.5 s or
less can fire alone, whatever the model scores. Every event figure below was measured through
this rule (`edgekeeper.device.trigger.TriggerPolicy` itself) with cooldowns off, so each
activation counts; a device's cooldown can only lower them.

## Targets (issue 12) on held-out sources, int8

| target | measured | |
| --- | --- | --- |
{targets}

The anchor, openWakeWord's under 0.5 false accepts per hour at under 5% false rejects, is for
one wake word; here over {quiet_min:.0f} min of event-free held-out audio the int8 gate fired
`alarm` {q["quiet"]["alarm_per_hour"]} times per hour and `speech` (music and household only)
{q["quiet"]["speech_per_hour_without_broadcast"]} times per hour. {quiet_min:.0f} minutes is
short: one fire is {60 / quiet_min:.1f} per hour here.

![held-out figures by source](heldout.png)

## Architecture and input
Three stages (see `manifest-*.json` and docs/models.md "Audio stages"), 16 kHz mono, a 2.0 s
window every 0.48 s (a whole number of embedding steps, so the device reuses 10 of the 16
embeddings from the previous window and computes only 6; `"frame_samples": 160`):
1. `../frontends/melspectrogram.tflite` (openWakeWord 0.5.1) over the whole window:
   197 x 32 mel rows, scaled `y * 0.1 + 2.0`.
2. `../frontends/embedding_model.tflite` (openWakeWord's port of Google's speech_embedding)
   on 76-row windows every 8 rows, anchored at the last row: 16 x 96 embeddings.
3. The head (ours): per-step Dense(64, ReLU) -> Conv1D(64, k=3, ReLU) -> concat(max over time,
   mean over time) -> Dense(32, ReLU) -> Dense(3, softmax) (`"postprocess": "none"`).
   Input `[1, 16, 96]`, output 0 = scores. `sound-float.tflite` {v["float"]["bytes"]:,} bytes,
   `sound-int8.tflite` {v["int8"]["bytes"]:,} bytes (int8 input and output, calibrated on 600
   training feature windows). The front-ends are ~1.1 MB and ~1.3 MB and are shared.

Training features are computed by `edgekeeper.cloud.training.features` (numpy + ai_edge_litert),
exactly as the contract describes.

## Data (all offline, from Debian packages)

| source | package | licence | split |
| --- | --- | --- | --- |
{sources_rows}
{espeak_row}

- **speech**: Asterisk prompts except the non-speech files ({", ".join(d["not_speech"])}: tones,
  beeps and a recording of monkeys, which are used as single background sounds instead), the
  freedesktop ALSA channel announcements, espeak-ng.
- **alarm**: a real alert sound of a sound theme (names with warning, error, critical, battery,
  phone, ring, busy, calling, attention, nudge) repeated with 0.05-0.6 s gaps for at least
  2.5 s (60%), or a synthesised alarm (40%: smoke-alarm T3 beeps, sirens, hi-lo, buzzers,
  beep trains, mechanical bells). A window is `alarm` when it holds 1.5 s of it, 0.5 s audible.
- **background**: generated noise, hum and rumble; Asterisk room tone; music (half of the
  background windows and a third of the others: a game soundtrack at -40 to -12 dBFS over
  quieter noise); and in 45% of beds one theme sound played *once*
  (chimes, clicks, shutter, a single warning or error tone: one short sound is not an alarm).
- Speech and alarms are mixed over these beds (SNR >= ~3 dB), so a third of them sit on music,
  as on a radio or TV. A quarter of all windows pass through an 8 kHz telephone band.
- **Held out by source**: the Yaru and Deepin sound themes, the Singularity soundtrack, the
  French (June Wallack) and Spanish Asterisk voices and the held-out espeak voices never reach
  training. Within the training sources a quarter of the files (stable hash of the name) are
  held out too; `dialog-warning.oga` and `alarm-clock-elapsed.oga` always are (the bundled
  sample and the trigger tests play them).
- Training windows: {d["train_windows"]}.

## Held-out results (ai_edge_litert on the shipped .tflite files)

Per 2 s window, all held-out groups together, precision / recall of `score >= threshold`
(float | int8):

| label | threshold | float | int8 |
| --- | --- | --- | --- |
{pr_table}

By group: share of windows with speech / alarm over its threshold (float / int8). For a speech
or alarm group the matching column is its recall; for background both are false positives.
Every group's background bed (music, chimes, room tone) comes from unseen sources only.

| group | windows | truth | speech | alarm |
| --- | --- | --- | --- | --- |
{group_table}

Held-out confusion (int8, arg-max, rows = truth background/speech/alarm): {conf}.

**Events through the trigger rule.** Streams of held-out material with an event every
12 s, speech (1-3 prompts) and a repeated real alert (3-8 s) alternating (float / int8):

| stream | label | events caught | false fires |
| --- | --- | --- | --- |
{ev_table}

**Event-free audio** ({quiet_min:.0f} min, continuous, unseen sources only): music (the whole
Singularity soundtrack, 1-3 minute stretches at -35 to -14 dBFS), broadcast (the same music
with unseen-language speech over it at 0-15 dB above the music, like a radio presenter) and
household (room noise with 0-2 held-out chimes, clicks or single alert tones every 10 s).
Fires (float / int8); speech in the broadcast part is real speech, so its speech fires are
correct, not false:

| part | minutes | alarm fires | speech fires |
| --- | --- | --- | --- |
{quiet_table}

**Single sounds**: each of the {q["singles"]["sounds"]} held-out theme and Asterisk sounds of
at most 2.5 s (chimes, clicks, single warning tones, beeps) played once in a quiet room:
{q["singles"]["fires"]} fires (int8){fired_list}.

Bundled sample `models/samples/street/audio.wav` through the int8 gate and the trigger rule:
fires at window ends (s) {sc.get("sound_int8_smoothed_triggers_at_window_end_s", "n/a")};
ground truth in `labels.json`.

## Latency
ai_edge_litert, `num_threads=2`, build machine ({machine}), p50 / p99:
head only float {_lat(v["float"]["latency_head"])}, int8 {_lat(v["int8"]["latency_head"])};
whole window (mel + 16 embeddings + head) float {_lat(v["float"]["latency_full_window"])},
int8 {_lat(v["int8"]["latency_full_window"])}. The front-ends dominate.

## What it cannot do
{measured_limits}
- **Short speech does not trigger.** With `min_span_seconds = 2.5` a lone word or a phrase
  under about 1.5 s does not fire `speech`; conversation, announcements and a radio do.
- **It cannot tell TV or radio speech from a person in the room**: speech over music is speech.
  A TV that talks triggers `speech` (at most once a minute with the default cooldown).
- **Alarms are sounds that repeat or ring on for ~2 s or more.** A single alert tone, however
  urgent, is background by design; a slow alert (one tone every 3 s or more) breaks into runs
  the span rule treats as single sounds.
- Real held-out speech is three voices (Allison Smith in English and Spanish, June Wallack in
  French), all studio prompts on the telephone band; far-field, reverberant, children's or
  shouted speech is untested. Held-out alarms are theme sounds and synthesised ones; real
  smoke detectors, sirens and car alarms recorded in rooms were not available offline.
- Household noise is generated noise, hum and rumble plus short UI sounds: no recorded
  kitchens, vacuum cleaners, dogs, doors or water. Expect more false triggers in real homes
  than on these streams.
- The front-end models' licence is ambiguous (see `models/frontends/NOTICE`): treat as
  CC BY-NC-SA 4.0.

## Rebuild
{REBUILD}
Only this gate (keeps `models/person/` as built): add `--only sound`.
"""


SAMPLES_NOTICE = """\
Bundled sample recording: models/samples/street/
================================================

video.avi
  Frames 596-794 (the held-out last quarter, never used for training) of vtest.avi from the
  Debian package opencv-doc (/usr/share/doc/opencv-doc/examples/data/vtest.avi), re-encoded to
  MPEG-4 Part 2 (XVID tag) at the original 768x576, 10 fps. Debian lists OpenCV's sample data
  under OpenCV's licence (Apache-2.0 AND BSD-3-Clause, /usr/share/doc/opencv-doc/copyright).
  The footage appears to originate from the PETS 2009 benchmark data set (University of
  Reading), whose own terms the package does not restate.

audio.wav (16 kHz mono 16-bit), composed by edgekeeper.cloud.training.sample from held-out files:
  - speech: a voice prompt from asterisk-core-sounds-en-wav, recorded by Allison Smith,
    CC-BY-SA-3.0 (see recording.json for the file and time);
  - alarm: dialog-warning.oga from sound-theme-freedesktop, repeated with 0.15 s gaps for
    2.5 s. Debian's copyright file does not list this file by name; every stanza of it is
    GPL-2+, GPL-2, CC-BY-3.0 or CC-BY-SA-3.0, and the Ivica Bukvic stanza (CC-BY-SA-3.0)
    contains a garbled entry "stereo/stereo/.oga" that may be it. Treat it as CC-BY-SA-3.0
    or GPL-2+ until upstream's CREDITS says otherwise;
  - click: power-plug.oga from sound-theme-freedesktop, by Ivica Bukvic, CC-BY-SA-3.0;
  - background: generated pink-ish noise (no licence needed).
  As a derivative of CC-BY-SA-3.0 material, audio.wav is itself CC-BY-SA-3.0 (and GPL-2+ if
  that is the warning tone's licence).

labels.json: person by inspection of every frame (people are visible throughout); speech and
alarm by construction (the times they were mixed in).
"""

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
    "    espeak-ng ffmpeg\n"
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
- Totals: {d["train_images"]} training images ({d["train_person"]} person), {d["heldout_images"]}
  held-out images ({d["heldout_person"]} person).
- Licences: OpenCV's sample data is distributed by Debian under OpenCV's licence
  (Apache-2.0 AND BSD-3-Clause per `/usr/share/doc/opencv-doc/copyright`); vtest.avi appears
  to come from the PETS 2009 benchmark (University of Reading), whose own terms the package
  does not restate.

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
- One real scene with people: the held-out frames come from the same camera, minutes later.
  Other viewpoints, night, rain, crowds or people far smaller than ~25 px in a 576-line frame
  are untested; the held-out photo rows show how it behaves on unrelated scenes.
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


def sound_card(m: dict[str, Any]) -> str:
    v = m["variants"]
    d = m["data"]
    rows = []
    for label in ("speech", "alarm"):
        f, i = v["float"]["per_label"][label], v["int8"]["per_label"][label]
        rows.append(
            f"| {label} | {m['thresholds'][label]} | {_pr(f['heldout_windows'])} | "
            f"{_pr(i['heldout_windows'])} |"
        )
    pr_table = "\n".join(rows)
    trig = []
    for label in ("speech", "alarm"):
        f, i = v["float"]["per_label"][label], v["int8"]["per_label"][label]
        trig.append(
            f"| {label} | {f['background_stream']['smoothed_triggers_per_hour']} / "
            f"{i['background_stream']['smoothed_triggers_per_hour']} | "
            f"{f['background_stream']['per_window_triggers_per_hour']} / "
            f"{i['background_stream']['per_window_triggers_per_hour']} | "
            f"{f['event_stream']['caught']}/{f['event_stream']['events']} / "
            f"{i['event_stream']['caught']}/{i['event_stream']['events']} |"
        )
    trig_table = "\n".join(trig)
    sc = m.get("sample_check", {})
    held_files = ", ".join(d["clips"]["heldout_real_files"])
    conf = v["int8"]["heldout_confusion_argmax"]["matrix"]
    bg_min = d["background_stream_seconds"] / 60
    machine = _machine(m)
    return f"""# Model card: sound gate (`sound@{m["model"].split("@")[1]}`)

## Intended use
Flags **speech** and **alarms** (smoke-alarm beeps, sirens, ringing, buzzers) in a microphone
stream, so only those leave the device. Everything else is `background`. It does not
transcribe, identify speakers or tell one alarm from another.
Labels (`labels.txt`, in order): `background`, `speech`, `alarm`. Default thresholds:
speech {m["thresholds"]["speech"]}, alarm {m["thresholds"]["alarm"]}, with 3-of-5 window smoothing.

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
- speech: `asterisk-core-sounds-en-wav` (Allison Smith's voice prompts, real speech, 8 kHz;
  CC-BY-SA-3.0), the ALSA channel announcements in `sound-theme-freedesktop` (GPL-2+), and
  espeak-ng (synthetic; 8 voices for training, 5 other voices and other sentences held out).
- alarm: `sound-theme-freedesktop` ringing / busy / warning / error sounds (GPL-2+, CC-BY-SA-3.0)
  plus synthesised smoke-alarm T3 beeps, sirens, hi-lo tones, buzzers, beep trains and
  mechanical bells (a clapper striking an inharmonic bell 12-30 times a second).
- background: generated white/pink/brown noise, mains hum, rumble; Asterisk's recorded
  "silence" files; short non-alarm UI sounds (clicks, shutter, plug). Chimes and bells are left
  out: whether they are alarms is a judgement the labels cannot settle.
- Each window is a background bed plus, for speech, at least 0.5 s of speech (0.3 s audible)
  and, for alarm, at least 1.0 s of the alarm (0.5 s audible: an alarm goes on or repeats), at a
  random position, level and SNR >= ~3 dB. A fifth of background beds carry one or two short
  synthetic beeps/blips, so a lone UI beep stays `background`. A quarter of all windows, of every
  class, pass through an 8 kHz telephone band so "narrow band" cannot mean "speech".
- **Split by file**: a stable hash of each file name holds out about a quarter of the real files;
  `alarm-clock-elapsed.oga` is always held out (the sample recording uses it). Held-out real
  files: {held_files}. Held-out synthetic alarms are fresh random draws from the same families.
- {d["train_windows"]} training windows, {d["heldout_windows"]} held-out windows (balanced).

## Held-out results (ai_edge_litert on the shipped .tflite files)
Per 2 s window, precision / recall of `score >= threshold`:

| label | threshold | float | int8 |
| --- | --- | --- | --- |
{pr_table}

Streams built only from held-out material: {bg_min:.0f} min of background
(no events) and {d["event_stream_seconds"] / 60:.0f} min with {d["event_stream_events"]} events
(speech and alarm alternating every 10 s). Float / int8:

| label | smoothed triggers/h, background | per-window triggers/h | events caught (smoothed) |
| --- | --- | --- | --- |
{trig_table}

Held-out confusion (int8, arg-max, rows = truth background/speech/alarm): {conf}.

Bundled sample `models/samples/street/audio.wav` through the int8 gate: smoothed triggers at
window ends (s) {sc.get("sound_int8_smoothed_triggers_at_window_end_s", "n/a")}; ground truth in
`labels.json`.

## Latency
ai_edge_litert, `num_threads=2`, build machine ({machine}), p50 / p99:
head only float {_lat(v["float"]["latency_head"])}, int8 {_lat(v["int8"]["latency_head"])};
whole window (mel + 16 embeddings + head) float {_lat(v["float"]["latency_full_window"])},
int8 {_lat(v["int8"]["latency_full_window"])}. The front-ends dominate.

## Limitations
- **Mechanical bells are missed.** The held-out real alarm clock (`alarm-clock-elapsed.oga`,
  a bell rung in ~0.5 s bursts) scores as `background` in most windows, even after synthetic
  bells were added to training; tonal alarms (beeps, sirens, ringing tones, the held-out warning
  tone) are caught. This is why the bundled sample uses the repeated warning tone.
- Real held-out speech is one voice actor (Asterisk) plus two ALSA announcements; the rest is
  synthetic. Real held-out alarms are two freedesktop sounds; the rest are synthetic draws.
  Real rooms (TV, music, dogs, kitchens) were not available offline and are untested: music and
  TV speech will likely trigger `speech`, sustained musical tones may trigger `alarm`.
- Background streams are generated noise with real snippets; real-world false-trigger rates
  will be higher than the table.
- The front-end models' licence is ambiguous (see `models/frontends/NOTICE`): treat as
  CC BY-NC-SA 4.0.

## Rebuild
{REBUILD}"""


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

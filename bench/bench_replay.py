"""Replay speed and peak memory, measured on the real CLI in a child process.

    python bench/bench_replay.py            # vtest.avi (opencv-doc) with the default vision gate
Figures:
- speed: media seconds / wall seconds of `edgekeeper replay vtest.avi` (target >= 10x real time
  on a 2-core machine), next to the same run's decode-only speed (cv2 reading every frame) as the
  baseline the loop cannot beat;
- peak RSS of a replay of the bundled sample with BOTH default models loaded (target < 200 MB),
  next to the RSS of a bare interpreter process that only imports numpy, cv2 and LiteRT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from _common import SAMPLE, emit, video_path


def measure(argv: list[str]) -> tuple[float, float, str]:
    helper = (
        "import json,resource,subprocess,sys,time;"
        "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "w=time.perf_counter()-t;"
        "print(json.dumps({'wall':w,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        "'rc':p.returncode,'out':p.stdout,'err':p.stderr[-2000:]}))"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", helper, *argv], capture_output=True,
                                    text=True, check=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{argv} failed: {res['err']}")
    return res["wall"], res["rss"] / 1024.0, res["out"]


def decode_speed(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    n, t0 = 0, time.perf_counter()
    while cap.read()[0]:
        n += 1
    return (n / fps) / (time.perf_counter() - t0)


def main() -> None:
    video = video_path()
    exe = [sys.executable, "-m", "edgekeeper.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        wall, rss_video, out = measure(
            [*exe, "replay", str(video), "--no-progress", "--json", "--report", f"{tmp}/a"])
        media = json.loads(out)[0]["media_seconds"]
        _, rss_both, out_both = measure(
            [*exe, "replay", str(SAMPLE), "--no-progress", "--json", "--report", f"{tmp}/b"])
        models = json.loads(out_both)[0]["models"]
        _, rss_bare, _ = measure([sys.executable, "-c",
                                  "import numpy, cv2; "
                                  "from ai_edge_litert.interpreter import Interpreter"])
    emit("replay", {
        "video": str(video),
        "media_seconds": media,
        "wall_seconds_including_startup": round(wall, 2),
        "speed_x_realtime": round(media / wall, 1),
        "decode_only_x_realtime": round(decode_speed(video), 1),
        "target_speed": ">= 10x",
        "peak_rss_mb_both_models": round(rss_both, 1),
        "models_loaded": models,
        "peak_rss_mb_bare_imports": round(rss_bare, 1),
        "peak_rss_mb_vision_only_vtest": round(rss_video, 1),
        "target_rss": "< 200 MB",
    })


if __name__ == "__main__":
    main()

"""Training and held-out images for the person gate, built offline from opencv-doc's samples.

The only real footage with people is ``vtest.avi`` (768x576, 10 fps, a campus walkway seen from
a first-floor window; people are in every frame). So:

* **Split by time.** Frames ``[0, TRAIN_END)`` are trained on; frames ``[HELDOUT_START, end)``
  (the last ~25 %, about 20 s) are never seen in training; the gap between the two keeps
  near-duplicate neighbouring frames out of both sides.
* **Negatives the scene lacks.** A person-free *background plate* is the per-pixel temporal
  median of the training frames (walkers move, the median keeps the ground). Real training frames
  with their moving blobs painted over by the plate are "people removed" negatives that keep the
  real sensor noise and lighting of the scene. ``tree.avi`` (also split by time) and person-free
  photos give other scenes.
* **Positives beyond one scene.** People are cut out of training frames by background
  subtraction and pasted, alone or in groups, onto the negatives; that teaches "a person-shaped
  thing" rather than "anything differing from this one plate".

Held-out negatives are built the same way from held-out material only (their own plate, the last
quarter of tree.avi, photos never trained on).

* **Low light and night.** About half of all training images (both labels, so darkness never
  means "no person") are darkened to 3-80 % exposure, in sensor (linear) or pixel space, with
  shot and read noise, sometimes an automatic gain that amplifies the noise back up, and
  sometimes an infrared-like greyscale. ``darken`` is the same model for the brightness sweeps
  on the card.
* **People-like negatives.** Wallpapers from ``mate-backgrounds`` (flowers, leaves, drops: round
  and textured things) and textured ellipses, discs and blobs cut from person-free photos and
  pasted into still scenes teach that a round or textured shape is not a person.
* **Whole held-out sources.** ``lomiri-wallpapers`` and ``ukui-wallpapers`` never reach
  training: they give person-free scenes unlike the training footage, the same scenes with
  held-out walkers pasted in, and the stills of the 30+ minute person-free video
  (``person_free_video``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from edgekeeper.cloud.training.sources import OPENCV_DATA, require
from edgekeeper.errors import InputError

WIDTH, HEIGHT = 160, 120  # 4:3 like the camera; see the model card for why not 96x96
FRAME_SIZE = (768, 576)  # composites are made at vtest's resolution

VTEST = "vtest.avi"
TREE = "tree.avi"
TRAIN_FRACTION = 0.75
GAP_FRAMES = 10  # one second at 10 fps between the train and held-out parts

# Photos without people (checked by eye). Wide outdoor scenes matter most; the rest teach that
# texture, text and clutter are not people.
NEGATIVE_PHOTOS = (
    "aero1.jpg",
    "aero3.jpg",
    "building.jpg",
    "home.jpg",
    "leuvenA.jpg",
    "leuvenB.jpg",
    "licenseplate_motion.jpg",
    "aloeL.jpg",
    "aloeR.jpg",
    "apple.jpg",
    "baboon.jpg",
    "blox.jpg",
    "board.jpg",
    "box.png",
    "box_in_scene.png",
    "butterfly.jpg",
    "cards.png",
    "chessboard.png",
    "chicky_512.png",
    "ela_original.jpg",
    "fruits.jpg",
    "HappyFish.jpg",
    "imageTextN.png",
    "left.jpg",
    "right.jpg",
    "LinuxLogo.jpg",
    "notes.png",
    "orange.jpg",
    "pic1.png",
    "pic3.png",
    "pic5.png",
    "rubberwhale1.png",
    "rubberwhale2.png",
    "smarties.png",
    "squirrel_cls.jpg",
    "starry_night.jpg",
    "stuff.jpg",
    "sudoku.png",
    "text_defocus.jpg",
    "text_motion.jpg",
    "WindowsLogo.jpg",
    "gradient.png",
    "aloeGT.png",
    "Blender_Suzanne1.jpg",
)
# Photos with people: close-ups unlike the street camera, used as extra positives.
POSITIVE_PHOTOS = (
    "messi5.jpg",
    "basketball1.png",
    "basketball2.png",
    *(f"left{i:02d}.jpg" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)),
    *(f"right{i:02d}.jpg" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)),
)


BACKGROUNDS = Path("/usr/share/backgrounds")
# Trained on: mate-backgrounds (GPL-2+), photos and abstract art, many round or textured subjects.
MATE_BACKGROUNDS = (
    *(f"mate/nature/{n}.jpg" for n in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden",
                                       "GreenMeadow", "LadyBird", "RainDrops", "Storm",
                                       "TwoWings", "Wood", "YellowFlower")),
    "mate/abstract/Elephants.jpg", "mate/abstract/Flow.png", "mate/abstract/Gulp.png",
    "mate/desktop/Stripes.png", "mate/desktop/Ubuntu-Mate-Cold-no-logo.png",
    "mate/desktop/Ubuntu-Mate-Warm-no-logo.png", "mate/desktop/Float-into-MATE.png",
)
# Never trained on: two whole packages (checked by eye: no people).
HELDOUT_SOURCES = {
    # lomiri-wallpapers (CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0; per file in its copyright):
    # mostly photos: a bridge, a tree, mountains, a living room, brushes, a dandelion field.
    "lomiri-wallpapers": tuple(
        f"{n}.jpg" for n in (
            "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Kleiber_by_Lukas_Baubkus",
            "Picture_0B_by_freespace", "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede",
            "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
            "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi",
            "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
            "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
            "sunset_by_Aitzol_Berasategi", "Fossa_by_Jasper_Roks", "Infinite-Sea_by_Aury88",
            "Painting-Colors_by__herobrine7gamer",
        )
    ),
    # ukui-wallpapers (CC-BY-SA-3.0): illustrations and rendered abstract scenes.
    "ukui-wallpapers": (
        "2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg",
        "fluent-color.png", "focal-ubuntukylin.png", "goldfish.png", "rhythm.jpg",
        "rollpaper.png", "string.jpg", "the-mouse.jpg",
    ),
}


# Checked by eye (no people; paths under ``SCENE_ROOT``) and licence-recorded, but NOT trained
# on: more scenes for the person gate. Trained on in pairs (each crop once as it is and once
# with 1-3 training walkers pasted in; 12 crops each, photo crops cut from 30 to 20) on
# 2026-12-03, they raised walkers-in-unseen-scenes recall (int8, 100 % exposure 0.51 -> 0.67,
# worst of 100-35 % 0.49 -> 0.53, night 0.17 -> 0.23) but raised false triggers on the
# person-free video (68 -> 82 per hour) and lost held-out vtest recall at 10 % exposure
# (0.985 -> 0.71), so person@1.1.0 stayed (docs/models.md, "Attempts that did not ship").
# Not "Autumn" or "SafeLanding": a small figure is painted into each.
SCENE_ROOT = Path("/usr/share")
SCENES: dict[str, tuple[str, ...]] = {
    # Photos (a jetty, boats at sunset, a forest path, leaves, cups, a kite in the sky, a
    # seashore), rendered landscapes and abstract art.
    "plasma-workspace-wallpapers": tuple(
        f"wallpapers/{name}/contents/images/{size}" for name, size in (
            ("Altai", "5120x2880.png"), ("BytheWater", "2560x1600.jpg"),
            ("Canopee", "3840x2160.png"), ("Cascade", "3840x2160.png"),
            ("Cluster", "3840x2160.png"), ("ColdRipple", "2560x1600.jpg"),
            ("ColorfulCups", "2560x1600.jpg"), ("DarkestHour", "2560x1600.jpg"),
            ("Elarun", "2560x1600.png"), ("EveningGlow", "2560x1600.jpg"),
            ("FallenLeaf", "2560x1600.jpg"), ("Flow", "5120x2880.jpg"),
            ("FlyingKonqui", "2560x1600.png"), ("Grey", "2560x1600.jpg"),
            ("Honeywave", "5120x2880.jpg"), ("IceCold", "5120x2880.png"),
            ("Kite", "2560x1600.jpg"), ("Kokkini", "3840x2160.png"),
            ("MilkyWay", "5120x2880.png"), ("OneStandsOut", "2560x1600.jpg"),
            ("Opal", "3840x2160.png"), ("PastelHills", "3200x2000.jpg"),
            ("Patak", "5120x2880.png"), ("Path", "2560x1600.jpg"),
            ("Shell", "5120x2880.jpg"), ("Volna", "5120x2880.jpg"),
            ("summer_1am", "2560x1600.jpg"),
        )
    ),
    # Patterns: tiles, pixels, wood, a grid; texture without any scene.
    "gnome-backgrounds": tuple(
        f"backgrounds/gnome/{n}-l.webp"
        for n in ("adwaita", "grid", "licorice", "pixels", "truchet", "vnc", "wood")
    ),
    "sway-backgrounds": ("backgrounds/sway/Sway_Wallpaper_Blue_2048x1536.png",),
}
SCENE_LICENCES = {
    "plasma-workspace-wallpapers": "GPL-2+ (KDE Visual Design Group, per its copyright)",
    "gnome-backgrounds": "GPL-2+, CC-BY-SA-3.0 and CC-BY(-SA)-2.0 (per file in its copyright)",
    "sway-backgrounds": "Expat (per its copyright)",
}


def _background(name: str, package: str) -> np.ndarray:
    path = BACKGROUNDS / name
    img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if img is None:
        raise InputError(
            f"training data file {path} does not exist or is not an image",
            fix=f"apt-get install {package}",
        )
    return fit_frame(img)


def check_backgrounds() -> None:
    """Fail fast (before any slow step) when a wallpaper package is missing."""
    for name in MATE_BACKGROUNDS:
        if not (BACKGROUNDS / name).is_file():
            raise InputError(f"{BACKGROUNDS / name} does not exist",
                             fix="apt-get install mate-backgrounds")
    for package, names in HELDOUT_SOURCES.items():
        for name in names:
            if not (BACKGROUNDS / name).is_file():
                raise InputError(f"{BACKGROUNDS / name} does not exist",
                                 fix=f"apt-get install {package}")


def heldout_file(name: str, every: int = 4) -> bool:
    """Whole files are held out by a stable hash of their name, independent of the seed.

    Stable so that the held-out set (and the sample recording built from it) does not move when
    someone retrains with another seed.
    """
    return zlib.crc32(name.encode()) % every == 0


def read_video(path: Path) -> np.ndarray:
    """All frames of a video as ``(N, H, W, 3)`` BGR uint8."""
    cap = cv2.VideoCapture(str(require(path)))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise FileNotFoundError(f"OpenCV read no frames from {path}")
    return np.stack(frames)


def time_split(n_frames: int) -> tuple[range, range]:
    """Train and held-out frame indices: the first 75 % and the last part after a gap."""
    train_end = int(n_frames * TRAIN_FRACTION)
    return range(0, train_end - GAP_FRAMES), range(train_end, n_frames)


def background_plate(frames: np.ndarray) -> np.ndarray:
    """Per-pixel temporal median: walkers move on, the ground stays."""
    step = max(1, len(frames) // 150)  # 150 frames give a clean median and bound memory
    plate: np.ndarray = np.median(frames[::step], axis=0).astype(np.uint8)
    return plate


_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def foreground_mask(frame: np.ndarray, plate: np.ndarray, threshold: int = 35) -> np.ndarray:
    """Pixels that differ from the plate (people, their shadows), cleaned of speckle."""
    diff = np.abs(frame.astype(np.int16) - plate.astype(np.int16)).max(axis=2)
    mask = (diff > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _KERNEL)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _KERNEL, iterations=2)


@dataclass(frozen=True)
class Cutout:
    """A person (or small group) cut out of a frame: BGR pixels and a 0/1 mask."""

    pixels: np.ndarray
    mask: np.ndarray


def cutouts(frame: np.ndarray, plate: np.ndarray) -> list[Cutout]:
    """Person-sized foreground blobs of one frame."""
    mask = foreground_mask(frame, plate)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        # Walkers here are 25-150 px tall and taller than wide; smaller blobs are noise.
        if area < 250 or h < 25 or h < 1.2 * w:
            continue
        sub = (labels[y : y + h, x : x + w] == i).astype(np.uint8)
        out.append(Cutout(frame[y : y + h, x : x + w].copy(), sub))
    return out


def remove_people(frame: np.ndarray, plate: np.ndarray) -> np.ndarray:
    """The frame with every moving blob (generously dilated) replaced by the plate."""
    mask = cv2.dilate(foreground_mask(frame, plate), _KERNEL, iterations=4).astype(bool)
    out = frame.copy()
    out[mask] = plate[mask]
    return out


def paste(background: np.ndarray, people: Iterable[Cutout], rng: np.random.Generator) -> np.ndarray:
    """Paste cutouts at random places and scales; feet stay inside the frame."""
    out = background.copy()
    h_bg, w_bg = out.shape[:2]
    for person in people:
        scale = rng.uniform(0.6, 1.6)
        w = max(4, int(person.pixels.shape[1] * scale))
        h = max(8, int(person.pixels.shape[0] * scale))
        if w >= w_bg or h >= h_bg:
            continue
        pix = cv2.resize(person.pixels, (w, h), interpolation=cv2.INTER_LINEAR)
        msk = cv2.resize(person.mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        x = int(rng.integers(0, w_bg - w))
        y = int(rng.integers(0, h_bg - h))
        region = out[y : y + h, x : x + w]
        region[msk] = pix[msk]
    return out


def jitter_geometry(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small shift/zoom/flip: a camera mounted a little differently."""
    h, w = img.shape[:2]
    scale = rng.uniform(0.92, 1.12)
    tx, ty = rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h
    m = np.array([[scale, 0, (1 - scale) * w / 2 + tx], [0, scale, (1 - scale) * h / 2 + ty]])
    out = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return out[:, ::-1] if rng.random() < 0.5 else out


def random_crop(img: np.ndarray, rng: np.random.Generator, max_zoom: float = 2.5) -> np.ndarray:
    """A random part of a photo stretched back to full size: many scenes from one photo."""
    h, w = img.shape[:2]
    zoom = rng.uniform(1.0, max_zoom)
    ch, cw = int(h / zoom), int(w / zoom * rng.uniform(0.8, 1.25))
    cw = min(cw, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return cv2.resize(img[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def shrink(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """BGR frame -> model-size RGB uint8.

    Training randomly uses area or bilinear interpolation: the device runtime picks its own
    resize, and a gate that only works with one of them would be fragile.
    """
    interp = cv2.INTER_AREA
    if rng is not None and rng.random() < 0.4:
        interp = cv2.INTER_LINEAR
    return cv2.resize(img, (WIDTH, HEIGHT), interpolation=interp)[..., ::-1]


def jitter_photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance and sensor noise at model size (uint8 in, uint8 out)."""
    f: np.ndarray = x.astype(np.float32)
    gain = rng.uniform(0.6, 1.4) * rng.uniform(0.9, 1.1, size=3)
    f = f * gain + rng.uniform(-25, 25)
    if rng.random() < 0.3:
        f = (f - f.mean()) * rng.uniform(0.7, 1.2) + f.mean()  # contrast
    if rng.random() < 0.6:
        f = f + rng.normal(0, rng.uniform(1, 8), size=f.shape)
    if rng.random() < 0.15:
        f = cv2.GaussianBlur(f, (3, 3), 0)  # focus / compression blur
    return np.clip(f, 0, 255).astype(np.uint8)


def darken(
    img: np.ndarray,
    exposure: float,
    rng: np.random.Generator | None = None,
    *,
    linear: bool = False,
    shot: float = 0.0,
    read: float = 0.0,
    gain: float = 1.0,
    grey: bool = False,
) -> np.ndarray:
    """Less light on the sensor (uint8 in, uint8 out, any size, 3 channels).

    ``exposure`` scales pixel values (``linear=False``: the harsher case, what dimming a video
    does) or the light in linear sensor units (``linear=True``: gamma 2.2, what a real camera
    sees). Then sensor noise: shot noise with variance ``shot * value`` and read noise ``read``
    (grey levels); then a camera's automatic ``gain``, which brings the level back up and the
    noise with it; ``grey`` makes a one-channel infrared-like picture (noise is then per pixel,
    not per channel, as on a monochrome sensor).
    """
    f: np.ndarray = img.astype(np.float32)
    lin = 255.0 * (np.power(f / 255.0, 2.2) * exposure) ** (1 / 2.2) if linear else None
    f = lin if lin is not None else f * exposure
    if grey:
        f = f.mean(axis=2, keepdims=True)
    if shot or read:
        if rng is None:
            raise ValueError("darken: noise needs an rng")
        f = f + rng.standard_normal(f.shape, dtype=np.float32) * np.sqrt(shot * f + read * read)
    f = f * gain
    if grey:
        f = np.repeat(f, 3, axis=2)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


# Brightness sweeps on the card: (name, darken keyword arguments). "night" is a dark scene
# through a camera at high gain (noisy, infrared-like grey); "night-dark" the same without gain.
SWEEP: tuple[tuple[str, dict[str, Any]], ...] = (
    ("100%", {"exposure": 1.0}),
    ("70%", {"exposure": 0.7}),
    ("50%", {"exposure": 0.5}),
    ("35%", {"exposure": 0.35}),
    ("20%", {"exposure": 0.2}),
    ("10%", {"exposure": 0.1}),
    ("night", {"exposure": 0.05, "shot": 1.0, "read": 2.0, "gain": 6.0, "grey": True}),
    ("night-dark", {"exposure": 0.05, "shot": 1.0, "read": 2.0, "grey": True}),
)


def low_light(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random dusk-to-night version of a model-size image (training augmentation)."""
    exposure = float(np.exp(rng.uniform(np.log(0.025), np.log(0.8))))
    noisy = rng.random() < 0.7
    gain = 1.0
    if rng.random() < 0.35:  # automatic gain brings it back up with the noise
        gain = float(rng.uniform(1.0, max(1.0, min(10.0, 0.6 / exposure))))
    return darken(
        x,
        exposure,
        rng,
        linear=bool(rng.random() < 0.5),
        shot=float(rng.uniform(0.1, 1.5)) if noisy else 0.0,
        read=float(rng.uniform(0.3, 3.0)) if noisy else 0.0,
        gain=gain,
        grey=bool(rng.random() < 0.35),
    )


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric jitter, then low light for about half the images (of both labels)."""
    x = jitter_photometric(x, rng)
    return low_light(x, rng) if rng.random() < LOW_LIGHT_SHARE else x


LOW_LIGHT_SHARE = 0.5


def paste_shapes(
    background: np.ndarray, textures: list[np.ndarray], rng: np.random.Generator, k: int
) -> np.ndarray:
    """Paste ``k`` textured discs, ellipses, rounded boxes and blobs: people-like, not people."""
    out = background.copy()
    h_bg, w_bg = out.shape[:2]
    for _ in range(k):
        h = int(np.exp(rng.uniform(np.log(15), np.log(260))))
        w = max(6, int(h * np.exp(rng.uniform(np.log(0.25), np.log(2.5)))))
        if w >= w_bg or h >= h_bg:
            continue
        mask = np.zeros((h, w), np.uint8)
        kind = rng.integers(4)
        if kind == 0:  # ellipse / disc
            cv2.ellipse(mask, (w // 2, h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
        elif kind == 1:  # rounded box
            r = max(1, min(w, h) // 3)
            cv2.rectangle(mask, (r, 0), (w - r, h), 1, -1)
            cv2.rectangle(mask, (0, r), (w, h - r), 1, -1)
            for cx, cy in ((r, r), (w - r, r), (r, h - r), (w - r, h - r)):
                cv2.circle(mask, (cx, cy), r, 1, -1)
        elif kind == 2:  # blob: a thresholded smooth noise field
            field = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), max(2, w / 5))
            mask = (field > np.median(field)).astype(np.uint8)
        else:  # stacked discs (a snowman, a bin with a lid, a head on shoulders-like shape)
            cv2.ellipse(mask, (w // 2, int(h * 0.7)), (w // 2, int(h * 0.3)), 0, 0, 360, 1, -1)
            cv2.circle(mask, (w // 2, int(h * 0.25)), max(2, min(w // 3, h // 4)), 1, -1)
        tex = textures[int(rng.integers(len(textures)))]
        th, tw = tex.shape[:2]
        zoom = rng.uniform(0.3, 1.0)
        ch, cw = max(2, int(th * zoom * h / h_bg)), max(2, int(tw * zoom * w / w_bg))
        ty, tx = int(rng.integers(0, th - ch + 1)), int(rng.integers(0, tw - cw + 1))
        patch = cv2.resize(tex[ty : ty + ch, tx : tx + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:  # shading: a lit side and a dark side, like a real round object
            ramp = np.linspace(rng.uniform(0.5, 1.0), rng.uniform(1.0, 1.4), w, dtype=np.float32)
            patch = np.clip(patch * ramp[None, :, None], 0, 255).astype(np.uint8)
        x = int(rng.integers(0, w_bg - w))
        y = int(rng.integers(0, h_bg - h))
        region = out[y : y + h, x : x + w]
        region[mask.astype(bool)] = patch[mask.astype(bool)]
    return out


def fit_frame(img: np.ndarray) -> np.ndarray:
    """Any photo stretched to the composite resolution (the gate stretches too)."""
    return cv2.resize(img, FRAME_SIZE, interpolation=cv2.INTER_AREA)


@dataclass
class ImageSet:
    """Model-size RGB images, labels (1 = person) and the source of each image."""

    x: list[np.ndarray] = field(default_factory=list)
    y: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)

    def add(self, img: np.ndarray, label: int, source: str) -> None:
        self.x.append(img)
        self.y.append(label)
        self.source.append(source)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.stack(self.x), np.asarray(self.y, dtype=np.int64), np.asarray(self.source)


@dataclass(frozen=True)
class VisionData:
    """Everything the vision recipe trains and evaluates on."""

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    heldout: tuple[np.ndarray, np.ndarray, np.ndarray]
    heldout_vtest_frames: range  # indices in vtest.avi never trained on (for the sample)
    summary: dict[str, int]
    # Whole sources never trained on: name -> (images, labels); "<package>" person-free crops,
    # "<package>+walkers" the same crops with held-out vtest walkers pasted in.
    heldout_sources: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _photos(names: Iterable[str]) -> list[tuple[str, np.ndarray]]:
    out = []
    for name in names:
        img = cv2.imread(str(require(OPENCV_DATA / name)), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"OpenCV cannot read {OPENCV_DATA / name}")
        out.append((name, fit_frame(img)))
    return out


def build(seed: int = 0, *, progress: bool = True) -> VisionData:
    """Deterministic train / held-out image sets (same seed, same arrays)."""
    rng = np.random.default_rng(seed)
    vtest = read_video(OPENCV_DATA / VTEST)
    tree = np.stack([fit_frame(f) for f in read_video(OPENCV_DATA / TREE)])
    v_train, v_held = time_split(len(vtest))
    t_train, t_held = time_split(len(tree))
    plate = background_plate(vtest[v_train.start : v_train.stop])
    held_plate = background_plate(vtest[v_held.start : v_held.stop])

    mate = [_background(n, "mate-backgrounds") for n in MATE_BACKGROUNDS]
    neg_photos = _photos(NEGATIVE_PHOTOS)
    pos_photos = _photos(POSITIVE_PHOTOS)
    neg_train = [img for name, img in neg_photos if not heldout_file(name)]
    neg_held = [(name, img) for name, img in neg_photos if heldout_file(name)]
    pos_train = [img for name, img in pos_photos if not heldout_file(name)]
    pos_held = [(name, img) for name, img in pos_photos if heldout_file(name)]

    train = ImageSet()
    bar = tqdm(total=8, desc="vision data", disable=not progress)

    # Real positives: every training frame, twice with different jitter.
    people: list[Cutout] = []
    for i in v_train:
        people.extend(cutouts(vtest[i], plate))
        for _ in range(2):
            img = jitter_geometry(vtest[i], rng)
            train.add(augment(shrink(img, rng), rng), 1, "vtest")
    bar.update()

    # Real negatives from the same scene: plate variants and training frames with people removed.
    for i in v_train:
        img = jitter_geometry(remove_people(vtest[i], plate), rng)
        train.add(augment(shrink(img, rng), rng), 0, "vtest-people-removed")
    for _ in range(300):
        img = jitter_geometry(plate, rng)
        train.add(augment(shrink(img, rng), rng), 0, "vtest-plate")
    bar.update()

    # Other scenes without people.
    backgrounds = [plate, *neg_train, *mate, *(tree[i] for i in t_train)]
    for i in t_train:
        train.add(augment(shrink(jitter_geometry(tree[i], rng), rng), rng), 0, "tree")
    for img in neg_train:
        for _ in range(30):
            aug = jitter_geometry(random_crop(img, rng), rng)
            train.add(augment(shrink(aug, rng), rng), 0, "photo")
    for img in mate:
        for _ in range(30):
            aug = jitter_geometry(random_crop(img, rng), rng)
            train.add(augment(shrink(aug, rng), rng), 0, "mate-backgrounds")
    bar.update()

    # People-like negatives: textured round shapes and blobs in still scenes (plates, frames
    # with people removed, photos), so "a textured thing of person size" is not enough.
    textures = [*neg_train, *mate]
    stills = [plate, *neg_train, *mate, *(tree[i] for i in t_train)]
    for j in range(1200):
        if j % 3 == 0:
            bg = remove_people(vtest[v_train[int(rng.integers(len(v_train)))]], plate)
        else:
            bg = random_crop(stills[int(rng.integers(len(stills)))], rng, 1.8)
        img = paste_shapes(jitter_geometry(bg, rng), textures, rng, int(rng.integers(1, 6)))
        train.add(augment(shrink(img, rng), rng), 0, "shapes")
    bar.update()

    # Composites: 1-6 real walkers on a person-free background, often just one small figure,
    # because a single distant person is the case the gate must not miss.
    for _ in range(2400):
        bg = random_crop(backgrounds[int(rng.integers(len(backgrounds)))], rng, 1.8)
        k = 1 if rng.random() < 0.5 else int(rng.integers(2, 7))
        chosen = [people[int(j)] for j in rng.integers(0, len(people), size=k)]
        if rng.random() < 0.3:  # the same distractors appear beside people too
            bg = paste_shapes(bg, textures, rng, int(rng.integers(1, 4)))
        img = paste(jitter_geometry(bg, rng), chosen, rng)
        train.add(augment(shrink(img, rng), rng), 1, "composite")
    for img in pos_train:
        for _ in range(8):
            aug = jitter_geometry(img, rng)
            train.add(augment(shrink(aug, rng), rng), 1, "photo-person")
    bar.update()

    # Held out: real frames and real other-scene footage, untouched by augmentation.
    held = ImageSet()
    for i in v_held:
        held.add(shrink(vtest[i]), 1, "vtest")
        held.add(shrink(remove_people(vtest[i], held_plate)), 0, "vtest-people-removed")
    for i in t_held:
        held.add(shrink(tree[i]), 0, "tree")
    for _name, img in neg_held:
        held.add(shrink(img), 0, "photo")
    for _name, img in pos_held:
        held.add(shrink(img), 1, "photo-person")
    bar.update()

    # Whole held-out sources: 8 crops of every wallpaper, and the same crops with 1-3 walkers
    # cut from held-out vtest frames (never trained on) pasted in.
    held_people = [c for i in v_held for c in cutouts(vtest[i], held_plate)]
    hrng = np.random.default_rng(1_000_003 + seed)
    held_sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for package, names in HELDOUT_SOURCES.items():
        neg, pos = [], []
        for name in names:
            img = _background(name, package)
            for _ in range(8):
                crop = random_crop(img, hrng, 2.0)
                neg.append(shrink(crop))
                k = int(hrng.integers(1, 4))
                chosen = [held_people[int(j)] for j in hrng.integers(0, len(held_people), size=k)]
                pos.append(shrink(paste(crop, chosen, hrng)))
        held_sources[package] = (np.stack(neg), np.zeros(len(neg), np.int64))
        held_sources[f"{package}+walkers"] = (np.stack(pos), np.ones(len(pos), np.int64))
    bar.update()

    tx, ty, ts = train.arrays()
    perm = rng.permutation(len(ty))
    hx, hy, hs = held.arrays()
    bar.update()
    bar.close()
    summary = {
        "train_images": len(ty),
        "train_person": int(ty.sum()),
        "heldout_images": len(hy),
        "heldout_person": int(hy.sum()),
        "vtest_train_frames": len(v_train),
        "vtest_heldout_frames": len(v_held),
        "person_cutouts": len(people),
        "heldout_person_cutouts": len(held_people),
        **{f"train_{src}": int(np.sum(ts == src)) for src in ("mate-backgrounds", "shapes")},
    }
    return VisionData(
        (tx[perm], ty[perm], ts[perm]), (hx, hy, hs), v_held, summary, held_sources
    )


VIDEO_SIZE = (320, 240)  # the person-free video is rendered at this size, then shrunk as usual
SECONDS_PER_STILL = 72.0  # 30 stills of the two held-out packages: 36 minutes at 10 fps


def person_free_video(
    fps: float = 10.0, seed: int = 0, *, progress: bool = True
) -> Iterable[tuple[str, np.ndarray]]:
    """Continuous person-free footage made from held-out stills with camera-like motion.

    Every still of ``HELDOUT_SOURCES`` (never trained on) is shown for ``SECONDS_PER_STILL``,
    one after the other, each as a sequence of shots of 6-20 s: a slow pan across the picture, a
    slow zoom in or out, a still shot, or a light change (exposure falling to 5-30 % and back,
    the darkest part with sensor noise and camera gain). Every frame gets fresh sensor noise
    (read noise 1-3 grey levels), so even a still shot is never two equal frames. Yields
    ``(package, BGR frame at VIDEO_SIZE)``.
    """
    rng = np.random.default_rng(2_000_029 + seed)
    stills = [(pkg, name) for pkg, names in HELDOUT_SOURCES.items() for name in names]
    per_still = int(SECONDS_PER_STILL * fps)
    bar = tqdm(total=per_still * len(stills), desc="person-free video", disable=not progress)
    out_w, out_h = VIDEO_SIZE
    for package, name in stills:
        img = _background(name, package)
        h, w = img.shape[:2]
        left = per_still
        while left > 0:
            n = min(left, int(rng.uniform(6, 20) * fps))
            left -= n
            kind = ["pan", "zoom", "still", "light"][int(rng.integers(4))]
            z0 = rng.uniform(1.0, 2.2)
            z1 = rng.uniform(1.0, 2.2) if kind == "zoom" else z0
            c0 = rng.uniform(0.3, 0.7, size=2)
            c1 = rng.uniform(0.3, 0.7, size=2) if kind == "pan" else c0
            dim = rng.uniform(0.05, 0.3)
            read = rng.uniform(1.0, 3.0)
            for i in range(n):
                a = i / max(1, n - 1)
                zoom = z0 + (z1 - z0) * a
                cx, cy = (c0 + (c1 - c0) * a) * (w, h)
                cw, ch = w / zoom, h / zoom
                cx = float(np.clip(cx, cw / 2, w - cw / 2))
                cy = float(np.clip(cy, ch / 2, h - ch / 2))
                sx, sy = out_w / cw, out_h / ch
                m = np.array([[sx, 0, out_w / 2 - sx * cx], [0, sy, out_h / 2 - sy * cy]])
                frame = cv2.warpAffine(img, m, VIDEO_SIZE, flags=cv2.INTER_AREA)
                exposure, gain = 1.0, 1.0
                if kind == "light":  # down and back up, like a cloud or a light switched off
                    exposure = 1.0 - (1.0 - dim) * np.sin(np.pi * a)
                    gain = min(4.0, 0.5 / exposure) if exposure < 0.5 else 1.0
                yield package, darken(frame, exposure, rng, shot=0.5, read=read, gain=gain)
                bar.update()
    bar.close()

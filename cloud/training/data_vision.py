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
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edgekeeper.cloud.training.sources import OPENCV_DATA, require

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
    return np.median(frames[::step], axis=0).astype(np.uint8)


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
    f = x.astype(np.float32)
    gain = rng.uniform(0.6, 1.4) * rng.uniform(0.9, 1.1, size=3)
    f = f * gain + rng.uniform(-25, 25)
    if rng.random() < 0.3:
        f = (f - f.mean()) * rng.uniform(0.7, 1.2) + f.mean()  # contrast
    if rng.random() < 0.6:
        f = f + rng.normal(0, rng.uniform(1, 8), size=f.shape)
    if rng.random() < 0.15:
        f = cv2.GaussianBlur(f, (3, 3), 0)  # focus / compression blur
    return np.clip(f, 0, 255).astype(np.uint8)


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

    neg_photos = _photos(NEGATIVE_PHOTOS)
    pos_photos = _photos(POSITIVE_PHOTOS)
    neg_train = [img for name, img in neg_photos if not heldout_file(name)]
    neg_held = [(name, img) for name, img in neg_photos if heldout_file(name)]
    pos_train = [img for name, img in pos_photos if not heldout_file(name)]
    pos_held = [(name, img) for name, img in pos_photos if heldout_file(name)]

    train = ImageSet()
    bar = tqdm(total=6, desc="vision data", disable=not progress)

    # Real positives: every training frame, twice with different jitter.
    people: list[Cutout] = []
    for i in v_train:
        people.extend(cutouts(vtest[i], plate))
        for _ in range(2):
            img = jitter_geometry(vtest[i], rng)
            train.add(jitter_photometric(shrink(img, rng), rng), 1, "vtest")
    bar.update()

    # Real negatives from the same scene: plate variants and training frames with people removed.
    for i in v_train:
        img = jitter_geometry(remove_people(vtest[i], plate), rng)
        train.add(jitter_photometric(shrink(img, rng), rng), 0, "vtest-people-removed")
    for _ in range(300):
        img = jitter_geometry(plate, rng)
        train.add(jitter_photometric(shrink(img, rng), rng), 0, "vtest-plate")
    bar.update()

    # Other scenes without people.
    backgrounds = [plate, *neg_train, *(tree[i] for i in t_train)]
    for i in t_train:
        train.add(jitter_photometric(shrink(jitter_geometry(tree[i], rng), rng), rng), 0, "tree")
    for img in neg_train:
        for _ in range(30):
            aug = jitter_geometry(random_crop(img, rng), rng)
            train.add(jitter_photometric(shrink(aug, rng), rng), 0, "photo")
    bar.update()

    # Composites: 1-6 real walkers on a person-free background, often just one small figure,
    # because a single distant person is the case the gate must not miss.
    for _ in range(2000):
        bg = random_crop(backgrounds[int(rng.integers(len(backgrounds)))], rng, 1.8)
        k = 1 if rng.random() < 0.5 else int(rng.integers(2, 7))
        chosen = [people[int(j)] for j in rng.integers(0, len(people), size=k)]
        img = paste(jitter_geometry(bg, rng), chosen, rng)
        train.add(jitter_photometric(shrink(img, rng), rng), 1, "composite")
    for img in pos_train:
        for _ in range(8):
            aug = jitter_geometry(img, rng)
            train.add(jitter_photometric(shrink(aug, rng), rng), 1, "photo-person")
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
    }
    return VisionData((tx[perm], ty[perm], ts[perm]), (hx, hy, hs), v_held, summary)

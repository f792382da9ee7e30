"""Synthetic five-task data: the project's embedded default (no downloads), one analogue per benchmark.

    synthetic_blur      "defocus background"  a busy scene, Gaussian-blurred except one or two sharp in-focus regions;
                                           fg = blurred region (defocus background), as in CUHK's ground truth
    synthetic_shadow    "shadow"           textured ground, objects casting soft darkening shadows (fg = shadow)
    synthetic_glass     "glass"            a framed (rounded) rectangular panel refracting the scene (fg = panel)
    synthetic_saliency  "salient objects"  low-contrast clutter plus one or two high-contrast objects (fg)
    synthetic_shapes    "star"             circles/squares/triangles/stars/crosses; fg = every star

Each task folder is in the generic layout (``readers``):
    out_dir/{train,test}/images/<id>.png   (H, W, 3) uint8 RGB, long side 256..512, aspect (W/H) 0.6..1.7
    out_dir/{train,test}/masks/<id>.png    (H, W) uint8, 0 background / 255 foreground (5%..50% foreground;
                                           synthetic_blur 50%..95%: the blurred complement of 5%..50% in focus)
    out_dir/dataset.json                   {"task", "text", "invert", "threshold", "generator": {...}}
Image i of a split is drawn from ``np.random.default_rng([NAMESPACE, task_index, seed, split_index, i])``,
so a seed gives byte-identical files. numpy + PIL only, ~10-20 ms an image.
"""
from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .samples import TASK_TEXT, VOC_CLASSES, DataError

__all__ = ["SYNTHETIC_TASKS", "NAMESPACE", "GENERATOR_VERSION", "generate_task", "generate_all"]

SYNTHETIC_TASKS = ("synthetic_blur", "synthetic_shadow", "synthetic_glass", "synthetic_saliency", "synthetic_shapes")
NAMESPACE = 0xDA7A5E7  # this generator's own seed namespace (0x5A11 is used elsewhere)
# bump when the pictures change: folders made by another version are regenerated
# 2: synthetic_blur's foreground is the blurred region (was: the sharp in-focus regions); images unchanged
GENERATOR_VERSION = 2
SPLITS = ("train", "test")
FG_RANGE = (0.05, 0.50)  # accepted foreground fraction of a mask
# synthetic_blur: 5%..50% of the picture in focus, so its foreground (the blurred rest) covers 50%..95%
_FG_RANGES = {"synthetic_blur": (1 - FG_RANGE[1], 1 - FG_RANGE[0])}
_MAX_TRIES = 60

Array = np.ndarray


# ------------------------------------------------------------------------------------ primitives
def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(H, W): long side 256..512, aspect W/H in 0.6..1.7."""
    long_side, aspect = int(rng.integers(256, 513)), float(rng.uniform(0.6, 1.7))
    if aspect >= 1:
        return max(64, round(long_side / aspect)), long_side
    return long_side, max(64, round(long_side * aspect))


def _noise(rng: np.random.Generator, h: int, w: int, cell: float, channels: int = 3) -> Array:
    """Smooth value noise: (H, W, channels) float32 in [0, 1], features about ``cell`` pixels wide."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 1), max(2, int(np.ceil(w / cell)) + 1)
    small = rng.integers(0, 256, (gh, gw, channels), dtype=np.uint8)
    layers = [np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC)) for c in range(channels)]
    return np.stack(layers, axis=-1).astype(np.float32) / 255.0


def _colour(rng: np.random.Generator, sat=(0.4, 1.0), val=(0.35, 1.0)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val))
    return int(r * 255), int(g * 255), int(b * 255)


def _rotate(pts: Array, angle: float, cx: float, cy: float) -> Array:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + pts[:, 0] * c - pts[:, 1] * s, cy + pts[:, 0] * s + pts[:, 1] * c], axis=1)


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 64) -> Array:
    """An irregular smooth closed outline: (n, 2) float (x, y), area about pi * r**2."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 5):
        rad += rng.uniform(0, 0.35 / k) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    stretch = np.sqrt(rng.uniform(0.6, 1.6))
    pts = np.stack([r * rad * np.cos(t) * stretch, r * rad * np.sin(t) / stretch], axis=1)
    return _rotate(pts, rng.uniform(0, np.pi), cx, cy)


def _polys_mask(h: int, w: int, polys: list[Array]) -> Array:
    """Filled polygons -> (H, W) bool."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for p in polys:
        draw.polygon(p.ravel().tolist(), fill=255)
    return np.asarray(img) > 0


def _hull(pts: Array) -> Array:
    """Convex hull (monotone chain): (n, 2) -> (k, 2) counter-clockwise."""
    pts = sorted(map(tuple, pts.tolist()))

    def half(points):
        out = []
        for p in points:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _scene(rng: np.random.Generator, h: int, w: int) -> Array:
    """A busy textured scene with edges at every scale: (H, W, 3) uint8."""
    base = 255 * (0.2 + 0.6 * _noise(rng, h, w, rng.uniform(60, 140)))
    mid = (_noise(rng, h, w, rng.uniform(5, 14)) - 0.5) * rng.uniform(50, 90)
    grain = (rng.random((h, w, 1), dtype=np.float32) - 0.5) * rng.uniform(30, 60)
    img = Image.fromarray(np.clip(base + mid + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 35))):
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * h)
        kind, colour = rng.integers(3), _colour(rng)
        if kind == 0:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + (x1 - x0) / 3, y0 + (y1 - y0) / 3], outline=colour, width=int(rng.integers(1, 4)))
        else:
            draw.ellipse([x0, y0, x0 + (x1 - x0) / 4, y0 + (y1 - y0) / 4], fill=colour)
    return np.asarray(img)


def _centre(rng: np.random.Generator, h: int, w: int, margin: float) -> tuple[float, float]:
    """A random point at least ``margin`` pixels inside the image (or its middle, if it is too small)."""
    mx, my = min(margin, w / 2), min(margin, h / 2)
    return float(rng.uniform(mx, w - mx)), float(rng.uniform(my, h - my))


# ----------------------------------------------------------------------------------------- tasks
def _blur(rng: np.random.Generator, h: int, w: int) -> tuple[Array, Array]:
    """Defocus: the scene blurred everywhere except one or two in-focus regions.

    fg = blurred region (defocus background): the complement of the in-focus regions, as CUHK's
    ground truth marks the blurred region white and the paper's prompt is "defocus background".
    """
    sharp = _scene(rng, h, w)
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(rng.uniform(2.5, 5.0))))
    n = 1 if rng.random() < 0.65 else 2
    area = rng.uniform(0.10, 0.38) * h * w / n
    r = np.sqrt(area / np.pi)
    in_focus = _polys_mask(h, w, [_blob(rng, *_centre(rng, h, w, 0.8 * r), r) for _ in range(n)])
    alpha = np.asarray(Image.fromarray(in_focus.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.8)), np.float32)[..., None] / 255
    image = sharp * alpha + blurred * (1 - alpha)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), ~in_focus


def _shadow(rng: np.random.Generator, h: int, w: int) -> tuple[Array, Array]:
    """Objects on textured ground cast soft multiplicative shadows (fg = shadow, not the objects)."""
    tone = np.array(_colour(rng, sat=(0.05, 0.35), val=(0.55, 0.9)), np.float32)
    ground = tone * (0.75 + 0.5 * _noise(rng, h, w, rng.uniform(40, 120), 1))
    ground += (_noise(rng, h, w, rng.uniform(3, 8)) - 0.5) * rng.uniform(30, 60)
    ground += (rng.random((h, w, 1), dtype=np.float32) - 0.5) * rng.uniform(20, 40)
    m = min(h, w)
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.45) * m
    offset = np.array([np.cos(angle), np.sin(angle)]) * length
    objects, shadows = [], []
    for _ in range(int(rng.integers(1, 4))):
        outline = _blob(rng, *_centre(rng, h, w, 0.1 * m), rng.uniform(0.06, 0.14) * m, n=32)
        objects.append(outline)
        shadows.append(_hull(np.concatenate([outline, outline + offset * rng.uniform(0.7, 1.3)])))
    if rng.random() < 0.3:  # a shadow whose caster is out of the frame
        edge = _blob(rng, *(rng.uniform(0, 1, 2) * [w, h]), rng.uniform(0.1, 0.2) * m, n=32)
        shadows.append(_hull(np.concatenate([edge, edge + offset])))
    region = Image.fromarray(_polys_mask(h, w, shadows).astype(np.uint8) * 255)
    alpha = np.asarray(region.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.5))), np.float32) / 255
    darkness = rng.uniform(0.35, 0.6) * np.array([0.92, 0.97, 1.08], np.float32)  # shadows are a little blue
    image = ground * (1 - alpha[..., None] * (1 - np.minimum(darkness, 1)))
    img = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for outline in objects:
        draw.polygon(outline.ravel().tolist(), fill=_colour(rng, val=(0.4, 1.0)), outline=_colour(rng, val=(0.1, 0.4)))
    mask = (alpha >= 0.5) & ~_polys_mask(h, w, objects)
    return np.asarray(img), mask


def _glass(rng: np.random.Generator, h: int, w: int) -> tuple[Array, Array]:
    """A framed glass panel refracting the scene behind it: shifted/warped, tinted, highlit (fg = panel)."""
    scene = _scene(rng, h, w)
    frac, aspect = rng.uniform(0.10, 0.40), rng.uniform(0.5, 2.0)
    pw = min(0.9 * w, np.sqrt(frac * h * w * aspect))
    ph = min(0.9 * h, frac * h * w / pw)
    x0, y0 = rng.uniform(0.04 * w, w - pw - 0.04 * w), rng.uniform(0.04 * h, h - ph - 0.04 * h)
    box = [x0, y0, x0 + pw, y0 + ph]
    radius = int(rng.uniform(0, 0.2) * min(pw, ph))
    panel = Image.new("L", (w, h), 0)
    ImageDraw.Draw(panel).rounded_rectangle(box, radius=radius, fill=255)
    mask = np.asarray(panel) > 0

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, mag = x0 + pw / 2, y0 + ph / 2, rng.uniform(0.85, 1.15)
    amp, wave, phase = rng.uniform(2, 7), rng.uniform(25, 90), rng.uniform(0, 2 * np.pi, 2)
    shift = rng.uniform(5, 16, 2) * rng.choice([-1, 1], 2)
    sx = cx + (xs - cx) * mag + shift[0] + amp * np.sin(2 * np.pi * ys / wave + phase[0])
    sy = cy + (ys - cy) * mag + shift[1] + amp * np.sin(2 * np.pi * xs / wave + phase[1])
    behind = scene[np.clip(np.rint(sy), 0, h - 1).astype(np.intp), np.clip(np.rint(sx), 0, w - 1).astype(np.intp)]
    tint = (1 + rng.uniform(-0.12, 0.12, 3)) * rng.uniform(0.85, 1.0)
    theta, width = rng.uniform(0, np.pi), rng.uniform(0.05, 0.15) * min(pw, ph)
    d = (xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta) - rng.uniform(-0.3, 0.3) * min(pw, ph)
    highlight = rng.uniform(30, 70) * np.exp(-(d**2) / (2 * width**2))
    glass = np.clip(behind * tint + highlight[..., None], 0, 255)
    image = np.where(mask[..., None], glass, scene).astype(np.uint8)

    img = Image.fromarray(image)
    frame = int(rng.integers(2, 6))  # drawn just outside the panel, so the mask is the glass only
    ImageDraw.Draw(img).rounded_rectangle([x0 - frame, y0 - frame, x0 + pw + frame, y0 + ph + frame],
                                          radius=radius + frame, outline=_colour(rng, sat=(0, 0.3), val=(0.15, 0.8)),
                                          width=frame)
    return np.asarray(img), mask


def _saliency(rng: np.random.Generator, h: int, w: int) -> tuple[Array, Array]:
    """Low-contrast clutter plus one (sometimes two) distinct high-contrast objects (fg)."""
    tone = np.array(_colour(rng, sat=(0.05, 0.4), val=(0.3, 0.8)), np.float32)
    bg = tone * (0.85 + 0.3 * _noise(rng, h, w, rng.uniform(50, 150), 1))
    bg += (rng.random((h, w, 1), dtype=np.float32) - 0.5) * 12
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    m = min(h, w)
    for _ in range(int(rng.integers(15, 40))):
        colour = tuple(int(v) for v in np.clip(tone + rng.normal(0, 14, 3), 0, 255))
        draw.polygon(_blob(rng, *_centre(rng, h, w, 0), rng.uniform(0.02, 0.05) * m, n=20).ravel().tolist(), fill=colour)
    n = 1 if rng.random() < 0.75 else 2
    area = rng.uniform(0.08, 0.35) * h * w / n
    objects = [_blob(rng, *_centre(rng, h, w, 0.7 * np.sqrt(area / np.pi)), np.sqrt(area / np.pi)) for _ in range(n)]
    mask = _polys_mask(h, w, objects)
    colour = np.array(_colour(rng, sat=(0.6, 1.0), val=(0.7, 1.0)), np.float32)
    for _ in range(20):  # far from the background tone
        if np.abs(colour - tone).sum() >= 200:
            break
        colour = np.array(_colour(rng, sat=(0.6, 1.0), val=(0.7, 1.0)), np.float32)
    shade = 0.8 + 0.35 * _noise(rng, h, w, rng.uniform(20, 60), 1)
    image = np.where(mask[..., None], np.clip(colour * shade, 0, 255), np.asarray(img, np.float32))
    return image.astype(np.uint8), mask


_SHAPE_AREA = {"circle": np.pi, "square": 2.0, "triangle": 3 * np.sqrt(3) / 4, "star": 5 * 0.45 * np.sin(np.pi / 5),
               "cross": 8 * 0.3 - 4 * 0.3**2}  # polygon area / R**2 (R: circumradius)
SHAPE_CLASSES = tuple(_SHAPE_AREA)
TARGET_SHAPE = "star"


def _shape(kind: str, cx: float, cy: float, r: float, angle: float) -> Array:
    """Outline of a named shape of circumradius ``r``: (n, 2) float (x, y)."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind in ("square", "triangle"):
        k = 4 if kind == "square" else 3
        t = np.arange(k) * 2 * np.pi / k
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    else:  # cross, arm half-width 0.3
        a = 0.3
        pts = np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)])
    return _rotate(pts * r, angle, cx, cy)


def _shapes(rng: np.random.Generator, h: int, w: int) -> tuple[Array, Array]:
    """Random-coloured named shapes on texture; fg = every visible star (at least one per image)."""
    tone = np.array(_colour(rng, sat=(0.0, 0.4), val=(0.3, 0.9)), np.float32)
    bg = tone * (0.8 + 0.4 * _noise(rng, h, w, rng.uniform(30, 100), 1))
    bg += (_noise(rng, h, w, rng.uniform(4, 10)) - 0.5) * 40
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    labels = Image.new("L", (w, h), 0)
    n_stars = int(rng.integers(1, 4))
    star_area = rng.uniform(0.07, 0.30) * h * w / n_stars
    others = [str(k) for k in rng.choice([s for s in SHAPE_CLASSES if s != TARGET_SHAPE], int(rng.integers(2, 7)))]
    kinds = [TARGET_SHAPE] * n_stars + others
    order = rng.permutation(len(kinds))
    draw_img, draw_lab = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for j in order:
        kind = kinds[j]
        area = star_area if kind == TARGET_SHAPE else rng.uniform(0.01, 0.06) * h * w
        r = np.sqrt(area / _SHAPE_AREA[kind])
        outline = _shape(kind, *_centre(rng, h, w, 0.8 * r), r, rng.uniform(0, 2 * np.pi)).ravel().tolist()
        draw_img.polygon(outline, fill=_colour(rng))
        draw_lab.polygon(outline, fill=255 if kind == TARGET_SHAPE else 1)
    return np.asarray(img), np.asarray(labels) == 255


_TASKS: dict[str, Callable[[np.random.Generator, int, int], tuple[Array, Array]]] = {
    "synthetic_blur": _blur, "synthetic_shadow": _shadow, "synthetic_glass": _glass,
    "synthetic_saliency": _saliency, "synthetic_shapes": _shapes,
}


def make_example(task: str, rng: np.random.Generator) -> tuple[Array, Array]:
    """One picture of ``task``: image (H, W, 3) uint8, mask (H, W) bool with a foreground fraction in FG_RANGE
    (synthetic_blur: in _FG_RANGES, its in-focus background in FG_RANGE)."""
    lo, hi = _FG_RANGES.get(task, FG_RANGE)
    h, w = _size(rng)
    for _ in range(_MAX_TRIES):
        image, mask = _TASKS[task](rng, h, w)
        if lo <= mask.mean() <= hi:
            return image, mask
    raise RuntimeError(f"{task}: no picture with foreground in {(lo, hi)} after {_MAX_TRIES} tries")  # a bug


# ---------------------------------------------------------------------------------------- writing
def _file_names(n: int) -> list[str]:
    width = max(4, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}.png" for i in range(n)]


def _expected_files(out_dir: str, n_train: int, n_test: int) -> dict[str, list[str]]:
    """folder -> expected file names, for the four image/mask folders."""
    return {os.path.join(out_dir, split, kind): _file_names(n)
            for split, n in zip(SPLITS, (n_train, n_test)) for kind in ("images", "masks")}


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def generate_task(task: str, out_dir: str, n_train: int = 50, n_test: int = 50, seed: int = 0,
                  progress: bool = True) -> str:
    """Write one synthetic task in the generic layout under ``out_dir`` and return ``out_dir``.

    Idempotent: a folder already holding the complete dataset of the same (task, n_train, n_test,
    seed, generator version) is left untouched. A folder made by the generator with other settings
    (or left incomplete) is rewritten; any other non-empty folder is refused (DataError).
    """
    if task not in _TASKS:
        raise DataError(f"unknown synthetic task {task!r}; expected one of {', '.join(SYNTHETIC_TASKS)}")
    if min(n_train, n_test, seed) < 0:
        raise DataError(f"n_train, n_test and seed must be >= 0 (got {n_train}, {n_test}, {seed})")
    meta_path = os.path.join(out_dir, "dataset.json")
    generator = {"module": __name__, "version": GENERATOR_VERSION, "task": task, "n_train": n_train,
                 "n_test": n_test, "seed": seed}
    meta = {"task": task, "text": TASK_TEXT[task], "invert": False, "threshold": 128}
    expected = _expected_files(out_dir, n_train, n_test)
    old = _read_json(meta_path) if os.path.isdir(out_dir) else None
    if old is not None and old.get("generator") == {**generator, "complete": True} and all(
            os.path.isfile(os.path.join(d, f)) for d, names in expected.items() for f in names):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not (isinstance(old, dict) and "generator" in old):
        raise DataError(f"refusing to write synthetic data into {out_dir}: it is not empty and was not made by the generator")

    os.makedirs(out_dir, exist_ok=True)
    _write_json(meta_path, {**meta, "generator": {**generator, "complete": False}})
    for folder, names in expected.items():  # drop files of an earlier, different generation
        os.makedirs(folder, exist_ok=True)
        for stale in set(os.listdir(folder)) - set(names):
            os.remove(os.path.join(folder, stale))
    task_index = SYNTHETIC_TASKS.index(task)
    with tqdm(total=n_train + n_test, desc=task, disable=not progress, unit="img") as bar:
        for split_index, (split, n) in enumerate(zip(SPLITS, (n_train, n_test))):
            for i, name in enumerate(_file_names(n)):
                rng = np.random.default_rng([NAMESPACE, task_index, seed, split_index, i])
                image, mask = make_example(task, rng)
                Image.fromarray(image).save(os.path.join(out_dir, split, "images", name), compress_level=1)
                Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_dir, split, "masks", name), compress_level=1)
                bar.update(1)
    _write_json(meta_path, {**meta, "generator": {**generator, "complete": True}})
    return out_dir


def generate_all(root: str, n_train: int = 50, n_test: int = 50, seed: int = 0, progress: bool = True) -> dict[str, str]:
    """All of ``SYNTHETIC_TASKS`` under ``root/<task>``; returns task -> folder."""
    return {task: generate_task(task, os.path.join(root, task), n_train, n_test, seed, progress)
            for task in SYNTHETIC_TASKS}


# synthetic task -> (benchmark layout, folder under ROOT, {split: (image dir, mask dir, image ext)})
PUBLIC_LAYOUTS = {
    "synthetic_blur": ("cuhk", "CUHK", {"train": ("train/image", "train/gt", ".jpg"),
                                        "test": ("test/image", "test/gt", ".jpg")}),
    "synthetic_shadow": ("sbu", "SBU", {"train": ("SBUTrain4KRecoveredSmall/ShadowImages",
                                                  "SBUTrain4KRecoveredSmall/ShadowMasks", ".jpg"),
                                        "test": ("SBU-Test/ShadowImages", "SBU-Test/ShadowMasks", ".jpg")}),
    "synthetic_glass": ("msd", "MSD", {"train": ("train/image", "train/mask", ".jpg"),
                                       "test": ("test/image", "test/mask", ".jpg")}),
    "synthetic_saliency": ("duts", "DUTS", {"train": ("DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask", ".jpg"),
                                            "test": ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask", ".jpg")}),
    "synthetic_shapes": ("voc", "VOCdevkit/VOC2012", {}),  # JPEGImages/ + SegmentationClass/ + ImageSets/
}
VOC_STAND_IN = "aeroplane"  # the VOC class whose index the synthetic target (the star) takes


def write_public_layouts(root: str, n_train: int = 4, n_test: int = 2, seed: int = 0,
                         tasks: tuple = SYNTHETIC_TASKS, progress: bool = False) -> dict[str, str]:
    """The synthetic tasks laid out as the public benchmarks under ``root`` (CUHK/, SBU/, MSD/, DUTS/,
    VOCdevkit/VOC2012/), so `alignsam reproduce --data ROOT` can be tried without downloading them.
    The pictures are the generator's; images are written as JPEG (as released), masks as PNG (VOC:
    palette PNGs where the star is class ``VOC_STAND_IN``). Returns {layout: folder}."""
    from .samples import voc_palette

    made = {}
    for task in tasks:
        layout, folder, dirs = PUBLIC_LAYOUTS[task]
        src = generate_task(task, os.path.join(root, ".synthetic", task), n_train, n_test, seed, progress)
        dst = os.path.join(root, folder)
        lists: dict[str, list[str]] = {}
        for split in SPLITS:
            names = sorted(os.listdir(os.path.join(src, split, "images")))
            for name in names:
                stem = f"{split}_{os.path.splitext(name)[0]}"
                image = Image.open(os.path.join(src, split, "images", name)).convert("RGB")
                mask = np.asarray(Image.open(os.path.join(src, split, "masks", name)).convert("L")) > 127
                if layout == "voc":
                    index = Image.fromarray((mask * VOC_CLASSES.index(VOC_STAND_IN)).astype(np.uint8), mode="P")
                    index.putpalette(voc_palette().ravel().tolist())
                    targets = [(image, os.path.join(dst, "JPEGImages", stem + ".jpg")),
                               (index, os.path.join(dst, "SegmentationClass", stem + ".png"))]
                else:
                    image_dir, mask_dir, ext = dirs[split]
                    targets = [(image, os.path.join(dst, image_dir, stem + ext)),
                               (Image.fromarray(mask.astype(np.uint8) * 255), os.path.join(dst, mask_dir, stem + ".png"))]
                for picture, path in targets:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    picture.save(path, quality=95) if path.endswith(".jpg") else picture.save(path)
                lists.setdefault(split, []).append(stem)
        if layout == "voc":
            sets = os.path.join(dst, "ImageSets", "Segmentation")
            os.makedirs(sets, exist_ok=True)
            for split, fname in (("train", "train.txt"), ("test", "val.txt")):
                with open(os.path.join(sets, fname), "w") as f:
                    f.write("\n".join(lists.get(split, [])) + "\n")
        made[layout] = dst
    return made

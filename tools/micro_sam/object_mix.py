"""Generic synthetic object mix: the micro-SAM's own training and held-out data.

Class-agnostic scenes (random shapes, colours and textures, several objects that may occlude
each other, on a textured background). It is deliberately unrelated to the five downstream task
generators in ``alignsam_ray.data.synthetic`` and uses its own seed namespace, so the
micro-SAM has not seen the downstream tasks (as the real SAM has not seen CUHK or SBU).

    render_scene(rng, height, width) -> (image (H, W, 3) uint8, labels (H, W) uint8)

``labels`` holds 0 for background and k >= 1 for the visible part of object k.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED_NAMESPACE = 0x5A11  # keeps these seeds apart from every other generator's
MAX_OBJECTS = 6


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of stream ``seed`` (train and held-out use other seeds)."""
    return np.random.default_rng([SEED_NAMESPACE, seed, index])


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    """A (h, w, 3) float texture around colour ``base`` (0..255), scale relative to the image."""
    kind = rng.integers(0, 5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = max(h, w)
    if kind == 0:  # flat
        pattern = np.zeros((h, w), np.float32)
    elif kind == 1:  # stripes
        theta, freq = rng.uniform(0, math.pi), rng.uniform(4, 20) / s
        pattern = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif kind == 2:  # checker
        cell = rng.uniform(0.02, 0.08) * s
        pattern = ((xx // cell + yy // cell) % 2) * 2 - 1
    elif kind == 3:  # smooth gradient
        theta = rng.uniform(0, 2 * math.pi)
        pattern = ((xx * math.cos(theta) + yy * math.sin(theta)) / s) * 2
    else:  # blotchy noise
        small = rng.normal(size=(max(2, h // 16), max(2, w // 16))).astype(np.float32)
        pattern = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    amp = rng.uniform(10, 50)
    second = rng.uniform(0, 255, size=3) if rng.random() < 0.3 else None
    out = base[None, None, :] + amp * pattern[..., None]
    if second is not None:  # two-tone pattern
        out = np.where(pattern[..., None] > 0, base[None, None, :], second[None, None, :])
    return out


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w) bool mask of one random shape, 3%..35% of the image area in its bounding box."""
    s = min(h, w)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = rng.uniform(0.08, 0.3) * s
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = rng.integers(0, 5)
    rot = rng.uniform(0, 2 * math.pi)
    if kind == 0:  # ellipse (as a polygon so it can rotate)
        a, b = r, r * rng.uniform(0.4, 1.0)
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    elif kind == 1:  # rectangle
        a, b = r, r * rng.uniform(0.3, 1.0)
        pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif kind == 2:  # star
        n = int(rng.integers(4, 8))
        t = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False)
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif kind == 3:  # random polygon
        n = int(rng.integers(3, 9))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = r * rng.uniform(0.5, 1.0, n)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    else:  # smooth blob
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        rad = r * (1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * t + rng.uniform(0, 6)) for k in (2, 3, 5)))
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    c, s_ = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s_], [-s_, c]]) + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas) > 127


def render_scene(rng: np.random.Generator, height: int, width: int):
    """Render one scene. Returns (image (H, W, 3) uint8, labels (H, W) uint8)."""
    bg = _texture(rng, height, width, rng.uniform(30, 225, size=3))
    image = bg
    labels = np.zeros((height, width), np.uint8)
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    for k in range(1, n_objects + 1):
        mask = _shape_mask(rng, height, width)
        if not mask.any():
            continue
        colour = rng.uniform(0, 255, size=3)
        # keep objects distinguishable from the background on average
        if np.abs(colour - bg.reshape(-1, 3).mean(0)).max() < 40:
            colour = 255 - colour
        tex = _texture(rng, height, width, colour)
        if rng.random() < 0.3:  # soft shading
            yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None, None]
            tex = tex * (1 + 0.15 * yy * rng.choice([-1, 1]))
        image = np.where(mask[..., None], tex, image)
        labels[mask] = k
    image = np.clip(image + rng.normal(0, rng.uniform(0, 8), size=image.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))))
    # renumber to the objects that are still visible
    visible = [k for k in range(1, n_objects + 1) if (labels == k).any()]
    remap = np.zeros(MAX_OBJECTS + 1, np.uint8)
    remap[visible] = np.arange(1, len(visible) + 1)
    return image, remap[labels]


def random_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """(height, width) with the given long side and an aspect ratio in [0.5, 2]."""
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    if aspect >= 1:
        return int(round(long_side / aspect)), long_side
    return long_side, int(round(long_side * aspect))

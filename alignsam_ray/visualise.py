"""Overlays of a predicted mask and its point prompts (PIL only, no matplotlib, no Ray)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, mask: np.ndarray, points: np.ndarray, labels: np.ndarray,
            colour=(30, 144, 255), alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) bool mask, (n, 2) x, y points, (n,) labels 1/0 -> (H, W, 3) uint8.

    The mask is tinted ``colour``; positive points are green crosses, negative points red x marks."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(3, round(0.012 * max(image.shape[:2])))
    for (x, y), lab in zip(np.asarray(points, float), np.asarray(labels)):
        if lab == 1:
            draw.line([(x - r, y), (x + r, y)], fill=(0, 255, 0), width=2)
            draw.line([(x, y - r), (x, y + r)], fill=(0, 255, 0), width=2)
        else:
            draw.line([(x - r, y - r), (x + r, y + r)], fill=(255, 0, 0), width=2)
            draw.line([(x - r, y + r), (x + r, y - r)], fill=(255, 0, 0), width=2)
    return np.asarray(pil)

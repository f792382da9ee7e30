"""One image + ground-truth pair (``Sample``) and how to decode it into arrays.

Arrays returned here:
    image: (H, W, 3) uint8 RGB
    mask:  (H, W) uint8 with 0 = background, 1 = foreground, 255 = ignore (PASCAL VOC void only)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# PASCAL VOC 2012 class indices, in the standard order (index 0 = background, 255 = void).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_VOC_TEXT = {"pottedplant": "potted plant", "diningtable": "dining table", "tvmonitor": "tv monitor"}

# The text prompt of each task (the explicit SRM branch feeds it to CLIP Surgery).
TASK_TEXT: dict[str, str] = {
    "blur": "defocus background",
    "shadow": "shadow",
    "glass": "glass",
    "saliency": "salient objects",
    **{f"voc_{c}": _VOC_TEXT.get(c, c) for c in VOC_CLASSES[1:]},
    "synthetic_blur": "defocus background",
    "synthetic_shadow": "shadow",
    "synthetic_glass": "glass",
    "synthetic_saliency": "salient objects",
    "synthetic_shapes": "star",
}


class DataError(ValueError):
    """Bad input; the message names the file(s) and the problem."""


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth, by path (nothing is decoded until ``load_*``).

    id:         unique within a dataset and deterministic: "<split>/<stem>" (VOC: "<split>/<stem>/<class>")
    task:       e.g. "blur", "shadow", "glass", "saliency", "voc_aeroplane", "synthetic_shadow"
    split:      "train" or "test"
    text:       the task's text prompt (see ``TASK_TEXT``)
    invert:     the mask's white marks background (off by default everywhere; CUHK blur's white blurred
                region is the foreground, the paper's "defocus background")
    threshold:  grey masks are binarised at value >= threshold (before ``invert``)
    voc_class:  palette masks (VOC): this class index is foreground, 255 is void (-> 255 = ignore)
    """

    id: str
    task: str
    split: str
    image_path: str
    mask_path: str
    text: str = ""
    invert: bool = False
    threshold: int = 128
    voc_class: int | None = None


def decode_file(path: str, what: str) -> Image.Image:
    """Open and fully decode ``path`` (a truncated or corrupt file raises DataError naming it)."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, zlib errors, DecompressionBomb...
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def _scale_to_8bit(values: np.ndarray) -> np.ndarray:
    """16-/32-bit integer or float values -> uint8 0..255 (floats up to 1 as 0..1, integers up to 255 as
    they are, larger ones as 0..65535)."""
    top_value = values.max(initial=0)
    top = 1.0 if values.dtype.kind == "f" and top_value <= 1.0 else (255.0 if top_value <= 255 else 65535.0)
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float modes -> mode "L" (0..255); other modes unchanged."""
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_scale_to_8bit(np.asarray(img)), mode="L")
    return img


def load_image(sample: Sample) -> np.ndarray:
    """Decode ``sample.image_path`` -> (H, W, 3) uint8 RGB (L/LA/P/RGBA/CMYK/16-bit are converted)."""
    return read_image(sample.image_path)


def read_image(path: str) -> np.ndarray:
    """Decode an image file -> (H, W, 3) uint8 RGB; a clear ``DataError`` naming the file otherwise."""
    img = _to_8bit(decode_file(path, "image"))
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"cannot convert image {path} (mode {img.mode}) to RGB: {exc}") from None


def _grey_values(img: Image.Image) -> np.ndarray:
    """A binary/grey mask of any mode -> (H, W) values: 8-, 16- and 32-bit integer and float masks keep
    their own values, other modes become grey 0..255. Mode "P" masks whose indices are all 0/1 are read
    as indices; other palettes by colour."""
    if img.mode == "P":
        idx = np.asarray(img)
        if idx.max(initial=0) <= 1:
            return idx.astype(np.uint8)
    if img.mode.startswith("I") or img.mode == "F":
        return np.asarray(img)
    return np.asarray(img.convert("L"))


def voc_indices(img: Image.Image, path: str) -> np.ndarray:
    """A VOC SegmentationClass mask -> (H, W) uint8 class indices (0..20, 255 void)."""
    if img.mode in ("P", "L"):
        idx = np.asarray(img)
    elif img.mode == "RGB":  # a palette mask saved as colours: map each colour back to its index
        rgb = np.asarray(img).astype(np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        palette = voc_palette()
        lut = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(palette.tolist())}
        uniq, inv = np.unique(code, return_inverse=True)
        unknown = [hex(int(u)) for u in uniq if int(u) not in lut]
        if unknown:
            raise DataError(f"VOC mask {path} has colours outside the VOC palette: {', '.join(unknown[:5])}")
        idx = np.array([lut[int(u)] for u in uniq], np.uint8)[inv].reshape(code.shape)
    else:
        raise DataError(f"VOC mask {path} has mode {img.mode}; expected a palette ('P') PNG")
    bad = np.setdiff1d(np.unique(idx), np.r_[np.arange(len(VOC_CLASSES)), 255])
    if bad.size:
        raise DataError(f"VOC mask {path} has class indices outside 0..{len(VOC_CLASSES) - 1} and 255: {bad[:5].tolist()}")
    return idx.astype(np.uint8)


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map: (256, 3) uint8, row i = colour of class index i."""
    out = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out[i] = (r, g, b)
    return out


def load_mask(sample: Sample) -> np.ndarray:
    """Decode ``sample.mask_path`` -> (H, W) uint8: 0 background, 1 foreground, 255 ignore (VOC void).

    VOC (``voc_class`` set): pixels of that class -> 1, void (255) -> 255, the rest -> 0.
    Otherwise: a two-level mask (0 and one other value: 0/1 labels, 8-bit 0/255, 16-bit 0/4095 or
    0/65535, ...) -> that value is foreground, whatever its bit depth; a graded (anti-aliased) mask ->
    value >= ``threshold`` on the 0..255 scale (16-bit: 0..65535 scaled). Then ``invert`` swaps
    foreground and background. (``load_pair`` refuses a mask with no foreground left.)
    """
    img = decode_file(sample.mask_path, "mask")
    if sample.voc_class is not None:
        idx = voc_indices(img, sample.mask_path)
        out = (idx == sample.voc_class).astype(np.uint8)
        out[idx == 255] = 255
        return out
    values = _grey_values(img)
    levels = np.unique(values)
    if levels.size <= 2 and levels[0] == 0:
        fg = values > 0
    else:
        fg = (values if values.dtype == np.uint8 else _scale_to_8bit(values)) >= sample.threshold
    if sample.invert:
        fg = ~fg
    return fg.astype(np.uint8)


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8); DataError if either is unreadable, sizes differ or the
    mask has no foreground (an episode on it can only fail, and a wrong threshold would go unnoticed)."""
    image = load_image(sample)
    mask = load_mask(sample)
    if image.shape[:2] != mask.shape:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape
        raise DataError(f"size mismatch: mask {sample.mask_path} is {mw}x{mh} (WxH) "
                        f"but image {sample.image_path} is {iw}x{ih}")
    if not (mask == 1).any():
        how = "" if sample.voc_class is not None else \
            f" (threshold {sample.threshold}{', inverted' if sample.invert else ''}; two-level masks: the non-zero value)"
        raise DataError(f"mask {sample.mask_path} has no foreground pixels{how}; check --threshold / --invert, "
                        "or pass --skip-bad to leave such images out")
    return image, mask


def check_sample(sample: Sample) -> str | None:
    """Deep check: fully decode both files. None if fine, else the reason (the DataError message)."""
    try:
        load_pair(sample)
    except DataError as exc:
        return str(exc)
    return None

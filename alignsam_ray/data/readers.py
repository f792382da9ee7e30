"""Dataset folders -> a sorted list of ``Sample`` (paths only; headers checked, pixels not decoded).

``open_dataset("PATH")`` detects the layout from the folder names; ``open_dataset("LAYOUT:PATH")`` names it.

    generic  ROOT/images + ROOT/masks, or ROOT/{train,test}/{images,masks}; optional ROOT/dataset.json
    cuhk     image/ + gt/                      (CUHK defocus blur; gt white = blurred region = foreground, the
                                               paper's "defocus background"; ``invert=True`` makes the sharp part fg)
    sbu      ShadowImages/ + ShadowMasks/      (release: SBUTrain4KRecoveredSmall/ + SBU-Test/)
    msd      image/ + mask/                    (release: train/ + test/)
    duts     DUTS-TE/{DUTS-TE-Image,DUTS-TE-Mask} [+ DUTS-TR/{DUTS-TR-Image,DUTS-TR-Mask}]
    voc      JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/{train,val}.txt

Splits (the paper's protocol): with both a train and a test split, ``n_train`` images are drawn from
train (seeded) and the whole test split is kept; otherwise ``n_train`` images of the pool are drawn as
"train" and the rest is "test". VOC draws ``n_train`` images per class.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .samples import TASK_TEXT, VOC_CLASSES, DataError, Sample, check_sample, decode_file, voc_indices

__all__ = ["LAYOUTS", "IMAGE_EXTENSIONS", "open_dataset", "check_sample"]

LAYOUTS = ("generic", "cuhk", "sbu", "msd", "duts", "voc")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # matched case-insensitively
MAX_NAMES = 5  # file names listed per reason in the skip summary


@dataclass(frozen=True)
class _FolderLayout:
    """A layout made of (image folder, mask folder) pairs, optionally inside split folders."""

    dir_pairs: tuple[tuple[str, str], ...]  # (images, masks) folder names inside one split folder
    split_dirs: tuple[tuple[str, str], ...]  # (split, folder name) candidates under the root
    task: str | None  # None: dataset.json or the folder's name
    invert: bool
    expect: str  # what the folder should look like (error messages)


_FOLDER_LAYOUTS = {
    "generic": _FolderLayout((("images", "masks"),), (("train", "train"), ("test", "test")), None, False,
                             "ROOT/images/ + ROOT/masks/, or ROOT/train/{images,masks}/ + ROOT/test/{images,masks}/"),
    "cuhk": _FolderLayout((("image", "gt"),), (("train", "train"), ("test", "test")), "blur", False,
                          "ROOT/image/ + ROOT/gt/"),
    "sbu": _FolderLayout((("ShadowImages", "ShadowMasks"),),
                         (("train", "SBUTrain4KRecoveredSmall"), ("train", "SBU-Train"), ("train", "train"),
                          ("test", "SBU-Test"), ("test", "test")), "shadow", False,
                         "ROOT/ShadowImages/ + ROOT/ShadowMasks/, or ROOT/SBUTrain4KRecoveredSmall/ + ROOT/SBU-Test/ holding them"),
    "msd": _FolderLayout((("image", "mask"),), (("train", "train"), ("test", "test")), "glass", False,
                         "ROOT/image/ + ROOT/mask/, or ROOT/{train,test}/{image,mask}/"),
    "duts": _FolderLayout((("DUTS-TE-Image", "DUTS-TE-Mask"), ("DUTS-TR-Image", "DUTS-TR-Mask")),
                          (("train", "DUTS-TR"), ("test", "DUTS-TE")), "saliency", False,
                          "ROOT/DUTS-TE/{DUTS-TE-Image,DUTS-TE-Mask}/ [+ ROOT/DUTS-TR/{DUTS-TR-Image,DUTS-TR-Mask}/], or the DUTS-TE folder itself"),
}
_VOC_EXPECT = "ROOT/JPEGImages/ + ROOT/SegmentationClass/ (+ ROOT/ImageSets/Segmentation/{train,val}.txt)"


# ----------------------------------------------------------------------------------------- problems
class _Problems:
    """Bad pairs found while opening: ``reason -> [(short name, full message)]``, and ``path -> message``
    (the file at fault: what the store's manifest records under ``skipped``)."""

    def __init__(self):
        self.by_reason: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.by_path: dict[str, str] = {}

    def add(self, reason: str, name: str, message: str, path: str) -> None:
        self.by_reason[reason].append((name, message))
        self.by_path[path] = message

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def settle(self, total: int, noun: str, skip_bad: bool, skipped: dict | None = None) -> None:
        """Raise DataError listing the problems, or (skip_bad) print one summary line to stderr and add
        ``path -> message`` of each dropped pair to ``skipped``."""
        if not len(self):
            return
        if not skip_bad:
            messages = [m for items in self.by_reason.values() for _, m in items]
            more = f"\n  ... and {len(messages) - 10} more" if len(messages) > 10 else ""
            raise DataError(f"{len(messages)} of {total} {noun} are bad:\n  " + "\n  ".join(messages[:10]) + more
                            + "\n(pass skip_bad=True / --skip-bad to drop them)")
        parts = []
        for reason, items in self.by_reason.items():
            names = [n for n, _ in items[:MAX_NAMES]] + ([f"+{len(items) - MAX_NAMES} more"] if len(items) > MAX_NAMES else [])
            parts.append(f"{len(items)} {reason} ({', '.join(names)})")
        if skipped is not None:
            skipped.update(self.by_path)
        print(f"skipped {len(self)} of {total} {noun}: " + ", ".join(parts), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ file helpers
def _child_dir(folder: str, name: str) -> str | None:
    """The sub-folder of ``folder`` called ``name`` (exact, else case-insensitive), or None."""
    exact = os.path.join(folder, name)
    if os.path.isdir(exact):
        return exact
    try:
        for entry in sorted(os.listdir(folder)):
            if entry.lower() == name.lower() and os.path.isdir(os.path.join(folder, entry)):
                return os.path.join(folder, entry)
    except OSError:
        pass
    return None


def _list_images(folder: str) -> dict[str, list[str]]:
    """Image files in ``folder`` (not recursive, hidden files skipped): stem -> sorted file names."""
    out: dict[str, list[str]] = defaultdict(list)
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if not name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, name)):
            out[stem].append(name)
    return dict(out)


def _header_size(path: str) -> tuple[int, int]:
    """(W, H) from the file header only; raises on an unreadable/unknown file."""
    with Image.open(path) as img:
        return img.size


def _draw(keys: list[str], n: int | None, rng: np.random.Generator) -> set[str]:
    """``n`` of ``keys`` at random (all when n is None or >= len); deterministic for a given rng state."""
    keys = sorted(keys)
    if n is None or n >= len(keys):
        return set(keys)
    return {keys[i] for i in rng.permutation(len(keys))[:n]}


# ---------------------------------------------------------------------------------- folder layouts
@dataclass(frozen=True)
class _Group:
    split: str | None  # None: a single pool, split by the draw
    image_dir: str
    mask_dir: str


def _pair_dirs(folder: str, layout: _FolderLayout) -> tuple[str, str] | None:
    for image_name, mask_name in layout.dir_pairs:
        image_dir, mask_dir = _child_dir(folder, image_name), _child_dir(folder, mask_name)
        if image_dir and mask_dir:
            return image_dir, mask_dir
    return None


def _find_groups(root: str, layout: _FolderLayout) -> list[_Group]:
    """Split folders under ``root`` if any hold the layout's pair of folders, else ``root`` itself."""
    groups: dict[str, _Group] = {}
    for split, name in layout.split_dirs:
        sub = _child_dir(root, name)
        if split not in groups and sub and (pair := _pair_dirs(sub, layout)):
            groups[split] = _Group(split, *pair)
    if groups:
        return list(groups.values())
    pair = _pair_dirs(root, layout)
    return [_Group(None, *pair)] if pair else []


def _voc_root(root: str) -> str | None:
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(cand) and _child_dir(cand, "JPEGImages") and _child_dir(cand, "SegmentationClass"):
            return cand
    return None


def _detect(root: str) -> str:
    found = [name for name, lay in _FOLDER_LAYOUTS.items() if _find_groups(root, lay)]
    if _voc_root(root):
        found.append("voc")
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{root} matches several layouts ({', '.join(found)}); name one as LAYOUT:PATH")
    expected = "\n  ".join([f"{n}: {lay.expect}" for n, lay in _FOLDER_LAYOUTS.items()] + [f"voc: {_VOC_EXPECT}"])
    subs = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    found_text = ", ".join(subs[:10]) + (", ..." if len(subs) > 10 else "") if subs else "none"
    raise DataError(f"{root} matches no dataset layout (its sub-folders: {found_text}); expected one of:\n  {expected}")


def _dataset_json(root: str) -> dict:
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    types = {"task": str, "text": str, "invert": bool, "threshold": int}
    if not isinstance(cfg, dict) or any(k in cfg and not isinstance(cfg[k], t) for k, t in types.items()):
        raise DataError(f"{path}: expected an object with task (str), text (str), invert (bool), threshold (int)")
    return cfg


def _check_pair(image_path: str, mask_path: str, problems: _Problems, deep: bool = False) -> bool:
    """Header check of one pair (readable, same size; ``deep``: every pixel decodes, so a truncated file
    is caught here too); records the problem and returns False if bad."""
    sizes = {}
    for what, path in (("image", image_path), ("mask", mask_path)):
        try:
            sizes[what] = decode_file(path, what).size if deep else _header_size(path)
        except Exception as exc:
            message = str(exc) if isinstance(exc, DataError) else f"cannot read {what} {path}: {exc}"
            problems.add(f"unreadable {what}", os.path.basename(path), message, path)
            return False
    if sizes["image"] != sizes["mask"]:
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        problems.add("size mismatch", f"{os.path.basename(mask_path)}: mask {mw}x{mh} vs image {iw}x{ih}",
                     f"size mismatch: mask {mask_path} is {mw}x{mh} (WxH) but image {image_path} is {iw}x{ih}", mask_path)
        return False
    return True


def _group_pairs(group: _Group, problems: _Problems, deep: bool) -> tuple[list[tuple[str, str, str]], int]:
    """Good (stem, image_path, mask_path) of one group, and the number of candidates looked at."""
    images, masks = _list_images(group.image_dir), _list_images(group.mask_dir)
    good = []
    stems = sorted(set(images) | set(masks))
    for stem in stems:
        imgs, msks = images.get(stem, []), masks.get(stem, [])
        if len(imgs) > 1:
            problems.add("duplicate image name", ", ".join(imgs),
                         f"several images named {stem!r} in {group.image_dir}: {', '.join(imgs)}",
                         os.path.join(group.image_dir, imgs[0]))
        elif len(msks) > 1:
            problems.add("duplicate mask name", ", ".join(msks),
                         f"several masks named {stem!r} in {group.mask_dir}: {', '.join(msks)}",
                         os.path.join(group.mask_dir, msks[0]))
        elif not msks:
            problems.add("missing mask", imgs[0], f"missing mask: no {stem}.* in {group.mask_dir} for image "
                         f"{os.path.join(group.image_dir, imgs[0])}", os.path.join(group.image_dir, imgs[0]))
        elif not imgs:
            problems.add("missing image", msks[0], f"missing image: no {stem}.* in {group.image_dir} for mask "
                         f"{os.path.join(group.mask_dir, msks[0])}", os.path.join(group.mask_dir, msks[0]))
        else:
            image_path, mask_path = os.path.join(group.image_dir, imgs[0]), os.path.join(group.mask_dir, msks[0])
            if _check_pair(image_path, mask_path, problems, deep):
                good.append((stem, image_path, mask_path))
    return good, len(stems)


def _open_folder_layout(root: str, layout_name: str, *, n_train, seed, skip_bad, skipped, threshold, invert,
                        task) -> list[Sample]:
    layout = _FOLDER_LAYOUTS[layout_name]
    groups = _find_groups(root, layout)
    if not groups:
        raise DataError(f"{root} is not a {layout_name} folder; expected {layout.expect}")
    cfg = _dataset_json(root) if layout_name == "generic" else {}
    if task is None:  # the layout's task, else dataset.json's, else the folder's name
        task = layout.task or cfg.get("task") or os.path.basename(os.path.normpath(root))
        text = cfg.get("text") or TASK_TEXT.get(task, task.replace("_", " "))
    else:
        text = TASK_TEXT.get(task, task.replace("_", " "))
    invert = invert if invert is not None else cfg.get("invert", layout.invert)
    threshold = threshold if threshold is not None else cfg.get("threshold", 128)
    if not 1 <= threshold <= 255:
        raise DataError(f"threshold must be in 1..255, got {threshold}")

    problems, total, pairs = _Problems(), 0, {}
    for group in groups:
        pairs[group.split], n = _group_pairs(group, problems, deep=skip_bad)
        total += n
    if total == 0:
        where = ", ".join(f"{g.image_dir} + {g.mask_dir}" for g in groups)
        raise DataError(f"no images found in {where} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    problems.settle(total, "samples", skip_bad, skipped)
    if not any(pairs.values()):
        raise DataError(f"no usable image/mask pairs in {root}")

    rng = np.random.default_rng(seed)
    assigned: list[tuple[str, tuple[str, str, str]]] = []  # (split, pair)
    if set(pairs) == {"train", "test"}:
        by_stem = {p[0]: p for p in pairs["train"]}
        assigned += [("train", by_stem[s]) for s in sorted(_draw(list(by_stem), n_train, rng))]
        assigned += [("test", p) for p in pairs["test"]]
    else:
        by_stem = {p[0]: p for ps in pairs.values() for p in ps}  # one group only: stems are unique
        train = _draw(list(by_stem), n_train, rng)
        assigned += [("train" if s in train else "test", p) for s, p in by_stem.items()]
    samples = [Sample(id=f"{split}/{stem}", task=task, split=split, image_path=image_path, mask_path=mask_path,
                      text=text, invert=bool(invert), threshold=int(threshold))
               for split, (stem, image_path, mask_path) in assigned]
    return sorted(samples, key=lambda s: (s.split, s.id))


# --------------------------------------------------------------------------------------------- VOC
def _voc_class_ids(classes: list[str] | None) -> list[int]:
    if not classes:
        return list(range(1, len(VOC_CLASSES)))
    names = {c: i for i, c in enumerate(VOC_CLASSES) if i}
    names.update({TASK_TEXT[f"voc_{c}"]: i for c, i in list(names.items())})
    ids = []
    for c in classes:
        key = c.lower().removeprefix("voc_")
        if key not in names:
            raise DataError(f"unknown VOC class {c!r}; expected one of {', '.join(VOC_CLASSES[1:])}")
        ids.append(names[key])
    return sorted(set(ids))


def _open_voc(root: str, *, n_train, seed, skip_bad, skipped, classes) -> list[Sample]:
    voc = _voc_root(root)
    if voc is None:
        raise DataError(f"{root} is not a PASCAL VOC folder; expected {_VOC_EXPECT}")
    jpeg_dir, seg_dir = _child_dir(voc, "JPEGImages"), _child_dir(voc, "SegmentationClass")
    class_ids = _voc_class_ids(classes)
    images, masks = _list_images(jpeg_dir), _list_images(seg_dir)
    lists: dict[str | None, list[str]] = {}
    sets_dir = os.path.join(voc, "ImageSets", "Segmentation")
    for split, fname in (("train", "train.txt"), ("test", "val.txt")):
        path = os.path.join(sets_dir, fname)
        if os.path.isfile(path):
            with open(path) as f:
                lists[split] = [line.split()[0] for line in f if line.strip()]
    if set(lists) != {"train", "test"}:  # no full split: pool what is listed, else every mask
        lists = {None: sorted({s for ss in lists.values() for s in ss} or masks)}
    total = sum(len(v) for v in lists.values())
    if total == 0:
        raise DataError(f"no segmentation masks found in {seg_dir}")

    problems = _Problems()
    present: dict[str | None, dict[int, list[str]]] = {}  # split -> class -> stems
    paths: dict[str, tuple[str, str]] = {}
    for split, stems in lists.items():
        present[split] = defaultdict(list)
        for stem in stems:
            if stem not in images:
                problems.add("missing image", stem, f"missing image: no {stem}.* in {jpeg_dir} (listed for "
                             f"{split or 'the pool'})", os.path.join(jpeg_dir, stem))
                continue
            if stem not in masks:
                problems.add("missing mask", images[stem][0], f"missing mask: no {stem}.png in {seg_dir} for image "
                             f"{os.path.join(jpeg_dir, images[stem][0])}", os.path.join(jpeg_dir, images[stem][0]))
                continue
            image_path, mask_path = os.path.join(jpeg_dir, images[stem][0]), os.path.join(seg_dir, masks[stem][0])
            try:
                idx = voc_indices(decode_file(mask_path, "mask"), mask_path)
            except DataError as exc:
                problems.add("unreadable mask", masks[stem][0], str(exc), mask_path)
                continue
            mh, mw = idx.shape
            try:
                iw, ih = decode_file(image_path, "image").size if skip_bad else _header_size(image_path)
            except Exception as exc:
                message = str(exc) if isinstance(exc, DataError) else f"cannot read image {image_path}: {exc}"
                problems.add("unreadable image", images[stem][0], message, image_path)
                continue
            if (iw, ih) != (mw, mh):
                problems.add("size mismatch", f"{masks[stem][0]}: mask {mw}x{mh} vs image {iw}x{ih}",
                             f"size mismatch: mask {mask_path} is {mw}x{mh} (WxH) but image {image_path} is {iw}x{ih}",
                             mask_path)
                continue
            paths[stem] = (image_path, mask_path)
            for c in np.unique(idx).tolist():
                if c in class_ids:
                    present[split][c].append(stem)
    problems.settle(total, "images", skip_bad, skipped)
    if not paths:
        raise DataError(f"no usable image/mask pairs in {voc}")

    samples = []
    for c in class_ids:
        name = VOC_CLASSES[c]
        rng = np.random.default_rng([seed, c])
        if None in present:
            pool = present[None][c]
            train = _draw(pool, n_train, rng)
            chosen = [("train" if s in train else "test", s) for s in pool]
        else:
            chosen = [("train", s) for s in sorted(_draw(present["train"][c], n_train, rng))]
            chosen += [("test", s) for s in present["test"][c]]
        samples += [Sample(id=f"{split}/{stem}/{name}", task=f"voc_{name}", split=split, image_path=paths[stem][0],
                           mask_path=paths[stem][1], text=TASK_TEXT[f"voc_{name}"], voc_class=c)
                    for split, stem in chosen]
    return sorted(samples, key=lambda s: (s.split, s.id))


# ------------------------------------------------------------------------------------------ entry
def _parse_spec(spec: str) -> tuple[str | None, str]:
    m = re.match(r"^([A-Za-z_]\w*):(.+)$", spec)
    if m and not os.path.exists(spec):
        layout = m.group(1).lower()
        if layout not in LAYOUTS:
            raise DataError(f"unknown layout {m.group(1)!r} in {spec!r}; expected one of {', '.join(LAYOUTS)} (LAYOUT:PATH)")
        return layout, m.group(2)
    return None, spec


def open_dataset(spec: str, *, n_train: int | None = 50, seed: int = 0, skip_bad: bool = False,
                 threshold: int | None = None, invert: bool | None = None, task: str | None = None,
                 classes: list[str] | None = None, skipped: dict | None = None) -> list[Sample]:
    """Open a dataset folder -> samples sorted by (split, id).

    spec:      "PATH" (layout detected from folder names) or "LAYOUT:PATH", LAYOUT in ``LAYOUTS``
    n_train:   training images drawn (seeded by ``seed``; VOC: per class); None = all training images
    skip_bad:  drop bad pairs (missing partner, unreadable or truncated file, size mismatch) and print one
               summary line to stderr, instead of raising DataError; every file is then fully decoded
    skipped:   a dict that receives ``path -> reason`` of each pair skip_bad dropped (for the store's manifest)
    threshold, invert, task:  override the layout's / dataset.json's defaults (threshold default 128);
               task names the text prompt too (``TASK_TEXT``, else the name with spaces). Ignored for voc,
               whose tasks are "voc_<class>" with palette masks.
    classes:   VOC only: restrict to these class names
    Without skip_bad only headers are read (VOC masks are decoded to find their classes); a file truncated
    after its header fails later, in ``load_image``/``load_mask``, or in ``check_sample``.
    """
    layout, path = _parse_spec(spec)
    if n_train is not None and n_train < 0:
        raise DataError(f"n_train must be >= 0 or None, got {n_train}")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"dataset folder not found: {root}")
    layout = layout or _detect(root)
    if layout == "voc":
        return _open_voc(root, n_train=n_train, seed=seed, skip_bad=skip_bad, skipped=skipped, classes=classes)
    if classes:
        raise DataError(f"classes= applies to the voc layout only, not {layout} ({root})")
    return _open_folder_layout(root, layout, n_train=n_train, seed=seed, skip_bad=skip_bad, skipped=skipped,
                               threshold=threshold, invert=invert, task=task)

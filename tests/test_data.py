"""Dataset readers (generic + benchmark layouts), sample decoding, bad input, splits, synthetic data."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from alignsam_ray.data import (
    SYNTHETIC_TASKS,
    TASK_TEXT,
    DataError,
    Sample,
    check_sample,
    generate_all,
    generate_task,
    load_image,
    load_mask,
    load_pair,
    open_dataset,
)
from alignsam_ray.data.samples import voc_palette

H, W = 24, 32


# ------------------------------------------------------------------------------------------ helpers
def _img(seed=0, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return str(path)


def _pairs(image_dir, mask_dir, stems, ext=".jpg", mask_ext=".png", h=H, w=W, mask_value=255):
    """Write image/mask pairs; the mask's left half is ``mask_value``."""
    for i, stem in enumerate(stems):
        _save(os.path.join(image_dir, stem + ext), _img(i, h, w))
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = mask_value
        _save(os.path.join(mask_dir, stem + mask_ext), mask)


def _generic(root, n=4):
    _pairs(root / "images", root / "masks", [f"im{i}" for i in range(n)])
    return root


def _ids(samples):
    return [s.id for s in samples]


# --------------------------------------------------------------------------------- generic + decode
def test_generic_mixed_extensions_graded_threshold_and_invert(tmp_path):
    root = tmp_path / "things"
    graded = np.zeros((H, W), np.uint8)
    graded[:, 0:8], graded[:, 8:16], graded[:, 16:24], graded[:, 24:] = 0, 127, 128, 255
    for stem, ext in (("a", ".jpg"), ("b", ".JPG"), ("c", ".png"), ("d", ".jpeg")):
        _save(root / "images" / f"{stem}{ext}", _img(ord(stem)), **({"format": "JPEG"} if ext != ".png" else {}))
        _save(root / "masks" / f"{stem}{'.PNG' if stem == 'c' else '.png'}", graded)
    (root / "masks" / "notes.txt").write_text("ignored")
    samples = open_dataset(str(root), n_train=None)
    assert _ids(samples) == ["train/a", "train/b", "train/c", "train/d"]
    s = samples[1]
    assert s.task == "things" and s.split == "train" and s.image_path.endswith("b.JPG") and os.path.isabs(s.image_path)
    image, mask = load_pair(s)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    np.testing.assert_array_equal(mask[0, [0, 8, 15, 16, 24, 31]], [0, 0, 0, 1, 1, 1])  # 127 -> 0, 128 -> 1
    inv = open_dataset(str(root), n_train=None, invert=True, threshold=200)[0]
    np.testing.assert_array_equal(load_mask(inv)[0, [0, 8, 16, 24]], [1, 1, 1, 0])
    assert open_dataset("generic:" + str(root), n_train=None) == samples


def test_dataset_json_defaults_and_explicit_args_win(tmp_path):
    root = _generic(tmp_path / "ds")
    (root / "dataset.json").write_text(json.dumps({"task": "cats", "text": "a cat", "invert": True, "threshold": 50}))
    s = open_dataset(str(root), n_train=None)[0]
    assert (s.task, s.text, s.invert, s.threshold) == ("cats", "a cat", True, 50)
    s = open_dataset(str(root), n_train=None, invert=False, threshold=128, task="shadow")[0]
    assert (s.task, s.text, s.invert, s.threshold) == ("shadow", "shadow", False, 128)
    (root / "dataset.json").write_text("{broken")
    with pytest.raises(DataError, match="dataset.json"):
        open_dataset(str(root))


def test_image_modes_become_rgb_and_01_masks_are_labels(tmp_path):
    rgb = _img(3)
    paths = {
        "L": _save(tmp_path / "l.png", rgb[..., 0]),
        "RGBA": _save(tmp_path / "rgba.png", np.dstack([rgb, np.full((H, W), 9, np.uint8)])),
        "P": str(tmp_path / "p.png"),
        "CMYK": str(tmp_path / "cmyk.jpg"),
    }
    Image.fromarray(rgb).convert("P").save(paths["P"])
    Image.fromarray(rgb).convert("CMYK").save(paths["CMYK"])
    labels = np.zeros((H, W), np.uint8)
    labels[5:10, 5:10] = 1
    mask_path = _save(tmp_path / "m01.png", labels)
    for mode, path in paths.items():
        image = load_image(Sample("x", "t", "train", path, mask_path))
        assert image.shape == (H, W, 3) and image.dtype == np.uint8, mode
    np.testing.assert_array_equal(load_image(Sample("x", "t", "train", paths["RGBA"], mask_path)), rgb)
    np.testing.assert_array_equal(load_mask(Sample("x", "t", "train", paths["L"], mask_path)), labels)


# ------------------------------------------------------------------------------------ named layouts
def _cuhk(root, stems=("motion0001", "out_of_focus0002")):
    """A CUHK-style folder: noise images blurred inside a box; gt white = that blurred box (as the release)."""
    blurred = np.zeros((H, W), bool)
    blurred[4:18, 6:26] = True
    for i, stem in enumerate(stems):
        sharp = _img(i)
        soft = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(3)))
        _save(root / "image" / f"{stem}.jpg", np.where(blurred[..., None], soft, sharp))
        _save(root / "gt" / f"{stem}.png", blurred.astype(np.uint8) * 255)
    return root, blurred


def test_cuhk_foreground_is_the_blurred_region(tmp_path):
    root, blurred = _cuhk(tmp_path / "CUHK")
    samples = open_dataset(str(root), n_train=1)
    assert [s.split for s in samples] == ["test", "train"]
    for s in samples:  # the paper: "defocus background", gt white (blurred) = foreground
        assert (s.task, s.text, s.invert) == ("blur", "defocus background", False)
        np.testing.assert_array_equal(load_mask(s), blurred.astype(np.uint8))
    assert open_dataset("cuhk:" + str(root), n_train=1) == samples
    assert open_dataset(str(root), n_train=1, invert=False) == samples
    inverted = open_dataset("cuhk:" + str(root), n_train=1, invert=True)  # the other convention: sharp = fg
    assert [s.invert for s in inverted] == [True, True]
    for s in inverted:
        np.testing.assert_array_equal(load_mask(s), (~blurred).astype(np.uint8))
        image, mask = load_pair(s)
        assert image.shape[:2] == mask.shape == (H, W)


def test_blur_in_the_generic_layout_follows_dataset_json(tmp_path):
    root = tmp_path / "blur_generic"
    _, blurred = _cuhk(root)
    os.rename(root / "image", root / "images")
    os.rename(root / "gt", root / "masks")
    (root / "dataset.json").write_text(json.dumps({"task": "blur"}))
    s = open_dataset(str(root), n_train=None)[0]
    assert (s.task, s.text, s.invert) == ("blur", "defocus background", False)
    np.testing.assert_array_equal(load_mask(s), blurred.astype(np.uint8))
    (root / "dataset.json").write_text(json.dumps({"task": "blur", "invert": True}))
    s = open_dataset(str(root), n_train=None)[0]
    assert s.invert and (load_mask(s) == (~blurred).astype(np.uint8)).all()
    assert not open_dataset(str(root), n_train=None, invert=False)[0].invert  # the argument wins


def test_sbu_release_split_folders(tmp_path):
    root = tmp_path / "SBU-shadow"
    tr, te = root / "SBUTrain4KRecoveredSmall", root / "SBU-Test"
    _pairs(tr / "ShadowImages", tr / "ShadowMasks", [f"tr{i}" for i in range(5)])
    _pairs(te / "ShadowImages", te / "ShadowMasks", [f"te{i}" for i in range(3)])
    samples = open_dataset(str(root), n_train=2, seed=1)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 2 and all(s.id.startswith("train/tr") for s in train)
    assert _ids(test) == ["test/te0", "test/te1", "test/te2"]  # the whole test split
    assert {s.task for s in samples} == {"shadow"} and samples[0].text == "shadow"
    assert len(open_dataset(str(root), n_train=None)) == 8
    single = open_dataset(str(te), n_train=1)  # the single-split folder itself: drawn
    assert [s.split for s in single] == ["test", "test", "train"]


def test_msd_and_duts(tmp_path):
    msd = tmp_path / "MSD"
    _pairs(msd / "train" / "image", msd / "train" / "mask", ["a", "b", "c"])
    _pairs(msd / "test" / "image", msd / "test" / "mask", ["d", "e"])
    samples = open_dataset(str(msd), n_train=None)
    assert _ids(samples) == ["test/d", "test/e", "train/a", "train/b", "train/c"]
    assert samples[0].task == "glass" and samples[0].text == "glass"

    duts = tmp_path / "DUTS"
    _pairs(duts / "DUTS-TE" / "DUTS-TE-Image", duts / "DUTS-TE" / "DUTS-TE-Mask", [f"t{i}" for i in range(4)])
    only_test = open_dataset(str(duts), n_train=1)
    assert [s.split for s in only_test].count("train") == 1 and len(only_test) == 4
    assert only_test[0].task == "saliency" and only_test[0].text == "salient objects"
    _pairs(duts / "DUTS-TR" / "DUTS-TR-Image", duts / "DUTS-TR" / "DUTS-TR-Mask", [f"r{i}" for i in range(3)])
    both = open_dataset("duts:" + str(duts), n_train=2)
    assert [s.split for s in both] == ["test"] * 4 + ["train"] * 2
    assert all(s.id.startswith("train/r") for s in both if s.split == "train")
    assert len(open_dataset(str(duts / "DUTS-TE"), n_train=0)) == 4  # the DUTS-TE folder itself


def _voc(root):
    """4 train images (person in all, aeroplane in #0) and 2 val images; void borders."""
    palette = voc_palette().ravel().tolist()
    specs = {"2007_000001": [1, 15], "2007_000002": [15], "2007_000003": [15], "2007_000004": [15, 20],
             "2008_000001": [1], "2008_000002": [15, 1]}
    for i, (stem, classes) in enumerate(specs.items()):
        _save(root / "JPEGImages" / f"{stem}.jpg", _img(i))
        idx = np.zeros((H, W), np.uint8)
        for k, c in enumerate(classes):
            idx[4:20, 2 + 10 * k : 10 + 10 * k] = c
        idx[0, :] = 255
        m = Image.fromarray(idx, mode="P")
        m.putpalette(palette)
        os.makedirs(root / "SegmentationClass", exist_ok=True)
        m.save(root / "SegmentationClass" / f"{stem}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(list(specs)[:4]) + "\n")
    (sets / "val.txt").write_text("\n".join(list(specs)[4:]) + "\n")
    return root


def test_voc_per_class_samples_void_and_draw(tmp_path):
    root = _voc(tmp_path / "VOC2012")
    samples = open_dataset(str(root), n_train=None)
    assert ("train/2007_000001/aeroplane" in _ids(samples) and "train/2007_000001/person" in _ids(samples)
            and "test/2008_000002/person" in _ids(samples) and "train/2007_000004/tvmonitor" in _ids(samples))
    assert len(samples) == 9
    s = next(x for x in samples if x.id == "train/2007_000001/person")
    assert (s.task, s.text, s.voc_class) == ("voc_person", "person", 15)
    assert TASK_TEXT["voc_tvmonitor"] == "tv monitor" and TASK_TEXT["voc_pottedplant"] == "potted plant"
    mask = load_mask(s)
    assert set(np.unique(mask).tolist()) == {0, 1, 255}
    assert (mask[0] == 255).all() and mask[10, 12:20].min() == 1 and mask[10, 2:10].max() == 0  # aeroplane -> 0
    people = open_dataset(str(root), n_train=2, classes=["person"])
    assert {x.task for x in people} == {"voc_person"}
    assert [x.split for x in people] == ["test", "train", "train"]
    assert people == open_dataset("voc:" + str(tmp_path), n_train=2, classes=["person"])  # parent of VOC2012
    with pytest.raises(DataError, match="unknown VOC class 'persons'"):
        open_dataset(str(root), classes=["persons"])


# -------------------------------------------------------------------------------------------- splits
def test_split_draw_is_seeded_and_deterministic(tmp_path):
    root = _generic(tmp_path / "ds", n=10)
    a = open_dataset(str(root), n_train=4, seed=0)
    assert a == open_dataset(str(root), n_train=4, seed=0)
    assert a == sorted(a, key=lambda s: (s.split, s.id))
    assert [s.split for s in a].count("train") == 4 and len(a) == 10
    draws = {tuple(s.id for s in open_dataset(str(root), n_train=4, seed=k) if s.split == "train") for k in range(5)}
    assert len(draws) > 1
    assert {s.split for s in open_dataset(str(root), n_train=None)} == {"train"}
    with pytest.raises(DataError, match="n_train"):
        open_dataset(str(root), n_train=-1)

    split_root = tmp_path / "split"
    _pairs(split_root / "train" / "images", split_root / "train" / "masks", [f"r{i}" for i in range(6)])
    _pairs(split_root / "test" / "images", split_root / "test" / "masks", [f"t{i}" for i in range(3)])
    s = open_dataset(str(split_root), n_train=2, seed=3)
    assert [x.split for x in s] == ["test"] * 3 + ["train"] * 2


# ----------------------------------------------------------------------------------------- bad input
def test_corrupt_image_is_named(tmp_path):
    root = _generic(tmp_path / "ds")
    (root / "images" / "im2.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"im2\.jpg"):
        open_dataset(str(root))


def test_truncated_png_is_caught_at_load(tmp_path):
    root = tmp_path / "ds"
    _pairs(root / "images", root / "masks", ["a", "b"], ext=".png")
    victim = root / "images" / "b.png"
    victim.write_bytes(victim.read_bytes()[:80])  # header intact, pixels gone
    samples = open_dataset(str(root), n_train=None)
    assert len(samples) == 2
    with pytest.raises(DataError, match=r"b\.png"):
        load_pair(samples[1])
    assert check_sample(samples[0]) is None
    assert "b.png" in check_sample(samples[1])


def test_missing_partner_and_size_mismatch_are_named(tmp_path):
    root = _generic(tmp_path / "ds")
    os.remove(root / "masks" / "im1.png")
    with pytest.raises(DataError, match=r"missing mask.*im1\.jpg"):
        open_dataset(str(root))
    root = _generic(tmp_path / "ds2")
    os.remove(root / "images" / "im3.jpg")
    with pytest.raises(DataError, match=r"missing image.*im3\.png"):
        open_dataset(str(root))
    root = _generic(tmp_path / "ds3")
    _save(root / "masks" / "im0.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"size mismatch: mask .*im0\.png is 12x10 .* image .*im0\.jpg is 32x24"):
        open_dataset(str(root))
    bad = Sample("x", "t", "train", str(root / "images" / "im0.jpg"), str(root / "masks" / "im0.png"))
    with pytest.raises(DataError, match="size mismatch"):
        load_pair(bad)


def test_empty_folder_unknown_layout_and_no_layout(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="no images found in .*empty"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown layout 'coco'.*generic, cuhk, sbu, msd, duts, voc"):
        open_dataset("coco:" + str(tmp_path / "empty"))
    (tmp_path / "odd" / "pictures").mkdir(parents=True)
    with pytest.raises(DataError, match=r"(?s)odd matches no dataset layout \(its sub-folders: pictures\).*ROOT/images/"):
        open_dataset(str(tmp_path / "odd"))
    with pytest.raises(DataError, match="not a cuhk folder"):
        open_dataset("cuhk:" + str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not found"):
        open_dataset(str(tmp_path / "nowhere"))


def test_skip_bad_drops_and_summarises(tmp_path, capsys):
    root = _generic(tmp_path / "ds", n=8)
    os.remove(root / "masks" / "im1.png")
    os.remove(root / "masks" / "im2.png")
    (root / "images" / "im3.jpg").write_bytes(b"garbage")
    _save(root / "masks" / "im4.png", np.zeros((10, 10), np.uint8))
    samples = open_dataset(str(root), n_train=None, skip_bad=True)
    assert _ids(samples) == ["train/im0", "train/im5", "train/im6", "train/im7"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("skipped 4 of 8 samples: ")
    assert "2 missing mask (im1.jpg, im2.jpg)" in err[0]
    assert "1 unreadable image (im3.jpg)" in err[0]
    assert "1 size mismatch (im4.png: mask 10x10 vs image 32x24)" in err[0]


def test_skip_bad_lists_at_most_five_names(tmp_path, capsys):
    root = _generic(tmp_path / "ds", n=9)
    for i in range(7):
        os.remove(root / "masks" / f"im{i}.png")
    assert len(open_dataset(str(root), n_train=None, skip_bad=True)) == 2
    err = capsys.readouterr().err
    assert "7 missing mask (im0.jpg, im1.jpg, im2.jpg, im3.jpg, im4.jpg, +2 more)" in err


# ----------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_all(str(root), n_train=3, n_test=3, seed=0, progress=False)


def _files(folder):
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            out[os.path.relpath(os.path.join(d, n), folder)] = open(os.path.join(d, n), "rb").read()
    return out


def test_synthetic_is_deterministic_and_readable(synth, tmp_path):
    assert set(synth) == set(SYNTHETIC_TASKS)
    again = generate_task("synthetic_glass", str(tmp_path / "again"), n_train=3, n_test=3, seed=0, progress=False)
    assert _files(again) == _files(synth["synthetic_glass"])
    other = generate_task("synthetic_glass", str(tmp_path / "other"), n_train=3, n_test=3, seed=1, progress=False)
    assert _files(other)["train/images/0000.png"] != _files(again)["train/images/0000.png"]
    for task, folder in synth.items():
        samples = open_dataset(folder, n_train=None)
        assert [s.split for s in samples] == ["test"] * 3 + ["train"] * 3
        assert {s.task for s in samples} == {task} and samples[0].text == TASK_TEXT[task]
    assert open_dataset(synth["synthetic_shapes"], n_train=None)[0].text == "star"


def test_synthetic_sizes_and_foreground(synth):
    shapes = []
    for task, folder in synth.items():
        for s in open_dataset(folder, n_train=None):
            image, mask = load_pair(s)
            shapes.append(image.shape[:2])
            frac = mask.mean()
            lo, hi = (0.5, 0.95) if task == "synthetic_blur" else (0.05, 0.5)  # blur: fg = the blurred rest
            assert lo <= frac <= hi, (s.id, task, frac)
            assert set(np.unique(mask).tolist()) == {0, 1}
    assert len(set(shapes)) > 10 and any(h != w for h, w in shapes)
    for h, w in shapes:
        assert 256 <= max(h, w) <= 512 and 0.59 <= w / h <= 1.71


def _laplacian_energy(grey):
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return np.abs(lap)


def test_synthetic_cues_follow_the_task(synth):
    for s in open_dataset(synth["synthetic_blur"], n_train=None):
        image, mask = load_pair(s)
        energy = _laplacian_energy(image.astype(np.float32).mean(axis=2))
        inner = mask[1:-1, 1:-1].astype(bool)
        assert energy[inner].mean() < 0.5 * energy[~inner].mean(), s.id  # the foreground is the blurred part
    for s in open_dataset(synth["synthetic_shadow"], n_train=None):
        image, mask = load_pair(s)
        grey = image.astype(np.float32).mean(axis=2)
        assert grey[mask == 1].mean() < 0.8 * np.median(grey[mask == 0]), s.id  # the foreground is darker


def test_synthetic_is_idempotent_and_regenerates_on_change(tmp_path):
    out = str(tmp_path / "shadow")
    generate_task("synthetic_shadow", out, n_train=2, n_test=2, progress=False)
    stamp = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _files(out)}
    generate_task("synthetic_shadow", out, n_train=2, n_test=2, progress=False)
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in _files(out)} == stamp
    generate_task("synthetic_shadow", out, n_train=1, n_test=2, progress=False)
    assert sorted(os.listdir(os.path.join(out, "train", "images"))) == ["0000.png"]  # the stale file is gone
    meta = json.load(open(os.path.join(out, "dataset.json")))
    assert meta["generator"]["n_train"] == 1 and meta["generator"]["complete"] and meta["text"] == "shadow"
    os.remove(os.path.join(out, "test", "masks", "0001.png"))  # incomplete -> rewritten
    generate_task("synthetic_shadow", out, n_train=1, n_test=2, progress=False)
    assert os.path.isfile(os.path.join(out, "test", "masks", "0001.png"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="refusing"):
        generate_task("synthetic_blur", str(tmp_path / "mine"), progress=False)
    with pytest.raises(DataError, match="unknown synthetic task"):
        generate_task("synthetic_fog", str(tmp_path / "fog"), progress=False)


def test_synthetic_blur_from_an_older_generator_is_regenerated(tmp_path):
    """Version 1 wrote the in-focus regions as foreground; its folders must not be reused."""
    from alignsam_ray.data.synthetic import GENERATOR_VERSION

    assert GENERATOR_VERSION >= 2 and TASK_TEXT["synthetic_blur"] == TASK_TEXT["blur"] == "defocus background"
    out = str(tmp_path / "blur")
    generate_task("synthetic_blur", out, n_train=1, n_test=1, progress=False)
    fresh = _files(out)
    meta_path = os.path.join(out, "dataset.json")
    meta = json.load(open(meta_path))
    assert meta["generator"]["version"] == GENERATOR_VERSION and meta["text"] == "defocus background"
    assert not meta["invert"]
    for split in ("train", "test"):  # make it look like a version-1 folder: masks = the sharp part
        path = os.path.join(out, split, "masks", "0000.png")
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    meta["generator"]["version"] = 1
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    generate_task("synthetic_blur", out, n_train=1, n_test=1, progress=False)
    assert _files(out) == fresh
    for s in open_dataset(out, n_train=None):
        image, mask = load_pair(s)
        energy = _laplacian_energy(image.astype(np.float32).mean(axis=2))
        inner = mask[1:-1, 1:-1].astype(bool)
        assert energy[inner].mean() < energy[~inner].mean(), s.id


def test_duplicate_stems_and_voc_listing_errors(tmp_path, capsys):
    root = _generic(tmp_path / "ds")
    _save(root / "images" / "im0.png", _img(0))
    with pytest.raises(DataError, match=r"several images named 'im0'.*im0\.jpg, im0\.png"):
        open_dataset(str(root))
    voc = _voc(tmp_path / "VOC2012")
    with open(voc / "ImageSets" / "Segmentation" / "val.txt", "a") as f:
        f.write("2009_999999\n")
    with pytest.raises(DataError, match="missing image: no 2009_999999"):
        open_dataset(str(voc))
    assert len(open_dataset(str(voc), n_train=None, skip_bad=True)) == 9
    assert "skipped 1 of 7 images: 1 missing image (2009_999999)" in capsys.readouterr().err

"""Hand-computed checks of alignsam_ray.metrics on 4x4 masks, and of its bootstrap statistics.

BER is in percent (it was a fraction before the SBU dataset-level convention was adopted), so the
per-image BER expectations below carry a factor 100."""
import numpy as np
import pytest

from alignsam_ray.metrics import (
    METRICS,
    SUMMARY_KEYS,
    MetricAccumulator,
    confidence_intervals,
    image_metrics,
    paired_difference,
    primary_metrics,
)

# gt: top two rows foreground (8 px). pred: rows 0-2, cols 0-1 (6 px).
# TP = 4 (rows 0-1, cols 0-1), FP = 2 (row 2, cols 0-1), FN = 4, TN = 6.
GT = np.zeros((4, 4), np.uint8)
GT[:2] = 1
PRED = np.zeros((4, 4), bool)
PRED[:3, :2] = True


def emeasure_reference(pred, gt):
    """E_phi (Fan et al. 2018) pixel by pixel, with the MATLAB / pysodmetrics normalisation sum / (N - 1)."""
    p, g = pred.astype(float).ravel(), gt.astype(float).ravel()
    if g.all() or not g.any():  # degenerate gt: the reference counts matching pixels
        return np.count_nonzero(p == g) / (g.size - 1)
    dp, dg = p - p.mean(), g - g.mean()
    align = 2 * dp * dg / (dp**2 + dg**2 + np.spacing(1))
    return ((align + 1) ** 2 / 4).sum() / (g.size - 1)


def test_hand_computed_values():
    m = image_metrics(PRED, GT)
    assert m["iou"] == pytest.approx(4 / 10)
    assert m["fbeta"] == pytest.approx(13 / 21)  # P = 2/3, R = 1/2: 1.3 * (1/3) / (0.2 + 0.5)
    assert m["ber"] == pytest.approx(100 * (1 - 0.5 * (4 / 8 + 6 / 8)))  # 37.5 %
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 2, 4, 6)
    assert m["mae"] == pytest.approx(6 / 16)
    assert m["emeasure"] == pytest.approx(emeasure_reference(PRED, GT))
    assert 0 < m["emeasure"] < 1


def test_uint8_pred_equals_bool_pred():
    assert image_metrics(PRED.astype(np.uint8), GT) == image_metrics(PRED, GT)


def test_void_pixels_are_excluded():
    gt = GT.copy()
    gt[2, :2] = 255  # void exactly where the false positives were: 14 valid pixels, TP 4, FP 0, FN 4, TN 6
    m = image_metrics(PRED, gt)
    assert m["iou"] == pytest.approx(4 / 8)
    assert m["fbeta"] == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))  # P = 1, R = 1/2
    assert m["ber"] == pytest.approx(100 * (1 - 0.5 * (4 / 8 + 6 / 6)))  # 25 %
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 0, 4, 6)  # counts of the 14 non-void pixels
    assert m["mae"] == pytest.approx(4 / 14)  # not 4/16: void pixels are not counted as correct negatives
    valid = gt != 255
    assert m["emeasure"] == pytest.approx(emeasure_reference(PRED[valid], gt[valid] == 1))
    # whatever the prediction does on void pixels is irrelevant
    pred = PRED.copy()
    pred[2, :2] = False
    assert image_metrics(pred, gt) == m


def test_perfect_prediction():
    m = image_metrics(GT.astype(bool), GT)
    assert m["iou"] == 1 and m["fbeta"] == pytest.approx(1) and m["mae"] == 0 and m["ber"] == 0
    assert m["emeasure"] == pytest.approx(16 / 15)  # pysodmetrics divides by N - 1


def test_empty_prediction_and_empty_gt():
    empty, gt0 = np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8)
    m = image_metrics(empty, gt0)
    assert m["iou"] == 1 and m["fbeta"] == 1 and m["mae"] == 0 and m["ber"] == 0
    assert m["emeasure"] == pytest.approx(16 / 15)


def test_one_side_empty():
    empty = np.zeros((4, 4), bool)
    m = image_metrics(empty, GT)  # all 8 positives missed; a constant map scores 0.25 per pixel in E_phi
    assert (m["iou"], m["fbeta"], m["mae"]) == (0, 0, pytest.approx(0.5))
    assert m["ber"] == pytest.approx(50)
    assert m["emeasure"] == pytest.approx(0.25 * 16 / 15)

    gt0 = np.zeros((4, 4), np.uint8)
    m = image_metrics(PRED, gt0)  # no positives: BER uses only TN/N_neg = 10/16, in percent
    assert (m["iou"], m["fbeta"]) == (0, 0)
    assert m["ber"] == pytest.approx(100 * 6 / 16)
    assert m["emeasure"] == pytest.approx(10 / 15)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        image_metrics(PRED[:3], GT)
    with pytest.raises(ValueError):
        image_metrics(PRED, GT * 2)  # gt value 2
    with pytest.raises(ValueError):
        image_metrics(np.full((4, 4), 0.7), GT)  # not a binary mask
    with pytest.raises(ValueError):
        image_metrics(PRED, np.full((4, 4), 255, np.uint8))


def test_accumulator_means():
    acc = MetricAccumulator()
    acc.add(PRED, GT)
    acc.add([GT.astype(bool)], [GT])
    s = acc.summary()
    assert set(s) == {"miou", "iou_dataset", "fbeta", "emeasure", "mae", "ber", "ber_per_image", "n_images"}
    assert s["n_images"] == 2 and len(acc.per_image) == 2
    assert s["miou"] == pytest.approx((0.4 + 1) / 2)
    assert s["iou_dataset"] == pytest.approx((4 + 8) / (10 + 8))
    assert s["mae"] == pytest.approx(6 / 32)
    # both images have 8 positives and 8 negatives, so here the two BER conventions agree:
    assert s["ber_per_image"] == pytest.approx((37.5 + 0) / 2)
    assert s["ber"] == pytest.approx(100 * (1 - 0.5 * (12 / 16 + 14 / 16)))  # 18.75
    assert set(METRICS) == set(s) - {"n_images"} == set(SUMMARY_KEYS)
    assert all(np.isnan(v) for k, v in MetricAccumulator().summary().items() if k != "n_images")


# One positive pixel at (0, 0), predicted empty: TP 0, FP 0, FN 1, TN 15; IoU 0, BER 100 * (1 - (0/1 + 15/15)/2) = 50.
GT1 = np.zeros((4, 4), np.uint8)
GT1[0, 0] = 1
EMPTY = np.zeros((4, 4), bool)


def test_dataset_level_ber_and_iou_differ_from_per_image_means():
    acc = MetricAccumulator()
    acc.add([PRED, EMPTY], [GT, GT1])
    s = acc.summary()
    # per image: BER 37.5 and 50 -> mean 43.75; IoU 4/10 and 0/1 -> mean 0.2
    assert s["ber_per_image"] == pytest.approx(43.75)
    assert s["miou"] == pytest.approx(0.2)
    # summed: TP 4, FN 4+1 (N_pos 9), TN 6+15, FP 2 (N_neg 23): BER = 100 (1 - (4/9 + 21/23)/2) = 32.13 %
    assert s["ber"] == pytest.approx(100 * (1 - 0.5 * (4 / 9 + 21 / 23)))
    assert s["ber"] == pytest.approx(32.1256, abs=1e-4)
    # VOC: sum TP / sum union = 4 / (10 + 1)
    assert s["iou_dataset"] == pytest.approx(4 / 11)


def test_dataset_level_metrics_exclude_void():
    gt = GT.copy()
    gt[2, :2] = 255  # hides the 2 false positives: TP 4, FP 0, FN 4, TN 6
    acc = MetricAccumulator()
    acc.add([PRED, EMPTY], [gt, GT1])
    s = acc.summary()
    assert s["iou_dataset"] == pytest.approx(4 / (8 + 1))
    # N_pos 8 + 1, TN = N_neg = 6 + 15: 100 (1 - (4/9 + 1)/2) = 27.78 %
    assert s["ber"] == pytest.approx(100 * (1 - 0.5 * (4 / 9 + 21 / 21)))
    assert s["ber_per_image"] == pytest.approx((25 + 50) / 2)


def _rows_gt(rows: int) -> np.ndarray:
    """8x8 ground truth with the first ``rows`` rows foreground."""
    gt = np.zeros((8, 8), np.uint8)
    gt[:rows] = 1
    return gt


def _missing(gt: np.ndarray, k: int) -> np.ndarray:
    """The ground-truth mask with its first k foreground pixels (row-major) dropped: k false negatives."""
    p = gt.astype(bool).ravel()
    p[np.flatnonzero(p)[:k]] = False
    return p.reshape(gt.shape)


def _random_acc(n: int, seed: int) -> MetricAccumulator:
    rng = np.random.default_rng(seed)
    acc = MetricAccumulator()
    for _ in range(n):
        gt = (rng.random((8, 8)) < rng.uniform(0.1, 0.6)).astype(np.uint8)
        acc.add(gt.astype(bool) ^ (rng.random((8, 8)) < rng.uniform(0, 0.4)), gt)
    return acc


def test_confidence_intervals_contain_point_and_are_deterministic():
    acc = _random_acc(30, 0)
    s, ci = acc.summary(), confidence_intervals(acc, n_boot=500, seed=1)
    assert set(ci) == set(SUMMARY_KEYS)
    for k, (lo, hi) in ci.items():
        assert lo < s[k] < hi, k
    assert confidence_intervals(acc, n_boot=500, seed=1) == ci
    assert confidence_intervals(acc, n_boot=500, seed=2) != ci


def test_confidence_intervals_collapse_for_identical_images():
    acc = MetricAccumulator()
    acc.add([PRED] * 6, [GT] * 6)
    s, ci = acc.summary(), confidence_intervals(acc, n_boot=200)
    for k, (lo, hi) in ci.items():
        assert lo == pytest.approx(s[k], rel=1e-12) and hi == pytest.approx(s[k], rel=1e-12), k


def test_confidence_intervals_fewer_than_two_images():
    acc = MetricAccumulator()
    assert all(np.isnan(v).all() for v in confidence_intervals(acc).values())
    acc.add(PRED, GT)
    s = acc.summary()
    assert confidence_intervals(acc) == {k: [s[k], s[k]] for k in SUMMARY_KEYS}
    assert paired_difference(acc, acc)["ber"] == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_paired_difference_with_itself_is_exactly_zero():
    acc = _random_acc(20, 3)
    d = paired_difference(acc, acc, n_boot=300)
    assert set(d) == set(SUMMARY_KEYS)
    assert all(v == {"diff": 0.0, "ci95": [0.0, 0.0]} for v in d.values())


def test_paired_difference_detects_a_consistent_small_gain():
    # per image: B misses 2 more foreground pixels than A, on images whose difficulty varies widely
    rng = np.random.default_rng(0)
    a, b = MetricAccumulator(), MetricAccumulator()
    for _ in range(40):
        gt = _rows_gt(int(rng.integers(2, 7)))
        k = int(rng.integers(0, gt.sum() - 2))
        a.add(_missing(gt, k), gt)
        b.add(_missing(gt, k + 2), gt)
    d = paired_difference(a, b, n_boot=500)
    for k in ("miou", "iou_dataset", "fbeta"):
        assert d[k]["diff"] > 0 and d[k]["ci95"][0] > 0, k
    for k in ("mae", "ber", "ber_per_image"):
        assert d[k]["diff"] < 0 and d[k]["ci95"][1] < 0, k
    # the unpaired intervals of the two methods overlap: only pairing resolves the gain
    ca, cb = confidence_intervals(a, n_boot=500), confidence_intervals(b, n_boot=500)
    assert ca["miou"][0] < cb["miou"][1]


def test_paired_difference_straddles_zero_for_mixed_wins():
    # image pairs with the same gt: A misses 1 pixel and B 6 on one, the other way round on the other
    rng = np.random.default_rng(1)
    a, b = MetricAccumulator(), MetricAccumulator()
    for _ in range(15):
        gt = _rows_gt(int(rng.integers(2, 7)))
        for ka, kb in ((1, 6), (6, 1)):
            a.add(_missing(gt, ka), gt)
            b.add(_missing(gt, kb), gt)
    d = paired_difference(a, b, n_boot=500)
    for k in ("miou", "iou_dataset", "fbeta", "mae", "ber", "ber_per_image"):
        assert d[k]["diff"] == pytest.approx(0, abs=1e-9), k
        lo, hi = d[k]["ci95"]
        assert lo < 0 < hi, k


def test_paired_difference_needs_the_same_images():
    a, b = MetricAccumulator(), MetricAccumulator()
    a.add([PRED, EMPTY], [GT, GT1])
    b.add([PRED], [GT])
    with pytest.raises(ValueError):
        paired_difference(a, b)
    b.add(EMPTY, GT)  # same length, different ground truth
    with pytest.raises(ValueError):
        paired_difference(a, b)


def test_primary_metrics():
    assert primary_metrics("synthetic_blur") == primary_metrics("blur") == ("miou", "fbeta")
    assert primary_metrics("synthetic_shadow") == ("miou", "ber")
    assert primary_metrics("synthetic_glass") == ("miou", "fbeta")
    assert primary_metrics("synthetic_saliency") == ("emeasure", "mae")
    assert primary_metrics("synthetic_shapes") == primary_metrics("voc") == ("iou_dataset",)
    assert primary_metrics("something_else") == ("miou",)


def test_voc_table_accumulates_per_class_and_means_over_classes():
    """Table 3 layout: per class the dataset-accumulated IoU of each method, then the mean over classes."""
    from alignsam_ray.evaluate import METHODS, voc_table

    def evaluation(cls, iou):
        methods = {k: {"iou_dataset": iou - 0.1 * j, "ci95": {"iou_dataset": [iou - 0.2, iou]}}
                   for j, k in enumerate(METHODS)}
        return {"task": "voc", "store": f"stores/voc_{cls}", "store_tasks": [f"voc_{cls}"], "methods": methods}

    text, data = voc_table([evaluation("dog", 0.6), evaluation("cat", 0.8)])
    assert list(data["classes"]) == ["cat", "dog"]  # VOC's class order
    assert data["mean"]["alignsam"] == pytest.approx(0.7) and data["mean"]["random_actions"] == pytest.approx(0.6)
    assert "mean over 2 of the 20 classes" in text and "| cat | 0.800 [0.600, 0.800]" in text
    assert "**0.700 [0.629, 0.771]**" in text  # the classes' intervals combined: 1.96 sqrt(2 (0.1/1.96)^2) / 2
    with pytest.raises(ValueError, match="two evaluations"):
        voc_table([evaluation("cat", 0.8), evaluation("cat", 0.7)])
    mixed = evaluation("cat", 0.8)
    mixed["store_tasks"] = ["voc_cat", "voc_dog"]
    with pytest.raises(ValueError, match="one class per store"):
        voc_table([mixed])


def test_reward_study_pairs_two_runs_and_counts_beats(tmp_path):
    """scripts/rewards.py: alignsam(reward) - alignsam(hit) paired over two evaluations' per_image.json, and
    "beats" = the paired interval above 0 in at least 2 of 3 seeds (here: iou_gain beats hit, not srm_topk)."""
    import importlib.util
    import json
    import os
    import sys

    scripts = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")
    sys.path.insert(0, scripts)  # rewards.py imports its sibling seeds.py
    try:
        spec = importlib.util.spec_from_file_location("rewards", os.path.join(scripts, "rewards.py"))
        rewards = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rewards)
    finally:
        sys.path.remove(scripts)
    n, rng = 20, np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, n)
    counts = {"tp": [4] * n, "fp": [2] * n, "fn": [4] * n, "tn": [6] * n}

    def row(iou):
        return {"iou": list(iou), "fbeta": list(iou), "emeasure": list(iou), "mae": list(1 - iou), "ber": [10.0] * n,
                **counts}

    def run(reward, seed, shift, topk_lo):
        d = tmp_path / f"{reward}_{seed}"
        d.mkdir()
        rows = {"alignsam": row(base + shift), "srm_start_positive": row(base), "all_positive": row(base - 0.05)}
        (d / "per_image.json").write_text(json.dumps({"ids": [f"i{k}" for k in range(n)], "rows": rows}))
        paired = {"srm_topk": {k: {"diff": topk_lo + 0.01, "ci95": [topk_lo, topk_lo + 0.02]} for k in SUMMARY_KEYS}}
        methods = {m: {"hit_rate": 0.5, "label_accuracy": 0.75} for m in ("alignsam", "srm_topk")}
        return {"metrics": {"paired": paired, "methods": methods}, "eval_dir": str(d), "seconds": None}

    runs = {"hit": {s: run("hit", s, 0.0, -0.05) for s in range(3)},
            "iou_gain": {s: run("iou_gain", s, [0.1, 0.1, -0.1][s], [0.01, -0.05, -0.05][s]) for s in range(3)}}
    c = rewards.compare("synthetic_shapes", runs)
    vs_hit = c["vs_hit"]["iou_gain"]["miou"]
    assert [d["diff"] for d in vs_hit] == pytest.approx([0.1, 0.1, -0.1])
    direct = paired_difference(*(_acc(base + 0.1), _acc(base)))["miou"]
    assert vs_hit[0]["ci95"] == pytest.approx(direct["ci95"])  # the same paired bootstrap as `evaluate`
    assert c["beats"] == {"hit": {"srm_topk": "no", "hit": None}, "iou_gain": {"srm_topk": "no", "hit": "yes"}}
    assert [d["diff"] for d in c["start_vs_centre"]["hit"]["miou"]] == pytest.approx([0.05] * 3)
    text = rewards.comparison_table("synthetic_shapes", c)
    assert "| iou_gain | mIoU |" in text and "| 2 / 1 | no | yes |" in text
    two = rewards.compare("synthetic_shapes", {r: {s: runs[r][s] for s in (0, 1)} for r in runs})  # seed 2 not run
    assert two["beats"] == {"hit": {"srm_topk": "no", "hit": None}, "iou_gain": {"srm_topk": "open", "hit": "yes"}}
    assert "2 run so far" in rewards.comparison_table("synthetic_shapes", two)
    other = tmp_path / "other"
    other.mkdir()
    (other / "per_image.json").write_text(json.dumps({"ids": ["x"] * n, "rows": {"alignsam": row(base)}}))
    with pytest.raises(ValueError, match="same test images"):
        rewards.paired_rows(str(other), "alignsam", runs["hit"][0]["eval_dir"], "alignsam")


def _acc(iou):
    acc = MetricAccumulator()
    acc.per_image = [{"iou": v, "fbeta": v, "emeasure": v, "mae": 1 - v, "ber": 10.0, "tp": 4, "fp": 2, "fn": 4, "tn": 6}
                     for v in iou]
    return acc

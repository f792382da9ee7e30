"""Hand-computed checks of alignsam_ray.metrics on 4x4 masks."""
import numpy as np
import pytest

from alignsam_ray.metrics import METRIC_DEFINITIONS, MetricAccumulator, image_metrics, primary_metrics

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
    assert m["ber"] == pytest.approx(1 - 0.5 * (4 / 8 + 6 / 8))
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
    assert m["ber"] == pytest.approx(1 - 0.5 * (4 / 8 + 6 / 6))
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
    assert m["ber"] == pytest.approx(0.5)
    assert m["emeasure"] == pytest.approx(0.25 * 16 / 15)

    gt0 = np.zeros((4, 4), np.uint8)
    m = image_metrics(PRED, gt0)  # no positives: BER uses only TN/N_neg = 10/16
    assert (m["iou"], m["fbeta"]) == (0, 0)
    assert m["ber"] == pytest.approx(6 / 16)
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
    assert set(s) == {"miou", "fbeta", "emeasure", "mae", "ber", "n_images"}
    assert s["n_images"] == 2 and len(acc.per_image) == 2
    assert s["miou"] == pytest.approx((0.4 + 1) / 2)
    assert s["mae"] == pytest.approx(6 / 32)
    assert s["ber"] == pytest.approx(0.375 / 2)
    assert set(METRIC_DEFINITIONS) == set(s) - {"n_images"}
    assert np.isnan(MetricAccumulator().summary()["miou"])


def test_primary_metrics():
    assert primary_metrics("synthetic_blur") == primary_metrics("blur") == ("miou", "fbeta")
    assert primary_metrics("synthetic_shadow") == ("miou", "ber")
    assert primary_metrics("synthetic_glass") == ("miou", "fbeta")
    assert primary_metrics("synthetic_saliency") == ("emeasure", "mae")
    assert primary_metrics("synthetic_shapes") == ("miou",)
    assert primary_metrics("something_else") == ("miou",)

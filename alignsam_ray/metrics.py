"""Binary segmentation metrics for AlignSAM evaluation: IoU, F_beta, E-measure, MAE and BER.

Inputs, per image:
    pred: (H, W) binary mask at full image resolution (bool, or an integer/float array holding only 0 and 1).
    gt:   (H, W) uint8, 0 = background, 1 = foreground, 255 = void (PASCAL VOC borders).

Void pixels are dropped before *every* metric: each metric sees only the N non-void pixels, as a (1, N)
vector for pysodmetrics. This is exact, not an approximation: F_beta, MAE and pysodmetrics' E-measure
depend only on pixel counts / per-pixel values, not on where the pixels are. (Zeroing void pixels instead
would count them as true negatives and shift MAE, BER and E-measure.)

pysodmetrics (``py_sod_metrics`` 1.6.2) supplies F_beta, E-measure and MAE; IoU and BER are computed here.
Quirks of that library that decided which of its outputs are used:
  * F_beta: ``FmeasureV2`` + ``FmeasureHandler(with_binary=True, beta=0.3)`` ("binary" = pred > 0.5) is the
    plain F_beta of the mask. Its "adaptive" F (threshold 2 * mean(pred)) equals it except for an empty
    prediction, where the threshold becomes 0 and the mask turns all-foreground. Its ``beta`` argument is
    beta^2. It returns 0 when pred and gt are both empty; we use 1 there, like IoU.
  * E-measure: ``Emeasure`` curve[0], the score at threshold 255/255, i.e. the binary mask itself. Its
    "adaptive" score has the same empty-prediction flaw (wrong only when gt is empty too), and the mean of
    the 256-point curve is not the binary score because it includes threshold 0 (all foreground).
  * E-measure is normalised by N - 1, as in the MATLAB reference, so a perfect mask scores N / (N - 1),
    slightly above 1 (16/15 on a 4x4 image; 1 + 1e-5 on a 320x320 image).
"""
from __future__ import annotations

import numpy as np
import py_sod_metrics as sod

VOID = 255
BETA2 = 0.3  # beta^2 of F_beta, the salient-object convention
IMAGE_KEYS = ("iou", "fbeta", "emeasure", "mae", "ber")

METRIC_DEFINITIONS: dict[str, str] = {
    "miou": "mean over images of the foreground IoU TP/(TP+FP+FN), void pixels excluded; 1 when mask and ground truth are both empty",
    "fbeta": "mean over images of F_beta = (1+b2)PR/(b2 P + R) with beta^2 = 0.3 of the binary mask (pysodmetrics), void excluded; 1 when both are empty",
    "emeasure": "mean over images of the enhanced-alignment measure E_phi (Fan et al., IJCAI 2018) of the binary mask (pysodmetrics, sum over pixels / (N-1)), void excluded",
    "mae": "mean over images of the mean absolute error |mask - gt| over non-void pixels, mask in {0,1} (pysodmetrics)",
    "ber": "mean over images of the balanced error rate 1 - (TP/N_pos + TN/N_neg)/2, void excluded; only the defined term when a class is absent",
}

PRIMARY_METRICS = {
    "blur": ("miou", "fbeta"),
    "shadow": ("miou", "ber"),
    "glass": ("miou", "fbeta"),
    "saliency": ("emeasure", "mae"),
    "voc": ("miou",),
}
_SYNTHETIC = {"synthetic_blur": "blur", "synthetic_shadow": "shadow", "synthetic_glass": "glass",
              "synthetic_saliency": "saliency", "synthetic_shapes": "voc"}


def primary_metrics(task: str) -> tuple:
    """The summary keys reported for ``task`` ("blur", "synthetic_blur", ...); ("miou",) if unknown."""
    return PRIMARY_METRICS.get(_SYNTHETIC.get(task, task), ("miou",))


def _valid_pixels(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """-> (pred, gt) as 1-D bool vectors over the non-void pixels."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be (H, W) arrays of the same shape")
    if pred.dtype != bool and not np.isin(pred, (0, 1)).all():
        raise ValueError("pred must be a binary mask (bool or 0/1 values)")
    bad = np.setdiff1d(np.unique(gt), (0, 1, VOID))
    if bad.size:
        raise ValueError(f"gt must hold only 0, 1 and {VOID} (void); found {bad[:5].tolist()}")
    valid = gt != VOID
    if not valid.any():
        raise ValueError("every gt pixel is void: no metric is defined")
    return pred[valid].astype(bool), gt[valid] == 1


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Metrics of one binary mask against its ground truth, void pixels excluded; all higher-is-better
    except ``mae`` and ``ber``. Returns {"iou", "fbeta", "emeasure", "mae", "ber"} as floats."""
    p, g = _valid_pixels(pred, gt)
    tp, fp, fn = np.count_nonzero(p & g), np.count_nonzero(p & ~g), np.count_nonzero(~p & g)
    tn = p.size - tp - fp - fn
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    rates = ([tp / (tp + fn)] if tp + fn else []) + ([tn / (tn + fp)] if tn + fp else [])
    ber = 1.0 - float(np.mean(rates))

    pf, gb = p.astype(np.float64)[None], g[None]  # (1, N): the pysodmetrics metrics used are count-based
    fm = sod.FmeasureV2({"f": sod.FmeasureHandler(with_dynamic=False, with_adaptive=False, with_binary=True, beta=BETA2)})
    fm.step(pf, gb, normalize=False)
    fbeta = 1.0 if tp + fp + fn == 0 else fm.get_results()["f"]["binary"]
    em = sod.Emeasure()
    em.step(pf, gb, normalize=False)
    mae = sod.MAE()
    mae.step(pf, gb, normalize=False)
    return {"iou": float(iou), "fbeta": float(fbeta), "emeasure": float(em.get_results()["em"]["curve"][0]),
            "mae": float(mae.get_results()["mae"]), "ber": ber}


class MetricAccumulator:
    """Collects per-image metrics; ``summary()`` averages them over images (mIoU = mean per-image IoU)."""

    def __init__(self):
        self.per_image: list[dict] = []

    def add(self, pred, gt) -> None:
        """Add one (H, W) mask and its ground truth, or equal-length lists/tuples of them."""
        if isinstance(pred, (list, tuple)):
            if not isinstance(gt, (list, tuple)) or len(pred) != len(gt):
                raise ValueError("pred and gt lists must have the same length")
            for p, g in zip(pred, gt):
                self.add(p, g)
            return
        self.per_image.append(image_metrics(pred, gt))

    def summary(self) -> dict:
        """{"miou", "fbeta", "emeasure", "mae", "ber"}: means over images (NaN if none), plus "n_images"."""
        n = len(self.per_image)
        out = {("miou" if k == "iou" else k): float(np.mean([m[k] for m in self.per_image])) if n else float("nan")
               for k in IMAGE_KEYS}
        out["n_images"] = n
        return out

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

Aggregation over a test set (``MetricAccumulator.summary()``):
  * per-image means: miou, fbeta, emeasure, mae, ber_per_image;
  * dataset-level, from pixel counts summed over all images: iou_dataset (PASCAL VOC accumulated IoU) and
    ber (SBU reference code). BER is in PERCENT everywhere in this module, per image and per data set.
Per image the accumulator keeps tp, fp, fn, tn (non-void pixel counts) next to the per-image metrics, so
``confidence_intervals`` and ``paired_difference`` recompute every summary metric, dataset-level ones from
summed counts, on bootstrap resamples of the images (``scipy.stats.bootstrap``, BCa).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

VOID = 255
BETA2 = 0.3  # beta^2 of F_beta, the salient-object convention
IMAGE_KEYS = ("iou", "fbeta", "emeasure", "mae", "ber")  # per-image metrics (ber in percent)
COUNT_KEYS = ("tp", "fp", "fn", "tn")  # per-image counts of non-void pixels


@dataclass(frozen=True)
class Metric:
    """One summary metric of a test set: the one home of its name, direction and definition."""
    label: str             # column heading in our reports ("BER %")
    paper_label: str       # the paper's name for it in its tables (reproduce's report)
    lower_is_better: bool  # MAE and BER: lower is better; every other metric: higher
    definition: str        # what it computes (report.md, docs/metrics.md)


METRICS: dict[str, Metric] = {
    "miou": Metric("mIoU", "mIoU", False,
                   "mean over images of the per-image foreground IoU TP/(TP+FP+FN), void pixels excluded; 1 when "
                   "mask and ground truth are both empty. Reported as mIoU for blur and glass: the AlignSAM paper "
                   "does not say whether its mIoU is per-image or accumulated, we use the per-image mean"),
    "iou_dataset": Metric("IoU (dataset)", "mIoU", False,
                          "PASCAL VOC accumulated foreground IoU: sum over images of TP / sum over images of "
                          "(TP+FP+FN), void (255) pixels excluded; 1 if the union is empty on every image"),
    "fbeta": Metric("F_beta", "F_beta", False,
                    "mean over images of F_beta = (1+b2)PR/(b2 P + R) with beta^2 = 0.3 (salient-object "
                    "convention) of the binary mask (pysodmetrics), void excluded; 1 when both are empty"),
    "emeasure": Metric("E_phi", "E_phi", False,
                       "mean over images of the enhanced-alignment measure E_phi (Fan et al., IJCAI 2018) of the "
                       "binary mask (pysodmetrics, sum over pixels / (N-1)), void excluded"),
    "mae": Metric("MAE", "MAE", True,
                  "mean over images of the mean absolute error |mask - gt| over non-void pixels, mask in {0,1} "
                  "(pysodmetrics)"),
    "ber": Metric("BER %", "BER", True,
                  "balanced error rate in PERCENT over the whole test set, as the SBU shadow reference code: "
                  "100 * (1 - (sum TP / sum N_pos + sum TN / sum N_neg) / 2), counts summed over all images, "
                  "void excluded"),
    "ber_per_image": Metric("BER % (per image)", "BER", True,
                            "mean over images of the per-image balanced error rate in percent, "
                            "100 * (1 - (TP/N_pos + TN/N_neg)/2), void excluded; only the defined term when a "
                            "class is absent"),
}
SUMMARY_KEYS = tuple(METRICS)  # the summary of a test set, in this order everywhere (tables, bootstrap rows)
LOWER_IS_BETTER = tuple(k for k, m in METRICS.items() if m.lower_is_better)
# Tune's selection metrics, measured on the validation split: the higher-is-better ones
VAL_METRICS = tuple(f"val_{k}" for k, m in METRICS.items() if not m.lower_is_better)
ROLLOUT_STATS = {"hit_rate": "hit rate", "label_accuracy": "label acc."}  # per-method rollout figures, not metrics
NAMES = {k: m.label for k, m in METRICS.items()} | ROLLOUT_STATS  # a column heading for every reported key

PRIMARY_METRICS = {
    "blur": ("miou", "fbeta"),
    "shadow": ("miou", "ber"),
    "glass": ("miou", "fbeta"),
    "saliency": ("emeasure", "mae"),
    "voc": ("iou_dataset",),
}
_SYNTHETIC = {"synthetic_blur": "blur", "synthetic_shadow": "shadow", "synthetic_glass": "glass",
              "synthetic_saliency": "saliency", "synthetic_shapes": "voc"}


def primary_metrics(task: str) -> tuple:
    """The summary keys reported for ``task`` ("blur", "synthetic_blur", "voc_cat", ...); ("miou",) if unknown."""
    if task.startswith("voc_"):
        task = "voc"
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


def _ber_percent(tp, fp, fn, tn):
    """100 * (1 - (TP/N_pos + TN/N_neg) / 2), only the defined rate when a class is absent; arrays broadcast."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100 * (1 - np.nanmean(np.stack([tp / (tp + fn), tn / (tn + fp)]), axis=0))


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Metrics of one binary mask against its ground truth, void pixels excluded; all higher-is-better
    except ``mae`` and ``ber``. Returns {"iou", "fbeta", "emeasure", "mae", "ber"} as floats (ber in percent)
    and the non-void pixel counts {"tp", "fp", "fn", "tn"} as ints."""
    p, g = _valid_pixels(pred, gt)
    tp, fp, fn = np.count_nonzero(p & g), np.count_nonzero(p & ~g), np.count_nonzero(~p & g)
    tn = p.size - tp - fp - fn
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0

    import py_sod_metrics as sod  # (imported here: the registry above is read by light modules)

    pf, gb = p.astype(np.float64)[None], g[None]  # (1, N): the pysodmetrics metrics used are count-based
    fm = sod.FmeasureV2({"f": sod.FmeasureHandler(with_dynamic=False, with_adaptive=False, with_binary=True, beta=BETA2)})
    fm.step(pf, gb, normalize=False)
    fbeta = 1.0 if tp + fp + fn == 0 else fm.get_results()["f"]["binary"]
    em = sod.Emeasure()
    em.step(pf, gb, normalize=False)
    mae = sod.MAE()
    mae.step(pf, gb, normalize=False)
    return {"iou": float(iou), "fbeta": float(fbeta), "emeasure": float(em.get_results()["em"]["curve"][0]),
            "mae": float(mae.get_results()["mae"]), "ber": float(_ber_percent(tp, fp, fn, tn)),
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}


def _summaries(w: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Summary metrics of weighted image sets. w: (B, n) image weights (1 = once, bootstrap resample counts);
    table: (n, 9) per-image columns IMAGE_KEYS + COUNT_KEYS. -> (7, B), rows in SUMMARY_KEYS order."""
    s = w @ table  # (B, 9) weighted sums
    mean = s[:, :5] / w.sum(1, keepdims=True)
    tp, fp, fn, tn = s[:, 5:].T
    union = tp + fp + fn
    iou_dataset = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
    miou, fbeta, emeasure, mae, ber_per_image = mean.T
    return np.stack([miou, iou_dataset, fbeta, emeasure, mae, _ber_percent(tp, fp, fn, tn), ber_per_image])


class MetricAccumulator:
    """Collects per-image metrics and counts (``per_image``: one ``image_metrics`` dict per image, in order);
    ``summary()`` aggregates them over the images."""

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

    def table(self) -> np.ndarray:
        """(n_images, 9) float64: per-image IMAGE_KEYS then COUNT_KEYS columns."""
        keys = IMAGE_KEYS + COUNT_KEYS
        return np.array([[m[k] for k in keys] for m in self.per_image], np.float64).reshape(-1, len(keys))

    def summary(self) -> dict:
        """{"miou", "iou_dataset", "fbeta", "emeasure", "mae", "ber", "ber_per_image"} as floats (see
        METRICS; NaN if no image), plus "n_images"."""
        n = len(self.per_image)
        vals = _summaries(np.ones((1, n)), self.table())[:, 0] if n else np.full(len(SUMMARY_KEYS), np.nan)
        return {**{k: float(v) for k, v in zip(SUMMARY_KEYS, vals)}, "n_images": n}


def _bootstrap(stat, n: int, point: np.ndarray, n_boot: int, seed: int, level: float) -> np.ndarray:
    """BCa bootstrap CI over n images of ``stat(w) -> (k, B)`` (w: (B, n) resample counts) -> (k, 2) [lo, hi].
    The images are resampled via their indices, so one resample serves every metric (and both methods of a
    paired comparison). Where BCa is undefined (e.g. a constant bootstrap distribution) the percentile CI is
    used; for n < 2 the CI is [point, point] (NaN for n = 0)."""
    if n < 2:
        return np.stack([point, point], 1)

    def on_indices(idx, axis=-1):  # idx: (..., m) image indices -> (k, ...)
        idx = np.asarray(idx, np.int64)
        flat = idx.reshape(-1, idx.shape[-1])
        w = np.bincount((flat + n * np.arange(len(flat))[:, None]).ravel(), minlength=len(flat) * n)
        return stat(w.reshape(len(flat), n).astype(np.float64)).reshape(-1, *idx.shape[:-1])

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap((np.arange(n),), on_indices, n_resamples=n_boot, vectorized=True, axis=-1,
                              confidence_level=level, method="BCa", rng=np.random.default_rng(seed))
    ci = np.stack([res.confidence_interval.low, res.confidence_interval.high], 1)
    pct = np.percentile(res.bootstrap_distribution, [50 * (1 - level), 50 * (1 + level)], axis=1).T
    return np.where(np.isnan(ci), pct, ci)


def confidence_intervals(acc: MetricAccumulator, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{metric: [lo, hi]} for every SUMMARY_KEYS metric: bootstrap over the test images (resampled with
    replacement; iou_dataset and ber recomputed from the summed counts of each resample). Deterministic in seed;
    [value, value] when n_images < 2 (NaN when empty)."""
    table, n = acc.table(), len(acc.per_image)
    point = np.array([acc.summary()[k] for k in SUMMARY_KEYS])
    ci = _bootstrap(lambda w: _summaries(w, table), n, point, n_boot, seed, level)
    return {k: [float(lo), float(hi)] for k, (lo, hi) in zip(SUMMARY_KEYS, ci)}


def paired_difference(acc_a: MetricAccumulator, acc_b: MetricAccumulator, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """{metric: {"diff": summary_a[m] - summary_b[m], "ci95": [lo, hi]}} for every SUMMARY_KEYS metric; both
    accumulators must hold the same images in the same order (paired bootstrap: one resample of image indices
    applied to both). ``ci95`` is at ``level`` (0.95 by default). Raises ValueError on a different number of images
    or different ground truth (per-image N_pos, N_neg). CI as in ``confidence_intervals`` for n_images < 2."""
    ta, tb = acc_a.table(), acc_b.table()
    if len(ta) != len(tb):
        raise ValueError(f"paired_difference needs the same images: {len(ta)} vs {len(tb)} images")
    def pos_neg(t):  # N_pos = TP + FN, N_neg = FP + TN
        return np.stack([t[:, 5] + t[:, 7], t[:, 6] + t[:, 8]])

    if not np.array_equal(pos_neg(ta), pos_neg(tb)):
        raise ValueError("paired_difference needs the same images in the same order: ground-truth counts differ")
    sa, sb = acc_a.summary(), acc_b.summary()
    diff = np.array([sa[k] - sb[k] for k in SUMMARY_KEYS])
    ci = _bootstrap(lambda w: _summaries(w, ta) - _summaries(w, tb), len(ta), diff, n_boot, seed, level)
    return {k: {"diff": float(d), "ci95": [float(lo), float(hi)]} for k, d, (lo, hi) in zip(SUMMARY_KEYS, diff, ci)}


def mean_of_classes(cells: list[dict]) -> dict:
    """Mean over classes of per-class values ``{"value", "ci95": [lo, hi] | None}`` (VOC's mean class
    IoU). Each class has its own test images, so the classes' errors are independent: the mean's 95%
    interval combines theirs (normal approximation, se_c = half-width_c / 1.96; half-width of the mean
    = 1.96 sqrt(sum se_c^2) / n). One class: its own cell. Any class without an interval: none."""
    if len(cells) == 1:
        return dict(cells[0])
    mean = float(np.mean([c["value"] for c in cells]))
    ses = [(c["ci95"][1] - c["ci95"][0]) / (2 * 1.96) for c in cells if c.get("ci95")]
    if len(ses) != len(cells):
        return {"value": mean, "ci95": None}
    half = 1.96 * float(np.sqrt(np.sum(np.square(ses)))) / len(cells)
    return {"value": mean, "ci95": [mean - half, mean + half]}


"""Evaluation with the paper's protocol, its ablations, metrics with 95% confidence intervals and a report
(no Ray cluster needed).

    alignsam evaluate --checkpoint RUN_OR_CHECKPOINT --store STORE --out DIR [--split test]

Protocol: each test image starts from the SRM's highest- (positive) and lowest-scoring
(negative) positions, then the policy picks T points greedily (argmax of the masked logits);
each is labelled by the SRM and SAM's decoder re-runs on all points. Metrics are computed on the
final mask upscaled to the image's full resolution (``metrics.py`` states each definition).

Methods (rows of the paper's Table 2, plus two references):
    alignsam        the trained policy + SRM labels, T steps (T from the run config, paper 15)
    random_actions  w/o RL: uniformly random free patches, SRM start and labels
    all_positive    w/o SRM: no SRM anywhere. Start: one positive point at the image centre (no
                    negative point); the policy picks T patches, every point labelled positive
    single_step     w/o multi-step: T = 1
    srm_topk        non-RL reference: SRM start; at each step the free patch whose current SRM
                    probability is highest, SRM labels (the T best SRM cells, in order)
    gt_labels       oracle labels: the policy's points labelled from the ground truth (not an upper
                    bound: a correct label can still give SAM a worse mask than the SRM's)
T sweep (paper Table 5): the alignsam rollout read at T in {1, 5, 10, 15, 20} (those <= the grid's size).

Statistics: per method and metric a 95% bootstrap interval over test images (``ci95``), and for
every other method the paired difference alignsam - method with its 95% interval (``paired``).

Outputs in DIR: metrics.json ({"task", "n_images", "methods": {NAME: {metric: value, "ci95":
{metric: [lo, hi]}}}, "paired": {NAME: {metric: {"diff", "ci95"}}}, "t_sweep": {T: {...}}, ...}),
report.md, per_image.csv (id, method and each image's iou, fbeta, emeasure, mae, ber: the values behind
the means), figures/<image>.png (prompts, masks and the ground-truth outline at steps 1, 5, 10, 15).
"""
from __future__ import annotations

import csv
import json
import os
import time

import numpy as np

from .checkpoint import Agent
from .config import ConfigError
from .env.alignsam_env import holdout_split
from .env.rollout import Rollout, rollout
from .foundation.decoder import SamPromptDecoder
from .metrics import (
    IMAGE_KEYS,
    METRIC_DEFINITIONS,
    MetricAccumulator,
    confidence_intervals,
    mean_of_classes,
    paired_difference,
    primary_metrics,
)
from .store.loader import EmbeddingStore
from .visualise import overlay

METHODS = {  # name -> (action rule, start rule, label rule, horizon: None = the run's T)
    "alignsam": ("policy", "srm", "srm", None),
    "random_actions": ("random", "srm", "srm", None),
    "all_positive": ("policy", "centre", "positive", None),
    "single_step": ("policy", "srm", "srm", 1),
    "srm_topk": ("srm_topk", "srm", "srm", None),
    "gt_labels": ("policy", "srm", "gt", None),
}
T_SWEEP = (1, 5, 10, 15, 20)
FIGURE_STEPS = (1, 5, 10, 15)
METRIC_KEYS = ("miou", "iou_dataset", "fbeta", "emeasure", "mae", "ber", "ber_per_image")
LOWER_IS_BETTER = ("mae", "ber", "ber_per_image")
PER_IMAGE = "per_image.csv"


def score(logits: list, ids, sizes, gt_full: dict, decoder: SamPromptDecoder) -> MetricAccumulator:
    """Per-image metrics of low-res logits against full-resolution ground truth (void excluded)."""
    acc = MetricAccumulator()
    for lo, i, hw in zip(logits, ids, sizes):
        acc.add(decoder.upscale_mask(lo, hw), gt_full[i])
    return acc


def _method_row(acc: MetricAccumulator, roll: Rollout, t: int, ci: bool = True) -> dict:
    row = {**acc.summary(), **roll.stats(t)}
    if ci:
        row["ci95"] = confidence_intervals(acc)
    return row


def trained_sam(agent: Agent) -> dict:
    """{"sam_type", "checkpoint_sha256"} of the SAM the agent was trained with: from the checkpoint's
    state.json, else (checkpoints from before it was recorded) from the run's store manifest."""
    from .store.shards import read_manifest

    try:
        with open(os.path.join(agent.checkpoint, "state.json")) as f:
            sam = json.load(f).get("sam")
    except (OSError, ValueError):
        sam = None
    if not sam:
        try:
            manifest = read_manifest(agent.cfg["store"])
        except Exception as exc:
            raise ConfigError(f"cannot tell which SAM checkpoint {agent.checkpoint!r} was trained with: its "
                              f"checkpoint records none and its run's store {agent.cfg['store']!r} is unreadable "
                              f"({exc}); evaluate on that store, or make it reachable") from None
        sam = {key: manifest.get(key) for key in ("sam_type", "checkpoint_sha256")}
    return sam


def check_store(agent: Agent, st: EmbeddingStore, store: str) -> None:
    """Refuse a store made with another SAM than the agent's run (a silent wrong result otherwise):
    same SAM type and the same checkpoint file (sha256), not only the same embedding width."""
    if st.embed_dim != agent.srm.embed_dim:
        raise ConfigError(f"store {store!r} holds {st.embed_dim}-d embeddings but the checkpoint was trained on "
                          f"{agent.srm.embed_dim}-d ones (another SAM type); evaluate on a store of the same SAM")
    theirs = trained_sam(agent)
    ours = {key: st.manifest.get(key) for key in ("sam_type", "checkpoint_sha256")}
    if ours != theirs:
        store_sam, run_sam = (f"{s['sam_type']} SAM, checkpoint sha256 {str(s['checkpoint_sha256'])[:12]}"
                             for s in (ours, theirs))
        raise ConfigError(f"store {store!r} was embedded with {store_sam} but checkpoint {agent.checkpoint!r} was "
                          f"trained on {run_sam}; evaluate on a store embedded with the run's SAM checkpoint")


def evaluate(checkpoint: str, store: str, out: str, split: str = "test", batch: int = 16, n_figures: int = 4,
             seed: int = 0, progress: bool = True) -> dict:
    t0 = time.time()
    agent = Agent.load(checkpoint)
    st = EmbeddingStore(store)
    check_store(agent, st, store)
    data = st.arrays(split)
    gt_full = st.gt_full(split)
    decoder = st.decoder()
    T = int(agent.cfg["env"]["horizon"])
    ids, sizes = data["ids"], data["original_size"]
    os.makedirs(out, exist_ok=True)

    def log(msg):
        if progress:
            print(f"[evaluate] {msg}", flush=True)

    accs, results, sweep = {}, {}, {}
    t_sweep = tuple(t for t in T_SWEEP if t <= agent.grid.n)
    horizon = max(t_sweep + (T,))
    log(f"{len(ids)} {split} images, T = {T}; alignsam rollout to T = {horizon}")
    main = rollout(agent, data, decoder, "policy", "srm", horizon,
                   tuple(sorted(set(t_sweep + FIGURE_STEPS + (T, 0)) & set(range(horizon + 1)))), batch, seed)
    for t in t_sweep:
        sweep[str(t)] = _method_row(score(main.logits[t], ids, sizes, gt_full, decoder), main, t)
    for name, t in (("alignsam", T), ("single_step", 1)):
        accs[name] = score(main.logits[t], ids, sizes, gt_full, decoder)
        results[name] = _method_row(accs[name], main, t)
    for name, (actions, init, labels, h) in METHODS.items():
        if name in results:
            continue
        log(f"method {name}")
        h = h or T
        r = rollout(agent, data, decoder, actions, labels, h, (h,), batch, seed, init=init)
        accs[name] = score(r.logits[h], ids, sizes, gt_full, decoder)
        results[name] = _method_row(accs[name], r, h)
    results = {name: results[name] for name in METHODS}
    paired = {name: paired_difference(accs["alignsam"], accs[name]) for name in METHODS if name != "alignsam"}
    metrics = {
        "task": agent.cfg["task"], "n_images": int(len(ids)), "split": split, "horizon": T,
        "checkpoint": agent.checkpoint, "store": os.path.abspath(store), "store_tasks": st.manifest.get("tasks", []),
        "methods": results, "paired": paired,
        "t_sweep": sweep, "initial_prompts": score(main.logits[0], ids, sizes, gt_full, decoder).summary(),
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(metrics))
    write_per_image(os.path.join(out, PER_IMAGE), ids, accs)
    figs = write_figures(st, split, main, ids, data["input_size"], decoder, gt_full, os.path.join(out, "figures"),
                         n_figures)
    log(f"wrote {out}/metrics.json, report.md and {figs} figure(s) in {metrics['seconds']:.0f}s")
    return metrics


def write_per_image(path: str, ids, accs: dict) -> None:
    """per_image.csv: one row per (image, method) with the image's ``metrics.IMAGE_KEYS`` values."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("id", "method") + IMAGE_KEYS)
        for name, acc in accs.items():
            for i, m in zip(ids, acc.per_image):
                w.writerow((i, name) + tuple(f"{float(m[k]):.6g}" for k in IMAGE_KEYS))


def validation_set(store: str, k: int) -> tuple[dict, dict, SamPromptDecoder]:
    """The last ``k`` images of the store's train split (the validation images a run with
    ``train.val_images = k`` never trains on): (arrays, full-resolution ground truth, decoder).
    Read once per run; ``validation_metrics`` scores an agent on it."""
    st = EmbeddingStore(store, verify=False)
    data = st.arrays("train")
    _, val = holdout_split(len(data["ids"]), k)
    data = {key: v[val] for key, v in data.items()}
    gt = st.gt_full("train")
    return data, {i: gt[i] for i in data["ids"]}, st.decoder()


def alignsam_score(agent: Agent, data: dict, gt_full: dict, decoder: SamPromptDecoder, batch: int = 16,
                   seed: int = 0) -> MetricAccumulator:
    """The ``alignsam`` method alone (the paper's protocol: SRM start, greedy policy, SRM labels, the
    run's T) on store arrays -> per-image metrics (model selection, run-to-run comparisons)."""
    T = int(agent.cfg["env"]["horizon"])
    r = rollout(agent, data, decoder, "policy", "srm", T, (T,), batch, seed)
    return score(r.logits[T], data["ids"], data["original_size"], gt_full, decoder)


def validation_metrics(agent: Agent, val_set: tuple, batch: int = 16, seed: int = 0) -> dict:
    """alignsam (the paper's protocol) on a ``validation_set`` -> {"val_miou", ...}."""
    summary = alignsam_score(agent, *val_set, batch=batch, seed=seed).summary()
    return {f"val_{m}": summary[m] for m in METRIC_KEYS}


NAMES = {"miou": "mIoU", "iou_dataset": "IoU (dataset)", "fbeta": "F_beta", "emeasure": "E_phi", "mae": "MAE",
         "ber": "BER %", "ber_per_image": "BER % (per image)", "hit_rate": "hit rate", "label_accuracy": "label acc."}
LABELS = {"alignsam": "alignsam", "random_actions": "random_actions (w/o RL)", "all_positive": "all_positive (w/o SRM)",
          "single_step": "single_step (w/o multi-step, T = 1)", "srm_topk": "srm_topk (no RL: best SRM cells)",
          "gt_labels": "gt_labels (oracle labels)"}


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def _cell(m: dict, k: str) -> str:
    v = m.get(k, float("nan"))
    ci = (m.get("ci95") or {}).get(k)
    return _fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def verdict(diff: dict, metric: str) -> str:
    """Words for a paired difference alignsam - other: only a CI that excludes 0 says better/worse."""
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi or lo != lo:
        return "no clear difference"
    better = (lo > 0) != (metric in LOWER_IS_BETTER)
    return "alignsam better" if better else "alignsam worse"


def report_markdown(metrics: dict) -> str:
    keys = METRIC_KEYS + ("hit_rate", "label_accuracy")
    head = "| | " + " | ".join(NAMES[k] for k in keys) + " |\n|" + "---|" * (len(keys) + 1)
    prim = primary_metrics(metrics["task"])
    lines = [
        f"# AlignSAM evaluation: {metrics['task']}", "",
        f"{metrics['n_images']} {metrics['split']} images, T = {metrics['horizon']}, checkpoint "
        f"`{metrics['checkpoint']}`, store `{metrics['store']}`. The paper reports "
        f"{', '.join(NAMES[k] for k in prim)} for this task. Brackets: 95% bootstrap interval over images.", "",
        "## Methods and ablations (cf. paper Table 2)", "", head,
    ]
    lines += [f"| {LABELS.get(name, name)} | " + " | ".join(_cell(m, k) for k in keys) + " |"
              for name, m in metrics["methods"].items()]
    lines += ["", "hit rate = share of picked points on foreground; label acc. = share of picked points whose label "
              "(SRM, oracle or all-positive) matches the ground truth.", "",
              "## Paired differences: alignsam - method (95% bootstrap interval over the same images)", ""]
    shown = tuple(dict.fromkeys(("miou",) + tuple(prim)))
    lines += ["| method | " + " | ".join(f"{NAMES[k]} diff [95% CI] | " for k in shown).rstrip(" |") + " |",
              "|---|" + "---|---|" * len(shown)]
    for name, d in metrics["paired"].items():
        cells = [f"{_fmt(d[k]['diff'])} [{_fmt(d[k]['ci95'][0])}, {_fmt(d[k]['ci95'][1])}] | {verdict(d[k], k)}"
                 for k in shown]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", "## Number of steps T (cf. paper Table 5)", "", head.replace("| |", "| T |", 1)]
    lines += [f"| {t} | " + " | ".join(_cell(m, k) for k in keys) + " |" for t, m in metrics["t_sweep"].items()]
    init = metrics["initial_prompts"]
    lines += ["", f"Initial SRM prompts only (T = 0): mIoU {init['miou']:.3f}.", "", "## Metric definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in METRIC_DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def voc_table(evaluations: list[dict]) -> tuple[str, dict]:
    """Paper Table 3 layout from per-class evaluations (one ``metrics.json`` dict per VOC class, each from
    a store embedded with ``--classes <class>``): per class, each method's IoU accumulated over the class's
    test images (``iou_dataset``, the VOC convention) with its 95% interval, and the mean over the classes.
    Returns (Markdown, {"classes": {class: {method: iou}}, "mean": {method: iou}, "n_classes"})."""
    from .data.samples import VOC_CLASSES

    rows: dict = {}
    for m in evaluations:
        tasks = [t for t in m.get("store_tasks", []) if t.startswith("voc_")] or [m["task"]]
        if len(tasks) != 1:
            raise ValueError(f"evaluation of {m['store']} covers {len(tasks)} VOC classes ({tasks}); Table 3 needs "
                             "one class per store (`alignsam embed --data voc:... --classes CLASS`)")
        name = tasks[0].removeprefix("voc_")
        if name in rows:
            raise ValueError(f"two evaluations of VOC class {name!r}")
        rows[name] = m
    order = [c for c in VOC_CLASSES[1:] if c in rows] + sorted(c for c in rows if c not in VOC_CLASSES)
    methods = list(METHODS)
    lines = ["| class | " + " | ".join(LABELS[k] for k in methods) + " |", "|---|" + "---|" * len(methods)]
    table = {c: {k: rows[c]["methods"][k]["iou_dataset"] for k in methods} for c in order}
    for c in order:
        lines.append(f"| {c} | " + " | ".join(_cell(rows[c]["methods"][k], "iou_dataset") for k in methods) + " |")
    means = {k: mean_of_classes([{"value": rows[c]["methods"][k]["iou_dataset"],
                                  "ci95": (rows[c]["methods"][k].get("ci95") or {}).get("iou_dataset")}
                                 for c in order]) for k in methods}
    mean = {k: means[k]["value"] for k in methods}
    label = "mean over the 20 classes" if len(order) == 20 else f"mean over {len(order)} of the 20 classes"
    lines.append(f"| **{label}** | " + " | ".join(f"**{_cell({'x': means[k]['value'], 'ci95': {'x': means[k]['ci95']}}, 'x')}**"
                                                   for k in methods) + " |")
    text = ("IoU accumulated over each class's test images (PASCAL VOC convention; brackets: 95% bootstrap "
            "interval over images; for the mean, the classes' intervals combined), cf. paper Table 3.\n\n" + "\n".join(lines) + "\n")
    return text, {"classes": table, "mean": mean, "n_classes": len(order)}


def write_figures(st: EmbeddingStore, split: str, main: Rollout, ids, input_sizes, decoder, gt_full: dict, folder: str,
                  n: int) -> int:
    """Per image: the prompts, the mask (blue) and the ground-truth outline (yellow) after steps 1, 5,
    10 and 15 (green + = positive, red x = negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = dict(zip(st.table(split)["id"].to_pylist(), st.table(split)["image_path"].to_pylist()))
    steps = [t for t in FIGURE_STEPS if t in main.logits]
    written = 0
    for k in range(min(n, len(ids))):
        path = paths.get(ids[k])
        if not path or not os.path.isfile(path):
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        h, w = image.shape[:2]
        scale = np.array([w, h]) / np.asarray(input_sizes[k][::-1], np.float64)  # SAM's frame -> pixels, per axis
        gt = gt_full[ids[k]] == 1
        fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 4 * h / w + 0.4), squeeze=False)
        for ax, t in zip(axes[0], steps):
            coords, labels = main.points[t][k]
            ax.imshow(overlay(image, decoder.upscale_mask(main.logits[t][k], (h, w)), coords * scale, labels))
            if gt.any() and not gt.all():
                ax.contour(gt, levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_title(f"step {t}")
            ax.axis("off")
        fig.suptitle(f"{ids[k]}  (blue: mask, yellow: ground truth)")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, str(ids[k]).replace("/", "_") + ".png"), dpi=72)
        plt.close(fig)
        written += 1
    return written

"""Evaluation with the paper's protocol, its ablations, metrics with 95% confidence intervals and a report
(no Ray cluster needed).

    alignsam evaluate --checkpoint RUN_OR_CHECKPOINT --store STORE --out DIR [--split test]

Protocol: each test image starts from the SRM's highest- (positive) and lowest-scoring
(negative) positions, then the policy picks T points greedily (argmax of the masked logits);
each is labelled by the SRM and SAM's decoder re-runs on all points. Metrics are computed on the
final mask upscaled to the image's full resolution (``metrics.py`` states each definition).

Methods (rows of the paper's Table 2, plus references of ours):
    alignsam        the trained policy + SRM labels, T steps (T from the run config, paper 15)
    random_actions  w/o RL: uniformly random free patches, SRM start and labels
    all_positive    w/o SRM: no SRM anywhere. Start: one positive point at the image centre (no
                    negative point); the policy picks T patches, every point labelled positive
    srm_start_positive  the SRM's start points (as alignsam), then the policy's T points all labelled
                    positive: with all_positive, what the SRM's labels add apart from its start
    single_step     w/o multi-step: T = 1
    srm_topk        non-RL reference: SRM start; at each step the free patch whose current SRM
                    probability is highest, SRM labels (the T best SRM cells, in order)
    gt_labels       oracle labels: the policy's points labelled from the ground truth (not an upper
                    bound: a correct label can still give SAM a worse mask than the SRM's)
Training-free baselines (``baselines.py``, the same SAM, embeddings and metrics): persam (PerSAM,
one-shot: the run's first training image), persam_mean (ours: its target averaged over the run's
training images), clip_points (CLIP Surgery's text-to-points recipe on the store's map), sam3_text (SAM 3
stores: SAM 3's own concept prediction for each image's task text, no agent and no points; its whole image
model from ``sam_checkpoint``, the store's sam3.pt). One that does not apply (SAM 2.1 or SAM 3 store:
persam; no map: clip_points; not a SAM 3 store, or no ``sam_checkpoint``: sam3_text) is skipped and named
in "skipped".
T sweep (paper Table 5): the alignsam rollout read at T in {1, 5, 10, 15, 20} (those <= the grid's size).

Statistics: per method and metric a 95% bootstrap interval over test images (``ci95``), and for
every other method the paired difference alignsam - method with its 95% interval (``paired``).

Outputs in DIR: metrics.json ({"task", "n_images", "methods": {NAME: {metric: value, "ci95":
{metric: [lo, hi]}}}, "paired": {NAME: {metric: {"diff", "ci95"}}}, "t_sweep": {T: {...}}, ...}),
report.md, per_image.json ({"ids", "rows": {ROW: {metric or count: [one value per image]}}}: what every
figure is computed from), figures/<image>.png (prompts, masks and the ground-truth outline at steps 1, 5,
10, 15).

Scale (``eval_shard.py``, the Ray-free core): the test images are streamed from the store a batch at a
time; ``--shards K`` splits them into K contiguous shards run as Ray tasks (GPU tasks on a cluster with
GPUs), merged into one metrics.json with the same figures as one shard; ``--device`` puts SAM's decoder,
the policy and the SRM on a GPU.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .baselines import BASELINES, check_sam3_checkpoint
from .checkpoint import Agent
from .config import ConfigError
from .env.episodes import holdout_split
from .env.rollout import Rollout, rollout
from .eval_shard import (
    FIGURE_STEPS,
    METHODS,
    T_SWEEP,
    EvalAgent,
    auto_batch,
    eval_device,
    evaluate_shard,
    merge_shards,
    shard_bounds,
)
from .foundation.decoder import SamPromptDecoder
from .metrics import (
    COUNT_KEYS,
    IMAGE_KEYS,
    LOWER_IS_BETTER,
    METRICS,
    NAMES,
    SUMMARY_KEYS,
    MetricAccumulator,
    confidence_intervals,
    mean_of_classes,
    primary_metrics,
)
from .store.loader import EmbeddingStore
from .visualise import overlay

__all__ = ["FIGURE_STEPS", "METHODS", "T_SWEEP", "Agent", "Rollout", "evaluate", "rollout"]
PER_IMAGE_KEYS = IMAGE_KEYS + COUNT_KEYS


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
            manifest = read_manifest(agent.cfg.store)
        except Exception as exc:
            raise ConfigError(f"cannot tell which SAM checkpoint {agent.checkpoint!r} was trained with: its "
                              f"checkpoint records none and its run's store {agent.cfg.store!r} is unreadable "
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


def evaluate(checkpoint: str, store: str, out: str, split: str = "test", batch: int | None = None, n_figures: int = 4,
             seed: int = 0, progress: bool = True, device: str = "auto", shards: int = 1,
             sam_checkpoint: str | None = None) -> dict:
    """Evaluate a checkpoint on a store's split -> the metrics.json dict (also written to ``out`` with
    report.md, per_image.json and figures/). ``shards`` > 1: the split's images in that many contiguous
    shards, each a Ray task (``run_shards``; GPU tasks when the cluster has GPUs and ``device`` allows);
    1: in this process, without Ray. ``batch``: images per batched decoder call (default ``auto_batch``);
    ``device``: "auto" | "cpu" | "cuda" (where the decoder, the policy and the SRM run). The figures are
    the same whatever ``shards``, ``batch`` and ``device`` (float tolerance across devices: docs/metrics.md).
    ``sam_checkpoint``: SAM 3 stores, the sam3.pt they were embedded with (the ``sam3_text`` method)."""
    t0 = time.time()
    agent = Agent.load(checkpoint)
    st = EmbeddingStore(store, verify=False)  # each store file is verified when a shard reads it
    check_store(agent, st, store)
    if shards > 1:  # each shard checks it too; here before any Ray task starts
        check_sam3_checkpoint(st.manifest, store, sam_checkpoint)
    n = len(st.split_ids(split))
    log = _logger("evaluate", progress)
    log(f"{n} {split} images, T = {agent.cfg.env.horizon}, {shards} shard(s)")
    if shards <= 1:
        dev = eval_device(device)
        counter = ProgressLine(n, log)
        results = [evaluate_shard(EvalAgent.from_agent(agent, dev), st, split, 0, None, seed, batch or auto_batch(dev),
                                  n_figures, progress=counter.add, sam_checkpoint=sam_checkpoint)]
        counter.report(force=True)
        devices = [str(dev)]
    else:
        tasks = [dict(checkpoint=agent.checkpoint, store=store, split=split, start=a, stop=b, seed=seed, batch=batch,
                      n_figures=n_figures, sam_checkpoint=sam_checkpoint) for a, b in shard_bounds(n, shards)]
        results = run_shards(tasks, device, log)
        devices = sorted({r["device"] for r in results})
    metrics = write_evaluation(out, agent, st, store, split, results, t0, devices)
    log(f"wrote {out}/metrics.json, report.md, per_image.json and figures in {metrics['seconds']:.0f}s")
    return metrics


def _logger(name: str, on: bool):
    def log(msg):
        if on:
            print(f"[{name}] {msg}", flush=True)
    return log


class ProgressLine:
    """Images done / total, images/s and an ETA, printed at most every ``every`` seconds."""

    def __init__(self, total: int, log, every: float = 10.0):
        self.total, self.log, self.every = total, log, every
        self.done, self.shown, self.t0, self.last = 0, -1, time.time(), time.time()

    def add(self, n: int) -> None:
        self.done += int(n)
        self.report()

    def report(self, force: bool = False, done: int | None = None) -> None:
        self.done = self.done if done is None else int(done)
        now = time.time()
        if (not force and now - self.last < self.every) or self.done == self.shown:
            return
        self.last, self.shown = now, self.done
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.log(f"{self.done}/{self.total} images, {rate:.2f} images/s, ETA {eta / 60:.1f} min")


class ShardProgress:
    """Images finished across shards (a Ray actor in ``run_shards``: each shard task adds to it)."""

    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += int(n)

    def get(self) -> int:
        return self.done


def _shard_task(checkpoint: str, store: str, split: str, start: int, stop: int, seed: int, batch: int | None,
                n_figures: int, device: str, counter, sam_checkpoint: str | None = None) -> dict:
    """One shard as a Ray task: load the agent, run ``evaluate_shard`` on this worker's device."""
    dev = eval_device(device)
    agent = EvalAgent.from_agent(Agent.load(checkpoint), dev)
    return evaluate_shard(agent, store, split, start, stop, seed, batch or auto_batch(dev), n_figures,
                          progress=lambda k: counter.add.remote(k), sam_checkpoint=sam_checkpoint)


def run_shards(tasks: list[dict], device: str, log, on_result=None, every: float = 10.0) -> list[dict]:
    """Shards (``_shard_task`` keyword arguments without device/counter) as Ray tasks, all submitted at
    once: GPU tasks (1 GPU each) when the cluster has GPUs and ``device`` is not "cpu", else 1-CPU tasks.
    Prints one progress line across all shards every ``every`` seconds; ``on_result(i, result)`` as each
    shard finishes. -> the results in the order of ``tasks``."""
    import ray

    from .train import init_ray

    if not ray.is_initialized():
        init_ray()
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if device == "cuda" and not gpus:
        raise ConfigError("--device cuda: the Ray cluster has no GPU; use --device auto or cpu")
    use_gpu = gpus and device != "cpu"
    remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_shard_task)
    counter = ray.remote(num_cpus=0)(ShardProgress).remote()
    total = sum(t["stop"] - t["start"] for t in tasks)
    line = ProgressLine(total, log, every)
    pending = {remote.remote(**t, device="cuda" if use_gpu else "cpu", counter=counter): i for i, t in enumerate(tasks)}
    log(f"{len(tasks)} shard(s) of {total} images as Ray {'GPU' if use_gpu else 'CPU'} tasks")
    results: list = [None] * len(tasks)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=every)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            if on_result is not None:
                on_result(i, results[i])
        line.report(force=True, done=ray.get(counter.get.remote()))
    return results


def write_evaluation(out: str, agent, st: EmbeddingStore, store: str, split: str, results: list[dict], t0: float,
                     devices: list[str]) -> dict:
    """Merge shard results (``merge_shards``) and write metrics.json, report.md, per_image.json, figures/."""
    merged, per_image = merge_shards(results, agent.cfg, agent.grid)
    metrics = {
        "task": agent.cfg.task, "n_images": len(per_image["ids"]), "split": split,
        "horizon": int(agent.cfg.env.horizon), "checkpoint": agent.checkpoint,
        "store": store if "://" in store else os.path.abspath(store), "store_tasks": st.manifest.get("tasks", []),
        **merged, "shards": len(results), "devices": devices, "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(metrics))
    with open(os.path.join(out, "per_image.json"), "w") as f:  # what every summary above is computed from
        json.dump({"ids": per_image["ids"], "rows": {row: {k: [m[k] for m in v] for k in PER_IMAGE_KEYS}
                                                     for row, v in per_image["rows"].items()}}, f)
    write_figures([fig for r in results for fig in r["figures"]], st.decoder(), os.path.join(out, "figures"))
    return metrics


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
    T = int(agent.cfg.env.horizon)
    m = METHODS["alignsam"]
    r = rollout(agent, data, decoder, actions=m.actions, init=m.init, labels=m.labels, horizon=T, record=(T,),
                batch=batch, seed=seed)
    return score(r.logits[T], data["ids"], data["original_size"], gt_full, decoder)


def validation_metrics(agent: Agent, val_set: tuple, batch: int = 16, seed: int = 0) -> dict:
    """alignsam (the paper's protocol) on a ``validation_set`` -> {"val_miou", ...}."""
    summary = alignsam_score(agent, *val_set, batch=batch, seed=seed).summary()
    return {f"val_{m}": summary[m] for m in SUMMARY_KEYS}


LABELS = {"alignsam": "alignsam", "random_actions": "random_actions (w/o RL)", "all_positive": "all_positive (w/o SRM)",
          "srm_start_positive": "srm_start_positive (SRM start, all positive)",
          "single_step": "single_step (w/o multi-step, T = 1)", "srm_topk": "srm_topk (no RL: best SRM cells)",
          "gt_labels": "gt_labels (oracle labels)", "persam": "persam (PerSAM, 1 shot)",
          "persam_mean": "persam_mean (PerSAM, mean target, ours)", "clip_points": "clip_points (CLIP Surgery points)",
          "sam3_text": "sam3_text (SAM 3 given the task's text)"}


def format_value(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def format_metric(m: dict, k: str) -> str:
    v = m.get(k, float("nan"))
    ci = (m.get("ci95") or {}).get(k)
    return format_value(v) + (f" [{format_value(ci[0])}, {format_value(ci[1])}]" if ci else "")


def verdict(diff: dict, metric: str) -> str:
    """Words for a paired difference alignsam - other: only a CI that excludes 0 says better/worse."""
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi or lo != lo:
        return "no clear difference"
    better = (lo > 0) != (metric in LOWER_IS_BETTER)
    return "alignsam better" if better else "alignsam worse"


def report_markdown(metrics: dict) -> str:
    keys = SUMMARY_KEYS + ("hit_rate", "label_accuracy")
    head = "| | " + " | ".join(NAMES[k] for k in keys) + " |\n|" + "---|" * (len(keys) + 1)
    prim = primary_metrics(metrics["task"])
    lines = [
        f"# AlignSAM evaluation: {metrics['task']}", "",
        f"{metrics['n_images']} {metrics['split']} images, T = {metrics['horizon']}, checkpoint "
        f"`{metrics['checkpoint']}`, store `{metrics['store']}`. The paper reports "
        f"{', '.join(NAMES[k] for k in prim)} for this task. Brackets: 95% bootstrap interval over images.", "",
        "## Methods and ablations (cf. paper Table 2)", "", head,
    ]
    lines += [f"| {LABELS.get(name, name)} | " + " | ".join(format_metric(m, k) for k in keys) + " |"
              for name, m in metrics["methods"].items()]
    lines += ["", "hit rate = share of picked points on foreground; label acc. = share of picked points whose label "
              "(SRM, oracle or all-positive) matches the ground truth (baselines: of their own points"
              + ("; sam3_text prompts with text, no points: nan" if "sam3_text" in metrics["methods"] else "") + ")."]
    skipped = metrics.get("skipped") or {}
    lines += [""] * bool(skipped) + [f"- skipped: {name}: {why}" for name, why in skipped.items()]
    lines += ["",
              "## Paired differences: alignsam - method (95% bootstrap interval over the same images)", ""]
    shown = tuple(dict.fromkeys(("miou",) + tuple(prim)))
    lines += ["| method | " + " | ".join(f"{NAMES[k]} diff [95% CI] | " for k in shown).rstrip(" |") + " |",
              "|---|" + "---|---|" * len(shown)]
    for name, d in metrics["paired"].items():
        cells = [f"{format_value(d[k]['diff'])} [{format_value(d[k]['ci95'][0])}, {format_value(d[k]['ci95'][1])}] | {verdict(d[k], k)}"
                 for k in shown]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", "## Number of steps T (cf. paper Table 5)", "", head.replace("| |", "| T |", 1)]
    lines += [f"| {t} | " + " | ".join(format_metric(m, k) for k in keys) + " |" for t, m in metrics["t_sweep"].items()]
    init = metrics["initial_prompts"]
    lines += ["", f"Initial SRM prompts only (T = 0): mIoU {init['miou']:.3f}.", "", "## Metric definitions", ""]
    lines += [f"- **{k}**: {m.definition}" for k, m in METRICS.items()]
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
    methods = list(METHODS) + [b for b in BASELINES if all(b in rows[c]["methods"] for c in order)]
    lines = ["| class | " + " | ".join(LABELS[k] for k in methods) + " |", "|---|" + "---|" * len(methods)]
    table = {c: {k: rows[c]["methods"][k]["iou_dataset"] for k in methods} for c in order}
    for c in order:
        lines.append(f"| {c} | " + " | ".join(format_metric(rows[c]["methods"][k], "iou_dataset") for k in methods) + " |")
    means = {k: mean_of_classes([{"value": rows[c]["methods"][k]["iou_dataset"],
                                  "ci95": (rows[c]["methods"][k].get("ci95") or {}).get("iou_dataset")}
                                 for c in order]) for k in methods}
    mean = {k: means[k]["value"] for k in methods}
    label = "mean over the 20 classes" if len(order) == 20 else f"mean over {len(order)} of the 20 classes"
    lines.append(f"| **{label}** | " + " | ".join(f"**{format_metric({'x': means[k]['value'], 'ci95': {'x': means[k]['ci95']}}, 'x')}**"
                                                   for k in methods) + " |")
    text = ("IoU accumulated over each class's test images (PASCAL VOC convention; brackets: 95% bootstrap "
            "interval over images; for the mean, the classes' intervals combined), cf. paper Table 3.\n\n" + "\n".join(lines) + "\n")
    return text, {"classes": table, "mean": mean, "n_classes": len(order)}


def write_figures(figures: list[dict], decoder, folder: str) -> int:
    """Per image (``evaluate_shard``'s figure records): the prompts, the mask (blue) and the ground-truth
    outline (yellow) after steps 1, 5, 10 and 15 (green + = positive, red x = negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    written = 0
    for fig_data in figures:
        path = fig_data["image_path"]
        if not path or not os.path.isfile(path):
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        h, w = image.shape[:2]
        scale = np.array([w, h]) / np.asarray(fig_data["input_size"][::-1], np.float64)  # SAM's frame -> pixels
        gt = fig_data["gt"] == 1 if "gt" in fig_data else None
        steps = sorted(fig_data["logits"])
        fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 4 * h / w + 0.4), squeeze=False)
        for ax, t in zip(axes[0], steps):
            coords, labels = fig_data["points"][t]
            low = np.array(fig_data["logits"][t])  # a writable copy (a Ray task's results are read-only)
            ax.imshow(overlay(image, decoder.upscale_mask(low, (h, w)), coords * scale, labels))
            if gt is not None and gt.any() and not gt.all():
                ax.contour(gt, levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_title(f"step {t}")
            ax.axis("off")
        fig.suptitle(f"{fig_data['id']}  (blue: mask, yellow: ground truth)")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, str(fig_data["id"]).replace("/", "_") + ".png"), dpi=72)
        plt.close(fig)
        written += 1
    return written

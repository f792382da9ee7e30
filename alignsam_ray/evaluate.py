"""Evaluation with the paper's protocol, its ablations, metrics and a report (no Ray cluster needed).

    alignsam evaluate --checkpoint RUN_OR_CHECKPOINT --store STORE --out DIR [--split test]

Protocol: each test image starts from the SRM's highest- (positive) and lowest-scoring
(negative) positions, then the policy picks T points greedily (argmax of the masked logits);
each is labelled by the SRM and SAM's decoder re-runs on all points. Metrics are computed on the
final mask upscaled to the image's full resolution (``metrics.py`` states each definition).

Methods (rows of the paper's Table 2):
    alignsam        the trained policy + SRM labels, T steps (T from the run config, paper 15)
    random_actions  w/o RL: uniformly random free patches, SRM labels
    all_positive    w/o SRM: the policy, every picked point labelled positive
    single_step     w/o multi-step: T = 1
    gt_labels       oracle labels from the ground truth (an upper bound for the SRM)
T sweep (paper Table 5): the alignsam rollout read at T in {1, 5, 10, 15, 20}.

Outputs in DIR: metrics.json ({"task", "n_images", "methods": {NAME: {miou, fbeta, emeasure, mae,
ber, hit_rate}}, "t_sweep": {T: {...}}, ...}), report.md, figures/<image>.png (prompts and masks
at steps 1, 5, 10 and 15).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .agent.rl_module import AlignSamActorCritic
from .agent.srm import SRM, load_srm
from .config import ConfigError, load_config
from .env.episodes import PromptEpisodes
from .env.grid import PatchGrid
from .foundation.decoder import SamPromptDecoder
from .metrics import METRIC_DEFINITIONS, MetricAccumulator, primary_metrics
from .store.loader import EmbeddingStore

METHODS = {  # name -> (action rule, label rule, horizon: None = the run's T)
    "alignsam": ("policy", "srm", None),
    "random_actions": ("random", "srm", None),
    "all_positive": ("policy", "positive", None),
    "single_step": ("policy", "srm", 1),
    "gt_labels": ("policy", "gt", None),
}
T_SWEEP = (1, 5, 10, 15, 20)
FIGURE_STEPS = (1, 5, 10, 15)
METRIC_KEYS = ("miou", "fbeta", "emeasure", "mae", "ber")


@dataclass
class Agent:
    """What evaluation needs from a training checkpoint."""

    module: AlignSamActorCritic
    srm: SRM
    cfg: dict
    checkpoint: str

    @classmethod
    def load(cls, checkpoint: str) -> "Agent":
        from ray.rllib.core.rl_module.rl_module import RLModule

        from .train import MODULE_SUBDIR, resolve_checkpoint

        ckpt = resolve_checkpoint(checkpoint)
        module = RLModule.from_checkpoint(os.path.abspath(os.path.join(ckpt, MODULE_SUBDIR)))
        module.eval()
        cfg = load_config(os.path.join(ckpt, "config.yaml"))
        return cls(module, load_srm(os.path.join(ckpt, "srm.pt")), cfg, ckpt)

    @property
    def grid(self) -> PatchGrid:
        e = self.cfg["env"]
        return PatchGrid.from_config(e["grid"], e["patch_size"], e["resize"])

    @torch.inference_mode()
    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        logits = self.module.masked_logits(torch.from_numpy(obs), torch.from_numpy(action_mask))
        return logits.argmax(1).numpy()


@dataclass
class Rollout:
    """Recorded steps of one method over all images."""

    logits: dict  # step -> list of (256, 256) float32 low-res logits, one per image
    points: dict  # step -> list of (coords (n, 2) SAM frame, labels (n,))
    hits: np.ndarray  # (n_images, horizon) bool: picked point on ground-truth foreground
    label_ok: np.ndarray  # (n_images, horizon) bool: its label (SRM/oracle/positive) matches the ground truth

    def stats(self, t: int) -> dict:
        """Hit rate and label accuracy over the first ``t`` steps."""
        return {"hit_rate": float(self.hits[:, :t].mean()), "label_accuracy": float(self.label_ok[:, :t].mean())}


def rollout(agent: Agent, data: dict, decoder: SamPromptDecoder, actions: str, labels: str, horizon: int,
            record: tuple, batch: int = 16, seed: int = 0) -> Rollout:
    """Run ``horizon`` steps on every image of ``data`` (``batch`` images per decoder call)."""
    rng = np.random.default_rng(seed)
    n = len(data["ids"])
    logits = {t: [] for t in record}
    points = {t: [] for t in record}
    hits = np.zeros((n, horizon), bool)
    label_ok = np.zeros((n, horizon), bool)
    e = agent.cfg["env"]
    text_map = agent.cfg["srm"]["text_map"] if agent.srm.branch == "explicit" else None
    for start in range(0, n, batch):
        images = np.arange(start, min(n, start + batch))
        ep = PromptEpisodes(data, decoder, agent.grid, len(images), horizon, e["obs_res"], "srm", labels,
                            agent.srm, text_map, seed)
        ep.reset(np.arange(len(images)), images)
        if 0 in record:
            logits[0] += list(ep.logits.copy())
            points[0] += [(ep.coords[s, :2].copy(), ep.labels[s, :2].copy()) for s in range(len(images))]
        for t in range(1, horizon + 1):
            mask = ep.action_mask()
            if actions == "policy":
                a = agent.greedy(ep.obs, mask)
            else:
                a = np.array([rng.choice(np.flatnonzero(m)) for m in mask])
            r = ep.step(a)
            hits[images, t - 1] = r.hit
            label_ok[images, t - 1] = r.label == r.hit  # void points count as background here
            if t in record:
                logits[t] += list(ep.logits.copy())
                points[t] += [(ep.coords[s, : 2 + t].copy(), ep.labels[s, : 2 + t].copy()) for s in range(len(images))]
    return Rollout(logits, points, hits, label_ok)


def score(logits: list, ids, sizes, gt_full: dict, decoder: SamPromptDecoder) -> dict:
    """Metrics of low-res logits against full-resolution ground truth (void excluded)."""
    acc = MetricAccumulator()
    for lo, i, hw in zip(logits, ids, sizes):
        pred = decoder.upscale(torch.from_numpy(lo)[None], (int(hw[0]), int(hw[1])))[0].numpy() > 0
        acc.add(pred, gt_full[i])
    return acc.summary()


def evaluate(checkpoint: str, store: str, out: str, split: str = "test", batch: int = 16, n_figures: int = 4,
             seed: int = 0, progress: bool = True) -> dict:
    t0 = time.time()
    agent = Agent.load(checkpoint)
    st = EmbeddingStore(store)
    if st.embed_dim != agent.srm.embed_dim:
        raise ConfigError(f"store {store!r} holds {st.embed_dim}-d embeddings but the checkpoint was trained on "
                          f"{agent.srm.embed_dim}-d ones (another SAM type); evaluate on a store of the same SAM")
    data = st.arrays(split)
    gt_full = st.gt_full(split)
    decoder = st.decoder()
    T = int(agent.cfg["env"]["horizon"])
    ids, sizes = data["ids"], data["original_size"]
    os.makedirs(out, exist_ok=True)

    def log(msg):
        if progress:
            print(f"[evaluate] {msg}", flush=True)

    results, sweep = {}, {}
    horizon = max(T_SWEEP + (T,))
    log(f"{len(ids)} {split} images, T = {T}; alignsam rollout to T = {horizon}")
    main = rollout(agent, data, decoder, "policy", "srm", horizon, tuple(sorted(set(T_SWEEP + FIGURE_STEPS + (T, 0)))),
                   batch, seed)
    for t in T_SWEEP:
        sweep[str(t)] = {**score(main.logits[t], ids, sizes, gt_full, decoder), **main.stats(t)}
    results["alignsam"] = {**score(main.logits[T], ids, sizes, gt_full, decoder), **main.stats(T)}
    results["single_step"] = {**score(main.logits[1], ids, sizes, gt_full, decoder), **main.stats(1)}
    for name, (actions, labels, h) in METHODS.items():
        if name in results:
            continue
        log(f"method {name}")
        h = h or T
        r = rollout(agent, data, decoder, actions, labels, h, (h,), batch, seed)
        results[name] = {**score(r.logits[h], ids, sizes, gt_full, decoder), **r.stats(h)}
    metrics = {
        "task": agent.cfg["task"], "n_images": int(len(ids)), "split": split, "horizon": T,
        "checkpoint": agent.checkpoint, "store": os.path.abspath(store), "methods": results, "t_sweep": sweep,
        "initial_prompts": score(main.logits[0], ids, sizes, gt_full, decoder),
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(metrics))
    figs = write_figures(st, split, main, ids, decoder, os.path.join(out, "figures"), n_figures)
    log(f"wrote {out}/metrics.json, report.md and {figs} figure(s) in {metrics['seconds']:.0f}s")
    return metrics


def _row(name: str, m: dict) -> str:
    return f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in METRIC_KEYS + ("hit_rate", "label_accuracy")) + " |"


def report_markdown(metrics: dict) -> str:
    head = "| | mIoU | F_beta | E_phi | MAE | BER | hit rate | label acc. |\n|---|---|---|---|---|---|---|---|"
    prim = ", ".join(primary_metrics(metrics["task"]))
    lines = [
        f"# AlignSAM evaluation: {metrics['task']}", "",
        f"{metrics['n_images']} {metrics['split']} images, T = {metrics['horizon']}, checkpoint "
        f"`{metrics['checkpoint']}`, store `{metrics['store']}`. The paper reports {prim} for this task.", "",
        "## Methods and ablations (cf. paper Table 2)", "", head,
    ]
    lines += [_row(name, m) for name, m in metrics["methods"].items()]
    lines += ["", "`random_actions` = w/o RL, `all_positive` = w/o SRM, `single_step` = w/o multi-step (T = 1), "
              "`gt_labels` = oracle point labels (upper bound). hit rate = share of picked points on foreground; "
              "label acc. = share of picked points whose label (SRM, oracle or all-positive) matches the ground truth.", "",
              "## Number of steps T (cf. paper Table 5)", "", head.replace("| |", "| T |", 1)]
    lines += [_row(t, m) for t, m in metrics["t_sweep"].items()]
    init = metrics["initial_prompts"]
    lines += ["", f"Initial SRM prompts only (T = 0): mIoU {init['miou']:.3f}.", "", "## Metric definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in METRIC_DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def write_figures(st: EmbeddingStore, split: str, main: Rollout, ids, decoder, folder: str, n: int) -> int:
    """Per image: the prompts and the mask after steps 1, 5, 10 and 15 (green + = positive, red x = negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = dict(zip(st.table(split)["id"].to_pylist(), st.table(split)["image_path"].to_pylist()))
    written = 0
    for k in range(min(n, len(ids))):
        path = paths.get(ids[k])
        if not path or not os.path.isfile(path):
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        h, w = image.shape[:2]
        scale = max(h, w) / 1024
        fig, axes = plt.subplots(1, len(FIGURE_STEPS), figsize=(4 * len(FIGURE_STEPS), 4 * h / w + 0.4))
        for ax, t in zip(axes, FIGURE_STEPS):
            mask = decoder.upscale(torch.from_numpy(main.logits[t][k])[None], (h, w))[0].numpy() > 0
            overlay = image.astype(np.float32).copy()
            overlay[mask] = 0.5 * overlay[mask] + 0.5 * np.array([30, 144, 255])
            ax.imshow(overlay.astype(np.uint8))
            coords, labels = main.points[t][k]
            xy = coords * scale
            ax.scatter(xy[labels == 1, 0], xy[labels == 1, 1], c="lime", marker="+", s=80, linewidths=2)
            ax.scatter(xy[labels == 0, 0], xy[labels == 0, 1], c="red", marker="x", s=60, linewidths=2)
            ax.set_title(f"step {t}")
            ax.axis("off")
        fig.suptitle(str(ids[k]))
        fig.tight_layout()
        fig.savefig(os.path.join(folder, str(ids[k]).replace("/", "_") + ".png"), dpi=72)
        plt.close(fig)
        written += 1
    return written

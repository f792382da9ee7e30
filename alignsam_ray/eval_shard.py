"""The Ray-free core of evaluation: one shard of test images -> per-image records; shards -> metrics.

    evaluate_shard(agent, store, split, start, stop, seed=0, batch=16, n_figures=0, progress=None) -> dict
        the split's images [start, stop) (positions in ``EmbeddingStore.split_ids`` order), streamed from
        the store ``batch`` images at a time: every method of ``METHODS`` and the T sweep are rolled out
        on a batch, scored at full resolution and dropped before the next batch is read, so memory is
        bounded by the batch (and one store file), not by the shard or the test set.
        -> {"start", "stop", "ids", "rows": {row: [image_metrics dict per image]}, "hits": {rollout: (n, h)
            bool}, "label_ok": {rollout: (n, h) bool}, "baselines": {name: (points, hits, label_ok) counts},
            "skipped": {baseline: why}, "figures": [...], "device"}
        The training-free baselines (``baselines.py``: persam, persam_mean, clip_points, sam3_text) run on
        each batch too, as rows of their own; one that does not apply to the store is skipped and named
        (sam3_text: SAM 3 stores, with ``sam_checkpoint`` their sam3.pt, its model on the agent's device).
    merge_shards(results) -> ({"methods", "paired", "t_sweep", "initial_prompts"} of metrics.json, per_image)
        the shards' records concatenated in image order; every summary, 95% interval and paired interval
        is computed once on the merged records, so a split into 1 or k shards gives the same figures.
    EvalAgent.from_agent(agent, device) / EvalAgent(policy, srm, cfg, device): the policy and the SRM as
        plain torch modules on ``device`` (no RLlib); ``eval_device("auto" | "cpu" | "cuda")``.

Where the work runs: SAM's prompt encoder + mask decoder, the policy and the SRM on ``device`` (the
observations are built there too); the full-resolution upscaling and the metrics on the CPU (numpy and
pysodmetrics, per image: nothing to batch). Random draws come from each image's own stream
(``env.rollout.image_rng``: seed and image id), so figures do not depend on shards, batch size or device
order. Only torch, numpy, pyarrow, scipy, py_sod_metrics and segment_anything are imported (no Ray):
``scripts/gpu_check.sh`` runs this on a bare GPU machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import baselines
from .agent.policy import PolicyNet
from .agent.srm import SRM
from .config import ConfigError, RunConfig
from .env.grid import PatchGrid
from .env.rollout import Method, Rollout, rollout
from .metrics import MetricAccumulator, confidence_intervals, image_metrics, paired_difference
from .store.loader import EmbeddingStore

METHODS = {  # name -> how it picks, starts and labels (horizon None = the run's T); docs/agent.md#evaluation
    "alignsam": Method(actions="policy", init="srm", labels="srm"),  # the paper's protocol
    "random_actions": Method(actions="random", init="srm", labels="srm"),  # w/o RL
    "all_positive": Method(actions="policy", init="centre", labels="positive"),  # w/o SRM: no SRM anywhere
    "srm_start_positive": Method(actions="policy", init="srm", labels="positive"),  # SRM start, later clicks positive
    "single_step": Method(actions="policy", init="srm", labels="srm", horizon=1),  # w/o multi-step
    "srm_topk": Method(actions="srm_topk", init="srm", labels="srm"),  # no RL: the SRM's best free cell each step
    "gt_labels": Method(actions="policy", init="srm", labels="gt"),  # oracle labels
}
T_SWEEP = (1, 5, 10, 15, 20)
FIGURE_STEPS = (1, 5, 10, 15)
DEVICES = ("auto", "cpu", "cuda")
CPU_BATCH = 16  # images per batched decoder call on the CPU
GPU_IMAGE_BYTES = 96 * 2**20  # budget per image in a GPU batch (ViT-H decoder + episode tensors, measured < 64 MB)
MAX_GPU_BATCH = 256


def eval_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when torch sees one, else the CPU; "cuda" without a visible GPU is an error. On a GPU
    TF32 is switched off (fp32 maths, as on the CPU)."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                          "use --device auto or cpu")
    dev = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda":  # full fp32 as on the CPU: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def auto_batch(device: torch.device) -> int:
    """Images per batch: ``CPU_BATCH`` on the CPU; on a GPU half its free memory / ``GPU_IMAGE_BYTES``
    (16 .. ``MAX_GPU_BATCH``)."""
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    return int(np.clip(free // 2 // GPU_IMAGE_BYTES, CPU_BATCH, MAX_GPU_BATCH))


@dataclass
class EvalAgent:
    """What a rollout needs (``cfg``, ``srm``, ``grid``, ``greedy``) as plain modules on one device."""

    policy: PolicyNet
    srm: SRM
    cfg: RunConfig
    device: torch.device

    def __post_init__(self):
        self.policy = self.policy.to(self.device).eval()
        self.srm = self.srm.to(self.device).eval()

    @classmethod
    def from_agent(cls, agent, device: torch.device) -> EvalAgent:
        """From a ``checkpoint.Agent`` (its RLModule's actor; same maths as ``Agent.greedy``)."""
        return cls(PolicyNet.from_module(agent.module), agent.srm, agent.cfg, device)

    @property
    def grid(self) -> PatchGrid:
        return PatchGrid.from_env(self.cfg.env)

    @torch.inference_mode()
    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        """(B, E, R, R), (B, N) -> (B,) argmax of the masked logits."""
        logits = self.policy(torch.from_numpy(obs).to(self.device), torch.from_numpy(action_mask).to(self.device))
        return logits.argmax(1).cpu().numpy()


def plan(cfg: RunConfig, grid: PatchGrid) -> tuple[int, tuple, int, tuple]:
    """(T, the T sweep, the main rollout's horizon, the steps it records)."""
    T = int(cfg.env.horizon)
    t_sweep = tuple(t for t in T_SWEEP if t <= grid.n)
    horizon = max(t_sweep + (T,))
    record = tuple(sorted(set(t_sweep + FIGURE_STEPS + (T, 0)) & set(range(horizon + 1))))
    return T, t_sweep, horizon, record


def row_names(cfg: RunConfig, grid: PatchGrid) -> dict:
    """row -> (rollout it reads, step): the methods, "t=<T>" per T of the sweep, "initial" (T = 0)."""
    T, t_sweep, _, _ = plan(cfg, grid)
    rows = {name: ("main", T if name == "alignsam" else 1) if name in ("alignsam", "single_step")
            else (name, h or T) for name, (_, _, _, h) in METHODS.items()}
    rows.update({f"t={t}": ("main", t) for t in t_sweep})
    rows["initial"] = ("main", 0)
    return rows


def evaluate_shard(agent, store: str | EmbeddingStore, split: str, start: int = 0, stop: int | None = None,
                   seed: int = 0, batch: int = CPU_BATCH, n_figures: int = 0, decoder=None, progress=None,
                   sam_checkpoint: str | None = None) -> dict:
    """One shard (see module docstring). ``agent``: an ``EvalAgent`` (or anything with its four members);
    ``decoder``: the store's decoder on the agent's device (default: loaded from the store and moved there);
    ``progress(n)``: called with the number of images finished after each batch; ``n_figures``: the split's
    first images whose steps ``FIGURE_STEPS`` are returned for drawing (those inside the shard)."""
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store, verify=False)
    device = getattr(agent, "device", torch.device("cpu"))
    if decoder is None:
        decoder = st.decoder().to(device)
    T, t_sweep, horizon, record = plan(agent.cfg, agent.grid)
    rows = row_names(agent.cfg, agent.grid)
    out = {"start": start, "ids": [], "rows": {r: [] for r in rows}, "hits": {}, "label_ok": {}, "figures": [],
           "device": str(device)}
    hits: dict = {}
    label_ok: dict = {}
    ready = None  # the baselines that apply, and their PerSAM targets (from the first batch)
    position = start
    for data, gt_full, paths in st.iter_rows(split, start, stop, batch):
        ids, sizes = data["ids"], data["original_size"]
        if ready is None:
            ready, out["skipped"] = baselines.prepare(data, decoder, agent.cfg, log=lambda msg: None, store=st,
                                                      sam_checkpoint=sam_checkpoint, device=device)
            out["baselines"] = {name: (0, 0, 0) for name in ready}
            out["rows"].update({name: [] for name in ready})
        for name, target in ready.items():
            b = baselines.run_prepared(name, data, decoder, agent.cfg, target, paths, device)
            out["rows"][name] += [image_metrics(m, gt_full[i]) for m, i in zip(b.full_masks(decoder, sizes), ids)]
            out["baselines"][name] = tuple(np.add(out["baselines"][name], baselines.point_counts(data, b.points)))
        main = METHODS["alignsam"]
        rolls = {"main": rollout(agent, data, decoder, actions=main.actions, init=main.init, labels=main.labels,
                                 horizon=horizon, record=record, batch=batch, seed=seed)}
        for name, m in METHODS.items():
            if rows[name][0] == name:
                rolls[name] = rollout(agent, data, decoder, actions=m.actions, init=m.init, labels=m.labels,
                                      horizon=m.horizon or T, record=(m.horizon or T,), batch=batch, seed=seed)
        scored: dict = {}
        for row, key in rows.items():
            if key not in scored:
                r, t = rolls[key[0]], key[1]
                scored[key] = [image_metrics(decoder.upscale_mask(lo, hw), gt_full[i])
                               for lo, i, hw in zip(r.logits[t], ids, sizes)]
            out["rows"][row] += scored[key]
        for name, r in rolls.items():
            hits.setdefault(name, []).append(r.hits)
            label_ok.setdefault(name, []).append(r.label_ok)
        main = rolls["main"]
        for k, i in enumerate(ids):
            if position + k < n_figures:
                out["figures"].append({"id": str(i), "image_path": paths[k], "gt": gt_full[i],
                                       "input_size": data["input_size"][k].tolist(),
                                       "logits": {t: main.logits[t][k] for t in FIGURE_STEPS if t in main.logits},
                                       "points": {t: main.points[t][k] for t in FIGURE_STEPS if t in main.points}})
        out["ids"] += [str(i) for i in ids]
        position += len(ids)
        if progress is not None:
            progress(len(ids))
    out["stop"] = position
    out["hits"] = {k: np.concatenate(v) for k, v in hits.items()}
    out["label_ok"] = {k: np.concatenate(v) for k, v in label_ok.items()}
    return out


def _accumulator(records: list[dict]) -> MetricAccumulator:
    acc = MetricAccumulator()
    acc.per_image = records
    return acc


def merge_shards(results: list[dict], cfg: RunConfig, grid: PatchGrid) -> tuple[dict, dict]:
    """Shard results (any order; together the split's images [0, n) without gap or overlap) ->
    ({"methods", "paired", "t_sweep", "initial_prompts"}, per_image {"ids", "rows": {row: [dict]}})."""
    results = sorted(results, key=lambda r: r["start"])
    for a, b in zip(results, results[1:]):
        if a["stop"] != b["start"]:
            raise ValueError(f"shards do not tile the split: one ends at image {a['stop']}, the next starts at {b['start']}")
    if results and results[0]["start"] != 0:
        raise ValueError(f"the first shard starts at image {results[0]['start']}, not 0")
    T, t_sweep, _, _ = plan(cfg, grid)
    rows = row_names(cfg, grid)
    ran = [name for name in baselines.BASELINES if all(name in r.get("baselines", {}) for r in results)]
    per_row = {row: [m for r in results for m in r["rows"][row]] for row in [*rows, *ran]}
    accs = {row: _accumulator(v) for row, v in per_row.items()}
    rolls = {name: Rollout({}, {}, np.concatenate([r["hits"][name] for r in results]),
                           np.concatenate([r["label_ok"][name] for r in results]))
             for name in {key for key, _ in rows.values() if key in results[0]["hits"]}}

    def method_row(row: str) -> dict:
        key, t = rows[row]
        return {**accs[row].summary(), **rolls[key].stats(t), "ci95": confidence_intervals(accs[row])}

    def baseline_row(name: str) -> dict:
        counts = np.sum([r["baselines"][name] for r in results], axis=0)
        hit_rate, label_accuracy = baselines.rates(counts)
        return {**accs[name].summary(), "hit_rate": hit_rate, "label_accuracy": label_accuracy,
                "ci95": confidence_intervals(accs[name])}

    methods = {**{name: method_row(name) for name in METHODS}, **{name: baseline_row(name) for name in ran}}
    metrics = {
        "methods": methods,
        "paired": {name: paired_difference(accs["alignsam"], accs[name]) for name in methods if name != "alignsam"},
        "skipped": (results[0].get("skipped") or {}) if results else {},
        "t_sweep": {str(t): method_row(f"t={t}") for t in t_sweep},
        "initial_prompts": accs["initial"].summary(),
    }
    return metrics, {"ids": [i for r in results for i in r["ids"]], "rows": per_row}


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of ``shards`` contiguous shards of n images (sizes differ by at most one; none empty)."""
    shards = max(1, min(int(shards), n))
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]

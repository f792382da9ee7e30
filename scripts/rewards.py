"""The reward study (issue 33): does a reward that scores what a click does to SAM's mask beat the paper's?

    python scripts/rewards.py --task synthetic_shapes --out results/agent/rewards_synthetic_shapes.json
    python scripts/rewards.py --task synthetic_saliency --out results/agent/rewards_synthetic_saliency.json
    python scripts/rewards.py --spread STORE     the per-step spread of each reward term (no training)

The design, fixed before any run (docs/results.md#reward-study); the study reports what it shows:

* Tasks: synthetic_shapes and synthetic_saliency, one invocation each. Everything else is the demo's
  (`scripts/seeds.py --task TASK`: 50 training images, data seed 0, the micro-SAM store (shapes: with the
  micro CLIP's "star" map and the explicit SRM, as the demo; saliency: implicit), 12 PPO iterations of 600 env
  steps with the paper's hyperparameters, 2 EnvRunners, the demo's learner precision).
* Rewards (`env.reward`, docs/agent.md#reward): `hit` (the paper's), `iou_gain`, `iou_gain_hit` (w = 10, the
  default `env.iou_gain_weight`). Seeds 0, 1, 2 for each: 9 training runs per task, `train.seed` = the seed.
* Evaluation: the paper's protocol and every method of `alignsam evaluate` on 300 test images (the demo's
  test split extended to 300 with the same generator and data seed; the first 50 are the demo's), seed = the
  run's seed.
* Decision metric: mIoU; the task's primary metrics (shapes: IoU (dataset); saliency: E_phi, MAE) are reported
  beside it. For each reward R other than `hit`, each seed:
    (a) R against `srm_topk`: alignsam(R) - srm_topk, the paired 95% interval of R's own evaluation;
    (b) R against `hit`: alignsam(R) - alignsam(hit) of the same seed, paired 95% interval over the same 300
        images (``paired_rows``: the two evaluations' per-image records).
  "R beats X" on a task: the interval lies above 0 in at least 2 of the 3 seeds. "R beats both": (a) and (b).
  `hit` against `srm_topk` is reported the same way.
* Also reported for every reward: `all_positive` and `srm_start_positive` (the SRM's start, every later
  click positive) with alignsam - method, and srm_start_positive - all_positive (what the SRM's start adds),
  and the policy's clicks against srm_topk's: hit rate and label accuracy over the T steps.
* Nothing is searched: no other weight, seed, iteration count or reward is tried because of a result.

Output: Markdown tables (printed; ``table_md`` in --out) and --out JSON with every comparison and every run's
metrics.json. Runs and evaluations go to --work/runs/<task>_<reward>/seed_<k> and are reused when finished.
KEY=VALUE: config overrides on top of the demo's (a smoke run: ppo.train_batch_size=48 ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from alignsam_ray.config import parse_overrides
from alignsam_ray.metrics import IMAGE_KEYS, NAMES, MetricAccumulator, paired_difference, primary_metrics

REWARDS = ("hit", "iou_gain", "iou_gain_hit")
SEEDS = (0, 1, 2)
TEST_IMAGES = 300
DECISION = "miou"
BEATS_IN = 2  # seeds (of 3) whose paired interval lies above 0


def _accumulator(eval_dir: str, row: str) -> tuple[list, MetricAccumulator]:
    """One row of an evaluation's per_image.json -> (image ids, accumulator of its per-image records)."""
    with open(os.path.join(eval_dir, "per_image.json")) as f:
        per_image = json.load(f)
    cols = per_image["rows"][row]
    acc = MetricAccumulator()
    acc.per_image = [dict(zip(cols, values)) for values in zip(*(cols[k] for k in cols))]
    missing = set(IMAGE_KEYS) - set(cols)
    if missing:
        raise ValueError(f"{eval_dir}/per_image.json row {row!r} lacks {sorted(missing)}")
    return per_image["ids"], acc


def paired_rows(dir_a: str, row_a: str, dir_b: str, row_b: str) -> dict:
    """{metric: {"diff", "ci95"}} of row_a (evaluation dir_a) - row_b (dir_b), paired over the same test images."""
    ids_a, a = _accumulator(dir_a, row_a)
    ids_b, b = _accumulator(dir_b, row_b)
    if ids_a != ids_b:
        raise ValueError(f"{dir_a} and {dir_b} did not evaluate the same test images in the same order")
    return paired_difference(a, b)


def _count(diffs: list[dict]) -> tuple[int, int]:
    """Seeds whose paired interval lies above 0 / below 0."""
    return sum(d["ci95"][0] > 0 for d in diffs), sum(d["ci95"][1] < 0 for d in diffs)


def _verdict(diffs: list[dict]) -> str:
    """"yes" (above 0 in >= BEATS_IN seeds), "no", or "open" while the seeds not yet run could still decide it."""
    above = _count(diffs)[0]
    if above >= BEATS_IN:
        return "yes"
    return "open" if above + len(SEEDS) - len(diffs) >= BEATS_IN else "no"


def _above_below(diffs: list[dict]) -> str:
    above, below = _count(diffs)
    return f"{above} / {below}"


def _cell(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def compare(task: str, runs: dict) -> dict:
    """runs: reward -> run_seeds(...) output. -> {"vs_srm_topk", "vs_hit", "start_vs_centre": {reward:
    {metric: [paired per seed]}}, "beats": {reward: {"srm_topk": verdict, "hit": verdict | None (hit itself)}},
    "clicks": ...}; verdict: "yes" | "no" | "open" (fewer seeds than SEEDS run, and those left could decide)."""
    keys = tuple(dict.fromkeys((DECISION,) + tuple(primary_metrics(task))))
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    out = {"seeds": seeds, "metrics": keys, "vs_srm_topk": {}, "vs_hit": {}, "start_vs_centre": {}, "beats": {},
           "clicks": {}}
    for reward, by_seed in runs.items():
        out["vs_srm_topk"][reward] = {k: [by_seed[s]["metrics"]["paired"]["srm_topk"][k] for s in seeds] for k in keys}
        start = [paired_rows(by_seed[s]["eval_dir"], "srm_start_positive", by_seed[s]["eval_dir"], "all_positive")
                 for s in seeds]
        out["start_vs_centre"][reward] = {k: [d[k] for d in start] for k in keys}
        if reward != "hit" and "hit" in runs:
            vs = [paired_rows(by_seed[s]["eval_dir"], "alignsam", runs["hit"][s]["eval_dir"], "alignsam") for s in seeds]
            out["vs_hit"][reward] = {k: [d[k] for d in vs] for k in keys}
        out["beats"][reward] = {"srm_topk": _verdict(out["vs_srm_topk"][reward][DECISION]),
                                "hit": _verdict(out["vs_hit"][reward][DECISION]) if reward in out["vs_hit"] else None}
        out["clicks"][reward] = {m: {stat: float(np.mean([by_seed[s]["metrics"]["methods"][m][stat] for s in seeds]))
                                     for stat in ("hit_rate", "label_accuracy")} for m in ("alignsam", "srm_topk")}
    return out


def comparison_table(task: str, c: dict) -> str:
    n = len(c["seeds"])
    lines = [f"### {task}: rewards against srm_topk and against hit ({n} seeds: {', '.join(map(str, c['seeds']))})",
             "", f"Paired 95% intervals per seed; \"beats\" = above 0 in at least {BEATS_IN} of {len(SEEDS)} seeds "
             f"({NAMES[DECISION]})" + (f"; {n} run so far, \"open\" where the rest could still decide it"
                                       if n < len(SEEDS) else "") + ".", "",
             "| reward | metric | alignsam - srm_topk, per seed | > 0 / < 0 | alignsam(reward) - alignsam(hit), per seed "
             "| > 0 / < 0 | beats srm_topk | beats hit |", "|---|---|---|---|---|---|---|---|"]
    for reward in c["vs_srm_topk"]:
        for k in c["metrics"]:
            topk = c["vs_srm_topk"][reward][k]
            hit = c["vs_hit"].get(reward, {}).get(k)
            first = k == DECISION
            lines.append(f"| {reward if first else ''} | {NAMES[k]} | {'; '.join(map(_cell, topk))} | "
                         f"{_above_below(topk)} | {'; '.join(map(_cell, hit)) if hit else '-'} | "
                         f"{_above_below(hit) if hit else '-'} | "
                         f"{c['beats'][reward]['srm_topk'] if first else ''} | "
                         f"{(c['beats'][reward]['hit'] or '-') if first else ''} |")
    lines += ["", "What the SRM's start adds: srm_start_positive - all_positive (both label every click positive; "
              "SRM start vs the image centre), per seed:", "", "| reward | metric | per seed | > 0 / < 0 |",
              "|---|---|---|---|"]
    for reward, by_metric in c["start_vs_centre"].items():
        lines += [f"| {reward} | {NAMES[k]} | {'; '.join(map(_cell, d))} | {_above_below(d)} |"
                  for k, d in by_metric.items()]
    lines += ["", "The clicks (mean over seeds, the T steps of each rollout):", "",
              "| reward | alignsam hit rate | srm_topk hit rate | alignsam label acc. | srm_topk label acc. |",
              "|---|---|---|---|---|"]
    for reward, m in c["clicks"].items():
        lines.append(f"| {reward} | {m['alignsam']['hit_rate']:.3f} | {m['srm_topk']['hit_rate']:.3f} | "
                     f"{m['alignsam']['label_accuracy']:.3f} | {m['srm_topk']['label_accuracy']:.3f} |")
    return "\n".join(lines)


def reward_spread(store: str, n: int = 50, horizon: int = 15, seed: int = 0) -> dict:
    """Per-step mean and standard deviation of the hit term and of IoU_t - IoU_{t-1} over training episodes of
    ``store``'s train split (training start, uniformly random free patches, ground-truth labels): the scale
    behind ``env.iou_gain_weight`` (docs/agent.md#reward)."""
    import torch

    from alignsam_ray.env import PatchGrid, PromptEpisodes
    from alignsam_ray.store.loader import EmbeddingStore

    torch.set_num_threads(1)
    st = EmbeddingStore(store)
    data = st.arrays("train")
    n = min(n, len(data["ids"]))
    out = {"store": store, "episodes": n, "horizon": horizon}
    for reward in ("hit", "iou_gain"):
        ep = PromptEpisodes(data=data, decoder=st.decoder(), grid=PatchGrid(10, 10), num_slots=n, horizon=horizon,
                            obs_res=16, init="gt", labels="gt", state="probability", seed=seed, reward=reward)
        ep.reset(np.arange(n), np.arange(n))
        rng = np.random.default_rng(seed)
        r = np.array([ep.step([rng.choice(np.flatnonzero(m)) for m in ep.action_mask()]).reward for _ in range(horizon)])
        out[reward] = {"mean": float(r.mean()), "sd": float(r.std())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="synthetic_shapes or synthetic_saliency (the study's; any synthetic task runs)")
    src.add_argument("--spread", metavar="STORE", help="only measure each reward term's per-step spread on STORE")
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--test-images", type=int, default=TEST_IMAGES)
    ap.add_argument("--iterations", type=int, default=None, help="PPO iterations per run (default: the demo's)")
    ap.add_argument("--work", default="/tmp/alignsam_rewards")
    ap.add_argument("--out", help="JSON file (required with --task)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides on top of the demo's")
    args = ap.parse_args(argv)
    if args.spread:
        print(json.dumps(reward_spread(args.spread), indent=2))
        return 0
    if not args.out:
        ap.error("--task needs --out")
    from seeds import run_seeds, seed_table  # (the sibling script; it imports the training stack)

    overrides = parse_overrides(args.overrides)
    if "reward" in overrides.get("env", {}):
        ap.error("env.reward is what the study varies: give --rewards instead")
    runs = {reward: run_seeds(f"{args.task}_{reward}", args.seeds, args.work, task=args.task,
                              iterations=args.iterations, test_images=args.test_images,
                              overrides={**overrides, "env": {**overrides.get("env", {}), "reward": reward}})
            for reward in args.rewards}
    c = compare(args.task, runs)
    tables = [comparison_table(args.task, c)]
    tables += [seed_table(f"{args.task}, reward {reward}", {s: r["metrics"] for s, r in by_seed.items()})
               for reward, by_seed in runs.items()]
    text = "\n\n".join(tables)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"task": args.task, "command": "python scripts/rewards.py " + " ".join(sys.argv[1:] if argv is None
                                                                                         else argv),
                   "design": {"rewards": args.rewards, "seeds": args.seeds, "test_images": args.test_images,
                              "decision_metric": DECISION, "beats": f"paired 95% interval above 0 in >= {BEATS_IN} seeds"},
                   **c, "table_md": text,
                   "seconds": {reward: {str(s): r["seconds"] for s, r in by_seed.items()} for reward, by_seed in runs.items()},
                   "runs": {reward: {str(s): r["metrics"] for s, r in by_seed.items()} for reward, by_seed in runs.items()}},
                  f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train and evaluate one configuration with N seeds; one table of every method across seeds.

    python scripts/seeds.py --config tune_configs/synthetic_shapes.yaml [--seeds 0 1 2] [KEY=VALUE ...]
    python scripts/seeds.py --task synthetic_shapes [--iterations 16] [--test-images 300] [KEY=VALUE ...]

--task runs exactly what `alignsam demo --tasks TASK` runs (alignsam_ray/demo.py: 50 train + 50 test
images, data seed 0, the micro-SAM store with the micro CLIP's map for an explicit-branch task, the
run config from the store, 2 EnvRunners, --iterations default 16) under --work; --config uses a run
config as `alignsam train` does. Each seed is a
full run (`train.seed` = the seed: network initialisation, SRM, image and start-point sampling) in
<work>/runs/<name>/seed_<k>, evaluated on the test split with the paper's protocol (`alignsam
evaluate`: every method, 95% bootstrap intervals, paired differences to alignsam). Finished runs and
evaluations are reused (delete --work to start over).

Output: a Markdown table (printed, and in --out as JSON with every seed's metrics.json):
    per method, the mean and standard deviation across seeds of mIoU and the task's primary metrics,
    and for every other method the paired difference alignsam - method: its mean across seeds and in
    how many seeds its 95% interval lies above 0 / below 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from alignsam_ray.config import load_config, parse_overrides
from alignsam_ray.demo import DEMO_ITERATIONS, demo_config, prepare_task
from alignsam_ray.evaluate import LABELS, METHODS, evaluate
from alignsam_ray.metrics import NAMES, primary_metrics
from alignsam_ray.train import train


def seed_table(name: str, evals: dict) -> str:
    """evals: seed -> metrics.json dict (the same task)."""
    task = next(iter(evals.values()))["task"]
    keys = tuple(dict.fromkeys(("miou",) + tuple(primary_metrics(task))))
    lines = [f"### {name}: {len(evals)} seeds ({', '.join(map(str, evals))}), "
             f"{next(iter(evals.values()))['n_images']} test images", "",
             "| method | " + " | ".join(f"{NAMES[k]} mean ± sd" for k in keys) + " | "
             + " | ".join(f"alignsam - method, {NAMES[k]}: mean; seeds with CI > 0 / < 0" for k in keys) + " |",
             "|---|" + "---|" * (2 * len(keys))]
    shown = [m for m in METHODS if all(m in e["methods"] for e in evals.values())]  # older evaluations lack some
    for method in shown:
        vals = [" ".join(_mean_sd([m["methods"][method][k] for m in evals.values()])) for k in keys]
        diffs = []
        for k in keys:
            if method == "alignsam":
                diffs.append("")
                continue
            d = [m["paired"][method][k] for m in evals.values()]
            above = sum(x["ci95"][0] > 0 for x in d)
            below = sum(x["ci95"][1] < 0 for x in d)
            diffs.append(f"{np.mean([x['diff'] for x in d]):+.3f}; {above} / {below}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(vals) + " | " + " | ".join(diffs) + " |")
    sweeps = {t: [m["t_sweep"][t]["miou"] for m in evals.values()] for t in next(iter(evals.values()))["t_sweep"]}
    lines += ["", "mIoU by T (mean ± sd across seeds): "
              + ", ".join(f"T={t}: {' '.join(_mean_sd(v))}" for t, v in sweeps.items())]
    return "\n".join(lines)


def _mean_sd(values) -> tuple[str, str]:
    v = np.asarray(values, float)
    return f"{v.mean():.3f}", f"± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def run_seeds(name: str, seeds, work: str, task: str | None = None, config: str | None = None,
              iterations: int | None = None, test_images: int | None = None, overrides: dict | None = None) -> dict:
    """Train and evaluate one configuration per seed (see the module docstring; finished runs and evaluations are
    reused) -> {seed: {"metrics": metrics.json dict, "eval_dir": its folder, "seconds": float | None (None:
    reused)}}. ``task``: the demo's data, store and config (``config``: a run config YAML instead)."""
    overrides = overrides or {}
    store = prepare_task(task, work) if task else None
    test_store, suffix = store, ""
    if test_images:  # the same generator and data seed: test images 0..49 are the demo's
        suffix = f"_test{test_images}"
        test_store = prepare_task(task, os.path.join(work, f"test{test_images}"), n_train=0, n_test=test_images)
    out_runs = {}
    for seed in seeds:
        t0 = time.time()
        run_dir = os.path.join(work, "runs", name, f"seed_{seed}")
        if task:  # exactly the demo's run config
            cfg = demo_config(store, run_dir, iterations or DEMO_ITERATIONS, seed, overrides=overrides)
            # (precision: the demo's; override with model.precision=fp32)
        else:
            run = {**overrides, "run_dir": run_dir, "train": {**overrides.get("train", {}), "seed": seed}}
            if iterations:
                run["train"].update(iterations=iterations, checkpoint_every=iterations)
            cfg = load_config(config, run)
        out = os.path.join(work, "eval", name, f"seed_{seed}{suffix}")
        done = os.path.join(out, "metrics.json")
        if os.path.isfile(done) and json.load(open(done)).get("horizon") is not None and \
                set(METHODS) <= set(json.load(open(done))["methods"]) and \
                os.path.isfile(os.path.join(cfg.run_dir, "checkpoints", f"iter_{cfg.train.iterations:06d}", "state.json")):
            out_runs[seed] = {"metrics": json.load(open(done)), "eval_dir": out, "seconds": None}
            print(f"[seeds] {name} seed {seed}: reusing {done}", flush=True)
            continue
        print(f"[seeds] {name} seed {seed}: training {cfg.train.iterations} iterations", flush=True)
        result = train(cfg, resume=True)
        metrics = evaluate(result["checkpoint"], test_store or cfg.store, out, seed=seed)
        out_runs[seed] = {"metrics": metrics, "eval_dir": out, "seconds": round(time.time() - t0, 1)}
    return out_runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a run config YAML (as for `alignsam train`)")
    src.add_argument("--task", help="a synthetic task: build the demo's data and store under --work")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None, help="PPO iterations per run (default: the config's; "
                    "--task: the demo's)")
    ap.add_argument("--name", help="name of this configuration in the table (default: the task)")
    ap.add_argument("--test-images", type=int, default=None,
                    help="--task: evaluate on the demo's test split extended to this many images (default: its 50)")
    ap.add_argument("--work", default="/tmp/alignsam_seeds")
    ap.add_argument("--out", required=True, help="JSON file for the table and every seed's metrics")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. env.state=binary")
    args = ap.parse_args(argv)

    if args.test_images is not None and (not args.task or args.test_images < 1):
        ap.error("--test-images needs --task and a number >= 1")
    name = args.name or args.task or os.path.splitext(os.path.basename(args.config))[0]
    runs = run_seeds(name, args.seeds, args.work, task=args.task, config=args.config, iterations=args.iterations,
                     test_images=args.test_images, overrides=parse_overrides(args.overrides))
    evals = {seed: r["metrics"] for seed, r in runs.items()}
    seconds = {seed: r["seconds"] for seed, r in runs.items() if r["seconds"] is not None}
    table = seed_table(name, evals)
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"name": name, "command": "python scripts/seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "seeds": args.seeds, "seconds": seconds, "table_md": table,
                   "metrics": {str(k): v for k, v in evals.items()}}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample efficiency: AlignSAM trained on N images against the training-free baselines, N = 1, 5, 10, 50.

    python scripts/shots.py --task synthetic_shapes --shots 1 5 10 50 [--seeds 0 1 2] [--iterations 12]
        [--work /tmp/alignsam_shots] [--train-only | --eval-only | --baselines-only] --out results/shots_synthetic_shapes.json
        [KEY=VALUE ...]

Design (fixed before any run):
* Data: the demo's generator and data seed 0 (alignsam_ray/demo.py ``prepare_task``). Image i of a split
  is drawn from its own seed (task, data seed, split, i), so the store of N training images holds the
  first N of the demo's 50 and every N shares them: <work>/data_N/stores/<task> (N training images, no
  test images). The test set is ONE store of the demo's 50 test images (<work>/test/stores/<task>), the
  same for every N and every seed, so all cells of the curve are scored on the same images.
* Training: exactly the demo's run config (``demo_config``: paper hyperparameters, 12 PPO iterations of
  600 env steps, 2 EnvRunners, bf16 learner), ``train.seed`` = the seed, run dir <work>/runs/shots_N/seed_k.
  The budget in env steps is the same for every N (fewer images are revisited more often).
* Evaluation: ``alignsam evaluate`` on the test store (every method, its 95% bootstrap intervals over
  the test images and the paired differences alignsam - method). The curve shows alignsam, srm_topk,
  random_actions (they use the run's SRM, trained on the same N images), persam (reference: the run's
  first training image, so the same for every N) and persam_mean (target embedding averaged over the
  run's N training images).
* Order: seed-major (seed 0 for every N, then seed 1, ...), so a partial run still gives whole curves.
  Finished runs and evaluations are reused; --train-only stops after the trainings; --eval-only
  evaluates the finished runs and tabulates them, training none (a partial curve: each cell names its
  seeds). KEY=VALUE: config overrides on top of the demo's (a tiny test run: ppo.train_batch_size=48 ...).
* The baselines need no training and no seed: --baselines-only scores persam, persam_mean (with the
  first N training images as references) and clip_points on the test store for every N (one value per
  N, 95% bootstrap interval, paired persam_mean - persam), written to --out with "_baselines" added.
* Statistics: per (method, N) the mean and sd of mIoU across seeds; its interval is the mean of the
  seeds' 95% bootstrap intervals over the test images (conservative for the image error, since the
  seeds share the images; seed-to-seed spread is the sd column). Paired: per N and method, the mean of
  alignsam - method across seeds and in how many seeds its 95% interval lies above / below 0.

Output: --out JSON (table, curve, every evaluation's metrics.json), a Markdown table (printed and next
to --out as .md) and a PNG plot (next to --out as .png): mIoU with its interval against N (log axis).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from alignsam_ray.demo import DEMO_ITERATIONS, demo_config, prepare_task

CURVE_METHODS = ("alignsam", "srm_topk", "random_actions", "persam", "persam_mean")


def _done(run_dir: str, iterations: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"iter_{iterations:06d}", "state.json"))


def curve(evals: dict, shots: list[int]) -> dict:
    """evals: (N, seed) -> metrics.json dict. Returns {method: {N: {"mean", "sd", "ci95", "seeds",
    "paired": {"diff", "above", "below"} | None}}} over the seeds evaluated for that N."""
    out: dict = {}
    for method in CURVE_METHODS:
        out[method] = {}
        for n in shots:
            ms = [m for (k, _), m in sorted(evals.items()) if k == n and method in m["methods"]]
            if not ms:
                continue
            v = np.array([m["methods"][method]["miou"] for m in ms])
            lo = float(np.mean([m["methods"][method]["ci95"]["miou"][0] for m in ms]))
            hi = float(np.mean([m["methods"][method]["ci95"]["miou"][1] for m in ms]))
            cell = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "ci95": [lo, hi],
                    "seeds": len(ms), "paired": None}
            if method != "alignsam":
                d = [m["paired"][method]["miou"] for m in ms]
                cell["paired"] = {"diff": float(np.mean([x["diff"] for x in d])),
                                  "above": int(sum(x["ci95"][0] > 0 for x in d)),
                                  "below": int(sum(x["ci95"][1] < 0 for x in d))}
            out[method][str(n)] = cell
    return out


def table(cur: dict, shots: list[int], n_images: int) -> str:
    lines = [f"mIoU on the same {n_images} test images: mean ± sd across seeds [mean of the seeds' 95% intervals]; "
             "for the baselines also alignsam - method (mean across seeds; seeds with paired CI > 0 / < 0).", "",
             "| method | " + " | ".join(f"N = {n}" for n in shots) + " |", "|---|" + "---|" * len(shots)]
    for method, cells in cur.items():
        row = []
        for n in shots:
            c = cells.get(str(n))
            if c is None:
                row.append("-")
                continue
            s = f"{c['mean']:.3f} ± {c['sd']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] ({c['seeds']} seeds)"
            if c["paired"]:
                p = c["paired"]
                s += f"; diff {p['diff']:+.3f}, {p['above']} / {p['below']}"
            row.append(s)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cur: dict, shots: list[int], path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for j, (method, cells) in enumerate(cur.items()):
        ns = [n for n in shots if str(n) in cells]
        if not ns:
            continue
        x = np.array(ns, float) * (1 + 0.03 * (j - 2))  # small horizontal offsets so the bars do not overlap
        y = np.array([cells[str(n)]["mean"] for n in ns])
        lo = y - np.array([cells[str(n)]["ci95"][0] for n in ns])
        hi = np.array([cells[str(n)]["ci95"][1] for n in ns]) - y
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=method,
                    linestyle="--" if method.startswith("persam") else "-")
    ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(n) for n in shots])
    ax.set_xlabel("training images N")
    ax.set_ylabel("mIoU (test images)")
    ax.set_title(f"{task}, micro-SAM: mean over seeds, bars = 95% intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def baselines_only(args, shots: list[int], test_store: str) -> int:
    """persam / persam_mean / clip_points on the test store with the first N training images as references."""
    from alignsam_ray.baselines import run_baseline, training_references
    from alignsam_ray.config import paper_srm
    from alignsam_ray.evaluate import score
    from alignsam_ray.metrics import confidence_intervals, paired_difference
    from alignsam_ray.store.loader import EmbeddingStore

    st = EmbeddingStore(test_store)
    data, gt, decoder = st.arrays("test"), st.gt_full("test"), st.decoder()
    ids, sizes = data["ids"], data["original_size"]
    base = os.path.splitext(args.out)[0] + "_baselines"
    rows, accs, t0 = {}, {}, time.time()
    for n in shots:
        store = _prepare(args.task, os.path.join(args.work, f"data_{n}"), n)
        cfg = {"store": store, "train": {"val_images": 0}, "srm": {"text_map": paper_srm(args.task).get("text_map")}}
        refs = training_references(cfg)
        for name in ("persam", "persam_mean", "clip_points"):
            if name != "persam_mean" and n != shots[0]:
                continue  # persam (the first image) and clip_points (no reference) do not depend on N
            print(f"[shots] baselines: {name}, N = {n}", flush=True)
            if name == "persam_mean" and n == 1 and "persam" in accs:
                acc = accs["persam"]  # one reference image: persam_mean is persam
            else:
                acc = score(run_baseline(name, data, decoder, cfg, refs).logits, ids, sizes, gt, decoder)
            accs[name if name != "persam_mean" else f"persam_mean@{n}"] = acc
            rows[f"{name}@{n}"] = {**acc.summary(), "ci95": confidence_intervals(acc)}
        rows[f"persam_mean@{n}"]["paired_vs_persam"] = paired_difference(accs[f"persam_mean@{n}"],
                                                                         accs["persam"])["miou"]
        _write_baselines(base, args, shots, len(ids), rows, t0)  # after every N: a partial run keeps its rows
    print("\n" + _write_baselines(base, args, shots, len(ids), rows, t0))
    return 0


def _prepare(task: str, folder: str, n: int, tries: int = 3) -> str:
    """``prepare_task`` with N training images and no test images; retried when Ray fails to start (a
    heavily loaded machine times the node out)."""
    for k in range(tries):
        try:
            return prepare_task(task, folder, n_train=n, n_test=0)
        except Exception as exc:  # noqa: BLE001  (ray.init raises a bare Exception on a start-up timeout)
            if "timed out during startup" not in str(exc) or k == tries - 1:
                raise
            print(f"[shots] Ray did not start ({exc}); retrying", flush=True)
            import ray

            ray.shutdown()


def _write_baselines(base: str, args, shots: list[int], n_test: int, rows: dict, t0: float) -> str:
    lines = [f"Training-free baselines on the same {n_test} test images (micro-SAM), mIoU [95% CI]:", "",
             "| method | mIoU [95% CI] | persam_mean - persam [95% CI] |", "|---|---|---|"]
    for key, r in rows.items():
        p = r.get("paired_vs_persam")
        lo, hi = r["ci95"]["miou"]
        lines.append(f"| {key.replace('@', ', N = ')} | {r['miou']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     + (f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p else "") + " |")
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({"command": "python scripts/shots.py " + " ".join(sys.argv[1:]), "task": args.task, "shots": shots,
                   "n_test": n_test, "seconds": round(time.time() - t0, 1), "table_md": text, "rows": rows},
                  f, indent=2)
    plot_baselines(rows, shots, base + ".png", args.task, n_test)
    print(f"[shots] wrote {base}.json and .png", flush=True)
    return text


def plot_baselines(rows: dict, shots: list[int], path: str, task: str, n_test: int) -> None:
    """persam_mean against N with its 95% intervals; persam and clip_points (independent of N) as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ns = [n for n in shots if f"persam_mean@{n}" in rows]
    y = np.array([rows[f"persam_mean@{n}"]["miou"] for n in ns])
    ci = np.array([rows[f"persam_mean@{n}"]["ci95"]["miou"] for n in ns]).reshape(-1, 2)
    ax.errorbar(ns, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", capsize=3, label="persam_mean (N references)")
    for j, name in enumerate(("persam", "clip_points")):
        r = rows.get(f"{name}@{shots[0]}")
        if r:
            ax.axhline(r["miou"], color=f"C{j + 1}", label=f"{name} (independent of N)")
            ax.axhspan(*r["ci95"]["miou"], color=f"C{j + 1}", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(n) for n in shots])
    ax.set_xlabel("training images N")
    ax.set_ylabel(f"mIoU ({n_test} test images)")
    ax.set_title(f"{task}, micro-SAM: training-free baselines, 95% intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="a synthetic task, e.g. synthetic_shapes")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=DEMO_ITERATIONS)
    ap.add_argument("--n-test", type=int, default=50, help="test images (the demo's first N)")
    ap.add_argument("--work", default="/tmp/alignsam_shots")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train every run, evaluate none")
    mode.add_argument("--eval-only", action="store_true", help="evaluate the finished runs, train none")
    mode.add_argument("--baselines-only", action="store_true", help="the training-free baselines per N, no run")
    ap.add_argument("--out", required=True, help="JSON file; the table (.md) and plot (.png) go next to it")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. ppo.train_batch_size=48")
    args = ap.parse_args(argv)
    if min(args.shots) < 1:
        ap.error("--shots must be >= 1")
    from alignsam_ray.config import parse_overrides
    from alignsam_ray.evaluate import evaluate
    from alignsam_ray.train import train

    shots = sorted(set(args.shots))
    overrides = parse_overrides(args.overrides)
    test_store = prepare_task(args.task, os.path.join(args.work, "test"), n_train=0, n_test=args.n_test)
    evals, seconds = {}, {}
    for seed in ([] if args.baselines_only else args.seeds):
        for n in shots:
            store = _prepare(args.task, os.path.join(args.work, f"data_{n}"), n)
            run_dir = os.path.join(args.work, "runs", f"shots_{n}", f"seed_{seed}")
            cfg = demo_config(store, run_dir, args.iterations, seed, overrides=overrides)
            t0 = time.time()
            if not _done(run_dir, args.iterations):
                if args.eval_only:
                    print(f"[shots] N = {n}, seed {seed}: not trained; left out", flush=True)
                    continue
                print(f"[shots] N = {n}, seed {seed}: training {args.iterations} iterations", flush=True)
                train(cfg, resume=True)
                seconds[f"train_{n}_{seed}"] = round(time.time() - t0, 1)
            if args.train_only:
                continue
            out = os.path.join(args.work, "eval", f"shots_{n}", f"seed_{seed}")
            done = os.path.join(out, "metrics.json")
            if os.path.isfile(done):
                evals[(n, seed)] = json.load(open(done))
                print(f"[shots] N = {n}, seed {seed}: reusing {done}", flush=True)
                continue
            t0 = time.time()
            ckpt = os.path.join(run_dir, "checkpoints", f"iter_{args.iterations:06d}")
            evals[(n, seed)] = evaluate(ckpt, test_store, out, seed=seed, n_figures=0)
            seconds[f"eval_{n}_{seed}"] = round(time.time() - t0, 1)
    if args.train_only:
        print("[shots] --train-only: every run trained")
        return 0
    if args.baselines_only:
        return baselines_only(args, shots, test_store)
    if not evals:
        print("[shots] no finished run to evaluate")
        return 1
    cur = curve(evals, shots)
    text = table(cur, shots, next(iter(evals.values()))["n_images"])
    print("\n" + text)
    base = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(cur, shots, base + ".png", args.task)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    with open(args.out, "w") as f:
        json.dump({"command": "python scripts/shots.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "task": args.task, "shots": shots, "seeds": args.seeds, "iterations": args.iterations,
                   "seconds": seconds, "table_md": text, "curve": cur,
                   "metrics": {f"{n}/{s}": m for (n, s), m in sorted(evals.items())}}, f, indent=2)
    print(f"wrote {args.out}, {base}.md, {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

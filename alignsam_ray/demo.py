"""The embedded default end to end (`alignsam demo`, `bash scripts/demo.sh`): synthetic data, the
micro-SAM, the paper's hyperparameters.

    prepare_task(task, out, ...)  -> store     synthesise the task and embed it (+ the micro CLIP's CLIP
                                               Surgery map of its text when the paper's SRM branch for it
                                               is explicit)
    demo_config(store, run_dir, ...)           the run config (paper defaults; task + SRM branch from the store)
    run_demo(out, tasks, ...)                  all of it for each task (+ a bundle for `alignsam app`), then
                                               report.md + timing.json

``scripts/seeds.py --task`` uses the same data, store and config, so its tables are the demo's.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig

DEMO_TASKS = ("synthetic_shapes",)  # the VOC analogue: the target class among distractor shapes
DEMO_ITERATIONS = 12  # PPO iterations of the default 600 env steps (40 episodes): what fits 10 minutes


def _native_bf16() -> bool:
    """Whether this CPU has native bfloat16 maths (AVX512-BF16 or AMX). Without it, bf16 autocast convolutions
    run on slow reference kernels: measured on an AVX2-only AMD EPYC, a 256-channel 3x3 convolution on
    64 x 16 x 16 took 0.5 s in fp32 and over 19 s under bf16 autocast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# the learner's convolutions under bfloat16 autocast where the CPU has native bf16, else fp32 (docs/agent.md#precision)
DEMO_PRECISION = "bf16" if _native_bf16() else "fp32"
N_EXAMPLES = 4  # test images copied into each demo bundle's examples/ (the app's example picker)

ROWS = (  # paper Table 2 rows (ablations) and our references
    ("random_actions", "w/o RL (random actions)"),
    ("all_positive", "w/o SRM (every point positive)"),
    ("srm_start_positive", "SRM start, every later point positive"),
    ("single_step", "w/o multi-step (T = 1)"),
    ("alignsam", "**AlignSAM**"),
    ("srm_topk", "non-RL: the T best SRM cells"),
    ("gt_labels", "oracle labels (not an upper bound)"),
)


def prepare_task(task: str, out: str, n_train: int = 50, n_test: int = 50, seed: int = 0) -> str:
    """Synthesise ``task`` into out/data/<task> and embed it into out/stores/<task> (both reused when
    complete); returns the store path."""
    from .config import paper_srm
    from .data import generate_task, open_dataset
    from .store.embed import embed_dataset

    folder = generate_task(task, os.path.join(out, "data", task), n_train, n_test, seed)
    store = os.path.join(out, "stores", task)
    explicit = paper_srm(task)["branch"] == "explicit"
    embed_dataset(open_dataset(folder, n_train=None), store, sam_type="micro", dataset_spec=folder,
                  clip_model="micro" if explicit else None)
    return store


def demo_config(store: str, run_dir: str, iterations: int = DEMO_ITERATIONS, seed: int = 0, env_runners: int = 2,
                precision: str = DEMO_PRECISION, overrides: dict | None = None) -> RunConfig:
    """The paper's defaults; the task and its SRM branch come from the store (``config.from_store``);
    ``overrides`` (nested dict) on top."""
    from .config import load_config

    demo = {"run_dir": run_dir, "resources": {"num_env_runners": env_runners}, "model": {"precision": precision},
            "train": {"iterations": iterations, "checkpoint_every": iterations, "seed": seed}}
    return load_config(None, _nested(demo, overrides or {}), store=store)


def _nested(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _nested(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_demo(out: str, tasks: list[str], n_train: int = 50, n_test: int = 50, seed: int = 0,
             iterations: int = DEMO_ITERATIONS, env_runners: int = 2, precision: str = DEMO_PRECISION) -> dict:
    """Every phase for each task; returns the per-phase seconds (also written to out/timing.json)."""
    import ray

    t0 = time.time()
    out = os.path.abspath(out)
    phases: dict = {"synthesis + embedding": 0.0, "training": 0.0, "evaluation": 0.0, "export": 0.0}
    summary = {}
    ray_was_up = ray.is_initialized()
    try:
        _run_tasks(out, tasks, n_train, n_test, seed, iterations, env_runners, precision, phases, summary)
    finally:
        if not ray_was_up:  # the Ray this demo started (for embedding and training) ends with it
            ray.shutdown()
    for task in tasks:  # where training went: each iteration's own seconds (progress.csv)
        with open(os.path.join(out, "runs", task, "progress.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        for key, name in (("sample_s", "training: sampling"), ("learn_s", "training: PPO learner"),
                          ("srm_s", "training: SRM updates")):
            phases[name] = phases.get(name, 0.0) + sum(float(r.get(key) or "nan") for r in rows)
    phases["total"] = time.time() - t0
    text = report(out, summary, phases, n_train, n_test, seed, iterations, precision)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump({k: round(v, 1) for k, v in phases.items()}, f, indent=2)
    print("\n" + text)
    print(f"[demo] done in {phases['total']:.0f}s: {out}/report.md, eval/<task>/ (metrics.json, report.md, figures/), "
          f"runs/<task>/ (checkpoints, TensorBoard), bundles/<task>/ (Ray-free bundle)")
    print(f"[demo] see the agent click, step by step (pip install 'alignsam_ray[app]'): alignsam app --bundle "
          f"{out}/bundles/{tasks[0]} --eval {out}/eval/{tasks[0]}   (then open http://127.0.0.1:7860)")
    return phases


def _run_tasks(out, tasks, n_train, n_test, seed, iterations, env_runners, precision, phases, summary) -> None:
    from .config import paper_srm
    from .evaluate import evaluate
    from .train import train

    for task in tasks:
        print(f"[demo] {task}: 1/3 synthesising {n_train} + {n_test} images and embedding them with the micro-SAM"
              + (" (+ the micro CLIP's map of the task's text, for the explicit SRM branch)"
                 if paper_srm(task)["branch"] == "explicit" else ""), flush=True)
        t1 = time.time()
        store = prepare_task(task, out, n_train, n_test, seed)
        phases["synthesis + embedding"] += time.time() - t1
        cfg = demo_config(store, os.path.join(out, "runs", task), iterations, seed, env_runners, precision)
        print(f"\n[demo] {task}: 2/3 training the PPO agent ({iterations} iterations, SRM branch "
              f"{cfg.srm.branch})", flush=True)
        t1 = time.time()
        result = train(cfg, resume=os.path.isdir(os.path.join(cfg.run_dir, "checkpoints")))  # a rerun resumes
        phases["training"] += time.time() - t1
        print(f"[demo] {task}: 3/3 evaluating on the test split", flush=True)
        t1 = time.time()
        summary[task] = evaluate(result["checkpoint"], store, os.path.join(out, "eval", task), seed=seed)
        phases["evaluation"] += time.time() - t1
        t1 = time.time()
        export_demo_bundle(result["checkpoint"], os.path.join(out, "bundles", task), os.path.join(out, "data", task))
        phases["export"] += time.time() - t1


def export_demo_bundle(checkpoint: str, bundle: str, data: str) -> None:
    """``alignsam export`` of the demo's run, plus ``N_EXAMPLES`` of its test images in ``bundle/examples/``
    (not in the manifest: the predictor never reads them; ``alignsam app`` offers them)."""
    import contextlib
    import io
    import shutil
    import warnings

    from .export import export_bundle

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # torch.onnx's progress lines
        warnings.simplefilter("ignore")
        export_bundle(checkpoint, bundle)
    images = os.path.join(data, "test", "images")
    os.makedirs(os.path.join(bundle, "examples"), exist_ok=True)
    for name in sorted(os.listdir(images))[:N_EXAMPLES]:
        shutil.copy(os.path.join(images, name), os.path.join(bundle, "examples", name))


def report(out: str, summary: dict, phases: dict, n_train: int, n_test: int, seed: int, iterations: int,
           precision: str) -> str:
    """Markdown: per task the paper's Table 2 layout (ablations) with paired 95% intervals, mIoU by T
    (Table 5), the figure files; then where the time went."""
    from .evaluate import format_metric, format_value, verdict
    from .metrics import NAMES, primary_metrics

    lines = ["# alignsam demo", "",
             f"Synthetic data ({n_train} training + {n_test} test images per task, seed {seed}), the embedded "
             f"micro-SAM, {iterations} PPO iterations ({precision} learner), the paper's hyperparameters. Brackets: "
             "95% bootstrap "
             "intervals over the test images; the last column is paired (the same images) and says better or "
             "worse only where its interval excludes 0.", ""]
    for task, m in summary.items():
        keys = tuple(dict.fromkeys(("miou",) + tuple(primary_metrics(task))))
        lines += [f"## {task}: ablations (cf. paper Table 2)", "",
                  "| method | " + " | ".join(NAMES[k] for k in keys) + " | AlignSAM - method, mIoU [95% CI] |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for name, label in ROWS:
            d = m["paired"].get(name)
            diff = (f"{format_value(d['miou']['diff'])} [{format_value(d['miou']['ci95'][0])}, {format_value(d['miou']['ci95'][1])}] "
                    f"{verdict(d['miou'], 'miou')}") if d else ""
            lines.append(f"| {label} | " + " | ".join(format_metric(m["methods"][name], k) for k in keys) + f" | {diff} |")
        halves = [(d["miou"]["ci95"][1] - d["miou"]["ci95"][0]) / 2 for d in m["paired"].values()]
        lines += ["", f"Resolution: with {m['n_images']} test images the paired intervals' half-widths run from "
                  f"{min(halves):.3f} to {max(halves):.3f}; a true difference smaller than its row's half-width can show "
                  "as \"no clear difference\". `python scripts/seeds.py --task " + task + " --test-images 300` "
                  "evaluates the same configuration on 300 test images (docs/results.md, the demo)."]
        lines += ["", "mIoU by the number of steps T (cf. paper Table 5): "
                  + ", ".join(f"T = {t}: {v['miou']:.3f}" for t, v in m["t_sweep"].items()), ""]
        folder = os.path.join(out, "eval", task, "figures")
        figs = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        lines += ["Figures (prompts, masks and the ground-truth outline at steps 1, 5, 10, 15): "
                  + ", ".join(f"eval/{task}/figures/{f}" for f in figs), ""]
    lines += ["## Where the time went", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in phases.items()]
    return "\n".join(lines) + "\n"

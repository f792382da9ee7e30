"""The ``alignsam`` command line (one entry point; see README for each subcommand)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .folder_lock import FolderInUseError, folder_lock
from .sam_types import SAM2_TYPES, SAM3_TYPES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _add_embed(sub):
    p = sub.add_parser("embed", help="precompute SAM embeddings of a dataset into a Parquet store",
                       description="Precompute SAM image embeddings once (Ray Data) into resumable Parquet shards.")
    p.add_argument("--data", required=True, help="dataset folder (generic images/ + masks/ layout, or a "
                   "benchmark folder), or LAYOUT:PATH with LAYOUT in generic, cuhk, sbu, msd, duts, voc")
    p.add_argument("--sam", default="micro", choices=["micro", "vit_b", "vit_l", "vit_h", *SAM2_TYPES, *SAM3_TYPES],
                   help="SAM type (default: micro, embedded); sam2.1_*: SAM 2.1 through the official sam2 package; "
                   "sam3: SAM 3's point prompts through the official sam3 package (an extra: docs/store.md)")
    p.add_argument("--checkpoint", help="official SAM .pth (required for vit_*; micro defaults to the shipped weights), "
                   "SAM 2.1 .pt (sam2.1_hiera_tiny.pt, ...) or SAM 3's sam3.pt")
    p.add_argument("--random-init", action="store_true", help="random SAM weights (timing only)")
    p.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    p.add_argument("--n-train", type=int, default=50, help="training images drawn per task (paper: 50); -1 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-image draw")
    p.add_argument("--classes", nargs="*", help="VOC: restrict to these class names")
    p.add_argument("--threshold", type=int, default=None, help="mask binarisation threshold, 0..255 (default 128, or dataset.json)")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None, help="white = background")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable/mismatched images instead of stopping")
    p.add_argument("--shard-size", type=_positive_int, default=32, help="images per Parquet shard")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per encoder call")
    p.add_argument("--encoders", type=_positive_int, default=1, help="encoder actors (one per GPU on a cluster)")
    p.add_argument("--clip-model", help="also store CLIP Surgery maps (explicit SRM branch): 'micro' (embedded) "
                   "or an open_clip ViT name, e.g. ViT-B-16")
    p.add_argument("--clip-weights", help="local open_clip weights file for --clip-model (micro: the shipped one)")
    p.add_argument("--clip-text", action="append", help="text prompt of a map (repeatable; default: the task's text)")


def cmd_embed(args) -> int:
    from .data import open_dataset
    from .store.embed import embed_dataset

    skipped: dict = {}  # pairs --skip-bad drops while listing: recorded in the manifest too
    samples = open_dataset(args.data, n_train=None if args.n_train < 0 else args.n_train, seed=args.seed,
                           skip_bad=args.skip_bad, threshold=args.threshold, invert=args.invert, classes=args.classes,
                           skipped=skipped)
    m = embed_dataset(samples, args.out, sam_type=args.sam, checkpoint=args.checkpoint, random_init=args.random_init,
                      shard_size=args.shard_size, batch_size=args.batch_size, num_encoders=args.encoders,
                      skip_bad=args.skip_bad, dataset_spec=args.data, clip_model=args.clip_model,
                      clip_weights=args.clip_weights, clip_texts=args.clip_text, skipped=skipped)
    print(json.dumps({"store": args.out, "n_images": m["n_images"], "counts": m["counts"], "tasks": m["tasks"],
                      "sam_type": m["sam_type"], "maps": m["maps"], "complete": m["complete"]}, indent=2))
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train the PPO agent + SRM on one task's embedding store",
                       description="PPO (RLlib new API stack) on precomputed embeddings; checkpoints + SRM + logs in run_dir.")
    p.add_argument("--config", help="run config YAML (see tune_configs/)")
    p.add_argument("--store", help="train on this store without a YAML file: the task is the store's, the SRM "
                   "branch the paper's for it, everything else the paper's defaults (with --config: its store)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides with dotted keys, e.g. ppo.lr=3e-4 train.iterations=50")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")


def cmd_train(args) -> int:
    from .config import ConfigError, load_config
    from .train import train

    if not (args.config or args.store):
        raise ConfigError("give --store STORE (the paper's settings for the store's task) or --config YAML")
    cfg = load_config(args.config, args.overrides, store=args.store)
    with folder_lock(cfg.run_dir, "train"):
        result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: result.get(k) for k in ("iteration", "hit_rate", "final_iou", "checkpoint")}, indent=2))
    return 0


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="paper protocol + ablations on a test split -> metrics.json, report.md, figures",
                       description="Evaluate a trained agent: alignsam, random_actions, all_positive, "
                       "srm_start_positive, single_step, srm_topk, gt_labels and a T sweep; metrics mIoU, IoU (dataset), F_beta, E_phi, MAE, BER, "
                       "with 95%% bootstrap intervals and paired differences to alignsam.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("--store", help="embedding store to evaluate on (default: the run's store)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", "--batch", dest="batch", type=_positive_int, default=None,
                   help="images per batched decoder call (default: 16 on the CPU; on a GPU from its free memory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where SAM's decoder, the "
                   "policy and the SRM run (default: auto, a GPU when one is visible; with --shards: GPU Ray tasks "
                   "when the cluster has GPUs)")
    p.add_argument("--shards", type=_positive_int, default=1, help="split the test images into N shards run as "
                   "Ray tasks across the cluster (default: 1, in this process without Ray tasks); the figures are "
                   "the same for any N")
    p.add_argument("--figures", type=int, default=4, help="images to draw")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (per image: seed and image id)")
    p.add_argument("--sam-checkpoint", help="SAM 3 stores: the sam3.pt they were embedded with, for the sam3_text "
                   "method (SAM 3 prompted with the task's text: its whole image model, not only the stored decoder)")


def cmd_evaluate(args) -> int:
    from .checkpoint import Agent
    from .evaluate import evaluate

    store = args.store or Agent.load(args.checkpoint).cfg.store
    with folder_lock(args.out, "evaluate"):
        m = evaluate(args.checkpoint, store, args.out, split=args.split, batch=args.batch, n_figures=args.figures,
                     seed=args.seed, device=args.device, shards=args.shards, sam_checkpoint=args.sam_checkpoint)
    print(open(os.path.join(args.out, "report.md")).read().split("## Metric definitions")[0])
    return 0 if m else 1


def _add_export(sub):
    p = sub.add_parser("export", help="write a Ray-free bundle of a trained agent (policy ONNX, SRM, config)",
                       description="Export the policy (ONNX), the SRM and the config, with a manifest of sha256s. "
                       "A bundle holds data only (no pickles), so it is safe to share.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="bundle folder (replaced if it exists)")
    p.add_argument("--pt2", action="store_true", help="also write policy.pt2 (a torch.export program: loading it "
                   "unpickles, so load one only from a trusted source; segment never reads it)")


def cmd_export(args) -> int:
    from .export import export_bundle

    m = export_bundle(args.checkpoint, args.out, pt2=args.pt2)
    print(json.dumps({"bundle": args.out, "task": m["task"], "sam": m["sam"]["sam_type"], "files": sorted(m["files"])},
                     indent=2))
    return 0


def _add_segment(sub):
    p = sub.add_parser("segment", help="segment images with an exported bundle (no Ray; --ray: a whole folder or "
                       "bucket on the Ray cluster)",
                       description="Ray-free inference: SAM embeds each image, the SRM places the first two points, "
                       "the policy picks T more; writes <stem>_mask.png and <stem>_overlay.png per image.")
    p.add_argument("images", nargs="*", help="image files (or --ray FOLDER_OR_URI for a whole collection)")
    p.add_argument("--ray", metavar="INPUT", help="segment every image under INPUT (a folder or a URI pyarrow opens: "
                   "s3://, gs://) on the Ray cluster, streaming (Ray Data); --out may be a URI too; writes "
                   "masks/, index.parquet; a rerun skips finished images")
    p.add_argument("--bundle", required=True, help="folder written by `alignsam export`")
    p.add_argument("--sam-checkpoint", help="the official SAM .pth (SAM 2.1, SAM 3: .pt) the policy was trained with (not "
                   "needed for micro-SAM)")
    p.add_argument("--clip-weights", help="explicit-branch bundles: the open_clip weights file the maps were made "
                   "with (not needed for the micro CLIP)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=_positive_int, default=4, help="images per batched decoder call")
    p.add_argument("--steps", type=_positive_int, default=None, help="T (default: the trained T; at most the grid's "
                   "patches)")
    p.add_argument("--overlays", action="store_true", help="--ray: also write overlays/ (always written without --ray)")
    p.add_argument("--strict", action="store_true", help="--ray: stop at the first unreadable image (default: list it "
                   "in the index and go on)")
    p.add_argument("--encoders", type=_positive_int, help="--ray: SAM encoder actors (default: one per GPU, else 1)")
    p.add_argument("--prompters", type=_positive_int, help="--ray: prompting actors (default: the CPUs left)")


def cmd_segment(args) -> int:
    if args.ray:
        if args.images:
            raise ValueError("give image files or --ray INPUT, not both")
        from .batch_segment import segment_collection

        with folder_lock(args.out, "segment --ray"):
            segment_collection(args.ray, args.bundle, args.out, sam_checkpoint=args.sam_checkpoint,
                               clip_weights=args.clip_weights, steps=args.steps, overlays=args.overlays,
                               strict=args.strict, encoders=args.encoders, prompters=args.prompters, batch=args.batch)
        return 0
    if not args.images:
        raise ValueError("give image files to segment, or --ray INPUT for a whole folder or bucket")
    from PIL import Image
    from tqdm import tqdm

    from .data.samples import read_image
    from .predictor import AlignSAMPredictor
    from .visualise import overlay

    predictor = AlignSAMPredictor(args.bundle, sam_checkpoint=args.sam_checkpoint, clip_weights=args.clip_weights)
    steps = predictor.steps(args.steps)  # before any image is read
    os.makedirs(args.out, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.images]
    if len(set(stems)) != len(stems):
        raise ValueError("two input images share a file stem; their outputs would overwrite each other")
    with tqdm(total=len(args.images), desc="segment", unit="image", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(args.images), args.batch):
            paths = args.images[start:start + args.batch]
            images = [read_image(p) for p in paths]
            for path, image, pred in zip(paths, images, predictor.predict_batch(images, steps)):
                stem = os.path.splitext(os.path.basename(path))[0]
                Image.fromarray(pred.mask.astype(np.uint8) * 255).save(os.path.join(args.out, f"{stem}_mask.png"))
                Image.fromarray(overlay(image, pred.mask, pred.points, pred.labels)).save(
                    os.path.join(args.out, f"{stem}_overlay.png"))
                bar.update(1)
    print(f"wrote {len(args.images)} mask(s) and overlay(s) to {args.out}")
    return 0


def _add_app(sub):
    p = sub.add_parser("app", help="a local web page: a bundle's clicks step by step, an evaluation's methods side "
                       "by side (needs the app extra: pip install 'alignsam_ray[app]')",
                       description="Gradio page on this machine (docs/app.md): Segment (upload an image, step "
                       "through the prompts and masks) and, with --eval, Evaluation (metrics, per-image IoU, methods "
                       "side by side).")
    p.add_argument("--bundle", required=True, help="folder written by `alignsam export` (the demo's: DEMO/bundles/TASK)")
    p.add_argument("--sam-checkpoint", help="the official SAM .pth (SAM 2.1: .pt) the policy was trained with (not "
                   "needed for micro-SAM)")
    p.add_argument("--clip-weights", help="explicit-branch bundles: the open_clip weights file (not needed for the "
                   "micro CLIP)")
    p.add_argument("--eval", help="a folder written by `alignsam evaluate` (metrics.json, per_image.json, figures/)")
    p.add_argument("--port", type=_positive_int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")


def cmd_app(args) -> int:
    for flag, path in (("--bundle", args.bundle), ("--eval", args.eval)):
        if path is not None and not os.path.isdir(path):
            print(f"alignsam app: error: {flag} {path} is not a folder", file=sys.stderr)
            return 1
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("alignsam app: error: the app needs Gradio: pip install 'alignsam_ray[app]' (from a checkout: "
              "pip install -e '.[app]')", file=sys.stderr)
        return 1
    from .app import serve

    serve(args.bundle, sam_checkpoint=args.sam_checkpoint, clip_weights=args.clip_weights, eval_dir=args.eval,
          host=args.host, port=args.port)
    return 0


def _add_tune(sub):
    p = sub.add_parser("tune", help="Ray Tune sweep over tasks and hyperparameters -> best-per-task table",
                       description="Each trial is one training run; see alignsam_ray/tune.py for the sweep file.")
    p.add_argument("--config", required=True, help="sweep YAML (e.g. tune_configs/sweep_synthetic.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--quiet", action="store_true", help="no Tune status tables")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="set top-level sweep keys, e.g. storage=/mnt/shared/sweeps store_root=s3://bucket/stores")


def cmd_tune(args) -> int:
    from .tune import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.overrides)
    with folder_lock(os.path.join(sweep["storage"], sweep["name"]), "tune"):  # the experiment folder
        summary = run_sweep(sweep, resume=args.resume, progress=not args.quiet)
    print(f"[tune] results in {summary['path']} (best_per_task.md/.csv, trials.csv, sweep.png)")
    return 0


def _add_reproduce(sub):
    p = sub.add_parser("reproduce", help="the paper's Tables 2-5 from the public benchmarks: embed, train, evaluate, "
                       "report beside the paper's figures", description="Find CUHK, SBU, MSD, DUTS and VOC under "
                       "--data, embed each once, train each task with the paper's settings (Tune trials: spread over "
                       "a cluster's GPUs), evaluate with the paper's protocol, and write DIR/report.md + report.json "
                       "(ours with 95%% intervals beside the paper's figures). Resumable: rerun the same command.")
    p.add_argument("--data", required=True, help="folder holding the benchmark folders (CUHK*, SBU*, MSD*, DUTS*, "
                   "VOC*/VOCdevkit), each in its public layout; any subset")
    p.add_argument("--out", required=True, help="output folder (stores/, runs/, eval/, report.md); rerun to resume")
    p.add_argument("--sam", default="vit_h", choices=["micro", "vit_b", "vit_l", "vit_h"],
                   help="SAM type (default: vit_h, the paper's)")
    p.add_argument("--checkpoint", help="official SAM .pth (e.g. sam_vit_h_4b8939.pth)")
    p.add_argument("--clip-weights", help="local open_clip weights file for CLIP Surgery (the explicit SRM branch of "
                   "SBU and VOC, and Table 4); without it those tasks cannot run")
    p.add_argument("--clip-model", help="open_clip model name of --clip-weights (default ViT-B-16; micro-SAM: the "
                   "embedded micro CLIP)")
    p.add_argument("--tasks", nargs="+", choices=["blur", "shadow", "glass", "saliency", "voc"],
                   help="only these benchmarks (default: every one found)")
    p.add_argument("--voc-classes", nargs="+", help="only these VOC classes (default: the 20)")
    p.add_argument("--n-train", type=_positive_int, default=50, help="training images per task (paper: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=_positive_int, help="PPO iterations per run (default: the run config's, "
                   "train.iterations)")
    p.add_argument("--no-table4", action="store_true", help="skip Table 4's runs with the other SRM branch "
                   "(halves the training of every benchmark, VOC classes included)")
    p.add_argument("--smoke", action="store_true", help="shrink every stage (3 training + 2 test images per task, "
                   "1 short iteration) to check the whole path in minutes; the figures mean nothing")


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    with folder_lock(args.out, "reproduce"):
        reproduce(args.data, args.out, sam=args.sam, checkpoint=args.checkpoint, clip_model=args.clip_model,
                  clip_weights=args.clip_weights, tasks=args.tasks, voc_classes=args.voc_classes,
                  n_train=args.n_train, seed=args.seed, iterations=args.iterations, table4=not args.no_table4,
                  smoke=args.smoke)
    return 0


def cmd_demo(args) -> int:
    from .data import SYNTHETIC_TASKS
    from .demo import run_demo

    tasks = list(SYNTHETIC_TASKS) if args.tasks == ["all"] else list(dict.fromkeys(args.tasks))
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        print(f"alignsam demo: unknown task(s) {unknown}; choose from {list(SYNTHETIC_TASKS)} or 'all'", file=sys.stderr)
        return 2
    with folder_lock(args.out, "demo"):
        run_demo(args.out, tasks, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                 iterations=args.iterations, env_runners=args.env_runners, precision=args.precision)
    return 0


RAY_MODULES = {"embed": ("ray.data",), "train": ("ray.rllib",), "tune": ("ray.rllib", "ray.tune"),
               "evaluate": ("ray.rllib",), "export": ("ray.rllib",), "demo": ("ray.data", "ray.rllib"),
               "reproduce": ("ray.data", "ray.rllib", "ray.tune"), "segment": ("ray.data",)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="alignsam", description="AlignSAM on Ray: learn where to click so a frozen SAM segments your task.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"alignsam {__version__}")
    ap.add_argument("--verbose", action="store_true", help="show Ray's and RLlib's own messages in the terminal "
                    "(default: they go to $ALIGNSAM_LOG_DIR/COMMAND.log, ~/.cache/alignsam/logs/ if unset)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="whole pipeline on the embedded default (synthetic data, micro-SAM), no downloads")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--n-train", type=int, default=50)
    d.add_argument("--n-test", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    from .demo import DEMO_ITERATIONS, DEMO_PRECISION, DEMO_TASKS

    d.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), help="synthetic tasks to train and evaluate "
                   "(default: %(default)s; 'all' = the five)")
    d.add_argument("--iterations", type=_positive_int, default=DEMO_ITERATIONS, help="PPO iterations per task "
                   "(default: %(default)s)")
    d.add_argument("--precision", choices=["fp32", "bf16"], default=DEMO_PRECISION, help="the learner's precision "
                   "(model.precision; default here: %(default)s: bf16 where the CPU has native bf16, else fp32)")
    d.add_argument("--env-runners", type=int, default=2, help="EnvRunners (0.5 CPU each)")
    _add_embed(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_tune(sub)
    _add_segment(sub)
    _add_reproduce(sub)
    _add_app(sub)
    args = ap.parse_args(argv)
    if args.cmd == "app":  # Ray-free; bad input is reported in the page
        return cmd_app(args)
    ray_free = args.cmd == "segment" and not args.ray
    if not ray_free and not args.verbose:  # segment (without --ray) runs without Ray
        from .ray_session import default_log_path, route_ray_logs

        print(f"[alignsam] Ray's own messages: {route_ray_logs(default_log_path(args.cmd), RAY_MODULES.get(args.cmd, ()))} (--verbose shows them here)",
              file=sys.stderr, flush=True)
    if args.cmd == "segment":  # without --ray: none of the Ray-backed modules below may load
        from .data.samples import DataError as _DataError
        from .foundation import CheckpointError as _CheckpointError

        try:
            return cmd_segment(args)
        except (_DataError, _CheckpointError, FolderInUseError, FileNotFoundError, ValueError, ConnectionError) as exc:
            print(f"alignsam segment: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("alignsam segment: interrupted; finished masks and index parts are kept (rerun to resume)",
                  file=sys.stderr)
            return 130
    from .config import ConfigError
    from .data import DataError
    from .foundation import CheckpointError
    from .store import StoreError

    try:
        return {"demo": cmd_demo, "embed": cmd_embed, "train": cmd_train, "evaluate": cmd_evaluate,
                "export": cmd_export, "tune": cmd_tune, "reproduce": cmd_reproduce}[args.cmd](args)
    except (DataError, CheckpointError, StoreError, ConfigError, FolderInUseError, FileNotFoundError,
            ConnectionError) as exc:
        print(f"alignsam {args.cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alignsam {args.cmd}: interrupted; finished shards and checkpoints are kept (rerun to resume)",
              file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if args.cmd != "reproduce":
            raise
        print(f"alignsam reproduce: error: {exc}", file=sys.stderr)  # failed runs: named, with their logs
        return 1


if __name__ == "__main__":
    sys.exit(main())

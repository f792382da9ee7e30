"""The ``alignsam`` command line (one entry point; see README for each subcommand)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

NOT_BUILT = {
    "train": "training the PPO agent (issue: the AlignSAM agent)",
    "evaluate": "evaluation with the paper's metrics and ablations (issue: the AlignSAM agent)",
    "tune": "Ray Tune sweeps (issue: scale out and ship)",
    "export": "policy export (issue: scale out and ship)",
    "segment": "Ray-free segmentation with an exported bundle (issue: scale out and ship)",
}


def _add_embed(sub):
    p = sub.add_parser("embed", help="precompute SAM embeddings of a dataset into a Parquet store",
                       description="Precompute SAM image embeddings once (Ray Data) into resumable Parquet shards.")
    p.add_argument("--data", required=True, help="dataset folder (generic images/ + masks/ layout, or a "
                   "benchmark folder), or LAYOUT:PATH with LAYOUT in generic, cuhk, sbu, msd, duts, voc")
    p.add_argument("--sam", default="micro", choices=["micro", "vit_b", "vit_l", "vit_h"], help="SAM type (default: micro, embedded)")
    p.add_argument("--checkpoint", help="official SAM .pth (required for vit_*; micro defaults to the shipped weights)")
    p.add_argument("--random-init", action="store_true", help="random SAM weights (timing only)")
    p.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    p.add_argument("--n-train", type=int, default=50, help="training images drawn per task (paper: 50); -1 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-image draw")
    p.add_argument("--classes", nargs="*", help="VOC: restrict to these class names")
    p.add_argument("--threshold", type=int, default=None, help="mask binarisation threshold, 0..255 (default 128, or dataset.json)")
    p.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None, help="white = background")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable/mismatched images instead of stopping")
    p.add_argument("--shard-size", type=int, default=32, help="images per Parquet shard")
    p.add_argument("--batch-size", type=int, default=4, help="images per encoder call")
    p.add_argument("--encoders", type=int, default=1, help="encoder actors (one per GPU on a cluster)")


def cmd_embed(args) -> int:
    from .data import open_dataset
    from .store.embed import embed_dataset

    samples = open_dataset(args.data, n_train=None if args.n_train < 0 else args.n_train, seed=args.seed,
                           skip_bad=args.skip_bad, threshold=args.threshold, invert=args.invert, classes=args.classes)
    m = embed_dataset(samples, args.out, sam_type=args.sam, checkpoint=args.checkpoint, random_init=args.random_init,
                      shard_size=args.shard_size, batch_size=args.batch_size, num_encoders=args.encoders,
                      skip_bad=args.skip_bad, dataset_spec=args.data)
    print(json.dumps({"store": args.out, "n_images": m["n_images"], "counts": m["counts"], "tasks": m["tasks"],
                      "sam_type": m["sam_type"], "complete": m["complete"]}, indent=2))
    return 0


def cmd_demo(args) -> int:
    """Embedded default, end to end as far as it is built: synthesise five tasks, embed them."""
    from .data import SYNTHETIC_TASKS, generate_all, open_dataset
    from .store.embed import embed_dataset

    t0 = time.time()
    out = os.path.abspath(args.out)
    print(f"[demo] synthesising the five synthetic tasks into {out}/data", flush=True)
    folders = generate_all(os.path.join(out, "data"), n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    rows = []
    for task in SYNTHETIC_TASKS:
        samples = open_dataset(folders[task], n_train=None)
        m = embed_dataset(samples, os.path.join(out, "stores", task), sam_type="micro", dataset_spec=folders[task])
        rows.append((task, m["counts"].get("train", 0), m["counts"].get("test", 0), m["_images_embedded_now"], m["_seconds"]))
    print(f"\n{'task':<22}{'train':>6}{'test':>6}{'embedded now':>14}{'img/s':>8}")
    for task, ntr, nte, n, s in rows:
        print(f"{task:<22}{ntr:>6}{nte:>6}{n:>14}{(n / s if n and s else float('nan')):>8.1f}")
    print(f"\n[demo] stores in {out}/stores ({time.time() - t0:.0f}s). Training, evaluation and the report "
          "come with the agent (not built yet).")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="alignsam", description="AlignSAM on Ray: learn where to click so a frozen SAM segments your task.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="whole pipeline on the embedded default (synthetic data, micro-SAM), no downloads")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--n-train", type=int, default=50)
    d.add_argument("--n-test", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    _add_embed(sub)
    for name, what in NOT_BUILT.items():
        sub.add_parser(name, help=f"(not built yet) {what}")
    args, unknown = ap.parse_known_args(argv)
    if args.cmd not in NOT_BUILT and unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd in NOT_BUILT:
        print(f"alignsam {args.cmd}: not built yet — {NOT_BUILT[args.cmd]}.", file=sys.stderr)
        return 2
    from .data import DataError
    from .foundation import CheckpointError
    from .store import StoreError

    try:
        return {"demo": cmd_demo, "embed": cmd_embed}[args.cmd](args)
    except (DataError, CheckpointError, StoreError) as exc:
        print(f"alignsam {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

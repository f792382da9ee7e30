#!/usr/bin/env python
"""Embed throughput (images/s) of `alignsam embed` for the micro-SAM and the vit_b architecture.

    python scripts/bench_embed.py [--n-micro 100] [--n-vit-b 6] --out bench_embed.json

Runs the real pipeline (Ray Data -> encoder actor -> Parquet) on synthetic images in one process,
side by side, and reports images/s measured from the first to the last finished image (Ray start-up
and model load excluded by a warm-up run) plus the ratio. vit_b uses random weights (timing only).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ray
import torch

from alignsam_ray.data import generate_task, open_dataset
from alignsam_ray.store.embed import embed_dataset


def run(samples, sam_type, tmp, batch_size):
    out = os.path.join(tmp, f"store-{sam_type}-{len(samples)}")
    t0 = time.time()
    m = embed_dataset(samples, out, sam_type=sam_type, random_init=sam_type != "micro", shard_size=16,
                      batch_size=batch_size, progress=False)
    return m["_images_embedded_now"], m["_seconds"], time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-micro", type=int, default=100)
    ap.add_argument("--n-vit-b", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_embed_")
    folder = generate_task("synthetic_saliency", os.path.join(tmp, "data"), n_train=max(args.n_micro, args.n_vit_b),
                           n_test=0, seed=123, progress=False)
    samples = open_dataset(folder, n_train=None)
    ray.init(include_dashboard=False, log_to_driver=False)
    run(samples[:2], "micro", tmp, 4)  # warm-up: Ray Data start-up, imports
    results = {}
    for sam_type, n, bs in (("micro", args.n_micro, 8), ("vit_b", args.n_vit_b, 1)):
        n_done, pipeline_s, wall_s = run(samples[:n], sam_type, tmp, bs)
        results[sam_type] = {"images": n_done, "pipeline_s": round(pipeline_s, 2), "images_per_s": round(n_done / pipeline_s, 3)}
    results["micro_over_vit_b"] = round(results["micro"]["images_per_s"] / results["vit_b"]["images_per_s"], 1)
    results["device"] = "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"{'model':<8}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for k in ("micro", "vit_b"):
        r = results[k]
        print(f"{k:<8}{r['images']:>8}{r['pipeline_s']:>10.1f}{r['images_per_s']:>10.3f}")
    print(f"micro / vit_b throughput: {results['micro_over_vit_b']}x on {results['device']}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

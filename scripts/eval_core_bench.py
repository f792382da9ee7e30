#!/usr/bin/env python
"""Evaluation's Ray-free core (``alignsam_ray.eval_shard``) timed on one device, without Ray or a trained run.

    python scripts/eval_core_bench.py make-store --out DIR --images N [--sam micro|vit_h] [--shard-size 32]
    python scripts/eval_core_bench.py run --store DIR [--start A --stop B] [--device auto|cpu|cuda]
                                          [--batch B] [--threads K] [--out result.json]

make-store: a store in the official format (Parquet shards, manifest, decoder.pt) of N test images: the
SAM type's real prompt encoder + mask decoder architecture (vit_h: SAM's, random weights; micro: the
embedded micro-SAM's weights), random fp16 embeddings of its width (vit_h 256 x 64 x 64), images of
mixed sizes (long side 640, short side 480-640) with an ellipse as ground truth. The decoder's cost does not depend on
the embedding's values, so images/s measured on it are those of a real store of that SAM type.
run: the paper's evaluation protocol (every method, the T sweep, T = 15) with a random-weights policy
and SRM (``--override``: other run settings) on the images [start, stop) of the store's test split -> {"images", "seconds", "images_per_s",
"cpu_s_per_image" (this process's CPU time: on a shared machine, the cost a free core would see), "peak_rss_mb",
"device", "batch"} printed as JSON (and written to --out), and the per-image values'
digest (to check that two runs gave the same figures).

Needs torch, numpy, pyarrow, pillow, pyyaml, scipy, py_sod_metrics and segment_anything (no Ray):
``scripts/gpu_check.sh`` runs it on a bare GPU machine; ``scripts/bench.py --only eval_shards eval_memory``
runs it as subprocesses.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

EMBED_DIM = {"micro": None, "vit_h": 256}


def make_store(out: str, images: int, sam: str, shard_size: int, seed: int = 0, long_side: int = 640) -> str:
    """The store described in the module docstring; ``long_side``: the images' long side in pixels (the short
    side 75-100% of it)."""
    from alignsam_ray.foundation.decoder import SamPromptDecoder, build_decoder_parts
    from alignsam_ray.store.shards import (
        encode_png,
        schema,
        shard_name,
        write_decoder,
        write_manifest,
        write_shard,
    )

    if sam == "micro":
        from alignsam_ray.foundation import load_sam

        decoder = SamPromptDecoder.from_sam(load_sam("micro"), "micro")
    else:
        torch.manual_seed(seed)
        decoder = SamPromptDecoder(sam, *build_decoder_parts(sam))  # random weights, SAM's architecture
    E = decoder.embed_dim
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {"format_version": 1, "sam_type": sam, "checkpoint_sha256": "random-init", "embed_dim": E,
                "maps": [], "features": {}, "shards": {}, "complete": False, "tasks": ["bench"]}
    sch = schema(E)
    for f, lo in enumerate(range(0, images, shard_size)):
        rows = []
        for k in range(lo, min(images, lo + shard_size)):
            short = int(rng.integers(long_side * 3 // 4, long_side + 1))
            h, w = (short, long_side) if k % 2 else (long_side, short)
            s = 1024 / max(h, w)
            ih, iw = int(h * s + 0.5), int(w * s + 0.5)
            yy, xx = np.mgrid[:h, :w]
            cy, cx, ry, rx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7), h * 0.25, w * 0.2
            gt = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
            low = np.zeros((256, 256), np.uint8)
            yl, xl = np.mgrid[: int(np.ceil(ih / 4)), : int(np.ceil(iw / 4))]
            low[: yl.shape[0], : yl.shape[1]] = gt[np.minimum((yl * 4 / s).astype(int), h - 1),
                                                   np.minimum((xl * 4 / s).astype(int), w - 1)]
            rows.append({"id": f"test/{k:05d}", "task": "bench", "split": "test", "text": "", "image_path": "",
                         "original_h": h, "original_w": w, "input_h": ih, "input_w": iw,
                         "embedding": rng.standard_normal((E, 64, 64)).astype(np.float16).tobytes(),
                         "gt_lowres": low.tobytes(), "gt_png": encode_png(gt)})
        name = shard_name(f)
        manifest["shards"][name] = {"index": f, "rows": len(rows), "splits": {"test": len(rows)},
                                    "sha256": write_shard(rows, os.path.join(out, name), sch)}
    write_decoder(out, manifest, decoder)
    manifest.update(complete=True, counts={"test": images}, n_images=images)
    write_manifest(out, manifest)
    return out


def random_agent(embed_dim: int, device: torch.device, overrides: tuple = ()):
    from alignsam_ray.agent.policy import PolicyNet
    from alignsam_ray.agent.srm import SRM
    from alignsam_ray.config import load_config
    from alignsam_ray.env.grid import PatchGrid
    from alignsam_ray.eval_shard import EvalAgent

    cfg = load_config(None, ["task=bench", "store=unused", *overrides])  # default: the paper's T = 15, grid, R
    grid = PatchGrid.from_env(cfg.env)
    torch.manual_seed(0)
    srm = SRM(embed_dim, "implicit")
    return EvalAgent(PolicyNet.random(embed_dim, int(cfg.model.width), (grid.rows, grid.cols)), srm, cfg, device)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(store: str, start: int, stop: int | None, device: str, batch: int | None, overrides: tuple = (),
        records: str | None = None) -> dict:
    from alignsam_ray.eval_shard import auto_batch, eval_device, evaluate_shard
    from alignsam_ray.store.loader import EmbeddingStore

    dev = eval_device(device)
    st = EmbeddingStore(store, verify=False)
    agent = random_agent(st.embed_dim, dev, overrides)
    batch = batch or auto_batch(dev)
    decoder = st.decoder().to(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    r = evaluate_shard(agent, st, "test", start, stop, seed=0, batch=batch, decoder=decoder)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    digest = hashlib.sha256(json.dumps([r["ids"], r["rows"]], sort_keys=True).encode()).hexdigest()
    n = len(r["ids"])
    if records:  # the shard's per-image records, for merge_shards
        import pickle

        with open(records, "wb") as f:
            pickle.dump(r, f)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_s_per_image": cpu_seconds / n,
            "peak_rss_mb": peak_rss_mb(),
            "device": str(dev), "batch": batch, "threads": torch.get_num_threads(), "start": start,
            "stop": r["stop"], "rows_sha256": digest,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-store")
    m.add_argument("--out", required=True)
    m.add_argument("--images", type=int, required=True)
    m.add_argument("--sam", choices=sorted(EMBED_DIM), default="micro")
    m.add_argument("--shard-size", type=int, default=32)
    r = sub.add_parser("run")
    r.add_argument("--store", required=True)
    r.add_argument("--start", type=int, default=0)
    r.add_argument("--stop", type=int, default=None)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--batch", type=int, default=None)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    r.add_argument("--out", help="JSON file to write")
    r.add_argument("--records", help="pickle the shard's per-image records here (for merge_shards)")
    r.add_argument("--override", nargs="*", default=[], help="run-config overrides, e.g. env.horizon=1 env.grid=2")
    args = ap.parse_args()
    if args.cmd == "make-store":
        if os.path.isfile(os.path.join(args.out, "manifest.json")):
            print(f"{args.out}: exists")
            return
        make_store(args.out, args.images, args.sam, args.shard_size)
        print(f"wrote {args.out} ({args.images} test images, {args.sam})")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.store, args.start, args.stop, args.device, args.batch, tuple(args.override), args.records)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

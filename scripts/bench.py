#!/usr/bin/env python
"""Performance benchmarks of the rollout fast path (issue 6), measured side by side in one run.

    python scripts/bench.py [--only NAME ...] --out results/bench.json [--work /tmp/alignsam_bench]

NAME (JSON key it writes):
  reencode       (reencode_speedup)       env steps/s on precomputed embeddings vs the paper's literal
                                          loop that re-runs the image encoder every step (vit_b
                                          architecture, random weights; same decoder, same threads)
  env_overhead   (env_overhead_fraction)  share of an env step spent outside its SAM decoder call
                                          (AlignSamEnv, 1 torch thread as in an EnvRunner)
  runner_scaling (runner_scaling_2v1)     RLlib EnvRunner sampling, env steps/s with 2 runners vs 1
  uss            (uss_growth_mb_100_to_1000)  an EnvRunner's private memory (USS) with a 1000-image
                                          store minus that with a 100-image store (zero-copy reads)
  decoder_batch  (decoder_batch_steps_per_s)  env steps/s with k = 1, 4, 8 slots per vector env
                                          (one batched decoder call per vector step), in-process and
                                          inside one RLlib EnvRunner
  kernels        (kernels_ratio)          the learner's trunk step fp32 vs channels-last vs bf16, the
                                          SRM step fp32 vs bf16, the decoder with segment_anything's
                                          attention vs the fused one (max logit difference)
  demo           (demo_wall_s)            wall time of `alignsam demo` in a fresh folder (what
                                          `bash scripts/demo.sh` runs) and its phases (synthesis,
                                          embedding, training: sampling / learner / SRM, evaluation)

  segment        (segment_ray_vs_loop)    images/s of `alignsam segment --ray` (Ray Data: encoder and
                                          prompting actor pools, masks written by the workers, startup
                                          included) vs the single-process loop of `alignsam segment`
                                          (AlignSAMPredictor.predict_batch, batch 4), same images and bundle

  encoders       (encoder_s_per_image)    seconds per image of each SAM image encoder on this machine,
                                          side by side (random weights, one 1024-long-side image,
                                          batch 1): vit_b, the four SAM 2.1 Hiera sizes and SAM 3 (+ ratio
                                          to vit_b), and sam3_text (SAM 3 from image + text, per image);
                                          --encoders picks them

  store_bytes    (store_bytes_per_image)  a store's bytes per image on disk (Parquet shards) and in the
                                          object store (the published arrays: what EnvRunners map
                                          zero-copy), micro-SAM vs vit_b vs SAM 2.1 Hiera-T vs SAM 3
                                          (random weights; --store-sams picks them)

  eval_shards    (eval_shards_2v1)        evaluation images/s (the paper's protocol: every method and the T
                                          sweep, scripts/eval_core_bench.py) with 2 shards side by side vs 1
                                          shard, each a 1-thread process as a 1-CPU Ray task is; and whether
                                          the merged metrics are identical (eval_shards_identical)
  eval_memory    (eval_memory_growth_mb)  peak memory (VmHWM) of evaluating a --eval-mem-sizes (100, 1000)
                                          image test split minus that of the smaller one (streamed reads)

Everything runs on the embedded default (micro-SAM + synthetic saliency) unless stated. Data and
stores are cached in --work (embedding is resumable), so a rerun only measures. Prints one table
per benchmark and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from alignsam_ray.sam_types import SAM2_TYPES, SAM3_TYPES

BENCHES = ("reencode", "env_overhead", "runner_scaling", "uss", "decoder_batch", "kernels", "demo", "segment",
           "encoders", "store_bytes", "eval_shards", "eval_memory")


# ---------------------------------------------------------------------------------------- helpers
def table(title: str, header: tuple, rows: list) -> None:
    print(f"\n## {title}")
    print(" | ".join(f"{h:>14}" for h in header))
    for r in rows:
        print(" | ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}" for v in r))


def store_of(work: str, n: int, sam_type: str = "micro") -> str:
    """A synthetic-saliency store of ``n`` training images (cached in ``work``)."""
    from alignsam_ray.data import generate_task, open_dataset
    from alignsam_ray.store.embed import embed_dataset

    data = os.path.join(work, f"data_{n}")
    if not os.path.isfile(os.path.join(data, ".complete")):
        shutil.rmtree(data, ignore_errors=True)
        generate_task("synthetic_saliency", data, n_train=n, n_test=0, seed=7, progress=False)
        open(os.path.join(data, ".complete"), "w").close()
    out = os.path.join(work, f"store_{sam_type}_{n}")
    embed_dataset(open_dataset(data, n_train=None), out, sam_type=sam_type, random_init=sam_type != "micro",
                  shard_size=64 if sam_type == "micro" else 2, batch_size=8 if sam_type == "micro" else 1,
                  progress=False)
    return out


class DecodeTimer:
    """Wraps a SamPromptDecoder's ``decode``: counts calls and the seconds spent in them."""

    def __init__(self, decoder):
        self.decoder, self.inner = decoder, decoder.decode
        self.calls, self.seconds = 0, 0.0
        decoder.decode = self

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = self.inner(*a, **k)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def reset(self):
        self.calls, self.seconds = 0, 0.0


def random_legal(mask: np.ndarray, rng) -> np.ndarray:
    """One random allowed action per row of an (n, N) action mask."""
    return np.array([rng.choice(np.flatnonzero(m)) for m in np.atleast_2d(mask)])


def step_env(env, steps: int, rng) -> tuple[int, float, DecodeTimer]:
    """Run at least ``steps`` env steps (random legal actions), timing only the step() calls.

    Works for ``AlignSamEnv`` and ``AlignSamVectorEnv`` (counting only the slots that advanced;
    a vector env resets finished slots inside step(), as RLlib sees it). A single env's reset()
    is outside the timing, its decoder call too."""
    from alignsam_ray.env import AlignSamVectorEnv

    vector = isinstance(env, AlignSamVectorEnv)
    timer = DecodeTimer(env.episodes.decoder)
    obs, _ = env.reset(seed=0)
    timer.reset()
    spent, done_steps = 0.0, 0
    while done_steps < steps:
        a = random_legal(obs["action_mask"], rng)
        t0 = time.perf_counter()
        obs, _, term, _, info = env.step(a if vector else int(a[0]))
        spent += time.perf_counter() - t0
        done_steps += int(info["_hit"].sum()) if vector else 1
        if not vector and term:
            calls, secs = timer.calls, timer.seconds
            obs, _ = env.reset()
            timer.calls, timer.seconds = calls, secs
    return done_steps, spent, timer


def uss_mb(pid: int) -> float:
    """Unique set size (private pages) of a process, from /proc/PID/smaps_rollup."""
    kb = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
    return kb / 1024


def _runner_episodes(runner):
    from alignsam_ray.env import iter_prompt_episodes

    return iter_prompt_episodes(runner.env)[0]


def run_config(store: str, **overrides) -> dict:
    from alignsam_ray.config import load_config

    o = {"task": "bench", "store": store, "run_dir": "/tmp/alignsam_bench_run", **overrides}
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def build_algo(cfg: dict):
    from alignsam_ray.store.loader import EmbeddingStore, publish_store
    from alignsam_ray.train import build_ppo_config, init_ray

    init_ray()
    return build_ppo_config(cfg, embed_dim=EmbeddingStore(cfg.store, verify=False).embed_dim,
                            store_actor=publish_store(cfg.store, "train")).build_algo()


def runner_sample(algo, steps_per_runner: int) -> tuple[int, float]:
    """All remote EnvRunners sample ``steps_per_runner`` env steps at once; (steps, seconds)."""
    t0 = time.perf_counter()
    counts = algo.env_runner_group.foreach_env_runner(
        lambda r: sum(len(e) for e in r.sample(num_timesteps=steps_per_runner)), local_env_runner=False)
    return int(sum(counts)), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- benches
def bench_reencode(work: str, args) -> dict:
    """Literal loop (encode + decode every step) vs precomputed embeddings (decode only), vit_b."""
    from alignsam_ray.data import open_dataset
    from alignsam_ray.data.samples import load_image
    from alignsam_ray.env import AlignSamEnv
    from alignsam_ray.foundation.encoder import SamImageEncoder
    from alignsam_ray.foundation.sam_models import load_sam

    store = store_of(work, 2, "vit_b")
    image = load_image(open_dataset(os.path.join(work, "data_2"), n_train=None)[0])
    encoder = SamImageEncoder(load_sam("vit_b", random_init=True))
    env = AlignSamEnv({"store": store, "labels": "gt", "init": "gt", "seed": 0})
    env.reset(seed=0, options={"image": 0})
    rng = np.random.default_rng(0)
    # fast path: the store's embedding, decoder only
    n_fast, fast_s, _ = step_env(env, args.fast_steps, rng)
    # literal loop: re-encode the image before every step, write it where the env reads it
    emb = env.episodes.data["embeddings"]
    emb = emb if emb.flags.writeable else emb.copy()
    env.episodes.data = {**env.episodes.data, "embeddings": emb}
    obs, _ = env.reset(seed=0, options={"image": 0})
    t0 = time.perf_counter()
    for _ in range(args.literal_steps):
        emb[0] = encoder.embed(image)
        obs, _, term, _, _ = env.step(int(random_legal(obs["action_mask"], rng)[0]))
        if term:
            obs, _ = env.reset(options={"image": 0})
    literal_s = time.perf_counter() - t0
    fast, literal = n_fast / fast_s, args.literal_steps / literal_s
    table("re-encode every step vs precomputed embeddings (vit_b, random weights, "
          f"{torch.get_num_threads()} torch threads)", ("path", "steps", "seconds", "steps/s"),
          [("literal loop", args.literal_steps, literal_s, literal), ("precomputed", n_fast, fast_s, fast)])
    print(f"speed-up: {fast / literal:.0f}x")
    return {"reencode_speedup": fast / literal,
            "reencode": {"literal_steps_per_s": literal, "precomputed_steps_per_s": fast,
                         "literal_steps": args.literal_steps, "precomputed_steps": n_fast,
                         "torch_threads": torch.get_num_threads()}}


def bench_env_overhead(work: str, args) -> dict:
    from alignsam_ray.env import AlignSamEnv

    rows, out = [], {}
    stores = [("micro", store_of(work, 100))]
    if not args.skip_vit_b:
        stores.append(("vit_b", store_of(work, 2, "vit_b")))
    for name, store in stores:
        env = AlignSamEnv({"store": store, "seed": 0, "torch_threads": 1})
        step_env(env, 30, np.random.default_rng(1))  # warm-up
        n, spent, timer = step_env(env, args.fast_steps, np.random.default_rng(0))
        frac = 1.0 - timer.seconds / spent
        rows.append((name, n, spent / n * 1e3, timer.seconds / timer.calls * 1e3, frac))
        out[name] = {"step_ms": spent / n * 1e3, "decoder_ms": timer.seconds / timer.calls * 1e3,
                     "overhead_fraction": frac, "decoder_calls_per_step": timer.calls / n}
    torch.set_num_threads(os.cpu_count())
    table("env step vs its decoder call (AlignSamEnv, 1 torch thread)",
          ("SAM", "steps", "step ms", "decoder ms", "overhead"), rows)
    return {"env_overhead_fraction": out["micro"]["overhead_fraction"], "env_overhead": out}


def bench_runner_scaling(work: str, args) -> dict:
    import ray

    store = store_of(work, 100)
    rows, rate = [], {}
    for n in (1, 2):
        algo = build_algo(run_config(store, **{"resources.num_env_runners": n}))
        runner_sample(algo, 150)  # warm-up: env construction, first forward passes
        steps, secs = runner_sample(algo, args.runner_steps)
        rate[n] = steps / secs
        rows.append((n, steps, secs, rate[n], rate[n] / n))
        algo.stop()
    ray.shutdown()
    table("RLlib sampling: EnvRunners side by side (1 torch thread each)",
          ("runners", "steps", "seconds", "steps/s", "per runner"), rows)
    print(f"2 vs 1: {rate[2] / rate[1]:.2f}x")
    return {"runner_scaling_2v1": rate[2] / rate[1], "runner_steps_per_s": {str(k): v for k, v in rate.items()}}


def _runner_uss_mb(runner) -> float:
    """Inside an EnvRunner: free what the allocator holds, then read this process's USS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return uss_mb(os.getpid())


def _runner_touch_all(runner) -> int:
    """Inside an EnvRunner: read every byte of the store's arrays (all images, not only those sampled)."""
    data = _runner_episodes(runner).data
    for key in [k for k, v in data.items() if getattr(v, "ndim", 0) > 1]:  # embeddings, gt, maps, SAM 2 features
        arr = data[key]
        for i in range(0, len(arr), 64):
            float(np.asarray(arr[i:i + 64]).astype(np.float32).sum())
    return len(data["ids"])


def bench_uss(work: str, args) -> dict:
    import ray

    rows, uss = [], {}
    small, large = args.uss_sizes
    for n in (small, large):
        store = store_of(work, n, args.uss_sam)
        algo = build_algo(run_config(store, **{"resources.num_env_runners": 1}))
        images = algo.env_runner_group.foreach_env_runner(_runner_touch_all, local_env_runner=False)[0]
        readings = []
        for _ in range(3):  # sample (touching images), then measure; the smallest reading counts
            runner_sample(algo, args.runner_steps)
            readings.append(algo.env_runner_group.foreach_env_runner(_runner_uss_mb, local_env_runner=False)[0])
        uss[n] = min(readings)
        rows.append((n, images, uss[n], max(readings) - min(readings)))
        algo.stop()
        ray.shutdown()
    from alignsam_ray.store.loader import EmbeddingStore

    arrays = EmbeddingStore(store_of(work, large, args.uss_sam)).arrays()
    per_image_mb = sum(a.nbytes for a in arrays.values()) / len(arrays["ids"]) / 2**20
    copy_mb = (large - small) * per_image_mb
    table(f"EnvRunner private memory (USS, after gc + malloc_trim) vs store size ({args.uss_sam})",
          ("store images", "read by runner", "USS MB", "spread MB"), rows)
    growth = uss[large] - uss[small]
    print(f"growth {small} -> {large} images: {growth:.1f} MB (a copy of the {large - small} more images' arrays "
          f"would be {copy_mb:.0f} MB)")
    key = "" if args.uss_sam == "micro" else f"_{args.uss_sam}"
    return {f"uss_growth_mb_{small}_to_{large}{key}": growth, f"uss_mb{key}": {str(k): v for k, v in uss.items()},
            f"store_copy_mb_{small}_to_{large}{key}": copy_mb}


def bench_decoder_batch(work: str, args) -> dict:
    import ray

    from alignsam_ray.env import AlignSamVectorEnv

    store = store_of(work, 100)
    rows, env_rate, rllib_rate = [], {}, {}
    for k in (1, 4, 8):
        env = AlignSamVectorEnv({"store": store, "seed": 0, "torch_threads": 1}, num_envs=k)
        step_env(env, 8 * k, np.random.default_rng(1))
        n, spent, timer = step_env(env, args.fast_steps * 2, np.random.default_rng(0))
        env_rate[k] = n / spent
        calls_per_vector_step = timer.calls / (n / k)
        algo = build_algo(run_config(store, **{"resources.num_env_runners": 1,
                                               "resources.num_envs_per_env_runner": k}))
        runner_sample(algo, 150)
        steps, secs = runner_sample(algo, args.runner_steps)
        rllib_rate[k] = steps / secs
        algo.stop()
        rows.append((k, env_rate[k], calls_per_vector_step, rllib_rate[k]))
    ray.shutdown()
    torch.set_num_threads(os.cpu_count())
    table("batched decoding: k slots per vector env (micro-SAM, 1 torch thread)",
          ("k", "env steps/s", "decodes/vstep", "RLlib steps/s"), rows)
    best = max(rllib_rate, key=rllib_rate.get)
    print(f"fastest in an EnvRunner: k = {best}")
    return {"decoder_batch_steps_per_s": {str(k): v for k, v in rllib_rate.items()},
            "decoder_batch_env_only_steps_per_s": {str(k): v for k, v in env_rate.items()}, "decoder_batch_best_k": best}


def _ms_per_call(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def bench_kernels(work: str, args) -> dict:
    """The three hot loops of a demo iteration, each variant side by side in this process (2 threads
    for the learner and SRM, as in the driver; 1 for the decoder, as in an EnvRunner): one PPO
    minibatch step of the policy trunk (150 micro-SAM states 64 x 16 x 16, forward + backward + Adam),
    one SRM minibatch step (explicit branch, 64 states), one batched decoder call (k = 4, 8 points)."""
    from segment_anything.modeling.transformer import Attention
    from torch import nn

    from alignsam_ray.agent.srm import SRM, srm_loss
    from alignsam_ray.foundation import load_sam
    from alignsam_ray.foundation.decoder import SamPromptDecoder

    torch.manual_seed(0)
    torch.set_num_threads(2)

    def trunk_step(channels_last: bool, bf16: bool):
        net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 1, 1))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net.to(memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        x = torch.randn(150, 64, 16, 16).contiguous(memory_format=fmt)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = net(x).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def srm_step(bf16: bool):
        srm = SRM(64, "explicit")
        opt = torch.optim.Adam(srm.parameters(), 1e-4)
        s_t, s_c, target = torch.randn(64, 64, 16, 16), torch.randn(64, 64, 16, 16), torch.rand(64, 16, 16)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = srm(s_t, s_c)
            loss = srm_loss(logits.float(), target)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    rows, out = [], {}
    for name, fn in (("trunk fp32", trunk_step(False, False)), ("trunk fp32 channels-last", trunk_step(True, False)),
                     ("trunk bf16 channels-last", trunk_step(True, True)), ("SRM fp32", srm_step(False)),
                     ("SRM bf16", srm_step(True))):
        out[name] = _ms_per_call(fn, 15)
    torch.set_num_threads(1)
    decoder = SamPromptDecoder.from_sam(load_sam("micro"), "micro")
    emb = torch.randn(4, decoder.embed_dim, 64, 64)
    coords, labels = torch.rand(4, 8, 2) * 1024, torch.randint(0, 2, (4, 8))
    with torch.inference_mode():
        out["decoder fused attention"] = _ms_per_call(lambda: decoder.decode(emb, coords, labels), 20)
        fused = decoder.decode(emb, coords, labels)[0]
        for module in decoder.mask_decoder.transformer.modules():  # segment_anything's own forward again
            if isinstance(module, Attention):
                del module.forward
        out["decoder segment_anything attention"] = _ms_per_call(lambda: decoder.decode(emb, coords, labels), 20)
        diff = (decoder.decode(emb, coords, labels)[0] - fused).abs().max().item()
    torch.set_num_threads(os.cpu_count())
    pairs = (("trunk fp32", "trunk fp32 channels-last"), ("trunk fp32", "trunk bf16 channels-last"),
             ("SRM fp32", "SRM bf16"), ("decoder segment_anything attention", "decoder fused attention"))
    rows = [(a, out[a], b, out[b], out[a] / out[b]) for a, b in pairs]
    table("hot loops, ms per call (ratio = first / second)", ("first", "ms", "second", "ms", "ratio"), rows)
    print(f"decoder logits, fused - segment_anything attention: max |diff| {diff:.1e}")
    return {"kernels_ms": out, "kernels_ratio": {f"{a} / {b}": out[a] / out[b] for a, b in pairs},
            "decoder_fused_max_abs_diff": diff}


def bench_demo(work: str, args) -> dict:
    """`alignsam demo` in a fresh folder (what `bash scripts/demo.sh` runs after install), with the demo's own
    per-phase seconds (its timing.json)."""
    out = os.path.join(work, "demo")
    shutil.rmtree(out, ignore_errors=True)
    exe = os.path.join(os.path.dirname(sys.executable), "alignsam")
    t0 = time.perf_counter()
    subprocess.run([exe, "demo", "--out", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "timing.json")) as f:
        phases = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    table("alignsam demo, fresh folder", ("phase", "seconds"), [("wall (this process)", wall)] + list(phases.items()))
    return {"demo_wall_s": wall, "demo_phases_s": phases, "demo_report_md": report}


def bench_segment(work: str, args) -> dict:
    """Batch inference: the Ray Data pipeline against the single-process loop on the same images."""
    import glob

    import ray
    from PIL import Image

    from alignsam_ray.batch_segment import segment_collection
    from alignsam_ray.export import export_bundle
    from alignsam_ray.predictor import AlignSAMPredictor
    from alignsam_ray.train import train

    store = store_of(work, args.segment_images)
    bundle = os.path.join(work, "segment_bundle")
    if not os.path.isfile(os.path.join(bundle, "manifest.json")):
        cfg = run_config(store, **{"run_dir": os.path.join(work, "segment_run"), "train.iterations": 1,
                                   "ppo.train_batch_size": 60, "ppo.minibatch_size": 30,
                                   "resources.num_env_runners": 1})
        export_bundle(train(cfg, progress=False)["checkpoint"], bundle)
        ray.shutdown()
    images = sorted(glob.glob(os.path.join(work, f"data_{args.segment_images}", "train", "images", "*")))
    t0 = time.perf_counter()
    predictor = AlignSAMPredictor(bundle)
    out = os.path.join(work, "segment_loop")
    os.makedirs(out, exist_ok=True)
    for start in range(0, len(images), 4):  # what `alignsam segment IMAGE...` does
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in images[start:start + 4]]
        for path, pred in zip(images[start:start + 4], predictor.predict_batch(batch)):
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(
                os.path.join(out, os.path.basename(path)[:-4] + "_mask.png"))
    loop_s = time.perf_counter() - t0
    out_ray = os.path.join(work, "segment_ray")
    shutil.rmtree(out_ray, ignore_errors=True)
    t0 = time.perf_counter()
    stats = segment_collection(os.path.dirname(images[0]), bundle, out_ray, progress=False)
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    n = len(images)
    assert stats["done"] == n
    rows = [("single-process loop (alignsam segment)", n / loop_s, loop_s),
            ("Ray Data pipeline (alignsam segment --ray), startup included", n / ray_s, ray_s)]
    table(f"batch segmentation, {n} images, micro-SAM bundle", ("pipeline", "images/s", "seconds"), rows)
    return {"segment_ray_vs_loop": (n / ray_s) / (n / loop_s), "segment_images_per_s": {"loop": n / loop_s,
            "ray": n / ray_s}, "segment_n_images": n}


def bench_encoders(work: str, args) -> dict:
    """SAM 1 vit_b vs SAM 2.1 Hiera-T/S/B+/L vs SAM 3 image encoders (``--encoders``), seconds per image,
    interleaved repetitions; with sam3 also ``sam3_text``: SAM 3's text concept prediction of one image (its
    whole image path: encoder, text encoder, detector), the evaluation method's cost per image."""
    from alignsam_ray.foundation import SamImageEncoder, load_sam
    from alignsam_ray.foundation.sam2_models import Sam2ImageEncoder, load_sam2

    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    encoders = {}
    for name in args.encoders:
        if name == "vit_b":
            encoders[name] = SamImageEncoder(load_sam("vit_b", random_init=True))
        elif name == "sam3":
            from alignsam_ray.foundation.sam3_models import Sam3ImageEncoder, load_sam3, text_masks

            t0 = time.perf_counter()
            encoders[name] = Sam3ImageEncoder(load_sam3("sam3", None, random_init=True))
            print(f"[bench] SAM 3 built in {time.perf_counter() - t0:.0f}s", flush=True)
        else:
            encoders[name] = Sam2ImageEncoder(load_sam2(name, None, random_init=True))
    calls = {name: (lambda e=e: e.encode([e.resize(image)])) if name == "vit_b" else (lambda e=e: e.encode([image]))
             for name, e in encoders.items()}
    if "sam3" in encoders:
        calls["sam3_text"] = lambda m=encoders["sam3"].model: text_masks(m, [image], "shadow")
    times: dict = {name: [] for name in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(args.encoder_reps):  # interleaved: the machine's noise hits every encoder alike
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    per = {name: float(np.median(v)) for name, v in times.items()}
    base = per.get("vit_b", float("nan"))
    table(f"image encoder, seconds per image (median of {args.encoder_reps}, torch threads {torch.get_num_threads()})",
          ("encoder", "s/image", "vit_b / this"), [(n, s, base / s) for n, s in per.items()])
    return {"encoder_s_per_image": per, "encoder_speedup_vs_vit_b": {n: base / s for n, s in per.items()}}


def bench_store_bytes(work: str, args) -> dict:
    """Bytes per image of a store: Parquet on disk, and the arrays `publish_store` puts in the object store."""
    import ray

    from alignsam_ray.data import generate_task, open_dataset
    from alignsam_ray.store.embed import embed_dataset
    from alignsam_ray.store.loader import EmbeddingStore

    folder = generate_task("synthetic_shadow", os.path.join(work, "bytes_data"), n_train=4, n_test=0, seed=3,
                           progress=False)
    rows, out = [], {}
    for sam in args.store_sams:
        store = os.path.join(work, f"bytes_store_{sam}")
        m = embed_dataset(open_dataset(folder, n_train=None), store, sam_type=sam, random_init=sam != "micro",
                          progress=False)
        n = m["n_images"]
        disk = sum(os.path.getsize(os.path.join(store, name)) for name in m["shards"]) / n
        arrays = EmbeddingStore(store).arrays()
        memory = sum(a.nbytes for a in arrays.values()) / n
        out[sam] = {"disk": disk, "object_store": memory}
        rows.append((sam, disk / 2**20, memory / 2**20))
    ray.shutdown()
    table("store bytes per image (MiB)", ("SAM", "Parquet on disk", "object store (published arrays)"), rows)
    return {"store_bytes_per_image": out}


def _eval_store(work: str, n: int) -> str:
    out = os.path.join(work, f"eval_store_micro_{n}")
    subprocess.run([sys.executable, EVAL_CORE, "make-store", "--out", out, "--images", str(n)], check=True)
    return out


EVAL_CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_core_bench.py")


def _eval_procs(store: str, bounds: list, work: str, overrides: list) -> tuple[float, list]:
    """Run one eval_core_bench.py process per (start, stop) at once, 1 torch thread each -> (wall s, results)."""
    procs, files = [], []
    t0 = time.perf_counter()
    for k, (a, b) in enumerate(bounds):
        out, rec = os.path.join(work, f"eval_{len(bounds)}_{k}.json"), os.path.join(work, f"eval_{len(bounds)}_{k}.pkl")
        cmd = [sys.executable, EVAL_CORE, "run", "--store", store, "--start", str(a), "--stop", str(b), "--device", "cpu",
               "--threads", "1", "--out", out, "--records", rec] + (["--override", *overrides] if overrides else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        files.append((out, rec))
    for p in procs:
        if p.wait():
            raise RuntimeError(f"eval_core_bench.py failed ({p.args})")
    wall = time.perf_counter() - t0
    import pickle

    results = []
    for out, rec in files:
        with open(out) as f, open(rec, "rb") as g:
            results.append((json.load(f), pickle.load(g)))
    return wall, results


def bench_eval_shards(work: str, args) -> dict:
    from alignsam_ray.config import load_config
    from alignsam_ray.env.grid import PatchGrid
    from alignsam_ray.eval_shard import merge_shards, shard_bounds

    n = args.eval_images
    store = _eval_store(work, n)
    cfg = load_config(None, ["task=bench", "store=unused", *args.eval_override])
    grid = PatchGrid.from_env(cfg.env)
    rows, rate, core, merged = [], {}, {}, {}
    for k in (1, 2):
        wall, results = _eval_procs(store, shard_bounds(n, k), work, args.eval_override)
        rate[k] = n / wall  # process start (imports, store, decoder) included, as a Ray task pays it
        core[k] = n / max(j["seconds"] for j, _ in results)  # the evaluation alone (slowest shard)
        merged[k] = json.dumps(merge_shards([r for _, r in results], cfg, grid)[0], sort_keys=True)
        rows.append((k, n, wall, rate[k], core[k], max(j["peak_rss_mb"] for j, _ in results)))
    table(f"evaluation, 1 vs 2 shards (1-thread processes, micro-SAM store, {os.cpu_count()} cores)",
          ("shards", "images", "wall s", "images/s", "core images/s", "peak MB/shard"), rows)
    same = merged[1] == merged[2]
    print(f"2 shards / 1 shard: {rate[2] / rate[1]:.2f}x with process start, {core[2] / core[1]:.2f}x the evaluation "
          f"alone; merged metrics identical: {same}")
    return {"eval_shards_2v1": rate[2] / rate[1], "eval_images_per_s": {str(k): v for k, v in rate.items()},
            "eval_shards_2v1_core": core[2] / core[1], "eval_core_images_per_s": {str(k): v for k, v in core.items()},
            "eval_shards_identical": same, "eval_shards_images": n, "eval_overrides": list(args.eval_override)}


def bench_eval_memory(work: str, args) -> dict:
    small, large = args.eval_mem_sizes
    rows, peak = [], {}
    for n in (small, large):
        wall, results = _eval_procs(_eval_store(work, n), [(0, n)], work, args.eval_override)
        peak[n] = results[0][0]["peak_rss_mb"]
        rows.append((n, wall, peak[n]))
    table("evaluation peak memory (VmHWM of the process) vs test split size (micro-SAM store, 1 shard)",
          ("test images", "wall s", "peak MB"), rows)
    growth = peak[large] - peak[small]
    print(f"growth {small} -> {large} images: {growth:.1f} MB")
    return {"eval_memory_growth_mb": growth, "eval_memory_peak_mb": {str(k): v for k, v in peak.items()},
            "eval_memory_overrides": list(args.eval_override)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=BENCHES, help="run only these")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--work", default="/tmp/alignsam_bench", help="cache of synthetic data and stores")
    ap.add_argument("--fast-steps", type=int, default=300, help="env steps per fast-path measurement")
    ap.add_argument("--literal-steps", type=int, default=3, help="steps of the re-encoding loop (vit_b: ~16 s each)")
    ap.add_argument("--runner-steps", type=int, default=600, help="env steps per EnvRunner per measurement")
    ap.add_argument("--skip-vit-b", action="store_true", help="env_overhead on the micro-SAM only")
    ap.add_argument("--segment-images", type=int, default=100, help="images of the segment benchmark")
    ap.add_argument("--encoder-reps", type=int, default=3, help="timed repetitions per encoder")
    ap.add_argument("--encoders", nargs="+", default=["vit_b", *SAM2_TYPES, *SAM3_TYPES],
                    help="the encoders benchmark's SAMs (sam3: the [sam3] extra; docs/store.md)")
    ap.add_argument("--store-sams", nargs="+", default=["micro", "vit_b", "sam2.1_hiera_t", *SAM3_TYPES],
                    help="the store_bytes benchmark's SAMs")
    ap.add_argument("--uss-sam", default="micro", help="SAM of the uss benchmark's stores (e.g. sam2.1_hiera_t)")
    ap.add_argument("--uss-sizes", type=int, nargs=2, default=(100, 1000), help="the uss benchmark's two store sizes")
    ap.add_argument("--eval-images", type=int, default=64, help="test images of the eval_shards benchmark")
    ap.add_argument("--eval-mem-sizes", type=int, nargs=2, default=(100, 1000), help="eval_memory's two split sizes")
    ap.add_argument("--eval-override", nargs="*", default=[], help="run-config overrides of the eval benchmarks' "
                    "random-weights agent (default: the paper's T = 15 and grid), e.g. env.grid=2 env.horizon=1")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    command = " ".join(["python", "scripts/bench.py"] + sys.argv[1:])
    result = {"device": "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()}", "commands": [command]}
    if os.path.isfile(args.out) and args.only:  # --only updates an existing result file
        with open(args.out) as f:
            old = json.load(f)
        result = {**old, **result, "commands": old.get("commands", []) + [command]}
    for name in args.only or BENCHES:
        t0 = time.time()
        result.update(globals()[f"bench_{name}"](args.work, args))
        print(f"[bench] {name} took {time.time() - t0:.0f}s", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

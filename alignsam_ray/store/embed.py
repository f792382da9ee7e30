"""``alignsam embed``: images -> SAM embeddings, once, as resumable Parquet shards.

A Ray Data pipeline:  from_items(samples) -> map(load + resize + ground truth)
-> map_batches(SamEncoderActor, actor pool, GPU when present) -> the driver writes each shard
atomically with pyarrow as soon as its rows are in and records its sha256 in the manifest.
A rerun skips finished shards; a killed run loses at most the shards in flight.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import ray
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from tqdm import tqdm

from ..data import DataError, Sample, load_pair
from ..data.samples import read_image
from ..folder_lock import folder_lock
from ..foundation import SamImageEncoder, SamPromptDecoder, file_sha256, load_sam, pick_device
from ..foundation.sam2_models import FEATURE_SHAPES, is_sam2, square_frame
from ..foundation.sam3_models import FEATURE_SHAPES as SAM3_FEATURE_SHAPES
from ..foundation.sam3_models import is_sam3
from ..foundation.sam_models import default_checkpoint
from ..ray_session import init_ray, native_to_log
from .shards import (
    DECODER_FILE,
    FORMAT_VERSION,
    GRID,
    LOWRES,
    StoreError,
    encode_png,
    read_manifest,
    schema,
    shard_name,
    write_decoder,
    write_manifest,
    write_shard,
)

IMAGE_SIZE = 1024
SAM2_FEATURES = {k: v for k, v in FEATURE_SHAPES.items() if k != "image_embed"}  # stored beside the embedding
SAM3_FEATURES = {k: v for k, v in SAM3_FEATURE_SHAPES.items() if k != "image_embed"}


def lowres_mask(mask: np.ndarray, input_hw: tuple[int, int], frame: int = IMAGE_SIZE, lowres: int = LOWRES) -> np.ndarray:
    """(H, W) uint8 {0,1,255} -> (lowres, lowres) uint8 in SAM's padded low-res frame: the mask resized to
    ``input_hw`` (nearest), padded to ``frame``, read at each low-res pixel's centre (SAM 3: 1008 -> 288)."""
    h, w = input_hw
    resized = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    padded = np.zeros((frame, frame), np.uint8)
    padded[:h, :w] = resized
    at = ((np.arange(lowres) + 0.5) * frame / lowres).astype(int)  # SAM 1: 2, 6, 10, ... (step 4)
    return np.ascontiguousarray(padded[np.ix_(at, at)])


def _load_row(item: dict) -> dict:
    """Ray Data map: read + resize one image; errors become rows (the driver decides)."""
    sample = Sample(**item["sample"])
    base = {"order": item["order"], "shard": item["shard"], "id": sample.id, "image_path": sample.image_path,
            "error": ""}
    try:
        image, mask = load_pair(sample)
    except DataError as exc:  # same columns as a good row, so batches keep one schema
        lowres = item.get("lowres", LOWRES)
        return {**base, "error": str(exc), "frame": np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                "input_h": 0, "input_w": 0, "original_h": 0, "original_w": 0,
                "gt_lowres": np.zeros((lowres, lowres), np.uint8), "gt_png": b""}
    if item.get("square"):  # SAM 2.1's frame: the whole image resized to 1024 x 1024 (no padding; SAM 3: 1008,
        # low-res 288); the encoder re-reads the original (its own transforms resize it), CLIP sees this frame
        side, lowres = item.get("frame_size", IMAGE_SIZE), item.get("lowres", LOWRES)
        frame = square_frame(image, IMAGE_SIZE)
        return {**base, "frame": frame, "input_h": side, "input_w": side, "original_h": image.shape[0],
                "original_w": image.shape[1], "gt_lowres": lowres_mask(mask, (side, side), side, lowres),
                "gt_png": encode_png(mask)}
    resized = ResizeLongestSide(IMAGE_SIZE).apply_image(image)
    h, w = resized.shape[:2]
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    frame[:h, :w] = resized
    return {
        **base, "frame": frame, "input_h": h, "input_w": w,
        "original_h": image.shape[0], "original_w": image.shape[1],
        "gt_lowres": lowres_mask(mask, (h, w)), "gt_png": encode_png(mask),
    }


def map_name(text: str) -> str:
    """A text prompt -> its store column suffix: "defocus background" -> "defocus_background"."""
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name:
        raise DataError(f"text prompt {text!r} has no letters or digits to name its map column")
    return name


class SamEncoderActor:
    """Ray Data actor: holds the SAM image encoder (and CLIP Surgery when maps are asked for);
    batch of padded frames -> fp16 embeddings (+ one (64, 64) fp16 map per text prompt)."""

    def __init__(self, sam_type: str, checkpoint: str | None, random_init: bool, clip: dict | None = None):
        device = pick_device()
        if device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # this node's cores (the actor runs alone here)
        self.sam2 = is_sam2(sam_type) or is_sam3(sam_type)  # both: their own transforms, high-res features
        self.features = SAM3_FEATURES if is_sam3(sam_type) else SAM2_FEATURES if self.sam2 else {}
        if is_sam3(sam_type):
            from ..foundation.sam3_models import Sam3ImageEncoder, load_sam3

            self.encoder = Sam3ImageEncoder(load_sam3(sam_type, checkpoint, random_init=random_init), device)
        elif self.sam2:
            from ..foundation.sam2_models import Sam2ImageEncoder, load_sam2

            self.encoder = Sam2ImageEncoder(load_sam2(sam_type, checkpoint, random_init=random_init), device)
        else:
            self.encoder = SamImageEncoder(load_sam(sam_type, checkpoint, random_init=random_init), device)
        self.clip, self.texts = None, []
        if clip:
            from ..foundation.clip_surgery import ClipSurgery

            self.clip = ClipSurgery.load(clip["model"], clip["weights"], device=device)
            self.texts = list(clip["texts"])

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        n = len(batch["error"])
        emb = np.empty(n, dtype=object)
        emb[:] = b""
        maps = {t: np.full(n, b"", dtype=object) for t in self.texts}
        feats = {k: np.full(n, b"", dtype=object) for k in self.features}
        if ok:
            frames = [batch["frame"][i][: batch["input_h"][i], : batch["input_w"][i]] for i in ok]
            if self.sam2:  # SAM2ImagePredictor's (SAM 3: Sam3Processor's) own transforms, on the original image
                out = self.encoder.encode([read_image(str(batch["image_path"][i])) for i in ok])
                for k in feats:
                    for j, i in enumerate(ok):
                        feats[k][i] = out[k][j].astype(np.float16).tobytes()
                out = out["image_embed"].astype(np.float16)
            else:
                out = self.encoder.encode(frames).astype(np.float16)
            for j, i in enumerate(ok):
                emb[i] = out[j].tobytes()
            if self.clip is not None:  # on the image SAM saw (long side 1024), padded like SAM: grids align
                m = self.clip.maps(frames, self.texts)  # (B, C, 64, 64) float16
                for j, i in enumerate(ok):
                    for c, t in enumerate(self.texts):
                        maps[t][i] = m[j, c].tobytes()
        batch = dict(batch)
        batch.pop("frame", None)
        batch["embedding"] = emb
        batch.update(feats)
        for t in self.texts:
            batch[f"map_{map_name(t)}"] = maps[t]
        return batch


def _micro_clip_weights(model: str) -> str:
    from ..foundation.micro_clip import MICRO_CLIP_WEIGHTS

    if model != "micro":
        raise DataError(f"CLIP model {model!r} needs --clip-weights PATH (a local file; nothing is downloaded)")
    return MICRO_CLIP_WEIGHTS


def samples_digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.split}|{s.id}|{s.task}|{s.image_path}|{s.mask_path}|{s.invert}|{s.threshold}|{s.voc_class}\n".encode())
    return h.hexdigest()


def embed_dataset(
    samples: list[Sample],
    out: str,
    *,
    sam_type: str = "micro",
    checkpoint: str | None = None,
    random_init: bool = False,
    shard_size: int = 32,
    batch_size: int = 4,
    num_encoders: int = 1,
    skip_bad: bool = False,
    dataset_spec: str = "",
    clip_model: str | None = None,
    clip_weights: str | None = None,
    clip_texts: list[str] | None = None,
    skipped: dict | None = None,
    progress: bool = True,
) -> dict:
    """Embed ``samples`` into the store ``out`` (created or resumed). Returns the manifest.

    clip_model: also compute CLIP Surgery maps ("micro" = the embedded micro CLIP, or an open_clip
    ViT name with ``clip_weights`` a local file), one column ``map_<name>`` per text in
    ``clip_texts`` (default: the samples' task texts, e.g. "star" -> ``map_star``).
    skipped: ``path -> reason`` of pairs ``open_dataset(skip_bad=True)`` dropped, recorded in the
    manifest's ``skipped`` beside the images dropped while decoding.
    A run that fails before its first shard is finished removes the ``out`` folder it created."""
    if not samples:
        raise DataError("no samples to embed")
    if "://" in out:
        raise StoreError(f"--out {out!r}: embed writes a local or shared-filesystem folder; embed there, then copy "
                         "it to object storage (e.g. `aws s3 sync STORE s3://bucket/stores/task`); training reads URIs")
    created = not os.path.exists(out)
    with folder_lock(out, "embed"):  # one writer per store (before Ray starts); creates out
        try:
            with native_to_log():  # Ray Data's actors starting: core-worker notices to the log, not the terminal
                return _embed(samples, out, sam_type, checkpoint, random_init, shard_size, batch_size, num_encoders,
                              skip_bad, dataset_spec, clip_model, clip_weights, clip_texts, skipped or {}, progress)
        except BaseException:
            if created and not os.path.isfile(os.path.join(out, "manifest.json")):  # nothing finished: no trace
                shutil.rmtree(out, ignore_errors=True)
            raise


def _embed(samples, out, sam_type, checkpoint, random_init, shard_size, batch_size, num_encoders, skip_bad,
           dataset_spec, clip_model, clip_weights, clip_texts, skipped, progress) -> dict:
    samples = sorted(samples, key=lambda s: (s.split, s.id))
    ckpt_path = checkpoint or default_checkpoint(sam_type)
    if is_sam3(sam_type):
        from ..foundation.sam3_models import Sam3PromptDecoder, load_sam3

        model = load_sam3(sam_type, checkpoint, random_init=random_init)  # fails fast on a wrong checkpoint
        decoder = Sam3PromptDecoder.from_model(model, sam_type)
        embed_dim, features = decoder.embed_dim, SAM3_FEATURES
    elif is_sam2(sam_type):
        from ..foundation.sam2_models import Sam2PromptDecoder, load_sam2

        model = load_sam2(sam_type, checkpoint, random_init=random_init)  # fails fast on a wrong checkpoint
        embed_dim, decoder, features = model.sam_prompt_embed_dim, Sam2PromptDecoder.from_model(model, sam_type), \
            SAM2_FEATURES
    else:
        model = load_sam(sam_type, checkpoint, random_init=random_init)  # fails fast on a wrong checkpoint
        embed_dim, decoder, features = model.prompt_encoder.embed_dim, SamPromptDecoder.from_sam(model, sam_type), {}
    grid, lowres, frame_size = decoder.grid_size, decoder.lowres_size, decoder.frame_size
    ckpt_hash = "random-init" if random_init else file_sha256(ckpt_path)
    digest = samples_digest(samples)
    identity = {"sam_type": sam_type, "checkpoint_sha256": ckpt_hash, "samples_sha256": digest, "shard_size": shard_size,
                "clip": None}
    clip = None
    if clip_model:
        from ..foundation.clip_surgery import ClipSurgery

        texts = list(dict.fromkeys(clip_texts or [s.text for s in samples]))
        names = [map_name(t) for t in texts]
        if grid != GRID:
            raise DataError(f"CLIP Surgery maps are {GRID} x {GRID}, but {sam_type}'s embedding grid is {grid} x {grid}: "
                            "the explicit SRM branch is not available on this SAM yet (use the implicit branch)")
        if len(set(names)) != len(names):
            raise DataError(f"text prompts {texts} give clashing map column names {names}")
        ClipSurgery.load(clip_model, clip_weights)  # fails fast on a wrong or missing weights file
        weights_file = clip_weights or _micro_clip_weights(clip_model)
        clip = {"model": clip_model, "weights": clip_weights, "texts": texts}
        identity["clip"] = {"model": clip_model, "weights_sha256": file_sha256(weights_file),
                            "maps": dict(zip(names, texts))}

    manifest_path = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest_path):
        manifest = read_manifest(out)
        theirs = {k: manifest.get(k) for k in identity}
        if theirs != identity:
            diff = ", ".join(f"{k}: store has {theirs[k]!r}, now {identity[k]!r}" for k in identity if theirs[k] != identity[k])
            raise StoreError(f"{out!r} holds a store built from other inputs ({diff}); use another --out")
    else:
        manifest = {
            "format_version": FORMAT_VERSION, **identity, "checkpoint": ckpt_path,
            "dataset": dataset_spec, "embed_dim": embed_dim,
            "embedding_shape": [embed_dim, grid, grid], "embedding_dtype": "float16",
            "gt_lowres_shape": [lowres, lowres], "frame_size": frame_size, "maps": sorted(identity["clip"]["maps"]) if clip else [],
            "decoder": DECODER_FILE,
            "shards": {}, "skipped": {}, "complete": False,
            # SAM 2.1: the image squashed to 1024 x 1024 (SAM 1: long side 1024, padded) + its decoder's
            # high-resolution features, name -> (C, H, W) float16
            "frame": "square" if features else "longest_side", "features": {k: list(v) for k, v in features.items()},
        }
    write_decoder(out, manifest, decoder)
    del model, decoder

    n_shards = (len(samples) + shard_size - 1) // shard_size
    done = set()
    for name, info in manifest["shards"].items():  # finished shards survive, unless damaged
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue  # lost: recomputed below
        if file_sha256(path) != info["sha256"]:
            raise StoreError(f"shard {path} is corrupt or truncated (its sha256 differs from manifest.json); "
                             "delete it and rerun with the same arguments: only that shard is recomputed")
        done.add(info["index"])
    manifest["shards"] = {k: v for k, v in manifest["shards"].items() if v["index"] in done}
    pending = [i for i in range(n_shards) if i not in done]
    items = [
        {"order": k, "shard": i, "sample": asdict(s), "square": bool(features), "frame_size": frame_size,
         "lowres": lowres}
        for i in pending for k, s in enumerate(samples[i * shard_size : (i + 1) * shard_size], start=i * shard_size)
    ]
    if progress and done:
        print(f"[embed] resuming: {len(done)} of {n_shards} shards already done", file=sys.stderr)
    table_schema = schema(embed_dim, tuple(manifest["maps"]), manifest.get("features"), grid, lowres)
    t0 = time.time()
    n_new = 0
    if items:
        init_ray(log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1  # the cluster's, not the driver's (ray job submit)
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // max(batch_size, 1)))
        ds = ds.map(_load_row)
        ds = ds.map_batches(
            SamEncoderActor,
            fn_constructor_kwargs={"sam_type": sam_type, "checkpoint": checkpoint, "random_init": random_init,
                                   "clip": clip},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_encoders), num_gpus=1 if use_gpu else 0,
            num_cpus=1, batch_format="numpy",
        )
        by_shard: dict[int, list[dict]] = {}
        with tqdm(total=len(items), desc="embedding", unit="img", disable=not progress) as bar:
            for row in ds.iter_rows():
                by_shard.setdefault(int(row["shard"]), []).append(row)
                bar.update(1)
                shard = int(row["shard"])
                expected = min(shard_size, len(samples) - shard * shard_size)
                if len(by_shard[shard]) == expected:
                    n_new += _finish_shard(out, manifest, shard, by_shard.pop(shard), samples, table_schema, skip_bad)
    manifest["n_images"] = sum(v["rows"] for v in manifest["shards"].values())
    counts: dict[str, int] = {}
    for v in manifest["shards"].values():
        for split, c in v["splits"].items():
            counts[split] = counts.get(split, 0) + c
    manifest["counts"] = counts
    manifest["tasks"] = sorted({s.task for s in samples})
    manifest["text"] = {s.task: s.text for s in samples}
    manifest["complete"] = len(manifest["shards"]) == n_shards
    manifest["skipped"].update(skipped)
    write_manifest(out, manifest)
    if manifest["skipped"]:
        reasons = list(manifest["skipped"].items())
        shown = "; ".join(f"{i}: {r}" for i, r in reasons[:5])
        total = len(samples) + len(skipped)
        print(f"[embed] skipped {len(reasons)} of {total} images: {shown}{' ...' if len(reasons) > 5 else ''}",
              file=sys.stderr)
    if progress and n_new:
        dt = time.time() - t0
        print(f"[embed] {n_new} images in {dt:.1f}s ({n_new / dt:.2f} img/s) -> {out}", file=sys.stderr)
    manifest["_images_embedded_now"] = n_new
    manifest["_seconds"] = time.time() - t0
    return manifest


def _finish_shard(out, manifest, shard, rows, samples, table_schema, skip_bad) -> int:
    by_id = {s.id: s for s in samples[shard * manifest["shard_size"] : (shard + 1) * manifest["shard_size"]]}
    good = []
    for row in sorted(rows, key=lambda r: int(r["order"])):
        if row["error"]:
            if not skip_bad:
                raise DataError(f"{row['error']} (pass --skip-bad to skip such images; finished shards are kept)")
            manifest["skipped"][row["id"]] = row["error"]
            continue
        s = by_id[row["id"]]
        good.append({
            "id": s.id, "task": s.task, "split": s.split, "text": s.text, "image_path": s.image_path,
            "original_h": int(row["original_h"]), "original_w": int(row["original_w"]),
            "input_h": int(row["input_h"]), "input_w": int(row["input_w"]),
            "embedding": bytes(row["embedding"]), "gt_lowres": np.asarray(row["gt_lowres"]).tobytes(),
            "gt_png": bytes(row["gt_png"]),
            **{f"map_{m}": bytes(row[f"map_{m}"]) for m in manifest["maps"]},
            **{k: bytes(row[k]) for k in manifest.get("features") or {}},
        })
    name = shard_name(shard)
    digest = write_shard(good, os.path.join(out, name), table_schema)
    splits: dict[str, int] = {}
    for g in good:
        splits[g["split"]] = splits.get(g["split"], 0) + 1
    manifest["shards"][name] = {"index": shard, "rows": len(good), "sha256": digest, "splits": splits}
    write_manifest(out, manifest)  # the shard counts as done only once it is in the manifest
    return len(good)

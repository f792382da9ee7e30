"""Segment a whole collection on a Ray cluster (`alignsam segment --ray`): Ray Data streaming batch inference.

    alignsam segment --ray INPUT --bundle BUNDLE [--sam-checkpoint CKPT] [--clip-weights F] --out OUTPUT
        [--overlays] [--strict] [--encoders N] [--prompters N] [--batch B]

INPUT and OUTPUT are local folders or URIs pyarrow opens (``s3://bucket/images``, ``gs://...``). The
pipeline (Ray Data, streaming; no scheduler of ours):

    from_items(image paths not done yet)
      -> map_batches(EncodeStage, actor pool, a GPU each when the cluster has them): read + decode the
         image, SAM's image encoder (+ the CLIP Surgery map of an explicit-branch policy)
      -> map_batches(PromptStage, actor pool, CPU): the SRM's two start points, T greedy policy steps with
         SRM labels, SAM's decoder after each; writes OUTPUT/masks/<path>_mask.png (+ overlays/)
      -> the driver: one index row per image, appended as OUTPUT/index/part-*.parquet every few hundred
         rows; at the end OUTPUT/index.parquet (the latest row of every image).

Both stages are ``AlignSAMPredictor`` (``embed_batch`` and ``prompt_batch``), so a mask equals the one
``alignsam segment`` writes for the same image. Only paths and index rows reach the driver: images,
embeddings and masks stay in the workers and the object store. A rerun skips the images whose index
row says ``ok`` and whose mask file exists; unreadable images get an index row with the reason (and no
mask) unless ``--strict``, which stops at the first.
"""
from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .data.readers import IMAGE_EXTENSIONS
from .data.samples import DataError

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()),            # the image's path relative to INPUT
    ("source", pa.string()),        # the image's full path or URI
    ("mask", pa.string()),          # the mask's path or URI ("" when status != ok)
    ("status", pa.string()),        # "ok" or "error"
    ("error", pa.string()),         # why, when status == "error"
    ("height", pa.int32()), ("width", pa.int32()),
    ("n_points", pa.int32()),       # 2 + T
    ("points", pa.list_(pa.float32())),  # x0, y0, x1, y1, ... in image pixels
    ("labels", pa.list_(pa.int8())),     # 1 positive, 0 negative
    ("seconds", pa.float64()),      # encoder + prompting time of the image's batch, per image
])
PART_ROWS = 500  # index rows per part file


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local folder or a pyarrow URI -> (filesystem, path inside it)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:
            raise DataError(f"cannot open {uri!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(root_uri: str, rel: str) -> str:
    return root_uri.rstrip("/") + "/" + rel


def list_images(uri: str) -> list[str]:
    """Image files under ``uri`` (recursive), as paths relative to it, sorted."""
    fs, root = open_uri(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"--ray {uri!r} is not a folder" + (" (it does not exist)" if info.type == pafs.FileType.NotFound
                                                             else ""))
    rels = sorted(os.path.relpath(f.path, root) for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if f.type == pafs.FileType.File and f.path.lower().endswith(IMAGE_EXTENSIONS))
    if not rels:
        raise DataError(f"no images under {uri} (looked for {', '.join(IMAGE_EXTENSIONS)}, in subfolders too)")
    stems: dict[str, str] = {}
    for rel in rels:
        stem = os.path.splitext(rel)[0]
        if stem in stems:
            raise DataError(f"{_join(uri, stems[stem])} and {_join(uri, rel)} would write the same mask "
                            f"({stem}_mask.png); rename one")
        stems[stem] = rel
    return rels


def mask_name(rel: str) -> str:
    return os.path.splitext(rel)[0] + "_mask.png"


def done_images(out_uri: str) -> set[str]:
    """Images a previous run finished: the latest index row is ok and the mask file is there."""
    fs, root = open_uri(out_uri)
    index_dir = root.rstrip("/") + "/index"
    if fs.get_file_info(index_dir).type != pafs.FileType.Directory:
        return set()
    latest = _latest_rows(read_index_parts(fs, index_dir))
    masks_dir = root.rstrip("/") + "/masks"
    present = set()
    if fs.get_file_info(masks_dir).type == pafs.FileType.Directory:
        present = {os.path.relpath(f.path, masks_dir) for f in
                   fs.get_file_info(pafs.FileSelector(masks_dir, recursive=True)) if f.type == pafs.FileType.File}
    return {row["id"] for row in latest.values() if row["status"] == "ok" and mask_name(row["id"]) in present}


def read_index_parts(fs: pafs.FileSystem, index_dir: str) -> pa.Table:
    parts = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(index_dir)) if f.path.endswith(".parquet"))
    if not parts:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, filesystem=fs, schema=INDEX_SCHEMA) for p in parts])


def _latest_rows(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}  # parts are read in order: later rows win


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Whole file or nothing: a temporary name, then a move (object stores: one put is atomic already)."""
    parent = os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class EncodeStage:
    """Ray Data actor: paths -> decoded images -> SAM embeddings (+ CLIP map) ; bad images -> an error."""

    def __init__(self, bundle: str, sam_checkpoint: str | None, clip_weights: str | None, input_uri: str):
        import torch

        from .foundation import pick_device
        from .predictor import AlignSAMPredictor

        if pick_device().type == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.predictor = AlignSAMPredictor(bundle, sam_checkpoint=sam_checkpoint, clip_weights=clip_weights)
        self.fs, self.root = open_uri(input_uri)
        self.input_uri = input_uri

    def _read(self, rel: str) -> np.ndarray:
        from PIL import Image

        with self.fs.open_input_file(self.root.rstrip("/") + "/" + rel) as f:
            data = f.read()
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise DataError(f"cannot decode image {_join(self.input_uri, rel)}: {exc}") from None

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        rels = list(batch["id"])
        images, errors = [], []
        for rel in rels:
            try:
                images.append(self._read(rel))
                errors.append("")
            except Exception as exc:  # unreadable or undecodable: the row says why
                images.append(None)
                errors.append(str(exc) if isinstance(exc, DataError) else f"cannot read {_join(self.input_uri, rel)}: {exc}")
        ok = [i for i, e in enumerate(errors) if not e]
        n = len(rels)
        out = {"id": np.array(rels, dtype=object), "error": np.array(errors, dtype=object),
               "height": np.zeros(n, np.int32), "width": np.zeros(n, np.int32)}
        # every batch has the same columns and shapes (zeros where an image failed): blocks concatenate
        e, g = self.predictor.decoder.embed_dim, self.predictor.decoder.grid_size
        cols = {"embeddings": np.zeros((n, e, g, g), np.float16), "original_size": np.zeros((n, 2), np.int64),
                "input_size": np.zeros((n, 2), np.int64)}
        if self.predictor.clip is not None:
            cols[f"map_{self.predictor.text_map}"] = np.zeros((n, g, g), np.float16)
        for key in self.predictor.decoder.extra_keys:  # SAM 2.1's (SAM 3's) high-resolution features
            cols[key] = np.zeros((n, *self.predictor.decoder.feature_shapes[key]), np.float16)
        if ok:
            data = self.predictor.embed_batch([images[i] for i in ok])
            for key, col in cols.items():
                col[ok] = data[key]
            out["height"][ok], out["width"][ok] = data["original_size"][:, 0], data["original_size"][:, 1]
        out.update(cols)
        out["seconds"] = np.full(n, (time.time() - t0) / max(len(ok), 1))
        return out


class PromptStage:
    """Ray Data actor: embeddings -> T prompting steps -> mask PNGs written to OUTPUT -> index rows."""

    def __init__(self, bundle: str, sam_checkpoint: str | None, input_uri: str, out_uri: str, steps: int | None,
                 overlays: bool):
        from .predictor import AlignSAMPredictor

        self.predictor = AlignSAMPredictor(bundle, sam_checkpoint=sam_checkpoint, encoder=False)
        self.steps = self.predictor.steps(steps)
        self.input_uri, self.out_uri, self.overlays = input_uri, out_uri, overlays
        self.in_fs, self.in_root = open_uri(input_uri)
        self.fs, self.root = open_uri(out_uri)

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        n = len(batch["id"])
        ok = [i for i in range(n) if not batch["error"][i]]
        rows = {k: [] for k in INDEX_SCHEMA.names}
        preds = {}
        if ok:
            keep = ("embeddings", "original_size", "input_size", *self.predictor.decoder.extra_keys)
            data = {k: np.asarray(batch[k])[ok] for k in batch if k in keep or k.startswith("map_")}
            preds = dict(zip(ok, self.predictor.prompt_batch(data, self.steps)))
        per_image = (time.time() - t0) / max(len(ok), 1)
        for i in range(n):
            rel = str(batch["id"][i])
            p = preds.get(i)
            mask_uri = ""
            if p is not None:
                mask_uri = _join(self.out_uri, "masks/" + mask_name(rel))
                _write_atomic(self.fs, self.root.rstrip("/") + "/masks/" + mask_name(rel),
                              _png(p.mask.astype(np.uint8) * 255))
                if self.overlays:
                    self._overlay(rel, p)
            rows["id"].append(rel)
            rows["source"].append(_join(self.input_uri, rel))
            rows["mask"].append(mask_uri)
            rows["status"].append("ok" if p is not None else "error")
            rows["error"].append(str(batch["error"][i]))
            rows["height"].append(int(batch["height"][i]))
            rows["width"].append(int(batch["width"][i]))
            rows["n_points"].append(len(p.labels) if p is not None else 0)
            rows["points"].append(p.points.ravel().tolist() if p is not None else [])
            rows["labels"].append(p.labels.astype(int).tolist() if p is not None else [])
            rows["seconds"].append(float(batch["seconds"][i]) + (per_image if p is not None else 0.0))
        return {k: np.array(v, dtype=object) for k, v in rows.items()}

    def _overlay(self, rel: str, p) -> None:
        from PIL import Image

        from .visualise import overlay

        with self.in_fs.open_input_file(self.in_root.rstrip("/") + "/" + rel) as f:
            image = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        name = os.path.splitext(rel)[0] + "_overlay.png"
        _write_atomic(self.fs, self.root.rstrip("/") + "/overlays/" + name, _png(overlay(image, p.mask, p.points,
                                                                                          p.labels)))


def segment_collection(input_uri: str, bundle: str, out_uri: str, sam_checkpoint: str | None = None,
                       clip_weights: str | None = None, steps: int | None = None, overlays: bool = False,
                       strict: bool = False, encoders: int | None = None, prompters: int | None = None,
                       batch: int = 4, progress: bool = True) -> dict:
    """The whole collection (see the module docstring); returns {"done", "skipped", "errors", "seconds"}."""
    import ray

    from .predictor import AlignSAMPredictor
    from .ray_session import init_ray, native_to_log

    t0 = time.time()
    bundle = os.path.abspath(bundle)  # actors on other nodes: the bundle and checkpoints on shared storage
    sam_checkpoint = os.path.abspath(sam_checkpoint) if sam_checkpoint else None
    clip_weights = os.path.abspath(clip_weights) if clip_weights else None
    check = AlignSAMPredictor(bundle, sam_checkpoint=sam_checkpoint, clip_weights=clip_weights)  # fail fast, here
    steps = check.steps(steps)
    del check
    rels = list_images(input_uri)
    finished = done_images(out_uri)
    todo = [r for r in rels if r not in finished]
    if progress:
        print(f"[segment] {len(rels)} images in {input_uri}; {len(rels) - len(todo)} already done; {len(todo)} to "
              f"segment (T = {steps})", flush=True)
    out_fs, out_root = open_uri(out_uri)
    out_fs.create_dir(out_root.rstrip("/") + "/index", recursive=True)
    stats = {"done": 0, "skipped": len(rels) - len(todo), "errors": 0}
    if todo:
        ray_was_up = ray.is_initialized()
        init_ray(logging_level="WARNING", log_to_driver=False)
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        encoders = encoders or max(1, int(gpus) or 1)
        prompters = prompters or max(1, int(cpus) - (0 if gpus else encoders))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = ray.data.from_items([{"id": r} for r in todo], override_num_blocks=max(1, min(len(todo) // batch, 10_000)))
        ds = ds.map_batches(EncodeStage, fn_constructor_args=(bundle, sam_checkpoint, clip_weights, input_uri),
                            batch_size=batch, compute=ray.data.ActorPoolStrategy(size=encoders),
                            num_gpus=1 if gpus else 0, num_cpus=1, batch_format="numpy")
        ds = ds.map_batches(PromptStage, fn_constructor_args=(bundle, sam_checkpoint, input_uri, out_uri, steps,
                                                              overlays),
                            batch_size=batch, compute=ray.data.ActorPoolStrategy(size=prompters), num_cpus=1,
                            batch_format="numpy")
        try:
            with native_to_log():
                _drain(ds, out_fs, out_root, len(todo), strict, stats, progress, t0)
        finally:
            if not ray_was_up:  # the Ray this call started ends with it
                ray.shutdown()
    _compact_index(out_fs, out_root)
    stats["seconds"] = time.time() - t0
    if progress:
        print(f"[segment] {stats['done']} segmented, {stats['errors']} unreadable (see the index), "
              f"{stats['skipped']} skipped as done, in {stats['seconds']:.0f}s -> {out_uri}/masks/, "
              f"{out_uri}/index.parquet", flush=True)
    return stats


def _drain(ds, fs, root: str, total: int, strict: bool, stats: dict, progress: bool, t0: float) -> None:
    """Pull index rows as they finish; write a part file every PART_ROWS rows; report rate and ETA."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    rows: list[dict] = []
    parts, last = 0, 0.0

    def flush():
        nonlocal parts, rows
        if rows:
            table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            _write_atomic(fs, f"{root.rstrip('/')}/index/part-{stamp}-{parts:05d}.parquet", buf.getvalue().to_pybytes())
            parts += 1
            rows = []

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["status"] != "ok":
                    if strict:
                        raise DataError(f"{row['error']} (--strict; without it the image is listed in the index and "
                                        "skipped)")
                    stats["errors"] += 1
                else:
                    stats["done"] += 1
                rows.append({k: row[k] for k in INDEX_SCHEMA.names})
            if len(rows) >= PART_ROWS:
                flush()
            n = stats["done"] + stats["errors"]
            if progress and (time.time() - last > 5 or n == total):
                last = time.time()
                rate = n / max(time.time() - t0, 1e-9)
                eta = (total - n) / rate if rate else float("inf")
                print(f"[segment] {n}/{total} images, {rate:.2f} img/s, ETA {eta / 60:.1f} min", file=sys.stderr,
                      flush=True)
    finally:
        flush()  # what finished is kept, whatever stopped the run


def _compact_index(fs: pafs.FileSystem, root: str) -> None:
    """OUTPUT/index.parquet: the latest row of every image, from all part files."""
    latest = _latest_rows(read_index_parts(fs, root.rstrip("/") + "/index"))
    table = pa.Table.from_pylist(sorted(latest.values(), key=lambda r: r["id"]), schema=INDEX_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    _write_atomic(fs, root.rstrip("/") + "/index.parquet", buf.getvalue().to_pybytes())

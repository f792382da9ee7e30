"""Reading a store: verified shards -> numpy arrays (whole split, or streamed) -> the Ray object store.

    EmbeddingStore(path).arrays(split) -> dict of numpy arrays (N = images in the split):
        ids (N,) str, texts (N,) str, embeddings (N, E, 64, 64) float16, gt_lowres (N, 256, 256) uint8,
        original_size (N, 2) int32 (h, w), input_size (N, 2) int32 (h, w), map_<name> (N, 64, 64) float16,
        (SAM 3 stores: 72 x 72 embeddings, 288 x 288 ground truth)
        SAM 2.1 stores also high_res_feats_0 (N, 32, 256, 256) and high_res_feats_1 (N, 64, 128, 128) float16
        (SAM 3: 288 and 144)
    EmbeddingStore(path).split_ids(split) -> (N,) ids, reading only the ``id`` and ``split`` columns
    EmbeddingStore(path).iter_rows(split, start, stop, batch) -> (arrays, gt_full, image_paths) per ``batch`` images of
        the split's rows [start, stop) (positions in the split's order): only the Parquet files holding
        those rows are read (and verified), one at a time, so memory is bounded by a file + a batch
    publish_store(path, split) -> actor name   (driver: ray.put every array, a named actor holds the refs;
                                               also "decoder_file" (n_bytes,) uint8, the store's decoder.pt)
    fetch_store(name) -> the same dict, zero-copy read-only views of the object store (workers)

Never put an ObjectRef into env_config (it is pickled into checkpoints and a restored run
aborts): pass the holder's *name*; workers look the refs up by it.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .shards import (
    GRID,
    LOWRES,
    StoreError,
    decode_png,
    is_uri,
    read_decoder_bytes,
    read_manifest,
    read_table,
    store_file,
    verify_shard,
)

HOLDER_PREFIX = "alignsam-store:"
DECODER_KEY = "decoder_file"  # published arrays: the decoder file's bytes, (n_bytes,) uint8
_HOLDERS: dict = {}  # name -> holder handle, alive as long as this driver


class EmbeddingStore:
    """A finished store on disk; every shard is checked against its sha256 on open."""

    def __init__(self, path: str, verify: bool = True):
        self.path = path
        self.manifest = read_manifest(path)
        self._files: dict = {}  # split -> [(shard file, rows of the split)]
        if not self.manifest.get("complete"):
            raise StoreError(f"store {path!r} is incomplete (an embed run was interrupted); rerun the same "
                             "`alignsam embed` command to finish it")
        if verify:
            for name, info in sorted(self.manifest["shards"].items()):
                verify_shard(path, name, info["sha256"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def decoder_bytes(self) -> bytes:
        """The store's SAM prompt encoder + mask decoder file (``SamPromptDecoder.load`` reads it), verified."""
        return read_decoder_bytes(self.path, self.manifest)

    def decoder(self):
        """The store's frozen SAM prompt encoder + mask decoder (a ``SamPromptDecoder``)."""
        from ..foundation.decoder import load_prompt_decoder

        return load_prompt_decoder(io.BytesIO(self.decoder_bytes()))

    def table(self, split: str | None = None) -> pa.Table:
        names = sorted(self.manifest["shards"])
        tables = [read_table(self.path, n) for n in names]
        table = pa.concat_tables(tables) if tables else pa.table({})
        if split is not None:
            table = table.filter(pa.compute.equal(table["split"], split))
        return table

    def arrays(self, split: str | None = None) -> dict[str, np.ndarray]:
        t = self.table(split)
        if t.num_rows == 0:
            raise StoreError(f"store {self.path!r} has no images in split {split!r} "
                             f"(it has {self.manifest.get('counts')})")
        return self._arrays_of(t)

    def _arrays_of(self, t: pa.Table) -> dict[str, np.ndarray]:
        n = t.num_rows
        grid = int(self.manifest.get("embedding_shape", [0, GRID])[1])  # SAM 3 stores: 72 and 288
        lowres = int(self.manifest.get("gt_lowres_shape", [LOWRES])[0])
        out = {
            "ids": np.asarray(t["id"].to_pylist()),
            "texts": np.asarray(t["text"].to_pylist()),  # each image's task text (sam3_text prompts SAM 3 with it)
            "embeddings": _fixed_binary(t["embedding"], np.float16, (n, self.embed_dim, grid, grid)),
            "gt_lowres": _fixed_binary(t["gt_lowres"], np.uint8, (n, lowres, lowres)),
            "original_size": np.stack([t["original_h"].to_numpy(), t["original_w"].to_numpy()], 1).astype(np.int32),
            "input_size": np.stack([t["input_h"].to_numpy(), t["input_w"].to_numpy()], 1).astype(np.int32),
        }
        for name in self.manifest.get("maps", []):
            out[f"map_{name}"] = _fixed_binary(t[f"map_{name}"], np.float16, (n, grid, grid))
        for name, shape in (self.manifest.get("features") or {}).items():  # SAM 2.1 stores
            out[name] = _fixed_binary(t[name], np.float16, (n, *shape))
        return out

    def gt_full(self, split: str | None = None) -> dict[str, np.ndarray]:
        """id -> full-resolution (H, W) uint8 mask (0/1/255)."""
        t = self.table(split)
        return {i: decode_png(b) for i, b in zip(t["id"].to_pylist(), t["gt_png"].to_pylist())}

    def _split_files(self, split: str) -> list[tuple[str, int]]:
        """[(shard file, rows of ``split`` in it)] in store order: the manifest's per-shard split counts
        (stores without them: each file's ``split`` column alone)."""
        if split not in self._files:
            rows = []
            for name, info in sorted(self.manifest["shards"].items()):
                if "splits" in info:
                    rows.append((name, int(info["splits"].get(split, 0))))
                    continue
                fs, path, _ = store_file(self.path, name)
                col = pq.read_table(path, filesystem=fs, columns=["split"])["split"]
                rows.append((name, int(pa.compute.sum(pa.compute.equal(col, split)).as_py() or 0)))
            self._files[split] = rows
        return self._files[split]

    def split_ids(self, split: str) -> np.ndarray:
        """(N,) ids of the split's images in store order (only the ``id`` and ``split`` columns are read)."""
        ids = []
        for name, k in self._split_files(split):
            if k:
                fs, path, _ = store_file(self.path, name)
                t = pq.read_table(path, filesystem=fs, columns=["id", "split"], filters=[("split", "==", split)])
                ids += t["id"].to_pylist()
        if not ids:
            raise StoreError(f"store {self.path!r} has no images in split {split!r} "
                             f"(it has {self.manifest.get('counts')})")
        return np.asarray(ids)

    def iter_rows(self, split: str, start: int = 0, stop: int | None = None, batch: int = 16):
        """Yield (arrays as ``arrays`` gives them, gt_full as ``gt_full``, [image_path]) for consecutive groups of at most
        ``batch`` images of the split's rows [start, stop) (positions in ``split_ids`` order). Each
        Parquet file holding some of them is verified against its sha256 and read alone (rows of the
        split only); files without any are never opened."""
        pending: list[pa.Table] = []
        offset = 0
        for name, k in self._split_files(split):
            lo, hi = max(start, offset), offset + k if stop is None else min(offset + k, stop)
            offset += k
            if lo >= hi:
                continue
            verify_shard(self.path, name, self.manifest["shards"][name]["sha256"])
            fs, path, _ = store_file(self.path, name)
            t = pq.read_table(path, filesystem=fs, filters=[("split", "==", split)])
            pending.append(t.slice(lo - (offset - k), hi - lo))
            while sum(p.num_rows for p in pending) >= batch:
                yield self._batch(pending, batch)
        while sum(p.num_rows for p in pending):
            yield self._batch(pending, batch)

    def _batch(self, pending: list, batch: int) -> tuple[dict, dict, list]:
        """Take the first ``batch`` rows off ``pending`` (a list of tables, consumed in place)."""
        t = pa.concat_tables(pending)
        head, rest = t.slice(0, batch), t.slice(batch)
        pending[:] = [rest] if rest.num_rows else []
        gt = {i: decode_png(b) for i, b in zip(head["id"].to_pylist(), head["gt_png"].to_pylist())}
        return self._arrays_of(head), gt, head["image_path"].to_pylist()


def _fixed_binary(column: pa.ChunkedArray, dtype, shape) -> np.ndarray:
    """A fixed_size_binary column -> one contiguous numpy array (a single copy)."""
    arr = column.combine_chunks()
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * width : (arr.offset + len(arr)) * width]
    return data.view(dtype).reshape(shape)


class StoreHolder:
    """Owns nothing but keeps the object refs of a published store reachable, by name (a Ray actor:
    ``publish_store`` wraps it; Ray is imported only there, so reading a store needs no Ray)."""

    def __init__(self, wrapped_refs: list):
        self._wrapped = wrapped_refs  # [dict name -> ObjectRef]; wrapped so Ray does not resolve them

    def refs(self) -> list:
        return self._wrapped


def holder_name(path: str, split: str | None) -> str:
    return f"{HOLDER_PREFIX}{path if is_uri(path) else os.path.abspath(path)}:{split or 'all'}"


def publish_store(path: str, split: str | None = None, name: str | None = None) -> str:
    """Driver side: load the split once, ``ray.put`` each array, start a named holder; returns its name.

    Idempotent: if a holder of that name is alive, it is reused.
    """
    import ray

    name = name or holder_name(path, split)
    try:
        ray.get_actor(name)
        return name
    except ValueError:
        pass
    store = EmbeddingStore(path)
    arrays = store.arrays(split)
    # the decoder travels with the arrays: EnvRunners on other nodes need no access to the store
    arrays[DECODER_KEY] = np.frombuffer(store.decoder_bytes(), np.uint8)
    refs = {k: ray.put(v) for k, v in arrays.items()}
    # the driver keeps the handle: a named actor whose last handle goes away is stopped
    _HOLDERS[name] = ray.remote(num_cpus=0)(StoreHolder).options(name=name, get_if_exists=True).remote([refs])
    return name


def fetch_store(name: str) -> dict[str, np.ndarray]:
    """Worker side: the published arrays as zero-copy, read-only views of the object store."""
    import ray

    try:
        holder = ray.get_actor(name)
    except ValueError as exc:
        raise StoreError(f"no published store named {name!r} (call publish_store on the driver first)") from exc
    refs = ray.get(holder.refs.remote())[0]
    return dict(zip(refs, ray.get(list(refs.values()))))

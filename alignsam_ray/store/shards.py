"""On-disk format of an embedding store: Parquet shards (pyarrow) + a JSON manifest.

    STORE/manifest.json          model type, checkpoint hash, shapes, counts, per-shard sha256
    STORE/decoder.pt             the SAM prompt encoder + mask decoder (what workers load; its sha256
                                 in the manifest's ``decoder_sha256``, checked on every read)
    STORE/shard-00000.parquet    one row per image (schema below), ``shard_size`` rows a shard

Row schema (one image):
    id, task, split, text, image_path   string
    original_h, original_w              int32   image size in pixels
    input_h, input_w                    int32   size after ResizeLongestSide(1024), before padding
    embedding                           fixed_size_binary  float16 (E, 64, 64), C order (SAM 3: 72 x 72)
    gt_lowres                           fixed_size_binary  uint8 (256, 256) (SAM 3: 288) in SAM's padded low-res
                                        frame: 0 background, 1 foreground, 255 ignore (void)
    gt_png                              binary  full-resolution mask, PNG (same 0/1/255 values)
    map_<name>                          fixed_size_binary  float16 (64, 64), optional per-image maps

Reading works on any filesystem pyarrow knows: a local or shared path (NFS, EFS, Lustre) or a URI
(``s3://bucket/stores/blur``, ``gs://...``, ``hdfs://...``, ``file:///abs/path``; credentials as pyarrow
reads them, e.g. AWS_* variables or instance roles). ``alignsam embed`` writes a local folder; copy it
up with your storage's own tool (``aws s3 sync STORE s3://bucket/stores/blur``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from ..checksum import file_sha256, stream_sha256

MANIFEST = "manifest.json"
DECODER_FILE = "decoder.pt"
FORMAT_VERSION = 1
LOWRES = 256
GRID = 64


class StoreError(RuntimeError):
    """A store that is incomplete, corrupt, or was built from other inputs."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def schema(embed_dim: int, map_names: tuple[str, ...] = (), features: dict | None = None, grid: int = GRID,
           lowres: int = LOWRES) -> pa.Schema:
    """The shard columns; ``features``: extra fp16 feature maps per image, name -> shape (SAM 2.1's
    high-resolution features: high_res_feats_0 (32, 256, 256), high_res_feats_1 (64, 128, 128)); ``grid``,
    ``lowres``: the embedding grid and the low-res mask side (SAM 3: 72 and 288)."""
    fields = [
        ("id", pa.string()), ("task", pa.string()), ("split", pa.string()), ("text", pa.string()),
        ("image_path", pa.string()),
        ("original_h", pa.int32()), ("original_w", pa.int32()), ("input_h", pa.int32()), ("input_w", pa.int32()),
        ("embedding", pa.binary(embed_dim * grid * grid * 2)),
        ("gt_lowres", pa.binary(lowres * lowres)),
        ("gt_png", pa.binary()),
    ] + [(f"map_{n}", pa.binary(grid * grid * 2)) for n in map_names]
    fields += [(name, pa.binary(int(np.prod(shape)) * 2)) for name, shape in (features or {}).items()]
    return pa.schema(fields)


def encode_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)))


def write_shard(rows: list[dict], path: str, table_schema: pa.Schema) -> str:
    """Write rows atomically (tmp file + rename); returns the file's sha256."""
    table = pa.Table.from_pylist(rows, schema=table_schema)
    tmp = path + ".tmp"
    pq.write_table(table, tmp, compression="zstd")
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def is_uri(store: str) -> bool:
    return "://" in store


def store_filesystem(store: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, the store's path inside it) for a local path or a pyarrow URI."""
    if not is_uri(store):
        return pafs.LocalFileSystem(), os.path.abspath(store)
    try:
        return pafs.FileSystem.from_uri(store)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise StoreError(f"cannot open store {store!r} through pyarrow's filesystems: {exc}") from exc


def store_file(store: str, name: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, display name) of one file of a store."""
    fs, root = store_filesystem(store)
    return fs, f"{root.rstrip('/')}/{name}", (f"{store.rstrip('/')}/{name}" if is_uri(store) else os.path.join(store, name))


def store_file_exists(store: str, name: str) -> bool:
    fs, path, _ = store_file(store, name)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_store_bytes(store: str, name: str) -> bytes:
    """The whole content of one file of a store (raises StoreError if it is missing)."""
    fs, path, shown = store_file(store, name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise StoreError(f"{shown} is missing")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_table(store: str, name: str) -> pa.Table:
    fs, path, _ = store_file(store, name)
    return pq.read_table(path, filesystem=fs)


def read_manifest(store: str) -> dict:
    if not store_file_exists(store, MANIFEST):
        raise StoreError(f"{store!r} is not an embedding store (no {MANIFEST}); create one with `alignsam embed`")
    _, _, shown = store_file(store, MANIFEST)
    try:
        manifest = json.loads(read_store_bytes(store, MANIFEST))
    except ValueError as exc:  # truncated or hand-edited
        raise StoreError(f"{shown} is not valid JSON ({exc}); a store's manifest is rewritten by rerunning the "
                         "`alignsam embed` command that made it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise StoreError(f"{shown} is not an alignsam store manifest (no 'shards' mapping)")
    return manifest


def read_decoder_bytes(store: str, manifest: dict) -> bytes:
    """The store's decoder file, checked against the manifest's ``decoder_sha256`` (stores written
    before the checksum existed have none and are read as they are)."""
    blob = read_store_bytes(store, DECODER_FILE)
    expected = manifest.get("decoder_sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        _, _, shown = store_file(store, DECODER_FILE)
        raise StoreError(f"{shown} is corrupt (its sha256 differs from {MANIFEST}); rerun the `alignsam embed` "
                         "command that made the store: it rewrites the decoder and keeps the finished shards")
    return blob


def write_decoder(store: str, manifest: dict, decoder) -> None:
    """Write ``decoder`` (a ``SamPromptDecoder``) atomically and record its sha256, unless the file on
    disk already matches the manifest (a rerun leaves it alone)."""
    path = os.path.join(store, DECODER_FILE)
    if manifest.get("decoder_sha256") and os.path.isfile(path) and file_sha256(path) == manifest["decoder_sha256"]:
        return
    decoder.save(path + ".tmp")
    manifest["decoder_sha256"] = file_sha256(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_manifest(store: str, manifest: dict) -> None:
    path = os.path.join(store, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)


def verify_shard(store: str, name: str, expected_sha256: str) -> None:
    fs, full, path = store_file(store, name)
    if fs.get_file_info(full).type != pafs.FileType.File:
        raise StoreError(f"shard {path} is missing; rerun `alignsam embed` with the same arguments to recompute it")
    with fs.open_input_stream(full) as f:
        digest = stream_sha256(f)
    if digest != expected_sha256:
        raise StoreError(
            f"shard {path} is corrupt or truncated (sha256 differs from {MANIFEST}); delete it and rerun "
            "`alignsam embed` with the same arguments: only that shard is recomputed"
        )

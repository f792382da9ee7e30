"""Embedding store: Ray Data embed -> Parquet shards -> zero-copy load; resume; corruption."""
import json
import os

import numpy as np
import pytest
import ray
from PIL import Image

from alignsam_ray.data import DataError, load_pair, open_dataset
from alignsam_ray.foundation import SamImageEncoder, load_sam
from alignsam_ray.store import EmbeddingStore, StoreError, fetch_store, publish_store
from alignsam_ray.store import embed as embed_mod
from alignsam_ray.store.embed import embed_dataset, lowres_mask


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _dataset(root, n=6):
    """Generic layout with images of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = 40 + 13 * i, 90 - 7 * i
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 3 : w // 2 + 5] = 255
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def test_embed_then_load_is_exact(tmp_path):
    samples = open_dataset(str(_dataset(tmp_path / "ds")), n_train=3, seed=0)
    m = embed_dataset(samples, str(tmp_path / "store"), shard_size=4, progress=False)
    assert m["complete"] and m["n_images"] == 6 and m["counts"] == {"test": 3, "train": 3}
    assert m["sam_type"] == "micro" and len(m["shards"]) == 2
    assert all(len(v["sha256"]) == 64 for v in m["shards"].values())
    store = EmbeddingStore(str(tmp_path / "store"))
    encoder = SamImageEncoder(load_sam("micro"))
    for split in ("train", "test"):
        arrays = store.arrays(split)
        full = store.gt_full(split)
        by_id = {s.id: s for s in samples}
        assert arrays["embeddings"].dtype == np.float16 and arrays["embeddings"].shape[1:] == (64, 64, 64)
        for k, sid in enumerate(arrays["ids"]):
            image, mask = load_pair(by_id[sid])
            expected = encoder.embed(image).astype(np.float16)
            np.testing.assert_array_equal(arrays["embeddings"][k], expected)
            assert tuple(arrays["original_size"][k]) == image.shape[:2]
            np.testing.assert_array_equal(arrays["gt_lowres"][k], lowres_mask(mask, tuple(arrays["input_size"][k])))
            np.testing.assert_array_equal(full[sid], mask)
    # the same store through a pyarrow filesystem URI (what s3://, gs://, hdfs:// stores go through)
    by_uri = EmbeddingStore("file://" + str(tmp_path / "store"))
    for key, value in store.arrays("train").items():
        np.testing.assert_array_equal(by_uri.arrays("train")[key], value)
    assert by_uri.decoder_bytes() == store.decoder_bytes() and by_uri.decoder().embed_dim == 64


def test_interrupted_embed_resumes_without_redoing_shards(tmp_path, monkeypatch):
    samples = open_dataset(str(_dataset(tmp_path / "ds")), n_train=None)
    out = str(tmp_path / "store")
    real_finish = embed_mod._finish_shard
    calls = []

    def finish_then_die(*args, **kwargs):
        calls.append(1)
        n = real_finish(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill after two shards")
        return n

    monkeypatch.setattr(embed_mod, "_finish_shard", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(samples, out, shard_size=2, progress=False)
    monkeypatch.setattr(embed_mod, "_finish_shard", real_finish)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore(out)
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in manifest["shards"]}
    m = embed_dataset(samples, out, shard_size=2, progress=False)
    assert m["complete"] and m["_images_embedded_now"] == 2  # only the third shard was computed
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in kept} == kept
    assert len(EmbeddingStore(out).arrays()["ids"]) == 6


def test_corrupt_shard_is_detected_and_only_it_is_recomputed(tmp_path):
    samples = open_dataset(str(_dataset(tmp_path / "ds")), n_train=None)
    out = str(tmp_path / "store")
    embed_dataset(samples, out, shard_size=2, progress=False)
    victim = os.path.join(out, "shard-00001.parquet")
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(StoreError, match="shard-00001.parquet is corrupt or truncated"):
        EmbeddingStore(out)
    with pytest.raises(StoreError, match="shard-00001.parquet is corrupt or truncated"):
        embed_dataset(samples, out, shard_size=2, progress=False)
    os.remove(victim)
    m = embed_dataset(samples, out, shard_size=2, progress=False)
    assert m["_images_embedded_now"] == 2 and m["complete"]
    EmbeddingStore(out)


def test_store_from_other_inputs_is_refused(tmp_path):
    samples = open_dataset(str(_dataset(tmp_path / "ds")), n_train=None)
    out = str(tmp_path / "store")
    embed_dataset(samples, out, shard_size=4, progress=False)
    with pytest.raises(StoreError, match="other inputs.*samples_sha256"):
        embed_dataset(samples[:3], out, shard_size=4, progress=False)


def test_bad_image_stops_or_is_skipped(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    bad = root / "images" / "im2.png"
    bad.write_bytes(open(bad, "rb").read()[:60])  # truncated PNG: header readable, pixels not
    samples = open_dataset(str(root), n_train=None)
    with pytest.raises(DataError, match="im2"):
        embed_dataset(samples, str(tmp_path / "s1"), shard_size=4, progress=False)
    m = embed_dataset(samples, str(tmp_path / "s2"), shard_size=4, skip_bad=True, progress=False)
    assert m["n_images"] == 5 and list(m["skipped"]) == [s.id for s in samples if "im2" in s.id]
    assert "skipped 1 of 6" in capsys.readouterr().err


@ray.remote
def _read_in_worker(name):
    arrays = fetch_store(name)
    emb = arrays["embeddings"]
    return {"writeable": emb.flags.writeable, "owndata": emb.flags.owndata,
            "sum": float(emb.astype(np.float64).sum()), "n": len(arrays["ids"])}


def test_workers_read_the_store_zero_copy(tmp_path):
    samples = open_dataset(str(_dataset(tmp_path / "ds")), n_train=None)
    out = str(tmp_path / "store")
    embed_dataset(samples, out, progress=False)
    name = publish_store(out)
    assert publish_store(out) == name  # idempotent
    got = ray.get(_read_in_worker.remote(name))
    expected = EmbeddingStore(out).arrays()["embeddings"]
    assert got == {"writeable": False, "owndata": False, "sum": float(expected.astype(np.float64).sum()), "n": 6}
    with pytest.raises(StoreError, match="no published store"):
        fetch_store("nobody")
    # EnvRunners on other nodes never open the store: the decoder travels with the published arrays
    os.rename(out, out + "_elsewhere")
    assert ray.get(_env_step_in_worker.remote(out, name)) in (-1.0, 1.0)


@ray.remote(num_cpus=0)
def _env_step_in_worker(store: str, holder: str) -> float:
    from alignsam_ray.env.alignsam_env import AlignSamEnv

    env = AlignSamEnv({"store": store, "store_actor": holder, "split": None, "horizon": 3, "obs_res": 8,
                       "labels": "gt"})
    obs, _ = env.reset(seed=0)
    return float(env.step(int(np.flatnonzero(obs["action_mask"])[0]))[1])


def test_embed_with_clip_surgery_maps(tmp_path):
    """`alignsam embed --clip-model micro --clip-text ...`: one fp16 64x64 map column per text, equal to
    CLIP Surgery on the image SAM saw; the store's identity includes the CLIP inputs."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from alignsam_ray.foundation.clip_surgery import ClipSurgery
    from alignsam_ray.foundation.micro_clip import build_micro_clip

    torch.manual_seed(0)
    weights = str(tmp_path / "clip.pt")
    torch.save(build_micro_clip().state_dict(), weights)  # random weights, the micro architecture
    samples = open_dataset(str(_dataset(tmp_path / "ds", n=3)), n_train=None)
    out = str(tmp_path / "store")
    m = embed_dataset(samples, out, clip_model="micro", clip_weights=weights, clip_texts=["a star", "circle"],
                      progress=False)
    assert m["maps"] == ["a_star", "circle"] and m["clip"]["maps"] == {"a_star": "a star", "circle": "circle"}
    arrays = EmbeddingStore(out).arrays()
    clip = ClipSurgery.load("micro", weights)
    by_id = {s.id: s for s in samples}
    for k, sid in enumerate(arrays["ids"]):
        resized = ResizeLongestSide(1024).apply_image(load_pair(by_id[sid])[0])
        expected = clip.maps([resized], ["a star", "circle"])[0]
        assert arrays["map_a_star"].dtype == np.float16 and arrays["map_a_star"].shape[1:] == (64, 64)
        np.testing.assert_allclose(arrays["map_a_star"][k], expected[0], atol=2e-3)
        np.testing.assert_allclose(arrays["map_circle"][k], expected[1], atol=2e-3)
    with pytest.raises(StoreError, match="other inputs.*clip"):
        embed_dataset(samples, out, clip_model="micro", clip_weights=weights, clip_texts=["star"], progress=False)

"""Issue 20 probes: bad input gets one clear line (exit 1, or 2 for usage), never a silent wrong result,
nothing finished is lost, and a shared bundle runs no code. docs/reliability.md lists them with outcomes.

Real code paths on small data: the session's micro-SAM blur store and one tiny PPO iteration on a
4x4 grid (16 patches: fewer than the T sweep's 20).
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import ray
import torch
import yaml
from conftest import folder_dataset
from PIL import Image

from alignsam_ray.cli import main
from alignsam_ray.config import load_config
from alignsam_ray.data import DataError, Sample, load_mask, load_pair, open_dataset
from alignsam_ray.foundation import CheckpointError
from alignsam_ray.store import EmbeddingStore, StoreError

TINY = ["env.grid=4", "env.horizon=3", "env.obs_res=8", "model.width=16", "ppo.train_batch_size=48",
        "ppo.minibatch_size=24", "ppo.num_epochs=2", "train.iterations=1", "train.checkpoint_every=1",
        "resources.sample_timeout_s=300"]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(blur_store, tmp_path_factory):
    """A run folder: one tiny PPO iteration on a 4x4 grid."""
    from alignsam_ray.train import train

    run_dir = tmp_path_factory.mktemp("rel") / "run"
    train(load_config(None, ["task=synthetic_blur", f"store={blur_store}", f"run_dir={run_dir}"] + TINY), progress=False)
    return str(run_dir)


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("relb") / "bundle")
    assert main(["export", "--checkpoint", run, "--out", out]) == 0
    return out


def _copy_store(store, dst, **manifest):
    shutil.copytree(store, dst)
    m = json.load(open(os.path.join(dst, "manifest.json")))
    m.update(manifest)
    json.dump(m, open(os.path.join(dst, "manifest.json"), "w"))
    return str(dst)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ----------------------------------------------------------------------- silent wrong results
def test_evaluate_refuses_a_store_of_another_sam_checkpoint(run, blur_store, tmp_path, capsys):
    """Item 1: same width, other checkpoint (or SAM type): refused, both named; nothing written."""
    other = _copy_store(blur_store, tmp_path / "other", checkpoint_sha256="f" * 64)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", run, "--store", other, "--out", str(out)]) == 1
    own = json.load(open(os.path.join(blur_store, "manifest.json")))["checkpoint_sha256"]
    _one_line_error(capsys, "f" * 12, own[:12], "micro SAM")
    assert not out.exists()
    vit = _copy_store(blur_store, tmp_path / "vit", sam_type="vit_b")
    assert main(["evaluate", "--checkpoint", run, "--store", vit, "--out", str(out)]) == 1
    _one_line_error(capsys, "vit_b SAM", "micro SAM")


def test_evaluate_of_a_grid_smaller_than_the_t_sweep(run, blur_store, tmp_path, capsys):
    """A 16-patch grid: the T sweep stops at 15 and evaluation completes."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", run, "--out", str(out), "--figures", "0"]) == 0
    m = json.load(open(out / "metrics.json"))
    assert set(m["t_sweep"]) == {"1", "5", "10", "15"} and m["horizon"] == 3


def test_decoder_checksum_is_verified_and_a_rerun_rewrites_it(blur_store, tmp_path, capsys):
    """Item 2: a flipped bit in decoder.pt is refused; rerunning embed rewrites it, and only then."""
    from alignsam_ray.store.embed import embed_dataset

    store = _copy_store(blur_store, tmp_path / "store")
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    path = os.path.join(store, "decoder.pt")
    assert len(manifest["decoder_sha256"]) == 64
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(path, "wb").write(bytes(blob))
    with pytest.raises(StoreError, match=r"decoder\.pt is corrupt"):
        EmbeddingStore(store).decoder()
    folder = manifest["dataset"]
    embed_dataset(open_dataset(folder, n_train=None), store, dataset_spec=folder, progress=False)  # no shard to do
    EmbeddingStore(store).decoder()
    before = os.stat(path).st_mtime_ns
    embed_dataset(open_dataset(folder, n_train=None), store, dataset_spec=folder, progress=False)
    assert os.stat(path).st_mtime_ns == before  # intact: not rewritten


@pytest.mark.parametrize("overrides, needles", [
    (["ppo.lr=-1e-3"], ["ppo.lr must be a number > 0"]),
    (["ppo.lr=abc", "env.horizon=0"], ["2 bad config value(s)", "ppo.lr must be a number > 0", "got 'abc'",
                                       "env.horizon must be a whole number >= 1"]),
    (["env.horizon=17"], ["env.horizon (T = 17) must be <= the 16 patches"]),
    (["ppo.gamma=1.5", "ppo.minibatch_size=96"], ["ppo.gamma must be a number in [0, 1]",
                                                   "ppo.minibatch_size (96) must be <= ppo.train_batch_size (48)"]),
    (["env.grid=[8,8"], ["override 'env.grid=[8,8' is not valid YAML"]),
    (["train.val_images=8"], ["train.val_images (8) must be smaller than the 8 training images"]),
])
def test_bad_config_values_stop_before_ray(blur_store, tmp_path, capsys, overrides, needles):
    """Item 3: one line per problem, exit 1, before Ray starts; no run folder left behind."""
    ray.shutdown()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"store": blur_store, "run_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(cfg)] + TINY + overrides) == 1
    _one_line_error(capsys, *needles)
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_malformed_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: x\nenv: {grid: [8, 8}\n")
    assert main(["train", "--config", str(bad)]) == 1
    _one_line_error(capsys, "bad.yaml", "is not valid YAML at line 2")
    bad.write_text("- store\n- x\n")
    assert main(["train", "--config", str(bad)]) == 1
    _one_line_error(capsys, "bad.yaml", "must be a YAML mapping")


def _mask_sample(tmp_path, values: np.ndarray, **kw) -> Sample:
    path, image = str(tmp_path / "m.png"), str(tmp_path / "im.png")
    Image.fromarray(values).save(path)
    Image.fromarray(np.zeros(values.shape + (3,), np.uint8)).save(image)
    return Sample("train/m", "t", "train", image, path, **kw)


def test_16_bit_masks_and_masks_without_foreground(tmp_path):
    """Item 4: a 16-bit 0/4095 mask keeps its foreground; a mask with none left is refused, named."""
    m = np.zeros((8, 8), np.uint16)
    m[:4] = 4095
    s = _mask_sample(tmp_path, m)
    assert Image.open(s.mask_path).mode.startswith("I;16")
    assert load_mask(s)[:4].all() and not load_mask(s)[4:].any()
    assert load_mask(_mask_sample(tmp_path, m * 16)).sum() == 32  # 0/65520 likewise
    graded = np.tile(np.arange(0, 65536, 8192, dtype=np.uint16), (8, 1))  # anti-aliased 16-bit: 0..65535 scale
    assert load_mask(_mask_sample(tmp_path, graded))[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(DataError, match=r"m\.png has no foreground pixels"):
        load_pair(_mask_sample(tmp_path, np.zeros((8, 8), np.uint16)))
    with pytest.raises(DataError, match=r"no foreground pixels .*inverted"):
        load_pair(_mask_sample(tmp_path, np.full((8, 8), 255, np.uint8), invert=True))


@pytest.mark.integration  # embeds with Ray Data
def test_skip_bad_records_listing_and_decode_skips_and_a_failed_embed_leaves_nothing(tmp_path, capsys):
    """Smaller: without --skip-bad a bad image stops the embed, named, and leaves no --out folder; with it,
    a truncated image is caught while listing and recorded in the manifest beside a mask without
    foreground dropped while decoding."""
    root = folder_dataset(tmp_path / "ds", n=4)
    victim = root / "images" / "im1.png"
    victim.write_bytes(victim.read_bytes()[:80])  # header intact, pixels gone
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "masks" / "im2.png")
    out = tmp_path / "store"
    args = ["embed", "--data", str(root), "--out", str(out), "--n-train", "-1"]
    assert main(args) == 1
    _one_line_error(capsys, "im1.png")
    assert not out.exists()
    assert main(args + ["--skip-bad"]) == 0
    m = json.load(open(out / "manifest.json"))
    assert m["n_images"] == 2 and set(m["skipped"]) == {str(victim), "train/im2"}
    assert "no foreground" in m["skipped"]["train/im2"]


def test_bundle_files_must_be_listed_and_verified(bundle, tmp_path):
    """Item 5: an unlisted (edited) config.yaml, a missing file, a truncated manifest: refused, named."""
    from alignsam_ray.predictor import AlignSAMPredictor

    b = shutil.copytree(bundle, tmp_path / "b")
    manifest = json.load(open(b / "manifest.json"))
    assert "policy.pt2" not in manifest["files"] and not (b / "policy.pt2").exists()  # data formats only
    del manifest["files"]["config.yaml"]
    json.dump(manifest, open(b / "manifest.json", "w"))
    with pytest.raises(ValueError, match=r"manifest\.json does not list config\.yaml"):
        AlignSAMPredictor(str(b))
    (b / "manifest.json").write_text('{"format_version": 1, "fi')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        AlignSAMPredictor(str(b))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_bundle_runs_no_code(bundle, tmp_path):
    """Security: a pickle that would run code, with a matching sha256 in the manifest, is refused and
    nothing runs."""
    from alignsam_ray.foundation import file_sha256
    from alignsam_ray.predictor import AlignSAMPredictor

    b = shutil.copytree(bundle, tmp_path / "b")
    marker = tmp_path / "ran"
    torch.save({"state_dict": _Payload(marker)}, b / "srm.pt")
    manifest = json.load(open(b / "manifest.json"))
    manifest["files"]["srm.pt"] = file_sha256(str(b / "srm.pt"))
    json.dump(manifest, open(b / "manifest.json", "w"))
    with pytest.raises(CheckpointError, match="refused") as exc:
        AlignSAMPredictor(str(b))
    assert "weights_only=False" not in str(exc.value) and not marker.exists()


def test_segment_steps_are_checked_before_any_work(bundle, blur_store, tmp_path, capsys):
    image = sorted(glob.glob(os.path.join(os.path.dirname(blur_store), "data", "test", "images", "*")))[0]
    out = tmp_path / "seg"
    assert main(["segment", image, "--bundle", bundle, "--out", str(out), "--steps", "200"]) == 1
    _one_line_error(capsys, "steps must be a whole number in 1..16", "got 200")
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["segment", image, "--bundle", bundle, "--out", str(out), "--steps", "-3"])
    assert exc.value.code == 2
    _one_line_error(capsys, "expected a whole number >= 1, got '-3'")
    assert main(["segment", image, "--bundle", bundle, "--out", str(out), "--steps", "16"]) == 0


def test_train_refuses_env_runners_the_cluster_cannot_host(blur_store, tmp_path, capsys):
    """Item 6: more EnvRunner CPUs than the machine has: a message naming the settings, not a silent hang."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"store": blur_store, "run_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(cfg), "resources.num_env_runners=64",
                 "resources.num_cpus_per_env_runner=1"] + TINY) == 1
    _one_line_error(capsys, "resources.num_env_runners=64", "resources.num_cpus_per_env_runner", "do not fit")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- clear messages
def test_truncated_store_manifest_is_named(blur_store, tmp_path, capsys):
    store = _copy_store(blur_store, tmp_path / "store")
    path = os.path.join(store, "manifest.json")
    open(path, "w").write(open(os.path.join(blur_store, "manifest.json")).read()[:100])
    with pytest.raises(StoreError, match=r"manifest\.json is not valid JSON"):
        EmbeddingStore(store)


def test_unreadable_checkpoint_never_suggests_unsafe_loading(tmp_path, capsys):
    junk = tmp_path / "sam.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    ds = folder_dataset(tmp_path / "ds", n=2)
    assert main(["embed", "--data", str(ds), "--sam", "vit_b", "--checkpoint", str(junk), "--out",
                 str(tmp_path / "store")]) == 1
    err = _one_line_error(capsys, "sam.pth", "not a weights file")
    assert "weights_only" not in err and not (tmp_path / "store").exists()

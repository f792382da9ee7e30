"""Shared fixtures: a small real embedding store (synthetic blur task, micro-SAM, Ray Data)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import ray

# Tests start their own local Ray: never join a cluster that a `ray start` on this machine recorded
# in /tmp/ray/ray_current_cluster (a stale one breaks ray.init; a live one is somebody else's).
os.environ["RAY_ADDRESS"] = "local"
# the CLI writes Ray's own messages to $ALIGNSAM_LOG_DIR/<command>.log: keep the tests' out of ~/.cache
os.environ.setdefault("ALIGNSAM_LOG_DIR", tempfile.mkdtemp(prefix="alignsam_test_logs_"))


RAY_MODULES = {"test_train", "test_tune", "test_store", "test_export"}  # every test there starts Ray


def pytest_collection_modifyitems(config, items):
    """Layers: `cluster` (test_cluster.py), `integration` (a test that starts Ray: the modules above and any
    test using the Ray-built ``blur_store``); the rest is the fast unit layer."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module == "test_cluster":
            item.add_marker(pytest.mark.cluster)
        elif module in RAY_MODULES or "blur_store" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def blur_store(tmp_path_factory):
    """Path of a finished store: 8 train + 6 test synthetic_blur images embedded by micro-SAM."""
    from alignsam_ray.data import generate_task, open_dataset
    from alignsam_ray.store.embed import embed_dataset

    root = tmp_path_factory.mktemp("blur")
    folder = generate_task("synthetic_blur", str(root / "data"), n_train=8, n_test=6, seed=0, progress=False)
    samples = open_dataset(folder, n_train=None)
    was_running = ray.is_initialized()
    embed_dataset(samples, str(root / "store"), sam_type="micro", dataset_spec=folder, progress=False)
    if not was_running:
        ray.shutdown()
    return str(root / "store")


@pytest.fixture(scope="session")
def micro_decoder():
    from alignsam_ray.foundation import load_sam
    from alignsam_ray.foundation.decoder import SamPromptDecoder

    return SamPromptDecoder.from_sam(load_sam("micro"), "micro")


def toy_data(sizes=((300, 600), (500, 250)), seed=0) -> dict:
    """Hand-made store arrays: random embeddings; ground truth = left half of the image is
    foreground, a void band at the top. sizes: (H, W) per image."""
    rng = np.random.default_rng(seed)
    n = len(sizes)
    gt = np.zeros((n, 256, 256), np.uint8)
    input_size = np.zeros((n, 2), np.int32)
    for k, (h, w) in enumerate(sizes):
        s = 1024 / max(h, w)
        ih, iw = int(h * s + 0.5), int(w * s + 0.5)
        input_size[k] = ih, iw
        ph, pw = int(np.ceil(ih / 4)), int(np.ceil(iw / 4))
        gt[k, :ph, : pw // 2] = 1
        gt[k, : ph // 8, :pw] = 255
        gt[k, ph:, :] = 0
    return {
        "ids": np.array([f"test/{k}" for k in range(n)]),
        "embeddings": rng.standard_normal((n, 64, 64, 64)).astype(np.float16),
        "gt_lowres": gt,
        "original_size": np.array(sizes, np.int32),
        "input_size": input_size,
    }


TINY = ["env.horizon=3", "env.obs_res=8", "model.width=16", "ppo.train_batch_size=48", "ppo.minibatch_size=24",
        "ppo.num_epochs=2", "train.iterations=1", "train.checkpoint_every=1", "resources.sample_timeout_s=300"]


@pytest.fixture(scope="session")
def trained_run(blur_store, tmp_path_factory):
    """A run folder trained for one tiny PPO iteration on the blur store."""
    from alignsam_ray.config import load_config
    from alignsam_ray.train import Trainer

    run = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(None, ["task=synthetic_blur", f"store={blur_store}", f"run_dir={run}"] + TINY)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    trainer.stop()
    ray.shutdown()
    return str(run)


@pytest.fixture(scope="session")
def bundle(trained_run, tmp_path_factory):
    """`alignsam export` of ``trained_run`` (with policy.pt2)."""
    from alignsam_ray.cli import main

    out = str(tmp_path_factory.mktemp("bundle") / "b")
    assert main(["export", "--checkpoint", trained_run, "--out", out, "--pt2"]) == 0
    return out


def folder_dataset(root, n=4):
    """A generic-layout dataset (root/images, root/masks: n random 24 x 32 images, one rectangle each) -> root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        mask = np.zeros((24, 32), np.uint8)
        mask[4:12, 4:20] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root

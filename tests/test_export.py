"""Export (`alignsam export`) and Ray-free segmentation (`alignsam segment`, AlignSAMPredictor)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from conftest import TINY
from PIL import Image

from alignsam_ray.cli import main as cli_main
from alignsam_ray.config import load_config


def test_bundle_contents(bundle):
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    assert set(m["files"]) == {"policy.pt2", "policy.onnx", "srm.pt", "config.yaml"}
    assert m["sam"]["sam_type"] == "micro" and len(m["sam"]["checkpoint_sha256"]) == 64
    assert m["policy_inputs"] == {"obs": ["B", 64, 8, 8], "action_mask": ["B", 100]} and m["horizon"] == 3


def test_exported_policy_matches_rl_module(trained_run, bundle):
    """Parity: the .pt2 program (--pt2) and the ONNX graph give the RLModule's logits within 1e-5."""
    import onnxruntime

    from alignsam_ray.evaluate import Agent

    module = Agent.load(trained_run).module
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((5, 64, 8, 8)).astype(np.float16).astype(np.float32)
    mask = (rng.random((5, 100)) > 0.3).astype(np.float32)
    with torch.no_grad():
        want = module.masked_logits(torch.from_numpy(obs), torch.from_numpy(mask)).numpy()
    program = torch.export.load(os.path.join(bundle, "policy.pt2")).module()
    with torch.no_grad():
        got_pt2 = program(torch.from_numpy(obs), torch.from_numpy(mask)).numpy()
    session = onnxruntime.InferenceSession(os.path.join(bundle, "policy.onnx"))
    got_onnx = session.run(None, {"obs": obs, "action_mask": mask})[0]
    free = mask > 0
    np.testing.assert_allclose(got_pt2[free], want[free], atol=1e-5)
    np.testing.assert_allclose(got_onnx[free], want[free], atol=1e-5)
    assert (got_pt2[~free] < -1e30).all() and (got_onnx[~free] < -1e30).all()  # masked patches stay masked
    assert (got_pt2.argmax(1) == want.argmax(1)).all()


def test_segment_runs_without_ray_and_writes_masks(bundle, blur_store, tmp_path):
    images = sorted(glob.glob(os.path.join(os.path.dirname(blur_store), "data", "test", "images", "*")))[:3]
    out = tmp_path / "seg"
    code = ("import sys; from alignsam_ray.cli import main; "
            f"rc = main(['segment', *{images!r}, '--bundle', {bundle!r}, '--out', {str(out)!r}]); "
            "assert 'ray' not in sys.modules, 'segment imported Ray'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        size = Image.open(path).size
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / f"{stem}_overlay.png").size == size


def test_predictor_reproduces_evaluation_rollout(trained_run, bundle, blur_store):
    """The Ray-free predictor re-embeds the images and gives the masks evaluation computes from the store."""
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.evaluate import Agent, rollout
    from alignsam_ray.predictor import AlignSAMPredictor
    from alignsam_ray.store.loader import EmbeddingStore

    st = EmbeddingStore(blur_store)
    data = st.arrays("test")
    agent = Agent.load(trained_run)
    T = agent.cfg.env.horizon
    ref = rollout(agent, data, st.decoder(), actions="policy", labels="srm", horizon=T, record=(T,))
    folder = os.path.join(os.path.dirname(blur_store), "data", "test", "images")
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    assert [os.path.splitext(os.path.basename(p))[0] for p in paths] == [i.split("/")[-1] for i in data["ids"]]
    preds = AlignSAMPredictor(bundle).predict_batch([read_image(p) for p in paths])
    for k, pred in enumerate(preds):
        ref_points, ref_labels = ref.points[T][k]
        np.testing.assert_array_equal(pred.labels, ref_labels)
        np.testing.assert_allclose(pred.low_res_logits, ref.logits[T][k], atol=1e-3)


def test_bundle_errors(bundle, tmp_path):
    from alignsam_ray.foundation import CheckpointError
    from alignsam_ray.predictor import AlignSAMPredictor

    with pytest.raises(FileNotFoundError, match="not an alignsam bundle"):
        AlignSAMPredictor(str(tmp_path))
    wrong = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="not the SAM checkpoint"):
        AlignSAMPredictor(bundle, sam_checkpoint=str(wrong))


def test_explicit_branch_trains_exports_and_segments(blur_store, tmp_path):
    """Explicit SRM branch end to end: a store with CLIP Surgery maps (micro CLIP architecture, random
    weights), one PPO iteration, export, then the Ray-free predictor recomputes the map from the image
    and reproduces evaluation's rollout; a different CLIP weights file is refused."""
    from alignsam_ray.data import open_dataset
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.evaluate import Agent, rollout
    from alignsam_ray.foundation import CheckpointError
    from alignsam_ray.foundation.micro_clip import build_micro_clip
    from alignsam_ray.predictor import AlignSAMPredictor
    from alignsam_ray.store.embed import embed_dataset
    from alignsam_ray.store.loader import EmbeddingStore
    from alignsam_ray.train import Trainer

    torch.manual_seed(0)
    weights = str(tmp_path / "clip.pt")
    torch.save(build_micro_clip().state_dict(), weights)
    folder = os.path.join(os.path.dirname(blur_store), "data")
    store = str(tmp_path / "store")
    m = embed_dataset(open_dataset(folder, n_train=None), store, clip_model="micro", clip_weights=weights,
                      dataset_spec=folder, progress=False)
    assert m["maps"] == ["defocus_background"]
    run = tmp_path / "run"
    cfg = load_config(None, ["task=synthetic_blur", f"store={store}", f"run_dir={run}", "srm.branch=explicit",
                             "srm.text_map=defocus_background"] + TINY)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    trainer.stop()
    ray.shutdown()
    out = str(tmp_path / "bundle")
    assert cli_main(["export", "--checkpoint", str(run), "--out", out]) == 0
    assert json.load(open(os.path.join(out, "manifest.json")))["clip"]["maps"] == {"defocus_background": "defocus background"}

    st = EmbeddingStore(store)
    data = st.arrays("test")
    agent = Agent.load(str(run))
    assert agent.srm.branch == "explicit"
    T = agent.cfg.env.horizon
    ref = rollout(agent, data, st.decoder(), actions="policy", labels="srm", horizon=T, record=(T,))
    images = [read_image(os.path.join(folder, "test", "images", i.split("/")[-1] + ".png")) for i in data["ids"]]
    preds = AlignSAMPredictor(out, clip_weights=weights).predict_batch(images)
    for k, pred in enumerate(preds):
        np.testing.assert_array_equal(pred.labels, ref.points[T][k][1])
        np.testing.assert_allclose(pred.low_res_logits, ref.logits[T][k], atol=1e-3)
    other = str(tmp_path / "other_clip.pt")
    torch.save(build_micro_clip().state_dict(), other)  # other random weights
    with pytest.raises(CheckpointError, match="not the CLIP weights file"):
        AlignSAMPredictor(out, clip_weights=other)


def _collection(blur_store, root) -> list[str]:
    """A folder to segment: 3 test images at the top, 2 in a subfolder, one corrupt file."""
    images = sorted(glob.glob(os.path.join(os.path.dirname(blur_store), "data", "test", "images", "*")))
    (root / "sub").mkdir(parents=True)
    for k, path in enumerate(images[:5]):
        dst = root / (f"img{k}.png" if k < 3 else f"sub/img{k}.png")
        dst.write_bytes(open(path, "rb").read())
    (root / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    return images[:5]


def test_segment_ray_collection_matches_ray_free_and_resumes(bundle, blur_store, tmp_path, capsys):
    """`alignsam segment --ray` (Ray Data, file:// URIs): the same masks as the Ray-free `alignsam segment`,
    an index row per image (a corrupt file listed with its reason), a rerun that redoes only what is
    missing, and --strict stopping at the corrupt file."""
    import pyarrow.parquet as pq

    from alignsam_ray.ray_session import init_ray

    src = tmp_path / "in"
    _collection(blur_store, src)
    out = tmp_path / "out"
    argv = ["segment", "--ray", f"file://{src}", "--bundle", bundle, "--out", f"file://{out}", "--batch", "2",
            "--overlays"]
    assert cli_main(argv) == 0
    shown = capsys.readouterr()
    assert "6 images" in shown.out and "5 segmented, 1 unreadable" in shown.out and "img/s" in shown.err
    rows = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert sorted(rows) == ["img0.png", "img1.png", "img2.png", "sub/broken.jpg", "sub/img3.png", "sub/img4.png"]
    bad = rows["sub/broken.jpg"]
    assert bad["status"] == "error" and "broken.jpg" in bad["error"] and bad["mask"] == ""
    ray_free = tmp_path / "single"  # a different batch composition from the Ray pipeline's
    files = [str(src / r) for r in sorted(rows) if rows[r]["status"] == "ok"]
    assert cli_main(["segment", *files, "--bundle", bundle, "--out", str(ray_free), "--batch", "3"]) == 0
    for rel, row in rows.items():
        if row["status"] != "ok":
            continue
        stem = os.path.splitext(rel)[0]
        mask = np.asarray(Image.open(out / "masks" / f"{stem}_mask.png"))
        assert np.array_equal(mask, np.asarray(Image.open(ray_free / f"{os.path.basename(stem)}_mask.png"))), rel
        assert row["n_points"] == len(row["labels"]) == len(row["points"]) // 2 == 2 + 3  # T = 3 (TINY)
        assert (row["height"], row["width"]) == mask.shape and row["seconds"] > 0
        assert (out / "overlays" / f"{stem}_overlay.png").is_file()
    assert not ray.is_initialized()  # the command stopped the local Ray it started
    os.remove(out / "masks" / "sub" / "img3_mask.png")  # lost output: redone; finished ones are skipped
    before = os.path.getmtime(out / "masks" / "img0_mask.png")
    init_ray(logging_level="WARNING", log_to_driver=False)  # the reruns join a Ray already up and leave it up
    try:
        assert cli_main(argv) == 0
        again = capsys.readouterr().out
        assert "4 already done; 2 to segment" in again  # img3 (mask gone) and the corrupt file (retried)
        assert os.path.getmtime(out / "masks" / "img0_mask.png") == before
        assert (out / "masks" / "sub" / "img3_mask.png").is_file()
        assert len(pq.read_table(out / "index.parquet")) == 6  # the latest row per image
        assert cli_main(argv + ["--strict"]) == 1
        assert "broken.jpg" in capsys.readouterr().err
        assert ray.is_initialized()
    finally:
        ray.shutdown()


def test_segment_ray_errors(bundle, tmp_path, capsys):
    assert cli_main(["segment", "--ray", str(tmp_path / "nope"), "--bundle", bundle, "--out", str(tmp_path / "o")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "dup").mkdir()
    for name in ("a.png", "a.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "dup" / name)
    assert cli_main(["segment", "--ray", str(tmp_path / "dup"), "--bundle", bundle, "--out", str(tmp_path / "o")]) == 1
    assert "would write the same mask" in capsys.readouterr().err
    assert cli_main(["segment", "--bundle", bundle, "--out", str(tmp_path / "o")]) == 1
    assert "give image files" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["segment", "--ray", str(tmp_path / "empty"), "--bundle", bundle, "--out", str(tmp_path / "o")]) == 1
    assert "no images under" in capsys.readouterr().err

"""SAM 2.1 backends (foundation/sam2_models.py) against the official ``sam2`` package: checkpoints in the
official format ({"model": state_dict}) with random weights, loaded through our loader, compared with
``SAM2ImagePredictor`` itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

from alignsam_ray.foundation import CheckpointError
from alignsam_ray.foundation.sam2_models import (
    FEATURE_SHAPES,
    SAM2_TYPES,
    Sam2ImageEncoder,
    Sam2PromptDecoder,
    load_sam2,
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A Hiera-T SAM 2.1 with random weights, saved as Meta's sam2.1_hiera_tiny.pt is: {"model": state_dict}."""
    torch.manual_seed(1)
    model = build_sam2(SAM2_TYPES["sam2.1_hiera_t"][0], ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The official predictor, built by the official builder from the same file."""
    return SAM2ImagePredictor(build_sam2(SAM2_TYPES["sam2.1_hiera_t"][0], ckpt_path=tiny_checkpoint, device="cpu"))


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), rng.integers(0, 256, (480, 260, 3), dtype=np.uint8)]


def test_features_equal_the_image_predictors(tiny_checkpoint, reference):
    model = load_sam2("sam2.1_hiera_t", tiny_checkpoint)
    feats = Sam2ImageEncoder(model).encode(_images())
    assert {k: v.shape[1:] for k, v in feats.items()} == FEATURE_SHAPES
    for b, image in enumerate(_images()):
        reference.set_image(image)
        ref = reference._features  # what SAM2ImagePredictor.predict decodes from
        for mine, theirs in ((feats["image_embed"][b], ref["image_embed"][0]),
                             (feats["high_res_feats_0"][b], ref["high_res_feats"][0][0]),
                             (feats["high_res_feats_1"][b], ref["high_res_feats"][1][0])):
            np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-4, rtol=1e-4)
            # the store keeps float16: the round trip stays within fp16 resolution
            np.testing.assert_allclose(mine.astype(np.float16).astype(np.float32), theirs.numpy(), atol=2e-3,
                                       rtol=2e-3)


def test_decoder_equals_the_image_predictors_predict(tiny_checkpoint, reference):
    model = load_sam2("sam2.1_hiera_t", tiny_checkpoint)
    encoder, decoder = Sam2ImageEncoder(model), Sam2PromptDecoder.from_model(model, "sam2.1_hiera_t")
    images = _images()
    feats = encoder.encode(images)
    points = [np.array([[100.0, 80.0], [400.0, 250.0], [30.5, 290.0]]), np.array([[20.0, 400.0], [200.0, 100.0],
                                                                                 [130.0, 240.0]])]
    labels = [np.array([1, 0, 1]), np.array([1, 1, 0])]
    for b, image in enumerate(images):
        reference.set_image(image)
        for multimask in (False, True):
            masks, iou, low = reference.predict(point_coords=points[b], point_labels=labels[b],
                                                multimask_output=multimask, return_logits=True)
            mine, my_iou = decoder.predict({k: v[b] for k, v in feats.items()}, points[b], labels[b], image.shape[:2],
                                           multimask)
            np.testing.assert_allclose(mine, low, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(my_iou, iou, atol=1e-4)
            up = decoder.upscale(mine, image.shape[:2]).numpy()
            assert ((up > 0) == (masks > 0)).mean() > 0.9999
    # batched over both images in one call (the env's and the rollout's use) == one at a time
    frame = np.stack([decoder.to_input_frame(p, im.shape[:2]) for p, im in zip(points, images)])
    batched, _ = decoder.decode(feats["image_embed"], frame, np.stack(labels),
                                high_res_feats_0=feats["high_res_feats_0"], high_res_feats_1=feats["high_res_feats_1"])
    for b in range(2):
        one, _ = decoder.predict({k: v[b] for k, v in feats.items()}, points[b], labels[b], images[b].shape[:2])
        np.testing.assert_allclose(batched[b].numpy(), one, atol=1e-4, rtol=1e-4)


def test_checkpoint_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam2("sam2.1_hiera_t", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        load_sam2("sam2.1_hiera_t", None)
    with pytest.raises(CheckpointError, match="unknown SAM 2 type"):
        load_sam2("sam2.1_hiera_xl", tiny_checkpoint)
    sam1 = tmp_path / "sam_like.pth"
    torch.save({"mask_decoder.x": torch.zeros(1)}, sam1)
    with pytest.raises(CheckpointError, match="not a SAM 2 checkpoint.*'model'"):
        load_sam2("sam2.1_hiera_t", str(sam1))
    blob = torch.load(tiny_checkpoint, weights_only=True)
    del blob["model"]["sam_mask_decoder.iou_token.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(blob, broken)
    with pytest.raises(CheckpointError, match="does not fit the sam2.1_hiera_t architecture.*missing: "
                                              "sam_mask_decoder.iou_token.weight"):
        load_sam2("sam2.1_hiera_t", str(broken))
    with pytest.raises(CheckpointError, match="holds a sam2.1_hiera_t model, but sam2.1_hiera_s was asked for"):
        load_sam2("sam2.1_hiera_s", tiny_checkpoint)


@pytest.fixture
def no_ray_left():
    yield
    __import__("ray").shutdown()  # the CLI calls below start a local Ray in this process


@pytest.mark.integration
def test_sam2_store_env_train_evaluate_export_segment(tiny_checkpoint, reference, tmp_path, capsys, no_ray_left):
    """A random-weight Hiera-T in the official format, end to end: `alignsam embed --sam sam2.1_hiera_t`
    stores SAM2ImagePredictor.set_image's features (fp16) in its frame; the env decodes a set of points
    as SAM2ImagePredictor.predict does (1e-4 on logits, the same stored features given to both); then
    train 1 iteration -> evaluate -> export -> `alignsam segment` (the masks evaluation computes)."""
    import os

    from PIL import Image

    from alignsam_ray.cli import main
    from alignsam_ray.data import generate_task
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.env.episodes import PromptEpisodes
    from alignsam_ray.env.grid import PatchGrid
    from alignsam_ray.foundation.decoder import load_prompt_decoder
    from alignsam_ray.store.embed import lowres_mask
    from alignsam_ray.store.loader import EmbeddingStore

    folder = generate_task("synthetic_shadow", str(tmp_path / "data"), n_train=3, n_test=2, seed=0, progress=False)
    store = tmp_path / "store"
    assert main(["embed", "--data", folder, "--sam", "sam2.1_hiera_t", "--checkpoint", tiny_checkpoint,
                 "--clip-model", "micro", "--out", str(store)]) == 0
    st = EmbeddingStore(str(store))
    assert st.manifest["sam_type"] == "sam2.1_hiera_t" and st.manifest["frame"] == "square"
    data = st.arrays("test")
    assert data["high_res_feats_0"].shape[1:] == (32, 256, 256) and data["high_res_feats_1"].shape[1:] == (64, 128, 128)
    paths = dict(zip(st.table()["id"].to_pylist(), st.table()["image_path"].to_pylist()))
    gt = st.gt_full("test")
    dec = load_prompt_decoder(__import__("io").BytesIO(st.decoder_bytes()))  # what an EnvRunner loads
    assert isinstance(dec, Sam2PromptDecoder)
    episodes = PromptEpisodes(data=data, decoder=dec, grid=PatchGrid(10, 10), num_slots=1, horizon=15, obs_res=16,
                              init="gt", labels="gt", state="probability")
    for k, i in enumerate(data["ids"]):
        image = read_image(paths[i])
        reference.set_image(image)
        ref = reference._features
        stored = {"image_embed": data["embeddings"][k], "high_res_feats": [data["high_res_feats_0"][k],
                                                                           data["high_res_feats_1"][k]]}
        np.testing.assert_allclose(stored["image_embed"].astype(np.float32), ref["image_embed"][0].numpy(),
                                   atol=2e-3, rtol=2e-3)
        for mine, theirs in zip(stored["high_res_feats"], ref["high_res_feats"]):
            np.testing.assert_allclose(mine.astype(np.float32), theirs[0].numpy(), atol=2e-3, rtol=2e-3)
        assert tuple(data["input_size"][k]) == (1024, 1024) and tuple(data["original_size"][k]) == image.shape[:2]
        assert np.array_equal(data["gt_lowres"][k], lowres_mask(gt[i], (1024, 1024)))
        # the env's decode of these points == the official predictor's, on the same (stored) features
        reference._features = {"image_embed": torch.from_numpy(stored["image_embed"].astype(np.float32))[None],
                               "high_res_feats": [torch.from_numpy(f.astype(np.float32))[None]
                                                  for f in stored["high_res_feats"]]}
        h, w = image.shape[:2]
        points, labels = np.array([[w * 0.3, h * 0.4], [w * 0.8, h * 0.1], [w * 0.5, h * 0.9]]), np.array([1, 0, 1])
        _, _, ref_low = reference.predict(point_coords=points, point_labels=labels, multimask_output=False,
                                          return_logits=True)
        episodes.image[0], episodes.t[0] = k, 1
        episodes.coords[0, :3], episodes.labels[0, :3] = dec.to_input_frame(points, (h, w)), labels
        episodes._decode(np.array([0]))
        np.testing.assert_allclose(episodes.logits[0], ref_low[0], atol=1e-4, rtol=1e-4)
    bytes_per_image = sum(os.path.getsize(store / n) for n in st.manifest["shards"]) / st.manifest["n_images"]
    assert bytes_per_image > 6e6  # 2 MB embedding + 4 MB + 2 MB high-res features, fp16

    run, ev, bundle, seg = (str(tmp_path / n) for n in ("run", "eval", "bundle", "seg"))
    tiny = ["env.horizon=3", "env.obs_res=8", "model.width=16", "ppo.train_batch_size=48", "ppo.minibatch_size=24",
            "ppo.num_epochs=2", "train.iterations=1", "resources.num_env_runners=1", f"run_dir={run}"]
    assert main(["train", "--store", str(store), *tiny, "--quiet"]) == 0
    assert main(["evaluate", "--checkpoint", run, "--out", ev, "--figures", "1"]) == 0
    assert main(["export", "--checkpoint", run, "--out", bundle]) == 0
    capsys.readouterr()
    images = [paths[i] for i in data["ids"]]
    assert main(["segment", *images, "--bundle", bundle, "--sam-checkpoint", tiny_checkpoint, "--out", seg]) == 0
    # the Ray-free predictor re-embeds the images and gives the masks evaluation computes from the store
    from alignsam_ray.evaluate import Agent, rollout
    from alignsam_ray.predictor import AlignSAMPredictor

    agent = Agent.load(run)
    ref = rollout(agent, data, st.decoder(), actions="policy", labels="srm", horizon=3, record=(3,))
    preds = AlignSAMPredictor(bundle, sam_checkpoint=tiny_checkpoint).predict_batch([read_image(p) for p in images])
    for k, pred in enumerate(preds):
        np.testing.assert_array_equal(pred.labels, ref.points[3][k][1])
        np.testing.assert_allclose(pred.low_res_logits, ref.logits[3][k], atol=1e-3)
    metrics = __import__("json").load(open(os.path.join(ev, "metrics.json")))
    assert metrics["n_images"] == 2 and os.listdir(os.path.join(ev, "figures"))
    for path in images:
        mask = np.asarray(Image.open(os.path.join(seg, os.path.splitext(os.path.basename(path))[0] + "_mask.png")))
        assert mask.shape == read_image(path).shape[:2] and set(np.unique(mask)) <= {0, 255}
    # a whole folder through Ray Data: the same masks
    assert main(["segment", "--ray", os.path.dirname(images[0]), "--bundle", bundle, "--sam-checkpoint",
                 tiny_checkpoint, "--out", str(tmp_path / "seg_ray")]) == 0
    for path in images:
        name = os.path.splitext(os.path.basename(path))[0] + "_mask.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "seg_ray" / "masks" / name)),
                              np.asarray(Image.open(os.path.join(seg, name))))

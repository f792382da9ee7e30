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
    frame = np.stack([decoder.to_frame(p, im.shape[:2]) for p, im in zip(points, images)])
    batched, _ = decoder.decode(feats, frame, np.stack(labels))
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


@pytest.mark.integration
def test_embed_a_sam2_store(tiny_checkpoint, reference, tmp_path, capsys):
    """`alignsam embed --sam sam2.1_hiera_t`: the stored embedding and high-resolution features equal
    SAM2ImagePredictor.set_image's (fp16), in its frame (1024 x 1024, no padding); the store's decoder
    file rebuilds the same decoder; training on the store is refused with a clear message."""
    import os

    from alignsam_ray.cli import main
    from alignsam_ray.data import generate_task
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.store.embed import lowres_mask
    from alignsam_ray.store.loader import EmbeddingStore

    folder = generate_task("synthetic_shadow", str(tmp_path / "data"), n_train=2, n_test=1, seed=0, progress=False)
    store = tmp_path / "store"
    assert main(["embed", "--data", folder, "--sam", "sam2.1_hiera_t", "--checkpoint", tiny_checkpoint,
                 "--clip-model", "micro", "--out", str(store)]) == 0
    capsys.readouterr()
    st = EmbeddingStore(str(store))
    assert st.manifest["sam_type"] == "sam2.1_hiera_t" and st.manifest["frame"] == "square"
    data = st.arrays()
    assert data["high_res_feats_0"].shape[1:] == (32, 256, 256) and data["high_res_feats_1"].shape[1:] == (64, 128, 128)
    paths = dict(zip(st.table()["id"].to_pylist(), st.table()["image_path"].to_pylist()))
    for k, i in enumerate(data["ids"]):
        image = read_image(paths[i])
        reference.set_image(image)
        ref = reference._features
        for mine, theirs in ((data["embeddings"][k], ref["image_embed"][0]),
                             (data["high_res_feats_0"][k], ref["high_res_feats"][0][0]),
                             (data["high_res_feats_1"][k], ref["high_res_feats"][1][0])):
            np.testing.assert_allclose(mine.astype(np.float32), theirs.numpy(), atol=2e-3, rtol=2e-3)
        assert tuple(data["input_size"][k]) == (1024, 1024) and tuple(data["original_size"][k]) == image.shape[:2]
    gt = st.gt_full()
    first = data["ids"][0]
    assert np.array_equal(data["gt_lowres"][0], lowres_mask(gt[first], (1024, 1024)))
    dec = st.decoder()
    assert isinstance(dec, Sam2PromptDecoder)
    original = Sam2PromptDecoder.from_model(load_sam2("sam2.1_hiera_t", tiny_checkpoint), "sam2.1_hiera_t")
    for (name, a), (_, b) in zip(dec.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    shard_bytes = sum(os.path.getsize(store / n) for n in st.manifest["shards"]) / len(data["ids"])
    assert shard_bytes > 6e6  # 2 MB embedding + 4 MB + 2 MB high-res features (fp16, zstd barely helps)
    assert main(["train", "--store", str(store)]) == 1
    assert "SAM 2.1" in capsys.readouterr().err

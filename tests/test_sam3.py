"""SAM 3 backend (foundation/sam3_models.py) against the official ``sam3`` package (an optional extra: the module
is skipped without it). Fast: the interactive predictor's decoder side on sam3's own tracker (``build_tracker``,
12M parameters) and the env in SAM 3's frame. Slow: a reduced image model (a 2-block ViT, the official necks and
heads: its image passes take the time) and the whole SAM 3 image model (860M parameters, random weights, saved in
the official format; one build 4.5 GB and minutes here, docs/store.md), end to end."""
from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch

pytest.importorskip("sam3", reason="the SAM 3 extra is not installed (docs/store.md: SAM 3)")

from alignsam_ray.foundation import CheckpointError  # noqa: E402
from alignsam_ray.foundation.decoder import load_prompt_decoder  # noqa: E402
from alignsam_ray.foundation.sam2_models import Sam2PromptDecoder  # noqa: E402
from alignsam_ray.foundation.sam3_models import (  # noqa: E402
    FEATURE_SHAPES,
    Sam3ImageEncoder,
    Sam3PromptDecoder,
    _building,
    bpe_path,
    load_sam3,
    text_masks,
)

TRACKER = "inst_interactive_predictor.model."


@pytest.fixture(scope="module")
def tracker():
    """sam3's own interactive-predictor model (no image backbone), seeded random weights."""
    from sam3.model_builder import build_tracker

    torch.manual_seed(3)
    with _building():
        return build_tracker(apply_temporal_disambiguation=False).eval()


def _features(seed: int, b: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((b, *s), generator=g) for k, s in FEATURE_SHAPES.items()}


def _official(tracker, feats: dict, b: int, hw):
    """SAM3InteractiveImagePredictor on given features, as ``Sam3Image.predict_inst`` sets them. Its hole filling
    is off here (max_hole_area=0): it changes only the binary masks (``test_hole_filling_is_the_predictors``), and
    on a random model's noisy masks its CPU path (one pass per connected component) takes minutes."""
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor

    pred = SAM3InteractiveImagePredictor(tracker, max_hole_area=0.0)
    pred._features = {"image_embed": feats["image_embed"][b:b + 1],
                      "high_res_feats": [feats["high_res_feats_0"][b:b + 1], feats["high_res_feats_1"][b:b + 1]]}
    pred._is_image_set, pred._orig_hw = True, [hw]
    return pred


def test_decoder_equals_the_interactive_predictors_predict(tracker):
    dec = load_prompt_decoder(_saved(Sam3PromptDecoder.from_model(tracker)))  # what a store's decoder.pt gives
    assert isinstance(dec, Sam3PromptDecoder) and (dec.frame_size, dec.grid_size, dec.lowres_size) == (1008, 72, 288)
    feats = _features(0, 2)
    sizes = [(300, 500), (480, 260)]
    points = [np.array([[100.0, 80.0], [400.0, 250.0], [30.5, 290.0]]), np.array([[20.0, 400.0], [200.0, 100.0],
                                                                                 [130.0, 240.0]])]
    labels = [np.array([1, 0, 1]), np.array([1, 1, 0])]
    for b, hw in enumerate(sizes):
        ref = _official(tracker, feats, b, hw)
        for multimask in (False, True):
            masks, iou, low = ref.predict(point_coords=points[b], point_labels=labels[b], multimask_output=multimask,
                                          return_logits=False)
            mine, my_iou = dec.predict({k: v[b].numpy() for k, v in feats.items()}, points[b], labels[b], hw, multimask)
            assert mine.shape == (3 if multimask else 1, 288, 288)
            np.testing.assert_allclose(mine, low, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(my_iou, iou, atol=1e-4)
            unfilled = Sam2PromptDecoder.upscale(dec, mine, hw).numpy() > 0  # the mask before hole filling
            assert (unfilled == masks).mean() > 0.9999
    frame = np.stack([dec.to_input_frame(p, hw) for p, hw in zip(points, sizes)])
    assert frame.max() < 1008 and np.allclose(frame[0, 0], [100 / 500 * 1008, 80 / 300 * 1008])
    batched, _ = dec.decode(feats["image_embed"], frame, np.stack(labels), high_res_feats_0=feats["high_res_feats_0"],
                            high_res_feats_1=feats["high_res_feats_1"])
    for b in range(2):
        one, _ = dec.predict({k: v[b].numpy() for k, v in feats.items()}, points[b], labels[b], sizes[b])
        np.testing.assert_allclose(batched[b].numpy(), one, atol=1e-4, rtol=1e-4)


def test_hole_filling_is_the_predictors(tracker):
    """Background islands of <= 256 low-res pixels become foreground before upscaling (as
    SAM3InteractiveImagePredictor's postprocess_masks with its default max_hole_area); larger ones stay."""
    from sam3.model.utils.sam1_utils import SAM2Transforms

    low = -np.ones((1, 288, 288), np.float32)
    low[0, 20:120, 20:120] = 5.0
    low[0, 50:60, 50:60] = -3.0  # a 100-pixel hole: filled
    low[0, 150:250, 150:250] = 5.0
    low[0, 170:230, 170:230] = -3.0  # a 3600-pixel hole: kept
    mine = Sam3PromptDecoder.from_model(tracker).upscale(low, (400, 600)).numpy() > 0
    theirs = SAM2Transforms(1008, 0.0, max_hole_area=256.0).postprocess_masks(torch.from_numpy(low)[None], (400, 600))
    assert np.array_equal(mine, theirs[0].numpy() > 0)
    assert mine[0, int(55 / 288 * 400), int(55 / 288 * 600)] and not mine[0, int(200 / 288 * 400), int(200 / 288 * 600)]


def _saved(decoder) -> io.BytesIO:
    f = io.BytesIO()
    decoder.save(f)
    f.seek(0)
    return f


def test_env_runs_in_sam3s_frame(tracker):
    """PromptEpisodes on a SAM 3 store's arrays: patch centres in the squashed 1008 frame, 288 x 288 masks,
    ground truth read at the low-res pixel under each point."""
    from alignsam_ray.env.episodes import PromptEpisodes
    from alignsam_ray.env.grid import PatchGrid
    from alignsam_ray.store.embed import lowres_mask

    dec = Sam3PromptDecoder.from_model(tracker)
    feats = _features(1, 2)
    gt = np.zeros((300, 600), np.uint8)
    gt[:, 300:] = 1  # the right half
    data = {"ids": np.array(["a", "b"]), "embeddings": feats["image_embed"].numpy().astype(np.float16),
            "high_res_feats_0": feats["high_res_feats_0"].numpy().astype(np.float16),
            "high_res_feats_1": feats["high_res_feats_1"].numpy().astype(np.float16),
            "gt_lowres": np.stack([lowres_mask(gt, (1008, 1008), 1008, 288)] * 2),
            "original_size": np.array([[300, 600]] * 2), "input_size": np.array([[1008, 1008]] * 2)}
    assert data["gt_lowres"].shape == (2, 288, 288) and data["gt_lowres"][0, :, 143].max() == 0 and \
        data["gt_lowres"][0, :, 144].min() == 1
    grid = PatchGrid(10, 10)
    ep = PromptEpisodes(data=data, decoder=dec, grid=grid, num_slots=2, horizon=3, obs_res=8, init="gt", labels="gt", state="probability", seed=0)
    ep.reset([0, 1], [0, 1])
    assert ep.logits.shape == (2, 288, 288) and ep.obs.shape == (2, 256, 8, 8)
    centres = ep.centres_sam(0)
    np.testing.assert_allclose(centres[99], [0.95 * 1008, 0.95 * 1008], rtol=1e-6)  # bottom right: squashed frame
    r = ep.step(np.array([9, 90]))  # top right (foreground), bottom left (background)
    assert r.hit.tolist() == [True, False] and r.reward.tolist() == [1.0, -1.0]
    coords, labels = ep.points(0)
    assert coords.shape == (3, 2) and labels.tolist()[2] == 1


def test_decoder_alone_from_the_official_file(tracker, tmp_path):
    """segment --ray's prompting actors: the decoder from sam3.pt's tracker.* tensors, without the image model."""
    from alignsam_ray.foundation.sam3_models import load_sam3_decoder

    state = {"tracker." + k: v for k, v in tracker.state_dict().items()}
    path = tmp_path / "sam3.pt"
    torch.save({**state, "detector.backbone.x": torch.zeros(1)}, path)  # the image model's tensors are not read
    mine, ref = load_sam3_decoder("sam3", str(path)), Sam3PromptDecoder.from_model(tracker)
    feats = {k: v[0].numpy() for k, v in _features(2).items()}
    pts, labels = np.array([[10.0, 20.0], [200.0, 100.0]]), np.array([1, 0])
    np.testing.assert_array_equal(mine.predict(feats, pts, labels, (240, 320))[0], ref.predict(feats, pts, labels,
                                                                                                 (240, 320))[0])
    del state["tracker.sam_mask_decoder.iou_token.weight"]
    torch.save({**state, "detector.backbone.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="interactive predictor.*tracker.sam_mask_decoder.iou_token.weight"):
        load_sam3_decoder("sam3", str(path))


def test_sam3_text_skipped_or_refused_before_any_build(tracker, tmp_path):
    """sam3_text (baselines.py) on a SAM 3 store: skipped without --sam-checkpoint (the reason names it), runs
    with one or on a random-init store; a file that is not the store's sam3.pt is an error. persam: skipped."""
    from alignsam_ray import baselines as B
    from alignsam_ray.checksum import file_sha256
    from alignsam_ray.config import ConfigError

    dec, cfg = Sam3PromptDecoder.from_model(tracker), {"srm": {}}
    mine = tmp_path / "sam3.pt"
    mine.write_bytes(b"the store's file")
    real = {"sam_type": "sam3", "checkpoint_sha256": file_sha256(str(mine))}
    assert "pass --sam-checkpoint sam3.pt" in B.skip_reason("sam3_text", {}, dec, cfg, real, None)
    assert B.skip_reason("sam3_text", {}, dec, cfg, real, str(mine)) is None
    assert B.skip_reason("sam3_text", {}, dec, cfg, {"sam_type": "sam3", "checkpoint_sha256": "random-init"}) is None
    B.check_sam3_checkpoint(real, "S", str(mine))
    other = tmp_path / "other.pt"
    other.write_bytes(b"another file")
    with pytest.raises(ConfigError, match="is not the SAM 3 checkpoint store 'S' was embedded with"):
        B.check_sam3_checkpoint(real, "S", str(other))
    with pytest.raises(ConfigError, match="no such file"):
        B.check_sam3_checkpoint(real, "S", str(tmp_path / "missing.pt"))
    assert "(SAM 3)" in B.skip_reason("persam", {}, dec, cfg)


def test_checkpoint_errors_before_any_build(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam3("sam3", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        load_sam3("sam3", None)
    with pytest.raises(CheckpointError, match="unknown SAM 3 type"):
        load_sam3("sam3_large", None)
    sam2 = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"sam_mask_decoder.x": torch.zeros(1)}}, sam2)
    with pytest.raises(CheckpointError, match="not a SAM 3 checkpoint.*detector.*tracker"):
        load_sam3("sam3", str(sam2))


# ------------------------------------------------------------------ a reduced SAM 3 image model (slow)
def _reduced_sam3():
    """SAM 3's image model as ``build_sam3_image_model`` composes it, from sam3's own modules and builder parts,
    with a 2-block, 64-wide ViT and a 1-layer text encoder (the official ones: 32 x 1024 and 24 x 1024) so it
    builds in seconds: the frame (1008, 14-px patches -> 72 x 72), the necks, the detector heads and the
    interactive predictor are the official ones. Seeded random weights."""
    from sam3 import model_builder as mb
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT

    torch.manual_seed(5)
    with _building():
        vit = ViT(img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                  mlp_ratio=4.625, norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True, use_abs_pos=True,
                  tile_abs_pos=True, global_att_blocks=(1,), rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
                  window_size=24, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
                  return_interm_layers=False, bias_patch_embed=False)
        neck = mb._create_vit_neck(mb._create_position_encoding(precompute_resolution=1008), vit,
                                   enable_inst_interactivity=True)
        text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=bpe_path()), d_model=256, width=64, heads=2, layers=1)
        model = mb._create_sam3_model(mb._create_vl_backbone(neck, text), mb._create_sam3_transformer(),
                                      mb._create_geometry_encoder(), mb._create_segmentation_head(),
                                      mb._create_dot_product_scoring(),
                                      SAM3InteractiveImagePredictor(mb.build_tracker(apply_temporal_disambiguation=False)),
                                      eval_mode=True)
    return model.eval().requires_grad_(False)


def _official_outputs(model, images) -> list[dict]:
    """What the official code gives: per image ``Sam3Processor.set_image`` -> ``Sam3Image.predict_inst`` (the
    features it hands SAM3InteractiveImagePredictor, and its outputs) and ``set_text_prompt("shadow")``."""
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    processor = Sam3Processor(model, device="cpu")
    predictor, seen = model.inst_interactive_predictor, []
    predict, max_hole_area = predictor.predict, predictor._transforms.max_hole_area
    predictor._transforms.max_hole_area = 0.0  # as in _official: binary masks without hole filling

    def recording_predict(**kwargs):  # the official predict, noting the features predict_inst set
        seen.append({"image_embed": predictor._features["image_embed"][0].numpy().copy(),
                     "high_res_feats_0": predictor._features["high_res_feats"][0][0].numpy().copy(),
                     "high_res_feats_1": predictor._features["high_res_feats"][1][0].numpy().copy()})
        return predict(**kwargs)

    predictor.predict = recording_predict
    out = []
    try:
        with torch.inference_mode():
            for b, image in enumerate(images):
                state = processor.set_image(Image.fromarray(image))
                masks, iou, low = model.predict_inst(state, point_coords=POINTS[b], point_labels=LABELS[b],
                                                     multimask_output=False, return_logits=False)
                with _building():  # sam3 0.1.4's text path pins memory (CUDA only): see sam3_models
                    state = processor.set_text_prompt("shadow", state)
                union = state["masks"].any(0)[0].numpy() if len(state["masks"]) else np.zeros(image.shape[:2], bool)
                out.append({"features": seen[-1], "masks": masks, "iou": iou, "low": low, "text": union,
                            "n_text": len(state["masks"])})
    finally:
        predictor.predict, predictor._transforms.max_hole_area = predict, max_hole_area
    return out


def _check_against_official(model, official, low_tol: float) -> None:
    """Our encoder (one batch: Sam3Processor.set_image_batch's path), decoder and sam3_text against ``official``."""
    feats = Sam3ImageEncoder(model).encode(_images())
    assert {k: v.shape[1:] for k, v in feats.items()} == FEATURE_SHAPES
    decoder = Sam3PromptDecoder.from_model(model)
    for b, (image, ref) in enumerate(zip(_images(), official)):
        for k in FEATURE_SHAPES:
            np.testing.assert_allclose(feats[k][b], ref["features"][k], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(feats[k][b].astype(np.float16).astype(np.float32), ref["features"][k],
                                       atol=2e-3, rtol=2e-3)  # as the store keeps them
        low, iou = decoder.predict({k: v[b] for k, v in feats.items()}, POINTS[b], LABELS[b], image.shape[:2])
        np.testing.assert_allclose(low, ref["low"], atol=low_tol, rtol=low_tol)
        np.testing.assert_allclose(iou, ref["iou"], atol=1e-4)
        unfilled = Sam2PromptDecoder.upscale(decoder, low, image.shape[:2])[0].numpy() > 0
        assert (unfilled == ref["masks"][0]).mean() > 0.999
    for mine, ref in zip(text_masks(model, _images(), "shadow"), official):
        assert mine.shape == ref["text"].shape and (mine == ref["text"]).mean() > 0.999


@pytest.mark.slow  # the necks are SAM 3's own (256 channels at 288 x 288): ~8 image passes, minutes on 2 cores
def test_reduced_sam3_encoder_decoder_and_text_equal_the_official_path():
    model = _reduced_sam3()
    official = _official_outputs(model, _images())
    _check_against_official(model, official, low_tol=1e-4)


# ------------------------------------------------------------------ the whole model (slow)
def _official_format(model) -> dict:
    """The image model's state dict as Meta's sam3.pt holds it: detector.* and tracker.* keys."""
    return {("tracker." + k[len(TRACKER):]) if k.startswith(TRACKER) else "detector." + k: v
            for k, v in model.state_dict().items()}


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), rng.integers(0, 256, (480, 260, 3), dtype=np.uint8)]


POINTS = [np.array([[100.0, 80.0], [400.0, 250.0]]), np.array([[20.0, 400.0], [200.0, 100.0]])]
LABELS = [np.array([1, 0]), np.array([1, 1])]


@pytest.fixture(scope="module")
def sam3_checkpoint(tmp_path_factory):
    model = load_sam3("sam3", None, random_init=True)
    path = tmp_path_factory.mktemp("sam3") / "sam3.pt"
    torch.save(_official_format(model), path)
    del model
    gc.collect()
    return str(path)


@pytest.fixture(scope="module")
def official(sam3_checkpoint):
    """The official outputs from that file, loaded by ``build_sam3_image_model(checkpoint_path=...)`` itself; the
    model is freed before ours is built (one 4.5 GB model at a time)."""
    from sam3.model_builder import build_sam3_image_model

    with _building():
        model = build_sam3_image_model(bpe_path=bpe_path(), device="cpu", checkpoint_path=sam3_checkpoint,
                                       load_from_HF=False, enable_inst_interactivity=True)
    out = _official_outputs(model, _images())
    del model
    gc.collect()
    return out


@pytest.mark.slow
def test_sam3_features_and_logits_equal_the_official_predictors(sam3_checkpoint, official):
    """The whole random-weight SAM 3 in the official format through our loader: features within 1e-4, low-res
    logits within 1e-3 (32 ViT blocks of random weights amplify float32 rounding), sam3_text's masks."""
    _check_against_official(load_sam3("sam3", sam3_checkpoint), official, low_tol=1e-3)


@pytest.mark.slow
def test_sam3_checkpoint_that_lacks_a_parameter(sam3_checkpoint, tmp_path):
    state = torch.load(sam3_checkpoint, weights_only=True)
    del state["tracker.sam_mask_decoder.iou_token.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    del state
    with pytest.raises(CheckpointError, match="does not fit SAM 3's image model.*missing: "
                                              "inst_interactive_predictor.model.sam_mask_decoder.iou_token.weight"):
        load_sam3("sam3", str(broken))


@pytest.fixture
def no_ray_left():
    yield
    __import__("ray").shutdown()  # the CLI calls below start a local Ray in this process


@pytest.mark.slow
@pytest.mark.timeout(3600)  # seven builds of the 860M-parameter model: past pytest's 20 minutes on 2 shared cores
def test_sam3_store_env_train_evaluate_export_segment(sam3_checkpoint, tmp_path, capsys, no_ray_left):
    """The random-weight SAM 3 in the official format, end to end: `alignsam embed --sam sam3` stores the
    interactive predictor's features (fp16) in its 1008 frame; the env decodes a set of points as
    SAM3InteractiveImagePredictor.predict does on the stored features (its tracker loaded from the file's
    tracker.* tensors); train 1 iteration -> evaluate (with sam3_text) -> export -> `alignsam segment` (the masks
    evaluation computes) and `segment --ray` (the same masks)."""
    import json
    import os

    from PIL import Image
    from sam3.model_builder import build_tracker

    from alignsam_ray.cli import main
    from alignsam_ray.data import generate_task
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.env.episodes import PromptEpisodes
    from alignsam_ray.env.grid import PatchGrid
    from alignsam_ray.store.embed import lowres_mask
    from alignsam_ray.store.loader import EmbeddingStore

    folder = generate_task("synthetic_shadow", str(tmp_path / "data"), n_train=3, n_test=2, seed=0, progress=False)
    store = tmp_path / "store"
    assert main(["embed", "--data", folder, "--sam", "sam3", "--checkpoint", sam3_checkpoint, "--out", str(store)]) == 0
    st = EmbeddingStore(str(store))
    assert st.manifest["sam_type"] == "sam3" and st.manifest["frame_size"] == 1008
    data = st.arrays("test")
    assert data["embeddings"].shape[1:] == (256, 72, 72) and data["gt_lowres"].shape[1:] == (288, 288)
    assert data["high_res_feats_0"].shape[1:] == (32, 288, 288) and data["high_res_feats_1"].shape[1:] == (64, 144, 144)
    paths = dict(zip(st.table()["id"].to_pylist(), st.table()["image_path"].to_pylist()))
    gt = st.gt_full("test")
    dec = load_prompt_decoder(io.BytesIO(st.decoder_bytes()))  # what an EnvRunner loads
    assert isinstance(dec, Sam3PromptDecoder)
    with _building():
        tracker = build_tracker(apply_temporal_disambiguation=False)
    tracker.load_state_dict({k[len("tracker."):]: v for k, v in torch.load(sam3_checkpoint, weights_only=True).items()
                             if k.startswith("tracker.")})
    tracker.eval()  # as the image model holds it (build_tracker returns it in training mode)
    episodes = PromptEpisodes(data=data, decoder=dec, grid=PatchGrid(10, 10), num_slots=1, horizon=15, obs_res=16,
                              init="gt", labels="gt", state="probability")
    for k, i in enumerate(data["ids"]):
        h, w = read_image(paths[i]).shape[:2]
        assert tuple(data["input_size"][k]) == (1008, 1008) and tuple(data["original_size"][k]) == (h, w)
        assert np.array_equal(data["gt_lowres"][k], lowres_mask(gt[i], (1008, 1008), 1008, 288))
        stored = {key: torch.from_numpy(data[name][k:k + 1].astype(np.float32)) for key, name in
                  (("image_embed", "embeddings"), ("high_res_feats_0", "high_res_feats_0"),
                   ("high_res_feats_1", "high_res_feats_1"))}
        points, labels = np.array([[w * 0.3, h * 0.4], [w * 0.8, h * 0.1], [w * 0.5, h * 0.9]]), np.array([1, 0, 1])
        _, _, ref_low = _official(tracker, stored, 0, (h, w)).predict(point_coords=points, point_labels=labels,
                                                                       multimask_output=False, return_logits=True)
        episodes.image[0], episodes.t[0] = k, 1
        episodes.coords[0, :3], episodes.labels[0, :3] = dec.to_input_frame(points, (h, w)), labels
        episodes._decode(np.array([0]))
        np.testing.assert_allclose(episodes.logits[0], ref_low[0], atol=1e-4, rtol=1e-4)
    bytes_per_image = sum(os.path.getsize(store / n) for n in st.manifest["shards"]) / st.manifest["n_images"]
    assert bytes_per_image > 8e6  # 2.5 + 5.1 + 2.5 MiB of fp16 features

    run, ev, bundle, seg = (str(tmp_path / n) for n in ("run", "eval", "bundle", "seg"))
    tiny = ["env.horizon=3", "env.obs_res=8", "model.width=16", "ppo.train_batch_size=48", "ppo.minibatch_size=24",
            "ppo.num_epochs=2", "train.iterations=1", "resources.num_env_runners=1", f"run_dir={run}",
            "srm.branch=implicit"]  # shadow's paper branch (explicit) reads CLIP maps, not yet on SAM 3 stores
    assert main(["train", "--store", str(store), *tiny, "--quiet"]) == 0
    wrong = tmp_path / "not_sam3.pt"
    wrong.write_bytes(b"x")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", run, "--out", ev, "--shards", "2", "--sam-checkpoint", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert "is not the SAM 3 checkpoint" in err and "Traceback" not in err  # before any shard starts
    # two shards, one image each, as Ray tasks: each loads SAM 3 for sam3_text
    assert main(["evaluate", "--checkpoint", run, "--out", ev, "--figures", "1", "--shards", "2", "--sam-checkpoint",
                 sam3_checkpoint]) == 0
    metrics = json.load(open(os.path.join(ev, "metrics.json")))
    assert metrics["n_images"] == 2 and metrics["shards"] == 2 and "sam3_text" not in metrics["skipped"]
    assert 0 <= metrics["methods"]["sam3_text"]["miou"] <= 1 and set(metrics["paired"]["sam3_text"]["miou"]) == \
        {"diff", "ci95"}
    assert "persam" in metrics["skipped"] and "sam3_text (SAM 3 given the task's text)" in \
        open(os.path.join(ev, "report.md")).read()
    per_image = json.load(open(os.path.join(ev, "per_image.json")))
    assert per_image["ids"] == data["ids"].tolist() and len(per_image["rows"]["sam3_text"]["iou"]) == 2
    assert main(["export", "--checkpoint", run, "--out", bundle]) == 0
    capsys.readouterr()
    images = [paths[i] for i in data["ids"]]
    assert main(["segment", *images, "--bundle", bundle, "--sam-checkpoint", sam3_checkpoint, "--out", seg]) == 0
    from alignsam_ray.evaluate import Agent, rollout

    agent = Agent.load(run)
    ref = rollout(agent, data, st.decoder(), actions="policy", labels="srm", horizon=3, record=(3,))
    for k, path in enumerate(images):
        stem = os.path.splitext(os.path.basename(path))[0]
        mask = np.asarray(Image.open(os.path.join(seg, stem + "_mask.png"))) > 0
        assert mask.shape == read_image(path).shape[:2]
        assert (mask == dec.upscale_mask(ref.logits[3][k], mask.shape)).mean() > 0.999
    assert main(["segment", "--ray", os.path.dirname(images[0]), "--bundle", bundle, "--sam-checkpoint",
                 sam3_checkpoint, "--out", str(tmp_path / "seg_ray"), "--prompters", "1"]) == 0
    for path in images:
        name = os.path.splitext(os.path.basename(path))[0] + "_mask.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "seg_ray" / "masks" / name)),
                              np.asarray(Image.open(os.path.join(seg, name))))

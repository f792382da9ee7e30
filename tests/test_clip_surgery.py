"""CLIP Surgery on open_clip ViTs + the embedded micro CLIP (alignsam_ray.foundation.clip_surgery / micro_clip)."""
from __future__ import annotations

import copy
import json
import os
import socket

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from alignsam_ray.foundation.clip_surgery import (
    MAP_SIZE,
    CheckpointError,
    ClipSurgery,
    feature_surgery,
    sam_valid_cells,
    surgery_forward,
)
from alignsam_ray.foundation.micro_clip import (
    MICRO_CLIP_CFG,
    MICRO_CLIP_META,
    MICRO_CLIP_WEIGHTS,
    build_micro_clip,
    micro_tokenizer,
)

TINY_CFG = {  # a small custom open_clip config (registered under TINY_NAME for the round trip)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_NAME = "alignsam-test-tiny-vit"


@pytest.fixture(scope="module")
def micro() -> ClipSurgery:
    torch.manual_seed(0)
    return ClipSurgery(build_micro_clip(), micro_tokenizer(), n_surgery_blocks=3)


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    with open(folder / f"{TINY_NAME}.json", "w") as f:
        json.dump(TINY_CFG, f)
    open_clip.add_model_config(str(folder / f"{TINY_NAME}.json"))
    return TINY_NAME


def _images(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 256, (120, 120, 3), dtype=np.uint8), rng.integers(0, 256, (90, 250, 3), dtype=np.uint8)]


# ------------------------------------------------------------------------------------------ maps
def test_maps_shape_dtype_range_and_padding(micro):
    images = _images(np.random.default_rng(0))
    maps = micro.maps(images, ["star", "circle"])
    assert maps.shape == (2, 2, MAP_SIZE, MAP_SIZE) and maps.dtype == np.float16
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for m, im in zip(maps, images):
        rows, cols = sam_valid_cells(*im.shape[:2])
        assert np.allclose(m[:, :rows, :cols].reshape(2, -1).max(1), 1) and np.allclose(m[:, :rows, :cols].reshape(2, -1).min(1), 0)
        assert (m[:, rows:, :] == 0).all() and (m[:, :, cols:] == 0).all()
    assert sam_valid_cells(90, 250) == (24, 64)       # SAM: 1024 x 369 -> ceil(369 / 16) = 24 rows
    assert sam_valid_cells(300, 300) == (64, 64)
    single = micro.maps(images[:1], ["star"])           # the empty-text redundant feature path
    assert single.shape == (1, 1, MAP_SIZE, MAP_SIZE) and single.max() == 1


def test_wide_image_lands_on_sams_grid(micro, monkeypatch):
    """A red block in a wide image must show up where SAM's 64x64 grid has it (top rows, padding below)."""
    h, w = 200, 400                                     # SAM: 1024 x 512 -> rows 0..31 image, 32..63 padding
    image = np.full((h, w, 3), 128, np.uint8)
    y0, y1, x0, x1 = 0, 133, 200, 333                   # on the 12x12 token grid of the 400 x 400 square: rows 0-3, cols 6-9
    image[y0:y1, x0:x1] = (255, 0, 0)

    # the model's "similarity" = red-minus-green of the preprocessed input, pooled to the token grid:
    # this isolates the geometry (pad, resize, upsample, valid region) from the network
    def red_similarity(batch, texts):
        g = MICRO_CLIP_CFG["vision_cfg"]["image_size"] // MICRO_CLIP_CFG["vision_cfg"]["patch_size"]
        red = torch.nn.functional.adaptive_avg_pool2d(batch[:, :1] - batch[:, 1:2], g)
        return red.expand(-1, len(texts), -1, -1)
    monkeypatch.setattr(micro, "similarity", red_similarity)
    m = micro.maps([image], ["red"])[0, 0].astype(np.float32)
    cell = max(h, w) / MAP_SIZE                         # 6.25 original pixels per SAM cell
    rows, cols = sam_valid_cells(h, w)
    assert (rows, cols) == (32, 64) and (m[rows:] == 0).all()
    r0, r1, c0, c1 = int(y0 / cell), int(y1 / cell), int(x0 / cell), int(x1 / cell)   # 0, 21, 32, 53
    assert m[r0:r1 - 3, c0 + 3:c1 - 3].min() > 0.9                                    # the block
    assert m[:rows, :c0 - 6].max() < 0.1 and m[:rows, c1 + 6:].max() < 0.1            # left / right of it
    assert m[r1 + 5:rows].max() < 0.1                                                 # below it, inside the image


# ------------------------------------------------------------------------------- feature surgery
def _features(seed=0, b=2, n=10, c=4, d=16):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1)
    return f, t, torch.randn(d, generator=g)


def test_feature_surgery_mean_invariants():
    f, t, v = _features()
    sim = feature_surgery(f, t, weighting="mean")
    assert sim.shape == (2, 10, 4)
    assert torch.allclose(feature_surgery(f, t + v, weighting="mean"), sim, atol=1e-5)   # shift-invariant
    with_mean = torch.cat([t, t.mean(0, keepdim=True)])
    assert feature_surgery(f, with_mean, weighting="mean")[..., -1].abs().max() < 1e-5  # the set's mean -> 0
    assert torch.allclose(sim, f @ (t - t.mean(0)).T, atol=1e-5)
    # the single-text trick = plain mean over [text, ""] up to the factor 2
    r = t[1]
    assert torch.allclose(feature_surgery(f, t[:1], redundant=r),
                          2 * feature_surgery(f, torch.stack([t[0], r]), weighting="mean")[..., :1], atol=1e-5)


def test_feature_surgery_softmax_matches_reference_form():
    f, t, _ = _features(1)
    sim = feature_surgery(f, t, weighting="softmax")
    assert sim.sum(-1).abs().max() < 1e-5                                            # zero-sum over classes
    s = f @ t.T                                                                      # closed form of the reference
    w = (2 * s).softmax(-1)
    w = w / w.mean(-1, keepdim=True)
    assert torch.allclose(sim, w * s - (w * s).mean(-1, keepdim=True), atol=1e-5)
    assert torch.allclose(feature_surgery(f, t, weighting="none"), s)
    with pytest.raises(ValueError):
        feature_surgery(f, t, weighting="max")


# -------------------------------------------------------------------------- architecture surgery
def test_surgery_path_leaves_original_path_unchanged():
    torch.manual_seed(1)
    model = build_micro_clip().eval()
    x = torch.randn(2, 3, 96, 96)
    layers = MICRO_CLIP_CFG["vision_cfg"]["layers"]
    with torch.inference_mode():
        model.visual.output_tokens = True
        pooled, tokens = model.visual(x)
        model.visual.output_tokens = False
        plain = tokens @ model.visual.proj
        encoded = model.encode_image(x)
        off = surgery_forward(model.visual, x, 0)
        assert torch.equal(off["tokens"], off["tokens_original"]) and torch.allclose(off["tokens"], plain, atol=1e-6)
        for k in (1, layers):
            out = surgery_forward(model.visual, x, k)
            assert torch.equal(out["pooled"], encoded)                               # bit for bit
            assert torch.equal(out["tokens_original"], off["tokens_original"])
            assert (out["tokens"] - plain).abs().max() > 1e-3


def test_vv_attention_is_mha_with_value_as_query_and_key():
    """One surgery block by hand: x_s = x + MHA'(ln_1 x), MHA' = the block's attention with W_q = W_k = W_v."""
    torch.manual_seed(2)
    model = build_micro_clip().eval()
    v = model.visual
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        tokens = v._embeds(x)
        for blk in v.transformer.resblocks[:-1]:
            tokens = blk(tokens)
        last = v.transformer.resblocks[-1]
        vv = copy.deepcopy(last.attn)
        width = vv.embed_dim
        w_v, b_v = vv.in_proj_weight[2 * width:].clone(), vv.in_proj_bias[2 * width:].clone()
        vv.in_proj_weight.copy_(torch.cat([w_v, w_v, w_v]))
        vv.in_proj_bias.copy_(torch.cat([b_v, b_v, b_v]))
        h = last.ln_1(tokens)
        expected = tokens + vv(h, h, h, need_weights=False)[0]      # no FFN on the surgery path
        expected = v.ln_post(expected[:, 1:]) @ v.proj
        got = surgery_forward(v, x, 1)["tokens"]
    assert torch.allclose(got, expected, atol=1e-5)


def test_unsupported_tower_is_refused():
    model = build_micro_clip()
    model.visual = nn.Identity()
    with pytest.raises(TypeError, match="VisionTransformer"):
        ClipSurgery(model, micro_tokenizer())


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_custom_config(tmp_path, tiny_name):
    torch.manual_seed(3)
    model = open_clip.create_model(tiny_name, pretrained=None)
    path = str(tmp_path / "tiny.pt")
    torch.save({"epoch": 1, "name": tiny_name, "state_dict": model.state_dict()}, path)  # open_clip training format
    direct = ClipSurgery(model, open_clip.get_tokenizer(tiny_name), n_surgery_blocks=2)
    loaded = ClipSurgery.load(tiny_name, weights=path, n_surgery_blocks=2)
    images = _images(np.random.default_rng(1))
    assert np.array_equal(direct.maps(images, ["star", "circle", "square"]), loaded.maps(images, ["star", "circle", "square"]))


def test_checkpoint_round_trip_micro_plain_state_dict(tmp_path, micro):
    path = str(tmp_path / "micro.pt")
    torch.save(micro.model.state_dict(), path)                 # plain state dict (open_clip release format)
    loaded = ClipSurgery.load("micro", weights=path, n_surgery_blocks=3)
    images = _images(np.random.default_rng(2))
    assert np.array_equal(micro.maps(images, ["star"]), loaded.maps(images, ["star"]))


def test_wrong_or_missing_weights_give_clear_errors(tmp_path, tiny_name, micro):
    path = str(tmp_path / "micro.pt")
    torch.save(micro.model.state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"micro\.pt.*{tiny_name}"):
        ClipSurgery.load(tiny_name, weights=path)
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        ClipSurgery.load("ViT-B-16")
    with pytest.raises(CheckpointError, match="does not exist"):
        ClipSurgery.load("ViT-B-16", weights=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipSurgery.load("hf-hub:someone/model", weights=path)


@pytest.mark.slow
def test_checkpoint_round_trip_vit_b_16(tmp_path):
    """ViT-B-16 at random init (150M parameters, ~600 MB on disk): run with -m slow."""
    torch.manual_seed(4)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(model.state_dict(), path)
    images = _images(np.random.default_rng(3))[:1]
    direct = ClipSurgery(model, open_clip.get_tokenizer("ViT-B-16")).maps(images, ["star", "circle"])
    del model
    loaded = ClipSurgery.load("ViT-B-16", weights=path).maps(images, ["star", "circle"])
    assert np.array_equal(direct, loaded)


# --------------------------------------------------------------------------- offline + shipped weights
def test_no_network_during_load_and_maps(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cs = ClipSurgery.load("micro")
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(["star"])
    assert tokens.shape == (1, 16)
    maps = cs.maps(_images(np.random.default_rng(4)), ["star", "cross"])
    assert maps.shape == (2, 2, MAP_SIZE, MAP_SIZE)


def test_shipped_micro_weights():
    size = os.path.getsize(MICRO_CLIP_WEIGHTS) + os.path.getsize(MICRO_CLIP_META)
    assert size <= 10 * 1024 * 1024
    with open(MICRO_CLIP_META) as f:
        meta = json.load(f)
    assert meta["model_cfg"] == MICRO_CLIP_CFG and meta["steps"] > 0
    state = torch.load(MICRO_CLIP_WEIGHTS, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    cs = ClipSurgery.load("micro")
    assert cs.n_surgery_blocks == meta["n_surgery_blocks"]
    assert isinstance(cs.model, open_clip.model.CLIP)


def test_shipped_micro_clip_maps_find_the_star(tmp_path):
    """Behaviour, not a figure: on held-out synthetic_shapes pictures the trained micro CLIP's "star" map
    ranks star cells above the rest (mean AUROC well above chance) and above a random initialisation."""
    from alignsam_ray.data import generate_task, open_dataset
    from alignsam_ray.data.samples import load_pair
    from alignsam_ray.data.synthetic import TARGET_SHAPE
    from alignsam_ray.foundation.clip_surgery import map_auroc

    folder = generate_task("synthetic_shapes", str(tmp_path / "shapes"), n_train=0, n_test=12, seed=0, progress=False)
    pairs = [load_pair(s) for s in open_dataset(folder, n_train=None) if s.split == "test"]
    images, masks = [image for image, _ in pairs], [mask == 1 for _, mask in pairs]

    def mean_auroc(cs: ClipSurgery) -> float:
        maps = cs.maps(images, [TARGET_SHAPE])[:, 0]
        values = [v for m, mask in zip(maps, masks) if (v := map_auroc(m, mask)) is not None]
        assert len(values) >= 8
        return float(np.mean(values))

    trained = ClipSurgery.load("micro")
    torch.manual_seed(0)
    random_init = ClipSurgery(build_micro_clip(), micro_tokenizer(), n_surgery_blocks=trained.n_surgery_blocks)
    auroc_trained, auroc_random = mean_auroc(trained), mean_auroc(random_init)
    assert auroc_trained > 0.7 and auroc_trained > auroc_random + 0.05, (auroc_trained, auroc_random)


def test_map_auroc_on_sams_grid():
    from alignsam_ray.foundation.clip_surgery import map_auroc, mask_on_sam_grid
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True                          # left half of a wide image
    grid = mask_on_sam_grid(mask)
    assert grid.shape == (MAP_SIZE, MAP_SIZE) and grid[40:].max() == 0   # rows below the image are padding
    perfect = np.zeros((MAP_SIZE, MAP_SIZE), np.float16)
    perfect[:, :32] = 1
    assert map_auroc(perfect, mask) == pytest.approx(1.0)
    assert map_auroc(1 - perfect, mask) == pytest.approx(0.0)
    assert map_auroc(perfect, np.ones((100, 200), bool)) is None      # one class only

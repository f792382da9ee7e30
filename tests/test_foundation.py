"""Frozen SAM backends: official-format checkpoints, type checks, encoder/decoder split, micro-SAM."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from alignsam_ray.foundation import (
    CheckpointError,
    SamImageEncoder,
    SamPromptDecoder,
    detect_sam_type,
    load_sam,
)
from alignsam_ray.foundation.batched_decode import decode_per_image
from alignsam_ray.foundation.micro_sam import MICRO_SAM_EMBED_DIM, build_sam_micro

ROOT = Path(__file__).resolve().parents[1]  # the micro-SAM tooling runs from here: python -m tools.micro_sam....


def _image(h=300, w=420, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[80:200, 100:260] = (220, 40, 40)
    return img


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A vit_b SAM with random weights, saved exactly as Meta's .pth files are (a state_dict)."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return str(path)


def test_official_vit_b_roundtrip_matches_sam_predictor(vit_b_checkpoint):
    image = _image()
    reference = SamPredictor(sam_model_registry["vit_b"](checkpoint=vit_b_checkpoint))  # Meta's own loader
    reference.set_image(image)
    ref_emb = reference.get_image_embedding()[0].numpy()

    sam = load_sam("vit_b", vit_b_checkpoint)
    ours = SamImageEncoder(sam).embed(image)
    assert ours.shape == (256, 64, 64)
    np.testing.assert_allclose(ours, ref_emb, atol=1e-5)

    decoder = SamPromptDecoder.from_sam(sam, "vit_b")
    points = np.array([[150.0, 120.0], [30.0, 250.0]])
    labels = np.array([1, 0])
    for multimask in (True, False):
        ref_logits, ref_iou, ref_low = reference.predict(points, labels, multimask_output=multimask, return_logits=True)
        low, iou = decoder.predict(ours, points, labels, image.shape[:2], multimask=multimask)
        np.testing.assert_allclose(low.numpy(), ref_low, atol=1e-3)
        np.testing.assert_allclose(iou.numpy(), ref_iou, atol=1e-4)
        full = decoder.upscale(low, image.shape[:2]).numpy()
        assert full.shape == ref_logits.shape
        assert ((full > 0) == (ref_logits > 0)).mean() > 0.999


def test_wrong_type_checkpoint_names_both_types(vit_b_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a vit_b SAM, but vit_h was asked"):
        load_sam("vit_h", vit_b_checkpoint)
    micro = tmp_path / "micro.pth"
    torch.save(build_sam_micro().state_dict(), micro)
    with pytest.raises(CheckpointError, match=r"holds a micro SAM, but vit_b was asked"):
        load_sam("vit_b", str(micro))


@pytest.mark.parametrize("width,expected", [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")])
def test_detect_official_types_from_shapes(width, expected):
    state = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, width), "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    assert detect_sam_type(state) == expected


def test_bad_checkpoints_have_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*never downloaded"):
        load_sam("vit_b", str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        load_sam("vit_l")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth.*(cannot be read|is not a weights file)") as err:
        load_sam("vit_b", str(junk))
    assert "weights_only=False" not in str(err.value)  # never torch's advice to load it unsafely
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_sam("vit_b", str(other))
    with pytest.raises(CheckpointError, match="unknown SAM type"):
        load_sam("vit_x")


def test_micro_sam_ships_weights_and_keeps_sam_geometry():
    sam = load_sam("micro")
    assert all(not p.requires_grad for p in sam.parameters())
    predictor = SamPredictor(sam)
    predictor.set_image(_image())
    emb = predictor.get_image_embedding()
    assert emb.shape == (1, MICRO_SAM_EMBED_DIM, 64, 64)
    masks, scores, low = predictor.predict(np.array([[180, 140]]), np.array([1]), multimask_output=True)
    assert masks.shape == (3, 300, 420) and scores.shape == (3,) and low.shape == (3, 256, 256)


def test_micro_sam_segments_a_plain_object():
    """The shipped weights are trained, not random: a flat square on a flat background."""
    img = np.full((320, 480, 3), 40, np.uint8)
    img[100:220, 150:330] = (230, 200, 30)
    gt = np.zeros(img.shape[:2], bool)
    gt[100:220, 150:330] = True
    predictor = SamPredictor(load_sam("micro"))
    predictor.set_image(img)
    masks, scores, _ = predictor.predict(np.array([[240, 160]]), np.array([1]), multimask_output=True)
    m = masks[scores.argmax()]
    assert (m & gt).sum() / (m | gt).sum() > 0.8


def test_decode_per_image_equals_mask_decoder_row_by_row():
    torch.manual_seed(0)
    sam = build_sam_micro()
    pe = sam.prompt_encoder
    emb = torch.randn(3, MICRO_SAM_EMBED_DIM, 64, 64)
    sparse, dense = pe(points=(torch.rand(3, 4, 2) * 1024, torch.tensor([[1, 0, -1, -1], [1, 1, 0, -1], [1, -1, -1, -1]])),
                       boxes=None, masks=None)
    with torch.no_grad():
        low, iou = decode_per_image(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense, True)
        low4, iou4 = decode_per_image(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense, None)
        assert low4.shape == (3, 4, 256, 256) and iou4.shape == (3, 4)
        for r in range(3):
            args = (emb[r : r + 1], pe.get_dense_pe(), sparse[r : r + 1], dense[r : r + 1])
            ref_low, ref_iou = sam.mask_decoder(*args, True)
            torch.testing.assert_close(low[r : r + 1], ref_low, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[r : r + 1], ref_iou, atol=1e-5, rtol=1e-4)
            # all four outputs in one pass: index 0 is the single-mask output, 1..3 the multimask ones
            single_low, single_iou = sam.mask_decoder(*args, False)
            torch.testing.assert_close(low4[r : r + 1], torch.cat([single_low, ref_low], 1), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou4[r : r + 1], torch.cat([single_iou, ref_iou], 1), atol=1e-5, rtol=1e-4)


def test_decoder_file_roundtrip(tmp_path):
    sam = load_sam("micro")
    dec = SamPromptDecoder.from_sam(sam, "micro")
    dec.save(tmp_path / "decoder.pt")
    again = SamPromptDecoder.load(str(tmp_path / "decoder.pt"))
    emb = torch.randn(MICRO_SAM_EMBED_DIM, 64, 64)
    a, _ = dec.predict(emb, np.array([[10.0, 20.0]]), np.array([1]), (100, 200))
    b, _ = again.predict(emb, np.array([[10.0, 20.0]]), np.array([1]), (100, 200))
    torch.testing.assert_close(a, b)
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in sam.parameters())


def test_eval_micro_sam_script_writes_the_issue_keys(tmp_path):
    """`python -m tools.micro_sam.evaluate --out FILE.json` (the quality-bar command) on a few scenes."""
    out = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, "-m", "tools.micro_sam.evaluate", "--n", "6", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert 0 <= result["one_point_miou"] <= 1 and 0 <= result["three_point_miou"] <= 1
    assert 0 <= result["three_point_best_of_3_miou"] <= 1 and result["resolution_ceiling_miou"] > 0.9
    assert 0 <= result["two_positive_miou"] <= 1
    assert sum(b["n"] for b in result["by_object_area"]) == result["n_images"] > 0
    assert "2 positive + 1 negative point" in run.stdout


def _train_script():
    """tools/micro_sam/train.py (research tooling, not part of the installed package)."""
    from tools.micro_sam import train

    return train


def test_interactive_points_come_from_the_error_region():
    """SAM's interactive sampling: added points are positive where the first mask missed the
    object, negative where it took background, never in the padding; the first point is kept."""
    train = _train_script()
    lab = np.zeros((256, 256), np.uint8)
    lab[:, 200:] = 255  # padding
    lab[50:150, 50:150] = 1  # the object
    pred = np.zeros((256, 256), bool)
    pred[50:150, 50:100] = True  # found the left half ...
    pred[160:200, 50:250] = True  # ... and took background (partly over the padding)
    first = (np.array([[300.0, 300.0]], np.float32), np.array([1]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        coords, labels = train.error_points(rng, lab, 1, pred, first, 3, 17)
        assert (coords[0] == first[0][0]).all() and labels[0] == 1
        assert (labels[1:4] >= 0).all() and (labels[4:] == -1).all()
        yx = ((coords[1:4] - (train.SCALE - 1) / 2) / train.SCALE).round().astype(int)[:, ::-1]
        for (y, x), label in zip(yx, labels[1:4]):
            if label == 1:
                assert lab[y, x] == 1 and not pred[y, x]  # a missed part of the object
            else:
                assert lab[y, x] == 0 and pred[y, x]  # background the mask took, not padding
    perfect = lab == 1
    coords, labels = train.error_points(rng, lab, 1, perfect, first, 2, 17)
    assert (labels[1:3] == 1).all()  # nothing to correct: points go inside the object


def test_train_script_end_to_end_writes_loadable_weights(tmp_path):
    """`python -m tools.micro_sam.train` with the shipped recipe (its defaults) on a tiny budget:
    the weights load through the users' loader and the JSON records the recipe and its curve."""
    script = [sys.executable, "-m", "tools.micro_sam.train"]
    out = tmp_path / "micro.pt"
    run = subprocess.run(
        [*script, "--steps", "3", "--scenes", "8", "--batch", "2", "--threads", "1", "--token-sample", "256",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    info = json.loads((tmp_path / "micro.json").read_text())
    assert info["steps"] == 3 and info["exact_points"] == 1 and info["token_sample"] == 256 and info["fused_norm"] == 1 and info["mask_input_share"] == 0
    assert info["interactive"] == 0.3 and info["few_points"] == 0.3 and info["min_object_area"] == 0.005
    assert info["command"].startswith("python -m tools.micro_sam.train --steps 3 ") and "--overwrite-shipped" not in info["command"]
    assert [c["step"] for c in info["curve"]] == [0, 2]
    trained = load_sam("micro", str(out))
    shipped = load_sam("micro")
    assert trained.state_dict().keys() == shipped.state_dict().keys()
    assert not torch.equal(trained.mask_decoder.mask_tokens.weight, shipped.mask_decoder.mask_tokens.weight)
    # a mask input needs the full-frame stage-A logits: refused with the sampled loss
    bad = subprocess.run([*script, "--steps", "1", "--point-loss", "512", "--token-sample", "0", "--exact-points", "0",
                          "--mask-input-share", "0.5", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--mask-input-share 0" in bad.stderr
    bad = subprocess.run([*script, "--steps", "1", "--point-loss", "512", "--token-sample", "256",
                          "--mask-input-share", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "without --point-loss" in bad.stderr
    bad = subprocess.run([*script, "--steps", "1", "--exact-points", "1", "--token-sample", "0", "--mask-input-share", "0",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "use it with --token-sample" in bad.stderr


def test_logits_at_pixels_equal_the_full_masks():
    """The point-sampled decoder path draws exactly the full masks' values at the pixels asked for."""
    from alignsam_ray.foundation.batched_decode import decode_tokens, logits_at_pixels, masks_from_tokens

    torch.manual_seed(1)
    sam = build_sam_micro()
    for param in sam.mask_decoder.output_upscaling.parameters():  # non-trivial norm / biases
        torch.nn.init.normal_(param, std=0.5)
    pe = sam.prompt_encoder
    emb = torch.randn(3, MICRO_SAM_EMBED_DIM, 64, 64)
    sparse, dense = pe(points=(torch.rand(3, 3, 2) * 1024, torch.tensor([[1, 0, -1], [1, 1, 0], [1, -1, -1]])),
                       boxes=None, masks=None)
    pixels = torch.randint(0, 256, (3, 700, 2))
    pixels[0, :4] = torch.tensor([[0, 0], [255, 255], [1, 2], [254, 3]])  # corners and odd/even sub-positions
    with torch.no_grad():
        for outputs in (None, range(1), range(1, 4)):
            tokens = decode_tokens(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense.expand(3, -1, -1, -1), outputs)
            full = masks_from_tokens(sam.mask_decoder, tokens)  # (3, C, 256, 256)
            at = logits_at_pixels(sam.mask_decoder, tokens, pixels)  # (3, C, 700)
            ref = full[torch.arange(3)[:, None, None], torch.arange(full.shape[1])[None, :, None],
                       pixels[:, None, :, 0], pixels[:, None, :, 1]]
            torch.testing.assert_close(at, ref, atol=1e-5, rtol=1e-5)
        low, iou = decode_per_image(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense.expand(3, -1, -1, -1), False)
        tokens = decode_tokens(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense.expand(3, -1, -1, -1), range(1))
        torch.testing.assert_close(low, masks_from_tokens(sam.mask_decoder, tokens))
        torch.testing.assert_close(iou, tokens.iou_pred)


def test_point_sampled_loss_estimates_the_full_frame_loss():
    """sample_loss_pixels: half the samples on the object, weights that add up to the frame, and
    weighted focal / dice / IoU that estimate the full-frame values."""
    train = _train_script()
    rng = np.random.default_rng(0)
    gt = np.zeros((2, 256, 256), bool)
    gt[0, 40:90, 30:200] = True  # 13% of the frame
    gt[1, 10:18, 10:18] = True  # 64 pixels: sampled with replacement
    logits = torch.randn(2, 1, 256, 256) * 3 + torch.from_numpy(gt[:, None]).float() * 2
    full_t = torch.from_numpy(gt).float().flatten(1)[:, None]
    full = [f(logits.flatten(2), full_t) for f in (train.focal_loss, train.dice_loss, train.mask_iou)]
    estimates = []
    for _ in range(30):
        pixels, weight, target = train.sample_loss_pixels(rng, gt, 1024)
        assert pixels.shape == (2, 1024, 2) and weight.shape == target.shape == (2, 1, 1024)
        assert (target[:, 0, :512] == 1).all() and (target[:, 0, 512:] == 0).all()
        assert torch.allclose(weight.sum(-1), torch.tensor(256.0 * 256))
        assert gt[np.arange(2)[:, None], pixels[..., 0].numpy(), pixels[..., 1].numpy()][:, :512].all()
        at = logits[torch.arange(2)[:, None], 0, pixels[..., 0], pixels[..., 1]][:, None]  # (2, 1, 1024)
        estimates.append([f(at, target, weight=weight) for f in
                          (lambda a, t, weight: train.focal_loss(a, t, weight=weight), train.dice_loss, train.mask_iou)])
    for k in range(3):
        mean = torch.stack([e[k] for e in estimates]).mean(0)
        torch.testing.assert_close(mean, full[k], rtol=0.05, atol=0.01)


def test_fused_layer_norms_keep_the_state_dict_and_the_outputs():
    """fuse_for_training (training speed-up): same parameter names, same outputs and gradients."""
    import copy

    from segment_anything.modeling.common import LayerNorm2d

    from tools.micro_sam.fused_ops import FusedLayerNorm2d, fuse_for_training

    torch.manual_seed(0)
    sam = build_sam_micro()
    for m in sam.modules():  # non-trivial affine parameters
        if isinstance(m, LayerNorm2d):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    fused = copy.deepcopy(sam)
    n = fuse_for_training(fused)
    assert n == sum(type(m) is LayerNorm2d for m in sam.modules()) >= 3
    assert not any(type(m) is LayerNorm2d for m in fused.modules())
    assert any(isinstance(m, FusedLayerNorm2d) for m in fused.mask_decoder.modules())
    assert fused.state_dict().keys() == sam.state_dict().keys()
    x = torch.randn(2, 3, 256, 256)
    points = (torch.rand(2, 3, 2) * 1024, torch.tensor([[1, 0, -1], [1, 1, 0]]))
    outs = []
    for model in (sam, fused):
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
        low, iou = decode_per_image(model.mask_decoder, model.image_encoder(x), model.prompt_encoder.get_dense_pe(),
                                    sparse, dense.expand(2, -1, -1, -1), None)
        (low.square().mean() + iou.sum()).backward()
        outs.append((low, iou, model.image_encoder.neck[1].weight.grad, model.mask_decoder.output_upscaling[1].weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _prompted(sam, n, seed=0):
    """Random image embeddings (n, E, 64, 64) and prompt embeddings for n prompt sets."""
    torch.manual_seed(seed)
    pe = sam.prompt_encoder
    emb = torch.randn(n, MICRO_SAM_EMBED_DIM, 64, 64)
    labels = torch.tensor([[1, 1, 0, -1]] * n)
    sparse, dense = pe(points=(torch.rand(n, 4, 2) * 1024, labels), boxes=None, masks=None)
    return emb, pe.get_dense_pe(), sparse, dense.expand(n, -1, -1, -1)


def test_decoding_every_cell_with_unit_weights_is_the_full_decoder():
    """decode_cell_sample with all 4096 cells (in shuffled order) and weight 1 computes exactly
    decode_tokens; cell_block_logits are the full masks' values at each cell's 16 pixels."""
    from alignsam_ray.foundation.batched_decode import decode_tokens, masks_from_tokens
    from tools.micro_sam.sampled_decode import cell_block_logits, cell_blocks, decode_cell_sample

    sam = build_sam_micro()
    for param in sam.mask_decoder.output_upscaling.parameters():  # non-trivial norm / biases
        torch.nn.init.normal_(param, std=0.5)
    args = _prompted(sam, 2)
    cells = torch.stack([torch.randperm(4096) for _ in range(2)])
    with torch.no_grad():
        for outputs in (None, range(1)):
            full = decode_tokens(sam.mask_decoder, *args, outputs)
            part = decode_cell_sample(sam.mask_decoder, *args, cells, torch.zeros(2, 4096), outputs)
            torch.testing.assert_close(part.iou_pred, full.iou_pred, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(part.hyper_in, full.hyper_in, atol=1e-5, rtol=1e-5)
            masks = masks_from_tokens(sam.mask_decoder, full).numpy()  # (2, C, 256, 256)
            ref = np.stack([cell_blocks(masks[:, c], cells.numpy()) for c in range(masks.shape[1])], 1)
            np.testing.assert_allclose(cell_block_logits(sam.mask_decoder, part).numpy(), ref, atol=1e-4, rtol=1e-4)


def test_padding_bias_decodes_padded_rows_as_their_own_points():
    """Rows of m points padded with "not a point" to a common length decode, with padding_bias,
    exactly as the m points alone (SAM's one appended pad, as SamPredictor decodes them); without
    the bias they do not (the train/inference mismatch ``--exact-points`` removes)."""
    from tools.micro_sam.sampled_decode import decode_cell_sample, padding_bias

    sam = build_sam_micro()
    for param in sam.mask_decoder.parameters():  # a non-trivial decoder
        torch.nn.init.normal_(param, std=0.3)
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    torch.manual_seed(1)
    emb = torch.randn(3, MICRO_SAM_EMBED_DIM, 64, 64)
    coords = torch.rand(3, 17, 2) * 1024
    counts = [1, 3, 17]
    labels = torch.full((3, 17), -1)
    for i, m in enumerate(counts):
        labels[i, :m] = torch.randint(0, 2, (m,))
    cells, log_w = torch.stack([torch.randperm(4096)[:700] for _ in range(3)]), torch.randn(3, 700) * 0.1
    with torch.no_grad():
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        bias = padding_bias(torch.cat([labels, -torch.ones(3, 1, dtype=labels.dtype)], 1))
        padded = decode_cell_sample(dec, emb, pe.get_dense_pe(), sparse, dense.expand(3, -1, -1, -1), cells, log_w, None, bias)
        plain = decode_cell_sample(dec, emb, pe.get_dense_pe(), sparse, dense.expand(3, -1, -1, -1), cells, log_w)
        for i, m in enumerate(counts):
            sp, de = pe(points=(coords[i:i + 1, :m], labels[i:i + 1, :m]), boxes=None, masks=None)
            own = decode_cell_sample(dec, emb[i:i + 1], pe.get_dense_pe(), sp, de, cells[i:i + 1], log_w[i:i + 1])
            torch.testing.assert_close(padded.iou_pred[i:i + 1], own.iou_pred, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded.hyper_in[i:i + 1], own.hyper_in, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded.src[i:i + 1], own.src, atol=1e-5, rtol=1e-5)
            if m < 17:  # more than one pad token: without the bias the row decodes differently
                assert (plain.hyper_in[i:i + 1] - own.hyper_in).abs().max() > 1e-3


def test_cell_sample_strata_weights_and_estimate():
    """sample_cells: k distinct cells per mask, a third each from the boundary, the object and the
    background where they are large enough, weights adding up to the grid; a half-grid sample
    decoded with those weights stays close to the full decoder (shipped weights, a real scene)."""
    from alignsam_ray.foundation.batched_decode import decode_tokens, masks_from_tokens
    from tools.micro_sam.sampled_decode import cell_block_logits, cell_blocks, decode_cell_sample, sample_cells

    rng = np.random.default_rng(0)
    gt = np.zeros((3, 256, 256), bool)
    gt[0, 42:150, 30:201] = True  # boundary cells run through blocks
    gt[1, 8:16, 8:16] = True  # 4 object cells: all taken
    for i, k in ((0, 300), (1, 300), (2, 90)):
        cells, log_w = sample_cells(rng, gt[i: i + 1], k)
        assert cells.shape == (1, k) and len(np.unique(cells)) == k
        np.testing.assert_allclose(np.exp(log_w).sum(), 4096, rtol=1e-4)
    share = gt[0].reshape(64, 4, 64, 4).mean((1, 3)).ravel()
    cells, _ = sample_cells(rng, gt[:1], 300)
    s = share[cells[0]]
    assert ((s > 0) & (s < 1)).sum() == 100 and (s == 1).sum() == 100 and (s == 0).sum() == 100
    cells, log_w = sample_cells(rng, gt[1:2], 300)
    assert (gt[1].reshape(64, 4, 64, 4).any((1, 3)).ravel()[cells[0]]).sum() == 4 and np.isclose(log_w[0, :4], 0).all()
    # the weighted estimate on a real scene
    train = _train_script()
    sam = load_sam("micro")
    rng_scene = np.random.default_rng(3)
    img, lab = train._render(5)
    x = ((torch.from_numpy(img).permute(2, 0, 1)[None].float() - sam.pixel_mean) / sam.pixel_std)
    coords, labels = train.sample_points(rng_scene, lab, 1, 2, 1, 3)
    with torch.no_grad():
        emb = sam.image_encoder(x)
        sparse, dense = sam.prompt_encoder(points=(torch.from_numpy(coords)[None], torch.from_numpy(labels)[None]), boxes=None, masks=None)
        args = (emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        full = masks_from_tokens(sam.mask_decoder, decode_tokens(sam.mask_decoder, *args, range(1))).numpy()[:, 0]
        cells, log_w = sample_cells(rng, lab[None] == 1, 2048)
        part = decode_cell_sample(sam.mask_decoder, *args, torch.from_numpy(cells), torch.from_numpy(log_w), range(1))
        est = cell_block_logits(sam.mask_decoder, part).numpy()[:, 0]
    agree = ((est > 0) == (cell_blocks(full, cells) > 0)).mean()
    assert agree > 0.99, agree


def test_interactive_points_from_sampled_cells_come_from_the_error_region():
    """error_points_in_cells (--token-sample): added points lie in sampled cells, positive where the
    first mask missed the object, negative where it took background, never in the padding."""
    from tools.micro_sam.sampled_decode import cell_blocks, sample_cells

    train = _train_script()
    lab = np.zeros((256, 256), np.uint8)
    lab[:, 200:] = 255
    lab[50:150, 50:150] = 1
    pred = np.zeros((256, 256), bool)
    pred[50:150, 50:100] = True
    pred[160:200, 50:250] = True
    first = (np.array([[300.0, 300.0]], np.float32), np.array([1]))
    rng = np.random.default_rng(0)
    cells, log_w = sample_cells(rng, (lab == 1)[None], 600)
    in_sample = np.zeros(4096, bool)
    in_sample[cells[0]] = True
    blocks = cell_blocks(pred[None], cells)[0]
    seen = set()
    for _ in range(30):
        coords, labels = train.error_points_in_cells(rng, lab, 1, cells[0], blocks, log_w[0], first, 3, 17)
        assert (coords[0] == first[0][0]).all() and (labels[4:] == -1).all()
        yx = ((coords[1:4] - (train.SCALE - 1) / 2) / train.SCALE).round().astype(int)[:, ::-1]
        for (y, x), label in zip(yx, labels[1:4]):
            assert in_sample[(y // 4) * 64 + x // 4]
            assert (lab[y, x] == 1 and not pred[y, x]) if label == 1 else (lab[y, x] == 0 and pred[y, x])
            seen.add(int(label))
    assert seen == {0, 1}

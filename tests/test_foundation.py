"""Frozen SAM backends: official-format checkpoints, type checks, encoder/decoder split, micro-SAM."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from alignsam_ray.foundation import (
    CheckpointError, SamImageEncoder, SamPromptDecoder, detect_sam_type, load_sam,
)
from alignsam_ray.foundation.batched_decode import decode_per_image
from alignsam_ray.foundation.micro_sam import MICRO_SAM_EMBED_DIM, build_sam_micro


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
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_sam("vit_b", str(junk))
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
        for r in range(3):
            ref_low, ref_iou = sam.mask_decoder(emb[r : r + 1], pe.get_dense_pe(), sparse[r : r + 1], dense[r : r + 1], True)
            torch.testing.assert_close(low[r : r + 1], ref_low, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[r : r + 1], ref_iou, atol=1e-5, rtol=1e-4)


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
    """`python scripts/eval_micro_sam.py --out FILE.json` (the quality-bar command) on a few scenes."""
    out = tmp_path / "eval.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "eval_micro_sam.py"
    run = subprocess.run([sys.executable, str(script), "--n", "6", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert 0 <= result["one_point_miou"] <= 1 and 0 <= result["three_point_miou"] <= 1
    assert 0 <= result["three_point_best_of_3_miou"] <= 1 and result["resolution_ceiling_miou"] > 0.9
    assert sum(b["n"] for b in result["by_object_area"]) == result["n_images"] > 0
    assert "2 positive + 1 negative point" in run.stdout


def _train_script():
    """scripts/train_micro_sam.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_micro_sam.py"
    spec = importlib.util.spec_from_file_location("train_micro_sam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

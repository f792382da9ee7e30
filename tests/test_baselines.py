"""The training-free baselines (alignsam_ray/baselines.py): PerSAM and CLIP Surgery points, on the
micro-SAM's real decoder and hand-made store arrays; one check through `alignsam evaluate`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import toy_data

from alignsam_ray import baselines as B
from alignsam_ray.config import ConfigError, RunConfig


def _toy_embedding(e=64, pos=(10, 40), neg=(50, 5), seed=0):
    """(E, 64, 64): cell ``pos`` along a target direction t, cell ``neg`` along -t, the rest random
    vectors orthogonal to t (cosine 0); returns (embedding, t)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(e).astype(np.float32)
    t /= np.linalg.norm(t)
    f = rng.standard_normal((e, 64, 64)).astype(np.float32)
    f -= np.einsum("e,ehw->hw", t, f)[None] * t[:, None, None]
    f[:, pos[0], pos[1]] = 3 * t
    f[:, neg[0], neg[1]] = -2 * t
    return f, t


def test_location_prior_positive_at_the_most_similar_cell_negative_at_the_least(micro_decoder):
    emb, t = _toy_embedding()
    sim, points, labels = B.location_prior(t, emb, (512, 512), micro_decoder)  # 8 pixels per cell
    assert sim.shape == (512, 512) and list(labels) == [1, 0]
    (px, py), (nx, ny) = points
    assert (py // 8, px // 8) == (10, 40)
    assert (ny // 8, nx // 8) == (50, 5)
    assert float(sim.max()) > 0.5 > -0.5 > float(sim.min())  # cosine +-1 at the cells, blurred by the upsampling


def test_target_embedding_and_persam_mean_average_per_image():
    """Each image's mean feature inside its mask, then the mean over images (not over all cells)."""
    e = 8
    emb = np.zeros((2, e, 64, 64), np.float32)
    gt = np.zeros((2, 256, 256), np.uint8)
    a, b = np.arange(e, dtype=np.float32), -np.ones(e, np.float32)
    emb[0, :, :8, :8] = a[:, None, None]
    gt[0, :32, :32] = 1  # 8 x 8 cells
    emb[1, :, 20:52, 20:52] = b[:, None, None]
    gt[1, 80:208, 80:208] = 1  # 32 x 32 cells
    gt[1, 0:40, 0:40] = 255  # void is not foreground
    assert B.reference_cells(gt)[0].sum() == 64 and B.reference_cells(gt)[1].sum() == 32 * 32
    np.testing.assert_allclose(B.target_embedding(emb[:1], gt[:1]), a)
    np.testing.assert_allclose(B.target_embedding(emb, gt), (a + b) / 2)
    with pytest.raises(ValueError, match="foreground"):
        B.target_embedding(emb, np.zeros_like(gt))


def _prompts(micro_decoder, data, k=0):
    hw = tuple(int(v) for v in data["original_size"][k])
    pts = np.array([[hw[1] * 0.25, hw[0] * 0.5], [hw[1] * 0.8, hw[0] * 0.2]])
    return data["embeddings"][k : k + 1].astype(np.float32), micro_decoder.to_input_frame(pts, hw)[None], np.array([[1, 0]])


def test_the_attention_bias_and_the_target_reach_the_decoder(micro_decoder):
    data = toy_data()
    emb, coords, labels = _prompts(micro_decoder, data)
    plain, iou = micro_decoder.decode(emb, coords, labels)
    same, same_iou = B.guided_decode(micro_decoder, emb, coords, labels)  # neither term: SAM's own decoder
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(same_iou, iou, atol=1e-5, rtol=1e-5)
    bias = torch.linspace(0, 1, 4096).reshape(1, 1, 1, -1) ** 4
    guided, _ = B.guided_decode(micro_decoder, emb, coords, labels, attn_bias=bias)
    assert (guided - plain).abs().max() > 1e-2
    # PerSAM adds the bias to the attention probabilities before a second softmax: a constant shift is no bias
    zero, _ = B.guided_decode(micro_decoder, emb, coords, labels, attn_bias=torch.zeros(1, 1, 1, 4096))
    shifted, _ = B.guided_decode(micro_decoder, emb, coords, labels, attn_bias=torch.full((1, 1, 1, 4096), 0.7))
    torch.testing.assert_close(shifted, zero, atol=1e-4, rtol=1e-4)
    target = torch.as_tensor(B.target_embedding(data["embeddings"][:1], data["gt_lowres"][:1])).reshape(1, 1, -1)
    semantic, _ = B.guided_decode(micro_decoder, emb, coords, labels, target=target)
    assert (semantic - plain).abs().max() > 1e-2


def test_guided_transformer_without_terms_is_the_official_transformer(micro_decoder):
    md = micro_decoder.mask_decoder
    g = torch.Generator().manual_seed(0)
    src, pe = torch.randn(2, 64, 64, 64, generator=g), torch.randn(2, 64, 64, 64, generator=g)
    tokens = torch.randn(2, 8, 64, generator=g)
    with torch.inference_mode():
        ours = B.guided_transformer(md.transformer, src, pe, tokens)
        theirs = md.transformer(src, pe, tokens)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _persam_transformer_forward(transformer, image_embedding, image_pe, point_embedding, target):
    """PerSAM's ``TwoWayTransformer.forward`` (per_segment_anything/modeling/transformer.py) transcribed
    for the target term alone, in-place ``+=`` included, on segment_anything's own blocks."""
    image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
    image_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries, keys = point_embedding, image_embedding
    for layer in transformer.layers:
        queries += target
        queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
    q = queries + point_embedding
    k = keys + image_pe
    q += target
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))
    return queries, keys


def test_the_target_term_is_what_persam_s_code_computes(micro_decoder):
    md = micro_decoder.mask_decoder
    g = torch.Generator().manual_seed(1)
    src, pe = torch.randn(1, 64, 64, 64, generator=g), torch.randn(1, 64, 64, 64, generator=g)
    tokens, target = torch.randn(1, 8, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    with torch.inference_mode():
        ours = B.guided_transformer(md.transformer, src, pe, tokens, target=target)
        theirs = _persam_transformer_forward(md.transformer, src, pe, tokens.clone(), target)
        plain = md.transformer(src, pe, tokens)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (ours[0] - plain[0]).abs().max() > 1e-2


def test_persam_runs_both_refinements_and_keeps_the_last(micro_decoder):
    data = toy_data()
    target = B.target_embedding(data["embeddings"][:1], data["gt_lowres"][:1])
    hw = tuple(int(v) for v in data["original_size"][1])
    r = B.persam_image(micro_decoder, data["embeddings"][1], hw, target)
    coords = torch.as_tensor(micro_decoder.to_input_frame(r["points"], hw), dtype=torch.float32)[None]
    labels = torch.as_tensor(r["labels"])[None]
    emb = torch.as_tensor(data["embeddings"][1:2].astype(np.float32))
    pe, md = micro_decoder.prompt_encoder, micro_decoder.mask_decoder

    def official(boxes, mask):  # segment_anything's own MaskDecoder.forward, best of the three masks
        with torch.inference_mode():
            sparse, dense = pe(points=(coords, labels), boxes=boxes, masks=torch.as_tensor(mask)[None, None])
            low, iou = md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                          dense_prompt_embeddings=dense, multimask_output=True)
        return low[0, int(iou[0].argmax())].numpy()

    np.testing.assert_allclose(r["refined"], official(None, r["first"]), atol=1e-3)  # refinement 1: points + mask
    box = r["box"]
    assert box is not None
    mask = micro_decoder.upscale_mask(r["refined"], hw)
    ys, xs = np.nonzero(mask)
    assert list(box) == [xs.min(), ys.min(), xs.max(), ys.max()]
    frame_box = torch.as_tensor(micro_decoder.transform.apply_boxes(box[None], hw), dtype=torch.float32)
    np.testing.assert_allclose(r["logits"], official(frame_box, r["refined"]), atol=1e-3)  # refinement 2: box + mask
    assert np.abs(r["logits"] - r["first"]).max() > 1e-2 and np.abs(r["logits"] - r["refined"]).max() > 1e-2


def test_persam_and_persam_mean_over_a_store(micro_decoder):
    data = toy_data()
    cfg = RunConfig(store="unused")  # srm.text_map None, train.val_images 0
    refs = {k: data[k] for k in ("ids", "embeddings", "gt_lowres")}
    one = B.run_baseline("persam", data, micro_decoder, cfg, refs)
    mean = B.run_baseline("persam_mean", data, micro_decoder, cfg, refs)
    assert len(one.logits) == len(mean.logits) == 2 and one.logits[0].shape == (256, 256)
    assert all(len(p[1]) == 2 for p in one.points) and 0 <= one.label_accuracy <= 1
    assert any(np.abs(a - b).max() > 0 for a, b in zip(one.logits, mean.logits))  # another target


def test_clip_points_select_the_map_s_top_and_bottom_cells():
    sim = np.zeros((32, 32), np.float32)
    sim[:8, :8] = 1.0  # the top-left 4 x 4 cells after the 2x downsample
    sim[24:, 24:] = -1.0  # the bottom-right 4 x 4: the lowest
    points, labels = B.similarity_map_to_points(sim, (320, 640))
    assert list(labels) == [1] * 16 + [0] * 16
    pos, neg = points[:16], points[16:]
    assert {(int(x), int(y)) for x, y in pos} == {(int((c + 0.5) * 40), int((r + 0.5) * 20))
                                                  for r in range(4) for c in range(4)}
    assert {(int(x), int(y)) for x, y in neg} == {(int((c + 0.5) * 40), int((r + 0.5) * 20))
                                                  for r in range(12, 16) for c in range(12, 16)}


def test_clip_points_on_the_store_map_and_refused_without_one(micro_decoder):
    data = toy_data()
    with pytest.raises(ConfigError, match="has none"):
        B.clip_points(data, micro_decoder)
    m = np.zeros((2, 64, 64), np.float16)
    m[:, 30:40, 5:15] = 1
    data["map_star"] = m
    r = B.clip_points(data, micro_decoder, "star")
    assert len(r.logits) == 2 and all(p[1].sum() * 2 == len(p[1]) for p in r.points)
    cfg = RunConfig()  # srm.text_map None
    assert B.skip_reason("clip_points", data, micro_decoder, cfg) is None
    assert "has none" in B.skip_reason("clip_points", toy_data(), micro_decoder, cfg)


def test_sam2_store_persam_refused_clip_points_run():
    """A random-weight SAM 2.1 Hiera-T decoder (sam2's own builder): persam is refused, clip_points runs."""
    from alignsam_ray.foundation.sam2_models import Sam2PromptDecoder, load_sam2

    dec = Sam2PromptDecoder.from_model(load_sam2("sam2.1_hiera_t", None, random_init=True), "sam2.1_hiera_t")
    data = toy_data()
    data["embeddings"] = np.random.default_rng(0).standard_normal((2, 256, 64, 64)).astype(np.float16)
    data["high_res_feats_0"] = np.zeros((2, 32, 256, 256), np.float16)
    data["high_res_feats_1"] = np.zeros((2, 64, 128, 128), np.float16)
    data["map_star"] = np.random.default_rng(1).random((2, 64, 64)).astype(np.float16)
    with pytest.raises(ConfigError, match="SAM 2.1"):
        B.guided_decode(dec, data["embeddings"][:1], np.zeros((1, 2, 2)), np.ones((1, 2)))
    assert "SAM 2.1" in B.skip_reason("persam", data, dec, {"srm": {}})
    r = B.clip_points(data, dec)
    assert [lo.shape for lo in r.logits] == [(256, 256)] * 2 and np.isfinite(r.logits[0]).all()


def test_evaluate_scores_the_baselines_with_paired_intervals(trained_run, blur_store, tmp_path):
    from alignsam_ray.evaluate import evaluate

    m = evaluate(trained_run, blur_store, str(tmp_path / "eval"), n_figures=0, progress=False)
    for name in ("persam", "persam_mean"):
        assert 0 <= m["methods"][name]["miou"] <= 1 and len(m["methods"][name]["ci95"]["miou"]) == 2
        assert set(m["paired"][name]["miou"]) == {"diff", "ci95"}
    assert "clip_points" not in m["methods"] and "has none" in m["skipped"]["clip_points"]  # blur store: no map
    assert "sam3_text" not in m["methods"] and "runs on SAM 3 stores" in m["skipped"]["sam3_text"]  # a micro store
    report = open(tmp_path / "eval" / "report.md").read()
    assert "persam_mean (PerSAM, mean target, ours)" in report and "skipped: clip_points" in report
    assert "skipped: sam3_text: SAM 3 prompted with the task's text runs on SAM 3 stores" in report
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["paired"]["persam"]["miou"]["ci95"]


def test_shots_script_curve_and_table(tmp_path):
    """scripts/shots.py's aggregation: mean, sd and interval across seeds per (method, N); paired counts."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "shots.py")
    spec = importlib.util.spec_from_file_location("shots", path)
    shots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shots)

    def metrics(a, p):
        row = lambda v: {"miou": v, "ci95": {"miou": [v - 0.1, v + 0.1]}}  # noqa: E731
        return {"n_images": 50, "methods": {"alignsam": row(a), "persam": row(p)},
                "paired": {"persam": {"miou": {"diff": a - p, "ci95": [a - p - 0.05, a - p + 0.05]}}}}

    evals = {(1, 0): metrics(0.3, 0.4), (1, 1): metrics(0.6, 0.4), (5, 0): metrics(0.6, 0.2)}
    cur = shots.curve(evals, [1, 5])
    assert cur["alignsam"]["1"]["mean"] == pytest.approx(0.45) and cur["alignsam"]["1"]["seeds"] == 2
    assert cur["alignsam"]["1"]["sd"] == pytest.approx(np.std([0.3, 0.6], ddof=1))
    assert cur["alignsam"]["1"]["ci95"] == pytest.approx([0.35, 0.55])
    assert cur["persam"]["1"]["paired"] == {"diff": pytest.approx(0.05), "above": 1, "below": 1}
    assert cur["persam"]["5"]["paired"]["above"] == 1 and cur["srm_topk"] == {}  # not evaluated: no cell
    text = shots.table(cur, [1, 5], 50)
    assert "| persam | 0.400 ± 0.000 [0.300, 0.500] (2 seeds); diff +0.050, 1 / 1 |" in text
    shots.plot(cur, [1, 5], str(tmp_path / "p.png"), "synthetic_shapes")
    assert (tmp_path / "p.png").stat().st_size > 1000
    row = {"miou": 0.2, "ci95": {"miou": [0.1, 0.3]}}
    rows = {"persam@1": row, "persam_mean@1": row, "clip_points@1": row, "persam_mean@5": row}
    shots.plot_baselines(rows, [1, 5], str(tmp_path / "b.png"), "synthetic_shapes", 50)
    assert (tmp_path / "b.png").stat().st_size > 1000

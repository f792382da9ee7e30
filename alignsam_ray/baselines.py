"""Training-free baselines on a frozen SAM, in the evaluation harness: PerSAM, CLIP Surgery points and SAM 3
given the task's text.

Pure functions on a store's arrays (``EmbeddingStore.arrays``: embeddings (N, E, 64, 64), gt_lowres
(N, 256, 256) in SAM's padded low-res frame, original_size (N, 2) (h, w), map_<text> (N, 64, 64)) and
the store's decoder (``SamPromptDecoder``); every method returns per-image low-res logits as the
rollouts do, so ``evaluate.score`` scores them like every other method.

    persam        PerSAM (Zhang et al. 2023, ZrrSkywalker/Personalize-SAM ``persam.py``), training-free,
                  one-shot: target embedding = mean SAM feature inside the reference mask (the run's
                  first training image); cosine map on the test image; positive point at its maximum,
                  negative at its minimum; first pass with target-guided attention (the map as a bias in
                  the token-to-image cross-attention) and target-semantic prompting (the target
                  embedding added to the tokens); then its two cascaded refinements (points + the mask
                  logits, multimask, best score; then points + the mask's box + its logits, best score).
    persam_mean   ours, n-shot: the same with the target embedding averaged over the run's training
                  images (each image's mean feature inside its mask, then the mean over images).
    clip_points   CLIP Surgery's text-to-SAM-points recipe (xmed-lab/CLIP_Surgery ``demo.py`` with
                  ``clip.similarity_map_to_points``, t = 0.8, down_sample = 2) on the store's map of the
                  task text; one multimask decoder pass, the best-scoring mask.
    sam3_text     SAM 3 stores: what a user would try first, SAM 3's own concept prediction
                  (``Sam3Processor.set_text_prompt``) for each image's task text ("shadow", "glass", the
                  VOC class), the union of the instance masks it keeps at its default threshold (0.5); no
                  agent, no points. It needs SAM 3's whole image model (ViT, text encoder, detector), not
                  the store's decoder: the sam3.pt the store was embedded with (``sam_checkpoint``); its
                  masks are at full resolution (``BaselineResult.masks``).

The PerSAM decoder is segment_anything's own ``MaskDecoder`` / ``TwoWayTransformer`` (SAM 1 and the
micro-SAM): ``guided_transformer`` calls their sub-layers with their weights and adds the two PerSAM
terms; with neither term it equals the decoder's own transformer. SAM 2.1 stores: persam is refused
(ConfigError; its decoder is another transformer; so on SAM 3 stores), clip_points works (a plain decoder pass).
Where ours differs from the reference code, and why: docs/agent.md#training-free-baselines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayTransformer

from .config import ConfigError, RunConfig
from .foundation.batched_decode import decoded_from, masks_from_tokens, prompt_tokens
from .sam_types import SAM3_TYPES

BASELINES = ("persam", "persam_mean", "clip_points", "sam3_text")
# PerSAM reads the reference mask as an RGB image through ``Sam.preprocess`` (pixel normalisation, then
# padding), bilinearly resized to the 64 x 64 grid, and keeps cells > 0: foreground (0/255) above 123.675.
PERSAM_MASK_THRESHOLD = 123.675 / 255
CLIP_POINTS_T = 0.8  # similarity_map_to_points: cells >= t (after min-max) are positives, as many negatives
CLIP_POINTS_DOWN_SAMPLE = 2  # ... on the token grid downsampled 2x
CLIP_TOKEN_GRID = 32  # the demo's token grid (CS-ViT-B/16 at 512 px): the points come from 16 x 16 cells


@dataclass
class BaselineResult:
    """One baseline over all images (the fields ``evaluate`` needs, as ``rollout.Rollout`` has them)."""

    logits: list | None  # (256, 256) float32 low-res logits, one per image (sam3_text: None)
    points: list  # (coords (n, 2) in the 1024 frame, labels (n,)) per image (sam3_text: n = 0)
    hit_rate: float  # share of the method's points on ground-truth foreground (nan without points)
    label_accuracy: float  # share of its points whose label matches the ground truth (void = background)
    masks: list | None = None  # (H, W) bool full-resolution masks, where the method gives no low-res logits

    def stats(self) -> dict:
        return {"hit_rate": self.hit_rate, "label_accuracy": self.label_accuracy}

    def full_masks(self, decoder, sizes) -> list:
        """(H, W) bool per image: ``masks``, else the logits upscaled as SAM does (``decoder.upscale_mask``)."""
        if self.masks is not None:
            return self.masks
        return [decoder.upscale_mask(lo, hw) for lo, hw in zip(self.logits, sizes)]


# ----------------------------------------------------------------------------------- PerSAM: target
def reference_cells(gt_lowres: np.ndarray) -> np.ndarray:
    """(N, 256, 256) uint8 {0, 1, 255 void} -> (N, 64, 64) bool: PerSAM's reference mask on SAM's
    grid (the foreground, bilinearly resized to 64 x 64, above ``PERSAM_MASK_THRESHOLD``)."""
    fg = torch.as_tensor(np.asarray(gt_lowres) == 1, dtype=torch.float32)[:, None]
    return (F.interpolate(fg, size=(64, 64), mode="bilinear") > PERSAM_MASK_THRESHOLD)[:, 0].numpy()


def target_embedding(embeddings: np.ndarray, gt_lowres: np.ndarray) -> np.ndarray:
    """PerSAM's target embedding: per image the mean SAM feature over its reference cells, then the
    mean over the images that have any (one image: PerSAM's own). embeddings (N, E, 64, 64),
    gt_lowres (N, 256, 256) -> (E,) float32. No reference cell anywhere -> ValueError."""
    cells = reference_cells(gt_lowres)
    feats = [np.asarray(e, np.float32)[:, c].mean(1) for e, c in zip(embeddings, cells) if c.any()]
    if not feats:
        raise ValueError("no reference image has ground-truth foreground on SAM's 64 x 64 grid")
    return np.mean(feats, 0).astype(np.float32)


def location_prior(target: np.ndarray, embedding: np.ndarray, original_size, decoder) -> tuple:
    """PerSAM's positive-negative location prior. target (E,), embedding (E, 64, 64) -> (similarity
    (H, W) float32 tensor at the original resolution, points (2, 2) x, y original pixels, labels [1, 0]):
    the cosine similarity per cell, upsampled 4x and then as SAM upscales masks (``decoder.upscale``);
    positive at its maximum, negative at its minimum (the first in row-major order on ties)."""
    t = torch.as_tensor(target, dtype=torch.float32)
    f = torch.as_tensor(np.asarray(embedding, np.float32))
    e, h, w = f.shape
    f = f / f.norm(dim=0, keepdim=True)
    sim = ((t / t.norm()) @ f.reshape(e, h * w)).reshape(1, 1, h, w)
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear")[0]
    sim = decoder.upscale(sim, (int(original_size[0]), int(original_size[1])))[0]
    width = sim.shape[1]
    points = [divmod(int(sim.flatten().argmax()), width), divmod(int(sim.flatten().argmin()), width)]
    return sim, np.array([(x, y) for y, x in points], np.float64), np.array([1, 0])


def attention_bias(sim: torch.Tensor) -> torch.Tensor:
    """PerSAM's target guidance: the (H, W) similarity standardised, bilinearly resized to the 64 x 64
    grid (the whole original image onto it, as its code does), sigmoid -> (1, 1, 1, 4096), added to
    the token-to-image attention."""
    s = (sim - sim.mean()) / torch.std(sim)
    return F.interpolate(s[None, None], size=(64, 64), mode="bilinear").sigmoid().reshape(1, 1, 1, -1)


# ------------------------------------------------------------------------- PerSAM: guided decoder
def _attend(attn: Attention, q, k, v, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Attention`` with its own projections; with ``bias`` PerSAM's target-guided form
    softmax(softmax(q k^T / sqrt(d)) + bias) v, without it the module itself."""
    if bias is None:
        return attn(q=q, k=k, v=v)
    q = attn._separate_heads(attn.q_proj(q), attn.num_heads)
    k = attn._separate_heads(attn.k_proj(k), attn.num_heads)
    v = attn._separate_heads(attn.v_proj(v), attn.num_heads)
    a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    a = torch.softmax(a + bias, dim=-1)
    return attn.out_proj(attn._recombine_heads(a @ v))


def guided_transformer(transformer: TwoWayTransformer, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                       tokens: torch.Tensor, attn_bias: torch.Tensor | None = None,
                       target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` from its own sub-layers, with PerSAM's two terms.

    image_embedding, image_pe: (B, E, h, w); tokens (B, T, E); attn_bias (B | 1, 1, 1, h*w) added in
    every block's token-to-image cross-attention (not the final one, as PerSAM); target (B | 1, 1, E)
    added to the queries before every block and the final attention. As PerSAM's code runs it, its
    in-place ``queries += target`` before the first block also lands in the tokens' positional term
    (the same tensor), so from then on that term carries the target too. Neither term: equal to
    ``transformer(image_embedding, image_pe, tokens)``. Returns (queries (B, T, E), keys (B, h*w, E)).
    """
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    query_pe = tokens if target is None else tokens + target
    queries = tokens
    for layer in transformer.layers:
        if target is not None:
            queries = queries + target
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + query_pe, keys + key_pe,
                                                keys, attn_bias))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=keys + key_pe, k=queries + query_pe, v=queries))
    q = queries + query_pe + (0 if target is None else target)
    queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=keys + key_pe, v=keys))
    return queries, keys


def _check_sam1(decoder) -> None:
    if not isinstance(getattr(getattr(decoder, "mask_decoder", None), "transformer", None), TwoWayTransformer):
        family = "SAM 3" if decoder.sam_type in SAM3_TYPES else "SAM 2.1"
        raise ConfigError(f"persam needs segment_anything's mask decoder (SAM 1 or micro-SAM stores); this store's "
                          f"SAM is {decoder.sam_type!r} ({family}), whose decoder PerSAM's guidance is not defined for")


@torch.inference_mode()
def guided_decode(decoder, embeddings, coords, labels, boxes=None, mask_input=None, multimask: bool = False,
                  attn_bias=None, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decoder (``SamPromptDecoder``) with PerSAM's terms, row i of the prompts on image i.

    embeddings (B, E, 64, 64); coords (B, N, 2) in the 1024 frame; labels (B, N) {1, 0}; boxes (B, 4)
    x0, y0, x1, y1 in the 1024 frame | None; mask_input (B, 1, 256, 256) | None; attn_bias
    (B | 1, 1, 1, 4096) | None; target (B | 1, 1, E) | None -> low-res logits (B, C, 256, 256), IoU (B, C),
    C = 3 if multimask else 1. As ``SamPredictor.predict``: a padding point only when there is no box.
    """
    _check_sam1(decoder)
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    points = (torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
    box = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)
    masks = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32)
    sparse, dense = decoder.prompt_encoder(points=points, boxes=box, masks=masks)
    md = decoder.mask_decoder
    b = emb.shape[0]
    src = emb + dense.expand(b, -1, -1, -1)
    hs, src = guided_transformer(md.transformer, src, decoder.dense_pe().expand(b, -1, -1, -1),
                                 prompt_tokens(md, sparse), attn_bias,
                                 None if target is None else torch.as_tensor(target, dtype=torch.float32))
    d = decoded_from(md, hs, src, tuple(emb.shape[-2:]), range(1, md.num_mask_tokens) if multimask else range(1))
    return masks_from_tokens(md, d), d.iou_pred


def _box(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool -> [x_min, y_min, x_max, y_max] of its foreground (None when empty)."""
    y, x = np.nonzero(mask)
    return None if len(x) == 0 else np.array([x.min(), y.min(), x.max(), y.max()], np.float64)


def persam_image(decoder, embedding: np.ndarray, original_size, target: np.ndarray) -> dict:
    """PerSAM on one image (``persam.py``'s loop body): embedding (E, 64, 64), target (E,) ->
    {"logits": (256, 256) final low-res logits, "points": (2, 2) x, y original pixels, "labels",
    "first", "refined": the low-res logits after the guided pass and after refinement 1,
    "box": the refinement-2 box (original pixels) or None (refinement 1's mask was empty: its logits
    are kept; PerSAM's code would fail there)}."""
    hw = (int(original_size[0]), int(original_size[1]))
    sim, points, labels = location_prior(target, embedding, hw, decoder)
    coords = decoder.to_input_frame(points, hw)[None]
    emb = np.asarray(embedding)[None]
    first, _ = guided_decode(decoder, emb, coords, labels[None], attn_bias=attention_bias(sim),
                             target=torch.as_tensor(target, dtype=torch.float32).reshape(1, 1, -1))
    low, iou = guided_decode(decoder, emb, coords, labels[None], mask_input=first[:, :1], multimask=True)
    refined = low[0, int(iou[0].argmax())]
    box = _box(decoder.upscale_mask(refined, hw))
    final = refined
    if box is not None:
        frame_box = decoder.transform.apply_boxes(box[None], hw)
        low, iou = guided_decode(decoder, emb, coords, labels[None], boxes=frame_box, mask_input=refined[None, None],
                                 multimask=True)
        final = low[0, int(iou[0].argmax())]
    return {"logits": final.numpy().astype(np.float32), "points": points, "labels": labels,
            "first": first[0, 0].numpy(), "refined": refined.numpy(), "box": box}


def persam(data: dict, decoder, target: np.ndarray) -> BaselineResult:
    """PerSAM with a given target embedding (``target_embedding`` of the reference images) on every image."""
    _check_sam1(decoder)
    if target.shape != (decoder.embed_dim,):
        raise ConfigError(f"the PerSAM target embedding has shape {target.shape}, the store's SAM {decoder.embed_dim}")
    runs = [persam_image(decoder, e, hw, target) for e, hw in zip(data["embeddings"], data["original_size"])]
    points = [(decoder.to_input_frame(r["points"], hw), r["labels"]) for r, hw in zip(runs, data["original_size"])]
    return BaselineResult([r["logits"] for r in runs], points, *_point_stats(data, points))


# -------------------------------------------------------------------------------------- CLIP points
def similarity_map_to_points(sim: np.ndarray, shape, t: float = CLIP_POINTS_T,
                             down_sample: int = CLIP_POINTS_DOWN_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """CLIP Surgery's ``similarity_map_to_points``: sim (side, side) on the image (token grid), shape (H, W)
    -> points (2n, 2) x, y original pixels (int, cell centres), labels (2n,) (n ones, then n zeros). The
    map is bilinearly downsampled by ``down_sample``, min-max normalised; the n = min(#cells >= t, half
    the cells) highest cells are positives, the n lowest negatives."""
    s = torch.as_tensor(np.asarray(sim, np.float32))[None, None]
    side = s.shape[-1] // down_sample
    s = F.interpolate(s, (side, side), mode="bilinear")[0, 0].reshape(-1)
    s = (s - s.min()) / (s.max() - s.min())
    rank = s.sort(0)[1]
    n = int(min(int((s >= t).sum()), s.shape[0] // 2))
    scale_h, scale_w = float(shape[0]) / side, float(shape[1]) / side
    points = [[int(min((int(i) % side + 0.5) * scale_w, shape[1] - 1)), int(min((int(i) // side + 0.5) * scale_h,
                                                                              shape[0] - 1))]
              for i in list(rank[len(rank) - n:]) + list(rank[:n])]
    labels = np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)]
    return np.array(points, np.float64).reshape(-1, 2), labels


def image_map(text_map: np.ndarray, original_size) -> np.ndarray:
    """A store map (64, 64) on SAM's padded grid -> the map over the image alone, resampled to the demo's
    token grid (``CLIP_TOKEN_GRID`` square, as CLIP saw the image resized to a square)."""
    from .foundation.clip_surgery import sam_valid_cells

    rows, cols = sam_valid_cells(int(original_size[0]), int(original_size[1]))
    m = torch.as_tensor(np.asarray(text_map, np.float32)[:rows, :cols])[None, None]
    return F.interpolate(m, (CLIP_TOKEN_GRID, CLIP_TOKEN_GRID), mode="bilinear")[0, 0].numpy()


def map_key(data: dict, text_map: str | None) -> str:
    """The store array clip_points reads: map_<text_map>, else the store's only map; ConfigError otherwise."""
    maps = sorted(k for k in data if k.startswith("map_"))
    if text_map and f"map_{text_map}" in data:
        return f"map_{text_map}"
    if len(maps) == 1 and not text_map:
        return maps[0]
    if not maps:
        raise ConfigError("clip_points needs the store's CLIP Surgery map of the task text; this store has none "
                          "(embed it with --clip-model, docs/clip_surgery.md)")
    raise ConfigError(f"clip_points: the store's maps are {[m[4:] for m in maps]}; name one (srm.text_map)"
                      + (f", not {text_map!r}" if text_map else ""))


@torch.inference_mode()
def clip_points(data: dict, decoder, text_map: str | None = None) -> BaselineResult:
    """CLIP Surgery points -> SAM (one multimask pass, the best-scoring mask) on every image."""
    key = map_key(data, text_map)
    logits, points = [], []
    for k, hw in enumerate(data["original_size"]):
        hw = (int(hw[0]), int(hw[1]))
        xy, labels = similarity_map_to_points(image_map(data[key][k], hw), hw)
        coords = decoder.to_input_frame(xy, hw)
        extra = {name: np.asarray(data[name][k : k + 1], np.float32) for name in decoder.extra_keys}
        low, iou = decoder.decode(np.asarray(data["embeddings"][k : k + 1], np.float32), coords[None], labels[None],
                                  multimask=True, **extra)
        logits.append(low[0, int(iou[0].argmax())].numpy().astype(np.float32))
        points.append((coords, labels))
    return BaselineResult(logits, points, *_point_stats(data, points))


# ------------------------------------------------------------------------------------- SAM 3 text
def check_sam3_checkpoint(manifest: dict, store: str, sam_checkpoint: str | None) -> None:
    """A ``sam_checkpoint`` given for a SAM 3 store must be the sam3.pt it was embedded with (sha256): else
    ConfigError (sam3_text would compare the agent with another SAM). Nothing to check on other stores or
    without a file (sam3_text is then skipped, ``skip_reason``)."""
    from .checksum import file_sha256

    expected = manifest.get("checkpoint_sha256")
    if manifest.get("sam_type") not in SAM3_TYPES or not sam_checkpoint or expected == "random-init":
        return
    if not os.path.isfile(sam_checkpoint):
        raise ConfigError(f"--sam-checkpoint {sam_checkpoint!r}: no such file (the sam3.pt store {store!r} was "
                          "embedded with)")
    if file_sha256(sam_checkpoint) != expected:
        raise ConfigError(f"--sam-checkpoint {sam_checkpoint!r} is not the SAM 3 checkpoint store {store!r} was "
                          f"embedded with (sha256 {str(expected)[:12]}... expected)")


def sam3_text_skip_reason(decoder, manifest: dict, sam_checkpoint: str | None) -> str | None:
    """Why sam3_text cannot run here (None: it runs): not a SAM 3 store, or no ``sam_checkpoint`` (a
    random-init store rebuilds its seeded model without one)."""
    if decoder.sam_type not in SAM3_TYPES:
        return (f"SAM 3 prompted with the task's text runs on SAM 3 stores (`alignsam embed --sam sam3`); this "
                f"store's SAM is {decoder.sam_type!r}")
    if not sam_checkpoint and manifest.get("checkpoint_sha256") != "random-init":
        return ("it needs SAM 3's whole image model (its text encoder and detector, not only the store's decoder): "
                "pass --sam-checkpoint sam3.pt, the file the store was embedded with (sha256 "
                f"{str(manifest.get('checkpoint_sha256'))[:12]}...)")
    return None


def sam3_text_model(manifest: dict, store: str, sam_checkpoint: str | None, device="cpu"):
    """SAM 3's image model for sam3_text on ``device``: the store's sam3.pt (checked, ``check_sam3_checkpoint``)
    or, for a random-init store, the same seeded random model its embeddings came from."""
    from .foundation.sam3_models import load_sam3

    check_sam3_checkpoint(manifest, store, sam_checkpoint)
    random_init = manifest.get("checkpoint_sha256") == "random-init"
    return load_sam3(manifest["sam_type"], None if random_init else sam_checkpoint, random_init=random_init).to(device)


def sam3_text(data: dict, image_paths: list, model, device="cpu") -> BaselineResult:
    """sam3_text on the images of ``data`` (their files ``image_paths``, their texts ``data["texts"]``):
    ``text_masks`` per image -> full-resolution masks, no points."""
    from .data.samples import read_image
    from .foundation.sam3_models import text_masks

    masks = [text_masks(model, [read_image(path)], str(text), device)[0]
             for path, text in zip(image_paths, data["texts"])]
    points = [(np.zeros((0, 2), np.float32), np.zeros(0, np.int64)) for _ in masks]
    return BaselineResult(None, points, *rates((0, 0, 0)), masks=masks)


# ----------------------------------------------------------------------------------------- harness
def point_counts(data: dict, points: list) -> tuple[int, int, int]:
    """(points, on ground-truth foreground, labelled as the ground truth says) of the points (1024 frame)
    against gt_lowres, as the rollouts count them; sums over shards merge exactly."""
    n = hits = ok = 0
    for gt, (coords, labels) in zip(data["gt_lowres"], points):
        px = np.clip((np.asarray(coords) / 4).astype(int), 0, 255)
        on = gt[px[:, 1], px[:, 0]] == 1
        n, hits, ok = n + len(on), hits + int(on.sum()), ok + int((on == (np.asarray(labels) == 1)).sum())
    return n, hits, ok


def rates(counts) -> tuple[float, float]:
    """(hit rate, label accuracy) of ``point_counts``."""
    n, hits, ok = counts
    return (hits / n, ok / n) if n else (float("nan"), float("nan"))


def _point_stats(data: dict, points: list) -> tuple[float, float]:
    return rates(point_counts(data, points))


def training_references(cfg: RunConfig) -> dict:
    """The arrays of a run's training images (its store's train split without the train.val_images
    holdout): the reference images of persam (the first) and persam_mean (all)."""
    from .env.episodes import holdout_split
    from .store.loader import EmbeddingStore

    data = EmbeddingStore(cfg.store, verify=False).arrays("train")
    train, _ = holdout_split(len(data["ids"]), int(cfg.train.val_images))
    return {k: data[k][train] for k in ("ids", "embeddings", "gt_lowres")}


def skip_reason(name: str, data: dict, decoder, cfg: RunConfig, manifest: dict | None = None,
                sam_checkpoint: str | None = None) -> str | None:
    """Why ``evaluate`` leaves baseline ``name`` out for this store and run (None: it runs). ``manifest``:
    the store's (sam3_text reads whether it is random-init), ``sam_checkpoint``: its sam3.pt, if given."""
    try:
        if name in ("persam", "persam_mean"):
            _check_sam1(decoder)
        elif name == "clip_points":
            map_key(data, cfg.srm.text_map)
        elif name == "sam3_text":
            return sam3_text_skip_reason(decoder, manifest or {}, sam_checkpoint)
    except ConfigError as exc:
        return str(exc)
    return None


def prepare(data: dict, decoder, cfg: RunConfig, log=print, store=None, sam_checkpoint: str | None = None,
            device="cpu") -> tuple[dict, dict]:
    """Which baselines run for this store and run, and what each needs -> ({name: persam's (E,) target
    embedding, sam3_text's SAM 3 model on ``device``, None for clip_points}, {name: why skipped}). Skipped,
    with the reason logged and returned (``evaluate`` records it): persam / persam_mean on SAM 2.1 and SAM 3
    stores or when the run's training store is unreadable, clip_points on stores without a map, sam3_text
    on stores of another SAM or without ``sam_checkpoint``. ``data``: any batch of the evaluated store
    ``store`` (an ``EmbeddingStore``: its manifest and path; None: a store of another SAM for sam3_text)."""
    from .store.shards import StoreError

    manifest = store.manifest if store is not None else {}
    ready, skipped, refs = {}, {}, None
    for name in BASELINES:
        reason = skip_reason(name, data, decoder, cfg, manifest, sam_checkpoint)
        if reason is None and name == "sam3_text":
            log(f"method {name}: loading SAM 3's image model")
            ready[name] = sam3_text_model(manifest, store.path, sam_checkpoint, device)
        elif reason is None and name.startswith("persam"):
            try:
                refs = training_references(cfg) if refs is None else refs
                ready[name] = persam_target(name, refs, cfg)
            except (OSError, StoreError, ConfigError) as exc:
                reason = f"the run's training store {cfg.store!r} (the reference images) is unusable: {exc}"
        elif reason is None:
            ready[name] = None
        if reason is not None:
            skipped[name] = reason
            log(f"method {name}: skipped ({reason})")
    return ready, skipped


def persam_target(name: str, references: dict, cfg: RunConfig) -> np.ndarray:
    """The target embedding of ``persam`` (the first training image with foreground) or ``persam_mean``
    (every such image) from ``training_references(cfg)``."""
    cells = reference_cells(references["gt_lowres"]).reshape(len(references["ids"]), -1).any(1)
    if not cells.any():
        raise ConfigError(f"persam: no training image of store {cfg.store!r} has ground-truth foreground on "
                          "SAM's 64 x 64 grid to take the target from")
    use = np.flatnonzero(cells)[:1] if name == "persam" else np.flatnonzero(cells)
    return target_embedding(references["embeddings"][use], references["gt_lowres"][use])


def run_prepared(name: str, data: dict, decoder, cfg: RunConfig, target, image_paths: list | None = None,
                 device="cpu") -> BaselineResult:
    """Baseline ``name`` on the images of ``data`` (files ``image_paths``: sam3_text reads them) with what
    ``prepare`` gave it (``target``)."""
    if name == "clip_points":
        return clip_points(data, decoder, cfg.srm.text_map)
    if name == "sam3_text":
        return sam3_text(data, image_paths, target, device)
    if name not in ("persam", "persam_mean"):
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    return persam(data, decoder, target)


def run_baseline(name: str, data: dict, decoder, cfg: RunConfig, references: dict | None = None) -> BaselineResult:
    """Baseline ``name`` on the store arrays ``data`` for the run config ``cfg`` -> per-image low-res logits.
    ``references``: ``training_references(cfg)`` (read once by the caller for both PerSAM variants)."""
    target = None
    if name in ("persam", "persam_mean"):
        target = persam_target(name, references if references is not None else training_references(cfg), cfg)
    return run_prepared(name, data, decoder, cfg, target)

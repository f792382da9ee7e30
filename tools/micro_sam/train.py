"""Train the embedded micro-SAM on the generic synthetic object mix (reproducible, CPU).

Run from the repository root. The defaults are the shipped weights' recipe (v17;
alignsam_ray/weights/micro_sam.json has the exact command and curve):

    python -m tools.micro_sam.train                 # writes micro_sam.pt + micro_sam.json here

i.e. ``--steps 8000 --minutes 44 --scenes 8000 --batch 6 --prompts 3 --mask-input-share 0
--token-sample 512 --fused-norm 1 --interactive 0.3 --few-points 0.3 --min-object-area 0.005
--exact-points 1``. ``--out`` refuses the shipped ``alignsam_ray/weights/`` files unless
``--overwrite-shipped`` is given.

(v13, shipped before it: the same with ``--exact-points 0``; v11: v13 with ``--prompts 2
--token-sample 1024``.)

The earlier v5 weights: ``--steps 2500 --scenes 6000 --batch 6 --prompts 2 --interactive 0
--few-points 0 --mask-input-share 0.5 --token-sample 0 --exact-points 0 --fused-norm 0
--min-object-area 0 --minutes 0`` (README "SAM backends" has every attempt's command and figures).

SAM-style promptable training, class-agnostic: for each scene we pick objects and sample point
prompts as SAM's training does. Stage A: a first positive point uniformly inside the object,
multi-mask output, min-over-masks loss. Stage B (single-mask output, ``--mask-input-share`` of
the steps with the previous low-res logits as mask input), per prompt set either
  * interactive (share ``--interactive``): the stage-A point plus 1..``--max-error-points``
    points drawn from the error region of the stage-A mask (positive where it missed the object,
    negative where it took background) -- SAM's own way of sampling follow-up points, or
  * few (share ``--few-points`` of the rest): 1-3 positive and 0-2 negative points, or
  * uniform: up to 10 positive and 7 negative points anywhere on / off the object (an AlignSAM
    episode ends with T + 2 = 17 points).
Stage B's prompt sets are padded to 17 points (label -1) to decode in one call; with
``--exact-points 1`` each still decodes exactly as its own points alone (``padding_bias``), as
``SamPredictor`` and the episodes decode them.
Loss: 20 x focal + dice on the 256x256 low-res logits, plus MSE on the predicted IoU. The encoder
sees the 256x256 area-downsampled frame (what ``MicroImageEncoder`` does to the 1024 frame), so
scenes are rendered directly at long side 256 to save time.

Speed (the budget is wall time, so cheaper steps are more training):
  * ``--point-loss P``: the mask losses at P sampled low-res pixels per mask (half on the object,
    half off, weighted so the means estimate the full-frame ones), and the decoder draws only
    those pixels (``logits_at_pixels``: exactly the full mask's values there) instead of
    upscaling every prompt set to 256x256;
  * ``--fused-norm 1``: segment_anything's LayerNorm2d through torch's fused kernel (same
    parameters and result).
  Together 0.96 s a step against 1.38 s for the same recipe with the full-frame loss (60 steps
  each, one after the other, this 2-core machine).
  * ``--token-sample K`` (instead of ``--point-loss``): the decoder runs on K stratified cells
    of the 64x64 grid per prompt set (boundary, object, background), its token-to-image
    attention weighted to estimate the pool over all cells (``tools/micro_sam/sampled_decode.py``),
    and the losses are taken on those cells' 16 low-res pixels each. 0.66 s a step against
    1.46 s with ``--point-loss 4096`` (40 steps each, one after the other, 2026-12-01).

``--minutes`` makes the run fit a wall-time budget (the issue's: 45 minutes on 2 cores): the
cosine learning-rate schedule then follows elapsed time and the loop stops when the budget is
spent, so a slower machine does fewer steps instead of overrunning. The steps done and the
training curve (every 50 steps) are recorded in the JSON written next to the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F

from alignsam_ray.foundation.batched_decode import decode_tokens, logits_at_pixels, masks_from_tokens
from alignsam_ray.foundation.micro_sam import ENCODER_INPUT_SIZE, IMAGE_SIZE, build_sam_micro

from ..shipped import add_out_arguments, check_out
from .fused_ops import fuse_for_training
from .object_mix import random_size, render_scene, scene_rng
from .sampled_decode import (
    cell_block_logits,
    cell_blocks,
    decode_cell_sample,
    padding_bias,
    sample_cells,
)

TRAIN_SEED = 1  # object-mix stream for training; tools/micro_sam/evaluate.py holds out seed 2
SCALE = IMAGE_SIZE / ENCODER_INPUT_SIZE  # 256-frame pixel -> 1024-frame coordinate


def _render(index: int):
    rng = scene_rng(TRAIN_SEED, index)
    h, w = random_size(rng, ENCODER_INPUT_SIZE)
    image, labels = render_scene(rng, h, w)
    img = np.zeros((ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE, 3), np.uint8)
    lab = np.full((ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE), 255, np.uint8)  # 255 = padding
    img[:h, :w], lab[:h, :w] = image, labels
    return img, lab


def make_scenes(n: int, workers: int):
    with Pool(workers) as pool:
        out = pool.map(_render, range(n), chunksize=64)
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def _mean(x, weight):
    """Mean over the last (pixel) axis; with ``weight`` (pixels each sample stands for) a weighted mean."""
    return x.mean(-1) if weight is None else (x * weight).sum(-1) / weight.sum(-1)


def focal_loss(logits, target, alpha=0.25, gamma=2.0, weight=None):
    """Per-mask sigmoid focal loss, mean over pixels. logits/target: (..., P) pixels (all 65536
    of the low-res frame, or a sample of them with ``weight`` (..., P)).

    ``alpha`` weights foreground pixels (background: 1 - alpha); ``alpha < 0`` weights both
    alike. With alpha = 0.25 the loss is lowest when a pixel is called foreground only once its
    foreground probability passes about 0.75, so masks come out smaller than the object while the
    model is unsure."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return _mean(loss, weight)


def dice_loss(logits, target, eps=1.0, weight=None):
    """Per-mask soft dice loss over pixels (..., P), optionally weighted as ``focal_loss``."""
    p = torch.sigmoid(logits)
    w = 1.0 if weight is None else weight
    return 1 - (2 * (w * p * target).sum(-1) + eps) / ((w * p).sum(-1) + (w * target).sum(-1) + eps)


def mask_iou(logits, target, weight=None):
    """IoU of ``logits > 0`` with the target over pixels (..., P) (a sample: estimated with ``weight``)."""
    pred = (logits > 0).float()
    w = 1.0 if weight is None else weight
    inter = (w * pred * target).sum(-1)
    union = (w * pred).sum(-1) + (w * target).sum(-1) - inter
    return inter / union.clamp(min=1)


def sample_loss_pixels(rng, gt, n):
    """A point-sampled loss's pixels (Mask2Former's idea): for each mask ``gt`` (N, 256, 256) bool,
    n/2 pixels drawn on the object and n/2 off it (padding counts as off, as in the full loss).
    Returns pixels (N, n, 2) long (y, x), weight (N, 1, n): how many pixels of its stratum each
    sample stands for (so weighted means estimate the full-frame ones), target (N, 1, n)."""
    flat = gt.reshape(len(gt), -1)
    idx = np.empty((len(gt), n), np.int64)
    weight = np.empty((len(gt), n), np.float32)
    for i, row in enumerate(flat):
        fg, bg = np.flatnonzero(row), np.flatnonzero(~row)
        n_fg = n if not len(bg) else (n // 2 if len(fg) else 0)
        for part, pool in ((slice(0, n_fg), fg), (slice(n_fg, n), bg)):
            k = part.stop - part.start
            if k:
                idx[i, part] = pool[rng.integers(0, len(pool), k)]
                weight[i, part] = len(pool) / k
    side = gt.shape[-1]
    pixels = torch.from_numpy(np.stack([idx // side, idx % side], -1))
    target = torch.from_numpy(np.take_along_axis(flat, idx, 1).astype(np.float32))
    return pixels, torch.from_numpy(weight)[:, None], target[:, None]


CELL_CENTRES = torch.from_numpy(np.stack(np.meshgrid(np.arange(64) * 4 + 1, np.arange(64) * 4 + 1, indexing="ij"), -1).reshape(1, -1, 2))


def coarse_mask(decoder, decoded, output):
    """The (N, 256, 256) bool mask of one output per row (``output`` (N,) long), no gradient,
    evaluated once per 4x4 block (at the block's pixel (1, 1)): what point-sampled training uses
    where it needs a whole mask (the interactive points' error region)."""
    with torch.no_grad():
        sel = decoded._replace(hyper_in=decoded.hyper_in[torch.arange(len(output)), output][:, None])
        coarse = logits_at_pixels(decoder, sel, CELL_CENTRES.expand(len(output), -1, -1))[:, 0].view(-1, 64, 64)
    return (coarse > 0).numpy().repeat(4, 1).repeat(4, 2)


def padded_points(yx, point_labels, n_pad):
    """Pixels ``yx`` (m, 2) of the 256 frame with labels (m,) -> points (n_pad, 2) in the 1024
    frame and labels (n_pad,), -1 marking the padding."""
    coords = np.zeros((n_pad, 2), np.float32)
    labels = -np.ones(n_pad, np.int64)
    coords[: len(yx)] = yx[:, ::-1] * SCALE + (SCALE - 1) / 2
    labels[: len(yx)] = point_labels
    return coords, labels


def sample_points(rng, lab, k, n_pos, n_neg, n_pad):
    """Points (n_pad, 2) in the 1024 frame and labels (n_pad,) (-1 = padding)."""
    fg = np.argwhere(lab == k)
    bg = np.argwhere((lab != k) & (lab != 255))
    pos = fg[rng.integers(0, len(fg), n_pos)]
    neg = bg[rng.integers(0, len(bg), n_neg)] if len(bg) and n_neg else np.zeros((0, 2), int)
    return padded_points(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))], n_pad)


def error_points(rng, lab, k, pred, first, n_err, n_pad):
    """SAM's interactive sampling: the first point ``first`` = (coords (1, 2), labels (1,)) plus
    ``n_err`` points drawn uniformly from the error region of ``pred`` (256x256 bool, the previous
    prediction): positive where the object was missed, negative where background was taken.
    Returns points (n_pad, 2) in the 1024 frame and labels (n_pad,) (-1 = padding)."""
    gt = lab == k
    missed, extra = gt & ~pred, pred & ~gt & (lab != 255)
    err = np.argwhere(missed | extra)
    if not len(err):  # a perfect first mask: add points inside the object
        err = np.argwhere(gt)
    return _after_first(first, err[rng.integers(0, len(err), n_err)], gt, n_pad)


def error_points_in_cells(rng, lab, k, cells, pred_blocks, log_weight, first, n_err, n_pad):
    """``error_points`` when the previous prediction is known on sampled cells only
    (``--token-sample``): cells (K,) of the 64x64 grid, pred_blocks (K, 16) bool (their 4x4
    blocks, ``cell_blocks`` order), log_weight (K,). Error pixels are drawn with probability
    proportional to their cell's weight, so they follow the full error region's distribution."""
    gt = lab == k
    yx = np.stack([(cells[:, None] // 64) * 4 + np.arange(16) // 4, (cells[:, None] % 64) * 4 + np.arange(16) % 4], -1)  # (K, 16, 2)
    g, valid = gt[yx[..., 0], yx[..., 1]], lab[yx[..., 0], yx[..., 1]] != 255
    err = (pred_blocks != g) & (valid | g)
    if not err.any():  # a perfect first mask on these cells: add points inside the object
        err = g
    if not err.any():
        err = np.ones_like(g)
    p = (err * np.exp(log_weight)[:, None]).ravel()
    pick = rng.choice(p.size, n_err, p=p / p.sum())
    return _after_first(first, yx.reshape(-1, 2)[pick], gt, n_pad)


def _after_first(first, yx, gt, n_pad):
    """The first point ``first`` = (coords (1, 2), labels (1,)) then pixels ``yx`` (m, 2) of the 256
    frame labelled by ``gt``: points (n_pad, 2) in the 1024 frame and labels (n_pad,)."""
    coords, labels = padded_points(yx, gt[yx[:, 0], yx[:, 1]], n_pad - 1)
    return np.concatenate([first[0][:1], coords]), np.concatenate([first[1][:1].astype(np.int64), labels])


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped weights' recipe (``weights/micro_sam.json``)."""
    ap = argparse.ArgumentParser(prog="python -m tools.micro_sam.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--scenes", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=6, help="scenes per step")
    ap.add_argument("--prompts", type=int, default=3, help="objects (prompt sets) per scene")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-pos", type=int, default=10, help="stage B: at most this many positive points")
    ap.add_argument("--max-neg", type=int, default=7, help="stage B: at most this many negative points")
    ap.add_argument("--interactive", type=float, default=0.3,
                    help="stage B: share of prompt sets that keep the stage-A point and add points from "
                         "the error region of the stage-A mask (SAM's interactive sampling)")
    ap.add_argument("--few-points", type=float, default=0.3,
                    help="stage B: share of the other (not interactive) prompt sets with only 1-3 positive and "
                         "0-2 negative points (the eval's 2 + 1 regime, an episode's first steps)")
    ap.add_argument("--max-error-points", type=int, default=3, help="stage B, interactive sets: 1..this many points")
    ap.add_argument("--minutes", type=float, default=44.0,
                    help="wall-time budget: the cosine schedule follows elapsed time and training stops "
                         "when the budget is spent (or at --steps, whichever comes first); 0: no budget")
    ap.add_argument("--stage-b-weight", type=float, default=1.0, help="weight of the multi-point loss")
    ap.add_argument("--point-loss", type=int, default=0,
                    help="P > 0: compute the mask losses at P sampled low-res pixels per mask (half on the "
                         "object, half off, weighted to estimate the full-frame loss) instead of all 65536; "
                         "the decoder then draws only those pixels (far cheaper steps). 0: the full frame")
    ap.add_argument("--token-sample", type=int, default=512,
                    help="K > 0: the decoder runs on K sampled cells of the 64x64 grid per prompt set (stratified: "
                         "object, background, boundary; its token-to-image attention weighted to estimate the full "
                         "pool, tools/micro_sam/sampled_decode.py) and the mask losses are taken on their 16 low-res "
                         "pixels each, weighted to estimate the full-frame loss. 0: all 4096 cells")
    ap.add_argument("--exact-points", type=int, default=1,
                    help="1 (with --token-sample): stage-B prompt sets, padded to a common length of --max-pos + "
                         "--max-neg points, decode exactly as their own points alone (padding_bias), as SamPredictor "
                         "and the episodes decode them; 0: the padding tokens weigh in (v13 and earlier)")
    ap.add_argument("--focal-alpha", type=float, default=0.25,
                    help="focal loss weight of foreground pixels (background 1 - alpha); < 0: both alike")
    ap.add_argument("--stage-a-single-weight", type=float, default=0.0,
                    help="stage A: weight of a loss on the single-mask output for the one point (it is "
                         "computed in the same decoder pass; 0 = trained by stage B only)")
    ap.add_argument("--mask-input-share", type=float, default=0.0,
                    help="stage B: share of steps that feed the stage-A logits as mask input (SAM's "
                         "training does; AlignSAM episodes and the eval decode points only)")
    ap.add_argument("--fused-norm", type=int, default=1,
                    help="1: compute segment_anything's LayerNorm2d with torch's fused layer_norm kernel (same "
                         "parameters and result, faster steps); 0: as the v5 weights were trained")
    ap.add_argument("--min-object-area", type=float, default=0.005,
                    help="prompt only objects whose visible part covers at least this share of the image "
                         "(tools/micro_sam/evaluate.py asks for >= 0.005; 0: any visible sliver, as v5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    add_out_arguments(ap, "micro_sam.pt")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    check_out(ap, args, "micro-SAM")
    if (args.point_loss or args.token_sample) and args.mask_input_share:
        ap.error("--point-loss and --token-sample need --mask-input-share 0 (a mask input needs the full stage-A logits)")
    if args.point_loss and args.token_sample:
        ap.error("--token-sample takes its own loss pixels: use it without --point-loss")
    if args.exact_points and not args.token_sample:
        ap.error("--exact-points works on the sampled-cell decoder: use it with --token-sample")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    images, labels = make_scenes(args.scenes, workers=args.threads)
    print(f"rendered {args.scenes} scenes in {time.time() - t0:.0f}s", flush=True)

    sam = build_sam_micro()
    if args.fused_norm:  # same parameters and maths, faster steps (see fused_ops.py)
        fuse_for_training(sam)
    sam.train()
    mean = sam.pixel_mean.view(1, 3, 1, 1)
    std = sam.pixel_std.view(1, 3, 1, 1)
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 100
    # the loop's share of the wall-time budget (rendering the scenes has already used some)
    loop_seconds = None if not args.minutes else args.minutes * 60 - (time.time() - t0) - 30
    pe = sam.prompt_encoder
    history, curve = [], []  # per step (loss, 1pt IoU, multi-pt IoU); every 50 steps the means
    t_train = time.time()
    for step in range(args.steps):
        progress = step / args.steps
        if loop_seconds is not None:
            progress = max(progress, (time.time() - t_train) / loop_seconds)
            if progress >= 1:
                break
        for group in opt.param_groups:  # linear warm-up, then cosine decay over the steps or the time budget
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        idx = rng.integers(0, args.scenes, args.batch)
        img = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float()
        lab = labels[idx]
        pad = torch.from_numpy(lab == 255)[:, None]
        x = ((img - mean) / std).masked_fill(pad, 0.0)
        emb = sam.image_encoder(x)
        dense_pe = pe.get_dense_pe()
        # pick objects: P prompt sets per scene, all decoded in one batched call
        rows, ks = [], []
        for b in range(args.batch):
            ids, counts = np.unique(lab[b], return_counts=True)
            valid = counts[ids != 255].sum()
            present = [k for k, c in zip(ids, counts) if k not in (0, 255) and c >= args.min_object_area * valid]
            if present:
                for k in rng.choice(present, args.prompts):
                    rows.append(b)
                    ks.append(k)
        rows_t = torch.tensor(rows)
        src = emb[rows_t]
        gt_masks = np.stack([lab[b] == k for b, k in zip(rows, ks)])  # (N, 256, 256)
        n = len(rows)
        # the loss's pixels: all of the low-res frame, or a weighted sample (--point-loss)
        cells = None
        if args.token_sample:  # K cells per prompt set; the loss on their 16 pixels each
            cells, log_w = sample_cells(rng, gt_masks, args.token_sample)  # (N, K), (N, K)
            pixels = None
            weight = torch.from_numpy(np.repeat(np.exp(log_w), 16, 1))[:, None]  # (N, 1, K*16)
            gt = torch.from_numpy(cell_blocks(gt_masks, cells).reshape(n, 1, -1).astype(np.float32))
            cells_t, log_w_t = torch.from_numpy(cells), torch.from_numpy(log_w)
        elif args.point_loss:
            pixels, weight, gt = sample_loss_pixels(rng, gt_masks, args.point_loss)  # (N,P,2), (N,1,P), (N,1,P)
        else:
            pixels, weight, gt = None, None, torch.from_numpy(gt_masks).float().flatten(1)[:, None]  # (N,1,65536)
        dec = sam.mask_decoder

        def decode(sparse, dense, outputs=None, point_bias=None):  # the transformer on all cells, or on the sampled ones
            if cells is None:
                return decode_tokens(dec, src, dense_pe, sparse, dense, outputs)
            return decode_cell_sample(dec, src, dense_pe, sparse, dense, cells_t, log_w_t, outputs, point_bias)

        def loss_logits(tokens):  # (N, C, P) at the loss's pixels: the sampled cells' 16 each, the sampled
            if cells is not None:  # pixels (--point-loss), or every pixel of the 256x256 frame
                return cell_block_logits(dec, tokens).flatten(2)
            if pixels is None:
                return masks_from_tokens(dec, tokens).flatten(2)
            return logits_at_pixels(dec, tokens, pixels)

        def mask_loss(logits):  # (N, C, P) -> (N, C)
            return 20 * focal_loss(logits, gt, args.focal_alpha, weight=weight) + dice_loss(logits, gt, weight=weight)

        # stage A: one positive point, three masks, min-over-masks loss
        pa = [sample_points(rng, lab[b], k, 1, 0, 1) for b, k in zip(rows, ks)]
        sp, de = pe(points=(torch.from_numpy(np.stack([p[0] for p in pa])), torch.from_numpy(np.stack([p[1] for p in pa]))), boxes=None, masks=None)
        # one pass computes all four outputs: 0 = single mask, 1..3 = multimask
        tokens_a = decode(sp, de.expand(n, -1, -1, -1))
        logits4 = loss_logits(tokens_a)  # (N, 4, P)
        low, iou_pred = logits4[:, 1:], tokens_a.iou_pred[:, 1:]
        per_mask = mask_loss(low)  # (N, 3)
        best = per_mask.argmin(1)
        true_iou = mask_iou(low.detach(), gt, weight)
        loss_a = per_mask.gather(1, best[:, None]).mean() + F.mse_loss(iou_pred, true_iou)
        if args.stage_a_single_weight:  # the single-mask output learns the whole object from one point too
            single = logits4[:, :1]
            loss_a = loss_a + args.stage_a_single_weight * (
                mask_loss(single).mean() + F.mse_loss(tokens_a.iou_pred[:, :1], mask_iou(single.detach(), gt, weight)))
        iou1 = true_iou.gather(1, iou_pred.argmax(1, keepdim=True)).mean().item()
        # stage B: up to --max-pos positive and --max-neg negative points (AlignSAM episodes hold
        # up to T + 2 = 17 points), single mask, optionally with the previous low-res logits as
        # mask input
        n_pad = args.max_pos + args.max_neg
        if args.interactive:  # the stage-A mask a user would see (highest predicted IoU)
            shown = 1 + iou_pred.detach().argmax(1)  # index among the four outputs
            if cells is not None:  # known on the sampled cells: (N, K, 16)
                chosen = logits4.detach()[torch.arange(n), shown].view(n, -1, 16).numpy() > 0
            elif pixels is None:  # the full masks are already drawn
                chosen = logits4.detach()[torch.arange(n), shown].view(n, 256, 256).numpy() > 0
            else:
                chosen = coarse_mask(dec, tokens_a, shown)
        pb = []
        for i, (b, k) in enumerate(zip(rows, ks)):
            if args.interactive and rng.random() < args.interactive:
                n_err = int(rng.integers(1, args.max_error_points + 1))
                if cells is not None:
                    pb.append(error_points_in_cells(rng, lab[b], k, cells[i], chosen[i], log_w[i], pa[i], n_err, n_pad))
                else:
                    pb.append(error_points(rng, lab[b], k, chosen[i], pa[i], n_err, n_pad))
            elif args.few_points and rng.random() < args.few_points:
                pb.append(sample_points(rng, lab[b], k, int(rng.integers(1, 4)), int(rng.integers(0, 3)), n_pad))
            else:
                pb.append(sample_points(rng, lab[b], k, int(rng.integers(1, args.max_pos + 1)), int(rng.integers(0, args.max_neg + 1)), n_pad))
        prev = None
        if rng.random() < args.mask_input_share:  # full-frame loss only (checked at start)
            prev = low.detach()[torch.arange(n), best].view(n, 1, 256, 256)
        labels_b = torch.from_numpy(np.stack([p[1] for p in pb]))  # (N, n_pad), -1 = padding
        sp, de = pe(points=(torch.from_numpy(np.stack([p[0] for p in pb])), labels_b), boxes=None, masks=prev)
        bias_b = None
        if args.exact_points:  # the prompt encoder appended one more pad (no box), as SamPredictor's does
            bias_b = padding_bias(torch.cat([labels_b, -torch.ones(n, 1, dtype=labels_b.dtype)], 1))
        tokens_b = decode(sp, de.expand(n, -1, -1, -1), outputs=range(1), point_bias=bias_b)
        low_b = loss_logits(tokens_b)  # (N, 1, P)
        true_b = mask_iou(low_b.detach(), gt, weight)
        loss_b = mask_loss(low_b).mean() + F.mse_loss(tokens_b.iou_pred, true_b)
        iou2 = true_b.mean().item()
        loss_total = loss_a + args.stage_b_weight * loss_b
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        history.append((loss_total.item(), iou1, iou2))
        if step % 50 == 0 or step == args.steps - 1:
            h = np.array(history[-50:])
            el = time.time() - t_train
            curve.append({"step": step, "minutes": round(el / 60, 2), "loss": round(float(h[:, 0].mean()), 4),
                          "train_1pt_iou": round(float(h[:, 1].mean()), 4), "train_multipt_iou": round(float(h[:, 2].mean()), 4)})
            print(
                f"step {step:5d}/{args.steps} lr {opt.param_groups[0]['lr']:.2e}  loss {h[:, 0].mean():.3f}  1pt IoU {h[:, 1].mean():.3f}  "
                f"multi-pt IoU {h[:, 2].mean():.3f}  {el / (step + 1):.2f}s/step  elapsed {el / 60:.1f} min",
                flush=True,
            )
    sam.eval()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(sam.state_dict(), args.out)
    info = {
        "steps": len(history), "scenes": args.scenes, "batch": args.batch, "prompts": args.prompts,
        "lr": args.lr, "stage_b_weight": args.stage_b_weight, "stage_a_single_weight": args.stage_a_single_weight,
        "focal_alpha": args.focal_alpha, "exact_points": args.exact_points, "token_sample": args.token_sample, "fused_norm": args.fused_norm, "point_loss": args.point_loss,
        "mask_input_share": args.mask_input_share, "max_pos": args.max_pos, "max_neg": args.max_neg,
        "interactive": args.interactive, "min_object_area": args.min_object_area, "few_points": args.few_points, "max_error_points": args.max_error_points, "minutes_budget": args.minutes or None, "seed": args.seed, "object_mix_seed": TRAIN_SEED,
        "train_minutes": round((time.time() - t0) / 60, 1),
        "final_train_1pt_iou": float(np.mean([h[1] for h in history[-100:]])),
        "final_train_multipt_iou": float(np.mean([h[2] for h in history[-100:]])),
        "command": "python -m tools.micro_sam.train " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
            for k, v in vars(args).items() if v is not False),
        "curve": curve,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()

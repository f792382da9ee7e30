"""Train the embedded micro CLIP (``alignsam_ray/foundation/micro_clip.py``) contrastively on captioned shapes.

    python -m tools.micro_clip.train       # from the repository root; the defaults produced the shipped weights

``--out`` (default ``micro_clip.pt`` in the current directory) refuses the shipped
``alignsam_ray/weights/`` files unless ``--overwrite-shipped`` is given.

Data: pictures in the style of the ``synthetic_shapes`` task (``alignsam_ray/data/synthetic.py``; its
drawing helpers are reused: textured background, named shapes circle/square/triangle/star/cross, random
colours), drawn by ``captioned_example`` with a caption listing the shape classes that are visible,
in ``SHAPE_CLASSES`` order, e.g. "circle and star and cross". Also single large shapes ("star") and a few
shape-free backgrounds (caption ""). Pictures are drawn at a reduced resolution (long side
``--gen-size``) with the texture scales shrunk accordingly, then preprocessed exactly as at inference
(pad bottom/right to a square, resize to the model input, normalise: ``clip_surgery.preprocess_image``).
Every batch comes from ``np.random.default_rng([TRAIN_NAMESPACE, seed, step])``: a namespace disjoint
from the synthetic task generator's (``synthetic.NAMESPACE``), so no held-out evaluation picture is
ever drawn here.

Loss: symmetric InfoNCE as open_clip's ``ClipLoss`` (learnable temperature clamped at 100 as open_clip), with
one change: a batch holds many identical captions (there are 32 possible ones), and ClipLoss would treat
a picture's identical-caption neighbours as negatives; here the targets are spread uniformly over all
pairs with the same caption (``soft_clip_loss``; equal to ClipLoss when all captions differ).
Optimiser: AdamW (no weight decay on gains, biases, embeddings, logit scale), linear warm-up then cosine.
Output: ``--out`` (fp16 open_clip state dict; token-embedding rows of tokens no caption uses are
zeroed) and a json next to it with the config, seed, steps, final loss, wall time.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from alignsam_ray.data.synthetic import (  # drawing helpers of the shapes task
    _SHAPE_AREA,
    SHAPE_CLASSES,
    TARGET_SHAPE,
    _centre,
    _colour,
    _noise,
    _shape,
)
from alignsam_ray.foundation.clip_surgery import preprocess_image
from alignsam_ray.foundation.micro_clip import MICRO_CLIP_CFG, build_micro_clip, micro_tokenizer

from ..shipped import add_out_arguments, check_out

TRAIN_NAMESPACE = 0xC11C1A55  # this script's rng namespace (synthetic.py uses 0xDA7A5E7)
P_SINGLE = 0.25               # one large shape, caption = its class
P_EMPTY = 0.05                # background only, caption ""
N_STARS_P = (0.3, 0.35, 0.23, 0.12)  # scenes: probability of 0, 1, 2, 3 stars
VISIBLE_FRACTION = 0.3        # a shape is in the caption if >= this fraction of it is visible


# ------------------------------------------------------------------------------------------ data
def captioned_example(rng: np.random.Generator, gen_size: int = 192) -> tuple[np.ndarray, str]:
    """One picture (h, w, 3) uint8 (long side ``gen_size``, aspect W/H 0.6..1.7) and its caption.

    Geometry and statistics follow ``synthetic._shapes`` at a long side drawn from 256..512, scaled
    down to ``gen_size`` (texture cell sizes scaled alike).
    """
    long_side, aspect = int(rng.integers(256, 513)), float(rng.uniform(0.6, 1.7))
    scale = gen_size / long_side
    if aspect >= 1:
        h, w = max(48, round(gen_size / aspect)), gen_size
    else:
        h, w = gen_size, max(48, round(gen_size * aspect))

    tone = np.array(_colour(rng, sat=(0.0, 0.4), val=(0.3, 0.9)), np.float32)
    bg = tone * (0.8 + 0.4 * _noise(rng, h, w, rng.uniform(30, 100) * scale, 1))
    bg += (_noise(rng, h, w, max(1.5, rng.uniform(4, 10) * scale)) - 0.5) * 40
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    mode = rng.random()
    if mode < P_EMPTY:
        return np.asarray(img), ""
    if mode < P_EMPTY + P_SINGLE:
        kinds = [str(rng.choice(SHAPE_CLASSES))]
        areas = [rng.uniform(0.05, 0.35) * h * w]
    else:
        n_stars = int(rng.choice(len(N_STARS_P), p=N_STARS_P))
        others = [str(k) for k in rng.choice([s for s in SHAPE_CLASSES if s != TARGET_SHAPE], int(rng.integers(1, 7)))]
        kinds = [TARGET_SHAPE] * n_stars + others
        star_area = rng.uniform(0.07, 0.30) * h * w / max(n_stars, 1)
        areas = [star_area if k == TARGET_SHAPE else rng.uniform(0.01, 0.06) * h * w for k in kinds]

    labels = Image.new("L", (w, h), 0)  # instance ids, later shapes on top
    draw_img, draw_lab = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    order = rng.permutation(len(kinds))
    full = []
    for inst, j in enumerate(order, start=1):
        r = np.sqrt(areas[j] / _SHAPE_AREA[kinds[j]])
        outline = _shape(kinds[j], *_centre(rng, h, w, 0.8 * r), r, rng.uniform(0, 2 * np.pi)).ravel().tolist()
        draw_img.polygon(outline, fill=_colour(rng))
        draw_lab.polygon(outline, fill=inst)
        one = Image.new("L", (w, h), 0)
        ImageDraw.Draw(one).polygon(outline, fill=1)
        full.append(max(1, int(np.asarray(one).sum())))
    lab = np.asarray(labels)
    visible = np.bincount(lab.ravel(), minlength=len(kinds) + 1)[1:]
    present = {kinds[j] for inst, j in enumerate(order) if visible[inst] >= VISIBLE_FRACTION * full[inst]}
    return np.asarray(img), " and ".join(k for k in SHAPE_CLASSES if k in present)  # fixed class order


def make_batch(rng: np.random.Generator, n: int, size: int, mean, std, gen_size: int
               ) -> tuple[torch.Tensor, list[str]]:
    """n preprocessed pictures (n, 3, size, size) and their captions."""
    images, captions = [], []
    for _ in range(n):
        image, caption = captioned_example(rng, gen_size)
        images.append(preprocess_image(image, size, mean, std))
        captions.append(caption)
    return torch.stack(images), captions


# -------------------------------------------------------------------------------------- training
def soft_clip_loss(image_f: torch.Tensor, text_f: torch.Tensor, logit_scale: torch.Tensor,
                   captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over a batch (B, D) x (B, D) of normalised features; pairs with equal captions are positives."""
    logits = logit_scale * image_f @ text_f.T                                 # (B, B) picture i vs caption j
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = (cid[:, None] == cid[None, :]).float()
    targets = same / same.sum(1, keepdim=True)                                # symmetric pattern: rows = cols
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def caption_token_ids(tokenizer) -> list[int]:
    """Every token id a caption can contain (class names, "and", start/end of text)."""
    ids = tokenizer(list(SHAPE_CLASSES) + ["and", ""]).unique().tolist()
    return sorted(i for i in ids if i != 0)


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults produced the shipped weights (``weights/micro_clip.json``)."""
    ap = argparse.ArgumentParser(prog="python -m tools.micro_clip.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-size", type=int, default=192, help="long side the pictures are drawn at")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", default=None, help="override vision_cfg.pool_type (tok/avg)")
    ap.add_argument("--layers", type=int, default=None, help="override vision_cfg.layers")
    add_out_arguments(ap, "micro_clip.pt")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    check_out(ap, args, "micro CLIP")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = copy.deepcopy(MICRO_CLIP_CFG)
    if args.pool:
        cfg["vision_cfg"]["pool_type"] = args.pool
    if args.layers:
        cfg["vision_cfg"]["layers"] = args.layers
    model = build_micro_clip(cfg).train()
    tokenizer = micro_tokenizer(cfg)
    pp = model.visual.preprocess_cfg
    size = cfg["vision_cfg"]["image_size"]

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))

    t0, losses = time.time(), []
    bar = tqdm(range(args.steps), desc="micro CLIP", unit="step")
    for step in bar:
        rng = np.random.default_rng([TRAIN_NAMESPACE, args.seed, step])
        images, captions = make_batch(rng, args.batch, size, pp["mean"], pp["std"], args.gen_size)
        image_f, text_f, logit_scale = model(images, tokenizer(captions))[:3]
        loss = soft_clip_loss(image_f, text_f, logit_scale, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    minutes = (time.time() - t0) / 60

    model.eval()
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    keep = torch.tensor(caption_token_ids(tokenizer))
    emb = torch.zeros_like(state["token_embedding.weight"])
    emb[keep] = state["token_embedding.weight"][keep]   # untrained rows -> 0 (they had no gradient)
    state["token_embedding.weight"] = emb
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(state, args.out)
    meta = {
        "model_cfg": cfg, "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()},
        "n_surgery_blocks": cfg["vision_cfg"]["layers"],
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup": args.warmup, "gen_size": args.gen_size, "threads": args.threads, "train_namespace": TRAIN_NAMESPACE,
        "final_loss": float(np.mean(losses[-50:])), "final_logit_scale": float(model.logit_scale.exp()),
        "train_minutes": round(minutes, 2), "weights_bytes": os.path.getsize(args.out),
        "command": "python -m tools.micro_clip.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(json.dumps({k: meta[k] for k in ("steps", "final_loss", "train_minutes", "weights_bytes")}))


if __name__ == "__main__":
    main()

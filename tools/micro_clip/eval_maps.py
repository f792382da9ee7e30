"""How informative are the CLIP Surgery maps for "star" on held-out synthetic_shapes pictures?

    python -m tools.micro_clip.eval_maps --out results/clip_maps.json [--n 100]

Data: ``generate_task('synthetic_shapes', ..., seed=0)``, the test split (the same pictures the project
evaluates on; the micro CLIP was trained from another rng namespace). Per picture, the map for
"star" (``ClipSurgery.maps``, 64x64 on SAM's grid) is scored against the ground truth on the same grid:
the mask padded bottom/right to a square (as SAM pads) and area-averaged to 64x64; a cell is positive
when >= 50% of it is foreground. Only the cells the picture covers count (``sam_valid_cells``; SAM's
padding is excluded). Metric: AUROC per picture (sklearn), averaged over pictures.

Models: the shipped micro CLIP, and the same architecture at a seeded random initialisation.
Variants (all through ``ClipSurgery``):
    surgery        maps(["star"]): v-v surgery path + the empty-text redundant feature (the default)
    class_set      maps(all five shape names)["star"]: feature surgery over the class set (softmax weights)
    no_feature_surgery   weighting="none": cosine similarity of the surgery-path tokens to "star"
    no_arch_surgery      n_surgery_blocks=0: the original path's tokens, with feature surgery
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from alignsam_ray.data import generate_task, open_dataset
from alignsam_ray.data.samples import load_pair
from alignsam_ray.data.synthetic import SHAPE_CLASSES, TARGET_SHAPE
from alignsam_ray.foundation.clip_surgery import MAP_SIZE, ClipSurgery, map_auroc
from alignsam_ray.foundation.micro_clip import (
    MICRO_CLIP_CFG,
    MICRO_CLIP_WEIGHTS,
    build_micro_clip,
    micro_metadata,
    micro_tokenizer,
)

RANDOM_INIT_SEED = 0


def load_split(data_dir: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first n synthetic_shapes test pictures (H, W, 3) uint8 and their masks (H, W) bool."""
    generate_task("synthetic_shapes", data_dir, n_train=0, n_test=n, seed=0, progress=False)
    pairs = [load_pair(s) for s in open_dataset(data_dir, n_train=None) if s.split == "test"][:n]
    return [image for image, _ in pairs], [mask == 1 for _, mask in pairs]


def score(cs: ClipSurgery, images, masks, texts: list[str], index: int) -> dict:
    maps = cs.maps(images, texts)[:, index].astype(np.float32)    # (B, 64, 64)
    values = [v for m, mask in zip(maps, masks) if (v := map_auroc(m, mask)) is not None]
    return {"auroc": float(np.mean(values)), "auroc_std": float(np.std(values)), "n_scored": len(values)}


def evaluate(model, tokenizer, images, masks, blocks: int) -> dict:
    """All variants for one model (the variants only change how ``ClipSurgery`` runs it)."""
    def cs(**kw):
        return ClipSurgery(model, tokenizer, **{"n_surgery_blocks": blocks, **kw})
    classes = list(SHAPE_CLASSES)
    return {
        "surgery": score(cs(), images, masks, [TARGET_SHAPE], 0),
        "class_set": score(cs(), images, masks, classes, classes.index(TARGET_SHAPE)),
        "no_feature_surgery": score(cs(weighting="none"), images, masks, [TARGET_SHAPE], 0),
        "no_arch_surgery": score(cs(n_surgery_blocks=0), images, masks, [TARGET_SHAPE], 0),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/clip_maps.json")
    ap.add_argument("--n", type=int, default=100, help="held-out test pictures")
    ap.add_argument("--weights", default=MICRO_CLIP_WEIGHTS)
    ap.add_argument("--blocks", type=int, default=None, help="n_surgery_blocks (default: micro_clip.json's)")
    ap.add_argument("--data-dir", default=None, help="where the test pictures are generated (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="clip_maps_")
        args.data_dir = os.path.join(tmp.name, "synthetic_shapes")
    images, masks = load_split(args.data_dir, args.n)

    trained = ClipSurgery.load("micro", weights=args.weights)
    blocks = trained.n_surgery_blocks if args.blocks is None else args.blocks

    cfg = micro_metadata(args.weights).get("model_cfg", MICRO_CLIP_CFG)
    torch.manual_seed(RANDOM_INIT_SEED)
    random_init = build_micro_clip(cfg)

    results = {"micro_clip": evaluate(trained.model, trained.tokenizer, images, masks, blocks),
               "random_init": evaluate(random_init, micro_tokenizer(cfg), images, masks, blocks)}
    sweep = {}
    for k in range(len(trained.model.visual.transformer.resblocks) + 1):
        cs = ClipSurgery(trained.model, trained.tokenizer, n_surgery_blocks=k)
        sweep[str(k)] = score(cs, images, masks, [TARGET_SHAPE], 0)["auroc"]

    out = {
        "micro_clip_auroc": results["micro_clip"]["surgery"]["auroc"],
        "random_init_auroc": results["random_init"]["surgery"]["auroc"],
        "n_images": len(images),
        "text": TARGET_SHAPE, "n_surgery_blocks": blocks, "random_init_seed": RANDOM_INIT_SEED,
        "weights": os.path.relpath(args.weights), "data": "synthetic_shapes test split, generate_task seed=0",
        "grid": MAP_SIZE, "positive_cell": "foreground fraction >= 0.5", "variants": results,
        "micro_clip_auroc_by_n_surgery_blocks": sweep, "seconds": round(time.time() - t0, 1),
        "command": "python -m tools.micro_clip.eval_maps " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"CLIP Surgery map for {TARGET_SHAPE!r}: mean AUROC over {len(images)} held-out synthetic_shapes pictures "
          f"(64x64 grid, image cells only), n_surgery_blocks={blocks}")
    print(f"{'variant':<22}{'micro CLIP':>12}{'random init':>13}")
    for variant in results["micro_clip"]:
        print(f"{variant:<22}{results['micro_clip'][variant]['auroc']:>12.3f}{results['random_init'][variant]['auroc']:>13.3f}")
    print("micro CLIP surgery AUROC by n_surgery_blocks: " + ", ".join(f"{k}: {v:.3f}" for k, v in sweep.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""How much a micro-SAM's single mask depends on extra "not a point" padding tokens.

    python -m tools.micro_sam.padding_check --out padding.json [--checkpoint A.pt --checkpoint B.pt ...]

The scenes and points of ``tools/micro_sam/evaluate.py`` (held-out stream seed 2; two positive
points inside the object, one negative outside), decoded through ``SamPredictor`` as given
(SAM appends one pad token) and again padded with label -1 to 5 and to 17 points, the length
training padded stage-B prompt sets to before ``--exact-points``. A model trained with padded
rows but used without padding (SamPredictor, the AlignSAM episodes) scores differently on the
two; a model trained with ``--exact-points 1`` decodes the same rows it is used on.
Prints a table (mIoU per checkpoint and padding) and writes JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from segment_anything import SamPredictor

from alignsam_ray.foundation import load_sam

from .evaluate import held_out_prompts, iou

PADDED_LENGTHS = (5, 17)


def padded(points: np.ndarray, labels: np.ndarray, length: int):
    """points (m, 2), labels (m,) -> (length, 2), (length,) with label -1 after the m points."""
    extra = length - len(points)
    return np.concatenate([points, np.zeros((extra, 2))]), np.concatenate([labels, -np.ones(extra, int)])


def check(checkpoint: str | None, n: int) -> dict:
    predictor = SamPredictor(load_sam("micro", checkpoint))
    scores = {"three_point": [], **{f"three_point_pad{k}": [] for k in PADDED_LENGTHS},
              "two_positive": [], "two_positive_pad17": []}
    for image, gt, p, q in held_out_prompts(n):
        predictor.set_image(image)
        points, point_labels = np.concatenate([p, q]).astype(np.float64), np.array([1, 1, 0])

        def score(pts, lab):
            masks, _, _ = predictor.predict(point_coords=pts, point_labels=lab, multimask_output=False)
            return iou(masks[0], gt)

        scores["three_point"].append(score(points, point_labels))
        for k in PADDED_LENGTHS:
            scores[f"three_point_pad{k}"].append(score(*padded(points, point_labels, k)))
        scores["two_positive"].append(score(points[:2], point_labels[:2]))
        scores["two_positive_pad17"].append(score(*padded(points[:2], point_labels[:2], 17)))
    out = {k: round(float(np.mean(v)), 4) for k, v in scores.items()}
    out["n_images"] = len(scores["three_point"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None,
                    help="micro-SAM weights (repeatable); default: the weights shipped in the package")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {ck or "shipped": check(ck, args.n) for ck in (args.checkpoint or [None])}
    keys = [k for k in next(iter(results.values())) if k != "n_images"]
    print(f"{'checkpoint':<40}" + "".join(f"{k:>20}" for k in keys))
    for ck, r in results.items():
        print(f"{ck[-40:]:<40}" + "".join(f"{r[k]:>20.3f}" for k in keys))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

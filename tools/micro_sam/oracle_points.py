"""How a SAM backend responds to more and more oracle foreground points (a ceiling for the agent).

    python -m tools.micro_sam.oracle_points STORE [STORE ...] [--n 24] [--split train]

Per image: the training reset (one positive + one negative point from the ground truth), then 15
steps that each add a random *foreground* patch centre of the 10 x 10 grid with its true label
(background ones once no foreground patch is left). Prints the mean low-res IoU after 0, 1, 3, 5,
10 and 15 steps. A promptable model should improve as points are added.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from alignsam_ray.env import PatchGrid, PromptEpisodes
from alignsam_ray.store.loader import EmbeddingStore


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = PatchGrid(10, 10)
    print(f"{'store':<40}" + "".join(f"{'T=' + str(t):>8}" for t in (0, 1, 3, 5, 10, 15)))
    for path in args.stores:
        st = EmbeddingStore(path)
        data = st.arrays(args.split)
        n = min(args.n, len(data["ids"]))
        ep = PromptEpisodes(data=data, decoder=st.decoder(), grid=grid, num_slots=n, horizon=15, obs_res=16, init="gt",
                            labels="gt", state="probability", seed=0)
        ep.reset(np.arange(n), np.arange(n))
        rng = np.random.default_rng(0)
        fg = np.stack([ep.gt_at(i, ep.centres_sam(i)) == 1 for i in range(n)])
        iou = {0: ep.iou.mean()}
        for t in range(1, 16):
            free = ep.action_mask() > 0
            a = [rng.choice(np.flatnonzero(f & g) if (f & g).any() else np.flatnonzero(f)) for f, g in zip(free, fg)]
            iou[t] = ep.step(a).iou.mean()
        print(f"{path[-40:]:<40}" + "".join(f"{iou[t]:>8.3f}" for t in (0, 1, 3, 5, 10, 15)))


if __name__ == "__main__":
    main()

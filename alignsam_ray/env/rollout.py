"""The greedy rollout shared by evaluation and the Ray-free predictor (no Ray import here).

    rollout(agent, data, decoder, actions, labels, horizon, record) -> Rollout
        agent: anything with ``cfg`` (a run config), ``srm`` (an SRM), ``grid`` (a PatchGrid) and
        ``greedy(obs (B, E, R, R), action_mask (B, N)) -> (B,)`` actions: ``checkpoint.Agent`` (the
        RLModule) or ``predictor.AlignSAMPredictor`` (the exported ONNX policy).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..foundation.decoder import SamPromptDecoder
from .episodes import PromptEpisodes


@dataclass
class Rollout:
    """Recorded steps of one method over all images."""

    logits: dict  # step -> list of (256, 256) float32 low-res logits, one per image
    points: dict  # step -> list of (coords (n, 2) SAM frame, labels (n,))
    hits: np.ndarray  # (n_images, horizon) bool: picked point on ground-truth foreground
    label_ok: np.ndarray  # (n_images, horizon) bool: its label (SRM/oracle/positive) matches the ground truth

    def stats(self, t: int) -> dict:
        """Hit rate and label accuracy over the first ``t`` steps."""
        return {"hit_rate": float(self.hits[:, :t].mean()), "label_accuracy": float(self.label_ok[:, :t].mean())}


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The random stream of one image: seeded from (seed, the image's id), so an image draws the same
    numbers whatever the batch, shard or device it is evaluated in."""
    key = int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed) % 2**63, key])


def rollout(agent, data: dict, decoder: SamPromptDecoder, actions: str, labels: str, horizon: int,
            record: tuple, batch: int = 16, seed: int = 0, init: str = "srm") -> Rollout:
    """Run ``horizon`` steps on every image of ``data`` (``batch`` images per decoder call).

    actions: "policy" (greedy), "random" (uniform over free patches) or "srm_topk" (the free patch
    with the highest current SRM probability); init: "srm" or "centre"; labels: "srm", "gt" or
    "positive". A rollout that uses the SRM for none of them runs without any SRM. Random actions
    are drawn from each image's own stream (``image_rng(seed, id)``).
    """
    n = len(data["ids"])
    logits = {t: [] for t in record}
    points = {t: [] for t in record}
    hits = np.zeros((n, horizon), bool)
    label_ok = np.zeros((n, horizon), bool)
    e = agent.cfg.env
    uses_srm = actions == "srm_topk" or init == "srm" or labels == "srm"
    srm = agent.srm if uses_srm else None
    text_map = agent.cfg.srm.text_map if agent.srm.branch == "explicit" and uses_srm else None
    for start in range(0, n, batch):
        images = np.arange(start, min(n, start + batch))
        ep = PromptEpisodes(data, decoder, agent.grid, len(images), horizon, e.obs_res, init, labels,
                            srm, text_map, seed, state=e.state)
        ep.reset(np.arange(len(images)), images)
        rngs = [image_rng(seed, data["ids"][i]) for i in images] if actions == "random" else None
        if 0 in record:
            logits[0] += list(ep.logits.copy())
            points[0] += [ep.points(s) for s in range(len(images))]
        for t in range(1, horizon + 1):
            mask = ep.action_mask()
            if actions == "policy":
                a = agent.greedy(ep.obs, mask)
            elif actions == "srm_topk":
                a = np.where(mask > 0, ep.srm_scores(), -np.inf).argmax(1)
            else:
                a = np.array([g.choice(np.flatnonzero(m)) for g, m in zip(rngs, mask)])
            r = ep.step(a)
            hits[images, t - 1] = r.hit
            label_ok[images, t - 1] = r.label == r.hit  # void points count as background here
            if t in record:
                logits[t] += list(ep.logits.copy())
                points[t] += [ep.points(s) for s in range(len(images))]
    return Rollout(logits, points, hits, label_ok)

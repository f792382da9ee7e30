"""The greedy rollout shared by evaluation and the Ray-free predictor (no Ray import here).

    rollout(agent, data, decoder, actions=..., labels=..., init=..., horizon=T, record=(...)) -> Rollout
        agent: a ``RolloutAgent`` (``checkpoint.Agent``: the RLModule; ``eval_shard.EvalAgent``: plain
        modules on a device; ``predictor.AlignSAMPredictor``: the exported ONNX policy).
    Method(actions, init, labels, horizon): one row of evaluation's method table (``eval_shard.METHODS``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, get_args

import numpy as np

from ..foundation.decoder import SamPromptDecoder
from .episodes import Init, Labels, PromptEpisodes
from .grid import PatchGrid

if TYPE_CHECKING:
    from ..agent.srm import SRM
    from ..config import RunConfig

Actions = Literal["policy", "random", "srm_topk"]  # greedy policy | uniform over free patches | best free SRM cell
ACTION_MODES = get_args(Actions)


class RolloutAgent(Protocol):
    """What a rollout needs from an agent."""

    cfg: RunConfig  # reads env.obs_res, env.state, srm.text_map
    srm: SRM
    grid: PatchGrid

    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        """obs (B, E, R, R) float16, action_mask (B, N) float32 -> (B,) int actions (argmax of masked logits)."""


class Method(NamedTuple):
    """How one evaluated method picks, starts and labels; horizon None = the run's T."""

    actions: Actions
    init: Init
    labels: Labels
    horizon: int | None = None


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


def rollout(agent: RolloutAgent, data: dict, decoder: SamPromptDecoder, *, actions: Actions, labels: Labels,
            horizon: int, record: tuple, init: Init = "srm", batch: int = 16, seed: int = 0) -> Rollout:
    """Run ``horizon`` steps on every image of ``data`` (``batch`` images per decoder call), keeping the
    masks and points of the steps in ``record``.

    actions: "policy" (greedy), "random" (uniform over free patches) or "srm_topk" (the free patch
    with the highest current SRM probability); init: "srm" (the paper's evaluation) or "centre";
    labels: "srm", "gt" or "positive". A rollout that uses the SRM for none of them runs without any
    SRM. Random actions are drawn from each image's own stream (``image_rng(seed, id)``).
    """
    if actions not in ACTION_MODES:
        raise ValueError(f"actions must be one of {ACTION_MODES}, got {actions!r}")
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
        ep = PromptEpisodes(data=data, decoder=decoder, grid=agent.grid, num_slots=len(images), horizon=horizon,
                            obs_res=e.obs_res, init=init, labels=labels, state=e.state, srm=srm, text_map=text_map,
                            seed=seed)
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

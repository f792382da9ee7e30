"""Training checkpoints: where a run keeps them, and loading one for evaluation and export.

    run_dir/checkpoints/iter_000010/   algo/ (RLlib checkpoint), srm.pt, config.yaml, state.json
    Agent.load(run_dir | checkpoint) -> Agent(module, srm, cfg, checkpoint)

An RLlib checkpoint is code-bearing (RLlib unpickles its module state): load only your own or trusted
ones. Exported bundles (``export.py``) are the data-only form to share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .agent.rl_module import AlignSamActorCritic
from .agent.srm import SRM, load_srm
from .config import load_config
from .env.grid import PatchGrid

CHECKPOINTS = "checkpoints"
MODULE_SUBDIR = os.path.join("algo", "learner_group", "learner", "rl_module", "default_policy")


def checkpoints(run_dir: str) -> list[str]:
    """Finished checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("iter_") and
                   os.path.isfile(os.path.join(root, n, "state.json")))
    return [os.path.join(root, n) for n in names]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint (no state.json) nor a run folder with checkpoints")
    return found[-1]


@dataclass
class Agent:
    """What evaluation needs from a training checkpoint."""

    module: AlignSamActorCritic
    srm: SRM
    cfg: dict
    checkpoint: str

    @classmethod
    def load(cls, checkpoint: str) -> Agent:
        from ray.rllib.core.rl_module.rl_module import RLModule

        ckpt = resolve_checkpoint(checkpoint)
        module = RLModule.from_checkpoint(os.path.abspath(os.path.join(ckpt, MODULE_SUBDIR)))
        module.eval()
        cfg = load_config(os.path.join(ckpt, "config.yaml"))
        return cls(module, load_srm(os.path.join(ckpt, "srm.pt")), cfg, ckpt)

    @property
    def grid(self) -> PatchGrid:
        e = self.cfg["env"]
        return PatchGrid.from_env(e)

    @torch.inference_mode()
    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        logits = self.module.masked_logits(torch.from_numpy(obs), torch.from_numpy(action_mask))
        return logits.argmax(1).numpy()

"""Training checkpoints: where a run keeps them, and loading one for evaluation and export.

    run_dir/checkpoints/iter_000010/   algo/ (RLlib checkpoint of ``AlignSamPPO``: policy, SRM, optimisers),
                                       config.yaml, state.json (a record; its presence marks the folder complete)
    Agent.load(run_dir | checkpoint) -> Agent(module, srm, cfg, checkpoint)

Checkpoints written before ``AlignSamPPO`` kept the SRM in an srm.pt beside algo/: they still load
(``checkpoint_srm``) and resume (``legacy_srm_state``).

An RLlib checkpoint is code-bearing (RLlib unpickles its module state): load only your own or trusted
ones. Exported bundles (``export.py``) are the data-only form to share.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .agent.rl_module import AlignSamActorCritic
from .agent.srm import SRM, load_srm, srm_from_state
from .config import RunConfig, load_config
from .env.grid import PatchGrid

CHECKPOINTS = "checkpoints"
MODULE_SUBDIR = os.path.join("algo", "learner_group", "learner", "rl_module", "default_policy")
ALGO_STATE = os.path.join("algo", "algorithm_state.pkl")  # the algorithm's own state (Algorithm.STATE_FILE_NAME)
LEGACY_SRM = "srm.pt"  # the SRM of a checkpoint written before AlignSamPPO


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


def legacy_srm_state(ckpt: str) -> dict | None:
    """The SRM trainer's state of a checkpoint written before ``AlignSamPPO`` (its srm.pt: weights,
    optimiser, update count); None for a current checkpoint (the SRM is in algo/)."""
    from .agent.algorithm import SRM_STATE
    from .foundation.sam_models import load_weights

    path = os.path.join(ckpt, LEGACY_SRM)
    if not os.path.isfile(path) or SRM_STATE in _algo_state(ckpt):
        return None
    return load_weights(path, "SRM checkpoint")


def checkpoint_srm(ckpt: str) -> SRM:
    """The SRM of a training checkpoint (eval mode): from the algorithm's state, or a legacy srm.pt."""
    from .agent.algorithm import SRM_STATE

    state = _algo_state(ckpt)
    if SRM_STATE in state:
        return srm_from_state(state[SRM_STATE])
    return load_srm(os.path.join(ckpt, LEGACY_SRM))


def _algo_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, ALGO_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt!r} is not a complete training checkpoint: {ALGO_STATE} is missing")
    with open(path, "rb") as f:
        return pickle.load(f)  # an RLlib checkpoint is code-bearing (module docstring): your own or trusted ones


@dataclass
class Agent:
    """What evaluation needs from a training checkpoint."""

    module: AlignSamActorCritic
    srm: SRM
    cfg: RunConfig
    checkpoint: str

    @classmethod
    def load(cls, checkpoint: str) -> Agent:
        from ray.rllib.core.rl_module.rl_module import RLModule

        ckpt = resolve_checkpoint(checkpoint)
        module = RLModule.from_checkpoint(os.path.abspath(os.path.join(ckpt, MODULE_SUBDIR)))
        module.eval()
        cfg = load_config(os.path.join(ckpt, "config.yaml"))
        return cls(module, checkpoint_srm(ckpt), cfg, ckpt)

    @property
    def grid(self) -> PatchGrid:
        e = self.cfg.env
        return PatchGrid.from_env(e)

    @torch.inference_mode()
    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        logits = self.module.masked_logits(torch.from_numpy(obs), torch.from_numpy(action_mask))
        return logits.argmax(1).numpy()

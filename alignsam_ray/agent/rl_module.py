"""The policy: a convolutional actor-critic RLModule (RLlib new API stack).

    obs["obs"]          (B, E, R, R) float16   pooled state E_I(x) (.) M_{t-1}
    obs["action_mask"]  (B, N) float32         1 = patch still free
    obs["step"]         (B, 1) float32         t / T (episodes end after exactly T steps, so the
                                               value of a state depends on the steps left)
    trunk               3 x (3x3 conv, ReLU) at width W -> features (B, W, R, R)  (Columns.EMBEDDINGS)
    policy head         1x1 conv -> (B, 1, R, R) -> adaptive average pool to the patch grid
                        (rows, cols) -> N logits, + clamp(log(mask), FLOAT_MIN) (masked actions)
    value head          [mean, max] pool of the trunk, t / T -> MLP -> (B,)   (time-aware critic)

The policy head is spatial: logit n is read from the trunk's features over patch n, so the
same weights work for any grid (8x8, 10x10, 16x16) at any R.

model_config: {"grid": [rows, cols], "width": 64, "time_input": True}   (time_input False: the critic gets 0
instead of t / T, the ablation measured in README)
"""
from __future__ import annotations

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

from .policy import patch_logits, trunk_layers


class AlignSamActorCritic(TorchRLModule, ValueFunctionAPI):
    def setup(self):
        embed_dim = self.observation_space["obs"].shape[0]
        cfg = dict(self.model_config or {})
        width = int(cfg.get("width", 64))
        self.time_input = bool(cfg.get("time_input", True))
        self.bf16 = cfg.get("precision", "fp32") == "bf16"
        grid = cfg.get("grid")
        n = self.action_space.n
        if grid is None:
            side = int(round(n ** 0.5))
            if side * side != n:
                raise ValueError(f"model_config needs 'grid' [rows, cols] for a non-square action space of {n}")
            grid = (side, side)
        self.grid = (int(grid[0]), int(grid[1]))
        if self.grid[0] * self.grid[1] != n:
            raise ValueError(f"grid {self.grid} does not match the {n} actions")
        self.trunk = trunk_layers(embed_dim, width)
        self.pi_head = nn.Conv2d(width, 1, 1)
        self.vf_head = nn.Sequential(nn.Linear(2 * width + 1, width), nn.ReLU(), nn.Linear(width, 1))

    def _features(self, batch) -> torch.Tensor:
        """(B, E, R, R) observations -> (B, width, R, R) float32 trunk features (bfloat16 autocast inside
        when model_config precision is bf16: training and sampling; evaluation and export run fp32)."""
        x = batch[Columns.OBS]["obs"].float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.trunk(x).float()

    def _logits(self, features: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.pi_head(features), self.grid, action_mask)

    def _forward(self, batch, **kwargs):
        features = self._features(batch)
        return {Columns.ACTION_DIST_INPUTS: self._logits(features, batch[Columns.OBS]["action_mask"])}

    def _forward_train(self, batch, **kwargs):
        features = self._features(batch)
        return {
            Columns.ACTION_DIST_INPUTS: self._logits(features, batch[Columns.OBS]["action_mask"]),
            Columns.EMBEDDINGS: features,
        }

    def compute_values(self, batch, embeddings=None):
        if embeddings is None:
            embeddings = self._features(batch)
        step = batch[Columns.OBS]["step"].float().reshape(-1, 1) * float(self.time_input)
        pooled = torch.cat([embeddings.mean((2, 3)), embeddings.amax((2, 3)), step], 1)
        return self.vf_head(pooled).squeeze(-1)

    def masked_logits(self, obs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        """Plain-tensor entry point (evaluation, export): (B, E, R, R), (B, N) -> (B, N) logits."""
        return self._logits(self.trunk(obs.float()), action_mask)

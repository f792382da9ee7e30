"""The actor's head, shared by the RLModule (training) and the exported policy (Ray-free inference).

    patch_logits(head_map (B, 1, R, R), grid (rows, cols), action_mask (B, N)) -> (B, N)
        the 1x1-conv map average-pooled to the patch grid (logit n is read over patch n), and
        clamp(log(mask), FLOAT_MIN) added so picked patches are never chosen again.
    PolicyNet(trunk, pi_head, grid): forward(obs (B, E, R, R), action_mask (B, N)) -> (B, N) logits
    trunk_layers(embed_dim, width) -> the actor-critic's shared trunk (three 3x3 convs + ReLU)
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FLOAT_MIN = -3.4e38  # RLlib's ray.rllib.utils.torch_utils.FLOAT_MIN (no Ray import here)


def patch_logits(head_map: torch.Tensor, grid: tuple[int, int], action_mask: torch.Tensor) -> torch.Tensor:
    logits = F.adaptive_avg_pool2d(head_map, grid).flatten(1)
    return logits + torch.clamp(torch.log(action_mask), min=FLOAT_MIN)


def trunk_layers(embed_dim: int, width: int) -> nn.Sequential:
    """(B, E, R, R) -> (B, width, R, R): the trunk the RLModule trains and the exported policy runs."""
    trunk = nn.Sequential(
        nn.Conv2d(embed_dim, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
    )
    return trunk.to(memory_format=torch.channels_last)  # oneDNN's fast layout for these convolutions


class PolicyNet(nn.Module):
    """The actor of ``AlignSamActorCritic`` alone (no value head), as a plain module (what export writes)."""

    def __init__(self, trunk: nn.Module, pi_head: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.trunk, self.pi_head, self.grid = trunk, pi_head, (int(grid[0]), int(grid[1]))

    @classmethod
    def random(cls, embed_dim: int, width: int, grid: tuple[int, int], seed: int = 0) -> PolicyNet:
        """Random weights (benchmarks of evaluation's cost without a trained run)."""
        torch.manual_seed(seed)
        return cls(trunk_layers(embed_dim, width), nn.Conv2d(width, 1, 1), grid).eval()

    @classmethod
    def from_module(cls, module) -> PolicyNet:
        return cls(copy.deepcopy(module.trunk), copy.deepcopy(module.pi_head), module.grid).eval()

    def forward(self, obs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        return patch_logits(self.pi_head(self.trunk(obs.float())), self.grid, action_mask)

"""A faster, numerically equal stand-in for segment_anything's ``LayerNorm2d``, for training on the CPU.

``LayerNorm2d`` normalises each pixel over its channels with eight separate tensor operations
(mean, subtract, square, mean, add, sqrt, divide, affine), each a full pass over memory, and as
many again backwards. ``FusedLayerNorm2d`` computes the same with torch's fused ``layer_norm``
kernel on a channels-last view (about 5x faster forward + backward on a (12, 16, 128, 128)
tensor here; equal to 1e-6).
(Tried and left out: the two-way transformer's ``Attention`` through
``F.scaled_dot_product_attention`` gave no faster training step here.)

``fuse_for_training`` swaps every ``LayerNorm2d`` in a model in place, keeping the very same Parameter
objects under the same names: the state dict, and so the checkpoint, is unchanged, and any
segment_anything code loads it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class FusedLayerNorm2d(LayerNorm2d):
    """``LayerNorm2d`` over (B, C, H, W) through ``F.layer_norm``; same parameters, same result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def fuse_for_training(model: nn.Module) -> int:
    """Replace every ``LayerNorm2d`` in ``model`` (in place) by a ``FusedLayerNorm2d`` holding
    the same parameters. Returns how many modules were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is LayerNorm2d:
                fused = FusedLayerNorm2d.__new__(FusedLayerNorm2d)
                fused.__dict__ = child.__dict__  # the very same parameters
                setattr(module, name, fused)
                replaced += 1
    return replaced

"""The embedded micro-SAM: segment_anything's own prompt encoder, mask decoder and two-way
transformer at small width, behind a small convolutional image encoder.

It keeps SAM's geometry, so every SAM utility (``SamPredictor``, ``ResizeLongestSide``,
``Sam.preprocess``/``postprocess_masks``) works on it unchanged:

    input frame   (B, 3, 1024, 1024)  normalised, padded (``Sam.preprocess``)
    embedding     (B, E, 64, 64)      E = ``MICRO_SAM_EMBED_DIM`` (64; real SAM: 256)
    low-res mask  (B, C, 256, 256)    logits

The weights are trained by ``python -m tools.micro_sam.train`` (repository only, not installed) on a
generic synthetic object mix (``tools/micro_sam/object_mix.py``), never on the downstream task generators.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

MICRO_SAM_EMBED_DIM = 64
IMAGE_SIZE = 1024
EMBEDDING_SIZE = 64
ENCODER_INPUT_SIZE = 256  # the encoder area-downsamples the 1024 frame to this first


class ConvBlock(nn.Sequential):
    """3x3 conv -> GroupNorm -> GELU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(8, c_out),
            nn.GELU(),
        )


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual connection; shape preserved."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = ConvBlock(c, c)
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(8, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.conv2(self.conv1(x)))


class MicroImageEncoder(nn.Module):
    """(B, 3, 1024, 1024) normalised image -> (B, out_chans, 64, 64) embedding.

    A fixed 4x area downsample to 256x256, then a small CNN with levels at 64, 32 and 16
    pixels, fused top-down (FPN style) at 64x64, and a SAM-style neck (conv + LayerNorm2d).
    """

    img_size = IMAGE_SIZE  # read by SamPredictor / Sam.preprocess

    def __init__(self, out_chans: int = MICRO_SAM_EMBED_DIM, widths=(32, 64, 128)):
        super().__init__()
        w64, w32, w16 = widths
        self.stem = nn.Sequential(ConvBlock(3, 16, stride=2), ConvBlock(16, w64, stride=2))  # 256->64
        self.level64 = ResBlock(w64)
        self.down32 = nn.Sequential(ConvBlock(w64, w32, stride=2), ResBlock(w32))
        self.down16 = nn.Sequential(ConvBlock(w32, w16, stride=2), ResBlock(w16), ResBlock(w16))
        self.lateral64 = nn.Conv2d(w64, out_chans, 1)
        self.lateral32 = nn.Conv2d(w32, out_chans, 1)
        self.lateral16 = nn.Conv2d(w16, out_chans, 1)
        self.neck = nn.Sequential(
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != ENCODER_INPUT_SIZE:
            x = F.adaptive_avg_pool2d(x, ENCODER_INPUT_SIZE)
        f64 = self.level64(self.stem(x))
        f32 = self.down32(f64)
        f16 = self.down16(f32)
        p = self.lateral16(f16)
        p = self.lateral32(f32) + F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
        p = self.lateral64(f64) + F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
        return self.neck(p)


def micro_prompt_encoder() -> PromptEncoder:
    return PromptEncoder(
        embed_dim=MICRO_SAM_EMBED_DIM,
        image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )


def micro_mask_decoder() -> MaskDecoder:
    e = MICRO_SAM_EMBED_DIM
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=e, mlp_dim=256, num_heads=4),
        transformer_dim=e,
        iou_head_depth=3,
        iou_head_hidden_dim=128,
    )


def build_sam_micro(checkpoint=None) -> Sam:
    """Build the micro-SAM (a ``segment_anything.modeling.Sam``); load ``checkpoint`` if given.

    Same signature as segment_anything's ``build_sam_vit_b`` so it sits in the same registry.
    """
    sam = Sam(
        image_encoder=MicroImageEncoder(out_chans=MICRO_SAM_EMBED_DIM),
        prompt_encoder=micro_prompt_encoder(),
        mask_decoder=micro_mask_decoder(),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sam.load_state_dict(state_dict)
    return sam

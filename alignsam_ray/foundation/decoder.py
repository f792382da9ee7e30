"""Decoder side of a frozen SAM: prompt encoder + mask decoder only (what rollout workers hold).

    SamPromptDecoder.decode(embeddings (B,E,64,64), coords (B,N,2) in the 1024 frame,
                            labels (B,N) in {1, 0, -1=padding}, mask_input (B,1,256,256) | None)
        -> low-res logits (B, C, 256, 256), predicted IoU (B, C)       C = 3 if multimask else 1
    SamPromptDecoder.predict(embedding (E,64,64), points_xy (N,2) original pixels, labels (N,), original_size)
        -> low-res logits (C, 256, 256), IoU (C,)        == SamPredictor.predict on the same inputs
    SamPromptDecoder.upscale(low_res (C,256,256), original_size) -> logits (C, H, W)

The decoder weights travel as a small file (``decoder.pt``: sam_type + state_dict of the two
modules, ~16 MB for official SAM) written into every embedding store, so a worker never opens
the multi-GB checkpoint nor builds the image encoder.
"""
from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.transformer import Attention
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from .batched_decode import decode_per_image
from .micro_sam import micro_mask_decoder, micro_prompt_encoder

IMAGE_SIZE = 1024
_PARTS = ("prompt_encoder.", "mask_decoder.")


def _official_parts() -> tuple[PromptEncoder, MaskDecoder]:
    """segment_anything's prompt encoder + mask decoder, as ``build_sam._build_sam`` makes them
    (identical for vit_b, vit_l and vit_h)."""
    return (
        PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
        MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                    transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    )


def build_decoder_parts(sam_type: str) -> tuple[PromptEncoder, MaskDecoder]:
    if sam_type == "micro":
        return micro_prompt_encoder(), micro_mask_decoder()
    if sam_type in ("vit_b", "vit_l", "vit_h"):
        return _official_parts()
    raise ValueError(f"unknown SAM type {sam_type!r}")


def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``segment_anything.modeling.transformer.Attention.forward`` with its softmax(q k^T / sqrt(d)) v
    done by ``F.scaled_dot_product_attention`` (one fused kernel): the same maths and weights, logits
    equal to 1e-5, the decoder 1.2-1.5x faster on CPU (scripts/bench.py decoder_batch)."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def fuse_attention(decoder: MaskDecoder) -> MaskDecoder:
    """Point every attention layer of SAM's two-way transformer at ``_fused_attention`` (in place)."""
    for module in decoder.transformer.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_fused_attention, module)
    return decoder


class PromptFrame:
    """The frame a prompt decoder works in, read off its prompt encoder: the input frame's side, the
    embedding grid and the low-res mask side (SAM 1 and SAM 2.1: 1024, 64, 256; SAM 3: 1008, 72, 288)."""

    @property
    def frame_size(self) -> int:
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def grid_size(self) -> int:
        return int(self.prompt_encoder.image_embedding_size[0])

    @property
    def lowres_size(self) -> int:
        return 4 * self.grid_size  # the mask decoder upsamples the embedding 4x


class SamPromptDecoder(PromptFrame, nn.Module):
    """SAM's prompt encoder + mask decoder, frozen, with SamPredictor's coordinate mapping (attention
    fused: ``fuse_attention``)."""

    def __init__(self, sam_type: str, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        super().__init__()
        self.sam_type = sam_type
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = fuse_attention(mask_decoder)
        self.transform = ResizeLongestSide(IMAGE_SIZE)
        self.eval().requires_grad_(False)
        self._dense_pe = None

    # ---- construction / persistence ------------------------------------------------------
    @classmethod
    def from_sam(cls, sam: Sam, sam_type: str) -> SamPromptDecoder:
        pe, md = build_decoder_parts(sam_type)
        pe.load_state_dict(sam.prompt_encoder.state_dict())
        md.load_state_dict(sam.mask_decoder.state_dict())
        return cls(sam_type, pe, md)

    def save(self, path: str) -> None:
        torch.save({"sam_type": self.sam_type, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> SamPromptDecoder:
        """From a file written by ``save``: a path or a binary file object (e.g. ``io.BytesIO``)."""
        return cls.from_blob(torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def from_blob(cls, blob: dict) -> SamPromptDecoder:
        dec = cls(blob["sam_type"], *build_decoder_parts(blob["sam_type"]))
        dec.load_state_dict(blob["state_dict"])
        return dec

    # ---- decoding --------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.prompt_encoder.embed_dim

    def dense_pe(self) -> torch.Tensor:
        pe = self._dense_pe
        if pe is None or pe.device != self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.device:
            self._dense_pe = pe = self.prompt_encoder.get_dense_pe()  # constant for a frozen model: once per device
        return pe

    extra_keys: tuple = ()  # per-image store arrays decode() also reads (SAM 2.1: its high-res features)

    def to_input_frame(self, points_xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) x,y pixel coordinates of the original image -> the 1024 input frame."""
        return self.transform.apply_coords(np.asarray(points_xy, dtype=np.float64), tuple(original_size))

    @torch.inference_mode()
    def decode(self, embeddings, coords, labels, mask_input=None, multimask: bool = False):
        """Row i of the prompts against row i of the embeddings; see module docstring for shapes."""
        dev = self.dense_pe().device  # where the weights are (prompts and embeddings move there)
        emb = torch.as_tensor(embeddings).to(dev, torch.float32)
        coords = torch.as_tensor(coords, dtype=torch.float32).to(dev)
        labels = torch.as_tensor(labels, dtype=torch.int64).to(dev)
        masks = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32).to(dev)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
        dense = dense.expand(emb.shape[0], -1, -1, -1)
        return decode_per_image(self.mask_decoder, emb, self.dense_pe(), sparse, dense, multimask)

    def predict(self, embedding, points_xy, labels, original_size, mask_input=None, multimask: bool = False):
        """One image, points in original pixels (as ``SamPredictor.predict``).
        Returns low-res logits (C, 256, 256) and IoU (C,) as torch tensors."""
        coords = self.to_input_frame(points_xy, original_size)[None]
        low, iou = self.decode(
            torch.as_tensor(embedding)[None], coords, np.asarray(labels)[None],
            None if mask_input is None else torch.as_tensor(mask_input)[None], multimask,
        )
        return low[0], iou[0]

    def upscale_mask(self, low_res, original_size: tuple[int, int]) -> np.ndarray:
        """(256, 256) low-res logits (numpy or torch) -> the (H, W) bool mask SAM gives (upscaled logits > 0)."""
        low = torch.as_tensor(np.asarray(low_res, np.float32))[None]
        return self.upscale(low, (int(original_size[0]), int(original_size[1])))[0].numpy() > 0

    @torch.inference_mode()
    def upscale(self, low_res: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(C, 256, 256) logits -> (C, H, W) logits, as ``Sam.postprocess_masks``."""
        input_size = self.transform.get_preprocess_shape(original_size[0], original_size[1], IMAGE_SIZE)
        m = F.interpolate(low_res[None].float(), (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        m = m[..., : input_size[0], : input_size[1]]
        return F.interpolate(m, tuple(original_size), mode="bilinear", align_corners=False)[0]


def load_prompt_decoder(path):
    """A store's decoder file (a path or a binary file object) -> ``SamPromptDecoder`` (SAM 1, micro-SAM)
    ``Sam2PromptDecoder`` (SAM 2.1) or ``Sam3PromptDecoder`` (SAM 3), by the ``sam_type`` it records."""
    from .sam2_models import Sam2PromptDecoder, is_sam2
    from .sam3_models import Sam3PromptDecoder, is_sam3

    blob = torch.load(path, map_location="cpu", weights_only=True)
    kind = Sam2PromptDecoder if is_sam2(blob["sam_type"]) else Sam3PromptDecoder if is_sam3(blob["sam_type"]) else \
        SamPromptDecoder
    return kind.from_blob(blob)


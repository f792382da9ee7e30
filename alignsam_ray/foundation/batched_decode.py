"""Batched mask decoding over *different* images in one call.

segment_anything's ``MaskDecoder.predict_masks`` decodes many prompt sets for ONE image: it
``repeat_interleave``s the image embedding over the prompt batch. Training the micro-SAM and
stepping k environments at once need the other case: prompt set i belongs to image i. These
functions run the decoder's own sub-modules (same weights, same maths) with per-row images.

    decode_per_image   full low-res masks (B, C, 256, 256), as ``MaskDecoder.forward``
    decode_tokens      the two-way transformer's outputs, before any mask is drawn
    masks_from_tokens  full low-res masks from those outputs
    logits_at_pixels   mask logits at chosen low-res pixels only (training: a point-sampled loss)
    upscaled_blocks    the output upscaling of single cells (their 4x4 pixel blocks)

The decoder's output upscaling (two stride-2 transposed convolutions with a LayerNorm2d and GELUs
in between) maps each cell of the 64x64 grid to its own 4x4 block of low-res pixels and nothing
else, so one pixel's logit needs only its cell's feature: ``logits_at_pixels`` evaluates exactly
the full mask's values at the pixels asked for, at a fraction of the cost.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder


class DecodedTokens(NamedTuple):
    """What the two-way transformer hands to the mask head.

    src: (B, h*w, E) updated image tokens, row-major over the (h, w) grid
    hyper_in: (B, 4, E // 8) one vector per mask output (0: single mask, 1..3: multimask)
    iou_pred: (B, 4) predicted IoU per mask output
    grid: (h, w)
    """
    src: torch.Tensor
    hyper_in: torch.Tensor
    iou_pred: torch.Tensor
    grid: tuple[int, int]


def decode_tokens(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    outputs: range | None = None,
) -> DecodedTokens:
    """Run the transformer for row i of the prompts against row i of the embeddings.

    image_embeddings: (B, E, h, w)   image_pe: (1, E, h, w)
    sparse_prompt_embeddings: (B, n, E)   dense_prompt_embeddings: (B, E, h, w)
    ``outputs``: which mask outputs to keep (default all four).
    """
    b = sparse_prompt_embeddings.shape[0]
    if image_embeddings.shape[0] != b:
        raise ValueError(f"need one image embedding per prompt set, got {image_embeddings.shape[0]} for {b}")
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(b, -1, -1, -1)
    hs, src = decoder.transformer(src, pos_src, prompt_tokens(decoder, sparse_prompt_embeddings))
    return decoded_from(decoder, hs, src, tuple(image_embeddings.shape[-2:]), outputs)


def prompt_tokens(decoder: MaskDecoder, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """The transformer's queries (B, 1 + num_mask_tokens + n, E): the IoU and mask output tokens,
    then the sparse prompt embeddings (B, n, E), as ``MaskDecoder.predict_masks`` builds them."""
    b = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)


def decoded_from(decoder: MaskDecoder, hs: torch.Tensor, src: torch.Tensor, grid: tuple[int, int],
                 outputs: range | None) -> DecodedTokens:
    """The mask head's inputs from the transformer's outputs: queries ``hs`` (B, T, E) and image
    tokens ``src`` (B, n_cells, E); ``outputs`` the mask outputs to keep (default all four)."""
    outputs = range(decoder.num_mask_tokens) if outputs is None else outputs
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in outputs], dim=1)
    iou_pred = decoder.iou_prediction_head(hs[:, 0, :])[:, outputs.start : outputs.stop]
    return DecodedTokens(src, hyper_in, iou_pred, grid)


def _outputs(decoder: MaskDecoder, multimask_output: bool | None) -> range:
    if multimask_output is None:
        return range(decoder.num_mask_tokens)
    return range(1, decoder.num_mask_tokens) if multimask_output else range(1)


def decode_per_image(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode row i of the prompts against row i of the embeddings.

    image_embeddings: (B, E, h, w)   image_pe: (1, E, h, w)
    sparse_prompt_embeddings: (B, n, E)   dense_prompt_embeddings: (B, E, h, w)
    Returns low-res mask logits (B, C, 4h, 4w) and predicted IoU (B, C); C = 3 if
    ``multimask_output`` else 1 — exactly what ``MaskDecoder.forward`` returns for B = 1.
    ``multimask_output=None`` returns all C = 4 outputs the decoder computes in one pass
    (index 0: the single-mask output, 1..3: the multimask outputs), for training both at once.
    """
    d = decode_tokens(decoder, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                      _outputs(decoder, multimask_output))
    return masks_from_tokens(decoder, d), d.iou_pred


def masks_from_tokens(decoder: MaskDecoder, decoded: DecodedTokens) -> torch.Tensor:
    """Full low-res mask logits (B, C, 4h, 4w) from the transformer's outputs."""
    b, (h, w) = decoded.src.shape[0], decoded.grid
    upscaled = decoder.output_upscaling(decoded.src.transpose(1, 2).reshape(b, -1, h, w))
    _, cu, hu, wu = upscaled.shape
    return (decoded.hyper_in @ upscaled.view(b, cu, hu * wu)).view(b, -1, hu, wu)


def upscaled_blocks(decoder: MaskDecoder, feat: torch.Tensor) -> torch.Tensor:
    """The output upscaling of single cells: cell features (B, K, E) -> the upscaled features of
    each cell's 4x4 block of low-res pixels (B, K, 16, E // 8), block row-major (pixel (dy, dx) at
    4 dy + dx), equal to ``decoder.output_upscaling``'s output there.

    Needs SAM's output upscaling layout: ConvTranspose2d(k=2, s=2), LayerNorm2d, activation,
    ConvTranspose2d(k=2, s=2), activation (each output pixel of a stride-2, kernel-2 transposed
    convolution is ``bias + in[:, y // 2, x // 2] @ weight[:, :, y % 2, x % 2]``).
    """
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    b, k, e = feat.shape
    c1, c2 = up1.weight.shape[1], up2.weight.shape[1]
    h1 = (feat @ up1.weight.permute(0, 2, 3, 1).reshape(e, 4 * c1)).view(b, k, 4, c1) + up1.bias  # sub (a_y, a_x)
    h1 = act1(F.layer_norm(h1, (c1,), norm.weight, norm.bias, norm.eps))
    h2 = act2((h1 @ up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)).view(b, k, 2, 2, 2, 2, c2) + up2.bias)
    # h2[:, :, a_y, a_x, c_y, c_x] is pixel (2 a_y + c_y, 2 a_x + c_x) of the cell's block
    return h2.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, k, 16, c2)


def logits_at_pixels(decoder: MaskDecoder, decoded: DecodedTokens, pixels: torch.Tensor) -> torch.Tensor:
    """Mask logits at chosen pixels of the low-res (4h x 4w) frame, equal to ``decode_per_image``'s
    masks there. pixels: (B, P, 2) long (y, x). Returns (B, C, P), C = the outputs decoded."""
    y, x = pixels[..., 0], pixels[..., 1]
    cell = (y // 4) * decoded.grid[1] + (x // 4)  # (B, P) index into the h*w tokens
    c = decoded.src.shape[-1]
    feat = torch.gather(decoded.src, 1, cell[..., None].expand(-1, -1, c))  # (B, P, E)
    blocks = upscaled_blocks(decoder, feat)  # (B, P, 16, E // 8)
    sub = ((y % 4) * 4 + x % 4)[..., None, None].expand(-1, -1, 1, blocks.shape[-1])
    return decoded.hyper_in @ blocks.gather(2, sub).squeeze(2).transpose(1, 2)

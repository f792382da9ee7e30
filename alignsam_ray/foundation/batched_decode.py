"""Batched mask decoding over *different* images in one call.

segment_anything's ``MaskDecoder.predict_masks`` decodes many prompt sets for ONE image: it
``repeat_interleave``s the image embedding over the prompt batch. Training the micro-SAM and
stepping k environments at once need the other case: prompt set i belongs to image i. This
function runs the decoder's own sub-modules (same weights, same maths) with per-row images.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder


def decode_per_image(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode row i of the prompts against row i of the embeddings.

    image_embeddings: (B, E, h, w)   image_pe: (1, E, h, w)
    sparse_prompt_embeddings: (B, n, E)   dense_prompt_embeddings: (B, E, h, w)
    Returns low-res mask logits (B, C, 4h, 4w) and predicted IoU (B, C); C = 3 if
    ``multimask_output`` else 1 — exactly what ``MaskDecoder.forward`` returns for B = 1.
    """
    b = sparse_prompt_embeddings.shape[0]
    if image_embeddings.shape[0] != b:
        raise ValueError(f"need one image embedding per prompt set, got {image_embeddings.shape[0]} for {b}")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    _, cu, hu, wu = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, cu, hu * wu)).view(b, -1, hu, wu)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou_pred[:, sl]

"""Training the mask decoder on a weighted sample of the image tokens (CPU training speed).

In SAM's two-way transformer the 64x64 image tokens never attend to each other: each image token
attends only to the prompt tokens (``cross_attn_image_to_token``, then a per-token LayerNorm),
and the prompt tokens gather from the image tokens with a softmax over all of them
(``cross_attn_token_to_image``, twice, and ``final_attn_token_to_image``). The output upscaling
maps each cell to its own 4x4 block of low-res pixels (see ``alignsam_ray.foundation.batched_decode``). So a mask's
pixels in a set of cells depend on the other cells only through those softmax pools.

Here the decoder runs on K sampled cells per prompt set instead of all h*w. Each sampled cell
stands for ``weight`` cells of its stratum (stratified sampling, ``sample_cells``), and the
token-to-image softmax adds ``log(weight)`` to that key's logit, so each pool is the weighted
(ratio) estimate of the full pool: with every cell taken and weight 1 it is exactly the full
decoder (tested). The per-cell work, which is nearly all of the decoder's cost, shrinks by
h*w / K. Parameters are the decoder's own; nothing changes in the model or its checkpoint.

    sample_cells        (N, 256, 256) bool masks -> cells (N, K), log weights (N, K)
    decode_cell_sample  transformer outputs on those cells (a ``DecodedTokens`` with src (N, K, E))
    padding_bias        makes rows padded to a common point count decode as their own points alone
    cell_block_logits   logits (N, C, K, 16) of the 16 low-res pixels of each sampled cell
    cell_blocks         any (N, 4h, 4w) array -> its values (N, K, 16) at those pixels
"""
from __future__ import annotations

import math

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention

from alignsam_ray.foundation.batched_decode import DecodedTokens, decoded_from, prompt_tokens, upscaled_blocks

BLOCK = 4  # low-res pixels per cell side (256 / 64)


def sample_cells(rng: np.random.Generator, masks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified sample of ``k`` cells of the (h, w) = (S/4, S/4) grid for each mask.

    masks: (N, S, S) bool low-res masks. Strata: cells whose 4x4 block is all object, all
    background, or mixed (the boundary); each stratum gets k/3 cells drawn without replacement,
    a stratum with fewer cells gives all of them and its unused share goes to the others.
    Returns cells (N, k) int64 (row-major index into the grid) and log_weight (N, k) float32,
    log(cells in the stratum / cells drawn from it), so weighted sums estimate full-grid sums.
    """
    n, s = masks.shape[0], masks.shape[-1]
    side = s // BLOCK
    share = masks.reshape(n, side, BLOCK, side, BLOCK).mean((2, 4)).reshape(n, -1)  # (N, h*w) object share
    cells = np.empty((n, k), np.int64)
    log_weight = np.empty((n, k), np.float32)
    for i in range(n):
        strata = [np.flatnonzero((share[i] > 0) & (share[i] < 1)), np.flatnonzero(share[i] == 1),
                  np.flatnonzero(share[i] == 0)]
        take = _allocate([len(st) for st in strata], k)
        at = 0
        for st, t in zip(strata, take):
            if t:
                cells[i, at: at + t] = rng.choice(st, t, replace=False)
                log_weight[i, at: at + t] = math.log(len(st) / t)
                at += t
    return cells, log_weight


def _allocate(sizes: list[int], k: int) -> list[int]:
    """Split ``k`` draws over strata of ``sizes`` as evenly as their sizes allow (sum = min(k, sum(sizes)))."""
    take = [0] * len(sizes)
    left = min(k, sum(sizes))
    while left:
        open_ = [j for j, sz in enumerate(sizes) if take[j] < sz]
        each = max(1, left // len(open_))
        for j in open_:
            t = min(each, sizes[j] - take[j], left)
            take[j] += t
            left -= t
            if not left:
                break
    return take


def cell_blocks(values: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """values (N, S, S) on the low-res frame -> (N, K, 16): the 4x4 block of each cell of ``cells``
    (N, K), row-major within the block (pixel (4*cy + dy, 4*cx + dx) at 4*dy + dx)."""
    n, s = values.shape[0], values.shape[-1]
    side = s // BLOCK
    blocks = values.reshape(n, side, BLOCK, side, BLOCK).transpose(0, 1, 3, 2, 4).reshape(n, side * side, BLOCK * BLOCK)
    return np.take_along_axis(blocks, cells[..., None], 1)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` with ``key_bias`` (B, n_keys) added to the logits."""
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
    logits = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    return attn.out_proj(attn._recombine_heads(torch.softmax(logits, dim=-1) @ v))


def decode_cell_sample(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    cells: torch.Tensor,
    log_weight: torch.Tensor,
    outputs: range | None = None,
    point_bias: torch.Tensor | None = None,
) -> DecodedTokens:
    """``batched_decode.decode_tokens`` on the sampled cells only (row i of the prompts against
    row i of the embeddings).

    image_embeddings: (B, E, h, w)   image_pe: (1, E, h, w)   sparse: (B, n, E)
    dense_prompt_embeddings: (B, E, h, w)   cells, log_weight: (B, K) (``sample_cells``)
    point_bias: (B, n) or None, added to the attention logits wherever the prompt tokens are the
    keys (token self-attention, image -> token); ``padding_bias`` makes a row padded with extra
    "not a point" tokens decode exactly as its points alone would (as ``SamPredictor`` decodes them).
    Returns ``DecodedTokens`` whose ``src`` is (B, K, E): the sampled cells' updated tokens.
    """
    t = decoder.transformer
    b = sparse_prompt_embeddings.shape[0]
    tokens = prompt_tokens(decoder, sparse_prompt_embeddings)
    e = image_embeddings.shape[1]
    index = cells[..., None].expand(-1, -1, e)
    keys = torch.gather((image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2), 1, index)  # (B, K, E)
    key_pe = torch.gather(image_pe.flatten(2).transpose(1, 2).expand(b, -1, -1), 1, index)
    token_bias = None  # the output tokens (IoU, masks) come first and are never biased
    if point_bias is not None:
        token_bias = torch.cat([point_bias.new_zeros(b, tokens.shape[1] - point_bias.shape[1]), point_bias], 1)
    queries, query_pe = tokens, tokens
    for layer in t.layers:  # TwoWayAttentionBlock.forward, with the key biases
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries, token_bias)
        else:
            q = queries + query_pe
            queries = queries + _attend(layer.self_attn, q, q, queries, token_bias)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys, log_weight))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _attend(layer.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries, token_bias))
    queries = t.norm_final_attn(queries + _attend(t.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys, log_weight))
    return decoded_from(decoder, queries, keys, tuple(image_embeddings.shape[-2:]), outputs)


def padding_bias(labels: torch.Tensor) -> torch.Tensor:
    """Point labels (B, n) as the prompt encoder saw them (-1 = "not a point", including the one
    pad it appends when there is no box) -> bias (B, n) for ``decode_cell_sample``'s ``point_bias``.

    All "not a point" tokens of a row are the same embedding, so they stay equal through every
    layer; k equal keys with bias -log(k) each weigh exactly what one of them weighs alone. A row
    of m points padded to n then decodes exactly as the m points plus SAM's single pad token,
    which is what ``SamPredictor`` and the episodes hand the decoder. (Without it, training rows
    padded to a common length see more "not a point" weight than they ever get at inference.)"""
    pad = labels == -1
    count = pad.sum(1, keepdim=True).clamp(min=1)
    return torch.where(pad, -torch.log(count.float()), torch.zeros((), dtype=torch.float32))


def cell_block_logits(decoder: MaskDecoder, decoded: DecodedTokens) -> torch.Tensor:
    """Logits (B, C, K, 16) of the 16 low-res pixels of each sampled cell (``decoded.src`` (B, K, E)),
    in ``cell_blocks`` order: the values the decoder's full masks have there
    (``batched_decode.upscaled_blocks``)."""
    b, k = decoded.src.shape[:2]
    blocks = upscaled_blocks(decoder, decoded.src).reshape(b, k * 16, -1)  # (B, K*16, E // 8)
    return (decoded.hyper_in @ blocks.transpose(1, 2)).view(b, -1, k, 16)

"""CLIP Surgery (Li et al. 2023) on open_clip ViT models: text-guided maps on SAM's 64x64 grid.

The explicit SRM branch fuses SAM's image embedding with a map M_c saying where the text (a class
name, "shadow", ...) is. ``ClipSurgery.maps(images, texts)`` returns those maps, (B, C, 64, 64)
float16 in [0, 1], aligned cell for cell with SAM's image embedding. Works on any open_clip ``CLIP``
whose image tower is open_clip's ``VisionTransformer`` with ``nn.MultiheadAttention`` blocks
(ViT-B-16, ViT-L-14, ... and the embedded micro CLIP, ``micro_clip.py``); open_clip's source and
weights are untouched: the surgery runs the model's own modules in a different order.

Reference: github.com/xmed-lab/CLIP_Surgery (``clip/clip_surgery_model.py``: ``Attention.forward``,
``ResidualAttentionBlock.forward``, ``VisionTransformer.forward``; ``clip/clip.py``:
``clip_feature_surgery``, ``get_similarity_map``, ``encode_text_with_prompt_ensemble``; ``demo.py``).

Architecture surgery (``surgery_forward``), the reference's variant:
    For the last ``n_surgery_blocks`` residual blocks (default ``DEFAULT_SURGERY_BLOCKS`` = 6: the
    reference's ``for i in range(1, 7)`` on ViT-B/16's 12 blocks; clipped to the model's depth) a
    second, parallel path is added. With x_i the ORIGINAL path's tokens entering block i:
        x_s = x_first + attn_vv(ln_1(x_first))        at the first surgery block (reference: "start of
                                                        dual path", ``x += x_res``; it starts from the
                                                        original tokens, not from zeros)
        x_s = x_s + attn_vv(ln_1(x_i))                 at every later surgery block (the reference feeds
                                                        the ORIGINAL path's tokens to the attention,
                                                        ``self.attention(self.ln_1(x_ori))``)
        attn_vv(h) = out_proj(softmax(v v^T / sqrt(d_head)) v),  v = h W_v + b_v per head
    i.e. q and k are replaced by v (``k = v; q = k``), reusing the block's own in_proj (value slice) and
    out_proj; the FFN is skipped on that path ("skip ffn for the new path"). The original path runs
    the block's own ``forward`` unchanged, so its pooled embedding equals ``model.encode_image``
    bit for bit. Patch tokens of the surgery path -> ``ln_post`` -> ``@ proj`` are the image features of
    the maps (the reference also copies the original class token into the surgery path; the maps
    never use the class token, so it is not returned). A block's LayerScale ``ls_1`` (absent in
    OpenAI-style CLIPs and in the reference) is applied to the v-v output too, as the block applies it
    to its attention output.

Feature surgery (``feature_surgery``):
    F (B, N, D) patch features and T (C, D) text features, both L2-normalised along D (the reference
    normalises the image tokens along dim=1, the token axis, an apparent slip; we use the feature axis).
    Several texts (C >= 2), ``weighting="softmax"`` (the reference's default):
        p = softmax(2 * F T^T) over the C classes, per token; w = p / mean_c(p)      (B, N, C)
        feats = (F[:, :, None, :] * T[None, None]) * w[..., None]                  (B, N, C, D)
        sim = (feats - mean_c(feats)).sum(D)                                       (B, N, C)
      i.e. every token is weighted by the softmax of ITS OWN similarities (not the class token's).
      ``weighting="mean"``: w = 1 (plain mean). ``weighting="none"``: sim = F T^T (no surgery; ablation).
      Invariants: for both weightings sim sums to 0 over the classes; for "mean", adding one vector to
      every text feature changes nothing, and a text equal to the set's mean gets a zero map.
    One text (C == 1): the reference's single-text trick (demo.py): the redundant feature is the text
      feature of the empty string, sim = F (T - T_"")^T. This is the plain-mean variant on the set
      [text, ""] up to a factor 1/2, which the min-max normalisation removes.
    Prompt templates: ``templates=None`` encodes the text as given; ``"openai"`` averages open_clip's 80
      ImageNet templates (the reference's prompt ensemble: normalise each, mean, normalise).

Geometry (how a map lines up with SAM's 64x64 embedding grid):
    SAM resizes an (H, W) image so its long side is 1024 and pads bottom/right, so a non-square image
    fills only the top-left part of the grid. ``preprocess`` pads the image bottom/right to a square of
    side max(H, W) with the model's mean colour (zero after normalisation, as SAM pads its normalised
    frame with zeros), resizes it to the CLIP input size with the model's interpolation (open_clip's
    ``resize_mode='squash'`` on an already square image) and normalises with the model's mean/std.
    The token grid therefore covers the same square as SAM's grid. The raw similarity (g x g) is
    bilinearly upsampled to 64x64 (``align_corners=False``), min-max normalised to [0, 1] per map over the
    cells the image covers (``sam_valid_cells``: ceil(h' / 16) x ceil(w' / 16), h', w' = SAM's resized
    size), and set to 0 on the padded cells. (The reference min-max normalises the tokens and then
    upsamples; upsampling first lets the normalisation ignore the padding. A constant map gives 0.)
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from .micro_clip import (
    MICRO_CLIP_CFG,
    MICRO_CLIP_WEIGHTS,
    MICRO_NAME,
    build_micro_clip,
    micro_metadata,
    micro_tokenizer,
)
from .sam_models import CheckpointError

__all__ = ["ClipSurgery", "DEFAULT_SURGERY_BLOCKS", "MAP_SIZE", "feature_surgery", "surgery_forward",
           "sam_valid_cells", "mask_on_sam_grid", "map_auroc", "pad_to_square", "preprocess_image", "load_clip_weights", "CheckpointError"]

DEFAULT_SURGERY_BLOCKS = 6   # reference: the last 6 blocks of ViT-B/16 (``for i in range(1, 7)``)
MAP_SIZE = 64                # SAM's image-embedding grid
SAM_IMAGE_SIZE = 1024        # SAM's input frame (long side)
SOFTMAX_TEMPERATURE = 2.0    # reference: ``(prob * 2).softmax(-1)``
WEIGHTINGS = ("softmax", "mean", "none")
_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


# ------------------------------------------------------------------------------------- geometry
def sam_valid_cells(h: int, w: int, grid: int = MAP_SIZE, long_side: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """(rows, cols) of SAM's ``grid`` x ``grid`` embedding that an (h, w) image covers (the rest is padding)."""
    newh, neww = ResizeLongestSide.get_preprocess_shape(h, w, long_side)
    cell = long_side / grid
    return min(grid, math.ceil(newh / cell)), min(grid, math.ceil(neww / cell))


def mask_on_sam_grid(mask: np.ndarray, grid: int = MAP_SIZE) -> np.ndarray:
    """(H, W) bool -> (grid, grid) float32 foreground fraction per cell of SAM's grid (padded bottom/right)."""
    h, w = mask.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[:h, :w] = mask
    return np.asarray(Image.fromarray(square, mode="F").resize((grid, grid), Image.BOX))


def map_auroc(text_map: np.ndarray, mask: np.ndarray) -> float | None:
    """AUROC of a (64, 64) map against an (H, W) bool mask, over the cells the image covers.

    A cell is positive when >= 50% of it is foreground; None when all covered cells are one class.
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn comes with pysodmetrics
    rows, cols = sam_valid_cells(*mask.shape, grid=text_map.shape[-1])
    labels = mask_on_sam_grid(mask, text_map.shape[-1])[:rows, :cols] >= 0.5
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels.ravel(), text_map[:rows, :cols].astype(np.float32).ravel()))


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8, S = max(H, W): the image top-left, ``fill`` bottom/right (as SAM)."""
    h, w = image.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    out[:h, :w] = image
    return out


def preprocess_image(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: int = Image.BICUBIC) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 normalised; see "Geometry" in the module docstring.

    The image is padded bottom/right to a square with the mean colour (0 after normalisation, like SAM's
    padding), resized to ``size`` (PIL, antialiased, like open_clip's transform) and normalised.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    fill = tuple(int(round(255 * m)) for m in mean)
    square = Image.fromarray(pad_to_square(image, fill))
    if square.size != (size, size):
        square = square.resize((size, size), interpolation)
    x = torch.from_numpy(np.asarray(square, np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


# ----------------------------------------------------------------------------- architecture surgery
def _check_visual(visual: nn.Module) -> None:
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise TypeError(f"CLIP Surgery needs open_clip's VisionTransformer image tower, got {type(visual).__name__} "
                        "(ResNet / timm towers are not supported)")
    if visual.attn_pool is not None:
        raise TypeError("CLIP Surgery: ViTs with an attentional pooler (CoCa-style) are not supported")
    for blk in visual.transformer.resblocks:
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
            raise TypeError("CLIP Surgery: only blocks with nn.MultiheadAttention are supported "
                            f"(got {type(getattr(blk, 'attn', None)).__name__})")


def _vv_attention(attn: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """Value-value self-attention with the block's own weights: (B, L, W) -> (B, L, W).

    v = h W_v + b_v (the value slice of ``in_proj``), per head softmax(v v^T / sqrt(d_head)) v, then
    ``out_proj``. Query and key are the values (reference: ``k = v; q = k``).
    """
    b, length, width = h.shape
    heads = attn.num_heads
    if attn.in_proj_weight is not None:
        w_v = attn.in_proj_weight[2 * width:]
    else:  # separate projections (kdim/vdim != embed_dim); never the case in a ViT
        w_v = attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(h, w_v, b_v).view(b, length, heads, width // heads).transpose(1, 2)   # (B, heads, L, d)
    out = F.scaled_dot_product_attention(v, v, v)                                      # scale 1/sqrt(d)
    out = out.transpose(1, 2).reshape(b, length, width)
    return attn.out_proj(out)


def surgery_forward(visual: nn.Module, images: torch.Tensor, n_surgery_blocks: int = DEFAULT_SURGERY_BLOCKS
                    ) -> dict[str, torch.Tensor]:
    """Run an open_clip ``VisionTransformer`` with the surgery path on its last ``n_surgery_blocks`` blocks.

    images (B, 3, S, S) normalised, S = the model's image size. Returns
        "pooled"          (B, E)  the original path's image embedding (== ``model.encode_image(images)``)
        "tokens"          (B, N, E) patch tokens of the surgery path -> ln_post -> proj (N = grid**2)
        "tokens_original" (B, N, E) patch tokens of the original path -> ln_post -> proj
    With ``n_surgery_blocks=0`` "tokens" equals "tokens_original". Not normalised.
    """
    _check_visual(visual)
    blocks = visual.transformer.resblocks
    k = max(0, min(int(n_surgery_blocks), len(blocks)))
    first = len(blocks) - k
    batch_first = getattr(visual.transformer, "batch_first", True)

    x = visual._embeds(images)                       # (B, 1 + N, W): conv1, class token, pos. emb., ln_pre
    if not batch_first:
        x = x.transpose(0, 1)
    xs = None                                        # the surgery path, (B, 1 + N, W) once started
    for i, blk in enumerate(blocks):
        if i >= first:
            h = blk.ln_1(x)
            vv = _vv_attention(blk.attn, h if batch_first else h.transpose(0, 1))
            vv = blk.ls_1(vv if batch_first else vv.transpose(0, 1))
            xs = (x if xs is None else xs) + vv      # no FFN on the surgery path
        x = blk(x, attn_mask=None)                   # the original path, the block's own forward
    if not batch_first:
        x = x.transpose(0, 1)
        xs = None if xs is None else xs.transpose(0, 1)

    pooled, _ = visual._pool(x)                      # exactly VisionTransformer.forward's tail
    if visual.proj is not None:
        pooled = pooled @ visual.proj

    def project(t: torch.Tensor) -> torch.Tensor:
        t = visual.ln_post(t[:, 1:])
        return t @ visual.proj if visual.proj is not None else t

    tokens_original = project(x)
    tokens = project(xs) if xs is not None else tokens_original
    return {"pooled": pooled, "tokens": tokens, "tokens_original": tokens_original}


# ---------------------------------------------------------------------------------- feature surgery
def feature_surgery(image_features: torch.Tensor, text_features: torch.Tensor,
                    redundant: torch.Tensor | None = None, weighting: str = "softmax",
                    temperature: float = SOFTMAX_TEMPERATURE) -> torch.Tensor:
    """Similarity of every token to every text with the redundant (common) features removed.

    image_features (B, N, D) and text_features (C, D), L2-normalised along D.
    redundant (D,) or (1, D): if given (the single-text case), sim = F (T - redundant)^T, reference
        ``clip_feature_surgery(..., redundant_feats)``; ``weighting`` is then ignored.
    weighting: "softmax" (reference), "mean" (plain mean over classes) or "none" (sim = F T^T).
    Returns sim (B, N, C) float32. Memory: B*N*C*D floats.
    """
    f, t = image_features.float(), text_features.float()
    if redundant is not None:
        return f @ (t - redundant.float().reshape(1, -1)).T
    if weighting == "none":
        return f @ t.T
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    feats = f[..., :, None, :] * t                                       # (B, N, C, D) element-wise
    if weighting == "softmax":
        prob = (f @ t.T * temperature).softmax(-1)                       # (B, N, C)
        feats = feats * (prob / prob.mean(-1, keepdim=True))[..., None]  # restrain obvious classes
    feats = feats - feats.mean(-2, keepdim=True)                         # minus the redundant part
    return feats.sum(-1)


# ----------------------------------------------------------------------------------------- the API
class ClipSurgery:
    """Text-guided CLIP Surgery maps from an open_clip ViT CLIP, on SAM's 64x64 grid.

    model      an open_clip ``CLIP`` with a ``VisionTransformer`` image tower (put in eval mode here)
    tokenizer  callable list[str] -> (C, context_length) token ids (open_clip tokenizer)
    n_surgery_blocks  blocks (from the last) that get the v-v path; default 6 (reference), clipped to depth
    weighting  feature surgery for several texts: "softmax" (reference), "mean" or "none" (ablation:
               plain cosine similarity, also for one text)
    templates  None (texts as given), "openai" (open_clip's ImageNet prompt ensemble) or a list of
               "{}"-format strings / callables
    mean, std, image_size, interpolation: preprocessing; default from ``model.visual.preprocess_cfg``
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, n_surgery_blocks: int = DEFAULT_SURGERY_BLOCKS,
                 device: str | torch.device = "cpu", weighting: str = "softmax",
                 templates: str | Sequence | None = None, batch_size: int = 16,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        _check_visual(model.visual)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.n_surgery_blocks = int(n_surgery_blocks)
        self.weighting = weighting
        self.templates = templates
        self.batch_size = int(batch_size)
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        self.mean = tuple(mean or pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(std or pp.get("std", open_clip.OPENAI_DATASET_STD))
        self.image_size = tuple(model.visual.image_size)          # (S, S)
        if self.image_size[0] != self.image_size[1]:
            raise ValueError(f"CLIP Surgery here needs a square model input, got {self.image_size}")
        self.interpolation = _PIL_INTERP.get(pp.get("interpolation", "bicubic"), Image.BICUBIC)
        self._text_cache: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_name: str = MICRO_NAME, weights: str | None = None, **kwargs) -> ClipSurgery:
        """Build ``model_name`` and load LOCAL ``weights``; never downloads anything.

        model_name: "micro" (the embedded micro CLIP; ``weights`` defaults to the shipped file) or an
            open_clip built-in model name (``open_clip.list_models()``, e.g. "ViT-B-16"), for which
            ``weights`` must be a local state-dict file (open_clip checkpoint, ``state_dict`` wrapper,
            ``.safetensors`` ...). Other keyword arguments go to ``ClipSurgery(...)``.
        Raises CheckpointError for a missing file or a file whose state dict does not fit the model.
        """
        if model_name == MICRO_NAME:
            weights = weights or MICRO_CLIP_WEIGHTS
            meta = micro_metadata(weights)
            cfg = meta.get("model_cfg", MICRO_CLIP_CFG)
            model, tokenizer = build_micro_clip(cfg), micro_tokenizer(cfg)
            kwargs.setdefault("n_surgery_blocks", int(meta.get("n_surgery_blocks", DEFAULT_SURGERY_BLOCKS)))
        else:
            if model_name not in open_clip.list_models():
                raise ValueError(f"unknown open_clip model {model_name!r}: expected 'micro' or one of "
                                 "open_clip.list_models() (e.g. 'ViT-B-16'); hub names are not supported (no downloads)")
            if weights is None:
                raise CheckpointError(f"CLIP model {model_name!r} needs a local weights file (weights=PATH, e.g. "
                                      "open_clip_pytorch_model.bin): nothing is downloaded. Use 'micro' for the embedded model.")
            model = open_clip.create_model(model_name, pretrained=None, pretrained_image=False,
                                           pretrained_text=False, device="cpu")
            tokenizer = open_clip.get_tokenizer(model_name)
        load_clip_weights(model, weights, model_name)
        return cls(model, tokenizer, **kwargs)

    # -------------------------------------------------------------------------------- features
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32: pad bottom/right to a square (mean colour), resize, normalise."""
        return preprocess_image(image, self.image_size[0], self.mean, self.std, self.interpolation)

    @torch.inference_mode()
    def image_features(self, batch: torch.Tensor, surgery: bool = True) -> torch.Tensor:
        """(B, 3, S, S) preprocessed -> (B, N, D) L2-normalised patch features (surgery or original path)."""
        out = surgery_forward(self.model.visual, batch.to(self.device, self._dtype()), self.n_surgery_blocks)
        return F.normalize(out["tokens" if surgery else "tokens_original"].float(), dim=-1)

    def _templates(self) -> list:
        if self.templates is None:
            return ["{}"]
        if isinstance(self.templates, str):
            if self.templates != "openai":
                raise ValueError(f"templates: None, 'openai' or a list, got {self.templates!r}")
            return list(open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
        return list(self.templates)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """list of C texts -> (C, D) L2-normalised text features (prompt-template ensemble, cached)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for text in missing:
            prompts = [tpl(text) if callable(tpl) else tpl.format(text) for tpl in self._templates()]
            tokens = self.tokenizer(prompts).to(self.device)
            feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
            self._text_cache[text] = F.normalize(feats, dim=-1).cpu()
        return torch.stack([self._text_cache[t] for t in texts]).to(self.device)

    def _dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    # ------------------------------------------------------------------------------------ maps
    @torch.inference_mode()
    def similarity(self, batch: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B, 3, S, S) preprocessed -> raw feature-surgery similarity (B, C, g, g) float32 (before normalisation)."""
        if len(texts) == 0:
            raise ValueError("texts must hold at least one prompt")
        f = self.image_features(batch)
        t = self.text_features(texts)
        redundant = None
        if len(texts) == 1 and self.weighting != "none":
            redundant = self.text_features([""])[0]   # reference: the empty text's features
        sim = feature_surgery(f, t, redundant=redundant, weighting=self.weighting)       # (B, N, C)
        g = int(round(math.sqrt(sim.shape[1])))
        return sim.transpose(1, 2).reshape(sim.shape[0], len(texts), g, g)

    @torch.inference_mode()
    def maps(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """Text-guided maps on SAM's grid: images [(H, W, 3) uint8] x C texts -> (B, C, 64, 64) float16 in [0, 1].

        One map per (image, text): min-max normalised over the cells the image covers, 0 on SAM's padding.
        """
        texts = list(texts)
        out = np.zeros((len(images), len(texts), MAP_SIZE, MAP_SIZE), np.float16)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = torch.stack([self.preprocess(im) for im in chunk])
            sim = self.similarity(batch, texts)
            up = F.interpolate(sim, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)
            for j, im in enumerate(chunk):
                rows, cols = sam_valid_cells(*im.shape[:2])
                valid = up[j, :, :rows, :cols]
                lo = valid.amin(dim=(-2, -1), keepdim=True)
                hi = valid.amax(dim=(-2, -1), keepdim=True)
                norm = ((valid - lo) / (hi - lo).clamp_min(1e-12)).clamp_(0, 1)
                out[start + j, :, :rows, :cols] = norm.cpu().numpy().astype(np.float16)
        return out


# ------------------------------------------------------------------------------------- weights
def load_clip_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Load a local state-dict file into ``model`` (open_clip's ``load_checkpoint``, strict), clear errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"CLIP weights file {path!r} for model {model_name!r} does not exist "
                              "(weights are never downloaded: pass a local file)")
    try:
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as exc:  # unreadable file, missing/unexpected keys, shape mismatches
        msg = " ".join(str(exc).split())
        raise CheckpointError(f"CLIP weights {path!r} do not fit the open_clip model {model_name!r}: "
                              f"{type(exc).__name__}: {msg[:400]}") from exc


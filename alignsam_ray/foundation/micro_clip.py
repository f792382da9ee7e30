"""The embedded micro CLIP: a real ``open_clip.model.CLIP`` at toy size, trained on the synthetic shapes.

It exists so that the explicit SRM branch (a text-guided CLIP Surgery map) runs offline, with no
download: ``ClipSurgery.load("micro")`` builds it from ``MICRO_CLIP_CFG`` and loads the shipped
``alignsam_ray/weights/micro_clip.pt``. Because it is open_clip's own ``CLIP`` class (ViT image tower +
causal text transformer), CLIP Surgery runs on it through exactly the same code path as on ViT-B-16.

    image   (B, 3, 96, 96)     normalised with OpenAI CLIP's mean/std, patch 8 -> a 12x12 token grid
    text    (B, 16)            open_clip's SimpleTokenizer (bundled BPE vocabulary, 49408 tokens)
    embeds  (B, 128)           joint space (``embed_dim``)

Weights file: a plain open_clip state dict (``model.state_dict()``, what ``open_clip.load_checkpoint``
reads) stored in float16 to stay small; it is cast to float32 on load. The 49408 x 64 token
embedding is most of it (6.3 MB); the training script zeroes the rows of tokens its captions never
use (they received no gradient and were still at their random initialisation).

Trained by ``python -m tools.micro_clip.train`` (repository only, not installed; settings and metrics in
``weights/micro_clip.json``).
"""
from __future__ import annotations

import copy
import json
import os

import open_clip

__all__ = ["MICRO_CLIP_CFG", "MICRO_CLIP_WEIGHTS", "MICRO_CLIP_META", "MICRO_NAME", "build_micro_clip",
           "micro_tokenizer", "micro_metadata"]

MICRO_NAME = "micro"
_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
MICRO_CLIP_WEIGHTS = os.path.join(_WEIGHTS_DIR, "micro_clip.pt")
MICRO_CLIP_META = os.path.join(_WEIGHTS_DIR, "micro_clip.json")

# open_clip CLIP(embed_dim, vision_cfg, text_cfg) keyword arguments (same schema as open_clip's model_configs/*.json)
MICRO_CLIP_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 96,
        "patch_size": 8,      # 12x12 patch grid
        "width": 128,
        "layers": 4,
        "head_width": 32,     # -> 4 heads
        "mlp_ratio": 4.0,
        "pool_type": "avg",   # mean of the patch tokens (OpenAI CLIP: class token); measured: dense maps localise better
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,  # SimpleTokenizer's vocabulary
        "width": 64,
        "heads": 4,
        "layers": 3,
    },
}
MICRO_PREPROCESS = {"size": 128, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
                    "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0, "mode": "RGB"}


def build_micro_clip(cfg: dict | None = None) -> open_clip.model.CLIP:
    """A randomly initialised micro CLIP (``open_clip.model.CLIP``) with ``visual.preprocess_cfg`` set."""
    cfg = copy.deepcopy(cfg or MICRO_CLIP_CFG)
    model = open_clip.model.CLIP(**cfg)
    pp = dict(MICRO_PREPROCESS, size=cfg["vision_cfg"]["image_size"])
    open_clip.model.set_model_preprocess_cfg(model, pp)
    return model


def micro_tokenizer(cfg: dict | None = None) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's SimpleTokenizer at the micro context length; reads the BPE file bundled with open_clip."""
    cfg = cfg or MICRO_CLIP_CFG
    return open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def micro_metadata(weights: str = MICRO_CLIP_WEIGHTS) -> dict:
    """The json written next to a micro CLIP weights file by the training script ({} if there is none).

    Its "model_cfg" (the config the weights were trained with) and "n_surgery_blocks" are used by
    ``ClipSurgery.load("micro", weights)``; the shipped file's "model_cfg" equals ``MICRO_CLIP_CFG``.
    """
    try:
        with open(os.path.splitext(weights)[0] + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}

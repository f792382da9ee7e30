"""SAM 3 through the official ``sam3`` package: its point-prompt path (the interactive image predictor,
``sam3.model.sam1_task_predictor.SAM3InteractiveImagePredictor``, reached as ``Sam3Image.predict_inst``)
for the agent, and its concept prediction from text (``Sam3Processor.set_text_prompt``) as a baseline.

    load_sam3(checkpoint) -> sam3.model.sam3_image.Sam3Image   (with its interactive predictor; eval, frozen)
    Sam3ImageEncoder(model).encode(images)
        list of (H, W, 3) uint8 RGB -> {"image_embed": (B, 256, 72, 72),
                                        "high_res_feats_0": (B, 32, 288, 288), "high_res_feats_1": (B, 64, 144, 144)}
        float32, equal to what ``Sam3Processor.set_image`` + ``predict_inst`` hand the interactive predictor
    Sam3PromptDecoder.from_model(model)   the interactive predictor's prompt encoder + mask decoder
        the ``Sam2PromptDecoder`` interface, in SAM 3's frame: coords in the 1008 x 1008 frame, low-res
        logits (B, C, 288, 288); ``upscale_mask`` is the predictor's mask (holes <= 256 low-res pixels filled)
    text_masks(model, images, text) -> list of (H, W) bool: the union of the instances
        ``Sam3Processor.set_text_prompt`` keeps at its default confidence threshold (0.5)

SAM 3's frame is SAM 2's with other sizes: the image is resized to 1008 x 1008 whatever its aspect (no
padding), the ViT's 14-pixel patches give a 72 x 72 embedding, the mask decoder reads two high-resolution
maps (288 and 144) and returns 288 x 288 logits. ``sam3`` is an optional dependency (``SAM3_INSTALL``);
sam3 0.1.4 creates tensors on "cuda" while building (facebookresearch/sam3 issue 587) and pins memory in its
text path: without a GPU both run under ``_CudaToCpu``, which makes those tensors on the CPU and skips the
pinning (the package's files are unchanged).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..sam_types import SAM3_INSTALL, SAM3_TYPES
from .sam2_models import Sam2PromptDecoder
from .sam_models import CheckpointError, load_weights

IMAGE_SIZE = 1008
FEATURE_SHAPES = {"image_embed": (256, 72, 72), "high_res_feats_0": (32, 288, 288), "high_res_feats_1": (64, 144, 144)}
MAX_HOLE_AREA = 256  # SAM3InteractiveImagePredictor's default: background islands up to this many low-res pixels
TEXT_THRESHOLD = 0.5  # Sam3Processor's default confidence threshold of a kept instance


def is_sam3(sam_type: str) -> bool:
    return sam_type in SAM3_TYPES


def _builder():
    try:
        import sam3.model_builder as builder
    except ImportError as exc:
        raise CheckpointError(f"--sam sam3 needs the official `sam3` package and the modules it imports ({exc}); "
                              f"install them with: {SAM3_INSTALL}") from None
    return builder


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Without a GPU: tensors asked for on "cuda" are made on the CPU, and ``pin_memory`` (which needs CUDA; the
    text path's geometry encoder calls it) returns the tensor as it is. Only around sam3's calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.pin_memory:
            return args[0]
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _building():
    """The context sam3 0.1.4's build and text path need on a machine without a GPU (``_CudaToCpu``)."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaToCpu()


def bpe_path() -> str:
    """The CLIP BPE vocabulary SAM 3's text tokenizer reads (the sam3 wheel leaves it out; open_clip ships
    the same file, bpe_simple_vocab_16e6.txt.gz)."""
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build_sam3_model():
    """SAM 3's image model with its interactive predictor, random weights, by ``build_sam3_image_model``
    (nothing downloaded), on CPU, eval mode."""
    builder = _builder()
    with _building():
        return builder.build_sam3_image_model(bpe_path=bpe_path(), device="cpu", eval_mode=True, checkpoint_path=None,
                                              load_from_HF=False, enable_segmentation=True,
                                              enable_inst_interactivity=True)


def official_state_dict(path: str) -> dict:
    """The official file (a flat dict or {"model": dict} of detector.* and tracker.* tensors) -> the image
    model's state dict, by the key mapping of ``sam3.model_builder._load_checkpoint``."""
    blob = load_weights(path, "SAM 3 checkpoint")
    state = blob["model"] if isinstance(blob, dict) and isinstance(blob.get("model"), dict) else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) or not (
            any(k.startswith("detector.") for k in state) and any(k.startswith("tracker.") for k in state)):
        raise CheckpointError(f"{path!r} is not a SAM 3 checkpoint: the official sam3.pt holds detector.* and "
                              "tracker.* tensors (a SAM 1 .pth goes with --sam vit_*, a SAM 2.1 .pt with --sam sam2.1_*)")
    mapped = {k.replace("detector.", ""): v for k, v in state.items() if "detector" in k}
    mapped.update({k.replace("tracker.", "inst_interactive_predictor.model."): v for k, v in state.items()
                   if "tracker" in k})
    return mapped


def load_sam3(sam_type: str = "sam3", checkpoint: str | None = None, *, random_init: bool = False):
    """Build SAM 3 and load the official checkpoint into it; every parameter must be in the file with its
    shape (``build_sam3_image_model`` itself only prints what is missing). ``random_init``: seeded random
    weights (tests, timing)."""
    if not is_sam3(sam_type):
        raise CheckpointError(f"unknown SAM 3 type {sam_type!r}; choose one of {', '.join(SAM3_TYPES)}")
    _builder()  # without the package: say how to install it, whatever else is wrong
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_sam3_model()
        return model.eval().requires_grad_(False)
    if not checkpoint:
        raise CheckpointError(f"--sam {sam_type} needs --checkpoint PATH (the official {SAM3_TYPES[sam_type]}); "
                              "nothing is downloaded")
    state = official_state_dict(checkpoint)  # before the (long) build: a wrong file fails fast
    model = build_sam3_model()
    ours = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    missing = sorted(k for k in params if k not in state)  # buffers the file lacks keep their built values
    unexpected = sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        what = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                         for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                         if keys)
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit SAM 3's image model ({what})")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


def load_sam3_decoder(sam_type: str, checkpoint: str | None, *, random_init: bool = False) -> Sam3PromptDecoder:
    """The decoder side alone, for prompting without the image model (``segment --ray``'s prompting actors): the
    file's tracker.* tensors into sam3's ``build_tracker`` (12M parameters, seconds). ``random_init``: the
    seeded whole model's (its decoder weights come from the same random stream)."""
    if random_init or not checkpoint:
        return Sam3PromptDecoder.from_model(load_sam3(sam_type, checkpoint, random_init=random_init), sam_type)
    state = official_state_dict(checkpoint)
    builder = _builder()
    with _building():
        tracker = builder.build_tracker(apply_temporal_disambiguation=False)
    prefix = "inst_interactive_predictor.model."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(k for k, p in tracker.named_parameters() if k not in sub or sub[k].shape != p.shape)
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit SAM 3's interactive predictor (missing or "
                              f"of another shape: tracker.{', tracker.'.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    tracker.load_state_dict(sub, strict=False)
    return Sam3PromptDecoder.from_model(tracker.eval(), sam_type)


def _pil(images):
    from PIL import Image

    for im in images:
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {im.shape} {im.dtype}")
    return [Image.fromarray(im) for im in images]


class Sam3ImageEncoder:
    """The encoder side: ``Sam3Processor.set_image_batch`` (its transform, the shared ViT, the SAM 2 style
    neck and the decoder's conv_s0/conv_s1), then ``Sam3Image.predict_inst_batch``'s feature layout."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        from sam3.model.sam3_image_processor import Sam3Processor

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = Sam3Processor(self.model, resolution=IMAGE_SIZE, device=str(self.device))
        self.predictor = self.model.inst_interactive_predictor

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        state = self.processor.set_image_batch(_pil(images))
        tracker = self.predictor.model
        _, vision_feats, _, _ = tracker._prepare_backbone_features(state["backbone_out"]["sam2_backbone_out"])
        vision_feats[-1] = vision_feats[-1] + tracker.no_mem_embed
        b = len(images)
        feats = [f.permute(1, 2, 0).reshape(b, -1, *size) for f, size in zip(vision_feats, self.predictor._bb_feat_sizes)]
        return {"image_embed": feats[2].float().cpu().numpy(), "high_res_feats_0": feats[0].float().cpu().numpy(),
                "high_res_feats_1": feats[1].float().cpu().numpy()}


class Sam3PromptDecoder(Sam2PromptDecoder):
    """The interactive predictor's prompt encoder + mask decoder (copies), frozen: ``Sam2PromptDecoder``'s
    maths (the same modules, from sam3.sam) in SAM 3's 1008 frame."""

    feature_shapes = {k: FEATURE_SHAPES[k] for k in Sam2PromptDecoder.extra_keys}

    @classmethod
    def from_model(cls, model, sam_type: str = "sam3") -> Sam3PromptDecoder:
        import copy

        tracker = model.inst_interactive_predictor.model if hasattr(model, "inst_interactive_predictor") else model
        return cls(sam_type, copy.deepcopy(tracker.sam_prompt_encoder), copy.deepcopy(tracker.sam_mask_decoder),
                   tracker.image_size)

    @classmethod
    def from_blob(cls, blob: dict) -> Sam3PromptDecoder:
        """The parts rebuilt by sam3's own ``build_tracker`` (the interactive predictor's model, without the
        image backbone: seconds, not SAM 3's full build), then the stored weights loaded."""
        builder = _builder()
        with _building():
            tracker = builder.build_tracker(apply_temporal_disambiguation=False)
        dec = cls.from_model(tracker, blob["sam_type"])
        dec.load_state_dict(blob["state_dict"])
        return dec

    @torch.inference_mode()
    def upscale(self, low_res, orig_hw) -> torch.Tensor:
        """(C, 288, 288) -> (C, H, W) logits as ``SAM3InteractiveImagePredictor``'s postprocess_masks:
        ``fill_holes``, then bilinear to the image size."""
        return F.interpolate(torch.from_numpy(fill_holes(low_res))[None], tuple(int(v) for v in orig_hw),
                             mode="bilinear", align_corners=False)[0]


def fill_holes(low_res, max_area: int = MAX_HOLE_AREA) -> np.ndarray:
    """(C, h, w) logits -> a copy where background islands (logits <= 0, 8-connected) of at most ``max_area``
    pixels are set to +10 (sam3's SAM2Transforms.postprocess_masks; scipy here, scikit-image there)."""
    from scipy import ndimage

    low = np.array(low_res, np.float32)
    for c in range(len(low)):
        islands, n = ndimage.label(low[c] <= 0, structure=np.ones((3, 3)))
        if n:
            hole = (islands > 0) & (np.bincount(islands.ravel())[islands] <= max_area)
            low[c][hole] = 10.0
    return low


@torch.inference_mode()
def text_masks(model, images: list[np.ndarray], text: str, device: str | torch.device = "cpu",
               threshold: float = TEXT_THRESHOLD) -> list[np.ndarray]:
    """SAM 3's concept prediction: per image, ``Sam3Processor.set_image`` then ``set_text_prompt(text)``; the
    union of the instance masks it keeps (score > ``threshold``, its default) -> (H, W) bool (all False when
    it keeps none)."""
    from sam3.model.sam3_image_processor import Sam3Processor

    processor = Sam3Processor(model, resolution=IMAGE_SIZE, device=str(device), confidence_threshold=threshold)
    out = []
    for image in _pil(images):
        state = processor.set_image(image)
        with _building():  # its geometry encoder pins memory (CUDA only)
            state = processor.set_text_prompt(text, state)
        masks = state["masks"]  # (K, 1, H, W) bool
        out.append(masks.any(0)[0].cpu().numpy() if len(masks) else np.zeros((image.height, image.width), bool))
    return out

"""SAM 2.1 image backends through the official ``sam2`` package: its Hydra configs, its ``build_sam2``
builder, and ``SAM2ImagePredictor``'s own frames and transforms.

    SAM2_TYPES                      "sam2.1_hiera_t" | "sam2.1_hiera_s" | "sam2.1_hiera_b+" | "sam2.1_hiera_l"
    load_sam2(sam_type, checkpoint) -> sam2.modeling.sam2_base.SAM2Base   (eval mode, frozen)
    Sam2ImageEncoder(model).encode(images)
        list of (H, W, 3) uint8 RGB -> {"image_embed": (B, 256, 64, 64),
                                        "high_res_feats_0": (B, 32, 256, 256), "high_res_feats_1": (B, 64, 128, 128)}
        float32, equal to ``SAM2ImagePredictor.set_image``'s features (its ``_features``)
    Sam2PromptDecoder.from_model(model)                SAM 2's prompt encoder + mask decoder only
        .decode(features, coords (B, N, 2) in the model's 1024 x 1024 frame, labels (B, N) in {1, 0, -1 pad},
                multimask=False) -> low-res logits (B, C, 256, 256), predicted IoU (B, C)
        .predict(features of one image, points_xy (N, 2) image pixels, labels (N,), orig_hw)
                -> low-res logits (C, 256, 256), IoU (C,)   == SAM2ImagePredictor.predict(return_logits=True)
        .upscale(low_res (C, 256, 256), orig_hw) -> logits (C, H, W)   (the predictor's postprocess_masks)

SAM 2's frame differs from SAM 1's: the image is resized to 1024 x 1024 whatever its aspect (no long-side
resize, no padding), so a pixel (x, y) of an H x W image is (1024 x / W, 1024 y / H) in the model's frame;
its mask decoder also reads two high-resolution feature maps of the image encoder, besides the 64 x 64
embedding. ``sam2`` is an optional dependency: ``pip install --no-build-isolation sam2`` with
``SAM2_BUILD_CUDA=0`` (scripts/_setup_venv.sh does it); without it these backends say how to get it.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..sam_types import SAM2_TYPES
from .decoder import PromptFrame
from .sam_models import CheckpointError, load_weights

FEATURE_SHAPES = {"image_embed": (256, 64, 64), "high_res_feats_0": (32, 256, 256), "high_res_feats_1": (64, 128, 128)}


def is_sam2(sam_type: str) -> bool:
    return sam_type in SAM2_TYPES


def _sam2():
    try:
        import sam2.build_sam as build_sam
    except ImportError:
        raise CheckpointError("the SAM 2.1 backends need the official `sam2` package: "
                              "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2") from None
    return build_sam


def build_sam2_model(sam_type: str):
    """The architecture of ``sam_type`` with random weights, built by ``sam2.build_sam.build_sam2`` from
    the package's own config (with the image predictor's post-processing settings), on CPU, eval mode."""
    if sam_type not in SAM2_TYPES:
        raise CheckpointError(f"unknown SAM 2 type {sam_type!r}; choose one of {', '.join(SAM2_TYPES)}")
    return _sam2().build_sam2(SAM2_TYPES[sam_type][0], ckpt_path=None, device="cpu", mode="eval")


def _state_dict(path: str) -> dict:
    blob = load_weights(path, "SAM 2 checkpoint")
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise CheckpointError(f"{path!r} is not a SAM 2 checkpoint: the official files hold a dict with a 'model' "
                              "state dict (sam2.1_hiera_tiny.pt, ...); a SAM 1 .pth goes with --sam vit_b/vit_l/vit_h")
    state = blob["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()) or not any(
            k.startswith("sam_mask_decoder.") for k in state):
        raise CheckpointError(f"{path!r} is not a SAM 2 checkpoint (no sam_mask_decoder.* tensors in 'model')")
    return state


def _fits(model: nn.Module, state: dict) -> tuple[list, list, list]:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    return missing, unexpected, wrong


def load_sam2(sam_type: str, checkpoint: str | None, *, random_init: bool = False):
    """Build ``sam_type`` and load an official checkpoint (``{"model": state_dict}``) into it, strictly;
    a file of another size names the type it holds. ``random_init``: seeded random weights (tests)."""
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_sam2_model(sam_type)
    else:
        model = build_sam2_model(sam_type)  # (an unknown type fails here)
        if not checkpoint:
            raise CheckpointError(f"--sam {sam_type} needs --checkpoint PATH (the official {SAM2_TYPES[sam_type][1]});"
                                  " nothing is downloaded")
        state = _state_dict(checkpoint)
        missing, unexpected, wrong = _fits(model, state)
        if missing or unexpected or wrong:
            for other in SAM2_TYPES:  # a checkpoint of another size: say which
                if other != sam_type and not any(_fits(build_sam2_model(other), state)):
                    raise CheckpointError(f"checkpoint {checkpoint!r} holds a {other} model, but {sam_type} was asked "
                                          f"for (use --sam {other}, or {SAM2_TYPES[sam_type][1]})")
            what = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                             for name, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
            raise CheckpointError(f"checkpoint {checkpoint!r} does not fit the {sam_type} architecture ({what})")
        model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def square_frame(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3): SAM 2's frame as a picture (what CLIP Surgery maps are made on,
    so their 64 x 64 grid lines up with SAM 2's embedding). The encoder itself resizes with SAM2Transforms."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


class Sam2ImageEncoder:
    """The encoder side, as ``SAM2ImagePredictor.set_image_batch`` computes it."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        from sam2.utils.transforms import SAM2Transforms

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=0.0)
        self.feat_sizes = [(256, 256), (128, 128), (64, 64)]  # the predictor's _bb_feat_sizes, high res first

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        for im in images:
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {im.shape} {im.dtype}")
        batch = self.transforms.forward_batch(list(images)).to(self.device)
        backbone_out = self.model.forward_image(batch)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        b = batch.shape[0]
        feats = [f.permute(1, 2, 0).reshape(b, -1, *size) for f, size in zip(vision_feats, self.feat_sizes)]
        return {"image_embed": feats[2].float().cpu().numpy(), "high_res_feats_0": feats[0].float().cpu().numpy(),
                "high_res_feats_1": feats[1].float().cpu().numpy()}


class Sam2PromptDecoder(PromptFrame, nn.Module):
    """SAM 2's prompt encoder + mask decoder (copies of the model's), frozen; the image predictor's maths."""

    def __init__(self, sam_type: str, prompt_encoder: nn.Module, mask_decoder: nn.Module, image_size: int = 1024):
        super().__init__()
        self.sam_type = sam_type
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self._dense_pe = None
        self.eval().requires_grad_(False)

    @classmethod
    def from_model(cls, model, sam_type: str) -> Sam2PromptDecoder:
        return cls(sam_type, copy.deepcopy(model.sam_prompt_encoder), copy.deepcopy(model.sam_mask_decoder),
                   model.image_size)

    def save(self, path) -> None:
        """{"sam_type", "state_dict"} (tensors only): a store's decoder.pt."""
        torch.save({"sam_type": self.sam_type, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path) -> Sam2PromptDecoder:
        """From ``save``'s file (a path or a binary file object): the parts are rebuilt by sam2's builder
        from the type's config (so their hyperparameters are the official ones), then the weights loaded."""
        return cls.from_blob(torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def from_blob(cls, blob: dict) -> Sam2PromptDecoder:
        dec = cls.from_model(build_sam2_model(blob["sam_type"]), blob["sam_type"])
        dec.load_state_dict(blob["state_dict"])
        return dec

    extra_keys = ("high_res_feats_0", "high_res_feats_1")  # per-image store arrays decode() also reads
    feature_shapes = {k: FEATURE_SHAPES[k] for k in extra_keys}  # their (C, H, W)

    @property
    def embed_dim(self) -> int:
        return self.prompt_encoder.embed_dim

    def to_input_frame(self, points_xy: np.ndarray, orig_hw) -> np.ndarray:
        """Image pixels (x, y) -> the model's 1024 x 1024 frame (``SAM2Transforms.transform_coords``)."""
        h, w = orig_hw
        return np.asarray(points_xy, np.float32) / np.array([w, h], np.float32) * self.image_size

    def dense_pe(self) -> torch.Tensor:
        pe = self._dense_pe
        if pe is None or pe.device != self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.device:
            self._dense_pe = pe = self.prompt_encoder.get_dense_pe()  # constant for a frozen model: once per device
        return pe

    @torch.inference_mode()
    def decode(self, embeddings, coords, labels, mask_input=None, multimask: bool = False, *,
               high_res_feats_0=None, high_res_feats_1=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i of the prompts against row i of the images (the predictor's ``_predict`` per image):
        embeddings (B, 256, 64, 64), coords (B, N, 2) in the 1024 frame, labels (B, N), the two
        high-resolution maps (B, 32, 256, 256), (B, 64, 128, 128) -> low-res logits (B, C, 256, 256)
        clamped to +-32 as the predictor returns them, IoU (B, C)."""
        if high_res_feats_0 is None or high_res_feats_1 is None:
            raise ValueError("SAM 2's mask decoder needs the image's high-resolution features (high_res_feats_0/1)")
        dev = self.dense_pe().device  # where the weights are (prompts and features move there)
        coords = torch.as_tensor(coords, dtype=torch.float32).to(dev)
        labels = torch.as_tensor(labels, dtype=torch.int32).to(dev)
        masks = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32).to(dev)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
        low, iou, _, _ = self.mask_decoder(
            image_embeddings=torch.as_tensor(embeddings).to(dev, torch.float32), image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=False, high_res_features=[torch.as_tensor(high_res_feats_0).to(dev, torch.float32),
                                                   torch.as_tensor(high_res_feats_1).to(dev, torch.float32)])
        return torch.clamp(low, -32.0, 32.0), iou

    def predict(self, features: dict, points_xy: np.ndarray, labels: np.ndarray, orig_hw,
                multimask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One image: ``features`` as ``Sam2ImageEncoder.encode`` gives them (with or without the batch axis)."""
        one = {k: np.asarray(v)[None] if np.asarray(v).ndim == 3 else np.asarray(v) for k, v in features.items()}
        low, iou = self.decode(one["image_embed"], self.to_input_frame(points_xy, orig_hw)[None], np.asarray(labels)[None],
                               None, multimask, high_res_feats_0=one["high_res_feats_0"],
                               high_res_feats_1=one["high_res_feats_1"])
        return low[0].numpy(), iou[0].numpy()

    @torch.inference_mode()
    def upscale(self, low_res: np.ndarray | torch.Tensor, orig_hw) -> torch.Tensor:
        """(C, 256, 256) -> (C, H, W) logits: ``SAM2Transforms.postprocess_masks`` (bilinear, no holes filled)."""
        low = torch.as_tensor(np.asarray(low_res, np.float32))[None]
        return F.interpolate(low, tuple(int(v) for v in orig_hw), mode="bilinear", align_corners=False)[0]

    def upscale_mask(self, low_res, orig_hw) -> np.ndarray:
        """(256, 256) low-res logits -> the (H, W) bool mask the predictor gives (upscaled logits > 0)."""
        return self.upscale(np.asarray(low_res, np.float32)[None], orig_hw)[0].numpy() > 0

"""Frozen SAM backends: official checkpoints (vit_b / vit_l / vit_h) and the embedded micro-SAM.

Every model is built through one registry, segment_anything's ``sam_model_registry`` extended
with ``"micro"``; official ``.pth`` files are plain ``state_dict``s as Meta ships them.

    load_sam(sam_type, checkpoint=None) -> segment_anything.modeling.Sam   (eval mode, frozen)
    detect_sam_type(state_dict) -> "micro" | "vit_b" | "vit_l" | "vit_h"
"""
from __future__ import annotations

import os
import pickle
from importlib import resources

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from .micro_sam import build_sam_micro

SAM_REGISTRY = {
    "micro": build_sam_micro,
    "vit_b": sam_model_registry["vit_b"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_h": sam_model_registry["vit_h"],
}
SAM_TYPES = tuple(SAM_REGISTRY)
# image-encoder width -> official type (``image_encoder.pos_embed`` is (1, 64, 64, width))
_VIT_WIDTHS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not SAM, or of another type than asked."""


def micro_sam_weights() -> str:
    """Path of the micro-SAM weights shipped inside the package."""
    return str(resources.files("alignsam_ray") / "weights" / "micro_sam.pt")


def default_checkpoint(sam_type: str) -> str | None:
    return micro_sam_weights() if sam_type == "micro" else None


def load_weights(path: str, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` (tensors and plain containers only: no code runs), with one
    clear CheckpointError naming the file; never torch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path!r} does not exist") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{what} {path!r} is not a weights file alignsam can load: it is damaged, or it holds "
                              "pickled Python objects besides tensors, which are refused (unpickling can run code)") from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{what} {path!r} cannot be read ({type(exc).__name__}: {reason})") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint file as a state_dict, with clear errors. Never downloads."""
    if not os.path.isfile(path):
        raise CheckpointError(f"SAM checkpoint {path!r} does not exist (weights are never downloaded: "
                              "pass the local path of sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth)")
    state = load_weights(path, "SAM checkpoint")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some fine-tuning repos wrap the state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"SAM checkpoint {path!r} is not a state_dict of tensors")
    return state


def detect_sam_type(state_dict: dict[str, torch.Tensor], path: str = "<state_dict>") -> str:
    """Which registry entry a state_dict belongs to, from its keys and shapes."""
    if not any(k.startswith("mask_decoder.") for k in state_dict):
        raise CheckpointError(f"{path!r} is not a SAM checkpoint (no mask_decoder.* weights)")
    if any(k.startswith("image_encoder.stem.") for k in state_dict):
        return "micro"
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None or pos.shape[-1] not in _VIT_WIDTHS:
        shape = None if pos is None else tuple(pos.shape)
        raise CheckpointError(f"{path!r}: unknown SAM image encoder (pos_embed shape {shape})")
    return _VIT_WIDTHS[pos.shape[-1]]


def load_sam(sam_type: str, checkpoint: str | None = None, *, random_init: bool = False,
             device: str | torch.device = "cpu") -> Sam:
    """Build ``sam_type`` through the registry and load ``checkpoint`` (micro: the shipped weights).

    ``random_init=True`` builds the architecture with random weights (timing, tests), the same in
    every process (seeded), so a store's decoder matches its encoder. The model is returned in
    eval mode with ``requires_grad`` off: SAM stays frozen.
    """
    if sam_type not in SAM_REGISTRY:
        raise CheckpointError(f"unknown SAM type {sam_type!r}; choose one of {', '.join(SAM_TYPES)}")
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            sam = SAM_REGISTRY[sam_type]()
    else:
        sam = SAM_REGISTRY[sam_type]()
    if not random_init:
        path = checkpoint or default_checkpoint(sam_type)
        if path is None:
            raise CheckpointError(f"--sam {sam_type} needs --checkpoint PATH (the official .pth file); "
                                  "nothing is downloaded")
        state = read_state_dict(path)
        found = detect_sam_type(state, path)
        if found != sam_type:
            raise CheckpointError(f"checkpoint {path!r} holds a {found} SAM, but {sam_type} was asked for "
                                  f"(use --sam {found}, or the {sam_type} checkpoint)")
        try:
            sam.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path!r} does not fit the {sam_type} architecture: {exc}") from exc
    sam.eval().requires_grad_(False)
    return sam.to(device)


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)

"""Segment new images with an exported bundle, without Ray (`alignsam segment`, ``AlignSAMPredictor``).

    from alignsam_ray.predictor import AlignSAMPredictor
    p = AlignSAMPredictor("bundles/saliency")                    # micro-SAM bundles: nothing else needed
    p = AlignSAMPredictor("bundles/shadow", sam_checkpoint="/models/sam_vit_b_01ec64.pth")
    result = p.predict(image)          # image: (H, W, 3) uint8 RGB
    result.mask                        # (H, W) bool
    result.points, result.labels       # (2 + T, 2) x, y in image pixels; (2 + T,) 1 positive / 0 negative
    p.predict_steps(image)             # [Prediction after step t for t = 0 .. T] (`alignsam app`); [T] = predict's

The paper's inference: SAM embeds the image once; the SRM places one positive and one negative point
at its highest and lowest scores; the policy then picks T patches greedily, each labelled by the SRM,
and SAM's decoder re-runs on all points after each. Only torch, numpy, segment-anything and onnxruntime
are used.

A bundle may come from someone else, so it is read as data only, never unpickled: the policy is the ONNX
graph (run by onnxruntime), the SRM a ``weights_only`` state dict, the config YAML (``safe_load``); every
file read is listed in the manifest with its sha256 and checked first. ``policy.pt2`` (``alignsam export
--pt2``) is never loaded here: ``torch.export.load`` unpickles.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime
import torch
import yaml

from .agent.srm import load_srm
from .config import RunConfig
from .env.grid import PatchGrid
from .env.rollout import rollout
from .export import CONFIG_FILE, MANIFEST, POLICY_ONNX, SRM_FILE
from .foundation import (
    CheckpointError,
    SamImageEncoder,
    SamPromptDecoder,
    file_sha256,
    load_sam,
    pick_device,
)
from .foundation.sam2_models import Sam2ImageEncoder, Sam2PromptDecoder, is_sam2, load_sam2, square_frame
from .foundation.sam3_models import is_sam3

LOADED = (POLICY_ONNX, SRM_FILE, CONFIG_FILE)  # what the predictor reads from a bundle, besides the manifest


def read_bundle_manifest(bundle: str) -> dict:
    """The bundle's manifest, after checking that it lists every file the predictor loads and that each
    listed file matches its sha256 (a clear ValueError naming the file otherwise)."""
    path = os.path.join(bundle, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{bundle!r} is not an alignsam bundle (no {MANIFEST}); make one with "
                                "`alignsam export --checkpoint RUN --out BUNDLE`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-export the bundle with `alignsam export`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path} is not an alignsam bundle manifest (no 'files' with sha256s)")
    unlisted = [name for name in LOADED if name not in manifest["files"]]
    if unlisted:
        raise ValueError(f"{path} does not list {', '.join(unlisted)} (every file segment loads must be listed with "
                         "its sha256); re-export the bundle with `alignsam export`")
    for name, digest in manifest["files"].items():
        file = os.path.join(bundle, name)
        if not os.path.isfile(file):
            raise ValueError(f"bundle file {file} is missing (listed in {MANIFEST})")
        if file_sha256(file) != digest:
            raise ValueError(f"bundle file {file} does not match its sha256 in {MANIFEST}")
    return manifest


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) bool
    points: np.ndarray  # (2 + T, 2) float32, x, y in the image's pixels
    labels: np.ndarray  # (2 + T,) int64, 1 positive, 0 negative
    low_res_logits: np.ndarray  # (256, 256) float32, SAM's low-res output (SAM frame)


class AlignSAMPredictor:
    """A frozen SAM + an exported policy and SRM (see module docstring)."""

    def __init__(self, bundle: str, sam_checkpoint: str | None = None, device: str = "auto",
                 clip_weights: str | None = None, encoder: bool = True):
        """``encoder=False``: only the prompting side (SRM, policy, SAM's decoder), for ``prompt_batch`` on
        embeddings made elsewhere (``alignsam segment --ray``): neither SAM's image encoder nor CLIP is kept."""
        self.manifest = read_bundle_manifest(bundle)
        with open(os.path.join(bundle, CONFIG_FILE)) as f:
            raw = yaml.safe_load(f)
        raw["env"].setdefault("state", "binary")  # bundles from before the probability state were binary
        self.cfg = RunConfig.from_dict(raw)
        sam = self.manifest["sam"]
        if sam["checkpoint_sha256"] != "random-init":
            ckpt = sam_checkpoint
            if ckpt is None and sam["sam_type"] != "micro":
                raise CheckpointError(f"this policy was trained on {sam['sam_type']} embeddings: pass "
                                      f"--sam-checkpoint PATH (the official .pth, sha256 {sam['checkpoint_sha256'][:12]}...)")
            if ckpt is not None and file_sha256(ckpt) != sam["checkpoint_sha256"]:
                raise CheckpointError(f"{ckpt} is not the SAM checkpoint the policy was trained with (sha256 "
                                      f"{sam['checkpoint_sha256'][:12]}... expected)")
        self.device = pick_device(device)
        self.clip, self.text_map, self.text, self.encoder = None, None, None, None
        if self.manifest["srm_branch"] == "explicit":  # the SRM's text-guided input: CLIP Surgery maps
            self.text_map = self.manifest["text_map"]
            if encoder:
                self._load_clip(clip_weights)
        random_init = sam["checkpoint_sha256"] == "random-init"
        self.sam2 = is_sam2(sam["sam_type"]) or is_sam3(sam["sam_type"])  # SAM 3: SAM 2.1's layout, its own frame
        if is_sam3(sam["sam_type"]):  # the interactive predictor's parts and Sam3Processor's encoder side
            from .foundation.sam3_models import Sam3ImageEncoder, Sam3PromptDecoder, load_sam3, load_sam3_decoder

            if encoder:
                model = load_sam3(sam["sam_type"], sam_checkpoint, random_init=random_init)
                self.decoder = Sam3PromptDecoder.from_model(model, sam["sam_type"]).eval()
                self.encoder = Sam3ImageEncoder(model, self.device)
            else:  # prompting only: the decoder from the file, without building the 860M-parameter image model
                self.decoder = load_sam3_decoder(sam["sam_type"], sam_checkpoint, random_init=random_init)
        elif self.sam2:  # SAM 2.1 through the official sam2 package: its frame, its decoder's high-res features
            model = load_sam2(sam["sam_type"], sam_checkpoint, random_init=random_init)
            self.decoder = Sam2PromptDecoder.from_model(model, sam["sam_type"]).eval()  # (copied on CPU, first)
            if encoder:
                self.encoder = Sam2ImageEncoder(model, self.device)
        else:
            model = load_sam(sam["sam_type"], sam_checkpoint, random_init=random_init)
            if encoder:
                self.encoder = SamImageEncoder(model, self.device)
            self.decoder = SamPromptDecoder.from_sam(model, sam["sam_type"]).eval()
        self.policy = onnxruntime.InferenceSession(os.path.join(bundle, POLICY_ONNX), providers=["CPUExecutionProvider"])
        self.srm = load_srm(os.path.join(bundle, SRM_FILE), "bundle SRM")
        e = self.cfg.env
        self.grid = PatchGrid.from_env(e)
        self.horizon, self.obs_res = int(e.horizon), int(e.obs_res)

    def _load_clip(self, clip_weights: str | None) -> None:
        from .foundation.clip_surgery import ClipSurgery
        from .foundation.micro_clip import MICRO_CLIP_WEIGHTS

        clip, name = self.manifest.get("clip"), self.manifest["text_map"]
        if not clip or name not in clip["maps"]:
            raise ValueError(f"bundle has the explicit SRM branch but no CLIP map {name!r} recorded; re-export it "
                             "from a run whose store was embedded with --clip-model")
        weights = clip_weights or (MICRO_CLIP_WEIGHTS if clip["model"] == "micro" else None)
        if weights is None:
            raise CheckpointError(f"this policy uses {clip['model']} CLIP Surgery maps: pass --clip-weights PATH "
                                  f"(sha256 {clip['weights_sha256'][:12]}...)")
        if file_sha256(weights) != clip["weights_sha256"]:
            raise CheckpointError(f"{weights} is not the CLIP weights file the store's maps were made with (sha256 "
                                  f"{clip['weights_sha256'][:12]}... expected)")
        self.clip = ClipSurgery.load(clip["model"], weights, device=self.device)
        self.text_map, self.text = name, clip["maps"][name]

    def greedy(self, obs: np.ndarray, action_mask: np.ndarray) -> np.ndarray:
        """The exported policy's argmax: (B, E, R, R), (B, N) -> (B,) patch indices (onnxruntime)."""
        logits = self.policy.run(None, {"obs": obs.astype(np.float32), "action_mask": action_mask})[0]
        return logits.argmax(1)

    def steps(self, horizon: int | None = None) -> int:
        """T of a prediction (default: the trained T), checked: 1 .. the grid's patches."""
        T = self.horizon if horizon is None else horizon
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or not 1 <= T <= self.grid.n:
            raise ValueError(f"steps must be a whole number in 1..{self.grid.n} (each step picks a patch of the "
                             f"{self.grid.rows}x{self.grid.cols} grid not picked before), got {horizon!r}")
        return int(T)

    @torch.inference_mode()
    def predict(self, image: np.ndarray, horizon: int | None = None) -> Prediction:
        """(H, W, 3) uint8 RGB -> the mask after ``horizon`` (default: the trained T) steps."""
        return self.predict_batch([image], horizon)[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[np.ndarray], horizon: int | None = None) -> list[Prediction]:
        """Several images: one encoder call, then one decoder call per step for all of them."""
        T = self.steps(horizon)
        return self.prompt_batch(self.embed_batch(images), T)

    @torch.inference_mode()
    def embed_batch(self, images: list[np.ndarray]) -> dict:
        """The encoder side: (H, W, 3) uint8 images -> {"embeddings": (B, E, 64, 64) float16,
        "original_size": (B, 2), "input_size": (B, 2) (h, w after the long side -> 1024; SAM 2.1: 1024, 1024),
        the CLIP Surgery map "map_<text>": (B, 64, 64) float16 for an explicit-branch policy, and for SAM 2.1
        "high_res_feats_0" (B, 32, 256, 256), "high_res_feats_1" (B, 64, 128, 128) float16}."""
        if self.encoder is None:
            raise ValueError("this predictor was made with encoder=False: it only prompts (prompt_batch)")
        if self.sam2:  # as `alignsam embed` stores them: fp16 features, the square 1024 frame
            feats = self.encoder.encode(images)
            data = {"embeddings": feats["image_embed"].astype(np.float16),
                    **{k: feats[k].astype(np.float16) for k in self.decoder.extra_keys},
                    "original_size": np.array([im.shape[:2] for im in images]),
                    "input_size": np.full((len(images), 2), self.decoder.frame_size)}
            if self.clip is not None:
                data[f"map_{self.text_map}"] = self.clip.maps([square_frame(im) for im in images], [self.text])[:, 0]
            return data
        resized = [self.encoder.resize(im) for im in images]
        data = {"embeddings": self.encoder.encode(resized).astype(np.float16),
                "original_size": np.array([im.shape[:2] for im in images]),
                "input_size": np.array([r.shape[:2] for r in resized])}
        if self.clip is not None:  # as `alignsam embed` made them: on the resized image, SAM's padding
            data[f"map_{self.text_map}"] = self.clip.maps(resized, [self.text])[:, 0]
        return data

    @torch.inference_mode()
    def predict_steps(self, image: np.ndarray, horizon: int | None = None) -> list[Prediction]:
        """(H, W, 3) uint8 RGB -> the prediction after each step t = 0 .. T (``alignsam app``'s step slider):
        [0] holds the SRM's two starting points alone, [t] the first 2 + t points; [T] is ``predict``'s."""
        T = self.steps(horizon)
        return [preds[0] for preds in self._prompt(self.embed_batch([image]), T, tuple(range(T + 1))).values()]

    @torch.inference_mode()
    def prompt_batch(self, data: dict, horizon: int | None = None) -> list[Prediction]:
        """The prompting side on ``embed_batch``'s output: SRM start, T greedy policy steps with SRM
        labels, SAM's decoder after each; masks at each image's original size."""
        T = self.steps(horizon)
        return self._prompt(data, T, (T,))[T]

    def _prompt(self, data: dict, T: int, record: tuple) -> dict[int, list[Prediction]]:
        """The rollout of ``prompt_batch``, read at each step in ``record`` -> {step: one Prediction per image}."""
        n = len(data["embeddings"])
        r = rollout(self, {**data, "ids": np.arange(n)}, self.decoder, actions="policy", init="srm", labels="srm",
                    horizon=T, record=record, batch=n)
        return {t: [to_prediction(self.decoder, *r.points[t][s], r.logits[t][s], data["original_size"][s],
                                  data["input_size"][s]) for s in range(n)] for t in record}


def to_prediction(decoder, coords: np.ndarray, labels: np.ndarray, low: np.ndarray, hw, input_hw) -> Prediction:
    """One rollout step of one image -> a Prediction at the image's size: coords (n, 2) in SAM's frame,
    labels (n,), low (256, 256) low-res logits, hw / input_hw the image's (h, w) and SAM's resized (h, w)."""
    scale = np.asarray(hw[::-1], np.float32) / np.asarray(input_hw[::-1], np.float32)
    points = (coords * scale).astype(np.float32)  # SAM frame -> image pixels
    return Prediction(decoder.upscale_mask(low, tuple(int(v) for v in hw)), points, labels, low.copy())

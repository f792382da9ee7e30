"""Encoder side of a frozen SAM: image -> (E, 64, 64) embedding, preprocessing as SamPredictor.

Used once per image by ``alignsam embed``; rollout workers never load it.
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


class SamImageEncoder:
    """Wraps a ``Sam``'s image encoder with SamPredictor's exact preprocessing.

    resize(image)   (H, W, 3) uint8 -> (h', w', 3) uint8, long side 1024 (ResizeLongestSide)
    encode(resized) list of resized images -> (B, E, 64, 64) float32 embeddings
    """

    def __init__(self, sam: Sam, device: str | torch.device = "cpu"):
        self.sam = sam.to(device).eval()
        self.device = torch.device(device)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    def resize(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        return self.transform.apply_image(image)

    @torch.inference_mode()
    def encode(self, resized: list[np.ndarray]) -> np.ndarray:
        """Embeddings (B, E, 64, 64) float32 of images already passed through ``resize``."""
        batch = torch.cat([
            self.sam.preprocess(torch.as_tensor(im, device=self.device).permute(2, 0, 1)[None].float())
            for im in resized
        ])
        return self.sam.image_encoder(batch).float().cpu().numpy()

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (E, 64, 64) float32, identical to ``SamPredictor.set_image``."""
        return self.encode([self.resize(image)])[0]

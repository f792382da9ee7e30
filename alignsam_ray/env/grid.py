"""The action space's patch grid: one candidate point per patch centre.

Paper: the image is resized to 800x800 and cut into 80x80 patches -> a 10x10 grid, N = 100
actions. The grid is defined on the *image* (not on SAM's padded 1024 frame), so a non-square
image gets non-square patches, exactly as resizing it to 800x800 would.

    action a = row * cols + col                      (row-major)
    centre (normalised)  u = (col + 0.5) / cols,  v = (row + 0.5) / rows    in (0, 1)
    centre (original px) x = u * W,  y = v * H                      (x, y) for an H x W image
    centre (SAM frame)   ResizeLongestSide(1024).apply_coords((x, y), (H, W))  (as SamPredictor)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from segment_anything.utils.transforms import ResizeLongestSide

PAPER_RESIZE = 800
PAPER_PATCH = 80
SAM_FRAME = 1024


@dataclass(frozen=True)
class PatchGrid:
    rows: int = PAPER_RESIZE // PAPER_PATCH
    cols: int = PAPER_RESIZE // PAPER_PATCH

    def __post_init__(self):
        if self.rows < 2 or self.cols < 2:
            raise ValueError(f"a patch grid needs at least 2x2 patches, got {self.rows}x{self.cols}")

    @classmethod
    def from_config(cls, grid: int | list | tuple | None = None, patch_size: int | None = None,
                    resize: int = PAPER_RESIZE) -> PatchGrid:
        """``grid`` (10 or [rows, cols]) wins; else ``resize // patch_size`` (the paper's 800 // 80)."""
        if grid is not None:
            rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
            return cls(int(rows), int(cols))
        patch = patch_size or PAPER_PATCH
        if resize % patch:
            raise ValueError(f"patch_size {patch} does not divide the resized image side {resize}")
        return cls(resize // patch, resize // patch)

    @classmethod
    def from_env(cls, env) -> PatchGrid:
        """The grid of a run config's ``env`` section (``config.EnvSettings``) or an env's ``config.EnvConfig``:
        its grid, patch_size, resize."""
        return cls.from_config(env.grid, env.patch_size, env.resize)

    @property
    def n(self) -> int:
        return self.rows * self.cols

    def centres_normalised(self) -> np.ndarray:
        """(N, 2) patch centres as (u, v) = (x / W, y / H), row-major."""
        r, c = np.divmod(np.arange(self.n), self.cols)
        return np.stack([(c + 0.5) / self.cols, (r + 0.5) / self.rows], 1)

    def centres_original(self, original_size) -> np.ndarray:
        """(N, 2) centres as (x, y) pixels of the original (H, W) image."""
        h, w = original_size
        return self.centres_normalised() * np.array([w, h], dtype=np.float64)

    def centres_sam(self, original_size) -> np.ndarray:
        """(N, 2) centres in SAM's 1024 input frame (what SamPredictor.apply_coords gives)."""
        return ResizeLongestSide(SAM_FRAME).apply_coords(self.centres_original(original_size), tuple(original_size))

    def cell_of(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Action index of the patch holding normalised position(s) (u, v)."""
        col = np.clip((np.asarray(u) * self.cols).astype(int), 0, self.cols - 1)
        row = np.clip((np.asarray(v) * self.rows).astype(int), 0, self.rows - 1)
        return row * self.cols + col

"""The AlignSAM episode logic for ``num_slots`` images at once (the batched core behind every env).

One episode = one image. Reset puts one positive and one negative point; each step adds the
patch centre the agent picked, labelled by the SRM (or by an ablation's rule), and re-runs SAM's
prompt encoder + mask decoder on *all* points. Every decoder call covers all B slots at once
(``SamPromptDecoder.decode``: row b's prompts against row b's embedding), so k environments cost
one batched call per vector step.

Frames (see ``grid.py``): the image frame (H, W) holds the patch grid; SAM's 1024 frame holds the
embedding (64x64 grid, 16 px a cell) and the low-res masks (256x256, 4 px a pixel); the image
occupies the top-left ``input_size`` of it, the rest is padding. Observations are cropped to the
image and pooled, so the observation grid and the patch grid cover the same area. The decoder states
its frame (``frame_size``, ``grid_size``, ``lowres_size``; SAM 3: 1008, 72, 288, the image squashed onto
all of it, as SAM 2.1 onto 1024) and patch centres go through its ``to_input_frame``.

    state s_t  = E_I(x) (.) M_{t-1}        (E, 64, 64) in SAM's frame; M = SAM's previous probability
                                           map sigmoid(low-res logits) pooled to 64x64 (paper Sec. 3.3,
                                           Eq. 11; ``state="binary"``: the thresholded mask instead)
    obs        = pool_R(crop(s_t))         (E, R, R) float16, R = ``obs_res``
    srm input  = obs (and pool_R(crop(E_I(x) (.) M_c)) for the explicit branch)

Starting prompts (``init``): "gt" one positive and one negative point drawn from the ground truth
(training); "srm" the SRM's highest- and lowest-scoring positions (evaluation, the paper's protocol);
"centre" one positive point at the image centre and no negative one (the w/o-SRM ablation: no SRM
anywhere in the rollout).

Reward (``reward``; docs/agent.md#reward): "hit" (the paper's) +1 if the picked centre lies on
ground-truth foreground, -1 on background, 0 on void (ground truth read at SAM's low-res 256x256
resolution); "iou_gain" IoU_t - IoU_{t-1}, what the click did to SAM's mask (IoU_0: the mask of the
starting points); "iou_gain_hit" hit + ``iou_gain_weight`` * (IoU_t - IoU_{t-1}). Without ground truth
every reward is 0. IoU: the binary mask vs the ground truth at low res, inside the image, void
excluded. Slots that share a decoder call but hold fewer points than the others are padded with
label -1 (SAM's "not a point"); slots in lockstep (the usual case: every episode lasts T steps)
decode exactly as ``SamPredictor`` would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EnvSettings
from ..foundation.decoder import SamPromptDecoder
from .grid import PatchGrid

VOID = 255

Init = Literal["gt", "srm", "centre"]  # the starting prompts (module docstring)
Labels = Literal["srm", "gt", "positive"]  # who labels a picked point: the SRM, the ground truth (oracle), always 1
State = Literal["probability", "binary"]  # M in s_t = E_I(x) (.) M_{t-1}
Reward = Literal["hit", "iou_gain", "iou_gain_hit"]  # module docstring
INIT_MODES, LABEL_MODES, STATE_MODES, REWARD_MODES = get_args(Init), get_args(Labels), get_args(State), get_args(Reward)


def holdout_split(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a split of ``n`` images: the last ``k`` are validation
    (stores keep images sorted by id, so the choice is fixed and independent of the seed)."""
    if not 0 <= k < n:
        raise ValueError(f"a validation holdout of {k} image(s) needs 0 <= k < {n} (the split's images)")
    idx = np.arange(n)
    return idx[: n - k], idx[n - k:]


@dataclass
class StepResult:
    """Per-slot results of one batched step (arrays of length B)."""

    reward: np.ndarray  # float32
    terminated: np.ndarray  # bool
    iou: np.ndarray  # float32, after this step
    hit: np.ndarray  # bool, picked centre on ground-truth foreground
    label: np.ndarray  # int64, the label the point was given (1 positive, 0 negative)


class PromptEpisodes:
    """``num_slots`` concurrent episodes over the images of one store split (keyword arguments only;
    the run config's values: ``config.EnvSettings`` holds the defaults).

    data: dict from ``EmbeddingStore.arrays`` / ``fetch_store`` (read-only arrays are fine).
    grid: the patch grid (N = rows x cols actions); horizon: T, steps per episode; obs_res: R, the
        observation's side (obs (num_slots, E, R, R)).
    init, labels, state: the modes of the module docstring (``Init``, ``Labels``, ``State``).
    srm: an ``agent.srm.SRM`` (or None when neither init nor labels use it: then no SRM runs at all).
    text_map: the store's map column of the explicit SRM branch (None: implicit).
    seed: the stream of training images and ground-truth starting points.
    pool: image indices that ``reset`` draws from when no images are given (default: all; training
        with a held-out validation split passes the other indices).
    reward: "hit" (paper), "iou_gain" or "iou_gain_hit" with weight ``iou_gain_weight`` (module docstring).
    The decoder and the SRM run where their weights are (``decoder.to("cuda")``: evaluation on a GPU);
    the observations are built on the decoder's device; the arrays here stay numpy on the CPU.
    """

    def __init__(self, *, data: dict, decoder: SamPromptDecoder, grid: PatchGrid, num_slots: int, horizon: int,
                 obs_res: int, init: Init, labels: Labels, state: State, srm=None, text_map: str | None = None,
                 seed: int | None = None, pool=None, reward: Reward = EnvSettings.reward,
                 iou_gain_weight: float = EnvSettings.iou_gain_weight):
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        if state not in STATE_MODES:
            raise ValueError(f"state must be one of {STATE_MODES}, got {state!r}")
        if reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {REWARD_MODES}, got {reward!r}")
        if (init == "srm" or labels == "srm") and srm is None:
            raise ValueError("init='srm' or labels='srm' needs an SRM")
        self.data = data
        self.decoder = decoder
        self.grid = grid
        self.num_slots = num_slots
        self.horizon = horizon
        self.obs_res = obs_res
        self.init = init
        self.n_start = 1 if init == "centre" else 2  # starting points (n0)
        self.label_mode = labels
        self.state = state
        self.reward_mode, self.iou_gain_weight = reward, float(iou_gain_weight)
        self.srm = srm
        self.device = next(decoder.parameters()).device
        self.rng = np.random.default_rng(seed)
        self.n_images = len(data["ids"])
        self.pool = np.arange(self.n_images) if pool is None else np.asarray(pool, np.int64)
        if len(self.pool) == 0:
            raise ValueError("no images to draw episodes from (empty pool)")
        self.embed_dim = data["embeddings"].shape[1]
        # without ground truth (new images: `alignsam segment`) rewards are 0, IoU and hit unknown
        self.has_gt = "gt_lowres" in data
        if not self.has_gt and (init == "gt" or labels == "gt"):
            raise ValueError("data without 'gt_lowres' (inference) needs init='srm' and labels 'srm' or 'positive'")
        self.text_map = None
        if text_map is not None:
            key = f"map_{text_map}"
            if key not in data:
                have = sorted(k[4:] for k in data if k.startswith("map_")) or "none"
                raise KeyError(f"the store has no per-image map {text_map!r} (maps present: {have}); the "
                               "explicit SRM branch needs text-guided maps: run `alignsam embed` with CLIP "
                               "maps, or use the implicit branch (srm_branch: implicit)")
            self.text_map = data[key]
        # the decoder's frame: side, embedding grid, low-res side (SAM 1: 1024, 64, 256)
        self.frame, self.lowres = decoder.frame_size, decoder.lowres_size
        self.pool_k = decoder.lowres_size // decoder.grid_size  # low-res pixels per embedding cell (4)
        P = horizon + self.n_start
        self.image = np.zeros(self.num_slots, np.int64)
        self.t = np.zeros(self.num_slots, np.int64)
        self.coords = np.zeros((self.num_slots, P, 2), np.float32)
        self.labels = -np.ones((self.num_slots, P), np.int64)
        self.taken = np.zeros((self.num_slots, grid.n), bool)
        self.mask = np.zeros((self.num_slots, self.lowres, self.lowres), bool)  # current binary low-res mask (logits > 0)
        self.logits = np.zeros((self.num_slots, self.lowres, self.lowres), np.float32)  # current low-res logits
        self.prob = np.zeros((self.num_slots, self.lowres, self.lowres), np.float32)  # M_t: sigmoid(logits), or the binary mask
        self.iou = np.zeros(self.num_slots, np.float32)
        self.obs = np.zeros((self.num_slots, self.embed_dim, self.obs_res, self.obs_res), np.float16)
        self.srm_prob = np.full((self.num_slots, self.obs_res, self.obs_res), 0.5, np.float32)
        self.srm_samples: list = []  # (obs, text_obs | None, gt_R) for SRM training
        self.collect_srm_samples = False
        self.srm_buffer = 1024
        # per image: the image's extent in the embedding grid (64) and the low-res frame (256)
        ins = np.asarray(data["input_size"])
        self._cells64 = np.ceil(ins * decoder.grid_size / self.frame).astype(int)
        self._px256 = np.ceil(ins * self.lowres / self.frame).astype(int)
        self._centres = {}  # image -> (N, 2) centres in SAM's frame
        self._gt_pooled = {}  # image -> (R, R) foreground fraction
        self._centre_cells = np.minimum((grid.centres_normalised()[:, ::-1] * self.obs_res).astype(int), self.obs_res - 1)  # (N, 2) row, col

    # ------------------------------------------------------------------ geometry
    def centres_sam(self, i: int) -> np.ndarray:
        """(N, 2) patch centres of image ``i`` in the decoder's frame (SAM 1: ``PatchGrid.centres_sam``)."""
        if i not in self._centres:
            hw = tuple(int(v) for v in self.data["original_size"][i])
            self._centres[i] = self.decoder.to_input_frame(self.grid.centres_original(hw), hw).astype(np.float32)
        return self._centres[i]

    def gt_at(self, i: int, xy_sam: np.ndarray) -> np.ndarray:
        """Ground truth (0/1/255) at points (n, 2) of SAM's 1024 frame."""
        px = np.clip((np.asarray(xy_sam) * self.lowres / self.frame).astype(int), 0, self.lowres - 1)
        return self.data["gt_lowres"][i][px[:, 1], px[:, 0]]

    def _crop_pool(self, x: torch.Tensor, i: int, cells: bool = True) -> torch.Tensor:
        """(C, 64, 64) or (C, 256, 256) in SAM's frame -> (C, R, R) over the image area."""
        h, w = self._cells64[i] if cells else self._px256[i]
        return F.adaptive_avg_pool2d(x[:, :h, :w], self.obs_res)

    def gt_pooled(self, i: int) -> np.ndarray:
        """(R, R) foreground fraction of the image's ground truth (void counts as background)."""
        if i not in self._gt_pooled:
            gt = torch.from_numpy(np.asarray(self.data["gt_lowres"][i] == 1, np.float32))[None]
            self._gt_pooled[i] = self._crop_pool(gt, i, cells=False)[0].numpy().astype(np.float16)
        return self._gt_pooled[i]

    # ------------------------------------------------------------------ episode control
    def reset(self, slots, images=None) -> None:
        """Start new episodes in ``slots`` on ``images`` (default: random training images)."""
        slots = np.atleast_1d(np.asarray(slots, np.int64))
        if images is None:
            images = self.pool[self.rng.integers(0, len(self.pool), len(slots))]
        images = np.atleast_1d(np.asarray(images, np.int64))
        self.image[slots] = images
        self.t[slots] = 0
        self.labels[slots] = -1
        self.coords[slots] = 0
        self.taken[slots] = False
        if self.init == "srm" or self.collect_srm_samples:
            self._observe(slots, full_mask=True)  # s_0 = E_I(x): the SRM scores the whole image
        for s, i in zip(slots, images):
            self.coords[s, : self.n_start], self.labels[s, : self.n_start] = self._initial_points(s, i)
        self._decode(slots)
        self._observe(slots)

    def _initial_points(self, s: int, i: int):
        """One positive and one negative point in SAM's frame: from the ground truth (training)
        or at the SRM's highest and lowest scoring positions (evaluation); "centre": one positive
        point at the image centre."""
        h, w = self.data["original_size"][i]
        if self.init == "centre":
            xy = self.decoder.to_input_frame(np.array([[w / 2, h / 2]]), (int(h), int(w)))
            return xy.astype(np.float32), np.array([1])
        if self.init == "gt":
            gt = self.data["gt_lowres"][i][: self._px256[i][0], : self._px256[i][1]]
            pts = []
            for value in (1, 0):
                yx = np.argwhere(gt == value)
                if len(yx) == 0:  # no foreground (or no background): any image pixel
                    yx = np.argwhere(gt != VOID) if (gt != VOID).any() else np.argwhere(gt >= 0)
                y, x = yx[self.rng.integers(len(yx))]
                step = self.frame / self.lowres  # the low-res pixel's centre in the input frame (SAM 1: 4x + 1.5)
                pts.append(((x + 0.5) * step - 0.5, (y + 0.5) * step - 0.5))
            return np.array(pts, np.float32), np.array([1, 0])
        prob = self.srm_prob[s]
        hi, lo = np.unravel_index(prob.argmax(), prob.shape), np.unravel_index(prob.argmin(), prob.shape)
        uv = np.array([[(hi[1] + 0.5) / self.obs_res, (hi[0] + 0.5) / self.obs_res], [(lo[1] + 0.5) / self.obs_res, (lo[0] + 0.5) / self.obs_res]])
        xy = self.decoder.to_input_frame(uv * np.array([w, h]), (int(h), int(w)))
        return xy.astype(np.float32), np.array([1, 0])

    def step(self, actions, slots=None) -> StepResult:
        """Apply ``actions[s]`` in each of ``slots`` (default: all B); results are per slot given."""
        actions = np.asarray(actions, np.int64).reshape(self.num_slots)
        slots = np.arange(self.num_slots) if slots is None else np.atleast_1d(np.asarray(slots, np.int64))
        picked = self.taken[slots, actions[slots]]
        if picked.any():
            raise ValueError(f"patch(es) {actions[slots][picked].tolist()} already picked in slot(s) "
                             f"{slots[picked].tolist()}; respect the action mask")
        if (self.t[slots] >= self.horizon).any():
            raise RuntimeError("step() on a finished episode; call reset() first")
        n = len(slots)
        label, hit, reward = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, np.float32)
        for j, s in enumerate(slots):
            i, a = self.image[s], actions[s]
            xy = self.centres_sam(i)[a]
            g = self.gt_at(i, xy[None])[0] if self.has_gt else VOID
            hit[j] = g == 1
            reward[j] = 1.0 if g == 1 else (0.0 if g == VOID else -1.0)
            label[j] = self._label(s, a, g)
            k = self.n_start + self.t[s]
            self.coords[s, k], self.labels[s, k] = xy, label[j]
            self.taken[s, a] = True
            self.t[s] += 1
        iou_before = self.iou[slots].copy()  # IoU_{t-1}; at t = 1 the mask of the starting points
        self._decode(slots)
        self._observe(slots)
        if self.reward_mode != "hit" and self.has_gt:
            gain = self.iou[slots] - iou_before
            reward = gain if self.reward_mode == "iou_gain" else reward + self.iou_gain_weight * gain
        return StepResult(reward.astype(np.float32), self.t[slots] >= self.horizon, self.iou[slots].copy(), hit, label)

    def _label(self, s: int, action: int, gt_value: int) -> int:
        if self.label_mode == "positive":
            return 1
        if self.label_mode == "gt":
            return int(gt_value == 1)
        r, c = self._centre_cells[action]
        return int(self.srm_prob[s, r, c] >= 0.5)

    # ------------------------------------------------------------------ SAM + observation
    def _decode(self, slots: np.ndarray) -> None:
        emb = torch.from_numpy(np.ascontiguousarray(self.data["embeddings"][self.image[slots]])).to(self.device)
        n = self.n_start + int(self.t[slots].max())  # slots in lockstep decode exactly as SamPredictor would
        extra = {k: torch.from_numpy(np.ascontiguousarray(self.data[k][self.image[slots]])).to(self.device)
                 for k in self.decoder.extra_keys}  # SAM 2.1: the images' high-resolution features
        low, _ = self.decoder.decode(emb, self.coords[slots, :n], self.labels[slots, :n], **extra)
        low = low.cpu()
        logits = low[:, 0].numpy()
        self.logits[slots] = logits
        self.mask[slots] = logits > 0
        self.prob[slots] = torch.sigmoid(low[:, 0]).numpy() if self.state == "probability" else logits > 0
        if not self.has_gt:
            self.iou[slots] = np.nan
            return
        for s in slots:
            i = self.image[s]
            h, w = self._px256[i]
            gt = self.data["gt_lowres"][i][:h, :w]
            pred = self.mask[s, :h, :w]
            valid = gt != VOID
            inter = np.logical_and(pred, gt == 1)[valid].sum()
            union = np.logical_or(pred, gt == 1)[valid].sum()
            self.iou[s] = inter / union if union else 1.0

    def _observe(self, slots: np.ndarray, full_mask: bool = False) -> None:
        """Build obs (and the SRM's probability map) of ``slots`` from the current masks."""
        obs, text_obs = [], []
        for s in slots:
            i = self.image[s]
            emb = torch.from_numpy(np.asarray(self.data["embeddings"][i])).to(self.device, torch.float32)
            if full_mask:
                state = emb
            else:
                m64 = F.avg_pool2d(torch.from_numpy(self.prob[s]).to(self.device)[None], self.pool_k)  # (1, 64, 64)
                state = emb * m64
            obs.append(self._crop_pool(state, i))
            if self.text_map is not None:
                mc = torch.from_numpy(np.asarray(self.text_map[i])).to(self.device, torch.float32)[None]
                text_obs.append(self._crop_pool(emb * mc, i))
        obs = torch.stack(obs)
        text = torch.stack(text_obs) if text_obs else None
        self.obs[slots] = obs.cpu().numpy().astype(np.float16)
        if self.srm is not None:
            self.srm_prob[slots] = self.srm.probability(obs, text)
        if self.collect_srm_samples:
            for j, s in enumerate(slots):
                self.srm_samples.append((self.obs[s].copy(), None if text is None else text[j].cpu().numpy().astype(np.float16),
                                         self.gt_pooled(self.image[s])))
            del self.srm_samples[: -self.srm_buffer]

    def action_mask(self) -> np.ndarray:
        """(B, N) float32, 1 where the patch may still be picked."""
        return (~self.taken).astype(np.float32)

    def step_fraction(self) -> np.ndarray:
        """(B, 1) float32, t / T: where each episode is in time (the critic's input)."""
        return (self.t / self.horizon).astype(np.float32)[:, None]

    def srm_scores(self) -> np.ndarray:
        """(B, N) float32: the SRM's current foreground probability at each patch centre."""
        r, c = self._centre_cells[:, 0], self._centre_cells[:, 1]
        return self.srm_prob[:, r, c]

    def points(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Slot ``s``'s prompts so far: coords (n, 2) in SAM's frame, labels (n,), n = n0 + t."""
        n = self.n_start + int(self.t[s])
        return self.coords[s, :n].copy(), self.labels[s, :n].copy()

    def pop_srm_samples(self) -> list:
        out, self.srm_samples = self.srm_samples, []
        return out

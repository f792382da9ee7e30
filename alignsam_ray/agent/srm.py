"""Semantic Recalibration Module (SRM): labels each picked point positive or negative.

It predicts a foreground probability map from the state and is trained with Dice + BCE against
the ground truth pooled to the same grid (fractions in [0, 1]).

    implicit branch (abstract tasks: blur, glass, saliency)
        V(0, s_t):   s_t -> ConvBlock -> ConvBlock -> 1x1 head
    explicit branch (concrete objects: shadow, classes)
        V(s_c, s_t): [s_c, s_t] -> 3 conv layers (fusion) -> self-attention over the R x R
                     positions -> 2 conv layers -> 1x1 head        s_c = E_I(x) (.) M_c (CLIP map)

    inputs  s_t, s_c: (B, E, R, R) float (the env's observation; E = SAM's embedding width)
    output  logits (B, R, R); probability = sigmoid(logits); a point is positive iff p >= 0.5

Paper: updated q times per PPO update (q = 1 implicit, q = 5 explicit); here one SRM update is
one epoch over the (state, ground truth) pairs collected during that PPO update.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("implicit", "explicit")
PAPER_Q = {"implicit": 1, "explicit": 5}


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv -> GroupNorm -> ReLU (shape preserved)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU())


class SRM(nn.Module):
    def __init__(self, embed_dim: int, branch: str = "implicit", width: int = 64, heads: int = 4):
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"srm branch must be one of {BRANCHES}, got {branch!r}")
        self.branch = branch
        self.embed_dim = embed_dim
        if branch == "implicit":
            self.body = nn.Sequential(conv_block(embed_dim, width), conv_block(width, width))
        else:
            self.fuse = nn.Sequential(conv_block(2 * embed_dim, width), conv_block(width, width), conv_block(width, width))
            self.norm = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.body = nn.Sequential(conv_block(width, width), conv_block(width, width))
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, s_t: torch.Tensor, s_c: torch.Tensor | None = None) -> torch.Tensor:
        x = s_t.float()
        if self.branch == "explicit":
            if s_c is None:
                raise ValueError("the explicit SRM branch needs s_c (the text-guided state)")
            x = self.fuse(torch.cat([s_c.float(), x], 1))
            b, c, h, w = x.shape
            tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
            x = x + self.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.body(x))[:, 0]

    @torch.inference_mode()
    def probability(self, s_t, s_c=None) -> np.ndarray:
        """(B, E, R, R) -> (B, R, R) float32 numpy foreground probabilities (computed where the weights are)."""
        dev = self.head.weight.device
        return torch.sigmoid(self(torch.as_tensor(s_t).to(dev), None if s_c is None else torch.as_tensor(s_c).to(dev))).cpu().numpy()


def srm_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Dice + BCE; logits, target: (B, R, R), target = foreground fraction in [0, 1]."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()
    return bce + dice, {"srm_bce": bce.item(), "srm_dice": dice.item()}


class SrmTrainer:
    """Holds the SRM and its optimiser; ``update`` makes q SRM updates on the samples collected
    during one PPO update. As a PPO update is K epochs over its batch, one SRM update is one
    epoch over its samples (minibatches of ``batch_size``). Every setting comes from the run
    config (``config.SrmSettings``: the defaults live there, once); q None = the paper's.

    samples: list of (s_t (E,R,R) f16, s_c (E,R,R) f16 | None, target (R,R) f16) from the envs.
    """

    def __init__(self, *, embed_dim: int, branch: str, lr: float, q: int | None, batch_size: int, seed: int,
                 bf16: bool):
        torch.manual_seed(seed)
        self.srm = SRM(embed_dim, branch)
        self.srm.eval()
        self.q = PAPER_Q[branch] if q is None else q
        self.batch_size = batch_size
        self.opt = torch.optim.Adam(self.srm.parameters(), lr=lr)
        self.rng = np.random.default_rng(seed)
        self.updates = 0
        self.bf16 = bf16  # the training forward under bfloat16 autocast (labelling runs fp32)

    def update(self, samples: list) -> dict:
        if not samples:
            return {}
        s_t = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.float32))
        s_c = None if samples[0][1] is None else torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.float32))
        target = torch.from_numpy(np.stack([s[2] for s in samples]).astype(np.float32))
        self.srm.train()
        stats = {}
        for _ in range(self.q):  # one SRM update = one epoch over the samples, in minibatches
            order = torch.from_numpy(self.rng.permutation(len(samples)))
            for idx in order.split(self.batch_size):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    logits = self.srm(s_t[idx], None if s_c is None else s_c[idx])
                loss, stats = srm_loss(logits.float(), target[idx])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.updates += 1
        self.srm.eval()
        with torch.inference_mode():
            pred = torch.sigmoid(self.srm(s_t, s_c)) >= 0.5
            stats["srm_pixel_acc"] = (pred == (target >= 0.5)).float().mean().item()
        stats["srm_loss"] = stats["srm_bce"] + stats["srm_dice"]
        return stats

    def weights(self) -> dict:
        """Weights as numpy arrays (what travels to the EnvRunners)."""
        return {k: v.detach().cpu().numpy() for k, v in self.srm.state_dict().items()}

    def get_state(self) -> dict:
        """Everything a resumed run needs to go on exactly: weights, optimiser, update count and the
        minibatch order's random stream (part of ``AlignSamPPO``'s checkpointed state)."""
        return {"branch": self.srm.branch, "embed_dim": self.srm.embed_dim, "weights": self.weights(),
                "optimizer": self.opt.state_dict(), "updates": self.updates, "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        """The inverse of ``get_state``; also takes a checkpoint written before ``AlignSamPPO`` (its srm.pt:
        state_dict, optimizer and updates, no random stream: that one then goes on from where it is)."""
        weights = state["weights"] if "weights" in state else state["state_dict"]
        set_srm_state(self.srm, weights)
        self.opt.load_state_dict(state["optimizer"])
        self.updates = state["updates"]
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]


def srm_from_state(state: dict) -> SRM:
    """An SRM (eval mode) from ``SrmTrainer.get_state()`` or a saved SRM file's dict."""
    srm = SRM(state["embed_dim"], state["branch"])
    set_srm_state(srm, state["weights"] if "weights" in state else state["state_dict"])
    return srm


def save_srm(srm: SRM, path: str) -> None:
    """The SRM alone, tensors only ({"branch", "embed_dim", "state_dict"}: ``weights_only`` loads it); an
    exported bundle's srm.pt, and the srm.pt beside the policy of checkpoints written before ``AlignSamPPO``."""
    torch.save({"branch": srm.branch, "embed_dim": srm.embed_dim, "state_dict": srm.state_dict()}, path)


def load_srm(path: str, what: str = "SRM checkpoint") -> SRM:
    """An SRM saved by ``save_srm`` (eval mode)."""
    from ..foundation.sam_models import load_weights

    return srm_from_state(load_weights(path, what))


def set_srm_state(srm: SRM, state: dict) -> None:
    srm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})  # a writable copy
    srm.eval()

"""Training configuration: every hyperparameter in one place, the paper's value as default.

A run config is YAML with the sections below (``tune_configs/<task>.yaml``); anything left out
takes the default. Command-line overrides use dotted keys: ``ppo.lr=3e-4 env.horizon=10``.
Unknown keys are errors (a typo must not silently train with the default).
"""
from __future__ import annotations

import copy
import os

import yaml

DEFAULTS: dict = {
    "task": None,            # a name for reports ("synthetic_blur", "blur", "voc_cat", ...)
    "store": None,           # embedding store of the task (`alignsam embed`); relative = to the cwd
    "run_dir": None,         # checkpoints, TensorBoard logs; default runs/<task>
    "env": {
        "grid": None,        # [rows, cols] or an int; None -> resize // patch_size
        "patch_size": 80,    # paper: 80x80 patches ...
        "resize": 800,       # ... of the image resized to 800x800 -> a 10x10 grid
        "horizon": 15,       # T, steps per episode (paper 15)
        "obs_res": 16,       # R: state pooled to R x R (see README: memory vs learning)
        "state": "probability",  # s_t = E_I(x) (.) M_{t-1}, M = SAM's probability map (paper Eq. 11) | binary
    },
    "srm": {
        "branch": "implicit",  # implicit (blur, glass, saliency) | explicit (shadow, classes)
        "q": None,             # SRM updates per PPO update; None -> paper (1 implicit, 5 explicit)
        "lr": 1.0e-4,          # paper: Adam 1e-4 for all experiments
        "batch_size": 64,
        "text_map": None,      # store map column for the explicit branch (CLIP Surgery maps)
    },
    "ppo": {
        "gamma": 0.99,         # paper
        "clip_param": 0.2,     # paper
        "num_epochs": 20,      # paper: K = 20
        "lr": 1.0e-4,          # paper: Adam 1e-4
        "lambda_": 1.0,        # paper Eq. 6: the discounted return (GAE with lambda = 1)
        "entropy_coeff": 0.01,
        "vf_loss_coeff": 0.5,
        "vf_clip_param": 20.0,  # returns reach +-T; RLlib's 10 would clip the value loss
        "use_kl_loss": False,  # RLlib turns a KL penalty on by default; the paper's PPO-clip has none
        "train_batch_size": 600,   # env steps per PPO update (40 episodes of T = 15)
        "minibatch_size": 150,
        "grad_clip": 1.0,
    },
    "model": {"width": 64, "time_input": True},  # time_input: the critic sees t / T
    "resources": {
        "num_env_runners": 1,
        "num_envs_per_env_runner": 4,   # k episodes per EnvRunner, one batched decoder call per step (scripts/bench.py)
        "num_cpus_per_env_runner": 0.5,  # a trial needs 1 CPU + this per runner; 0.5 fits 2 cores
        "num_gpus_per_learner": "auto",  # 1 if CUDA is visible, else 0
        "sample_timeout_s": 600,
    },
    "train": {
        "iterations": 30,
        "checkpoint_every": 10,
        "seed": 0,
        "val_images": 0,     # k > 0: the train split's last k images are held out as a validation split
    },                       # (episodes never see them; `alignsam tune` selects trials on them)
}


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in base:
            raise ConfigError(f"unknown config key {where + key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + key!r} must be a mapping")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            numeric = isinstance(base[key], (int, float)) and not isinstance(base[key], bool)
            out[key] = _number(value) if numeric else value
    return out


def _number(value):
    """YAML 1.1 reads 1e-4 (no dot) as a string; take it as the float it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """["ppo.lr=3e-4", "env.grid=[8,8]"] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. ppo.lr=3e-4)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Defaults <- YAML file <- overrides; relative paths are made absolute against the cwd."""
    raw = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    cfg = _merge(DEFAULTS, raw)
    if overrides:
        cfg = _merge(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if not cfg["store"]:
        raise ConfigError("the config needs 'store': the embedding store of the task (`alignsam embed --out STORE`)")
    cfg["task"] = cfg["task"] or os.path.basename(os.path.normpath(cfg["store"]))
    cfg["run_dir"] = cfg["run_dir"] or os.path.join("runs", cfg["task"])
    for key in ("store", "run_dir"):
        if "://" not in cfg[key]:  # a store may be a pyarrow URI (s3://bucket/stores/blur)
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def env_config(cfg: dict, **extra) -> dict:
    """The env_config for ``alignsam_ray.env.make_env`` from a run config."""
    e = cfg["env"]
    out = {
        "store": cfg["store"], "grid": e["grid"], "patch_size": e["patch_size"], "resize": e["resize"],
        "horizon": e["horizon"], "obs_res": e["obs_res"], "state": e["state"], "srm_branch": cfg["srm"]["branch"],
        "text_map": cfg["srm"]["text_map"],
    }
    out.update(extra)
    return out

"""Gymnasium environments over ``PromptEpisodes``: a single env and a batched vector env.

    observation  Dict{"obs": Box (E, R, R) float16, "action_mask": Box (N,) float32 (1 = allowed),
                      "step": Box (1,) float32, t / T (the critic's time input)}
    action       Discrete(N), N = grid rows x cols (paper: 10 x 10)
    reward       ``reward`` "hit" (paper): +1 picked centre on ground-truth foreground, -1 on background (0 on
                 void); "iou_gain": IoU_t - IoU_{t-1}; "iou_gain_hit": hit + iou_gain_weight * that (episodes.py)
    terminated   True after T steps; never truncated
    info         {"iou": current IoU, "hit": bool, "label": SRM label of the point, "step": t}

env_config keys (all optional except ``store``; defaults: ``config.EnvConfig``):
    store          path of an embedding store (``alignsam embed``)
    store_actor    name of a published store (``store.loader.publish_store``): workers then read the
                   arrays zero-copy from the object store instead of opening the Parquet files
    split          "train" | "test"
    grid / patch_size / resize      the patch grid (``PatchGrid.from_config``)
    horizon        T (paper 15)          obs_res  R, the pooled observation side
    state          "probability" (paper: E_I(x) times SAM's previous probability map) | "binary"
    reward         "hit" (paper) | "iou_gain" | "iou_gain_hit";  iou_gain_weight: w of the last
    holdout        k: the split's last k images (``holdout_split``) are kept out of training episodes
                   (a validation split for model selection); 0 = use every image
    init           "gt" (training) | "srm" (evaluation)
    labels         "srm" | "gt" (oracle) | "positive" (w/o SRM ablation)
    srm_branch     "implicit" | "explicit";  text_map: the store's map column for the explicit branch
    collect_srm_samples   keep (state, ground truth) pairs for the SRM trainer
    torch_threads  torch threads in this process (default: 1 inside Ray actors, e.g. EnvRunners)
    seed           seeds image and start-point sampling (RLlib also reseeds through reset(seed=...))

``make_env(config)`` is what RLlib gets: with ``num_envs`` in the config (RLlib's
``gym_env_vectorize_mode="vector_entry_point"``) it builds ``AlignSamVectorEnv``, whose k
slots share one batched decoder call per step. The SRM of a training env starts random; the
algorithm (``agent.algorithm.AlignSamPPO``) sends it the run's weights (``set_srm_weights``) and
collects its samples (``pop_srm_samples``), on every EnvRunner, restarted ones included.
"""
from __future__ import annotations

import io
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from ..agent.srm import SRM, set_srm_state
from ..config import EnvConfig
from ..foundation.decoder import load_prompt_decoder
from ..store.loader import DECODER_KEY, EmbeddingStore, fetch_store
from .episodes import PromptEpisodes, holdout_split
from .grid import PatchGrid

OBS_BOUND = float(np.finfo(np.float16).max)  # the observation is float16: its whole finite range

ENV_DEFAULTS = asdict(EnvConfig())  # one schema with the run config (config.py)


def _resolve(config) -> EnvConfig:
    unknown = set(config) - set(ENV_DEFAULTS) - {"num_envs"}
    if unknown:
        raise ValueError(f"unknown env_config key(s) {sorted(unknown)}; known: {sorted(ENV_DEFAULTS)}")
    cfg = EnvConfig(**{k: v for k, v in dict(config).items() if k != "num_envs"})
    if not cfg.store:
        raise ValueError("env_config needs 'store' (the path of an embedding store)")
    if cfg.torch_threads or _in_ray_worker():
        torch.set_num_threads(int(cfg.torch_threads or 1))
    return cfg


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _build_episodes(cfg: EnvConfig, num_slots: int) -> PromptEpisodes:
    if cfg.store_actor:  # published by the driver: this node needs no access to the store
        data = fetch_store(cfg.store_actor)
        decoder_file = data.pop(DECODER_KEY).tobytes()
    else:
        store = EmbeddingStore(cfg.store)
        data, decoder_file = store.arrays(cfg.split), store.decoder_bytes()
    decoder = load_prompt_decoder(io.BytesIO(decoder_file))
    grid = PatchGrid.from_env(cfg)
    srm = SRM(data["embeddings"].shape[1], cfg.srm_branch)
    srm.eval()
    text_map = cfg.text_map if cfg.srm_branch == "explicit" else None
    if cfg.srm_branch == "explicit" and not text_map:
        raise ValueError("srm_branch 'explicit' needs text_map (the name of the store's per-image map column)")
    pool, _ = holdout_split(len(data["ids"]), int(cfg.holdout))
    episodes = PromptEpisodes(data=data, decoder=decoder, grid=grid, num_slots=num_slots, horizon=cfg.horizon,
                              obs_res=cfg.obs_res, init=cfg.init, labels=cfg.labels, state=cfg.state,
                              reward=cfg.reward, iou_gain_weight=cfg.iou_gain_weight, srm=srm, text_map=text_map,
                              seed=cfg.seed, pool=pool)
    episodes.collect_srm_samples = bool(cfg.collect_srm_samples)
    return episodes


def _spaces(ep: PromptEpisodes) -> tuple[gym.spaces.Dict, gym.spaces.Discrete]:
    obs = gym.spaces.Dict({
        "obs": gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (ep.embed_dim, ep.obs_res, ep.obs_res), np.float16),
        "action_mask": gym.spaces.Box(0.0, 1.0, (ep.grid.n,), np.float32),
        "step": gym.spaces.Box(0.0, 1.0, (1,), np.float32),
    })
    return obs, gym.spaces.Discrete(ep.grid.n)


class AlignSamEnv(gym.Env):
    """One image per episode (see module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, config=None):
        self.config = _resolve(config or {})
        self.episodes = _build_episodes(self.config, 1)
        self.observation_space, self.action_space = _spaces(self.episodes)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.episodes.rng = np.random.default_rng(seed)
        image = None if options is None else options.get("image")
        self.episodes.reset([0], None if image is None else [image])
        return self._obs(), {"iou": float(self.episodes.iou[0]), "step": 0}

    def step(self, action):
        r = self.episodes.step([int(action)])
        info = {"iou": float(r.iou[0]), "hit": bool(r.hit[0]), "label": int(r.label[0]),
                "step": int(self.episodes.t[0])}
        return self._obs(), float(r.reward[0]), bool(r.terminated[0]), False, info

    def _obs(self) -> dict:
        ep = self.episodes
        return {"obs": ep.obs[0].copy(), "action_mask": ep.action_mask()[0], "step": ep.step_fraction()[0]}


class AlignSamVectorEnv(VectorEnv):
    """k episodes stepped together, one batched SAM decoder call per step (NEXT_STEP autoreset:
    the step after an episode ends resets that slot, ignores its action and returns reward 0)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, config=None, num_envs: int = 1):
        self.config = _resolve(config or {})
        self.num_envs = int(num_envs)
        self.episodes = _build_episodes(self.config, self.num_envs)
        self.single_observation_space, self.single_action_space = _spaces(self.episodes)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._needs_reset = np.zeros(self.num_envs, bool)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.episodes.rng = np.random.default_rng(seed if isinstance(seed, int) else seed[0])
        self.episodes.reset(np.arange(self.num_envs))
        self._needs_reset[:] = False
        return self._obs(), {"iou": self.episodes.iou.copy(), "step": np.zeros(self.num_envs, np.int64)}

    def step(self, actions):
        actions = np.asarray(actions, np.int64).copy()
        ep = self.episodes
        done_before = self._needs_reset.copy()
        # slots that ended last step are reset now; give them any legal dummy action for the
        # batched step and overwrite their results below
        if done_before.any():
            ep.reset(np.flatnonzero(done_before))
        actions[done_before] = ep.action_mask()[done_before].argmax(1)
        # Reset slots must not advance: step the running ones only (batched over all slots).
        running = ~done_before
        reward = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        iou = ep.iou.copy()
        hit = np.zeros(self.num_envs, bool)
        label = np.zeros(self.num_envs, np.int64)
        if running.any():
            r = ep.step(actions, slots=np.flatnonzero(running))
            reward[running], terminated[running] = r.reward, r.terminated
            iou[running], hit[running], label[running] = r.iou, r.hit, r.label
        self._needs_reset = terminated.copy()
        infos = {"iou": iou, "hit": hit, "_hit": running, "label": label, "_label": running, "step": ep.t.copy()}
        return self._obs(), reward, terminated, np.zeros(self.num_envs, bool), infos

    def _obs(self) -> dict:
        ep = self.episodes
        return {"obs": ep.obs.copy(), "action_mask": ep.action_mask(), "step": ep.step_fraction()}


def make_env(config):
    """RLlib's env creator: a vector env when RLlib asks for ``num_envs`` (vector_entry_point)."""
    if config is not None and "num_envs" in config:
        return AlignSamVectorEnv(config, int(config["num_envs"]))
    return AlignSamEnv(config)


def iter_prompt_episodes(env) -> list[PromptEpisodes]:
    """Every ``PromptEpisodes`` inside an EnvRunner's env (vector, sync-vectorised or single)."""
    env = getattr(env, "unwrapped", env)
    if isinstance(env, (AlignSamEnv, AlignSamVectorEnv)):
        return [env.episodes]
    return [e for sub in getattr(env, "envs", []) for e in iter_prompt_episodes(sub)]


def pop_srm_samples(env_runner) -> list:
    """On an EnvRunner: the (state, text state, target) samples its envs collected since the last call."""
    return [s for ep in iter_prompt_episodes(env_runner.env) for s in ep.pop_srm_samples()]


def set_srm_weights(env_runner, weights: dict) -> int:
    """On an EnvRunner: load SRM weights (numpy arrays) into every env; returns how many envs got them."""
    eps = iter_prompt_episodes(env_runner.env)
    for ep in eps:
        set_srm_state(ep.srm, weights)
    return len(eps)

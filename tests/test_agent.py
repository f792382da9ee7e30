"""SRM, the actor-critic RLModule and the run config."""
from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from alignsam_ray.agent.rl_module import AlignSamActorCritic
from alignsam_ray.agent.srm import SRM, SrmTrainer, srm_loss
from alignsam_ray.config import ConfigError, load_config, parse_overrides


@pytest.mark.parametrize("branch", ["implicit", "explicit"])
def test_srm_shapes(branch):
    srm = SRM(64, branch)
    s = torch.randn(3, 64, 12, 12)
    out = srm(s, s if branch == "explicit" else None)
    assert out.shape == (3, 12, 12)
    assert srm.probability(s, s if branch == "explicit" else None).shape == (3, 12, 12)
    if branch == "explicit":
        with pytest.raises(ValueError, match="s_c"):
            srm(s)


def test_srm_loss_values():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    good, _ = srm_loss(torch.where(target > 0, 10.0, -10.0), target)
    bad, _ = srm_loss(torch.where(target > 0, -10.0, 10.0), target)
    assert good.item() < 0.01 and bad.item() > 5


def test_srm_trainer_learns_a_rule():
    """Foreground = positive first channel: q updates drive the loss down and accuracy up."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(64):
        s = rng.standard_normal((8, 8, 8)).astype(np.float16)
        samples.append((s, None, (s[0] > 0).astype(np.float16)))
    trainer = SrmTrainer(embed_dim=8, branch="implicit", lr=3e-3, q=30, batch_size=32, seed=0, bf16=False)
    assert trainer.q == 30
    first = trainer.update(samples)
    assert trainer.updates == 30 * 2  # q epochs of 64 / 32 minibatches
    second = trainer.update(samples)
    assert second["srm_loss"] < first["srm_loss"] and second["srm_pixel_acc"] > 0.9
    paper = {"embed_dim": 8, "lr": 1e-4, "q": None, "batch_size": 64, "seed": 0, "bf16": False}
    assert SrmTrainer(branch="explicit", **paper).q == 5 and SrmTrainer(branch="implicit", **paper).q == 1


def test_srm_trainer_state_resumes_exactly():
    """get_state / set_state (the SRM's part of AlignSamPPO's checkpoint): a trainer restored from it makes
    the same next update as the one that went on (weights, Adam moments and minibatch order)."""
    rng = np.random.default_rng(0)
    samples = [(s, None, (s[0] > 0).astype(np.float16))
               for s in (rng.standard_normal((8, 8, 8)).astype(np.float16) for _ in range(40))]
    settings = {"embed_dim": 8, "branch": "implicit", "lr": 3e-3, "q": 2, "batch_size": 16, "bf16": False}
    trainer = SrmTrainer(seed=0, **settings)
    trainer.update(samples)
    restored = SrmTrainer(seed=1, **settings)  # other initial weights and stream
    restored.set_state(pickle.loads(pickle.dumps(trainer.get_state())))
    a, b = trainer.update(samples), restored.update(samples)
    assert a == b and restored.updates == trainer.updates
    for k, v in trainer.srm.state_dict().items():
        assert torch.equal(v, restored.srm.state_dict()[k]), k


def _module(grid=(10, 10), embed=16, res=8, time_input=True, precision="fp32"):
    obs = gym.spaces.Dict({"obs": gym.spaces.Box(-1e4, 1e4, (embed, res, res), np.float16),
                           "action_mask": gym.spaces.Box(0.0, 1.0, (grid[0] * grid[1],), np.float32),
                           "step": gym.spaces.Box(0.0, 1.0, (1,), np.float32)})
    return AlignSamActorCritic(observation_space=obs, action_space=gym.spaces.Discrete(grid[0] * grid[1]),
                               model_config={"grid": list(grid), "width": 16, "time_input": time_input,
                                             "precision": precision})


def _batch(n_actions, steps):
    torch.manual_seed(0)
    obs = torch.randn(1, 16, 8, 8).half().expand(len(steps), -1, -1, -1)  # one state at several times
    return {Columns.OBS: {"obs": obs, "action_mask": torch.ones(len(steps), n_actions),
                          "step": torch.tensor(steps, dtype=torch.float32)[:, None]}}


@pytest.mark.parametrize("grid", [(10, 10), (8, 8), (16, 16), (6, 9)])
def test_module_shapes_and_masking(grid):
    m = _module(grid)
    n = grid[0] * grid[1]
    mask = torch.ones(4, n)
    mask[:, :3] = 0
    batch = {Columns.OBS: {"obs": torch.randn(4, 16, 8, 8).half(), "action_mask": mask, "step": torch.zeros(4, 1)}}
    out = m.forward_train(batch)
    logits = out[Columns.ACTION_DIST_INPUTS]
    assert logits.shape == (4, n) and (logits[:, :3] < -1e30).all()
    assert torch.isfinite(logits[:, 3:]).all()
    assert m.compute_values(batch, out[Columns.EMBEDDINGS]).shape == (4,)
    assert torch.allclose(m.compute_values(batch), m.compute_values(batch, out[Columns.EMBEDDINGS]))
    assert torch.equal(m.forward_inference(batch)[Columns.ACTION_DIST_INPUTS], logits)
    assert batch[Columns.OBS]["action_mask"][:, :3].eq(0).all()  # the batch is not mutated


def test_critic_sees_time_policy_does_not():
    """Episodes end after exactly T steps: the same state is worth less with fewer steps left, so the
    value head reads t / T; the policy's logits do not depend on it. time_input=False feeds 0 instead."""
    torch.manual_seed(0)
    m = _module()
    batch = _batch(100, [0.0, 0.5, 1.0])
    values = m.compute_values(batch).detach()
    assert values.diff().abs().min() > 1e-4  # one state, three times -> three values
    logits = m.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(logits[0], logits[1])
    torch.testing.assert_close(logits[0], logits[2])
    blind = _module(time_input=False).compute_values(batch).detach()
    assert blind.diff().abs().max() < 1e-6


def test_bf16_precision_trains_under_autocast_and_stays_close_to_fp32():
    """model.precision=bf16: the trunk runs under bfloat16 autocast in training and sampling (features
    come back float32, close to fp32's); evaluation/export (masked_logits) stay fp32. The SRM trainer's
    bf16 updates still learn. fp32 is the default; anything else is refused before Ray starts."""
    torch.manual_seed(0)
    fp32 = _module()
    bf16 = _module(precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    batch = _batch(100, [0.0, 0.5])
    a, b = fp32._features(batch), bf16._features(batch)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # computed in bfloat16 ...
    torch.testing.assert_close(b, a, atol=0.05, rtol=0.05)  # ... to bfloat16's precision
    obs, mask = batch[Columns.OBS]["obs"], batch[Columns.OBS]["action_mask"]
    torch.testing.assert_close(bf16.masked_logits(obs, mask), fp32.masked_logits(obs, mask))  # fp32 there
    rng = np.random.default_rng(0)
    samples = [(s, None, (s[0] > 0).astype(np.float16))
               for s in (rng.standard_normal((8, 8, 8)).astype(np.float16) for _ in range(64))]
    trainer = SrmTrainer(embed_dim=8, branch="implicit", lr=3e-3, q=30, batch_size=32, seed=0, bf16=True)
    first, second = trainer.update(samples), trainer.update(samples)
    assert second["srm_loss"] < first["srm_loss"] and second["srm_pixel_acc"] > 0.9
    assert load_config(None, ["store=somewhere"]).model.precision == "fp32"
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(None, ["store=somewhere", "model.precision=fp16"])


def test_one_typed_schema_every_key_checked_and_documented():
    """RunConfig is the one home of each key: DEFAULTS and CHECKS derive from it, the env's defaults from
    its env/srm sections, the sweep's from SweepConfig; each key is documented in docs/configuration.md."""
    from dataclasses import asdict
    from pathlib import Path

    from alignsam_ray.config import CHECKS, DEFAULTS, EnvConfig, RunConfig, SweepConfig, checks
    from alignsam_ray.env.alignsam_env import ENV_DEFAULTS
    from alignsam_ray.tune import SWEEP_DEFAULTS

    assert DEFAULTS == asdict(RunConfig()) and SWEEP_DEFAULTS == asdict(SweepConfig())
    sections = {f"{s}.{k}" for s, v in DEFAULTS.items() if isinstance(v, dict) for k in v}
    assert {key for key, _, _ in CHECKS} == sections - {"env.grid"}  # grid: checked with patch_size/resize
    assert {k for k, _, _ in checks(SweepConfig)} == set(SWEEP_DEFAULTS)
    env = asdict(EnvConfig())
    assert ENV_DEFAULTS == env and all(env[k] == DEFAULTS["env"][k] for k in DEFAULTS["env"])
    assert env["srm_branch"] == DEFAULTS["srm"]["branch"] and env["text_map"] == DEFAULTS["srm"]["text_map"]
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert [k for k in sorted(sections) if f"`{k}`" not in doc and f"{k}`" not in doc] == []


def test_paper_values_are_the_defaults():
    cfg = load_config(None, ["store=somewhere"])
    assert cfg.srm.lr == 1e-4 and cfg.ppo.lr == 1e-4  # Adam 1e-4 everywhere (paper)
    assert cfg.ppo.lambda_ == 1.0  # Eq. 6: the discounted return
    assert cfg.env.state == "probability" and cfg.model.time_input is True
    assert cfg.env.reward == "hit"  # +1 on foreground, -1 elsewhere
    assert (cfg.env.resize, cfg.env.patch_size, cfg.env.horizon) == (800, 80, 15)


def test_config_defaults_overrides_and_typos(tmp_path):
    cfg = load_config(None, ["store=somewhere", "ppo.lr=3e-4", "env.grid=[8,8]"])
    assert cfg.ppo.lr == 3e-4 and cfg.env.grid == [8, 8]
    assert (cfg.ppo.gamma, cfg.ppo.clip_param, cfg.ppo.num_epochs, cfg.env.horizon) == (0.99, 0.2, 20, 15)
    with pytest.raises(ConfigError, match="unknown config key 'ppo.learning_rate'"):
        load_config(None, ["store=x", "ppo.learning_rate=1"])
    with pytest.raises(ConfigError, match="needs 'store'"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["ppo.lr"])


def test_every_shipped_config_loads():
    import glob
    import os

    from alignsam_ray.data.samples import TASK_TEXT
    from alignsam_ray.store.embed import map_name
    from alignsam_ray.tune import load_sweep

    paths = glob.glob(os.path.join(os.path.dirname(__file__), "..", "tune_configs", "*.yaml"))
    tasks = {os.path.basename(p)[:-5] for p in paths}
    assert {"blur", "shadow", "glass", "saliency", "voc"} <= tasks
    assert {f"synthetic_{t}" for t in ("blur", "shadow", "glass", "saliency", "shapes")} <= tasks
    for p in paths:
        if os.path.basename(p).startswith("sweep_"):  # sweep files: tests/test_tune.py
            sweep = load_sweep(p)
            assert set(sweep["task_configs"]) and sweep["search"]
            continue
        cfg = load_config(p)
        assert cfg.ppo.num_epochs == 20 and cfg.store and cfg.srm.branch in ("implicit", "explicit")
        if cfg.srm.branch == "explicit":
            assert cfg.srm.text_map
            if cfg.task in TASK_TEXT:   # the column `alignsam embed --clip-model ...` writes for the task's text
                assert cfg.srm.text_map == map_name(TASK_TEXT[cfg.task]), p

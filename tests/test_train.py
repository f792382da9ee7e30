"""Training on real RLlib (local Ray, one remote EnvRunner), checkpoint/resume, evaluation."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import ray
import torch
import yaml
from ray.rllib.core.rl_module.rl_module import RLModule

from alignsam_ray.checkpoint import MODULE_SUBDIR, checkpoint_srm
from alignsam_ray.cli import main as cli_main
from alignsam_ray.config import load_config, parse_overrides
from alignsam_ray.train import Trainer, checkpoints

TINY = ["env.horizon=3", "env.obs_res=8", "model.width=16", "ppo.train_batch_size=48", "ppo.minibatch_size=24",
        "ppo.num_epochs=2", "train.checkpoint_every=1", "resources.sample_timeout_s=300"]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _weights(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _runner_weights(algo) -> list[dict]:
    return algo.env_runner_group.foreach_env_runner(
        lambda r: {k: v.detach().cpu().clone() for k, v in r.module.state_dict().items()}, local_env_runner=False)


def test_train_checkpoint_resume_and_evaluate(blur_store, tmp_path):
    run = tmp_path / "run"
    # 1) the CLI trains one iteration and writes a checkpoint
    assert cli_main(["train", "--config", _yaml(tmp_path, blur_store, run), "--quiet", "train.iterations=1"]) == 0
    ckpts = checkpoints(str(run))
    assert [os.path.basename(c) for c in ckpts] == ["iter_000001"]
    for part in ("algo", "config.yaml", "state.json"):
        assert os.path.exists(os.path.join(ckpts[0], part))
    assert not os.path.exists(os.path.join(ckpts[0], "srm.pt"))  # the SRM is in the algorithm's state
    assert len(open(run / "progress.csv").read().splitlines()) == 2  # header + 1 iteration
    row = next(csv.DictReader(open(run / "progress.csv")))
    sample_s, learn_s, iter_s = (float(row[k]) for k in ("sample_s", "learn_s", "iter_s"))
    assert 0 < sample_s and 0 < learn_s and sample_s + learn_s <= iter_s  # this iteration's own seconds
    assert os.listdir(run / "tb")

    # 2) --resume continues the iteration count; EnvRunners get the restored (trained) weights
    cfg = load_config(str(tmp_path / "run.yaml"), TINY + ["train.iterations=2"])
    saved_state = json.load(open(os.path.join(ckpts[0], "state.json")))
    fresh = Trainer(cfg)  # not resumed: initial weights
    w0, fresh_srm = _weights(fresh.algo.get_module()), _weights(fresh.algo.srm.srm)
    fresh.stop()
    trainer = Trainer(cfg, resume=True, progress=False)
    assert trainer.iteration == 1 and trainer.env_steps == saved_state["env_steps"]  # exact resume: the count ...
    learner = _weights(trainer.algo.get_module())
    assert any(not torch.equal(learner[k], w0[k]) for k in w0)  # restored, not fresh
    saved_policy = _weights(RLModule.from_checkpoint(os.path.join(ckpts[0], MODULE_SUBDIR)))
    assert learner.keys() == saved_policy.keys() and all(torch.equal(learner[k], saved_policy[k]) for k in learner)
    saved_srm = checkpoint_srm(ckpts[0]).state_dict()  # ... the policy and the SRM as saved
    srm = trainer.algo.srm.srm.state_dict()
    assert any(not torch.equal(saved_srm[k], fresh_srm[k]) for k in fresh_srm)  # the SRM trained in iteration 1
    assert all(torch.equal(srm[k], saved_srm[k]) for k in saved_srm)
    for runner in _runner_weights(trainer.algo):
        for k, v in runner.items():
            assert torch.equal(v, learner[k]), f"EnvRunner weight {k} is stale after restore"
    for runner in _runner_srm(trainer.algo):
        assert all(torch.equal(runner[k], saved_srm[k]) for k in saved_srm)  # SRM weights reached the runners
    result = trainer.run()
    trainer.stop()
    assert result["iteration"] == 2 and os.path.basename(result["checkpoint"]) == "iter_000002"
    state = json.load(open(os.path.join(result["checkpoint"], "state.json")))
    assert state["iteration"] == 2 and state["env_steps"] >= 96
    assert np.isfinite(result["hit_rate"]) and 0 <= result["final_iou"] <= 1

    # 3) evaluation: all methods, the T sweep, report and figures
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--checkpoint", str(run), "--store", blur_store, "--out", str(out), "--figures", "2"]) == 0
    m = json.load(open(out / "metrics.json"))
    assert m["n_images"] == 6 and m["horizon"] == 3
    methods = {"alignsam", "random_actions", "all_positive", "srm_start_positive", "single_step", "srm_topk",
               "gt_labels", "persam", "persam_mean"}  # clip_points: skipped, the blur store has no CLIP map
    assert set(m["methods"]) == methods and set(m["paired"]) == methods - {"alignsam"}
    assert set(m["skipped"]) == {"clip_points", "sam3_text"}  # sam3_text: SAM 3 stores only
    assert set(m["t_sweep"]) == {"1", "5", "10", "15", "20"}
    for scores in list(m["methods"].values()) + list(m["t_sweep"].values()):
        for key in ("miou", "iou_dataset", "fbeta", "emeasure", "mae", "hit_rate", "label_accuracy"):
            assert 0.0 <= scores[key] <= 1.0 + 1e-3  # E_phi divides by N - 1, as the MATLAB reference
        for key in ("ber", "ber_per_image"):
            assert 0.0 <= scores[key] <= 100.0  # percent
        for key, (lo, hi) in scores["ci95"].items():  # 95% bootstrap interval around each value
            assert lo <= scores[key] + 1e-9 and scores[key] <= hi + 1e-9, key
    for name, diffs in m["paired"].items():  # paired differences alignsam - method, same images
        d = diffs["miou"]
        assert d["diff"] == pytest.approx(m["methods"]["alignsam"]["miou"] - m["methods"][name]["miou"])
        assert d["ci95"][0] <= d["diff"] + 1e-9 <= d["ci95"][1] + 2e-9
    assert m["methods"]["gt_labels"]["label_accuracy"] == 1.0  # oracle labels always match the ground truth
    for name in ("all_positive", "srm_start_positive"):
        positive = m["methods"][name]
        assert positive["label_accuracy"] == pytest.approx(positive["hit_rate"])  # all labels 1: right exactly on hits
    assert m["methods"]["single_step"]["miou"] == m["t_sweep"]["1"]["miou"]
    report = (out / "report.md").read_text()
    assert "| alignsam |" in report and "Table 5" in report and "Paired differences" in report
    assert "oracle labels" in report and "upper bound" not in report
    assert len(os.listdir(out / "figures")) == 2

    # 4) w/o SRM means no SRM anywhere: a centre start, every point positive, the SRM never runs
    from alignsam_ray.evaluate import Agent, rollout
    from alignsam_ray.store.loader import EmbeddingStore

    agent = Agent.load(str(run))
    legacy = _legacy_checkpoint(checkpoints(str(run))[-1], tmp_path / "legacy")  # the layout before AlignSamPPO
    assert all(torch.equal(v, agent.srm.state_dict()[k]) for k, v in Agent.load(legacy).srm.state_dict().items())
    agent.srm.forward = lambda *a, **k: pytest.fail("the SRM ran in the w/o-SRM rollout")
    st = EmbeddingStore(blur_store)
    r = rollout(agent, st.arrays("test"), st.decoder(), actions="policy", init="centre", labels="positive", horizon=3,
                record=(3,))
    assert all(len(labels) == 4 and (labels == 1).all() for _, labels in r.points[3])


def _runner_srm(algo) -> list[dict]:
    from alignsam_ray.env import iter_prompt_episodes

    return algo.env_runner_group.foreach_env_runner(
        lambda r: {k: v.clone() for k, v in iter_prompt_episodes(r.env)[0].srm.state_dict().items()},
        local_env_runner=False)


def _legacy_checkpoint(ckpt: str, out) -> str:
    """A copy of ``ckpt`` in the layout written before AlignSamPPO: the SRM trainer's state in an srm.pt
    beside algo/ (weights, optimiser, update count) and not in the algorithm's state."""
    import pickle
    import shutil

    from alignsam_ray.checkpoint import ALGO_STATE

    shutil.copytree(ckpt, out)
    state = pickle.load(open(out / ALGO_STATE, "rb"))
    srm = state.pop("srm")
    pickle.dump(state, open(out / ALGO_STATE, "wb"))
    torch.save({"branch": srm["branch"], "embed_dim": srm["embed_dim"],
                "state_dict": {k: torch.from_numpy(v) for k, v in srm["weights"].items()},
                "optimizer": srm["optimizer"], "updates": srm["updates"]}, out / "srm.pt")
    return str(out)


def _yaml(tmp_path, store, run) -> str:
    """A run config file holding the TINY settings (written as a user would)."""
    cfg = {"task": "synthetic_blur", "store": store, "run_dir": str(run), **parse_overrides(TINY)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_learning_direction(tmp_path):
    """A small PPO budget on the synthetic saliency task: the trained policy's hit rate (share of
    picked points on the object) clearly exceeds the untrained policy's, on held-out images."""
    from alignsam_ray.data import generate_task, open_dataset
    from alignsam_ray.evaluate import Agent, rollout
    from alignsam_ray.store.embed import embed_dataset
    from alignsam_ray.store.loader import EmbeddingStore

    folder = generate_task("synthetic_saliency", str(tmp_path / "data"), n_train=50, n_test=30, seed=0, progress=False)
    store = str(tmp_path / "store")
    embed_dataset(open_dataset(folder, n_train=None), store, sam_type="micro", dataset_spec=folder, progress=False)
    cfg = load_config(None, {"store": store, "run_dir": str(tmp_path / "run"),
                             "train": {"iterations": 6, "checkpoint_every": 6},
                             "resources": {"num_env_runners": 2}})
    trainer = Trainer(cfg, progress=False)
    trainer.save()  # iteration 0: the untrained policy
    trainer.run()
    trainer.stop()
    st = EmbeddingStore(store)
    data, decoder = st.arrays("test"), st.decoder()
    hit = {}
    for name in ("iter_000000", "iter_000006"):
        agent = Agent.load(str(tmp_path / "run" / "checkpoints" / name))
        hit[name] = rollout(agent, data, decoder, actions="policy", labels="gt", horizon=15, record=(15,)).hits.mean()
    assert hit["iter_000006"] > hit["iter_000000"] + 0.1, hit

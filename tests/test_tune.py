"""`alignsam tune`: sweep files, the resource check, a real (tiny) Tune sweep, its summary and restore."""
from __future__ import annotations

import csv
import glob
import os

import pytest
import ray
import yaml

from alignsam_ray.cli import main as cli_main
from alignsam_ray.config import ConfigError
from alignsam_ray.train import check_cluster_fits
from alignsam_ray.tune import load_sweep, param_space

TINY = {"env.horizon": 3, "env.obs_res": 8, "model.width": 16, "ppo.train_batch_size": 48, "ppo.minibatch_size": 24,
        "ppo.num_epochs": 2, "train.iterations": 1, "train.checkpoint_every": 1, "resources.num_env_runners": 1}


def _sweep(tmp_path, blur_store, **extra) -> str:
    base = tmp_path / "synthetic_blur.yaml"
    base.write_text(yaml.safe_dump({"task": "synthetic_blur", "store": blur_store}))
    sweep = {"name": "t", "storage": str(tmp_path / "results"), "tasks": [str(base)], "overrides": TINY,
             "search": {"env.grid": {"grid": [8, 10]}}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_sweep_file_errors(tmp_path, blur_store):
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep(_sweep(tmp_path, blur_store, searh={}))
    with pytest.raises(ConfigError, match="not a run config key"):
        load_sweep(_sweep(tmp_path, blur_store, search={"ppo.gama": {"grid": [0.9]}}))
    with pytest.raises(ConfigError, match="metric"):
        load_sweep(_sweep(tmp_path, blur_store, metric="accuracy"))
    with pytest.raises(ConfigError, match="validation split"):  # training-episode metrics never select a trial
        load_sweep(_sweep(tmp_path, blur_store, metric="final_iou"))
    with pytest.raises(ConfigError, match="val_images"):
        load_sweep(_sweep(tmp_path, blur_store, val_images=0))
    with pytest.raises(ConfigError, match="unknown kind"):
        param_space(load_sweep(_sweep(tmp_path, blur_store, search={"ppo.gamma": {"normal": [0.9, 1]}})))
    with pytest.raises(ConfigError, match="not key=value"):
        load_sweep(_sweep(tmp_path, blur_store), ["storage"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ntasks: [a.yaml\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_sweep(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_sweep(str(bad))


def test_command_line_keys_and_store_root(tmp_path, blur_store):
    """`alignsam tune --config S storage=... store_root=...`: what a cluster run sets on the command line."""
    sweep = load_sweep(_sweep(tmp_path, blur_store), ["storage=/mnt/shared/sweeps", "store_root=s3://bucket/stores/"])
    assert sweep["storage"] == "/mnt/shared/sweeps"
    assert sweep["task_configs"]["synthetic_blur"].store == "s3://bucket/stores/synthetic_blur"
    local = load_sweep(_sweep(tmp_path, blur_store), [f"store_root={os.path.dirname(blur_store)}"])
    assert local["task_configs"]["synthetic_blur"].store == os.path.join(os.path.dirname(blur_store), "synthetic_blur")


def test_trials_that_cannot_fit_are_refused(tmp_path, blur_store):
    sweep = load_sweep(_sweep(tmp_path, blur_store))
    sweep["task_configs"]["synthetic_blur"].resources.num_env_runners = 4
    sweep["task_configs"]["synthetic_blur"].resources.num_cpus_per_env_runner = 1
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(ConfigError, match="a synthetic_blur trial: resources.num_env_runners=4 .* do not fit .*"
                                              "2 CPUs on 1 node.*room for 1 such EnvRunners beside the learner"):
            check_cluster_fits({f"a {t} trial": c for t, c in sweep["task_configs"].items()}, trial=True)
        two = sweep["task_configs"]["synthetic_blur"]
        two.resources.num_env_runners = 2  # 2 x 1 CPU fit 2 CPUs as `alignsam train` (learner in the driver) ...
        check_cluster_fits({"this run": two}, trial=False)
        with pytest.raises(ConfigError, match="room for 1 such EnvRunners beside the learner"):  # ... not as a trial
            check_cluster_fits({"a trial": two}, trial=True)
        two.resources.num_gpus_per_learner = 1  # a GPU learner on a CPU-only cluster: refused, not PENDING forever
        with pytest.raises(ConfigError, match="its learner .*1 GPU.* fits on no node"):
            check_cluster_fits({"a trial": two}, trial=True)

    finally:
        ray.shutdown()


def test_tiny_sweep_writes_best_per_task_and_restores(tmp_path, blur_store):
    path = _sweep(tmp_path, blur_store, val_images=2)
    assert load_sweep(path)["task_configs"]["synthetic_blur"].train.val_images == 2
    assert cli_main(["tune", "--config", path, "--quiet"]) == 0
    out = tmp_path / "results" / "t"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert sorted(r["env.grid"] for r in rows) == ["10", "8"] and all(r["status"] == "ok" for r in rows)
    best = list(csv.DictReader(open(out / "best_per_task.csv")))
    assert [b["task"] for b in best] == ["synthetic_blur"]
    # selected on the held-out validation images with the paper's protocol, not on training episodes
    assert float(best[0]["val_miou"]) == max(float(r["val_miou"]) for r in rows)
    assert all(0.0 <= float(r["val_miou"]) <= 1.0 for r in rows)
    assert "| synthetic_blur |" in (out / "best_per_task.md").read_text() and (out / "sweep.png").stat().st_size > 0
    # every trial ran `alignsam train`'s loop in its own folder (checkpoint, progress.csv) and reported the
    # checkpoint to Tune, which keeps its own copy (a ResultGrid's result.checkpoint)
    assert len(glob.glob(str(out / "*" / "run" / "checkpoints" / "iter_000001"))) == 2
    assert len(glob.glob(str(out / "*" / "run" / "progress.csv"))) == 2
    tune_copies = glob.glob(str(out / "*" / "checkpoint_000000"))
    assert len(tune_copies) == 2 and all(os.path.isdir(os.path.join(c, "algo")) for c in tune_copies)
    # --resume restores the (finished) sweep through Tuner.restore and rewrites the same summary
    assert cli_main(["tune", "--config", path, "--quiet", "--resume"]) == 0
    assert len(list(csv.DictReader(open(out / "trials.csv")))) == 2

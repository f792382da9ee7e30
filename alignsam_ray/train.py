"""PPO training of the AlignSAM agent (RLlib new API stack) with the SRM trained alongside.

    alignsam train --config tune_configs/synthetic_blur.yaml [KEY=VALUE ...] [--resume]

One iteration = one ``AlignSamPPO.train()`` (agent/algorithm.py): EnvRunners sample
``train_batch_size`` env steps on CPU, the learner runs K epochs (on GPU when there is one), then q
SRM updates on the (state, ground truth) pairs the EnvRunners collected, then the new SRM weights go
to every EnvRunner. The algorithm owns the SRM: its checkpoint (algo/) holds it. ``Trainer`` keeps
the run folder, the logs and the loop. The store is published once to the object store; EnvRunners
read it zero-copy.

run_dir/
    config.yaml                     the resolved config of the run
    progress.csv                    one row per iteration
    tb/                             TensorBoard scalars
    checkpoints/iter_000010/        algo/ (RLlib checkpoint: policy, optimisers, SRM), config.yaml,
                                    state.json (a record: iteration, env steps, task, store, SAM)
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time

import numpy as np
import ray
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    TIMERS,
)
from ray.tune.registry import register_env

from . import ray_session
from .agent.algorithm import RESULTS, SRM_STATE, AlignSamPPOConfig
from .agent.callbacks import AlignSamMetrics
from .agent.rl_module import AlignSamActorCritic
from .checkpoint import CHECKPOINTS, checkpoints, legacy_srm_state, resolve_checkpoint
from .config import ConfigError, RunConfig, env_config, save_config, validate
from .env.alignsam_env import make_env
from .env.grid import PatchGrid
from .store.loader import EmbeddingStore, publish_store

ENV_NAME = "alignsam"

PROGRESS_KEYS = ("iteration", "env_steps", "episode_return", "hit_rate", "final_iou", "label_accuracy",
                 "srm_loss", "srm_pixel_acc", "env_steps_per_s", "sample_s", "learn_s", "srm_s", "iter_s")


def _csv_header(path: str) -> list[str]:
    """The columns of an existing progress.csv (a run resumed from an older version keeps its own)."""
    with open(path, newline="") as f:
        return next(csv.reader(f), None) or list(PROGRESS_KEYS)


def init_ray(**kwargs) -> None:
    """Connect to RAY_ADDRESS (a cluster, `ray job submit`) or start a local Ray."""
    ray_session.init_ray(logging_level="WARNING", **kwargs)


def num_gpus(cfg: RunConfig) -> float:
    """The learner's GPUs: "auto" = 1 when the Ray cluster has a GPU (connected), else when this
    machine has one (a driver on a CPU-only head node still gives its Tune trials a GPU node)."""
    g = cfg.resources.num_gpus_per_learner
    if g != "auto":
        return float(g)
    if ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 1 if torch.cuda.is_available() else 0


def run_bundles(cfg: RunConfig, *, trial: bool) -> list[dict]:
    """The resource bundles one run asks Ray for: one {"CPU": num_cpus_per_env_runner} per EnvRunner, led by the
    learner's ({"CPU": 1} + its GPUs) when the run is a Tune trial (`alignsam train` runs the learner in its
    driver process, which asks Ray for nothing)."""
    r = cfg.resources
    runners = [{"CPU": float(r.num_cpus_per_env_runner)}] * int(r.num_env_runners)
    if not trial:
        return runners
    learner = {"CPU": 1.0}
    gpus = num_gpus(cfg)
    if gpus:
        learner["GPU"] = float(gpus)
    return [learner] + runners


def _runner_room(nodes: list[dict], per: float, learner: dict | None) -> int:
    """How many EnvRunners of ``per`` CPUs the live ``nodes`` (their resources) hold, the learner's bundle placed
    first on the node where it leaves the most room; -1 when the learner fits on no node."""
    def room(free: list[dict]) -> int:
        return sum(int(node.get("CPU", 0.0) / per + 1e-9) for node in free) if per > 0 else 1 << 30

    if learner is None:
        return room(nodes)
    best = -1
    for i, node in enumerate(nodes):
        if all(node.get(k, 0.0) + 1e-9 >= v for k, v in learner.items()):
            free = [dict(n) for n in nodes]
            free[i] = {k: v - learner.get(k, 0.0) for k, v in node.items()}
            best = max(best, room(free))
    return best


def check_cluster_fits(configs: dict[str, RunConfig], *, trial: bool) -> None:
    """Refuse a run this Ray cluster can never place (RLlib or Tune would wait for its resources forever,
    silently): every bundle of ``run_bundles`` must fit on one live node. ``configs``: what to call the run in
    the message ("this run", "a synthetic_blur trial") -> its config; ``trial``: each is a Tune trial."""
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    have = f"{cpus:g} CPUs{f', {gpus:g} GPUs' if gpus else ''} on {len(nodes)} node(s)"
    for name, cfg in configs.items():
        bundles = run_bundles(cfg, trial=trial)
        learner = bundles[0] if trial else None
        n, per = cfg.resources.num_env_runners, float(cfg.resources.num_cpus_per_env_runner)
        hosts = _runner_room(nodes, per, learner)
        if hosts < 0:
            raise ConfigError(f"{name}: its learner ({', '.join(f'{v:g} {k}' for k, v in learner.items())}) fits on "
                              f"no node of this Ray cluster ({have}); set resources.num_gpus_per_learner=0 or add "
                              "a node that has them")
        if hosts < n:
            beside = " beside the learner (1 CPU)" if trial else ""
            spare = max(cpus - (1.0 if trial else 0.0), 0.0)
            raise ConfigError(
                f"{name}: resources.num_env_runners={n} x resources.num_cpus_per_env_runner={per:g} CPU do not fit "
                f"this Ray cluster ({have}: room for {hosts} such EnvRunners{beside}); lower "
                f"resources.num_env_runners (e.g. {hosts}) or resources.num_cpus_per_env_runner "
                f"(e.g. {spare / n:.2g}), or add nodes")


def build_ppo_config(cfg: RunConfig, *, embed_dim: int, store_actor: str | None = None) -> AlignSamPPOConfig:
    """The RLlib config of a run config (paper hyperparameters set explicitly); ``embed_dim``: the store's
    SAM embedding width (the SRM's input channels)."""
    register_env(ENV_NAME, make_env)
    p, r, s = cfg.ppo, cfg.resources, cfg.srm
    grid = PatchGrid.from_env(cfg.env)
    return (
        AlignSamPPOConfig()
        .environment(ENV_NAME, env_config=env_config(cfg, store_actor=store_actor, split="train", init="gt",
                                                     labels="srm", collect_srm_samples=True,
                                                     holdout=cfg.train.val_images, seed=cfg.train.seed))
        .env_runners(num_env_runners=r.num_env_runners, num_envs_per_env_runner=r.num_envs_per_env_runner,
                     num_cpus_per_env_runner=r.num_cpus_per_env_runner, sample_timeout_s=r.sample_timeout_s,
                     gym_env_vectorize_mode="vector_entry_point")
        .learners(num_learners=0, num_gpus_per_learner=num_gpus(cfg))
        .training(gamma=p.gamma, clip_param=p.clip_param, num_epochs=p.num_epochs, lr=p.lr,
                  lambda_=p.lambda_, entropy_coeff=p.entropy_coeff, vf_loss_coeff=p.vf_loss_coeff,
                  vf_clip_param=p.vf_clip_param, use_kl_loss=p.use_kl_loss,
                  train_batch_size_per_learner=p.train_batch_size, minibatch_size=p.minibatch_size,
                  grad_clip=p.grad_clip)
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=AlignSamActorCritic,
            model_config={"grid": [grid.rows, grid.cols], "width": cfg.model.width,
                          "time_input": cfg.model.time_input, "precision": cfg.model.precision}))
        .srm_training(embed_dim=embed_dim, branch=s.branch, lr=s.lr, q=s.q, batch_size=s.batch_size,
                      seed=cfg.train.seed, bf16=cfg.model.precision == "bf16")
        .callbacks(AlignSamMetrics)
        .fault_tolerance(restart_failed_env_runners=True)
        .debugging(seed=cfg.train.seed, log_level="WARN")
    )


def _scalar(d: dict, *keys, default=float("nan")):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return float(d) if np.isscalar(d) else default


def unsmoothed_timers(algo) -> None:
    """RLlib reports its sampling and learner timers as an EMA (coefficient 0.01), so after the first
    iteration they hardly move. Register them as the mean over a window of 1: each result then holds
    that iteration's own seconds (``progress.csv``'s sample_s and learn_s)."""
    for key in (ENV_RUNNER_SAMPLING_TIMER, LEARNER_UPDATE_TIMER):
        algo.metrics.log_value((TIMERS, key), float("nan"), reduce="mean", window=1)


class Trainer:
    """Owns the algorithm (``AlignSamPPO``: policy and SRM), the run folder, the logs and the loop."""

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg = validate(cfg)  # before Ray starts (tune trials come here with searched values too)
        self.progress = progress
        self.run_dir = cfg.run_dir
        store = EmbeddingStore(cfg.store, verify=False)
        n_train, k = store.manifest.get("counts", {}).get("train", 0), cfg.train.val_images
        if k >= n_train:
            raise ConfigError(f"train.val_images ({k}) must be smaller than the {n_train} training images of store "
                              f"{cfg.store!r} (the last k are held out for validation)")
        self.sam = {key: store.manifest.get(key) for key in ("sam_type", "checkpoint_sha256")}  # -> state.json
        init_ray()
        check_cluster_fits({"this run": cfg}, trial=False)
        self.store_actor = publish_store(cfg.store, "train")
        with ray_session.native_to_log():  # the EnvRunners' start (core worker notices) off the terminal
            self.algo = build_ppo_config(cfg, embed_dim=store.embed_dim, store_actor=self.store_actor).build_algo()
        unsmoothed_timers(self.algo)
        os.makedirs(self.run_dir, exist_ok=True)  # only once the run can start: a failed start leaves nothing
        save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self._val_set = None  # (arrays, ground truth, decoder) of the validation images, read on first use
        if resume:
            self._restore()

    @property
    def iteration(self) -> int:
        """Finished iterations (RLlib's count: restored with the checkpoint)."""
        return self.algo.training_iteration

    @property
    def env_steps(self) -> int:
        """Env steps sampled over the run (RLlib's lifetime count: restored with the checkpoint)."""
        return int(self.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))

    # ------------------------------------------------------------------ loop
    def train_iteration(self) -> dict:
        t0 = time.time()
        result = self.algo.train()
        er, srm = result.get("env_runners", {}), result.get(RESULTS, {})
        steps = _scalar(er, "num_env_steps_sampled", default=0.0)
        if not np.isfinite(steps):  # every EnvRunner failed this iteration (RLlib restarts them): none sampled
            steps = 0.0
        sample_s = _scalar(result, "timers", ENV_RUNNER_SAMPLING_TIMER, default=float("nan"))
        learn_s = _scalar(result, "timers", LEARNER_UPDATE_TIMER, default=float("nan"))
        srm_s = _scalar(srm, "srm_s")
        row = {
            "iteration": self.iteration, "env_steps": self.env_steps,
            "episode_return": _scalar(er, "episode_return_mean"), "hit_rate": _scalar(er, "hit_rate"),
            "final_iou": _scalar(er, "final_iou"), "label_accuracy": _scalar(er, "label_accuracy"),
            "srm_loss": _scalar(srm, "srm_loss"), "srm_pixel_acc": _scalar(srm, "srm_pixel_acc"),
            "env_steps_per_s": (steps / sample_s if sample_s and sample_s == sample_s
                                else steps / (time.time() - t0 - srm_s)),
            "sample_s": sample_s, "learn_s": learn_s, "srm_s": srm_s, "iter_s": time.time() - t0,
        }
        return row

    def run(self, report=None) -> dict:
        """The training loop of `alignsam train` and of every `alignsam tune` trial: iterations until
        train.iterations, each a progress.csv row and TensorBoard scalars (+ a console line with
        progress), a checkpoint every train.checkpoint_every and at the end. ``report(row, checkpoint)``
        (Tune trials: validation metrics + ``tune.report``) is called after each iteration, with the
        folder saved at that iteration or None. Returns the last row + "checkpoint"."""
        c = self.cfg.train
        total = c.iterations
        if self.iteration >= total:
            print(f"[train] {self.run_dir}: already at iteration {self.iteration} of {total}; nothing to do")
            return {"iteration": self.iteration, "checkpoint": resolve_checkpoint(self.run_dir)}
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(self.run_dir, "tb"))
        csv_path = os.path.join(self.run_dir, "progress.csv")
        new_csv = not os.path.isfile(csv_path)
        last = None
        with open(csv_path, "a", newline="") as f:
            out = csv.DictWriter(f, PROGRESS_KEYS if new_csv else _csv_header(csv_path), extrasaction="ignore")
            if new_csv:
                out.writeheader()
            while self.iteration < total:
                try:
                    row = self.train_iteration()
                except KeyboardInterrupt:
                    kept = resolve_checkpoint(self.run_dir) if checkpoints(self.run_dir) else "none yet"
                    print(f"\n[train] interrupted during iteration {self.iteration + 1}; last checkpoint: {kept}. "
                          f"Continue with: alignsam train --config {os.path.join(self.run_dir, 'config.yaml')} --resume",
                          file=sys.stderr, flush=True)
                    raise
                out.writerow(row)
                f.flush()
                for k, v in row.items():
                    if k != "iteration" and v == v:
                        writer.add_scalar(f"alignsam/{k}", v, row["iteration"])
                writer.flush()
                if self.progress:
                    print(f"[train] iter {row['iteration']:>3}/{total}  return {row['episode_return']:6.2f}  "
                          f"hit {row['hit_rate']:.3f}  IoU {row['final_iou']:.3f}  SRM acc {row['srm_pixel_acc']:.3f}  "
                          f"{row['env_steps_per_s']:6.1f} steps/s  ({row['iter_s']:.1f}s)", flush=True)
                saved = self.save() if self.iteration % c.checkpoint_every == 0 or self.iteration == total else None
                last = saved or last
                if report is not None:
                    report(row, saved)
                last_row = row
        writer.close()
        return {**last_row, "checkpoint": last}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write checkpoints/iter_N atomically (tmp folder + rename)."""
        root = os.path.join(self.run_dir, CHECKPOINTS)
        final = os.path.join(root, f"iter_{self.iteration:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.algo.save_to_path(os.path.abspath(os.path.join(tmp, "algo")))
        save_config(self.cfg, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"iteration": self.iteration, "env_steps": self.env_steps, "task": self.cfg.task,
                       "store": self.cfg.store, "sam": self.sam, "time": time.time()}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.progress:
            print(f"[train] checkpoint {final}", flush=True)
        return final

    def _restore(self) -> None:
        found = checkpoints(self.run_dir)
        if not found:
            print(f"[train] --resume: no checkpoint in {self.run_dir}; starting from scratch", file=sys.stderr)
            return
        ckpt = found[-1]
        self.algo.restore_from_path(os.path.abspath(os.path.join(ckpt, "algo")))  # policy, SRM, iteration, steps
        # restored weights live on the learner; EnvRunners keep stale ones unless synced. RLlib's
        # default timeout 0.0 is fire-and-forget: wait, so the runners hold them when this returns
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                inference_only=True, timeout_seconds=120.0)
        legacy = legacy_srm_state(ckpt)
        if legacy is not None:  # a checkpoint written before AlignSamPPO: its SRM is the srm.pt beside algo/
            self.algo.set_state({SRM_STATE: legacy})
        print(f"[train] resumed from {ckpt} (iteration {self.iteration})", flush=True)

    def validate(self) -> dict:
        """The paper's evaluation protocol (alignsam only) on the held-out validation images."""
        from .checkpoint import Agent
        from .evaluate import validation_metrics, validation_set

        if self._val_set is None:  # the held-out images are read once per run, not per iteration
            self._val_set = validation_set(self.cfg.store, self.cfg.train.val_images)
        module = self.algo.get_module()
        module.eval()
        agent = Agent(module, self.algo.srm.srm, self.cfg, checkpoint=f"{self.run_dir} (iteration {self.iteration})")
        return validation_metrics(agent, self._val_set)

    def stop(self) -> None:
        self.algo.stop()


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.stop()

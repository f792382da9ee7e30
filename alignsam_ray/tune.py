"""Ray Tune sweeps over tasks and hyperparameters (`alignsam tune`).

    alignsam tune --config tune_configs/sweep_synthetic.yaml [--resume] [key=value ...]

(``key=value`` sets a top-level sweep key, e.g. ``storage=/mnt/shared/sweeps store_root=s3://b/stores``.)

A sweep file (YAML):

    name: synthetic_sweep           # results in <storage>/<name>/
    storage: tune_results           # relative = to the cwd (a shared path or URI on a cluster)
    tasks: [tune_configs/synthetic_blur.yaml, tune_configs/synthetic_saliency.yaml]   # base run configs
    store_root: null                # if set: every task's store is <store_root>/<task> (shared path or URI)
    overrides: {train.iterations: 30}            # applied to every trial (dotted keys, as on `alignsam train`)
    search:                                      # dotted key -> {grid: [...]} | {choice: [...]} |
      ppo.gamma: {grid: [0.95, 0.99]}            #   {uniform: [lo, hi]} | {loguniform: [lo, hi]}
      ppo.clip_param: {grid: [0.1, 0.2]}
      env.horizon: {grid: [10, 15]}
      env.grid: {grid: [8, 10, 16]}              # the patch grid: 8x8, 10x10, 16x16 actions
    num_samples: 1                  # repeats of the grid (random search: draws)
    val_images: 10                  # the last k training images of each store: the validation split
    metric: val_miou                # selection metric, on the validation split: val_miou, val_iou_dataset,
                                    #   val_fbeta or val_emeasure
    scheduler: none                 # or asha (early stopping; asha: {grace_period, reduction_factor})
    max_concurrent: null            # trials at once (default: as many as the cluster fits)

Each trial is one `alignsam train` run (PPO + SRM: the same ``Trainer.run`` loop, progress.csv and
TensorBoard in <trial>/run/) in its Tune trial folder; each checkpoint it saves is also reported to
Tune (``tune.report(..., checkpoint=...)``: a ResultGrid's ``result.checkpoint``); ``--resume``
continues an interrupted sweep with ``Tuner.restore`` and every unfinished trial resumes from its last
checkpoint. At the end: ``best_per_task.md`` / ``.csv``
(the best trial of each task by the last value of ``metric``), ``trials.csv`` and ``sweep.png``.

Model selection: trials train on the store's training images minus the last ``val_images`` of them;
after every iteration the trial is evaluated with the paper's protocol (SRM start, greedy policy, SRM
labels, T steps) on those held-out images, and the best trial is the one with the highest last
``metric`` there. Never on training episodes, never on the test split: that stays untouched for
`alignsam evaluate` of the chosen configuration.
"""
from __future__ import annotations

import copy
import csv
import os
from dataclasses import asdict

import yaml

from .config import ConfigError, RunConfig, SweepConfig, checks, load_config, load_yaml

SWEEP_DEFAULTS = asdict(SweepConfig())  # every sweep key, its default and its check: config.SweepConfig
RESULT_KEYS = ("iteration", "env_steps", "val_miou", "val_iou_dataset", "val_fbeta", "val_emeasure",
               "episode_return", "hit_rate", "final_iou", "label_accuracy", "env_steps_per_s", "iter_s")


def load_sweep(path: str, overrides: list[str] | None = None) -> dict:
    """The sweep file at ``path``, with ``key=value`` strings setting top-level keys (values in YAML)."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path!r} not found")
    with open(path) as f:
        raw = load_yaml(f.read(), f"sweep file {path!r}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path!r} must be a YAML mapping (key: value lines), not a {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep override {item!r} is not key=value")
        raw[key.strip()] = load_yaml(value, f"sweep override {item!r}")
    unknown = set(raw) - set(SWEEP_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)} in {path}; known: {sorted(SWEEP_DEFAULTS)}")
    sweep = {**copy.deepcopy(SWEEP_DEFAULTS), **raw}
    for key, ok, want in checks(SweepConfig):
        if not ok(sweep[key]):
            raise ConfigError(f"{path}: {key} must be {want}, got {sweep[key]!r}")
    base = os.path.dirname(os.path.abspath(path))
    tasks = {}
    for p in sweep["tasks"]:
        full = p if os.path.isabs(p) or os.path.isfile(p) else os.path.join(base, os.path.basename(p))
        task_overrides = dict(_nested(sweep["overrides"]))
        task_overrides.setdefault("train", {})["val_images"] = sweep["val_images"]
        if sweep["store_root"]:
            with open(full) as f:
                name = (yaml.safe_load(f) or {}).get("task") or os.path.splitext(os.path.basename(full))[0]
            task_overrides["store"] = f"{str(sweep['store_root']).rstrip('/')}/{name}"
        cfg = load_config(full, task_overrides)  # checks keys early
        for key in sweep["search"]:
            _check_key(cfg, key, path)
        tasks[cfg.task] = cfg
    sweep["task_configs"] = tasks
    storage = sweep["storage"]
    sweep["storage"] = storage if "://" in storage else os.path.abspath(storage)
    return sweep


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in (dotted or {}).items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _check_key(cfg: RunConfig, key: str, where: str) -> None:
    node = cfg.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: search key {key!r} is not a run config key (see alignsam_ray/config.py)")
        node = node[part]


def param_space(sweep: dict) -> dict:
    """Tune's search space: the task (a grid over the base configs) and every searched key."""
    from ray import tune

    space = {"task": tune.grid_search(sorted(sweep["task_configs"]))}
    for key, spec in sweep["search"].items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"search key {key!r}: give one of grid / choice / uniform / loguniform, got {spec!r}")
        (kind, values), = spec.items()
        if kind == "grid":
            space[key] = tune.grid_search(list(values))
        elif kind == "choice":
            space[key] = tune.choice(list(values))
        elif kind in ("uniform", "loguniform"):
            space[key] = getattr(tune, kind)(float(values[0]), float(values[1]))
        else:
            raise ConfigError(f"search key {key!r}: unknown kind {kind!r} (grid, choice, uniform, loguniform)")
    return space


def trial_config(base: RunConfig, params: dict, run_dir: str) -> RunConfig:
    """A run config: the task's base config, the trial's searched values, the trial folder."""
    from .config import merge_config

    searched = {k: v for k, v in params.items() if k != "task"}
    cfg = RunConfig.from_dict(merge_config(base.to_dict(), _nested(searched)))  # (checked by Trainer)
    cfg.run_dir = run_dir
    return cfg


def train_trial(params: dict, configs: dict, select: bool = True) -> None:
    """One Tune trial = one training run (``Trainer.run``: the loop, progress.csv, TensorBoard and checkpoints of
    `alignsam train`), resumed from its own checkpoints; reports every iteration. The trainable of both
    `alignsam tune` and `alignsam reproduce`.

    params: {"task": a key of ``configs``, searched dotted keys: values}; configs: name -> RunConfig.
    select (a sweep): the run lives in <trial folder>/run with the searched values merged in, is validated
        after every iteration on its held-out training images (the selection metric) and reports each
        checkpoint to Tune; False (reproduce's fixed runs): the run lives in its config's run_dir and
        reports its training figures only."""
    from ray import tune

    from .train import Trainer, checkpoints

    base = configs[params["task"]]
    run_dir = os.path.join(tune.get_context().get_trial_dir(), "run") if select else base.run_dir
    cfg = trial_config(base, params, run_dir)
    trainer = Trainer(cfg, resume=bool(checkpoints(run_dir)) if os.path.isdir(run_dir) else False, progress=False)
    keys = RESULT_KEYS if select else tuple(k for k in RESULT_KEYS if not k.startswith("val_"))

    def report(row: dict, saved: str | None) -> None:
        if select:
            row.update(trainer.validate())  # the selection metric: paper protocol on held-out images
        tune.report({k: row[k] for k in keys} | {"task": params["task"]},
                    checkpoint=tune.Checkpoint.from_directory(saved) if saved and select else None)

    try:
        trainer.run(report)
    finally:
        trainer.stop()


def trainable(configs: dict, *, select: bool):
    """``train_trial`` over ``configs`` (name -> RunConfig) as Tune runs it: each trial one placement group,
    sized by the first config's ``resources``."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(train_trial, configs=configs, select=select),
                               trial_resources(next(iter(configs.values()))))


def trial_resources(cfg: RunConfig):
    """Placement group of one trial: the learner (1 CPU, + GPU) and one bundle per EnvRunner."""
    from ray import tune

    from .train import run_bundles

    return tune.PlacementGroupFactory(run_bundles(cfg, trial=True))


def run_sweep(sweep: dict, resume: bool = False, progress: bool = True):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .store.loader import publish_store
    from .train import check_cluster_fits, init_ray

    init_ray()
    check_cluster_fits({f"a {task} trial": cfg for task, cfg in sweep["task_configs"].items()}, trial=True)
    for cfg in sweep["task_configs"].values():  # the driver that runs fit() owns the stores' object refs
        publish_store(cfg.store, "train")
    trials = trainable(sweep["task_configs"], select=True)
    path = os.path.join(sweep["storage"], sweep["name"])
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--resume: no sweep to restore at {path}")
        tuner = tune.Tuner.restore(path, trainable=trials, resume_errored=True)
    else:
        scheduler = None
        if sweep["scheduler"] == "asha":
            a = sweep["asha"]
            scheduler = ASHAScheduler(time_attr="iteration", grace_period=int(a["grace_period"]),
                                      reduction_factor=float(a["reduction_factor"]),
                                      max_t=max(c.train.iterations for c in sweep["task_configs"].values()))
        tuner = tune.Tuner(
            trials, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(metric=sweep["metric"], mode="max", num_samples=int(sweep["num_samples"]),
                                        scheduler=scheduler, max_concurrent_trials=sweep["max_concurrent"]),
            run_config=tune.RunConfig(name=sweep["name"], storage_path=sweep["storage"],
                                      verbose=1 if progress else 0),
        )
    results = tuner.fit()
    summary = write_summary(results, sweep, path)
    ray.shutdown()
    return summary


def write_summary(results, sweep: dict, path: str) -> dict:
    """trials.csv (every trial's last result), best_per_task.{md,csv}, sweep.png."""
    metric = sweep["metric"]
    searched = ["task"] + list(sweep["search"])
    trials, curves = [], []
    for r in results:
        if r.metrics is None or metric not in (r.metrics or {}):
            trials.append({"trial": os.path.basename(r.path), "status": "error" if r.error else "no result",
                           **{k: (r.config or {}).get(k) for k in searched}})
            continue
        trials.append({"trial": os.path.basename(r.path), "status": "error" if r.error else "ok",
                       **{k: r.config.get(k) for k in searched},
                       **{k: r.metrics.get(k) for k in RESULT_KEYS}})
        if r.metrics_dataframe is not None:
            curves.append((r.config["task"], r.metrics_dataframe))
    cols = ["trial", "status"] + searched + list(RESULT_KEYS)
    with open(os.path.join(path, "trials.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(trials)
    best = {}
    for t in trials:
        if t["status"] == "ok" and (t["task"] not in best or t[metric] > best[t["task"]][metric]):
            best[t["task"]] = t
    rows = [best[k] for k in sorted(best)]
    with open(os.path.join(path, "best_per_task.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shown = searched + ["iteration", metric, "final_iou", "hit_rate"]
    md = [f"# Sweep {sweep['name']}: best trial per task (by last {metric}, on {sweep['val_images']} held-out "
          "training images; final_iou and hit_rate are from training episodes)", "",
          "| " + " | ".join(shown) + " | trial |", "|" + "---|" * (len(shown) + 1)]
    for t in rows:
        md.append("| " + " | ".join(_fmt(t.get(k)) for k in shown) + f" | {t['trial']} |")
    failed = [t["trial"] for t in trials if t["status"] != "ok"]
    md += ["", f"{len(trials)} trials, {len(failed)} without a result" + (f": {', '.join(failed)}" if failed else "") + "."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(path, "best_per_task.md"), "w") as f:
        f.write(text)
    _plot(curves, metric, os.path.join(path, "sweep.png"))
    print(text)
    return {"path": path, "best": rows, "trials": trials}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _plot(curves, metric: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in curves})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for t, df in curves:
            if t == task and metric in df:
                ax.plot(df["iteration"], df[metric], alpha=0.7)
        ax.set_title(task)
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

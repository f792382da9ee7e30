"""`alignsam reproduce`: the paper's Tables 2-5 from the public benchmarks, in one command.

    alignsam reproduce --data ROOT --sam vit_h --checkpoint sam_vit_h_4b8939.pth \\
        --clip-weights open_clip_vit_b16.bin --out DIR [--tasks blur shadow ...] [--smoke]

Stages, each resumable (a rerun with the same settings reuses what is finished):
  1. find      the benchmark folders under ROOT: CUHK (blur), SBU (shadow), MSD (glass), DUTS (saliency),
               VOC (the 20 PASCAL classes); any subset
  2. embed     one store per task, one per class for VOC            -> DIR/stores/<task>
  3. train     one run per task with the paper's settings and its SRM branch (Table 4), plus a run with
               the other branch for Table 4 (VOC: per class, as the paper did); every unfinished run is a
               Ray Tune trial, so a cluster trains them side by side, each learner on a GPU when it has them
                                                                    -> DIR/runs/<run>
  4. evaluate  each run with the paper's protocol and ablations (its test images in shards: Ray tasks
               across the cluster, GPU tasks when it has GPUs)
                                                                    -> DIR/eval/<run>/metrics.json
  5. report    Tables 2, 3, 4 and 5 in the paper's rows and columns (its competitors as reference lines),
               ours [95% CI] beside every published figure (``paper_figures.json``) and the difference,
               then our T sweep on every task (an extension the paper does not publish)
                                                                    -> DIR/report.md, DIR/report.json

On a multi-node cluster DIR (and ROOT) must be on a filesystem every node sees: trials and
evaluations write there.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

from .config import DEFAULTS, ConfigError, RunConfig, paper_srm
from .data import DataError
from .data.samples import VOC_CLASSES
from .evaluate import METHODS, T_SWEEP
from .metrics import METRICS, mean_of_classes

BENCHMARKS = {  # layout -> the task of its tables' column (the paper's order)
    "cuhk": "blur", "sbu": "shadow", "msd": "glass", "duts": "saliency", "voc": "voc"}
FOLDER_NAMES = {"cuhk": ("cuhk",), "sbu": ("sbu",), "msd": ("msd",), "duts": ("duts",),
                "voc": ("voc", "pascal")}  # a folder under ROOT whose lower-case name starts with one of these
REFERENCE_METHODS = {"PerSAM": "persam"}  # a competitor row of the paper's that we also run (same SAM, embeddings)
ROW_LABELS = {"random_actions": "w/o RL (random actions)", "all_positive": "w/o SRM (every point positive)",
              "single_step": "w/o multi-step (T = 1)", "alignsam": "AlignSAM", "persam": "PerSAM (training-free, 1 shot)",
              "implicit": "implicit V(0, s_t)", "explicit": "explicit V(s_c, s_t)"}
COLUMN_NAMES = {"blur": "CUHK", "shadow": "SBU", "glass": "MSD", "saliency": "DUTS", "voc": "VOC"}
SMOKE = {"n_train": 3, "n_test": 2, "iterations": 1,  # --smoke: every stage, shrunk
         "overrides": {"ppo": {"train_batch_size": 60, "minibatch_size": 30},
                       "resources": {"num_env_runners": 1}}}
PAPER_FIGURES = os.path.join(os.path.dirname(__file__), "paper_figures.json")


# ---------------------------------------------------------------------------------------------- find
def find_benchmarks(root: str) -> dict[str, str]:
    """{layout: folder} of the benchmark folders directly under ``root`` (hidden folders ignored)."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root!r} is not a folder")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        for layout, prefixes in FOLDER_NAMES.items():
            if name.lower().startswith(prefixes):
                if layout in found:
                    raise DataError(f"{root} holds two {layout.upper()} folders ({os.path.basename(found[layout])}, "
                                    f"{name}); keep one, or pass --data a folder holding only the ones to use")
                found[layout] = path
    if not found:
        raise DataError(f"no benchmark folder under {root}: expected folders named CUHK*, SBU*, MSD*, DUTS*, "
                        "VOC* (or VOCdevkit, PASCAL*), each in its public layout (docs/datasets.md)")
    return {k: found[k] for k in BENCHMARKS if k in found}  # the paper's order


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Store:
    name: str          # the task: blur, shadow, ..., voc_<class>
    path: str
    spec: str          # LAYOUT:folder
    samples: list


@dataclass
class Run:
    name: str          # <task> (the paper's branch) or <task>_<other branch> (Table 4)
    task: str
    store: str
    branch: str
    run_dir: str
    eval_dir: str


def plan(out: str, found: dict[str, str], tasks: list[str] | None, voc_classes: list[str] | None, n_train: int,
         n_test: int | None, seed: int, table4: bool) -> tuple[list[Store], list[Run]]:
    """The stores and runs of a reproduction; datasets are listed (headers checked) here, before any work."""
    from .data import open_dataset

    stores, runs = [], []
    for layout, folder in found.items():
        if tasks and BENCHMARKS[layout] not in tasks:
            continue
        samples = open_dataset(f"{layout}:{folder}", n_train=n_train, seed=seed,
                               classes=voc_classes if layout == "voc" else None)
        by_task: dict[str, list] = {}
        for s in samples:
            by_task.setdefault(s.task, []).append(s)
        for task, group in sorted(by_task.items()):
            if n_test is not None:  # --smoke: the first test images only
                test = [s for s in group if s.split == "test"][:n_test]
                group = [s for s in group if s.split == "train"] + test
            splits = {s.split for s in group}
            if splits != {"train", "test"}:
                print(f"[reproduce] {task}: no {'test' if 'train' in splits else 'training'} images in {folder}; "
                      "skipped", file=sys.stderr)
                continue
            stores.append(Store(task, os.path.join(out, "stores", task), f"{layout}:{folder}", group))
            branches = [paper_srm(task)["branch"]]
            if table4:  # Table 4: the other branch too (VOC: one more run per class, as the paper did)
                branches.append("implicit" if branches[0] == "explicit" else "explicit")
            for branch in branches:
                name = run_name(task, branch)
                runs.append(Run(name, task, stores[-1].path, branch, os.path.join(out, "runs", name),
                                os.path.join(out, "eval", name)))
    if not stores:
        raise DataError(f"nothing to reproduce: tasks {tasks} not among the benchmarks found ({sorted(found)})")
    return stores, runs


def run_config(run: Run, seed: int, iterations: int | None, smoke: bool) -> RunConfig:
    """The paper's settings for the run's task; its SRM branch (reading the store's CLIP Surgery map
    of the task's text when explicit)."""
    from .config import load_config
    from .data.samples import TASK_TEXT
    from .store.embed import map_name

    over: dict = {"run_dir": run.run_dir, "train": {"seed": seed}}
    if run.branch != paper_srm(run.task)["branch"]:
        over["srm"] = {"branch": run.branch,
                       "text_map": map_name(TASK_TEXT[run.task]) if run.branch == "explicit" else None}
    if smoke:
        over = {**SMOKE["overrides"], **over}
    if iterations:
        over["train"]["iterations"] = iterations
        over["train"]["checkpoint_every"] = iterations
    return load_config(None, over, store=run.store)


# ---------------------------------------------------------------------------------------------- stages
def _eta(done: float, total: float, t0: float) -> str:
    if done <= 0 or total <= done:
        return ""
    left = (time.time() - t0) / done * (total - done)
    return f", ETA {time.strftime('%H:%M', time.localtime(time.time() + left))} ({_duration(left)} left)"


def _duration(seconds: float) -> str:
    m = int(seconds // 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {int(seconds % 60):02d} s"


def _store_done(store: Store, identity: dict, clip_model: str | None) -> bool:
    from .store.embed import samples_digest
    from .store.shards import read_manifest

    if not os.path.isfile(os.path.join(store.path, "manifest.json")):
        return False
    m = read_manifest(store.path)
    return bool(m.get("complete")) and m.get("samples_sha256") == samples_digest(
        sorted(store.samples, key=lambda s: (s.split, s.id))) and all(m.get(k) == v for k, v in identity.items()) \
        and (m.get("clip") or {}).get("model") == clip_model


def embed_stores(stores: list[Store], sam: str, checkpoint: str | None, clip_model: str | None,
                 clip_weights: str | None, identity: dict) -> None:
    from .store.embed import embed_dataset
    from .train import init_ray

    todo = [s for s in stores if not _store_done(s, identity, clip_model)]
    total = sum(len(s.samples) for s in todo)
    print(f"[reproduce] 2/5 embed: {len(stores) - len(todo)} of {len(stores)} stores already done; "
          f"{len(todo)} to embed ({total} images)", flush=True)
    if todo:
        init_ray()
    t0, done = time.time(), 0
    for k, s in enumerate(todo, 1):
        print(f"[reproduce] embed {k}/{len(todo)}: {s.name} ({len(s.samples)} images){_eta(done, total, t0)}",
              flush=True)
        embed_dataset(s.samples, s.path, sam_type=sam, checkpoint=checkpoint, dataset_spec=s.spec,
                      clip_model=clip_model, clip_weights=clip_weights)
        done += len(s.samples)


def _run_done(run: Run, cfg: RunConfig) -> bool:
    from .checkpoint import checkpoints

    found = checkpoints(run.run_dir)
    if not found:
        return False
    with open(os.path.join(found[-1], "state.json")) as f:
        return json.load(f)["iteration"] >= cfg.train.iterations


def train_runs(runs: list[Run], configs: dict, out: str) -> None:
    """Every unfinished run as a Tune trial (one placement group each: the learner + its EnvRunners)."""
    from ray import tune

    from .store.loader import publish_store
    from .train import check_cluster_fits, init_ray
    from .tune import trainable

    todo = [r for r in runs if not _run_done(r, configs[r.name])]
    print(f"[reproduce] 3/5 train: {len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to train",
          flush=True)
    if not todo:
        return
    init_ray()
    check_cluster_fits({f"run {r.name}": configs[r.name] for r in todo}, trial=True)
    for r in todo:  # the driver that runs fit() owns the stores' object refs
        publish_store(configs[r.name].store, "train")
    total = sum(configs[r.name].train.iterations for r in todo)

    class Progress(tune.Callback):
        def __init__(self):
            self.t0, self.done = time.time(), 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.done += 1
            name = trial.config["task"]
            print(f"[reproduce] train {name}: iteration {result['iteration']}/{configs[name].train.iterations}"
                  f" (final IoU {result['final_iou']:.3f}); all runs: {self.done}/{total} iterations"
                  f"{_eta(self.done, total, self.t0)}", file=sys.stderr, flush=True)

    tuner = tune.Tuner(
        trainable({r.name: configs[r.name] for r in todo}, select=False),
        param_space={"task": tune.grid_search([r.name for r in todo])},  # the shared trainable's key: here a run
        run_config=tune.RunConfig(name=f"train_{time.strftime('%Y%m%d_%H%M%S')}",
                                  storage_path=os.path.join(out, "tune"), verbose=0, callbacks=[Progress()]),
    )
    os.makedirs(os.path.join(out, "tune"), exist_ok=True)
    with open(os.path.join(out, "tune", "tune_output.log"), "a") as log, contextlib.redirect_stdout(log):
        results = tuner.fit()  # Tune's own tables go to the log; the lines above to the terminal
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} training run(s) failed: "
                           + "; ".join(f"{r.config['task']}: {str(r.error).splitlines()[0]}" for r in failed)
                           + f" (logs: {os.path.join(out, 'tune')}); rerun to resume")


def _eval_done(run: Run) -> bool:
    from .checkpoint import resolve_checkpoint

    path = os.path.join(run.eval_dir, "metrics.json")
    if not os.path.isfile(path):
        return False
    ckpt = resolve_checkpoint(run.run_dir)
    with open(path) as f:  # of this checkpoint, and made after it was written (a retrained run: again)
        same = json.load(f).get("checkpoint") == ckpt
    return same and os.path.getmtime(path) >= os.path.getmtime(os.path.join(ckpt, "state.json"))


SHARD_IMAGES = 250  # most test images one evaluation shard holds


def evaluate_runs(runs: list[Run], seed: int) -> None:
    """Every run not yet evaluated on its latest checkpoint: its test images split into shards (at most
    ``SHARD_IMAGES`` each, and enough shards that the cluster's GPUs, else its CPUs, each get one), all runs'
    shards Ray tasks at once (``evaluate.run_shards``); a run's metrics.json is written as soon as its last
    shard is in."""
    import math

    import ray

    from .checkpoint import Agent, resolve_checkpoint
    from .eval_shard import shard_bounds
    from .evaluate import check_store, run_shards, write_evaluation
    from .store.loader import EmbeddingStore
    from .train import init_ray

    todo = [r for r in runs if not _eval_done(r)]
    print(f"[reproduce] 4/5 evaluate: {len(runs) - len(todo)} of {len(runs)} runs already evaluated; {len(todo)} to "
          "evaluate", flush=True)
    if not todo:
        return
    init_ray()
    prepared = []
    for run in todo:
        agent = Agent.load(resolve_checkpoint(run.run_dir))
        st = EmbeddingStore(run.store, verify=False)
        check_store(agent, st, run.store)
        prepared.append((run, agent, st, len(st.split_ids("test"))))
    total = sum(p[3] for p in prepared)
    res = ray.cluster_resources()
    slots = int(res.get("GPU", 0)) or int(res.get("CPU", 1))
    tasks, owner = [], []
    for k, (run, agent, _, n) in enumerate(prepared):
        for a, b in shard_bounds(n, max(math.ceil(n / SHARD_IMAGES), math.ceil(slots * n / total))):
            tasks.append(dict(checkpoint=agent.checkpoint, store=run.store, split="test", start=a, stop=b, seed=seed,
                              batch=None, n_figures=4))
            owner.append(k)
    got: dict = {k: [] for k in range(len(prepared))}
    t0, finished = time.time(), []

    def on_result(i: int, result: dict) -> None:
        k = owner[i]
        got[k].append(result)
        if len(got[k]) < owner.count(k):
            return
        run, agent, st, _ = prepared[k]
        m = write_evaluation(run.eval_dir, agent, st, run.store, "test", got[k], t0,
                             sorted({r["device"] for r in got[k]}))
        got[k] = []
        finished.append(run.name)
        print(f"[reproduce] evaluate {len(finished)}/{len(todo)}: {run.name} ({m['n_images']} test images, "
              f"alignsam mIoU {m['methods']['alignsam']['miou']:.3f}){_eta(len(finished), len(todo), t0)}", flush=True)

    run_shards(tasks, "auto", lambda msg: print(f"[reproduce] evaluate: {msg}", flush=True), on_result, every=60)


# ---------------------------------------------------------------------------------------------- report
def load_paper_figures(path: str = PAPER_FIGURES) -> dict:
    with open(path) as f:
        return json.load(f)


def _scale(metric: str, units: dict) -> float:
    """Ours -> the paper's unit (metrics.json holds fractions, BER in percent)."""
    if metric == "ber":
        return 1.0 if units.get(metric) == "percent" else 0.01
    return 100.0 if units.get(metric) == "percent" else 1.0


def run_name(task: str, branch: str) -> str:
    """A run's name: the task for the paper's SRM branch, ``<task>_<branch>`` for the other (Table 4)."""
    return task if branch == paper_srm(task)["branch"] else f"{task}_{branch}"


def _ours(evals: dict, run: str, row: str, metric: str, where: str = "methods") -> dict | None:
    """{"value", "ci95"} of one method (or T) of one evaluation, or None."""
    m = evals.get(run)
    if m is None:
        return None
    entry = m.get(where, {}).get(row)
    if entry is None or metric not in entry:
        return None
    return {"value": entry[metric], "ci95": (entry.get("ci95") or {}).get(metric)}


def _voc_mean(evals: dict, row: str, metric: str, where: str = "methods", branch: str = "explicit") -> dict | None:
    """The mean over the VOC classes run (with that SRM branch) of one method's (or T's) per-class figure."""
    runs = [run_name(f"voc_{c}", branch) for c in VOC_CLASSES[1:]]
    cells = [c for c in (_ours(evals, r, row, metric, where) for r in runs) if c is not None]
    return mean_of_classes(cells) | {"n_classes": len(cells)} if cells else None


def _method_of(row: str) -> str | None:
    """Our method behind a table row: the row itself (our rows), a competitor we also run, or None (a reference
    line: the paper's figure only)."""
    return row if row in METHODS else REFERENCE_METHODS.get(row)


def _source(key: str, row: str, col: str, metric: str) -> dict | None:
    """Where one cell's figure of ours comes from: {"run"} or {"voc_mean"}, with "method", "where", "branch"."""
    if key == "table3":  # rows: methods; columns: VOC classes and their mean
        method = _method_of(row)
        return None if method is None else {"run": None if col == "mean" else f"voc_{col}", "method": method,
                                            "where": "methods", "branch": "explicit"}
    if key == "table5":  # rows: VOC classes and their mean; columns: T (the alignsam rollout read at T)
        return {"run": None if row == "mean" else f"voc_{row}", "method": col, "where": "t_sweep",
                "branch": "explicit"}
    task = col.split(".")[0]
    if key == "table4":  # rows: the SRM branch a run was trained with
        return {"run": None if task == "voc" else run_name(task, row), "method": "alignsam", "where": "methods",
                "branch": row}
    if key == "table5_tasks":  # rows: T
        return {"run": None if task == "voc" else task, "method": row, "where": "t_sweep", "branch": "explicit"}
    method = _method_of(row)  # table2: rows: methods; columns: TASK.METRIC
    return None if method is None else {"run": None if task == "voc" else task, "method": method,
                                        "where": "methods", "branch": "explicit"}


def _extension_table(paper: dict) -> dict:
    """Our own T sweep on the other tasks (the paper publishes Table 5 for VOC classes only): no paper figures."""
    cols = list(paper["tables"]["table2"]["columns"]) + ["voc.iou_dataset"]
    return {"title": "Number of interaction steps T on every task (our extension: the paper's Table 5 covers four "
                     "VOC classes only)", "columns": cols,
            "rows": {str(t): {c: None for c in cols} for t in T_SWEEP}}


def build_tables(evals: dict, paper: dict) -> dict:
    """{table: {"title", "columns", "metric"?, "reference_rows", "rows": {row: {column: cell}}}}; a cell: {"ours",
    "ci95", "paper", "diff", "paper_in_ci"} in the paper's units (None where not run / not published), and
    "n_classes" for means over VOC classes. Tables 2-5 in the paper's layout, then ``table5_tasks`` (ours only)."""
    units = paper["units"]
    out = {}
    for key, table in {**paper["tables"], "table5_tasks": _extension_table(paper)}.items():
        rows, refs = {}, []
        for row, paper_row in table["rows"].items():
            cells = {}
            for col in table["columns"]:
                metric = table.get("metric") or col.split(".")[-1]
                src = _source(key, row, col, metric)
                cell = None
                if src is not None:
                    cell = (_ours(evals, src["run"], src["method"], metric, src["where"]) if src["run"]
                            else _voc_mean(evals, src["method"], metric, src["where"], src["branch"]))
                s = _scale(metric, units)
                ours = None if cell is None else cell["value"] * s
                ci = None if cell is None or not cell.get("ci95") else [v * s for v in cell["ci95"]]
                ref = paper_row.get(col)
                cells[col] = {"ours": ours, "ci95": ci, "paper": ref,
                              "diff": None if ours is None or ref is None else ours - ref,
                              "paper_in_ci": None if ci is None or ref is None else ci[0] <= ref <= ci[1]}
                if cell is not None and "n_classes" in cell:
                    cells[col]["n_classes"] = cell["n_classes"]
            if all(_source(key, row, c, "") is None for c in table["columns"]):
                refs.append(row)
            rows[row] = cells
        out[key] = {"title": table["title"], "columns": table["columns"], "rows": rows, "reference_rows": refs,
                    **({"metric": table["metric"]} if "metric" in table else {})}
    return out


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "not published"
    return f"{v:.2f}" if unit == "percent" else f"{v:.3f}"


def _cell_text(cell: dict, unit: str, reference: bool) -> str:
    if reference:  # a competitor's row: the paper's figure only
        return _num(cell["paper"], unit)
    if cell["ours"] is None:
        return "not run / " + _num(cell["paper"], unit)
    ours = _num(cell["ours"], unit) + (f" [{_num(cell['ci95'][0], unit)}, {_num(cell['ci95'][1], unit)}]"
                                        if cell["ci95"] else "")
    if cell["paper"] is None:
        return f"{ours} / not published"
    return f"{ours} / {_num(cell['paper'], unit)} ({'+' if cell['diff'] >= 0 else ''}{_num(cell['diff'], unit)})"


def _heading(key: str, col: str) -> str:
    if key == "table3":
        return "mIoU (20)" if col == "mean" else col
    if key == "table5":
        return f"T = {col}"
    task, metric = col.split(".")
    return f"{COLUMN_NAMES.get(task, task)} {METRICS[metric].paper_label if metric in METRICS else metric}"


def _row_label(key: str, row: str) -> str:
    if key == "table5_tasks":
        return f"T = {row}"
    if key == "table5" and row == "mean":
        return "mean over the classes"
    if row in REFERENCE_METHODS:
        return f"{row} (paper) / ours: `{REFERENCE_METHODS[row]}`"
    return ROW_LABELS.get(row, row)


def report_markdown(tables: dict, paper: dict, header: str) -> str:
    units = paper["units"]
    lines = [header, "",
             "Each cell: **ours [95% CI] / the paper's (ours - paper)**, in the paper's units (percent: x 100). Rows "
             "in *italics* are the paper's competitors, with their published figures only. `not published`: the "
             "paper does not print that cell (Table 3 prints 10 of the 20 classes, Table 5 four); `not run`: no "
             "benchmark folder or run for it. Intervals: bootstrap over the test images; VOC means over classes "
             "combine the per-class intervals (normal approximation). A difference is a reproduction gap only where "
             "the paper's figure lies outside our interval.", ""]
    for key, table in tables.items():
        cols, refs = table["columns"], set(table["reference_rows"])
        metric = table.get("metric")
        title = ("Our extension" if key == "table5_tasks" else key.replace("table", "Table "))
        lines += [f"## {title}: {table['title']}", "",
                  "| | " + " | ".join(_heading(key, c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
        for row, cells in table["rows"].items():
            label = _row_label(key, row)
            label = f"*{label}*" if row in refs else label
            lines.append(f"| {label} | " + " | ".join(
                _cell_text(cells[c], units[metric or c.split('.')[-1]], row in refs) for c in cols) + " |")
        partial = sorted({x["n_classes"] for cells in table["rows"].values() for x in cells.values()
                          if x.get("n_classes", len(VOC_CLASSES) - 1) < len(VOC_CLASSES) - 1})
        if partial:
            lines += ["", f"Our VOC means are over the classes run ({', '.join(map(str, partial))} of "
                      f"{len(VOC_CLASSES) - 1}); the paper's over all {len(VOC_CLASSES) - 1}."]
        comparable = [(row, c, x) for row, cells in table["rows"].items() for c, x in cells.items()
                      if x["paper_in_ci"] is not None]
        if key != "table5_tasks":
            outside = [f"{row} {c}" for row, c, x in comparable if x["paper_in_ci"] is False]
            lines += ["", f"Paper's figure outside our interval: {', '.join(outside) if outside else 'none'} "
                      f"(of {len(comparable)} comparable cells).", ""]
        else:
            lines.append("")
    return "\n".join(lines) + "\n"


def write_report(out: str, runs: list[Run], settings: dict) -> str:
    evals = {}
    for r in runs:
        path = os.path.join(r.eval_dir, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                evals[r.name] = json.load(f)
    paper = load_paper_figures()
    tables = build_tables(evals, paper)
    n = ", ".join(f"{name} {m['n_images']}" for name, m in evals.items())
    header = (f"# AlignSAM reproduction\n\nSAM `{settings['sam']}` (checkpoint sha256 "
              f"{settings['checkpoint_sha256'][:12]}), CLIP Surgery `{settings['clip_model']}`, "
              f"{settings['n_train']} training images per task, seed {settings['seed']}"
              f"{', SMOKE MODE (every stage shrunk: the figures mean nothing)' if settings['smoke'] else ''}. "
              f"Test images per run: {n}. Paper: {paper['paper']}.")
    text = report_markdown(tables, paper, header)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"settings": settings, "units": paper["units"], "sources": paper["sources"], "tables": tables,
                   "runs": {r.name: {"task": r.task, "branch": r.branch, "run_dir": r.run_dir,
                                     "metrics": os.path.join(r.eval_dir, "metrics.json")} for r in runs}}, f, indent=1)
    return text


# ---------------------------------------------------------------------------------------------- all
def _check_settings(out: str, settings: dict) -> None:
    """DIR keeps one reproduction: a rerun with other settings would mix runs; refuse it."""
    path = os.path.join(out, "reproduce.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ConfigError(f"{out} holds a reproduction made with other settings ("
                              + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                              + "); rerun with those, or use another --out")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def reproduce(data: str, out: str, sam: str = "vit_h", checkpoint: str | None = None, clip_model: str | None = None,
              clip_weights: str | None = None, tasks: list[str] | None = None, voc_classes: list[str] | None = None,
              n_train: int = 50, seed: int = 0, iterations: int | None = None, table4: bool = True,
              smoke: bool = False) -> str:
    """All five stages; returns the report's Markdown."""
    import ray

    from .foundation import file_sha256, load_sam
    from .foundation.sam_models import default_checkpoint

    out = os.path.abspath(out)
    t0 = time.time()
    if sam != "micro" and not checkpoint:
        raise ConfigError(f"--sam {sam} needs --checkpoint (the official sam_{sam}_*.pth file)")
    if clip_weights and not os.path.isfile(clip_weights):
        raise ConfigError(f"--clip-weights {clip_weights!r}: no such file (a local open_clip weights file)")
    clip_model = clip_model or ("micro" if sam == "micro" else ("ViT-B-16" if clip_weights else None))
    found = find_benchmarks(data)
    print(f"[reproduce] 1/5 find: {', '.join(f'{COLUMN_NAMES[BENCHMARKS[k]]} ({v})' for k, v in found.items())}",
          flush=True)
    if smoke:
        n_train, iterations = SMOKE["n_train"], iterations or SMOKE["iterations"]
    stores, runs = plan(out, found, tasks, voc_classes, n_train, SMOKE["n_test"] if smoke else None, seed,
                        table4 and clip_model is not None)
    explicit = sorted({r.task for r in runs if r.branch == "explicit"})
    if explicit and clip_model is None:
        raise ConfigError(f"{', '.join(explicit)} use the paper's explicit SRM branch, which reads CLIP Surgery maps: "
                          "pass --clip-weights (a local open_clip ViT-B-16 weights file), or leave those tasks out "
                          "with --tasks")
    if clip_model is None:
        print("[reproduce] no --clip-weights: Table 4 (the other SRM branch) is not run", file=sys.stderr)
    load_sam(sam, checkpoint)  # a wrong checkpoint fails here, not after an hour
    ckpt_hash = file_sha256(checkpoint or default_checkpoint(sam))
    settings = {"sam": sam, "checkpoint_sha256": ckpt_hash, "clip_model": clip_model,
                "clip_weights_sha256": file_sha256(clip_weights) if clip_weights else None,
                "n_train": n_train, "seed": seed, "iterations": iterations, "smoke": smoke}
    _check_settings(out, settings)
    print(f"[reproduce] plan: {len(stores)} stores, {len(runs)} runs ("
          + ", ".join(f"{r.name}: {r.branch}" for r in runs[:8]) + (", ..." if len(runs) > 8 else "")
          + f"), {iterations or DEFAULTS['train']['iterations']} PPO iterations each", flush=True)
    try:  # each stage starts (or joins) Ray only when it has work: a finished reproduction reruns without it
        embed_stores(stores, sam, checkpoint, clip_model, clip_weights,
                     {"sam_type": sam, "checkpoint_sha256": ckpt_hash})
        configs = {r.name: run_config(r, seed, iterations, smoke) for r in runs}  # (reads the stores)
        train_runs(runs, configs, out)
        evaluate_runs(runs, seed)
    finally:
        ray.shutdown()
    text = write_report(out, runs, settings)
    print("\n" + text)
    print(f"[reproduce] 5/5 report: {out}/report.md and report.json ({_duration(time.time() - t0)})")
    return text

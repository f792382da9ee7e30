"""Training configuration: every hyperparameter in one place, the paper's value as default.

One typed schema: ``RunConfig`` (a dataclass per section) holds each key's default, the check a value
must pass and what it means; ``DEFAULTS`` / ``CHECKS`` derive from it, and ``EnvConfig`` (what an env
reads) and ``SweepConfig`` (an `alignsam tune` file) sit beside it. ``load_config`` returns a
``RunConfig``, read by attribute (``cfg.ppo.lr``); a plain dict (``cfg.to_dict()``, back with
``RunConfig.from_dict``) only where a library takes one: YAML, Tune's search space, RLlib's env_config.

A run config is YAML with the sections below (``tune_configs/<task>.yaml``); anything left out
takes the default. Command-line overrides use dotted keys: ``ppo.lr=3e-4 env.horizon=10``.
Unknown keys are errors (a typo must not silently train with the default), and ``validate`` checks
every value's type and range before Ray starts (one line per problem).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import yaml

from .metrics import VAL_METRICS


def _whole(lo=None, hi=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _real(lo=None, hi=None, above=None):
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and (lo is None or v >= lo)
                      and (hi is None or v <= hi) and (above is None or v > above))


def _one_of(*values):
    return lambda v: v in values


_BOOL = _one_of(True, False)


def _key(default, check=None, want: str = "", doc: str = ""):
    """A config key: its default (the paper's value where it gives one), the test a value must pass and
    what it must be (the error message), and what it means."""
    meta = {"check": check, "want": want, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EnvSettings:
    grid: int | list | None = _key(None, doc="[rows, cols] or an int; None -> resize // patch_size")
    patch_size: int = _key(80, _whole(1), "a whole number >= 1", "paper: 80x80 patches ...")
    resize: int = _key(800, _whole(1), "a whole number >= 1", "... of the image resized to 800x800 -> a 10x10 grid")
    horizon: int = _key(15, _whole(1), "a whole number >= 1 (T, steps per episode)", "T, steps per episode (paper 15)")
    obs_res: int = _key(16, _whole(1, 64), "a whole number in 1..64 (SAM's embedding grid is 64x64)",
                        "R: the state pooled to R x R (docs/agent.md: memory vs learning)")
    state: str = _key("probability", _one_of("probability", "binary"), "'probability' or 'binary'",
                      "s_t = E_I(x) (.) M_{t-1}, M = SAM's probability map (paper Eq. 11) | binary")
    reward: str = _key("hit", _one_of("hit", "iou_gain", "iou_gain_hit"), "'hit', 'iou_gain' or 'iou_gain_hit'",
                       "hit: the paper's +1 / -1 (docs/agent.md#reward) | iou_gain: IoU_t - IoU_{t-1} | both")
    iou_gain_weight: float = _key(10.0, _real(0), "a number >= 0",
                                  "w in iou_gain_hit = hit + w (IoU_t - IoU_{t-1}); 10: both terms spread alike")


@dataclass
class SrmSettings:
    branch: str = _key("implicit", _one_of("implicit", "explicit"), "'implicit' or 'explicit'",
                       "implicit (blur, glass, saliency) | explicit (shadow, classes)")
    q: int | None = _key(None, lambda v: v is None or _whole(1)(v), "null (the paper's) or a whole number >= 1",
                         "SRM updates per PPO update; None -> paper (1 implicit, 5 explicit)")
    lr: float = _key(1.0e-4, _real(above=0), "a number > 0", "paper: Adam 1e-4 for all experiments")
    batch_size: int = _key(64, _whole(1), "a whole number >= 1", "SRM minibatch")
    text_map: str | None = _key(None, lambda v: v is None or isinstance(v, str), "null or a map name",
                                "store map column for the explicit branch (CLIP Surgery maps)")


@dataclass
class PpoSettings:
    gamma: float = _key(0.99, _real(0, 1), "a number in [0, 1]", "paper")
    clip_param: float = _key(0.2, _real(above=0), "a number > 0", "paper")
    num_epochs: int = _key(20, _whole(1), "a whole number >= 1", "paper: K = 20")
    lr: float = _key(1.0e-4, _real(above=0), "a number > 0 (a negative rate would train by gradient ascent)",
                     "paper: Adam 1e-4")
    lambda_: float = _key(1.0, _real(0, 1), "a number in [0, 1]", "paper Eq. 6: the discounted return (GAE lambda 1)")
    entropy_coeff: float = _key(0.01, _real(0), "a number >= 0")
    vf_loss_coeff: float = _key(0.5, _real(0), "a number >= 0")
    vf_clip_param: float = _key(20.0, _real(above=0), "a number > 0", "returns reach +-T; RLlib's 10 would clip")
    use_kl_loss: bool = _key(False, _BOOL, "true or false", "RLlib turns a KL penalty on; the paper's PPO-clip has none")
    train_batch_size: int = _key(600, _whole(1), "a whole number >= 1", "env steps per PPO update (40 episodes)")
    minibatch_size: int = _key(150, _whole(1), "a whole number >= 1")
    grad_clip: float | None = _key(1.0, lambda v: v is None or _real(above=0)(v), "null or a number > 0")


@dataclass
class ModelSettings:
    width: int = _key(64, _whole(1), "a whole number >= 1", "channels of the policy trunk")
    time_input: bool = _key(True, _BOOL, "true or false", "the critic sees t / T")
    precision: str = _key("fp32", _one_of("fp32", "bf16"), "'fp32' or 'bf16'",
                          "bf16: the trunk and the SRM train under bfloat16 autocast (docs/agent.md#precision)")


@dataclass
class ResourceSettings:
    num_env_runners: int = _key(1, _whole(0), "a whole number >= 0")
    num_envs_per_env_runner: int = _key(4, _whole(1), "a whole number >= 1",
                                        "k episodes per EnvRunner, one batched decoder call per step")
    num_cpus_per_env_runner: float = _key(0.5, _real(0), "a number >= 0",
                                          "a trial needs 1 CPU + this per runner; 0.5 fits 2 cores")
    num_gpus_per_learner: float | str = _key("auto", lambda v: v == "auto" or _real(0)(v),
                                             "'auto' or a number >= 0", "auto: 1 if CUDA is visible, else 0")
    sample_timeout_s: float = _key(600, _real(above=0), "a number > 0 (seconds)")


@dataclass
class TrainSettings:
    iterations: int = _key(30, _whole(1), "a whole number >= 1")
    checkpoint_every: int = _key(10, _whole(1), "a whole number >= 1")
    seed: int = _key(0, _whole(0), "a whole number >= 0")
    val_images: int = _key(0, _whole(0), "a whole number >= 0",
                           "k > 0: the train split's last k images are held out (`alignsam tune` selects on them)")


@dataclass
class RunConfig:
    """A training run: every key of a run config YAML with its default. ``asdict(RunConfig())`` is
    ``DEFAULTS``; the checks are each key's ``check`` (``CHECKS``)."""
    task: str | None = _key(None, doc='a name for reports ("synthetic_blur", "blur", "voc_cat", ...)')
    store: str | None = _key(None, doc="embedding store of the task (`alignsam embed`); relative = to the cwd")
    run_dir: str | None = _key(None, doc="checkpoints, TensorBoard logs; default runs/<task>")
    env: EnvSettings = field(default_factory=EnvSettings)
    srm: SrmSettings = field(default_factory=SrmSettings)
    ppo: PpoSettings = field(default_factory=PpoSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict:
        """The nested dict (YAML, Tune)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A nested dict (``to_dict``, a saved config.yaml) -> RunConfig; keys it lacks take the default, keys
        the schema does not know are ignored (``load_config`` is the strict, checked way in)."""
        def build(schema, values):
            out = {}
            for f in fields(schema):
                if f.name not in (values or {}):
                    continue
                v = values[f.name]
                sub = f.default_factory if isinstance(f.default_factory, type) and is_dataclass(f.default_factory) else None
                out[f.name] = build(sub, v) if sub else copy.deepcopy(v)
            return schema(**out)
        return build(cls, d)


@dataclass
class EnvConfig:
    """What ``env.make_env`` reads (RLlib's env_config): the run's env and SRM settings (defaults from
    ``EnvSettings`` / ``SrmSettings``) plus the keys of one env instance."""
    store: str | None = None
    store_actor: str | None = None  # name of a published store (zero-copy reads from the object store)
    split: str = "train"
    grid: int | list | None = EnvSettings.grid
    patch_size: int = EnvSettings.patch_size
    resize: int = EnvSettings.resize
    horizon: int = EnvSettings.horizon
    obs_res: int = EnvSettings.obs_res
    state: str = EnvSettings.state
    reward: str = EnvSettings.reward
    iou_gain_weight: float = EnvSettings.iou_gain_weight
    holdout: int = 0  # the split's last k images kept out of episodes (train.val_images)
    init: str = "gt"  # "gt" (training) | "srm" (evaluation)
    labels: str = "srm"  # "srm" | "gt" (oracle) | "positive" (w/o SRM)
    srm_branch: str = SrmSettings.branch
    text_map: str | None = SrmSettings.text_map
    collect_srm_samples: bool = False
    torch_threads: int | None = None
    seed: int | None = None


@dataclass
class SweepConfig:
    """An `alignsam tune` sweep file: every key with its default (``SWEEP_DEFAULTS``) and check."""
    name: str = _key("sweep", lambda v: isinstance(v, str) and v != "", "a non-empty name")
    storage: str = _key("tune_results", lambda v: isinstance(v, str) and v != "", "a folder or a URI")
    tasks: list | None = _key(None, lambda v: isinstance(v, list) and len(v) > 0,
                              "a list of at least one base run config (tune_configs/<task>.yaml)")
    store_root: str | None = _key(None, lambda v: v is None or isinstance(v, str), "null or a folder / URI")
    overrides: dict = _key({}, lambda v: isinstance(v, dict), "a mapping of dotted run-config keys")
    search: dict = _key({}, lambda v: isinstance(v, dict), "a mapping of dotted run-config keys to searched values")
    num_samples: int = _key(1, _whole(1), "a whole number >= 1")
    val_images: int = _key(10, _whole(1), "a whole number >= 1 (the held-out validation images)")
    metric: str = _key("val_miou", _one_of(*VAL_METRICS), f"one of {', '.join(VAL_METRICS)} (measured on the "
                       "validation split)")
    scheduler: str = _key("none", _one_of("none", "asha"), "'none' or 'asha'")
    asha: dict = _key({"grace_period": 5, "reduction_factor": 3}, lambda v: isinstance(v, dict),
                      "a mapping {grace_period, reduction_factor}")
    max_concurrent: int | None = _key(None, lambda v: v is None or _whole(1)(v), "null or a whole number >= 1")


def checks(schema) -> tuple:
    """(dotted key, test, what the value must be) for every checked key of a config dataclass."""
    out = []
    for f in fields(schema):
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            out += [(f"{f.name}.{k}", ok, want) for k, ok, want in checks(f.default_factory)]
        elif f.metadata.get("check"):
            out.append((f.name, f.metadata["check"], f.metadata["want"]))
    return tuple(out)


DEFAULTS: dict = asdict(RunConfig())
CHECKS = tuple(c for c in checks(RunConfig) if "." in c[0])  # the sections' keys (task/store: checked on use)


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def merge_config(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in base:
            raise ConfigError(f"unknown config key {where + key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + key!r} must be a mapping")
            out[key] = merge_config(base[key], value, f"{where}{key}.")
        else:
            numeric = isinstance(base[key], (int, float)) and not isinstance(base[key], bool)
            out[key] = _number(value, whole=isinstance(base[key], int)) if numeric else value
    return out


def _number(value, whole: bool = False):
    """YAML 1.1 reads 1e-4 (no dot) as a string; take it as the float it means (a whole-number key:
    the int, e.g. 1e3 -> 1000)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if whole and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def load_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


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
        node[parts[-1]] = load_yaml(value, f"override {item!r}")
    return out


def from_store(store: str) -> dict:
    """Config keys for a store used without a YAML file (``alignsam train --store STORE``): its task
    (the store's single task) and the paper's SRM branch for it (Table 4: explicit for shadow and the
    PASCAL classes, reading the store's CLIP Surgery map of the task's text; implicit otherwise)."""
    from .store.shards import read_manifest

    tasks = read_manifest(store).get("tasks") or []
    if len(tasks) != 1:
        raise ConfigError(f"store {store!r} holds {len(tasks)} tasks ({tasks}); train one task per store, or give "
                          "--config with 'task' and the SRM settings")
    return {"task": tasks[0], "store": store, "srm": paper_srm(tasks[0])}


EXPLICIT_TASKS = ("shadow", "synthetic_shadow", "synthetic_shapes")  # + every voc_<class>; the synthetic analogues
                                                                     # follow their benchmark (shapes: the VOC analogue)


def paper_srm(task: str) -> dict:
    """The paper's SRM branch for a task (Table 4): explicit (reading the store's CLIP Surgery map of the
    task's text, ``map_<text>``) for shadow and the PASCAL classes, implicit for blur, glass, saliency."""
    from .data.samples import TASK_TEXT
    from .store.embed import map_name

    if task in EXPLICIT_TASKS or task.startswith("voc_"):
        return {"branch": "explicit", "text_map": map_name(TASK_TEXT.get(task, task))}
    return {"branch": "implicit"}


def _check_text_map(cfg: RunConfig) -> None:
    """The explicit branch reads the store's map_<text_map> column: say so before Ray starts if it is missing."""
    if cfg.srm.branch != "explicit" or not cfg.srm.text_map or not os.path.isdir(cfg.store):
        return  # (a store that is missing or remote is reported where it is opened)
    from .store.shards import read_manifest

    maps = read_manifest(cfg.store).get("maps") or []
    if cfg.srm.text_map not in maps:
        raise ConfigError(
            f"the explicit SRM branch reads the store's CLIP Surgery map {cfg.srm.text_map!r}, but store "
            f"{cfg.store!r} has {maps or 'no maps'}: embed it with --clip-model ViT-B-16 --clip-weights FILE "
            "(or --clip-model micro on synthetic data), or train the implicit branch: srm.branch=implicit")


def load_config(path: str | None = None, overrides: list[str] | dict | None = None,
                store: str | None = None) -> RunConfig:
    """Defaults <- ``from_store(store)`` (when given) <- YAML file <- overrides, checked (``validate``);
    relative paths are made absolute against the cwd."""
    raw = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        with open(path) as f:
            raw = load_yaml(f.read(), f"config file {path!r}") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must be a YAML mapping (key: value lines), "
                              f"not a {type(raw).__name__}")
    cfg = merge_config(merge_config(DEFAULTS, from_store(store)) if store else DEFAULTS, raw)
    if store:
        cfg["store"] = store
    if overrides:
        cfg = merge_config(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if not cfg["store"]:
        raise ConfigError("the config needs 'store': the embedding store of the task (`alignsam embed --out STORE`)")
    cfg["task"] = cfg["task"] or os.path.basename(os.path.normpath(cfg["store"]))
    cfg["run_dir"] = cfg["run_dir"] or os.path.join("runs", cfg["task"])
    for key in ("store", "run_dir"):
        if "://" not in cfg[key]:  # a store may be a pyarrow URI (s3://bucket/stores/blur)
            cfg[key] = os.path.abspath(cfg[key])
    run = validate(RunConfig.from_dict(cfg))
    _check_text_map(run)
    return run


def validate(run: RunConfig) -> RunConfig:
    """Check every value's type and range, and the values that depend on each other; raise one
    ConfigError with one line per problem. Returns ``run``."""
    from .env.grid import PatchGrid

    cfg = run.to_dict()
    problems = []
    for key, ok, want in CHECKS:
        section, name = key.split(".")
        value = cfg[section][name]
        if not ok(value):
            problems.append(f"{key} must be {want}, got {value!r}")
    bad = {p.split(" ", 1)[0] for p in problems}
    e, p = cfg["env"], cfg["ppo"]
    grid = e["grid"]
    if grid is not None and not (_whole(2)(grid) or (isinstance(grid, (list, tuple)) and len(grid) == 2
                                                     and all(_whole(2)(g) for g in grid))):
        problems.append(f"env.grid must be null, a whole number >= 2 or [rows, cols] (each >= 2), got {grid!r}")
    elif not bad & {"env.patch_size", "env.resize", "env.horizon"}:
        try:
            n = PatchGrid.from_config(grid, e["patch_size"], e["resize"]).n
            if e["horizon"] > n:
                problems.append(f"env.horizon (T = {e['horizon']}) must be <= the {n} patches of the grid: "
                                "each step picks a patch not picked before")
        except ValueError as exc:
            problems.append(f"env.grid / env.patch_size / env.resize: {exc}")
    if not bad & {"ppo.minibatch_size", "ppo.train_batch_size"} and p["minibatch_size"] > p["train_batch_size"]:
        problems.append(f"ppo.minibatch_size ({p['minibatch_size']}) must be <= ppo.train_batch_size "
                        f"({p['train_batch_size']})")
    if cfg["srm"]["branch"] == "explicit" and not cfg["srm"]["text_map"]:
        problems.append("srm.text_map must name the store's CLIP map column for srm.branch=explicit "
                        "(`alignsam embed --clip-model ...`)")
    if problems:
        raise ConfigError(f"{len(problems)} bad config value(s):\n  " + "\n  ".join(problems))
    return run


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def env_config(cfg: RunConfig, **extra) -> dict:
    """The env_config (a dict: RLlib's form) for ``alignsam_ray.env.make_env`` from a run config."""
    e = cfg.env
    return asdict(EnvConfig(store=cfg.store, grid=e.grid, patch_size=e.patch_size, resize=e.resize,
                            horizon=e.horizon, obs_res=e.obs_res, state=e.state, reward=e.reward,
                            iou_gain_weight=e.iou_gain_weight, srm_branch=cfg.srm.branch, text_map=cfg.srm.text_map,
                            **extra))

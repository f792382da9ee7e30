"""Research tooling in tools/ (not installed): runs as modules from the repository root, its training
defaults are the shipped weights' recipes, and it never overwrites the shipped weights by accident."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "alignsam_ray" / "weights"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["tools.micro_sam.train", "tools.micro_clip.train"])
def test_training_tool_runs_as_a_module_from_the_repository_root(module):
    run = _run(module, "--help")
    assert run.returncode == 0, run.stderr
    assert f"usage: python -m {module}" in run.stdout and "--overwrite-shipped" in run.stdout


@pytest.mark.parametrize("module, shipped", [("tools.micro_sam.train", "micro_sam.pt"),
                                             ("tools.micro_clip.train", "micro_clip.pt")])
def test_training_tool_refuses_to_overwrite_the_shipped_weights(module, shipped):
    before = (WEIGHTS / shipped).stat().st_mtime_ns
    run = _run(module, "--out", f"alignsam_ray/weights/{shipped}", "--steps", "1")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "would overwrite" in run.stderr and "--overwrite-shipped" in run.stderr
    assert (WEIGHTS / shipped).stat().st_mtime_ns == before


def test_micro_sam_training_defaults_are_the_shipped_recipe():
    """`python -m tools.micro_sam.train` with no arguments = the command recorded in weights/micro_sam.json
    (but for --out, which defaults to micro_sam.pt in the current directory)."""
    from tools.micro_sam import train

    meta = json.loads((WEIGHTS / "micro_sam.json").read_text())
    words = shlex.split(meta["command"])
    assert words[:3] == ["python", "-m", "tools.micro_sam.train"]
    recorded = vars(train.parser().parse_args(words[3:]))
    defaults = vars(train.parser().parse_args([]))
    assert recorded.pop("out") == "alignsam_ray/weights/micro_sam.pt" and defaults.pop("out") == "micro_sam.pt"
    assert defaults == recorded
    # the keys recorded beside the command ("steps" there is the steps done within the time budget)
    renamed = {"minutes_budget": "minutes"}
    for key, value in meta.items():
        if renamed.get(key, key) in defaults and key != "steps":
            assert defaults[renamed.get(key, key)] == value, key
    assert defaults["steps"] >= meta["steps"]


def test_micro_clip_training_defaults_are_the_shipped_recipe():
    from alignsam_ray.foundation.micro_clip import MICRO_CLIP_CFG
    from tools.micro_clip import train

    meta = json.loads((WEIGHTS / "micro_clip.json").read_text())
    assert shlex.split(meta["command"]) == ["python", "-m", "tools.micro_clip.train"]  # no arguments: the defaults
    defaults = vars(train.parser().parse_args([]))
    for key in ("seed", "steps", "batch", "lr", "weight_decay", "warmup", "gen_size", "threads"):
        assert defaults[key] == meta[key], key
    assert defaults["pool"] is None and defaults["layers"] is None and meta["model_cfg"] == MICRO_CLIP_CFG
    assert defaults["out"] == "micro_clip.pt"

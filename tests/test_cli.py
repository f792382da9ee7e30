"""The `alignsam` command line: help and clear errors before any heavy work."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alignsam_ray.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "alignsam_ray", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "embed", "train", "evaluate", "tune", "export", "segment"):
        assert cmd in out.stdout


def test_version(capsys):
    from alignsam_ray import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"alignsam {__version__}"
    assert __version__[0].isdigit()


def _folder(root, mask_size=(20, 30)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images" / "a.JPG")
    Image.fromarray(np.zeros(mask_size, np.uint8)).save(root / "masks" / "a.png")
    return root


def test_embed_reports_bad_data_with_the_file_name(tmp_path, capsys):
    root = _folder(tmp_path / "ds", mask_size=(10, 10))
    assert main(["embed", "--data", str(root), "--out", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "error" in err


def test_embed_needs_a_local_checkpoint_for_official_sam(tmp_path, capsys):
    root = _folder(tmp_path / "ds")
    assert main(["embed", "--data", str(root), "--sam", "vit_b", "--out", str(tmp_path / "store")]) == 1
    assert "needs --checkpoint" in capsys.readouterr().err


def test_embed_sam3_without_the_package_names_the_install_commands(tmp_path, capsys, monkeypatch):
    """As on a machine without the [sam3] extra (sys.modules[name] = None: Python's own 'not importable')."""
    from alignsam_ray.sam_types import SAM3_INSTALL

    monkeypatch.setitem(sys.modules, "sam3", None)
    monkeypatch.setitem(sys.modules, "sam3.model_builder", None)
    root = _folder(tmp_path / "ds")
    assert main(["embed", "--data", str(root), "--sam", "sam3", "--checkpoint", str(tmp_path / "sam3.pt"),
                 "--out", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert "needs the official `sam3` package" in err and SAM3_INSTALL in err and "Traceback" not in err


def test_train_config_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("store: somewhere\n")
    assert main(["train", "--config", str(cfg), "ppo.learning_rate=1e-3"]) == 1
    assert "unknown config key 'ppo.learning_rate'" in capsys.readouterr().err


def test_evaluate_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "eval")]) == 1
    assert "nope" in capsys.readouterr().err


def test_ray_chatter_goes_to_a_log_file_errors_still_print(tmp_path):
    """What a user reads is the CLI's own lines: Ray/RLlib notices and Python warnings land in the log
    file; errors still reach the terminal. (A subprocess: the routing changes process-wide logging.)"""
    path = tmp_path / "logs" / "train.log"
    code = (
        "import logging, warnings\n"
        "from alignsam_ray.ray_session import route_ray_logs\n"
        f"route_ray_logs({str(path)!r})\n"
        "logging.getLogger('ray.rllib.algorithms.algorithm_config').warning('You are running PPO on the new API stack!')\n"
        "logging.getLogger('ray.tune.utils.util').warning('Install gputil for GPU system monitoring.')\n"
        "warnings.warn('`use_polars` is deprecated', DeprecationWarning)\n"
        "logging.getLogger('ray.rllib').error('an EnvRunner failed')\n"
    )
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    assert "new API stack" in text and "gputil" in text and "use_polars" in text and "EnvRunner failed" in text
    for chatter in ("new API stack", "gputil", "use_polars"):
        assert chatter not in out.stderr + out.stdout
    assert "an EnvRunner failed" in out.stderr


def test_native_lines_go_to_the_log_python_lines_to_the_terminal(tmp_path):
    """Ray's C++ parts write to fd 2 directly (the token-authentication notice, core-worker notices):
    inside ``native_to_log`` those land in the log file, while Python's own stderr (progress bars, errors)
    and everything after the block still reach the terminal; RLlib's import-time handler is taken off."""
    path = tmp_path / "logs" / "demo.log"
    code = (
        "import logging, os, sys\n"
        "from alignsam_ray.ray_session import native_to_log, route_ray_logs\n"
        f"route_ray_logs({str(path)!r}, ('ray.rllib',))\n"
        "with native_to_log():\n"
        "    os.write(2, b'core_worker.cc: constructor arguments\\n')\n"
        "    logging.getLogger('ray').handlers.clear()  # as ray.init() does before its token notice\n"
        "    logging.getLogger('ray._private.auth').warning('Token authentication is enabled')\n"
        "    print('embedding: 50%', file=sys.stderr)\n"
        "    logging.getLogger('ray.rllib.env').warning('You are running PPO on the new API stack!')\n"
        "    logging.getLogger('ray.rllib').error('an EnvRunner failed')\n"
        "os.write(2, b'after the block\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    for chatter in ("core_worker.cc", "Token authentication", "new API stack"):
        assert chatter in text and chatter not in out.stderr, chatter
    assert "embedding: 50%" in out.stderr and "an EnvRunner failed" in out.stderr and "after the block" in out.stderr


def test_train_from_a_store_without_yaml(blur_store, tmp_path):
    """`alignsam train --store STORE`: the task is the store's, the paper's SRM branch for it, the paper's
    defaults otherwise; an explicit-branch task whose store lacks its CLIP map is refused before Ray starts."""
    import json
    import shutil

    from alignsam_ray.config import ConfigError, load_config

    cfg = load_config(None, ["train.iterations=3"], store=blur_store)
    assert cfg.task == "synthetic_blur" and cfg.srm.branch == "implicit" and cfg.train.iterations == 3
    assert cfg.store == blur_store and cfg.ppo.lr == 1e-4
    shadow = tmp_path / "shadow_store"  # a copy of the store whose task is a paper task with the explicit branch
    shutil.copytree(blur_store, shadow)
    manifest = json.loads((shadow / "manifest.json").read_text())
    manifest["tasks"] = ["shadow"]
    (shadow / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="map 'shadow'.*--clip-model"):
        load_config(None, [], store=str(shadow))
    assert load_config(None, ["srm.branch=implicit"], store=str(shadow)).srm.branch == "implicit"
    assert main(["train"]) == 1  # neither --store nor --config

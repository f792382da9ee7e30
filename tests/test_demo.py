"""`alignsam demo`: the embedded default end to end (what `bash scripts/demo.sh` runs), shrunk."""
from __future__ import annotations

import json
import os

import pytest
import ray
import yaml

from alignsam_ray.cli import main


def test_demo_refuses_an_unknown_task(capsys):
    assert main(["demo", "--tasks", "synthetic_cats"]) == 2
    assert "unknown task(s) ['synthetic_cats']" in capsys.readouterr().err


@pytest.mark.integration
def test_demo_trains_the_voc_analogue_with_the_explicit_srm_and_prints_table2(tmp_path, capfd):
    out = tmp_path / "demo"
    ray_was_up = ray.is_initialized()
    assert main(["demo", "--out", str(out), "--n-train", "6", "--n-test", "4", "--iterations", "1",
                 "--env-runners", "1"]) == 0
    terminal = capfd.readouterr()
    assert "AlignSAM - method" in terminal.out  # the table is printed
    for chatter in ("new API stack", "gputil", "has been deprecated", "Token authentication"):  # -> the log file
        assert chatter not in terminal.out + terminal.err, chatter
    assert sorted(os.listdir(out / "data")) == ["synthetic_shapes"]  # only the task it trains is made and embedded
    manifest = json.loads((out / "stores" / "synthetic_shapes" / "manifest.json").read_text())
    assert manifest["maps"] == ["star"]  # the micro CLIP's CLIP Surgery map of the task's text
    cfg = yaml.safe_load((out / "runs" / "synthetic_shapes" / "config.yaml").read_text())
    assert (cfg["srm"]["branch"], cfg["srm"]["text_map"], cfg["srm"]["lr"]) == ("explicit", "star", 1e-4)  # paper Table 4 / defaults
    report = (out / "report.md").read_text()
    for row in ("w/o RL (random actions)", "w/o SRM (every point positive)", "SRM start, every later point positive",
                "w/o multi-step (T = 1)", "**AlignSAM**",
                "non-RL: the T best SRM cells", "oracle labels", "AlignSAM - method, mIoU [95% CI]",
                "T = 1:", "T = 15:", "| evaluation |", "Resolution: with 4 test images the paired intervals' half-widths run from",
                "--test-images 300"):
        assert row in report, row
    figures = sorted(os.listdir(out / "eval" / "synthetic_shapes" / "figures"))
    assert figures and all(f"eval/synthetic_shapes/figures/{f}" in report for f in figures)
    timing = json.loads((out / "timing.json").read_text())
    for phase in ("synthesis + embedding", "training", "training: sampling", "training: PPO learner",
                  "training: SRM updates", "evaluation", "total"):
        assert timing[phase] >= 0, phase
    assert timing["training: sampling"] + timing["training: PPO learner"] <= timing["training"] <= timing["total"]
    metrics = json.loads((out / "eval" / "synthetic_shapes" / "metrics.json").read_text())
    assert set(metrics["paired"]) == {"random_actions", "all_positive", "srm_start_positive", "single_step", "srm_topk",
                                      "gt_labels", "persam", "persam_mean", "clip_points"}  # + the training-free baselines
    assert ray.is_initialized() == ray_was_up  # a Ray the demo started is shut down with it
    bundle = out / "bundles" / "synthetic_shapes"  # what `alignsam app` opens, with no other file
    assert f"alignsam app --bundle {bundle} --eval {out / 'eval' / 'synthetic_shapes'}" in terminal.out
    examples = sorted(os.listdir(bundle / "examples"))
    assert len(examples) == 4 and timing["export"] >= 0
    from alignsam_ray.data.samples import read_image
    from alignsam_ray.predictor import AlignSAMPredictor

    image = read_image(str(bundle / "examples" / examples[0]))
    assert AlignSAMPredictor(str(bundle)).predict(image).mask.shape == image.shape[:2]

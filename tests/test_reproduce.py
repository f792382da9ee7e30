"""`alignsam reproduce`: benchmark discovery, the paper's figures as data, the report's tables, resumability
checks, clear errors; and (integration) the whole --smoke path on the synthetic tasks laid out as the public
benchmarks with a random-weight vit_b checkpoint in Meta's format."""
from __future__ import annotations

import json
import os

import pytest

from alignsam_ray.cli import main
from alignsam_ray.config import ConfigError
from alignsam_ray.data import DataError
from alignsam_ray.data.samples import VOC_CLASSES
from alignsam_ray.evaluate import METHODS, T_SWEEP
from alignsam_ray.metrics import primary_metrics
from alignsam_ray.reproduce import (
    BENCHMARKS,
    _check_settings,
    build_tables,
    find_benchmarks,
    load_paper_figures,
    report_markdown,
)

UNITS = ("percent", "fraction")


def test_paper_figures_file_is_well_formed():
    """One data file with table and row names in the paper's layout: every cell names a known task and its
    paper metric (or a VOC class, or T), every value is a number in its unit's range or null, each table has
    its source."""
    paper = load_paper_figures()
    assert set(paper["tables"]) == {"table2", "table3", "table4", "table5"} == set(paper["sources"])
    assert set(paper["units"].values()) <= set(UNITS)
    t = paper["tables"]
    ours = ["alignsam", "random_actions", "all_positive", "single_step"]
    assert list(t["table2"]["rows"]) == ["SAMed", "SEEM", "Painter", "PerSAM"] + ours
    assert list(t["table3"]["rows"]) == ["MSA", "SAMed", "SEEM", "Painter", "PerSAM"] + ours[:3]
    assert set(ours) <= set(METHODS)
    assert sorted(t["table3"]["columns"]) == sorted(["mean", *VOC_CLASSES[1:]])
    assert list(t["table4"]["rows"]) == ["implicit", "explicit"]
    assert t["table4"]["columns"][-1] == "voc.iou_dataset" and len(t["table4"]["columns"]) == 5
    assert [int(c) for c in t["table5"]["columns"]] == list(T_SWEEP)
    assert set(t["table5"]["rows"]) == {*VOC_CLASSES[1:], "mean"}
    for key, table in t.items():
        for col in table["columns"]:
            if key not in ("table3", "table5"):
                task, metric = col.split(".")
                assert task in BENCHMARKS.values() and metric in primary_metrics(task), col
        for row, cells in table["rows"].items():
            assert list(cells) == table["columns"], (key, row)
            for col, v in cells.items():
                unit = paper["units"][table.get("metric") or col.split(".")[-1]]
                assert v is None or (isinstance(v, (int, float)) and 0 <= v <= (100 if unit == "percent" else 1)), \
                    (key, row, col, v)


PAPER_ROWS = {"Ours": "alignsam", "Ours w/o RL": "random_actions", "Ours w/o SRM": "all_positive",
              "Ours w/o MSI": "single_step", "implicit": "implicit", "explicit": "explicit"}
PAPER_COLUMNS = {"mIoU (20)": "mean", "semantic (VOC) mIoU": "voc.iou_dataset", "saliency E_phi": "saliency.emeasure",
                 "blur F_beta": "blur.fbeta", "glass F_beta": "glass.fbeta"}


def _transcription(path: str) -> dict:
    """{table: {row: {column: value}}} of every figure in the paper's tables as transcribed in Markdown
    (tests/fixtures/paper_tables.md, a copy of the transcription made from the paper)."""
    tables, key, header = {}, None, None
    for line in open(path).read().splitlines():
        if line.startswith("## Table "):
            key, header = "table" + line.split()[2].rstrip(":"), None
            tables[key] = {}
        elif key and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = [PAPER_COLUMNS.get(c, c.replace("T = ", "").replace(" ", ".").replace("mIoU", "miou")
                                            .replace("BER", "ber").replace("MAE", "mae")) for c in cells[1:]]
                continue
            try:
                values = [float(c) for c in cells[1:]]
            except ValueError:  # Table 1: names, no figures
                continue
            tables[key][PAPER_ROWS.get(cells[0], cells[0])] = dict(zip(header, values))
    return {k: v for k, v in tables.items() if v}


def test_paper_figures_match_the_transcription():
    """Every figure of the paper's Tables 2-5 is in paper_figures.json at its row and column, and every
    number in the file is one of them: a cell the paper does not print is null (10 classes in Table 3,
    16 in Table 5), nothing else is."""
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "paper_tables.md")
    printed = _transcription(fixture)
    assert set(printed) == {"table2", "table3", "table4", "table5"}
    assert sum(len(cells) for rows in printed.values() for cells in rows.values()) == 64 + 88 + 10 + 20
    paper = load_paper_figures()["tables"]
    for key, rows in printed.items():
        for row, cells in rows.items():
            for col, v in cells.items():
                assert paper[key]["rows"][row][col] == v, (key, row, col)
        held = {(row, col): v for row, cells in paper[key]["rows"].items() for col, v in cells.items() if v is not None}
        assert held == {(row, col): v for row, cells in rows.items() for col, v in cells.items()}, key
    unprinted = {"aeroplane", "bicycle", "bird", "boat", "bus", "diningtable", "motorbike", "pottedplant", "train",
                 "tvmonitor"}
    assert {c for c in paper["table3"]["columns"] if paper["table3"]["rows"]["alignsam"][c] is None} == unprinted


def test_find_benchmarks(tmp_path):
    for name in ("CUHK-blur", "SBU-shadow", "MSD", "voc2012", ".synthetic", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "DUTS.txt").write_text("a file, not a folder")
    found = find_benchmarks(str(tmp_path))
    assert list(found) == ["cuhk", "sbu", "msd", "voc"]  # the paper's order
    assert found["voc"].endswith("voc2012")
    (tmp_path / "VOCdevkit").mkdir()
    with pytest.raises(DataError, match="two VOC folders"):
        find_benchmarks(str(tmp_path))
    with pytest.raises(DataError, match="no benchmark folder under .*CUHK"):
        find_benchmarks(str(tmp_path / "notes"))
    with pytest.raises(DataError, match="is not a folder"):
        find_benchmarks(str(tmp_path / "missing"))


def _metrics(miou: float, ci=(0.05, 0.05), ber: float = 10.0) -> dict:
    """A metrics.json as `alignsam evaluate` writes it (every method and T alike)."""
    row = {"miou": miou, "iou_dataset": miou, "fbeta": miou, "emeasure": miou, "mae": 1 - miou, "ber": ber,
           "ci95": {"miou": [miou - ci[0], miou + ci[1]], "iou_dataset": [miou - ci[0], miou + ci[1]],
                    "ber": [ber - 1, ber + 1]}}
    return {"n_images": 10, "methods": {m: dict(row) for m in METHODS}, "t_sweep": {str(t): dict(row) for t in T_SWEEP}}


def test_tables_put_ours_beside_the_papers():
    paper = load_paper_figures()
    evals = {"shadow": _metrics(0.8), "shadow_implicit": _metrics(0.7), "voc_cat": _metrics(0.60, (0.02, 0.02)),
             "voc_dog": _metrics(0.70, (0.04, 0.04)), "voc_cat_implicit": _metrics(0.40)}
    evals["voc_cat"]["methods"]["all_positive"]["iou_dataset"] = 0.2
    evals["voc_dog"]["methods"]["all_positive"]["iou_dataset"] = 0.3
    evals["voc_cat"]["t_sweep"]["5"]["iou_dataset"] = 0.5
    tables = build_tables(evals, paper)
    assert list(tables) == ["table2", "table3", "table4", "table5", "table5_tasks"]
    t2, t3, t4, t5, ext = (tables[k]["rows"] for k in tables)
    # Table 2: the competitors are reference lines; ours beside the paper's figure
    assert tables["table2"]["reference_rows"] == ["SAMed", "SEEM", "Painter"]
    assert t2["SAMed"]["shadow.miou"] == {"ours": None, "ci95": None, "paper": 17.24, "diff": None, "paper_in_ci": None}
    shadow = t2["alignsam"]["shadow.miou"]
    assert shadow["ours"] == pytest.approx(80.0) and shadow["paper"] == 30.78 and shadow["diff"] == pytest.approx(49.22)
    assert shadow["paper_in_ci"] is False and t2["alignsam"]["shadow.ber"]["ours"] == pytest.approx(10.0)  # BER: %
    assert t2["alignsam"]["blur.miou"]["ours"] is None and t2["alignsam"]["blur.miou"]["paper"] == 68.47  # no CUHK
    assert t2["PerSAM"]["blur.miou"]["paper"] == 55.84  # our PerSAM row when evaluations have a `persam` method
    # Table 3: classes and their mean (the classes' intervals combined), the w/o SRM row, unprinted classes
    voc = t3["alignsam"]["mean"]
    assert voc["ours"] == pytest.approx(65.0) and voc["paper"] == 62.09 and voc["diff"] == pytest.approx(2.91)
    half = 100 * 1.96 * ((0.02 / 1.96) ** 2 + (0.04 / 1.96) ** 2) ** 0.5 / 2
    assert voc["ci95"] == pytest.approx([65 - half, 65 + half]) and voc["n_classes"] == 2
    assert voc["paper_in_ci"] is False  # 62.09 < 65 - 2.24
    assert t3["alignsam"]["cat"]["ours"] == pytest.approx(60.0) and t3["alignsam"]["cat"]["paper"] == 85.99
    assert t3["all_positive"]["mean"]["ours"] == pytest.approx(25.0)
    assert t3["all_positive"]["mean"]["diff"] == pytest.approx(25.0 - 27.73)
    assert t3["alignsam"]["bus"]["ours"] is None and t3["alignsam"]["bus"]["paper"] is None
    assert t3["MSA"]["mean"]["paper"] == 47.12 and "MSA" in tables["table3"]["reference_rows"]
    # Table 4: the run trained with each branch; VOC: the mean over the classes of that branch's runs
    assert t4["explicit"]["shadow.miou"]["ours"] == pytest.approx(80.0)
    assert t4["implicit"]["shadow.miou"]["ours"] == pytest.approx(70.0)
    assert t4["explicit"]["voc.iou_dataset"]["ours"] == pytest.approx(65.0)
    assert t4["implicit"]["voc.iou_dataset"]["ours"] == pytest.approx(40.0)
    assert t4["implicit"]["voc.iou_dataset"]["paper"] == 46.03
    # Table 5: VOC classes x T; the other tasks' sweep in our own table, no paper figures there
    assert t5["cat"]["5"]["ours"] == pytest.approx(50.0) and t5["cat"]["5"]["paper"] == 81.37
    assert t5["dog"]["5"]["paper"] is None and t5["mean"]["5"]["ours"] == pytest.approx(60.0)
    assert ext["15"]["shadow.miou"]["ours"] == pytest.approx(80.0) and ext["15"]["shadow.miou"]["paper"] is None
    text = report_markdown(tables, paper, "# header")
    assert "| AlignSAM |" in text and "65.00 [62.76, 67.24] / 62.09 (+2.91)" in text
    assert "| *SAMed* | 55.44 | 71.68 | 17.24 |" in text
    assert "25.00 [" in text and "/ 27.73 (-2.73)" in text
    assert "not run / 68.47" in text and "not run / not published" in text
    assert "n/a" not in text
    outside = [line for line in text.splitlines() if line.startswith("Paper's figure outside")]
    assert len(outside) == 4 and "alignsam mean" in outside[1]
    assert "Our VOC means are over the classes run (2 of 20)" in text
    for title in ("Table 2", "Table 3", "Table 4", "Table 5", "Our extension"):
        assert f"## {title}:" in text


def test_settings_of_a_reproduction_are_kept(tmp_path):
    settings = {"sam": "vit_h", "smoke": False, "n_train": 50}
    _check_settings(str(tmp_path / "out"), settings)
    _check_settings(str(tmp_path / "out"), settings)  # the same: resumes
    with pytest.raises(ConfigError, match="other settings .*smoke: False there, True now"):
        _check_settings(str(tmp_path / "out"), {**settings, "smoke": True})


def test_cli_errors_are_clear(tmp_path, capsys):
    from alignsam_ray.data.synthetic import write_public_layouts

    data = tmp_path / "data"
    write_public_layouts(str(data), 2, 1, tasks=("synthetic_shadow",))
    assert main(["reproduce", "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "--sam vit_h needs --checkpoint" in capsys.readouterr().err
    assert main(["reproduce", "--data", str(tmp_path / "nowhere"), "--sam", "micro", "--out", str(tmp_path / "o")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    bad = tmp_path / "sam_vit_b.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["reproduce", "--data", str(data), "--sam", "vit_b", "--checkpoint", str(bad), "--clip-weights",
                 str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "sam_vit_b.pth" in err and "Traceback" not in err
    # SBU's paper branch is explicit: without CLIP weights it cannot run, said before any work
    ckpt = tmp_path / "ok.pth"
    import torch
    from segment_anything import sam_model_registry

    torch.save(sam_model_registry["vit_b"]().state_dict(), ckpt)
    assert main(["reproduce", "--data", str(data), "--sam", "vit_b", "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "o")]) == 1
    assert "shadow use the paper's explicit SRM branch" in capsys.readouterr().err
    assert not (tmp_path / "o" / "stores").exists()


def _smoke(tmp_path, capsys, sam_args: list[str], tasks: tuple) -> tuple[dict, str]:
    """`alignsam reproduce --smoke` on synthetic tasks laid out as the public benchmarks; returns
    (report.json, what the terminal showed), after checking that a rerun reuses every stage."""
    from alignsam_ray.data.synthetic import write_public_layouts

    data, out = tmp_path / "data", tmp_path / "out"
    write_public_layouts(str(data), tasks=tasks)
    argv = ["reproduce", "--data", str(data), *sam_args, "--out", str(out), "--smoke"]
    assert main(argv) == 0
    first = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    assert "SMOKE MODE" in text and "/ 62.09 (" in text and "n/a" not in text
    n_runs = len(report["runs"])
    mtimes = {p: os.path.getmtime(p) for p in (out / "eval").glob("*/metrics.json")}
    assert len(mtimes) == n_runs
    with pytest.MonkeyPatch.context() as mp:  # resumed: every stage already done, nothing recomputed, no Ray started
        mp.setattr("alignsam_ray.train.init_ray", lambda **kw: pytest.fail("a finished reproduction started Ray"))
        assert main(argv) == 0
    again = capsys.readouterr().out
    assert f"{len(tasks)} of {len(tasks)} stores already done" in again
    assert f"{n_runs} of {n_runs} runs already done" in again and f"{n_runs} of {n_runs} runs already evaluated" in again
    assert mtimes == {p: os.path.getmtime(p) for p in mtimes}
    return report, first.out + first.err


def _check_explicit_and_voc_tables(report: dict) -> None:
    t2, t3, t4, t5, ext = (report["tables"][k]["rows"] for k in ("table2", "table3", "table4", "table5",
                                                                 "table5_tasks"))
    for row in ("random_actions", "all_positive", "single_step", "alignsam"):
        assert t2[row]["shadow.miou"]["ours"] is not None and t2[row]["shadow.miou"]["ci95"] is not None
        assert t2[row]["blur.miou"]["ours"] is None and t2[row]["blur.miou"]["paper"] is not None
    for row in ("random_actions", "all_positive", "alignsam"):
        assert t3[row]["mean"]["ours"] is not None and t3[row]["aeroplane"]["ours"] == t3[row]["mean"]["ours"]
    voc = t3["alignsam"]["mean"]
    assert voc["paper"] == 62.09 and voc["diff"] == pytest.approx(voc["ours"] - 62.09)
    assert t3["alignsam"]["bus"]["ours"] is None
    assert t4["implicit"]["shadow.miou"]["ours"] is not None and t4["explicit"]["shadow.miou"]["ours"] is not None
    assert t4["implicit"]["voc.iou_dataset"]["ours"] is not None and t4["explicit"]["voc.iou_dataset"]["ours"] is not None
    assert all(t5["mean"][t]["ours"] is not None for t in ("1", "5", "10", "15", "20"))
    assert t5["cat"]["15"]["paper"] == 85.99 and t5["cat"]["15"]["ours"] is None  # a class not run
    assert all(ext[t]["shadow.miou"]["ours"] is not None for t in ("1", "5", "10", "15", "20"))
    assert {r["branch"] for r in report["runs"].values()} == {"explicit", "implicit"}
    assert set(report["runs"]) == {"shadow", "shadow_implicit", "voc_aeroplane", "voc_aeroplane_implicit"}


@pytest.mark.integration
def test_smoke_reproduction_micro(tmp_path, capsys):
    """SBU (explicit branch + Table 4's implicit run) and VOC (per class) with the micro-SAM: every
    stage, the report's four tables, the progress lines, and a rerun that reuses everything."""
    report, shown = _smoke(tmp_path, capsys, ["--sam", "micro"], ("synthetic_shadow", "synthetic_shapes"))
    _check_explicit_and_voc_tables(report)
    assert "[reproduce] train shadow_implicit: iteration 1/1" in shown and "ETA" in shown
    assert "Configuration for experiment" not in shown  # Tune's own tables go to its log


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 20 min alone on 2 cores; more when the machine is shared
def test_smoke_reproduction_official_vit_b(tmp_path, capsys):
    """The five benchmarks in their public layouts with a random-weight vit_b saved as Meta's .pth
    (loaded through segment_anything's registry), the micro CLIP for the maps. ~20 min on 2 cores."""
    import torch
    from segment_anything import sam_model_registry

    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), ckpt)
    report, _ = _smoke(tmp_path, capsys, ["--sam", "vit_b", "--checkpoint", str(ckpt), "--clip-model", "micro"],
                       ("synthetic_blur", "synthetic_shadow", "synthetic_glass", "synthetic_saliency",
                        "synthetic_shapes"))
    assert report["settings"]["sam"] == "vit_b"
    for row in ("alignsam", "random_actions", "all_positive", "single_step"):  # every benchmark, every ablation
        assert all(c["ours"] is not None for c in report["tables"]["table2"]["rows"][row].values())
    for cells in report["tables"]["table4"]["rows"].values():
        assert all(c["ours"] is not None for c in cells.values())

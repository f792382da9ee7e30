"""`alignsam app`: the page's functions as plain Python, then one check in a real headless browser."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")

from alignsam_ray.app import AppError, EvalView, Session, points_rows, read_upload, step_view  # noqa: E402
from alignsam_ray.predictor import Prediction  # noqa: E402


def _pred(n_points: int, hw=(40, 60)) -> Prediction:
    rng = np.random.default_rng(n_points)
    pts = rng.uniform(0, 40, (n_points, 2)).astype(np.float32)
    return Prediction(rng.random(hw) > 0.5, pts, (np.arange(n_points) % 2 == 0).astype(np.int64),
                      np.zeros((256, 256), np.float32))


def test_read_upload_refuses_a_non_image_and_a_huge_image(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(AppError, match="notes.png is not an image"):
        read_upload(str(text))
    with pytest.raises(AppError, match="no image"):
        read_upload(None)
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 6000)).save(huge)  # 42 megapixels (a few hundred kB of PNG)
    with pytest.raises(AppError, match=r"huge.png is 7000x6000 = 42 megapixels, more than this page takes \(40\)"):
        read_upload(str(huge))
    ok = tmp_path / "ok.png"
    Image.new("LA", (30, 20)).save(ok)
    assert read_upload(str(ok)).shape == (20, 30, 3)


def test_points_table_and_step_view():
    steps = [_pred(2 + t) for t in range(4)]
    rows = points_rows(steps[3])
    assert [r[3] for r in rows] == [0, 0, 1, 2, 3]  # the SRM's two starting points, then one pick per step
    assert [r[2] for r in rows] == ["positive", "negative", "positive", "negative", "positive"]
    assert rows[2][:2] == [round(float(steps[3].points[2, 0]), 1), round(float(steps[3].points[2, 1]), 1)]
    image = np.zeros((40, 60, 3), np.uint8)
    pic, rows, caption = step_view(image, steps, 1)
    assert pic.shape == (40, 60, 3) and len(rows) == 3 and caption.startswith("step 1 of 3: 3 points (2 positive)")
    assert step_view(image, steps, 99)[2].startswith("step 3 of 3")  # clipped to 0..T


def test_gt_outline_is_a_ring():
    from alignsam_ray.app import gt_outline

    gt = np.zeros((9, 9), np.uint8)
    gt[2:7, 2:7] = 1
    edge = gt_outline(gt)
    assert edge[1, 4] and edge[2, 4] and not edge[4, 4] and not edge[0, 4]  # outside + inside ring, not the middle


def _fake_eval(folder, per_image=True):
    """A metrics.json (+ per_image.json) as `alignsam evaluate` writes them, with no reachable store."""
    os.makedirs(folder, exist_ok=True)
    row = {k: 0.5 for k in ("miou", "iou_dataset", "fbeta", "emeasure", "mae", "ber", "hit_rate")}
    methods = {"alignsam": {**row, "ci95": {"miou": [0.4, 0.6]}}, "random_actions": {**row, "miou": 0.3}}
    paired = {"random_actions": {"miou": {"diff": 0.2, "ci95": [0.1, 0.3]}}}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"task": "synthetic_blur", "n_images": 3, "split": "test", "horizon": 3, "checkpoint": "c",
                   "store": os.path.join(folder, "gone"), "methods": methods, "paired": paired}, f)
    if per_image:
        rows = {"alignsam": [0.9, 0.1, 0.5], "random_actions": [0.2, 0.5, 0.5], "t=1": [0.0, 0.0, 0.0]}
        with open(os.path.join(folder, "per_image.json"), "w") as f:
            json.dump({"ids": [f"test/{i}" for i in range(3)],
                       "rows": {r: {"iou": v, "fbeta": [0] * 3, "emeasure": [0] * 3, "mae": [0] * 3, "ber": [0] * 3}
                                for r, v in rows.items()}}, f)


def test_eval_view_tables_from_the_evaluation_files(tmp_path):
    _fake_eval(tmp_path / "ev")
    ev = EvalView(str(tmp_path / "ev"))
    headers, rows = ev.metrics_rows()
    assert headers[0] == "method" and headers[1] == "mIoU" and headers[-1].startswith("alignsam - method")
    assert rows[0][:2] == ["alignsam", "0.500 [0.400, 0.600]"]
    assert rows[1][-1] == "0.200 [0.100, 0.300] alignsam better"
    headers, rows = ev.per_image_rows()
    assert headers == ["image", "IoU alignsam", "IoU random_actions"]
    assert [r[0] for r in rows] == ["test/1", "test/2", "test/0"]  # lowest alignsam IoU first
    assert [r[0] for r in ev.per_image_rows(worst_first=False)[1]] == ["test/0", "test/2", "test/1"]
    assert any("figures only" in n for n in ev.notes)  # no predictor, no store: said, not hidden
    with pytest.raises(AppError, match="figures only"):
        ev.methods_at("test/0", 1)
    _fake_eval(tmp_path / "old", per_image=False)
    old = EvalView(str(tmp_path / "old"))
    assert old.per_image_rows()[1] == [] and any("no per_image.json" in n for n in old.notes)
    with pytest.raises(AppError, match="not an `alignsam evaluate` folder"):
        EvalView(str(tmp_path))


def test_app_refuses_a_missing_bundle_folder(tmp_path, capsys):
    from alignsam_ray.cli import main

    assert main(["app", "--bundle", str(tmp_path / "nope")]) == 1
    assert "--bundle " + str(tmp_path / "nope") + " is not a folder" in capsys.readouterr().err


def test_app_without_gradio_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None; from alignsam_ray.cli import main; "
            f"sys.exit(main(['app', '--bundle', {str(tmp_path)!r}]))")  # None in sys.modules: ImportError
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "the app needs Gradio: pip install 'alignsam_ray[app]'" in proc.stderr


# ---- with a real bundle (trained and exported on Ray: the integration layer) ----

def _test_images(blur_store):
    return sorted(glob.glob(os.path.join(os.path.dirname(blur_store), "data", "test", "images", "*")))


def test_segment_tab_gives_the_predictors_result(bundle, blur_store, tmp_path):
    from alignsam_ray.predictor import AlignSAMPredictor

    path = _test_images(blur_store)[0]
    session = Session(bundle)
    assert session.problem is None
    result = session.segment(path)
    T = session.predictor.steps()
    assert len(result["steps"]) == T + 1
    ref = AlignSAMPredictor(bundle).predict(read_upload(path))
    final = result["steps"][T]
    np.testing.assert_array_equal(final.mask, ref.mask)
    np.testing.assert_array_equal(final.points, ref.points)
    np.testing.assert_array_equal(final.labels, ref.labels)
    for t, pred in enumerate(result["steps"]):  # each step adds one point to the ones before
        assert len(pred.points) == 2 + t
        np.testing.assert_array_equal(pred.points, final.points[: 2 + t])
    pic, rows, caption, png = session.show(result, 1)
    assert len(rows) == 3 and caption.startswith(f"step 1 of {T}")
    np.testing.assert_array_equal(np.asarray(Image.open(png)) > 0, result["steps"][1].mask)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(AppError, match="x.txt is not an image"):
        session.segment(str(tmp_path / "x.txt"))


def test_bundle_sam_mismatch_is_a_message(bundle, tmp_path):
    import torch

    wrong = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, wrong)
    session = Session(bundle, sam_checkpoint=str(wrong))
    assert "is not the SAM checkpoint the policy was trained with" in session.problem
    with pytest.raises(AppError, match="not the SAM checkpoint"):
        session.segment("x.png")
    from alignsam_ray.app import build_app

    build_app(session)  # the page still builds, with the message in it


@pytest.fixture(scope="module")
def evaluation(trained_run, blur_store, tmp_path_factory):
    from alignsam_ray.evaluate import evaluate

    out = str(tmp_path_factory.mktemp("app_eval") / "eval")
    evaluate(trained_run, blur_store, out, n_figures=1, progress=False)
    return out


def test_evaluation_tab_per_image_values_and_methods_side_by_side(bundle, evaluation):
    metrics = json.load(open(os.path.join(evaluation, "metrics.json")))
    session = Session(bundle, eval_dir=evaluation)
    ev = session.eval
    assert session.eval_problem is None and ev.data is not None, ev.notes
    headers, rows = ev.per_image_rows()
    assert len(rows) == metrics["n_images"] and headers[1] == "IoU alignsam"
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    assert np.mean([v["alignsam"]["iou"] for v in ev.per_image.values()]) == pytest.approx(
        metrics["methods"]["alignsam"]["miou"], abs=1e-5)  # per_image.json holds the values behind the mean
    worst = rows[0][0]
    views = ev.methods_at(worst, ev.T)
    from alignsam_ray.evaluate import METHODS

    assert [v.method for v in views] == list(METHODS)  # the rollouts (the baselines: in the per-image list only)
    assert {"persam", "persam_mean"} <= set(metrics["methods"]) and headers[-1] == "IoU persam_mean"
    alignsam = views[0]
    assert float(alignsam.caption.split("IoU ")[1].split(",")[0]) == pytest.approx(
        ev.per_image[worst]["alignsam"]["iou"], abs=0.01)  # the bundle's rerun = what evaluate scored
    assert "single_step, step 1" in views[list(METHODS).index("single_step")].caption  # T = 1: its last step
    assert "step 0" in ev.methods_at(worst, 0)[0].caption
    assert ev.figure(rows[0][0]) is None or os.path.isfile(ev.figure(rows[0][0]))


# ---- the browser ----

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium + chromedriver (apt-get install -y chromium "
                    "chromium-driver; docs/development.md)")
def test_browser_upload_slider_points_table(bundle, blur_store, tmp_path):
    """The real page in headless chromium: upload a non-image (a message), then an image; the slider goes back one
    step; the points table and caption are the predictor's."""
    pytest.importorskip("selenium", reason="selenium is not installed (the dev extra)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from alignsam_ray.predictor import AlignSAMPredictor

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([sys.executable, "-m", "alignsam_ray.cli", "app", "--bundle", bundle, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the server imports torch and Gradio first
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        text_of = lambda css: driver.find_element(By.CSS_SELECTOR, css).text  # noqa: E731
        file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        file_input.send_keys(str(bad))
        wait.until(lambda d: "is not an image" in text_of("#status"))
        assert "Traceback" not in driver.page_source
        driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        image = _test_images(blur_store)[0]
        T = AlignSAMPredictor(bundle, encoder=False).steps()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(image)
        wait.until(lambda d: text_of("#caption").startswith(f"step {T} of {T}"))
        slider = driver.find_element(By.CSS_SELECTOR, "#step input[type=range]")
        slider.send_keys(Keys.ARROW_LEFT)
        wait.until(lambda d: text_of("#caption").startswith(f"step {T - 1} of {T}"))
        ref = AlignSAMPredictor(bundle).predict_steps(read_upload(image))[T - 1]
        n = 2 + T - 1  # the SRM's two points and one per step (+ 1: the header row)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#points [role=grid]").get_attribute("aria-rowcount")
                   == str(n + 1))
        cells = [r.find_elements(By.CSS_SELECTOR, "[role=gridcell]") for r in
                 driver.find_elements(By.CSS_SELECTOR, "#points [role=row]")[1:]]
        assert len(cells) == n
        for row, (x, y, label, step) in zip(cells, points_rows(ref)):
            assert [float(row[0].text), float(row[1].text), row[2].text, int(row[3].text)] == [x, y, label, step]
        assert driver.find_element(By.CSS_SELECTOR, "#view img").get_attribute("src")
        assert server.poll() is None  # still serving after the bad upload
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)

"""A local web page for a bundle and an evaluation (`alignsam app`; Gradio, the optional extra
``alignsam_ray[app]``).

    alignsam app --bundle B [--sam-checkpoint C] [--clip-weights W] [--eval DIR] [--port 7860] [--host 127.0.0.1]

Segment tab: an uploaded image (or one of the bundle's ``examples/``) through ``AlignSAMPredictor``
(``predict_steps``: the same rollout as ``predict``); a slider over the steps 0..T shows the prompts and
SAM's mask after each, the points table (x, y, label, step) and the mask PNG of that step.
Evaluation tab (``--eval DIR`` of `alignsam evaluate`): metrics.json's table with its 95% intervals and
paired differences, per_image.json's per-image values sortable by IoU, and for one test image every
method of the evaluation side by side at a chosen step, re-run with the bundle on the evaluation's
store (a fresh seed-0 draw for random_actions; the figure evaluate drew, when the store is gone).

The page's work is plain functions and ``EvalView`` (the tests call them directly); ``build_app`` wires
them to Gradio. A handler turns every error into a message in the page (no traceback; the server keeps
serving); a predictor that cannot load (bundle/SAM mismatch) is shown the same way.
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data.samples import DataError, read_image
from .visualise import overlay

MAX_PIXELS = 40_000_000  # larger uploads are refused (a 40 MP photo: ~120 MB RGB, several copies per request)
MAX_UPLOAD = "100mb"  # Gradio refuses bigger files before they reach us
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
POINT_HEADERS = ["x", "y", "label", "step"]
log = logging.getLogger("alignsam.app")


class AppError(ValueError):
    """A user mistake the page reports as a message."""


def read_upload(path: str | None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An uploaded file -> (H, W, 3) uint8 RGB; AppError naming the file if it is no image or over
    ``max_pixels`` (checked from the header, before decoding)."""
    if not path:
        raise AppError("no image: upload one, or pick an example")
    name = os.path.basename(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:
        raise AppError(f"{name} is not an image PIL can read (PNG, JPEG, BMP, TIFF, WebP, ...)") from None
    if w * h > max_pixels:
        raise AppError(f"{name} is {w}x{h} = {w * h / 1e6:.0f} megapixels, more than this page takes "
                       f"({max_pixels / 1e6:.0f}); downscale it (SAM sees it at 1024 px on the long side anyway)")
    try:
        return read_image(path)
    except DataError as exc:
        raise AppError(str(exc).replace(path, name)) from None


def bundle_examples(bundle: str) -> list[str]:
    """The images in ``bundle/examples/`` (the demo's bundle carries a few test images), sorted."""
    folder = os.path.join(bundle, "examples")
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTS)]


def points_rows(pred) -> list[list]:
    """A Prediction's points -> rows [x, y, "positive" | "negative", step]: step 0 = the SRM's two
    starting points, step k = the k-th point the policy picked."""
    return [[round(float(x), 1), round(float(y), 1), "positive" if lab == 1 else "negative", max(0, k - 1)]
            for k, ((x, y), lab) in enumerate(zip(pred.points, pred.labels))]


def step_view(image: np.ndarray, steps: list, t: int) -> tuple[np.ndarray, list[list], str]:
    """Step ``t`` of ``predict_steps``' output -> (overlay (H, W, 3) uint8, points rows, a caption)."""
    t = int(min(max(t, 0), len(steps) - 1))
    pred = steps[t]
    caption = (f"step {t} of {len(steps) - 1}: {len(pred.points)} points "
               f"({int(pred.labels.sum())} positive), mask {100 * pred.mask.mean():.1f}% of the image")
    return overlay(image, pred.mask, pred.points, pred.labels), points_rows(pred), caption


def save_mask(mask: np.ndarray, folder: str, stem: str, t: int) -> str:
    """(H, W) bool -> folder/<stem>_mask_step<t>.png (0 / 255), as `alignsam segment` writes masks."""
    path = os.path.join(folder, f"{stem}_mask_step{t}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def gt_outline(gt: np.ndarray) -> np.ndarray:
    """(H, W) 0/1/255 ground truth -> (H, W) bool outline of its foreground (2 px)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    fg = gt == 1
    return binary_dilation(fg) & ~binary_erosion(fg)  # the pixel rings just outside and just inside


def format_cell(m: dict, key: str) -> str:
    """'value [lo, hi]' of one metrics.json method row (evaluate.py's format)."""
    from .evaluate import format_metric

    return format_metric(m, key)


@dataclass
class MethodView:
    method: str
    image: np.ndarray  # (H, W, 3) uint8: the method's prompts and mask, the ground-truth outline yellow
    caption: str


class EvalView:
    """An `alignsam evaluate` folder (metrics.json, per_image.json, figures/) and, when its store can be
    read, each method re-run on one test image with the predictor's policy."""

    def __init__(self, eval_dir: str, predictor=None):
        path = os.path.join(eval_dir, "metrics.json")
        if not os.path.isfile(path):
            raise AppError(f"{eval_dir} is not an `alignsam evaluate` folder (no metrics.json)")
        with open(path) as f:
            self.metrics = json.load(f)
        self.dir, self.predictor = eval_dir, predictor
        self.T = int(self.metrics["horizon"])
        self.per_image = self._read_per_image(os.path.join(eval_dir, "per_image.json"))
        self.notes: list[str] = []
        if self.per_image is None:
            self.notes.append("This evaluation has no per_image.json (written by `alignsam evaluate` since the app "
                              "came): the per-image list is empty; rerun `alignsam evaluate` to get it.")
        self.store, self.data, self._cache = None, None, {}
        self._open_store()

    @staticmethod
    def _read_per_image(path: str) -> dict | None:
        """per_image.json (``{"ids", "rows": {row: {metric: [one value per image]}}}``) -> {image id:
        {method: {metric: value}}} for the method rows (not the T sweep's ``t=<T>`` nor ``initial``); None
        without the file."""
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            doc = json.load(f)
        out: dict = {i: {} for i in doc["ids"]}
        for row, values in doc["rows"].items():
            if row.startswith("t=") or row == "initial":
                continue
            for k, image_id in enumerate(doc["ids"]):
                out[image_id][row] = {key: float(v[k]) for key, v in values.items()}
        return out

    def _open_store(self) -> None:
        """The store the evaluation ran on, if it is readable and embedded with the bundle's SAM."""
        from .store import EmbeddingStore

        if self.predictor is None:
            self.notes.append("No predictor (the bundle did not load): the methods are shown from the "
                              "evaluation's figures only (alignsam, steps 1, 5, 10, 15).")
            return
        store = self.metrics.get("store", "")
        try:
            st = EmbeddingStore(store)
        except Exception as exc:
            self.notes.append(f"The evaluation's store {store} cannot be read ({exc}): the methods are shown from "
                              "the evaluation's figures only (alignsam, steps 1, 5, 10, 15).")
            return
        ours = self.predictor.manifest["sam"]
        if (st.manifest.get("sam_type"), st.manifest.get("checkpoint_sha256")) != (ours["sam_type"],
                                                                                    ours["checkpoint_sha256"]):
            self.notes.append(f"Bundle/SAM mismatch: the evaluation's store {store} was embedded with "
                              f"{st.manifest.get('sam_type')} SAM (sha256 {str(st.manifest.get('checkpoint_sha256'))[:12]}) "
                              f"but the bundle's policy was trained on {ours['sam_type']} SAM (sha256 "
                              f"{ours['checkpoint_sha256'][:12]}): the methods are not re-run, only the "
                              "evaluation's figures are shown.")
            return
        source = self.predictor.manifest.get("source_checkpoint")
        if source and os.path.abspath(source) != os.path.abspath(self.metrics.get("checkpoint", source)):
            self.notes.append(f"The bundle was exported from {source}, the evaluation scored "
                              f"{self.metrics.get('checkpoint')}: the side-by-side shows the bundle's policy.")
        self.store = st
        self.data = st.arrays(self.metrics.get("split", "test"))
        self.gt = st.gt_full(self.metrics.get("split", "test"))
        t = st.table(self.metrics.get("split", "test"))
        self.paths = dict(zip(t["id"].to_pylist(), t["image_path"].to_pylist()))

    def summary(self) -> str:
        m = self.metrics
        return (f"**{m['task']}**: {m['n_images']} {m.get('split', 'test')} images, T = {m['horizon']}, checkpoint "
                f"`{m.get('checkpoint')}`, store `{m.get('store')}`. Brackets: 95% bootstrap intervals over the "
                "images; the last column is the paired difference alignsam - method (same images).")

    def metrics_rows(self) -> tuple[list[str], list[list]]:
        """metrics.json -> (headers, one row per method: each metric 'value [lo, hi]', then alignsam - method
        in mIoU with its paired interval and verdict)."""
        from .evaluate import LABELS, format_value, verdict
        from .metrics import NAMES

        keys = ("miou", "iou_dataset", "fbeta", "emeasure", "mae", "ber", "hit_rate")
        headers = ["method"] + [NAMES[k] for k in keys] + ["alignsam - method, mIoU [95% CI]"]
        rows = []
        for name, m in self.metrics["methods"].items():
            d = self.metrics.get("paired", {}).get(name)
            diff = (f"{format_value(d['miou']['diff'])} [{format_value(d['miou']['ci95'][0])}, {format_value(d['miou']['ci95'][1])}] "
                    f"{verdict(d['miou'], 'miou')}") if d else ""
            rows.append([LABELS.get(name, name)] + [format_cell(m, k) for k in keys] + [diff])
        return headers, rows

    def methods(self) -> list[str]:
        return list(self.metrics["methods"])

    def per_image_rows(self, worst_first: bool = True) -> tuple[list[str], list[list]]:
        """per_image.json -> (headers, rows [id, IoU of each method]) sorted by alignsam's IoU, lowest first
        (``worst_first``) or highest first."""
        names = self.methods()
        headers = ["image"] + [f"IoU {n}" for n in names]
        if not self.per_image:
            return headers, []
        rows = [[i] + [round(v.get(n, {}).get("iou", float("nan")), 4) for n in names]
                for i, v in self.per_image.items()]
        rows.sort(key=lambda r: (r[1], r[0]), reverse=not worst_first)
        return headers, rows

    def image_ids(self) -> list[str]:
        if self.per_image:
            return list(self.per_image)
        if self.data is not None:
            return [str(i) for i in self.data["ids"]]
        return [os.path.splitext(f)[0] for f in self._figures()]

    def _figures(self) -> list[str]:
        folder = os.path.join(self.dir, "figures")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def figure(self, image_id: str) -> str | None:
        """The evaluation's own figure of ``image_id`` (alignsam at steps 1, 5, 10, 15), if it drew one."""
        path = os.path.join(self.dir, "figures", str(image_id).replace("/", "_") + ".png")
        return path if os.path.isfile(path) else None

    def _rollouts(self, image_id: str) -> dict:
        """Every method on one test image, recorded at each of its steps -> {method: (horizon, {t: Prediction})}."""
        from .env.rollout import rollout
        from .evaluate import METHODS
        from .predictor import to_prediction

        if image_id in self._cache:
            return self._cache[image_id]
        ids = [str(i) for i in self.data["ids"]]
        if image_id not in ids:
            raise AppError(f"image {image_id!r} is not in the evaluation's store {self.metrics.get('store')}")
        k = ids.index(image_id)
        one = {key: v[k:k + 1] for key, v in self.data.items()}
        hw, input_hw = one["original_size"][0], one["input_size"][0]
        p = self.predictor
        out = {}
        for name, (actions, init, labels, h) in METHODS.items():
            h = h or self.T
            r = rollout(p, one, p.decoder, actions=actions, init=init, labels=labels, horizon=h,
                        record=tuple(range(h + 1)), batch=1, seed=0)
            out[name] = (h, {t: to_prediction(p.decoder, *r.points[t][0], r.logits[t][0], hw, input_hw)
                             for t in range(h + 1)})
        if len(self._cache) >= 16:
            self._cache.pop(next(iter(self._cache)))
        self._cache[image_id] = out
        return out

    def methods_at(self, image_id: str, t: int) -> list[MethodView]:
        """Each rollout method's prompts and mask on ``image_id`` after step ``t`` (a method with fewer steps, such
        as single_step, at its last), the ground-truth outline in yellow, the image's IoU in the caption. The
        training-free baselines (persam, clip_points) are not re-run here: their IoUs are in the per-image list."""
        from .metrics import image_metrics

        if self.data is None:
            raise AppError(" ".join(self.notes) or "the evaluation's store cannot be read")
        rolls = self._rollouts(image_id)
        path = self.paths.get(image_id)
        gt = self.gt[image_id]
        image = (np.asarray(Image.open(path).convert("RGB")) if path and os.path.isfile(path)
                 else np.full((*gt.shape, 3), 128, np.uint8))
        edge = gt_outline(gt)
        views = []
        for name, (h, preds) in rolls.items():
            s = int(min(max(t, 0), h))
            pred = preds[s]
            pic = overlay(image, pred.mask, pred.points, pred.labels).copy()  # (read-only from PIL)
            pic[edge] = (255, 220, 0)
            iou = image_metrics(pred.mask, gt)["iou"]
            views.append(MethodView(name, pic, f"{name}, step {s}: IoU {iou:.3f}, {len(pred.points)} points"))
        return views


class Session:
    """What the page serves: the predictor (or the message saying why it did not load) and the evaluation."""

    def __init__(self, bundle: str, sam_checkpoint: str | None = None, clip_weights: str | None = None,
                 eval_dir: str | None = None, device: str = "auto"):
        from .predictor import AlignSAMPredictor

        self.bundle, self.problem, self.predictor, self.eval, self.eval_problem = bundle, None, None, None, None
        try:
            self.predictor = AlignSAMPredictor(bundle, sam_checkpoint=sam_checkpoint, clip_weights=clip_weights,
                                               device=device)
        except Exception as exc:  # a bad bundle or a SAM/CLIP file that does not match it: said in the page
            self.problem = f"The bundle {bundle} cannot be used: {exc}"
            log.error(self.problem)
        if eval_dir:
            try:
                self.eval = EvalView(eval_dir, self.predictor)
            except Exception as exc:
                self.eval_problem = f"The evaluation {eval_dir} cannot be shown: {exc}"
                log.error(self.eval_problem)
        self.out = tempfile.mkdtemp(prefix="alignsam_app_")
        self.examples = bundle_examples(bundle)

    def segment(self, path: str | None) -> dict:
        """An image file -> {"image", "steps": predict_steps' list, "stem"}; AppError for a bad file."""
        if self.predictor is None:
            raise AppError(self.problem)
        image = read_upload(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return {"image": image, "steps": self.predictor.predict_steps(image), "stem": stem}

    def show(self, result: dict, t: int) -> tuple[np.ndarray, list[list], str, str]:
        """-> (overlay, points rows, caption, mask PNG path) at step ``t``."""
        view, rows, caption = step_view(result["image"], result["steps"], t)
        t = int(min(max(t, 0), len(result["steps"]) - 1))
        return view, rows, caption, save_mask(result["steps"][t].mask, self.out, result["stem"], t)


def _message(exc: Exception) -> str:
    """An exception -> the page's message: our errors as they are, anything else named, never a traceback."""
    if isinstance(exc, (AppError, DataError)):
        return f"**Error:** {exc}"
    log.exception("unexpected error in a page handler")
    return f"**Error:** {type(exc).__name__}: {exc} (the server keeps running; details in its terminal)"


def build_app(session: Session):
    """The Gradio Blocks of the two tabs (``launch`` serves them)."""
    import gradio as gr

    p = session.predictor
    T = p.steps() if p is not None else 1
    with gr.Blocks(title="AlignSAM", analytics_enabled=False) as app:
        gr.Markdown(f"# AlignSAM: where the agent clicks\nBundle `{session.bundle}`"
                    + (f" (task {p.manifest['task']}, {p.manifest['sam']['sam_type']} SAM, T = {T})" if p else ""))
        with gr.Tab("Segment"):
            status = gr.Markdown(f"**Error:** {session.problem}" if session.problem else
                                 "Upload an image or pick an example. Green +: positive point, red x: negative "
                                 "point, blue: SAM's mask.", elem_id="status")
            state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image", file_count="single", type="filepath", elem_id="upload")
                    examples = gr.Gallery([(e, os.path.basename(e)) for e in session.examples], label="Bundle examples",
                                          columns=4, height=160, allow_preview=False, visible=bool(session.examples),
                                          elem_id="examples")
                    slider = gr.Slider(0, T, value=T, step=1, label="step (0: the SRM's two starting points)",
                                       elem_id="step")
                    mask_file = gr.File(label="mask PNG at this step", interactive=False, height=90, elem_id="mask")
                with gr.Column(scale=2):
                    view = gr.Image(label="prompts and mask", type="numpy", interactive=False, height=420,
                                    elem_id="view")
                    caption = gr.Markdown("", elem_id="caption")
                    table = gr.Dataframe(headers=POINT_HEADERS, label="points (x, y in image pixels; step 0: the "
                                         "SRM's start)", interactive=False, max_height=260, elem_id="points")

            def run(path, t=None):
                try:
                    result = session.segment(path)
                    t = len(result["steps"]) - 1 if t is None else t
                    pic, rows, cap, png = session.show(result, t)
                    return (result, gr.update(value=t), pic, rows, png, cap,
                            f"{os.path.basename(path)}: {result['image'].shape[1]}x{result['image'].shape[0]}")
                except Exception as exc:
                    return None, gr.update(), None, [], None, "", _message(exc)

            def on_example(evt: gr.SelectData):
                return run(session.examples[evt.index])

            def on_step(result, t):
                if result is None:
                    return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
                try:
                    pic, rows, cap, png = session.show(result, t)
                    return pic, rows, png, cap, gr.update()
                except Exception as exc:
                    return None, [], None, "", _message(exc)

            outputs = [state, slider, view, table, mask_file, caption, status]
            upload.upload(run, [upload], outputs)
            examples.select(on_example, None, outputs)
            slider.change(on_step, [state, slider], [view, table, mask_file, caption, status])
        with gr.Tab("Evaluation"):
            _eval_tab(gr, session, app)
    return app


def _eval_tab(gr, session: Session, app) -> None:
    ev = session.eval
    if ev is None:
        gr.Markdown(f"**Error:** {session.eval_problem}" if session.eval_problem else
                    "Start the app with `--eval DIR` (a folder written by `alignsam evaluate`) to browse an evaluation.")
        return
    gr.Markdown(ev.summary())
    headers, rows = ev.metrics_rows()
    gr.Dataframe(rows, headers=headers, label="methods and ablations (cf. paper Table 2)", interactive=False,
                 wrap=True, elem_id="metrics")
    if ev.notes:
        gr.Markdown("\n\n".join(f"Note: {n}" for n in ev.notes), elem_id="eval_notes")
    ids = ev.image_ids()
    order = gr.Radio(["lowest alignsam IoU first", "highest first"], value="lowest alignsam IoU first",
                     label="sort the test images")
    headers, rows = ev.per_image_rows()
    per_image = gr.Dataframe(rows, headers=headers, label="per-image IoU (per_image.json; click a row)",
                             interactive=False, max_height=300, elem_id="per_image")
    with gr.Row():
        chosen = gr.Dropdown(ids, value=rows[0][0] if rows else (ids[0] if ids else None), label="image")
        step = gr.Slider(0, ev.T, value=ev.T, step=1, label="step")
    message = gr.Markdown("")
    gallery = gr.Gallery(label="methods side by side (yellow: ground-truth outline)", columns=3, height="auto",
                         elem_id="methods")
    figure = gr.Image(label="the evaluation's figure (alignsam at steps 1, 5, 10, 15)", type="filepath",
                      interactive=False)

    def show(image_id, t):
        fig = ev.figure(image_id) if image_id else None
        if not image_id:
            return [], fig, ""
        try:
            views = ev.methods_at(image_id, int(t))
            return [(v.image, v.caption) for v in views], fig, ""
        except Exception as exc:
            return [], fig, _message(exc)

    def sort(label):
        return ev.per_image_rows(worst_first=label.startswith("lowest"))[1]

    def pick(evt: gr.SelectData, data):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return data.iloc[row, 0] if hasattr(data, "iloc") else data[row][0]
        except Exception:
            return gr.update()

    order.change(sort, [order], [per_image])
    per_image.select(pick, [per_image], [chosen])
    chosen.change(show, [chosen, step], [gallery, figure, message])
    step.release(show, [chosen, step], [gallery, figure, message])
    app.load(show, [chosen, step], [gallery, figure, message])


def serve(bundle: str, sam_checkpoint: str | None = None, clip_weights: str | None = None, eval_dir: str | None = None,
          host: str = "127.0.0.1", port: int = 7860) -> None:
    """Build the page and serve it until Ctrl-C: Gradio mounted on FastAPI, run by uvicorn (Gradio's own
    ``launch`` gives up when its first request to itself takes over 3 s, as on a loaded machine)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import fastapi
    import gradio as gr
    import uvicorn

    session = Session(bundle, sam_checkpoint, clip_weights, eval_dir)
    app = gr.mount_gradio_app(fastapi.FastAPI(), build_app(session), path="/", server_name=host, server_port=port,
                              show_error=False, max_file_size=MAX_UPLOAD, ssr_mode=False, footer_links=[])
    print(f"[app] serving on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

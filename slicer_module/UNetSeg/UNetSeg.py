"""UNetSeg: 3D Slicer module for a unet_seg (MONAI Label) server — segment, correct, submit, retrain.

Made for a clinician's own workstation talking to a remote server: nothing is read from the
server's folders. *Next study* downloads the image over HTTP (checked against the server's
SHA-256 and cached), a multi-channel study arrives as one volume per modality, and a stored
pre-annotation of the serving model version opens without a new inference. *Upload* sends what
Slicer has open (one volume, or one per modality, stacked) as a new study; *Segment* and *Submit*
then work on it in its own geometry. *Log in* gets a token from the server's ``/auth/token``
(kept in memory, renewed before it expires). The panel lists the model versions with their Dice
and which one serves, and plots the last training curve and per-class Dice.

Widget: thin Qt glue (server URL remembered in Slicer's settings; login; model, strategy;
Next study / Upload / Segment / Submit / Train / Stop / Pre-annotate; versions table and two small
plots). Logic: everything else, on ``UNetSegLib`` (pure Python) and ``UNetSegScene`` (MRML).
Network calls run on a worker thread; results come back to the main thread through
``UNetSegLogic.poll()`` (driven by a QTimer in the widget), so Slicer never freezes and errors are
shown in plain words.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from UNetSegLib import (
    ServerError,
    UNetSegClient,
    check_id,
    declared_modalities,
    label_info,
    model_modalities,
    model_versions,
    nifti,
)

try:  # inside Slicer
    import qt
    import slicer
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER = True
except ImportError:  # plain Python or slicer-core (no Qt: tests, scripts): the Logic works without the app
    HAVE_SLICER = False
    qt = slicer = None  # type: ignore[assignment]

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self) -> None:
            pass

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleTest:  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self) -> None:
            pass


SETTINGS_URL_KEY = "UNetSeg/serverUrl"
SETTINGS_USER_KEY = "UNetSeg/userName"  # the user name only; the password is never stored
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "UNetSeg")


class UNetSeg(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "UNetSeg"
        parent.categories = ["Segmentation"]
        parent.contributors = ["unet_seg developers"]
        parent.helpText = (
            "Connect to a unet_seg server (log in if it asks), get the next study worth annotating or upload the "
            "volume you have open, segment it (optionally with test-time augmentation), correct it in Segment "
            "Editor, submit it and retrain. Studies are downloaded and cached; nothing is read from the server's "
            "folders."
        )
        parent.acknowledgementText = "Built on MONAI Label and MONAI."


def server_key(url: str) -> str:
    """A folder name for one server's cache (``host_port``), so two servers' ids never mix."""
    parts = urllib.parse.urlsplit(url)
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts.hostname or 'server'}_{parts.port or ''}{parts.path}")
    return key.strip("_") or "server"


def image_id_for(name: str) -> str:
    """A datastore id from a Slicer node name: letters, digits and ``._-``, at most 200 characters."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._-")
    out = re.sub(r"\.{2,}", ".", out)[:200]
    return out if out and out[0].isalnum() else f"volume_{out}"[:200].rstrip("._-") or "volume"


def describe_prediction(prediction: dict | None, used: bool) -> str:
    """What the study's stored prediction is, in words (``used``: it was opened instead of a new inference)."""
    if not prediction:
        return ""
    version = prediction.get("model_version") or "an unknown version"
    model = prediction.get("model") or "the model"
    if used:
        return f"prediction made by {model} {version} (stored, no new inference); correct it, then Submit"
    return f"a stored prediction was made by {model} {version}, which no longer serves: press Segment for a new one"


def overview(info: dict) -> dict[str, dict]:
    """Per model: version rows (id, state, serving, Dice), the last training's curve and the per-class Dice.

    ``{model: {"versions": [...], "serving": id, "curve": {"epoch", "train_loss", "val_mean_dice"},
    "per_class": {label: Dice}, "per_class_version": id, "status": str}}``, all from one /info.
    """
    out: dict[str, dict] = {}
    versions = model_versions(info)
    stats_all = info.get("train_stats") or {}
    for model in versions.keys() | stats_all.keys():
        rows = versions.get(model, [])
        serving = next((r for r in rows if r["serving"]), None)
        stats = stats_all.get(model) or {}
        history = [h for h in stats.get("history") or [] if isinstance(h, dict)]
        per_class = dict(serving["per_class"]) if serving and serving["per_class"] else {}
        per_class_version = serving["id"] if per_class else None
        if not per_class and stats.get("val_dice_per_class"):
            per_class, per_class_version = dict(stats["val_dice_per_class"]), stats.get("version")
        out[model] = {
            "versions": [
                dict(
                    r,
                    text=f"{r['id']}  {r['state'] or ''}"
                    + (f"  Dice {r['mean_dice']:.3f}" if isinstance(r["mean_dice"], (int, float)) else "  Dice -"),
                )
                for r in rows
            ],
            "serving": serving["id"] if serving else None,
            "curve": {
                "epoch": [h.get("epoch") for h in history],
                "train_loss": [h.get("train_loss") for h in history],
                "val_mean_dice": [h.get("val_mean_dice") for h in history],
            },
            "per_class": {k: v for k, v in per_class.items() if isinstance(v, (int, float))},
            "per_class_version": per_class_version,
        }
    return out


class UNetSegLogic(ScriptedLoadableModuleLogic):
    """Everything but the widgets: server calls in the background, downloads, uploads, label import/export."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, cache_dir: str | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = UNetSegClient(url, timeout=timeout)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="UNetSeg")
        self.pending: list[tuple[Future, Callable[[Any], None], Callable[[str], None]]] = []
        self.models: dict[str, dict] = {}
        self.current: dict[str, Any] = {}
        self.workdir = tempfile.mkdtemp(prefix="UNetSeg_")
        self.cache_root = cache_dir or DEFAULT_CACHE
        # the MRML scene and segmentations logic: Slicer's own, or slicer-core's set by a script or test
        self.scene: Any = slicer.mrmlScene if HAVE_SLICER else None
        self.segmentations_logic: Any = slicer.modules.segmentations.logic() if HAVE_SLICER else None

    @property
    def cache_dir(self) -> str:
        """Downloaded studies and labels of the connected server (kept between sessions)."""
        return os.path.join(self.cache_root, server_key(self.client.url))

    def close(self) -> None:
        """Stop the worker, forget the login and remove the work folder (the download cache stays)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.logout()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def clear_cache(self) -> int:
        """Delete this server's downloaded studies and labels from this computer; returns how many files."""
        folder = self.cache_dir
        count = sum(len(files) for _, _, files in os.walk(folder))
        shutil.rmtree(folder, ignore_errors=True)
        return count

    # ---- background work --------------------------------------------------------------------
    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any], None], on_error: Callable[[str], None]) -> Future:
        """Run ``fn`` on the worker thread; ``poll()`` later calls ``on_done(result)`` or ``on_error(message)``."""
        fut = self.pool.submit(fn)
        self.pending.append((fut, on_done, on_error))
        return fut

    def poll(self) -> int:
        """Deliver finished results on the calling (main) thread; returns how many are still running."""
        still = []
        for fut, on_done, on_error in self.pending:
            if not fut.done():
                still.append((fut, on_done, on_error))
                continue
            exc = fut.exception()
            if exc is None:
                on_done(fut.result())
            else:
                on_error(plain_words(exc))
        self.pending = still
        return len(still)

    def wait(self, timeout: float = 600.0) -> None:
        """Block until every pending call finished, then deliver them (scripts and tests)."""
        for fut, _, _ in list(self.pending):
            with contextlib.suppress(Exception):  # delivered by poll()
                fut.result(timeout=timeout)
        self.poll()

    # ---- server and login -------------------------------------------------------------------
    def set_url(self, url: str) -> None:
        """Talk to another server (logged out; its own cache folder)."""
        self.client = UNetSegClient(url, timeout=self.client.timeout)
        self.models, self.current = {}, {}

    def connect(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        """Fetch the models (ready or not), strategies and the versions overview from /info."""

        def work() -> dict:
            info = self.client.info()
            self.models = self.client.models(info)
            return {"models": self.models, "strategies": sorted(info.get("strategies", {})), "overview": overview(info)}

        return self.submit(work, on_done, on_error)

    def login(
        self, username: str, password: str, on_done: Callable[[dict], None], on_error: Callable[[str], None]
    ) -> Future:
        """Log in through the server (token in memory only, renewed before it expires), then read /info."""

        def work() -> dict:
            res = self.client.login(username, password)
            info = self.client.info()
            self.models = self.client.models(info)
            return {
                **res,
                "models": self.models,
                "strategies": sorted(info.get("strategies", {})),
                "overview": overview(info),
            }

        return self.submit(work, on_done, on_error)

    def fetch_overview(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        """``overview(/info)``: versions with their Dice, the training curve and per-class Dice, per model."""

        def work() -> dict:
            info = self.client.info()
            self.models = self.client.models(info)
            return overview(info)

        return self.submit(work, on_done, on_error)

    # ---- the loop ---------------------------------------------------------------------------
    def next_study(
        self,
        strategy: str,
        model: str | None,
        on_done: Callable[[dict], None],
        on_error: Callable[[str], None],
        **params: Any,
    ) -> Future:
        """Ask for the next study, download it (checked, cached) and open its stored prediction if it is current.

        The result: ``{id, images, modalities, label, label_names, prediction, message, download, seconds}``;
        ``label`` is the stored prediction's local file when the serving model version made it (no new inference).
        """

        def work() -> dict:
            t0 = time.perf_counter()
            res = self.client.next_sample(strategy, **({"model": model} if model else {}), **params)
            if not res:
                raise ServerError(0, "no unlabelled study is left to annotate")
            out = self._open(res, model)
            out["seconds"] = time.perf_counter() - t0
            return out

        return self.submit(work, on_done, on_error)

    def open_study(
        self, image_id: str, model: str | None, on_done: Callable[[dict], None], on_error: Callable[[str], None]
    ) -> Future:
        """Download a stored study by id (as ``next_study`` does, without asking the server to choose)."""
        check_id(image_id)

        def work() -> dict:
            t0 = time.perf_counter()
            out = self._open({"id": image_id}, model)
            out["seconds"] = time.perf_counter() - t0
            return out

        return self.submit(work, on_done, on_error)

    def _open(self, sample: dict, model: str | None) -> dict:
        if "path" in sample:  # never used: the client drops server paths; this guards the rule
            raise ServerError(0, "the server sent a server path; this module only downloads studies")
        image = check_id(str(sample["id"]))
        if not self.models:
            self.models = self.client.models()
        model = model or next(iter(self.models), None)
        model_info = self.models.get(model or "", {})
        modalities = model_modalities(model_info)
        images = self.client.download_image(image, self.cache_dir, modalities)
        download = dict(self.client.last_download)
        if len(images) != len(modalities):
            modalities = [f"channel{i}" for i in range(len(images))] if len(images) > 1 else ["image"]
        prediction = sample.get("prediction") if isinstance(sample.get("prediction"), dict) else None
        label, names = None, dict(model_info.get("labels") or {})
        if prediction and prediction.get("serving") and prediction.get("model", model) == model:
            label = self.client.download_label(image, self.cache_dir, str(prediction.get("tag") or "prediction"))
        message = f"Study {image}" + (
            f" (uncertainty {sample['score']:.3f})" if isinstance(sample.get("score"), (int, float)) else ""
        )
        if prediction:
            message += f"; {describe_prediction(prediction, label is not None)}"
        self.current = {
            "image": image,
            "images": images,
            "label": label,
            "label_names": names if label else {},
            "model": model,
            "prediction": prediction,
        }
        return {
            "id": image,
            "images": images,
            "modalities": modalities,
            "label": label,
            "label_names": names,
            "prediction": prediction,
            "message": message,
            "download": download,
            "score": sample.get("score"),
        }

    def upload_volumes(
        self,
        volumes: Sequence[Any],
        image_id: str,
        on_done: Callable[[dict], None],
        on_error: Callable[[str], None],
        model: str | None = None,
        overwrite: bool = False,
    ) -> Future:
        """Upload what is open as a new study ``image_id``: one volume, or one per modality of ``model`` (stacked).

        ``volumes`` are file paths or volume nodes (written to NIfTI here, on the calling thread: the
        scene is not thread-safe). Several volumes must share shape and affine; they become one 4D
        NIfTI, channels last, in the order given (the model's modality order). Afterwards the study is
        the current one: *Segment* and *Submit* work on it in its own geometry.
        """
        check_id(image_id)
        if not volumes:
            raise ValueError("choose the volume to upload")
        wanted = declared_modalities(self.models.get(model or "", {}))
        if wanted is not None and len(wanted) != len(volumes):  # undeclared: the server checks channels (422)
            raise ValueError(
                f"{model} takes {len(wanted)} modalities ({', '.join(wanted)}); {len(volumes)} volumes were chosen"
            )
        paths = [v if isinstance(v, str) else self.write_node(v, f"{image_id}_{i}") for i, v in enumerate(volumes)]

        def work() -> dict:
            if len(paths) > 1:
                source = nifti.stack_volumes(paths, os.path.join(self.workdir, f"{image_id}_stacked.nii.gz"))
            else:
                source = paths[0]
            reply = self.client.upload_image(image_id, source, **({"overwrite": True} if overwrite else {}))
            self.current = {
                "image": image_id,
                "images": paths,
                "label": None,
                "label_names": {},
                "model": model,
                "uploaded": source,
            }
            return {
                "id": image_id,
                "reply": reply,
                "uploaded": source,
                "images": paths,
                "message": f"Uploaded as study {image_id}; press Segment",
            }

        return self.submit(work, on_done, on_error)

    def segment(
        self, model: str, tta: bool, on_done: Callable[[dict], None], on_error: Callable[[str], None]
    ) -> Future:
        """Segment the current study; the result dict has the label file and the server's label names."""
        image = self.current.get("image")
        if not image:
            raise ValueError("ask for a study first (Next study or Upload)")

        def work() -> dict:
            path, meta = self.client.infer(model, image, os.path.join(self.workdir, f"{image}_{model}"), tta=tta)
            names = meta.get("label_names") or self.models.get(model, {}).get("labels", {})
            self.current.update({"label": path, "label_names": names, "model": model, "prediction": None})
            return {"label": path, "label_names": names, "meta": meta}

        return self.submit(work, on_done, on_error)

    def submit_label(
        self,
        label_path: str,
        label_names: dict[str, int],
        on_done: Callable[[dict], None],
        on_error: Callable[[str], None],
    ) -> Future:
        """Store the corrected label of the current study as its final label (values = the server's)."""
        image = self.current.get("image")
        if not image:
            raise ValueError("no current study to submit a label for")
        return self.submit(
            lambda: self.client.submit_label(image, label_path, label_info(label_names)), on_done, on_error
        )

    def train(
        self, model: str, on_done: Callable[[dict], None], on_error: Callable[[str], None], **params: Any
    ) -> Future:
        return self.submit(lambda: self.client.train_start(model, **params), on_done, on_error)

    def stop_training(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        return self.submit(self.client.train_stop, on_done, on_error)

    def training_progress(self, model: str, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        """``{status, epoch, max_epochs, percent, last_dice}`` of the running or last training."""

        def work() -> dict:
            status = self.client.train_status()
            stats = self.client.info().get("train_stats", {}).get(model, {})
            history = stats.get("history") or []
            epoch = history[-1]["epoch"] if history else 0
            total = stats.get("max_epochs") or 0
            return {
                "status": status.get("status", "none"),
                "epoch": epoch,
                "max_epochs": total,
                "percent": int(100 * epoch / total) if total else 0,
                "last_dice": stats.get("val_mean_dice"),
            }

        return self.submit(work, on_done, on_error)

    # ---- batch pre-annotation (admin) --------------------------------------------------------
    def pre_annotate(
        self,
        model: str,
        on_done: Callable[[dict], None],
        on_error: Callable[[str], None],
        images: str = "unlabeled",
        **params: Any,
    ) -> Future:
        """Start storing predictions of ``model`` for ``images`` (unlabeled | all | labeled) on the server."""
        return self.submit(lambda: self.client.batch_infer(model, images, **params), on_done, on_error)

    def pre_annotation_progress(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        return self.submit(self.client.batch_status, on_done, on_error)

    def stop_pre_annotation(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        return self.submit(self.client.batch_stop, on_done, on_error)

    # ---- MRML scene (Slicer's, or slicer-core's in tests) ----------------------------------------
    def _scene(self) -> tuple[Any, Any]:
        if self.scene is None or self.segmentations_logic is None:
            raise ValueError("no MRML scene: set logic.scene and logic.segmentations_logic (Slicer does it)")
        return self.scene, self.segmentations_logic

    def write_node(self, node: Any, name: str) -> str:
        """A volume node written to a NIfTI file in the work folder (what gets uploaded)."""
        import UNetSegScene

        scene, _ = self._scene()
        return UNetSegScene.write_volume(scene, node, os.path.join(self.workdir, f"{name}.nii.gz"))

    def load_volumes(self, paths: Sequence[str], names: Sequence[str] | None = None) -> list[Any]:
        """Volume nodes of a downloaded study (one per modality)."""
        import UNetSegScene

        scene, _ = self._scene()
        return UNetSegScene.volume_nodes(scene, list(paths), list(names) if names else None)

    def import_label(self, label_path: str, label_names: dict[str, int], reference_volume: Any) -> Any:
        """Load the label into a segmentation node through a colour table built from the label NAMES."""
        import UNetSegScene

        scene, seg_logic = self._scene()
        return UNetSegScene.import_label(scene, seg_logic, label_path, label_names, reference_volume)

    def export_label(self, segmentation: Any, reference_volume: Any, label_names: dict[str, int]) -> str:
        """Write the corrected segmentation as a label map whose values are the server's (by segment name)."""
        import UNetSegScene

        scene, seg_logic = self._scene()
        path = os.path.join(self.workdir, f"{self.current.get('image', 'label')}_corrected.nii.gz")
        return UNetSegScene.export_label(scene, seg_logic, segmentation, reference_volume, label_names, path)

    def plot_overview(self, model: str, model_overview: dict) -> tuple[Any, Any]:
        """Chart nodes (training curve, per-class Dice) for ``overview(info)[model]``."""
        import UNetSegScene

        scene, _ = self._scene()
        return UNetSegScene.plot_overview(scene, model, model_overview)


def plain_words(exc: BaseException) -> str:
    """A message a clinician can act on."""
    if isinstance(exc, ServerError):
        return str(exc)
    if isinstance(exc, (OSError, ValueError)):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected error: {exc} ({''.join(traceback.format_exception_only(type(exc), exc)).strip()})"


class UNetSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt glue only: buttons call the Logic; a timer delivers its results."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: UNetSegLogic | None = None
        self.ui: Any = None
        self.volume: Any = None
        self.volumes: list[Any] = []
        self.segmentation: Any = None
        self.modality_selectors: list[Any] = []
        self.overview: dict[str, dict] = {}
        self.plots: list[Any] = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        widget = slicer.util.loadUI(self.resourcePath("UI/UNetSeg.ui"))
        self.layout.addWidget(widget)
        self.ui = slicer.util.childWidgetVariables(widget)
        widget.setMRMLScene(slicer.mrmlScene)
        settings = qt.QSettings()
        url = settings.value(SETTINGS_URL_KEY, "http://127.0.0.1:8000")
        self.ui.serverUrl.text = url
        self.ui.userName.text = settings.value(SETTINGS_USER_KEY, "")
        self.logic = UNetSegLogic(url, cache_dir=os.path.join(slicer.app.cachePath, "UNetSeg"))
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.logic.poll)
        self.timer.start()
        for button, slot in (
            (self.ui.connectButton, self.on_connect),
            (self.ui.loginButton, self.on_login),
            (self.ui.nextButton, self.on_next),
            (self.ui.uploadButton, self.on_upload),
            (self.ui.segmentButton, self.on_segment),
            (self.ui.submitButton, self.on_submit),
            (self.ui.trainButton, self.on_train),
            (self.ui.stopButton, self.on_stop),
            (self.ui.preannotateButton, self.on_preannotate),
            (self.ui.refreshButton, self.on_refresh),
            (self.ui.clearCacheButton, self.on_clear_cache),
        ):
            button.connect("clicked(bool)", slot)
        self.ui.password.connect("returnPressed()", self.on_login)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.on_model_changed)
        self.progress_timer = qt.QTimer()
        self.progress_timer.setInterval(5000)
        self.progress_timer.connect("timeout()", self.on_progress)
        self.batch_timer = qt.QTimer()
        self.batch_timer.setInterval(5000)
        self.batch_timer.connect("timeout()", self.on_batch_progress)
        self.modality_form = qt.QFormLayout(self.ui.modalityFrame)
        self.modality_form.setContentsMargins(0, 0, 0, 0)
        self.plots = [self._plot_widget(self.ui.curvePlotFrame), self._plot_widget(self.ui.classPlotFrame)]
        self._modality_rows(["image"])

    # ---- helpers ----------------------------------------------------------------------------
    def status(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def model(self) -> str:
        return self.ui.modelSelector.currentText

    def _plot_widget(self, frame: Any) -> Any:
        """A qMRMLPlotWidget in ``frame`` (its plot view node is made when there is something to show)."""
        plot = slicer.qMRMLPlotWidget()
        plot.setMRMLScene(slicer.mrmlScene)
        plot.setMinimumHeight(150)
        layout = qt.QVBoxLayout(frame)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(plot)
        return plot

    def _show_chart(self, plot: Any, chart: Any) -> None:
        """Point ``plot`` at ``chart`` through a plot view node (re-made after the scene was closed)."""
        view = plot.mrmlPlotViewNode()
        if view is None or slicer.mrmlScene.GetNodeByID(view.GetID()) is None:
            view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "UNetSeg plot view")
            plot.setMRMLPlotViewNode(view)
        view.SetPlotChartNodeID(chart.GetID())

    def _modality_rows(self, modalities: list[str]) -> None:
        """One volume selector per input channel of the model (one for single-channel models)."""
        form = self.modality_form
        while form.rowCount() > 0:
            form.removeRow(0)
        self.modality_selectors = []
        shown = self._shown_volume()
        for i, name in enumerate(modalities):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            combo.selectNodeUponCreation = False
            combo.addEnabled = combo.removeEnabled = False
            combo.noneEnabled = True
            combo.setMRMLScene(slicer.mrmlScene)
            if i == 0 and shown is not None:
                combo.setCurrentNode(shown)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", self.on_volume_chosen)
            form.addRow(f"{name}:" if len(modalities) > 1 else "Volume:", combo)
            self.modality_selectors.append(combo)
        self.on_volume_chosen(None)

    def _shown_volume(self) -> Any:
        """The volume in the red slice view's background (what the user is looking at)."""
        with contextlib.suppress(Exception):
            composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            return slicer.mrmlScene.GetNodeByID(composite.GetBackgroundVolumeID())
        return None

    # ---- slots ------------------------------------------------------------------------------
    def _connected(self, res: dict, prefix: str) -> None:
        current = self.model()
        self.ui.modelSelector.clear()
        for name in res["models"]:
            self.ui.modelSelector.addItem(name)
        if current in res["models"]:
            self.ui.modelSelector.setCurrentText(current)
        self.ui.strategySelector.clear()
        for s in res["strategies"]:
            self.ui.strategySelector.addItem(s)
        not_ready = [n for n, m in res["models"].items() if not m["ready"]]
        self.status(
            f"{prefix} Models: {', '.join(res['models'])}"
            + (f" (not trained yet: {', '.join(not_ready)})" if not_ready else "")
        )
        self.overview = res.get("overview") or {}
        self.on_model_changed()

    def on_connect(self) -> None:
        url = self.ui.serverUrl.text.strip()
        qt.QSettings().setValue(SETTINGS_URL_KEY, url)
        if url.rstrip("/") != self.logic.client.url:  # another server: its own login and cache
            self.logic.set_url(url)
            self.ui.loginState.text = "not logged in"
        self.status(f"Connecting to {url} ...")

        def failed(message: str) -> None:
            hint = " Log in first." if message.startswith("401") else ""
            self.status(f"{message}{hint}")

        self.logic.connect(lambda res: self._connected(res, "Connected."), failed)

    def on_login(self) -> None:
        user, password = self.ui.userName.text.strip(), self.ui.password.text
        self.ui.password.text = ""  # the password lives only in the client's memory from here on
        if not user or not password:
            self.status("Enter your user name and password")
            return
        url = self.ui.serverUrl.text.strip()
        if url.rstrip("/") != self.logic.client.url:
            self.logic.set_url(url)
        qt.QSettings().setValue(SETTINGS_URL_KEY, url)
        qt.QSettings().setValue(SETTINGS_USER_KEY, user)
        self.status(f"Logging in as {user} ...")

        def done(res: dict) -> None:
            self.ui.loginState.text = f"logged in as {res['username']}"
            self._connected(res, f"Logged in as {res['username']}.")

        self.logic.login(user, password, done, self.status)

    def on_model_changed(self, _index: int = 0) -> None:
        info = self.logic.models.get(self.model(), {}) if self.logic else {}
        self._modality_rows(model_modalities(info))
        self._show_overview()

    def on_volume_chosen(self, _node: Any) -> None:
        node = self.modality_selectors[0].currentNode() if self.modality_selectors else None
        if node is not None and not self.ui.uploadId.text:
            self.ui.uploadId.text = image_id_for(node.GetName())

    def on_next(self) -> None:
        self.status("Downloading the next study ...")

        def done(res: dict) -> None:
            self.volumes = [
                slicer.util.loadVolume(p, {"name": f"{res['id']} {m}" if len(res["images"]) > 1 else res["id"]})
                for p, m in zip(res["images"], res["modalities"], strict=False)
            ]
            self.volume = self.volumes[0] if self.volumes else None
            self.segmentation = None
            if res["label"]:
                try:
                    self.segmentation = self.logic.import_label(res["label"], res["label_names"], self.volume)
                except (ValueError, OSError) as e:
                    self.status(f"{res['message']} — but it could not be shown: {e}")
                    return
            took = res["download"].get("seconds", 0.0)
            cached = " from the cache" if res["download"].get("cached") else ""
            self.status(f"{res['message']} (image{cached} in {took:.1f} s)")

        self.logic.next_study(self.ui.strategySelector.currentText or "first", self.model(), done, self.status)

    def on_upload(self) -> None:
        nodes = [c.currentNode() for c in self.modality_selectors]
        if not nodes or any(n is None for n in nodes):
            self.status("Choose the volume to upload (one per modality)")
            return
        image_id = self.ui.uploadId.text.strip() or image_id_for(nodes[0].GetName())
        self.status(f"Uploading {image_id} ...")

        def done(res: dict) -> None:
            self.volumes, self.volume, self.segmentation = nodes, nodes[0], None
            self.ui.uploadId.text = ""
            self.status(res["message"])

        try:
            self.logic.upload_volumes(nodes, image_id, done, self.status, model=self.model() or None)
        except (ValueError, OSError) as e:
            self.status(f"Not uploaded: {e}")

    def on_segment(self) -> None:
        self.status("Segmenting ...")

        def done(res: dict) -> None:
            try:
                self.segmentation = self.logic.import_label(res["label"], res["label_names"], self.volume)
            except (ValueError, OSError) as e:
                self.status(f"Could not show the segmentation: {e}")
                return
            self.status(
                f"Segmented with {self.model()} version {res['meta'].get('model_version')}; correct it, then Submit"
            )

        try:
            self.logic.segment(self.model(), bool(self.ui.ttaCheckBox.checked), done, self.status)
        except ValueError as e:
            self.status(str(e))

    def on_submit(self) -> None:
        names = self.logic.current.get("label_names", {})
        if self.segmentation is None or not names:
            self.status("Nothing to submit yet: press Segment first (or load a study)")
            return
        try:
            path = self.logic.export_label(self.segmentation, self.volume, names)
        except (ValueError, OSError) as e:
            self.status(f"Not submitted: {e}")
            return

        def done(res: dict) -> None:
            retrain = res.get("retrain")
            self.status(
                "Label stored" + (f"; retraining {retrain['model']} started" if retrain and retrain.get("task") else "")
            )
            if retrain and retrain.get("task"):
                self.progress_timer.start()

        self.logic.submit_label(path, names, done, self.status)

    def on_train(self) -> None:
        self.logic.train(
            self.model(), lambda _: (self.status("Training started"), self.progress_timer.start()), self.status
        )

    def on_stop(self) -> None:
        self.logic.stop_training(lambda _: self.status("Training stopped"), self.status)

    def on_progress(self) -> None:
        def done(p: dict) -> None:
            self.ui.trainProgress.value = p["percent"]
            dice = f", last validation Dice {p['last_dice']:.3f}" if p["last_dice"] is not None else ""
            self.status(f"Training {p['status']}: epoch {p['epoch']}/{p['max_epochs']}{dice}")
            if p["status"] not in ("SUBMITTED", "RUNNING"):
                self.progress_timer.stop()
                self.on_refresh()  # the new version and its curve

        self.logic.training_progress(self.model(), done, self.status)

    def on_preannotate(self) -> None:
        def done(res: dict) -> None:
            self.status(f"Pre-annotating {res.get('total', '?')} studies with {self.model()} on the server")
            self.batch_timer.start()

        self.logic.pre_annotate(self.model(), done, self.status, tta=bool(self.ui.ttaCheckBox.checked))

    def on_batch_progress(self) -> None:
        def done(b: dict) -> None:
            self.status(
                f"Pre-annotation {b.get('status', '?')}: {b.get('done', 0)}/{b.get('total', 0)} done, "
                f"{b.get('failed', 0)} failed"
            )
            if b.get("status") not in ("RUNNING", "SUBMITTED"):
                self.batch_timer.stop()

        self.logic.pre_annotation_progress(done, self.status)

    def on_refresh(self) -> None:
        def done(ov: dict) -> None:
            self.overview = ov
            self._show_overview()

        self.logic.fetch_overview(done, self.status)

    def _show_overview(self) -> None:
        """Fill the versions table and point the two plots at this model's chart nodes."""
        model_ov = self.overview.get(self.model())
        table = self.ui.versionsTable
        table.clearContents()
        if not model_ov:
            table.setRowCount(0)
            return
        rows = model_ov["versions"]
        table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            dice = f"{r['mean_dice']:.3f}" if isinstance(r["mean_dice"], (int, float)) else "-"
            for j, text in enumerate((r["id"], "serving" if r["serving"] else (r["state"] or ""), dice)):
                item = qt.QTableWidgetItem(str(text))
                if r["serving"]:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                table.setItem(i, j, item)
        curve, bars = self.logic.plot_overview(self.model(), model_ov)
        self._show_chart(self.plots[0], curve)
        self._show_chart(self.plots[1], bars)

    def on_clear_cache(self) -> None:
        removed = self.logic.clear_cache()
        self.status(f"Deleted {removed} downloaded files of {self.logic.client.url} from this computer")

    def cleanup(self) -> None:
        if self.logic:
            self.logic.close()


class UNetSegTest(ScriptedLoadableModuleTest):
    """Slicer self-test: the Logic reports an unreachable server in plain words without blocking."""

    def runTest(self) -> None:
        with tempfile.TemporaryDirectory(prefix="UNetSegTest_") as cache:
            logic = UNetSegLogic("http://127.0.0.1:9", timeout=2, cache_dir=cache)
            errors: list[str] = []
            logic.connect(lambda _: None, errors.append)
            logic.wait(30)
            logic.close()
        assert errors and "cannot reach the server" in errors[0], errors
        assert not os.path.exists(logic.workdir)

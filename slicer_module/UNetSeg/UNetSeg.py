"""UNetSeg: 3D Slicer module for a unet_seg (MONAI Label) server — segment, correct, submit, retrain.

Widget: thin Qt glue (server URL remembered in Slicer's settings, model picker from /info,
Next study, Segment with a TTA toggle, Submit label, Train / Stop with progress and last Dice,
a status line). Logic: everything else, on ``UNetSegLib`` (pure Python). Network calls run on a
worker thread; results come back to the main thread through ``UNetSegLogic.poll()`` (driven by a
QTimer in the widget), so Slicer never freezes and errors are shown in plain words.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from UNetSegLib import ServerError, UNetSegClient, label_info

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
except ImportError:  # plain Python (tests, scripts): the Logic works without Qt
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


class UNetSeg(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "UNetSeg"
        parent.categories = ["Segmentation"]
        parent.contributors = ["unet_seg developers"]
        parent.helpText = (
            "Connect to a unet_seg server, get the next study worth annotating, segment it (optionally with "
            "test-time augmentation), correct it in Segment Editor, submit it and retrain."
        )
        parent.acknowledgementText = "Built on MONAI Label and MONAI."


class UNetSegLogic(ScriptedLoadableModuleLogic):
    """Everything but the widgets: server calls in the background, label import/export by name."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = UNetSegClient(url, timeout=timeout)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="UNetSeg")
        self.pending: list[tuple[Future, Callable[[Any], None], Callable[[str], None]]] = []
        self.models: dict[str, dict] = {}
        self.current: dict[str, Any] = {}
        self.workdir = tempfile.mkdtemp(prefix="UNetSeg_")

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

    # ---- the loop ---------------------------------------------------------------------------
    def set_url(self, url: str) -> None:
        self.client = UNetSegClient(url, timeout=self.client.timeout)

    def connect(self, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> Future:
        """Fetch the models (ready or not) and strategies from /info."""

        def work() -> dict:
            info = self.client.info()
            self.models = self.client.models(info)
            return {"models": self.models, "strategies": sorted(info.get("strategies", {}))}

        return self.submit(work, on_done, on_error)

    def next_study(
        self, strategy: str, model: str | None, on_done: Callable[[dict], None], on_error: Callable[[str], None]
    ) -> Future:
        def work() -> dict:
            res = self.client.next_sample(strategy, **({"model": model} if model else {}))
            if not res:
                raise ServerError(0, "no unlabelled study is left to annotate")
            self.current = {"image": res["id"], "path": res.get("path")}
            return res

        return self.submit(work, on_done, on_error)

    def segment(
        self, model: str, tta: bool, on_done: Callable[[dict], None], on_error: Callable[[str], None]
    ) -> Future:
        """Segment the current study; the result dict has the label file and the server's label names."""
        image = self.current.get("image")
        if not image:
            raise ValueError("ask for a study first (Next study)")

        def work() -> dict:
            path, meta = self.client.infer(model, image, os.path.join(self.workdir, f"{image}_{model}"), tta=tta)
            names = meta.get("label_names") or self.models.get(model, {}).get("labels", {})
            self.current.update({"label": path, "label_names": names, "model": model})
            return {"label": path, "label_names": names, "meta": meta}

        return self.submit(work, on_done, on_error)

    def submit_label(
        self,
        label_path: str,
        label_names: dict[str, int],
        on_done: Callable[[dict], None],
        on_error: Callable[[str], None],
    ) -> Future:
        """Store the corrected label of the current study (values = the server's label values)."""
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

    # ---- Slicer scene (only inside Slicer) ---------------------------------------------------
    def import_label(self, label_path: str, label_names: dict[str, int], reference_volume: Any) -> Any:
        """Load the label into a segmentation node through a colour table built from the label NAMES."""
        import UNetSegScene

        return UNetSegScene.import_label(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), label_path, label_names, reference_volume
        )

    def export_label(self, segmentation: Any, reference_volume: Any, label_names: dict[str, int]) -> str:
        """Write the corrected segmentation as a label map whose values are the server's (by segment name)."""
        import UNetSegScene

        path = os.path.join(self.workdir, f"{self.current.get('image', 'label')}_corrected.nii.gz")
        return UNetSegScene.export_label(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), segmentation, reference_volume, label_names, path
        )


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
        self.segmentation: Any = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        widget = slicer.util.loadUI(self.resourcePath("UI/UNetSeg.ui"))
        self.layout.addWidget(widget)
        self.ui = slicer.util.childWidgetVariables(widget)
        widget.setMRMLScene(slicer.mrmlScene)
        url = qt.QSettings().value(SETTINGS_URL_KEY, "http://127.0.0.1:8000")
        self.ui.serverUrl.text = url
        self.logic = UNetSegLogic(url)
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.logic.poll)
        self.timer.start()
        self.ui.connectButton.connect("clicked(bool)", self.on_connect)
        self.ui.nextButton.connect("clicked(bool)", self.on_next)
        self.ui.segmentButton.connect("clicked(bool)", self.on_segment)
        self.ui.submitButton.connect("clicked(bool)", self.on_submit)
        self.ui.trainButton.connect("clicked(bool)", self.on_train)
        self.ui.stopButton.connect("clicked(bool)", self.on_stop)
        self.progress_timer = qt.QTimer()
        self.progress_timer.setInterval(5000)
        self.progress_timer.connect("timeout()", self.on_progress)

    def status(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def model(self) -> str:
        return self.ui.modelSelector.currentText

    def on_connect(self) -> None:
        url = self.ui.serverUrl.text.strip()
        qt.QSettings().setValue(SETTINGS_URL_KEY, url)
        self.logic.set_url(url)
        self.status(f"Connecting to {url} ...")

        def done(res: dict) -> None:
            self.ui.modelSelector.clear()
            for name, m in res["models"].items():
                self.ui.modelSelector.addItem(name if m["ready"] else f"{name}")
            self.ui.strategySelector.clear()
            for s in res["strategies"]:
                self.ui.strategySelector.addItem(s)
            not_ready = [n for n, m in res["models"].items() if not m["ready"]]
            self.status(
                f"Connected. Models: {', '.join(res['models'])}"
                + (f" (not trained yet: {', '.join(not_ready)})" if not_ready else "")
            )

        self.logic.connect(done, self.status)

    def on_next(self) -> None:
        def done(res: dict) -> None:
            self.volume = (
                slicer.util.loadVolume(res["path"]) if res.get("path") and os.path.exists(res["path"]) else None
            )
            self.status(
                f"Study {res['id']}" + (f" (uncertainty {res['score']:.3f})" if res.get("score") is not None else "")
            )

        self.logic.next_study(self.ui.strategySelector.currentText or "first", self.model(), done, self.status)

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

        self.logic.training_progress(self.model(), done, self.status)

    def cleanup(self) -> None:
        if self.logic:
            self.logic.pool.shutdown(wait=False)


class UNetSegTest(ScriptedLoadableModuleTest):
    """Slicer self-test: the Logic reports an unreachable server in plain words without blocking."""

    def runTest(self) -> None:
        logic = UNetSegLogic("http://127.0.0.1:9", timeout=2)
        errors: list[str] = []
        logic.connect(lambda _: None, errors.append)
        logic.wait(30)
        assert errors and "cannot reach the server" in errors[0], errors

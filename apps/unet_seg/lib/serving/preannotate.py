"""Pre-annotation: a background job that segments many datastore images and stores the predictions.

``POST /batch/infer/<model>`` replaces MONAI Label's batch inference (a subprocess with no
progress, no stop, and labels stored under ``original`` without the model version). Here one job
at a time walks the chosen images (unlabelled, all, labelled, or a list of ids) in the server
process and hands them to the inference executor **one at a time**, so a clinician's interactive
``/infer`` waits for at most one batch image. Each prediction is stored under the non-final tag
``prediction`` with ``{"model", "model_version", "created"}``; an image whose stored prediction
already comes from the serving version is skipped (a job can be re-run after a stop or a new
version) unless the request says ``"force": true``. ``GET /batch/infer/`` reports progress (done,
failed, skipped, images per minute) and ``DELETE /batch/infer/`` stops the job after the image
being segmented. "Next study" then opens the stored prediction when its version is the one
serving (``UNetSegApp.next_sample`` says so).

With ``--conf preannotation_ray ADDRESS`` (``auto`` or ``host:port`` of a Ray head) the job hands
its images to the same Ray executor as ``main.py predict --ray`` (``lib.cohort``) instead of the
server's own inference workers: one loaded model per Ray worker, the fast predict path
(``lib.fastpredict``, so unet3d and the 3-D nnunet with one channel), in chunks of
``RAY_CHUNK`` images so that progress is reported and a stop takes effect between chunks; a
worker lost mid-image is replaced and the image retried. The images must be files every Ray
node can read (one machine, or a shared file system).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from fastapi import HTTPException

from ..datasets import Case
from .executor import BoundedExecutor, QueueFull

logger = logging.getLogger(__name__)

PREDICTION_TAG = "prediction"
IMAGE_SETS = ("unlabeled", "all", "labeled")
RAY_CHUNK = 32
# /infer options the fast path honours on Ray workers (and keys viewers send along, which change nothing)
RAY_PARAMS = {"tta", "overlap", "blend", "amp", "device", "label_info", "largest_cc", "restore_label_idx", "client_id"}
APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PreAnnotation:
    """One pre-annotation job at a time (see module docstring)."""

    def __init__(self, app: Any, executor: BoundedExecutor) -> None:
        self.app = app
        self.executor = executor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict[str, Any] = {}
        conf = getattr(app, "app_conf", None)
        self.ray_address: str | None = str(conf.get("preannotation_ray", "") if conf else "").strip() or None

    # ---- requests ---------------------------------------------------------------------------
    def start(
        self, model: str, images: str, image_ids: list[str] | None, params: dict[str, Any], force: bool = False
    ) -> dict[str, Any]:
        """Start a job over ``images`` (or ``image_ids``); 409 while one runs; ``force`` redoes stored predictions."""
        datastore = self.app.datastore()
        if image_ids is not None:
            known = set(datastore.list_images())
            missing = [i for i in image_ids if i not in known]
            if missing:
                raise HTTPException(status_code=404, detail=f"image_ids not in the datastore: {missing[:10]}")
            todo = list(dict.fromkeys(image_ids))
        elif images == "unlabeled":
            todo = sorted(datastore.get_unlabeled_images())
        elif images == "labeled":
            todo = sorted(datastore.get_labeled_images())
        else:
            todo = sorted(datastore.list_images())
        if self.ray_address:
            self._ray_model(model, params)  # 422 now, not a failed job later
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise HTTPException(
                    status_code=409,
                    detail=f"a pre-annotation job is running ({self._state.get('done', 0)}/"
                    f"{self._state.get('total', 0)}); stop it with DELETE /batch/infer/ or wait",
                )
            self._stop.clear()
            job = f"{model}-{int(time.time())}"
            self._state = {
                "job": job,
                "model": model,
                "status": "RUNNING",
                "total": len(todo),
                "done": 0,
                "failed": 0,
                "skipped": 0,
                "finished": 0,
                "started": time.time(),
                "elapsed_s": 0.0,
                "per_minute": None,
                "current": None,
                "errors": [],
            }
            self._thread = threading.Thread(
                target=self._run, args=(model, todo, params, force), name="preannotate", daemon=True
            )
            self._thread.start()
        logger.info(f"pre-annotation {job}: {len(todo)} images with {model}")
        return {"job": job, "total": len(todo), "model": model}

    def status(self) -> dict[str, Any]:
        with self._lock:
            if not self._state:
                return {"status": "NONE"}
            out = dict(self._state, errors=list(self._state["errors"]))
        if out["status"] == "RUNNING":
            out["elapsed_s"] = round(time.time() - out["started"], 2)
        return out

    def stop(self) -> dict[str, Any]:
        """Stop after the current image; the reply is the status at that moment."""
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
        if not running:
            raise HTTPException(status_code=404, detail="no pre-annotation job is running")
        self._stop.set()
        return self.status()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the job ends (server shutdown, tests)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ---- the job ----------------------------------------------------------------------------
    def _serving_version(self, model: str) -> str | None:
        serving = self.app.model_store(model).serving()
        return serving.id if serving else None

    def _ray_model(self, model: str, params: dict[str, Any]) -> tuple[str, dict[str, int], dict[str, Any]]:
        """(served model file, labels, request) for Ray workers; 422 naming what the fast path cannot do."""
        from ..fastpredict import Unsupported, load_fast_model

        extra = sorted(set(params) - RAY_PARAMS)
        if extra:
            raise HTTPException(
                status_code=422,
                detail=f"pre-annotation on Ray takes {', '.join(sorted(RAY_PARAMS - {'label_info', 'client_id'}))}; "
                f"not {', '.join(extra)}",
            )
        task = self.app._infers[model]
        store = self.app.model_store(model)
        rec = store.serving()
        if rec is None:
            raise HTTPException(status_code=409, detail=f"model '{model}' has no serving version")
        path = store.path(rec.id)
        labels = dict(task.labels)
        request = {**dict(getattr(task, "_config", {}) or {}), **params}
        try:
            load_fast_model(model, path, labels, torch.device("cpu"))
        except Unsupported as e:
            raise HTTPException(
                status_code=422,
                detail=f"pre-annotation on Ray serves unet3d and 3-D nnunet models with one channel ({e}); "
                "start the server without preannotation_ray to pre-annotate with this model",
            ) from e
        return path, labels, request

    def _run_on_ray(self, model: str, todo: list[str], params: dict[str, Any], force: bool) -> str:
        """The job on the Ray cluster, ``RAY_CHUNK`` images at a time; returns the job's final status."""
        from ..cohort import predict_cohort
        from ..fastpredict import FileSegmenter

        datastore = self.app.datastore()
        version = self._serving_version(model)
        path, labels, request = self._ray_model(model, params)
        cases = []
        for image_id in todo:
            stored = datastore.get_label_info(image_id, PREDICTION_TAG) or {}
            if not force and version and stored.get("model") == model and stored.get("model_version") == version:
                self._update(skipped=1)
                continue
            uri = datastore.get_image_uri(image_id)
            if not isinstance(uri, str) or not os.path.isfile(uri):
                self._update(failed=1, error={"image": image_id, "error": "not a file the Ray workers can read"})
                continue
            cases.append(Case(image_id, uri))
        out_dir = tempfile.mkdtemp(prefix="preannotate-ray-")
        try:
            for i in range(0, len(cases), RAY_CHUNK):
                if self._stop.is_set():
                    return "STOPPED"
                chunk = cases[i : i + RAY_CHUNK]
                self._update(current=chunk[0].name)
                factory = functools.partial(FileSegmenter, model, path, labels, request, out_dir)
                report = predict_cohort(chunk, out_dir, factory, address=self.ray_address or "", app_dir=APP_DIR)
                by_name = {os.path.basename(p).split(".nii")[0]: p for p in report["written"]}
                for case in chunk:
                    if case.name in by_name:
                        info = {"model": model, "model_version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                        datastore.save_label(case.name, by_name[case.name], PREDICTION_TAG, info)
                        os.remove(by_name[case.name])
                        self._update(done=1)
                    else:
                        why = report["failed"].get(case.name, "no label came back")
                        self._update(failed=1, error={"image": case.name, "error": str(why)[:300]})
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        return "DONE"

    def _run(self, model: str, todo: list[str], params: dict[str, Any], force: bool) -> None:
        status = "DONE"
        try:
            if self.ray_address:
                status = self._run_on_ray(model, todo, params, force)
                todo = []
            for image_id in todo:
                if self._stop.is_set():
                    status = "STOPPED"
                    break
                self._update(current=image_id)
                try:
                    outcome = self._one(model, image_id, params, force)
                except Exception as e:  # noqa: BLE001 - one bad image must not end the job: recorded, next
                    logger.warning(f"pre-annotation: {image_id}: {type(e).__name__}: {e}")
                    detail = getattr(e, "detail", None) or str(e) or type(e).__name__
                    self._update(failed=1, error={"image": image_id, "error": str(detail)[:300]})
                    continue
                self._update(**{outcome: 1})
        except Exception as e:  # noqa: BLE001 - the listing itself failed (e.g. the PACS): the job ends FAILED
            logger.exception("pre-annotation failed")
            status = "FAILED"
            self._update(error={"image": None, "error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            with self._lock:
                self._state["status"] = status
                self._state["current"] = None
                self._state["elapsed_s"] = round(time.time() - self._state["started"], 2)
            logger.info(f"pre-annotation {self._state['job']}: {status} {self.status()}")

    def _one(self, model: str, image_id: str, params: dict[str, Any], force: bool) -> str:
        """Segment one image and store its prediction; 'skipped' when the serving version already made it."""
        datastore = self.app.datastore()
        version = self._serving_version(model)
        stored = datastore.get_label_info(image_id, PREDICTION_TAG) or {}
        if not force and version and stored.get("model") == model and stored.get("model_version") == version:
            return "skipped"
        request = {**params, "model": model, "image": datastore.get_image_uri(image_id)}
        result = self._submit(self.app.infer, request)
        path = result.get("file")
        try:
            made_by = (result.get("params") or {}).get("model_version") or version
            info = {"model": model, "model_version": made_by, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            datastore.save_label(image_id, path, PREDICTION_TAG, info)
        finally:
            if path and os.path.exists(path):
                os.remove(path)
        return "done"

    def _submit(self, fn: Callable[..., dict[str, Any]], request: dict[str, Any]) -> dict[str, Any]:
        """One image through the shared executor; when it is full, wait (interactive requests go first)."""
        while True:
            try:
                return self.executor.submit(fn, request).result()
            except QueueFull as e:
                if self._stop.wait(min(e.retry_after, 5)):
                    raise RuntimeError("stopped while waiting for a free inference worker") from e

    def _update(self, error: dict[str, Any] | None = None, current: str | None = None, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                self._state[key] += n
            if current is not None:
                self._state["current"] = current
            if error is not None:
                self._state["errors"] = (self._state["errors"] + [error])[-20:]
            elapsed = time.time() - self._state["started"]
            finished = self._state["done"] + self._state["failed"]
            self._state["elapsed_s"] = round(elapsed, 2)
            self._state["per_minute"] = round(60.0 * self._state["done"] / elapsed, 2) if self._state["done"] else None
            self._state["finished"] = finished + self._state["skipped"]

"""unet_seg: the MONAI Label app serving the U-Net family (UNet2D, UNet3D, nnU-Net 3D/2D).

Start it with ``monailabel start_server --app apps/unet_seg --studies DIR [--conf k v ...]``.
App-level conf keys (all parsed in ``lib/conf.py``):

* ``models``     comma list of config names or ``all`` (default); unknown names stop start-up
* ``model_dir``  where published models, splits, stats and the MLflow db live
                 (default ``<app>/model``)
* ``tracking``   ``mlflow`` (sqlite db in model_dir, works offline) or ``none``
* ``auto_retrain_after``  start training after this many newly submitted final labels
                 (default 5; 0 turns it off); ``auto_retrain_model`` picks the model (default the first)

Model keys (``labels``, ``roi_size``, ``preset``, ``pretrained``, ...) are documented in each
``lib/configs/<name>.py`` and may be prefixed with the model name (``unet3d.roi_size``).
Nothing is downloaded at start-up.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.async_tasks.task import AsyncTask

from lib.activelearning import scoring_methods, strategies
from lib.conf import AppConf, ConfError, parse_names
from lib.configs import CONFIG_NAMES, load_config_class
from lib.datastore import UploadRules, ValidatingDatastore
from lib.dicomweb import dicomweb_datastore
from lib.infers.base import ModelNotReady
from lib.modelstore import ModelStore
from lib.runtime import keep_freed_memory
from lib.serving.limits import BodyGuard, Limits
from lib.serving.models import ModelRoutes
from lib.serving.preannotate import PREDICTION_TAG
from lib.serving.routes import Routes
from lib.serving.security import SecurityConf, SecurityGate, install_user_overrides
from lib.validation import InputError, TooLarge

logger = logging.getLogger(__name__)


class UNetSegApp(MONAILabelApp):
    """MONAI Label app with one inferer and one trainer per selected U-Net config."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.app_conf = AppConf(conf)
        self.model_dir = os.path.abspath(self.app_conf.str("model_dir", os.path.join(app_dir, "model")))
        os.makedirs(self.model_dir, exist_ok=True)
        self.limits = Limits.from_conf(self.app_conf)
        keep_freed_memory()  # the server infers: no page faults per call (lib.runtime)
        self.model_names = parse_names(self.app_conf.get("models", "all"), CONFIG_NAMES, "models")
        self.models = {}
        for name in self.model_names:
            cfg = load_config_class(name)()
            cfg.init(name, self.model_dir, dict(conf), None)
            self.models[name] = cfg
        logger.info(f"unet_seg models: {self.model_names}; model_dir: {self.model_dir}")
        self._new_labels: set[str] = set()  # final labels submitted since the last automatic retraining
        self._retrain_lock = threading.Lock()
        labels: list[str] = []  # union of the models' label names, so viewers see them before training
        for cfg in self.models.values():
            labels += [name for name in cfg.labels if name not in labels]
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="unet_seg",
            labels=labels,
            description="U-Net family (UNet2D, UNet3D, nnU-Net) segmentation with training, TTA and active learning",
            version="0.1.0",
        )
        # the command line has no server to post scoring requests to after training
        # (MONAI Label reads its setting at import)
        self._auto_update_scoring = self.app_conf.bool("auto_update_scoring", settings.MONAI_LABEL_AUTO_UPDATE_SCORING)

    # ---- public accessors (the command line and the routes use these, never the private task dicts) ----
    def infer_task(self, name: str) -> Any:
        """The inferer of model ``name`` (KeyError naming the models if unknown)."""
        return self._task(self._infers, name)

    def train_task(self, name: str) -> Any:
        """The trainer of model ``name``."""
        return self._task(self._trainers, name)

    def model_store(self, name: str) -> ModelStore:
        """The version store of model ``name``."""
        return self._task({n: cfg.store for n, cfg in self.models.items()}, name)

    @staticmethod
    def _task(tasks: dict[str, Any], name: str) -> Any:
        if name not in tasks:
            raise KeyError(f"unknown model {name!r}; available models: {', '.join(tasks)}")
        return tasks[name]

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return super().init_datastore()
            names: dict[str, int] = {}  # label name per value (the first model naming a value wins)
            for cfg in self.models.values():
                names.update({n: v for n, v in cfg.labels.items() if v not in names.values()})
            return dicomweb_datastore(self.studies, self.app_conf, names, self.limits.label_tolerance_mm)
        datastore = ValidatingDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        datastore.configure(self.upload_rules())
        return datastore

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label downloads dcmqi here; unet_seg never needs it (nothing is downloaded at start-up)."""

    def upload_rules(self) -> UploadRules:
        """What uploads must be to serve at least one model: channels and dims, label values; limits."""
        inputs: set[tuple[int, int]] = set()
        values: set[int] = set()
        for cfg in self.models.values():
            channels = len(cfg.modalities)
            # 2D: images and, slice by slice, volumes
            inputs |= {(channels, 2), (channels, 3)} if cfg.dims == 2 else {(channels, 3)}
            values |= set(cfg.labels.values()) | set(getattr(cfg, "label_map", {}) or {})
        return UploadRules(
            inputs=inputs,
            label_values=values,
            max_voxels=self.limits.max_voxels,
            label_tolerance_mm=self.limits.label_tolerance_mm,
        )

    def on_init_complete(self) -> None:
        """Server mode: put the admission-checked, off-the-loop routes and the body guard in front of MONAI Label's."""
        server = sys.modules.get("monailabel.app")
        routes = self.app_conf.str("request_routes", "unet_seg").lower()
        if routes not in ("unet_seg", "monailabel"):
            raise ConfError(f"request_routes: expected unet_seg or monailabel, got {routes!r}")
        if server is not None and routes == "monailabel":
            logger.warning(
                "request_routes=monailabel: MONAI Label's own routes serve /infer and uploads (inference on the "
                "event loop, no admission checks); for side-by-side benchmarks only, never in production"
            )
        elif server is not None:
            for cfg in self.models.values():  # only here and at training start: no write can be running
                cfg.store.recover()
            fastapi_app = server.app
            self.security = SecurityConf.from_conf(self.app_conf, settings.MONAI_LABEL_AUTH_ENABLE, settings)
            self.routes = Routes(self, self.limits)
            self.routes.install(fastapi_app, extra=ModelRoutes(self).table)
            if fastapi_app.middleware_stack is None:
                fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
            folders = [self.studies, self.model_dir, self.app_dir, tempfile.gettempdir(), sys.prefix]
            fastapi_app.middleware_stack = BodyGuard(fastapi_app.middleware_stack, self.limits, lambda: folders)
            fastapi_app.middleware_stack = SecurityGate(fastapi_app.middleware_stack, self.security)
            install_user_overrides(fastapi_app)
            warn_if_exposed(self.security)
        super().on_init_complete()

    def init_infers(self) -> dict[str, InferTask]:
        return {name: cfg.infer() for name, cfg in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: cfg.trainer() for name, cfg in self.models.items()}

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        """Count newly submitted final labels; after ``auto_retrain_after`` of them start training if none runs."""
        every = self.app_conf.int("auto_retrain_after", 5, minimum=0)
        model = self.app_conf.str("auto_retrain_model", next(iter(self._trainers), ""))
        if every <= 0 or model not in self._trainers:
            return {}
        if not self.datastore().get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value):
            return {}
        with self._retrain_lock:
            self._new_labels.add(image_id)
            out: dict[str, Any] = {"new_final_labels": len(self._new_labels), "auto_retrain_after": every}
            if len(self._new_labels) < every:
                return out
            task, message = AsyncTask.run("train", request={"model": model})
            if task:
                logger.info(f"auto-retrain: {len(self._new_labels)} new final labels -> training {model}")
                self._new_labels.clear()
                out["retrain"] = {"model": model, "task": task}
            else:
                out["retrain"] = {"model": model, "pending": message}  # a training runs; the next label retries
            return out

    def init_strategies(self) -> dict[str, Any]:
        return strategies(self._infers)

    def init_scoring_methods(self) -> dict[str, Any]:
        return scoring_methods(self._infers)

    def next_sample(self, request: dict) -> dict:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(
                status_code=404, detail=f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}"
            )
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; available models: {', '.join(self._infers)}"
            )
        try:
            result = super().next_sample(request)
        except ModelNotReady as e:
            raise HTTPException(status_code=409, detail=f"{strategy}: {e}") from e
        except (InputError, ConfError) as e:
            raise HTTPException(status_code=422, detail=f"{strategy}: {e}") from e
        result.pop("path", None)  # no server paths out: clients download the image (GET /datastore/image)
        if result.get("id"):
            prediction = self._datastore.get_label_info(result["id"], PREDICTION_TAG) or {}
            if prediction.get("model") in self._infers:
                serving = self.model_store(prediction["model"]).serving()
                result["prediction"] = {
                    "tag": PREDICTION_TAG,
                    "model": prediction["model"],
                    "model_version": prediction.get("model_version"),
                    "created": prediction.get("created"),
                    "serving": serving is not None and serving.id == prediction.get("model_version"),
                }
        return result

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["models_not_ready"] = {name: task.info() for name, task in self._infers.items() if not task.is_valid()}
        out["model_versions"] = {
            name: [
                {
                    "id": v["id"],
                    "state": v["state"],
                    "serving": v["state"] == "serving",
                    "mean_dice": v["val_mean_dice"],
                    "created": v["created"],
                    "per_class": (m.get("version") or {}).get("val_dice_per_class", {})
                    if v["state"] == "serving"
                    else {},
                }
                for v in m.get("versions", [])
            ]
            for name, m in {**out.get("models", {}), **out.get("models_not_ready", {})}.items()
        }
        routes = getattr(self, "routes", None)
        if routes is not None:
            out["inference_queue"] = routes.executor.stats()
            out["preannotation"] = routes.preannotation.status()
        return out

    def infer(self, request: dict, datastore: Any = None) -> dict:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; available models: {', '.join(self._infers)}"
            )
        try:
            return super().infer(request, datastore)
        except ModelNotReady as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except (InputError, ConfError) as e:
            raise HTTPException(status_code=413 if isinstance(e, TooLarge) else 422, detail=f"{model}: {e}") from e

    def train(self, request: dict) -> dict:
        model = request.get("model")
        if model not in self._trainers:
            raise ConfError(f"unknown model {model!r}; trainable models: {', '.join(self._trainers)}")
        return super().train(request)


def warn_if_exposed(security: SecurityConf) -> None:
    """A loud warning when the server listens beyond loopback with authentication off."""
    host = "127.0.0.1"
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in ("--host", "-h") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    if not security.auth_enabled and host not in ("127.0.0.1", "localhost", "::1"):
        banner = "!" * 100
        logger.warning(
            f"\n{banner}\nunet_seg listens on {host} with AUTHENTICATION OFF: anyone who reaches this port can read "
            f"studies, submit labels and start training. Bind 127.0.0.1 or enable MONAI_LABEL_AUTH_ENABLE "
            f"with a realm (README, Security).\n{banner}"
        )

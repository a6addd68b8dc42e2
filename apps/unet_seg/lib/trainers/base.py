"""Trainer base shared by every model: the recipe hooks and one training request from start to finish.

A model's trainer subclasses ``SegTrainTask`` and supplies only its recipe: the network spec
class and spec, loss, optimizer, training/validation transforms, window and model-specific meta.
Everything else is shared, in one module each:

* ``splits``: the persisted train/validation split (or k folds) and the data fingerprint;
* ``launch``: this process, ``world_size`` spawned processes (gloo on CPU, NCCL on CUDA) or torchrun;
* ``publish``: the run's paths (``RunPaths``), its version in the model store, the promotion
  gate and the stats file;
* here: AMP per request (``lib.runtime``) in training and validation (fp16 on CUDA with a
  gradient scaler), resume from the last finished epoch, ``dataset: auto`` caching when the
  decoded data fits ``cache_mb``, MLflow tracking on ``sqlite:///<model_dir>/mlruns.db``
  (offline) or ``tracking: none``, per-class validation Dice (``val_dice_<label>``).

Fine-tuning starts from the serving version when its weights fit the configured network.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.handlers import MeanDice, from_engine
from monai.inferers import Inferer
from monai.transforms import AsDiscreted
from monai.utils import CommonKeys as Keys
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from ..checkpoints import CheckpointMeta, Validation, incompatibility, now_iso
from ..conf import ConfError, parse_bool, parse_float, parse_int
from ..modelstore import ModelStore
from ..networks import same_weights_layout
from ..runtime import AmpPolicy, resolve_amp, resolve_device
from ..transforms import InputError
from .launch import launch, world_size_for
from .publish import PROMOTION_MODES, EngineInferer, PublishModel, RunPaths, finish_run
from .splits import data_fingerprint, estimated_bytes, fold_split, stable_split

logger = logging.getLogger(__name__)


class SegTrainTask(BasicTrainTask):
    """Shared segmentation trainer (see module docstring). Subclasses define the recipe."""

    #: the network spec class of this model (``from_dict(spec).build()`` makes the network)
    spec_class: Any = None
    #: nnU-Net-style search: keep the largest connected component of a class only where that
    #: improved the run's validation Dice (stored in the version's meta, applied at inference)
    search_postprocessing: bool = False

    def __init__(
        self,
        *,
        model_name: str,
        store: ModelStore,
        labels: Mapping[str, int],
        spatial_dims: int,
        in_channels: int,
        description: str,
        tracking: str = "mlflow",
        config: Mapping[str, Any] | None = None,
        cache_mb: int = 2048,
        promotion: str,
        promotion_margin: float,
    ) -> None:
        self.model_name = model_name
        self.store = store
        self.model_dir = store.model_dir
        self.labels = dict(labels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.cache_mb = cache_mb
        if promotion not in PROMOTION_MODES:
            raise ConfError(f"promotion: expected one of {', '.join(PROMOTION_MODES)}, got {promotion!r}")
        self.promotion_mode, self.promotion_margin = promotion, float(promotion_margin)
        # the single-split run's paths (info, CLI); a request makes its own
        self.paths = RunPaths(self.model_dir, model_name)
        tracking = (tracking or "none").lower()
        defaults: dict[str, Any] = {
            "name": self.paths.name,
            "device": "auto",
            "amp": True,
            "world_size": 1,
            "multi_gpu": False,
            "val_split": 0.2,
            "split_seed": 0,
            "resplit": False,
            "val_batch_size": 1,
            "grad_clip": 0.0,
            "dataset": "auto",
            "dataloader": "ThreadDataLoader",
            "tracking": tracking if tracking in ("mlflow", "none") else "none",
            "tracking_uri": f"sqlite:///{os.path.join(self.model_dir, 'mlruns.db')}",
            "early_stop_patience": -1,
            "pretrained": True,
        }
        defaults.update(config or {})
        super().__init__(
            model_dir=self.model_dir,
            description=description,
            config=defaults,
            amp=False,  # AMP is handled per request by our own iteration and inferer
            publish_path=None,
            stats_path=self.paths.stats,
            labels=list(self.labels),
            tracking=defaults["tracking"],
            tracking_uri=defaults["tracking_uri"],
            train_save_interval=1000000,
            n_saved=1,
        )

    # ---- what a model defines -------------------------------------------------------------
    @abstractmethod
    def network_spec(self, context: Context) -> dict[str, Any]:
        """JSON spec from which the network is rebuilt (stored in the version's meta)."""

    @abstractmethod
    def roi_size(self, context: Context) -> tuple[int, ...]:
        """Training crop / inference window size."""

    def extra_meta(self, context: Context) -> dict[str, Any]:
        """Model-specific meta fields of ``CheckpointMeta`` (normalisation, plan, label_map...)."""
        return {}

    def build_network(self, spec: Mapping[str, Any]) -> torch.nn.Module:
        """The network a stored spec describes (the serving version's may differ from this config's)."""
        return self.spec_class.from_dict(dict(spec)).build()

    def network(self, context: Context) -> torch.nn.Module:
        return self.build_network(self.network_spec(context))

    def expected_meta(self) -> dict[str, Any]:
        """The meta fields a version must match to be loaded for this config."""
        return {"labels": self.labels, "in_channels": self.in_channels, "spatial_dims": self.spatial_dims}

    def version_meta(self, context: Context, validation: Validation) -> CheckpointMeta:
        """The meta of this run's version at the current epoch."""
        req = context.request
        return CheckpointMeta(
            model=self.model_name,
            labels=dict(self.labels),
            in_channels=self.in_channels,
            spatial_dims=self.spatial_dims,
            spec=self.network_spec(context),
            roi_size=list(self.roi_size(context)),
            slice_axis=self.slice_axis(context),
            validation=validation,
            data_fingerprint=req.get("_fingerprint"),
            parent=req.get("_parent"),
            created=now_iso(),
            source="trained",
            run_id=context.run_id,
            epoch=int(context.trainer.state.epoch),
            fold=req["_paths"].fold,
            amp=self.amp_policy(context).describe(),
            world_size=max(context.world_size, 1),
            **self.extra_meta(context),
        )

    # ---- request helpers --------------------------------------------------------------------
    def amp_policy(self, context: Context) -> AmpPolicy:
        """AMP policy for this request on this process's device."""
        return resolve_amp(context.request.get("amp", True), context.device)

    @property
    def num_classes(self) -> int:
        """Output channels: background + labels."""
        return len(self.labels) + 1

    # ---- training loop pieces ---------------------------------------------------------------
    def train_iteration_update(self, context: Context) -> Callable[[Engine, Any], dict]:
        """One optimisation step with the request's AMP policy, grad scaler and clipping."""
        policy = self.amp_policy(context)
        scaler = torch.amp.GradScaler("cuda") if policy.use_scaler else None
        clip = parse_float(context.request.get("grad_clip", 0.0), "grad_clip")

        def step(engine: Engine, batchdata: dict) -> dict:
            batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
            inputs, targets = batch[0], batch[1]
            engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
            engine.network.train()
            engine.optimizer.zero_grad(set_to_none=True)
            with policy.autocast():
                pred = engine.inferer(inputs, engine.network)
                loss = self.compute_loss(engine, pred, targets, batchdata).mean()
            # deep-supervision nets stack their heads as (B, heads, C, ...): metrics use the first
            engine.state.output[Keys.PRED] = pred[:, 0] if pred.ndim == inputs.ndim + 1 else pred
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(engine.optimizer)
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(engine.network.parameters(), clip)
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(engine.network.parameters(), clip)
                engine.optimizer.step()
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output

        return step

    def compute_loss(self, engine: Engine, pred: torch.Tensor, targets: torch.Tensor, batchdata: dict) -> torch.Tensor:
        """The training loss of one batch (override to use more of the batch, e.g. pixel weights)."""
        return engine.loss_function(pred, targets)

    def slice_axis(self, context: Context) -> int | None:
        """For 2D models on volumes: the axis slices are taken along (None for a 3D model)."""
        return None

    def val_inferer(self, context: Context) -> Inferer:
        return EngineInferer(self.roi_size(context), self.amp_policy(context), slice_axis=self.slice_axis(context))

    def train_post_transforms(self, context: Context) -> list:
        k = self.num_classes
        return [AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(k, k))]

    def val_additional_metrics(self, context: Context) -> dict[str, MeanDice]:
        """One Dice per label name (channel i = label value i)."""
        metrics = {}
        for name, value in self.labels.items():
            metrics[f"val_dice_{name}"] = MeanDice(output_transform=_channel_picker(value), include_background=True)
        return metrics

    def lr_scheduler_handler(self, context: Context) -> Any:
        return None

    def val_handlers(self, context: Context) -> list | None:
        # only rank 0 logs; building MLflow handlers on every rank races on the sqlite db
        return super().val_handlers(context) if context.local_rank == 0 else None

    @staticmethod
    def prepare_tracking(request: dict) -> None:
        """Create the MLflow store once, before any worker process opens it."""
        if str(request.get("tracking", "none")).lower() != "mlflow":
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or request.get("tracking_uri")
        if uri:
            import mlflow

            mlflow.MlflowClient(tracking_uri=uri)

    # ---- data -------------------------------------------------------------------------------
    def pre_process(self, request: dict, datastore: Any) -> list[dict]:
        datalist = datastore.datalist()
        if not datalist:
            raise ValueError(f"{self.model_name}: no labelled studies (labels/final) to train on")
        val_split = parse_float(request.get("val_split", 0.2), "val_split")
        if not 0.0 <= val_split < 1.0:
            raise ConfError(f"val_split must be in [0, 1), got {val_split}")
        seed = parse_int(request.get("split_seed", 0), "split_seed")
        paths: RunPaths = request["_paths"]
        if paths.fold is not None:
            nfolds = parse_int(request.get("nfolds", 5), "nfolds")
            train, val = fold_split(datalist, paths.folds, nfolds, paths.fold, seed)
        else:
            train, val = stable_split(
                datalist,
                paths.split,
                val_split,
                seed=seed,
                resplit=parse_bool(request.get("resplit", False), "resplit"),
            )
        request["train_ds"], request["val_ds"] = train, val
        request["_fingerprint"] = data_fingerprint(datalist)
        return datalist

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        train, val = context.request["train_ds"], context.request["val_ds"]
        if context.local_rank == 0:
            logger.info(f"Persisted split: {len(train)} training, {len(val)} validation")
        return train, val

    def _dataset(self, context: Context, datalist: list, is_train: bool, replace_rate: float = 0.25) -> Any:
        if context.dataset_type == "auto":
            size_mb = estimated_bytes(datalist) / 2**20
            context.dataset_type = "CacheDataset" if size_mb <= self.cache_mb else "Dataset"
            logger.info(
                f"dataset=auto: ~{size_mb:.0f} MB decoded vs cache_mb={self.cache_mb} -> {context.dataset_type}"
            )
        return super()._dataset(context, datalist, is_train, replace_rate)

    # ---- one request ------------------------------------------------------------------------
    def run_paths(self, request: Mapping[str, Any]) -> RunPaths:
        """The files of the run a request asks for (a fold run has its own stats and resume state)."""
        fold = request.get("fold")
        return RunPaths(
            self.model_dir, self.model_name, parse_int(fold, "fold") if fold is not None and str(fold) != "" else None
        )

    def __call__(self, request: dict, datastore: Any) -> dict:
        req = copy.deepcopy(self._config)
        req.update(copy.deepcopy(request))
        req["run_id"] = datetime.now().strftime("%Y%m%d_%H%M%S")
        paths = self.run_paths(req)
        req["_paths"], req["name"] = paths, paths.name
        self._stats_path = paths.stats  # MONAI Label writes its per-epoch stats there
        self.store.recover()  # a killed training may have left temp files or a 'training' version; none runs now
        if parse_bool(req.get("resume", False), "resume") and os.path.exists(paths.resume):
            req["pretrained"] = False  # the resume state carries the weights; do not load the serving model over them
        for key in ("max_epochs", "train_batch_size", "val_batch_size"):
            req[key] = parse_int(req[key], key, minimum=1)
        device = resolve_device(req.get("device"))
        req["device"] = device.type
        world_size = world_size_for(req, device)
        resolve_amp(req.get("amp", True), device)  # validate the value before spawning anything
        datalist = self.pre_process(req, datastore)
        self.prepare_tracking(req)
        start = time.time()
        try:
            launch(self.train, req, datalist, world_size, device)
        except Exception as e:
            root = _input_error_in(e)
            if root is not None:  # surface "label X has values [7] ..." instead of MONAI's wrapper
                raise root from e
            raise
        result = self.stats(paths)
        result["wall_time_s"] = round(time.time() - start, 1)
        self.cleanup(req)
        return result

    def _device(self, context: Context) -> torch.device:
        device = resolve_device(context.request.get("device"), rank=context.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        logger.info(f"{context.local_rank} - Using Device: {device}")
        return device

    def _create_network_and_optimizer(self, context: Context) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        network = self.network(context).to(context.device)
        context.network = network
        optimizer = self.optimizer(context)
        if context.multi_gpu:
            ids = [context.device.index] if context.device.type == "cuda" else None
            network = torch.nn.parallel.DistributedDataParallel(
                network,
                device_ids=ids,
                output_device=ids[0] if ids else None,
                find_unused_parameters=self._find_unused_parameters,
            )
        return network, optimizer

    def _load_checkpoint(self, context: Context, train_handlers: list) -> None:
        """Fine-tune from the serving version when its weights fit this config (else start from scratch)."""
        context.request["_parent"] = None
        if not parse_bool(context.pretrained, "pretrained"):
            return
        serving = self.store.serving()
        if serving is None:
            return
        try:
            state, meta = self.store.load(serving.id)
        except Exception as e:
            logger.warning(f"not initialising from {serving.id}: it cannot be read ({e})")
            return
        reason = incompatibility(meta, self.expected_meta())
        if reason is None and not same_weights_layout(meta.spec, self.network_spec(context)):
            reason = "network spec differs from the current config"  # (a different dropout rate does not count)
        if reason is not None:
            logger.info(f"Not initialising from {serving.id}: {reason}")
            return
        logger.info(f"Initialising from {serving.id}")
        getattr(context.network, "module", context.network).load_state_dict(state)
        context.request["_parent"] = serving.id

    def save_resume_state(self, context: Context) -> None:
        """Write the resume state atomically (rank 0, after each epoch's validation)."""
        net = getattr(context.network, "module", context.network)  # unwrap DDP
        state = {
            "network": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "optimizer": context.optimizer.state_dict(),
            "epoch": int(context.trainer.state.epoch),
            "iteration": int(context.trainer.state.iteration),
            "spec": self.network_spec(context),
            "run_id": context.run_id,
        }
        path = context.request["_paths"].resume
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load_resume_state(self, context: Context) -> int:
        """Continue from the resume state when it fits this config: weights, optimizer, epoch and lr schedule.

        Returns the epoch.
        """
        path = context.request["_paths"].resume
        name = os.path.basename(path)
        if not os.path.exists(path):
            logger.info(f"resume: no {name}; starting at epoch 1")
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("spec") != self.network_spec(context):
            raise ConfError(f"resume: {name} was made for another network ({state.get('spec')}); train without resume")
        epoch = int(state["epoch"])
        if epoch >= context.max_epochs:
            raise ConfError(
                f"resume: {name} already finished epoch {epoch} of max_epochs={context.max_epochs}; ask for more epochs"
            )
        getattr(context.network, "module", context.network).load_state_dict(state["network"])
        context.optimizer.load_state_dict(state["optimizer"])
        sched = getattr(context, "lr_scheduler", None)
        if sched is not None:
            sched.last_epoch = epoch
        context.trainer.state.epoch = epoch
        context.trainer.state.iteration = int(state["iteration"])
        logger.info(f"resume: continuing after epoch {epoch} from {name}")
        return epoch

    def finalize(self, context: Context) -> None:
        """Resume, step limit, and on rank 0: the per-epoch publisher and the end-of-run gate.

        Replaces MONAI Label's publisher.
        """
        # MONAI Label's stats file and early stopping (it publishes nothing: publish_path is None)
        super().finalize(context)
        if parse_bool(context.request.get("resume", False), "resume"):
            self.load_resume_state(context)
        max_steps = parse_int(context.request.get("max_steps", 0) or 0, "max_steps")
        if max_steps > 0:  # every rank stops after this many optimisation steps in total (validated first)
            context.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=max_steps), lambda e: e.terminate_epoch())
            context.trainer.add_event_handler(
                Events.EPOCH_COMPLETED, lambda e: e.terminate() if e.state.iteration >= max_steps else None
            )
        if context.local_rank != 0:
            return
        paths: RunPaths = context.request["_paths"]
        context.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.save_resume_state(context))
        publisher = PublishModel(self, context, paths)
        context.trainer.add_event_handler(Events.ITERATION_COMPLETED, publisher.on_iteration)
        (context.evaluator or context.trainer).add_event_handler(Events.EPOCH_COMPLETED, publisher)
        context.trainer.add_event_handler(Events.COMPLETED, lambda _: finish_run(self, context, publisher, paths))

    def stats(self, paths: RunPaths | None = None) -> dict:
        path = (paths or self.paths).stats
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except json.JSONDecodeError:
                return {}
        return {}


def _input_error_in(exc: BaseException) -> InputError | None:
    """The InputError at the root of an exception chain (MONAI wraps transform errors), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "InputError" in text:  # raised in a spawned worker: only the text crosses the process boundary
        return InputError(text.strip().splitlines()[-1].split("InputError:", 1)[-1].strip())
    return None


def _channel_picker(channel: int) -> Callable[[Any], tuple[list, list]]:
    """Output transform selecting one one-hot channel of pred and label."""

    def pick(output: Any) -> tuple[list, list]:
        preds, labels = from_engine(["pred", "label"])(output)
        return [p[channel : channel + 1] for p in preds], [lab[channel : channel + 1] for lab in labels]

    return pick

"""Trainer base shared by every model: AMP, distributed training, stable split, tracking, metrics.

A model's trainer subclasses ``SegTrainTask`` and supplies only what differs: the network,
loss, optimizer and training transforms. Everything else lives here:

* AMP per request (``amp``: true/false/fp16/bf16, see ``lib.runtime``) in training AND
  validation; fp16 on CUDA uses a gradient scaler.
* ``world_size`` > 1 spawns that many processes: NCCL on CUDA (one GPU each), gloo on CPU.
  ``multi_gpu`` with the default world size uses every visible GPU.
* A train/validation split persisted as ``<model_dir>/<model>_split.json``; retraining keeps
  the validation cases and sends new labels to training (``resplit: true`` starts over).
* ``dataset: auto`` caches the deterministic part of the pipeline only when the estimated
  decoded size fits ``cache_mb``, otherwise streams from disk.
* MLflow tracking on ``sqlite:///<model_dir>/mlruns.db`` (works offline), or ``tracking: none``.
* Per-class validation Dice (``val_dice_<label>``) in the train stats, and the best model
  published atomically with a meta block (``lib.checkpoints``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
import sys
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed
from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.handlers import MeanDice, from_engine
from monai.inferers import Inferer
from monai.transforms import AsDiscreted, Compose
from monai.utils import CommonKeys as Keys
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from ..checkpoints import incompatibility, now_iso, read_checkpoint, read_meta, remove_publish_leftovers, write_checkpoint_atomic
from ..conf import ConfError, parse_bool, parse_float, parse_int
from ..inference import largest_component, predict_volume
from ..metrics import DiceAccumulator
from ..networks import same_weights_layout
from ..runtime import AmpPolicy, resolve_amp, resolve_device
from ..transforms import InputError

logger = logging.getLogger(__name__)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for the distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def case_id(item: Mapping[str, Any]) -> str:
    """Stable identifier of a datalist item: the image file name (first file for multi-file images)."""
    image = item["image"]
    first = image[0] if isinstance(image, (list, tuple)) else image
    return os.path.basename(str(first))


def stable_split(datalist: Sequence[dict], path: str, val_split: float, seed: int = 0,
                 resplit: bool = False) -> tuple[list[dict], list[dict]]:
    """Train/validation split persisted in ``path`` and kept across retrains.

    Validation cases recorded earlier stay in validation while they still have labels; every
    other labelled case goes to training. A new split (seeded) is drawn only on the first
    run, when ``resplit`` is asked, or when no recorded validation case is left.
    """
    by_id = {case_id(d): d for d in datalist}
    stored: dict[str, Any] = {}
    if os.path.exists(path) and not resplit:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    val_ids = [i for i in stored.get("validation", []) if i in by_id]
    if not val_ids:
        n = len(by_id)
        n_val = 0
        if val_split > 0 and n >= 2:
            n_val = min(max(1, int(round(n * val_split))), n - 1)
        val_ids = sorted(random.Random(seed).sample(sorted(by_id), n_val))
    train_ids = sorted(i for i in by_id if i not in set(val_ids))
    record = {"validation": val_ids, "training": train_ids, "val_split": val_split, "seed": seed, "updated": now_iso()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def fold_split(datalist: Sequence[dict], path: str, nfolds: int, fold: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """K-fold cross-validation split persisted in ``path`` (case -> fold), stable across retrains.

    Cases recorded earlier keep their fold; new cases are dealt to the currently smallest folds
    (seeded order), so adding labels never moves a case between training and validation of a fold.
    """
    if nfolds < 2 or not 0 <= fold < nfolds:
        raise ConfError(f"fold must be in [0, nfolds) with nfolds >= 2, got fold={fold}, nfolds={nfolds}")
    by_id = {case_id(d): d for d in datalist}
    stored: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    if stored.get("nfolds", nfolds) != nfolds:
        raise ConfError(f"{path} was made with nfolds={stored['nfolds']}; use it or delete the file to re-fold")
    assignment = {k: int(v) for k, v in stored.get("assignment", {}).items() if k in by_id}
    new = sorted(i for i in by_id if i not in assignment)
    random.Random(seed).shuffle(new)
    for case in new:
        sizes = [sum(1 for v in assignment.values() if v == k) for k in range(nfolds)]
        assignment[case] = sizes.index(min(sizes))
    record = {"nfolds": nfolds, "seed": seed, "assignment": dict(sorted(assignment.items())), "updated": now_iso()}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    val = [by_id[i] for i in sorted(by_id) if assignment[i] == fold]
    train = [by_id[i] for i in sorted(by_id) if assignment[i] != fold]
    return train, val


def estimated_bytes(datalist: Sequence[dict]) -> int:
    """Decoded float32 size of the images and labels in a datalist, from file headers only."""
    total = 0
    for item in datalist:
        for key in ("image", "label"):
            paths = item.get(key)
            for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                if not p:
                    continue
                try:
                    total += int(np.prod(nib.load(str(p)).shape)) * 4
                except Exception:
                    total += os.path.getsize(p) * 8  # unknown format: assume ~8x compression
    return total


class EngineInferer(Inferer):
    """Validation inferer: the shared sliding-window engine under the request's AMP policy."""

    def __init__(self, roi_size: Sequence[int], amp: AmpPolicy, overlap: float = 0.5, slice_axis: int | None = None) -> None:
        super().__init__()
        self.roi_size = tuple(roi_size)
        self.amp = amp
        self.overlap = overlap
        self.slice_axis = slice_axis

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.slice_axis is not None and inputs.shape[0] > 1:  # slice-wise: one volume at a time
            return torch.cat([self(inputs[i:i + 1], network) for i in range(inputs.shape[0])])
        return predict_volume(network, inputs, self.roi_size, slice_axis=self.slice_axis, overlap=self.overlap,
                              amp=self.amp, device=inputs.device)


class PublishModel:
    """After each epoch: publish the best checkpoint atomically with meta, enrich the stats file."""

    def __init__(self, task: "SegTrainTask", context: Context) -> None:
        self.task = task
        self.context = context
        self.last_seen: tuple[float, int] | None = None
        self.loss_sum, self.loss_count = 0.0, 0
        self.started = time.time()
        self.history: list[dict[str, Any]] = []  # this run's epochs (MONAI Label rewrites the stats file between them)

    def on_iteration(self, engine: Engine) -> None:
        """Accumulate the training loss of the current epoch (for the per-epoch history)."""
        out = engine.state.output
        if isinstance(out, (list, tuple)) and out:  # MONAI decollates the batch: every item carries the loss
            out = out[0]
        loss = out.get(Keys.LOSS) if isinstance(out, dict) else None
        if loss is not None:
            self.loss_sum += float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
            self.loss_count += 1

    def history_entry(self, per_class: dict[str, float | None], val_mean: float | None) -> dict[str, Any]:
        """One row of the per-epoch history (loss, validation Dice, learning rate, elapsed time); resets the loss sum."""
        ctx = self.context
        entry = {
            "epoch": int(ctx.trainer.state.epoch),
            "train_loss": self.loss_sum / self.loss_count if self.loss_count else None,
            "val_mean_dice": val_mean,
            "val_dice_per_class": per_class,
            "lr": float(ctx.optimizer.param_groups[0]["lr"]) if ctx.optimizer else None,
            "seconds": round(time.time() - self.started, 2),
        }
        self.loss_sum, self.loss_count = 0.0, 0
        return entry

    def __call__(self, engine: Engine) -> None:
        ctx, task = self.context, self.task
        src = os.path.join(ctx.output_dir, task._key_metric_filename)
        metrics = dict(ctx.evaluator.state.metrics) if ctx.evaluator else {}
        per_class = {name: _as_float(metrics.get(f"val_dice_{name}")) for name in task.labels}
        val_mean = _as_float(metrics.get(task.VAL_METRIC_MEAN_DICE))
        if os.path.exists(src):
            st = os.stat(src)
            if self.last_seen != (st.st_mtime, st.st_size):
                self.last_seen = (st.st_mtime, st.st_size)
                state, _ = read_checkpoint(src)
                meta = dict(task.expected_meta())
                meta.update({
                    "spec": task.network_spec(ctx),
                    "roi_size": list(task.roi_size(ctx)),
                    "slice_axis": task.slice_axis(ctx),
                    "run_id": ctx.run_id,
                    "epoch": int(ctx.trainer.state.epoch),
                    "val_mean_dice": val_mean,
                    "val_dice_per_class": per_class,
                    "amp": task.amp_policy(ctx).describe(),
                    "world_size": max(ctx.world_size, 1),
                    "published_at": now_iso(),
                    "version": f"{ctx.run_id}-e{int(ctx.trainer.state.epoch)}",
                    "initialised_from": getattr(task, "_initialised_from", None),
                })
                meta.update(task.extra_meta(ctx))
                write_checkpoint_atomic(task.published_path, state, meta)
                logger.info(f"Published {task.published_path} (epoch {meta['epoch']}, val mean Dice {val_mean})")
        stats = task.stats()
        self.history.append(self.history_entry(per_class, val_mean))
        stats.update({
            "history": self.history,
            "model": task.model_name,
            "val_dice_per_class": per_class,
            "val_mean_dice": val_mean,
            "amp": task.amp_policy(ctx).describe(),
            "world_size": max(ctx.world_size, 1),
            "train_cases": len(ctx.train_datalist or []),
            "val_cases": len(ctx.val_datalist or []),
            "max_epochs": ctx.max_epochs,
        })
        if os.path.exists(task.published_path):
            pmeta = read_meta(task.published_path)
            stats["published"] = {k: pmeta.get(k) for k in ("version", "published_at", "epoch", "val_mean_dice", "run_id")}
        tmp = f"{task._stats_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, default=str)
        os.replace(tmp, task._stats_path)


def _as_float(value: Any) -> float | None:
    """Metric value as a plain float (None when missing or NaN)."""
    if value is None:
        return None
    v = float(value.item() if isinstance(value, torch.Tensor) else value)
    return None if np.isnan(v) else v


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


def _worker(rank: int, world_size: int, request: dict, datalist: list, task: "SegTrainTask") -> None:
    """Entry point of each spawned training process."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)5s](%(name)s) - %(message)s", force=True)
    if str(request.get("device", "cpu")).startswith("cpu"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    task.train(rank, world_size, request, datalist)
    # Training finished and the process group is destroyed. Leave without interpreter teardown:
    # gloo/loader threads can abort there ("terminate called without an active exception"),
    # which spawn() would report as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


class SegTrainTask(BasicTrainTask):
    """Shared segmentation trainer (see module docstring). Subclasses define the recipe."""

    def __init__(self, *, model_name: str, model_dir: str, labels: Mapping[str, int], spatial_dims: int,
                 in_channels: int, description: str, pretrained_path: str | None = None,
                 tracking: str = "mlflow", config: Mapping[str, Any] | None = None, cache_mb: int = 2048) -> None:
        self.model_name = model_name
        self.labels = dict(labels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.published_path = os.path.join(model_dir, f"{model_name}.pt")
        self.split_path = os.path.join(model_dir, f"{model_name}_split.json")
        self.pretrained_path = pretrained_path
        self.cache_mb = cache_mb
        tracking = (tracking or "none").lower()
        defaults: dict[str, Any] = {
            "name": f"train_{model_name}",
            "device": "auto",
            "amp": True,
            "world_size": 1,
            "multi_gpu": False,
            "max_epochs": 50,
            "val_split": 0.2,
            "split_seed": 0,
            "resplit": False,
            "train_batch_size": 2,
            "val_batch_size": 1,
            "learning_rate": 2e-4,
            "grad_clip": 0.0,
            "dataset": "auto",
            "dataloader": "ThreadDataLoader",
            "tracking": tracking if tracking in ("mlflow", "none") else "none",
            "tracking_uri": f"sqlite:///{os.path.abspath(os.path.join(model_dir, 'mlruns.db'))}",
            "early_stop_patience": -1,
            "pretrained": True,
        }
        defaults.update(config or {})
        super().__init__(
            model_dir=model_dir,
            description=description,
            config=defaults,
            amp=False,  # AMP is handled per request by our own iteration and inferer
            publish_path=None,
            stats_path=os.path.join(model_dir, f"{model_name}_train_stats.json"),
            labels=list(self.labels),
            tracking=defaults["tracking"],
            tracking_uri=defaults["tracking_uri"],
            train_save_interval=1000000,
            n_saved=1,
        )

    # ---- what a model defines -------------------------------------------------------------
    @abstractmethod
    def network_spec(self, context: Context) -> dict[str, Any]:
        """JSON spec from which the network is rebuilt (stored in the published meta)."""

    @abstractmethod
    def roi_size(self, context: Context) -> tuple[int, ...]:
        """Training crop / inference window size."""

    def extra_meta(self, context: Context) -> dict[str, Any]:
        """Model-specific meta to publish (e.g. normalisation)."""
        return {}

    def expected_meta(self) -> dict[str, Any]:
        """The meta fields a checkpoint must match to be loaded for this config."""
        return {"model": self.model_name, "labels": self.labels, "in_channels": self.in_channels, "spatial_dims": self.spatial_dims}

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
        fold = request.get("fold")
        if fold is not None and str(fold) != "":
            nfolds = parse_int(request.get("nfolds", 5), "nfolds")
            folds_path = os.path.join(os.path.dirname(self.split_path), f"{self.model_name}_folds.json")
            train, val = fold_split(datalist, folds_path, nfolds, parse_int(fold, "fold"), seed)
        else:
            train, val = stable_split(datalist, self.split_path, val_split, seed=seed,
                                      resplit=parse_bool(request.get("resplit", False), "resplit"))
        request["train_ds"], request["val_ds"] = train, val
        return datalist

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        train, val = context.request["train_ds"], context.request["val_ds"]
        if context.local_rank == 0:
            logger.info(f"Stable split ({self.split_path}): {len(train)} training, {len(val)} validation")
        return train, val

    def _dataset(self, context: Context, datalist: list, is_train: bool, replace_rate: float = 0.25) -> Any:
        if context.dataset_type == "auto":
            size_mb = estimated_bytes(datalist) / 2**20
            context.dataset_type = "CacheDataset" if size_mb <= self.cache_mb else "Dataset"
            logger.info(f"dataset=auto: ~{size_mb:.0f} MB decoded vs cache_mb={self.cache_mb} -> {context.dataset_type}")
        return super()._dataset(context, datalist, is_train, replace_rate)

    # ---- devices, distributed, checkpoints --------------------------------------------------
    def __call__(self, request: dict, datastore: Any) -> dict:
        req = copy.deepcopy(self._config)
        req.update(copy.deepcopy(request))
        req["run_id"] = datetime.now().strftime("%Y%m%d_%H%M%S")
        fold = req.get("fold")
        suffix = f"_fold{parse_int(fold, 'fold')}" if fold is not None and str(fold) != "" else ""
        model_dir = os.path.dirname(self.published_path)
        remove_publish_leftovers(model_dir)  # a killed training may have left one; none can be running now
        self.published_path = os.path.join(model_dir, f"{self.model_name}{suffix}.pt")
        self._stats_path = os.path.join(model_dir, f"{self.model_name}{suffix}_train_stats.json")
        req["name"] = f"train_{self.model_name}{suffix}"
        if parse_bool(req.get("resume", False), "resume") and os.path.exists(self.resume_path):
            req["pretrained"] = False  # the resume state carries the weights; do not load the best model over them
        for key in ("max_epochs", "train_batch_size", "val_batch_size"):
            req[key] = parse_int(req[key], key, minimum=1)
        device = resolve_device(req.get("device"))
        req["device"] = device.type
        world_size = parse_int(req.get("world_size", 1), "world_size", minimum=1)
        if device.type == "cuda" and parse_bool(req.get("multi_gpu", False), "multi_gpu") and world_size == 1:
            world_size = torch.cuda.device_count()
        if device.type == "cuda" and world_size > torch.cuda.device_count():
            raise ConfError(f"world_size={world_size} but only {torch.cuda.device_count()} GPU(s) are visible")
        resolve_amp(req.get("amp", True), device)  # validate the value before spawning anything
        datalist = self.pre_process(req, datastore)
        self.prepare_tracking(req)
        start = time.time()
        try:
            result = self._run(req, datalist, world_size, device)
        except Exception as e:
            root = _input_error_in(e)
            if root is not None:  # surface "label X has values [7] ..." instead of MONAI's wrapper
                raise root from e
            raise
        result["wall_time_s"] = round(time.time() - start, 1)
        self.cleanup(req)
        return result

    def _run(self, req: dict, datalist: list, world_size: int, device: torch.device) -> dict:
        """Train in this process or in ``world_size`` spawned ones; returns the stats."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and "RANK" in os.environ:  # started by torchrun: join its env:// rendezvous
            rank = int(os.environ["RANK"])
            req["multi_gpu"] = True
            req["distributed_backend"] = "nccl" if device.type == "cuda" else "gloo"
            req["distributed_url"] = "env://"
            if device.type == "cpu":
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // launched))
            logger.info(f"torchrun: rank {rank} of {launched}, backend {req['distributed_backend']}")
            self.train(rank, launched, req, datalist)
            result = self.stats()
        elif world_size > 1:
            req["multi_gpu"] = True
            req["distributed_backend"] = "nccl" if device.type == "cuda" else "gloo"
            req["distributed_url"] = f"tcp://127.0.0.1:{free_port()}"
            logger.info(f"Distributed training: {world_size} processes, backend {req['distributed_backend']}")
            torch.multiprocessing.spawn(_worker, nprocs=world_size, args=(world_size, req, datalist, self), join=True)
            result = self.stats()
        else:
            req["multi_gpu"] = False
            self.train(0, 1, req, datalist)
            result = self.stats()
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
            network = torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, output_device=ids[0] if ids else None,
                                                                find_unused_parameters=self._find_unused_parameters)
        return network, optimizer

    def load_path(self, output_dir: str, pretrained: bool = True) -> str | None:
        """Fine-tune from the published model (or the configured pretrained file) when compatible."""
        self._initialised_from = None
        if not parse_bool(pretrained, "pretrained"):
            return None
        for path in (self.published_path, self.pretrained_path):
            if path and os.path.exists(path):
                try:
                    meta = read_meta(path)
                except Exception as e:
                    logger.warning(f"ignoring unreadable checkpoint {path}: {e}")
                    continue
                expected = dict(self.expected_meta())
                reason = incompatibility(meta, expected)
                if reason is None and not same_weights_layout(meta.get("spec"), self._current_spec_for_load):
                    reason = "network spec differs from the current config"  # (a different dropout rate does not count)
                if reason is None:
                    logger.info(f"Initialising from {path} (version {meta.get('version')})")
                    self._initialised_from = meta.get("version")
                    return path
                logger.info(f"Not initialising from {path}: {reason}")
        return None

    def _create_trainer(self, context: Context) -> Any:
        self._current_spec_for_load = self.network_spec(context)
        return super()._create_trainer(context)

    #: nnU-Net-style search: keep the largest connected component of a class only where that
    #: improved validation Dice of the published model (stored in its meta, applied at inference)
    search_postprocessing: bool = False

    @property
    def resume_path(self) -> str:
        """Full training state of the last finished epoch (weights, optimizer, epoch), for ``resume``."""
        return self.published_path[:-3] + "_resume.pt"

    def save_resume_state(self, context: Context) -> None:
        """Write the resume state atomically (rank 0, after each epoch's validation)."""
        net = getattr(context.network, "module", context.network)  # unwrap DDP
        state = {"network": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "optimizer": context.optimizer.state_dict(), "epoch": int(context.trainer.state.epoch),
                 "iteration": int(context.trainer.state.iteration), "spec": self.network_spec(context), "run_id": context.run_id}
        tmp = self.resume_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.resume_path)

    def load_resume_state(self, context: Context) -> int:
        """Continue from the resume state when it fits this config: weights, optimizer, epoch and lr schedule. Returns the epoch."""
        if not os.path.exists(self.resume_path):
            logger.info(f"resume: no {self.resume_path}; starting at epoch 1")
            return 0
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        if state.get("spec") != self.network_spec(context):
            raise ConfError(f"resume: {self.resume_path} was made for another network ({state.get('spec')}); train without resume")
        epoch = int(state["epoch"])
        if epoch >= context.max_epochs:
            raise ConfError(f"resume: {self.resume_path} already finished epoch {epoch} of max_epochs={context.max_epochs}; ask for more epochs")
        getattr(context.network, "module", context.network).load_state_dict(state["network"])
        context.optimizer.load_state_dict(state["optimizer"])
        sched = getattr(context, "lr_scheduler", None)
        if sched is not None:
            sched.last_epoch = epoch
        context.trainer.state.epoch = epoch
        context.trainer.state.iteration = int(state["iteration"])
        logger.info(f"resume: continuing after epoch {epoch} from {self.resume_path}")
        return epoch

    def finalize(self, context: Context) -> None:
        super().finalize(context)
        if parse_bool(context.request.get("resume", False), "resume"):
            self.load_resume_state(context)
        if context.local_rank == 0:
            context.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.save_resume_state(context))
        max_steps = parse_int(context.request.get("max_steps", 0) or 0, "max_steps")
        if max_steps > 0:  # every rank stops after this many optimisation steps in total (validated first)
            context.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=max_steps), lambda e: e.terminate_epoch())
            context.trainer.add_event_handler(
                Events.EPOCH_COMPLETED, lambda e: e.terminate() if e.state.iteration >= max_steps else None)
        if context.local_rank == 0:
            engine = context.evaluator or context.trainer
            publisher = PublishModel(self, context)
            context.trainer.add_event_handler(Events.ITERATION_COMPLETED, publisher.on_iteration)
            engine.add_event_handler(Events.EPOCH_COMPLETED, publisher)
            if self.search_postprocessing and context.evaluator:
                context.trainer.add_event_handler(Events.COMPLETED, lambda _: self.choose_postprocessing(context))

    def choose_postprocessing(self, context: Context) -> dict[str, Any]:
        """Dice of the published model on the validation cases with and without largest-component filtering per class."""
        if not os.path.exists(self.published_path):
            return {}
        state, meta = read_checkpoint(self.published_path)
        net = self.network(context).to(context.device)
        net.load_state_dict(state)
        inferer = self.val_inferer(context)
        pre = Compose(self.val_pre_transforms(context))
        plain = DiceAccumulator(self.labels)
        filtered = {name: DiceAccumulator(self.labels) for name in self.labels}
        net.eval()
        for item in context.val_datalist:
            d = pre(dict(item))
            probs = inferer(torch.as_tensor(d["image"])[None].to(context.device), net)
            pred = torch.argmax(probs, 1)[0].cpu()
            ref = torch.as_tensor(d["label"])[0].long()
            plain.update(pred, ref)
            for name, value in self.labels.items():
                filtered[name].update(largest_component(pred, [value]), ref)
        base = plain.per_class_mean_of_cases()
        chosen = []
        for name in self.labels:
            after = filtered[name].per_class_mean_of_cases()[name]
            if not np.isnan(after) and not np.isnan(base[name]) and after > base[name]:
                chosen.append(name)
        result = {"largest_component": chosen, "val_dice_plain": base,
                  "val_dice_with_lcc": {n: filtered[n].per_class_mean_of_cases()[n] for n in self.labels}}
        meta["postprocessing"] = result
        write_checkpoint_atomic(self.published_path, state, meta)
        logger.info(f"Postprocessing: largest component kept for {chosen or 'no class'} ({result})")
        stats = self.stats()
        stats["postprocessing"] = result
        with open(self._stats_path, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, default=str)
        return result

    def stats(self) -> dict:
        if os.path.exists(self._stats_path):
            try:
                with open(self._stats_path, encoding="utf-8") as f:
                    return json.load(f)
            except json.JSONDecodeError:
                return {}
        return {}


def _channel_picker(channel: int) -> Callable[[Any], tuple[list, list]]:
    """Output transform selecting one one-hot channel of pred and label."""
    def pick(output: Any) -> tuple[list, list]:
        preds, labels = from_engine(["pred", "label"])(output)
        return [p[channel:channel + 1] for p in preds], [lab[channel:channel + 1] for lab in labels]
    return pick

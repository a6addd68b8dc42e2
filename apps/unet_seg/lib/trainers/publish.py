"""What a training run leaves behind: its paths, its candidate version, the promotion gate, its stats.

* ``RunPaths``: every file of one run (stats, split, folds, resume state, plan), made once per
  request and passed explicitly.
* ``PublishModel`` (rank 0, after each validation): the best epoch so far is written to the
  run's version in the model store (state ``training``). While no version serves at all, that
  version serves at once (the very first model always serves).
* ``finish_run`` (rank 0, when the run completes): the validation cases are predicted once by
  the candidate and by the serving version; nnU-Net's largest-component search picks its
  post-processing; the **promotion gate** (conf ``promotion``: gate / always / never) serves
  the candidate only if its Dice is at least the serving version's minus ``promotion_margin``,
  both computed here on the same persisted validation split. Otherwise the candidate stays,
  with the reason and both figures in its record. Fold runs become ensemble members (``fold``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.inferers import Inferer
from monai.transforms import Compose
from monai.utils import CommonKeys as Keys
from monailabel.tasks.train.basic_train import Context

from ..checkpoints import CheckpointMeta, Validation, read_checkpoint
from ..inference import largest_component, predict_volume
from ..metrics import DiceAccumulator, mean_ignoring_nan
from ..modelstore import ModelStore, StoreError
from ..runtime import AmpPolicy
from .splits import case_id

#: the run's trainer, a ``trainers.base.SegTrainTask`` (which builds on this module, so it is not imported here)
SegTrainTask = Any

logger = logging.getLogger(__name__)

PROMOTION_MODES = ("gate", "always", "never")


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run of ``model`` (``fold`` None: the single persisted split)."""

    model_dir: str
    model: str
    fold: int | None = None

    @property
    def suffix(self) -> str:
        """``_fold<k>`` for a fold run, else empty."""
        return f"_fold{self.fold}" if self.fold is not None else ""

    @property
    def name(self) -> str:
        """Run name (MONAI Label's checkpoint folder under the model dir)."""
        return f"train_{self.model}{self.suffix}"

    @property
    def stats(self) -> str:
        """Train stats JSON (MONAI Label's plus the per-epoch history and the gate decision)."""
        return os.path.join(self.model_dir, f"{self.model}{self.suffix}_train_stats.json")

    @property
    def split(self) -> str:
        """The persisted single split."""
        return os.path.join(self.model_dir, f"{self.model}_split.json")

    @property
    def folds(self) -> str:
        """The persisted k-fold assignment."""
        return os.path.join(self.model_dir, f"{self.model}_folds.json")

    @property
    def resume(self) -> str:
        """Full training state of the last finished epoch, for ``resume``."""
        return os.path.join(self.model_dir, f"{self.model}{self.suffix}_resume.pt")

    @property
    def plan(self) -> str:
        """nnU-Net plan of this model."""
        return os.path.join(self.model_dir, f"{self.model}_plan.json")


class EngineInferer(Inferer):
    """Validation inferer: the shared sliding-window engine under the request's AMP policy."""

    def __init__(
        self, roi_size: Sequence[int], amp: AmpPolicy, overlap: float = 0.5, slice_axis: int | None = None
    ) -> None:
        super().__init__()
        self.roi_size = tuple(roi_size)
        self.amp = amp
        self.overlap = overlap
        self.slice_axis = slice_axis

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.slice_axis is not None and inputs.shape[0] > 1:  # slice-wise: one volume at a time
            return torch.cat([self(inputs[i : i + 1], network) for i in range(inputs.shape[0])])
        return predict_volume(
            network,
            inputs,
            self.roi_size,
            slice_axis=self.slice_axis,
            overlap=self.overlap,
            amp=self.amp,
            device=inputs.device,
        )


def as_float(value: Any) -> float | None:
    """Metric value as a plain float (None when missing or NaN)."""
    if value is None:
        return None
    v = float(value.item() if isinstance(value, torch.Tensor) else value)
    return None if np.isnan(v) else v


class PublishModel:
    """After each validation: the best epoch to the run's version in the store; the stats file enriched."""

    def __init__(self, task: SegTrainTask, context: Context, paths: RunPaths) -> None:
        self.task, self.context, self.paths = task, context, paths
        self.store: ModelStore = task.store
        self.version: str | None = None  # the run's version, once its first best epoch is written
        self.served_at_once = False
        self.last_seen: tuple[float, int] | None = None
        self.loss_sum, self.loss_count = 0.0, 0
        self.started = time.time()
        self.history: list[dict[str, Any]] = []  # this run's epochs (MONAI Label rewrites the stats file between them)
        self.val_cases = [case_id(d) for d in context.val_datalist or []]

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
        """One row of the per-epoch history (loss, validation Dice, learning rate, elapsed time).

        Resets the loss sum.
        """
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

    def publish(self, state: dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
        """Write this epoch to the run's version (a new one the first time; served at once if nothing serves)."""
        if self.version is None:
            first = self.store.serving() is None
            rec = self.store.add(state, meta, state_name="training", reason="training", serve=first)
            self.version, self.served_at_once = rec.id, first
        else:
            self.store.update(self.version, state, meta)
        logger.info(
            f"{self.task.model_name}: epoch {meta.epoch} written to {self.version} (val mean Dice {meta.val_mean_dice})"
        )

    def __call__(self, engine: Engine) -> None:
        ctx, task = self.context, self.task
        src = os.path.join(ctx.output_dir, task._key_metric_filename)
        metrics = dict(ctx.evaluator.state.metrics) if ctx.evaluator else {}
        per_class = {name: as_float(metrics.get(f"val_dice_{name}")) for name in task.labels}
        val_mean = as_float(metrics.get(task.VAL_METRIC_MEAN_DICE))
        if os.path.exists(src):
            st = os.stat(src)
            if self.last_seen != (st.st_mtime, st.st_size):
                self.last_seen = (st.st_mtime, st.st_size)
                state, _ = read_checkpoint(src)
                meta = task.version_meta(ctx, Validation(val_mean, per_class, self.val_cases))
                self.publish(state, meta)
        self.history.append(self.history_entry(per_class, val_mean))
        self.write_stats(val_mean=val_mean, val_dice_per_class=per_class)

    def write_stats(self, **extra: Any) -> dict[str, Any]:
        """MONAI Label's stats file plus this run's history, version and anything given."""
        ctx = self.context
        stats = self.task.stats(self.paths)
        stats.update(
            {
                "history": self.history,
                "model": self.task.model_name,
                "amp": self.task.amp_policy(ctx).describe(),
                "world_size": max(ctx.world_size, 1),
                "train_cases": len(ctx.train_datalist or []),
                "val_cases": len(ctx.val_datalist or []),
                "max_epochs": ctx.max_epochs,
                "version": self.version,
                **extra,
            }
        )
        if self.version:
            with_meta = self.store.meta(self.version)
            stats["published"] = {
                "version": self.version,
                "epoch": with_meta.epoch,
                "val_mean_dice": with_meta.val_mean_dice,
                "run_id": with_meta.run_id,
            }
        tmp = f"{self.paths.stats}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, default=str)
        os.replace(tmp, self.paths.stats)
        return stats


def predictions(
    task: SegTrainTask, context: Context, members: Sequence[tuple[dict, CheckpointMeta]]
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Every validation case pre-processed once and predicted by each member: [(preds, reference), ...]."""
    nets = []
    for state, meta in members:
        net = task.build_network(meta.spec).to(context.device)
        net.load_state_dict(state)
        net.eval()
        nets.append((net, EngineInferer(meta.roi_size, task.amp_policy(context), slice_axis=meta.slice_axis)))
    pre = Compose(task.val_pre_transforms(context))
    out = []
    with torch.no_grad():
        for item in context.val_datalist:
            d = pre(dict(item))
            image = torch.as_tensor(d["image"])[None].to(context.device)
            preds = [torch.argmax(inferer(image, net), 1)[0].cpu() for net, inferer in nets]
            out.append((preds, torch.as_tensor(d["label"])[0].long()))
    return out


def served_dice(
    cases: Sequence[tuple[torch.Tensor, torch.Tensor]], labels: dict[str, int], largest: Sequence[str]
) -> dict[str, float]:
    """Per-class Dice (mean over cases) of predictions as the inferer would serve them (largest components kept)."""
    acc = DiceAccumulator(labels)
    values = [labels[n] for n in largest if n in labels]
    for pred, ref in cases:
        acc.update(largest_component(pred, values), ref)
    return acc.per_class_mean_of_cases()


def search_postprocessing(cases: Sequence[tuple[torch.Tensor, torch.Tensor]], labels: dict[str, int]) -> dict[str, Any]:
    """nnU-Net's search: keep the largest component of a class only where that improves its validation Dice."""
    plain = served_dice(cases, labels, [])
    filtered = {name: served_dice(cases, labels, [name])[name] for name in labels}
    chosen = [n for n in labels if not np.isnan(filtered[n]) and not np.isnan(plain[n]) and filtered[n] > plain[n]]
    return {"largest_component": chosen, "val_dice_plain": plain, "val_dice_with_lcc": filtered}


def finish_run(task: SegTrainTask, context: Context, publisher: PublishModel, paths: RunPaths) -> dict[str, Any]:
    """End of a run (rank 0): post-processing search, the promotion gate, the decision in the stats.

    See the module docstring.
    """
    store, vid = publisher.store, publisher.version
    if vid is None:
        logger.warning(f"{task.model_name}: the run published no version (no validation epoch finished)")
        return {}
    state, meta = store.load(vid)
    serving = store.serving()
    compare = serving is not None and serving.id != vid and paths.fold is None and context.val_datalist
    members = [(state, meta)]
    if compare:
        members.append(store.load(serving.id))
    cases = predictions(task, context, members) if context.val_datalist else []
    decision: dict[str, Any] = {}
    if task.search_postprocessing and cases:
        meta.postprocessing = search_postprocessing([(p[0], r) for p, r in cases], task.labels)
        decision["postprocessing"] = meta.postprocessing
        logger.info(
            f"Postprocessing: largest component kept for {meta.postprocessing['largest_component'] or 'no class'}"
        )
    lcc = (meta.postprocessing or {}).get("largest_component", [])
    if cases:
        per_class = served_dice([(p[0], r) for p, r in cases], task.labels, lcc)
        meta.validation = Validation(
            as_float(mean_ignoring_nan(per_class)), {k: as_float(v) for k, v in per_class.items()}, publisher.val_cases
        )
    store.update(vid, state, meta)
    decision.update(
        gate(
            task,
            store,
            vid,
            meta,
            serving.id if compare and serving else None,
            [(p[1], r) for p, r in cases] if compare else [],
            served_first=publisher.served_at_once,
            fold=paths.fold,
        )
    )
    publisher.write_stats(
        gate=decision.get("gate"),
        postprocessing=decision.get("postprocessing"),
        val_mean_dice=meta.val_mean_dice,
        val_dice_per_class=dict(meta.validation.per_class) if meta.validation else {},
    )
    return decision


def gate(
    task: SegTrainTask,
    store: ModelStore,
    vid: str,
    meta: CheckpointMeta,
    serving_id: str | None,
    serving_cases: Sequence[tuple[torch.Tensor, torch.Tensor]],
    served_first: bool,
    fold: int | None,
) -> dict[str, Any]:
    """Serve the run's version or keep it as a candidate.

    Returns ``{"gate": {...}}`` with the figures and the reason.
    """
    mode, margin = task.promotion_mode, task.promotion_margin
    info: dict[str, Any] = {
        "mode": mode,
        "margin": margin,
        "candidate": vid,
        "candidate_dice": meta.val_mean_dice,
        "val_cases": len(meta.validation.cases) if meta.validation else 0,
    }
    current = store.serving()
    if served_first or (current is not None and current.id == vid):
        info.update(decision="serving", reason="the first model of this store always serves")
        store.promote(vid, info["reason"], gate=info)
        return {"gate": info}
    if current is None:
        info.update(decision="serving", reason="no version was serving")
        store.promote(vid, info["reason"], gate=info)
        return {"gate": info}
    if fold is not None:
        info.update(decision="fold", reason=f"cross-validation member of fold {fold} (serve it with promote)")
        store.set_state(vid, "fold", info["reason"], gate=info)
        return {"gate": info}
    if serving_id is not None and serving_cases:
        serving_meta = store.meta(serving_id)
        lcc = (serving_meta.postprocessing or {}).get("largest_component", [])
        info.update(
            serving=serving_id, serving_dice=as_float(mean_ignoring_nan(served_dice(serving_cases, task.labels, lcc)))
        )
    if mode == "always":
        info.update(decision="serving", reason="promotion=always")
    elif mode == "never":
        info.update(decision="candidate", reason="promotion=never: promote it by hand (REST or main.py models promote)")
    elif info.get("serving_dice") is None or info["candidate_dice"] is None:
        info.update(
            decision="candidate", reason="no validation Dice to compare with the serving version; promote it by hand"
        )
    elif info["candidate_dice"] >= info["serving_dice"] - margin:
        info.update(
            decision="serving",
            reason=f"validation Dice {info['candidate_dice']:.4f} >= serving {serving_id} "
            f"{info['serving_dice']:.4f} - margin {margin}",
        )
    else:
        info.update(
            decision="candidate",
            reason=f"validation Dice {info['candidate_dice']:.4f} < serving {serving_id} "
            f"{info['serving_dice']:.4f} - margin {margin} on the same "
            f"{info['val_cases']} validation cases",
        )
    try:
        if info["decision"] == "serving":
            store.promote(vid, info["reason"], gate=info)
        else:
            store.set_state(vid, "candidate", info["reason"], gate=info)
    except StoreError as e:  # e.g. an admin promoted this version meanwhile
        info["store"] = str(e)
    logger.info(f"{task.model_name}: promotion gate -> {info['decision']}: {info['reason']}")
    return {"gate": info}

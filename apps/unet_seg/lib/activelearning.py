"""Active learning: which unlabelled study to annotate next, and the scores behind that choice.

* ``UncertaintyScoring`` (POST /scoring/uncertainty): for every unlabelled study, the served
  model's flip-TTA probabilities (the mean over all axis flips) give a per-voxel entropy; the
  study's score is the mean normalised entropy over the voxels the model does not call clear
  background (1 - p_background >= 0.05), so disagreement between flips and hesitation between
  classes both raise it. Scores are stored in the datastore's image info
  (``uncertainty_<model>`` with the model version that made it).
* Strategies (POST /activelearning/<name>): ``first`` (sorted id), ``random``, ``uncertainty``
  (the highest stored score; unscored studies are scored on demand). Every strategy skips
  studies handed out in the last ``lease_s`` seconds (default 600), so two annotators asking at
  once get different studies.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .runtime import resolve_device

logger = logging.getLogger(__name__)


def entropy_score(probs: torch.Tensor, background_floor: float = 0.05) -> float:
    """Mean normalised entropy of ``probs`` ``(K, ...)`` over voxels that are not clear background (0 if none)."""
    p = probs.float().clamp_min(1e-8)
    ent = -(p * p.log()).sum(0) / np.log(p.shape[0])
    region = (1.0 - probs[0]) >= background_floor
    return float(ent[region].mean()) if region.any() else 0.0


def study_uncertainty(task: Any, image_uri: str, device: str = "auto") -> float:
    """Uncertainty of one study under ``task``'s served model (flip TTA on)."""
    dev = resolve_device(device)
    request = {"tta": True, "amp": True}
    data = task.run_pre_transforms({**request, task.input_key: image_uri}, task.pre_transforms())
    probs, _, _ = task.compute_probabilities(data, dev)
    return entropy_score(probs[0])


def score_key(model: str) -> str:
    """Image-info key holding a model's uncertainty score."""
    return f"uncertainty_{model}"


class UncertaintyScoring(ScoringMethod):
    """Scores every unlabelled study with each ready model (or the request's ``model``)."""

    def __init__(self, infers: Mapping[str, Any]) -> None:
        super().__init__("Flip-TTA entropy of each unlabelled study under the served model(s)")
        self.infers = infers

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        models = [request["model"]] if request.get("model") else [m for m, t in self.infers.items() if t.is_valid()]
        out: dict[str, dict[str, float]] = {}
        for model in models:
            task = self.infers.get(model)
            if task is None or not task.is_valid():
                continue
            version = task.info().get("version", {}).get("version")
            for image_id in datastore.get_unlabeled_images():
                score = study_uncertainty(task, datastore.get_image_uri(image_id), request.get("device", "auto"))
                datastore.update_image_info(image_id, {score_key(model): score, f"{score_key(model)}_version": version})
                out.setdefault(model, {})[image_id] = score
        return {"scores": out}


class _Leases:
    """Studies recently handed out (shared by the strategies of one app)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.until: dict[str, float] = {}

    def pick(self, candidates: list[str], choose: Any, lease_s: float) -> str | None:
        with self.lock:
            now = time.time()
            free = [c for c in candidates if self.until.get(c, 0) <= now]
            if not free:
                return None
            chosen = choose(free)
            self.until[chosen] = now + lease_s
            return chosen


class LeasedStrategy(Strategy):
    """Base: unlabelled candidates, a choice among the free ones, a lease on the chosen one."""

    def __init__(self, description: str, leases: _Leases) -> None:
        super().__init__(description)
        self.leases = leases

    def choose(self, free: list[str], request: dict, datastore: Datastore) -> str:
        raise NotImplementedError

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        candidates = sorted(datastore.get_unlabeled_images())
        lease = float(request.get("lease_s", 600))
        chosen = self.leases.pick(candidates, lambda free: self.choose(free, request, datastore), lease)
        if chosen is None:
            return {}
        return {"id": chosen, **self.details(chosen, request, datastore)}

    def details(self, image_id: str, request: dict, datastore: Datastore) -> dict:
        return {}


class FirstStrategy(LeasedStrategy):
    def __init__(self, leases: _Leases) -> None:
        super().__init__("First unlabelled study by id", leases)

    def choose(self, free: list[str], request: dict, datastore: Datastore) -> str:
        return free[0]


class RandomStrategy(LeasedStrategy):
    def __init__(self, leases: _Leases) -> None:
        super().__init__("A random unlabelled study", leases)

    def choose(self, free: list[str], request: dict, datastore: Datastore) -> str:
        return random.choice(free)


class UncertaintyStrategy(LeasedStrategy):
    """The unlabelled study the served model is least sure about."""

    def __init__(self, leases: _Leases, infers: Mapping[str, Any]) -> None:
        super().__init__("Unlabelled study with the highest flip-TTA uncertainty", leases)
        self.infers = infers

    def _model(self, request: dict) -> str:
        model = request.get("model") or next((m for m, t in self.infers.items() if t.is_valid()), None)
        if model is None or model not in self.infers or not self.infers[model].is_valid():
            raise ValueError(f"uncertainty needs a ready model (asked: {request.get('model')!r}; ready: "
                             f"{[m for m, t in self.infers.items() if t.is_valid()]})")
        return model

    def _score(self, image_id: str, model: str, datastore: Datastore, device: str) -> float:
        info = datastore.get_image_info(image_id)
        key = score_key(model)
        if key not in info:
            info_score = study_uncertainty(self.infers[model], datastore.get_image_uri(image_id), device)
            datastore.update_image_info(image_id, {key: info_score})
            return info_score
        return float(info[key])

    def choose(self, free: list[str], request: dict, datastore: Datastore) -> str:
        model = self._model(request)
        scores = {i: self._score(i, model, datastore, request.get("device", "auto")) for i in free}
        return max(free, key=lambda i: (scores[i], i))

    def details(self, image_id: str, request: dict, datastore: Datastore) -> dict:
        model = self._model(request)
        return {"model": model, "score": datastore.get_image_info(image_id).get(score_key(model))}


def strategies(infers: Mapping[str, Any]) -> dict[str, Strategy]:
    """The app's strategies (one lease table shared by all)."""
    leases = _Leases()
    return {"first": FirstStrategy(leases), "random": RandomStrategy(leases), "uncertainty": UncertaintyStrategy(leases, infers)}

"""Active learning: which unlabelled study to annotate next, and the scores behind that choice.

Two score kinds, each a scoring method (POST /scoring/<kind>, scores every unlabelled study and
stores the scores in the datastore's image info as ``<kind>_<model>`` with the model version and
params that made them; a stored score with the same signature is reused unless ``force``) and a
strategy (POST /activelearning/<kind>, the highest-scoring free study; unscored or stale studies
are scored on demand):

* ``uncertainty``: the served model's flip-TTA probabilities (the mean over all axis flips) give
  a per-voxel entropy; the study's score is the mean normalised entropy over the voxels the model
  does not call clear background (1 - p_background >= 0.05), so disagreement between flips and
  hesitation between classes both raise it.
* ``epistemic``: Monte-Carlo dropout (Gal & Ghahramani): ``samples`` passes (default 10) with the
  dropout layers sampling; the score is the mean mutual information between prediction and
  weights (BALD: entropy of the mean minus mean entropy, normalised by log K) over the same
  region. It needs a model trained with dropout (conf ``dropout``), or a request ``dropout`` rate
  for test-time dropout; otherwise it answers why, never a silent zero. (MONAI Label's own
  epistemic strategy returns the least recently served study; this one returns the top score.)

Strategies ``first`` (sorted id) and ``random`` need no model. Every strategy skips studies
handed out in the last ``lease_s`` seconds (default 600), so two annotators asking at once get
different studies.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .conf import parse_bool, parse_float, parse_int
from .inference import entropy
from .infers.base import ModelNotReady
from .runtime import resolve_device

logger = logging.getLogger(__name__)


def _normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy of probabilities ``(K, ...)`` divided by log K (in [0, 1])."""
    return entropy(p) / np.log(p.shape[0])


def _foreground_mean(values: torch.Tensor, probs: torch.Tensor, background_floor: float) -> float:
    """Mean of ``values`` over the voxels ``probs`` does not call clear background (0 if none)."""
    region = (1.0 - probs[0]) >= background_floor
    return float(values[region].mean()) if region.any() else 0.0


def entropy_score(probs: torch.Tensor, background_floor: float = 0.05) -> float:
    """Mean normalised entropy of ``probs`` ``(K, ...)`` over voxels that are not clear background (0 if none)."""
    return _foreground_mean(_normalised_entropy(probs), probs, background_floor)


def mutual_information_score(
    mean_probs: torch.Tensor, mean_entropy: torch.Tensor, background_floor: float = 0.05
) -> float:
    """BALD: mean over not-clear-background voxels of H(mean p) - mean H(p), normalised by log K (0 if none)."""
    mi = (_normalised_entropy(mean_probs) - mean_entropy.float() / np.log(mean_probs.shape[0])).clamp_min(0)
    return _foreground_mean(mi, mean_probs, background_floor)


def _prepared(task: Any, image_uri: str, request: Mapping[str, Any]) -> tuple[dict, torch.device]:
    dev = resolve_device(request.get("device", "auto"))
    params = {"amp": request.get("amp", True)}
    return task.run_pre_transforms({**params, task.input_key: image_uri}, task.pre_transforms()), dev


def study_uncertainty(task: Any, image_uri: str, request: Mapping[str, Any] | None = None) -> float:
    """Flip-TTA entropy of one study under ``task``'s served model."""
    data, dev = _prepared(task, image_uri, request or {})
    probs, _, _ = task.compute_probabilities({**data, "tta": True}, dev)
    return entropy_score(probs[0])


def study_epistemic(task: Any, image_uri: str, request: Mapping[str, Any] | None = None) -> float:
    """MC-dropout mutual information of one study under ``task``'s served model.

    ``request`` may give ``samples`` (default 10) and ``dropout`` (test-time rate for a model
    trained without dropout; by default the trained rate is used).
    """
    request = request or {}
    data, dev = _prepared(task, image_uri, request)
    dropout = request.get("dropout")
    mean_p, mean_h, _ = task.mc_dropout_statistics(
        data,
        dev,
        parse_int(request.get("samples", 10), "samples", 2),
        None if dropout in (None, "") else parse_float(dropout, "dropout"),
    )
    return mutual_information_score(mean_p, mean_h)


@dataclass(frozen=True)
class ScoreKind:
    """One way of scoring a study: name (also the image-info key prefix), function, request params it depends on."""

    name: str
    description: str
    compute: Callable[[Any, str, Mapping[str, Any]], float]
    params: tuple[str, ...] = ()

    def key(self, model: str) -> str:
        """Image-info key holding a model's score."""
        return f"{self.name}_{model}"

    def signature(self, task: Any, request: Mapping[str, Any]) -> dict[str, Any]:
        """What a stored score must have been computed with to be reused: model version and params."""
        version = task.info().get("version", {}).get("version")
        return {"version": version, **{p: request.get(p) for p in self.params}}

    def stored_or_computed(
        self,
        task: Any,
        model: str,
        image_id: str,
        datastore: Datastore,
        request: Mapping[str, Any],
        force: bool = False,
    ) -> float:
        """The study's stored score when it was made by the same model version and params, else compute and store it."""
        key, info = self.key(model), datastore.get_image_info(image_id)
        signature = self.signature(task, request)
        if not force and key in info and info.get(f"{key}_signature") == signature:
            return float(info[key])
        score = self.compute(task, datastore.get_image_uri(image_id), request)
        datastore.update_image_info(
            image_id, {key: score, f"{key}_signature": signature, f"{key}_version": signature["version"]}
        )
        return score


SCORES: dict[str, ScoreKind] = {
    "uncertainty": ScoreKind("uncertainty", "flip-TTA entropy", study_uncertainty),
    "epistemic": ScoreKind(
        "epistemic", "MC-dropout mutual information (BALD)", study_epistemic, ("samples", "dropout")
    ),
}


def ready_model(infers: Mapping[str, Any], request: Mapping[str, Any], purpose: str) -> str:
    """The request's ``model`` (or the first ready one); ModelNotReady when none can serve."""
    ready = [m for m, t in infers.items() if t.is_valid()]
    model = request.get("model") or (ready[0] if ready else None)
    if model is None or model not in infers or model not in ready:
        raise ModelNotReady(f"{purpose} needs a ready model (asked: {request.get('model')!r}; ready: {ready})")
    return model


class StudyScoring(ScoringMethod):
    """Scores every unlabelled study with each ready model (or the request's ``model``) and stores the scores."""

    def __init__(self, kind: str, infers: Mapping[str, Any]) -> None:
        self.kind = SCORES[kind]
        super().__init__(f"{self.kind.description} of each unlabelled study under the served model(s)")
        self.infers = infers

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        explicit = bool(request.get("model"))
        # scores are deterministic for a model version and params (TTA; seeded MC dropout), so a stored
        # one is reused unless asked: MONAI Label re-runs every scoring method after each /activelearning call
        force = parse_bool(request.get("force", False), "force")
        models = (
            [ready_model(self.infers, request, self.kind.name)]
            if explicit
            else [m for m, t in self.infers.items() if t.is_valid()]
        )
        out: dict[str, dict[str, float]] = {}
        skipped: dict[str, str] = {}
        for model in models:
            try:
                for image_id in datastore.get_unlabeled_images():
                    out.setdefault(model, {})[image_id] = self.kind.stored_or_computed(
                        self.infers[model], model, image_id, datastore, request, force=force
                    )
            except ModelNotReady as e:  # e.g. MC dropout on a model trained without dropout
                if explicit:
                    raise
                skipped[model] = str(e)
                logger.info(f"{self.kind.name} scoring skipped {model}: {e}")
        return {"scores": out, "skipped": skipped}


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


class ScoredStrategy(LeasedStrategy):
    """The unlabelled study with the highest score of one kind under the served model (scored on demand)."""

    def __init__(self, kind: str, leases: _Leases, infers: Mapping[str, Any]) -> None:
        self.kind = SCORES[kind]
        super().__init__(f"Unlabelled study with the highest {self.kind.description}", leases)
        self.infers = infers

    def choose(self, free: list[str], request: dict, datastore: Datastore) -> str:
        model = ready_model(self.infers, request, self.kind.name)
        scores = {i: self.kind.stored_or_computed(self.infers[model], model, i, datastore, request) for i in free}
        return max(free, key=lambda i: (scores[i], i))

    def details(self, image_id: str, request: dict, datastore: Datastore) -> dict:
        model = ready_model(self.infers, request, self.kind.name)
        return {
            "model": model,
            "score": datastore.get_image_info(image_id).get(self.kind.key(model)),
            "score_kind": self.kind.name,
        }


def strategies(infers: Mapping[str, Any]) -> dict[str, Strategy]:
    """The app's strategies (one lease table shared by all)."""
    leases = _Leases()
    return {
        "first": FirstStrategy(leases),
        "random": RandomStrategy(leases),
        **{kind: ScoredStrategy(kind, leases, infers) for kind in SCORES},
    }


def scoring_methods(infers: Mapping[str, Any]) -> dict[str, ScoringMethod]:
    """The app's scoring methods: one per score kind."""
    return {kind: StudyScoring(kind, infers) for kind in SCORES}

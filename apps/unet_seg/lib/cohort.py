"""Cohort inference on a Ray cluster: ``main.py predict --ray auto|HOST:PORT``.

Each Ray worker (an actor) loads the model once and segments one volume at a time; the driver
hands the next volume to whichever worker finishes, so fast and slow workers share the cohort.

* **GPU-aware:** with GPUs in the cluster, one worker per GPU (``num_gpus=1``); otherwise one
  worker per ``cpus_per_worker`` CPUs, each limiting PyTorch to that many threads.
* **Atomic outputs:** a worker writes ``<name>.part`` and renames it (``lib.cli``), so a file under
  its final name is always whole.
* **Resumable:** volumes whose output already exists are skipped (re-run the same command after a
  stop).
* **Fault-tolerant:** a worker that dies mid-volume (killed, out of memory, a node lost) is
  replaced and its volume goes back to the queue (``max_attempts`` per volume). A volume that
  fails by itself (a corrupt file) is reported and the cohort goes on.

Inputs and outputs must be on a file system every node sees (the usual set-up of a cluster).
``UNET_SEG_RAY_FAILPOINT=<volume name>`` makes the first worker that starts that volume exit
abruptly, which is how the tests kill a worker mid-run.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .datasets import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

FAILPOINT_ENV = "UNET_SEG_RAY_FAILPOINT"


class Segmenter:
    """The Ray actor's body: builds its predictor once (``factory()``), then ``predict(case)`` per volume."""

    def __init__(self, factory: Callable[[], Callable[[Any], str]], threads: int) -> None:
        import torch

        from .runtime import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(max(1, threads))
        self.predict_one = factory()

    def pid(self) -> int:
        return os.getpid()

    def predict(self, case: Any, out_dir: str) -> dict[str, str]:
        """``{"path": written file}``, or ``{"error": why}`` for a volume that fails by itself (the message
        travels as text: not every exception class survives Ray's serialisation)."""
        name = getattr(case, "name", "")
        marker = os.path.join(out_dir, f".failpoint-{name}")
        if os.environ.get(FAILPOINT_ENV) == name and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a worker dying mid-volume, as a kill or an out-of-memory would
        try:
            return {"path": self.predict_one(case)}
        except Exception as e:  # noqa: BLE001 - reported per volume; the cohort goes on
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            return {"error": f"{type(e).__name__}: {detail}"[:500]}


def finished(out_dir: str, name: str) -> bool:
    """Whether volume ``name``'s label is already written (in whichever image format the model writes)."""
    return any(os.path.exists(os.path.join(out_dir, f"{name}{suffix}")) for suffix in IMAGE_SUFFIXES)


def loopback_env(address: str) -> None:
    """Before Ray is imported: keep a loopback cluster on loopback (Ray would swap in the routable address)."""
    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def connect(address: str, app_dir: str) -> Any:
    """``ray.init`` on ``address`` (``auto`` or ``host:port``); the workers import this app from ``app_dir``."""
    loopback_env(address)
    import ray

    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (app_dir, os.environ.get("PYTHONPATH", "")) if p)}
    env_vars.update({k: v for k, v in os.environ.items() if k.startswith("UNET_SEG_")})
    return ray.init(
        address=address,
        runtime_env={"env_vars": env_vars},
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def predict_cohort(
    cases: list[Any],
    out_dir: str,
    factory: Callable[[], Callable[[Any], str]],
    *,
    address: str,
    app_dir: str,
    workers: int = 0,
    cpus_per_worker: int = 1,
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Segment ``cases`` on the cluster at ``address``; a report (written, skipped, failed, retried, workers)."""
    loopback_env(address)
    import ray

    os.makedirs(out_dir, exist_ok=True)
    todo = [c for c in cases if not finished(out_dir, c.name)]
    skipped = [c.name for c in cases if c not in todo]
    report: dict[str, Any] = {"written": [], "skipped": skipped, "failed": {}, "retried": [], "workers": 0}
    if not todo:
        return report
    connect(address, app_dir)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if workers <= 0:
            workers = gpus if gpus else max(1, int(resources.get("CPU", 1)) // max(1, cpus_per_worker))
        workers = min(workers, len(todo))
        actor_class = ray.remote(Segmenter).options(
            num_cpus=cpus_per_worker, num_gpus=1 if gpus else 0, max_restarts=0, max_concurrency=1
        )

        def start() -> Any:
            return actor_class.remote(factory, cpus_per_worker)

        live = {start() for _ in range(workers)}
        report["workers"] = workers
        logger.info(f"cohort: {len(todo)} volumes on {workers} Ray workers ({'GPU' if gpus else 'CPU'})")
        queue = collections.deque(todo)
        attempts: collections.Counter[str] = collections.Counter()
        pending: dict[Any, tuple[Any, Any]] = {}

        def submit(actor: Any) -> None:
            if queue:
                case = queue.popleft()
                attempts[case.name] += 1
                pending[actor.predict.remote(case, out_dir)] = (actor, case)

        for actor in list(live):
            submit(actor)
        start_t = time.perf_counter()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, case = pending.pop(ref)
            try:
                result = ray.get(ref)
                if "error" in result:
                    report["failed"][case.name] = result["error"]
                else:
                    report["written"].append(result["path"])
            except ray.exceptions.RayActorError as e:  # the worker died: replace it, the volume goes back
                logger.warning(
                    f"cohort: the worker on {case.name} died; the volume goes back to the queue ({str(e)[:200]})"
                )
                report["retried"].append(case.name)
                live.discard(actor)
                ray.kill(actor, no_restart=True)
                actor = start()
                live.add(actor)
                if attempts[case.name] < max_attempts:
                    queue.appendleft(case)
                else:
                    report["failed"][case.name] = f"its worker died {attempts[case.name]} times"
            except ray.exceptions.RayTaskError as e:  # the volume itself failed (e.g. a corrupt file)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                report["failed"][case.name] = f"{type(cause).__name__}: {cause}"[:300]
            submit(actor)
        report["seconds"] = round(time.perf_counter() - start_t, 2)
        for actor in live:
            ray.kill(actor, no_restart=True)
    finally:
        ray.shutdown()
    return report

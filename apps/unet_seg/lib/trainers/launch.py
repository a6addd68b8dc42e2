"""How a training runs: in this process, in ``world_size`` spawned processes, or as one rank of torchrun.

* ``world_size`` > 1 spawns that many processes: NCCL on CUDA (one GPU each), gloo on CPU,
  rendezvous on a free 127.0.0.1 port; CPU ranks share the cores.
* Started by ``torchrun`` (``WORLD_SIZE``/``RANK`` set): join its ``env://`` rendezvous.
* ``world_size_for`` turns the request into a process count (``multi_gpu`` uses every GPU).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..conf import ConfError, parse_bool, parse_int
from ..serverproc import free_port

logger = logging.getLogger(__name__)

#: ``train(rank, world_size, request, datalist)`` of a MONAI Label trainer
TrainFn = Callable[[int, int, dict, list], Any]


def world_size_for(req: dict, device: torch.device) -> int:
    """Processes the request asks for (validated against the visible GPUs)."""
    world_size = parse_int(req.get("world_size", 1), "world_size", minimum=1)
    if device.type == "cuda" and parse_bool(req.get("multi_gpu", False), "multi_gpu") and world_size == 1:
        world_size = torch.cuda.device_count()
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise ConfError(f"world_size={world_size} but only {torch.cuda.device_count()} GPU(s) are visible")
    return world_size


def launch(train: TrainFn, req: dict, datalist: list, world_size: int, device: torch.device) -> None:
    """Run ``train`` here, in ``world_size`` spawned processes, or as this torchrun rank (see module docstring)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        req.update(multi_gpu=True, distributed_backend=backend, distributed_url="env://")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // launched))
        logger.info(f"torchrun: rank {rank} of {launched}, backend {backend}")
        train(rank, launched, req, datalist)
    elif world_size > 1:
        req.update(multi_gpu=True, distributed_backend=backend, distributed_url=f"tcp://127.0.0.1:{free_port()}")
        logger.info(f"Distributed training: {world_size} processes, backend {backend}")
        torch.multiprocessing.spawn(_worker, nprocs=world_size, args=(world_size, req, datalist, train), join=True)
    else:
        req["multi_gpu"] = False
        train(0, 1, req, datalist)


def _worker(rank: int, world_size: int, request: dict, datalist: list, train: TrainFn) -> None:
    """Entry point of each spawned training process."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)5s](%(name)s) - %(message)s", force=True)
    if str(request.get("device", "cpu")).startswith("cpu"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    train(rank, world_size, request, datalist)
    # Training finished and the process group is destroyed. Leave without interpreter teardown:
    # gloo/loader threads can abort there ("terminate called without an active exception"),
    # which spawn() would report as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)

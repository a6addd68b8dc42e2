"""Throughput and latency of a served network: training steps or predictions, per batch size and AMP setting.

Inputs are random tensors of the model's window size (the data pipeline is not timed, as in the
NVIDIA reference benchmarks). Warm-up steps are run first and not timed; each timed step is
synchronised on CUDA. Reported per (batch size, AMP): throughput in images (windows) per second
and latency mean / p90 / p95 / p99 in milliseconds, as a Markdown table and as JSON.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .runtime import AmpPolicy, resolve_amp, resolve_device


def _network_for(task: Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The served network (benchmarks time the version that serves)."""
    if task.is_valid():
        return task.load_network(device)
    raise RuntimeError(f"{task.model_name}: {task.not_ready_reason()}")


def time_steps(step: Any, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def run_benchmark(
    ws: Any, task: Any, mode: str, batch_sizes: Sequence[int], warmup: int, steps: int, device_name: str
) -> dict[str, Any]:
    """Benchmark table + JSON for ``mode`` in (train, predict)."""
    device = resolve_device(device_name)
    net, meta = _network_for(task, device)
    roi = list(meta.roi_size)
    channels = meta.in_channels
    classes = len(meta.labels) + 1
    rows = []
    for amp_flag in (False, True):
        policy = resolve_amp(amp_flag, device)
        if amp_flag and policy.dtype is None:
            rows.append({"amp": True, "skipped": f"no mixed precision on this {device.type} ({policy.describe()})"})
            continue
        for bs in batch_sizes:
            x = torch.randn(bs, channels, *roi, device=device)
            if mode == "predict":
                net.eval()

                # loop values bound as defaults: each step() is timed in the iteration that defines it
                def step(x: torch.Tensor = x, policy: AmpPolicy = policy) -> None:
                    with torch.no_grad(), policy.autocast():
                        net(x)
            else:
                net.train()
                y = torch.randint(0, classes, (bs, 1, *roi), device=device)
                opt = torch.optim.SGD(net.parameters(), lr=1e-6)
                loss_fn = torch.nn.CrossEntropyLoss()

                def step(
                    x: torch.Tensor = x,
                    y: torch.Tensor = y,
                    policy: AmpPolicy = policy,
                    opt: torch.optim.Optimizer = opt,
                    loss_fn: torch.nn.Module = loss_fn,
                ) -> None:
                    opt.zero_grad(set_to_none=True)
                    with policy.autocast():
                        out = net(x)
                        if out.ndim == x.ndim + 1:  # deep supervision heads stacked
                            out = out[:, 0]
                        loss = loss_fn(out.float(), y[:, 0])
                    loss.backward()
                    opt.step()

            secs = np.array(time_steps(step, warmup, steps, device)) * 1000.0
            rows.append(
                {
                    "batch_size": bs,
                    "amp": amp_flag,
                    "precision": policy.describe(),
                    "throughput_img_s": float(bs / (secs.mean() / 1000.0)),
                    "latency_ms_mean": float(secs.mean()),
                    "latency_ms_p90": float(np.percentile(secs, 90)),
                    "latency_ms_p95": float(np.percentile(secs, 95)),
                    "latency_ms_p99": float(np.percentile(secs, 99)),
                }
            )
    net.eval()
    table = [
        "| Batch size | AMP | Precision | Throughput (img/s) | Latency mean (ms) | p90 (ms) | p95 (ms) | p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            table.append(f"| - | on | - | skipped: {r['skipped']} | | | | |")
            continue
        table.append(
            f"| {r['batch_size']} | {'on' if r['amp'] else 'off'} | {r['precision']} | {r['throughput_img_s']:.2f} | "
            f"{r['latency_ms_mean']:.1f} | {r['latency_ms_p90']:.1f} | {r['latency_ms_p95']:.1f} | "
            f"{r['latency_ms_p99']:.1f} |"
        )
    return {
        "mode": mode,
        "model": task.model_name,
        "window": roi,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "rows": rows,
        "table": "\n".join(table),
    }

"""The standalone command line (``python main.py MODE ...``) over the same configs, trainers, engine
and metrics as the server.

Every mode works in a ``--results`` folder:

* ``model/``        the model dir (published ``<config>.pt``, split/plan files, train stats)
* ``studies/``      symlinks of the labelled cases, the layout the server's trainer reads
* ``predictions/``  label files (original geometry), ``*_probs.nii.gz`` with ``--save_probs``
* ``eval.json``, ``eval.csv``, ``benchmark.json``, ``export/``, ``plots/``

Training builds the MONAI Label app on ``studies/`` and calls its trainer exactly like
``POST /train/<config>``; predict and evaluate call its inferer like ``POST /infer/<config>``.
Multi-process training: ``--world_size N`` spawns N processes (gloo on CPU, NCCL on CUDA), or
launch with ``torchrun --nproc_per_node N main.py train ...`` (env:// rendezvous).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .conf import ConfError
from .datasets import Case, DatasetError, label_names, link_studies, load_cases
from .recipes import CONFIG_NAMES, RECIPES

MODES = ("plan", "train", "evaluate", "predict", "benchmark", "export", "models")
MODEL_ACTIONS = ("list", "promote", "rollback", "pin", "unpin")
APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger(__name__)


class CliError(RuntimeError):
    """A user-facing error: printed without a trace, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """Every flag of every mode, documented in ``--help``."""
    p = argparse.ArgumentParser(
        prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", nargs="?", choices=MODES, help="what to run (or --exec_mode)")
    p.add_argument("action", nargs="?", help=f"models mode: {', '.join(MODEL_ACTIONS)}")
    p.add_argument("version", nargs="?", help="models promote/pin/unpin: the version id (e.g. v3)")
    p.add_argument("--exec_mode", choices=MODES, help="same as the positional MODE (NVIDIA reference spelling)")
    p.add_argument("--config", required=True, help=f"model config: {', '.join(CONFIG_NAMES)}")
    p.add_argument("--data", help="MSD-style folder with dataset.json, or a folder with images/ and labels/")
    p.add_argument("--results", required=True, help="output folder (model/, predictions/, eval.json, ...)")
    p.add_argument(
        "--model_dir", default=None, help="model dir to use instead of RESULTS/model (e.g. a server's, for 'models')"
    )
    p.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config key as for the server's --conf (e.g. preset=small, roi_size=40,56,40, labels=a,b); repeatable",
    )
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    g.add_argument(
        "--max_steps", type=int, default=0, help="stop after this many optimisation steps in total (0: no limit)"
    )
    g.add_argument("--batch_size", default=None, help="training batch size; benchmark: a comma list, e.g. 1,2,4")
    g.add_argument("--learning_rate", type=float, default=None, help="learning rate (default: the config's)")
    g.add_argument(
        "--fold", type=int, default=None, help="train fold k of a persisted k-fold split (model/<config>_folds.json)"
    )
    g.add_argument("--nfolds", type=int, default=5, help="number of folds with --fold")
    g.add_argument("--val_split", type=float, default=0.2, help="validation fraction of the persisted single split")
    g.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    g.add_argument(
        "--resume_training",
        action="store_true",
        help="continue an interrupted run from model/<config>_resume.pt (weights, optimizer, epoch, lr schedule; "
        "saved after every epoch); the split is kept",
    )
    g.add_argument(
        "--world_size", type=int, default=1, help="processes (gloo on CPU, NCCL on CUDA); torchrun also works"
    )
    g.add_argument("--num_workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--iterations_per_epoch", type=int, default=None, help="nnU-Net: batches per epoch")
    g = p.add_argument_group("inference")
    g.add_argument(
        "--ckpt",
        default=None,
        help="checkpoint to evaluate/predict/export/benchmark (default: results/model/<config>.pt)",
    )
    g.add_argument("--tta", action="store_true", help="flip test-time augmentation over every axis combination")
    g.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    g.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian", help="window blending")
    g.add_argument("--save_preds", action="store_true", help="evaluate: keep the predicted label files")
    g.add_argument("--save_probs", action="store_true", help="predict: also write softmax probability maps")
    g.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="predict: spread the volumes over a Ray cluster ('auto' or HOST:PORT); finished outputs are skipped",
    )
    g.add_argument(
        "--engine",
        choices=("auto", "app"),
        default="auto",
        help="predict: 'auto' takes the fast path (no MONAI import, lib/fastpredict.py) for the volumes and models "
        "it reproduces exactly, the app's inferer for the rest; 'app' always the app's inferer",
    )
    g.add_argument("--ray_workers", type=int, default=0, help="predict --ray: workers (default: GPUs, else CPUs)")
    g.add_argument("--ray_cpus", type=int, default=1, help="predict --ray: CPUs (torch threads) per CPU worker")
    g.add_argument(
        "--split", default="auto", help="evaluate: 'validation' (the persisted split), 'all' labelled cases, or 'auto'"
    )
    g = p.add_argument_group("both")
    g.add_argument(
        "--amp",
        nargs="?",
        const="true",
        default="true",
        metavar="true|false|fp16|bf16",
        help="mixed precision, the server's rule (lib/runtime.py): default true = fp16 on CUDA, bf16 on CPUs "
        "with avx512_bf16 or AMX, fp32 elsewhere; false = fp32",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--bench_mode", "--benchmark_mode", dest="bench_mode", choices=("train", "predict"), default="predict"
    )
    g.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first")
    g.add_argument("--bench_steps", type=int, default=10, help="timed steps")
    g = p.add_argument_group("export")
    g.add_argument(
        "--formats",
        "--format",
        dest="formats",
        default="torchscript,onnx",
        help="comma list: torchscript, onnx, bundle (a MONAI bundle: RESULTS/export/<config>_bundle)",
    )
    g.add_argument("--bundle_dir", default=None, help="bundle: write it here instead of RESULTS/export/<config>_bundle")
    g.add_argument("--overwrite", action="store_true", help="bundle: replace an existing bundle folder")
    g.add_argument(
        "--tolerance", type=float, default=1e-3, help="max abs difference allowed between exported and PyTorch outputs"
    )
    return p


def parse_conf(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs from --conf."""
    out = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--conf {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def app_module() -> Any:
    """apps/unet_seg/main.py, loaded by its path: another ``main`` may come first on sys.path (a Ray worker's
    working directory is the repository root, whose main.py is this command line)."""
    module = sys.modules.get("main")
    if module is not None and os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == APP_DIR:
        return module
    if "unet_seg_app_main" not in sys.modules:
        import importlib.util

        spec = importlib.util.spec_from_file_location("unet_seg_app_main", os.path.join(APP_DIR, "main.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["unet_seg_app_main"] = module
        spec.loader.exec_module(module)
    return sys.modules["unet_seg_app_main"]


class Workspace:
    """The --results folder and the app built on it."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.config not in CONFIG_NAMES:
            raise CliError(f"unknown --config {args.config!r}; valid: {', '.join(CONFIG_NAMES)}")
        self.args = args
        self.results = os.path.abspath(args.results)
        self.model_dir = os.path.abspath(args.model_dir) if args.model_dir else os.path.join(self.results, "model")
        self.studies = os.path.join(self.results, "studies")
        os.makedirs(self.model_dir, exist_ok=True)
        os.makedirs(self.studies, exist_ok=True)
        self.conf: dict[str, str] = {
            "models": args.config,
            "model_dir": self.model_dir,
            "tracking": "none",
            "auto_update_scoring": "false",  # no server to post scoring requests to
        }
        if args.data:
            names = label_names(args.data)
            if names:
                self.conf["labels"] = ",".join(names)
        self.ckpt_meta = self._checkpoint_meta()
        if self.ckpt_meta is not None:  # the config's own additions (window, preset) come when the app is built
            self.conf.update(
                {"labels": json.dumps(self.ckpt_meta.labels), "modalities": str(self.ckpt_meta.in_channels)}
            )
        self.conf.update(parse_conf(args.conf))
        self._app: Any = None

    def _checkpoint_meta(self) -> Any:
        """The meta of a given --ckpt (checked: readable, of this config), or None."""
        if not self.args.ckpt:
            return None
        from .checkpoints import CheckpointMeta, MetaError, read_checkpoint

        if not os.path.exists(self.args.ckpt):
            raise CliError(f"--ckpt {self.args.ckpt} does not exist")
        self._import_nnunet()
        try:
            meta = CheckpointMeta.from_dict(read_checkpoint(self.args.ckpt)[1])
        except (MetaError, OSError, RuntimeError) as e:
            raise CliError(f"--ckpt {self.args.ckpt}: {e}") from e
        if meta.model != self.args.config:
            raise CliError(f"--ckpt {self.args.ckpt} is a '{meta.model}' model, not '{self.args.config}'")
        return meta

    def _import_nnunet(self) -> None:
        """--ckpt naming an nnU-Net v2 results folder or export zip: serve a unet_seg model file made from it."""
        from .checkpoints import is_nnunet_source

        if not is_nnunet_source(self.args.ckpt):
            return
        from .configs import load_config_class
        from .nnunetv2 import NnUNetImportError, checkpoint_from_source

        cls = load_config_class(self.args.config)
        if not getattr(cls, "nnunet_sources", False):
            raise CliError(f"--ckpt {self.args.ckpt}: nnU-Net models are served by --config nnunet or nnunet2d")
        out = os.path.join(self.model_dir, "nnunet_imports")
        try:
            self.args.ckpt = checkpoint_from_source(
                self.args.ckpt, self.args.config, cls.dims, parse_conf(self.args.conf), out
            )
        except NnUNetImportError as e:
            raise CliError(f"--ckpt {self.args.ckpt}: {e}") from e

    def infer_task(self) -> Any:
        """The config's inferer; with --ckpt it serves that file instead of the store's serving version."""
        task = self.app().infer_task(self.args.config)
        if self.args.ckpt:
            task.serve_file(self.args.ckpt)
        return task

    def app(self) -> Any:
        """The MONAI Label app on studies/ (built once)."""
        if self._app is None:
            os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
            if APP_DIR not in sys.path:
                sys.path.insert(0, APP_DIR)
            UNetSegApp = app_module().UNetSegApp

            if self.ckpt_meta is not None:  # conf that makes the config match --ckpt; the user's --conf wins
                from .configs import conf_from_meta

                self.conf.update({**conf_from_meta(self.args.config, self.ckpt_meta), **parse_conf(self.args.conf)})
            try:
                self._app = UNetSegApp(APP_DIR, self.studies, self.conf)
            except (ValueError, ConfError) as e:
                raise CliError(str(e)) from e
        return self._app

    def cases(self, split: str = "training") -> list[Case]:
        if not self.args.data:
            raise CliError("--data is required for this mode")
        try:
            return load_cases(self.args.data, split)
        except DatasetError as e:
            raise CliError(str(e)) from e


# ---- modes -------------------------------------------------------------------------------------


def mode_plan(ws: Workspace) -> dict:
    """nnU-Net: fingerprint the labelled cases and write the plan; other configs: print their fixed settings."""
    args = ws.args
    cases = [c for c in ws.cases() if c.label]
    trainer = ws.app().train_task(args.config)
    if hasattr(trainer, "make_plan"):  # self-configuring models plan from the data
        datalist = [{"image": c.image, "label": c.label} for c in cases]
        plan = trainer.make_plan(datalist, replan=True)
        print(
            json.dumps(
                {
                    k: getattr(plan, k)
                    for k in ("dims", "target_spacing", "patch_size", "batch_size", "strides", "filters")
                },
                indent=2,
            )
        )
        return {"plan": trainer.plan_path}
    info = ws.app().info()["trainers"][args.config]
    print(json.dumps(info.get("config", {}), indent=2, default=str))
    return {"config": info.get("config", {})}


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError as e:
        raise CliError(f"--batch_size {text!r}: expected an integer or a comma list of integers") from e
    if not sizes or min(sizes) < 1:
        raise CliError(f"--batch_size {text!r}: sizes must be >= 1")
    return sizes


def train_request(args: argparse.Namespace) -> dict:
    """The /train request the flags describe."""
    req: dict[str, Any] = {
        "model": args.config,
        "amp": args.amp,
        "device": args.device,
        "world_size": args.world_size,
        "val_split": args.val_split,
        "split_seed": args.seed,
        "pretrained": bool(args.resume_training),
        "resume": bool(args.resume_training),
        "train_num_workers": args.num_workers,
        "val_num_workers": args.num_workers,
    }
    batch = _batch_sizes(args.batch_size)[0] if args.batch_size else None
    for key, value in (
        ("max_epochs", args.epochs),
        ("train_batch_size", batch),
        ("learning_rate", args.learning_rate),
        ("iterations_per_epoch", args.iterations_per_epoch),
    ):
        if value is not None:
            req[key] = value
    if args.max_steps:
        req["max_steps"] = args.max_steps
    if args.fold is not None:
        req.update({"fold": args.fold, "nfolds": args.nfolds})
    return req


def mode_train(ws: Workspace) -> dict:
    """Link the labelled cases into studies/ and run the app's trainer; write curves."""
    n = link_studies(ws.cases(), ws.studies)
    if n == 0:
        raise CliError(f"{ws.args.data}: no labelled cases to train on")
    start = time.time()
    stats = ws.app().train(train_request(ws.args))
    stats["wall_time_s"] = round(time.time() - start, 1)
    if os.environ.get("RANK", "0") == "0":
        from .plots import plot_history

        written = plot_history(stats.get("history", []), os.path.join(ws.results, "plots"), ws.args.config)
        stats["plots"] = written
        print(
            json.dumps(
                {
                    k: stats.get(k)
                    for k in ("train_cases", "val_cases", "val_dice_per_class", "published", "wall_time_s", "plots")
                },
                indent=2,
                default=str,
            )
        )
    return stats


def _require_model(ws: Workspace) -> Any:
    """The config's inferer, ready to serve.

    Else the reason, e.g. no trained version: run 'main.py train' or pass --ckpt.
    """
    task = ws.infer_task()
    if not task.is_valid():
        raise CliError(task.not_ready_reason())
    return task


def infer_request(args: argparse.Namespace, image: Any) -> dict:
    """The /infer request the flags describe."""
    return {
        "model": args.config,
        "image": image,
        "tta": bool(args.tta),
        "overlap": args.overlap,
        "blend": args.blend,
        "amp": args.amp,
        "device": args.device,
    }


def _predict_one(ws: Workspace, case: Case, out_dir: str) -> str:
    """Segment one case; the label is written under a temporary name and renamed (never half-written)."""
    image = case.image
    res = ws.app().infer(infer_request(ws.args, image))
    src = res["file"]
    ext = ".nii.gz" if src.endswith(".nii.gz") else os.path.splitext(src)[1]
    dst = os.path.join(out_dir, f"{case.name}{ext}")
    tmp = dst + ".part" + ext
    shutil.move(src, tmp)
    os.replace(tmp, dst)
    return dst


def _overlay(ws: Workspace, case: Case, label_path: str, labels: dict[str, int] | None = None) -> str:
    """plots/<case>_overlay.png: the image's most-labelled slices with the predicted label coloured on top."""
    from .plots import plot_overlay

    def load(path: str) -> np.ndarray:
        if path.lower().endswith((".nii", ".nii.gz")):  # nibabel's voxel order is MONAI's for NIfTI
            import nibabel as nib

            return np.asanyarray(nib.load(path).dataobj)
        from monai.transforms import LoadImage

        return np.asarray(LoadImage(image_only=True)(path))

    image = load(case.image if isinstance(case.image, str) else case.image[0])
    label = load(label_path)
    if image.ndim == label.ndim + 1:  # channels last (4D / RGB): show the first
        image = image[..., 0]
    if labels is None:
        labels = dict(ws.app().infer_task(ws.args.config).labels)
    return plot_overlay(image, label, os.path.join(ws.results, "plots", f"{case.name}_overlay.png"), labels)


def ray_predictor(args: argparse.Namespace) -> Callable[[Case], str]:
    """Run in each Ray worker: this process's model, then ``case -> written label path``."""
    ws = Workspace(args)
    fast = _fast_model(ws)
    if fast is None:
        _require_model(ws)
    out_dir = os.path.join(ws.results, "predictions")
    return functools.partial(_predict_fast_or_app, ws, fast, out_dir=out_dir)


def _predict_on_ray(ws: Workspace, cases: list[Case], out_dir: str) -> dict:
    from .cohort import predict_cohort

    if ws.args.save_probs:
        raise CliError("--save_probs is not available with --ray")
    if _fast_model(ws) is None:
        _require_model(ws)  # a missing model is said here, not by every worker
    report = predict_cohort(
        cases,
        out_dir,
        functools.partial(ray_predictor, ws.args),
        address=ws.args.ray,
        app_dir=APP_DIR,
        workers=ws.args.ray_workers,
        cpus_per_worker=ws.args.ray_cpus,
    )
    print(
        f"{len(report['written'])} prediction(s) written, {len(report['skipped'])} already there, "
        f"{len(report['failed'])} failed, {len(report['retried'])} retried after a worker died; "
        f"{report['workers']} Ray worker(s) in {report.get('seconds', 0)} s -> {out_dir}"
    )
    for name, why in report["failed"].items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    if report["failed"]:
        raise CliError(f"{len(report['failed'])} volume(s) failed (see above); re-run to retry them")
    return report


def _fast_model(ws: Workspace) -> Any:
    """The served model on the fast predict path (``lib.fastpredict``), or None where the app's inferer must run."""
    from .conf import parse_labels
    from .fastpredict import Unsupported, load_fast_model
    from .modelstore import ModelStore
    from .runtime import resolve_device

    args = ws.args
    if args.engine != "auto" or args.conf or args.save_probs:
        return None
    path = os.path.abspath(args.ckpt) if args.ckpt else None
    if path is None:
        rec = ModelStore(ws.model_dir, args.config).serving()
        path = ModelStore(ws.model_dir, args.config).path(rec.id) if rec else None
    try:
        labels = parse_labels(ws.conf.get("labels") or RECIPES[args.config].labels)  # the app's rule
        if path is None or not os.path.exists(path):
            raise Unsupported("no serving version yet")
        return load_fast_model(args.config, path, labels, resolve_device(args.device))
    except Unsupported as e:
        logger.info(f"predict: the app's inferer serves ({e})")
        return None
    except ConfError:
        return None  # the app says what is wrong with the conf


def _fast_output(case: Case, out_dir: str) -> str:
    """Where the fast path writes ``case``'s label: ``<out_dir>/<name>`` with the image's NIfTI extension."""
    image = str(case.image)
    ext = ".nii.gz" if image.lower().endswith(".nii.gz") else os.path.splitext(image)[1]
    return os.path.join(out_dir, f"{case.name}{ext}")


def _predict_fast_or_app(ws: Workspace, fast: Any, case: Case, out_dir: str) -> str:
    """One case on the fast path where it applies, else through the app's inferer."""
    from .fastpredict import Unsupported, predict_file

    if fast is not None and isinstance(case.image, str):
        try:
            return predict_file(fast, case.image, _fast_output(case, out_dir), infer_request(ws.args, None))
        except Unsupported as e:
            logger.info(f"predict: {case.name} through the app's inferer ({e})")
    return _predict_one(ws, case, out_dir)


def _predicted(ws: Workspace, fast: Any, cases: list[Case], out_dir: str) -> Iterator[tuple[Case, str]]:
    """``(case, written label)`` in order. Single NIfTI files go the fast path, the next file read and the last
    label written while the network runs; other cases, and files the fast path cannot take, the app's inferer."""
    from .fastpredict import Unsupported, predict_files

    on_fast = [c for c in cases if fast is not None and isinstance(c.image, str)]
    jobs = [(str(c.image), _fast_output(c, out_dir)) for c in on_fast]
    results = predict_files(fast, jobs, infer_request(ws.args, None)) if on_fast else iter(())
    fast_ids = {id(c) for c in on_fast}
    for case in cases:
        result: str | Exception = next(results)[1] if id(case) in fast_ids else _predict_one(ws, case, out_dir)
        if isinstance(result, Unsupported):
            logger.info(f"predict: {case.name} through the app's inferer ({result})")
            result = _predict_one(ws, case, out_dir)
        yield case, str(result)


def mode_predict(ws: Workspace) -> dict:
    """Label files (original geometry) for every image of the test list (MSD) or images/ folder, with a progress bar."""
    from tqdm import tqdm

    try:
        cases = load_cases(ws.args.data, "test")
    except DatasetError:
        cases = ws.cases()
    out_dir = os.path.join(ws.results, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    if ws.args.ray:
        return _predict_on_ray(ws, cases, out_dir)
    fast = _fast_model(ws)
    task = None if fast is not None else _require_model(ws)
    written = []
    predict_s = 0.0
    t = time.perf_counter()
    for i, (case, path) in enumerate(
        tqdm(_predicted(ws, fast, cases, out_dir), total=len(cases), desc="predict", unit="image")
    ):
        written.append(path)
        if i == 0:
            predict_s += time.perf_counter() - t
            written.append(_overlay(ws, case, written[-1], dict(fast.meta.labels) if fast is not None else None))
            t = time.perf_counter()
        if task is not None and ws.args.save_probs:
            written.append(
                task.save_probabilities(
                    case.image, os.path.join(out_dir, f"{case.name}_probs.nii.gz"), infer_request(ws.args, case.image)
                )
            )
    predict_s += time.perf_counter() - t
    print(f"{len(cases)} prediction(s) in {out_dir}")
    print(f"PREDICT_S {predict_s:.3f} (inference and writing; model loading included in the first)")
    return {"predictions": written, "predict_s": round(predict_s, 3)}


def _evaluation_cases(ws: Workspace) -> list[Case]:
    labelled = [c for c in ws.cases() if c.label]
    if not labelled:
        raise CliError(f"{ws.args.data}: no labelled cases to evaluate on")
    split = ws.args.split
    split_file = ws.app().train_task(ws.args.config).paths.split
    if split in ("validation", "auto") and os.path.exists(split_file) and not ws.args.ckpt:
        with open(split_file, encoding="utf-8") as f:
            val = set(json.load(f)["validation"])
        chosen = [c for c in labelled if os.path.basename(c.image if isinstance(c.image, str) else c.image[0]) in val]
        if chosen:
            return chosen
    if split == "validation":
        raise CliError(f"no persisted validation split in {split_file}")
    return labelled


def mode_evaluate(ws: Workspace) -> dict:
    """Predict each labelled case and score it: Dice, HD95 per class, BraTS regions, ISBI scores; JSON + CSV."""
    from monai.transforms import LoadImage
    from tqdm import tqdm

    from .evaluation import evaluate_case, summarise, write_results

    task = _require_model(ws)
    cases = _evaluation_cases(ws)
    labels = dict(task.labels)
    label_map = {int(k): v for k, v in task.load_network(torch.device("cpu"))[1].label_map.items()}
    pred_dir = os.path.join(ws.results, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    loader = LoadImage(image_only=True)
    rows = []
    for case in tqdm(cases, desc="evaluate", unit="case"):
        path = _predict_one(ws, case, pred_dir)
        pred = np.asarray(loader(path))
        ref_img = loader(case.label)
        ref = np.rint(np.asarray(ref_img)).astype(np.int64)
        for src, dst in label_map.items():
            ref[ref == src] = dst
        if pred.shape != ref.shape:
            raise CliError(
                f"{case.label}: reference shape {ref.shape} differs from the prediction's {pred.shape} "
                f"(image {case.image})"
            )
        affine = np.asarray(getattr(ref_img, "affine", np.eye(4)))
        spacing = np.linalg.norm(affine[: pred.ndim, : pred.ndim], axis=0) if affine.shape[0] > pred.ndim else None
        row = {"case": case.name, **evaluate_case(pred, ref, labels, spacing)}
        rows.append(row)
        if len(rows) == 1:
            _overlay(ws, case, path)
        if not ws.args.save_preds:
            os.remove(path)
    summary = summarise(rows)
    write_results(rows, summary, os.path.join(ws.results, "eval.json"), os.path.join(ws.results, "eval.csv"))
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    """Markdown table of the evaluation means."""
    lines = ["| metric | mean | cases |", "|---|---|---|"]
    for key, value in summary.items():
        if isinstance(value, dict):
            mean = "n/a" if value["mean"] is None else f"{value['mean']:.4f}"
            lines.append(f"| {key} | {mean} | {value['n']} |")
    return "\n".join(lines)


def mode_benchmark(ws: Workspace) -> dict:
    """Throughput and latency of the config's network (train step or prediction) per batch size and AMP setting."""
    from .benchmark import run_benchmark

    task = _require_model(ws)
    sizes = _batch_sizes(ws.args.batch_size or "1")
    result = run_benchmark(
        ws, task, ws.args.bench_mode, sizes, ws.args.warmup_steps, ws.args.bench_steps, ws.args.device
    )
    with open(os.path.join(ws.results, "benchmark.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(result["table"])
    return result


def mode_export(ws: Workspace) -> dict:
    """TorchScript and ONNX files of the served network, each checked against PyTorch, and/or a MONAI bundle."""
    from .bundle import BundleError
    from .export import export_model, parse_formats

    formats = parse_formats(ws.args.formats)
    task = _require_model(ws)
    try:
        result = export_model(
            task,
            os.path.join(ws.results, "export"),
            formats,
            ws.args.tolerance,
            overwrite=ws.args.overwrite,
            bundle_dir=ws.args.bundle_dir,
        )
    except (BundleError, FileExistsError) as e:
        raise CliError(str(e)) from e
    print(json.dumps(result, indent=2))
    return result


def mode_models(ws: Workspace) -> dict:
    """``models list|promote|rollback|pin|unpin [VERSION]``: the versions of the config's model and which one serves.

    Acts on the model dir's store directly (``--model_dir`` for a server's): a running server
    serves the switched version from its next request, without a restart.
    """
    from .modelstore import StoreError

    action, version = ws.args.action or "list", ws.args.version
    if action not in MODEL_ACTIONS:
        raise CliError(f"models: expected one of {', '.join(MODEL_ACTIONS)}, got {action!r}")
    if action in ("promote", "pin", "unpin") and not version:
        raise CliError(f"models {action}: give the version id, e.g. 'models {action} v2' (see 'models list')")
    store = ws.app().model_store(ws.args.config)
    try:
        if action == "promote":
            store.promote(version, "promoted by hand (main.py models promote)")
        elif action == "rollback":
            store.rollback()
        elif action in ("pin", "unpin"):
            store.pin(version, action == "pin")
    except StoreError as e:
        raise CliError(str(e)) from e
    rows = store.describe()
    print("| version | state | created | val Dice | cases | source | pinned | reason |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dice = "n/a" if r["val_mean_dice"] is None else f"{r['val_mean_dice']:.4f}"
        print(
            f"| {r['id']} | {r['state']} | {r['created']} | {dice} | {r['val_cases']} | {r['source']} | "
            f"{'yes' if r['pinned'] else ''} | {r['reason']} |"
        )
    serving = store.serving()
    return {"serving": serving.id if serving else None, "versions": rows}


HANDLERS = {
    "plan": mode_plan,
    "train": mode_train,
    "evaluate": mode_evaluate,
    "predict": mode_predict,
    "benchmark": mode_benchmark,
    "export": mode_export,
    "models": mode_models,
}


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = args.mode or args.exec_mode
    if not mode:
        parser.error("give a mode (plan, train, evaluate, predict, benchmark, export) or --exec_mode")
    if args.mode and args.exec_mode and args.mode != args.exec_mode:
        parser.error(f"mode {args.mode!r} and --exec_mode {args.exec_mode!r} disagree")
    if mode != "models" and (args.action or args.version):
        parser.error(f"unexpected argument {args.action!r} after mode {mode!r}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)5s](%(name)s) - %(message)s")
    if mode in ("predict", "evaluate", "benchmark"):
        from .runtime import keep_freed_memory

        keep_freed_memory()  # inference: no page faults per call (see the function)
    try:
        ws = Workspace(args)
        HANDLERS[mode](ws)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, ConfError) as e:  # InputError and friends: bad data or flags, named in the message
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0

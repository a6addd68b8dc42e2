"""nnU-Net v2's own side of tests/test_nnunet_import.py, run with ``.venv-nnunet/bin/python`` (never by pytest).

``python nnunet_peer.py SPEC.json`` runs, in one process (each nnU-Net process start costs seconds
on a 2-core machine), with nnU-Net's own code and the ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` environment variables of its command-line tools:

1. ``plan``: fingerprint, ExperimentPlanner and preprocessing of ``configurations`` for dataset
   ``dataset_id``; the plans' features per stage are divided by ``feature_divisor`` (a custom
   plan, as users edit them) so that a CPU trains it in seconds; ``splits`` is written as
   ``splits_final.json``.
2. ``train``: per entry ``{"configuration", "fold", "epochs", "iterations", "validate", "init"}``,
   nnUNetTrainer (the class ``nnUNetv2_train`` runs) with that tiny schedule, starting from the
   PlainConvUNet weights in ``init`` if given (a torch file of tensors by nnU-Net key; layers it
   lacks keep nnU-Net's initialisation); ``validate`` runs nnU-Net's own validation of the fold
   (its ``validation/summary.json`` is part of an exported model).
3. ``predict``: per entry ``{"model", "folds", "out", "probabilities"}``, nnUNetPredictor with
   nnU-Net's defaults (tile step 0.5, Gaussian, mirroring) on the images in ``images``
   (sequential: no worker processes), optionally also writing its probabilities (``.npz``).
4. ``export``: ``nnUNetv2_export_model_to_zip``'s function for ``export_folds`` of
   ``export_configuration`` into ``zip``.

Prints ``TIMES {json}`` with the seconds of each step.
"""

from __future__ import annotations

import json
import os
import sys
import time


def plan(spec: dict) -> None:
    os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112  (nnU-Net's name) the planner sets torch's threads to it
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset = spec["dataset_id"]
    extract_fingerprints([dataset], check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([dataset])
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    with open(os.path.join(folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    for config in plans["configurations"].values():
        arch = config.get("architecture", {}).get("arch_kwargs")
        if arch:
            arch["features_per_stage"] = [max(4, f // spec["feature_divisor"]) for f in arch["features_per_stage"]]
    with open(os.path.join(folder, "nnUNetPlans.json"), "w") as f:
        json.dump(plans, f, indent=2)
    with open(os.path.join(folder, "splits_final.json"), "w") as f:
        json.dump(spec["splits"], f)
    names = tuple(spec["configurations"])
    preprocess([dataset], configurations=names, num_processes=(1,) * len(names), show_progress_bar=False)
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112  augmentation in the training process (2 cores)


def train(spec: dict, run: dict) -> None:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(run["fold"])
    trainer = get_trainer_from_args(
        str(spec["dataset_id"]), run["configuration"], run["fold"], device=torch.device("cpu")
    )
    trainer.num_epochs = run["epochs"]
    trainer.num_iterations_per_epoch = run["iterations"]
    trainer.num_val_iterations_per_epoch = 2
    if run.get("init"):
        trainer.initialize()
        start = torch.load(run["init"], map_location="cpu", weights_only=True)
        own = trainer.network.state_dict()  # tensors sharing the parameters' storage (aliased keys too)
        for key, value in start.items():
            own[key].copy_(value)
    trainer.run_training()
    if run["validate"]:
        trainer.perform_actual_validation(False)


def predict(spec: dict, run: dict) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    p.initialize_from_trained_model_folder(
        run["model"], use_folds=tuple(run["folds"]), checkpoint_name="checkpoint_final.pth"
    )
    os.makedirs(run["out"], exist_ok=True)
    probabilities = bool(run.get("probabilities"))
    p.predict_from_files_sequential(spec["images"], run["out"], save_probabilities=probabilities, overwrite=True)


def export(spec: dict) -> None:
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    export_pretrained_model(
        spec["dataset_id"],
        spec["zip"],
        configurations=(spec["export_configuration"],),
        folds=tuple(spec["export_folds"]),
    )


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    times = {}
    t = time.perf_counter()
    plan(job)
    times["plan_s"] = time.perf_counter() - t
    for r in job["train"]:
        t = time.perf_counter()
        train(job, r)
        times[f"train_{r['configuration']}_fold{r['fold']}_s"] = time.perf_counter() - t
    for r in job["predict"]:
        t = time.perf_counter()
        predict(job, r)
        times[f"predict_{os.path.basename(r['out'])}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    export(job)
    times["export_s"] = time.perf_counter() - t
    print("TIMES " + json.dumps({k: round(v, 1) for k, v in times.items()}))

"""Experiment tracking for train.py: --mlflow records the run in MLflow, --tensorboard writes TensorBoard event
files into the run folder. Both take the same three calls: start (flags, and the epochs already done), log_epoch
(one metrics.csv row, step = epoch) and end (the run's files and how it ended).

Each package is optional and imported only when its flag is given; require() checks it before any work.
MLflow's store is MLFLOW_TRACKING_URI when set, else sqlite:///<the run folder's parent>/mlflow.db (runs/mlflow.db
by default), with artifacts in <that parent>/mlartifacts: no server, and every run of that parent in one store.
Open it with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
"""
import argparse
import importlib
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

import cli

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # flag -> the package it needs


class TrackingError(cli.UserError):
    """A tracking package that is missing, or a tracking store that cannot be used."""


def require(args: argparse.Namespace) -> None:
    """Import the packages the tracking flags need, now, before any work: a missing one is one line naming it."""
    for flag, package in PACKAGES.items():
        if getattr(args, flag):
            try:
                importlib.import_module(package)
            except ImportError:
                raise TrackingError(f"--{flag} needs {package}, an optional dependency: pip install {package}") \
                    from None


def start(args: argparse.Namespace, folder: Path, history: list[dict], mlflow_run_id: str | None,
          images: torch.Tensor) -> list:
    """The trackers the flags ask for, started; `history`: the metrics.csv rows of the epochs already done (a
    resumed run), logged where they are not yet; `images`: a few uint8 training images for TensorBoard."""
    trackers = []
    if args.mlflow:
        trackers.append(MlflowTracker(args, folder, history, mlflow_run_id))
    if args.tensorboard:
        trackers.append(TensorBoardTracker(folder, history, images))
    return trackers


def log_epoch(trackers: list, row: dict) -> None:
    """A tracker that fails here (a server gone, a full disk) is reported and the training goes on: the epoch is in
    metrics.csv and the checkpoint, and --mlflow logs what it missed when the run is resumed."""
    for tracker in trackers:
        try:
            tracker.log_epoch(row)
        except Exception as e:
            warn(tracker, f"cannot log epoch {row['epoch']}", e)


def end(trackers: list, status: str, files: list[Path], results: dict | None) -> None:
    """status: FINISHED, KILLED (a signal) or FAILED; files: the run's files to keep with it (those that exist);
    results: results.json's dict (a finished run), whose test_accuracy and test_loss are logged as metrics."""
    test = {k: results[k] for k in ("test_accuracy", "test_loss")} if results else {}
    for tracker in trackers:
        try:
            tracker.end(status, [f for f in files if f.is_file()], test, results["epochs_completed"] if results else 0)
        except Exception as e:
            warn(tracker, "cannot record the end of the run", e)


def warn(tracker, what: str, e: Exception) -> None:
    print(f"warning: --{tracker.flag}: {what}: {' '.join(str(e).split())[:200]}", file=sys.stderr, flush=True)


def scalars(row: dict) -> dict[str, float]:
    """A metrics.csv row's numbers, without the missing ones (no validation: nan)."""
    return {k: float(v) for k, v in row.items() if not math.isnan(v)}


class MlflowTracker:
    """One MLflow run per train.py run: a run resumed after Ctrl-C continues its MLflow run (the id is kept in
    the checkpoint). Params: every flag as first started (a flag changed on resume: a tag). Metrics: every
    metrics.csv column under its name, step = epoch. Artifacts: the run's files, at the end."""
    flag = "mlflow"

    def __init__(self, args: argparse.Namespace, folder: Path, history: list[dict], run_id: str | None):
        for name in ("mlflow", "alembic"):  # their INFO lines (creating tables, experiments) are not ours to print
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(folder)
        # A server that does not answer: an error in ~15 s, not after MLflow's default 7 retries (~4 minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        if run_id is not None:
            try:
                MlflowClient(uri).get_run(run_id)
            except Exception:
                raise TrackingError(f"--mlflow: this run's MLflow run {run_id} is not in the tracking store {uri} "
                                    f"(was it recorded with another MLFLOW_TRACKING_URI?)") from None
        try:
            self.client = MlflowClient(uri)
            if run_id is None:
                experiment = self.experiment_id(args.dataset, uri)
                self.run_id = self.client.create_run(experiment, run_name=folder.name,
                                                     tags={"run_folder": str(folder.resolve())}).info.run_id
                logged = {}
            else:
                self.run_id = run_id
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                logged = run.data.params
            params = {k: str(v) for k, v in sorted(vars(args).items())}
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])
            for k, v in params.items():
                if k in logged and logged[k] != v:
                    self.client.set_tag(self.run_id, f"changed_on_resume.{k}", f"{logged[k]} -> {v}")
            done = {m.step for m in self.client.get_metric_history(self.run_id, "epoch")} if run_id else set()
            for row in history:  # epochs done before --mlflow was given, or whose logging a kill cut off
                if row["epoch"] not in done:
                    self.log_epoch(row)
        except Exception as e:  # a store that cannot be reached, written or read: each is the same answer
            raise TrackingError(f"--mlflow: cannot use the tracking store {uri}: "
                                f"{' '.join(str(e).split())[:200]}") from None

    def experiment_id(self, name: str, uri: str) -> str:
        """The experiment named `name` (MLFLOW_EXPERIMENT_NAME when set, else the dataset), created if needed. In a
        local SQLite store its artifacts go next to the database file (MLflow would put them in ./mlruns, in
        whatever folder train.py was started from); elsewhere (a server, a folder) where the store says."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def log_epoch(self, row: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, row["epoch"])
                                                    for k, v in scalars(row).items()])

    def end(self, status: str, files: list[Path], test: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in test.items()])
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


def default_tracking_uri(folder: Path) -> str:
    return "sqlite:///" + str((folder.parent / "mlflow.db").resolve())


class TensorBoardTracker:
    """Event files in <run folder>/tensorboard: every metrics.csv column per epoch (train_loss, val_acc, lr, ...)
    and a grid of training images. A resumed run appends to the same folder: its events from epoch 1 on are
    superseded (purge_step) by the checkpoint's history, written again, so they match the run exactly."""
    flag = "tensorboard"

    def __init__(self, folder: Path, history: list[dict], images: torch.Tensor):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=1)
        self.writer.add_images("train_images", images, global_step=1)  # uint8 (N, C, H, W)
        for row in history:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        for k, v in scalars(row).items():
            if k != "epoch":
                self.writer.add_scalar(k, v, global_step=row["epoch"])
        self.writer.flush()

    def end(self, status: str, files: list[Path], test: dict[str, float], step: int) -> None:
        for k, v in test.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.close()

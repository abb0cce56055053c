"""What a run of train.py reports: the live progress line inside an epoch, the line after each epoch, curves.png,
and the trackers: --mlflow records the run in MLflow, --tensorboard writes TensorBoard event files into the run
folder. Both trackers take the same three calls: start (flags, and the epochs already done), log_epoch (one
metrics.csv row, step = epoch) and end (the run's files and how it ended).

Each tracking package is optional and imported only when its flag is given; require() checks it before any
work.
MLflow's store is MLFLOW_TRACKING_URI when set, else sqlite:///<the run folder's parent>/mlflow.db (runs/mlflow.db
by default), with artifacts in <that parent>/mlartifacts: no server, and every run of that parent in one store.
Open it with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`; the run prints, when it starts and when it
ends, where it is recorded and the page of its MLflow run. A store that cannot be used is one line before the
training starts; a tracker that fails later is one warning line and the training goes on.
"""
import argparse
import logging
import math
import os
import re
import shlex
import shutil
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import torch
import torch.nn as nn

import cli
import plot
import runargs
import runtime
from checkpoint import EpochTally, RunState
from data import Split
from decode import Prep
from stream import StreamSet


def format_epoch(row: dict, epochs: int) -> str:
    """The line printed after each epoch, from its metrics.csv row."""
    val = "no val" if math.isnan(row["val_loss"]) else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%"
    if not math.isnan(row.get("val_top5", math.nan)):  # (more than 5 classes)
        val += f" top-5 {row['val_top5']:6.2f}%"
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:6.2f}%  {val}  lr {row['lr']:.2e}  {row['train_seconds']:.1f}s  "
            f"{row['images_per_s']:,.0f} img/s")


LOG_SECONDS = 60.0  # in a log, without --log-interval: a progress line at most this often


class Progress:
    """The --log-interval line inside an epoch: step, the epoch's running loss and accuracy, images/s and the
    epoch's ETA. On a terminal it is one live line, rewritten in place and cleared before the epoch line; when
    stdout is not a terminal (a log file) it is a plain line each time: every --log-interval steps when given,
    else after the first step that ends LOG_SECONDS or more after the last line (or the epoch's start), so that a
    long epoch shows it is alive in a log without filling it (an epoch shorter than that prints none)."""

    def __init__(self, interval: int, live: bool, epoch: int, epochs: int, n: int, steps: int, group: int,
                 first_step: int, loss_before: float, correct_before: int, world: int):
        self.interval, self.live, self.epoch, self.epochs = interval, live, epoch, epochs
        self.n, self.steps, self.group, self.world = n, steps, group, world
        self.first_step, self.loss_before, self.correct_before = first_step, loss_before, correct_before
        self.start = self.shown = time.perf_counter()
        self.seconds: float | None = None  # a line at most this often (None: every `interval` steps)

    @classmethod
    def start_epoch(cls, log_interval: int | None, epoch: int, epochs: int, n: int, steps: int, group: int,
                    first_step: int = 0, loss_before: float = 0.0, correct_before: int = 0,
                    world: int = 1) -> "Progress | None":
        """None when off. `n` images in `steps` optimizer steps of `group` images; a resumed epoch starts at
        `first_step` with the loss sum and correct count of the steps before it."""
        live = sys.stdout.isatty()
        interval = log_interval
        if interval is None:  # auto: on a terminal, 20 updates per epoch (1-2 s apart for --preset fast); in a
            interval = math.ceil(steps / 20) if live else 1  # log, the first step's end once LOG_SECONDS have passed
        if not interval:
            return None
        progress = cls(interval, live, epoch, epochs, n, steps, group, first_step, loss_before, correct_before, world)
        progress.seconds = LOG_SECONDS if log_interval is None and not live else None
        return progress

    def after_step(self, step: int, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """`step`: optimizer steps done in this epoch; `loss_sum`, `correct`: this process's sums since the epoch
        (or the resume) began, on the device. Shows the line every `interval` steps (with `seconds`: once that
        long has passed since the last line)."""
        if step % self.interval or self.seconds is not None and time.perf_counter() - self.shown < self.seconds:
            return
        # (under torchrun, rank 0's share stands for all: an estimate; .item() is the one sync, every N steps)
        loss_sum, correct = loss_sum.item() * self.world, correct.item() * self.world
        seconds = time.perf_counter() - self.start
        seen, before = min(step * self.group, self.n), min(self.first_step * self.group, self.n)
        eta = round(seconds / (step - self.first_step) * (self.steps - step))
        line = (f"epoch {self.epoch:>{len(str(self.epochs))}}/{self.epochs}  step {step:>{len(str(self.steps))}}/"
                f"{self.steps}  loss {(self.loss_before + loss_sum) / seen:.4f} "
                f"acc {100 * (self.correct_before + correct) / seen:6.2f}%  {(seen - before) / seconds:,.0f} img/s  "
                f"ETA {eta // 60}:{eta % 60:02d}")
        if self.live:  # \r: back to the line's start, then erase what a longer line left
            line = line[:shutil.get_terminal_size().columns - 1]
            sys.stdout.write("\r" + line + erase_rest(len(line)))
            sys.stdout.flush()
        else:
            print(line, flush=True)
        self.shown = time.perf_counter()

    def clear(self) -> None:
        if self.live:
            erase = erase_rest(0)
            sys.stdout.write("\r" + erase + "\r" * (erase != "\x1b[K"))  # (after spaces: back to the start)
            sys.stdout.flush()


def erase_rest(shown: int) -> str:
    """What erases the rest of a terminal line after `shown` characters: ESC[K, or spaces on a terminal that takes
    no escape codes (TERM=dumb: an editor's shell, a serial console)."""
    if os.environ.get("TERM") != "dumb":
        return "\x1b[K"
    return " " * max(0, shutil.get_terminal_size().columns - 1 - shown)


def draw_curves(history: list[dict], path: Path, quiet: bool, best: int | None = None) -> None:
    """curves.png of the epochs so far, when matplotlib is installed: the one picture drawn without a flag.
    quiet: the run failed, and its error is the one line to print; best: best.pth's epoch (None: the lowest
    validation loss)."""
    if not history:
        return
    try:
        plot.require_matplotlib()
    except cli.UserError:
        return  # not installed: training never needs it
    try:
        plot.plot_curves({c: [row[c] for row in history] for c in plot.CURVES}, path, best)
    except plot.PlotError as e:
        if not quiet:
            print(f"warning: {path.name} not drawn: {e}", file=sys.stderr)


def announce(args: argparse.Namespace, model: nn.Module, train: Split, val: Split | None, test: Split,
             device: torch.device, folder: Path, state: RunState, tally: EpochTally, start: dict | None,
             card: dict) -> None:
    """The lines a run starts with: where a resumed run goes on and what it changed, or the weights a new run
    starts from; then the data, the device, the model, the folder."""
    if args.resume:
        at = f"step {tally.step} of epoch {state.epoch + 1}" if tally.step else f"the end of epoch {state.epoch}"
        print(f"resumed from {args.resume} at {at}")
        changes = card["changes"]
        if changes and (changes[-1]["epoch"], changes[-1]["step"]) == (state.epoch + 1, tally.step):
            print(f"changed from here on: {changes[-1]['flags']}")
    if start:
        head = (f"; its classifier of {start['num_classes']} classes replaced by a new one of {card['num_classes']}"
                if start["num_classes"] != card["num_classes"] else "")
        print(f"starting from {start['source']}{head}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) if args.freeze_backbone else None
    streamed = (f" (streamed by {train.workers} worker{'s' * (train.workers != 1)})" if train.workers else
                " (streamed by the training process)") if isinstance(train, StreamSet) else ""
    print(f"{args.dataset}: {len(train)} train, {len(val) if val else 0} val, {len(test)} test images{streamed} on "
          f"{device} x {runtime.rank_world()[1]}; {args.model} with {sum(p.numel() for p in model.parameters()):,} "
          f"parameters{f' ({trained:,} trained)' if trained else ''}; writing to {folder}", flush=True)
    prep = Prep.from_dict(card["prep"])
    if prep.mode == "crop":
        print(f"photo recipe{' of the pretrained weights' if args.pretrained else ''}: "
              f"{prep.describe(train.image_size)}")
    note_rare_classes(args, train.labels, card["classes"])


RARE = 5  # a class with this many times fewer training images than the largest (of 50 or more) is met at the door


def note_rare_classes(args: argparse.Namespace, labels: torch.Tensor, classes: list[str]) -> None:
    """One line when the largest class has RARE or more times the training images of the smallest (and 50 or
    more: a few dozen images split at random by class are uneven by chance), and the run
    does nothing about it: the flags that help (README's FAQ: weighing the loss by class from about 3/4 of the run
    raised long-tailed CIFAR-10's balanced accuracy from 60.9% to 73.5%)."""
    counts = torch.bincount(labels.cpu(), minlength=len(classes))
    rare, common = int(counts.argmin()), int(counts.argmax())
    if args.class_weights != "none" or args.balanced_sampler or counts[common] < max(50, RARE * int(counts[rare])):
        return
    n = int(counts[rare])
    print(f"note: class {cli.printable(classes[rare])} has {n:,} training image{'s' * (n != 1)}, "
          f"{cli.printable(classes[common])} {int(counts[common]):,}: for rare classes, weigh the loss by class "
          f"for the last quarter of the run: --class-weights balanced --class-weights-from-epoch "
          f"{args.epochs * 3 // 4 + 1} (README: FAQ)", file=sys.stderr)


def diverged(what: str, last: Path, lr: float) -> str:
    """The one line a diverged run ends with: what happened, and the way forward from the last good weights."""
    if not last.exists():
        return f"{what}; start again with a lower --lr (e.g. --lr {lr / 10:.2g}) or --grad-clip 1.0"
    return (f"{what}; {last} holds the weights before it: go on from there with a lower lr and clipping: "
            f"{cli.command('train.py', '--resume', str(last))} --lr {lr / 10:.2g} --grad-clip 1.0")


# ---------------------------------------------------------------------------------------------------------------
# Trackers: --mlflow and --tensorboard

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # flag -> the package it needs


class TrackingError(cli.UserError):
    """A tracking package that is missing, or a tracking store that cannot be used."""


def require(args: argparse.Namespace) -> None:
    """Import the packages the tracking flags need, now, before any work: a missing one is one line naming it."""
    for flag, package in PACKAGES.items():
        if getattr(args, flag):
            cli.require(package, f"--{flag}")


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
            warn(tracker, f"cannot log epoch {row['epoch']}", e, every_epoch=True)


def end(trackers: list, status: str, files: list[Path], results: dict | None) -> None:
    """status: FINISHED, KILLED (a signal) or FAILED; files: the run's files to keep with it (those that exist);
    results: results.json's dict (a finished run), whose test_ numbers (accuracy, loss, top-5, ...) are logged as
    metrics.
    A signal in the middle (Ctrl-C while the files upload, a second Ctrl-C while a stopped run shuts down) skips
    what is left to log, but every tracker still records that the run ended (KILLED), with further signals held
    off for that moment; then the signal goes on to stop the process."""
    test = {k: v for k, v in results.items() if k.startswith("test_")} if results else {}
    for i, tracker in enumerate(trackers):
        try:
            tracker.end(status, [f for f in files if f.is_file()], test, results["epochs_completed"] if results else 0)
        except cli.Interrupted:
            held = cli.handle_signals(lambda signum, frame: None)
            try:
                for unfinished in trackers[i:]:
                    try:
                        unfinished.close("KILLED")
                    except Exception as e:
                        warn(unfinished, "cannot record the end of the run", e)
            finally:
                cli.restore_signals(held)
            raise
        except Exception as e:
            warn(tracker, "cannot record the end of the run", e)


def warn(tracker, what: str, e: Exception, every_epoch: bool = False) -> None:
    """One line. every_epoch: a tracker that keeps failing the same way (a full disk, a server gone) says so
    once, not once an epoch."""
    why = reason(e)
    if every_epoch:
        if why == getattr(tracker, "last_failure", None):
            return
        tracker.last_failure = why
        why += " (the same failure in later epochs is not repeated)"
    print(f"warning: --{tracker.flag}: {what}: {why}", file=sys.stderr, flush=True)


def reason(e: Exception) -> str:
    """An exception as a short line: SQLAlchemy's (under MLflow's) without its advice on autoflush and the SQL."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\(raised as a result of Query-invoked autoflush;[^)]*\) ", "", text).split(" [SQL: ")[0]
    return cli.shorten(text) or type(e).__name__  # (cut like every other quoted message)


def scalars(row: dict) -> dict[str, float]:
    """A metrics.csv row's numbers, without the missing ones (no validation: nan)."""
    return {k: float(v) for k, v in row.items() if not math.isnan(v)}


class MlflowTracker:
    """One MLflow run per train.py run: a run resumed after Ctrl-C continues its MLflow run (the id is kept in
    the checkpoint). Params: every flag as first started (a flag changed on resume: a tag). Metrics: every
    metrics.csv column under its name, step = epoch. Artifacts: the run's files, at the end."""
    flag = "mlflow"

    def __init__(self, args: argparse.Namespace, folder: Path, history: list[dict], run_id: str | None):
        # Their own reports (INFO lines, retry warnings, tracebacks logged at ERROR) are not ours to print: what
        # fails reaches us as an exception, and is one line (TrackingError at the start, a warning later)
        for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(folder)
        self.uri = uri
        # A server that stops answering mid-run: an error in about a minute, not after MLflow's default 7 retries
        # of 120 s each
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        probe(uri)
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
                logged, experiment = run.data.params, run.info.experiment_id
            # (what the run is, as args.json has it: not where it is, --out-dir, --resume; its data folder resolved)
            params = {k: str(v) for k, v in sorted(runargs.run_flags(args).items())}
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])
            for k, v in params.items():
                if k in logged and logged[k] != v:
                    self.client.set_tag(self.run_id, f"changed_on_resume.{k}", f"{logged[k]} -> {v}")
            done = ({m.step for m in self.client.get_metric_history(self.run_id, "train_seconds")} if run_id
                    else set())  # (train_seconds: a number in every row)
            for row in history:  # epochs done before --mlflow was given, or whose logging a kill cut off
                if row["epoch"] not in done:
                    self.log_epoch(row)
        except Exception as e:  # a store that cannot be reached, written or read: each is the same answer
            raise TrackingError(f"--mlflow: cannot use the tracking store {uri}: {reason(e)}") from None
        self.experiment = experiment
        print(f"--mlflow: recording MLflow run {self.run_id} ({folder.name}) in {uri}; to see it: "
              f"{self.ui_command()}", flush=True)

    def ui_command(self) -> str:
        """How to see the run. MLflow 3's UI opens on its GenAI view, whose experiment pages have no runs table;
        the workflowType parameter opens the machine-learning view (its "Machine learning" switch)."""
        page = f"#/experiments/{self.experiment}/runs/{self.run_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}, then open http://127.0.0.1:5000/{page}"

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
            location = (sqlite_path(uri).resolve().parent / "mlartifacts").as_uri()
        # MLflow 3's UI shows an experiment of this kind as model training (the runs table), not as GenAI traces
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    def log_epoch(self, row: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, row["epoch"])
                                                    for k, v in scalars(row).items() if k != "epoch"])

    def end(self, status: str, files: list[Path], test: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in test.items()])
            for path in files:
                self.client.log_artifact(self.run_id, str(path))
        except cli.Interrupted:
            raise  # (end() closes it, KILLED)
        except Exception:
            self.close(status)  # a file that could not be uploaded: the run has ended all the same
            raise
        self.close(status)

    def close(self, status: str) -> None:
        """Mark the MLflow run ended (FINISHED, KILLED, FAILED), and say where it is."""
        self.client.set_terminated(self.run_id, status)
        print(f"--mlflow: MLflow run {self.run_id} recorded ({status}) in {self.uri}; to see it: "
              f"{self.ui_command()}", flush=True)


def sqlite_path(uri: str) -> Path:
    """The database file of a sqlite:/// tracking URI (sqlite:////abs/path, sqlite:///relative/path)."""
    return Path(uri[len("sqlite:///"):].split("?")[0])


def probe(uri: str) -> None:
    """Refuse in one line, at once, a tracking store that cannot be used: MLflow itself retries opening a
    database for about 2 minutes (37 warning lines) and a server for minutes. A SQLite file must open for writing
    (its folder is made, as MLflow would); a server must answer HTTP at all (any status: it is there)."""
    try:
        if uri.startswith("sqlite:///"):
            path = sqlite_path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and not path.is_file():  # (a FIFO there: SQLite would wait on it forever)
                raise TrackingError(f"--mlflow: the tracking store {path} is {cli.kind_of_file(path.stat().st_mode)}, "
                                    f"not a database file; set MLFLOW_TRACKING_URI to a store that can be written")
            with closing(sqlite3.connect(path, timeout=10)) as db:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or file system
                db.rollback()
        elif uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
            except urllib.error.HTTPError:
                pass  # it answered
    except (OSError, sqlite3.Error) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"--mlflow: cannot use the tracking store {uri}: {cli.one_line(reason)}; "
                            f"set MLFLOW_TRACKING_URI to a store that can be written") from None


def default_tracking_uri(folder: Path) -> str:
    return "sqlite:///" + str((folder.parent / "mlflow.db").resolve())


class TensorBoardTracker:
    """Event files in <run folder>/tensorboard: every metrics.csv column per epoch (train_loss, val_acc, lr, ...)
    and a grid of training images. A resumed run appends to the same folder: its events from epoch 1 on are
    superseded (purge_step) by the checkpoint's history, written again, so they match the run exactly."""
    flag = "tensorboard"

    def __init__(self, folder: Path, history: list[dict], images: torch.Tensor):
        from torch.utils.tensorboard import SummaryWriter
        quiet_writer_threads()
        try:
            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=1)
            self.writer.add_images("train_images", images, global_step=1)  # uint8 (N, C, H, W)
            for row in history:
                self.log_epoch(row)
        except Exception as e:  # (tensorboard names the file as bytes: say the folder)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else cli.one_line(e)
            raise TrackingError(f"--tensorboard: cannot write to {folder / 'tensorboard'}: {reason}") from None

    def log_epoch(self, row: dict) -> None:
        for k, v in scalars(row).items():
            if k != "epoch":
                self.writer.add_scalar(k, v, global_step=row["epoch"])
        self.writer.flush()

    def end(self, status: str, files: list[Path], test: dict[str, float], step: int) -> None:
        for k, v in test.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.close(status)

    def close(self, status: str) -> None:
        self.writer.close()


def quiet_writer_threads() -> None:
    """TensorBoard writes its event file from a thread; when a write fails there (a read-only or full disk),
    Python prints the thread's traceback, and the writer raises the same error again at the next call from our
    code, which reports it in one line. Keep that traceback off the terminal (other threads' are printed as
    before)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)
    hook.quiets_tensorboard = True
    threading.excepthook = hook

"""Checkpoints and the run folder: the checkpoint format (written here, and only here), saving it atomically,
loading and validating it, rebuilding its model; the run folder's lock, metrics.csv and results.json.

A checkpoint is one dict, read with torch.load(path, weights_only=True) (tensors and plain containers only):
    format        2
    model         state_dict of the weights the optimizer trains (what --resume continues from)
    ema_model     (--ema only) state_dict of their moving average: what evaluation, best.pth's choice,
                  evaluate.py, predict.py and export.py use when it is there
    model_name, widths, num_classes, in_channels, image_size
                  what model.build_model needs to rebuild the net (model_name: ours, or a torchvision name)
    prep          how an image file becomes the model's input (folders.Prep.to_dict: squash, or the photo recipe's
                  crop; optional: older checkpoints squash)
    classes       the class names, index = label;  mean, std: per-channel normalization, [0, 1] pixel units
    data_hash     a fingerprint of the training images and labels: --resume refuses other data, whatever the
                  start (optional: older checkpoints have none)
    args          every train.py flag of the run (a dict; data_dir resolved)
    argv          the run's flags as given (a list of strings): what --resume parses again
    changes       [{"epoch", "step", "flags"}]: what each resume changed (config.TAKE_EFFECT_ON_RESUME), from
                  which step of which epoch (optional)
    run_id        random hex, the same in every checkpoint of one run: whose files a run folder holds
    run_folder    {"path", "device", "inode"}: the folder the checkpoint was saved in, whose copy, resumed, becomes a
                  run of its own (RunFolder.original_of_copy) (optional: older checkpoints have none)
    mlflow_run_id the MLflow run that records this run (--mlflow), else None: a resumed run goes on in it
                  (optional: checkpoints written before it was added have none)
    state         the run's progress (RunState), history included: one metrics.csv row per completed epoch
    partial_epoch the epoch in progress (EpochTally) in a checkpoint saved by Ctrl-C, else None
    optimizer, scaler, rng   what exact resume needs (scaler: fp16 only)
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import pickle
import secrets
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

import cli
from folders import Prep
from model import build_model, check_model_name, pretrained_start

FORMAT = 2
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_seconds", "images_per_s",
           "val_top5"]  # val_top5 (after the older columns, which keep their places): nan for 5 classes or fewer
OLD_METRICS = [m for m in METRICS if m != "val_top5"]  # the rows of checkpoints written before top-5
RUN_FILES = cli.RUN_FILE_NAMES  # (cli.check_output never lets a picture or a model replace one)
MAX_CLASSES = 100_000


class CheckpointError(cli.UserError):
    """A checkpoint that is missing, truncated, foreign, unsafe or holds what no run of train.py writes."""


class RunFolderError(cli.UserError):
    """A run folder that belongs to another run or process, or that cannot take the run's files."""


@dataclass
class RunState:
    """Where a run stands after its last completed epoch."""
    epoch: int = 0                  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0             # epochs since the last improvement (early stopping)
    train_seconds: float = 0.0
    history: list = field(default_factory=list)  # the metrics.csv rows, one dict per completed epoch


@dataclass
class EpochTally:
    """The epoch in progress: optimizer steps done and what they added up to."""
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# Saving

def save_checkpoint(ckpt: dict, *paths: Path) -> None:
    """Serialize once, then write each path atomically: a crash, a signal or a full disk leaves the old file or
    the new one, never half of one, and no temporary file."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    for path in paths:
        try:
            write_atomically(path, buffer.getbuffer())
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {cli.describe_os_error(e, filename=False)} (the previous "
                                  f"{path.name}, if any, is intact)") from None


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Temporary file, flushed to disk, renamed over `path`; the temporary file is removed on any failure.
    For the files of the locked run folder only; outputs the user names anywhere go through cli.write_output,
    whose temporary names are fresh. Here the name is fixed (`path`.tmp), so that what a SIGKILL leaves behind
    is the one file the next run in the folder clears (RunFolder.claim). Whatever is at that name (a stale
    temporary file, or a symlink or FIFO planted there) is removed, never opened through: the file is created anew,
    exclusively (O_EXCL), without following a symlink."""
    tmp = path.with_name(path.name + ".tmp")
    created = False
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or a signal: never leave the temporary file behind
        if created:
            with contextlib.suppress(OSError):  # (a cleanup that fails must not hide why the write failed)
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):  # name the file the user asked for, not our .tmp
            e.filename = str(path)
        raise


def checkpoint_bytes(model: nn.Module, copies: int) -> int:
    """About what a checkpoint takes: `copies` of the model's state (weights, optimizer moments, EMA) + 1 MiB."""
    return copies * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2**20


# ---------------------------------------------------------------------------------------------------------------
# Building: what train.py saves, and what it reads back on resume

def run_card(args: argparse.Namespace, argv: list[str], model: nn.Module, train, prep: Prep, classes: list[str],
             run_id: str, mlflow_run_id: str | None, changes: list[dict]) -> dict:
    """What every checkpoint of a run repeats: the model card, the flags, whose run it is, what resumes changed.
    `train`: the training set (a data.Split: its images' shape is the model's input, its normalization the
    model's); `prep`: how an image file becomes that input. args' data_dir is stored resolved, so that evaluate.py
    finds the data from any folder."""
    return {"format": FORMAT, "model_name": args.model, "widths": getattr(model, "widths", None),
            "num_classes": len(classes), "in_channels": train.channels, "image_size": train.image_size,
            "prep": prep.to_dict(), "classes": classes, "mean": train.mean.tolist(), "std": train.std.tolist(),
            "data_hash": train.fingerprint(),
            "args": {**vars(args), "data_dir": str(Path(args.data_dir).resolve())}, "argv": argv, "run_id": run_id,
            "mlflow_run_id": mlflow_run_id, "changes": changes}


def make_checkpoint(card: dict, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, state: RunState, tally: EpochTally | None) -> dict:
    """The checkpoint of the module docstring: the run's card, then what changes every step. Non-finite weights are
    refused (the files on disk keep the last finite ones)."""
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError("the weights or BatchNorm statistics are no longer finite; not saving them (try a "
                              "lower --lr or --grad-clip 1.0)")
    rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                              if torch.cuda.is_available() else {})}
    return {**card, "model": model.state_dict(), **({"ema_model": ema.state_dict()} if ema is not None else {}),
            "state": as_dict(state), "partial_epoch": as_dict(tally), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng}


def load_training_state(ckpt: dict, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler) -> None:
    """Weights, optimizer state, loss scaler and random number generators as the checkpoint left them. The
    optimizer's hyperparameters stay those it was built with: this run's flags (config.TAKE_EFFECT_ON_RESUME)."""
    load_weights(model, ckpt["model"])
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if ema is not None:
        load_weights(ema, ckpt.get("ema_model", {}))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, chosen in zip(optimizer.param_groups, hyperparameters):
            group.update(chosen)
        for p, moments in optimizer.state.items():  # torch checks the groups, not the shapes of the moments
            if any(m.dim() and m.shape != p.shape for m in moments.values() if isinstance(m, torch.Tensor)):
                raise ValueError("an optimizer moment does not have its parameter's shape")
        scaler.load_state_dict(ckpt.get("scaler", {}))
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except Exception as e:  # a crafted state fails in many ways; each is the same answer
        raise CheckpointError(f"--resume: the checkpoint's training state does not fit this run: "
                              f"{str(e).splitlines()[0][:200]}") from None


def starting_weights(args: argparse.Namespace) -> dict | None:
    """What --pretrained or --init-from start from, or None: {"model": state_dict, "num_classes", "in_channels",
    "mean", "std", "source"}, the middle four those the weights were trained with, "source" what they are (for
    the run's first lines). Read before the run folder is made: a missing, foreign or corrupt file writes nothing."""
    try:
        return pretrained_start(args.model) if args.pretrained else \
            init_weights(args.init_from, args.model) if args.init_from else None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def init_weights(path: str, model_name: str) -> dict:
    """What --init-from starts from: the checkpoint's weights (its EMA ones where it has them) and what they were
    trained with, as model.pretrained_start returns it."""
    ckpt = load_checkpoint(path)
    if ckpt["model_name"] != model_name:
        raise CheckpointError(f"--init-from {path} holds a {ckpt['model_name']}, not a {model_name}; give --model "
                              f"{ckpt['model_name']}")
    epoch = ckpt["state"]["epoch"] if isinstance(ckpt.get("state"), dict) else "?"
    return {"model": ckpt.get("ema_model", ckpt["model"]), "num_classes": ckpt["num_classes"],
            "in_channels": ckpt["in_channels"], "mean": ckpt["mean"], "std": ckpt["std"],
            "source": f"{path} ({ckpt['model_name']} after epoch {epoch}{', its EMA weights' * ('ema_model' in ckpt)})"}


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating: every reader goes through load_checkpoint, so nonsense is refused in one place

def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint (on the CPU). Never unpickles code: weights_only admits only tensors and
    plain containers; mmap maps the tensors from the file instead of allocating them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():  # a folder, or a FIFO (that torch.load would wait on forever)
        raise CheckpointError(f"cannot read checkpoint {path}: not a regular file; give the .pth file itself")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):  # a class or function: what code needs
            raise CheckpointError(f"cannot read checkpoint {path}: it holds Python objects other than tensors and "
                                  f"plain containers (a code payload?); refusing to load it") from None
        if isinstance(e, MemoryError) or any(s in str(e) for s in ("Cannot allocate memory", "can't allocate memory",
                                                                   "out of memory")):  # the system's, not the file's
            raise CheckpointError(f"cannot read checkpoint {path}: out of memory while mapping it "
                                  f"({path.stat().st_size / 2**20:,.1f} MiB); free some memory and try again") from None
        if isinstance(e, OSError) and e.errno is not None:  # no permission, an I/O error: the system's reason
            reason = cli.describe_os_error(e, filename=False)
            raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a .pth file, or truncated "
                              f"({type(e).__name__})") from None
    check_tensor_sizes(ckpt, path)
    if isinstance(ckpt, dict) and "training_model" in ckpt and "format" not in ckpt:  # format 1 (2026-11-24)
        ckpt = {**ckpt, "model": ckpt["training_model"], "ema_model": ckpt["model"]}
    validate(ckpt, path)
    return ckpt


def check_tensor_sizes(content: object, path: Path) -> None:
    """Refuse, before anything reads a tensor, one whose elements are more than its storage holds (an expanded,
    zero-stride tensor: a few bytes in the file, gigabytes once an operation materializes it) or reach past it, or
    a storage larger than the file. Each container is visited once, however often a crafted file refers to it."""
    file_size, seen, stack = path.stat().st_size, set(), [content]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set)):
            stack += x
        elif isinstance(x, torch.Tensor):
            storage, size = x.untyped_storage().nbytes(), x.element_size()
            reach = x.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) + 1
            if storage > file_size or x.numel() and (x.numel() * size > storage or reach * size > storage):
                raise CheckpointError(f"{path} holds a tensor of shape {cli.shorten(str(tuple(x.shape)), 100)} over a "
                                      f"storage of {storage:,} bytes (an expanded tensor, a crafted file?); refusing "
                                      f"it")


def validate(ckpt: object, path: Path) -> None:
    """Refuse, with the first problem found, what no run of train.py writes: wrong types, mismatched sizes,
    non-finite weights. Checks only plain fields and tensors, so a crafted nest of lists costs nothing."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path} is not a checkpoint of these scripts ({what})")

    need(isinstance(ckpt, dict), "not a dict")
    missing = [k for k in ("model", "model_name", "num_classes", "in_channels", "image_size", "classes", "mean",
                           "std") if k not in ckpt]
    need(not missing, f"missing {', '.join(missing)}")
    need(isinstance(ckpt["model_name"], str), "model_name must be a string")
    try:
        check_model_name(ckpt["model_name"])
    except ValueError:
        need(False, f"model_name {ckpt['model_name'][:100]!r} is neither one of our models nor a classification "
                    f"model of this torchvision")
    for key, low, high in (("num_classes", 2, MAX_CLASSES), ("in_channels", 1, 3), ("image_size", 8, 1024)):
        need(is_int(ckpt[key]) and low <= ckpt[key] <= high, f"{key} must be an integer in [{low}, {high}]")
    widths = ckpt.get("widths")
    need(widths is None or isinstance(widths, list) and len(widths) <= 8 and all(
        is_int(w) and 1 <= w <= 4096 for w in widths), "widths must be a short list of channel counts")
    classes, channels = ckpt["classes"], ckpt["in_channels"]
    need(isinstance(classes, list) and len(classes) == ckpt["num_classes"] and all(
        isinstance(c, str) for c in classes), "classes must be num_classes names")
    for key in ("mean", "std"):
        values = ckpt[key]
        need(isinstance(values, list) and len(values) == channels and all(
            isinstance(v, float) and math.isfinite(v) for v in values), f"{key} must be {channels} finite numbers")
    need(all(0 <= v <= 1 for v in ckpt["mean"]) and all(1e-3 <= v <= 1 for v in ckpt["std"]),
         "mean must be in [0, 1] and std in [1e-3, 1]: pixel units")
    try:
        Prep.from_dict(ckpt.get("prep"))
    except ValueError as e:
        need(False, str(e))
    for key in ("model", "ema_model"):
        if key in ckpt:
            weights = ckpt[key]
            need(isinstance(weights, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                   for k, t in weights.items()), f"{key} must map names to tensors")
            bad = next((k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()),
                       None)
            if bad is not None:
                raise CheckpointError(f"{path} holds non-finite weights ({key}: {bad}); it cannot be used")


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_for_resume(ckpt: dict, path: Path) -> tuple[RunState, EpochTally | None]:
    """The run state a resume continues from, checked field by field."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an older train.py: evaluate.py, predict.py and export.py "
                              f"read it, but it cannot be resumed")
    missing = [k for k in ("args", "run_id", "state", "partial_epoch", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it has no {', '.join(missing)}")
    state = typed(RunState, ckpt["state"], path)
    tally = None if ckpt["partial_epoch"] is None else typed(EpochTally, ckpt["partial_epoch"], path)
    rows_ok = len(state.history) == state.epoch and all(
        isinstance(r, dict) and list(r) in (METRICS, OLD_METRICS) and all(isinstance(v, (int, float))
                                                                          for v in r.values())
        for r in state.history)
    state.history = [{k: r.get(k, math.nan) for k in METRICS} for r in state.history] if rows_ok else state.history
    mlflow_run_id, changes = ckpt.get("mlflow_run_id"), ckpt.get("changes", [])
    changes_ok = isinstance(changes, list) and len(changes) <= 10_000 and all(
        isinstance(c, dict) and set(c) == {"epoch", "step", "flags"} and is_int(c["epoch"]) and is_int(c["step"])
        and isinstance(c["flags"], str) and len(c["flags"]) <= 1000 for c in changes)
    if not (rows_ok and changes_ok and isinstance(ckpt["args"], dict) and isinstance(ckpt["run_id"], str)
            and isinstance(ckpt["rng"], dict) and isinstance(ckpt["rng"].get("torch"), torch.Tensor)
            and (mlflow_run_id is None or isinstance(mlflow_run_id, str) and 0 < len(mlflow_run_id) <= 256
                 and mlflow_run_id.isprintable())):
        raise CheckpointError(f"{path} cannot be resumed: its history, changes, args, run_id, mlflow_run_id or rng "
                              f"state is malformed")
    return state, tally


def check_same_data(ckpt: dict, card: dict) -> None:
    """Refuse to resume a run on other data than its own: other classes, other normalization, or other images
    (the data_hash; checkpoints older than it are checked on the first two only)."""
    if (ckpt["classes"], ckpt["mean"], ckpt.get("data_hash", card["data_hash"])) != \
            (card["classes"], card["mean"], card["data_hash"]):
        raise CheckpointError("--resume: the training data differs from the checkpoint's (other images, classes or "
                              "--val-split; another --data-dir?): give --data-dir the run's own data, or start a new "
                              "run from these weights with --init-from")


def resume_state(ckpt: dict, path: Path, steps_per_epoch: int, epochs: int) -> tuple[RunState, EpochTally]:
    """Where a resumed run goes on: its RunState, and the epoch in progress (an empty EpochTally at an epoch's end),
    checked against the run's steps per epoch and --epochs."""
    state, tally = validate_for_resume(ckpt, path)
    tally = tally or EpochTally()
    if not (0 <= tally.step < steps_per_epoch and 0 <= state.epoch <= epochs):
        raise CheckpointError(f"--resume: {path} says step {tally.step} of epoch {state.epoch + 1}, which this run "
                              f"does not have ({steps_per_epoch} steps per epoch)")
    return state, tally


def typed(cls: type, values: object, path: Path):
    """A RunState or EpochTally from a checkpoint's dict, with every field of its declared type."""
    kinds = {int: (int,), float: (float, int), list: (list,)}
    names = [f.name for f in fields(cls)]
    if not (isinstance(values, dict) and list(values) == names and all(
            isinstance(values[f.name], kinds[f.type]) and not isinstance(values[f.name], bool) for f in fields(cls))):
        raise CheckpointError(f"{path} cannot be resumed: its {cls.__name__} is malformed")
    return cls(**values)


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the model a checkpoint describes, with the weights to use (the EMA ones where there are), in eval
    mode."""
    def build() -> nn.Module:
        return build_model(ckpt["model_name"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"],
                           ckpt.get("widths"))
    weights = ckpt.get("ema_model", ckpt["model"])
    try:
        with torch.device("meta"):  # shapes only, no memory: a small file must not make us allocate a huge net
            shapes = {k: tuple(t.shape) for k, t in build().state_dict().items()}
    except ValueError as e:
        raise CheckpointError(f"checkpoint does not match its model: {e}") from None
    except NotImplementedError:  # torchvision's RegNets compute their widths with tensors, which meta ones cannot;
        shapes = {k: tuple(t.shape) for k, t in weights.items()}  # their size is fixed by the name and num_classes
    if shapes != {k: tuple(t.shape) for k, t in weights.items()}:
        wrong = sorted(set(shapes) ^ set(weights) or {k for k in shapes if shapes[k] != tuple(weights[k].shape)})
        raise CheckpointError(f"checkpoint does not match its model: {cli.shorten(', '.join(wrong[:5]))} missing, "
                              f"extra or of another shape")
    model = build()
    load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, weights: dict) -> None:
    """model.load_state_dict, with a mismatch (missing, unexpected or misshapen tensors) as a CheckpointError."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch spreads the details over several lines: keep them, on one
        details = cli.one_line(e, 300)
        raise CheckpointError(f"checkpoint does not match its model: {details}") from None


# ---------------------------------------------------------------------------------------------------------------
# The run folder

def run_position(ckpt: dict) -> tuple[int, int]:
    """(epochs completed, steps into the next): how far the run of a checkpoint has come."""
    return ckpt["state"]["epoch"], (ckpt["partial_epoch"] or {}).get("step", 0)


class RunFolder:
    """A run's folder: last.pth, best.pth, metrics.csv, results.json (and curves.png). One process owns it for the
    run's life. Where the system has flock (Linux, macOS), by an exclusive lock on the folder itself: unlike a lock
    file, nothing in the folder can be deleted to take it away, and the kernel drops it when the process dies, so a
    lock left by a killed run is never in the way; the .lock file only names the owner's process id, for the message
    to the next run. Elsewhere (Windows), the .lock file is the lock: created exclusively, holding the owner's
    process id, and taken over once that process has gone. A folder that holds another run's files is never written
    to, and every save first checks that the path still names the folder locked (check_place): a folder moved or
    replaced while the run trains stops the run, and whatever is now at the old path is never written to."""

    # What a run writes into its folder: a folder that holds any of them (a user's own curves.png too) is not claimed
    FILES = (*RUN_FILES, "curves.png")

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id = path, run_id
        self.lock_fd, self.lock_file, self.identity = None, False, None
        self.created: list[Path] = []  # the folders lock() made (runs/ too, on a first run): release() may remove
        self.copied_from: Path | None = None  # claim(): the run folder this one is a copy of, if it is one

    def claim(self, resumed: dict | None, resumed_from: Path | None) -> None:
        """Lock the folder, then check, under the lock (so that two runs started at once cannot both pass), that
        it is empty of run files, or is the resumed checkpoint's own folder and not further on. Resuming into a
        new folder copies the run's best.pth and the resumed checkpoint (as last.pth) there, so that the folder
        holds the run whole and the final test finds best.pth."""
        self.lock()
        for name in RUN_FILES:  # what a SIGKILL in the middle of a save left behind (no live run holds the lock)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.path / (name + ".tmp")).unlink()
        found = [name for name in self.FILES if os.path.lexists(self.path / name)]
        own_folder = resumed_from is not None and resumed_from.parent.resolve() == self.path.resolve()
        if found and not own_folder:
            hint = (f"resume it with --resume {self.path / 'last.pth'} or " if "last.pth" in found and not resumed
                    else "resume into the checkpoint's own folder or " if resumed else "move them elsewhere or ")
            raise RunFolderError(f"{self.path} already holds run files ({', '.join(found)}); {hint}give --out-dir "
                                 f"a new folder")
        if own_folder and (self.path / "last.pth").exists():
            try:
                theirs = load_checkpoint(self.path / "last.pth")
                validate_for_resume(theirs, self.path / "last.pth")
            except CheckpointError:
                theirs = {}
            if theirs.get("run_id") != self.run_id:
                raise RunFolderError(f"{self.path / 'last.pth'} belongs to another run; resume from it, or give "
                                     f"--out-dir a new folder")
            if run_position(theirs) > run_position(resumed):
                raise RunFolderError(f"resuming here would rewind the run: {self.path / 'last.pth'} is further on "
                                     f"(epoch {run_position(theirs)[0]}); resume from it, or give --out-dir a new "
                                     f"folder")
        if resumed is not None and not own_folder:
            best = resumed_from.parent / "best.pth"
            if not best.is_file() or load_checkpoint(best).get("run_id") != self.run_id:
                raise RunFolderError(f"resuming into a new folder needs the run's best.pth next to "
                                     f"{resumed_from.name}; {best} is missing or belongs to another run")
            write_atomically(self.path / "best.pth", best.read_bytes())
            write_atomically(self.path / "last.pth", resumed_from.read_bytes())
        if resumed is not None:
            self.split_from_original(resumed, resumed_from.parent)

    def split_from_original(self, resumed: dict, source: Path) -> None:
        """A copy of a run folder (`source`, which holds the resumed checkpoint), resumed, becomes a run of its own:
        a new run_id (and so, in train.py, its own MLflow run), said in one line."""
        self.copied_from = self.original_of_copy(resumed, folder_identity(source))
        if self.copied_from is not None:  # its checkpoints name another run: from here on they name its own
            self.run_id = secrets.token_hex(8)
            print(f"note: {source} is a copy of the run in {self.copied_from}: resuming it as a run of its own (run "
                  f"id {self.run_id}; with --mlflow, its own MLflow run), the original left as it is",
                  file=sys.stderr, flush=True)

    def lock(self) -> None:
        self.created = cli.new_folders(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.identity = folder_identity(self.path)
        except OSError as e:
            raise RunFolderError(f"cannot write to {self.path}: {cli.describe_os_error(e, filename=False)}") from None
        try:
            import fcntl  # POSIX only: imported here, so that the scripts run where it is missing (Windows)
        except ImportError:
            fcntl = None
        if fcntl is None or not hasattr(os, "O_DIRECTORY"):
            self.lock_with_file()
        else:
            self.lock_with_flock(fcntl)

    def lock_with_flock(self, fcntl: ModuleType) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise RunFolderError(f"cannot write to {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.busy(read_lock_file(self.path / ".lock")[0]) from None
        try:
            read_lock_file(self.path / ".lock")  # whatever is there must be a regular file (a FIFO would block)
        except BaseException:
            os.close(fd)
            raise
        self.lock_fd = fd
        try:
            with os.fdopen(open_lock_file(self.path / ".lock", os.O_CREAT), "w") as f:
                f.truncate()
                f.write(str(os.getpid()))
        except BaseException:
            self.release()
            raise

    def lock_with_file(self) -> None:
        """The lock where there is no flock: .lock created exclusively (O_EXCL: of two runs started at once, one
        creates it), holding this process's id; a .lock whose process has gone (a killed run) is taken over."""
        lock = self.path / ".lock"
        for attempt in range(2):
            try:
                fd = open_lock_file(lock, os.O_CREAT | os.O_EXCL)
                break
            except FileExistsError:
                owner, _ = read_lock_file(lock)
                if attempt or not owner.isdigit() or process_alive(int(owner)):
                    raise self.busy(owner, lock_file=True) from None
                if read_lock_file(lock)[0] == owner:  # still the killed run's (not another's that took it over)
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
        self.lock_file = True
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def busy(self, owner: str, lock_file: bool = False) -> RunFolderError:
        process = f" (process {owner})" if owner.isdigit() else ""
        stale = f"; if no run is using it, delete {self.path / '.lock'}" if lock_file and not process else ""
        return RunFolderError(f"{self.path} is in use by another run{process}; wait for it to end, or choose "
                              f"another --out-dir{stale}")

    def release(self) -> None:
        """Unlock; a folder this run created and left empty (it failed before writing) is removed. A folder moved
        away is left as it is: what is at its old path now is not this run's."""
        if self.lock_fd is None and not self.lock_file:
            return
        in_place = self.in_place()
        if in_place:
            (self.path / ".lock").unlink(missing_ok=True)  # before unlocking: the next owner writes its own
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        self.lock_fd, self.lock_file = None, False
        if in_place:  # (a folder moved away is not this run's to remove)
            cli.remove_empty(self.created)

    def in_place(self) -> bool:
        """Whether the path still names the folder this run locked (not moved, renamed, deleted or replaced)."""
        try:
            return folder_identity(self.path) == self.identity
        except OSError:
            return False

    def check_place(self) -> None:
        """Before every save: a RunFolderError if the folder is no longer at its path, naming where it is now
        (where the system can tell)."""
        if self.in_place():
            return
        where = self.where_now()
        now = (f"; its files are now in {where}: resume with --resume {Path(where) / 'last.pth'}" if where
               else "; it was deleted" if where == "" else "")
        raise RunFolderError(f"the run folder {self.path} was moved, renamed, deleted or replaced while the run "
                             f"trained; stopped, so that nothing is written to whatever is at that path now{now}")

    def where_now(self) -> str | None:
        """The folder's path now ("" if deleted), from the file descriptor that locks it; None where unknown."""
        if self.lock_fd is None:
            return None
        with contextlib.suppress(OSError, ImportError, AttributeError):
            if sys.platform == "darwin":
                import fcntl
                return os.fsdecode(fcntl.fcntl(self.lock_fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
            target = os.readlink(f"/proc/self/fd/{self.lock_fd}")
            return "" if target.endswith(" (deleted)") else target
        return None

    def save(self, ckpt: dict, *names: str) -> None:
        """save_checkpoint into the folder, after checking it is still in place; the checkpoint records the folder
        (`run_folder`: its path and identity), so that a copy of the folder knows it is one (original_of_copy)."""
        self.check_place()
        device, inode = self.identity
        ckpt["run_folder"] = {"path": str(self.path.resolve()), "device": device, "inode": inode}
        save_checkpoint(ckpt, *(self.path / name for name in names))

    @staticmethod
    def original_of_copy(resumed: dict, source: tuple[int, int]) -> Path | None:
        """The run folder that the folder of identity `source`, which holds the resumed checkpoint, is a copy of,
        or None: the checkpoint was saved in another folder, which is still there. (A folder moved, or copied and
        the original deleted, is the run's one folder: the same run.)"""
        record = resumed.get("run_folder")
        if not (isinstance(record, dict) and isinstance(record.get("path"), str) and is_int(record.get("device"))
                and is_int(record.get("inode"))) or (record["device"], record["inode"]) == source:
            return None
        try:
            original = folder_identity(Path(record["path"])) == (record["device"], record["inode"])
        except (OSError, ValueError):
            return None
        return Path(record["path"]) if original else None

    def check_space(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> None:
        """Room for the checkpoints at their largest: the old best.pth and last.pth, and the new one's temp file."""
        moments = {"SGD": 1, "Muon": 1}.get(type(optimizer).__name__, 2)  # per weight: momentum, or Adam's two
        need = 3 * checkpoint_bytes(model, 1 + moments + (ema is not None))
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise RunFolderError(f"not enough free space in {self.path}: the checkpoints need up to "
                                 f"{need / 2**20:.0f} MiB at once, {free / 2**20:.0f} MiB free")

    def write_metrics(self, history: list[dict], changes: list[dict]) -> None:
        """metrics.csv from the whole history, after every epoch (a few hundred bytes each): never read back, so
        on resume it is rebuilt from the checkpoint, and a run that fails in epoch 1 leaves no run file. Its last
        column, `changed`, says which flags a resume changed in that epoch, from which step."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, [*METRICS, "changed"], lineterminator="\n")
        writer.writeheader()
        for row in history:
            changed = "; ".join(f"{c['flags']} from step {c['step']}" for c in changes if c["epoch"] == row["epoch"])
            writer.writerow({**row, "changed": changed})
        self.check_place()
        write_atomically(self.path / "metrics.csv", text.getvalue().encode())

    def write_args(self, flags: dict) -> None:
        """args.json: the run's resolved flags (config.run_flags), what `train.py --config` takes back."""
        write_atomically(self.path / "args.json", (json.dumps(flags, indent=2) + "\n").encode())

    def write_results(self, text: str) -> None:
        self.check_place()
        write_atomically(self.path / "results.json", text.encode())


def folder_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of a folder: what names it, whatever its path (a copy has its own, a move keeps it)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def open_lock_file(path: Path, flags: int) -> int:
    """The .lock file opened for writing without following a symlink or waiting on a FIFO (O_NOFOLLOW, O_NONBLOCK
    where the system has them), and checked to be a regular file."""
    fd = os.open(path, os.O_WRONLY | flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file; delete it and try again")
    return fd


def read_lock_file(path: Path) -> tuple[str, bool]:
    """(the process id a .lock names, or "", whether it exists). Never blocks nor follows a symlink: a FIFO, a
    device or a folder there is refused in one line (RunFolderError)."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return "", False
    except OSError:
        return "", True
    if not stat.S_ISREG(status.st_mode):
        kind = "a symlink" if stat.S_ISLNK(status.st_mode) else cli.kind_of_file(status.st_mode)
        raise RunFolderError(f"{path} is {kind}, not the run's lock file; delete it and try again")
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))) as f:
            return f.read(20).strip(), True
    except (OSError, UnicodeDecodeError):
        return "", True  # (deleted meanwhile, or garbage)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a .lock's owner). Windows: os.kill would end it, so ask the
    system through OpenProcess; it lives while its exit code is STILL_ACTIVE (259)."""
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def as_dict(state: RunState | EpochTally | None) -> dict | None:
    return None if state is None else asdict(state)

"""Checkpoints: the checkpoint format (written here, and only here), saving it atomically, loading and validating
it, rebuilding its model. The run folder that holds them, its lock, metrics.csv and results.json: runfolder.py.

A checkpoint is one dict, read with torch.load(path, weights_only=True) (tensors and plain containers only):
    format        2
    model         state_dict of the weights the optimizer trains (what --resume continues from)
    ema_model     (--ema only) state_dict of their moving average: what evaluation, best.pth's choice,
                  evaluate.py, predict.py and export.py use when it is there
    model_name, widths, num_classes, in_channels, image_size
                  what model.build_model needs to rebuild the net (model_name: ours, or a torchvision name)
    prep          how an image file becomes the model's input (decode.Prep.to_dict: squash, or the photo recipe's
                  crop; optional: older checkpoints squash)
    classes       the class names, index = label;  mean, std: per-channel normalization, [0, 1] pixel units
    data_hash     a fingerprint of the training images and labels: --resume refuses other data, whatever the
                  start (optional: older checkpoints have none)
    args          every train.py flag of the run (a dict; data_dir resolved)
    argv          the run's flags as given (a list of strings): what --resume parses again
    changes       [{"epoch", "step", "flags"}]: what each resume changed in what is trained
                  (runargs.changes_on_resume), from which step of which epoch (optional)
    run_id        random hex, the same in every checkpoint of one run: whose files a run folder holds
    run_folder    {"path", "device", "inode"}: the folder the checkpoint was saved in, whose copy, resumed, becomes a
                  run of its own (runfolder.RunFolder.original_of_copy) (optional: older checkpoints have none)
    mlflow_run_id the MLflow run that records this run (--mlflow), else None: a resumed run goes on in it
                  (optional: checkpoints written before it was added have none)
    state         the run's progress (RunState), history included: one metrics.csv row per completed epoch
    partial_epoch the epoch in progress (EpochTally) in a checkpoint saved by Ctrl-C, else None
    optimizer, scaler, rng   what exact resume needs (scaler: fp16 only): in last.pth alone. best.pth holds the rest,
                  what evaluate.py, predict.py, export.py and --init-from read (the optimizer's state would double
                  or triple its size), and is refused by --resume (for_inference)
"""
import argparse
import contextlib
import io
import math
import os
import pickle
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

import cli
from decode import Prep
from model import EVAL_BATCH, build_model, check_model_name, pretrained_start
from torchfiles import oversized_tensor

FORMAT = 2
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_seconds", "images_per_s",
           "val_top5"]  # val_top5 (after the older columns, which keep their places): nan for 5 classes or fewer
OLD_METRICS = [m for m in METRICS if m != "val_top5"]  # the rows of checkpoints written before top-5
RUN_FILES = cli.RUN_FILE_NAMES  # (cli.check_output never lets a picture or a model replace one)
MAX_CLASSES = 100_000


class CheckpointError(cli.UserError):
    """A checkpoint that is missing, truncated, foreign, unsafe or holds what no run of train.py writes."""


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
    skipped: int = 0  # streamed files that could not be read (older checkpoints: not recorded, 0)


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
    is the one file the next run in the folder clears (runfolder.RunFolder.claim). Whatever is at that name (a stale
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
            "args": {**vars(args), "data_dir": cli.resolved(args.data_dir)}, "argv": argv, "run_id": run_id,
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


RESUME_ONLY = ("optimizer", "scaler", "rng")  # what best.pth leaves out


def for_inference(ckpt: dict) -> dict:
    """best.pth's checkpoint: `ckpt` without what only resuming needs (RESUME_ONLY)."""
    return {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}


def load_training_state(ckpt: dict, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler) -> None:
    """Weights, optimizer state, loss scaler and random number generators as the checkpoint left them. The
    optimizer's hyperparameters stay those it was built with: this run's flags (runargs.TAKE_EFFECT_ON_RESUME)."""
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
    "mean", "std", "source"}, the middle four those the weights were trained with (--init-from's: "image_size"
    too), "source" what they are (for the run's first lines). Read before the run folder is made: a missing,
    foreign or corrupt file writes nothing."""
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
        raise CheckpointError(f"--init-from {path} holds {ckpt['model_name']} weights, not {model_name}'s; give "
                              f"--model {ckpt['model_name']}")
    epoch = ckpt["state"]["epoch"] if isinstance(ckpt.get("state"), dict) else "?"
    ema = ", its EMA weights" if "ema_model" in ckpt else ""
    return {"model": ckpt.get("ema_model", ckpt["model"]), "num_classes": ckpt["num_classes"],
            "in_channels": ckpt["in_channels"], "mean": ckpt["mean"], "std": ckpt["std"],
            "image_size": ckpt["image_size"], "source": f"{path} ({ckpt['model_name']} after epoch {epoch}{ema})"}


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating: every reader goes through load_checkpoint, so nonsense is refused in one place

def checkpoint_path(given: str, doing: str) -> Path:
    """--checkpoint of evaluate.py and predict.py: a .pth, or a run folder, whose best.pth is taken and said so on
    stderr ("RUN is a folder: <doing> its best.pth")."""
    path = Path(given)
    if not path.is_dir():
        return path
    if not (path / "best.pth").is_file():
        raise CheckpointError(f"{path} is a folder without a best.pth; give --checkpoint a .pth file (a run folder "
                              f"holds best.pth once its first epoch has ended)")
    print(f"{path} is a folder: {doing} its best.pth", file=sys.stderr)
    return path / "best.pth"


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint (on the CPU). Never unpickles code: weights_only admits only tensors and
    plain containers; mmap maps the tensors from the file instead of allocating them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():  # a folder, or a FIFO (that torch.load would wait on forever)
        raise CheckpointError(f"cannot read checkpoint {path}: not a regular file; give the .pth file itself")
    try:
        with cli.c_openable(path) as name:  # (a run folder whose name is not UTF-8 too)
            ckpt = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
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
    problem = oversized_tensor(ckpt, path)
    if problem is not None:
        raise CheckpointError(problem)
    if isinstance(ckpt, dict) and "training_model" in ckpt and "format" not in ckpt:  # format 1 (2026-11-24)
        ckpt = {**ckpt, "model": ckpt["training_model"], "ema_model": ckpt["model"]}
    validate(ckpt, path)
    return ckpt


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
        Prep.from_dict(ckpt.get("prep"), ckpt["image_size"])  # (the rule --resize-mode's flags are checked by)
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
    if missing and set(missing) <= set(RESUME_ONLY):  # a best.pth (for_inference)
        raise CheckpointError(f"{path} cannot be resumed: it holds the best weights, for evaluate.py, predict.py, "
                              f"export.py and --init-from, without the optimizer's state; resume from the run's "
                              f"last.pth ({path.with_name('last.pth')})")
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
    if cls is EpochTally and isinstance(values, dict) and list(values) == names[:-1]:  # (from before "skipped")
        values = {**values, "skipped": 0}
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


def as_dict(state: RunState | EpochTally | None) -> dict | None:
    return None if state is None else asdict(state)


def run_batch_size(run_args: dict) -> int:
    """The batch a run validated and tested with (--eval-batch-size, else --batch-size), or model.EVAL_BATCH for a
    checkpoint that does not say."""
    batch = run_args.get("eval_batch_size") or run_args.get("batch_size")
    return batch if isinstance(batch, int) and 1 <= batch <= 2**31 else EVAL_BATCH

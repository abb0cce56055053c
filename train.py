"""Train an image classifier on CIFAR-10, MNIST, Fashion-MNIST or your own image folders.

    python train.py                                 # the seed recipe: SimpleCNN, Adam 1e-3, batch 32, 5 epochs
    python train.py --preset fast                   # the AirNet recipe sized for a laptop CPU (README: results)
    python train.py --dataset fashion-mnist --epochs 10 --augment --scheduler cosine
    python train.py --model resnet18 --pretrained --image-size 64   # fine-tune torchvision's ImageNet weights
    python train.py --list-models                   # ours, then every torchvision classification model
    python train.py --resume runs/cifar10-simplecnn-20261123-120000/last.pth   # go on where it stopped
    python train.py --preset fast --mlflow --tensorboard   # also record the run (README: Watching a run)
    python train.py --find-lr                       # the lr range test: draws find-lr.png, prints a suggested --lr
    torchrun --nproc_per_node 2 train.py ...        # data-parallel (DDP); --batch-size stays the global batch

Each epoch prints one line and adds it to <out-dir>/metrics.csv; <out-dir>/last.pth is written every epoch
and <out-dir>/best.pth whenever the validation loss improves. At the end best.pth is evaluated once on the test
set and <out-dir>/results.json is written (and curves.png drawn, when matplotlib is installed). On a terminal a live
line shows each epoch's progress (--log-interval). Ctrl-C (or SIGTERM) stops at the next optimizer step, saves a
last.pth that resumes mid-epoch, and prints the command that resumes it. The README says which flags --resume
lets you change.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads (~1.5 s), so that an early Ctrl-C exits quietly too

import argparse
import copy
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import plot
import runtime
import tracking
from checkpoint import (FORMAT, CheckpointError, EpochTally, RunFolder, RunState, as_dict, checkpoint_bytes,
                        load_checkpoint, load_weights, model_from_checkpoint, save_checkpoint, torchvision_weights,
                        validate_for_resume)
from data import DATASETS, ImageSet, epoch_plan, prepare
from model import (AUX_PREFIXES, MODELS, TTA_MODES, AirNet, ResNet9, build_model, check_model_name, evaluate,
                   find_head, fit_first_conv, pretrained_stats, pretrained_weights, replace_head, torchvision_models)
from muon import Muon

# Named recipes. A preset replaces the defaults; flags given on the command line still win.
PRESETS = {
    "seed": {},  # the parser's defaults: the seed guide's SimpleCNN, Adam 1e-3, batch 32, 5 epochs, no augmentation
    "fast": {    # AirNet sized for a 2-core CPU; measured in the README
        "model": "airnet", "widths": (32, 192, 192),  # channels of the three stages: 1.07M parameters
        "epochs": 11, "batch_size": 512,  # 512 images per step keep 2 CPU cores as busy as 1024 do, in 2x the steps
        "optimizer": "muon", "muon_lr": 0.2, "muon_momentum": 0.6,  # conv filters: orthogonalized steps (muon.py)
        "lr": 0.75, "momentum": 0.85, "nesterov": True,  # the head and BN shifts: SGD; lr for the batch-mean loss
        "weight_decay": 1.33e-3,          # per unit of lr: each step shrinks the weights by lr x 1.33e-3
        "bias_lr_scale": 64,              # BatchNorm shifts learn 64x faster (AirNet fixes the BN scales)
        "scheduler": "linear", "warmup_epochs": 2,  # one cycle: 0 -> 0.75 over 2 epochs, then linearly to 0
        "label_smoothing": 0.2, "augment": True, "crop_pad": 2, "alt_flip": True,  # shifts of <= 2 px
        "val_split": 0.0, "tta": "shifts", "amp": "bf16",  # all 50,000 images train; 6-view TTA at test
    },
}


class TrainError(cli.UserError):
    """A run that cannot start or go on: a mismatched resume, a model that cannot take the data, a diverged loss."""


@dataclass
class Trainer:
    """What an optimizer step needs, built once by build_trainer()."""
    model: nn.Module              # the plain model: checkpoints, EMA and evaluation use it
    step_model: nn.Module         # what a step calls: the model, or it wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; disabled (a pass-through) otherwise
    autocast: ContextManager      # the forward pass's precision (--amp)
    ema: nn.Module | None         # the moving average of the weights (--ema)
    stop: runtime.StopSignal      # Ctrl-C / SIGTERM, noted; acted on between optimizer steps
    steps_per_epoch: int
    frozen: list[nn.Module] = field(default_factory=list)  # --freeze-backbone: modules kept in eval mode


# ---------------------------------------------------------------------------------------------------------------
# Training: one epoch, step by step

def train_one_epoch(t: Trainer, data: ImageSet, args: argparse.Namespace, epoch: int, tally: EpochTally) -> bool:
    """Train epoch `epoch` from optimizer step tally.step on (0 unless resuming mid-epoch), adding loss, correct
    count and seconds to `tally`. Returns False when a signal stopped it, at a step boundary."""
    t.step_model.train()
    for m in t.frozen:
        m.eval()
    rank, world = runtime.rank_world()
    device = data.labels.device
    plan = epoch_plan(len(data), args.seed, epoch, device, args.crop_pad, args.alt_flip)  # sample, dy, dx, flip
    group_size = args.batch_size * args.accum_steps  # one group = one optimizer step, over all processes
    samples, crop_flips = plan[:, 0].contiguous().split(group_size), plan[:, 1:].contiguous().split(group_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    runtime.sync(device)
    start = time.perf_counter()
    total_steps, warmup_steps = args.epochs * t.steps_per_epoch, round(args.warmup_epochs * t.steps_per_epoch)
    progress = Progress.for_run(args, epoch, len(data), t.steps_per_epoch, tally) if rank == 0 else None
    for group, crop_flip in zip(samples[tally.step:], crop_flips[tally.step:]):
        if t.stop.requested():
            break
        step = (epoch - 1) * t.steps_per_epoch + tally.step  # over the whole run: the lr schedule's clock
        for g in t.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, total_steps, warmup_steps, args.scheduler)
        # Every process takes its share of the group and cuts it into the same number of micro-batches, so all
        # of them join the same gradient all-reduce (a share may be empty at the very end of an epoch).
        n_micro = math.ceil(len(group) / args.batch_size)
        micro_batches = zip(group.tensor_split(world)[rank].tensor_split(n_micro),
                            crop_flip.tensor_split(world)[rank].tensor_split(n_micro))

        t.optimizer.zero_grad(set_to_none=True)                                     # 1. zero the gradients
        for i, (rows, crops) in enumerate(micro_batches):
            x, y = data.batch(rows, crops if args.augment else None, args.crop_pad)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # DDP all-reduces the gradients in backward; only the last micro-batch of a group needs that
            with t.step_model.no_sync() if world > 1 and i < n_micro - 1 else nullcontext():
                with t.autocast:
                    logits = t.step_model(x)                                        # 2. forward
                loss = F.cross_entropy(logits.float(), y, reduction="sum",          # 3. loss
                                       label_smoothing=args.label_smoothing)
                # The micro-batch's sum over the whole group's size: the accumulated gradient is the group's
                # mean, so K micro-batches step exactly like one batch, short last group included. (x world:
                # DDP averages the processes' gradients, and each process holds 1/world of the sum.)
                t.scaler.scale(loss * (world / len(group))).backward()              # 4. backward
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        t.scaler.unscale_(t.optimizer)  # (fp16) clip the true gradient, not the scaled one
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(t.model.parameters(), args.grad_clip)
        t.scaler.step(t.optimizer)                                                  # 5. step
        t.scaler.update()
        if t.ema is not None:
            ema_update(t.ema, t.model, ema_decay(args.ema, step + 1))
        tally.step += 1
        if progress and tally.step % progress.interval == 0:  # (reads the sums: a GPU sync every N steps only)
            progress.show(tally.step, loss_sum, correct)
    if progress:
        progress.clear()
    runtime.sync(device)
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
    tally.seconds += time.perf_counter() - start
    tally.loss_sum += loss_sum.item()
    tally.correct += int(correct.item())
    return tally.step == len(samples)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based) of `total_steps`: a linear warm-up, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - progress
    if kind == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, for the weights and the BatchNorm statistics alike."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.lerp_(m, 1 - decay)
        else:
            e.copy_(m)  # BatchNorm's num_batches_tracked


def ema_decay(decay: float, step: int) -> float:
    """Lower decay for the first steps, so the average is not stuck on the random initial weights."""
    return min(decay, (1 + step) / (10 + step))


def make_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device,
                   num_classes: int) -> torch.optim.Optimizer:
    # The fused kernels compute the same update as the default loop, in one call per step instead of ~10 per
    # parameter tensor: for a small model that is a large share of the step.
    kw = {"lr": args.lr, "weight_decay": args.weight_decay, "fused": device.type in ("cpu", "cuda")}
    # BatchNorm shifts may take larger steps (--bias-lr-scale); their weight decay is divided by the same factor,
    # so that the decay per step, lr x weight decay, stays that of every other weight.
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    trainable = [p for p in model.parameters() if p.requires_grad]  # AirNet freezes its whitening and BN scales
    matrices = set()
    if args.optimizer == "muon":  # conv filters and hidden linear layers; the classifier stays with SGD
        head = {id(p) for p in model.get_submodule(find_head(model, num_classes)).parameters()}
        matrices = {id(p) for p in trainable if p.dim() >= 2 and id(p) not in head}
    scale = args.bias_lr_scale
    groups = [{"params": [p for p in trainable if id(p) not in shifts | matrices]},  # first: metrics.csv's lr
              {"params": [p for p in trainable if id(p) in matrices], "lr": args.muon_lr,
               "momentum": args.muon_momentum, "nesterov": True, "orthogonalize": True},
              {"params": [p for p in trainable if id(p) in shifts], "lr": args.lr * scale,
               "weight_decay": args.weight_decay / scale}]
    groups = [g for g in groups if g["params"]]
    if args.optimizer == "muon":
        optimizer = Muon(groups, momentum=args.momentum, nesterov=args.nesterov, orthogonalize=False,
                         lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=args.momentum, nesterov=args.nesterov, **kw)
    else:
        optimizer = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(groups, **kw)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # the schedule multiplies this (the key torch's lr schedulers use)
    return optimizer


# ---------------------------------------------------------------------------------------------------------------
# The run: set up, train epoch after epoch, test best.pth once

def run(args: argparse.Namespace, resumed: dict | None, argv: list[str], start: dict | None = None) -> dict:
    """`argv`: the run's flags as a command line (the checkpoint keeps it, and the resume command repeats it);
    `start`: the weights to start from (starting_weights)."""
    device = runtime.pick_device(args.device, runtime.start_processes(args.device))
    runtime.autocast(args.amp, device)  # now: refuses --amp the device does not have
    rank, world = runtime.rank_world()
    if device.type == "cpu":
        # Numbers below 1e-38 as 0: CPUs compute with such denormals 10-100x slower, and Adam's squared gradients
        # of a barely-trained layer land there (bench.py --loop-cost: its step took 5x as long)
        torch.set_flush_denormal(True)
    folder = RunFolder(out_dir_for(args), resumed["run_id"] if resumed else secrets.token_hex(8))
    try:
        if rank == 0:  # first: a second run into the same folder is refused before any work
            folder.claim(resumed, Path(args.resume) if resumed else None)
        return train_and_test(args, resumed, argv, device, folder, start)
    finally:
        folder.release()


def out_dir_for(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if args.resume:
        return Path(args.resume).parent
    name = f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():  # the processes may start in different seconds: take rank 0's name
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    return Path("runs") / name


def train_and_test(args: argparse.Namespace, resumed: dict | None, argv: list[str], device: torch.device,
                   folder: RunFolder, start: dict | None) -> dict:
    rank, world = runtime.rank_world()
    torch.manual_seed(args.seed)
    # Loaded weights were trained on inputs normalized their way: keep it (a resumed run: the run's own)
    stats = ((start["mean"], start["std"]) if start else (resumed["mean"], resumed["std"])
             if resumed and (args.pretrained or args.init_from) else None)
    train, val, test, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                        image_size=args.image_size, stats=stats)
    if device.type == "cpu":  # only now: the loader's temporary copies have gone back to the OS
        runtime.keep_freed_memory()
    if args.patience and val is None:
        raise TrainError("--patience needs a validation set: --val-split above 0, or a val/ folder")
    if resumed and (resumed["mean"] != train.mean.tolist() or resumed["classes"] != classes):
        raise TrainError("--resume: the data differs from the checkpoint's (another --data-dir?)")
    t = build_trainer(args, train, len(classes), device, resumed, start)
    state, tally = RunState(), EpochTally()
    if resumed:
        state, tally = validate_for_resume(resumed, Path(args.resume))
        tally = tally or EpochTally()
        if not (0 <= tally.step < t.steps_per_epoch and 0 <= state.epoch <= args.epochs):
            raise TrainError(f"--resume: {args.resume} says step {tally.step} of epoch {state.epoch + 1}, which "
                             f"this run does not have ({t.steps_per_epoch} steps per epoch)")
        load_training_state(t, resumed)
    if rank == 0:
        moments = {"sgd": 1, "muon": 1, "adam": 2, "adamw": 2}[args.optimizer] + (args.ema > 0)
        folder.check_space(3 * checkpoint_bytes(t.model, 1 + moments))  # old best + old last + the new temp file
        if resumed:
            at = f"step {tally.step} of epoch {state.epoch + 1}" if tally.step else f"the end of epoch {state.epoch}"
            print(f"resumed from {args.resume} at {at}")
        trained = sum(p.numel() for p in t.model.parameters() if p.requires_grad) if args.freeze_backbone else None
        print(f"{args.dataset}: {len(train)} train, {len(val) if val else 0} val, {len(test)} test images on "
              f"{device} x {world}; {args.model} with {sum(p.numel() for p in t.model.parameters()):,} "
              f"parameters{f' ({trained:,} trained)' if trained else ''}; writing to {folder.path}", flush=True)
    mlflow_run_id = resumed.get("mlflow_run_id") if resumed else None
    trackers = []  # --mlflow, --tensorboard (rank 0)
    if rank == 0:
        trackers = tracking.start(args, folder.path, state.history, mlflow_run_id, train.images[:32].cpu())
        mlflow_run_id = next((k.run_id for k in trackers if isinstance(k, tracking.MlflowTracker)), mlflow_run_id)
    # What every checkpoint of this run repeats: the model card, the flags, whose run it is
    card = {"format": FORMAT, "model_name": args.model, "widths": getattr(t.model, "widths", None),
            "num_classes": len(classes), "in_channels": train.images.shape[1], "image_size": train.images.shape[2],
            "classes": classes, "mean": train.mean.tolist(), "std": train.std.tolist(), "args": vars(args),
            "argv": argv, "run_id": folder.run_id, "mlflow_run_id": mlflow_run_id}
    ended, results = "FAILED", None  # how the trackers record the run's end
    try:
        stopped_early = fit(t, args, train, val, folder, card, state, tally, trackers)
        results = test_unless_stopped(t, args, test, classes, state, stopped_early, folder, device)
        ended = "FINISHED"
        return results
    except SystemExit:  # a signal: the run stopped, resumable
        ended = "KILLED"
        raise
    finally:
        if rank == 0:  # also when stopped early or by Ctrl-C
            draw_curves(state.history, folder.path / "curves.png", quiet=ended == "FAILED")
            files = ["results.json", "metrics.csv", "curves.png", *(["best.pth", "last.pth"]
                                                                     if args.mlflow_log_checkpoints else [])]
            tracking.end(trackers, ended, [folder.path / name for name in files], results)


def test_unless_stopped(t: Trainer, args: argparse.Namespace, test: ImageSet, classes: list[str], state: RunState,
                        stopped_early: bool, folder: RunFolder, device: torch.device) -> dict:
    rank, world = runtime.rank_world()
    try:
        if t.stop.signum:  # noted after the last optimizer step, during the last validation or save
            raise cli.Interrupted(t.stop.signum)
        return final_test(args, test, classes, state, stopped_early, folder, device)
    except cli.Interrupted:
        if rank == 0:
            print(f"training finished ({state.epoch} epochs, best.pth from epoch {state.best_epoch}); the final "
                  f"test was interrupted. Run it with:\n  python evaluate.py --checkpoint {folder.path / 'best.pth'}",
                  file=sys.stderr)
        raise


def draw_curves(history: list[dict], path: Path, quiet: bool) -> None:
    """curves.png of the epochs so far, when matplotlib is installed: the one picture drawn without a flag.
    quiet: the run failed, and its error is the one line to print."""
    if not history:
        return
    try:
        plot.require_matplotlib()
    except plot.PlotError:
        return  # not installed: training never needs it
    try:
        plot.plot_curves({c: [row[c] for row in history] for c in plot.CURVES}, path)
    except plot.PlotError as e:
        if not quiet:
            print(f"warning: {path.name} not drawn: {e}", file=sys.stderr)


def fit(t: Trainer, args: argparse.Namespace, train: ImageSet, val: ImageSet | None, folder: RunFolder,
        card: dict, state: RunState, tally: EpochTally, trackers: list) -> bool:
    """Train epoch after epoch from state.epoch + 1, validating and saving after each. Returns True when early
    stopping ended the run; a signal ends it with a mid-epoch last.pth and the command that resumes it."""
    rank, world = runtime.rank_world()
    if args.patience and state.bad_epochs >= args.patience:  # a resumed run that had already stopped early
        return True
    with t.stop.deferred():
        for epoch in range(state.epoch + 1, args.epochs + 1):
            if not train_one_epoch(t, train, args, epoch, tally):
                if rank == 0:
                    save_checkpoint(make_checkpoint(t, card, state, tally), folder.path / "last.pth")
                    print(f"stopped at step {tally.step} of epoch {epoch}; saved {folder.path / 'last.pth'}. Resume "
                          f"with:\n  {resume_command(card['argv'], folder.path / 'last.pth')}", file=sys.stderr)
                if world > 1:
                    dist.barrier()  # no process leaves (and makes torchrun stop the others) before the save is done
                raise SystemExit(128 + t.stop.signum)
            row, improved = end_of_epoch(t, args, train, val, card, state, tally, epoch)
            tally = EpochTally()
            if rank == 0:
                save_checkpoint(make_checkpoint(t, card, state, None), folder.path / "last.pth",
                                *([folder.path / "best.pth"] if improved else []))
                folder.write_metrics(state.history)
                print(format_epoch(row, args.epochs), flush=True)
                tracking.log_epoch(trackers, row)
            if args.patience and state.bad_epochs >= args.patience:
                if rank == 0:
                    print(f"early stop: no validation improvement for {args.patience} epochs")
                return True
    return False


def end_of_epoch(t: Trainer, args: argparse.Namespace, train: ImageSet, val: ImageSet | None, card: dict,
                 state: RunState, tally: EpochTally, epoch: int) -> tuple[dict, bool]:
    """Validate, update the run state, and return the epoch's metrics row and whether it is the best so far."""
    n = len(train)
    row = {"epoch": epoch, "train_loss": tally.loss_sum / n, "train_acc": 100.0 * tally.correct / n,
           "val_loss": math.nan, "val_acc": math.nan, "lr": t.optimizer.param_groups[0]["lr"],
           "train_seconds": tally.seconds, "images_per_s": n / tally.seconds}
    if not math.isfinite(row["train_loss"]):
        raise TrainError(f"the training loss became {row['train_loss']} in epoch {epoch}; try a lower --lr or "
                         f"--grad-clip 1.0 (the checkpoints keep the last finite weights)")
    if val is not None:
        with t.autocast:
            result = evaluate(t.ema if t.ema is not None else t.model, val, card["num_classes"])
        row.update(val_loss=result["loss"], val_acc=result["accuracy"])
    improved = val is None or row["val_loss"] < state.best_val_loss - args.min_delta
    if improved:
        state.best_val_loss, state.best_epoch, state.bad_epochs = row["val_loss"] if val else math.inf, epoch, 0
    else:
        state.bad_epochs += 1
    state.epoch, state.train_seconds = epoch, state.train_seconds + tally.seconds
    state.history.append(row)
    return row, improved


def final_test(args: argparse.Namespace, test: ImageSet, classes: list[str], state: RunState, stopped_early: bool,
               folder: RunFolder, device: torch.device) -> dict:
    """Evaluate best.pth once on the test set and write results.json."""
    rank, world = runtime.rank_world()
    if world > 1:
        dist.barrier()  # best.pth is written by rank 0
    best = model_from_checkpoint(load_checkpoint(folder.path / "best.pth")).to(device)
    if args.channels_last:
        best = best.to(memory_format=torch.channels_last)
    with runtime.autocast(args.amp, device):  # the test runs in the precision the model trained in
        result = evaluate(best, test, len(classes), tta=args.tta)
    results = {"test_accuracy": result["accuracy"], "test_loss": result["loss"], "best_epoch": state.best_epoch,
               "epochs_completed": state.epoch, "stopped_early": stopped_early,
               "train_seconds": state.train_seconds}
    if rank == 0:
        folder.write_results(json.dumps(results, indent=2) + "\n")
        tta = "" if args.tta == "none" else f" and {args.tta} TTA"
        print(f"test accuracy {result['accuracy']:.2f}% (loss {result['loss']:.4f}) with best.pth from epoch "
              f"{state.best_epoch}{tta}; results in {folder.path / 'results.json'}")
    if world > 1:
        dist.barrier()  # all processes leave together: gloo aborts a process whose peer is already gone
    return results


def build_trainer(args: argparse.Namespace, train: ImageSet, num_classes: int, device: torch.device,
                  resumed: dict | None, start: dict | None = None) -> Trainer:
    _, in_channels, image_size, _ = train.images.shape
    try:
        if start is None:
            model = build_model(args.model, num_classes, in_channels, image_size, args.widths)
        else:
            model = model_from_start(args, start, num_classes, in_channels, image_size)
        frozen = freeze_backbone(model, num_classes) if args.freeze_backbone else []
    except ValueError as e:  # a model that cannot take this image size
        raise TrainError(str(e)) from None
    model = model.to(device)
    if args.model not in MODELS:
        check_image_size(model, args.model, train)
    if isinstance(model, AirNet) and resumed is None and start is None:  # (else its whitening comes with the weights)
        model.init_whitening(train.batch(torch.arange(min(len(train), 5000), device=device))[0])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = model
    if dist.is_initialized():
        step_model = nn.parallel.DistributedDataParallel(model,
                                                         device_ids=[device.index] if device.type == "cuda" else None)
    return Trainer(model=model, step_model=torch.compile(step_model) if args.compile else step_model,
                   optimizer=make_optimizer(model, args, device, num_classes),
                   scaler=torch.amp.GradScaler("cuda", enabled=args.amp == "fp16"),
                   autocast=runtime.autocast(args.amp, device), ema=copy.deepcopy(model) if args.ema else None,
                   stop=runtime.StopSignal(),
                   steps_per_epoch=math.ceil(len(train) / (args.batch_size * args.accum_steps)), frozen=frozen)


# ---------------------------------------------------------------------------------------------------------------
# Starting from learned weights: --pretrained (torchvision's), --init-from (a checkpoint of train.py)

def starting_weights(args: argparse.Namespace) -> dict | None:
    """What --pretrained or --init-from start from: {"model": state_dict, "num_classes", "in_channels", "mean",
    "std"}, the last four those the weights were trained with. Read before the run folder is made: a missing,
    foreign or corrupt file writes nothing."""
    if args.pretrained:
        try:
            weights = pretrained_weights(args.model)
        except ValueError as e:
            raise TrainError(str(e)) from None
        state = {k: v for k, v in torchvision_weights(weights).items() if not k.startswith(AUX_PREFIXES)}
        mean, std = pretrained_stats(args.model, weights)
        return {"model": state, "num_classes": len(weights.meta["categories"]), "in_channels": 3, "mean": mean,
                "std": std}
    if args.init_from:
        ckpt = load_checkpoint(args.init_from)
        if ckpt["model_name"] != args.model:
            raise TrainError(f"--init-from {args.init_from} holds a {ckpt['model_name']}, not a {args.model}; give "
                             f"--model {ckpt['model_name']}")
        return {"model": ckpt.get("ema_model", ckpt["model"]), "num_classes": ckpt["num_classes"],
                "in_channels": ckpt["in_channels"], "mean": ckpt["mean"], "std": ckpt["std"]}
    return None


def model_from_start(args: argparse.Namespace, start: dict, num_classes: int, in_channels: int,
                     image_size: int) -> nn.Module:
    """The model with the weights it starts from, then fitted to this data: pretrained RGB filters to its channels,
    a new classifier where the number of classes differs."""
    if args.init_from and start["in_channels"] != in_channels:
        raise TrainError(f"--init-from {args.init_from} was trained on {start['in_channels']}-channel images; "
                         f"{args.dataset} has {in_channels}-channel images")
    model = build_model(args.model, start["num_classes"], start["in_channels"], image_size, args.widths)
    try:
        load_weights(model, start["model"])
    except CheckpointError as e:
        raise TrainError(f"{'--pretrained' if args.pretrained else '--init-from ' + args.init_from}: the weights do "
                         f"not fit {args.model} (another --widths?): {e}") from None
    fit_first_conv(model, in_channels)
    if start["num_classes"] != num_classes:
        replace_head(model, start["num_classes"], num_classes)
    return model


def freeze_backbone(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Let only the classifier learn. Returns the other modules, which training keeps in eval mode, so that their
    BatchNorm statistics stay as loaded too (and their dropout is off: the features are fixed)."""
    head = find_head(model, num_classes)
    model.requires_grad_(False)
    model.get_submodule(head).requires_grad_(True)
    return [m for name, m in model.named_modules()
            if not (name == head or name.startswith(head + ".") or any(True for _ in m.children()))]


@torch.no_grad()
def check_image_size(model: nn.Module, name: str, train: ImageSet) -> None:
    """A torchvision model says at its first forward pass which image sizes it cannot take: try one image."""
    model.eval()
    try:
        model(train.batch(torch.arange(1, device=train.labels.device))[0])
    except Exception as e:  # a kernel larger than what is left of the image, a ViT's fixed size, ...
        size = "x".join(map(str, train.images.shape[1:]))
        raise TrainError(f"{name} cannot take {size} images ({str(e).splitlines()[0][:200]}); try a "
                         f"larger --image-size") from None


def load_training_state(t: Trainer, ckpt: dict) -> None:
    """Weights, optimizer, loss scaler and random number generators as the checkpoint left them."""
    load_weights(t.model, ckpt["model"])
    if t.ema is not None:
        load_weights(t.ema, ckpt.get("ema_model", {}))
    try:
        t.optimizer.load_state_dict(ckpt["optimizer"])
        for p, moments in t.optimizer.state.items():  # torch checks the groups, not the shapes of the moments
            if any(m.dim() and m.shape != p.shape for m in moments.values() if isinstance(m, torch.Tensor)):
                raise ValueError("an optimizer moment does not have its parameter's shape")
        t.scaler.load_state_dict(ckpt.get("scaler", {}))
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except Exception as e:  # a crafted state fails in many ways; each is the same answer
        raise TrainError(f"--resume: the checkpoint's training state does not fit this run: "
                         f"{str(e).splitlines()[0][:200]}") from None


def make_checkpoint(t: Trainer, card: dict, state: RunState, tally: EpochTally | None) -> dict:
    """The checkpoint format of checkpoint.py's docstring: the run's card, then what changes every step."""
    if not all(torch.isfinite(p).all() for p in t.model.parameters()):
        raise TrainError("the weights are no longer finite; not saving them (try a lower --lr or --grad-clip)")
    rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                              if torch.cuda.is_available() else {})}
    return {**card, "model": t.model.state_dict(), **({"ema_model": t.ema.state_dict()} if t.ema is not None else {}),
            "state": as_dict(state), "partial_epoch": as_dict(tally), "optimizer": t.optimizer.state_dict(),
            "scaler": t.scaler.state_dict(), "rng": rng}


def format_epoch(row: dict, epochs: int) -> str:
    val = "no val" if math.isnan(row["val_loss"]) else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%"
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:6.2f}%  {val}  lr {row['lr']:.2e}  {row['train_seconds']:.1f}s  "
            f"{row['images_per_s']:,.0f} img/s")


class Progress:
    """The --log-interval line inside an epoch: step, the epoch's running loss and accuracy, images/s and the
    epoch's ETA. On a terminal it is one live line, rewritten in place and cleared before the epoch line; when
    stdout is not a terminal (a log file) it is a plain line each time, and only when --log-interval is given."""

    def __init__(self, interval: int, live: bool, args: argparse.Namespace, epoch: int, n: int, steps: int,
                 tally: EpochTally):
        self.interval, self.live, self.epoch, self.epochs = interval, live, epoch, args.epochs
        self.n, self.steps, self.group = n, steps, args.batch_size * args.accum_steps
        self.tally, self.first_step, self.start = tally, tally.step, time.perf_counter()

    @classmethod
    def for_run(cls, args: argparse.Namespace, epoch: int, n: int, steps: int,
                tally: EpochTally) -> "Progress | None":
        live = sys.stdout.isatty()
        interval = args.log_interval
        if interval is None:  # auto: on a terminal only, 20 updates per epoch (1-2 s apart for --preset fast)
            interval = math.ceil(steps / 20) if live else 0
        return cls(interval, live, args, epoch, n, steps, tally) if interval else None

    def show(self, step: int, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """`loss_sum`, `correct`: this process's sums since the epoch (or the resume) began, on the device."""
        world = runtime.rank_world()[1]  # (under torchrun, rank 0's share stands for all: an estimate)
        loss_sum, correct = loss_sum.item() * world, correct.item() * world  # the one sync, every N steps
        seconds = time.perf_counter() - self.start
        seen, before = min(step * self.group, self.n), min(self.first_step * self.group, self.n)
        eta = round(seconds / (step - self.first_step) * (self.steps - step))
        line = (f"epoch {self.epoch:>{len(str(self.epochs))}}/{self.epochs}  step {step:>{len(str(self.steps))}}/"
                f"{self.steps}  loss {(self.tally.loss_sum + loss_sum) / seen:.4f} "
                f"acc {100 * (self.tally.correct + correct) / seen:6.2f}%  {(seen - before) / seconds:,.0f} img/s  "
                f"ETA {eta // 60}:{eta % 60:02d}")
        if self.live:  # \r: back to the line's start; ESC[K: erase what a longer line left
            sys.stdout.write("\r" + line[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def clear(self) -> None:
        if self.live:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


def resume_command(argv: list[str], path: Path) -> str:
    """The command line that continues this run: its flags, with --resume pointing at `path`."""
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if dist.is_initialized() \
        else ["python"]
    return shlex.join([*launcher, "train.py", *argv, "--resume", str(path)])


# ---------------------------------------------------------------------------------------------------------------
# The learning-rate range test (--find-lr)

def find_lr(args: argparse.Namespace) -> float:
    """Train a fresh model for --find-lr-steps optimizer steps, the lr rising exponentially from --find-lr-start
    to --find-lr-end, until the loss explodes; draw the loss against the lr to <out-dir>/find-lr.png and return
    the suggested --lr: a tenth of the lr where the smoothed loss was lowest. Writes no checkpoint and no run file,
    and takes no lock, so it can draw into a run's folder without touching the run."""
    device = runtime.pick_device(args.device)
    if device.type == "cpu":  # as run() does
        runtime.keep_freed_memory()
        torch.set_flush_denormal(True)
    path = out_dir_for(args) / "find-lr.png"
    created = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        plot.check_output(path)
        torch.manual_seed(args.seed)
        train, _, _, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                       image_size=args.image_size)
        t = build_trainer(args, train, len(classes), device, resumed=None)
        lrs, losses = lr_range_test(t, train, args)
        smoothed = smooth(losses)
        best = min(range(len(smoothed)), key=smoothed.__getitem__)
        suggestion = lrs[best] / 10
        plot.plot_lr_range(lrs[:len(losses)], losses, smoothed, suggestion, path)
    except BaseException:
        if created and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()  # failed before drawing: leave no empty folder
        raise
    why = "the loss exploded" if len(losses) < len(lrs) else "the last lr"
    print(f"lr range test: {len(losses)} steps of {args.batch_size * args.accum_steps} images from lr "
          f"{lrs[0]:.2g} until {why} ({lrs[len(losses) - 1]:.2g}); smoothed loss lowest ({smoothed[best]:.3f}) at lr "
          f"{lrs[best]:.2g}; drawn to {path}\nsuggested --lr (a tenth of that):\n{suggestion:.2g}")
    return float(f"{suggestion:.2g}")


def lr_range_test(t: Trainer, data: ImageSet, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """The lrs of the test, and each step's loss until the smoothed loss passes 4x its lowest (or is not finite).
    The steps are those of training (its batches, augmentation, optimizer, precision), with the lr set per step;
    --bias-lr-scale keeps its ratio."""
    start, end, steps = args.find_lr_start, args.find_lr_end, args.find_lr_steps
    lrs = [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]
    group_size = args.batch_size * args.accum_steps
    epochs = (epoch_plan(len(data), args.seed, epoch, data.labels.device, args.crop_pad, args.alt_flip)
              for epoch in range(1, 10_001))
    groups = (group for plan in epochs for group in plan.split(group_size))  # as many epochs as the steps need
    losses = []
    t.step_model.train()
    for lr, group in zip(lrs, groups):
        for g in t.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr / args.lr
        t.optimizer.zero_grad(set_to_none=True)                                 # 1. zero the gradients
        loss_sum = 0.0
        for part in group.tensor_split(math.ceil(len(group) / args.batch_size)):
            x, y = data.batch(part[:, 0], part[:, 1:] if args.augment else None, args.crop_pad)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with t.autocast:
                logits = t.step_model(x)                                        # 2. forward
            loss = F.cross_entropy(logits.float(), y, reduction="sum",          # 3. loss
                                   label_smoothing=args.label_smoothing)
            t.scaler.scale(loss / len(group)).backward()                        # 4. backward
            loss_sum += loss.item()  # (a sync per step: this is a 100-step test, not training)
        t.scaler.step(t.optimizer)                                              # 5. step
        t.scaler.update()
        losses.append(loss_sum / len(group))
        smoothed = smooth(losses)
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * min(smoothed):
            break
    return lrs, losses


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average of the losses, bias-corrected (the first values are not pulled toward 0)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command line

def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("train.py", __doc__)
    add = p.add_argument
    add("--preset", default="seed", choices=sorted(PRESETS), help="a named recipe; flags override it (default: seed)")
    add("--dataset", default="cifar10", choices=DATASETS, help="(default: cifar10)")
    add("--data-dir", default="./data", metavar="DIR", help="where datasets are found or downloaded (default: ./data)")
    add("--image-size", type=int, metavar="PX", help="side images are resized to, once, into the in-memory dataset "
        "(default: the dataset's own: 32 for CIFAR, 28 for MNIST; 32 for imagefolder)")
    add("--model", default="simplecnn", metavar="NAME",
        help="simplecnn, resnet9, airnet, or any torchvision classification model by its name (resnet18, "
             "mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...); --list-models lists them (default: simplecnn)")
    add("--list-models", action=ListModels, help="print the names --model takes, and exit")
    add("--widths", type=widths_list, metavar="A,B,...",
        help="channels per stage: four for resnet9 (default: %s), three for airnet (default: %s)"
             % tuple(",".join(map(str, m.DEFAULT_WIDTHS)) for m in (ResNet9, AirNet)))
    add("--pretrained", action="store_true",
        help="start from torchvision's default weights for --model (from torch's cache, $TORCH_HOME/hub/checkpoints, "
             "or downloaded there), with a new classifier")
    add("--init-from", metavar="PATH", help="start from the weights of a train.py checkpoint of the same --model "
        "(a new classifier where the classes differ)")
    add("--freeze-backbone", action="store_true",
        help="with --pretrained or --init-from: train the classifier only; the rest, BatchNorm statistics included, "
             "keeps its loaded weights")
    add("--epochs", type=int, default=5, metavar="N", help="(default: 5)")
    add("--batch-size", type=int, default=32, metavar="N",
        help="images per forward pass, over all processes under torchrun (default: 32)")
    add("--accum-steps", type=int, default=1, metavar="K",
        help="forward passes per optimizer step; the update equals one batch of N*K images (default: 1)")
    add("--lr", type=float, default=1e-3, metavar="LR", help="peak learning rate (default: 1e-3)")
    add("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "muon"],
        help="muon: Muon for conv filters and hidden linear layers (--muon-lr, --muon-momentum), SGD for the rest "
             "(--lr, --momentum, --nesterov) (default: adam)")
    add("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    add("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    add("--muon-lr", type=float, default=0.2, metavar="LR",
        help="Muon's peak lr: each step moves a filter by LR x a matrix whose singular values are ~1 (default: 0.2)")
    add("--muon-momentum", type=float, default=0.6, metavar="M", help="Muon's (Nesterov) momentum (default: 0.6)")
    add("--weight-decay", type=float, default=0.0, metavar="WD",
        help="L2 penalty; with sgd each step shrinks the weights by lr x WD (default: 0)")
    add("--bias-lr-scale", type=float, default=1.0, metavar="S",
        help="BatchNorm shifts learn with S x the lr (their weight decay / S, the same decay per step) (default: 1)")
    add("--scheduler", default="none", choices=["none", "step", "cosine", "linear"],
        help="lr schedule over all steps after warm-up: step = x0.1 at 50%% and 75%%, cosine or linear "
             "decay to 0 (default: none)")
    add("--warmup-epochs", type=float, default=0.0, metavar="E",
        help="ramp the lr linearly from 0 over the first E epochs (default: 0)")
    add("--label-smoothing", type=float, default=0.0, metavar="S", help="(default: 0)")
    add("--ema", type=float, default=0.0, metavar="DECAY",
        help="evaluate and save an exponential moving average of the weights, updated every step, 0 = off "
             "(default: 0)")
    add("--grad-clip", type=float, default=0.0, metavar="NORM", help="max global gradient norm, 0 = off (default: 0)")
    add("--patience", type=int, default=0, metavar="N",
        help="stop after N epochs without validation-loss improvement, 0 = off (default: 0)")
    add("--min-delta", type=float, default=0.0, metavar="D",
        help="smallest drop in validation loss that counts as improvement (default: 0)")
    add("--val-split", type=float, default=0.1, metavar="F",
        help="fraction of the training set held out for validation, 0 = none (default: 0.1)")
    add("--augment", action="store_true", help="random crop (from an image padded by mirroring) and horizontal flip")
    add("--crop-pad", type=int, default=4, metavar="PX", help="--augment's crops shift images by up to PX pixels "
        "(default: 4)")
    add("--alt-flip", action="store_true", help="--augment flips each image in every other epoch, not at random")
    add("--tta", nargs="?", const="mirror", default="none", choices=TTA_MODES,
        help="final test: average the logits over the image and its mirror image (--tta or --tta mirror), and "
             "also over 1-pixel shifts of both (--tta shifts, 3x the cost) (default: none)")
    add("--seed", type=int, default=0, metavar="S", help="seeds init, split, order and augmentation (default: 0)")
    runtime.add_device_flag(p)
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory layout: same math, faster convolutions on CPU and tensor-core GPUs (default: on)")
    add("--amp", default="off", choices=runtime.AMP_MODES,
        help="mixed precision: bf16 on CUDA or a CPU with bf16 units, fp16 on CUDA (default: off)")
    add("--compile", action="store_true", help="torch.compile the model (pays off on GPUs, for long runs)")
    add("--log-interval", type=int, metavar="N",
        help="every N optimizer steps, a line with the epoch's running loss and accuracy, images/s and ETA; "
             "0 = off (default: on a terminal, one live line updated 20 times per epoch; none in a log)")
    # (--no-mlflow and the like: a resumed run may turn them off)
    add("--mlflow", action=argparse.BooleanOptionalAction, default=False,
        help="record the run in MLflow: MLFLOW_TRACKING_URI, else sqlite:///<out-dir's parent>/mlflow.db "
             "(runs/mlflow.db); open it with mlflow ui --backend-store-uri sqlite:///runs/mlflow.db (default: off)")
    add("--mlflow-log-checkpoints", action=argparse.BooleanOptionalAction, default=False,
        help="--mlflow also keeps best.pth and last.pth as artifacts at the end (they can be large) (default: off)")
    add("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
        help="write TensorBoard event files to <out-dir>/tensorboard (tensorboard --logdir runs) (default: off)")
    add("--find-lr", action="store_true",
        help="instead of training: the learning-rate range test from a fresh model; draws <out-dir>/find-lr.png "
             "and prints the suggested --lr on the last line (no checkpoint, no run files; needs matplotlib)")
    add("--find-lr-start", type=float, default=1e-6, metavar="LR", help="--find-lr's first lr (default: 1e-6)")
    add("--find-lr-end", type=float, default=10.0, metavar="LR",
        help="--find-lr's last lr, reached unless the loss explodes first (default: 10)")
    add("--find-lr-steps", type=int, default=100, metavar="N",
        help="--find-lr's optimizer steps, the lr rising exponentially (default: 100)")
    add("--out-dir", metavar="DIR", help="(default: runs/<dataset>-<model>-<date-time>, or the --resume folder)")
    add("--resume", metavar="PATH", help="continue exactly from a last.pth; flags not given are the run's own "
        "(README: which flags may change)")
    return p


class ListModels(argparse.Action):
    """--list-models: print every name --model takes, one per line (ours first), and exit."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join([*MODELS, *torchvision_models()]))
        parser.exit()


def widths_list(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or len(widths) > 8 or not all(1 <= w <= 4096 for w in widths):
        raise argparse.ArgumentTypeError(f"expected channel counts in [1, 4096] like 64,128,128, got {text!r}")
    return widths


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a message, or None."""
    def number_in(x, low, high):
        return math.isfinite(x) and low <= x < high
    rules = [
        (1 <= args.epochs <= 10_000, "--epochs must be in [1, 10000]"),  # epoch_plan's seeds are distinct to 10,000
        (1 <= args.batch_size <= 2**31, "--batch-size must be in [1, 2**31]"),
        (1 <= args.accum_steps <= 2**20, "--accum-steps must be in [1, 2**20]"),
        (math.isfinite(args.lr) and args.lr > 0, "--lr must be a positive number"),
        (number_in(args.momentum, 0, 1), "--momentum must be in [0, 1)"),
        (math.isfinite(args.muon_lr) and args.muon_lr > 0, "--muon-lr must be a positive number"),
        (number_in(args.muon_momentum, 0, 1), "--muon-momentum must be in [0, 1)"),
        (number_in(args.weight_decay, 0, math.inf), "--weight-decay must be >= 0"),
        (math.isfinite(args.bias_lr_scale) and args.bias_lr_scale > 0, "--bias-lr-scale must be a positive number"),
        (number_in(args.warmup_epochs, 0, args.epochs), "--warmup-epochs must be >= 0 and below --epochs"),
        (number_in(args.label_smoothing, 0, 1), "--label-smoothing must be in [0, 1)"),
        (number_in(args.ema, 0, 1), "--ema must be in [0, 1) (0 = off)"),
        (number_in(args.grad_clip, 0, math.inf), "--grad-clip must be >= 0 (0 = off)"),
        (args.patience >= 0, "--patience must be >= 0 (0 = off)"),
        (number_in(args.min_delta, 0, math.inf), "--min-delta must be >= 0"),
        (number_in(args.val_split, 0, 1), "--val-split must be in [0, 1)"),
        (args.image_size is None or 8 <= args.image_size <= 1024, "--image-size must be in [8, 1024]"),
        (0 <= args.crop_pad <= 7, "--crop-pad must be in [0, 7]"),  # mirroring needs a pad below the image side
        (0 <= args.seed < 2**48, "--seed must be in [0, 2**48)"),
        (args.log_interval is None or args.log_interval >= 0, "--log-interval must be >= 0 (0 = off)"),
        (all(p != "" for p in (args.out_dir, args.resume, args.data_dir, args.init_from)),
         "--out-dir, --resume, --data-dir and --init-from must not be empty"),
        (not args.nesterov or args.optimizer in ("sgd", "muon") and args.momentum > 0,
         "--nesterov needs sgd or muon, and --momentum above 0"),
        (not (args.pretrained and args.init_from), "--pretrained and --init-from both choose the starting weights: "
                                                   "give one of them"),
        (not args.freeze_backbone or args.pretrained or args.init_from,
         "--freeze-backbone needs --pretrained or --init-from: it trains the classifier on top of loaded weights"),
        (args.mlflow or not args.mlflow_log_checkpoints, "--mlflow-log-checkpoints needs --mlflow"),
        (0 < args.find_lr_start < args.find_lr_end < math.inf, "--find-lr-start and --find-lr-end must be "
                                                               "positive, the start below the end"),
        (10 <= args.find_lr_steps <= 10_000, "--find-lr-steps must be in [10, 10000]"),
        (not args.find_lr or not (args.mlflow or args.tensorboard or os.environ.get("WORLD_SIZE", "1") != "1"),
         "--find-lr runs in one process and records nothing: not with --mlflow, --tensorboard or torchrun"),
    ]
    problem = next((message for ok, message in rules if not ok), None)
    try:
        check_model_name(args.model)
    except ValueError as e:
        problem = problem or str(e)
    return problem


# What --resume lets change (README: "Resuming: what may change"); every other flag given must equal the run's.
MAY_CHANGE_ON_RESUME = {"epochs", "patience", "min_delta", "device", "channels_last", "compile", "tta", "data_dir",
                        "out_dir", "resume", "log_interval", "mlflow", "mlflow_log_checkpoints", "tensorboard"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])  # so that explicit flags override the preset
    return parser.parse_args(argv)


def given_flags(argv: list[str]) -> set[str]:
    """The flags (as argparse dests) given on the command line, as opposed to defaulted."""
    unset = object()
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parse_args([]))})
    build_parser().parse_args(argv, namespace=namespace)  # argparse leaves attributes that are already set alone
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def without_resume(argv: list[str]) -> list[str]:
    return [a for i, a in enumerate(argv) if not (a == "--resume" or a.startswith("--resume=")
                                                  or i and argv[i - 1] == "--resume")]


def resume_args(argv: list[str], args: argparse.Namespace, ckpt: dict) -> tuple[argparse.Namespace, list[str]]:
    """The resumed run's flags: the checkpoint's, then those given now. A flag given now must equal the run's,
    unless it is one MAY_CHANGE_ON_RESUME; --epochs may rise but not fall below the epochs already done."""
    saved_argv = ckpt.get("argv")
    if not (isinstance(saved_argv, list) and len(saved_argv) < 10_000 and all(isinstance(a, str) for a in saved_argv)):
        raise TrainError(f"--resume: {args.resume} holds no command line to resume (written by an older train.py?)")
    try:
        saved = parse_args(saved_argv)
    except SystemExit as e:
        raise TrainError(f"--resume: the checkpoint's own flags do not parse: {e.code}") from None
    for dest in sorted(given_flags(argv) - MAY_CHANGE_ON_RESUME):
        if getattr(args, dest) != getattr(saved, dest):
            flag = "--" + dest.replace("_", "-")
            raise TrainError(f"--resume: the run was trained with {flag} {getattr(saved, dest)}, not "
                             f"{getattr(args, dest)}; {flag} cannot change on resume (README: what may change)")
    done = ckpt["state"]["epoch"]  # (validated by checkpoint.validate_for_resume)
    for dest in given_flags(argv) & MAY_CHANGE_ON_RESUME:
        setattr(saved, dest, getattr(args, dest))
    if saved.epochs < done:
        raise TrainError(f"--resume: the run has already done {done} epochs; --epochs {saved.epochs} is fewer")
    saved.out_dir, saved.resume = args.out_dir, args.resume  # (not the saved run's: its folder is the default)
    return saved, without_resume(saved_argv) + without_resume(argv)


def main(argv: list[str] | None = None) -> dict | float:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with cli.one_line_errors("train.py", "lower --batch-size (--accum-steps keeps the update the same)"):
            args = parse_args(argv)
            resumed, run_argv = None, without_resume(argv)
            if args.find_lr and args.resume:
                raise TrainError("--find-lr starts from a fresh model; it cannot --resume a run")
            if args.resume:
                resumed = load_checkpoint(args.resume)
                validate_for_resume(resumed, Path(args.resume))  # now, not after the data has loaded
                args, run_argv = resume_args(argv, args, resumed)
            problem = check_args(args)
            if problem:
                raise TrainError(problem)
            tracking.require(args)  # a missing package: one line, before any work
            if args.find_lr:
                plot.require_matplotlib()
                return find_lr(args)
            start = None if resumed else starting_weights(args)  # (a resumed run has its weights)
            return run(args, resumed, run_argv, start)
    finally:
        if dist.is_initialized():
            runtime.leave_processes()


if __name__ == "__main__":
    main()

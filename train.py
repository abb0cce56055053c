"""Train an image classifier on CIFAR-10/100, MNIST, Fashion-MNIST or your own image folders.

    python train.py                                 # the seed recipe: SimpleCNN, Adam 1e-3, batch 32, 5 epochs
    python train.py --preset fast                   # AirNet + Muon, sized for a laptop CPU (README: results)
    python train.py --dataset fashion-mnist --augment --scheduler cosine
    python train.py --model resnet18 --pretrained --image-size 64   # fine-tune torchvision's ImageNet weights
    python train.py --list-models                   # ours, then every torchvision classification model
    python train.py --resume runs/cifar10-simplecnn-20261123-120000/last.pth   # go on where it stopped
    python train.py --preset fast --mlflow --tensorboard   # also record the run (README: watching a run)
    torchrun --nproc_per_node 2 train.py ...        # data-parallel (DDP); --batch-size stays the global batch

Each epoch prints a line and adds it to <out-dir>/metrics.csv, writes last.pth, and best.pth when the validation
loss improves; at the end best.pth is tested once (results.json, curves.png). Ctrl-C saves a last.pth that resumes
mid-epoch and prints the command. The flags are in config.py (--help shows them in groups).
"""
# Read on in order: the five steps (train_one_epoch), the epochs (validate, save, stop early), the run.
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads (~1.5 s), so that an early Ctrl-C exits quietly too

import argparse
import copy
import json
import math
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import config
import report
import runtime
from augment import Mix, MixedBatches, image_policy
from checkpoint import (EpochTally, RunState, check_same_data, load_checkpoint, load_training_state, make_checkpoint,
                        model_from_checkpoint, resume_state, run_card, starting_weights)
from data import ImageSet, Split, balanced_class_weights, epoch_plan, images_per_epoch, prepare
from model import MEASURES, MODELS, AirNet, build_model, check_image_size, evaluate, freeze_backbone, model_from_start
from optim import ema_decay, ema_update, lr_factor, make_optimizer
from runfolder import RunFolder

# ---------------------------------------------------------------------------------------------------------------
# One epoch: the five steps. This function needs only torch, nn and F: copy it into another project as it is.

def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, steps,
                    scaler: torch.amp.GradScaler | None = None, autocast: torch.autocast | None = None,
                    grad_clip: float = 0.0, label_smoothing: float = 0.0, after_step=None,
                    class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step per item of `steps`, at the lr the optimizer holds: the loop never sets it (step any
    torch lr scheduler between calls). A step: (its micro-batches [(x, y), ...], moved to the model's device if
    elsewhere; the images in the whole step over all processes); y: class indices, or (N, classes) probabilities
    (mixup, cutmix). From a DataLoader, one batch per step:

        model.train()
        loss_sum, correct = train_one_epoch(model, optimizer, (([(x, y)], len(x)) for x, y in loader))

    Optional: `scaler`, a GradScaler for fp16; `autocast`, the forward pass's precision (e.g. torch.autocast("cpu",
    torch.bfloat16)); clipping; label smoothing; `after_step(loss_sum, correct)`, run after each step;
    `class_weights`, each class's weight in the loss. Returns this process's summed loss and count of correct
    predictions (against y's likeliest class), as tensors on the device: reading them is the one GPU sync."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    device = next(model.parameters()).device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64)
    for micro_batches, step_images in steps:
        optimizer.zero_grad(set_to_none=True)                                       # 1. zero the gradients
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(device), y.to(device)  # (no copy when already there)
            # DDP all-reduces the gradients in backward: only the step's last micro-batch needs that. (enable_grad:
            # a context that changes nothing here, as a step runs with gradients on.)
            with model.no_sync() if world > 1 and i < len(micro_batches) - 1 else torch.enable_grad():
                with autocast or torch.enable_grad():  # (None: float32)
                    logits = model(x)                                               # 2. forward
                loss = F.cross_entropy(logits.float(), y, reduction="sum" if class_weights is None else "none",
                                       label_smoothing=label_smoothing)             # 3. loss
                if class_weights is not None:  # (not weight=, which would weigh the label smoothing's shares too)
                    loss = (loss * (class_weights[y] if y.dim() == 1 else y @ class_weights)).sum()
                # Sum / the step's size: the summed gradient is the step's mean, so K micro-batches step like one
                # batch (exactly, without BatchNorm; x world: DDP averages the processes' 1/world shares of the sum)
                loss_mean = loss * (world / step_images)
                (loss_mean if scaler is None else scaler.scale(loss_mean)).backward()  # 4. backward
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).sum()
        if scaler is not None:
            scaler.unscale_(optimizer)  # (fp16) clip the true gradient, not the scaled one
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is None:
            optimizer.step()                                                        # 5. step
        else:
            scaler.step(optimizer)  # (fp16: skipped when the gradient overflowed)
            scaler.update()
        if after_step is not None:
            after_step(loss_sum, correct)
    return loss_sum, correct


# ---------------------------------------------------------------------------------------------------------------
# The epochs: plan the steps, train, validate, save, stop early

class TrainError(cli.UserError):
    """A run that cannot start or go on: a mismatched resume, a model that cannot take the data, a diverged loss."""


class Diverged(Exception):
    """A loss that is not finite, or far above chance level: fit() says what to do next."""


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
    images_per_epoch: int         # all of them, but for a last micro-batch of 1 image with BatchNorm (data.py)
    frozen: list[nn.Module] = field(default_factory=list)  # --freeze-backbone: modules kept in eval mode
    class_weights: torch.Tensor | None = None  # --class-weights balanced: each class's weight in the loss
    mix: Mix | None = None        # --mixup-alpha, --cutmix-alpha
    skips_noted: bool = False     # whether the run said that it skips unreadable training images


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """The project's own schedule, set before each step: each param group's lr is its "initial_lr" (set from its lr
    when missing, as torch's lr schedulers do) x `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def micro_parts(group: torch.Tensor, rank: int, world: int, batch_size: int, mix: bool) -> list[torch.Tensor]:
    """This process's micro-batches of one step's plan rows `group`. With mixup or cutmix each also holds, first, the
    row before its own first in the whole step (the step's last, for its first): the mixing partner of its first
    image (augment.MixedBatches), so the pairs are the step's, whatever the processes and micro-batches."""
    parts = group.tensor_split(world)[rank].tensor_split(math.ceil(len(group) / batch_size))  # (views)
    if not mix:
        return list(parts)
    positions = torch.arange(len(group)).tensor_split(world)[rank].tensor_split(len(parts))
    return [group[torch.cat([(p[:1] - 1) % len(group), p]).to(group.device)] if len(p) else part
            for p, part in zip(positions, parts)]


def epoch_steps(t: Trainer, data: Split, args: argparse.Namespace, epoch: int, first_step: int,
                skipped: torch.Tensor) -> Iterator[tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], int]]:
    """The optimizer steps of epoch `epoch` from `first_step` on, as train_one_epoch takes them, each step's lr set
    (scale_lr) as it is handed over; ends early when a signal asks the run to stop (at a step boundary, the same one
    in every process). Adds to `skipped` the streamed files of the steps that could not be read (warned each)."""
    rank, world = runtime.rank_world()
    plan = epoch_plan(len(data), args.seed, epoch, data.labels.device, args.crop_pad, args.alt_flip,
                      args.color_jitter, data.labels if args.balanced_sampler else None
                      )[:t.images_per_epoch]  # (images_per_epoch: see data.py)
    total, warmup = args.epochs * t.steps_per_epoch, round(args.warmup_epochs * t.steps_per_epoch)
    groups = plan.split(args.batch_size * args.accum_steps)[first_step:]
    # Every process takes its share of the step and cuts it into the same number of micro-batches, so all of
    # them join the same gradient all-reduce (a share may be empty at the very end of an epoch).
    parts = [micro_parts(group, rank, world, args.batch_size, t.mix is not None) for group in groups]
    batches = data.steps(parts, epoch, args.augment, args.crop_pad, args.channels_last,  # (streamed: read ahead)
                         partnered=t.mix is not None)
    try:
        # (a signal while the next step's batches are awaited ends the wait and the steps here: until_interrupted)
        for step, (group, micro_batches) in enumerate(zip(groups, t.stop.until_interrupted(batches)), first_step):
            if t.stop.requested():
                return
            skipped += getattr(micro_batches, "skipped", 0)  # (stream.Step)
            if t.mix is not None:
                micro_batches = MixedBatches(micro_batches, t.mix, epoch, step)
            scale_lr(t.optimizer, lr_factor((epoch - 1) * t.steps_per_epoch + step, total, warmup, args.scheduler))
            yield micro_batches, len(group)
    finally:
        batches.close()  # a streamed set's workers end now


def train_epoch(t: Trainer, data: Split, args: argparse.Namespace, epoch: int, tally: EpochTally) -> bool:
    """Train epoch `epoch` from optimizer step tally.step on (0 unless resuming mid-epoch), adding loss, correct
    count and seconds to `tally`. Returns False when a signal stopped it, at a step boundary."""
    rank, world = runtime.rank_world()
    t.step_model.train()
    for m in t.frozen:
        m.eval()
    progress = report.Progress.start_epoch(args.log_interval, epoch, args.epochs, t.images_per_epoch, t.steps_per_epoch,
                                           args.batch_size * args.accum_steps, tally.step, tally.loss_sum,
                                           tally.correct, world) if rank == 0 else None

    def after_step(loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        tally.step += 1
        if t.ema is not None:
            ema_update(t.ema, t.model, ema_decay(args.ema, (epoch - 1) * t.steps_per_epoch + tally.step))
        if progress:
            progress.after_step(tally.step, loss_sum, correct)

    runtime.sync(data.device)
    start = time.perf_counter()
    skipped = torch.zeros((), dtype=torch.int64, device=data.device)
    steps = epoch_steps(t, data, args, epoch, tally.step, skipped)
    loss_sum, correct = train_one_epoch(t.step_model, t.optimizer, steps, t.scaler, t.autocast, args.grad_clip,
                                        args.label_smoothing, after_step,
                                        t.class_weights if epoch >= args.class_weights_from_epoch else None)
    if progress:
        progress.clear()
    runtime.sync(data.device)
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
        dist.all_reduce(skipped)
    tally.skipped += int(skipped.item())
    tally.seconds += time.perf_counter() - start
    tally.loss_sum += loss_sum.item()
    tally.correct += int(correct.item())
    return tally.step == t.steps_per_epoch


def fit(t: Trainer, args: argparse.Namespace, train: Split, val: Split | None, folder: RunFolder,
        card: dict, state: RunState, tally: EpochTally, trackers: list) -> bool:
    """Train epoch after epoch from state.epoch + 1, validating and saving after each. Returns True when early
    stopping ended the run; a signal ends it with a mid-epoch last.pth and the command that resumes it."""
    with t.stop.deferred():
        for epoch in range(state.epoch + 1, args.epochs + 1):
            if not train_epoch(t, train, args, epoch, tally):
                def save_stopped() -> None:
                    folder.save(make_checkpoint(card, t.model, t.ema, t.optimizer, t.scaler, state, tally),
                                "last.pth")
                    print(f"stopped at step {tally.step} of epoch {epoch}; saved {folder.path / 'last.pth'}. Resume "
                          f"with:\n  {config.resume_command(card['argv'], folder.path / 'last.pth')}", file=sys.stderr)
                runtime.on_rank0(save_stopped)  # (all wait for it: torchrun stops every process once one leaves)
                raise SystemExit(128 + t.stop.signum)
            try:
                row, improved = end_of_epoch(t, args, train, val, card, state, tally, epoch)
            except Diverged as e:
                raise TrainError(report.diverged(str(e), folder.path / "last.pth", args.lr)) from None
            tally = EpochTally()

            def save() -> None:  # (a full disk in rank 0 ends every process with its one line)
                folder.save(make_checkpoint(card, t.model, t.ema, t.optimizer, t.scaler, state, None),
                            "last.pth", *(["best.pth"] if improved else []))
                folder.write_metrics(state.history, card["changes"])
                folder.write_args(config.run_flags(args, card["changes"]))
                print(report.format_epoch(row, args.epochs), flush=True)
                report.log_epoch(trackers, row)
            runtime.on_rank0(save)
            if args.patience and state.bad_epochs >= args.patience:
                runtime.print0(f"early stop: no validation improvement for {args.patience} epochs")
                return True
    return False


def eval_batch(args: argparse.Namespace) -> int:
    """Images per forward pass in each process when validating and testing: no more than training's (a frozen
    backbone trains in less memory than a larger batch tests in), unless --eval-batch-size asks."""
    return math.ceil((args.eval_batch_size or args.batch_size) / runtime.rank_world()[1])


def end_of_epoch(t: Trainer, args: argparse.Namespace, train: Split, val: Split | None, card: dict,
                 state: RunState, tally: EpochTally, epoch: int) -> tuple[dict, bool]:
    """Validate, update the run state, and return the epoch's metrics row and whether it is the best so far."""
    n = t.images_per_epoch - tally.skipped  # the images trained on: all but the unreadable streamed files
    if n <= 0:
        raise TrainError(f"none of the {t.images_per_epoch:,} training images of epoch {epoch} could be read (each "
                         f"unreadable file was named above)")
    if tally.skipped and not t.skips_noted:  # (once: each file was named when it was met)
        t.skips_noted = True
        runtime.print0(f"note: {tally.skipped:,} of epoch {epoch}'s {t.images_per_epoch:,} training images could not "
                       f"be read; the training loss and accuracy count the {n:,} read", file=sys.stderr)
    row = {"epoch": epoch, "train_loss": tally.loss_sum / n, "train_acc": 100.0 * tally.correct / n,
           "val_loss": math.nan, "val_acc": math.nan, "lr": t.optimizer.param_groups[0]["lr"],
           "train_seconds": tally.seconds, "images_per_s": n / tally.seconds, "val_top5": math.nan}
    # A loss far above chance level (ln C: a uniform guess) has diverged, even while it is still finite
    if not row["train_loss"] <= max(10.0, 10 * math.log(card["num_classes"])):
        raise Diverged(f"the training loss became {row['train_loss']:.3g} in epoch {epoch}")
    if val is not None:
        with t.autocast:
            result = evaluate(t.ema if t.ema is not None else t.model, val, card["num_classes"], eval_batch(args))
        row.update(val_loss=result["loss"], val_acc=result["accuracy"], val_top5=result["top5"])
        if not math.isfinite(row["val_loss"]):
            raise Diverged(f"the validation loss became {row['val_loss']} in epoch {epoch}")
    improved = val is None or improves(row, state, args.best_by, args.min_delta)
    if improved:
        state.best_val_loss, state.best_epoch, state.bad_epochs = row["val_loss"] if val else math.inf, epoch, 0
    else:
        state.bad_epochs += 1
    state.epoch, state.train_seconds = epoch, state.train_seconds + tally.seconds
    state.history.append(row)
    return row, improved


def improves(row: dict, state: RunState, best_by: str, min_delta: float) -> bool:
    """Whether the epoch's validation `row` beats best.pth's epoch by more than min_delta on --best-by's measure:
    a lower val_loss, or a higher val_acc."""
    if not state.best_epoch:
        return True
    best = state.history[state.best_epoch - 1][best_by]
    return row[best_by] < best - min_delta if best_by == "val_loss" else row[best_by] > best + min_delta


# ---------------------------------------------------------------------------------------------------------------
# The run: set up, train epoch after epoch, test best.pth once

def run(args: argparse.Namespace, resumed: dict | None, argv: list[str], start: dict | None = None) -> dict:
    """`argv`: the run's flags as a command line (the checkpoint keeps it, and the resume command repeats it);
    `start`: the weights to start from (starting_weights)."""
    device = runtime.pick_device(args.device, runtime.start_processes(args.device))
    runtime.autocast(args.amp, device)  # now: refuses --amp the device does not have
    if device.type == "cpu":
        # Numbers below 1e-38 as 0: CPUs compute with such denormals 10-100x slower, and Adam's squared gradients
        # of a barely-trained layer land there (bench.py --loop-cost: its step took 5x as long)
        torch.set_flush_denormal(True)
    folder = RunFolder(config.out_dir_for(args), resumed["run_id"] if resumed else secrets.token_hex(8))
    try:
        # first: a second run into the same folder is refused before any work
        runtime.on_rank0(lambda: folder.claim(resumed, Path(args.resume) if resumed else None))
        return train_and_test(args, resumed, argv, device, folder, start)
    except RuntimeError as e:  # under torchrun: another process gone or stopped is one line, not gloo's
        last = folder.path / "last.pth"
        runtime.lost_peer(e, config.resume_command(argv, last) if last.is_file() else None)
        raise
    finally:
        folder.release()


def train_and_test(args: argparse.Namespace, resumed: dict | None, argv: list[str], device: torch.device,
                   folder: RunFolder, start: dict | None) -> dict:
    rank = runtime.rank_world()[0]
    torch.manual_seed(args.seed)
    # Loaded weights were trained on inputs normalized their way: keep it (a resumed run: the run's own)
    stats = ((start["mean"], start["std"]) if start else (resumed["mean"], resumed["std"])
             if resumed and (args.pretrained or args.init_from) else None)
    prep = config.image_prep(args)
    train, val, test, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                        image_size=args.image_size, stats=stats, max_pixels=args.max_image_pixels,
                                        prep=prep, workers=args.workers)
    args.workers = getattr(train, "workers", args.workers)  # resolved: None only when held in memory (--resume)
    set_policy(train, args)
    # Only now: the loader's temporary copies have gone back to the OS. Not when streaming: there a step's time is
    # the model's and the workers', and the kept heap raised the process tree's peak above torchvision's pipeline
    if device.type == "cpu" and isinstance(train, ImageSet):
        runtime.keep_freed_memory()
    if args.patience and val is None:
        raise TrainError("--patience needs a validation set: --val-split above 0, or a val/ folder")
    t = build_trainer(args, train, len(classes), device, resumed, start)
    changes = list(resumed.get("changes", [])) if resumed else []
    mlflow_run_id = resumed.get("mlflow_run_id") if resumed and not folder.copied_from else None  # (a copy: its own)
    card = run_card(args, argv, t.model, train, prep, classes, folder.run_id, mlflow_run_id, changes)
    state, tally = (resume(t, args, resumed, card) if resumed else (RunState(), EpochTally()))

    def begin() -> list:  # room for the checkpoints, the run's first lines, the trackers
        folder.check_space(t.model, t.optimizer, t.ema)
        report.announce(args, t.model, train, val, test, device, folder.path, state, tally, start, card)
        return report.start(args, folder.path, state.history, card["mlflow_run_id"], train.sample(32).cpu()
                            if args.tensorboard else None)
    trackers = runtime.on_rank0(begin) or []
    card["mlflow_run_id"] = next((k.run_id for k in trackers if isinstance(k, report.MlflowTracker)),
                                 card["mlflow_run_id"])
    ended, results = "FAILED", None  # how the trackers record the run's end
    try:
        stopped_early = fit(t, args, train, val, folder, card, state, tally, trackers)
        results = final_test(t, args, test, classes, state, stopped_early, folder, device)
        ended = "FINISHED"
        return results
    except SystemExit:  # a signal: the run stopped, resumable
        ended = "KILLED"
        raise
    finally:
        if rank == 0:  # also when stopped early or by Ctrl-C
            in_place = folder.in_place()  # (a folder moved away: its old path is not this run's to write or read)
            if in_place:
                report.draw_curves(state.history, folder.path / "curves.png", quiet=ended == "FAILED",
                                   best=state.best_epoch if args.best_by != "val_loss" else None)
            files = ["results.json", "metrics.csv", "curves.png", *(["best.pth", "last.pth"]
                                                                     if args.mlflow_log_checkpoints else [])]
            report.end(trackers, ended, [folder.path / name for name in files if in_place], results)


def set_policy(train: Split, args: argparse.Namespace) -> None:
    """--auto-augment and --random-erase: the training images' per-image policy (augment.image_policy)."""
    train.set_policy(image_policy(args.auto_augment, args.auto_augment_magnitude, args.random_erase,
                                  train.mean.tolist()), args.seed)


def resume(t: Trainer, args: argparse.Namespace, resumed: dict, card: dict) -> tuple[RunState, EpochTally]:
    """Load the resumed checkpoint's training state into `t`, after checking it is this run's data; a flag that
    takes effect on resume (config.TAKE_EFFECT_ON_RESUME) and differs is recorded in card["changes"]."""
    check_same_data(resumed, card)
    state, tally = resume_state(resumed, Path(args.resume), t.steps_per_epoch, args.epochs)
    load_training_state(resumed, t.model, t.ema, t.optimizer, t.scaler)
    changed = config.changes_on_resume(args, resumed)
    if changed:
        card["changes"].append({"epoch": state.epoch + 1, "step": tally.step, "flags": changed})
    return state, tally


def final_test(t: Trainer, args: argparse.Namespace, test: Split, classes: list[str], state: RunState,
               stopped_early: bool, folder: RunFolder, device: torch.device) -> dict:
    """Evaluate best.pth once on the test set and write results.json. A signal (noted after the last optimizer
    step, or arriving now) leaves the test to evaluate.py, and says so."""
    try:
        if t.stop.signum:
            raise cli.Interrupted(t.stop.signum)
        if dist.is_initialized():
            dist.barrier()  # best.pth is written by rank 0
        best = model_from_checkpoint(load_checkpoint(folder.path / "best.pth")).to(device)
        if args.channels_last:
            best = best.to(memory_format=torch.channels_last)
        with runtime.autocast(args.amp, device):  # the test runs in the precision the model trained in
            result = evaluate(best, test, len(classes), eval_batch(args), tta=args.tta)
    except cli.Interrupted:
        runtime.print0(f"training finished ({state.epoch} epochs, best.pth from epoch {state.best_epoch}); the final "
                       f"test was interrupted. Run it with:\n  python evaluate.py --checkpoint "
                       f"{folder.path / 'best.pth'}", file=sys.stderr)
        raise
    results = {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
               **({"test_top5": result["top5"]} if len(classes) > 5 else {}),
               **{f"test_{k}": result[k] for k in MEASURES},
               "test_images": len(test) - result["skipped"], "test_skipped": result["skipped"],
               "best_epoch": state.best_epoch,
               "epochs_completed": state.epoch, "stopped_early": stopped_early,
               "train_seconds": state.train_seconds}
    # (all processes leave together, after the write: gloo aborts a process whose peer is already gone)
    runtime.on_rank0(lambda: folder.write_results(json.dumps(results, indent=2) + "\n"))
    tta = "" if args.tta == "none" else f" and {args.tta} TTA"
    top5 = f", top-5 {result['top5']:.2f}%" if len(classes) > 5 else ""
    skipped = f"; {result['skipped']:,} unreadable test images skipped" if result["skipped"] else ""
    runtime.print0(f"test accuracy {result['accuracy']:.2f}% (loss {result['loss']:.4f}{top5}, balanced accuracy "
                   f"{result['balanced_accuracy']:.2f}%) with best.pth from epoch "
                   f"{state.best_epoch}{tta}{skipped}; results in {folder.path / 'results.json'}")
    return results


def build_trainer(args: argparse.Namespace, train: Split, num_classes: int, device: torch.device,
                  resumed: dict | None, start: dict | None = None) -> Trainer:
    in_channels, image_size = train.channels, train.image_size
    source = "--pretrained" if args.pretrained else f"--init-from {args.init_from}"
    if start is not None and args.init_from and start["in_channels"] != in_channels:
        raise TrainError(f"{source} was trained on {start['in_channels']}-channel images; {args.dataset} has "
                         f"{in_channels}-channel images")
    try:
        model = build_model(args.model, num_classes, in_channels, image_size, args.widths) if start is None else \
            model_from_start(args.model, args.widths, start, source, num_classes, in_channels, image_size)
        frozen = freeze_backbone(model, num_classes) if args.freeze_backbone else []
        model = model.to(device)
        if args.model not in MODELS:
            check_image_size(model, args.model, next(train.batches(torch.arange(1), 1))[0])
    except ValueError as e:  # a model that cannot take this image size, weights that do not fit
        raise TrainError(str(e)) from None
    if isinstance(model, AirNet) and resumed is None and start is None:  # (else its whitening comes with the weights)
        model.init_whitening(next(train.batches(torch.arange(min(len(train), 5000)), 5000))[0])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = model
    if dist.is_initialized():
        step_model = nn.parallel.DistributedDataParallel(model,
                                                         device_ids=[device.index] if device.type == "cuda" else None)
    step_images = args.batch_size * args.accum_steps
    images = len(train)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        images = images_per_epoch(images, step_images, args.batch_size, runtime.rank_world()[1])
    return Trainer(model=model, step_model=torch.compile(step_model) if args.compile else step_model,
                   optimizer=make_optimizer(model, args, device, num_classes),
                   scaler=torch.amp.GradScaler("cuda", enabled=args.amp == "fp16"),
                   autocast=runtime.autocast(args.amp, device), ema=copy.deepcopy(model) if args.ema else None,
                   stop=runtime.StopSignal(),
                   steps_per_epoch=math.ceil(images / step_images), images_per_epoch=images, frozen=frozen,
                   class_weights=balanced_class_weights(train.labels, num_classes).to(device)
                   if args.class_weights == "balanced" else None,
                   mix=Mix(args.mixup_alpha, args.cutmix_alpha, num_classes, args.seed)
                   if args.mixup_alpha or args.cutmix_alpha else None)


def main(argv: list[str] | None = None) -> dict | float:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with cli.one_line_errors("train.py", "lower --batch-size (--accum-steps keeps the update the same)"):
            args, resumed, run_argv = config.parse_run_args(argv, "train.py", __doc__)
            report.require(args)  # a missing package: one line, before any work
            if args.find_lr:
                import find_lr  # (it imports this module)
                return find_lr.find_lr(args)
            start = None if resumed else starting_weights(args)  # (a resumed run has its weights)
            return run(args, resumed, run_argv, start)
    finally:
        if dist.is_initialized():
            runtime.leave_processes()


if __name__ == "__main__":
    main()

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
# Read on in order: the epochs (validate, save, stop early), then the run. Each epoch's optimizer steps are
# trainer.py's train_one_epoch (the five steps).
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads (~1.5 s), so that an early Ctrl-C exits quietly too

import argparse
import json
import math
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

import config
import find_lr
import report
import runargs
import runtime
from augment import MixedBatches
from checkpoint import (EpochTally, RunState, check_same_data, load_checkpoint, load_training_state, make_checkpoint,
                        model_from_checkpoint, resume_state, run_card, starting_weights)
from data import ImageSet, Split, epoch_plan, prepare
from decode import Prep
from model import MEASURES, evaluate
from optim import ema_decay, ema_update, lr_factor
from runfolder import RunFolder
from trainer import TrainError, Trainer, build_trainer, micro_parts, scale_lr, set_policy, train_one_epoch

# ---------------------------------------------------------------------------------------------------------------
# The epochs: plan the steps, train, validate, save, stop early

class Diverged(Exception):
    """A loss that is not finite, or far above chance level: fit() says what to do next."""


def epoch_steps(t: Trainer, data: Split, args: argparse.Namespace, epoch: int, first_step: int,
                skipped: torch.Tensor) -> Iterator[tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], int]]:
    """The optimizer steps of epoch `epoch` from `first_step` on, as train_one_epoch takes them, each step's lr set
    (scale_lr) as it is handed over; ends early when a signal asks the run to stop (at a step boundary, the same one
    in every process). Adds to `skipped` the streamed files of the steps that could not be read (warned each)."""
    rank, world = runtime.rank_world()
    plan = epoch_plan(len(data), args.seed, epoch, data.labels.device, args.crop_pad, args.alt_flip,
                      args.color_jitter, data.labels if args.balanced_sampler else None, data.shard_counts
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
                          f"with:\n  {runargs.resume_command(card['argv'], folder.path / 'last.pth')}", file=sys.stderr)
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
                folder.write_args(runargs.run_flags(args, card["changes"]))
                print(report.format_epoch(row, args.epochs), flush=True)
                report.log_epoch(trackers, row)
            runtime.on_rank0(save)
            if args.patience and state.bad_epochs >= args.patience:
                runtime.print0(f"early stop: no validation improvement for {args.patience} "
                               f"epoch{'s' * (args.patience != 1)}")
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
    folder = RunFolder(runargs.out_dir_for(args), resumed["run_id"] if resumed else secrets.token_hex(8))
    try:
        # first: a second run into the same folder is refused before any work
        runtime.on_rank0(lambda: folder.claim(resumed, Path(args.resume) if resumed else None))
        return train_and_test(args, resumed, argv, device, folder, start)
    except RuntimeError as e:  # under torchrun: another process gone or stopped is one line, not gloo's
        last = folder.path / "last.pth"
        runtime.lost_peer(e, runargs.resume_command(argv, last) if last.is_file() else None)
        raise
    finally:
        folder.release()


def train_and_test(args: argparse.Namespace, resumed: dict | None, argv: list[str], device: torch.device,
                   folder: RunFolder, start: dict | None) -> dict:
    """The run in its claimed `folder`: its data, its trainer (resumed or new), epoch after epoch (fit), then the
    final test; curves.png and the trackers' end however it ends. Returns results.json's content."""
    rank = runtime.rank_world()[0]
    torch.manual_seed(args.seed)
    prep = config.image_prep(args)
    train, val, test, classes = load_data(args, prep, device, resumed, start)
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
            files = ["results.json", "metrics.csv", "curves.png", *(["best.pth", "last.pth"]
                                                                     if args.mlflow_log_checkpoints else [])]
            files = [folder.path / name for name in files if in_place]
            try:
                if in_place:
                    report.draw_curves(state.history, folder.path / "curves.png", quiet=ended == "FAILED",
                                       best=state.best_epoch if args.best_by != "val_loss" else None)
            except cli.Interrupted:  # (Ctrl-C while drawing: the trackers still record the end, as KILLED)
                ended, files = "KILLED", []
                raise
            finally:
                report.end(trackers, ended, files, results)


def load_data(args: argparse.Namespace, prep: Prep, device: torch.device, resumed: dict | None,
              start: dict | None) -> tuple[Split, Split | None, Split, list[str]]:
    """The run's training, validation (or None) and test sets and its classes (data.prepare), the training set's
    per-image policy set."""
    # Loaded weights were trained on inputs normalized their way: keep it (a resumed run: the run's own)
    stats = ((start["mean"], start["std"]) if start else (resumed["mean"], resumed["std"])
             if resumed and (args.pretrained or args.init_from) else None)
    train, val, test, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                        image_size=args.image_size, stats=stats, max_pixels=args.max_image_pixels,
                                        prep=prep, workers=args.workers)
    args.workers = getattr(train, "workers", args.workers)  # resolved: None only when held in memory (--resume)
    set_policy(train, args)
    # Only now: the loader's temporary copies have gone back to the OS. Not when streaming: there a step's time is
    # the model's and the workers', and the kept heap raised the process tree's peak above torchvision's pipeline
    if device.type == "cpu" and isinstance(train, ImageSet):
        runtime.keep_freed_memory()
    return train, val, test, classes


def resume(t: Trainer, args: argparse.Namespace, resumed: dict, card: dict) -> tuple[RunState, EpochTally]:
    """Load the resumed checkpoint's training state into `t`, after checking it is this run's data; a flag that
    takes effect on resume (runargs.TAKE_EFFECT_ON_RESUME) and differs is recorded in card["changes"]."""
    check_same_data(resumed, card)
    state, tally = resume_state(resumed, Path(args.resume), t.steps_per_epoch, args.epochs)
    load_training_state(resumed, t.model, t.ema, t.optimizer, t.scaler)
    changed = runargs.changes_on_resume(args, resumed)
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
                       f"test was interrupted. Run it with:\n  "
                       f"{cli.command('evaluate.py', '--checkpoint', str(folder.path / 'best.pth'))}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> dict | float:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with cli.one_line_errors("train.py", "lower --batch-size (--accum-steps keeps the update the same)"):
            args, resumed, run_argv = runargs.parse_run_args(argv, "train.py", __doc__)
            report.require(args)  # a missing package: one line, before any work
            if args.find_lr:
                return find_lr.find_lr(args)
            start = None if resumed else starting_weights(args)  # (a resumed run has its weights)
            return run(args, resumed, run_argv, start)
    finally:
        if dist.is_initialized():
            runtime.leave_processes()


if __name__ == "__main__":
    main()

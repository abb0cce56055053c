"""Train an image classifier on CIFAR-10, MNIST or Fashion-MNIST.

    python train.py                                         # the seed recipe: SimpleCNN, Adam 1e-3, batch 32, 5 epochs
    python train.py --dataset fashion-mnist --epochs 10 --augment --scheduler cosine
    python train.py --resume runs/cifar10-simplecnn-20261123-120000/last.pth   # plus the original flags

Each epoch prints one line and appends it to <out-dir>/metrics.csv; <out-dir>/last.pth is written every epoch
and <out-dir>/best.pth whenever the validation loss improves. At the end best.pth is evaluated once on the test
set and <out-dir>/results.json is written. Measured on a 2-core CPU (see README): the seed recipe trains at
about 4.5x the images/s of the seed guide's DataLoader pipeline.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DATASETS, DataError, ImageSet, epoch_plan, prepare
from evaluate import evaluate
from model import MODELS, CheckpointError, build_model, load_checkpoint, model_from_checkpoint

class TrainError(Exception):
    """A run that cannot start or go on: a device that is not there, a mismatched resume, a diverged loss."""


METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_seconds", "images_per_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"{p.prog}: error: {message}")  # one line, not the usage block
    add = p.add_argument
    add("--dataset", default="cifar10", choices=DATASETS, help="(default: cifar10)")
    add("--data-dir", default="./data", metavar="DIR", help="where datasets are found or downloaded (default: ./data)")
    add("--image-size", type=int, default=32, metavar="PX",
        help="side images are resized to, imagefolder only (default: 32)")
    add("--model", default="simplecnn", choices=sorted(MODELS), help="(default: simplecnn)")
    add("--epochs", type=int, default=5, metavar="N", help="(default: 5)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default: 32)")
    add("--accum-steps", type=int, default=1, metavar="K",
        help="forward passes per optimizer step; the update equals one batch of N*K images (default: 1)")
    add("--lr", type=float, default=1e-3, metavar="LR", help="peak learning rate (default: 1e-3)")
    add("--optimizer", default="adam", choices=["adam", "adamw", "sgd"], help="(default: adam)")
    add("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    add("--weight-decay", type=float, default=0.0, metavar="WD", help="(default: 0)")
    add("--scheduler", default="none", choices=["none", "step", "cosine"],
        help="lr schedule over all steps: step = x0.1 at 50%% and 75%% of the run (default: none)")
    add("--grad-clip", type=float, default=0.0, metavar="NORM", help="max global gradient norm, 0 = off (default: 0)")
    add("--patience", type=int, default=0, metavar="N",
        help="stop after N epochs without validation-loss improvement, 0 = off (default: 0)")
    add("--min-delta", type=float, default=0.0, metavar="D",
        help="smallest drop in validation loss that counts as improvement (default: 0)")
    add("--val-split", type=float, default=0.1, metavar="F",
        help="fraction of the training set held out for validation, 0 = none (default: 0.1)")
    add("--augment", action="store_true", help="random crop (4-pixel padding) and horizontal flip")
    add("--seed", type=int, default=0, metavar="S", help="seeds init, split, order and augmentation (default: 0)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory layout: same math, faster convolutions on CPU and tensor-core GPUs (default: on)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="auto = cuda, then mps, then cpu (default: auto)")
    add("--out-dir", metavar="DIR", help="(default: runs/<dataset>-<model>-<date-time>, or the --resume folder)")
    add("--resume", metavar="PATH", help="continue exactly from a last.pth (give the original flags too)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a message, or None."""
    rules = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (8 <= args.image_size <= 1024, "--image-size must be in [8, 1024]"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.accum_steps >= 1, "--accum-steps must be at least 1"),
        (math.isfinite(args.lr) and args.lr > 0, "--lr must be a positive number"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (math.isfinite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (math.isfinite(args.grad_clip) and args.grad_clip >= 0, "--grad-clip must be >= 0 (0 = off)"),
        (args.patience >= 0, "--patience must be >= 0 (0 = off)"),
        (math.isfinite(args.min_delta) and args.min_delta >= 0, "--min-delta must be >= 0"),
        (0 <= args.val_split < 1, "--val-split must be in [0, 1)"),
        (args.patience == 0 or args.val_split > 0, "--patience needs a validation set (--val-split > 0)"),
        (0 <= args.seed < 2**48, "--seed must be in [0, 2**48)"),
    ]
    return next((message for ok, message in rules if not ok), None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {name} is not available on this machine")
    return torch.device(name)


def make_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernels compute the same update as the default loop, in one call per step instead of ~10 per
    # parameter tensor: for a small model that is a large share of the step.
    kw = {"lr": args.lr, "weight_decay": args.weight_decay, "fused": device.type in ("cpu", "cuda")}
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), momentum=args.momentum, **kw)
    return (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(model.parameters(), **kw)


def lr_factor(step: int, total_steps: int, kind: str) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based) of `total_steps`."""
    progress = step / total_steps
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def train_one_epoch(model, optimizer, scheduler, train: ImageSet, args, epoch: int) -> dict:
    """One pass over the training set in the epoch's seeded order; returns loss, accuracy, lr and timing."""
    model.train()
    device = train.labels.device
    plan = epoch_plan(len(train), args.seed, epoch, device)  # rows: sample, crop dy, crop dx, flip
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    sync(device)
    start = time.perf_counter()
    for group in plan.split(args.batch_size * args.accum_steps):  # one group = one optimizer step
        optimizer.zero_grad(set_to_none=True)
        for rows in group.split(args.batch_size):
            x, y = train.batch(rows[:, 0], rows[:, 1:] if args.augment else None)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            # Dividing the sum by the group size (not the micro-batch size) makes the accumulated gradient the
            # mean over the whole group, so K micro-batches step exactly like one batch, short last group too.
            (loss / len(group)).backward()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    sync(device)
    seconds = time.perf_counter() - start
    n = len(train)
    return {"train_loss": loss_sum.item() / n, "train_acc": 100.0 * correct.item() / n, "lr": lr,
            "train_seconds": seconds, "images_per_s": n / seconds}


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one,
    never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def prepare_metrics_file(path: Path, keep_epochs: int) -> None:
    """Start metrics.csv, or on resume keep only the rows of epochs the checkpoint has (a run killed between
    writing a row and its checkpoint repeats that epoch, and must not list it twice)."""
    rows = []
    if keep_epochs and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, METRICS)
        writer.writeheader()
        writer.writerows(rows)


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, METRICS).writerow({k: row[k] for k in METRICS})


def format_epoch(row: dict, epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%" if not math.isnan(row["val_loss"]) else "no val"
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:6.2f}%  {val}  lr {row['lr']:.2e}  {row['train_seconds']:.1f}s  "
            f"{row['images_per_s']:,.0f} img/s")


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        for key in ("dataset", "model"):
            if ckpt["args"].get(key) != getattr(args, key):
                raise TrainError(f"--resume: the checkpoint was trained with --{key} {ckpt['args'].get(key)}, "
                                 f"not {getattr(args, key)}; give the original flags")
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume else
                                    Path("runs") / f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not args.resume and (out_dir / "last.pth").exists():
        raise TrainError(f"{out_dir} already holds a run; resume it with --resume {out_dir / 'last.pth'} "
                         f"or choose another --out-dir")

    torch.manual_seed(args.seed)
    train, val, test, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                       image_size=args.image_size)
    _, in_channels, image_size, _ = train.images.shape
    model = build_model(args.model, len(classes), in_channels, image_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args, device)
    steps_per_epoch = math.ceil(len(train) / (args.batch_size * args.accum_steps))
    total_steps = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, args.scheduler))
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "train_seconds": 0.0}
    if ckpt is not None:
        if ckpt["mean"] != train.mean.tolist() or ckpt["classes"] != classes:
            raise TrainError("--resume: the data differs from the checkpoint's (another --val-split, --seed or data?)")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
        print(f"resumed from {args.resume} after epoch {state['epoch']}")

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.csv"
    prepare_metrics_file(metrics_path, state["epoch"])
    print(f"{args.dataset}: {len(train)} train, {len(val) if val else 0} val, {len(test)} test images on {device}; "
          f"{args.model} with {sum(p.numel() for p in model.parameters()):,} parameters; writing to {out_dir}")

    stopped_early = False
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        row = {"epoch": epoch, **train_one_epoch(model, optimizer, scheduler, train, args, epoch)}
        if not math.isfinite(row["train_loss"]):
            raise TrainError(f"the training loss became {row['train_loss']} in epoch {epoch}; try a lower --lr or "
                             f"--grad-clip 1.0 (checkpoints keep the last finite weights)")
        val_result = evaluate(model, val, len(classes)) if val else {"loss": math.nan, "accuracy": math.nan}
        row.update(val_loss=val_result["loss"], val_acc=val_result["accuracy"])
        improved = val is None or val_result["loss"] < state["best_val_loss"] - args.min_delta
        if improved:
            state.update(best_val_loss=val_result["loss"] if val else math.inf, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state.update(epoch=epoch, train_seconds=state["train_seconds"] + row["train_seconds"])
        append_metrics(metrics_path, row)
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "model_name": args.model, "num_classes": len(classes), "in_channels": in_channels,
            "image_size": image_size, "classes": classes, "mean": train.mean.tolist(), "std": train.std.tolist(),
            "args": vars(args), "rng": rng_states(), **state}
        save_checkpoint(checkpoint, out_dir / "last.pth")
        if improved:
            save_checkpoint(checkpoint, out_dir / "best.pth")
        print(format_epoch(row, args.epochs), flush=True)
        if args.patience and state["bad_epochs"] >= args.patience:
            print(f"early stop: no validation improvement for {args.patience} epochs")
            stopped_early = True
            break

    best = model_from_checkpoint(load_checkpoint(out_dir / "best.pth", device)).to(device)
    result = evaluate(best, test, len(classes))
    results = {"test_accuracy": result["accuracy"], "test_loss": result["loss"], "best_epoch": state["best_epoch"],
               "epochs_completed": state["epoch"], "stopped_early": stopped_early,
               "train_seconds": state["train_seconds"]}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"test accuracy {result['accuracy']:.2f}% (loss {result['loss']:.4f}) with best.pth from epoch "
          f"{state['best_epoch']}; results in {out_dir / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        sys.exit(f"train.py: error: {problem}")
    try:
        return run(args)
    except (DataError, CheckpointError, TrainError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()

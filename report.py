"""What a run of train.py shows: the live progress line inside an epoch, the line after each epoch, curves.png.
(The trackers, --mlflow and --tensorboard, are in tracking.py.)"""
import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import plot
import runtime
from checkpoint import EpochTally, RunState
from data import ImageSet


def format_epoch(row: dict, epochs: int) -> str:
    """The line printed after each epoch, from its metrics.csv row."""
    val = "no val" if math.isnan(row["val_loss"]) else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%"
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:6.2f}%  {val}  lr {row['lr']:.2e}  {row['train_seconds']:.1f}s  "
            f"{row['images_per_s']:,.0f} img/s")


class Progress:
    """The --log-interval line inside an epoch: step, the epoch's running loss and accuracy, images/s and the
    epoch's ETA. On a terminal it is one live line, rewritten in place and cleared before the epoch line; when
    stdout is not a terminal (a log file) it is a plain line each time, and only when --log-interval is given."""

    def __init__(self, interval: int, live: bool, epoch: int, epochs: int, n: int, steps: int, group: int,
                 first_step: int, loss_before: float, correct_before: int, world: int):
        self.interval, self.live, self.epoch, self.epochs = interval, live, epoch, epochs
        self.n, self.steps, self.group, self.world = n, steps, group, world
        self.first_step, self.loss_before, self.correct_before = first_step, loss_before, correct_before
        self.start = time.perf_counter()

    @classmethod
    def start_epoch(cls, log_interval: int | None, epoch: int, epochs: int, n: int, steps: int, group: int,
                    first_step: int = 0, loss_before: float = 0.0, correct_before: int = 0,
                    world: int = 1) -> "Progress | None":
        """None when off. `n` images in `steps` optimizer steps of `group` images; a resumed epoch starts at
        `first_step` with the loss sum and correct count of the steps before it."""
        live = sys.stdout.isatty()
        interval = log_interval
        if interval is None:  # auto: on a terminal only, 20 updates per epoch (1-2 s apart for --preset fast)
            interval = math.ceil(steps / 20) if live else 0
        return cls(interval, live, epoch, epochs, n, steps, group, first_step, loss_before, correct_before,
                   world) if interval else None

    def after_step(self, step: int, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """`step`: optimizer steps done in this epoch; `loss_sum`, `correct`: this process's sums since the epoch
        (or the resume) began, on the device. Shows the line every `interval` steps."""
        if step % self.interval:
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
        if self.live:  # \r: back to the line's start; ESC[K: erase what a longer line left
            sys.stdout.write("\r" + line[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def clear(self) -> None:
        if self.live:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


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


def announce(args: argparse.Namespace, model: nn.Module, train: ImageSet, val: ImageSet | None, test: ImageSet,
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
    print(f"{args.dataset}: {len(train)} train, {len(val) if val else 0} val, {len(test)} test images on "
          f"{device} x {runtime.rank_world()[1]}; {args.model} with {sum(p.numel() for p in model.parameters()):,} "
          f"parameters{f' ({trained:,} trained)' if trained else ''}; writing to {folder}", flush=True)


def diverged(what: str, last: Path, lr: float) -> str:
    """The one line a diverged run ends with: what happened, and the way forward from the last good weights."""
    if not last.exists():
        return f"{what}; start again with a lower --lr (e.g. --lr {lr / 10:.2g}) or --grad-clip 1.0"
    return (f"{what}; {last} holds the weights before it: go on from there with a lower lr and clipping: "
            f"python train.py --resume {last} --lr {lr / 10:.2g} --grad-clip 1.0")

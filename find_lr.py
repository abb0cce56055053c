"""The learning-rate range test: train from the run's starting weights for --find-lr-steps optimizer steps, the lr
rising exponentially from --find-lr-start to --find-lr-end, until the loss explodes; draw the loss against the lr
and print a suggested --lr on the last line.

    python find_lr.py                              # the seed recipe's model and optimizer
    python find_lr.py --preset fast --out-dir runs/fast-lr   # draws runs/fast-lr/find-lr.png
    python find_lr.py --model resnet18 --pretrained --optimizer sgd
    python train.py --find-lr ...                  # the same

It takes train.py's flags (python train.py --help) and runs train.py's own steps (train_one_epoch: its batches,
augmentation, optimizer, precision, clipping), with the lr set per step. It writes find-lr.png and nothing else:
no checkpoint, no run file and no lock, so it can draw into a run's folder without touching the run. Needs
matplotlib.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import config
import plot
import runargs
import runtime
import trainer
from augment import MixedBatches
from checkpoint import starting_weights
from data import Split, epoch_plan, prepare


class FindLrError(cli.UserError):
    """A range test that gives no suggestion."""


def find_lr(args: argparse.Namespace) -> float:
    """Run the test for train.py's `args`; returns the suggested --lr: a tenth of the lr where the smoothed loss was
    lowest. Raises FindLrError (after drawing) when the loss never fell below its first value."""
    plot.require_matplotlib()
    device = runtime.pick_device(args.device)
    if device.type == "cpu":  # as train.py's run() does
        runtime.keep_freed_memory()
        torch.set_flush_denormal(True)
    start = starting_weights(args)  # --pretrained, --init-from: the weights the run would start from
    path = Path(args.out_dir) / "find-lr.png" if args.out_dir else \
        Path("runs") / f"find-lr-{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.png"  # (no run folder)
    created = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        plot.check_output(path, inputs=(args.data_dir,))  # (not onto, nor among, the data)
        torch.manual_seed(args.seed)
        stats = (start["mean"], start["std"]) if start else None
        # (0: the range test picks no epoch, so it holds out no validation images and warns of no split's size)
        data, _, _, classes = prepare(args.dataset, args.data_dir, 0, args.seed, device,
                                      image_size=args.image_size, stats=stats, max_pixels=args.max_image_pixels,
                                      prep=config.image_prep(args), workers=args.workers)
        trainer.set_policy(data, args)
        t = trainer.build_trainer(args, data, len(classes), device, resumed=None, start=start)
        if start:
            print(f"starting from {start['source']}")
        lrs, losses, images = lr_range_test(t, data, args)
        smoothed = smooth(losses)
        best = min(range(len(smoothed)), key=smoothed.__getitem__)
        suggestion = lrs[best] / 10
        plot.plot_lr_range(lrs[:len(losses)], losses, smoothed, suggestion if best else None, path)
    except BaseException:
        if created and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()  # failed before drawing: leave no empty folder
        raise
    exploded = len(losses) < len(lrs)
    if best == 0:  # no valley: the loss only rose from the first lr on
        advice = "try a lower --find-lr-start" if exploded else "try another range, or more --find-lr-steps"
        raise FindLrError(f"no suggestion: the loss {'diverged' if exploded else 'never fell'} from the first lr "
                          f"on (lr {lrs[0]:.2g} to {lrs[len(losses) - 1]:.2g}; drawn to {path}); {advice}")
    why = "the loss exploded" if exploded else "the last lr"
    print(f"lr range test: {len(losses)} steps ({images:,} images, of a training set of {len(data):,}) from lr "
          f"{lrs[0]:.2g} until {why} ({lrs[len(losses) - 1]:.2g}); smoothed loss lowest ({smoothed[best]:.3f}) at lr "
          f"{lrs[best]:.2g}; drawn to {path}\nsuggested --lr (a tenth of that):\n{suggestion:.2g}")
    return float(f"{suggestion:.2g}")


def lr_range_test(t: trainer.Trainer, data: Split,
                  args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    """The lrs of the test, each step's mean loss until the smoothed loss passes 4x its lowest (or is not
    finite), and the images those steps took (a pass over the set ends in a shorter step). --bias-lr-scale and
    Muon's own lr keep their ratio to --lr."""
    start, end, n = args.find_lr_start, args.find_lr_end, args.find_lr_steps
    lrs = [start * (end / start) ** (i / (n - 1)) for i in range(n)]
    losses, sizes, summed = [], [], [0.0]

    def epoch(n: int) -> Iterator[tuple[torch.Tensor, Sequence[tuple[torch.Tensor, torch.Tensor]]]]:
        groups = epoch_plan(len(data), args.seed, n, data.labels.device, args.crop_pad, args.alt_flip,
                            args.color_jitter, data.labels if args.balanced_sampler else None, data.shard_counts
                            )[:t.images_per_epoch].split(args.batch_size * args.accum_steps)
        parts = [trainer.micro_parts(group, 0, 1, args.batch_size, t.mix is not None) for group in groups]
        steps = data.steps(parts, n, args.augment, args.crop_pad, args.channels_last, partnered=t.mix is not None)
        return ((group, micro if t.mix is None else MixedBatches(micro, t.mix, n, step))  # (--mixup, --cutmix)
                for step, (group, micro) in enumerate(zip(groups, steps)))

    def steps() -> Iterator[tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], int]]:
        for lr, (group, micro_batches) in zip(lrs, (step for n in range(1, 10_001) for step in epoch(n))):
            smoothed = smooth(losses)
            if smoothed and (not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * min(smoothed)):
                return
            sizes.append(len(group))
            trainer.scale_lr(t.optimizer, lr / args.lr)  # (the step's lr: train_one_epoch leaves it as it is)
            yield micro_batches, len(group)

    def after_step(loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        total = loss_sum.item()  # (a sync per step: this is a 100-step test, not training)
        losses.append((total - summed[0]) / sizes[-1])
        summed[0] = total

    t.step_model.train()
    for m in t.frozen:  # --freeze-backbone
        m.eval()
    trainer.train_one_epoch(t.step_model, t.optimizer, steps(), t.scaler, t.autocast, args.grad_clip,
                          args.label_smoothing, after_step, t.class_weights)
    return lrs, losses, sum(sizes[:len(losses)])


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average of the losses, bias-corrected (the first values are not pulled toward 0)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def main(argv: list[str] | None = None) -> float:
    argv = sys.argv[1:] if argv is None else argv
    with cli.one_line_errors("find_lr.py"):
        args, _, _ = runargs.parse_run_args(["--find-lr", *argv], "find_lr.py", __doc__)
        return find_lr(args)


if __name__ == "__main__":
    main()

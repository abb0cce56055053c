"""Evaluate a checkpoint on the test set: loss, accuracy, per-class accuracy and the confusion matrix.

    python evaluate.py --checkpoint runs/cifar10-simplecnn-20261123-120000/best.pth
    python evaluate.py --checkpoint best.pth --data-dir ./data --json

The model, its classes and its normalization come from the checkpoint alone; the data from --data-dir
(default: the one the run was trained with). With the run's --tta and --amp, the accuracy equals the one
train.py reported for it.
"""
import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, ImageSet, load_raw
from model import CheckpointError, load_checkpoint, model_from_checkpoint
from plot import PlotError, plot_confusion, require_matplotlib

EVAL_BATCH = 1024  # images per forward pass; any size gives the same counts


TTA_MODES = ("none", "mirror", "shifts")


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's float logits for batch x, averaged over test-time views. mirror: x and its mirror image.
    shifts: that, averaged with the same for x shifted one pixel up-left and one down-right (6 views)."""
    if tta == "shifts":
        h, w = x.shape[2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
        # the unshifted pair weighs half, the two shifted pairs a quarter each
        return (2 * tta_logits(model, x, "mirror") + sum(tta_logits(model, v, "mirror") for v in shifted)) / 4
    logits = model(x).float()
    return (logits + model(x.flip(3)).float()) / 2 if tta == "mirror" else logits


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, num_classes: int, batch_size: int = EVAL_BATCH,
             tta: str = "none") -> dict:
    """Mean cross-entropy, accuracy (percent) and the confusion matrix (rows = true class) over all of `data`,
    with the test-time views of `tta` (see tta_logits). Under torchrun each process takes every world_size-th
    image and the sums are added up across processes, so every image counts exactly once."""
    model.eval()
    device = data.labels.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for idx in torch.arange(rank, len(data), world, device=device).split(batch_size):
        x, y = data.batch(idx)
        logits = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = max(len(data), 1)
    return {"loss": loss_sum.item() / n, "accuracy": 100.0 * confusion.diag().sum().item() / n,
            "confusion": confusion}


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Percent of each true class predicted right (0 for a class with no samples)."""
    totals = confusion.sum(1).clamp(min=1)
    return (100.0 * confusion.diag() / totals).tolist()


def format_report(result: dict, classes: list[str]) -> str:
    width = max(len(c) for c in classes) + 2
    lines = [f"test loss {result['loss']:.4f}   accuracy {result['accuracy']:.2f}%", "",
             f"{'class':<{width}}accuracy"]
    lines += [f"{c:<{width}}{a:7.2f}%" for c, a in zip(classes, per_class_accuracy(result["confusion"]))]
    cell = max(5, len(str(result["confusion"].max().item())) + 1)
    short = [c[:cell - 1] for c in classes]
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * width + "".join(f"{s:>{cell}}" for s in short)]
    lines += [f"{c:<{width}}" + "".join(f"{v:>{cell}}" for v in row)
              for c, row in zip(classes, result["confusion"].tolist())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"{parser.prog}: error: {message}")  # one line, not the usage block
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pth written by train.py")
    parser.add_argument("--data-dir", metavar="DIR", help="where the dataset is (default: the training run's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="(default: cpu)")
    parser.add_argument("--tta", nargs="?", const="mirror", default="none", choices=TTA_MODES,
                        help="average the logits over the image and its mirror image (--tta or --tta mirror), and "
                             "also over 1-pixel shifts of both (--tta shifts) (default: none)")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"],
                        help="bf16 autocast, as train.py --amp bf16 evaluates (default: off)")
    parser.add_argument("--plot", metavar="PATH", help="also draw the confusion matrix to this PNG (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() or \
            args.device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"{parser.prog}: error: --device {args.device} is not available on this machine")
    try:
        if args.plot:
            require_matplotlib()  # before any work: a missing package is the one message
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt).to(args.device, memory_format=torch.channels_last)  # as train.py
        run_args = ckpt.get("args", {})
        _, _, test_x, test_y, classes = load_raw(run_args.get("dataset", "cifar10"),
                                                 args.data_dir or run_args.get("data_dir", "./data"),
                                                 image_size=ckpt["image_size"])
    except (CheckpointError, DataError, PlotError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
    if classes != ckpt["classes"] or test_x.shape[1:] != (ckpt["in_channels"], ckpt["image_size"],
                                                          ckpt["image_size"]):
        sys.exit(f"{parser.prog}: error: the data in the data dir does not match the checkpoint's classes or shape")
    test = ImageSet(test_x.to(args.device), test_y.to(args.device),
                    torch.tensor(ckpt["mean"], device=args.device), torch.tensor(ckpt["std"], device=args.device))
    with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.amp == "bf16"):
        result = evaluate(model, test, len(classes), tta=args.tta)
    if args.json:
        print(json.dumps({"accuracy": result["accuracy"], "loss": result["loss"],
                          "per_class_accuracy": dict(zip(classes, per_class_accuracy(result["confusion"]))),
                          "confusion_matrix": result["confusion"].tolist()}))
    else:
        print(format_report(result, classes))
    if args.plot:
        try:
            plot_confusion(result["confusion"], classes, args.plot)
        except PlotError as e:
            sys.exit(f"{parser.prog}: error: {e}")
        if not args.json:
            print(f"confusion matrix drawn to {args.plot}")
    return result


if __name__ == "__main__":
    main()

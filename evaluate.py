"""Evaluate a checkpoint on the test set: loss, accuracy (top-5 too, for more than 5 classes), the measures that
weigh every class alike (balanced accuracy, macro precision, recall and F1), per-class accuracy and the confusion
matrix.

    python evaluate.py --checkpoint runs/seed/best.pth
    python evaluate.py --checkpoint best.pth --data-dir ./data --json
    python evaluate.py --checkpoint best.pth --show predictions.png   # test images, true and predicted labels
    python evaluate.py --checkpoint runs/my-photos                    # a run folder: its best.pth

The model, its classes and its normalization come from the checkpoint alone; the data from --data-dir
(default: the one the run was trained with). By default the test runs as the run's own final test did (its --tta
and --amp), so the accuracy equals the one in its results.json.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly

import argparse
import json
import math
from pathlib import Path

import torch

import runtime
import tarshards
import stream
from checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint, run_batch_size
from data import ImageSet, Split, load_test
from decode import MAX_IMAGE_PIXELS, Prep
from folders import split_listing
from formats import DataError
from model import EVAL_BATCH, MEASURES, TTA_MODES, as_decimal, confusion_metrics, evaluate, tta_logits
from plot import check_output, plot_confusion, plot_predictions, require_matplotlib


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Percent of each true class predicted right (0 for a class with no samples), in float64 and as the decimal it
    is (float32 would print 72.6 as 72.5999984741211)."""
    totals = confusion.sum(1).clamp(min=1).double()
    return [as_decimal(a) for a in (100.0 * confusion.diag().double() / totals).tolist()]


def json_report(result: dict, classes: list[str], tta: str, amp: str) -> str:
    """--json's object: model.evaluate's `result` on a test set of `classes`, tested with `tta` and `amp`."""
    return json.dumps({"accuracy": result["accuracy"], "loss": result["loss"],
                       **({"top5": result["top5"]} if len(classes) > 5 else {}),
                       **{k: result[k] for k in MEASURES}, "images": int(result["confusion"].sum()),
                       "skipped": result["skipped"], "tta": tta, "amp": amp,
                       "per_class_accuracy": dict(zip(classes, per_class_accuracy(result["confusion"]))),
                       "confusion_matrix": result["confusion"].tolist()})


def format_report(result: dict, classes: list[str]) -> str:
    classes = [cli.printable(c) for c in classes]  # a class name cannot break a line or send the terminal escapes
    width = max(cli.columns(c) for c in [*classes, "class"]) + 2  # (a wide character, as 猫, takes two columns)
    top5 = "" if math.isnan(result.get("top5", math.nan)) else f"   top-5 {result['top5']:.2f}%"
    m = confusion_metrics(result["confusion"])
    skipped = f" ({result['skipped']:,} unreadable images skipped)" if result.get("skipped") else ""
    lines = [f"test loss {result['loss']:.4f}   accuracy {result['accuracy']:.2f}%{top5}{skipped}",
             f"balanced accuracy {m['balanced_accuracy']:.2f}%   macro precision {m['macro_precision']:.2f}%   "
             f"recall {m['macro_recall']:.2f}%   F1 {m['macro_f1']:.2f}%", "", cli.fit("class", width) + "accuracy"]
    lines += [f"{cli.fit(c, width)}{a:7.2f}%" for c, a in zip(classes, per_class_accuracy(result["confusion"]))]
    cell = max(5, len(str(result["confusion"].max().item())) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * width + "".join(" " + cli.fit(c, cell - 1, right=True) for c in classes)]
    lines += [cli.fit(c, width) + "".join(f"{v:>{cell}}" for v in row)
              for c, row in zip(classes, result["confusion"].tolist())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser("evaluate.py", __doc__)
    p.add_argument("--checkpoint", required=True, metavar="PATH", type=cli.path_flag,
                   help="a .pth written by train.py, or a run folder (its best.pth)")
    p.add_argument("--data-dir", metavar="DIR", type=cli.path_flag,
                   help="where the dataset is (default: the training run's)")
    p.add_argument("--max-image-pixels", type=int, metavar="N", help="imagefolder: a file that would decode to more "
                   f"pixels is skipped (default: the run's --max-image-pixels, else {MAX_IMAGE_PIXELS:,})")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass: the same numbers for "
                   "any N, a larger N only takes more memory (default: the run's --eval-batch-size or --batch-size)")
    runtime.add_device_flag(p)
    p.add_argument("--tta", nargs="?", const="mirror", choices=TTA_MODES,
                   help="average the logits over the image and its mirror image (--tta or --tta mirror), and also "
                        "over 1-pixel shifts of both (--tta shifts) (default: the run's)")
    p.add_argument("--amp", choices=runtime.AMP_MODES, help="autocast precision (default: the run's)")
    p.add_argument("--plot", metavar="PATH", type=cli.path_flag,
                   help="also draw the confusion matrix to this picture: .png, .svg or .pdf (needs matplotlib)")
    p.add_argument("--show", metavar="PATH", type=cli.path_flag,
                   help="also draw test images with their true and predicted labels to this picture: the most "
                        "confident mistakes first, then the first test images (needs matplotlib)")
    p.add_argument("--show-count", type=int, default=32, metavar="N",
                   help="how many images --show draws, 1 to 256 (default: 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    with cli.one_line_errors("evaluate.py"):
        args = p.parse_args(argv)
        return report(args)


def check_flags(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The checks that need no file read: the checkpoint's path, and the pictures asked for (matplotlib there, and
    neither picture on the checkpoint nor on the other)."""
    if not 1 <= args.show_count <= 256:
        raise DataError("--show-count must be in [1, 256]")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise DataError("--max-image-pixels must be at least 1")
    if args.batch_size is not None and not 1 <= args.batch_size <= 2**31:
        raise DataError("--batch-size must be in [1, 2**31]")
    pictures = [picture for picture in (args.plot, args.show) if picture is not None]
    if pictures:
        require_matplotlib()  # before any work: a missing package is the one message
    if args.plot and args.show and Path(args.plot).resolve() == Path(args.show).resolve():
        raise DataError(f"--plot and --show both name {args.show}; give each its own file")
    checkpoint = checkpoint_path(args.checkpoint, "evaluating")
    for picture in pictures:
        check_output(picture, inputs=(checkpoint,))
    return checkpoint, pictures


def report(args: argparse.Namespace) -> dict:
    """Test the checkpoint as the flags ask, print the report (or its JSON), draw the pictures; returns the
    result of model.evaluate."""
    checkpoint, pictures = check_flags(args)
    device = runtime.pick_device(args.device)
    ckpt = load_checkpoint(checkpoint)
    run_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    tta = args.tta or run_args.get("tta", "none")
    amp = args.amp or run_args.get("amp", "off")
    if tta not in TTA_MODES or amp not in runtime.AMP_MODES:
        raise DataError(f"{checkpoint} records --tta {cli.shorten(repr(tta), 50)} / --amp "
                        f"{cli.shorten(repr(amp), 50)}; give --tta and --amp")
    model = model_from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)  # as train.py
    dataset, data_dir = run_args.get("dataset", "cifar10"), args.data_dir or run_args.get("data_dir", "./data")
    if not isinstance(dataset, str) or not isinstance(data_dir, str):
        raise DataError(f"{checkpoint} does not say which dataset it was trained on")
    for picture in pictures:  # now that the data is known: no picture may land on it or among it
        check_output(picture, inputs=(checkpoint, data_dir))
    classes = ckpt["classes"]
    max_pixels = args.max_image_pixels or run_args.get("max_image_pixels")  # (the run's skipped what it skipped)
    max_pixels = max_pixels if isinstance(max_pixels, int) and max_pixels >= 1 else MAX_IMAGE_PIXELS
    test = test_set(ckpt, dataset, data_dir, max_pixels, device)
    batch = args.batch_size or run_batch_size(run_args)
    with runtime.autocast(amp, device):
        result = evaluate(model, test, len(classes), batch, tta=tta)
    if not math.isfinite(result["loss"]):  # finite weights can still overflow: say so rather than report NaN
        raise DataError(f"the model's outputs are not finite numbers on this data; {checkpoint} is unusable")
    if args.json:
        cli.say(json_report(result, classes, tta, amp))
    else:
        cli.say(f"{'TTA ' + tta if tta != 'none' else 'no TTA'}, amp {amp}\n{format_report(result, classes)}")
    if args.plot:
        plot_confusion(result["confusion"], classes, args.plot)
        if not args.json:
            cli.say(f"confusion matrix drawn to {args.plot}")
    if args.show:
        with runtime.autocast(amp, device):
            shown = show_predictions(model, test, classes, tta, args.show_count, args.show, batch)
        if not args.json:
            cli.say(f"{shown} test images with their predictions drawn to {args.show}")
    return result


def test_set(ckpt: dict, dataset: str, data_dir: str, max_pixels: int, device: torch.device) -> Split:
    """The test split, prepared as the checkpoint's run prepared it: in memory, or streamed from disk for the photo
    recipe (its centre crops), normalized with the run's statistics."""
    mean, std = (torch.tensor(ckpt[k], device=device) for k in ("mean", "std"))
    prep = Prep.from_dict(ckpt.get("prep"))
    if dataset == "shards":  # (streamed, whatever the recipe)
        tables, classes = tarshards.load(data_dir, test_only=True)
        numbered = classes == [str(c) for c in range(len(classes))]  # (no classes.txt: the .cls numbers)
        if classes != ckpt["classes"] and not (numbered and len(classes) <= len(ckpt["classes"])):
            raise DataError(f"the classes of the shards in {data_dir} are not the checkpoint's; give --data-dir the "
                            f"data the model was trained on")
        test = stream.shard_set(tables["test"], ckpt["image_size"], max_pixels, prep, 0, device,
                                stream.default_workers())
        test.mean, test.std = mean, std
        return test
    if dataset == "imagefolder" and prep.mode == "crop":
        names, labels = split_listing(Path(data_dir), "test", ckpt["classes"], against="the checkpoint's")
        test = stream.stream_set(Path(data_dir), names, labels, ckpt["image_size"], max_pixels, prep, 0, device,
                                 stream.default_workers())
        test.mean, test.std = mean, std
        return test
    test_x, test_y = load_test(dataset, data_dir, ckpt["classes"], ckpt["image_size"], max_pixels)
    if test_x.shape[1] != ckpt["in_channels"]:
        raise DataError(f"the {dataset} images in {data_dir} have {test_x.shape[1]} channels, the checkpoint's model "
                        f"takes {ckpt['in_channels']}; give --data-dir the data the model was trained on")
    return ImageSet(test_x.to(device), test_y.to(device), mean, std)


@torch.no_grad()
def show_predictions(model: torch.nn.Module, test: Split, classes: list[str], tta: str, count: int,
                     path: str, batch_size: int = EVAL_BATCH) -> int:
    """Draw `count` test images with true and predicted labels: the most confident mistakes first (up to half of
    them), then the first test images not among those, right or wrong. Returns how many were drawn."""
    probs, labels, index = zip(*((tta_logits(model, x, tta).softmax(1), y, i)
                                 for x, y, i in test.indexed_batches(torch.arange(len(test)), batch_size)))
    probs, labels, index = torch.cat(probs), torch.cat(labels), torch.cat(index).cpu()  # (index: of the images read)
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().squeeze(1)
    worst = wrong[confidence[wrong].argsort(descending=True, stable=True)][:(count + 1) // 2]
    rest = torch.ones(len(probs), dtype=torch.bool, device=probs.device)
    rest[worst] = False
    chosen = torch.cat([worst, rest.nonzero().squeeze(1)[:count - len(worst)]]).cpu()
    plot_predictions(test.take(index[chosen]).cpu(), labels.cpu()[chosen].tolist(), predicted.cpu()[chosen].tolist(),
                     confidence.cpu()[chosen].tolist(), classes, path,
                     title=f"the {len(worst)} most confident mistakes (red), then the first test images "
                           f"({len(wrong)} mistakes in {len(probs)} images)")
    return len(chosen)


if __name__ == "__main__":
    main()

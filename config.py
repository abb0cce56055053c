"""train.py's command line: the presets, the flags in groups (`python train.py --help`) and their checks.
find_lr.py takes the same flags.

A preset replaces the parser's defaults; flags given on the command line still win. How a run's flags are put
together (a --config file, --resume and what it lets change): runargs.py.
"""
import argparse
import copy
import math
import os
import textwrap

import cli
import runtime
from augment import MAGNITUDES, POLICIES
from decode import INTERPOLATIONS, MAX_IMAGE_PIXELS, PREP_MODES, SQUASH, Prep
from formats import DATASETS, FILE_SETS
from model import MODELS, TTA_MODES, AirNet, ResNet9, check_model_name, pretrained_weights, torchvision_models


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


def build_parser(prog: str = "train.py", doc: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags, in the groups --help shows; the presets' flags below them."""
    presets = [f"--preset {name} sets:\n" + textwrap.fill(  # (a no-break space keeps each flag with its value)
        "  ".join(flag.replace(" ", "\xa0") for flag in preset_flags(name)), 79, initial_indent="  ",
        subsequent_indent="  ", break_on_hyphens=False).replace("\xa0", " ") for name in PRESETS if PRESETS[name]]
    p = cli.parser(prog, doc, "\n\n".join(presets))
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS),
                   help="a named recipe (the defaults are the seed recipe's; what fast sets: at the end); flags "
                        "given override it (default: seed)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, metavar="NAME",
                   help=f"{', '.join(DATASETS)}. imagefolder: your own images, one folder per class under "
                        f"DIR/train and DIR/test; shards: tar shards in WebDataset's layout (shards.py writes them; "
                        f"DIR: their folder, a URL folder, a brace pattern or a list file) (default: cifar10)")
    g.add_argument("--data-dir", default="./data", metavar="DIR",
                   help="where datasets are found or downloaded (default: ./data)")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help="side of the model's input, 8 to 1024: CIFAR and MNIST are resized to it once, in memory; an "
                        "image folder held in memory (squash) is decoded to it once, one streamed from disk (the "
                        "photo recipe, --workers) is shaped to it file by file by the workers (default: the "
                        "dataset's own: 32 for CIFAR, 28 for MNIST; 32 for imagefolder, with --pretrained the "
                        "weights' own)")
    g.add_argument("--val-split", type=float, default=0.1, metavar="F",
                   help="fraction of the training set held out for validation, 0 = none (default: 0.1)")
    g.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help="imagefolder: a file that would decode to more pixels is skipped with a warning, read from "
                        "its header (default: %(default)s)")
    add_photo_flags(p)
    add_model_flags(p)
    add_training_flags(p)
    add_regularization_flags(p)
    add_rare_class_flags(p)
    add_evaluation_flags(p)
    add_run_flags(p)
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and starting weights")
    g.add_argument("--model", default="simplecnn", metavar="NAME",
                   help="simplecnn, resnet9, airnet, or any torchvision classification model by its name (resnet18, "
                        "mobilenet_v3_small, efficientnet_b0, ...); --list-models lists them (default: simplecnn)")
    g.add_argument("--list-models", action=ListModels, help="print the names --model takes, and exit")
    g.add_argument("--widths", type=widths_list, metavar="A,B,...",
                   help="channels per stage: four for resnet9 (default: %s), three for airnet (default: %s)"
                        % tuple(",".join(map(str, m.DEFAULT_WIDTHS)) for m in (ResNet9, AirNet)))
    g.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's default weights for --model (from torch's cache, "
                        "$TORCH_HOME/hub/checkpoints, or downloaded there), with a new classifier")
    g.add_argument("--init-from", metavar="PATH", help="start from the weights of a train.py checkpoint of the "
                   "same --model (a new classifier where the classes differ)")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="with --pretrained or --init-from: train the classifier only; the rest, BatchNorm "
                        "statistics included, keeps its loaded weights")


def add_photo_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("photos")
    g.add_argument("--workers", type=int, metavar="N",
                   help="imagefolder: stream the files from disk, read by N DataLoader worker processes (0: by the "
                        "training process), for either recipe; same weights for any N (default: the photo recipe, "
                        "--resize-mode crop, streams with one worker per core, at most 8; a squash folder is held "
                        "in memory when its decoded images fit in half the memory available, else streamed likewise)")
    g.add_argument("--resize-mode", choices=PREP_MODES,
                   help="squash: each image resized whole to a square, its aspect ratio lost (--augment: pad-crop and "
                        "flip); crop: torchvision's photo recipe: training takes a random resized crop and a flip, "
                        "evaluation resizes the shorter side and crops the centre (default: crop for image folders "
                        "above 32 px and with --pretrained, squash otherwise)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LOW", "HIGH"),
                   help="crop, training: the share of the image's area a crop covers (default: 0.08 1.0)")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("LOW", "HIGH"),
                   help="crop, training: the crop's aspect ratio, width / height (default: 0.75 1.333)")
    g.add_argument("--crop-fraction", type=float, metavar="F",
                   help="crop, evaluation: the centre crop's side over the resized shorter side (default: 0.875, "
                        "224 of 256; with --pretrained, the weights' own)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS,
                   help="crop: how images are resized (default: bilinear; with --pretrained, the weights' own)")


def image_prep(args: argparse.Namespace) -> Prep:
    """How the run turns an image file into the model's input (decode.Prep), from the flags: crop for image folders
    above 32 px or with --pretrained, squash otherwise, unless --resize-mode says. With --pretrained, what the flags
    leave open comes from the weights' own preprocessing (weights.transforms()): the side, the crop fraction, the
    interpolation (the mean and std come with the weights already)."""
    mode = args.resize_mode or ("crop" if args.dataset in FILE_SETS and (args.pretrained or (
        args.image_size or 32) > 32) else "squash")
    if mode == "squash":
        return SQUASH
    if args.pretrained:
        preprocess = pretrained_weights(args.model).transforms()
        args.image_size = args.image_size or preprocess.crop_size[0]
        args.crop_fraction = args.crop_fraction or preprocess.crop_size[0] / preprocess.resize_size[0]
        args.interpolation = args.interpolation or preprocess.interpolation.value
    args.image_size = args.image_size or 32
    args.crop_fraction, args.interpolation = args.crop_fraction or 0.875, args.interpolation or "bilinear"
    return Prep("crop", round(args.image_size / args.crop_fraction), args.interpolation,
                tuple(map(float, args.crop_scale)), tuple(map(float, args.crop_ratio)))


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=5, metavar="N",
                   help="passes over the training set (default: 5)")
    g.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass, over all processes under torchrun (default: 32)")
    g.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="forward passes per optimizer step; the update equals one batch of N*K images "
                        "(models with BatchNorm: see the README's FAQ) (default: 1)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "muon"],
                   help="muon: Muon for conv filters and hidden linear layers (--muon-lr, --muon-momentum), SGD "
                        "for the rest (--lr, --momentum, --nesterov) (default: adam)")
    g.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="peak learning rate (default: 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False,
                   help="Nesterov momentum for SGD and Muon (--no-nesterov: off where a preset turns it on) "
                        "(default: off)")
    g.add_argument("--muon-lr", type=float, default=0.2, metavar="LR", help="Muon's peak lr: each step moves a "
                   "filter by LR x a matrix whose singular values are ~1 (default: 0.2)")
    g.add_argument("--muon-momentum", type=float, default=0.6, metavar="M",
                   help="Muon's (Nesterov) momentum (default: 0.6)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                   help="L2 penalty; with sgd each step shrinks the weights by lr x WD (default: 0)")
    g.add_argument("--norm-weight-decay", type=float, metavar="WD",
                   help="weight decay of the norm layers' scales and shifts (BatchNorm, LayerNorm, GroupNorm); "
                        "torchvision's recipe: 0 (default: --weight-decay's)")
    g.add_argument("--bias-weight-decay", type=float, metavar="WD",
                   help="weight decay of every bias, norm layers' shifts included (default: --weight-decay's)")
    g.add_argument("--bias-lr-scale", type=float, default=1.0, metavar="S", help="BatchNorm shifts learn with S x "
                   "the lr (their weight decay / S, the same decay per step) (default: 1)")
    g.add_argument("--grad-clip", type=float, default=0.0, metavar="NORM",
                   help="max global gradient norm, 0 = off (default: 0)")

    g = p.add_argument_group("schedule and stopping")
    g.add_argument("--scheduler", default="none", choices=["none", "step", "cosine", "linear"],
                   help="lr schedule over all steps after warm-up: step = x0.1 at 50%% and 75%%, cosine or linear "
                        "decay to 0 (default: none)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, metavar="E",
                   help="ramp the lr linearly from 0 over the first E epochs (default: 0)")
    g.add_argument("--patience", type=int, default=0, metavar="N",
                   help="stop after N epochs without validation improvement (--best-by), 0 = off (default: 0)")
    g.add_argument("--min-delta", type=float, default=0.0, metavar="D",
                   help="smallest change of --best-by's measure that counts as improvement (default: 0)")
    g.add_argument("--best-by", default="val_loss", choices=["val_loss", "val_acc"],
                   help="what best.pth and --patience go by: the lowest validation loss or the highest validation "
                        "accuracy (default: val_loss)")


def add_regularization_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("regularization and augmentation")
    g.add_argument("--label-smoothing", type=float, default=0.0, metavar="S",
                   help="train towards 1-S on the true class and S spread over all classes, not 1 (default: 0)")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="evaluate and save an exponential moving average of the weights, updated every step, "
                        "0 = off (default: 0)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False, help="squashed images: "
                   "random crop (from an image padded by mirroring) and horizontal flip (default: off)")
    g.add_argument("--crop-pad", type=int, default=4, metavar="PX",
                   help="--augment's crops shift images by up to PX pixels (default: 4)")
    g.add_argument("--alt-flip", action=argparse.BooleanOptionalAction, default=False, help="--augment flips "
                   "each image in every other epoch, not at random (default: off)")
    g.add_argument("--color-jitter", type=float, default=0.0, metavar="S",
                   help="scale each image's brightness, then its contrast, by factors drawn in [1-S, 1+S] each epoch "
                        "(the beginner guide's ColorJitter(0.2, 0.2) is 0.2), 0 = off (default: 0)")
    g.add_argument("--auto-augment", choices=POLICIES,
                   help="each training image through a torchvision augmentation policy, drawn per image: ta_wide "
                        "(TrivialAugment), ra (RandAugment), augmix, imagenet (AutoAugment's ImageNet policy) "
                        "(default: none)")
    g.add_argument("--auto-augment-magnitude", type=int, metavar="M",
                   help="ra: the magnitude, 0 to 30 (default: 9); augmix: the severity, 1 to 10 (default: 3)")
    g.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                   help="erase a random box of each training image with probability P, to the mean colour "
                        "(torchvision's RandomErasing; the reference recipe's 0.1), 0 = off (default: 0)")
    g.add_argument("--mixup-alpha", type=float, default=0.0, metavar="A",
                   help="mixup: blend each image and its target with another's, in a Beta(A, A) proportion drawn "
                        "per step (the reference recipe's 0.2), 0 = off (default: 0)")
    g.add_argument("--cutmix-alpha", type=float, default=0.0, metavar="A",
                   help="cutmix: paste a box of another image, its target mixed by area, Beta(A, A) per step (the "
                        "reference recipe's 1.0); with --mixup-alpha, each step one of the two, 0 = off (default: 0)")
    g.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds init, split, order and augmentation (default: 0)")


def add_rare_class_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rare classes")
    g.add_argument("--class-weights", default="none", choices=["none", "balanced"],
                   help="balanced: each class's loss weighted by the inverse of its share of the training images "
                        "(scikit-learn's \"balanced\": the weights average 1 over the images) (default: none)")
    g.add_argument("--class-weights-from-epoch", type=int, default=1, metavar="E",
                   help="--class-weights from epoch E on, plain loss before (deferred re-weighting) (default: 1)")
    g.add_argument("--balanced-sampler", action="store_true",
                   help="draw each epoch class-balanced: every class an equal share of the epoch's images, a rare "
                        "class's repeated (from the seed and epoch, as the order)")


def add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--tta", nargs="?", const="mirror", default="none", choices=TTA_MODES,
                   help="final test: average the logits over the image and its mirror image (--tta or --tta "
                        "mirror), and also over 1-pixel shifts of both (--tta shifts, 3x the cost) (default: none)")
    g.add_argument("--eval-batch-size", type=int, metavar="N",
                   help="images per forward pass in validation and the final test, over all processes: the same "
                        "numbers for any N, a larger N only takes more memory (default: --batch-size)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware and precision")
    runtime.add_device_flag(g)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout: same math, faster convolutions on CPU and tensor-core GPUs (default: on)")
    g.add_argument("--amp", default="off", choices=runtime.AMP_MODES,
                   help="mixed precision: bf16 on CUDA or a CPU with bf16 units, fp16 on CUDA (default: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs, for long runs)")

    g = p.add_argument_group("watching and tracking")
    g.add_argument("--log-interval", type=int, metavar="N",
                   help="every N optimizer steps, a line with the epoch's running loss and accuracy, images/s and "
                        "ETA; 0 = off (default: on a terminal, one live line updated 20 times per epoch; in a log, "
                        "a line at most once a minute)")
    # (--no-mlflow and the like: a resumed run may turn them off)
    g.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=False,
                   help="record the run in MLflow: MLFLOW_TRACKING_URI, else sqlite:///<out-dir's parent>/mlflow.db "
                        "(runs/mlflow.db) (default: off)")
    g.add_argument("--mlflow-log-checkpoints", action=argparse.BooleanOptionalAction, default=False,
                   help="--mlflow also keeps best.pth and last.pth as artifacts at the end (they can be large) "
                        "(default: off)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="write TensorBoard event files to <out-dir>/tensorboard (tensorboard --logdir runs) "
                        "(default: off)")

    g = p.add_argument_group("learning-rate range test")
    g.add_argument("--find-lr", action="store_true",
                   help="instead of training: the lr range test of find_lr.py (python find_lr.py takes the same flags)")
    g.add_argument("--find-lr-start", type=float, default=1e-6, metavar="LR", help="first lr (default: 1e-6)")
    g.add_argument("--find-lr-end", type=float, default=10.0, metavar="LR",
                   help="last lr, reached unless the loss explodes first (default: 10)")
    g.add_argument("--find-lr-steps", type=int, default=100, metavar="N",
                   help="optimizer steps, the lr rising exponentially (default: 100)")

    g = p.add_argument_group("run folder and resume")
    g.add_argument("--out-dir", metavar="DIR",
                   help="the run's folder: checkpoints, metrics.csv, results.json, curves.png (default: "
                        "runs/<dataset>-<model>-<date-time>, or the --resume folder)")
    g.add_argument("--resume", metavar="PATH", help="continue from a last.pth; flags not given are the run's own "
                   "(docs: which flags may change)")
    g.add_argument("--config", metavar="FILE", help="take the flags from FILE, a JSON object like a run's args.json; "
                   "flags given on the command line override it")


def preset_flags(name: str) -> list[str]:
    """The flags that set what preset `name` sets, each with its value ("--epochs 11")."""
    def value(v: object) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return [f"--{dest.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {value(v)}")
            for dest, v in PRESETS[name].items() if v is not False]  # (a preset turns switches on only)


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


# The smallest sensible value of each real-valued flag (and whether 0 is allowed: off). Below it a value is lost:
# numbers below ~1e-38 are flushed to 0 on the CPU (train.py: torch.set_flush_denormal), so that --grad-clip 5e-324
# would silently zero every gradient and --weight-decay 1e-320 silently turn it off. (Large values are honoured:
# an lr so large that the loss diverges stops the run with one line that says what to do.)
SMALLEST = {"lr": (1e-10, False), "muon_lr": (1e-10, False), "bias_lr_scale": (1e-6, False),
            "grad_clip": (1e-8, True), "weight_decay": (1e-12, True), "momentum": (1e-6, True),
            "muon_momentum": (1e-6, True), "label_smoothing": (1e-6, True), "ema": (1e-6, True),
            "min_delta": (1e-12, True), "val_split": (1e-6, True), "color_jitter": (1e-6, True),
            "warmup_epochs": (1e-6, True), "find_lr_start": (1e-12, False), "find_lr_end": (1e-12, False),
            "norm_weight_decay": (1e-12, True), "bias_weight_decay": (1e-12, True), "random_erase": (1e-6, True),
            "mixup_alpha": (1e-3, True), "cutmix_alpha": (1e-3, True)}
# (--crop-scale, --crop-ratio and --crop-fraction have bounds of their own, away from 0: decode.Prep.problem.)


def too_small(args: argparse.Namespace) -> str | None:
    """The first real-valued flag below its smallest sensible value (SMALLEST), as a message, or None."""
    for dest, (low, zero_off) in SMALLEST.items():
        value = getattr(args, dest)
        if value is not None and not (value == 0 and zero_off or value >= low):  # (None: not given, the default)
            return (f"--{dest.replace('_', '-')} {value:g} is too small to act: give {'0 (off) or ' * zero_off}at "
                    f"least {low:g}")
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a message, or None: a value out of its range, then flags that do
    not go together, then a value too small to act (too_small), an unknown model, a photo recipe that cannot be."""
    rules = [*range_rules(args), *combination_rules(args)]
    problem = next((message for ok, message in rules if not ok), None) or too_small(args)
    try:
        check_model_name(args.model)
    except ValueError as e:
        problem = problem or str(e)
    return problem or recipe_problem(args)


def number_in(x: float, low: float, high: float) -> bool:
    """Whether x is a finite number in [low, high)."""
    return math.isfinite(x) and low <= x < high


def range_rules(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """(whether the flag's value is in its range, the message when not), for each flag that has one."""
    return [
        (1 <= args.epochs <= 10_000, "--epochs must be in [1, 10000]"),  # epoch_plan's seeds are distinct to 10,000
        (1 <= args.batch_size <= 2**31, "--batch-size must be in [1, 2**31]"),
        (1 <= args.accum_steps <= 2**20, "--accum-steps must be in [1, 2**20]"),
        (args.eval_batch_size is None or 1 <= args.eval_batch_size <= 2**31, "--eval-batch-size must be in [1, 2**31]"),
        (math.isfinite(args.lr) and args.lr > 0, "--lr must be a positive number"),
        (number_in(args.momentum, 0, 1), "--momentum must be in [0, 1)"),
        (math.isfinite(args.muon_lr) and args.muon_lr > 0, "--muon-lr must be a positive number"),
        (number_in(args.muon_momentum, 0, 1), "--muon-momentum must be in [0, 1)"),
        (number_in(args.weight_decay, 0, math.inf), "--weight-decay must be >= 0"),
        (all(d is None or number_in(d, 0, math.inf) for d in (args.norm_weight_decay, args.bias_weight_decay)),
         "--norm-weight-decay and --bias-weight-decay must be >= 0"),
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
        (args.workers is None or 0 <= args.workers <= 256, "--workers must be in [0, 256]"),
        (args.crop_fraction is None or 0.05 <= args.crop_fraction <= 1, "--crop-fraction must be in [0.05, 1]"),
        (1 <= args.class_weights_from_epoch <= args.epochs, "--class-weights-from-epoch must be in [1, --epochs]"),
        (args.auto_augment_magnitude is None or args.auto_augment not in MAGNITUDES or
         MAGNITUDES[args.auto_augment][1] <= args.auto_augment_magnitude <= MAGNITUDES[args.auto_augment][2],
         "--auto-augment-magnitude must be in [0, 30] for ra (its magnitude), [1, 10] for augmix (its severity)"),
        (0 <= args.random_erase <= 1, "--random-erase must be in [0, 1] (a probability; 0 = off)"),
        (number_in(args.mixup_alpha, 0, math.inf), "--mixup-alpha must be >= 0 (0 = off)"),
        (number_in(args.cutmix_alpha, 0, math.inf), "--cutmix-alpha must be >= 0 (0 = off)"),
        (number_in(args.color_jitter, 0, 1), "--color-jitter must be in [0, 1) (0 = off)"),
        (args.max_image_pixels >= 1, "--max-image-pixels must be at least 1"),
        (0 <= args.seed < 2**48, "--seed must be in [0, 2**48)"),
        (args.log_interval is None or args.log_interval >= 0, "--log-interval must be >= 0 (0 = off)"),
        (all(p != "" for p in (args.out_dir, args.resume, args.data_dir, args.init_from)),
         "--out-dir, --resume, --data-dir and --init-from must not be empty"),
        (0 < args.find_lr_start < args.find_lr_end < math.inf, "--find-lr-start and --find-lr-end must be "
                                                               "positive, the start below the end"),
        (10 <= args.find_lr_steps <= 10_000, "--find-lr-steps must be in [10, 10000]"),
    ]


def combination_rules(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """(whether the flags go together, the message when not), for the flags that need or exclude others."""
    return [
        (args.dataset in FILE_SETS or args.resize_mode != "crop" and args.workers is None,
         f"--resize-mode crop and --workers are for image files (--dataset imagefolder or shards); {args.dataset} "
         f"is held in memory and squashed: leave them out"),
        (args.dataset != "shards" or not args.balanced_sampler,
         "--balanced-sampler draws images in any order, and shards are read front to back: give --class-weights "
         "balanced (with --class-weights-from-epoch) instead"),
        (args.class_weights == "balanced" or args.class_weights_from_epoch == 1,
         "--class-weights-from-epoch needs --class-weights balanced"),
        (args.auto_augment_magnitude is None or args.auto_augment in MAGNITUDES,
         "--auto-augment-magnitude is for --auto-augment ra or augmix"),
        (not args.nesterov or args.optimizer in ("sgd", "muon") and args.momentum > 0,
         "--nesterov needs sgd or muon, and --momentum above 0"),
        (not (args.pretrained and args.init_from), "--pretrained and --init-from both choose the starting weights: "
                                                   "give one of them"),
        (not args.freeze_backbone or args.pretrained or args.init_from,
         "--freeze-backbone needs --pretrained or --init-from: it trains the classifier on top of loaded weights"),
        (args.mlflow or not args.mlflow_log_checkpoints, "--mlflow-log-checkpoints needs --mlflow"),
        (not args.find_lr or not (args.mlflow or args.tensorboard or os.environ.get("WORLD_SIZE", "1") != "1"),
         "--find-lr runs in one process and records nothing: not with --mlflow, --tensorboard or torchrun"),
    ]


def ineffective(args: argparse.Namespace, dests: set[str]) -> str | None:
    """The first of the flags `dests` (given, with a value other than the run would have without them) that would
    do nothing in this run, as a message naming the way forward, or None. A preset's own values are not given."""
    mode = image_prep(copy.copy(args)).mode  # (check_args has refused a recipe image_prep cannot resolve)
    held = f"; {args.dataset} is held in memory and squashed" if args.dataset not in FILE_SETS else \
        "; this run squashes its images (--resize-mode squash, or an image folder of at most 32 px)"
    photo = (mode == "crop", f"is for the photo recipe (--resize-mode crop){held}: leave it out"
             + ("" if args.dataset not in FILE_SETS else ", or give --resize-mode crop"))
    shapes = "shapes --augment's crops of squashed images"
    acts = {
        "crop_scale": photo, "crop_ratio": photo, "crop_fraction": photo, "interpolation": photo,
        "augment": (mode == "squash" or not args.augment, "pads, crops and flips squashed images, and this run "
                    "takes the photo recipe, which crops and flips already: leave it out, or give --resize-mode "
                    "squash"),
        "crop_pad": (args.augment and mode == "squash", f"{shapes}: give --augment too, or leave it out"
                     if mode == "squash" else f"{shapes}, and this run takes the photo recipe: leave it out"),
        "momentum": (args.optimizer in ("sgd", "muon"), f"is for sgd and muon; {args.optimizer} has none (its "
                                                        f"betas are fixed): leave it out, or give --optimizer sgd"),
        "muon_lr": (args.optimizer == "muon", "is for --optimizer muon: leave it out, or give --optimizer muon"),
        "find_lr_start": (args.find_lr, "is for the lr range test (find_lr.py, or --find-lr): leave it out"),
        "max_image_pixels": (args.dataset in FILE_SETS, f"limits image files (an image folder's, shards'), and "
                                                            f"{args.dataset} has none: leave it out"),
    }
    acts |= {"alt_flip": (acts["crop_pad"][0] or not args.alt_flip, acts["crop_pad"][1]),
             "muon_momentum": acts["muon_lr"], "find_lr_end": acts["find_lr_start"],
             "find_lr_steps": acts["find_lr_start"]}
    return next((f"{shown_flag(d, getattr(args, d))} has no effect here: it {why}"
                 for d, (ok, why) in acts.items() if d in dests and not ok), None)


def recipe_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the run's photo recipe (--resize-mode and its flags, as image_prep resolves them), by
    the rule a checkpoint's recipe is checked by (decode.Prep.problem), or None."""
    resolved = copy.copy(args)
    try:
        prep = image_prep(resolved)
    except ValueError as e:  # (--pretrained of a model without weights)
        return str(e)
    scale, ratio = tuple(map(float, args.crop_scale)), tuple(map(float, args.crop_ratio))
    return Prep(prep.mode, prep.resize_size, prep.interpolation, scale, ratio).problem(resolved.image_size or 8)


def parse_args(argv: list[str], prog: str = "train.py", doc: str | None = None) -> argparse.Namespace:
    """The flags: those given, then the preset's, then the parser's defaults. A preset's values follow the flags
    given: its warm-up keeps its share of the --epochs given (--preset fast --epochs 2: 2/11 of its 2 epochs), and
    its --nesterov goes with an --optimizer that has none."""
    parser = build_parser(prog, doc)
    preset = PRESETS[parser.parse_known_args(argv)[0].preset]
    parser.set_defaults(**preset)  # so that explicit flags override the preset
    args = parser.parse_args(argv)
    given = given_flags(argv) if preset else set()
    if "warmup_epochs" in preset and args.epochs != preset["epochs"] and "warmup_epochs" not in given:
        args.warmup_epochs = preset["warmup_epochs"] * args.epochs / preset["epochs"]
    if preset.get("nesterov") and args.optimizer not in ("sgd", "muon") and "nesterov" not in given:
        args.nesterov = False  # (Adam has no Nesterov momentum)
    return args


def given_flags(argv: list[str]) -> set[str]:
    """The flags (as argparse dests) given on the command line, as opposed to defaulted."""
    unset = object()
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parse_args([]))})
    build_parser().parse_args(argv, namespace=namespace)  # argparse leaves attributes that are already set alone
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def shown_flag(dest: str, value: object) -> str:
    """A flag with its value as the command line spells it (--crop-scale 0.08 1.0, --widths 8,8,8, --no-augment)."""
    action = next(a for a in build_parser()._actions if a.dest == dest)
    flag = action.option_strings[0]
    if value is None:  # (the default of a flag that was not given: --widths as the model has them)
        return f"no {flag}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}" if isinstance(action, argparse.BooleanOptionalAction) else \
            f"no {flag}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {(' ' if action.nargs == 2 else ',').join(map(str, value))}"
    return f"{flag} {value}"



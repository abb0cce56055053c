"""Train an image classifier on CIFAR-10, MNIST, Fashion-MNIST or your own image folders.

    python train.py                                 # the seed recipe: SimpleCNN, Adam 1e-3, batch 32, 5 epochs
    python train.py --preset fast                   # AirNet recipe sized for a laptop CPU (see README)
    python train.py --dataset fashion-mnist --epochs 10 --augment --scheduler cosine
    python train.py ...same flags... --resume runs/cifar10-simplecnn-20261123-120000/last.pth
    torchrun --nproc_per_node 2 train.py ...        # data-parallel (DDP); --batch-size stays the global batch

Each epoch prints one line and appends it to <out-dir>/metrics.csv; <out-dir>/last.pth is written every epoch
and <out-dir>/best.pth whenever the validation loss improves. At the end best.pth is evaluated once on the test
set and <out-dir>/results.json is written. Ctrl-C (or SIGTERM) stops at the next optimizer step, saves a
last.pth that resumes mid-epoch, and prints the command that resumes it.

Measured on a 2-core CPU (AMD EPYC Zen 4, PyTorch 2.14.1; --preset fast: 2.15.0; CIFAR-10 rebuilt from JPEGs):
    python train.py                  61.95% test accuracy, 50 s for the whole command, ~6,500 training images/s
    python train.py --preset fast    89.78% test accuracy (seed 1: 89.77%), 542 s for the whole command,
                                     ~1,080 training images/s (the target was 90% in 10 minutes: not met)
On one H100 GPU this net's 11 epochs train in ~6 s, ~20 s for the whole command (README: GPU figures).
"""
import argparse
import copy
import csv
import ctypes
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import DATASETS, DataError, ImageSet, epoch_plan, prepare
from evaluate import TTA_MODES, evaluate
from model import MODELS, AirNet, CheckpointError, ResNet9, build_model, load_checkpoint, model_from_checkpoint

# Named recipes. A preset replaces the defaults; flags given on the command line still win.
PRESETS = {
    "seed": {},  # the parser's defaults: the seed guide's SimpleCNN, Adam 1e-3, batch 32, 5 epochs, no augmentation
    "fast": {    # AirNet sized for a 2-core CPU; measured in the README
        "model": "airnet", "widths": (32, 192, 192),  # channels of the three stages: 1.07M parameters
        "epochs": 11, "batch_size": 512,  # 512 images per step keep 2 CPU cores as busy as 1024 do, in 2x the steps
        "optimizer": "sgd", "lr": 0.75, "momentum": 0.85, "nesterov": True,  # lr for the batch-mean loss
        "weight_decay": 1.33e-3,          # per unit of lr: each step shrinks the weights by lr x 1.33e-3
        "bias_lr_scale": 64,              # BatchNorm shifts learn 64x faster (AirNet fixes the BN scales)
        "scheduler": "linear", "warmup_epochs": 2,  # one cycle: 0 -> 0.75 over 2 epochs, then linearly to 0
        "label_smoothing": 0.2, "augment": True, "crop_pad": 2, "alt_flip": True,  # shifts of <= 2 px
        "val_split": 0.0, "tta": "shifts", "amp": "bf16",  # all 50,000 images train; 6-view TTA at test
    },
}
METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_seconds", "images_per_s"]
STOP = {"signal": None}  # set by the SIGINT/SIGTERM handler; the loop stops at the next optimizer step


class TrainError(Exception):
    """A run that cannot start or go on: a device that is not there, a mismatched resume, a diverged loss."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"{p.prog}: error: {message}")  # one line, not the usage block
    add = p.add_argument
    add("--preset", default="seed", choices=sorted(PRESETS), help="a named recipe; flags override it (default: seed)")
    add("--dataset", default="cifar10", choices=DATASETS, help="(default: cifar10)")
    add("--data-dir", default="./data", metavar="DIR", help="where datasets are found or downloaded (default: ./data)")
    add("--image-size", type=int, default=32, metavar="PX",
        help="side images are resized to, imagefolder only (default: 32)")
    add("--model", default="simplecnn", choices=sorted(MODELS), help="(default: simplecnn)")
    add("--widths", type=widths_list, metavar="A,B,...",
        help="channels per stage: four for resnet9 (default: %s), three for airnet (default: %s)"
             % tuple(",".join(map(str, m.DEFAULT_WIDTHS)) for m in (ResNet9, AirNet)))
    add("--epochs", type=int, default=5, metavar="N", help="(default: 5)")
    add("--batch-size", type=int, default=32, metavar="N",
        help="images per forward pass, over all processes under torchrun (default: 32)")
    add("--accum-steps", type=int, default=1, metavar="K",
        help="forward passes per optimizer step; the update equals one batch of N*K images (default: 1)")
    add("--lr", type=float, default=1e-3, metavar="LR", help="peak learning rate (default: 1e-3)")
    add("--optimizer", default="adam", choices=["adam", "adamw", "sgd"], help="(default: adam)")
    add("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    add("--nesterov", action="store_true", help="Nesterov momentum for SGD")
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
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="auto = cuda, then mps, then cpu (default: auto)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory layout: same math, faster convolutions on CPU and tensor-core GPUs (default: on)")
    add("--amp", default="off", choices=["off", "bf16", "fp16"],
        help="mixed precision: bf16 on CUDA or a CPU with bf16 units, fp16 on CUDA (default: off)")
    add("--compile", action="store_true", help="torch.compile the model (pays off on GPUs, for long runs)")
    add("--out-dir", metavar="DIR", help="(default: runs/<dataset>-<model>-<date-time>, or the --resume folder)")
    add("--resume", metavar="PATH", help="continue exactly from a last.pth (give the original flags too)")
    return p


def widths_list(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or not all(1 <= w <= 4096 for w in widths):
        raise argparse.ArgumentTypeError(f"expected channel counts in [1, 4096] like 64,128,128, got {text!r}")
    return widths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])  # so that explicit flags override the preset
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a message, or None."""
    def number_in(x, low, high):
        return math.isfinite(x) and low <= x < high
    rules = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.accum_steps >= 1, "--accum-steps must be at least 1"),
        (math.isfinite(args.lr) and args.lr > 0, "--lr must be a positive number"),
        (number_in(args.momentum, 0, 1), "--momentum must be in [0, 1)"),
        (number_in(args.weight_decay, 0, math.inf), "--weight-decay must be >= 0"),
        (math.isfinite(args.bias_lr_scale) and args.bias_lr_scale > 0, "--bias-lr-scale must be a positive number"),
        (number_in(args.warmup_epochs, 0, args.epochs), "--warmup-epochs must be >= 0 and below --epochs"),
        (number_in(args.label_smoothing, 0, 1), "--label-smoothing must be in [0, 1)"),
        (number_in(args.ema, 0, 1), "--ema must be in [0, 1) (0 = off)"),
        (number_in(args.grad_clip, 0, math.inf), "--grad-clip must be >= 0 (0 = off)"),
        (args.patience >= 0, "--patience must be >= 0 (0 = off)"),
        (number_in(args.min_delta, 0, math.inf), "--min-delta must be >= 0"),
        (number_in(args.val_split, 0, 1), "--val-split must be in [0, 1)"),
        (8 <= args.image_size <= 1024, "--image-size must be in [8, 1024]"),
        (0 <= args.crop_pad <= 7, "--crop-pad must be in [0, 7]"),  # mirroring needs a pad below the image side
        (0 <= args.seed < 2**48, "--seed must be in [0, 2**48)"),
        (not args.nesterov or args.optimizer == "sgd" and args.momentum > 0, "--nesterov needs sgd with momentum"),
    ]
    return next((message for ok, message in rules if not ok), None)


# ---------------------------------------------------------------------------------------------------------------
# Devices and processes

def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"--device {name} is not available on this machine")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def start_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world size, local rank). torchrun sets WORLD_SIZE and the rest; a plain run is rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS. By default every block over
    ~32 MB (a batch of activations) is a fresh mmap, returned to the OS when freed, so each training step on the
    CPU page-faults all of its activations in again: 14-19% of a step of AirNet here. True if applied."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)        # serve large blocks from the heap too, never from fresh mmaps
                and libc.mallopt(m_trim_threshold, 2**31 - 1))  # give the heap back only above 2 GiB unused


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def on_stop_signal(signum, frame) -> None:
    if STOP["signal"] is None:
        STOP["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this optimizer step...", file=sys.stderr, flush=True)


def stop_requested(device: torch.device) -> bool:
    """True when any process got SIGINT/SIGTERM: all processes decide together, at the same step, and all
    take the signal that stopped the run as their own."""
    signum = STOP["signal"] or 0
    if dist.is_initialized():
        flag = torch.tensor(signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:  # (never write None here: a signal may have arrived during the all-reduce)
            STOP["signal"] = signum
    return signum != 0


# ---------------------------------------------------------------------------------------------------------------
# The pieces of a step

@dataclass
class Parts:
    model: nn.Module                 # the plain model: checkpoints, EMA and evaluation use it
    step_model: nn.Module            # what a step calls: the model, or it wrapped by DDP and/or torch.compile
    ddp: nn.Module | None            # the DDP wrapper under torchrun, for no_sync()
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only: bf16 has float32's range and needs no loss scaling
    ema: nn.Module | None            # the moving average of the weights, with --ema


def make_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernels compute the same update as the default loop, in one call per step instead of ~10 per
    # parameter tensor: for a small model that is a large share of the step.
    kw = {"lr": args.lr, "weight_decay": args.weight_decay, "fused": device.type in ("cpu", "cuda")}
    # BatchNorm shifts may take larger steps (--bias-lr-scale); their weight decay is divided by the same factor,
    # so that the decay per step, lr x weight decay, stays that of every other weight.
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    trainable = [p for p in model.parameters() if p.requires_grad]  # AirNet freezes its whitening and BN scales
    scale = args.bias_lr_scale
    groups = [{"params": [p for p in trainable if id(p) not in shifts]},
              {"params": [p for p in trainable if id(p) in shifts], "lr": args.lr * scale,
               "weight_decay": args.weight_decay / scale}]
    groups = [g for g in groups if g["params"]]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=args.momentum, nesterov=args.nesterov, **kw)
    return (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(groups, **kw)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based) of `total_steps`."""
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


def autocast(args: argparse.Namespace, device: torch.device):
    if args.amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# Training

def train_one_epoch(parts: Parts, train: ImageSet, args: argparse.Namespace, epoch: int, progress: dict) -> bool:
    """Train epoch `epoch` from optimizer step progress["step"] on (0 unless resuming mid-epoch), adding loss,
    correct count and seconds to `progress`. Returns False when stopped early by a signal, at a step boundary."""
    parts.step_model.train()
    device = train.labels.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    plan = epoch_plan(len(train), args.seed, epoch, device, args.crop_pad, args.alt_flip)  # sample, dy, dx, flip
    groups = plan.split(args.batch_size * args.accum_steps)  # one group = one optimizer step, over all processes
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    finished = True
    sync(device)
    start = time.perf_counter()
    for group in groups[progress["step"]:]:
        if stop_requested(device):
            finished = False
            break
        n_micro = math.ceil(len(group) / args.batch_size)
        # Every process takes its share of the group and cuts it into the same number of micro-batches, so
        # all of them join the same gradient all-reduce (a share may be empty at the very end of an epoch).
        micro_batches = group.tensor_split(world)[rank].tensor_split(n_micro)
        parts.optimizer.zero_grad(set_to_none=True)
        for i, rows in enumerate(micro_batches):
            last = i == n_micro - 1
            with parts.ddp.no_sync() if parts.ddp is not None and not last else nullcontext():
                x, y = train.batch(rows[:, 0], rows[:, 1:] if args.augment else None, args.crop_pad)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(args, device):
                    logits = parts.step_model(x)
                loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=args.label_smoothing)
                # Sum over the micro-batch divided by the whole group's size: the accumulated gradient is then
                # the group's mean, so K micro-batches step exactly like one batch, short last group included.
                # (x world: DDP averages the processes' gradients, and each holds 1/world of the sum.)
                scaled = loss * (world / len(group))
                (parts.scaler.scale(scaled) if parts.scaler else scaled).backward()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        if parts.scaler:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradient, not the scaled one
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(parts.model.parameters(), args.grad_clip)
        progress["lr"] = parts.optimizer.param_groups[0]["lr"]
        if parts.scaler:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
        parts.scheduler.step()
        if parts.ema is not None:
            ema_update(parts.ema, parts.model, ema_decay(args.ema, parts.scheduler.last_epoch))
        progress["step"] += 1
    sync(device)
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
    progress.update(seconds=progress["seconds"] + time.perf_counter() - start,
                    loss_sum=progress["loss_sum"] + loss_sum.item(), correct=progress["correct"] + correct.item())
    return finished


# ---------------------------------------------------------------------------------------------------------------
# Files

def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one,
    never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_out_dir(out_dir: Path, model: nn.Module) -> None:
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    # model + two optimizer moments + EMA copy, twice over while the temp file of the next one is written
    need = 2 * 4 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2**20
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise TrainError(f"not enough free space in {out_dir}: checkpoints need about {need / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB free")


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


def resume_command(argv: list[str], path: Path) -> str:
    """The command line that continues this run: the same flags, with --resume pointing at `path`."""
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--resume="):
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        kept.append(a)
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] \
        if dist.is_initialized() else ["python"]
    return shlex.join([*launcher, "train.py", *kept, "--resume", str(path)])


# ---------------------------------------------------------------------------------------------------------------
# The run

def run(args: argparse.Namespace, argv: list[str]) -> dict:
    rank, world, local_rank = start_distributed(args.device)
    device = pick_device(args.device, local_rank)
    if device.type == "cpu":
        keep_freed_memory()
    if args.amp == "fp16" and device.type != "cuda" or args.amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise TrainError(f"--amp {args.amp} is not supported on {device.type}")
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        for key in ("dataset", "model", "widths", "image_size", "batch_size", "accum_steps", "seed", "val_split"):
            if ckpt["args"].get(key) != getattr(args, key):
                raise TrainError(f"--resume: the checkpoint was trained with --{key.replace('_', '-')} "
                                 f"{ckpt['args'].get(key)}, not {getattr(args, key)}; give the original flags")
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume else
                                    Path("runs") / f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not args.resume and (out_dir / "last.pth").exists():
        raise TrainError(f"{out_dir} already holds a run; resume it with --resume {out_dir / 'last.pth'} "
                         f"or choose another --out-dir")

    torch.manual_seed(args.seed)
    train, val, test, classes = prepare(args.dataset, args.data_dir, args.val_split, args.seed, device,
                                        image_size=args.image_size)
    if args.patience and val is None:
        raise TrainError("--patience needs a validation set: --val-split above 0, or a val/ folder")
    _, in_channels, image_size, _ = train.images.shape
    try:
        model = build_model(args.model, len(classes), in_channels, image_size, args.widths).to(device)
    except ValueError as e:  # a model that cannot take this image size
        raise TrainError(str(e)) from None
    if isinstance(model, AirNet) and ckpt is None:  # (a resumed run loads its whitening with the weights)
        model.init_whitening(train.batch(torch.arange(min(len(train), 5000), device=device))[0])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_out_dir(out_dir, model)  # on every process, so that all stop together if it fails
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else None
    step_model = ddp or model
    optimizer = make_optimizer(model, args, device)
    steps_per_epoch = math.ceil(len(train) / (args.batch_size * args.accum_steps))
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, args.scheduler))
    parts = Parts(model, torch.compile(step_model) if args.compile else step_model, ddp, optimizer, scheduler,
                  torch.amp.GradScaler("cuda") if args.amp == "fp16" else None,
                  copy.deepcopy(model) if args.ema else None)
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "train_seconds": 0.0}
    progress = {"step": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0, "lr": args.lr}
    if ckpt is not None:
        if ckpt["mean"] != train.mean.tolist() or ckpt["classes"] != classes:
            raise TrainError("--resume: the data differs from the checkpoint's (another --data-dir?)")
        model.load_state_dict(ckpt.get("training_model", ckpt["model"]))
        if parts.ema is not None:
            parts.ema.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if parts.scaler is not None and "scaler" in ckpt:
            parts.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
        progress = ckpt.get("partial_epoch") or progress
        if rank == 0:
            at = f"step {progress['step']} of epoch {state['epoch'] + 1}" if progress["step"] else \
                f"the end of epoch {state['epoch']}"
            print(f"resumed from {args.resume} at {at}")

    def checkpoint(partial: dict | None = None) -> dict:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainError("the weights are no longer finite; not saving them (try a lower --lr or --grad-clip)")
        plain = parts.ema if parts.ema is not None else model
        return {"model": plain.state_dict(), **({"training_model": model.state_dict()} if parts.ema else {}),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                **({"scaler": parts.scaler.state_dict()} if parts.scaler else {}),
                "model_name": args.model, "widths": getattr(model, "widths", None),
                "num_classes": len(classes), "in_channels": in_channels, "image_size": image_size,
                "classes": classes, "mean": train.mean.tolist(), "std": train.std.tolist(), "args": vars(args),
                "rng": rng_states(), "partial_epoch": partial, **state}

    metrics_path = out_dir / "metrics.csv"
    if rank == 0:
        prepare_metrics_file(metrics_path, state["epoch"])
        print(f"{args.dataset}: {len(train)} train, {len(val) if val else 0} val, {len(test)} test images on "
              f"{device} x {world}; {args.model} with {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"writing to {out_dir}", flush=True)

    stopped_early = False
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if not train_one_epoch(parts, train, args, epoch, progress):
            if rank == 0:
                save_checkpoint(checkpoint(partial=progress), out_dir / "last.pth")
                print(f"stopped at step {progress['step']} of epoch {epoch}; saved {out_dir / 'last.pth'}. "
                      f"Resume with:\n  {resume_command(argv, out_dir / 'last.pth')}", file=sys.stderr)
            if world > 1:
                dist.barrier()  # no process leaves (and makes torchrun stop the others) before the save is done
            raise SystemExit(128 + STOP["signal"])
        n = len(train)
        row = {"epoch": epoch, "train_loss": progress["loss_sum"] / n, "train_acc": 100.0 * progress["correct"] / n,
               "lr": progress["lr"], "train_seconds": progress["seconds"], "images_per_s": n / progress["seconds"]}
        progress = {"step": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0, "lr": progress["lr"]}
        if not math.isfinite(row["train_loss"]):
            raise TrainError(f"the training loss became {row['train_loss']} in epoch {epoch}; try a lower --lr or "
                             f"--grad-clip 1.0 (the checkpoints keep the last finite weights)")
        eval_model = parts.ema if parts.ema is not None else model
        with autocast(args, device):
            val_result = evaluate(eval_model, val, len(classes)) if val else {"loss": math.nan, "accuracy": math.nan}
        row.update(val_loss=val_result["loss"], val_acc=val_result["accuracy"])
        improved = val is None or val_result["loss"] < state["best_val_loss"] - args.min_delta
        if improved:
            state.update(best_val_loss=val_result["loss"] if val else math.inf, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state.update(epoch=epoch, train_seconds=state["train_seconds"] + row["train_seconds"])
        if rank == 0:
            append_metrics(metrics_path, row)
            saved = checkpoint()
            save_checkpoint(saved, out_dir / "last.pth")
            if improved:
                save_checkpoint(saved, out_dir / "best.pth")
            print(format_epoch(row, args.epochs), flush=True)
        if args.patience and state["bad_epochs"] >= args.patience:
            if rank == 0:
                print(f"early stop: no validation improvement for {args.patience} epochs")
            stopped_early = True
            break

    if world > 1:
        dist.barrier()  # best.pth is written by rank 0
    best = model_from_checkpoint(load_checkpoint(out_dir / "best.pth", device)).to(device)
    if args.channels_last:
        best = best.to(memory_format=torch.channels_last)
    with autocast(args, device):  # the test runs in the precision the model trained in
        result = evaluate(best, test, len(classes), tta=args.tta)
    results = {"test_accuracy": result["accuracy"], "test_loss": result["loss"], "best_epoch": state["best_epoch"],
               "epochs_completed": state["epoch"], "stopped_early": stopped_early,
               "train_seconds": state["train_seconds"]}
    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        tta = "" if args.tta == "none" else f" and {args.tta} TTA"
        print(f"test accuracy {result['accuracy']:.2f}% (loss {result['loss']:.4f}) with best.pth from epoch "
              f"{state['best_epoch']}{tta}; results in {out_dir / 'results.json'}")
    if world > 1:
        dist.barrier()  # all processes leave together: gloo aborts a process whose peer is already gone
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        sys.exit(f"train.py: error: {problem}")
    STOP["signal"] = None
    handlers = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(args, argv)
    except (DataError, CheckpointError, TrainError) as e:
        sys.exit(f"train.py: error: {e}")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

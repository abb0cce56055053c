"""The trainer: one epoch's optimizer steps (train_one_epoch: the guide's five steps), what they need, built once from
train.py's flags (build_trainer: the model, from scratch or from learned weights, the optimizer, precision, EMA,
DDP, torch.compile), and what each step is handed (scale_lr: its lr; micro_parts: its micro-batches in this process).
train.py runs epochs of these steps; find_lr.py's range test runs a hundred of them at a rising lr.
"""
import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import ContextManager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import runtime
from augment import Mix, image_policy
from data import Split, balanced_class_weights, images_per_epoch
from model import MODELS, AirNet, build_model, check_image_size, freeze_backbone, model_from_start
from optim import make_optimizer

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
# What the steps need, built once

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
    images_per_epoch: int         # all of them, but for a last micro-batch of 1 image with BatchNorm (data.py)
    frozen: list[nn.Module] = field(default_factory=list)  # --freeze-backbone: modules kept in eval mode
    class_weights: torch.Tensor | None = None  # --class-weights balanced: each class's weight in the loss
    mix: Mix | None = None        # --mixup-alpha, --cutmix-alpha
    skips_noted: bool = False     # whether the run said that it skips unreadable training images


def build_trainer(args: argparse.Namespace, train: Split, num_classes: int, device: torch.device,
                  resumed: dict | None, start: dict | None = None) -> Trainer:
    """The Trainer for training set `train`: the model new, from `start` (starting_weights) or to be loaded from
    `resumed` (AirNet's whitening is then not computed), on `device`, with what the flags ask around it."""
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


def set_policy(train: Split, args: argparse.Namespace) -> None:
    """--auto-augment and --random-erase: the training images' per-image policy (augment.image_policy)."""
    train.set_policy(image_policy(args.auto_augment, args.auto_augment_magnitude, args.random_erase,
                                  train.mean.tolist()), args.seed)


# ---------------------------------------------------------------------------------------------------------------
# What each step is handed

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

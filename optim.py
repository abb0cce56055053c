"""Optimization: the optimizer train.py builds from its flags (make_optimizer, with Muon from muon.py), the lr
schedule (lr_factor) and the moving average of the weights (--ema)."""
import argparse
import math

import torch
import torch.nn as nn

from model import find_head
from muon import Muon


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of --lr at optimizer step `step` (0-based) of `total_steps`: a linear warm-up, then the decay."""
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


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)  # torchvision's reference scripts' norm classes


def decay_overrides(model: nn.Module, norm_decay: float | None, bias_decay: float | None) -> dict[int, float]:
    """The weight decay of the parameters --norm-weight-decay and --bias-weight-decay name, by id, as torchvision's
    reference scripts set it: bias_decay for every parameter named "bias" (norm layers' included), norm_decay for
    the norm layers' other parameters (and their biases too where bias_decay is None). None: as every other weight."""
    decays = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" and bias_decay is not None:
                decays[id(p)] = bias_decay
            elif isinstance(module, NORM_LAYERS) and norm_decay is not None:
                decays[id(p)] = norm_decay
    return decays


def make_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device,
                   num_classes: int) -> torch.optim.Optimizer:
    # The fused kernels compute the same update as the default loop, in one call per step instead of ~10 per
    # parameter tensor: for a small model that is a large share of the step.
    kw = {"lr": args.lr, "weight_decay": args.weight_decay, "fused": device.type in ("cpu", "cuda")}
    # BatchNorm shifts may take larger steps (--bias-lr-scale); their weight decay is divided by the same factor,
    # so that the decay per step, lr x weight decay, stays that of every other weight.
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    trainable = [p for p in model.parameters() if p.requires_grad]  # AirNet freezes its whitening and BN scales
    matrices = set()
    if args.optimizer == "muon":  # conv filters and hidden linear layers; the classifier stays with SGD
        head = {id(p) for p in model.get_submodule(find_head(model, num_classes)).parameters()}
        matrices = {id(p) for p in trainable if p.dim() >= 2 and id(p) not in head}
    scale = args.bias_lr_scale
    groups = [{"params": [p for p in trainable if id(p) not in shifts | matrices]},  # first: metrics.csv's lr
              {"params": [p for p in trainable if id(p) in matrices], "lr": args.muon_lr,
               "momentum": args.muon_momentum, "nesterov": True, "orthogonalize": True},
              {"params": [p for p in trainable if id(p) in shifts], "lr": args.lr * scale,
               "weight_decay": args.weight_decay / scale}]
    decays = decay_overrides(model, args.norm_weight_decay, args.bias_weight_decay)
    groups = [g for g in split_by_decay(groups, decays, (1, 1, 1 / scale)) if g["params"]]
    if args.optimizer == "muon":
        optimizer = Muon(groups, momentum=args.momentum, nesterov=args.nesterov, orthogonalize=False,
                         lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=args.momentum, nesterov=args.nesterov, **kw)
    else:
        optimizer = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(groups, **kw)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # the schedule multiplies this (the key torch's lr schedulers use)
    return optimizer


def split_by_decay(groups: list[dict], decays: dict[int, float], scales: tuple[float, ...]) -> list[dict]:
    """Each group's parameters whose decay `decays` overrides move to a group of their own after it: the same
    settings, with that decay x the group's scale of --weight-decay (`scales`, one per group). Without overrides the
    groups are returned as they are: the same optimizer, step for step, as before the flags existed."""
    if not decays:
        return groups
    out = []
    for g, scale in zip(groups, scales):
        out.append({**g, "params": [p for p in g["params"] if id(p) not in decays]})
        for decay in sorted({decays[id(p)] for p in g["params"] if id(p) in decays}):
            out.append({**g, "params": [p for p in g["params"] if decays.get(id(p)) == decay],
                        "weight_decay": decay * scale})
    return out

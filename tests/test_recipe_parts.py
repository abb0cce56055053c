"""The modern recipe's parts: weight decay where it belongs, top-5 and the class-balanced measures, rare classes
(class weights, the balanced sampler), augmentation policies, mixup and cutmix."""
import pytest
import torch
import torch.nn as nn

import config
import optim
from model import build_model


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "muon"])
def test_norm_and_bias_weight_decay_off_means_zero_decay_in_the_optimizer(optimizer):
    model = build_model("resnet18", 10, 3, 32)
    flags = ["--optimizer", optimizer, "--weight-decay", "0.05", "--bias-lr-scale", "4"]
    groups = optim.make_optimizer(model, config.parse_args(flags + ["--norm-weight-decay", "0", "--bias-weight-decay",
                                                                    "0"]), torch.device("cpu"), 10).param_groups
    before = optim.make_optimizer(model, config.parse_args(flags), torch.device("cpu"), 10).param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    old = {id(p): g for g in before for p in g["params"]}
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    assert norms and biases - norms  # (the classifier's bias)
    for name, p in model.named_parameters():
        expected = 0.0 if id(p) in norms | biases else old[id(p)]["weight_decay"]
        assert decay[id(p)] == expected, name
        assert expected > 0 or id(p) in norms | biases, name
    # everything else about each parameter's group is as without the flags (lr, momentum, Muon or SGD)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for p in model.parameters():
        assert {k: v for k, v in by_id[id(p)].items() if k not in ("params", "weight_decay")} == \
            {k: v for k, v in old[id(p)].items() if k not in ("params", "weight_decay")}


def test_norm_weight_decay_alone_covers_the_norm_shifts_and_scales_its_decay_with_the_bias_lr_scale():
    model = build_model("resnet18", 10, 3, 32)
    args = config.parse_args(["--optimizer", "sgd", "--weight-decay", "0.05", "--bias-lr-scale", "4",
                              "--norm-weight-decay", "0.01"])
    groups = optim.make_optimizer(model, args, torch.device("cpu"), 10).param_groups
    by_id = {id(p): g for g in groups for p in g["params"]}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert by_id[id(m.weight)]["weight_decay"] == 0.01
            shift = by_id[id(m.bias)]  # 4x the lr, the decay / 4: the same decay per step
            assert (shift["lr"], shift["weight_decay"]) == (4e-3, 0.0025)
    assert by_id[id(model.fc.bias)]["weight_decay"] == 0.05  # not a norm layer's
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["lr"] == 1e-3

"""The fast recipe's pieces: the ResNet-9 and AirNet models, whitening, presets, the lr schedule, EMA and TTA."""
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import config
import optim
import runargs
import train
from conftest import ROOT, fails_with
from data import ImageSet, prepare
from model import AirNet, ResNet9, build_model, tta_logits
from model import evaluate as evaluate_model


@pytest.mark.parametrize("widths, params", [((8, 16, 32, 64), 103_944), ((16, 32, 64, 128), 412_944),
                                            ((64, 128, 256, 512), 6_573_120)])
def test_resnet9_parameter_count_follows_its_widths(widths, params):
    model = build_model("resnet9", 10, 3, 32, widths)
    assert sum(p.numel() for p in model.parameters()) == params
    a, b, c, d = widths
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [a, b, b, b, c, d, d, d]


def test_resnet9_shapes_for_cifar_and_mnist():
    assert ResNet9(10, 3, 32, widths=(8, 16, 32, 64))(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert ResNet9(7, 1, 28, widths=(8, 8, 8, 8))(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_a_presets_values_follow_the_flags_given_and_refusals_name_the_preset(tmp_path):
    short = config.parse_args(["--preset", "fast", "--epochs", "2"])
    assert short.warmup_epochs == 2 * 2 / 11 and config.check_args(short) is None  # its share of the run, kept
    assert config.parse_args(["--preset", "fast", "--epochs", "4", "--warmup-epochs", "1"]).warmup_epochs == 1
    assert config.parse_args(["--preset", "fast", "--optimizer", "adam"]).nesterov is False
    with pytest.raises(runargs.ConfigError, match=r"^--nesterov needs sgd or muon, and --momentum above 0 \(--momentum "
                                                 r"0.85 comes from --preset fast; give --momentum to change it\)$"):
        runargs.parse_run_args(["--preset", "fast", "--nesterov", "--optimizer", "adam"])
    with pytest.raises(runargs.ConfigError, match=r"^--warmup-epochs must be >= 0 and below --epochs$"):
        runargs.parse_run_args(["--preset", "fast", "--epochs", "2", "--warmup-epochs", "2"])  # given: no preset note


def test_a_preset_sets_defaults_and_explicit_flags_win():
    seed = config.parse_args([])
    assert (seed.model, seed.optimizer, seed.lr, seed.batch_size) == ("simplecnn", "adam", 1e-3, 32)
    fast = config.parse_args(["--preset", "fast"])
    for key, value in config.PRESETS["fast"].items():
        assert getattr(fast, key) == value, key
    mixed = config.parse_args(["--lr", "0.1", "--preset", "fast", "--epochs", "3", "--no-channels-last"])
    assert (mixed.lr, mixed.epochs, mixed.model, mixed.batch_size, mixed.channels_last) == \
        (0.1, 3, "airnet", 512, False)
    assert config.check_args(fast) is None
    assert config.parse_args(["--widths", "1,2,3,4"]).widths == (1, 2, 3, 4)
    with pytest.raises(SystemExit, match="expected channel counts"):
        config.parse_args(["--widths", "16,x"])
    with pytest.raises(ValueError, match="resnet9 takes 4 widths, got 2"):
        build_model("resnet9", 10, 3, 32, (16, 32))


def test_lr_schedule_warms_up_then_decays():
    factors = [optim.lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(1 / 8)
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))  # decays after the warm-up
    assert optim.lr_factor(0, 100, 0, "cosine") == 1.0
    assert optim.lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert [optim.lr_factor(s, 8, 0, "step") for s in (0, 3, 4, 6)] == [1.0, 1.0, pytest.approx(0.1),
                                                                         pytest.approx(0.01)]
    assert optim.lr_factor(7, 8, 0, "none") == 1.0


def test_ema_update_rule_for_weights_and_batchnorm_counts():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[1].num_batches_tracked += 7
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    optim.ema_update(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * model.state_dict()[k], atol=1e-7), k
    assert ema[1].num_batches_tracked.item() == 7
    assert optim.ema_decay(0.99, 0) == pytest.approx(0.1) and optim.ema_decay(0.99, 10_000) == 0.99


def test_mirror_tta_equals_plain_prediction_on_symmetric_images():
    torch.manual_seed(0)
    half = torch.randint(0, 256, (20, 3, 32, 16), dtype=torch.uint8)
    symmetric = torch.cat([half, half.flip(3)], 3)
    model = build_model("resnet9", 10, 3, 32, (8, 16, 32, 64)).eval()
    data = ImageSet(symmetric, torch.randint(0, 10, (20,)), torch.full((3,), 0.5), torch.full((3,), 0.25))
    plain, tta = evaluate_model(model, data, 10), evaluate_model(model, data, 10, tta="mirror")
    assert tta["loss"] == plain["loss"] and torch.equal(tta["confusion"], plain["confusion"])
    data.images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)  # asymmetric: TTA changes the logits
    assert evaluate_model(model, data, 10, tta="mirror")["loss"] != evaluate_model(model, data, 10)["loss"]


def test_shift_tta_averages_six_views_with_the_unshifted_pair_weighing_half():
    torch.manual_seed(0)
    model = build_model("airnet", 10, 3, 32, (8, 8, 8)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")

        def pair(v):
            return (model(v) + model(v.flip(3))) / 2
        expected = pair(x) / 2 + pair(padded[:, :, :32, :32]) / 4 + pair(padded[:, :, 2:, 2:]) / 4
        assert torch.allclose(tta_logits(model, x, "shifts"), expected, atol=1e-6)
        flat = torch.randn(4, 3, 1, 1).expand(4, 3, 32, 32)  # a constant image: every view is the same image
        assert torch.allclose(tta_logits(model, flat, "shifts"), model(flat), atol=1e-6)


@pytest.mark.parametrize("widths, params", [((32, 192, 192), 1_070_624), ((64, 128, 128), 569_632),
                                            ((32, 64, 64), 146_720)])
def test_airnet_parameter_count_follows_its_widths(widths, params):
    model = build_model("airnet", 10, 3, 32, widths)
    assert sum(p.numel() for p in model.parameters()) == params
    a, b, c = widths
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [24, a, a, b, b, c, c]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["whiten.weight"] + [f"features.{i}.{j}.weight" for i in (1, 2, 3) for j in (2, 5)]


def test_airnet_shapes_for_cifar_and_mnist_and_its_identity_init():
    assert AirNet(10, 3, 32, widths=(8, 16, 16))(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert AirNet(7, 1, 28, widths=(8, 8, 8))(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert AirNet(10, 3, 9, widths=(8, 8, 8))(torch.zeros(2, 3, 9, 9)).shape == (2, 10)  # the smallest it takes
    with pytest.raises(ValueError, match="at least 9x9"):
        AirNet(10, 3, 8)
    conv = AirNet(widths=(32, 64, 64)).features[2][0]  # 32 -> 64 channels: the first 32 pass through
    x = torch.randn(1, 32, 5, 5)
    assert torch.allclose(F.conv2d(x, conv.weight[:32], padding=1), x, atol=1e-6)


def test_whitening_makes_the_patches_of_the_data_uncorrelated_with_unit_variance():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.5, 0.7]])  # correlated channels
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(200, 3, 16, 16)).cumsum(3)  # and neighbours
    model = AirNet(widths=(8, 8, 8))
    model.init_whitening(images, eps=0)
    with torch.no_grad():
        out = F.conv2d(images, model.whiten.weight)  # (no bias): 12 projections and their negatives
    flat = out.permute(1, 0, 2, 3).reshape(24, -1).double()
    assert torch.allclose(flat[:12] @ flat[:12].T / flat.shape[1], torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_batchnorm_shifts_get_the_scaled_lr_and_the_same_decay_per_step():
    model = AirNet(widths=(8, 8, 8))
    args = config.parse_args(["--preset", "fast", "--optimizer", "sgd", "--lr", "0.5", "--weight-decay", "0.01",
                             "--bias-lr-scale", "64"])
    groups = optim.make_optimizer(model, args, torch.device("cpu"), 10).param_groups
    shifts = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [len(g["params"]) for g in groups] == [7, 6] and all(p is q for p, q in zip(groups[1]["params"], shifts))
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (0.5, 0.01)
    assert groups[1]["lr"] == 32.0 and groups[1]["lr"] * groups[1]["weight_decay"] == pytest.approx(0.005)
    assert all(p.requires_grad for g in groups for p in g["params"])


@pytest.mark.slow
def test_fast_recipe_on_real_fashion_mnist(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    # the fast preset, shrunk: a twelfth of the widths, one epoch of the 60,000 images, no TTA (88.2% here)
    results = train.main(["--preset", "fast", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                          "--widths", "16,32,32", "--epochs", "1", "--batch-size", "256", "--tta", "none",
                          "--out-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert results["test_accuracy"] > 85.0


def test_fast_preset_end_to_end_and_evaluate_reproduces_its_test_result(tmp_path, cifar_dir, capsys):
    out = tmp_path / "run"
    results = train.main(["--preset", "fast", "--data-dir", str(cifar_dir), "--widths", "8,8,8", "--epochs", "2",
                          "--warmup-epochs", "1", "--batch-size", "64", "--device", "cpu", "--out-dir", str(out)])
    assert results["epochs_completed"] == 2 and "shifts TTA" in capsys.readouterr().out
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert ckpt["model_name"] == "airnet" and ckpt["widths"] == [8, 8, 8] and ckpt["args"]["amp"] == "bf16"
    # the whitening is computed from the training images once and travels in the checkpoint, unchanged
    train_set = prepare("cifar10", cifar_dir, 0.0, seed=0, device="cpu")[0]
    fresh = AirNet(widths=(8, 8, 8))
    fresh.init_whitening(train_set.batch(torch.arange(len(train_set)))[0])
    assert torch.equal(ckpt["model"]["whiten.weight"], fresh.whiten.weight)
    report = evaluate.main(["--checkpoint", str(out / "best.pth")])  # the run's own --tta shifts and --amp bf16
    assert report["accuracy"] == results["test_accuracy"] and report["loss"] == results["test_loss"]
    plain = evaluate.main(["--checkpoint", str(out / "best.pth"), "--tta", "none", "--amp", "off"])
    assert plain["loss"] != results["test_loss"]  # no TTA, float32: another number


@pytest.mark.parametrize("flags, message", [
    (["--crop-pad", "8"], "--crop-pad must be in [0, 7]"),
    (["--bias-lr-scale", "0"], "--bias-lr-scale must be a positive number"),
    (["--widths", "8,8"], "airnet takes 3 widths, got 2"),
])
def test_bad_recipe_flags_give_one_error_line(tmp_path, cifar_dir, flags, message):
    fails_with(["--preset", "fast", "--data-dir", str(cifar_dir), "--epochs", "5", "--warmup-epochs", "1",
                "--out-dir", str(tmp_path / "run"), *flags], message)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_bench_step_cost_times_each_airnet_widths_against_the_first(capsys):
    import bench
    bench.step_cost([(8, 8, 8), (8, 16, 16)], ["sgd", "muon"], batch_size=16, rounds=1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["8,8,8 sgd", "8,8,8 muon", "8,16,16 sgd",
                                                              "8,16,16 muon"]
    assert lines[0].endswith("ms per step of 16, 1.00x")
    run = subprocess.run([sys.executable, "bench.py", "--step-cost", "8,8"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and run.stdout == "" and run.stderr.strip() == \
        "bench.py: error: --step-cost takes AirNet widths: three channel counts each, like 32,192,192"


def test_bench_counts_flops_per_image_forward_and_backward():
    import bench
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 2])
    # forward: 2 x 4 x 3 per image; backward: the weight's gradient, as much again (the input needs none)
    assert bench.model_flops(model, x, y, contextlib.nullcontext()) == (48, 24)
    assert model[1].weight.grad is None  # the counting leaves no gradient behind
    assert bench.matmul_peak(torch.float32, n=64, seconds=0.05) > 0

"""The modern recipe's parts: weight decay where it belongs, top-5 and the class-balanced measures, rare classes
(class weights, the balanced sampler), augmentation policies, mixup and cutmix."""
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import bench
import config
import evaluate as evaluate_py
import optim
import train
from augment import Mix, apply_policy, image_policy, seeded
from checkpoint import RunState, load_checkpoint
from conftest import ROOT, as_from_a_terminal, fails_with, write_cifar10
from data import ImageSet, balanced_class_weights, epoch_plan, prepare
from formats import load_cifar10
from model import MEASURES, build_model, evaluate
from trainer import train_one_epoch
from test_stream import same_weights, write_photos


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


# ---------------------------------------------------------------------------------------------------------------
# Top-5, the class-balanced measures, --best-by

@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_top5_and_the_class_balanced_measures_equal_an_independent_computation():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    classes = 12
    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    labels = torch.cat([torch.zeros(30, dtype=torch.int64), torch.randint(1, classes - 1, (40,))])  # one rare, one
    data = ImageSet(images, labels, torch.full((3,), 0.5), torch.full((3,), 0.25))             # class absent
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
    result = evaluate(model, data, classes, batch_size=16)
    with torch.no_grad():
        logits = model(next(data.batches(torch.arange(70), 70))[0])
    ranked = [sorted(range(classes), key=lambda c: -row[c])[:5] for row in logits.tolist()]
    assert result["top5"] == pytest.approx(100 * sum(y in r for y, r in zip(labels.tolist(), ranked)) / 70)
    true, predicted = labels.tolist(), logits.argmax(1).tolist()
    assert result["accuracy"] == pytest.approx(100 * sklearn_metrics.accuracy_score(true, predicted))
    assert result["balanced_accuracy"] == pytest.approx(100 * sklearn_metrics.balanced_accuracy_score(true, predicted))
    p, r, f1, _ = sklearn_metrics.precision_recall_fscore_support(true, predicted, average="macro", zero_division=0)
    assert (result["macro_precision"], result["macro_recall"], result["macro_f1"]) == \
        pytest.approx((100 * p, 100 * r, 100 * f1))
    assert result["macro_f1"] != pytest.approx(result["accuracy"])  # (the two measures differ on this data)
    five = ImageSet(images, labels % 5, data.mean, data.std)
    assert math.isnan(evaluate(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), five, 5)["top5"])  # 5 classes: none


class PredictsItsFirstPixel(nn.Module):
    """Predicts for each image the class its first pixel's value names (images normalized with mean 0, std 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 3).float()


def test_evaluate_json_prints_the_measures_as_the_decimals_they_are():
    confusion = [[363, 137, 0], [10, 490, 0], [1, 2, 7]]  # rows: true class; columns: predicted
    labels = torch.tensor([t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)])
    predicted = torch.tensor([p for row in confusion for p, n in enumerate(row) for _ in range(n)], dtype=torch.uint8)
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = predicted
    result = evaluate(PredictsItsFirstPixel(), ImageSet(images, labels, torch.zeros(3), torch.ones(3)), 3)
    assert result["confusion"].tolist() == confusion
    printed = evaluate_py.json_report(result, ["cat", "dog", "fox"], "none", "off")
    # 363/500 in float32 would print 72.5999984741211; the mean of the recalls in float64 80.19999999999999
    assert '"per_class_accuracy": {"cat": 72.6, "dog": 98.0, "fox": 70.0}' in printed
    assert '"balanced_accuracy": 80.2, ' in printed and '"macro_recall": 80.2, ' in printed
    assert json.loads(printed)["images"] == 1010


def test_best_by_val_acc_keeps_the_most_accurate_epoch_and_stops_by_it():
    rows = [{"val_loss": 1.0, "val_acc": 50.0}, {"val_loss": 0.9, "val_acc": 40.0}]
    state = RunState(epoch=2, best_epoch=1, history=rows)
    assert train.improves({"val_loss": 0.95, "val_acc": 50.5}, state, "val_acc", 0.0)
    assert not train.improves({"val_loss": 0.5, "val_acc": 50.5}, state, "val_acc", 1.0)  # min-delta: by 1 point
    assert not train.improves({"val_loss": 0.5, "val_acc": 50.0}, state, "val_acc", 0.0)  # equal is no better
    assert train.improves({"val_loss": 0.95, "val_acc": 0.0}, state, "val_loss", 0.0)
    assert train.improves({"val_loss": 0.95, "val_acc": 0.0}, RunState(), "val_acc", 0.0)  # the first epoch


@pytest.mark.slow
def test_a_run_by_val_acc_reports_top5_and_resumes_an_old_checkpoint(tmp_path, cifar_dir, capsys):
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_dir), "--epochs", "3", "--best-by", "val_acc", "--lr", "0.01", "--device", "cpu",
             "--out-dir", str(out)]
    results = train.main(flags + ["--epochs", "2"])
    rows = metrics_rows(out / "metrics.csv")
    accs = [r["val_acc"] for r in rows]
    assert results["best_epoch"] == 1 + accs.index(max(accs)) and 0 <= rows[0]["val_top5"] <= 100
    assert 0 <= results["test_top5"] <= 100 and results["test_top5"] >= results["test_accuracy"]
    capsys.readouterr()
    evaluate_py.main(["--checkpoint", str(out / "best.pth"), "--json"])  # evaluate.py: the same numbers
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in ("top5", *MEASURES)} == {k: results[f"test_{k}"] for k in ("top5", *MEASURES)}
    # a checkpoint written before top-5 (its rows without val_top5) resumes, the column nan for its epochs
    ckpt = torch.load(out / "last.pth", weights_only=True)
    for row in ckpt["state"]["history"]:
        del row["val_top5"]
    torch.save(ckpt, out / "last.pth")
    train.main(flags + ["--resume", str(out / "last.pth")])
    rows = metrics_rows(out / "metrics.csv")
    assert [math.isnan(r["val_top5"]) for r in rows] == [True, True, False]


def metrics_rows(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if k != "changed"} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------------
# Rare classes: class weights (deferred or not), the balanced sampler

def long_tailed_labels() -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate([50, 20, 7, 3])])[torch.randperm(80)]


def test_the_balanced_sampler_draws_near_equal_classes_reproducibly():
    labels = long_tailed_labels()
    plan = epoch_plan(80, 0, 3, balance=labels)
    counts = torch.bincount(labels[plan[:, 0] % 80], minlength=4)
    assert counts.sum() == 80 and counts.max() - counts.min() <= 1
    # each showing has a number of its own (a repeat of image i: i + r x 80), so its per-image draws are its own
    assert len(plan[:, 0].unique()) == 80 and plan[:, 0].max() >= 80
    drawn = (plan[:, 0] % 80).tolist()
    for c in range(4):  # every image of a rare class, each as often as the others (give or take one)
        members = (labels == c).nonzero().squeeze(1).tolist()
        times = [drawn.count(i) for i in members]
        assert max(times) - min(times) <= 1 and (c == 0 or min(times) >= 1), c
    assert torch.equal(plan, epoch_plan(80, 0, 3, balance=labels))  # from (seed, epoch) alone
    assert not torch.equal(plan[:, 0], epoch_plan(80, 0, 4, balance=labels)[:, 0])
    assert not torch.equal(plan[:, 0], epoch_plan(80, 1, 3, balance=labels)[:, 0])
    # with --alt-flip (the fast preset's): a repeat flips as its image does, one side each epoch
    flips = [epoch_plan(80, 0, epoch, alternate_flips=True, balance=labels) for epoch in (3, 4)]
    for plan in flips:
        first_seen = {}
        for i, flip in zip((plan[:, 0] % 80).tolist(), plan[:, 3].tolist()):
            assert first_seen.setdefault(i, flip) == flip
    side = {i: f for p in flips[:1] for i, f in zip((p[:, 0] % 80).tolist(), p[:, 3].tolist())}
    assert all(side[i] != f for i, f in zip((flips[1][:, 0] % 80).tolist(), flips[1][:, 3].tolist()) if i in side)


def test_balanced_class_weights_are_sklearns_and_average_1_over_the_images():
    utils = pytest.importorskip("sklearn.utils")
    labels = long_tailed_labels()
    weights = balanced_class_weights(labels, 4)
    expected = utils.class_weight.compute_class_weight("balanced", classes=np.arange(4), y=labels.numpy())
    assert weights.tolist() == pytest.approx(expected.tolist())
    assert weights[labels].mean().item() == pytest.approx(1.0)


def test_deferred_class_weights_leave_the_first_epochs_plain(tmp_path, cifar_dir):
    flags = ["--data-dir", str(cifar_dir), "--epochs", "2", "--device", "cpu", "--val-split", "0"]
    train.main(flags + ["--out-dir", str(tmp_path / "plain")])
    train.main(flags + ["--out-dir", str(tmp_path / "deferred"), "--class-weights", "balanced",
                        "--class-weights-from-epoch", "2"])
    plain, deferred = (metrics_rows(tmp_path / name / "metrics.csv") for name in ("plain", "deferred"))
    assert plain[0]["train_loss"] == deferred[0]["train_loss"] and plain[1]["train_loss"] != deferred[1]["train_loss"]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("mixed", [False, True])
def test_the_class_weighted_loss_is_each_images_loss_times_its_class_weight(smoothing, mixed):
    # with label smoothing too: cross_entropy's own weight= would weigh every class's share of the smoothing, so an
    # image of a frequent class would be pulled towards the rare ones
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    target, weight = y, weights[y]
    if mixed:  # a mixup target: 0.7 of the image's class, 0.3 of the next image's
        target = 0.7 * nn.functional.one_hot(y, 4) + 0.3 * nn.functional.one_hot(y.roll(1), 4)
        weight = 0.7 * weights[y] + 0.3 * weights[y.roll(1)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_one_epoch(model, optimizer, [([(x, target)], 10)], class_weights=weights,
                                    label_smoothing=smoothing)
    smoothed = (target if mixed else nn.functional.one_hot(y, 4)) * (1 - smoothing) + smoothing / 4
    each = -(smoothed * model(x).log_softmax(1)).sum(1)
    assert loss.item() == pytest.approx((weight * each).sum().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation policies, drawn image by image; mixup and cutmix, drawn step by step

@pytest.mark.parametrize("name, magnitude", [("ta_wide", None), ("ra", 14), ("augmix", 5), ("imagenet", None)])
def test_a_policy_is_torchvisions_own_transform_with_each_images_own_draw(name, magnitude):
    from torchvision.transforms import InterpolationMode, v2
    bilinear = InterpolationMode.BILINEAR
    theirs = {"ta_wide": v2.TrivialAugmentWide(interpolation=bilinear),
              "ra": v2.RandAugment(interpolation=bilinear, magnitude=14),
              "augmix": v2.AugMix(interpolation=bilinear, severity=5),
              "imagenet": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear)}[name]
    erase = v2.RandomErasing(p=0.5, value=[128, 64, 191])
    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    indices = torch.tensor([5, 0, 17, 3, 9, 1])
    policy = image_policy(name, magnitude, 0.5, [0.5, 0.25, 0.75])
    state = torch.get_rng_state()
    ours = apply_policy(images, indices, 3, 2, policy)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own generator is left where it was
    for image, i, got in zip(images, indices.tolist(), ours):
        with seeded(3, 2, i):  # (seed, epoch, image): torchvision's draws, then its erasing's
            assert torch.equal(got, erase(theirs(image)))
    assert not torch.equal(ours, apply_policy(images, indices, 3, 3, policy))  # another epoch, other draws
    assert image_policy(None, None, 0.0, [0.5]) is None


def test_mixup_and_cutmix_mix_targets_in_the_images_proportion_and_draw_from_seed_epoch_step():
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 1])
    mix = Mix(0.2, 1.0, 4, seed=0)
    kinds = set()
    for step in range(20):
        state = torch.get_rng_state()
        lam, box = mix.draw(1, step, 16, 16)
        assert torch.equal(torch.get_rng_state(), state) and (lam, box) == mix.draw(1, step, 16, 16)
        mixed, targets = mix(x, y, lam, box)
        assert torch.allclose(targets.sum(1), torch.ones(4)) and (targets >= 0).all()  # x[0]: x[1]'s partner
        if box is None:
            kinds.add("mixup")
            assert torch.allclose(mixed, lam * x[1:] + (1 - lam) * x[:-1], atol=1e-6)
            kept = lam
        else:
            kinds.add("cutmix")
            y1, y2, x1, x2 = box
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert torch.equal(mixed[..., inside], x[:-1][..., inside])
            assert torch.equal(mixed[..., ~inside], x[1:][..., ~inside])
            kept = 1 - inside.float().mean().item()
        assert targets[0].tolist() == pytest.approx([1 - kept, kept, 0, 0] if kept < 1 else [0, 1, 0, 0])
    assert kinds == {"mixup", "cutmix"}  # both set: each step one of the two
    assert mix.draw(1, 0, 16, 16) != mix.draw(2, 0, 16, 16) != Mix(0.2, 1.0, 4, seed=1).draw(2, 0, 16, 16)
    assert Mix(0.0, 1.0, 4, 0).draw(1, 0, 16, 16)[1] is not None and Mix(0.3, 0.0, 4, 0).draw(1, 0, 16, 16)[1] is None


@pytest.mark.parametrize("mix", [["--mixup-alpha", "0.4"], ["--cutmix-alpha", "1.0"]])
def test_mixup_and_cutmix_pair_across_the_whole_step_so_accumulation_equals_one_batch(tmp_path, mix):
    """Each image is mixed with the step's previous one, whichever micro-batch holds either: K micro-batches of
    N/K images take the step of one batch of N (SimpleCNN: no BatchNorm), 80 images: a short last step too."""
    from test_train import assert_same_weights, one_epoch
    data = prepare("cifar10", write_cifar10(tmp_path, n_per_batch=16), 0, seed=0, device="cpu")[0]  # 80 images
    flags = ("--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--no-channels-last", *mix)
    big = one_epoch(data, "--batch-size", "32", *flags)
    small = one_epoch(data, "--batch-size", "8", "--accum-steps", "4", *flags)
    assert_same_weights(big, small, atol=1e-6)
    other = one_epoch(data, "--batch-size", "16", *flags)  # another step: the test tells them apart
    assert not torch.allclose(other.fc3.weight, big.fc3.weight, atol=1e-4)


def test_the_training_accuracy_under_mixed_targets_counts_the_dominant_label():
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 4))
    x = torch.eye(4)[:3]  # image k: class k's logit highest
    targets = torch.tensor([[0.6, 0.4, 0.0], [0.3, 0.0, 0.7], [0.0, 0.45, 0.55]])  # dominant: 0, 2, 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, correct = train_one_epoch(model, optimizer, [([(x, targets)], 3)],
                                          torch.amp.GradScaler("cuda", enabled=False), label_smoothing=0.1)
    assert correct.item() == 2  # images 0 and 2
    smoothed = targets * 0.9 + 0.1 / 3
    assert loss.item() == pytest.approx(-(smoothed * model(x).log_softmax(1)).sum().item(), rel=1e-6)


EVERY_FLAG = ["--auto-augment", "ta_wide", "--random-erase", "0.5", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
              "--label-smoothing", "0.1", "--class-weights", "balanced", "--balanced-sampler", "--norm-weight-decay",
              "0", "--bias-weight-decay", "0", "--weight-decay", "0.01", "--best-by", "val_acc"]


@pytest.mark.slow
def test_every_new_flag_works_alike_in_memory_and_streamed(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 10, "test": 2})
    flags = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "24", "--epochs", "2",
             "--batch-size", "8", "--val-split", "0.2", "--augment", "--device", "cpu", "--log-interval", "0",
             *EVERY_FLAG, "--auto-augment", "ra"]  # (ra: a policy with a magnitude)
    in_memory = train.main([*flags, "--out-dir", str(tmp_path / "memory")])
    streamed = train.main([*flags, "--workers", "2", "--out-dir", str(tmp_path / "streamed")])
    assert same_weights(tmp_path / "memory" / "last.pth", tmp_path / "streamed" / "last.pth")
    assert in_memory["test_accuracy"] == streamed["test_accuracy"]
    plain = train.main([*flags[:-len(EVERY_FLAG) - 2], "--out-dir", str(tmp_path / "plain")])
    assert not same_weights(tmp_path / "memory" / "last.pth", tmp_path / "plain" / "last.pth") and plain


@pytest.mark.slow
def test_ctrl_c_mid_epoch_with_every_new_flag_resumes_exactly(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", n_per_batch=40, n_test=20)
    flags = ["--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "8", "--val-split", "0.1", "--augment",
             "--device", "cpu", *EVERY_FLAG]  # 180 training images: 23 steps an epoch
    straight = train.main([*flags, "--log-interval", "0", "--out-dir", str(tmp_path / "straight")])
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--log-interval", "1", "--out-dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.split()[:4] == ["epoch", "2/2", "step", "3/23"]:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert load_checkpoint(out / "last.pth")["partial_epoch"]["step"] < 23
    resumed = train.main(shlex.split(err.strip().splitlines()[-1].strip())[2:] + ["--log-interval", "0"])
    assert same_weights(tmp_path / "straight" / "last.pth", out / "last.pth")
    assert resumed["test_accuracy"] == straight["test_accuracy"]


@pytest.mark.parametrize("flags, message", [
    (["--mixup-alpha", "-1"], "--mixup-alpha must be >= 0 (0 = off)"),
    (["--cutmix-alpha", "nan"], "--cutmix-alpha must be >= 0 (0 = off)"),
    (["--random-erase", "2"], "--random-erase must be in [0, 1] (a probability; 0 = off)"),
    (["--auto-augment", "ta_wide", "--auto-augment-magnitude", "5"],
     "--auto-augment-magnitude is for --auto-augment ra or augmix"),
    (["--auto-augment", "ra", "--auto-augment-magnitude", "31"], "--auto-augment-magnitude must be in [0, 30] for ra"),
    (["--auto-augment", "autoaugment"], "invalid choice: 'autoaugment'"),
    (["--norm-weight-decay", "-1"], "--norm-weight-decay and --bias-weight-decay must be >= 0"),
    (["--class-weights", "balanced", "--class-weights-from-epoch", "6"],
     "--class-weights-from-epoch must be in [1, --epochs]"),
    (["--class-weights-from-epoch", "2"], "--class-weights-from-epoch needs --class-weights balanced"),
    (["--best-by", "val_f1"], "invalid choice: 'val_f1'"),
])
def test_bad_values_of_the_new_flags_get_one_line(flags, message):
    fails_with(flags, message)


def test_every_new_flag_is_in_the_help_and_in_docs_flags_md(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    text = capsys.readouterr().out
    documented = (ROOT / "docs" / "flags.md").read_text()
    for flag in ("--norm-weight-decay", "--bias-weight-decay", "--best-by", "--class-weights",
                 "--class-weights-from-epoch", "--balanced-sampler", "--auto-augment", "--auto-augment-magnitude",
                 "--random-erase", "--mixup-alpha", "--cutmix-alpha"):
        assert flag in text and f"`{flag}" in documented, flag


def test_long_tailed_cifar10_keeps_the_literatures_counts_and_the_test_set(tmp_path):
    assert bench.long_tail_counts(5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(bench.long_tail_counts(5000, 100)) == 12_406
    source = write_cifar10(tmp_path / "cifar", n_per_batch=100, n_test=30)
    counts = bench.long_tailed_cifar10(str(source), str(tmp_path / "lt"), imbalance=10)
    _, labels, _ = load_cifar10(source, ("train",))
    assert counts == bench.long_tail_counts(int(torch.bincount(labels).min()), 10) and counts[0] > 5 * counts[-1]
    images, kept, test_images, test_labels, _ = load_cifar10(tmp_path / "lt")
    assert torch.bincount(kept).tolist() == counts
    all_images, _, originals, original_labels, _ = load_cifar10(source)
    assert torch.equal(test_images, originals) and torch.equal(test_labels, original_labels)
    assert all(any(torch.equal(image, x) for x in all_images) for image in images[:20])  # real training images
    assert bench.long_tailed_cifar10(str(source), str(tmp_path / "lt2"), imbalance=10) == counts
    assert (tmp_path / "lt" / "cifar-10-batches-py" / "data_batch_1").read_bytes() == \
        (tmp_path / "lt2" / "cifar-10-batches-py" / "data_batch_1").read_bytes()  # seeded: the same copy

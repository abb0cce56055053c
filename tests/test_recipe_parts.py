"""The modern recipe's parts: weight decay where it belongs, top-5 and the class-balanced measures, rare classes
(class weights, the balanced sampler), augmentation policies, mixup and cutmix."""
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import config
import optim
import train
from checkpoint import RunState
from data import ImageSet, balanced_class_weights, epoch_plan
from model import build_model, evaluate


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


def test_best_by_val_acc_keeps_the_most_accurate_epoch_and_stops_by_it():
    rows = [{"val_loss": 1.0, "val_acc": 50.0}, {"val_loss": 0.9, "val_acc": 40.0}]
    state = RunState(epoch=2, best_epoch=1, history=rows)
    assert train.improves({"val_loss": 0.95, "val_acc": 50.5}, state, "val_acc", 0.0)
    assert not train.improves({"val_loss": 0.5, "val_acc": 50.5}, state, "val_acc", 1.0)  # min-delta: by 1 point
    assert not train.improves({"val_loss": 0.5, "val_acc": 50.0}, state, "val_acc", 0.0)  # equal is no better
    assert train.improves({"val_loss": 0.95, "val_acc": 0.0}, state, "val_loss", 0.0)
    assert train.improves({"val_loss": 0.95, "val_acc": 0.0}, RunState(), "val_acc", 0.0)  # the first epoch


@pytest.mark.slow
def test_a_run_by_val_acc_reports_top5_and_resumes_an_old_checkpoint(tmp_path, cifar_dir):
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_dir), "--epochs", "3", "--best-by", "val_acc", "--lr", "0.01", "--device", "cpu",
             "--out-dir", str(out)]
    results = train.main(flags + ["--epochs", "2"])
    rows = metrics_rows(out / "metrics.csv")
    accs = [r["val_acc"] for r in rows]
    assert results["best_epoch"] == 1 + accs.index(max(accs)) and 0 <= rows[0]["val_top5"] <= 100
    assert 0 <= results["test_top5"] <= 100 and results["test_top5"] >= results["test_accuracy"]
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
    counts = torch.bincount(labels[plan[:, 0]], minlength=4)
    assert counts.sum() == 80 and counts.max() - counts.min() <= 1
    drawn = plan[:, 0].tolist()
    for c in range(4):  # every image of a rare class, each as often as the others (give or take one)
        members = (labels == c).nonzero().squeeze(1).tolist()
        times = [drawn.count(i) for i in members]
        assert max(times) - min(times) <= 1 and (c == 0 or min(times) >= 1), c
    assert torch.equal(plan, epoch_plan(80, 0, 3, balance=labels))  # from (seed, epoch) alone
    assert not torch.equal(plan[:, 0], epoch_plan(80, 0, 4, balance=labels)[:, 0])
    assert not torch.equal(plan[:, 0], epoch_plan(80, 1, 3, balance=labels)[:, 0])


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


def test_the_class_weighted_loss_is_each_images_loss_times_its_class_weight():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.param_groups[0]["initial_lr"] = 0.0
    loss, _ = train.train_one_epoch(model, optimizer, [(1.0, [(x, y)], 10)], torch.amp.GradScaler("cuda",
                                    enabled=False), class_weights=weights)
    each = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert loss.item() == pytest.approx((weights[y] * each).sum().item(), rel=1e-6)

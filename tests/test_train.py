"""train.py end to end on tiny data in the real formats: no mocks, real runs, real files."""
import csv
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

from contextlib import nullcontext

import pytest
import torch

import evaluate
import runtime
import config
import optim
import train
import trainer
from augment import Mix
from checkpoint import METRICS, EpochTally
from conftest import ROOT, fails_with, write_cifar10
from data import epoch_plan, prepare
from model import build_model


def args_for(*argv: str):
    args = config.parse_args(list(argv))
    assert config.check_args(args) is None
    return args


def one_epoch(data, *argv: str, model_seed: int = 0) -> torch.nn.Module:
    """One epoch of the real training function from a fixed initialization."""
    args = args_for(*argv)
    torch.manual_seed(model_seed)
    model = build_model("simplecnn", 10, 3, 32)
    steps = math.ceil(len(data) / (args.batch_size * args.accum_steps))
    optimizer = optim.make_optimizer(model, args, torch.device("cpu"), 10)
    t = trainer.Trainer(model=model, step_model=model, optimizer=optimizer,
                        scaler=torch.amp.GradScaler("cuda", enabled=False), autocast=nullcontext(), ema=None,
                        stop=runtime.StopSignal(), steps_per_epoch=steps, images_per_epoch=len(data),
                        mix=Mix(args.mixup_alpha, args.cutmix_alpha, 10, args.seed)
                        if args.mixup_alpha or args.cutmix_alpha else None)
    tally = EpochTally()
    assert train.train_epoch(t, data, args, 1, tally)
    assert tally.step == steps
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=atol, rtol=0), name


@pytest.mark.parametrize("n_images", [64, 80])  # 80 = two full groups of 32 and a short last group of 16
def test_accumulation_equals_one_big_batch(cifar_dir, n_images):
    data = prepare("cifar10", cifar_dir, 0, seed=0, device="cpu")[0]
    data.images, data.labels = data.images[:n_images], data.labels[:n_images]
    # plain SGD: the weights move by exactly lr x the gradient, so equal weights mean equal gradients
    # (Adam divides by sqrt(v), which turns float rounding of near-zero gradients into visible differences)
    flags = ("--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--no-channels-last")
    big = one_epoch(data, "--batch-size", "32", *flags)
    small = one_epoch(data, "--batch-size", "8", "--accum-steps", "4", *flags)
    assert_same_weights(big, small, atol=1e-6)
    other = one_epoch(data, "--batch-size", "16", *flags)  # not the same update: the test can tell them apart
    assert not torch.allclose(other.fc3.weight, big.fc3.weight, atol=1e-4)


def test_clipping_bounds_the_accumulated_gradient_once_per_step(cifar_dir):
    data = prepare("cifar10", cifar_dir, 0, seed=0, device="cpu")[0]
    data.images, data.labels = data.images[:32], data.labels[:32]
    torch.manual_seed(0)
    start = build_model("simplecnn", 10, 3, 32).state_dict()
    flags = ("--optimizer", "sgd", "--momentum", "0", "--lr", "1", "--grad-clip", "0.01")
    for extra in (("--batch-size", "32"), ("--batch-size", "8", "--accum-steps", "4")):
        model = one_epoch(data, *flags, *extra)
        # plain SGD with lr 1: the step is minus the clipped gradient, whose global norm is exactly the limit
        step = torch.cat([(start[k] - v).flatten() for k, v in model.state_dict().items()])
        assert step.norm().item() == pytest.approx(0.01, rel=1e-4)
    unclipped = one_epoch(data, "--optimizer", "sgd", "--momentum", "0", "--lr", "1")
    step = torch.cat([(start[k] - v).flatten() for k, v in unclipped.state_dict().items()])
    assert step.norm().item() > 0.1


def run_train(tmp_path, data_dir, *argv, name="run"):
    out = tmp_path / name
    results = train.main(["--data-dir", str(data_dir), "--out-dir", str(out), "--device", "cpu", *argv])
    return out, results


def test_a_run_writes_metrics_checkpoints_and_results(tmp_path, cifar_dir, capsys):
    out, results = run_train(tmp_path, cifar_dir, "--epochs", "2", "--augment", "--scheduler", "cosine")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and "img/s" in lines[0]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*METRICS, "changed"] and [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["images_per_s"]) > 0 and 0 <= float(r["val_acc"]) <= 100 for r in rows)
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results) == {"test_accuracy", "test_loss", "test_top5", "test_balanced_accuracy",
                            "test_macro_precision", "test_macro_recall", "test_macro_f1", "test_images",
                            "test_skipped", "best_epoch", "epochs_completed", "stopped_early", "train_seconds"}
    assert results["epochs_completed"] == 2 and results["stopped_early"] is False
    assert results["test_images"] == 50 and results["test_skipped"] == 0
    drawn = ["curves.png"] if importlib.util.find_spec("matplotlib") else []  # (drawn when matplotlib is there)
    assert sorted(p.name for p in out.iterdir()) == sorted(["args.json", "best.pth", "last.pth", "metrics.csv",
                                                             "results.json", *drawn])

    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["state"]["epoch"] == 2 and ckpt["classes"][0] == "airplane" and len(ckpt["mean"]) == 3
    assert ckpt["args"]["batch_size"] == 32 and isinstance(ckpt["args"], dict)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "rng", "state", "partial_epoch", "run_id", "argv"} <= set(ckpt)
    fresh = build_model("simplecnn", 10, 3, 32)
    fresh.load_state_dict(ckpt["model"])  # a plain state_dict

    # evaluate.py agrees with the number train.py reported for best.pth
    report = evaluate.main(["--checkpoint", str(out / "best.pth"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == results["test_accuracy"] == report["accuracy"]
    assert printed["loss"] == pytest.approx(results["test_loss"], rel=1e-9)
    assert sum(map(sum, printed["confusion_matrix"])) == 50
    assert set(printed["per_class_accuracy"]) == set(ckpt["classes"])
    evaluate.main(["--checkpoint", str(out / "best.pth")])
    table = capsys.readouterr().out
    assert "confusion matrix" in table and "airplane" in table


def test_early_stopping_uses_validation_and_patience(tmp_path, cifar_dir):
    # a min-delta no loss can beat: epoch 1 is the only improvement, then 2 epochs of patience
    out, results = run_train(tmp_path, cifar_dir, "--epochs", "10", "--patience", "2", "--min-delta", "1000")
    assert results["stopped_early"] is True and results["epochs_completed"] == 3 and results["best_epoch"] == 1
    assert torch.load(out / "best.pth", weights_only=True)["state"]["epoch"] == 1
    assert torch.load(out / "last.pth", weights_only=True)["state"]["epoch"] == 3


def test_default_flags_are_the_seed_recipe():
    args = config.parse_args([])
    assert (args.model, args.optimizer, args.lr, args.batch_size, args.epochs, args.augment, args.dataset) == \
        ("simplecnn", "adam", 1e-3, 32, 5, False, "cifar10")


def wait_for_checkpoint(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.005)


@pytest.mark.slow
def test_a_killed_run_resumes_to_bit_identical_weights(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", n_per_batch=400, n_test=50)
    flags = ["--data-dir", str(data_dir), "--epochs", "3", "--augment", "--scheduler", "cosine", "--device", "cpu"]
    train.main([*flags, "--out-dir", str(tmp_path / "straight")])

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--out-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out / "last.pth", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(out / "last.pth", weights_only=True)["state"]["epoch"]
    assert done < 3, "the run finished before it could be killed; make the data bigger"
    train.main([*flags, "--out-dir", str(out), "--resume", str(out / "last.pth")])

    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(out / "last.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be in [1, 2**31]"),
    (["--batch-size", str(10**20)], "--batch-size must be in [1, 2**31]"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--epochs", "0"], "--epochs must be in [1, 10000]"),
    (["--accum-steps", "0"], "--accum-steps must be in [1, 2**20]"),
    (["--patience", "-1"], "--patience must be >= 0"),
    (["--grad-clip", "-0.5"], "--grad-clip must be >= 0"),
    (["--val-split", "1"], "--val-split must be in [0, 1)"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model", "vgg"], "unknown model 'vgg'; did you mean vgg19, vgg16, vgg13? (python train.py --list-models"),
    (["--batch-size", "abc"], "invalid int value: 'abc'"),
])
def test_bad_values_get_one_clear_line(flags, message):
    fails_with(flags, message)


def test_bad_files_get_one_clear_line_and_nothing_is_lost(tmp_path, cifar_dir):
    out, _ = run_train(tmp_path, cifar_dir, "--epochs", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = ["--data-dir", str(cifar_dir), "--device", "cpu"]
    fails_with([*base, "--out-dir", str(out)], "already holds run files")
    fails_with([*base, "--resume", str(tmp_path / "nope.pth")], "checkpoint not found")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((out / "last.pth").read_bytes()[:5000])
    fails_with([*base, "--resume", str(truncated)], "cannot read checkpoint")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    fails_with([*base, "--resume", str(foreign)], "not a checkpoint of these scripts")
    fails_with([*base, "--resume", str(out / "last.pth"), "--model", "simplecnn", "--dataset", "mnist"],
               "trained with --dataset cifar10")
    fails_with([*base, "--patience", "3", "--val-split", "0", "--out-dir", str(tmp_path / "p")],
               "--patience needs a validation set")
    (cifar_dir / "cifar-10-batches-py" / "test_batch").unlink()
    fails_with([*base, "--out-dir", str(tmp_path / "new")], "missing test_batch")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_a_clear_error(cifar_dir, tmp_path):
    fails_with(["--data-dir", str(cifar_dir), "--device", "cuda", "--out-dir", str(tmp_path / "o")],
               "--device cuda is not available")


@pytest.mark.slow
def test_errors_from_the_command_line_have_no_traceback(tmp_path):
    bad = tmp_path / "evil.pth"
    bad.write_bytes(b"not a zip file at all")
    for cmd in (["train.py", "--lr", "0"], ["evaluate.py", "--checkpoint", str(bad)],
                ["train.py", "--resume", str(bad)]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_fashion_mnist_real_data_reaches_a_real_accuracy(tmp_path, capsys):
    """From Debian's copy, found where --data-dir has none, and said so; a --data-dir that is a file is refused
    (it was passed over for Debian's copy, silently)."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    _, results = run_train(tmp_path, tmp_path / "empty", "--dataset", "fashion-mnist", "--epochs", "1",
                           "--batch-size", "64", "--lr", "2e-3")
    assert results["test_accuracy"] > 80.0
    assert f"fashion-mnist: not in {tmp_path / 'empty'}: reading Debian's copy in /usr/share/datasets/fashion-mnist" \
        in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("")
    fails_with(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "notes.txt"), "--device", "cpu"],
               f"fashion-mnist: --data-dir {tmp_path / 'notes.txt'} is a file, not a folder; give the folder that "
               f"holds fashion-mnist")


FAULTS_PER_ALLOCATION = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import runtime
if sys.argv[2] == "keep":
    assert runtime.keep_freed_memory()
faults = []
for _ in range(10):  # what a training step does: allocate a large activation, fill it, free it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)  # 64 MiB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[5:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or runtime.platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc")
@pytest.mark.slow
def test_keep_freed_memory_stops_large_blocks_faulting_in_again_each_step():
    def faults(mode):  # in a fresh process: malloc settings last for the process
        run = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, str(ROOT), mode],
                             capture_output=True, text=True, check=True)
        return int(run.stdout)
    assert faults("default") > 0  # every 64 MiB block is a fresh mmap: 16,384 pages of 4 KiB to fault in (here)
    assert faults("keep") == 0     # reused from the heap, already mapped


PASTE_HEADER = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n"


def pasted_loop(tmp_path: Path):
    """train_one_epoch's source alone, pasted into a file that imports only torch, torch.nn as nn and
    torch.nn.functional as F, and run: that file's train_one_epoch (its annotations resolved there) and the
    docstring's usage lines, as code."""
    import inspect
    import runpy
    import textwrap
    import typing
    source = inspect.getsource(trainer.train_one_epoch)
    assert source.startswith("def train_one_epoch(") and len(source.splitlines()) <= 50  # the function alone
    path = tmp_path / "pasted.py"
    path.write_text(PASTE_HEADER + source)
    namespace = runpy.run_path(str(path))
    assert set(namespace) - {name for name in namespace if name.startswith("__")} == {"torch", "nn", "F",
                                                                                       "train_one_epoch"}
    copied = namespace["train_one_epoch"]
    assert copied is not trainer.train_one_epoch and copied.__code__.co_filename == str(path)
    typing.get_type_hints(copied)  # the annotations name nothing the paste lacks
    example = textwrap.dedent("\n".join(line for line in trainer.train_one_epoch.__doc__.splitlines()
                                        if line.startswith(" " * 8)))  # the docstring's indented code
    assert "train_one_epoch(model, optimizer," in example and "loader" in example
    return copied, example


def test_the_loop_copies_into_another_project(cifar_dir, tmp_path):
    """train_one_epoch pasted into a file that imports only torch, nn and F, on plain lists of batches, ends at the
    same weights as train.py's own call: accumulation over a short last step (80 images, steps of 4 x 8) and
    clipping included."""
    copied, _ = pasted_loop(tmp_path)
    data = prepare("cifar10", cifar_dir, 0, seed=0, device="cpu")[0]
    data.images, data.labels = data.images[:80], data.labels[:80]
    flags = ("--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--grad-clip", "0.05", "--batch-size", "8",
             "--accum-steps", "4", "--no-channels-last")
    ours = one_epoch(data, *flags)  # train.py's own call: train_epoch -> train_one_epoch

    torch.manual_seed(0)
    model = build_model("simplecnn", 10, 3, 32)
    optimizer = optim.make_optimizer(model, args_for(*flags), torch.device("cpu"), 10)
    plan = epoch_plan(len(data), 0, 1)  # the same samples in the same order
    steps = [([data.batch(part[:, 0]) for part in group.tensor_split(math.ceil(len(group) / 8))], len(group))
             for group in plan.split(32)]
    assert [len(s[0]) for s in steps] == [4, 4, 2]  # the short last step: two micro-batches of 8
    model.train()
    loss_sum, correct = copied(model, optimizer, steps, torch.amp.GradScaler("cuda", enabled=False), grad_clip=0.05)
    assert 0 < loss_sum.item() and 0 <= correct.item() <= 80
    for (name, a), b in zip(ours.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    unclipped = one_epoch(data, *flags[:6], *flags[8:])  # the test tells clipping apart
    assert not torch.equal(unclipped.fc3.weight, model.fc3.weight)


@pytest.mark.parametrize("kind, epochs", [("StepLR", 3), ("ReduceLROnPlateau", 4)])
def test_the_pasted_loop_trains_as_the_hand_written_one_under_a_torch_lr_scheduler(tmp_path, kind, epochs):
    """The issue's paste: train_one_epoch alone in a file that imports only torch, nn and F, run as its docstring
    shows on a plain DataLoader with plain SGD and a torch lr scheduler stepped after each epoch, ends at the weights
    of the five steps written out by hand, and every step runs at the lr the scheduler set (the loop used to reset
    it to initial_lr x its factor: 0.1 throughout)."""
    copied, example = pasted_loop(tmp_path)
    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(50, 3, 8, 8, generator=generator),
                                             torch.randint(0, 4, (50,), generator=generator))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)  # 4 steps, the last of 2 images

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "StepLR":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
        else:  # patience 0 and a metric that never improves: a cut after every epoch but the first
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0)
        ran_at = []  # the lr each optimizer step ran at
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: ran_at.append(opt.param_groups[0]["lr"]))
        return model, optimizer, scheduler, ran_at

    def end_epoch(scheduler, said):
        said.extend(scheduler.get_last_lr()[:1] * len(loader))  # what the scheduler set for the epoch's steps
        scheduler.step() if kind == "StepLR" else scheduler.step(1.0)

    model, optimizer, scheduler, pasted_lrs = fresh()
    said = []
    for _ in range(epochs):
        run = {"train_one_epoch": copied, "model": model, "optimizer": optimizer, "loader": loader}
        exec(example, run)  # the docstring's lines, as they are
        assert run["loss_sum"].item() > 0 and 0 <= run["correct"].item() <= 50
        end_epoch(scheduler, said)

    by_hand, optimizer, scheduler, hand_lrs = fresh()
    for _ in range(epochs):
        by_hand.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(by_hand(x), y)
            loss.backward()
            optimizer.step()
        end_epoch(scheduler, [])
    for (name, a), b in zip(by_hand.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert pasted_lrs == hand_lrs == said
    cuts = [0, 1, 2] if kind == "StepLR" else [0, 0, 1, 2]
    assert pasted_lrs == pytest.approx([0.1 * 0.1 ** cut for cut in cuts for _ in range(len(loader))])


def test_the_pasted_loop_moves_batches_to_the_models_device(tmp_path):
    """The docstring's promise: micro-batches on another device than the model's are moved there. A model on the
    meta device (shapes only) trains on CPU batches; and on a GPU, when there is one, it ends where the same steps
    on the CPU end."""
    copied, _ = pasted_loop(tmp_path)
    model = torch.nn.Linear(6, 3, device="meta")
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(3)]
    loss_sum, correct = copied(model, torch.optim.SGD(model.parameters(), lr=0.1), [([b], 5) for b in batches])
    assert loss_sum.device.type == correct.device.type == "meta"
    if torch.cuda.is_available():
        weights = []
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            model = torch.nn.Linear(6, 3).to(device)
            loss_sum, _ = copied(model, torch.optim.SGD(model.parameters(), lr=0.1), [([b], 5) for b in batches])
            assert loss_sum.device.type == device
            weights.append(model.weight.detach().cpu())
        assert torch.allclose(*weights, atol=1e-5)


def test_a_failed_first_run_leaves_no_empty_folders_behind(tmp_path, monkeypatch):
    """The first run in a fresh folder, offline (the archive's address made unreachable: the discard port): one
    error line, and neither data/ nor runs/ is left behind."""
    import formats
    monkeypatch.setattr(formats, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)
    fails_with(["--device", "cpu"], "cifar-10-batches-py not found in data and the download failed")
    assert list(tmp_path.iterdir()) == []

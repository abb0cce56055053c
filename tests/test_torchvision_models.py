"""torchvision models through --model, --pretrained from torch's cache, --init-from, --freeze-backbone, --image-size
for the packed datasets, and CIFAR-100: real runs on tiny data, the pretrained weights planted offline (a seeded
state_dict under the official file name in a temporary TORCH_HOME, which is where torch looks first)."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import get_model, get_model_weights

import batches
import data
import formats
import evaluate
import export
import predict
import config
import train
from checkpoint import load_checkpoint
from conftest import ROOT, fails_with, write_cifar10, write_mnist
from image_files import make_image_folder, write_class_images

CPU = ["--device", "cpu"]


def weights_of(path: Path, key: str = "model") -> dict:
    return torch.load(path, weights_only=True)[key]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """80 training and 20 test images in the CIFAR-10 layout."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_per_batch=16, n_test=20)


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory, cifar) -> Path:
    """A 1-epoch resnet18 run with gradient accumulation and mirror TTA: its folder."""
    out = tmp_path_factory.mktemp("resnet18")
    train.main(["--data-dir", str(cifar), *CPU, "--model", "resnet18", "--optimizer", "sgd", "--lr", "0.05",
                "--batch-size", "32", "--accum-steps", "2", "--augment", "--tta", "--epochs", "1",
                "--out-dir", str(out)])
    return out


def test_a_torchvision_model_trains_evaluates_predicts_and_exports(resnet18_run, tmp_path, capsys):
    out = resnet18_run
    ckpt = load_checkpoint(out / "best.pth")
    assert (ckpt["model_name"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"]) == ("resnet18", 10, 3,
                                                                                                   32)
    assert ckpt["model"]["fc.weight"].shape == (10, 512) and ckpt["widths"] is None
    # evaluate.py rebuilds it from the checkpoint alone and gets the run's own test accuracy (mirror TTA)
    capsys.readouterr()
    result = evaluate.main(["--checkpoint", str(out / "best.pth"), "--json"])
    assert json.loads(capsys.readouterr().out)["tta"] == "mirror"
    assert result["accuracy"] == json.loads((out / "results.json").read_text())["test_accuracy"]
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image)
    [labelled] = predict.main(["--checkpoint", str(out / "best.pth"), "--top-k", "3", str(image)])
    assert len(labelled["top_k"]) == 3 and labelled["label"] in ckpt["classes"]
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="export.py checks the ONNX model with onnxruntime")
    assert export.main(["--checkpoint", str(out / "best.pth"), "--output", str(tmp_path / "m.onnx")]) < 1e-4
    assert (tmp_path / "m.onnx").is_file()


def test_a_torchvision_model_with_ema_resumes_bit_for_bit(cifar, tmp_path):
    flags = ["--data-dir", str(cifar), *CPU, "--model", "mobilenet_v3_small", "--batch-size", "16", "--accum-steps",
             "2", "--ema", "0.9", "--augment"]
    train.main([*flags, "--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    train.main([*flags, "--epochs", "1", "--out-dir", str(tmp_path / "r")])
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--epochs", "2"])
    for key in ("model", "ema_model"):
        resumed, straight = weights_of(tmp_path / "r" / "last.pth", key), weights_of(tmp_path / "straight" / "last.pth",
                                                                                     key)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_list_models_and_unknown_names(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--list-models"])
    names = capsys.readouterr().out.split()
    assert exc.value.code == 0 and names[:3] == ["simplecnn", "resnet9", "airnet"]
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vgg11_bn"} <= set(names)
    fails_with(["--model", "resnet81"], "unknown model 'resnet81'; did you mean resnet18, resnet152, resnet101? "
                                        "(python train.py --list-models lists them all)")
    assert "--list-models" in config.build_parser().format_help()


# ---------------------------------------------------------------------------------------------------------------
# --pretrained, offline

def plant_weights(torch_home: Path, name: str) -> dict:
    """A seeded state_dict of `name`'s ImageNet architecture, with BatchNorm statistics that are not the defaults,
    saved where torch looks for the official weights file."""
    torch.manual_seed(1)
    state = get_model(name).state_dict()
    for key, tensor in state.items():
        if key.endswith("running_mean"):
            tensor.normal_()
        elif key.endswith("running_var"):
            tensor.uniform_(0.5, 2)
        elif key.endswith("num_batches_tracked"):
            tensor.fill_(7)
    url = get_model_weights(name).DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_weights_come_from_the_cache_and_a_frozen_backbone_stays_bit_for_bit(
        tmp_path, cifar, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = plant_weights(tmp_path / "torch", "mobilenet_v3_small")
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar), *CPU, "--model", "mobilenet_v3_small", "--pretrained", "--freeze-backbone",
                "--epochs", "2", "--lr", "0.01", "--out-dir", str(out)])
    assert "mobilenet_v3_small with 1,528,106 parameters (10,250 trained)" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "last.pth")
    weights = ckpt["model"]
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert weights["classifier.3.weight"].shape == (10, 1024) and set(weights) == set(planted)
    assert all(torch.equal(weights[k], planted[k]) for k in set(planted) - head)  # BatchNorm statistics included
    fresh_head = train.starting_weights(config.parse_args(["--model", "mobilenet_v3_small", "--pretrained"]))
    assert all(torch.equal(fresh_head["model"][k], planted[k]) for k in planted)
    # normalized as the weights were trained (their transforms' ImageNet mean and std), not with the data's own
    preprocess = get_model_weights("mobilenet_v3_small").DEFAULT.transforms()
    assert ckpt["mean"] == pytest.approx(list(preprocess.mean)) and ckpt["std"] == pytest.approx(list(preprocess.std))
    # the checkpoint rebuilds without the cache: evaluate.py needs nothing but it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    result = evaluate.main(["--checkpoint", str(out / "best.pth"), "--json"])
    assert result["accuracy"] == json.loads((out / "results.json").read_text())["test_accuracy"]


def test_pretrained_rgb_filters_fit_grayscale_images(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = plant_weights(tmp_path / "torch", "mobilenet_v3_small")
    write_mnist(tmp_path / "MNIST" / "raw", compress=False)
    out = tmp_path / "run"
    train.main(["--dataset", "mnist", "--data-dir", str(tmp_path), *CPU, "--model", "mobilenet_v3_small",
                "--pretrained", "--freeze-backbone", "--epochs", "1", "--out-dir", str(out)])
    ckpt = load_checkpoint(out / "best.pth")
    first = "features.0.0.weight"
    assert ckpt["in_channels"] == 1 and ckpt["model"][first].shape == (16, 1, 3, 3)
    assert torch.equal(ckpt["model"][first], planted[first].mean(1, keepdim=True) * 3)  # the RGB filters, summed
    imagenet = get_model_weights("mobilenet_v3_small").DEFAULT.transforms()
    assert ckpt["mean"] == pytest.approx([sum(imagenet.mean) / 3]) and ckpt["std"] == pytest.approx(
        [sum(imagenet.std) / 3])


def run_train(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_pretrained_weights_neither_cached_nor_downloadable_are_one_line_naming_file_and_folder(tmp_path, cifar):
    # a proxy on a closed port: the download fails at once, with or without a network
    closed = "http://127.0.0.1:9"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": closed, "HTTPS_PROXY": closed}
    proc = run_train("--data-dir", str(cifar), *CPU, "--model", "resnet18", "--pretrained", "--out-dir",
                     str(tmp_path / "run"), env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and proc.stdout == "", proc.stderr
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert lines[0].startswith("train.py: error: the pretrained weights ResNet18_Weights.IMAGENET1K_V1 are not in "
                               "torch's cache and the download failed")
    assert f"put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) in {folder}/" \
           in lines[0]
    assert not (tmp_path / "run").exists() and list(folder.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# --init-from

def test_init_from_a_run_with_other_classes_replaces_the_head_only(resnet18_run, tmp_path, capsys):
    source = resnet18_run
    photos = make_image_folder(tmp_path / "photos")  # two classes, blue and red
    out = tmp_path / "run"
    train.main(["--dataset", "imagefolder", "--data-dir", str(photos), *CPU, "--model", "resnet18", "--init-from",
                str(source / "best.pth"), "--freeze-backbone", "--epochs", "1", "--val-split", "0",
                "--out-dir", str(out)])
    epoch = load_checkpoint(source / "best.pth")["state"]["epoch"]
    assert f"starting from {source / 'best.pth'} (resnet18 after epoch {epoch}); its classifier of 10 classes " \
           f"replaced by a new one of 2\n" in capsys.readouterr().out  # what --init-from loaded, said
    start, ckpt = load_checkpoint(source / "best.pth"), load_checkpoint(out / "last.pth")
    loaded = start["model"]
    assert ckpt["classes"] == ["blue", "red"] and ckpt["model"]["fc.weight"].shape == (2, 512)
    assert all(torch.equal(ckpt["model"][k], loaded[k]) for k in loaded if not k.startswith("fc."))
    assert not torch.equal(ckpt["model"]["fc.bias"], torch.zeros(2))  # the new head did train
    assert (ckpt["mean"], ckpt["std"]) == (start["mean"], start["std"])  # the source's normalization
    # resume keeps all of it, and the flags that define the start cannot change
    fails_with(["--resume", str(out / "last.pth"), "--epochs", "2", "--init-from", str(out / "best.pth")],
               f"not {out / 'best.pth'}; that would be another run: start a new run without --resume")
    fails_with(["--resume", str(out / "last.pth"), "--epochs", "2", "--image-size", "16"],
               "trained with --image-size 32, not 16; that would be another run: start a new run from its weights")
    # other images of the same classes (the normalization is the weights', so only the data's fingerprint tells)
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name, color in (("blue", (0, 0, 200)), ("red", (200, 0, 0))):
            write_class_images(other / split / name, color)
    fails_with(["--resume", str(out / "last.pth"), "--epochs", "2", "--data-dir", str(other)],
               "--resume: the training data differs from the checkpoint's")
    train.main(["--resume", str(out / "last.pth"), "--epochs", "2"])
    again = load_checkpoint(out / "last.pth")["model"]
    assert all(torch.equal(again[k], loaded[k]) for k in loaded if not k.startswith("fc."))


def test_init_from_what_does_not_fit_is_one_line_and_writes_nothing(resnet18_run, cifar, tmp_path):
    source = resnet18_run
    write_mnist(tmp_path / "mnist" / "MNIST" / "raw", compress=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((source / "best.pth").read_bytes()[:100_000])
    out = tmp_path / "run"
    cifar_dir = str(cifar)
    for argv, message in [
        (["--model", "simplecnn", "--init-from", str(source / "best.pth")],
         f"--init-from {source / 'best.pth'} holds resnet18 weights, not simplecnn's; give --model resnet18"),
        (["--model", "resnet18", "--init-from", str(source / "best.pth"), "--dataset", "mnist", "--data-dir",
          str(tmp_path / "mnist")], "was trained on 3-channel images; mnist has 1-channel images"),
        (["--model", "resnet18", "--init-from", str(truncated)], "cannot read checkpoint"),
        (["--model", "resnet18", "--init-from", str(tmp_path / "none.pth")], "checkpoint not found"),
        (["--model", "resnet18", "--init-from", str(source / "best.pth"), "--pretrained"],
         "--pretrained and --init-from both choose the starting weights"),
        (["--model", "resnet9", "--freeze-backbone"], "--freeze-backbone needs --pretrained or --init-from"),
        (["--model", "resnet9", "--pretrained"], "resnet9 is one of this project's models"),
        (["--model", "squeezenet1_1", "--image-size", "8"], "squeezenet1_1 cannot take 3x8x8 images (Given input "
                                                             "size: (128x1x1). Calculated output size: (128x0x0)."),
    ]:
        fails_with(["--data-dir", cifar_dir, *CPU, "--out-dir", str(out), *argv], message)
        assert not out.exists()
    proc = run_train("--data-dir", cifar_dir, *CPU, "--model", "vgg11", "--init-from", str(source / "best.pth"),
                     "--out-dir", str(out))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"train.py: error: --init-from {source / 'best.pth'} holds resnet18 weights, not vgg11's; give --model "
        f"resnet18"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# --image-size and CIFAR-100

def test_image_size_resizes_cifar_once_and_evaluate_does_the_same(cifar, tmp_path, capsys):
    native = data.load_raw("cifar10", cifar)
    train_set, val, test, _ = data.prepare("cifar10", cifar, 0.0, 0, "cpu", image_size=20)
    expected = F.interpolate(native[2].float(), size=(20, 20), mode="bilinear", antialias=True).round().clamp(0, 255)
    assert test.images.dtype == torch.uint8 and torch.equal(test.images, expected.to(torch.uint8))
    assert train_set.mean.tolist() == pytest.approx(batches.channel_stats(native[0])[0])  # from the images as they come
    assert ("cifar10 train: resizing 80 images to 20x20 (0.1 MiB in memory, plus up to 2.2 MiB while filling it)"
            in capsys.readouterr().err)
    default = data.prepare("cifar10", cifar, 0.0, 0, "cpu")[2]
    assert torch.equal(default.images, native[2])  # no --image-size: the images as they are, not a copy of them
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar), *CPU, "--image-size", "20", "--epochs", "1", "--val-split", "0",
                "--out-dir", str(out)])
    assert load_checkpoint(out / "best.pth")["image_size"] == 20
    result = evaluate.main(["--checkpoint", str(out / "best.pth"), "--json"])
    assert result["accuracy"] == json.loads((out / "results.json").read_text())["test_accuracy"]


def test_an_image_size_that_does_not_fit_in_memory_is_refused_before_allocating():
    if formats.available_memory() is None:
        pytest.skip("this system does not say how much memory is available")
    with pytest.raises(data.DataError, match=r"cifar10 train: resizing 10,000,000 images to 1024x1024: 29,296.9 GiB "
                                             r"of memory needed, .* GiB available; choose a smaller --image-size"):
        data.allocate_images(10_000_000, 3, 1024, "cifar10 train: resizing 10,000,000 images to 1024x1024")


def write_cifar100(data_dir: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """data_dir/cifar-100-python/ as the real archive has it: train and test, pickled dicts of numpy arrays and
    lists (data, fine_labels, coarse_labels, filenames, batch_label), and meta with the label names."""
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name}ing batch 1 of 1",
                 "fine_labels": fine, "coarse_labels": [y // 5 for y in fine],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return data_dir


def test_cifar100_is_read_in_its_official_layout(tmp_path):
    root = write_cifar100(tmp_path / "c100")
    train_x, train_y, test_x, test_y, classes = data.load_raw("cifar100", root)
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(train_x, torch.from_numpy(raw["data"]).reshape(-1, 3, 32, 32))
    assert train_y.tolist() == raw["fine_labels"] and len(test_y) == 20 and test_x.shape == (20, 3, 32, 32)
    assert classes == [f"fine{i:02d}" for i in range(100)]
    out = tmp_path / "run"
    train.main(["--dataset", "cifar100", "--data-dir", str(root), *CPU, "--epochs", "1", "--out-dir", str(out)])
    ckpt = load_checkpoint(out / "best.pth")
    assert (ckpt["num_classes"], ckpt["classes"][:2]) == (100, ["fine00", "fine01"])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("name, content, message", [
    ("meta", {"fine_label_names": ["a"] * 99}, "expected 100 fine_label_names"),
    ("train", {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, "N fine_labels in 0..99"),
    ("test", {"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, "N fine_labels in 0..99"),
    ("train", Payload(), "refusing to load posix.system"),
])
def test_a_broken_cifar100_file_is_one_clear_error(tmp_path, name, content, message):
    root = write_cifar100(tmp_path / "c100")
    (root / "cifar-100-python" / name).write_bytes(pickle.dumps(content))
    with pytest.raises(data.DataError, match=message):
        data.load_raw("cifar100", root)


def test_cifar100_missing_and_not_downloadable_is_one_line(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(data.DataError, match="incomplete CIFAR-100 folder .*: missing train, test, meta"):
        data.load_raw("cifar100", tmp_path)

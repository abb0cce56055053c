"""Image folders streamed from disk by DataLoader workers, and the photo recipe (--resize-mode crop): real JPEG and
PNG files of mixed sizes, real worker processes, real signals, torchrun."""
import contextlib
import io
import os
import resource
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import get_model_weights

import augment
import cli
import data
import evaluate
import decode
import folders
import predict
import runtime
import stream
import train
from formats import available_memory
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import ROOT, as_from_a_terminal, fails_with
from runfolder import RunFolder
from test_torchvision_models import plant_weights

CLASSES = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}


def write_photos(root: Path, per_class: dict[str, int], sizes: tuple[int, int] = (40, 90), seed: int = 0) -> Path:
    """root/<split>/<class>/: noisy photos of each class's colour, of random sizes and aspect ratios, every other
    one a JPEG, the rest PNGs (some grayscale-with-alpha, some palette)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, color in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = rng.integers(*sizes, 2)
                pixels = (np.array(color) + rng.integers(-60, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
                im = Image.fromarray(pixels)
                if i % 2:
                    im.save(folder / f"{i:03d}.jpg", quality=90)
                else:
                    (im.convert("P") if i % 4 == 2 else im).save(folder / f"{i:03d}.png")
    return root


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def quiet_main(argv: list[str]) -> dict:
    return train.main([*argv, "--device", "cpu", "--log-interval", "0"])


@pytest.mark.slow
def test_the_weights_do_not_depend_on_the_workers_and_squash_streams_as_it_trains_in_memory(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", {"train": 12, "test": 3})
    crop = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "40", "--epochs", "2",
            "--batch-size", "8", "--val-split", "0.2", "--color-jitter", "0.2"]
    for workers in ("0", "1", "3"):
        quiet_main([*crop, "--workers", workers, "--out-dir", str(tmp_path / f"crop{workers}")])
    out = capsys.readouterr().out
    assert "(streamed by 3 workers)" in out
    assert "photo recipe: training: random resized crop to 40 (scale 0.08-1, ratio 0.75-1.33) and flip; " \
           "evaluation: resize 46, centre crop 40; bilinear" in out
    assert same_weights(tmp_path / "crop0" / "last.pth", tmp_path / "crop1" / "last.pth")
    assert same_weights(tmp_path / "crop1" / "last.pth", tmp_path / "crop3" / "last.pth")
    ckpt = load_checkpoint(tmp_path / "crop3" / "last.pth")
    assert ckpt["prep"] == {"mode": "crop", "resize_size": 46, "interpolation": "bilinear", "scale": [0.08, 1.0],
                            "ratio": [0.75, 4 / 3]}

    squash = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "24", "--epochs", "2",
              "--batch-size", "8", "--val-split", "0.2", "--augment", "--color-jitter", "0.2"]
    in_memory = quiet_main([*squash, "--out-dir", str(tmp_path / "memory")])
    streamed = quiet_main([*squash, "--workers", "2", "--out-dir", str(tmp_path / "streamed")])
    assert same_weights(tmp_path / "memory" / "last.pth", tmp_path / "streamed" / "last.pth")
    assert in_memory["test_accuracy"] == streamed["test_accuracy"]
    assert load_checkpoint(tmp_path / "memory" / "last.pth")["prep"]["mode"] == "squash"


@pytest.mark.slow
def test_a_folder_larger_than_the_normalization_sample_trains_alike_streamed_and_in_memory(tmp_path, monkeypatch):
    """Past stream.STATS_IMAGES training images both paths normalize with the same seeded sample of them."""
    photos = write_photos(tmp_path / "photos", {"train": 6, "test": 2})
    monkeypatch.setattr(stream, "STATS_IMAGES", 5)  # 18 images, 14 after the split: a sample of 5
    flags = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "24", "--epochs", "1",
             "--batch-size", "4", "--val-split", "0.2"]
    in_memory = quiet_main([*flags, "--out-dir", str(tmp_path / "memory")])
    streamed = quiet_main([*flags, "--workers", "2", "--out-dir", str(tmp_path / "streamed")])
    assert same_weights(tmp_path / "memory" / "last.pth", tmp_path / "streamed" / "last.pth")
    assert in_memory["test_accuracy"] == streamed["test_accuracy"]
    sampled = load_checkpoint(tmp_path / "memory" / "last.pth")["mean"]
    monkeypatch.setattr(stream, "STATS_IMAGES", 2048)
    quiet_main([*flags, "--out-dir", str(tmp_path / "all")])
    assert load_checkpoint(tmp_path / "all" / "last.pth")["mean"] != sampled  # (the sample is not all of them)


def test_the_photo_recipe_is_torchvisions_own_transform_with_the_same_draws(tmp_path):
    import torchvision.transforms.v2 as T
    from decode import Prep, load_image
    photo = write_photos(tmp_path / "photos", {"train": 1}, sizes=(120, 200)) / "train" / "red" / "000.png"
    prep = Prep("crop", 73, "bicubic", (0.3, 0.9), (0.5, 2.0))
    pil = Image.open(photo).convert("RGB")
    for seed in range(6):  # both flips
        with augment.seeded(7, 2, seed):
            ours = load_image(photo, 3, 64, prep=prep, train=True)
        with augment.seeded(7, 2, seed):
            theirs = T.Compose([T.RandomResizedCrop(64, (0.3, 0.9), (0.5, 2.0), T.InterpolationMode.BICUBIC),
                                T.RandomHorizontalFlip(), T.PILToTensor()])(pil)
        assert torch.equal(ours, theirs)
    by_hand = T.Compose([T.Resize(73, T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.PILToTensor()])(pil)
    assert torch.equal(load_image(photo, 3, 64, prep=prep), by_hand)
    state = torch.get_rng_state()
    with augment.seeded(7, 2, 0):
        torch.rand(5)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own generator is left where it was


@pytest.mark.slow
def test_a_streamed_epoch_after_the_first_takes_no_more_memory_than_the_first(tmp_path):
    """Each epoch forks its workers from the training process, grown by then (the model's gradients, the
    optimizer's state, validation): the second epoch's process tree (proportional set size, workers included)
    stays within 15% of the first's. (Before: +34% here, the workers' garbage collector copying every page of the
    parent's objects; with the objects frozen at the fork, +7%.)"""
    from bench_photos import tree_memory
    photos = write_photos(tmp_path / "photos", {"train": 60, "test": 2}, sizes=(150, 300))
    proc = subprocess.Popen([sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(photos),
                             "--model", "mobilenet_v3_small", "--image-size", "96", "--epochs", "2", "--batch-size",
                             "32", "--val-split", "0.3", "--workers", "2", "--log-interval", "0", "--out-dir",
                             str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak, peaks = [0], []

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_memory(proc.pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()
    for line in proc.stdout:
        if line.startswith("epoch"):  # (after the epoch's validation)
            peaks.append(peak[0])
            peak[0] = 0
    proc.wait()
    sampler.join()
    assert proc.returncode == 0 and len(peaks) == 2
    assert peaks[1] <= 1.15 * peaks[0], [p / 2**20 for p in peaks]


def test_training_crops_are_torchvisions_on_every_exif_orientation_and_sharp_from_a_reduced_jpeg(tmp_path):
    """The crop's box is drawn from the header's size and cut from the stored image, then turned upright: exactly
    torchvision's crop of the upright photo at full scale (a PNG); a large JPEG is decoded at a reduction that
    keeps the box >= twice the output's side, as sharp as torchvision's crop of the whole decode and close to it."""
    import torchvision.transforms.v2 as T
    from decode import Prep, load_image
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (150, 230, 3), dtype=np.uint8))
    prep = Prep("crop", 73, "bilinear", (0.08, 1.0))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / f"{orientation}.png", exif=exif)
        upright = ImageOps.exif_transpose(Image.open(tmp_path / f"{orientation}.png")).convert("RGB")
        for i in range(3):
            with augment.seeded(0, 1, i):
                ours = load_image(tmp_path / f"{orientation}.png", 3, 48, prep=prep, train=True)
            with augment.seeded(0, 1, i):
                theirs = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(), T.PILToTensor()])(upright)
            assert torch.equal(ours, theirs), (orientation, i)

    # a detailed JPEG (smooth noise at every scale, sharp lines), rotated by EXIF: 1,600 x 1,200 stored
    y, x = np.mgrid[0:1200, 0:1600] / 1600
    pixels = sum(np.sin(2 * np.pi * (f * x * rng.uniform(0.5, 1) + f * y * rng.uniform(0.5, 1)) + rng.uniform(0, 9))
                 for f in (3, 17, 60, 150, 300))
    pixels = (128 + 25 * pixels[..., None] * np.array([1.0, 0.8, 0.6])).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=92, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "big.jpg")).convert("RGB")

    def detail(x: torch.Tensor) -> float:  # mean |Laplacian|
        return (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]).abs().mean()
    for area in (0.08, 0.25, 1.0):
        prep = Prep("crop", 73, "bilinear", (area, area))
        with augment.seeded(0, 1, 0):
            ours = load_image(tmp_path / "big.jpg", 3, 64, prep=prep, train=True).float()
        with augment.seeded(0, 1, 0):
            theirs = T.Compose([T.RandomResizedCrop(64, (area, area)), T.RandomHorizontalFlip(),
                                T.PILToTensor()])(upright).float()
        assert not torch.equal(ours, theirs)  # (decoded at a reduction: not the same pixels)
        assert detail(ours) >= 0.9 * detail(theirs) and (ours - theirs).abs().mean() <= 6, area


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (its DataLoader workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_with_workers_leaves_no_process_and_resumes_exactly_mid_epoch(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 40, "test": 2}, sizes=(60, 120))
    flags = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "64", "--epochs", "2",
             "--batch-size", "4", "--val-split", "0", "--workers", "2", "--device", "cpu"]  # 30 steps an epoch
    straight = train.main([*flags, "--log-interval", "0", "--out-dir", str(tmp_path / "straight")])

    out = tmp_path / "stopped"
    proc = start([*flags, "--log-interval", "1", "--out-dir", str(out)])
    for line in proc.stdout:
        if line.split()[:4] == ["epoch", "2/2", "step", "2/30"]:
            break
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 1 and 2 <= ckpt["partial_epoch"]["step"] < 30
    command = err.strip().splitlines()[-1].strip()
    resumed = train.main([*shlex.split(command)[2:], "--workers", "1", "--log-interval", "0"])  # other workers: same
    assert same_weights(tmp_path / "straight" / "last.pth", out / "last.pth")
    assert resumed["test_accuracy"] == straight["test_accuracy"]


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_ends_the_run_in_one_line(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 40, "test": 2}, sizes=(60, 120))
    proc = start(["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "64", "--epochs", "50",
                  "--batch-size", "2", "--val-split", "0", "--workers", "2", "--device", "cpu", "--log-interval", "1",
                  "--out-dir", str(tmp_path / "run")])
    for line in proc.stdout:
        if line.split()[:4] == ["epoch", "2/50", "step", "2/60"]:
            break
    os.kill(children(proc.pid)[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: a worker process reading the images ended (") and \
        err.strip().endswith("); if the system ran out of memory, give fewer --workers")


@pytest.mark.slow
def test_a_corrupt_file_met_mid_epoch_is_skipped_with_one_warning(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 6, "test": 2})
    good = photos / "train" / "red" / "001.jpg"
    broken = photos / "train" / "red" / "000_cut.jpg"
    broken.write_bytes(good.read_bytes()[:300])  # a JPEG header, then nothing: fails only when decoded
    proc = subprocess.run([sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(photos),
                           "--image-size", "40", "--epochs", "3", "--batch-size", "4", "--val-split", "0",
                           "--workers", "2", "--device", "cpu", "--out-dir", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: cannot read image {broken}: ") and \
        warnings[0].endswith("; skipped"), proc.stderr  # once, though all three epochs meet it
    assert "epoch 3/3" in proc.stdout


def test_streamed_numbers_count_the_images_read_and_agree_with_evaluate(tmp_path, capsys):
    """Unreadable files, skipped, are left out of every number: the training loss and accuracy, the test's accuracy,
    loss and confusion matrix (results.json = evaluate.py, and it keeps the count); a test set of which nothing
    can be read is one line, not "accuracy 0.00%"."""
    photos = write_photos(tmp_path / "photos", {"train": 6, "test": 2})
    (photos / "train" / "blue" / "zz.jpg").write_bytes(b"not an image")
    (photos / "test" / "red" / "zz.jpg").write_bytes(b"not an image")
    result = quiet_main(["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "40", "--epochs", "1",
                         "--batch-size", "4", "--val-split", "0", "--workers", "1", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "note: 1 of epoch 1's 19 training images could not be read; the training loss and accuracy count the " \
           "18 read" in err
    row = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].split(",")
    correct = float(row[2]) * 18 / 100
    assert correct > 0 and abs(correct - round(correct)) < 1e-6  # a count out of 18, not of 19
    assert result["test_images"] == 6 and result["test_skipped"] == 1
    report = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--json"])
    assert report["skipped"] == 1 and report["confusion"].sum() == 6
    assert report["accuracy"] == result["test_accuracy"] == 100 * report["confusion"].diag().sum().item() / 6
    assert report["loss"] == result["test_loss"]

    test = evaluate.test_set(load_checkpoint(tmp_path / "run" / "best.pth"), "imagefolder", str(photos),
                             decode.MAX_IMAGE_PIXELS, torch.device("cpu"))
    index = torch.cat([i for _, y, i in test.indexed_batches(torch.arange(len(test)), 4)])
    assert index.tolist() == [0, 1, 2, 3, 4, 5]  # the red one (file 6) left out: --show captions the images read
    for p in (photos / "test").rglob("*.*"):
        p.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu"])
    assert exc.value.code == "evaluate.py: error: none of the 7 images could be read (each unreadable file was " \
                             "named above)"


@pytest.mark.slow
def test_torchrun_processes_each_read_their_share_and_see_every_image_once(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 8, "test": 2})
    # 24 images, one optimizer step of all 24: two processes of 12 each step as one process does
    flags = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "32", "--epochs", "1",
             "--batch-size", "24", "--val-split", "0", "--optimizer", "sgd", "--lr", "0.1", "--workers", "1",
             "--no-channels-last", "--device", "cpu", "--log-interval", "0"]
    train.main([*flags, "--out-dir", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *flags,
           "--out-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "last.pth"), weights(tmp_path / "two" / "last.pth")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k


@pytest.mark.slow
def test_predict_with_the_photo_recipe_matches_torchvision_weights_transforms(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    plant_weights(tmp_path / "torch", "mobilenet_v3_small")
    photos = write_photos(tmp_path / "photos", {"train": 2, "test": 2}, sizes=(230, 330))
    out = tmp_path / "run"
    results = quiet_main(["--dataset", "imagefolder", "--data-dir", str(photos), "--model", "mobilenet_v3_small",
                          "--pretrained", "--freeze-backbone", "--epochs", "1", "--batch-size", "6", "--val-split",
                          "0", "--workers", "1", "--out-dir", str(out)])
    assert "photo recipe of the pretrained weights: training: random resized crop to 224 (scale 0.08-1, ratio " \
           "0.75-1.33) and flip; evaluation: resize 256, centre crop 224; bilinear" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "best.pth")
    assert ckpt["image_size"] == 224 and ckpt["prep"]["resize_size"] == 256

    files = sorted(str(p) for p in (photos / "test").rglob("*.*"))
    answers = predict.main(["--checkpoint", str(out / "best.pth"), "--top-k", "3", "--json", *files])
    capsys.readouterr()
    by_hand = get_model_weights("mobilenet_v3_small").DEFAULT.transforms()  # resize 256, crop 224, ImageNet stats
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        x = torch.stack([by_hand(Image.open(f).convert("RGB")) for f in files])
        expected = model(x).softmax(1)
    for answer, row in zip(answers, expected):
        for top in answer["top_k"]:
            assert abs(top["probability"] - row[ckpt["classes"].index(top["label"])].item()) < 1e-3

    tested = evaluate.main(["--checkpoint", str(out / "best.pth"), "--json"])
    assert tested["accuracy"] == results["test_accuracy"]


def test_a_folder_too_large_for_memory_is_streamed_and_says_so(tmp_path, capsys):
    available = available_memory()
    if available is None:
        pytest.skip("this system does not say how much memory is available")
    size = 1024  # 3 MiB an image decoded: enough files of 1 pixel to need more than half the memory
    n = available // 2 // (3 * size * size) // 3 + 2  # per class, two classes, and the test split
    png = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(png, format="PNG")
    for split, count in (("train", n), ("test", n)):
        for name in ("a", "b"):
            folder = tmp_path / "big" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(png.getvalue())
    train_set, val, test, classes = data.prepare("imagefolder", tmp_path / "big", 0.0, 0, "cpu", image_size=size)
    assert isinstance(train_set, stream.StreamSet) and isinstance(test, stream.StreamSet) and val is None
    assert len(train_set) == 2 * n and classes == ["a", "b"]
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"imagefolder: {4 * n:,} images at 1024x1024 would take ") and \
        line.endswith(f"streaming them from disk with {stream.default_workers()} worker processes (--workers)")


# ---------------------------------------------------------------------------------------------------------------
# Workers cannot hang a run: a worker that stops answering, a signal while the run waits for one, what the system
# refuses them (shared memory, file descriptors), and a main process that dies first

def streamed_run(tmp_path: Path, *flags: str, env: dict | None = None, preexec_fn=as_from_a_terminal,
                 prefix: tuple = (), out: str = "run") -> tuple[subprocess.Popen, Path]:
    """train.py streaming 60 tiny photos by 2 workers (flags may change that), 30 steps an epoch, a line a step."""
    photos = tmp_path / "photos"
    if not photos.exists():
        write_photos(photos, {"train": 20, "test": 2}, sizes=(30, 50))
    out = tmp_path / out
    argv = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "24", "--epochs", "50",
            "--batch-size", "2", "--val-split", "0", "--workers", "2", "--device", "cpu", "--log-interval", "1",
            "--out-dir", str(out), *flags]
    return subprocess.Popen([*prefix, sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}), out


def wait_for_step(proc: subprocess.Popen, epoch: int, step: int) -> None:
    for line in proc.stdout:
        words = line.split()
        if words[:1] == ["epoch"] and words[1].startswith(f"{epoch}/") and words[3:4] == [f"{step}/30"]:
            return
    raise AssertionError(f"train.py ended first: {proc.stderr.read()}")


def all_gone(pids: list[int]) -> bool:
    deadline = time.time() + 30
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


@pytest.mark.slow
def test_a_stopped_worker_ends_the_run_after_worker_timeout_in_one_line_naming_it(tmp_path, monkeypatch):
    proc, _ = streamed_run(tmp_path, env={"WORKER_TIMEOUT": "3"})
    wait_for_step(proc, 2, 1)
    stopped = children(proc.pid)[0]
    os.kill(stopped, signal.SIGSTOP)  # (it answers nothing, not even the handover of a batch it has made)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == f"train.py: error: the worker process {stopped} reading the images did " \
        f"not hand a batch over for 3 s (WORKER_TIMEOUT; stopped or hung?); the run stops. If reading a batch can " \
        f"take that long, raise WORKER_TIMEOUT\n", err
    assert all_gone([stopped])

    monkeypatch.setenv("WORKER_TIMEOUT", "soon")
    fails_with(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "photos"), "--workers", "1", "--device",
                "cpu", "--out-dir", str(tmp_path / "run2")],
               "WORKER_TIMEOUT=soon must be a number of seconds, at least 1")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_workers_are_stopped_stops_at_once_with_a_checkpoint_that_resumes(tmp_path, signum):
    proc, out = streamed_run(tmp_path, "--epochs", "2", env={"WORKER_TIMEOUT": "600"})  # (only the signal ends it)
    wait_for_step(proc, 2, 2)
    workers = children(proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    os.set_blocking(proc.stdout.fileno(), False)
    while select.select([proc.stdout], [], [], 2)[0] and proc.stdout.read():  # the batches read ahead consumed:
        pass  # no step for 2 s, the run waits for the stopped workers
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert all_gone(workers)
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 1 and 2 <= ckpt["partial_epoch"]["step"] < 30
    assert err.strip().splitlines()[-1].strip().endswith(f"--resume {out / 'last.pth'}")
    resumed = train.main([*shlex.split(err.strip().splitlines()[-1])[2:], "--log-interval", "0"])
    assert load_checkpoint(out / "last.pth")["state"]["epoch"] == 2 and "test_accuracy" in resumed


def in_own_mount_namespace(shm_options: str) -> tuple:
    """A command prefix: the rest runs with a fresh tmpfs mounted (`shm_options`) on /dev/shm, in a mount namespace
    of its own (the machine's /dev/shm is untouched)."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and unshare(1) to give the run a /dev/shm of its own")
    return ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o {shm_options} tmpfs /dev/shm && exec "$@"', "sh")


@pytest.mark.slow
@pytest.mark.parametrize("options, problem", [
    ("size=64k", "the worker processes cannot hand batches over: shared memory (/dev/shm: 64 KiB, "),
    ("ro,size=64k", "the worker processes need shared memory (/dev/shm), which this system does not give "
                    "(Read-only file system); ")])
def test_shared_memory_that_is_small_or_read_only_is_one_line_with_the_way_out(tmp_path, options, problem):
    proc, _ = streamed_run(tmp_path, "--epochs", "1", prefix=in_own_mount_namespace(options))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith(f"train.py: error: {problem}") and err.count("\n") == 1, err
    assert "give --workers 0 to read the images in this process" in err and \
        err.endswith("(in a container: docker run --shm-size=1g)\n"), err


def open_files(limit: int, hard: int | None) -> Callable[[], None]:
    def preexec() -> None:
        as_from_a_terminal()
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                                                    if hard is None else hard))
    return preexec


@pytest.mark.slow
def test_too_few_file_descriptors_are_raised_to_the_hard_limit_or_refused_in_one_line(tmp_path):
    proc, _ = streamed_run(tmp_path, "--epochs", "1", "--workers", "4", "--log-interval", "0",
                           preexec_fn=open_files(40, None))  # (the hard limit: the machine's)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == "" and "test accuracy" in out, err

    proc, _ = streamed_run(tmp_path, "--epochs", "1", "--workers", "4", preexec_fn=open_files(40, 40), out="run2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith("train.py: error: 4 worker processes (--workers) need about ") and \
        err.count("\n") == 1 and "open files, and this process may open only 40 (ulimit -Hn); raise the limit" in err
    assert err.endswith("or give fewer --workers (--workers 0 reads the images in this process)\n"), err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_workers_end_with_their_main_process_quietly_and_never_hold_the_run_folder(tmp_path, signum):
    proc, out = streamed_run(tmp_path)
    wait_for_step(proc, 2, 3)
    workers = children(proc.pid)
    for pid in workers:  # no descriptor of the run folder: its lock (an flock) is the main process's alone
        held = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # (one closed as it was listed)
                held.append(os.readlink(fd))
        assert not [path for path in held if path.startswith(str(out))], held
        if signum == signal.SIGKILL:
            os.kill(pid, signal.SIGSTOP)  # (a stopped worker takes no notice of anything but SIGKILL)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)  # (the workers share its stderr: whatever they say is in it)
    assert proc.returncode == -signum and err == "", err
    assert all_gone(workers)
    again = RunFolder(out, "resumed")  # what a resume does first: the folder is free at once
    again.lock()
    again.release()


def test_a_second_signal_a_second_later_stops_at_once_and_two_at_once_are_one():
    """What ends a wait that is not for a training batch (validation's, a save's): the signal sent again. Two that
    come together are one: a launcher (torchrun) passes the terminal's Ctrl-C on to processes that got it too."""
    stop = runtime.StopSignal()
    with stop.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # (handled, like the first, before the next line runs)
        assert stop.signum == signal.SIGTERM and stop.requested()
        time.sleep(runtime.AGAIN_AFTER)
        with pytest.raises(cli.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (not reached)
    assert stopped.value.code == 128 + signal.SIGTERM


def test_dataloaders_advice_against_more_workers_than_cores_is_left_unsaid(tmp_path):
    """--workers is the user's choice: more worker processes than cores read without DataLoader's warning about
    it, also where the warning filters were reset after stream.py was imported (pytest resets them each test)."""
    import warnings
    photos = write_photos(tmp_path / "photos", {"test": 2})
    names, labels = folders.split_listing(photos, "test", list(CLASSES))
    many = len(os.sched_getaffinity(0)) + 1
    test = stream.stream_set(photos, names, labels, 16, decode.MAX_IMAGE_PIXELS, decode.SQUASH, 0,
                             torch.device("cpu"), many)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")  # (before it: a filter set at import alone)
        read = list(test.read([torch.arange(len(test))], 0))
    assert len(read) == 1 and len(read[0][1]) == 6 and [str(w.message) for w in raw] == []


def test_a_tmpdir_too_long_for_the_workers_sockets_is_one_line_with_the_way_out(tmp_path):
    photos = write_photos(tmp_path / "photos", {"train": 2, "test": 1})
    long = Path("/tmp") / ("t" * 100)
    long.mkdir(exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(photos),
                               "--image-size", "40", "--epochs", "1", "--val-split", "0", "--workers", "1",
                               "--device", "cpu", "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(long)})
    finally:
        for p in long.iterdir():
            with contextlib.suppress(OSError):
                p.rmdir()
        long.rmdir()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"train.py: error: the worker processes hand batches over through sockets in {long}/pymp-")
    assert last.endswith("that path is too long for a socket's (107 bytes at most); set a shorter TMPDIR (such as "
                         "TMPDIR=/tmp), or give --workers 0 to read the images in this process")

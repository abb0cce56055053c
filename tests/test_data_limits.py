"""Careless or hostile data: splits too small to mean anything, images too large to decode, caches and files that
lie. Every case is a real file in the real format, refused with one line that names it."""
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import data
import decode
import folders
import formats
import evaluate
import predict
import train
from conftest import ROOT, write_idx, write_mnist
from image_files import make_image_folder
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_atomically
from model import build_model


def write_cifar_batch(path: Path, n: int, label_key: str = "labels") -> None:
    path.write_bytes(pickle.dumps({"data": np.zeros((n, 3072), np.uint8), label_key: [0] * n}))


def write_cifar100(data_dir: Path, n_train: int = 20, n_test: int = 10) -> Path:
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    write_cifar_batch(folder / "train", n_train, "fine_labels")
    write_cifar_batch(folder / "test", n_test, "fine_labels")
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return data_dir


# ---------------------------------------------------------------------------------------------------------------
# 1. Splits too small to train or test on

def test_an_empty_cifar10_test_batch_is_refused_by_train_and_evaluate(cifar_dir, tmp_path):
    test_batch = cifar_dir / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(test_batch, 0)
    message = f"the test split holds 0 images ({test_batch}); it needs at least 1"
    with pytest.raises(data.DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        data.load_raw("cifar10", cifar_dir)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--device", "cpu", "--out-dir", str(out)])
    assert exc.value.code == f"train.py: error: {message}"
    assert not out.exists()  # no results.json, no run folder


def test_a_cifar10_training_set_of_one_image_is_refused(cifar_dir):
    folder = cifar_dir / "cifar-10-batches-py"
    write_cifar_batch(folder / "data_batch_1", 1)
    for i in range(2, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 0)
    with pytest.raises(data.DataError, match=r"^the train split holds 1 image \(.*data_batch_1, .*data_batch_5\); "
                                             r"it needs at least 2$"):
        data.load_raw("cifar10", cifar_dir)


@pytest.mark.parametrize("split, n_train, n_test", [("test", 20, 0), ("train", 1, 10)])
def test_cifar100_splits_too_small_are_refused(tmp_path, split, n_train, n_test):
    write_cifar100(tmp_path, n_train, n_test)
    with pytest.raises(data.DataError, match=rf"^the {split} split holds . images? \(.*cifar-100-python/{split}\)"):
        data.load_raw("cifar100", tmp_path)


def test_an_idx_file_of_zero_images_is_refused(tmp_path):
    folder = write_mnist(tmp_path / "mnist", compress=False)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros((0,), np.uint8), compress=False)
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte holds no images"):
        data.load_raw("mnist", tmp_path)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), compress=False)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros((1,), np.uint8), compress=False)
    with pytest.raises(data.DataError, match=r"^the train split holds 1 image \(.*train-images-idx3-ubyte\)"):
        data.load_raw("mnist", tmp_path)


def test_an_image_folder_with_an_empty_test_folder_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images")
    for p in (root / "test").rglob("*.*"):
        p.unlink()
    with pytest.raises(data.DataError, match=r"class folder .*images/test/blue holds no readable images"):
        data.load_raw("imagefolder", root, image_size=16)


def test_a_val_split_that_rounds_to_no_image_is_refused(cifar_dir):
    with pytest.raises(data.DataError, match=r"^--val-split 0.001 of the 200 training images holds out none; give "
                                             r"a larger --val-split, or 0 for no validation$"):
        data.prepare("cifar10", cifar_dir, 0.001, seed=0, device="cpu")
    assert data.prepare("cifar10", cifar_dir, 0.0, seed=0, device="cpu")[1] is None


# ---------------------------------------------------------------------------------------------------------------
# 2. A failure that may pass is never cached as a skipped image

def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_an_image_that_fails_for_a_passing_reason_stops_the_run_and_is_never_cached(tmp_path):
    root = make_image_folder(tmp_path / "images")
    # Too many open files: a real OS error, the system's and not the file's. The limit is set once Pillow's plugins
    # are imported (one decode first), so only the opening of the images fails.
    proc = run_python(f"""
import resource, cli, decode, folders
decode.load_image({str(root / "test" / "red" / "d_opaque.png")!r}, 3, 8)
with cli.one_line_errors("x"):
    import os
    fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    folders.load_imagefolder_split(folders.Path({str(root)!r}), "train", ["blue", "red"], 16)
""")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("x: error: cannot read image ")
    assert proc.stderr.splitlines()[-1].endswith(": Too many open files")
    assert not list(root.glob(".cache-*"))  # nothing cached: the next run decodes every image again
    images, labels = folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    assert labels.tolist() == [0] * 6 + [1] * 6  # only the corrupt file is skipped


# ---------------------------------------------------------------------------------------------------------------
# 4. An image may decode to so many pixels, no more

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # (pytest resets decode.py's filter)
def test_a_small_png_of_13000x13000_pixels_is_refused_before_it_is_decoded(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    bomb = root / "train" / "blue" / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb)  # 20 KB on disk, 169 megapixels: 0.5 GB as RGB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(decode.UnreadableImage, match=rf"^cannot read image {bomb}: 13000x13000 pixels is over the "
                                                   rf"limit of 50,000,000 per image; downscale it$"):
        decode.load_image(bomb, 3, 32)
    # The image folder skips it, with that line; decoding it (each of 8 threads at once) is what would cost memory
    proc = run_python(f"""
import resource, folders
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images, labels = folders.load_imagefolder_split(folders.Path({str(root)!r}), "train", ["blue", "red"], 16)
print(len(labels), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")
    n, grown_mib = map(int, proc.stdout.split())
    assert n == 12 and grown_mib < 100, (n, grown_mib)
    assert f"warning: cannot read image {bomb}: 13000x13000 pixels is over the limit" in proc.stderr
    assert "DecompressionBombWarning" not in proc.stderr  # Pillow's own (multi-line) warning is ours, in one line


def test_max_pixels_is_part_of_the_cache_key(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")  # its largest image: 64x48 = 3,072 pixels
    _, labels = folders.load_imagefolder_split(root, "train", ["blue", "red"], 16, max_pixels=2000)
    assert len(labels) == 10  # the 64x48 webp of each class skipped (and z_broken.jpg, always)
    assert capsys.readouterr().err.count("pixels is over the limit of 2,000 per image") == 2
    _, labels = folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    assert len(labels) == 12 and "over the limit" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 3. --image-size: the resize holds a small fixed buffer beyond its result, and the memory check counts both

def test_resizing_in_chunks_gives_the_images_of_one_whole_resize(monkeypatch):
    images = torch.randint(0, 256, (7, 3, 10, 12), dtype=torch.uint8)
    whole = F.interpolate(images.float(), size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    monkeypatch.setattr(data, "RESIZE_BUFFER", 1)  # one image at a time
    assert torch.equal(data.resize_images(images, 20, "test"), whole.round().clamp(0, 255).to(torch.uint8))


def test_resizing_to_a_large_size_peaks_at_what_the_memory_check_announced(cifar_dir):
    proc = run_python(f"""
import re, resource, sys, torch, data
x, *_ = data.load_raw("cifar10", {str(cifar_dir)!r})
data.resize_images(x[:2], 64, "warm-up")  # the kernels' own first-use allocations, not counted below
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = data.resize_images(x, 384, "cifar10 train")  # 200 images: 88 MB; as floats at once, 350 MB more
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(out.shape[2], grown // 2**20)
""")
    size, grown_mib = map(int, proc.stdout.split())
    result_mib, extra_mib = map(float, re.search(r"cifar10 train: resizing 200 images to 384x384 \(([\d.]+) MiB in "
                                                 r"memory, plus up to ([\d.]+) MiB", proc.stderr).groups())
    assert size == 384 and extra_mib <= data.RESIZE_BUFFER / 2**20
    assert grown_mib <= result_mib + extra_mib + 16, (grown_mib, result_mib, extra_mib)


# ---------------------------------------------------------------------------------------------------------------
# 5. Checkpoints: tensors larger than their storage, and memory that runs out while mapping one

def small_checkpoint(**extra) -> dict:
    torch.manual_seed(0)
    state = build_model("simplecnn", 3, 3, 32).state_dict()
    return {"model": {**state, **extra}, "model_name": "simplecnn", "num_classes": 3, "in_channels": 3,
            "image_size": 32, "classes": ["cat", "dog", "fox"], "mean": [0.5] * 3, "std": [0.25] * 3}


def test_an_expanded_tensor_in_a_checkpoint_is_refused_before_it_is_materialized(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save(small_checkpoint(evil=torch.zeros(1).expand(2**20, 2**10)), evil)  # 4 GiB as float32, 4 bytes stored
    assert evil.stat().st_size < 1_000_000
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    proc = run_python(f"""
import resource, predict
try:
    predict.main(["--checkpoint", {str(evil)!r}, {str(image)!r}])
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"predict.py: error: {evil} holds a tensor of shape (1048576, 1024) over a storage of 4 bytes (an expanded "
        f"tensor, a crafted file?); refusing it"], proc.stderr
    assert int(proc.stdout) < 3000  # MiB: torch itself (0.6-1.7 GiB seen), not torch + the 4 GiB


def test_running_out_of_memory_while_mapping_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "big.pth"
    torch.save(small_checkpoint(big=torch.zeros(16 * 2**20)), path)  # 64 MiB
    proc = run_python(f"""
import resource, checkpoint, cli
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
with cli.one_line_errors("x"):
    resource.setrlimit(resource.RLIMIT_AS, (vm + 16 * 2**20, resource.RLIM_INFINITY))
    checkpoint.load_checkpoint({str(path)!r})
""")
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"x: error: cannot read checkpoint {path}: out of memory while mapping it (64.2 MiB); free some memory and "
        f"try again"], proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6. Files that disagree with each other: test images of another size, an image cache that lies

def test_mnist_test_images_of_another_size_are_refused(tmp_path):
    folder = write_mnist(tmp_path / "mnist", compress=True)
    test_images = write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((40, 32, 32), np.uint8), compress=True)
    with pytest.raises(data.DataError, match=rf"^mnist: the test images of {test_images} are 32x32, the training "
                                             rf"images 28x28; both splits need one size$"):
        data.load_raw("mnist", tmp_path)


def rewrite_cache(root: Path, change) -> None:
    [cache] = root.glob(".cache-train-16-*.pt")
    content = torch.load(cache, weights_only=True)
    change(content)
    torch.save(content, cache)


@pytest.mark.parametrize("change", [
    lambda c: c["labels"].__setitem__(0, -1),                     # a negative label
    lambda c: c["labels"].__setitem__(-1, 7),                     # a label past the classes
    lambda c: c["labels"].__setitem__(slice(None), 0),            # every image in one class
    lambda c: c.__setitem__("skipped", ["x"] * 20),               # more skipped files than there are
    lambda c: c["skipped"].__setitem__(0, "x\n" * 50_000),        # a 100 KB warning of many lines
    lambda c: c.__setitem__("images", torch.zeros(1, dtype=torch.uint8).expand(12, 3, 16, 16)),  # expanded
], ids=["negative", "out-of-range", "one-class", "skipped", "long-message", "expanded"])
def test_an_image_cache_that_does_not_match_its_folder_is_decoded_again(tmp_path, capsys, change):
    root = make_image_folder(tmp_path / "images")
    first = folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    rewrite_cache(root, change)
    capsys.readouterr()
    again = folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    warning, decoding, skipped = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: ignoring the image cache {root}/.cache-train-16-")
    assert warning.endswith("; decoding again") and decoding.startswith("imagefolder: decoding 13 images")
    # decoded again and cached again: the next run uses the cache, silently
    folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    assert "decoding" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 7. predict.py: files that are not regular files, folders, --top-k over the classes

def write_predict_checkpoint(path: Path, classes: list[str]) -> Path:
    torch.save({**small_checkpoint(), "classes": classes, "num_classes": len(classes)}, path)
    return path


def test_predict_refuses_a_fifo_at_once(tmp_path):
    checkpoint = write_predict_checkpoint(tmp_path / "best.pth", ["cat", "dog", "fox"])
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)  # nothing ever writes to it: a plain open() would wait forever
    proc = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), str(fifo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == predict.UNREADABLE and proc.stderr.splitlines() == [
        f"predict.py: error: cannot read image {fifo}: it is a FIFO; give a regular file"]
    with pytest.raises(CheckpointError, match="^cannot read checkpoint .*photo.png: not a regular file"):
        load_checkpoint(fifo)


def test_predict_takes_the_image_files_of_a_folder_sorted(tmp_path, capsys):
    checkpoint = write_predict_checkpoint(tmp_path / "best.pth", ["cat", "dog", "fox"])
    root = make_image_folder(tmp_path / "images")
    (root / "test" / "blue" / "notes.txt").write_text("not an image")
    (root / "test" / "blue" / ".hidden.png").write_bytes(b"macOS resource fork")
    results = predict.main(["--checkpoint", str(checkpoint), "--json", str(root / "test")])
    expected = sorted(str(p) for p in (root / "test").rglob("*.*") if p.suffix != ".txt" and "hidden" not in p.name)
    assert [r["path"] for r in results] == expected and len(expected) == 12
    (root / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^predict.py: error: .*empty is a folder with no image files \(.jpg, "):
        predict.main(["--checkpoint", str(checkpoint), str(root / "empty")])


def test_predict_top_k_over_the_classes_lists_them_all_with_a_note(tmp_path, capsys):
    checkpoint = write_predict_checkpoint(tmp_path / "best.pth", ["cat", "dog", "fox"])
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(image)
    [result] = predict.main(["--checkpoint", str(checkpoint), "--top-k", "5", str(image)])
    assert sorted(t["label"] for t in result["top_k"]) == ["cat", "dog", "fox"]
    assert capsys.readouterr().err == "predict.py: note: --top-k 5 is more than the checkpoint's 3 classes; listing 3\n"


def test_predict_refuses_an_image_over_max_image_pixels(tmp_path, capsys):
    checkpoint = write_predict_checkpoint(tmp_path / "best.pth", ["cat", "dog", "fox"])
    image = tmp_path / "x.png"
    Image.new("RGB", (100, 100)).save(image)
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(checkpoint), "--max-image-pixels", "9999", str(image)])
    assert exc.value.code == predict.UNREADABLE
    assert capsys.readouterr() == ("", f"predict.py: error: cannot read image {image}: 100x100 pixels is over the "
                                       f"limit of 9,999 per image; downscale it\n")


# ---------------------------------------------------------------------------------------------------------------
# 8. Messages: never an internal .tmp name, one line, of bounded length, with the script's own advice, escaped

def test_a_failed_save_names_the_file_asked_for_not_its_temporary_file(tmp_path):
    (tmp_path / "results.json.tmp").mkdir()  # what the write goes through, made unwritable: a real OSError
    with pytest.raises(OSError) as exc:
        write_atomically(tmp_path / "results.json", b"{}")
    assert exc.value.filename == str(tmp_path / "results.json") and not (tmp_path / "results.json").exists()
    (tmp_path / "last.pth.tmp").mkdir()
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint({"format": 2}, tmp_path / "last.pth")
    assert str(exc.value) == f"cannot write {tmp_path / 'last.pth'}: Is a directory (the previous last.pth, if any, " \
                             f"is intact)"


def test_a_failed_cache_write_warns_without_the_temporary_name(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    files = [p for name in ("blue", "red") for p in folders.image_files(root / "train" / name)]
    cache = folders._cache_path(root, "train", 16, files, decode.MAX_IMAGE_PIXELS)
    cache.mkdir()  # the temporary file is written, but cannot be renamed over a folder
    folders.load_imagefolder_split(root, "train", ["blue", "red"], 16)
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "cannot write the cache" in line]
    assert warning.startswith(f"warning: cannot write the cache {cache}: ") and ".tmp" not in warning, warning


def test_an_error_about_a_file_name_with_a_newline_is_one_line(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "test" / "x\ny\x1b[31m").mkdir()
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "imagefolder", "--data-dir", str(root), "--device", "cpu",
                    "--out-dir", str(tmp_path / "run")])
    assert exc.value.code == (f"train.py: error: imagefolder: the class folders of {root / 'test'} differ from "
                              f"train/'s: extra x\\ny\\x1b[31m")


def test_an_error_that_lists_many_names_stays_short(tmp_path):
    root = make_image_folder(tmp_path / "images")
    for i in range(2000):
        (root / "test" / f"{i:04d}-{'a-long-class-name' * 3}").mkdir()
    with pytest.raises(data.DataError) as exc:
        data.load_raw("imagefolder", root, image_size=16)
    assert len(str(exc.value)) < 400 and str(exc.value).endswith("…")


def test_out_of_memory_advice_is_the_scripts_own():
    with pytest.raises(SystemExit) as exc, cli.one_line_errors("predict.py", "try --device cpu"):
        bytearray(2**62)  # a real allocation the system refuses
    assert exc.value.code == "predict.py: error: out of memory; try --device cpu"
    with pytest.raises(SystemExit) as exc, cli.one_line_errors("evaluate.py"):
        bytearray(2**62)
    assert exc.value.code == "evaluate.py: error: out of memory"


def test_class_names_with_terminal_controls_are_printed_escaped(tmp_path, capsys):
    checkpoint = write_predict_checkpoint(tmp_path / "best.pth", ["\x1b[2Jcat", "dog\nfox", "emu\u009b"])
    image = tmp_path / "new\nline.png"
    Image.new("RGB", (8, 8)).save(image)
    predict.main(["--checkpoint", str(checkpoint), "--top-k", "3", str(image)])
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{tmp_path}/new\\nline.png: ") and "\x1b" not in line and "\x9b" not in line
    assert {"\\x1b[2Jcat", "dog\\nfox", "emu\\x9b"} == {part.rsplit(" ", 1)[0] for part in
                                                         line.split(": ", 1)[1].split(", ")}
    result = evaluate.format_report({"loss": 0.0, "accuracy": 0.0, "confusion": torch.eye(3, dtype=torch.int64)},
                                    ["\x1b[2Jcat", "dog\nfox", "emu"])
    assert "\x1b" not in result and len(result.splitlines()) == 13  # 3 classes: 6 lines each table



def test_evaluates_tables_line_up_whatever_the_script_of_the_class_names():
    """Class names in Japanese (two terminal columns a character), with a combining accent, or plain: every line
    of each table takes the same columns, and the matrix's headers are cut to their cells."""
    confusion = torch.tensor([[3, 1, 0], [0, 4, 0], [2, 0, 123]])
    lines = evaluate.format_report({"loss": 0.0, "accuracy": 0.0, "confusion": confusion},
                                   ["猫", "犬だよ", "cafe\u0301-noir"]).splitlines()
    accuracy, matrix = lines[3:7], lines[9:13]
    assert len({cli.columns(line) for line in accuracy}) == 1, accuracy
    assert len({cli.columns(line) for line in matrix}) == 1, matrix
    assert matrix[0].split() == ["猫", "犬だ", "cafe\u0301"] and matrix[2].startswith("犬だよ    ")


# ---------------------------------------------------------------------------------------------------------------
# 9. evaluate.py reads the test split alone: the training images need not travel with the checkpoint

def write_eval_checkpoint(path: Path, dataset: str, data_dir: Path, classes: list[str]) -> Path:
    torch.manual_seed(0)
    state = build_model("simplecnn", len(classes), 3, 32).state_dict()
    torch.save({"model": state, "model_name": "simplecnn", "num_classes": len(classes), "in_channels": 3,
                "image_size": 32, "classes": classes, "mean": [0.5] * 3, "std": [0.25] * 3,
                "args": {"dataset": dataset, "data_dir": str(data_dir)}}, path)
    return path


def test_evaluate_on_an_image_folder_without_its_training_images(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    checkpoint = write_eval_checkpoint(tmp_path / "best.pth", "imagefolder", root, ["blue", "red"])
    for p in sorted((root / "train").rglob("*"), reverse=True):  # the training images stayed behind
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "train").rmdir()
    result = evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--json"])
    assert result["confusion"].sum() == 12
    err = capsys.readouterr().err
    assert "z_broken" not in err and "/train" not in err  # train/ was never looked at
    (root / "test" / "green").mkdir()
    (root / "test" / "green" / "g.png").write_bytes((root / "test" / "red" / "d_opaque.png").read_bytes())
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu"])
    assert exc.value.code == (f"evaluate.py: error: imagefolder: the class folders of {root / 'test'} differ from "
                              f"the checkpoint's: extra green")


def test_evaluate_on_cifar10_reads_the_test_batch_alone(cifar_dir, tmp_path, capsys):
    checkpoint = write_eval_checkpoint(tmp_path / "best.pth", "cifar10", cifar_dir, formats.CIFAR10_CLASSES)
    for i in range(1, 6):
        (cifar_dir / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    assert evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--json"])["confusion"].sum() == 50
    test_batch = cifar_dir / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(test_batch, 0)  # 1. an empty test set is refused here too
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu"])
    assert exc.value.code == f"evaluate.py: error: the test split holds 0 images ({test_batch}); it needs at least 1"


def test_evaluate_where_the_data_is_not_found_says_data_dir(tmp_path):
    checkpoint = write_eval_checkpoint(tmp_path / "best.pth", "imagefolder", tmp_path / "gone", ["blue", "red"])
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu"])
    assert exc.value.code == (f"evaluate.py: error: imagefolder: {tmp_path / 'gone' / 'test'} not found; --data-dir "
                              f"{tmp_path / 'gone'} needs train/ and test/ (and optionally val/), each with one "
                              f"sub-folder of images per class")


def test_decoding_threads_hold_no_more_than_their_budget(tmp_path):
    """Six 25-megapixel PNGs (under the limit; 0.1 GB each as RGB) on the image folder's threads: with a budget of
    one image at a time, and each large decode's memory handed back, the peak stays near one image, not six."""
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("1", (5000, 5000)).save(root / "train" / name / f"{i}.png")
    proc = run_python(f"""
import resource, folders
folders.DECODE_BUFFER = 2**27
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images, labels = folders.load_imagefolder_split(folders.Path({str(root)!r}), "train", ["a", "b"], 16)
print(len(labels), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")
    n, grown_mib = map(int, proc.stdout.split())
    assert n == 6 and grown_mib < 400, (n, grown_mib, proc.stderr)


def test_validation_test_evaluate_and_predict_run_no_larger_batches_than_training(cifar_dir, tmp_path, capsys):
    """Memory: the evaluation passes take the training batch (or --eval-batch-size / --batch-size), not 256 at a
    time, so a run that trains in memory also tests in it. Seen by a forward hook on every module: the batches
    the model itself was given."""
    seen = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if module.__class__.__name__ == "SimpleCNN":
            seen.append((module.training, len(args[0])))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        flags = ["--data-dir", str(cifar_dir), "--epochs", "1", "--val-split", "0.2", "--device", "cpu",
                 "--log-interval", "0", "--batch-size", "8"]
        train.main([*flags, "--out-dir", str(tmp_path / "run")])
        assert max(n for training, n in seen if not training) == 8  # validation (40 images) and test (50)
        seen.clear()
        train.main([*flags, "--eval-batch-size", "64", "--out-dir", str(tmp_path / "large")])
        assert sorted(n for training, n in seen if not training) == [40, 50]
        seen.clear()
        evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--json"])
        assert {n for _, n in seen} == {8, 2}  # 50 test images: 6 x 8 + 2
        seen.clear()
        evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--json", "--batch-size", "50"])
        assert [n for _, n in seen] == [50]
        photos = [tmp_path / f"{i}.png" for i in range(11)]
        for p in photos:
            Image.new("RGB", (32, 32), "red").save(p)
        seen.clear()
        predict.main(["--checkpoint", str(tmp_path / "run" / "best.pth"), "--device", "cpu", *map(str, photos)])
        assert [n for _, n in seen] == [8, 3]
    finally:
        handle.remove()


def test_a_tiny_png_of_an_elongated_shape_is_refused_before_evaluation_resizes_it(tmp_path):
    """A 143-byte PNG of 20000x1 pixels passes the pixel limit, but evaluation's shape (the shorter side resized to
    256) would make it 5 gigapixels: refused as unreadable, before any of it is made; squashing it is harmless."""
    path = tmp_path / "long.png"
    Image.new("RGB", (20000, 1), "red").save(path)
    assert path.stat().st_size < 200
    with pytest.raises(decode.UnreadableImage) as e:
        decode.load_image(path, 3, 224, prep=decode.Prep("crop", 256))
    assert str(e.value) == (f"cannot read image {path}: 20000x1 pixels resize to 1,310,720,000 (its shorter side to "
                            f"256), over the limit of 50,000,000 per image; crop it to a less elongated shape")
    assert decode.load_image(path, 3, 224).shape == (3, 224, 224)

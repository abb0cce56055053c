"""--dataset imagefolder: decoding, the on-disk cache, errors, the val/ folder, and a real train.py run."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import batches
import data
import decode
import folders
import train
from image_files import COLORS, expected_pixels, make_image_folder, write_class_images


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def test_load_raw_decodes_every_format_and_skips_the_corrupt_file(image_folder, capsys):
    train_x, train_y, test_x, test_y, classes = data.load_raw("imagefolder", image_folder, image_size=16)
    assert classes == ["blue", "red"]
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_x.shape == (12, 3, 16, 16) and test_x.shape == (12, 3, 16, 16)
    assert train_y.tolist() == test_y.tolist() == [0] * 6 + [1] * 6
    for images in (train_x, test_x):
        for i, color in enumerate(COLORS.values()):
            one_class = images[6 * i:6 * i + 6]
            for image, pixel in zip(one_class, expected_pixels(color)):
                if pixel is not None:  # solid colors resize to themselves, exactly
                    assert (image == torch.tensor(pixel, dtype=torch.uint8)[:, None, None]).all()
            assert (one_class[0].int() - torch.tensor(color)[:, None, None]).abs().max() <= 3  # the JPEG
    err = capsys.readouterr().err
    assert f"warning: cannot read image {image_folder / 'train' / 'red' / 'z_broken.jpg'}" in err
    assert err.count("z_broken.jpg'; skipped") == 1


def test_load_image_grayscale_16_bit_and_exif_orientation(tmp_path):
    Image.new("RGB", (7, 9), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (7, 9), (0, 0, 255)).save(tmp_path / "blue.png")
    assert decode.load_image(tmp_path / "red.png", 1, 5).unique().tolist() == [76]  # ITU-R 601 luma, as PIL's "L"
    assert decode.load_image(tmp_path / "blue.png", 1, 5).unique().tolist() == [29]
    assert decode.load_image(tmp_path / "red.png", 1, 5).shape == (1, 5, 5)

    Image.new("I;16", (6, 6), 40_000).save(tmp_path / "deep.png")  # 16-bit: keeps 40000 >> 8, not clipped to 255
    assert decode.load_image(tmp_path / "deep.png", 3, 4).unique().tolist() == [156]

    # left half black, right half white, stored upside down with EXIF orientation 3 (rotate 180 degrees)
    half = Image.new("L", (20, 10), 0)
    half.paste(255, (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 3
    half.save(tmp_path / "turned.png", exif=exif)
    upright = decode.load_image(tmp_path / "turned.png", 1, 16)
    assert upright[0, :, 0].unique().tolist() == [255] and upright[0, :, -1].unique().tolist() == [0]


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(data.DataError, match=r"cannot read image .*bad\.png"):
        decode.load_image(tmp_path / "bad.png", 3, 8)
    with pytest.raises(data.DataError, match=r"cannot read image .*missing\.jpg"):
        decode.load_image(tmp_path / "missing.jpg", 3, 8)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(data.DataError, match="only 1 .grayscale. or 3 .RGB."):
        decode.load_image(tmp_path / "ok.png", 4, 8)


def caches(root: Path, split: str) -> list[Path]:
    return sorted(root.glob(f".cache-{split}-16-*.pt"))


def test_cache_is_used_while_current_and_never_when_stale(image_folder, capsys):
    gray = image_folder / "train" / "blue" / "b.bmp"
    first = data.load_raw("imagefolder", image_folder, image_size=16)
    assert len(caches(image_folder, "train")) == len(caches(image_folder, "test")) == 1
    assert capsys.readouterr().err.count("decoding") == 2

    # Same size and mtime, other pixels: the cache cannot tell, so its (old) decoding is used, with no decode.
    stat = gray.stat()
    Image.new("L", (31, 31), 200).save(gray)
    os.utime(gray, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gray.stat().st_size == stat.st_size
    second = data.load_raw("imagefolder", image_folder, image_size=16)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))
    err = capsys.readouterr().err
    assert "decoding" not in err and "z_broken.jpg'; skipped" in err  # the warning is repeated from the cache

    os.utime(gray, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited: a new key, the old cache removed
    third = data.load_raw("imagefolder", image_folder, image_size=16)
    assert third[0][1].unique().tolist() == [200]
    assert len(caches(image_folder, "train")) == 1 and "decoding 13 images" in capsys.readouterr().err

    caches(image_folder, "train")[0].write_bytes(b"garbage")  # a broken cache is a miss, not an error
    assert torch.equal(data.load_raw("imagefolder", image_folder, image_size=16)[0], third[0])
    assert data.load_raw("imagefolder", image_folder, image_size=24)[0].shape == (12, 3, 24, 24)
    assert len(list(image_folder.glob(".cache-train-*.pt"))) == 2  # one per size


def add_train_class(root: Path) -> None:
    write_class_images(root / "train" / "green", (0, 255, 0))


def add_test_class(root: Path) -> None:
    write_class_images(root / "test" / "green", (0, 255, 0))


def empty_a_test_class(root: Path) -> None:
    for p in (root / "test" / "blue").iterdir():
        p.unlink()
    (root / "test" / "blue" / "notes.txt").write_text("not an image")


def break_a_train_class(root: Path) -> None:
    for p in (root / "train" / "red").iterdir():
        p.write_bytes(b"broken")


def keep_one_train_class(root: Path) -> None:
    for p in (root / "train" / "blue").iterdir():
        p.unlink()
    (root / "train" / "blue").rmdir()


def rename_test(root: Path) -> None:
    (root / "test").rename(root / "tests")


@pytest.mark.parametrize("damage, message", [
    (add_train_class, r"imagefolder: the class folders of .*images/test differ from train/'s: missing green$"),
    (add_test_class, r"imagefolder: the class folders of .*images/test differ from train/'s: extra green$"),
    (empty_a_test_class,
     r"imagefolder: class folder .*test/blue holds no readable images \(.jpg, .jpeg, .png, .bmp, .webp\)"),
    (break_a_train_class, r"imagefolder: class folder .*train/red holds no readable images"),
    (keep_one_train_class, r"imagefolder: .*images/train needs at least two class sub-folders, found 1$"),
    (rename_test, r"imagefolder: .*images/test not found; .*images needs train/ and test/ \(and optionally val/\), "
                  r"each with one sub-folder of images per class$"),
])
def test_folder_errors(image_folder, damage, message):
    damage(image_folder)
    with pytest.raises(data.DataError, match=message):
        data.load_raw("imagefolder", image_folder, image_size=16)


def test_prepare_takes_the_val_folder_and_train_statistics(image_folder):
    for name, color in COLORS.items():
        write_class_images(image_folder / "val" / name, color)
    (image_folder / "val" / "red" / "a.jpg").unlink()
    train, val, test, classes = data.prepare("imagefolder", image_folder, 0.5, 0, "cpu", image_size=16)
    assert (len(train), len(val), len(test)) == (12, 11, 12)  # all of train/, no random split
    assert val.labels.tolist() == [0] * 6 + [1] * 5
    mean, std = batches.channel_stats(train.images)
    assert train.mean.tolist() == torch.tensor(mean, dtype=torch.float32).tolist() == val.mean.tolist()
    assert train.std.tolist() == torch.tensor(std, dtype=torch.float32).tolist()


def test_prepare_splits_train_at_random_without_a_val_folder(image_folder):
    train, val, test, classes = data.prepare("imagefolder", image_folder, 0.25, 0, "cpu", image_size=16)
    assert (len(train), len(val), len(test)) == (9, 3, 12)


def test_train_py_on_an_image_folder(image_folder, tmp_path, capsys):
    import predict
    import train

    out = tmp_path / "run"
    train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--epochs", "1", "--out-dir", str(out),
                "--val-split", "0", "--device", "cpu", "--image-size", "32"])
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_completed"] == 1
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert (ckpt["classes"], ckpt["image_size"], ckpt["in_channels"]) == (["blue", "red"], 32, 3)
    capsys.readouterr()
    image = image_folder / "test" / "red" / "f.webp"
    [result] = predict.main(["--checkpoint", str(out / "best.pth"), "--top-k", "2", str(image)])
    assert {t["label"] for t in result["top_k"]} == {"blue", "red"}
    assert capsys.readouterr().out.startswith(f"{image}: {result['label']} ")


def test_an_image_size_the_model_cannot_take_is_one_clear_line(image_folder, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--image-size", "12",
                    "--out-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert str(exc.value.code) == "train.py: error: SimpleCNN needs images of at least 16x16 pixels, got 12"


def test_the_memory_line_counts_what_decoding_these_images_can_take(image_folder, capsys):
    """The decoding frames said on the memory line are those of the largest images that decode at once (from the
    files' headers), not the 1 GiB cap: a folder of small images says a small number."""
    big = image_folder / "train" / "red" / "big.png"
    Image.new("RGB", (1000, 800), (255, 0, 0)).save(big)
    data.load_raw("imagefolder", image_folder, image_size=16)
    sizes = sorted([40 * 17, 31 * 31, 13 * 50, 21 * 9, 33 * 20, 64 * 48] * 2 + [1000 * 800], reverse=True)
    frames = sum(sizes[:folders.THREADS]) * decode.DECODE_COPIES  # (the corrupt file decodes to nothing)
    lines = [line for line in capsys.readouterr().err.splitlines() if "train" in line and "MiB in memory" in line]
    assert len(lines) == 1 and lines[0].endswith(f"(0.0 MiB in memory, plus up to {frames / 2**20:,.1f} MiB while "
                                                 f"filling it)"), lines


def test_a_folder_is_listed_once_in_the_order_of_sorted_paths(tmp_path, monkeypatch, capsys):
    """folders.list_images (os.scandir, no Path per file) gives what sorted(Path.rglob) gave: nested folders part
    by part, upper-case suffixes, hidden files and folders left out, symlinked folders not entered; and a run lists
    each folder once, also when a squash folder too large for memory goes to streaming."""
    root = tmp_path / "cls"
    for name in ("b.png", "a.JPG", "a-b.jpg", "a/z.jpg", "a/b/c.webp", ".hidden.jpg", ".git/x.jpg", "notes.txt",
                 "é.jpeg", "a.b/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "file-link.png").symlink_to(root / "b.png")
    rglob = sorted(p for p in root.rglob("*") if p.suffix.lower() in folders.IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    assert folders.image_files(root) == rglob and len(rglob) == 8

    make_image_folder(tmp_path / "photos")
    scanned = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scanned.append(str(path)) or scandir(path))
    monkeypatch.setattr(data.stream, "available_memory", lambda: 1000)  # "too large": the squash folder streams
    data.prepare("imagefolder", tmp_path / "photos", 0.25, 0, "cpu", image_size=16)
    assert "streaming them from disk" in capsys.readouterr().err
    assert sorted(scanned) == sorted(set(scanned)) and len(scanned) == 4  # train/ and test/: blue, red

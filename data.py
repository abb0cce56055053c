"""Datasets, held in memory as uint8 tensors, with normalization and augmentation on whole batches.

    cifar10        DATA_DIR/cifar-10-batches-py/           (downloaded, checksum verified, when missing)
    cifar100       DATA_DIR/cifar-100-python/              (train, test, meta; the 100 fine labels; downloaded too)
    mnist          DATA_DIR/MNIST/raw/ or DATA_DIR/mnist/   (IDX files, plain or .gz; downloaded when missing)
    fashion-mnist  DATA_DIR/FashionMNIST/raw/, DATA_DIR/fashion-mnist/, /usr/share/datasets/fashion-mnist/
    imagefolder    DATA_DIR/{train,test}/<class>/<image>, optionally DATA_DIR/val/ too (your own images,
                   decoded once and cached as DATA_DIR/.cache-<split>-<size>-<hash>.pt)

Why in memory: CIFAR-10 is 150 MB as uint8, so decoding it once and slicing batches out of one tensor
on the training device removes the per-image Python work (PIL, ToTensor, collate) that otherwise dominates
a small model's step time (--image-size resizes the packed datasets once, into that tensor). Every random
choice of an epoch (order, crop offsets, flips) is drawn up front from (seed, epoch) alone, so an epoch is the
same whatever the batch size, accumulation or resume point.
"""
import ctypes
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import platform
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

import cli

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
JITTER_UNIT = 2**16  # epoch_plan's jitter factors are integers in units of 1/65536
PAD = 4  # random-crop padding, pixels (default)
RESIZE_BUFFER = 64 * 2**20  # bytes of float copies --image-size's resizing may hold beyond its result (>= 1 image)
MAX_IDX_BYTES = 2**31  # the largest IDX file read (MNIST's training images: 47 MB)
# The fewest images a split may hold: two to train on (a std, batch norm's statistics), one to test on. Fewer would
# run and report a meaningless result (an empty test set scores 0.00% with loss 0.0000).
MIN_IMAGES = {"train": 2, "val": 1, "test": 1}
# The most pixels one image may decode to (after JPEG's draft scaling): 50 megapixels is a 200 MB RGBA frame.
# Pillow's own limit (89 megapixels warns, 179 errors) lets a 518 KB PNG of 13000x13000 take 0.7 GB per copy.
MAX_IMAGE_PIXELS = 50_000_000
DECODE_COPIES = 3 * 4  # bytes per decoded pixel at the peak of load_image: RGBA, and two converted copies
DECODE_BUFFER = 2**30  # the most bytes decoding threads hold at once beyond the result (a larger image decodes alone)


class DataError(cli.UserError):
    """Data that is missing, unreadable or not in the expected format."""


def require_images(n: int, split: str, source: object) -> None:
    """Refuse a split with fewer than MIN_IMAGES[split] images, naming the file or folder they come from."""
    if n < MIN_IMAGES[split]:
        raise DataError(f"the {split} split holds {n} image{'s' * (n != 1)} ({source}); it needs at least "
                        f"{MIN_IMAGES[split]}")


# ---------------------------------------------------------------------------------------------------------------
# Reading the files

class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays: a data file can never run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            content = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, a forbidden global, ...
        raise DataError(f"broken {what} file {path}: {type(e).__name__}: {cli.shorten(str(e))}") from None
    if not isinstance(content, dict):
        raise DataError(f"broken {what} file {path}: not a dict")
    return content


def _read_cifar_batch(path: Path, label_key: str = "labels",
                      num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) and labels of a CIFAR batch file: CIFAR-10's labels, or CIFAR-100's fine_labels."""
    what = "CIFAR-10 batch" if num_classes == 10 else "CIFAR-100"
    batch = _read_pickle(path, what)
    data, labels = batch.get("data"), batch.get(label_key)
    # Checked before anything is built from them: the shape of data first, then labels as a flat list of that
    # length (a nest of shared lists, a few bytes in the pickle, would otherwise grow to gigabytes in asarray).
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)
            and all(type(y) is int and 0 <= y < num_classes for y in labels)):
        raise DataError(f"broken {what} file {path}: expected uint8 data (N, 3072) and N {label_key} in "
                        f"0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.int64)


def _download_cifar(url: str, md5: str, folder: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(url, str(folder.parent), md5=md5)
    except Exception as e:
        raise DataError(f"{folder.name} not found in {folder.parent} and the download failed "
                        f"({type(e).__name__}); put the extracted {url} there, or give --data-dir the folder that "
                        f"holds {folder.name}") from None


def load_cifar10(data_dir: Path, splits: tuple[str, ...] = ("train", "test")):
    """(images, labels) of each of `splits`, then the class names."""
    folder = data_dir / "cifar-10-batches-py"
    if not folder.is_dir():
        _download_cifar(CIFAR10_URL, CIFAR10_MD5, folder)
    files = {"train": [folder / f"data_batch_{i}" for i in range(1, 6)], "test": [folder / "test_batch"]}
    out = []
    for split in splits:
        missing = [p.name for p in files[split] if not p.is_file()]
        if missing:
            raise DataError(f"incomplete CIFAR-10 folder {folder}: missing {', '.join(missing)}")
        xs, ys = zip(*(_read_cifar_batch(p) for p in files[split]))
        require_images(sum(map(len, ys)), split, ", ".join(map(str, files[split])))
        out += [torch.cat(xs), torch.cat(ys)]
    return (*out, CIFAR10_CLASSES)


def load_cifar100(data_dir: Path, splits: tuple[str, ...] = ("train", "test")):
    """CIFAR-100 in its official python layout: the files train and test ({"data", "fine_labels", ...}) and meta,
    whose fine_label_names are the 100 class names. (images, labels) of each of `splits`, then the class names."""
    folder = data_dir / "cifar-100-python"
    if not folder.is_dir():
        _download_cifar(CIFAR100_URL, CIFAR100_MD5, folder)
    missing = [name for name in (*splits, "meta") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"incomplete CIFAR-100 folder {folder}: missing {', '.join(missing)}")
    classes = _read_pickle(folder / "meta", "CIFAR-100").get("fine_label_names")
    if not (isinstance(classes, list) and len(classes) == 100 and all(isinstance(c, str) for c in classes)):
        raise DataError(f"broken CIFAR-100 file {folder / 'meta'}: expected 100 fine_label_names")
    out = []
    for split in splits:
        images, labels = _read_cifar_batch(folder / split, "fine_labels", 100)
        require_images(len(labels), split, folder / split)
        out += [images, labels]
    return (*out, classes)


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """IDX format: magic (0, 0, 0x08 = uint8, ndim), ndim big-endian uint32 sizes, then the bytes. Read in chunks
    up to the size the header declares, so a lying header or a gzip bomb costs no more memory than that."""
    header_size = 4 + 4 * ndim
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            header = f.read(header_size)
            if len(header) < header_size or header[:4] != bytes([0, 0, 8, ndim]):
                raise DataError(f"{path} is not an IDX file of {ndim}-d uint8 data")
            shape = struct.unpack(f">{ndim}I", header[4:])
            size = math.prod(shape)
            if size > MAX_IDX_BYTES:
                raise DataError(f"{path} declares {shape} images ({size:,} bytes); refusing more than "
                                f"{MAX_IDX_BYTES:,}")
            raw = bytearray()
            while len(raw) <= size and (chunk := f.read(min(2**24, size + 1 - len(raw)))):
                raw += chunk
    except (OSError, EOFError, zlib.error) as e:  # also a corrupt gzip stream
        raise DataError(f"cannot read {path}: {e}") from None
    if size == 0:
        raise DataError(f"{path} holds no images: its header says {shape}")
    if len(raw) != size:
        raise DataError(f"{path} is truncated or too long: header says {shape}, file has {len(raw)} bytes of data")
    return torch.frombuffer(raw, dtype=torch.uint8).reshape(shape)


def _find_idx(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        for p in (d / name, d / (name + ".gz")):
            if p.is_file():
                return p
    return None


def load_idx_dataset(name: str, data_dir: Path, splits: tuple[str, ...] = ("train", "test")):
    """MNIST or Fashion-MNIST from the four standard IDX files, wherever the usual layouts put them: (images,
    labels) of each of `splits`, then the class names."""
    tv_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    dirs = [data_dir / tv_name / "raw", data_dir / name, data_dir]
    if name == "fashion-mnist":
        dirs.append(Path("/usr/share/datasets/fashion-mnist"))  # Debian's dataset-fashion-mnist
    if _find_idx(dirs, IDX_FILES[splits[0]][0]) is None:
        import torchvision  # its download verifies checksums and writes DATA_DIR/<MNIST|FashionMNIST>/raw
        try:
            getattr(torchvision.datasets, tv_name)(str(data_dir), download=True)
        except Exception as e:
            hint = " or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
            raise DataError(f"{name} not found in {', '.join(map(str, dirs))} and the download failed "
                            f"({type(e).__name__}); put the IDX files in {dirs[0]}{hint}, or give --data-dir the "
                            f"folder that holds them") from None
    out = []
    for split in splits:
        paths = [_find_idx(dirs, f) for f in IDX_FILES[split]]
        if None in paths:
            raise DataError(f"{name}: {IDX_FILES[split][paths.index(None)]}[.gz] not found in {dirs[0]}; give "
                            f"--data-dir the folder that holds it")
        images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
        if len(images) != len(labels) or (len(labels) and labels.max() > 9):
            raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels, or a label over 9")
        require_images(len(images), split, paths[0])
        if out and images.shape[1:] != out[0].shape[2:]:  # one model takes both: one size
            raise DataError(f"{name}: the test images of {paths[0]} are {images.shape[1]}x{images.shape[2]}, the "
                            f"training images {out[0].shape[2]}x{out[0].shape[3]}; both splits need one size")
        out += [images.unsqueeze(1), labels.long()]  # (N, 1, 28, 28)
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return (*out, classes)


def load_raw(name: str, data_dir: str | Path, image_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """(train_images, train_labels, test_images, test_labels, classes), images uint8 (N, C, H, W).
    image_size is the side imagefolder images are decoded to (None: 32), max_pixels the most one image may decode
    to; the packed datasets come at their own size (32 or 28: resize_images resizes them)."""
    _check_name(name)
    if name == "imagefolder":
        return load_imagefolder(Path(data_dir), image_size or 32, max_pixels)
    return _load_packed(name, Path(data_dir), ("train", "test"))


def load_test(name: str, data_dir: str | Path, classes: list[str], image_size: int,
              max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split alone, images uint8 (N, C, image_size, image_size) and labels, for a model trained on
    `classes`: what evaluate.py reads. The normalization is the checkpoint's, so no training image is read or
    decoded, and the data may travel without them. A DataError when the dataset's classes are not `classes`."""
    _check_name(name)
    data_dir = Path(data_dir)
    if name == "imagefolder":
        return load_imagefolder_split(data_dir, "test", classes, image_size, max_pixels, against="the checkpoint's")
    images, labels, found = _load_packed(name, data_dir, ("test",))
    if found != classes:
        raise DataError(f"the classes of {name} in {data_dir} are not the checkpoint's; give --data-dir the data the "
                        f"model was trained on")
    return resize_images(images, image_size, f"{name} test"), labels


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def _load_packed(name: str, data_dir: Path, splits: tuple[str, ...]):
    if name == "cifar10":
        return load_cifar10(data_dir, splits)
    if name == "cifar100":
        return load_cifar100(data_dir, splits)
    return load_idx_dataset(name, data_dir, splits)


def resize_images(images: torch.Tensor, size: int | None, what: str) -> torch.Tensor:
    """uint8 images (N, C, H, W) resized to size x size (None, or their own size: returned as they are), with
    antialiased bilinear interpolation (what Pillow does for image folders), into one preallocated uint8 tensor, a
    few images at a time: their float copies (input, output and the separable pass between) stay within
    RESIZE_BUFFER, and the memory check counts them."""
    if size is None or images.shape[2:] == (size, size):
        return images
    n, c, h, w = images.shape
    per_image = 4 * c * (h * w + size * size + max(h, size) * max(w, size))  # float32 bytes at the peak
    chunk = max(1, min(n, RESIZE_BUFFER // per_image))
    out = allocate_images(n, c, size, f"{what}: resizing {n:,} images to {size}x{size}", extra=chunk * per_image)
    for start in range(0, n, chunk):
        resized = F.interpolate(images[start:start + chunk].float(), size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)
        out[start:start + chunk] = resized.round_().clamp_(0, 255)  # converted straight into the uint8 result
    return out


def allocate_images(n: int, channels: int, size: int, what: str, extra: int = 0) -> torch.Tensor:
    """An empty uint8 (n, channels, size, size) tensor, after saying on stderr (`what` it is for) how much memory it
    takes, and the `extra` bytes that filling it takes at most on top (decoding or resizing buffers); a DataError
    instead when the two are more than the memory available."""
    result = n * channels * size * size
    check_memory(result + extra, what)
    also = f", plus up to {extra / 2**20:,.1f} MiB while filling it" if extra else ""
    print(f"{what} ({result / 2**20:,.1f} MiB in memory{also})", file=sys.stderr, flush=True)
    return torch.empty(n, channels, size, size, dtype=torch.uint8)


def check_memory(need: int, what: str) -> None:
    """A DataError when `need` bytes are more than the memory available."""
    available = available_memory()
    if available is not None and need > available:
        raise DataError(f"{what}: {need / 2**30:,.1f} GiB of memory needed, {available / 2**30:,.1f} GiB available; "
                        f"choose a smaller --image-size")


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages (macOS: no MemAvailable)
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# In-memory sets, batches and augmentation

@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), on the training device
    labels: torch.Tensor  # int64 (N,)
    mean: torch.Tensor    # float32 (C,), per channel, in [0, 1] pixel units
    std: torch.Tensor     # float32 (C,)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, crop_flip: torch.Tensor | None = None, pad: int = PAD,
              jitter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float images and labels for the samples `idx`, cropped and flipped where crop_flip is given,
        brightness and contrast jittered where `jitter` (epoch_plan's factors) is given."""
        x = self.images.index_select(0, idx)  # several times faster than images[idx] on the CPU
        if crop_flip is not None:
            x = random_crop_flip(x, crop_flip, pad)
        if jitter is not None:
            x = color_jitter(x, jitter)
        return normalize(x, self.mean, self.std), self.labels.index_select(0, idx)


class MicroBatches(Sequence):
    """The micro-batches (x, y) of one optimizer step, each made (cropped, flipped, normalized) only when it is read.
    `parts`: the step's rows of the epoch plan, one tensor per micro-batch."""

    def __init__(self, data: ImageSet, parts: Sequence[torch.Tensor], augment: bool, pad: int, channels_last: bool):
        self.data, self.parts, self.augment, self.pad, self.channels_last = data, parts, augment, pad, channels_last

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = self.parts[i]  # rows: sample, dy, dx, flip (, brightness, contrast)
        x, y = self.data.batch(part[:, 0], part[:, 1:4] if self.augment else None, self.pad,
                               part[:, 4:] if part.shape[1] > 4 else None)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


def fingerprint(data: ImageSet) -> str:
    """A short hash of the set's labels and of up to 4,096 of its images (evenly spaced): what tells --resume that
    it trains on the run's own data, whatever normalization the run uses. Cheap: a few MB hashed."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(data.images.shape)).encode())
    h.update(data.labels.cpu().numpy().tobytes())
    h.update(data.images[::max(1, len(data) // 4096)].cpu().numpy().tobytes())
    return h.hexdigest()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float (pixel / 255 - mean) / std per channel: what every model here takes.
    (Float images in [0, 255], color_jitter's, are normalized in place.)"""
    return images.float().div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (n - 1) of uint8 images, in [0, 1] units. Counted from a histogram of the 256
    pixel values per channel, a few thousand images at a time: the sums are exact integers, and no float copy of
    the set is made (CIFAR-10's would be 1.2 GB in float64)."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    for chunk in images.split(4096):
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    means, stds = [], []
    for hist in counts.tolist():  # Python ints from here on: exact, whatever the pixel count
        n = sum(hist)
        s1 = sum(v * k for v, k in enumerate(hist))
        s2 = sum(v * v * k for v, k in enumerate(hist))
        means.append(s1 / (255 * n))
        stds.append(math.sqrt((n * s2 - s1 * s1) / (n * (n - 1) * 255 * 255)) if n > 1 else math.nan)
    return means, stds


def split_train_val(images, labels, val_split: float, seed: int):
    """Hold out a seeded random `val_split` fraction of the training set for validation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(labels) * val_split)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def epoch_plan(n: int, seed: int, epoch: int, device: torch.device | str = "cpu", pad: int = PAD,
               alternate_flips: bool = False, jitter: float = 0.0) -> torch.Tensor:
    """Every random choice of one epoch, from (seed, epoch) alone: an (n, 4) int64 tensor whose rows are
    (sample index, crop offset y, crop offset x, flip 0/1), in the order the samples are visited; offsets are
    in [0, 2 * pad]. alternate_flips: each image is flipped in every other epoch (a random half in epoch 1, the
    other half in epoch 2, ...), so consecutive epochs always show both sides of it; short runs gain from that.
    jitter > 0 adds two columns: each image's brightness and contrast factors, drawn in [1 - jitter, 1 + jitter],
    in units of 1/JITTER_UNIT (drawn last, so that the other columns are those of a plan without jitter)."""
    g = torch.Generator().manual_seed(seed * 10_000 + epoch)  # distinct per epoch for runs under 10,000 epochs
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    if alternate_flips:
        first = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))  # epoch 1's, per image
        flips = (first[order] ^ (epoch + 1) % 2)[:, None]
    else:
        flips = torch.randint(0, 2, (n, 1), generator=g)
    columns = [order[:, None], offsets, flips]
    if jitter > 0:
        columns.append(((1 + jitter * (2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1)) * JITTER_UNIT)
                       .round().long())
    return torch.cat(columns, 1).to(device)


def images_per_epoch(n: int, step_images: int, batch_size: int, world: int) -> int:
    """How many of `n` images an epoch of a model with BatchNorm trains on: all of them, unless the epoch's last,
    short step would give some process a micro-batch of a single image, which BatchNorm cannot normalize in
    training; then that last step is left out of the epoch (other images each epoch: the order is shuffled)."""
    rest = n % step_images
    shares = torch.arange(rest).tensor_split(world)
    sizes = [len(part) for share in shares for part in share.tensor_split(max(1, math.ceil(rest / batch_size)))]
    return n - rest if 1 in sizes else n


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, per image of the uint8 batch x (N, C, H, W), as float pixels in [0, 255]: x * b,
    then (x - its mean) * c + its mean (the mean over the image's pixels and channels), clipped; `factors`: (N, 2)
    integer (b, c) in units of 1/JITTER_UNIT, from epoch_plan. Whole-batch tensor operations, no per-image Python."""
    b, c = (factors.to(torch.float32) / JITTER_UNIT).view(-1, 2, 1, 1, 1).unbind(1)
    f = x.float().mul_(b)
    mean = f.mean((1, 2, 3), keepdim=True)
    return f.sub_(mean).mul_(c).add_(mean).clamp_(0, 255)


def random_crop_flip(x: torch.Tensor, crop_flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Crop each image of x (N, C, H, W) at its own offset (dy, dx) from a copy padded by `pad` mirrored
    pixels on each side, and mirror those with flip = 1: one gather for the whole batch, no per-image Python."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(n, c, (h + 2 * pad) * (w + 2 * pad))
    arange_w = torch.arange(w, device=x.device)
    rows = crop_flip[:, 0:1] + torch.arange(h, device=x.device)                               # (N, H)
    flip = crop_flip[:, 2:3].bool()
    cols = crop_flip[:, 1:2] + torch.where(flip, arange_w.flip(0), arange_w)                 # (N, W)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, flat).view(n, c, h, w)


def prepare(name: str, data_dir: str | Path, val_split: float, seed: int, device: torch.device | str,
            image_size: int | None = None, stats: tuple[list[float], list[float]] | None = None,
            max_pixels: int = MAX_IMAGE_PIXELS):
    """Load a dataset, hold out validation (imagefolder: DATA_DIR/val/ when it exists, instead of val_split),
    resize to image_size (None: the dataset's own size), and compute normalization from the training part (before
    resizing: the same statistics, from fewer pixels) unless `stats` (mean, std) gives it: a pretrained net's own,
    averaged over RGB for 1-channel images. Returns (train, val or None, test, classes) as ImageSets on `device`."""
    train_x, train_y, test_x, test_y, classes = load_raw(name, data_dir, image_size, max_pixels)
    if name == "imagefolder" and (Path(data_dir) / "val").is_dir():  # the user's own split beats a random one
        val_x, val_y = load_imagefolder_split(Path(data_dir), "val", classes, image_size or 32, max_pixels)
    else:
        n = len(train_y)
        check_memory(train_x.nbytes, f"{name}: holding out --val-split {val_split} of {n:,} training images (a copy)")
        (train_x, train_y), (val_x, val_y) = split_train_val(train_x, train_y, val_split, seed)
        if val_split > 0 and len(val_y) < MIN_IMAGES["val"]:
            raise DataError(f"--val-split {val_split} of the {n} training images holds out none; give a larger "
                            f"--val-split, or 0 for no validation")
        if len(train_y) < MIN_IMAGES["train"]:
            raise DataError(f"--val-split {val_split} of the {n} training images leaves {len(train_y)} to train on; "
                            f"it needs at least {MIN_IMAGES['train']}: give a smaller --val-split")
    if stats is not None and train_x.shape[1] == 1:
        stats = tuple([sum(s) / len(s)] for s in stats)
    mean, std = (torch.tensor(s, dtype=torch.float32, device=device) for s in (stats or channel_stats(train_x)))

    def on_device(x, y, split):
        return ImageSet(resize_images(x, image_size, f"{name} {split}").to(device), y.to(device), mean, std)
    val = on_device(val_x, val_y, "val") if len(val_y) else None
    return on_device(train_x, train_y, "train"), val, on_device(test_x, test_y, "test"), classes


# ---------------------------------------------------------------------------------------------------------------
# Image folders: your own images as DATA_DIR/<split>/<class>/<image file>, decoded once into the tensors above

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_CHANNELS = 3  # grayscale, RGBA and palette images all become RGB
CACHE_VERSION = 3  # part of the cache key: bump it whenever load_image changes, so old decodings are never used
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # load_image checks max_pixels itself


class UnreadableImage(DataError):
    """An image file whose own bytes cannot be decoded (not an image, corrupt, more pixels than allowed): the same
    on every try, so the image-folder cache records it as skipped. Every other failure (out of memory, an I/O error,
    too many open files) may pass, is never cached, and stops the run."""


def open_regular(path: str | Path, what: str = "file") -> io.BufferedReader:
    """`path` opened for reading, if it is a regular file. O_NONBLOCK: opening a FIFO then returns at once (where a
    plain open waits for a writer forever), and fstat refuses it, a folder or a device, on the file actually
    opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {cli.describe_os_error(e, filename=False)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise DataError(f"cannot read {what} {path}: it is {kind}; give a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _ByteBudget:
    """Bytes that threads reserve before they use them and give back after: at most `limit` at once, except for a
    single reservation larger than that, which waits until it can run alone. A large reservation's memory is handed
    back to the system when it ends: glibc keeps what a thread frees in that thread's own arena, so without that
    each decoding thread would go on holding its largest image (measured: 1.7 GB for 8 images of 49 megapixels on
    6 threads, 0.4 GB with it)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.lock = limit, 0, threading.Condition()

    @contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        with self.lock:
            self.lock.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            if n >= 2**25 and _LIBC is not None:  # (smaller blocks are glibc's to keep: reused, not piled up)
                _LIBC.malloc_trim(0)
            with self.lock:
                self.used -= n
                self.lock.notify_all()


_LIBC = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None  # for malloc_trim


def load_image(path: str | Path, channels: int, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS,
               budget: _ByteBudget | None = None) -> torch.Tensor:
    """Decode an image file to uint8 (channels, image_size, image_size), channels 1 = grayscale or 3 = RGB.
    Training and prediction both decode through here, so a predicted image is seen exactly as a training one:
    EXIF orientation applied, transparency flattened onto white, squashed (not cropped) to a square.
    The header's size is checked against max_pixels before anything is decoded (an UnreadableImage if over); the
    decoding reserves its bytes from `budget` (the image folder's threads share one)."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"cannot decode images to {channels} channels: only 1 (grayscale) or 3 (RGB)")
    with open_regular(path, "image") as f:
        try:
            with Image.open(f) as im:
                im.draft(None, (image_size, image_size))  # JPEG: decode at 1/2..1/8 scale if that still covers it
                width, height = im.size
                if width * height > max_pixels:
                    raise UnreadableImage(f"cannot read image {path}: {width}x{height} pixels is over the limit of "
                                          f"{max_pixels:,} per image; downscale it")
                with budget.reserve(width * height * DECODE_COPIES) if budget else nullcontext():
                    im = _to_mode(ImageOps.exif_transpose(im), mode)
                    # Pillow widens the bilinear kernel when shrinking: this averages (antialiases), not samples
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        except DataError:
            raise
        except UnidentifiedImageError:  # (its own message names the open file object, not the path)
            raise UnreadableImage(f"cannot read image {path}: cannot identify image file {str(path)!r}") from None
        except (MemoryError, OSError) as e:
            if isinstance(e, MemoryError) or e.errno is not None:  # the system's, not the file's: may pass
                reason = "out of memory" if isinstance(e, MemoryError) else cli.describe_os_error(e, filename=False)
                raise DataError(f"cannot read image {path}: {reason}") from None
            raise UnreadableImage(f"cannot read image {path}: {cli.shorten(str(e))}") from None  # PIL's own
        except Exception as e:  # PIL's decoders raise ValueError, SyntaxError, DecompressionBombError, ...
            raise UnreadableImage(f"cannot read image {path}: {cli.shorten(str(e)) or type(e).__name__}") from None
    return torch.from_numpy(np.array(im).reshape(image_size, image_size, channels)).permute(2, 0, 1).contiguous()


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale (Pillow < 10.3 opens such PNGs as "I"):
        # keep the high byte, where convert() would clip at 255
        im = Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    if im.has_transparency_data:  # transparent pixels hold arbitrary colors: show them on white, as viewers do
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert(mode)


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"imagefolder: {folder} not found; --data-dir {root} needs train/ and test/ (and optionally "
                        f"val/), each with one sub-folder of images per class")
    return folder


def _subfolders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, sorted; hidden ones (such as macOS's ._x.jpg) left out."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def imagefolder_classes(root: Path) -> list[str]:
    """The class names: the sub-folders of DATA_DIR/train/, sorted."""
    classes = _subfolders(_split_dir(root, "train"))
    if len(classes) < 2:
        raise DataError(f"imagefolder: {root / 'train'} needs at least two class sub-folders, found {len(classes)}")
    return classes


def load_imagefolder(root: Path, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS):
    """(train_images, train_labels, test_images, test_labels, classes) from DATA_DIR/train/ and /test/."""
    classes = imagefolder_classes(root)
    train = load_imagefolder_split(root, "train", classes, image_size, max_pixels)
    test = load_imagefolder_split(root, "test", classes, image_size, max_pixels)
    return (*train, *test, classes)


def load_imagefolder_split(root: Path, split: str, classes: list[str], image_size: int,
                           max_pixels: int = MAX_IMAGE_PIXELS,
                           against: str = "train/'s") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, image_size, image_size) and labels of DATA_DIR/<split>/, from the cache while it is
    current. Unreadable files are skipped with a warning; a class left without images is an error."""
    folder = _split_dir(root, split)
    found = _subfolders(folder)
    if found != classes:
        differences = [f"{what} {', '.join(sorted(names))}" for what, names in
                       (("missing", set(classes) - set(found)), ("extra", set(found) - set(classes))) if names]
        raise DataError(f"imagefolder: the class folders of {folder} differ from {against}: "
                        f"{cli.shorten('; '.join(differences))}")
    files = [(p, label) for label, name in enumerate(classes) for p in image_files(folder / name)]
    cache = _cache_path(root, split, image_size, [p for p, _ in files], max_pixels)
    data = _read_cache(cache, torch.tensor([label for _, label in files], dtype=torch.int64), image_size)
    if data is None:
        data = _decode(files, image_size, max_pixels, f"imagefolder: decoding {len(files)} images of {folder} to "
                                                      f"{image_size}x{image_size}, cached for the next run")
        _write_cache(cache, data)
    for message in data["skipped"]:
        print(f"warning: {cli.printable(message)}; skipped", file=sys.stderr)
    counts = torch.bincount(data["labels"], minlength=len(classes)).tolist()
    if 0 in counts:
        raise DataError(f"imagefolder: class folder {folder / classes[counts.index(0)]} holds no readable images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return data["images"], data["labels"]


def _cache_path(root: Path, split: str, image_size: int, files: list[Path], max_pixels: int) -> Path:
    """DATA_DIR/.cache-<split>-<size>-<hash>: the hash covers every file's path, size and mtime and the decoding
    (max_pixels included: what it refused is in the cache), so adding, removing, renaming or editing an image, or a
    new decoder, makes a new key."""
    stats = [(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for p, st in ((p, p.stat()) for p in files)]
    key = json.dumps([CACHE_VERSION, IMAGEFOLDER_CHANNELS, image_size, max_pixels, stats])
    return root / f".cache-{split}-{image_size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _decode(files: list[tuple[Path, int]], image_size: int, max_pixels: int, what: str) -> dict:
    """{"images", "labels", "skipped": the messages of the unreadable files}, decoded into one preallocated tensor.
    Only what is the file's own (an UnreadableImage) is skipped; any other failure (out of memory, an I/O error)
    may pass, so it stops the run before anything is cached."""
    # The threads' decoded frames (up to max_pixels * DECODE_COPIES bytes each) share a budget: DECODE_BUFFER, or
    # half of what the result leaves available, so that it never alone refuses a folder that fits; an image larger
    # than the budget decodes alone (and one that does not fit at all is an out-of-memory error, never cached).
    result, available = len(files) * IMAGEFOLDER_CHANNELS * image_size**2, available_memory()
    limit = min(DECODE_BUFFER, len(files) * max_pixels * DECODE_COPIES,
                DECODE_BUFFER if available is None else max(0, available - result) // 2)
    images = allocate_images(len(files), IMAGEFOLDER_CHANNELS, image_size, what, extra=limit)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    budget = _ByteBudget(limit)

    def decode(i: int) -> str | None:
        try:
            images[i] = load_image(files[i][0], IMAGEFOLDER_CHANNELS, image_size, max_pixels, budget)
        except UnreadableImage as e:
            return str(e)
        return None

    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while it decodes and resizes
        problems = list(pool.map(decode, range(len(files))))
    skipped = [p for p in problems if p is not None]
    if skipped:
        keep = torch.tensor([p is None for p in problems])
        images, labels = images[keep], labels[keep]
    return {"images": images, "labels": labels, "skipped": skipped}


def _read_cache(path: Path, expected: torch.Tensor, image_size: int) -> dict | None:
    """The cache's {"images", "labels", "skipped"} if it holds what _decode would for files of the labels
    `expected`, else None (decode again), with a warning when the file is there but is not that: checked as
    checkpoints are (weights_only, tensors no larger than their storage), then every field against the folder."""
    if not path.is_file():
        return None
    from checkpoint import CheckpointError, check_tensor_sizes  # (checkpoint imports model: only when needed)
    try:
        data = torch.load(path, weights_only=True)
        check_tensor_sizes(data, path)
        images, labels, skipped = data["images"], data["labels"], data["skipped"]
        shape_ok = (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                    and images.shape[1:] == (IMAGEFOLDER_CHANNELS, image_size, image_size)
                    and isinstance(skipped, list) and all(isinstance(m, str) and len(m) <= 8192 for m in skipped)
                    and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.ndim == 1
                    and len(images) == len(labels) == len(expected) - len(skipped))
        # The files are listed class by class, so the labels must run in order, each class no more often than it
        # has files: a negative or out-of-range label, or one class's images under another's, is refused.
        labels_ok = shape_ok and (len(labels) == 0 or (
            0 <= labels.min() and labels.max() <= expected.max() and bool((labels.diff() >= 0).all())
            and bool((torch.bincount(labels, minlength=int(expected.max()) + 1)
                      <= torch.bincount(expected)).all())))
        problem = None if labels_ok else "its images, labels or skipped files do not match the folder"
    except CheckpointError as e:
        problem = str(e)
    except Exception as e:  # truncated, foreign or mangled
        problem = f"unreadable ({type(e).__name__})"
    if problem is None:
        return data
    print(f"warning: ignoring the image cache {path}: {cli.shorten(cli.printable(problem))}; decoding again",
          file=sys.stderr)
    return None


def _write_cache(path: Path, data: dict) -> None:
    """Best effort: without a cache (a read-only data dir, a full disk) the next run only decodes again.
    Older caches of the same split and size are deleted, so edits to the folder do not pile them up."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed when complete: never a half-written cache
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = (cli.describe_os_error(e, filename=False) if isinstance(e, OSError) else  # (never our .tmp's name)
                  cli.shorten(str(e).strip().splitlines()[0].replace(str(tmp), str(path))) if str(e).strip()
                  else type(e).__name__)
        print(f"warning: cannot write the cache {path}: {reason}", file=sys.stderr)
    finally:  # a failed write, or Ctrl-C in the middle of one (after the rename there is nothing left to remove)
        with suppress(OSError):  # (a cleanup that fails must not hide why the write failed)
            tmp.unlink(missing_ok=True)

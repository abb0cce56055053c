"""Datasets, held in memory as uint8 tensors, with normalization and augmentation on whole batches.

    cifar10        DATA_DIR/cifar-10-batches-py/           (downloaded, checksum verified, when missing)
    mnist          DATA_DIR/MNIST/raw/ or DATA_DIR/mnist/   (IDX files, plain or .gz; downloaded when missing)
    fashion-mnist  DATA_DIR/FashionMNIST/raw/, DATA_DIR/fashion-mnist/, /usr/share/datasets/fashion-mnist/

Why in memory: CIFAR-10 is 150 MB as uint8, so decoding it once and slicing batches out of one tensor
on the training device removes the per-image Python work (PIL, ToTensor, collate) that otherwise dominates
a small model's step time. Every random choice of an epoch (order, crop offsets, flips) is drawn up front
from (seed, epoch) alone, so an epoch is the same whatever the batch size, accumulation or resume point.
"""
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "mnist", "fashion-mnist")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
PAD = 4  # random-crop padding, pixels


class DataError(Exception):
    """Data that is missing, unreadable or not in the expected format."""


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


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
        data, labels = batch["data"], np.asarray(batch["labels"])
    except Exception as e:  # truncated, not a pickle, a forbidden global, missing keys, ...
        raise DataError(f"broken CIFAR-10 batch file {path}: {type(e).__name__}: {e}"[:300]) from None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels.shape == (len(data),) and labels.dtype.kind in "iu"
            and (len(labels) == 0 or 0 <= labels.min() <= labels.max() <= 9)):
        raise DataError(f"broken CIFAR-10 batch file {path}: expected uint8 data (N, 3072) and N labels in 0..9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def _download_cifar10(data_dir: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_and_extract_archive(CIFAR10_URL, str(data_dir), md5=CIFAR10_MD5)
    except Exception as e:
        raise DataError(f"CIFAR-10 not found in {data_dir / 'cifar-10-batches-py'} and the download failed "
                        f"({type(e).__name__}); put the extracted {CIFAR10_URL} there") from None


def load_cifar10(data_dir: Path):
    folder = data_dir / "cifar-10-batches-py"
    if not folder.is_dir():
        _download_cifar10(data_dir)
    files = {"train": [folder / f"data_batch_{i}" for i in range(1, 6)], "test": [folder / "test_batch"]}
    out = []
    for split in ("train", "test"):
        missing = [p.name for p in files[split] if not p.is_file()]
        if missing:
            raise DataError(f"incomplete CIFAR-10 folder {folder}: missing {', '.join(missing)}")
        xs, ys = zip(*(_read_cifar_batch(p) for p in files[split]))
        out += [torch.cat(xs), torch.cat(ys)]
    return (*out, CIFAR10_CLASSES)


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """IDX format: magic (0, 0, 0x08 = uint8, ndim), ndim big-endian uint32 sizes, then the bytes."""
    try:
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d uint8 data")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, file has {len(raw) - header} bytes of data")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _find_idx(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        for p in (d / name, d / (name + ".gz")):
            if p.is_file():
                return p
    return None


def load_idx_dataset(name: str, data_dir: Path):
    """MNIST or Fashion-MNIST from the four standard IDX files, wherever the usual layouts put them."""
    tv_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    dirs = [data_dir / tv_name / "raw", data_dir / name, data_dir]
    if name == "fashion-mnist":
        dirs.append(Path("/usr/share/datasets/fashion-mnist"))  # Debian's dataset-fashion-mnist
    if _find_idx(dirs, IDX_FILES["train"][0]) is None:
        import torchvision  # its download verifies checksums and writes DATA_DIR/<MNIST|FashionMNIST>/raw
        try:
            getattr(torchvision.datasets, tv_name)(str(data_dir), download=True)
        except Exception as e:
            hint = " or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
            raise DataError(f"{name} not found in {', '.join(map(str, dirs))} and the download failed "
                            f"({type(e).__name__}); put the IDX files in {dirs[0]}{hint}") from None
    out = []
    for split in ("train", "test"):
        paths = [_find_idx(dirs, f) for f in IDX_FILES[split]]
        if None in paths:
            raise DataError(f"{name}: {IDX_FILES[split][paths.index(None)]}[.gz] not found in {dirs[0]}")
        images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
        if len(images) != len(labels) or (len(labels) and labels.max() > 9):
            raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels, or a label over 9")
        out += [images.unsqueeze(1), labels.long()]  # (N, 1, 28, 28)
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return (*out, classes)


def load_raw(name: str, data_dir: str | Path):
    """(train_images, train_labels, test_images, test_labels, classes), images uint8 (N, C, H, W)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    data_dir = Path(data_dir)
    return load_cifar10(data_dir) if name == "cifar10" else load_idx_dataset(name, data_dir)


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

    def batch(self, idx: torch.Tensor, crop_flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float images and labels for the samples `idx`, augmented where crop_flip is given."""
        x = self.images.index_select(0, idx)  # several times faster than images[idx] on the CPU
        if crop_flip is not None:
            x = random_crop_flip(x, crop_flip)
        x = x.float().div_(255).sub_(self.mean[:, None, None]).div_(self.std[:, None, None])
        return x, self.labels.index_select(0, idx)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 sums: exact enough for 150M pixels)."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    return x.mean(1).tolist(), x.std(1).tolist()


def split_train_val(images, labels, val_split: float, seed: int):
    """Hold out a seeded random `val_split` fraction of the training set for validation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(labels) * val_split)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def epoch_plan(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every random choice of one epoch, from (seed, epoch) alone: an (n, 4) int64 tensor whose rows are
    (sample index, crop offset y, crop offset x, flip 0/1), in the order the samples are visited."""
    g = torch.Generator().manual_seed(seed * 10_000 + epoch)  # distinct per epoch for runs under 10,000 epochs
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n, 1), generator=g)
    return torch.cat([order[:, None], offsets, flips], 1).to(device)


def random_crop_flip(x: torch.Tensor, crop_flip: torch.Tensor) -> torch.Tensor:
    """Crop each image of x (N, C, H, W) at its own offset (dy, dx) from a PAD-pixel zero-padded copy, and
    mirror those with flip = 1: one gather for the whole batch, no per-image Python."""
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).view(n, c, -1)
    arange_w = torch.arange(w, device=x.device)
    rows = crop_flip[:, 0:1] + torch.arange(h, device=x.device)                               # (N, H)
    cols = crop_flip[:, 1:2] + torch.where(crop_flip[:, 2:3].bool(), arange_w.flip(0), arange_w)  # (N, W)
    flat = (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, flat).view(n, c, h, w)


def prepare(name: str, data_dir: str | Path, val_split: float, seed: int, device: torch.device | str):
    """Load a dataset, hold out validation, and compute normalization from the training part.
    Returns (train, val or None, test, classes) as ImageSets on `device`."""
    train_x, train_y, test_x, test_y, classes = load_raw(name, data_dir)
    (train_x, train_y), (val_x, val_y) = split_train_val(train_x, train_y, val_split, seed)
    mean, std = (torch.tensor(s, dtype=torch.float32, device=device) for s in channel_stats(train_x))

    def on_device(x, y):
        return ImageSet(x.to(device), y.to(device), mean, std)
    val = on_device(val_x, val_y) if len(val_y) else None
    return on_device(train_x, train_y), val, on_device(test_x, test_y), classes

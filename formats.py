"""The packed datasets' files (CIFAR-10, CIFAR-100, MNIST and Fashion-MNIST), read safely, and the memory
checks every loader shares.

    cifar10        DATA_DIR/cifar-10-batches-py/           (downloaded, checksum verified, when missing)
    cifar100       DATA_DIR/cifar-100-python/              (train, test, meta; the 100 fine labels; downloaded too)
    mnist          DATA_DIR/MNIST/raw/ or DATA_DIR/mnist/   (IDX files, plain or .gz; downloaded when missing)
    fashion-mnist  DATA_DIR/FashionMNIST/raw/, DATA_DIR/fashion-mnist/, /usr/share/datasets/fashion-mnist/
"""
import gzip
import math
import os
import pickle
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import cli
from runtime import print0

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "shards")
FILE_SETS = ("imagefolder", "shards")  # datasets of image files (decode.load_image), where the photo recipe applies
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # where DATA_DIR holds it, as the download extracts it
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


@contextmanager
def undone_on_failure(folder: Path, names: list[str]) -> Iterator[None]:
    """A download into `folder` that writes the files or folders `names`: if it fails, those of them that were not
    there before are removed, then the folders it made, so that a failed attempt (offline, a truncated or corrupt
    file) leaves nothing behind, and the next attempt does not take a half-written folder for the data."""
    created = cli.new_folders(folder)
    fresh = [folder / name for name in names if not os.path.lexists(folder / name)]
    try:
        yield
    except BaseException:
        for path in fresh:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        cli.remove_empty(created)
        raise


def _download_cifar(url: str, md5: str, folder: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        with undone_on_failure(folder.parent, [url.rsplit("/", 1)[1], folder.name]):  # the archive, what it holds
            download_and_extract_archive(url, str(folder.parent), md5=md5)
    except Exception as e:
        raise DataError(f"{folder.name} not found in {folder.parent} and the download failed "
                        f"({type(e).__name__}); put the extracted {url} there, or give --data-dir the folder that "
                        f"holds {folder.name}") from None


def load_cifar10(data_dir: Path, splits: tuple[str, ...] = ("train", "test")):
    """(images, labels) of each of `splits`, then the class names."""
    folder = data_dir / CIFAR10_FOLDER
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


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it


def load_idx_dataset(name: str, data_dir: Path, splits: tuple[str, ...] = ("train", "test")):
    """MNIST or Fashion-MNIST from the four standard IDX files, wherever the usual layouts put them: (images,
    labels) of each of `splits`, then the class names."""
    tv_name = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    dirs = [data_dir / tv_name / "raw", data_dir / name, data_dir]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    if _find_idx(dirs, IDX_FILES[splits[0]][0]) is None:
        import torchvision  # its download verifies checksums and writes DATA_DIR/<MNIST|FashionMNIST>/raw
        dataset = getattr(torchvision.datasets, tv_name)
        written = [n for name, _ in dataset.resources for n in (name, name.removesuffix(".gz"))]  # (and extracted)
        try:
            with undone_on_failure(dirs[0], written):
                dataset(str(data_dir), download=True)
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
        if paths[0].parent == DEBIAN_FASHION_MNIST and split == splits[0] and DEBIAN_FASHION_MNIST not in dirs[:3]:
            print0(f"{name}: not in {data_dir}: reading Debian's copy in {DEBIAN_FASHION_MNIST}", file=sys.stderr)
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



def allocate_images(n: int, channels: int, size: int, what: str, extra: int = 0) -> torch.Tensor:
    """An empty uint8 (n, channels, size, size) tensor, after saying on stderr (`what` it is for) how much memory it
    takes, and the `extra` bytes that filling it takes at most on top (decoding or resizing buffers); a DataError
    instead when the two are more than the memory available."""
    result = n * channels * size * size
    check_memory(result + extra, what)
    also = f", plus up to {extra / 2**20:,.1f} MiB while filling it" if extra else ""
    print0(f"{what} ({result / 2**20:,.1f} MiB in memory{also})", file=sys.stderr, flush=True)
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


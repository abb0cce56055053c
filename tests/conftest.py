"""Shared by the tests: the repository root on sys.path, and tiny datasets written in the real file formats."""
import gzip
import os

if "PYTEST_XDIST_WORKER" in os.environ:  # `pytest -n 2`: one thread per worker, and per process it starts. Two
    # torch processes that each take every core slow each other many times over; with one thread each they
    # share the cores evenly. Set before numpy and torch are imported, which read it once.
    os.environ["OMP_NUM_THREADS"] = "1"
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_cifar10(data_dir: Path, n_per_batch: int = 40, n_test: int = 50) -> Path:
    """data_dir/cifar-10-batches-py/ as the real archive has it: five training batches and a test batch, each a
    pickled {"data": uint8 (N, 3072), "labels": [int]} of seeded random images."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return data_dir


def as_from_a_terminal() -> None:
    """Popen's preexec_fn for processes the tests send SIGINT/SIGTERM: the default handlers, as a terminal gives
    them (pytest run as a background job starts its children with SIGINT ignored, and train.py keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def fails_with(argv: list[str], message: str) -> str:
    """train.py with argv exits with one `train.py: error:` line that contains message; returns that line."""
    import train  # here, not at the top: sys.path must hold the repository root first
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    text = str(exc.value.code)
    assert text.startswith("train.py: error: ") and message in text and "\n" not in text, text
    return text


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """200 training and 50 test images in the CIFAR-10 layout."""
    return write_cifar10(tmp_path / "cifar")


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """An IDX file of uint8 `array` at path (path + ".gz", gzipped, when compress)."""
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(folder: Path, compress: bool) -> Path:
    """The four MNIST IDX files, 120 training and 40 test images: image i is black with row 2 * label_i white."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("t10k", 40)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[np.arange(n), 2 * labels] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
    return folder


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    """A small tmpfs at path (needs root and a kernel that lets it mount): a disk that really fills up, or a
    read-only one."""
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          check=False)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.fixture
def mounts():
    """mounts(path, size, read_only=False): a tmpfs mounted at path (mount_tmpfs), unmounted after the test."""
    made = []
    yield lambda path, size, read_only=False: (mount_tmpfs(path, size, read_only), made.append(path))
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=True)

"""bench.py --shards: tar shards (shards.py) against the same images as a folder, and a run's start-up from shards at
ImageNet's scale. Run through bench.py:

    python bench.py --shards ./photos                          # an epoch read from the folder, then from its shards
    python bench.py --shards ./photos --start-up 128000 1281167  # first step and memory vs images in 1,000-image shards

The epoch is read as training reads it (the workers decode and shape each image, the batches come back in the
epoch's order), without a model: what the data path alone delivers. Each pipeline is read twice: from a cold page
cache (dropped first, where the system lets this process: as root), where per-file opens and reads dominate, and
warm. What was measured, and on what: docs/performance.md.
"""
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import data
import shards
import tarshards
from bench_photos import first_step
from decode import SQUASH

BATCH = 256


def drop_caches() -> bool:
    """Empty the system's page cache (as root), so that the next reads come from the disk; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_epoch(name: str, source: str, workers: int, size: int) -> tuple[float, float, int]:
    """Seconds to prepare the dataset (list or index it, and its normalization sample), seconds to read one
    training epoch of it in the epoch's order, and the images read."""
    start = time.perf_counter()
    train, _, _, _ = data.prepare(name, source, 0.0, 0, "cpu", size, stats=([0.5] * 3, [0.25] * 3), prep=SQUASH,
                                  workers=workers)
    prepared = time.perf_counter()
    plan = data.epoch_plan(len(train), 0, 1, "cpu", shards=train.shard_counts)
    images = sum(len(y) for step in train.steps([[p] for p in plan.split(BATCH)], 1, False, 4, False)
                 for _, y in step)
    return prepared - start, time.perf_counter() - prepared, images


def shards_against_folder(folder: str, workers: int, size: int) -> None:
    """Read one epoch of the folder's training images, then of the same images as shards (written to a temporary
    folder by shards.py), cold and warm."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "shards"
        shards.write_shards(Path(folder), dest, shards.SHARD_SIZE)
        cold = drop_caches()
        print(f"{'pipeline':<8}{'cache':>6}{'prepare':>10}{'epoch':>9}{'images/s':>10}  (workers: {workers}, {size} "
              f"px, batches of {BATCH}; page cache {'dropped' if cold else 'NOT dropped (not root): both warm'})")
        rates = {}
        for cache in ("cold", "warm"):
            for name, source in (("folder", folder), ("shards", str(dest))):
                if cache == "cold":
                    drop_caches()
                prepare, seconds, n = read_epoch("imagefolder" if name == "folder" else "shards", source, workers, size)
                rates[name, cache] = n / seconds
                print(f"{name:<8}{cache:>6}{prepare:>9.1f}s{seconds:>8.1f}s{n / seconds:>10,.0f}", flush=True)
        for cache in ("cold", "warm"):
            print(f"shards / folder, {cache}: {rates['shards', cache] / rates['folder', cache]:.2f}x")


def tiny_shards(dest: Path, images: int, per_shard: int = shards.SHARD_SIZE, classes: int = 1000) -> None:
    """dest/train-*.tar: `images` samples of one tiny JPEG (16x16) in shards of `per_shard` over `classes` classes,
    two test shards, classes.txt and index.json: ImageNet's shape at a few hundred bytes an image. The shards are
    copies of one (their index entries alike), so that the bench writes 1.28 million images in a minute."""
    dest.mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    one = dest / "train-000000.tar"
    with tarfile.open(one, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(per_shard):
            for extension, payload in (("jpg", jpeg.getvalue()), ("cls", str(i % classes).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    entry, _ = tarshards.index_entry(one)
    names = [f"train-{s:06d}.tar" for s in range(-(-images // per_shard))] + ["test-000000.tar", "test-000001.tar"]
    for name in names[1:]:
        os.link(one, dest / name)  # (the same bytes: a hard link)
    index = {name: entry for name in names}
    last = names[-3]
    rest = images - per_shard * (len(names) - 3)  # the last training shard's images: its index entry's first ones
    index[last] = {**entry, **{k: tarshards.encode(tarshards.decode_array(entry[k], k, "")[:rest])
                               for k in ("offsets", "sizes", "labels")}}
    tarshards.save_index(dest, index)
    (dest / tarshards.CLASSES).write_text("".join(f"c{c:04d}\n" for c in range(classes)))


def start_up(counts: list[int], workers: int) -> None:
    """Seconds from launch to train.py's first step, and the main process's peak memory then, training on `counts`
    images of tiny_shards; per image: the peak's growth from the smallest count to the largest, over the images."""
    print(f"{'images':>10}{'shards':>8}{'first step':>12}{'main process':>14}  (simplecnn, 64 px, photo recipe, "
          f"workers: {workers})")
    peaks = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_shards(Path(tmp) / "shards", count)
            seconds, peaks[count] = first_step([
                sys.executable, "train.py", "--dataset", "shards", "--data-dir", str(Path(tmp) / "shards"),
                "--image-size", "64", "--resize-mode", "crop", "--workers", str(workers), "--epochs", "1",
                "--batch-size", "64", "--val-split", "0", "--log-interval", "1", "--out-dir", str(Path(tmp) / "run")])
        print(f"{count:>10,}{-(-count // shards.SHARD_SIZE):>8,}{seconds:>11.1f}s{peaks[count] / 2**20:>11,.0f} MiB",
              flush=True)
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        print(f"main process: {(peaks[high] - peaks[low]) / (high - low):.0f} bytes per image")


def run_shards(folder: str, counts: list[int] | None, workers: int, size: int) -> None:
    """The shards benchmark bench.py's flags ask for: --start-up, or the folder against its shards."""
    if counts:
        return start_up(counts, workers)
    shards_against_folder(folder, workers, size)

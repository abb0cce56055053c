"""Tar shards in WebDataset's layout: an image folder written as shards, or shards another tool wrote indexed.

    python shards.py FOLDER DEST                # FOLDER/{train,val,test}/<class>/<image> -> DEST/train-000000.tar...
    python shards.py FOLDER DEST --shard-size 5000
    python shards.py --index DEST               # index.json for shards another tool wrote (webdataset's ShardWriter)

A sample is two members side by side: KEY.<ext>, the image file's own bytes (never re-encoded), and KEY.cls, its
class index as decimal text; DEST/classes.txt names the classes, one a line, in index order. Training shards hold
the images in a seeded random order (a folder lists class by class, and a shard of one class would feed batches of
a few classes). DEST/index.json records where each sample's image lies in its shard and its class, so that a run
starts without reading the shards (1.28 million images: about 40 MB) and can begin any shard at any sample.

Runs read shards with --dataset shards --data-dir DEST (tarshards.py, data.prepare_shards, stream.ShardFiles).
DEST may also be a URL folder holding index.json, a brace pattern (https://host/d/train-{000000..000127}.tar) or a
text file listing shard paths or URLs; each split is told by the shard's name (train-, val-, test-).
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly, as in the other scripts

import argparse
import io
import os
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from decode import open_regular
from folders import imagefolder_classes, split_listing
from formats import DataError
from tarshards import CLASSES, INDEX, SPLITS, plural, shard_files, write_index

SHARD_SIZE = 1000  # images per shard: 1,282 shards for ImageNet, each ~110 MB


# ---------------------------------------------------------------------------------------------------------------
# Writing: an image folder as shards

def checked_classes(folder: Path, dest: Path) -> list[str]:
    """The classes of the image folder `folder`, once it is one and `dest` may take its shards (outside it, new or
    empty), and each class name fits a line of classes.txt."""
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DataError(f"shards: {folder} is no image folder: it needs train/ and test/ (and optionally val/), each "
                        f"with one sub-folder of images per class")
    inside = next((s for s in SPLITS if dest.resolve().is_relative_to((folder / s).resolve())), None)
    if inside:
        raise DataError(f"shards: {dest} is inside {folder / inside}, whose folders are read as classes: give a "
                        f"folder outside {folder}'s train/, val/ and test/")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"shards: {dest} exists and is not an empty folder: give a new one (nothing is overwritten)")
    classes = imagefolder_classes(folder)
    broken = next((c for c in classes if c.splitlines() != [c]), None)
    if broken is not None:
        raise DataError(f"shards: the class folder {cli.printable(broken)} has a line break in its name, which "
                        f"{CLASSES} (one name a line) cannot hold: rename it")
    return classes


def write_shards(folder: Path, dest: Path, shard_size: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write the image folder's splits as shards into `dest` (new, or an empty folder), with classes.txt and
    index.json; all or nothing: the shards are written into a hidden folder beside it, renamed to `dest` at the
    end. Returns each split's (shards, images)."""
    classes = checked_classes(folder, dest)
    listing = {split: split_listing(folder, split, classes) for split in SPLITS
               if split != "val" or (folder / "val").is_dir()}
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot create {dest}: {cli.describe_os_error(e, filename=False)}") from None
    try:
        written, done, total, last = {}, 0, sum(len(labels) for _, labels in listing.values()), time.monotonic()
        for split, (names, labels) in listing.items():
            order = (torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
                     if split == "train" else np.arange(len(labels)))  # (mixed: see the docstring at the top)
            count, kept = 0, len(order)
            for count, start in enumerate(range(0, len(order), shard_size), 1):
                with tarfile.open(partial / f"{split}-{count - 1:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i in order[start:start + shard_size]:
                        path = folder / os.fsdecode(names[i])
                        problem = add_sample(tar, path, f"{split}-{i:09d}", int(labels[i]))
                        if problem:  # (named now: in a shard, a run could name it by its shard and place alone)
                            kept -= 1
                            print(f"warning: {cli.printable(str(path))} is no image ({problem}): left out",
                                  file=sys.stderr, flush=True)
                done += len(order[start:start + shard_size])
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    print(f"shards: {done:,} of {total:,} images written", file=sys.stderr, flush=True)
            if len(order) and not kept:  # (said now, of the folder: index.json would say it of the hidden one)
                raise DataError(f"shards: no file of {folder / split} is an image: nothing to write")
            written[split] = (count, kept)
        # (UTF-8; a name that is not, a byte as the file system has it: read back as folders.py lists it)
        (partial / CLASSES).write_bytes("".join(f"{c}\n" for c in classes).encode("utf-8", "surrogateescape"))
        write_index(partial, sorted(partial.glob("*.tar")))
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def add_sample(tar: tarfile.TarFile, path: Path, key: str, label: int) -> str | None:
    """One sample: the image file's bytes as KEY.<its extension> and its class as KEY.cls (fixed times and owners:
    the same folder writes the same shards). A file whose header Pillow does not know as an image is left out:
    returns why (None when written). Only the header is read: a file cut short further on is a run's to skip."""
    with open_regular(path, "image") as f:
        data = f.read()
    try:
        Image.open(io.BytesIO(data)).close()
    except Image.DecompressionBombError:
        pass  # (an image, a large one: --max-image-pixels decides, in the run)
    except Image.UnidentifiedImageError:
        return "Pillow knows no image format in it"
    except (OSError, ValueError, SyntaxError) as e:  # (a header Pillow knows, broken)
        return cli.one_line(e, 100)
    extension = path.suffix.lower().lstrip(".")
    for name, payload in ((f"{key}.{extension}", data), (f"{key}.cls", str(label).encode())):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o444, 0
        tar.addfile(info, io.BytesIO(payload))
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("shards.py", __doc__)
    p.add_argument("folder", nargs="?", type=cli.path_flag, help="an image folder: train/, test/ (and val/), one "
                                                                 "sub-folder of images per class")
    p.add_argument("dest", nargs="?", type=cli.path_flag, help="the new folder of shards")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, metavar="N", help=f"images per shard "
                                                                                   f"(default {SHARD_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="the training shards' order (default 0)")
    p.add_argument("--index", metavar="DEST", type=cli.path_flag,
                   help="write DEST/index.json for the shards in DEST (written by another tool) instead")
    args = p.parse_args(argv)
    if (args.index is None) == (args.dest is None) or (args.index is not None and args.folder is not None):
        p.error("give FOLDER DEST, or --index DEST alone")
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    with cli.one_line_errors("shards.py"):
        args = parse_args(argv)
        if hasattr(signal, "SIGHUP"):  # (a closed terminal: cleaned up as Ctrl-C; Windows has none)
            signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
        if args.index is not None:
            if cli.is_url(args.index):
                raise DataError(f"shards: --index writes index.json into a folder of shards on this machine, not "
                                f"{args.index}: index the folder they came from, and put its {INDEX} beside them")
            folder = Path(args.index)
            if not folder.is_dir():
                raise DataError(f"shards: --index {folder}: {'not a folder' if folder.exists() else 'not found'}; "
                                f"give the folder that holds the shards")
            found = shard_files(folder)
            if not found:
                raise DataError(f"shards: no train-*.tar, val-*.tar or test-*.tar in {folder}")
            if (folder / INDEX).exists():
                raise DataError(f"shards: {folder / INDEX} exists; remove it to index the shards again")
            print(f"wrote {folder / INDEX}: {plural(write_index(folder, found), 'sample')} in "
                  f"{plural(len(found), 'shard')}")
            return
        written = write_shards(Path(args.folder), Path(args.dest), args.shard_size, args.seed)
        print(f"wrote {args.dest}: " + ", ".join(f"{split} {plural(n, 'shard')} ({plural(images, 'image')})"
                                                for split, (n, images) in written.items()) + f"; {CLASSES}, {INDEX}")


if __name__ == "__main__":
    main()

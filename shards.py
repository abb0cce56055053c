"""Tar shards in WebDataset's layout: an image folder written as shards, and shards indexed and read.

    python shards.py FOLDER DEST                # FOLDER/{train,val,test}/<class>/<image> -> DEST/train-000000.tar...
    python shards.py FOLDER DEST --shard-size 5000
    python shards.py --index DEST               # index.json for shards another tool wrote (webdataset's ShardWriter)

A sample is two members side by side: KEY.<ext>, the image file's own bytes (never re-encoded), and KEY.cls, its
class index as decimal text; DEST/classes.txt names the classes, one a line, in index order. Training shards hold
the images in a seeded random order (a folder lists class by class, and a shard of one class would feed batches of
a few classes). DEST/index.json records where each sample's image lies in its shard and its class, so that a run
starts without reading the shards (1.28 million images: about 40 MB) and can begin any shard at any sample.

Runs read shards with --dataset shards --data-dir DEST (data.prepare_shards, stream.ShardFiles). DEST may also be a
URL folder holding index.json, a brace pattern (https://host/d/train-{000000..000127}.tar) or a text file listing
shard paths or URLs; each split is told by the shard's name (train-, val-, test-).
"""
import argparse
import base64
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

import cli
from decode import UnreadableImage, open_regular
from folders import imagefolder_classes, split_listing
from formats import DataError

SHARD_SIZE = 1000  # images per shard: 1,282 shards for ImageNet, each ~110 MB
SPLITS = ("train", "val", "test")
INDEX, CLASSES = "index.json", "classes.txt"
INDEX_FORMAT = "image-shards-index 1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp")  # the member that is a sample's image (webdataset's names)
MAX_INDEX_BYTES = 2**31   # index.json: 24 bytes a sample as base64, so 60 million samples
MAX_CLS_BYTES = 20        # a .cls member: a decimal class index
MAX_IMAGE_BYTES = 2**31   # an image member this large is none (decode.MAX_IMAGE_PIXELS would refuse it anyway)
OPEN_SHARDS = 16          # shards a reading process keeps open (the epoch mixes data.OPEN_SHARDS at a time)
SKIP_BYTES = 2**20        # over HTTP, a gap up to this is read through; a larger one starts a new request there
HTTP_TIMEOUT = 60         # seconds a request may wait for the server
SOURCES = (f"give --data-dir a folder of train-*.tar and test-*.tar (python shards.py FOLDER DEST writes one), a URL "
           f"folder with {INDEX}, a brace pattern or a list file of shards")


@dataclass
class Table:
    """A split's samples, shard after shard in the order of `shards`: each sample's shard (an index into
    `shards`: paths or URLs), where its image's bytes lie in that shard, and its class. Numpy arrays: a few bytes
    a sample, no Python object each (the DataLoader workers' copy-on-write pages stay shared)."""
    shards: list[str]
    shard: np.ndarray     # int32
    position: np.ndarray  # int32: the sample's number in its shard (what messages name)
    offset: np.ndarray    # int64
    size: np.ndarray      # int32 (an image of 2 GiB or more is no sample: MAX_IMAGE_BYTES)
    labels: np.ndarray    # int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Table":
        """The samples `idx`, kept in shard order (sorted) so that each shard is still read front to back."""
        idx = np.sort(idx)
        return Table(self.shards, *(a[idx] for a in (self.shard, self.position, self.offset, self.size, self.labels)))

    def counts(self) -> torch.Tensor:
        """The number of samples of each run of one shard, in order: what data.mixed_order mixes."""
        starts = np.flatnonzero(np.r_[True, self.shard[1:] != self.shard[:-1]]) if len(self) else np.zeros(0, int)
        return torch.from_numpy(np.diff(np.r_[starts, len(self)]).astype(np.int64))

    def describe(self, i: int) -> str:
        """Sample i, as messages name it: its shard and its number in that shard."""
        return f"{self.shards[int(self.shard[i])]} sample {int(self.position[i])}"


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def is_shard_folder(path: str) -> bool:
    """Whether `path` is a folder of shards (train-*.tar) and not an image folder (train/): what --dataset shards
    reads, given or not."""
    folder = Path(path)
    return not is_url(path) and folder.is_dir() and not (folder / "train").is_dir() and \
        any(folder.glob("train-*.tar"))


# ---------------------------------------------------------------------------------------------------------------
# Where the shards are: a folder, a URL folder, a brace pattern, a list file

def expand_braces(pattern: str) -> list[str]:
    """A brace pattern's names, as the shell and webdataset expand them, left to right: {000000..000127} (a range,
    zero-padded as written) and {a,b} (alternatives, which may hold braces of their own)."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, cuts = 0, [start]
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 1 and pattern[end] == ",":
            cuts.append(end)
        if depth == 0:
            break
    else:
        raise DataError(f"shards: {pattern} opens a brace it does not close")
    inner, rest = pattern[start + 1:end], pattern[end + 1:]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if r:
        low, high = int(r.group(1)), int(r.group(2))
        if high < low or high - low >= 10**6:
            raise DataError(f"shards: cannot expand {{{inner}}} in {pattern}: give {{LOW..HIGH}} with LOW <= HIGH")
        choices = [f"{v:0{len(r.group(1))}d}" for v in range(low, high + 1)]
    else:
        choices = [pattern[i + 1:j] for i, j in zip(cuts, cuts[1:] + [end])]
    return [pattern[:start] + name for c in choices for name in expand_braces(c + rest)]


def locate(spec: str) -> tuple[str, dict[str, list[str]], dict | None]:
    """The shards of --data-dir `spec`, split by their names (train-, val-, test-), the folder or URL folder beside
    them (where classes.txt is looked for), and its index.json (read_index), if it has one."""
    index, listed = None, False  # (listed: the folder's index.json was read to list the shards)
    if is_url(spec) and spec.endswith("/"):
        index, listed = read_index(spec), True
        if index is None:
            raise DataError(f"shards: no {INDEX} at {spec}: a URL folder cannot be listed; give a brace pattern "
                            f"({spec}train-{{000000..000009}}.tar) or a list file, or write one (python shards.py "
                            f"--index)")
        found = [spec + name for name in index]
    elif not is_url(spec) and Path(spec).is_dir():  # (index.json's shards, where it has one: a missing one is said)
        index, listed = read_index(spec), True
        found = ([os.path.join(spec, name) for name in index] if index is not None else
                 sorted(str(p) for split in SPLITS for p in Path(spec).glob(f"{split}-*.tar")))
    elif not is_url(spec) and Path(spec).suffix == ".txt":
        with open_regular(spec, "shard list") as f:
            found = [line.strip() for line in f.read(2**24).decode(errors="replace").splitlines()
                     if line.strip() and not line.startswith("#")]
    elif not is_url(spec) and "{" not in spec and not os.path.exists(spec):
        raise DataError(f"shards: {spec} not found; {SOURCES}")
    else:
        found = expand_braces(spec)
    splits = {}
    for location in found:
        m = re.match(r"(train|val|test)[-_.]", location.rsplit("/", 1)[-1])
        if m is None:
            raise DataError(f"shards: cannot tell the split of {location}: shard names start with train-, val- or "
                            f"test-")
        splits.setdefault(m.group(1), []).append(location)
    if "train" not in splits or "test" not in splits:
        raise DataError(f"shards: {spec} has no {' or '.join(s for s in ('train', 'test') if s not in splits)} "
                        f"shards; {SOURCES}")
    first = splits["train"][0]
    folder = first.rsplit("/", 1)[0] + "/" if is_url(first) else str(Path(first).parent)
    return folder, splits, index if listed else read_index(folder)


def open_location(location: str, what: str, offset: int = 0) -> BinaryIO:
    """A shard or one of its side files, opened for reading from `offset` (over HTTP: one streaming request,
    a Range request past 0). A missing one is a DataError saying so."""
    if not is_url(location):
        f = open_regular(location, what)
        f.seek(offset)
        return f
    request = urllib.request.Request(location, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot read {what} {location}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot read {what} {location}: {cli.one_line(getattr(e, 'reason', e))}") from None
    if offset and response.status != 206:  # (a server that ignores Range sends it all: read up to the offset)
        skip(response, offset)
    return response


def skip(f: BinaryIO, n: int) -> None:
    while n > 0:
        got = len(f.read(min(n, 2**20)))
        if got == 0:
            return
        n -= got


def read_side_file(folder: str, name: str, limit: int) -> bytes | None:
    """index.json or classes.txt beside the shards, or None when there is none; at most `limit` bytes."""
    location = folder + name if is_url(folder) else os.path.join(folder, name)
    if not is_url(folder) and not os.path.exists(location):
        return None
    try:
        with open_location(location, name) as f:
            data = f.read(limit + 1)
    except DataError as e:
        if "HTTP 404" in str(e):
            return None
        raise
    if len(data) > limit:
        raise DataError(f"shards: {location} is over {limit:,} bytes: not a file these scripts wrote")
    return data


# ---------------------------------------------------------------------------------------------------------------
# The index: where each sample's image lies, and its class

def scan(f: BinaryIO, name: str, seekable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read a shard's headers (its images' bytes are skipped: sought past, or read through from a stream):
    each sample's image offset and size and its class, and what was wrong (a sample without an image or a .cls is
    left out). Members named as webdataset names them: KEY.ext, KEY up to the first dot of the file name."""
    samples, problems = {}, []
    try:
        with tarfile.open(fileobj=f, mode="r:" if seekable else "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                sample = samples.setdefault(f"{folder}/{key}", [-1, 0, -1])
                if extension.lower() in IMAGE_EXTENSIONS and member.size < MAX_IMAGE_BYTES:
                    sample[:2] = member.offset_data, member.size
                elif extension == "cls":
                    text = tar.extractfile(member).read(MAX_CLS_BYTES + 1).strip()
                    sample[2] = int(text) if text.isdigit() and len(text) <= MAX_CLS_BYTES - 2 else -2
                if not seekable:
                    tar.members.clear()  # (a stream keeps nothing to go back to)
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(f"{name} cannot be read past {len(samples)} samples ({cli.one_line(e)}); the rest is skipped")
    kept = []
    for key, (offset, size, label) in samples.items():
        if offset < 0 or label < 0:
            what = ("no image (.jpg, .png, ...)" if offset < 0 else "no .cls" if label == -1 else
                    "a .cls that is no class index")
            problems.append(f"{name}: sample {key.lstrip('/')} has {what}; skipped")
        else:
            kept.append((offset, size, label))
    a = np.array(kept, dtype=np.int64).reshape(-1, 3)
    return a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), problems


def encode(a: np.ndarray) -> str:
    return base64.b64encode(a.astype("<i8").tobytes()).decode()


def decode_array(text: object, what: str) -> np.ndarray:
    if not isinstance(text, str):
        raise DataError(f"shards: {what} in {INDEX} is not an array these scripts wrote")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise DataError(f"shards: {what} in {INDEX} is not base64") from None
    if len(data) % 8:
        raise DataError(f"shards: {what} in {INDEX} is not an array of 8-byte integers")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


def read_index(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """index.json beside the shards: shard name -> (offsets, sizes, labels), or None when there is none."""
    data = read_side_file(folder, INDEX, MAX_INDEX_BYTES)
    if data is None:
        return None
    try:
        index = json.loads(data)
    except ValueError as e:
        raise DataError(f"shards: {INDEX} in {folder} is not JSON ({cli.one_line(e)}); write it again: python "
                        f"shards.py --index") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), dict):
        raise DataError(f"shards: {INDEX} in {folder} is not an index these scripts wrote ({INDEX_FORMAT})")
    entries = {}
    for name, entry in index["shards"].items():
        arrays = tuple(decode_array(entry.get(k) if isinstance(entry, dict) else None, f"{name}'s {k}")
                       for k in ("offsets", "sizes", "labels"))
        if len({len(a) for a in arrays}) != 1 or any((a < 0).any() for a in arrays) or \
                (arrays[1] >= MAX_IMAGE_BYTES).any():
            raise DataError(f"shards: {name}'s entry in {INDEX} is inconsistent; write it again: python shards.py "
                            f"--index")
        entries[name] = arrays
    return entries


def write_index(folder: Path, shards: list[Path]) -> int:
    """Index the shards (scan each) into folder/index.json, atomically; returns the number of samples."""
    entries, total = {}, 0
    for path in shards:
        with open_regular(path, "shard") as f:
            offsets, sizes, labels, problems = scan(f, str(path), seekable=True)
        for problem in problems:
            print(f"warning: {cli.printable(problem)}", file=sys.stderr)
        entries[path.name] = {"offsets": encode(offsets), "sizes": encode(sizes), "labels": encode(labels)}
        total += len(labels)
    with cli.atomic_output(folder / INDEX) as tmp:
        tmp.write_text(json.dumps({"format": INDEX_FORMAT, "shards": entries}))
    return total


def table(folder: str, locations: list[str], index: dict | None, warned: set) -> Table:
    """A split's Table: from index.json where it holds the shard, else from the shard's own headers (read now)."""
    parts = []
    for i, location in enumerate(locations):
        entry = index.get(location.rsplit("/", 1)[-1]) if index is not None else None
        if entry is None:
            if not warned:
                warned.add(True)
                print(f"shards: no {INDEX} entry for {location}: reading the shards' headers to index them (python "
                      f"shards.py --index {folder} writes the index once)", file=sys.stderr)
            with open_location(location, "shard") as f:
                *entry, problems = scan(f, location, seekable=not is_url(location))
            for problem in problems:
                print(f"warning: {cli.printable(problem)}", file=sys.stderr)
        elif not is_url(location) and not os.path.isfile(location):
            raise DataError(f"shards: shard not found: {location} (listed in {INDEX})")
        offsets, sizes, labels = entry
        parts.append((np.full(len(labels), i, dtype=np.int32), np.arange(len(labels), dtype=np.int32), offsets,
                      sizes.astype(np.int32), labels))
    return Table(locations, *(np.concatenate([p[k] for p in parts]) for k in range(5)))


def load(spec: str) -> tuple[dict[str, Table], list[str]]:
    """The shards of --data-dir `spec`: a Table per split found (train and test, val if any) and the class names
    (classes.txt; without one, the indices "0", "1", ...)."""
    folder, splits, index = locate(spec)
    warned = set()
    tables = {split: table(folder, splits[split], index, warned) for split in SPLITS if split in splits}
    top = max(int(t.labels.max()) + 1 if len(t) else 0 for t in tables.values())
    text = read_side_file(folder, CLASSES, 2**24)
    classes = text.decode(errors="replace").splitlines() if text is not None else [str(c) for c in range(top)]
    if top > len(classes):
        raise DataError(f"shards: a .cls of {spec} is {top - 1}, but {CLASSES} names {len(classes)} classes")
    if len(classes) < 2:
        raise DataError(f"shards: {spec} needs at least two classes, found {len(classes)}")
    return tables, classes


# ---------------------------------------------------------------------------------------------------------------
# Reading: one sample's image bytes, each shard front to back

class Reader:
    """A process's open shards: read(i) is sample i's image bytes. A shard stays open while the epoch goes on
    reading it (up to OPEN_SHARDS at once, the least recent closed first); a read further on in it reads on (over
    HTTP, a gap over SKIP_BYTES starts a new request there instead), one further back opens it again there."""

    def __init__(self, shards: Table):
        self.table, self.open = shards, OrderedDict()  # shard -> [file or response, position]

    def read(self, i: int) -> bytes:
        shard, offset, size = int(self.table.shard[i]), int(self.table.offset[i]), int(self.table.size[i])
        location = self.table.shards[shard]
        state = self.open.pop(shard, None)
        if state is not None and is_url(location) and not state[1] <= offset <= state[1] + SKIP_BYTES:
            state[0].close()
            state = None
        if state is None:
            try:
                state = [open_location(location, "shard", offset), offset]
            except DataError as e:
                if "HTTP 416" not in str(e):  # (416: Range Not Satisfiable, the shard ends before the image)
                    raise
                raise UnreadableImage(f"cannot read {self.table.describe(i)}: the shard ends before its image "
                                      f"begins (a truncated shard)") from None
        elif is_url(location):
            skip(state[0], offset - state[1])
        else:
            state[0].seek(offset)
        self.open[shard] = state
        while len(self.open) > OPEN_SHARDS:
            self.open.popitem(last=False)[1][0].close()
        data = state[0].read(size)
        if len(data) < size and is_url(location):  # (a connection the server ended: once more, from there)
            state[0].close()
            try:
                state[0] = open_location(location, "shard", offset + len(data))
                data += state[0].read(size - len(data))
            except DataError:  # (416: the shard does end there)
                del self.open[shard]
        state[1] = offset + len(data)
        if len(data) < size:
            raise UnreadableImage(f"cannot read {self.table.describe(i)}: the shard ends {size - len(data):,} bytes "
                                  f"before its image does (a truncated shard)")
        return data

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1][0].close()


# ---------------------------------------------------------------------------------------------------------------
# Writing: an image folder as shards

def write_shards(folder: Path, dest: Path, shard_size: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write the image folder's splits as shards into `dest` (new, or an empty folder), with classes.txt and
    index.json; all or nothing: the shards are written into a hidden folder beside it, renamed to `dest` at the
    end. Returns each split's (shards, images)."""
    classes = imagefolder_classes(folder)
    listing = {split: split_listing(folder, split, classes) for split in SPLITS
               if split != "val" or (folder / "val").is_dir()}
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"shards: {dest} exists and is not an empty folder: give a new one (nothing is overwritten)")
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True)
    try:
        written, done, total, last = {}, 0, sum(len(labels) for _, labels in listing.values()), time.monotonic()
        for split, (names, labels) in listing.items():
            order = (torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
                     if split == "train" else np.arange(len(labels)))  # (mixed: see the docstring at the top)
            count = 0
            for count, start in enumerate(range(0, len(order), shard_size), 1):
                with tarfile.open(partial / f"{split}-{count - 1:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i in order[start:start + shard_size]:
                        add_sample(tar, folder / os.fsdecode(names[i]), f"{split}-{i:09d}", int(labels[i]))
                done += len(order[start:start + shard_size])
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    print(f"shards: {done:,} of {total:,} images written", file=sys.stderr, flush=True)
            written[split] = (count, len(order))
        (partial / CLASSES).write_text("".join(f"{c}\n" for c in classes))
        write_index(partial, sorted(partial.glob("*.tar")))
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return written


def add_sample(tar: tarfile.TarFile, path: Path, key: str, label: int) -> None:
    """One sample: the image file's bytes as KEY.<its extension> and its class as KEY.cls (fixed times and owners:
    the same folder writes the same shards)."""
    with open_regular(path, "image") as f:
        data = f.read()
    extension = path.suffix.lower().lstrip(".")
    for name, payload in ((f"{key}.{extension}", data), (f"{key}.cls", str(label).encode())):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o444, 0
        tar.addfile(info, io.BytesIO(payload))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write an image folder as tar shards in WebDataset's layout, or index "
                                            "shards written elsewhere.")
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
        if args.index is not None:
            folder = Path(args.index)
            found = sorted(p for split in SPLITS for p in folder.glob(f"{split}-*.tar")) if folder.is_dir() else []
            if not found:
                raise DataError(f"shards: no train-*.tar, val-*.tar or test-*.tar in {folder}")
            if (folder / INDEX).exists():
                raise DataError(f"shards: {folder / INDEX} exists; remove it to index the shards again")
            print(f"wrote {folder / INDEX}: {write_index(folder, found):,} samples in {len(found):,} shards")
            return
        written = write_shards(Path(args.folder), Path(args.dest), args.shard_size, args.seed)
        print(f"wrote {args.dest}: " + ", ".join(f"{split} {n:,} shard{'s' * (n != 1)} ({images:,} images)"
                                                for split, (n, images) in written.items()) + f"; {CLASSES}, {INDEX}")


if __name__ == "__main__":
    main()

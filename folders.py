"""Image folders: your own images as DATA_DIR/<split>/<class>/<image file>, listed, decoded safely and cached.

    imagefolder    DATA_DIR/{train,test}/<class>/<image>, optionally DATA_DIR/val/ too

split_listing lists a split once (names and labels: what the streamed path reads); load_imagefolder_split decodes
a whole split once into one uint8 tensor (decode.load_image per file, on threads), cached as
DATA_DIR/.cache-<split>-<size>-<hash>.pt.
"""
import hashlib
import json
import os
import sys
import tempfile
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cli
from runtime import print0
from decode import DECODE_COPIES, MAX_IMAGE_PIXELS, ByteBudget, UnreadableImage, image_warnings_named, load_image, \
    open_regular
from formats import DataError, allocate_images, available_memory
from torchfiles import oversized_tensor

DECODE_BUFFER = 2**30  # the most bytes decoding threads hold at once beyond the result (a larger image decodes alone)
THREADS = min(32, (os.cpu_count() or 1) + 4)  # that decode an image folder (ThreadPoolExecutor's default)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_CHANNELS = 3  # grayscale, RGBA and palette images all become RGB
CACHE_VERSION = 3  # part of the cache key: bump it whenever load_image changes, so old decodings are never used



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
    return [folder / name for name in list_images(folder)]


def list_images(folder: Path | str) -> list[str]:
    """The image files under `folder` as paths relative to it ("/" between parts), in the order of their sorted
    Paths; hidden files and folders left out, symlinked folders not entered (as Path.rglob). os.scandir's entries:
    no Path object and, where the file system tells the kind of an entry, no stat per file (ImageNet's 1.28
    million files list in seconds)."""
    found = []

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, f"{prefix}{entry.name}/")
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.append(prefix + entry.name)
    walk(os.fspath(folder), "")
    found.sort(key=lambda name: name.split("/"))  # (as sorted Paths: part by part)
    return found


def is_image_folder(path: str) -> bool:
    """Whether `path` is laid out as --dataset imagefolder reads it: train/ with class sub-folders, and test/."""
    root = Path(path)
    try:
        return not cli.is_url(path) and (root / "test").is_dir() and len(_subfolders(root / "train")) >= 2
    except OSError:  # (no train/, or one that cannot be listed: not this, and said as what it is later)
        return False


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


def split_listing(root: Path, split: str, classes: list[str],
                  against: str = "train/'s") -> tuple[np.ndarray, torch.Tensor]:
    """The image files of DATA_DIR/<split>/, class by class, after checking its class folders are `classes`: their
    paths relative to DATA_DIR as one numpy array of bytes (the names as the file system has them, os.fsencode:
    a few dozen bytes per file, no Python object each) and their labels."""
    folder = _split_dir(root, split)
    found = _subfolders(folder)
    if found != classes:
        raise DataError(f"imagefolder: the class folders of {folder} differ from {against}: "
                        f"{cli.shorten(class_differences(classes, found, against))}")
    names = [np.array([os.fsencode(f"{split}/{name}/{f}") for f in list_images(folder / name)], dtype="S")
             for name in classes]  # (one class at a time: its Python strings are gone before the next is listed)
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(n) for n in names]))
    return np.concatenate(names), labels


def load_imagefolder_split(root: Path, split: str, classes: list[str], image_size: int,
                           max_pixels: int = MAX_IMAGE_PIXELS, against: str = "train/'s",
                           listing: tuple[np.ndarray, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, image_size, image_size) and labels of DATA_DIR/<split>/ (its split_listing when given,
    else listed here), from the cache while it is current. Unreadable files are skipped with a warning; a class
    left without images is an error."""
    folder = root / split
    names, labels = listing or split_listing(root, split, classes, against)
    files = [(root / os.fsdecode(name), label) for name, label in zip(names.tolist(), labels.tolist())]
    cache = _cache_path(root, split, image_size, [p for p, _ in files], max_pixels)
    data = _read_cache(cache, torch.tensor([label for _, label in files], dtype=torch.int64), image_size)
    if data is None:
        data = _decode(files, image_size, max_pixels, f"imagefolder: decoding {len(files)} images of {folder} to "
                                                      f"{image_size}x{image_size}, cached for the next run")
        _write_cache(cache, data)
    for message in data["skipped"]:
        print0(f"warning: {cli.printable(message)}; skipped", file=sys.stderr)
    require_each_class(data["labels"], folder, classes)
    return data["images"], data["labels"]


def require_each_class(labels: torch.Tensor, folder: Path, classes: list[str]) -> None:
    """A DataError naming the first class folder of `folder` that `labels` has no image of."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    if 0 in counts:
        raise DataError(f"imagefolder: class folder {folder / classes[counts.index(0)]} holds no readable images "
                        f"({', '.join(IMAGE_SUFFIXES)})")


def class_differences(classes: list[str], found: list[str], against: str) -> str:
    """What differs between two lists of class names: "missing a, b; extra c". Names that differ only in their
    Unicode form (café as one character é, NFC, or as e and a combining accent, NFD: macOS and zip tools may
    change one into the other) are named as such, with the way to make them alike."""
    missing, extra = set(classes) - set(found), set(found) - set(classes)
    nfc = {unicodedata.normalize("NFC", name): name for name in extra}
    alike = [(name, nfc[unicodedata.normalize("NFC", name)]) for name in sorted(missing)
             if unicodedata.normalize("NFC", name) in nfc]
    missing -= {a for a, _ in alike}
    extra -= {b for _, b in alike}
    parts = [f"{what} {', '.join(sorted(names))}" for what, names in
             (("missing", missing), ("extra", extra)) if names]
    parts += [f"{b} here is Unicode {unicode_form(b)}, {against} {a} is {unicode_form(a)} (the same letters, "
              f"other bytes): rename one folder so that both are spelled alike" for a, b in alike]
    return "; ".join(parts)


def unicode_form(name: str) -> str:
    return next((form for form in ("NFC", "NFD") if unicodedata.normalize(form, name) == name), "mixed")


def _cache_path(root: Path, split: str, image_size: int, files: list[Path], max_pixels: int) -> Path:
    """DATA_DIR/.cache-<split>-<size>-<hash>: the hash covers every file's path, size and mtime and the decoding
    (max_pixels included: what it refused is in the cache), so adding, removing, renaming or editing an image, or a
    new decoder, makes a new key."""
    stats = [(p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for p, st in ((p, p.stat()) for p in files)]
    key = json.dumps([CACHE_VERSION, IMAGEFOLDER_CHANNELS, image_size, max_pixels, stats])
    return root / f".cache-{split}-{image_size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _frame_bytes(path: Path, image_size: int, max_pixels: int) -> int:
    """The bytes load_image holds at its peak to decode `path`, from its header (a JPEG: at the reduced scale it
    decodes at); 0 for a file it skips."""
    try:
        with open_regular(path, "image") as f, Image.open(f) as im:
            im.draft(None, (image_size, image_size))
            pixels = im.size[0] * im.size[1]
    except Exception:  # (load_image says why, when it gets there)
        return 0
    return pixels * DECODE_COPIES if pixels <= max_pixels else 0


def _decode(files: list[tuple[Path, int]], image_size: int, max_pixels: int, what: str) -> dict:
    """{"images", "labels", "skipped": the messages of the unreadable files}, decoded into one preallocated tensor.
    Only what is the file's own (an UnreadableImage) is skipped; any other failure (out of memory, an I/O error)
    may pass, so it stops the run before anything is cached."""
    # The threads' decoded frames (up to max_pixels * DECODE_COPIES bytes each) share a budget: DECODE_BUFFER, or
    # half of what the result leaves available, so that it never alone refuses a folder that fits; an image larger
    # than the budget decodes alone (and one that does not fit at all is an out-of-memory error, never cached).
    # At most `workers` images decode at once: their frames, from the files' headers, are all decoding can take
    result, available, workers = len(files) * IMAGEFOLDER_CHANNELS * image_size**2, available_memory(), THREADS
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.filterwarnings("ignore", module="PIL")  # (a header's: the decoding below names the file in them)
        frames = sorted(pool.map(lambda file: _frame_bytes(file[0], image_size, max_pixels), files), reverse=True)
    limit = min(DECODE_BUFFER, sum(frames[:workers]),
                DECODE_BUFFER if available is None else max(0, available - result) // 2)
    images = allocate_images(len(files), IMAGEFOLDER_CHANNELS, image_size, what, extra=limit)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    budget = ByteBudget(limit)

    def decode(i: int) -> str | None:
        try:
            images[i] = load_image(files[i][0], IMAGEFOLDER_CHANNELS, image_size, max_pixels, budget)
        except UnreadableImage as e:
            return str(e)
        return None

    with image_warnings_named(), ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while it decodes
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
    try:
        data = torch.load(path, weights_only=True)
        problem = oversized_tensor(data, path) or (
            None if _cache_fits(data, expected, image_size)
            else "its images, labels or skipped files do not match the folder")
    except Exception as e:  # truncated, foreign or mangled
        problem = f"unreadable ({type(e).__name__})"
    if problem is None:
        return data
    print0(f"warning: ignoring the image cache {path}: {cli.shorten(cli.printable(problem))}; decoding again",
           file=sys.stderr)
    return None


def _cache_fits(data: dict, expected: torch.Tensor, image_size: int) -> bool:
    """Whether a cache's fields are those of decoded files of the labels `expected` at image_size."""
    images, labels, skipped = data["images"], data["labels"], data["skipped"]
    shape_ok = (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                and images.shape[1:] == (IMAGEFOLDER_CHANNELS, image_size, image_size)
                and isinstance(skipped, list) and all(isinstance(m, str) and len(m) <= 8192 for m in skipped)
                and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.ndim == 1
                and len(images) == len(labels) == len(expected) - len(skipped))
    # The files are listed class by class, so the labels must run in order, each class no more often than it
    # has files: a negative or out-of-range label, or one class's images under another's, is refused.
    return shape_ok and (len(labels) == 0 or (
        0 <= labels.min() and labels.max() <= expected.max() and bool((labels.diff() >= 0).all())
        and bool((torch.bincount(labels, minlength=int(expected.max()) + 1) <= torch.bincount(expected)).all())))


def _write_cache(path: Path, data: dict) -> None:
    """Best effort: without a cache (a read-only data dir, a full disk) the next run only decodes again.
    Older caches of the same split and size are deleted, so edits to the folder do not pile them up."""
    tmp = None
    try:  # a fresh name, created exclusively (mkstemp: O_EXCL) and written through its descriptor: a file or symlink
        # planted at a predictable name is never written through. Renamed when complete: never a half-written cache
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = (cli.describe_os_error(e, filename=False) if isinstance(e, OSError) else  # (never our .tmp's name)
                  cli.shorten(str(e).strip().splitlines()[0].replace(str(tmp), str(path))) if str(e).strip()
                  else type(e).__name__)
        print0(f"warning: cannot write the cache {path}: {reason}", file=sys.stderr)
    finally:  # a failed write, or Ctrl-C in the middle of one (after the rename there is nothing left to remove)
        with suppress(OSError):  # (a cleanup that fails must not hide why the write failed)
            if tmp is not None:
                tmp.unlink(missing_ok=True)

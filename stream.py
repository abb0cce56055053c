"""Image folders streamed from disk, for sets that do not fit in memory and for the photo recipe (--resize-mode
crop), whose random crops need each photo whole.

DataLoader worker processes (--workers) open, decode and shape the files (decode.load_image: Pillow, JPEG draft
mode, the run's Prep); the main process then augments and normalizes whole batches exactly as it does for the
in-memory sets (batches.to_input). Each image's random draws come from (seed, epoch, image) alone, and the order from
data.epoch_plan, so the weights do not depend on the number of workers, and a resumed run reads the very batches
it would have read. Memory does not grow with the set: the file list is one numpy array of paths (no Python
object per file for the workers' copy-on-write pages to duplicate), and batches are read a few at a time.
"""
import gc
import hashlib
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import cli
from runtime import print0
import runtime
import tarshards
import workers
from augment import seeded
from batches import to_input
from decode import Prep, UnreadableImage, load_image
from folders import IMAGEFOLDER_CHANNELS
from formats import DataError, available_memory

KEPT_OPEN = 16  # shards a reading process keeps open (an epoch reads data.OPEN_SHARDS at a time)
SKIP_BYTES = 2**20  # over HTTP, a gap up to this is read through; a larger one starts a new request there
PREFETCH = 2  # batches each worker reads ahead (DataLoader's default: more only took memory, measured)
# --workers is the user's choice: DataLoader's advice against more workers than cores is not printed to them. Set
# here, for every DataLoader of a script, and again before each of ours (read): whoever restores the warning filters
# after this import (pytest does, after collection and after each test) would otherwise bring the advice back.
WORKER_ADVICE = {"action": "ignore", "message": "This DataLoader will create", "category": UserWarning}
warnings.filterwarnings(**WORKER_ADVICE)
STATS_IMAGES = 2048  # training images a streamed set's normalization is computed from, at most...
STATS_BYTES = 2**28  # ...and at most this many bytes of them


def default_workers() -> int:
    """Worker processes when --workers is not given: one per core, at most 8 (more rarely pay on one GPU)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class FolderFiles(Dataset):
    """What a worker reads: item (epoch, i) is file i decoded and shaped, with epoch 0 for evaluation's fixed shape
    and epoch >= 1 for that epoch's random training shape. A file that cannot be read comes back as (None, its
    message, fatal): fatal when the reason may pass (out of memory, an I/O error), which stops the run; else it is
    skipped. Nothing is raised in a worker: its traceback would reach the user."""

    def __init__(self, root: Path, files: np.ndarray, size: int, max_pixels: int, prep: Prep, seed: int):
        self.root, self.files, self.size, self.max_pixels, self.prep, self.seed = \
            root, files, size, max_pixels, prep, seed
        self.policy = None  # training's per-image augmentation (augment.image_policy), after the shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, str | None, bool]:
        epoch, i = key
        path = "?"
        try:
            path, data = self.locate(i % len(self))  # (i >= n: a repeat, data.balanced_order)
            if epoch == 0:
                return load_image(path, IMAGEFOLDER_CHANNELS, self.size, self.max_pixels, prep=self.prep,
                                  data=data), None, False
            with seeded(self.seed, epoch, i):
                x = load_image(path, IMAGEFOLDER_CHANNELS, self.size, self.max_pixels, prep=self.prep, train=True,
                               data=data)
                return (x if self.policy is None else self.policy(x)), None, False
        except UnreadableImage as e:
            return None, str(e), False
        except Exception as e:  # DataError (the system's), MemoryError, anything: one line in the main process
            return None, str(e) if isinstance(e, DataError) else f"cannot read image {path}: {cli.one_line(e)}", True

    def locate(self, i: int) -> tuple[str | Path, bytes | None]:
        """Image i's file, and its bytes where they are read here (None: load_image opens the file)."""
        # (os.fsdecode: a name that is not UTF-8, Latin-1 bytes, comes back as the very name the system gave)
        return self.root / os.fsdecode(self.files[i]), None

    def identify(self, h: "hashlib._Hash") -> None:
        """Feed the files' names to the set's fingerprint (b"\0".join of all names, a slice at a time: no object
        per file)."""
        for start in range(0, len(self.files), 2**16):
            h.update((b"\0" if start else b"") + b"\0".join(self.files[start:start + 2**16].tolist()))
    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, bool]]]:
        """A micro-batch: the readable images stacked (uint8), which of the asked-for ones they are, the problems."""
        keep = torch.tensor([x is not None for x, _, _ in items], dtype=torch.bool)
        images = [x for x, _, _ in items if x is not None]
        x = torch.stack(images) if images else torch.empty(0, IMAGEFOLDER_CHANNELS, self.size, self.size,
                                                            dtype=torch.uint8)
        return x, keep, [(message, fatal) for _, message, fatal in items if message]


class ShardFiles(FolderFiles):
    """FolderFiles for tar shards (shards.py): image i's bytes are read from its shard by this process's
    ShardReader, which goes through each shard front to back as the epoch's order does (data.mixed_order)."""

    def __init__(self, table: tarshards.Table, size: int, max_pixels: int, prep: Prep, seed: int):
        super().__init__(Path(), table.labels, size, max_pixels, prep, seed)
        self.table, self.reader = table, None  # (the reader: opened in the process that reads, never pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reader": None}

    def locate(self, i: int) -> tuple[str, bytes]:
        self.reader = self.reader or ShardReader(self.table)
        return self.table.describe(i), self.reader.read(i)

    def identify(self, h: "hashlib._Hash") -> None:
        h.update("\0".join(s.rsplit("/", 1)[-1] for s in self.table.shards).encode(errors="surrogateescape"))
        for a in (self.table.shard, self.table.offset, self.table.size):
            h.update(a.tobytes())


class ShardReader:
    """A process's open shards: read(i) is sample i's image bytes. A shard stays open while the epoch goes on
    reading it (up to KEPT_OPEN at once, the least recent closed first); a read further on in it reads on (over
    HTTP, a gap over SKIP_BYTES starts a new request there instead), one further back opens it again there."""

    def __init__(self, shards: tarshards.Table):
        self.table, self.open = shards, OrderedDict()  # shard -> [file or response, position]

    def read(self, i: int) -> bytes:
        shard, offset, size = int(self.table.shard[i]), int(self.table.offset[i]), int(self.table.size[i])
        location = self.table.shards[shard]
        state = self.open.pop(shard, None)
        if state is not None and cli.is_url(location) and not state[1] <= offset <= state[1] + SKIP_BYTES:
            state[0].close()
            state = None
        if state is None:
            try:
                state = [self.open_shard(shard, offset), offset]
            except tarshards.HTTPRefusal as e:
                if e.status != 416:  # (416: Range Not Satisfiable, the shard ends before the image)
                    raise
                raise UnreadableImage(self.cut_short(location)) from None
        elif cli.is_url(location):
            tarshards.skip(state[0], offset - state[1])
        else:
            state[0].seek(offset)
        self.open[shard] = state
        while len(self.open) > KEPT_OPEN:
            self.open.popitem(last=False)[1][0].close()
        data = state[0].read(size)
        if len(data) < size and cli.is_url(location):  # (a connection the server ended: once more, from there)
            state[0].close()
            try:
                state[0] = tarshards.open_location(location, "shard", offset + len(data))
                data += state[0].read(size - len(data))
            except tarshards.HTTPRefusal as e:
                if e.status != 416:  # (416: the shard does end there)
                    raise
                del self.open[shard]
        state[1] = offset + len(data)
        if len(data) < size:
            raise UnreadableImage(self.cut_short(location))
        return data

    def open_shard(self, shard: int, offset: int) -> BinaryIO:
        """Shard `shard` opened at `offset`; over HTTP, a shard larger than its index.json says (the server's
        Content-Range or Content-Length) stops the run in one line, as a local one does at the start."""
        location, indexed = self.table.shards[shard], self.table.lengths[shard]
        f = tarshards.open_location(location, "shard", offset)
        if cli.is_url(location) and indexed is not None:
            total = f.headers.get("Content-Range", "").rpartition("/")[2] if f.status == 206 else \
                f.headers.get("Content-Length", "")
            if total.isdigit() and int(total) > indexed:
                f.close()
                raise DataError(tarshards.changed(location, int(total), indexed))
        return f

    @staticmethod
    def cut_short(location: str) -> str:
        """What an image past a shard's end is: one message for all of them (one warning a shard, each counted)."""
        return f"cannot read the images past the end of {location} (a truncated shard)"


class Step(list):
    """A training step's micro-batches [(x, y), ...], and how many of its images could not be read (`skipped`)."""
    skipped: int = 0


class Keys:
    """What the DataLoader reads, one micro-batch at a time: the (epoch, image) keys of each of `batches`, made as
    the workers ask for them (a list of them all would grow with the set)."""

    def __init__(self, batches: Sequence[torch.Tensor], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in self.batches:
            yield [(self.epoch, i) for i in b.tolist()]


@dataclass
class StreamSet:
    """An image folder's split read from disk batch by batch: what train.py, find_lr.py and evaluate take in place
    of a data.ImageSet (the same methods: batches, steps, sample)."""
    files: FolderFiles
    labels: torch.Tensor  # int64 (N,), on the CPU
    mean: torch.Tensor    # float32 (C,), on the training device
    std: torch.Tensor
    device: torch.device
    workers: int
    warned: set = field(default_factory=set)  # the unreadable files already reported: one warning each per run

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return IMAGEFOLDER_CHANNELS

    @property
    def image_size(self) -> int:
        return self.files.size

    def read(self, batches: Sequence[torch.Tensor], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images on the device, which of the batch's images they are) for each of `batches` (image indices),
        in order, read by the workers. Unreadable files are left out with one warning each; a failure that may pass
        ends the run in one line, and so does a worker that stops answering (WORKER_TIMEOUT) or what the system
        refuses the workers (workers.py). The workers are ended when the iteration ends, however it ends."""
        if self.files.prep.mode == "crop":
            # imported here, once: the forked workers inherit it (else each worker imports it again, every epoch)
            import torchvision.transforms.v2.functional  # noqa: F401
        workers.quiet_broken_handovers()
        if self.workers:
            runtime.hand_back_freed_memory()
            workers.make_room_for_descriptors(self.workers, PREFETCH)
            workers.check_socket_folder()
        warnings.filterwarnings(**WORKER_ADVICE)  # (again: see there)
        loader = DataLoader(self.files, batch_sampler=Keys(batches, epoch), num_workers=self.workers,
                            collate_fn=self.files.collate,
                            pin_memory=self.device.type == "cuda", worker_init_fn=workers.init_worker,
                            prefetch_factor=PREFETCH if self.workers else None,
                            timeout=workers.POLL if self.workers else 0,
                            generator=torch.Generator())  # (its own: the workers' base seed is not drawn from
        # torch's global generator, whose draws (init, dropout) must not depend on the data path)
        with cli.signals_held():  # (a Ctrl-C as the workers are forked stops the run, not a worker: see there)
            # The workers' garbage collector would visit every object this process has made (writing to each),
            # so each worker copied all their pages: +34% for the process tree from the second epoch on. Frozen,
            # they are left out of collection in the workers (the main process unfreezes them at once).
            gc.freeze()
            try:
                reading = workers.Reading(loader)
            finally:
                gc.unfreeze()
        finished = False
        try:
            while (batch := reading.next(training=epoch > 0)) is not None:
                x, keep, problems = batch
                for message, fatal in problems:
                    if fatal:
                        raise DataError(message)
                    if message not in self.warned:
                        self.warned.add(message)
                        print(f"warning: {cli.printable(message)}; skipped", file=sys.stderr)
                yield x.to(self.device, non_blocking=True), keep
            finished = True
        finally:
            reading.end(at_once=not finished)

    def batches(self, idx: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation: normalized images and labels of the readable images of `idx`, `batch_size` at a time."""
        for x, y, _ in self.indexed_batches(idx, batch_size):
            yield x, y

    def indexed_batches(self, idx: torch.Tensor,
                        batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """batches(), with the indices of the images each batch holds (the readable ones of its part of `idx`)."""
        parts = idx.cpu().split(batch_size)
        for part, (x, keep) in zip(parts, self.read(parts, 0)):
            yield to_input(x, self.mean, self.std), self.labels[part[keep]].to(self.device), part[keep]

    def set_policy(self, policy: Callable[[torch.Tensor], torch.Tensor] | None, seed: int) -> None:
        """Training images go through `policy` (augment.image_policy) in the workers, after their shape, each with
        the draws of (seed, epoch, image) (the set's seed is the run's already)."""
        self.files.policy = policy

    def fingerprint(self) -> str:
        """A short hash of the set's file names and labels: what tells --resume it trains on the run's own data."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{len(self)},{self.image_size}".encode())
        h.update(self.labels.numpy().tobytes())
        self.files.identify(h)
        return h.hexdigest()

    @property
    def shard_counts(self) -> torch.Tensor | None:
        """Tar shards: each shard's number of images, in order (what data.mixed_order mixes); None for a folder."""
        return self.files.table.counts() if isinstance(self.files, ShardFiles) else None

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The readable ones of the images `idx`, uint8, in evaluation's shape."""
        return torch.cat([x for x, _ in self.read(idx.cpu().split(256), 0)] or
                         [torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)])

    def sample(self, n: int) -> torch.Tensor:
        """The first n images (all, if fewer): what the normalization is computed from, and TensorBoard's preview."""
        return self.take(torch.arange(min(n, len(self))))

    def steps(self, parts: list[Sequence[torch.Tensor]], epoch: int, augment: bool, pad: int,
              channels_last: bool, partnered: bool = False) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Training: the micro-batches (x, y) of each optimizer step; `parts`: each step's rows of the epoch plan
        (data.epoch_plan), one tensor per micro-batch. The crop recipe's random crop and flip were drawn in the
        worker; squash's pad-crop, flip and jitter are drawn from the plan rows, as for the in-memory sets.
        partnered: each part's first row is the mixing partner of its second (trainer.micro_parts); where it cannot be
        read, that image is its own partner (mixed with itself: left as it is), and it is not counted as skipped."""
        rows = [part.cpu() for step in parts for part in step]
        batches = self.read([r[:, 0] for r in rows], epoch)
        crop_flip = augment and self.files.prep.mode == "squash"
        try:
            for step in parts:
                micro = Step()
                for part in step:
                    x, keep = next(batches)
                    micro.skipped += len(keep) - int(keep.sum())
                    kept = part[keep.to(part.device)].to(self.device)
                    if partnered and len(keep) and not keep[0]:
                        micro.skipped -= 1  # (the partner: counted where it is trained on)
                        x, kept = torch.cat([x[:1], x]), torch.cat([kept[:1], kept])  # the first read stands in
                    if len(kept) > partnered:  # (a micro-batch of unreadable files only is left out)
                        x = to_input(x, self.mean, self.std, kept[:, 1:4] if crop_flip else None, pad,
                                     kept[:, 4:] if kept.shape[1] > 4 else None)
                        micro.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                                      self.labels[kept[:, 0].cpu() % len(self)].to(self.device)))
                yield micro
        finally:
            batches.close()  # the workers end with the steps, however they end


def stats_sample(n: int, size: int, seed: int) -> torch.Tensor:
    """Which of an image folder's `n` training images its normalization is computed from, in evaluation's shape:
    all of them up to STATS_IMAGES (and STATS_BYTES at `size`), else that many drawn from `seed`. Both paths take
    these very images (data.prepare, data.prepare_streamed), so a folder normalizes alike streamed and in memory."""
    k = max(1, min(STATS_IMAGES, STATS_BYTES // (IMAGEFOLDER_CHANNELS * size * size)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def stream_set(root: Path, names: np.ndarray, labels: torch.Tensor, size: int, max_pixels: int, prep: Prep,
               seed: int, device: torch.device, workers: int) -> StreamSet:
    """An image folder's files (folders.split_listing: paths relative to `root` as bytes, and labels) as a
    StreamSet, normalized with a mean of 0 and a std of 1 until they are set."""
    return StreamSet(FolderFiles(root, names, size, max_pixels, prep, seed), labels,
                     torch.zeros(IMAGEFOLDER_CHANNELS, device=device), torch.ones(IMAGEFOLDER_CHANNELS, device=device),
                     device, workers)


def shard_set(table: tarshards.Table, size: int, max_pixels: int, prep: Prep, seed: int, device: torch.device,
              workers: int) -> StreamSet:
    """A split of tar shards (tarshards.load) as a StreamSet, normalized with a mean of 0 and a std of 1 until set."""
    return StreamSet(ShardFiles(table, size, max_pixels, prep, seed), torch.from_numpy(table.labels),
                     torch.zeros(IMAGEFOLDER_CHANNELS, device=device), torch.ones(IMAGEFOLDER_CHANNELS, device=device),
                     device, workers)


def streams(root: Path, size: int, prep: Prep, workers: int | None, files: int) -> int | None:
    """How many worker processes stream the image folder `root` of `files` images, or None to hold it in memory
    (data.prepare): the photo recipe and --workers stream; so does a folder whose decoded images would take over
    half the memory available (the rest is the model's, the batches' and the system's). Says why in one line when
    it chooses."""
    if workers is not None:
        return workers
    if prep.mode == "crop":
        workers = default_workers()
        print0(f"imagefolder: the photo recipe crops each photo whole: streaming {root} from disk with {workers} "
               f"worker processes (--workers)", file=sys.stderr)
        return workers
    need, available = files * IMAGEFOLDER_CHANNELS * size * size, available_memory()
    if available is None or need <= available // 2:
        return None
    workers = default_workers()
    print0(f"imagefolder: {files:,} images at {size}x{size} would take {need / 2**30:,.1f} GiB in memory, "
           f"{available / 2**30:,.1f} GiB is available: streaming them from disk with {workers} worker processes "
           f"(--workers)", file=sys.stderr)
    return workers

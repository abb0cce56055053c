"""Tar shards in WebDataset's layout, as runs read them: where they are (a folder, a URL folder, a brace pattern, a
list file), their index (index.json, or their own headers), and their samples as one Table per split.

A sample is two members side by side: KEY.<ext>, the image file's own bytes, and KEY.cls, its class index as
decimal text; classes.txt beside the shards names the classes. index.json records each shard's size and where each
sample's image lies in it and its class, so that a run starts without reading the shards (1.28 million images:
about 40 MB) and can begin any shard at any sample. shards.py writes shards and indexes them; stream.ShardFiles
reads their images (ShardReader); data.prepare_shards makes the splits.
"""
import base64
import json
import os
import re
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

import cli
from runtime import print0
from decode import open_regular
from formats import DataError

SPLITS = ("train", "val", "test")
INDEX, CLASSES = "index.json", "classes.txt"
INDEX_FORMAT = "image-shards-index 1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp")  # the member that is a sample's image (webdataset's names)
MAX_INDEX_BYTES = 2**31   # index.json: 32 bytes a sample as base64, so 60 million samples
MAX_SHARDS = 10**6        # in a brace range
MAX_CLS_BYTES = 20        # a .cls member: a decimal class index
MAX_IMAGE_BYTES = 2**31   # an image member this large is none (decode.MAX_IMAGE_PIXELS would refuse it anyway)
HTTP_TIMEOUT = 60         # seconds a request may wait for the server
SOURCES = (f"give --data-dir a folder of train-*.tar and test-*.tar (python shards.py FOLDER DEST writes one), a URL "
           f"folder with {INDEX}, a brace pattern or a list file of shards")


class HTTPRefusal(DataError):
    """A shard or side file the server answered with an error status (`status`: 404 not found, 416 a Range past
    the end, ...)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Table:
    """A split's samples, shard after shard in the order of `shards`: each sample's shard (an index into
    `shards`: paths or URLs), where its image's bytes lie in that shard, and its class. Numpy arrays: a few bytes
    a sample, no Python object each (the DataLoader workers' copy-on-write pages stay shared)."""
    shards: list[str]
    lengths: list[int | None]  # each shard's size in bytes, as index.json has it (None: read from its headers)
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
        return Table(self.shards, self.lengths,
                     *(a[idx] for a in (self.shard, self.position, self.offset, self.size, self.labels)))

    def counts(self) -> torch.Tensor:
        """The number of samples of each run of one shard, in order: what data.mixed_order mixes."""
        starts = np.flatnonzero(np.r_[True, self.shard[1:] != self.shard[:-1]]) if len(self) else np.zeros(0, int)
        return torch.from_numpy(np.diff(np.r_[starts, len(self)]).astype(np.int64))

    def describe(self, i: int) -> str:
        """Sample i, as messages name it: its shard and its number in that shard."""
        return f"{self.shards[int(self.shard[i])]} sample {int(self.position[i])}"


def is_shard_folder(path: str) -> bool:
    """Whether `path` is a folder of shards (train-*.tar) and not an image folder (train/): what --dataset shards
    reads, given or not."""
    folder = Path(path)
    return not cli.is_url(path) and folder.is_dir() and not (folder / "train").is_dir() and \
        any(folder.glob("train-*.tar"))


# ---------------------------------------------------------------------------------------------------------------
# Where the shards are: a folder, a URL folder, a brace pattern, a list file

def shard_files(folder: Path) -> list[Path]:
    """The shards in `folder`, by their names: train-*.tar, val-*.tar, test-*.tar, sorted."""
    return sorted(p for split in SPLITS for p in folder.glob(f"{split}-*.tar"))


def expand_braces(pattern: str) -> list[str]:
    """A brace pattern's names, as the shell and webdataset expand them, left to right: {000000..000127} (a range,
    zero-padded as written, up or down) and {a,b} (alternatives, which may hold braces of their own)."""
    names = _expand(pattern, pattern)
    if any("}" in name for name in names):
        raise DataError(f"shards: {pattern} closes a brace it did not open")
    return names


def _expand(pattern: str, whole: str) -> list[str]:
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
        raise DataError(f"shards: {whole} opens a brace it does not close")
    inner, rest = pattern[start + 1:end], pattern[end + 1:]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if r:
        low, high = int(r.group(1)), int(r.group(2))
        if abs(high - low) >= MAX_SHARDS:
            raise DataError(f"shards: {{{inner}}} in {whole} names over {MAX_SHARDS:,} shards")
        step = 1 if high >= low else -1
        choices = [f"{v:0{len(r.group(1))}d}" for v in range(low, high + step, step)]
    elif len(cuts) > 1:
        choices = [pattern[i + 1:j] for i, j in zip(cuts, cuts[1:] + [end])]
    else:
        raise DataError(f"shards: cannot expand {{{inner}}} in {whole}: give a range {{000000..000127}} or "
                        f"alternatives {{a,b}}")
    return [pattern[:start] + name for c in choices for name in _expand(c + rest, whole)]


def check_url(spec: str) -> None:
    """A --data-dir URL no request can be made of (no host, an IPv6 address left open) is one line, at once."""
    try:
        host = urllib.parse.urlsplit(spec).hostname
    except ValueError as e:  # (http://[::1/)
        raise DataError(f"shards: {spec} is not a URL a request can send ({cli.one_line(e)})") from None
    if not host:
        raise DataError(f"shards: {spec} names no host: give a URL as http://host/folder/")


def locate(spec: str, needed: tuple[str, ...] = ("train", "test")) -> tuple[str, dict[str, list[str]],
                                                                            dict[str, dict | None]]:
    """The shards of --data-dir `spec`, split by their names (train-, val-, test-), the `needed` splits there; the
    folder or URL folder of the first shard of the first needed split (where classes.txt is looked for); and the
    index.json read to list them, if one was (read_index, None where there is none), by its folder: what table()
    would read again."""
    index, listed = None, False  # (listed: the folder's index.json was read to list the shards)
    if cli.is_url(spec):
        check_url(spec)
    if cli.is_url(spec) and spec.endswith("/"):
        index, listed = read_index(spec), True
        if index is None:
            raise DataError(f"shards: no {INDEX} at {spec}: a URL folder cannot be listed; give a brace pattern "
                            f"({spec}train-{{000000..000009}}.tar) or a list file, or put an {INDEX} there "
                            f"(python shards.py --index on the folder the shards came from)")
        found = [spec + name for name in index]
    elif cli.is_url(spec):
        found = expand_braces(spec)
        if "{" not in spec and not spec.endswith(".tar"):
            folder = folder_of(spec) if spec.endswith("/" + INDEX) else spec + "/"
            raise DataError(f"shards: {spec} is no shard: give a URL folder with a trailing / ({folder}), a brace "
                            f"pattern or a list file")
    elif Path(spec).is_dir():  # (index.json's shards, where it has one: a missing one is said)
        index, listed = read_index(spec), True
        found = ([os.path.join(spec, name) for name in index] if index is not None else
                 [str(p) for p in shard_files(Path(spec))])
    elif Path(spec).suffix == ".txt":
        found = listed_shards(spec)
    elif "{" in spec or spec.endswith(".tar") and os.path.exists(spec):
        found = expand_braces(spec)
    elif os.path.exists(spec):
        raise DataError(f"shards: {spec} is neither a folder, a .tar, a brace pattern nor a .txt list of shards; "
                        f"{SOURCES}")
    else:
        raise DataError(f"shards: {spec} not found; {SOURCES}")
    twice = next((s for s, n in Counter(map(same_shard, found)).items() if n > 1), None)
    if twice is not None:
        raise DataError(f"shards: {spec} names {twice} twice: each shard once (its images would count twice)")
    splits = {}
    for location in found:
        m = re.match(r"(train|val|test)[-_.]", location.rsplit("/", 1)[-1])
        if m is None:
            raise DataError(f"shards: cannot tell the split of {location}: shard names start with train-, val- or "
                            f"test-")
        splits.setdefault(m.group(1), []).append(location)
    if any(s not in splits for s in needed):
        raise DataError(f"shards: {spec} has no {' or '.join(s for s in needed if s not in splits)} shards; "
                        f"{SOURCES}")
    folder = folder_of(splits[needed[0]][0])
    return folder, splits, {folder_of(found[0]): index} if listed else {}


def listed_shards(path: str) -> list[str]:
    """The shards a list file names, one a line (blank lines and # comments left out), a relative path taken from
    the list file's folder."""
    with open_regular(path, "shard list") as f:
        lines = [line.strip() for line in f.read(2**24).decode(errors="replace").splitlines()]
    return [line if cli.is_url(line) else os.path.join(os.path.dirname(path), line)
            for line in lines if line and not line.startswith("#")]


def folder_of(location: str) -> str:
    """The folder or URL folder (with its /) a shard lies in: where its index.json is looked for."""
    return location.rsplit("/", 1)[0] + "/" if cli.is_url(location) else os.path.dirname(location) or "."


def same_shard(location: str) -> str:
    """`location` as one spelling of its shard: a local path resolved (./a, a, a symlinked folder), a URL with its
    path's repeated slashes as one."""
    if not cli.is_url(location):
        return os.path.realpath(location)
    scheme, _, rest = location.partition("://")
    return f"{scheme}://{re.sub('/+', '/', rest)}"


def quoted(url: str) -> str:
    """`url` as a request sends it: a space or a non-ASCII letter in its path or query percent-encoded (UTF-8),
    what is already percent-encoded left as it is."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(path=urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~"),
                          query=urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~?")).geturl()


def open_location(location: str, what: str, offset: int = 0) -> BinaryIO:
    """A shard or one of its side files, opened for reading from `offset` (over HTTP: one streaming request,
    a Range request past 0). A missing one is a DataError saying so."""
    if not cli.is_url(location):
        f = open_regular(location, what)
        f.seek(offset)
        return f
    try:
        request = urllib.request.Request(quoted(location), headers={"Range": f"bytes={offset}-"} if offset else {})
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise HTTPRefusal(f"cannot read {what} {location}: HTTP {e.code} {e.reason}", e.code) from None
    except ValueError as e:  # (http.client.InvalidURL, a host name IDNA cannot encode: what no request can send)
        raise DataError(f"cannot read {what} {location}: not a URL a request can send ({cli.one_line(e)})") from None
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
    location = folder + name if cli.is_url(folder) else os.path.join(folder, name)
    if not cli.is_url(folder) and not os.path.exists(location):
        return None
    try:
        with open_location(location, name) as f:
            data = f.read(limit + 1)
    except HTTPRefusal as e:
        if e.status == 404:
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
    left out). As webdataset reads them: a sample is the consecutive members of one key, KEY.ext, KEY up to the
    first dot of the file name."""
    samples, problems, end = [], [], 0  # [key, offset, size, label, extensions]; end: of the last member's data
    try:
        with tarfile.open(fileobj=f, mode="r:" if seekable else "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                if not samples or samples[-1][0] != f"{folder}/{key}":
                    samples.append([f"{folder}/{key}", -1, 0, -1, set()])
                sample, end = samples[-1], member.offset_data + member.size
                if extension in sample[4] or "." in extension and \
                        extension.rsplit(".", 1)[1].lower() in (*IMAGE_EXTENSIONS, "cls"):
                    sample[3] = -3  # (KEY.x.jpg, or two members KEY.jpg: a key with a dot, as webdataset reads it)
                sample[4].add(extension)
                if extension.lower() in IMAGE_EXTENSIONS and member.size < MAX_IMAGE_BYTES:
                    sample[1:3] = member.offset_data, member.size
                elif extension == "cls" and sample[3] != -3:
                    text = tar.extractfile(member).read(MAX_CLS_BYTES + 1).strip()
                    sample[3] = int(text) if text.isdigit() and len(text) <= MAX_CLS_BYTES - 2 else -2
                if not seekable:
                    tar.members.clear()  # (a stream keeps nothing to go back to)
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(f"{name} cannot be read past {plural(len(samples), 'sample')} ({cli.one_line(e)}); the rest "
                        f"is skipped")
    if seekable and samples:
        size = f.seek(0, os.SEEK_END)
        if size < end:
            problems.append(f"{name} is cut short inside its last member (a truncated shard): its last sample is "
                            f"left out")
            samples.pop()
        elif size < end + 1024:  # (tar ends with two zero blocks: without them, cut between members)
            problems.append(f"{name} ends without tar's end-of-archive blocks: it may be cut short (a truncated "
                            f"shard); its {plural(len(samples), 'sample')} up to there are read")
    kept = []
    for key, offset, size, label, _ in samples:
        if offset < 0 or label < 0:
            what = ("two members of one kind (a key with a dot in it? webdataset's keys end at the first dot of the "
                    "file name)" if label == -3 else "no image (.jpg, .png, ...)" if offset < 0 else
                    "no .cls" if label == -1 else "a .cls that is no class index")
            problems.append(f"{name}: sample {key.lstrip('/')} has {what}; skipped")
        else:
            kept.append((offset, size, label))
    a = np.array(kept, dtype=np.int64).reshape(-1, 3)
    return a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), problems


def plural(n: int, thing: str) -> str:
    return f"{n:,} {thing}{('es' if thing.endswith('s') else 's') * (n != 1)}"


def encode(a: np.ndarray) -> str:
    return base64.b64encode(a.astype("<i8").tobytes()).decode()


def decode_array(text: object, what: str, redo: str) -> np.ndarray:
    if not isinstance(text, str):
        raise DataError(f"shards: {what} in {INDEX} is not an array these scripts wrote; {redo}")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise DataError(f"shards: {what} in {INDEX} is not base64; {redo}") from None
    if len(data) % 8:
        raise DataError(f"shards: {what} in {INDEX} is not an array of 8-byte integers; {redo}")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


def redo_index(folder: str) -> str:
    """The way forward from an index.json that cannot be used."""
    if cli.is_url(folder):
        return (f"write it again (python shards.py --index on the folder the shards came from) and put it at "
                f"{folder}{INDEX}")
    return f"remove {os.path.join(folder, INDEX)} and write it again: python shards.py --index {folder}"


def read_index(folder: str) -> dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] | None:
    """index.json beside the shards: shard name -> (its size in bytes, offsets, sizes, labels), or None when there
    is none."""
    data = read_side_file(folder, INDEX, MAX_INDEX_BYTES)
    if data is None:
        return None
    redo = redo_index(folder)
    try:
        index = json.loads(data)
    except ValueError as e:
        raise DataError(f"shards: {INDEX} in {folder} is not JSON ({cli.one_line(e)}); {redo}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), dict):
        raise DataError(f"shards: {INDEX} in {folder} is not an index these scripts wrote ({INDEX_FORMAT}); {redo}")
    entries = {}
    for name, entry in index["shards"].items():
        entry = entry if isinstance(entry, dict) else {}
        arrays = tuple(decode_array(entry.get(k), f"{name}'s {k}", redo) for k in ("offsets", "sizes", "labels"))
        size = entry.get("bytes")
        if len({len(a) for a in arrays}) != 1 or any((a < 0).any() for a in arrays) or \
                (arrays[1] >= MAX_IMAGE_BYTES).any() or type(size) is not int or "/" in name or \
                len(arrays[0]) and size < int((arrays[0] + arrays[1]).max()):
            raise DataError(f"shards: {name}'s entry in {INDEX} is inconsistent; {redo}")
        entries[name] = (size, *arrays)
    return entries


def index_entry(path: Path) -> tuple[dict, int]:
    """A shard's entry of index.json, from its headers (what was wrong, warned), and its number of samples."""
    with open_regular(path, "shard") as f:
        offsets, sizes, labels, problems = scan(f, str(path), seekable=True)
        size = f.seek(0, os.SEEK_END)
    for problem in problems:
        print0(f"warning: {cli.printable(problem)}", file=sys.stderr)
    return {"bytes": size, "offsets": encode(offsets), "sizes": encode(sizes), "labels": encode(labels)}, len(labels)


def write_index(folder: Path, shards: list[Path]) -> int:
    """Index the shards (index_entry each) into folder/index.json, atomically; returns the number of samples."""
    entries, total = {}, 0
    for path in shards:
        entries[path.name], count = index_entry(path)
        total += count
    if total == 0:
        raise DataError(f"shards: no samples in the {plural(len(shards), 'shard')} of {folder}: a sample is an image "
                        f"KEY.jpg (.png, ...) beside its class KEY.cls, KEY up to the first dot of the file name")
    save_index(folder, entries)
    return total


def save_index(folder: Path, entries: dict[str, dict]) -> None:
    """folder/index.json of the shards' `entries` (name: index_entry), written atomically."""
    try:
        with cli.atomic_output(folder / INDEX) as tmp:
            tmp.write_text(json.dumps({"format": INDEX_FORMAT, "shards": entries}))
    except OSError as e:
        raise DataError(f"cannot write {folder / INDEX}: {cli.describe_os_error(e, filename=False)}") from None


def table(locations: list[str], indexes: dict[str, dict | None], warned: set) -> Table:
    """A split's Table: each shard from the index.json of its own folder where that holds it (read once a folder,
    kept in `indexes`), else from the shard's own headers (read now). A local shard that is missing, or larger than
    its index.json says (written again since), is one line."""
    parts, lengths = [], []
    for i, location in enumerate(locations):
        folder = folder_of(location)
        if folder not in indexes:
            indexes[folder] = read_index(folder)
        entry = (indexes[folder] or {}).get(location.rsplit("/", 1)[-1])
        if not cli.is_url(location) and not os.path.isfile(location):
            raise DataError(f"shards: shard not found: {location}" + (f" (listed in {INDEX})" if entry else ""))
        if entry is None:
            with open_location(location, "shard") as f:
                if not warned:
                    warned.add(True)
                    print0(f"shards: {location} is not in an {INDEX} beside it: reading the shards' headers to index "
                           f"them (an {INDEX} saves this: python shards.py --index FOLDER)", file=sys.stderr)
                *arrays, problems = scan(f, location, seekable=not cli.is_url(location))
            for problem in problems:
                print0(f"warning: {cli.printable(problem)}", file=sys.stderr)
            lengths.append(None)
        else:
            size, *arrays = entry
            lengths.append(size)
            actual = os.path.getsize(location) if not cli.is_url(location) else size
            if actual > size:
                raise DataError(changed(location, actual, size))
        offsets, sizes, labels = arrays
        parts.append((np.full(len(labels), i, dtype=np.int32), np.arange(len(labels), dtype=np.int32), offsets,
                      sizes.astype(np.int32), labels))
    return Table(locations, lengths, *(np.concatenate([p[k] for p in parts]) for k in range(5)))


def changed(location: str, actual: int, indexed: int) -> str:
    """A shard larger than its index.json says: written again since it was indexed (a smaller one was cut short:
    its images past the end are skipped as they are read)."""
    return (f"shards: {location} is {actual:,} bytes, and {INDEX} says {indexed:,}: it was written again since it was "
            f"indexed; {redo_index(folder_of(location))}")


def load(spec: str, test_only: bool = False) -> tuple[dict[str, Table], list[str]]:
    """The shards of --data-dir `spec`: a Table per split found (train and test, val if any; `test_only`, as
    evaluate.py reads: test alone, and the training shards need not be there) and the class names (classes.txt
    beside the first training shard, or test shard; without one, the indices "0", "1", ...)."""
    folder, splits, indexes = locate(spec, ("test",) if test_only else ("train", "test"))
    warned = set()
    tables = {split: table(splits[split], indexes, warned) for split in (("test",) if test_only else SPLITS)
              if split in splits}
    if "train" in tables and not len(tables["train"]):
        raise DataError(f"shards: the training shards of {spec} hold no images; write them again (python shards.py "
                        f"FOLDER DEST), or give the shards that hold them")
    top = max(int(t.labels.max()) + 1 if len(t) else 0 for t in tables.values())
    text = read_side_file(folder, CLASSES, 2**24)
    classes = [str(c) for c in range(top)] if text is None else text.decode(errors="surrogateescape").splitlines()
    first = {}  # (each name's first line: a name seen again is a repeat)
    bad = next((i for i, c in enumerate(classes) if not c.strip() or first.setdefault(c, i) != i), None)
    if bad is not None:
        raise DataError(f"shards: line {bad + 1} of {CLASSES} in {folder} "
                        f"{'is empty' if not classes[bad].strip() else 'names a class again'}: one class a line, "
                        f"each once, in the order of the .cls indices")
    if top > len(classes):
        raise DataError(f"shards: a .cls of {spec} is {top - 1}, but {CLASSES} names {plural(len(classes), 'class')}")
    if len(classes) < 2:
        raise DataError(f"shards: {spec} needs at least two classes, found {len(classes)}")
    absent = [] if test_only else \
        [c for c, n in zip(classes, np.bincount(tables["train"].labels, minlength=len(classes))) if n == 0]
    if absent:
        print0(f"warning: {plural(len(absent), 'class')} of the {len(classes)} "
               f"{'named in ' + CLASSES if text is not None else 'the .cls numbers go up to'} "
               f"{'have' if len(absent) > 1 else 'has'} no training images ({cli.shorten(', '.join(absent), 80)}): the "
               f"model gets outputs it never learns", file=sys.stderr)
    return tables, classes

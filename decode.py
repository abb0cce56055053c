"""One image file to the model's input: decoded safely (a pixel limit read from the header, JPEG's reduced-scale
decoding), EXIF orientation applied, transparency flattened onto white, then shaped by the run's Prep (squash, or
torchvision's photo recipe: a random resized crop in training, resize and centre crop in evaluation).

load_image is the one way in, for training (image folders in memory or streamed, tar shards), evaluation and
prediction alike, so a predicted image is seen exactly as a training one.
"""
import io
import os
import stat
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

import cli
import runtime
from formats import DataError

# The most pixels one image may decode to (after JPEG's draft scaling): 50 megapixels is a 200 MB RGBA frame.
# Pillow's own limit (89 megapixels warns, 179 errors) lets a 518 KB PNG of 13000x13000 take 0.7 GB per copy.
MAX_IMAGE_PIXELS = 50_000_000
DECODE_COPIES = 3 * 4  # bytes per decoded pixel at the peak of load_image: RGBA, and two converted copies

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
        if hasattr(os, "O_NONBLOCK"):  # (Windows has neither, nor FIFOs to wait on)
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class ByteBudget:
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
            if n >= 2**25:  # (smaller blocks are glibc's to keep: reused, not piled up)
                runtime.hand_back_freed_memory()
            with self.lock:
                self.used -= n
                self.lock.notify_all()



@dataclass(frozen=True)
class Prep:
    """How an image file becomes the model's square input, chosen per run and kept in its checkpoint.
    squash: the whole image resized to a square (its aspect ratio lost), the same in training and evaluation.
    crop: torchvision's photo recipe. Training: a random crop of `scale` of the area and `ratio` of aspect, resized
    to the side, then a coin-flip mirror; evaluation: the shorter side resized to `resize_size`, the centre cropped
    (what torchvision's weights.transforms() does)."""
    mode: str = "squash"
    resize_size: int = 0                                  # crop: the shorter side before the centre crop
    interpolation: str = "bilinear"                       # crop: bilinear, bicubic or nearest (squash: bilinear)
    scale: tuple[float, float] = (0.08, 1.0)              # crop, training: the crop's share of the area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)           # crop, training: the crop's width / height

    def describe(self, size: int) -> str:
        if self.mode == "squash":
            return f"squash to {size}x{size}"
        return (f"training: random resized crop to {size} (scale {self.scale[0]:g}-{self.scale[1]:g}, ratio "
                f"{self.ratio[0]:.3g}-{self.ratio[1]:.3g}) and flip; evaluation: resize {self.resize_size}, centre "
                f"crop {size}; {self.interpolation}")


    def to_dict(self) -> dict:
        """As a checkpoint keeps it: plain strings, numbers and lists."""
        return {"mode": self.mode, "resize_size": self.resize_size, "interpolation": self.interpolation,
                "scale": list(self.scale), "ratio": list(self.ratio)}

    def problem(self, image_size: int) -> str | None:
        """What is wrong with this recipe for images of side `image_size`, in the flags' words, or None: the one
        rule for the flags (config.check_args) and for a checkpoint's prep (from_dict). The bounds keep every
        value one the recipe acts on: a crop below 1/10,000 of the area or of a ratio beyond 1:100 (a denormal
        1e-310 among them) is never drawn, a centre crop larger than the resized image pads with black."""
        (s0, s1), (r0, r1) = self.scale, self.ratio
        if self.mode not in PREP_MODES or self.interpolation not in INTERPOLATIONS:
            return f"--resize-mode must be {' or '.join(PREP_MODES)}, --interpolation {', '.join(INTERPOLATIONS)}"
        if not SCALE_RANGE[0] <= s0 <= s1 <= SCALE_RANGE[1]:
            return f"--crop-scale must be LOW HIGH with {SCALE_RANGE[0]:g} <= LOW <= HIGH <= {SCALE_RANGE[1]:g}"
        if not RATIO_RANGE[0] <= r0 <= r1 <= RATIO_RANGE[1]:
            return f"--crop-ratio must be LOW HIGH with {RATIO_RANGE[0]:g} <= LOW <= HIGH <= {RATIO_RANGE[1]:g}"
        low = image_size if self.mode == "crop" else 0
        if not low <= self.resize_size <= MAX_RESIZE:
            return (f"the photo recipe resizes the shorter side to {self.resize_size} px (--image-size / "
                    f"--crop-fraction): it must be from the image size, {image_size}, to {MAX_RESIZE} (a larger "
                    f"--crop-fraction, or a smaller --image-size)")
        return None

    @classmethod
    def from_dict(cls, d: object, image_size: int | None = None) -> "Prep":
        """A checkpoint's prep for images of side `image_size` (None: any), checked (a ValueError saying what is
        wrong); None: an older checkpoint's squash."""
        if d is None:
            return SQUASH
        ok = (isinstance(d, dict) and isinstance(d.get("mode"), str) and isinstance(d.get("interpolation"), str)
              and isinstance(d.get("resize_size"), int) and not isinstance(d["resize_size"], bool)
              and all(isinstance(d.get(k), list) and len(d[k]) == 2 and all(isinstance(v, float) for v in d[k])
                      for k in ("scale", "ratio")))
        if not ok:
            raise ValueError("prep must be a photo recipe of these scripts")
        prep = cls(d["mode"], d["resize_size"], d["interpolation"], tuple(d["scale"]), tuple(d["ratio"]))
        problem = prep.problem(image_size or 8)
        if problem:
            raise ValueError(f"prep: {problem}")
        return prep


PREP_MODES = ("squash", "crop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
SCALE_RANGE, RATIO_RANGE = (1e-4, 1.0), (1e-2, 1e2)  # the crop's share of the area, its width / height
MAX_RESIZE = 4096  # the largest side the photo recipe resizes to
SQUASH = Prep()


def shape_image(im: Image.Image, size: int, prep: Prep) -> Image.Image:
    """The decoded image `im` shaped for evaluation as `prep` says (see Prep; training's crop: random_resized_crop)."""
    if prep.mode == "squash":
        # Pillow widens the bilinear kernel when shrinking: this averages (antialiases), not samples
        return im.resize((size, size), Image.Resampling.BILINEAR)
    import torchvision.transforms as T  # (here: torchvision takes half a second to import, and squash needs none)
    import torchvision.transforms.v2.functional as TF
    interpolation = T.InterpolationMode(prep.interpolation)
    return TF.center_crop(TF.resize(im, [prep.resize_size], interpolation, antialias=True), [size, size])


# EXIF orientation -> the transpose that shows the photo upright (what ImageOps.exif_transpose applies)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}


def resized_pixels(width: int, height: int, short: int) -> int:
    """The pixels of a width x height image once its shorter side is resized to `short` (evaluation's shape)."""
    return -(-max(width, height) * short // max(1, min(width, height))) * short


def jpeg_scale(im: Image.Image, side: int) -> int:
    """The reduction (1, 2, 4 or 8) a JPEG decodes at in draft mode for both sides to stay >= `side` (1 for other
    formats): Pillow's own rule in JpegImageFile.draft."""
    if not isinstance(im, JpegImagePlugin.JpegImageFile) or len(im.tile) != 1:
        return 1
    fits = min(im.size[0] // side, im.size[1] // side)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def upright_to_stored(box: tuple[int, int, int, int], transpose: Image.Transpose | None, width: int,
                      height: int) -> tuple[int, int, int, int]:
    """A box (left, top, right, bottom) of the upright photo, in the stored (width x height) image's coordinates."""
    x0, y0, x1, y1 = box
    corners = {None: ((x0, y0), (x1, y1)),
               Image.Transpose.FLIP_LEFT_RIGHT: ((width - x0, y0), (width - x1, y1)),
               Image.Transpose.ROTATE_180: ((width - x0, height - y0), (width - x1, height - y1)),
               Image.Transpose.FLIP_TOP_BOTTOM: ((x0, height - y0), (x1, height - y1)),
               Image.Transpose.TRANSPOSE: ((y0, x0), (y1, x1)),
               Image.Transpose.ROTATE_270: ((y0, height - x0), (y1, height - x1)),
               Image.Transpose.TRANSVERSE: ((width - y0, height - x0), (width - y1, height - x1)),
               Image.Transpose.ROTATE_90: ((width - y0, x0), (width - y1, x1))}[transpose]
    (a, b), (c, d) = corners
    return min(a, c), min(b, d), max(a, c), max(b, d)


def random_resized_crop(im: Image.Image, mode: str, size: int, prep: Prep, max_pixels: int) -> Image.Image:
    """Training's shape in the photo recipe, from the opened, not yet decoded file `im`: torchvision's
    RandomResizedCrop and RandomHorizontalFlip with the same draws from torch's global generator (the caller seeds
    it per image: augment.seeded), on the upright photo. The crop's box is drawn from the header's size first; a JPEG
    is then decoded at the largest reduction (1/2, 1/4, 1/8) that leaves the box at least twice `size` pixels
    on each side (and the whole decode within max_pixels), so a small crop of a 12-megapixel photo is cut from
    sharp pixels and a large one decodes several times faster. The box is resized from the stored image and the
    EXIF rotation applied to the small result."""
    import torchvision.transforms as T
    width, height = im.size
    transpose = ORIENTATIONS.get(im.getexif().get(0x0112))  # (EXIF orientation)
    turned = transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                           Image.Transpose.ROTATE_90)
    upright = (height, width) if turned else (width, height)
    # (the draws see only the size: an expanded 1-pixel tensor stands for the photo, allocating nothing)
    top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, upright[1], upright[0]),
                                                     list(prep.scale), list(prep.ratio))
    # (twice the side: the final antialiased resize then does the shrinking, as torchvision's does; at once the side,
    # the reduced decode alone blurred the smallest crops, 0.86x torchvision's sharpness on a detailed photo)
    scale = next((s for s in (8, 4, 2) if min(h, w) >= 2 * size * s), 1)
    while scale < 8 and -(-width // scale) * -(-height // scale) > max_pixels:
        scale *= 2
    drafted = im.draft(None, (width // scale, height // scale)) if scale > 1 else None
    scale = width / drafted[1][2] if drafted else 1  # (Pillow's own: 1 for other formats)
    box = upright_to_stored((left, top, left + w, top + h), transpose, width, height)
    im, resample = _to_mode(im, mode), RESAMPLING[prep.interpolation]
    # Full scale: cut, turn upright, resize (torchvision's very pixels); reduced: the box resized in the reduced
    # image's sub-pixel coordinates (its edges blend in their outer neighbours, as a larger decode's would)
    if scale == 1:
        im = im.crop(box)
        im = (im if transpose is None else im.transpose(transpose)).resize((size, size), resample)
    else:
        im = im.resize((size, size), resample, box=[v / scale for v in box])
        im = im if transpose is None else im.transpose(transpose)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else im


def load_image(path: str | Path, channels: int, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS,
               budget: ByteBudget | None = None, prep: Prep = SQUASH, train: bool = False,
               data: bytes | None = None) -> torch.Tensor:
    """Decode an image file to uint8 (channels, image_size, image_size), channels 1 = grayscale or 3 = RGB.
    Training and prediction both decode through here, so a predicted image is seen exactly as a training one:
    EXIF orientation applied, transparency flattened onto white, then shaped by `prep` (shape_image; `train`: its
    random training shape). The header's size is checked against max_pixels before anything is decoded (an
    UnreadableImage if over); the decoding reserves its bytes from `budget` (the image folder's threads share one).
    data: the file's bytes, already read (a tar shard's member); `path` then only names it in messages."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"cannot decode images to {channels} channels: only 1 (grayscale) or 3 (RGB)")
    draft = image_size if prep.mode == "squash" else max(image_size, prep.resize_size)
    with open_regular(path, "image") if data is None else io.BytesIO(data) as f, _decoding_file(path):
        try:
            with Image.open(f) as im:
                scale = jpeg_scale(im, draft)  # JPEG: decoded at 1/2..1/8 scale where that still covers `draft`
                width, height = -(-im.size[0] // scale), -(-im.size[1] // scale)
                if width * height > max_pixels:
                    raise UnreadableImage(f"cannot read image {path}: {width}x{height} pixels is over the limit of "
                                          f"{max_pixels:,} per image; downscale it")
                resized = resized_pixels(width, height, prep.resize_size) if prep.mode == "crop" else 0
                if resized > max_pixels:  # (a 143-byte PNG of 20000x1 resized to 256 high: 5 gigapixels)
                    raise UnreadableImage(f"cannot read image {path}: {width}x{height} pixels resize to "
                                          f"{resized:,} (its shorter side to {prep.resize_size}), over the limit of "
                                          f"{max_pixels:,} per image; crop it to a less elongated shape")
                with budget.reserve(width * height * DECODE_COPIES) if budget else nullcontext():
                    if train and prep.mode == "crop":
                        im = random_resized_crop(im, mode, image_size, prep, max_pixels)
                    else:
                        im.draft(None, (draft, draft))
                        im = shape_image(_to_mode(ImageOps.exif_transpose(im), mode), image_size, prep)
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


_decoding = threading.local()  # .path: the file load_image decodes in this thread, named in Pillow's warnings
_naming = [False]  # whether image_warnings_named is in effect (entered in the main thread)


@contextmanager
def image_warnings_named() -> Iterator[None]:
    """Pillow's warnings while decoding (corrupt EXIF data, ...) as one line of ours naming the file, once per file
    and message, instead of Pillow's raw text and source line, which name no file. Entered in the main thread,
    around the decoding threads: the warnings' settings are the process's, not a thread's."""
    shown, original = set(), warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        path = getattr(_decoding, "path", None)
        if path is None:  # (not ours to reword)
            return original(message, category, filename, lineno, file, line)
        if (str(path), str(message)) not in shown:
            shown.add((str(path), str(message)))
            runtime.print0(f"warning: {cli.printable(str(path))}: {cli.one_line(message)} (Pillow; the image is "
                           f"decoded all the same)", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", module="PIL")  # each file's own: not once for all files
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # (load_image checks the size)
        warnings.showwarning, _naming[0] = show, True
        try:
            yield
        finally:
            _naming[0] = False


@contextmanager
def _decoding_file(path: str | Path) -> Iterator[None]:
    """Name `path` in the warnings of its decoding (image_warnings_named, entered here on the main thread)."""
    _decoding.path = path
    try:
        with image_warnings_named() if threading.current_thread() is threading.main_thread() and not _naming[0] \
                else nullcontext():
            yield
    finally:
        _decoding.path = None


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale (Pillow < 10.3 opens such PNGs as "I"):
        # keep the high byte, where convert() would clip at 255
        im = Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    if im.has_transparency_data:  # transparent pixels hold arbitrary colors: show them on white, as viewers do
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert(mode)

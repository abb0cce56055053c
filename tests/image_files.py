"""A small image folder for the imagefolder, predict and export tests, built with PIL."""
from pathlib import Path

from PIL import Image

COLORS = {"blue": (0, 0, 255), "red": (255, 0, 0)}  # the classes, sorted as the loader sorts them


def write_class_images(folder: Path, color: tuple[int, int, int]) -> None:
    """One image per format and mode the loader converts, each of odd size and one solid color, so every
    decoded pixel is known (see expected_pixels)."""
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 17), color).save(folder / "a.jpg", quality=95)
    Image.new("L", (31, 31), 100).save(folder / "b.bmp")
    Image.new("RGBA", (13, 50), (*color, 0)).save(folder / "c_clear.png")
    Image.new("RGBA", (21, 9), (*color, 255)).save(folder / "d_opaque.png")
    Image.new("RGB", (33, 20), color).convert("P").save(folder / "e_palette.png")
    Image.new("RGB", (64, 48), color).save(folder / "f.webp", lossless=True)


def expected_pixels(color: tuple[int, int, int]) -> list[tuple[int, int, int] | None]:
    """The decoded (R, G, B) of each file of write_class_images, in the loader's (sorted) order: gray stays gray,
    transparent turns white. None for the JPEG, which is lossy: close to `color`, checked apart."""
    return [None, (100, 100, 100), (255, 255, 255), color, color, color]


def make_image_folder(root: Path) -> Path:
    """root/train/ and root/test/ with classes blue and red, 6 images each, plus one corrupt file in train/red/."""
    for split in ("train", "test"):
        for name, color in COLORS.items():
            write_class_images(root / split / name, color)
    (root / "train" / "red" / "z_broken.jpg").write_bytes(b"not an image at all")
    return root

"""Shared by the tests: the repository root on sys.path, and a small image folder built with PIL."""
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLORS = {"blue": (0, 0, 255), "red": (255, 0, 0)}  # the classes, sorted as the loader sorts them


def write_class_images(folder: Path, color: tuple[int, int, int]) -> None:
    """One image per format and mode the loader converts, each of odd size and one solid color, so every
    decoded pixel is known: white where transparent, gray 100 for the grayscale one."""
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 17), color).save(folder / "a.jpg", quality=95)
    Image.new("L", (31, 31), 100).save(folder / "b.bmp")
    Image.new("RGBA", (13, 50), (*color, 0)).save(folder / "c_clear.png")
    Image.new("RGBA", (21, 9), (*color, 255)).save(folder / "d_opaque.png")
    Image.new("RGB", (33, 20), color).convert("P").save(folder / "e_palette.png")
    Image.new("RGB", (64, 48), color).save(folder / "f.webp", lossless=True)


# The decoded (R, G, B) of each file write_class_images makes, in the loader's (sorted) order; the JPEG's is
# lossy and close to `color`, checked apart.
def expected_pixels(color: tuple[int, int, int]) -> list[tuple[int, int, int] | None]:
    return [None, (100, 100, 100), (255, 255, 255), color, color, color]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/ and test/ with classes blue and red, 6 images each, plus one corrupt file in train/red/."""
    root = tmp_path / "images"
    for split in ("train", "test"):
        for name, color in COLORS.items():
            write_class_images(root / split / name, color)
    (root / "train" / "red" / "z_broken.jpg").write_bytes(b"not an image at all")
    return root

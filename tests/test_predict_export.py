"""predict.py on an image folder, the ONNX export round trip, and the onnxruntime example of docs/flags.md against
predict.py on photos."""
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import decode
import export
import predict
import train
from conftest import ROOT
from image_files import make_image_folder
from checkpoint import model_from_checkpoint
from model import MODELS, build_model

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def write_checkpoint(path: Path, classes: list[str], in_channels: int = 3, image_size: int = 32,
                     model_name: str = "simplecnn") -> Path:
    """A checkpoint as train.py writes it, with seeded random weights."""
    torch.manual_seed(0)
    model = build_model(model_name, len(classes), in_channels, image_size)
    torch.save({"model": model.state_dict(), "model_name": model_name, "num_classes": len(classes),
                "in_channels": in_channels, "image_size": image_size, "classes": classes,
                "mean": MEAN[:in_channels], "std": STD[:in_channels], "args": {"dataset": "imagefolder"}}, path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "best.pth", ["cat", "dog", "fox"])


def image_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "test").rglob("*.*"))


def test_predict_json_is_the_model_on_training_style_batches(image_folder, checkpoint, capsys):
    paths = image_paths(image_folder)
    predict.main(["--checkpoint", str(checkpoint), "--top-k", "3", "--json", *paths])
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == paths
    # the reference: the same files through decode.load_image and data.ImageSet.batch, as in training
    images = torch.stack([decode.load_image(p, 3, 32) for p in paths])
    batch = data.ImageSet(images, torch.zeros(len(paths), dtype=torch.int64), torch.tensor(MEAN), torch.tensor(STD))
    with torch.no_grad():
        model = model_from_checkpoint(torch.load(checkpoint, weights_only=True))
        expected = model(batch.batch(torch.arange(len(paths)))[0]).softmax(1).tolist()
    for r, probs in zip(results, expected):
        best_first = sorted(range(3), key=lambda i: -probs[i])
        assert [t["label"] for t in r["top_k"]] == [["cat", "dog", "fox"][i] for i in best_first]
        assert [t["probability"] for t in r["top_k"]] == pytest.approx([probs[i] for i in best_first], abs=1e-6)
        assert (r["label"], r["probability"]) == (r["top_k"][0]["label"], r["top_k"][0]["probability"])


def test_predict_prints_one_line_per_image(image_folder, checkpoint, capsys):
    paths = image_paths(image_folder)[:2]
    results = predict.main(["--checkpoint", str(checkpoint), "--top-k", "2", *paths])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{r['path']}: {r['top_k'][0]['label']} {100 * r['top_k'][0]['probability']:.2f}%, "
                     f"{r['top_k'][1]['label']} {100 * r['top_k'][1]['probability']:.2f}%" for r in results]
    assert all(len(r["top_k"]) == 2 for r in results)


def test_predict_with_a_grayscale_checkpoint(image_folder, tmp_path, capsys):
    mnist_like = write_checkpoint(tmp_path / "gray.pth", [str(i) for i in range(10)], in_channels=1, image_size=28)
    [result] = predict.main(["--checkpoint", str(mnist_like), "--json", image_paths(image_folder)[0]])
    assert result["label"] in [str(i) for i in range(10)] and 0 < result["probability"] <= 1
    assert json.loads(capsys.readouterr().out) == [result]


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "0"], "predict.py: error: --top-k must be at least 1"),
    (["--top-k", "two"], "predict.py: error: argument --top-k: invalid int value: 'two'"),
])
def test_predict_argument_errors(image_folder, checkpoint, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(checkpoint), *extra, image_paths(image_folder)[0]])
    assert exit_info.value.code == message


def test_predict_file_errors(image_folder, checkpoint, tmp_path, capsys):
    broken = image_folder / "train" / "red" / "z_broken.jpg"
    with pytest.raises(SystemExit) as exc:  # the readable one labelled, the other named: exit 2
        predict.main(["--checkpoint", str(checkpoint), image_paths(image_folder)[0], str(broken)])
    out, err = capsys.readouterr()
    assert exc.value.code == predict.UNREADABLE and out.startswith(f"{image_paths(image_folder)[0]}: ")
    assert re.fullmatch(rf"predict.py: error: cannot read image {broken}: cannot identify [^\n]*\n", err), err
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "nowhere.png")])
    assert exc.value.code == predict.UNREADABLE
    assert re.fullmatch(r"predict.py: error: cannot read image .*nowhere.png: .*No such file[^\n]*\n",
                        capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"^predict.py: error: checkpoint not found: .*none.pth$"):
        predict.main(["--checkpoint", str(tmp_path / "none.pth"), image_paths(image_folder)[0]])


def test_predict_takes_a_run_folder_as_evaluate_does_its_best_pth(image_folder, checkpoint, tmp_path, capsys):
    paths = image_paths(image_folder)[:2]
    from_file = predict.main(["--checkpoint", str(checkpoint), "--json", *paths])
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(checkpoint.parent), "--json", *paths]) == from_file
    assert capsys.readouterr().err == f"{checkpoint.parent} is a folder: labelling with its best.pth\n"
    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(image_folder), *paths])
    assert exc.value.code == (f"predict.py: error: {image_folder} is a folder without a best.pth; give --checkpoint "
                              f"a .pth file (a run folder holds best.pth once its first epoch has ended)")


def test_export_round_trip(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    ort = pytest.importorskip("onnxruntime", reason="export.py checks the export with the optional onnxruntime")
    output = tmp_path / "out" / "model.onnx"
    difference = export.main(["--checkpoint", str(checkpoint), "--output", str(output)])
    assert difference < 1e-4
    assert capsys.readouterr().out == (f"wrote {output}; largest difference from PyTorch on random inputs "
                                       f"(batch sizes 1, 5): {difference:.3g} (limit 0.0001)\n")
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx"]  # no temporary file left

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    [images] = session.get_inputs()
    assert (images.name, images.shape) == ("images", ["batch", 3, 32, 32])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == ["cat", "dog", "fox"] and json.loads(metadata["mean"]) == MEAN
    assert (json.loads(metadata["std"]), metadata["image_size"], metadata["model_name"]) == (STD, "32", "simplecnn")
    assert json.loads(metadata["prep"]) == {"mode": "squash", "resize_size": 0, "interpolation": "bilinear",
                                             "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}  # (a squash run's)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model_from_checkpoint(torch.load(checkpoint, weights_only=True))(x)
    assert (torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_model_exports_within_tolerance(tmp_path, model_name):
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="export.py checks the export with the optional onnxruntime")
    checkpoint = write_checkpoint(tmp_path / f"{model_name}.pth", ["a", "b"], model_name=model_name)
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")]) < 1e-4


def test_export_defaults_to_the_checkpoint_path(checkpoint):
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="export.py checks the export with the optional onnxruntime")
    export.main(["--checkpoint", str(checkpoint)])
    assert checkpoint.with_suffix(".onnx").stat().st_size > 0


def test_export_takes_a_run_folder_as_evaluate_and_predict_do(checkpoint, image_folder, capsys):
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="export.py checks the export with the optional onnxruntime")
    export.main(["--checkpoint", str(checkpoint.parent)])  # best.pth's folder: best.onnx beside it
    assert capsys.readouterr().err == f"{checkpoint.parent} is a folder: exporting its best.pth\n"
    assert checkpoint.with_suffix(".onnx").stat().st_size > 0
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", str(image_folder)])
    assert exc.value.code == (f"export.py: error: {image_folder} is a folder without a best.pth; give --checkpoint "
                              f"a .pth file (a run folder holds best.pth once its first epoch has ended)")


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_export_without_an_optional_package(checkpoint, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` sees when the package is not installed
    other = "onnx" if missing == "onnxruntime" else "onnxruntime"  # present (a stand-in when not installed)
    monkeypatch.setitem(sys.modules, other, sys.modules.get(other) or types.ModuleType(other))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == (f"export.py: error: export.py needs {missing}, an optional dependency: "
                                    f"pip install onnx onnxruntime")
    assert not (tmp_path / "m.onnx").exists()


def test_export_bad_checkpoint(tmp_path):
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="export.py checks the export with the optional onnxruntime")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"^export.py: error: cannot read checkpoint .*junk.pth: "):
        export.main(["--checkpoint", str(tmp_path / "junk.pth"), "--output", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()


# The onnxruntime example of docs/flags.md (its export.py section), run as a user runs it, against predict.py on photos

COLORS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 40, 40)}
# EXIF orientation -> how a camera held that way stores the upright picture (exif_transpose undoes it)
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def readme_onnx_example() -> str:
    """The fenced python block of docs/flags.md's export.py section: the code users copy is the code tested."""
    section = (ROOT / "docs" / "flags.md").read_text().split("\n## export.py\n")[1].split("\n## ")[0]
    [code] = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)
    return code


def run_example(code: str, model: Path, paths: list[str], monkeypatch) -> np.ndarray:
    """The example's probabilities (len(paths), classes), run as `python label.py MODEL IMAGE...`."""
    monkeypatch.setattr(sys, "argv", ["label.py", str(model), *paths])
    namespace = {"__name__": "__main__"}
    exec(compile(code, "docs/flags.md (export.py's onnxruntime example)", "exec"), namespace)
    return namespace["probs"]


def upright_photo(rng: np.random.Generator, color: tuple[int, int, int], width: int, height: int) -> Image.Image:
    """Noisy, the class's colour above and its complement below, shaded left to right: which way up it is and what
    a crop leaves out both change what a model sees."""
    pixels = np.empty((height, width, 3))
    pixels[:height // 2], pixels[height // 2:] = color, 255 - np.array(color)
    pixels += np.linspace(-40, 40, width)[None, :, None] + rng.integers(-30, 30, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_training_photos(root: Path, rng: np.random.Generator) -> Path:
    for split, n in {"train": 4, "test": 1}.items():
        for name, color in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                upright_photo(rng, color, *rng.integers(60, 120, 2)).save(root / split / name / f"{i}.png")
    return root


def write_photos_to_label(folder: Path, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Photos as they come, and which of them are stored turned: JPEGs with each EXIF orientation a camera writes
    (1 upright, 3 upside down, 6 and 8 sideways; large ones, which predict.py decodes at a reduced scale, and small
    ones), a grayscale JPEG, a PNG with an alpha channel and a palette PNG with a transparent colour."""
    folder.mkdir()
    paths, turned = [], []
    for name, (width, height) in zip(COLORS, [(400, 260), (260, 400), (90, 70)]):
        photo = upright_photo(rng, COLORS[name], width, height)
        for orientation in (1, 3, 6, 8):
            exif = Image.Exif()
            exif[0x0112] = orientation  # (Orientation)
            path = folder / f"{name}-{orientation}.jpg"
            stored = photo.transpose(STORED[orientation]) if orientation in STORED else photo
            stored.save(path, quality=90, exif=exif)
            paths.append(str(path))
            turned += [str(path)] if orientation in STORED else []
    upright_photo(rng, COLORS["green"], 300, 200).convert("L").save(folder / "gray.jpg", quality=90)
    rgba = np.array(upright_photo(rng, COLORS["red"], 150, 100).convert("RGBA"))
    rgba[:30, :, 3], rgba[30:60, :, 3] = 0, 128  # a transparent band and a half-transparent one
    Image.fromarray(rgba).save(folder / "alpha.png")
    palette = upright_photo(rng, COLORS["blue"], 100, 150).convert("P")
    palette.save(folder / "palette.png", transparency=0)
    return paths + [str(folder / name) for name in ("gray.jpg", "alpha.png", "palette.png")], turned


@pytest.mark.parametrize("recipe", [pytest.param("crop", marks=pytest.mark.slow),
                                    pytest.param("squash", marks=pytest.mark.slow), "grayscale"])
def test_the_readme_onnx_example_labels_photos_as_predict_does(tmp_path, monkeypatch, capsys, recipe):
    """docs/flags.md's example, run on the exported model, gives predict.py's probabilities within 1e-3 on every photo
    (EXIF-rotated JPEGs, transparent PNGs, grayscale): for a model trained with the photo recipe (crop), one trained
    with squash, and a grayscale (1-channel, MNIST-like) one. Without its EXIF line it is off by far more on the
    turned photos: the photos test what the example says."""
    pytest.importorskip("onnx", reason="export.py needs the optional package onnx")
    pytest.importorskip("onnxruntime", reason="the example runs the model with the optional onnxruntime")
    rng = np.random.default_rng(0)
    if recipe == "grayscale":
        checkpoint = write_checkpoint(tmp_path / "gray.pth", list(COLORS), in_channels=1, image_size=28)
    else:
        photos = write_training_photos(tmp_path / "photos", rng)
        train.main(["--dataset", "imagefolder", "--data-dir", str(photos), "--resize-mode", recipe,
                    "--image-size", "40", "--epochs", "3", "--batch-size", "4", "--lr", "3e-3", "--val-split", "0",
                    "--workers", "0", "--device", "cpu", "--log-interval", "0", "--out-dir", str(tmp_path / "run")])
        checkpoint = tmp_path / "run" / "best.pth"
        assert torch.load(checkpoint, weights_only=True)["prep"]["mode"] == recipe
    model = tmp_path / "model.onnx"
    export.main(["--checkpoint", str(checkpoint), "--output", str(model)])
    paths, turned = write_photos_to_label(tmp_path / "new", rng)
    capsys.readouterr()

    results = predict.main(["--checkpoint", str(checkpoint), "--top-k", "3", "--json", *paths])
    expected = np.array([[{t["label"]: t["probability"] for t in r["top_k"]}[name] for name in COLORS]
                         for r in results])
    capsys.readouterr()
    code = readme_onnx_example()
    probs = run_example(code, model, paths, monkeypatch)
    assert probs.shape == expected.shape
    assert np.abs(probs - expected).max() < 1e-3, np.abs(probs - expected).max(1)
    assert capsys.readouterr().out.splitlines() == [
        f"{r['path']}: {r['label']} {100 * p.max():.2f}%" for r, p in zip(results, probs)]

    if recipe != "grayscale":  # (random weights: near-even probabilities whichever way up)
        assert "ImageOps.exif_transpose(im)" in code
        unturned = run_example(code.replace("ImageOps.exif_transpose(im)", "im"), model, paths, monkeypatch)
        on_turned = [paths.index(p) for p in turned]
        assert np.abs(unturned - expected)[on_turned].max() > 1e-2

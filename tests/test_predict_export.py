"""predict.py on an image folder, and the ONNX export round trip."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import data
import folders
import export
import predict
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
    # the reference: the same files through folders.load_image and data.ImageSet.batch, as in training
    images = torch.stack([folders.load_image(p, 3, 32) for p in paths])
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


def test_predict_file_errors(image_folder, checkpoint, tmp_path):
    broken = image_folder / "train" / "red" / "z_broken.jpg"
    with pytest.raises(SystemExit, match=rf"^predict.py: error: cannot read image {broken}: cannot identify"):
        predict.main(["--checkpoint", str(checkpoint), image_paths(image_folder)[0], str(broken)])
    with pytest.raises(SystemExit, match=r"^predict.py: error: cannot read image .*nowhere.png: .*No such file"):
        predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "nowhere.png")])
    with pytest.raises(SystemExit, match=r"^predict.py: error: checkpoint not found: .*none.pth$"):
        predict.main(["--checkpoint", str(tmp_path / "none.pth"), image_paths(image_folder)[0]])


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

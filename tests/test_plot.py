"""plot.py: curves from metrics.csv and the confusion matrix, as PNG files; clear errors without matplotlib."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli
import plot

HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,lr,train_seconds,images_per_s\n"  # as train.py writes it
ROWS = "1,1.9,30.5,1.7,38.0,0.001,2.5,20000\n2,1.5,45.0,1.4,49.5,0.001,2.4,20800\n3,1.3,53.1,1.3,52.0,0.001,2.4,20900\n"


def assert_png(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", size)
        im.verify()  # checks every chunk's CRC


@pytest.fixture
def metrics_csv(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "metrics.csv"
    path.parent.mkdir()
    path.write_text(HEADER + ROWS)
    return path


def test_curves_next_to_the_csv(metrics_csv, capsys):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    assert plot.main([str(metrics_csv)]) == metrics_csv.with_name("curves.png")
    assert_png(metrics_csv.with_name("curves.png"), (1000, 400))  # 10 x 4 inches at 100 dpi
    assert capsys.readouterr().out == f"wrote {metrics_csv.with_name('curves.png')}\n"


def test_curves_without_validation_to_output(metrics_csv, tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    metrics_csv.write_text(HEADER + "1,1.9,30.5,nan,nan,0.001,2.5,20000\n")  # a --val-split 0 run of one epoch
    assert plot.read_metrics(metrics_csv)["train_acc"] == [30.5]
    plot.main([str(metrics_csv), "--output", str(tmp_path / "elsewhere.png")])
    assert_png(tmp_path / "elsewhere.png", (1000, 400))


def test_confusion_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    confusion = torch.tensor([[50, 3, 0], [10, 20, 5], [0, 0, 0]])  # a class without test images too
    plot.plot_confusion(confusion, ["airplane", "automobile", "bird"], tmp_path / "confusion.png")
    assert_png(tmp_path / "confusion.png", (550, 400))  # (4 + 1.5) x 4 inches at 100 dpi
    with pytest.raises(ValueError, match=r"confusion matrix of shape \(3, 3\) for 2 classes"):
        plot.plot_confusion(confusion, ["a", "b"], tmp_path / "other.png")


@pytest.mark.parametrize("content, message", [
    (None, r"cannot read .*metrics.csv: No such file or directory$"),
    ("", r".*metrics.csv is not a metrics.csv of train.py \(no epoch, train_loss, train_acc, val_loss, val_acc "
         r"column\)$"),
    ("epoch,loss\n1,2\n", r".*metrics.csv is not a metrics.csv of train.py \(no train_loss, train_acc, val_loss, "
                          r"val_acc column\)$"),
    (HEADER, r".*metrics.csv has no epochs yet$"),
    (HEADER + "1,2.0,x,1,1,1,1,1\n", r".*metrics.csv has a row with a missing or non-numeric value$"),
    (HEADER + "1,2.0\n", r".*metrics.csv has a row with a missing or non-numeric value$"),
    (b"\xff\xfe\x00binary", r".*metrics.csv is not a CSV file$"),
])
def test_bad_metrics_files(metrics_csv, content, message):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    if content is None:
        metrics_csv.unlink()
    elif isinstance(content, bytes):
        metrics_csv.write_bytes(content)
    else:
        metrics_csv.write_text(content)
    with pytest.raises(SystemExit, match=r"^plot.py: error: " + message):
        plot.main([str(metrics_csv)])
    assert not metrics_csv.with_name("curves.png").exists()


def test_unwritable_output(metrics_csv, tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    with pytest.raises(SystemExit, match=r"^plot.py: error: cannot write the picture .*no/such/dir/c.png: "
                                         r".*no/such/dir is not a folder$"):
        plot.main([str(metrics_csv), "--output", str(tmp_path / "no" / "such" / "dir" / "c.png")])


def test_without_matplotlib(metrics_csv, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` sees when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(metrics_csv)])
    assert exit_info.value.code == ("plot.py: error: drawing needs matplotlib, an optional dependency: "
                                    "pip install matplotlib")
    with pytest.raises(cli.UserError, match="^drawing needs matplotlib"):
        plot.plot_confusion(torch.eye(2, dtype=torch.int64), ["a", "b"], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists() and not metrics_csv.with_name("curves.png").exists()


def test_the_scripts_import_without_matplotlib():
    code = ("import sys, data, model, plot, predict, export, train, evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'onnx', 'onnxruntime')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


def test_evaluate_plot_draws_the_confusion_matrix_of_a_real_run(cifar_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="evaluate.py --plot draws with the optional matplotlib")
    import evaluate
    import train
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), "--epochs", "1", "--out-dir", str(out), "--device", "cpu"])
    png = tmp_path / "confusion.png"
    result = evaluate.main(["--checkpoint", str(out / "best.pth"), "--plot", str(png)])
    assert f"confusion matrix drawn to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.width > 300 and image.height > 300
    assert result["confusion"].sum().item() == 50


def test_prediction_labels_get_the_room_they_need_and_never_round_to_certainty(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    sizes = {}
    for name in ("cat", "a much longer class name"):
        plot.plot_predictions(images, [0, 1, 1], [1, 1, 0], [0.99996, 0.5, 0.0004], [name, "dog"], tmp_path / "p.png")
        with Image.open(tmp_path / "p.png") as im:
            sizes[name] = im.size
    assert sizes["cat"] == (420, 214)  # 3 cells of 1.75 in (1.6 in images) at 80 dpi; no title
    # "true: a much longer cla…": 24 characters of 9-point mono (0.0753 in) + 0.2 in, in each of 3 cells
    assert sizes["a much longer class name"] == (round(80 * 3 * (0.2 + 24 * 9 * 0.602 / 72)), 214)
    shown = [plot.percent(p) for p in (1.0, 0.99996, 0.9994, 0.5, 0.0006, 0.0004, 0.0)]
    assert shown == ["100.0%", ">99.9%", "99.9%", "50.0%", "0.1%", "<0.1%", "0.0%"]


@pytest.mark.parametrize("value", ["1.7e308", "inf", "-1e300"])
def test_values_too_large_to_draw_are_drawn_at_the_top(metrics_csv, value, capsys):
    pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    metrics_csv.write_text(HEADER + f"1,{value},30.5,1.7,38.0,0.001,2.5,20000\n" + ROWS.split("\n", 1)[1])
    plot.main([str(metrics_csv)])
    assert_png(metrics_csv.with_name("curves.png"), (1000, 400))
    assert capsys.readouterr().err == ""
    curves, top = plot.on_scale({"train": [float(value), 1.5], "val": [float("nan"), 1.0]})
    assert top == pytest.approx(1.65)  # 1.1 x the largest value on the scale
    assert curves["train"] == [pytest.approx(1.65 if float(value) > 0 else 1.0), 1.5] and curves["val"][1] == 1.0


def test_one_epoch_has_one_whole_tick_and_the_best_epoch_is_marked(metrics_csv, tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="plot.py draws with the optional matplotlib")
    from matplotlib.figure import Figure
    drawn = []
    original = Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as drawn, to read its axes back
        drawn.append(fig)
        return original(fig, *args, **kwargs)
    Figure.savefig = keep
    try:
        metrics = plot.read_metrics(metrics_csv)
        plot.plot_curves(metrics, tmp_path / "three.png")
        plot.plot_curves({k: v[:1] for k, v in metrics.items()}, tmp_path / "one.png")
        plot.plot_curves({**metrics, "val_loss": [float("nan")] * 3, "val_acc": [float("nan")] * 3},
                         tmp_path / "no-val.png")
    finally:
        Figure.savefig = original
    assert matplotlib  # (imported for the skip)
    for fig, ticks, best in zip(drawn, ([1, 2, 3], [1], [1, 2, 3]), ("best.pth (epoch 3)", "best.pth (epoch 1)", None)):
        for ax in fig.axes:
            shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert shown == ticks
            labels = [text.get_text() for text in ax.get_legend().get_texts()]
            assert labels == (["train", "val", best] if best else ["train"])

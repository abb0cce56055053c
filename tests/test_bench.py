"""bench.py's modes that train, run as a user runs them: from another folder, with a relative --data-dir."""
import re
import sys

import pytest

import bench
from conftest import write_cifar10


def run_bench(monkeypatch, capsys, *argv: str) -> str:
    """bench.py's main() in this process (it starts train.py and the seed pipeline's processes itself): its output."""
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    bench.main()
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return out


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder of the user's own, not the repository's, holding the data as ./mydata."""
    write_cifar10(tmp_path / "mydata", n_per_batch=16, n_test=20)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_bench_compares_the_pipelines_from_another_folder_with_a_relative_data_dir(user_folder, monkeypatch,
                                                                                     capsys):
    out = run_bench(monkeypatch, capsys, "--data-dir", "mydata", "--epochs", "1")
    seed = re.search(r"^seed guide +([\d,]+) +([\d.]+)%$", out, re.M)
    ours = re.search(r"^train.py +([\d,]+) +([\d.]+)%$", out, re.M)
    assert seed and ours, out
    speed_up = float(re.search(r"^speed-up: ([\d.]+)x$", out, re.M).group(1))
    assert speed_up == pytest.approx(float(ours[1].replace(",", "")) / float(seed[1].replace(",", "")), abs=0.01)
    assert sorted(p.name for p in user_folder.iterdir()) == ["mydata"]  # nothing left behind in the user's folder


@pytest.mark.slow
def test_bench_times_a_preset_and_measures_memory_with_train_py_flags(user_folder, monkeypatch, capsys):
    tiny = ["--", "--epochs", "1", "--widths", "8,8,8", "--tta", "none"]
    out = run_bench(monkeypatch, capsys, "--data-dir", "mydata", "--preset", "fast", *tiny)
    assert re.search(r"^fast: [\d.]+% test accuracy in \d+ s wall clock \(\d+ s of training, 1 epochs\)$", out, re.M)
    out = run_bench(monkeypatch, capsys, "--data-dir", "mydata", "--memory", "--", "--batch-size", "64")
    peaks = re.findall(r"^(seed guide|train.py) +([\d.]+) GiB$", out, re.M)
    assert [name for name, _ in peaks] == ["seed guide", "train.py"] and all(float(gib) > 0 for _, gib in peaks)

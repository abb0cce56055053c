"""bench.py's modes that train, run as a user runs them: from another folder, with a relative --data-dir."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, write_cifar10


def bench(cwd, *argv: str) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), *argv], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    return run.stdout


@pytest.mark.slow
def test_bench_compares_the_pipelines_from_another_folder_with_a_relative_data_dir(tmp_path):
    write_cifar10(tmp_path / "mydata")
    out = bench(tmp_path, "--data-dir", "mydata", "--epochs", "1")
    seed = re.search(r"^seed guide +([\d,]+) +([\d.]+)%$", out, re.M)
    ours = re.search(r"^train.py +([\d,]+) +([\d.]+)%$", out, re.M)
    assert seed and ours, out
    speed_up = float(re.search(r"^speed-up: ([\d.]+)x$", out, re.M).group(1))
    assert speed_up == pytest.approx(float(ours[1].replace(",", "")) / float(seed[1].replace(",", "")), abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]  # nothing left behind in the user's folder


@pytest.mark.slow
def test_bench_times_a_preset_and_measures_memory_with_train_py_flags(tmp_path):
    write_cifar10(tmp_path / "mydata")
    tiny = ["--", "--epochs", "1", "--widths", "8,8,8", "--tta", "none"]
    out = bench(tmp_path, "--data-dir", "mydata", "--preset", "fast", *tiny)
    assert re.search(r"^fast: [\d.]+% test accuracy in \d+ s wall clock \(\d+ s of training, 1 epochs\)$", out, re.M)
    out = bench(tmp_path, "--data-dir", "mydata", "--memory", "--", "--batch-size", "64")
    peaks = re.findall(r"^(seed guide|train.py) +([\d.]+) GiB$", out, re.M)
    assert [name for name, _ in peaks] == ["seed guide", "train.py"] and all(float(gib) > 0 for _, gib in peaks)

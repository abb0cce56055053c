"""Every `python SCRIPT.py ...` command that README.md and docs/ show, run as shown, in page order, in one fresh
folder (so that a command finds the runs that the commands before it made), with only --data-dir, --epochs and
--out-dir changed, on tiny data in the real formats: no traceback, and no non-zero exit the page does not promise.
A command that cannot run here is skipped with its reason, and the skips are listed."""
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import shards
from conftest import ROOT, write_cifar10, write_mnist
from image_files import make_image_folder

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "find_lr.py", "evaluate.py", "predict.py", "export.py", "plot.py", "bench.py", "shards.py")
# The non-zero exits the pages promise: a range test whose loss has no valley (docs/flags.md), and a loss that
# diverges (README: train.py), which a recipe for 250 photos may do in a few steps on a dozen tiny images
PROMISED = {"find_lr.py": ("find_lr.py: error: no suggestion: ",),
            "train.py": ("train.py: error: no suggestion: ", "train.py: error: the training loss became ",
                         "train.py: error: the validation loss became ")}


def shown_commands(text: str) -> list[str]:
    """The commands a page shows, in page order: each line of its code blocks (indented by 4 after a blank line,
    or fenced; a line continued with \\ joined) and each inline `python ...` span of its prose."""
    lines, fenced, in_block, previous = [], False, False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    ") and line.strip() and (in_block or not previous.strip()):
            in_block = not fenced
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            else:
                lines.append(line.strip())
        else:
            in_block = in_block and not line.strip()
            lines += re.findall(r"`(python [^`]+)`", line)
        previous = line
    return lines


def page_commands(page: Path) -> list[list[str]]:
    """The project's commands a page shows, in order, as argv lists (shell variables set in a code block expanded,
    comments cut)."""
    variables, commands = {}, []
    for line in shown_commands(page.read_text()):
        if not re.match(r"python |[A-Z]+=", line):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # (a synopsis such as "[train.py's flags]": its placeholders skip it)
            words = line.split()
        if len(words) == 1 and re.fullmatch(r"[A-Z]+=.*", words[0]):
            name, _, value = words[0].partition("=")
            variables[name] = value
            continue
        words = [w for word in words for w in (shlex.split(variables[word[1:]]) if word[1:] in variables
                                               and word.startswith("$") else [word])]
        commands.append(words)
    return [words[1:] for words in commands if len(words) > 1 and words[0] == "python" and words[1] in SCRIPTS]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def without(argv: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in names:
            skip = True
        else:
            out.append(word)
    return out


def pretrained_weights_cached(model: str) -> bool:
    from torchvision.models import get_model_weights
    url = get_model_weights(model).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def why_skipped(argv: list[str], made: set[str], skipped_outputs: set[str]) -> str | None:
    """Why this command cannot run here, or None."""
    shown = without(argv, "--data-dir")  # (DIR there is replaced by the tiny data)
    if any(re.search(r"\[|\.\.\.|\b[A-Z][A-Z_]{2,}\b", word) for word in shown):
        return "a synopsis with placeholders, not a command"
    if flag(argv, "--device") in ("cuda", "mps") and not torch.cuda.is_available():
        return "needs a GPU"
    if "--compile" in argv:
        return "torch.compile compiles for minutes on a CPU"
    if "--pretrained" in argv and not pretrained_weights_cached(flag(argv, "--model")):
        return "needs torchvision's pretrained weights: a download"
    if argv[0] == "bench.py" and {"--step-cost", "--loop-cost", "--flops"} & set(argv):
        return "a timing benchmark without data: minutes on a CPU (its parts: tests/test_recipe.py)"
    if argv[0] == "bench.py":  # (each starts train.py and the seed pipeline in processes of their own: ~10 s)
        return "bench.py's modes on data run in tests/test_bench.py, on tiny data, from another folder"
    for package in ("mlflow", "tensorboard"):
        if f"--{package}" in argv and importlib.util.find_spec(package) is None:
            return f"needs the optional {package}"
    if argv[0] == "export.py" and not all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime")):
        return "needs the optional onnx and onnxruntime"
    draws = argv[0] in ("plot.py", "find_lr.py") or {"--show", "--plot", "--find-lr"} & set(argv)
    if draws and importlib.util.find_spec("matplotlib") is None:
        return "draws a picture: needs the optional matplotlib"
    for word in argv:
        run = re.match(r"runs/[^/]+", word)
        if run and run[0] in skipped_outputs and run[0] not in made:
            return f"needs {run[0]}, which a skipped command makes"
    return None


def rewrite(argv: list[str], data: dict[str, Path], n: int) -> list[str]:
    """The command with only --data-dir, --epochs and --out-dir changed: the tiny data, as few epochs as the
    command allows (one more than a resumed run has done), and a fresh --out-dir where none is given."""
    script, args = argv[0], argv[1:]
    if script in ("train.py", "find_lr.py"):
        resume = flag(args, "--resume")
        if resume:
            epochs = torch.load(resume, weights_only=True)["state"]["epoch"] + 1
            return [script, *without(args, "--epochs"), "--epochs", str(epochs)]
        warmup = flag(args, "--warmup-epochs")
        epochs = int(float(warmup)) + 1 if warmup else 1
        out = [] if "--out-dir" in args or script == "find_lr.py" or "--find-lr" in args else ["--out-dir",
                                                                                            f"runs/command-{n}"]
        return [script, *without(args, "--data-dir", "--epochs"), "--data-dir",
                str(data[flag(args, "--dataset") or "cifar10"]), "--epochs", str(epochs), *out]
    if script == "bench.py":  # (after --: train.py's flags)
        ours, extra = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, ["--"])
        ours = [*without(ours, "--data-dir"), "--data-dir", str(data["cifar10"])]
        if "--preset" in ours:  # the preset's own --epochs: one
            extra += ["--epochs", "1"]
        elif "--memory" not in ours:
            ours = [*without(ours, "--epochs"), "--epochs", "1"]
        return [script, *ours, *(extra if len(extra) > 1 else [])]
    if script == "shards.py" and "--index" not in args:  # (FOLDER: the tiny image folder; DEST: new, here)
        return [script, str(data["imagefolder"]), *args[1:]]
    return [script, *[p for word in args for p in (sorted(map(str, Path().glob(word))) if "*" in word else [word])]]


def run(argv: list[str], monkeypatch) -> str | int | None:
    """The script's main() in this process, as `python SCRIPT.py ARGV` runs it; its exit code (None: 0). An
    exception other than SystemExit (a traceback) fails the test."""
    module = importlib.import_module(argv[0][:-3])
    monkeypatch.setattr(sys, "argv", argv)
    try:
        module.main() if argv[0] == "bench.py" else module.main(argv[1:])
    except SystemExit as e:
        return e.code
    return None


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "tiny"
    photos = make_image_folder(data / "photos")
    shards.write_shards(photos, data / "shards", 4)
    new = tmp_path / "work" / "new"
    new.mkdir(parents=True)
    for i, color in enumerate(((200, 10, 10), (10, 10, 200))):
        Image.new("RGB", (50, 40), color).save(new / f"IMG_{i}.jpg")
    return {"cifar10": write_cifar10(data / "cifar10", n_per_batch=10, n_test=20), "imagefolder": photos,
            "shards": data / "shards",
            "fashion-mnist": write_mnist(data / "fashion-mnist", compress=True),
            "mnist": write_mnist(data / "mnist", compress=False)}


@pytest.mark.slow
def test_every_command_the_pages_show_runs(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path / "work")
    seen, made, skipped_outputs, skips, ran = set(), set(), set(), [], []
    for page in PAGES:
        for argv in page_commands(page):
            key = tuple(without(argv, "--data-dir", "--epochs")) if argv[0] in ("bench.py", "train.py") else \
                tuple(argv)  # (the same command once the data and epochs are the tiny ones)
            if key in seen:
                continue
            seen.add(key)
            reason = why_skipped(argv, made, skipped_outputs)
            if reason:
                skips.append(f"{page.name}: python {shlex.join(argv)}: {reason}")
                skipped_outputs.update(re.findall(r"runs/[^/ ]+", flag(argv, "--out-dir") or ""))
                continue
            command = rewrite(argv, tiny_data, len(ran))
            code = run(command, monkeypatch)
            out = capsys.readouterr()
            assert code in (None, 0) or str(code).startswith(PROMISED.get(command[0], ())), \
                f"{page.name}: python {shlex.join(argv)}\nran as: python {shlex.join(command)}\n{code}\n{out.err}"
            made.update(re.findall(r"runs/[^/ ]+", flag(command, "--out-dir") or ""))
            ran.append(shlex.join(command))
    print("\n".join(["ran:", *ran, "skipped:", *skips]))
    full = all(importlib.util.find_spec(p) for p in ("matplotlib", "onnx", "onnxruntime"))  # (the optional ones)
    expected = set(SCRIPTS) - {"bench.py"} if full else {"train.py", "evaluate.py", "predict.py"}
    assert len(ran) >= (25 if full else 15) and expected <= {c.split()[0] for c in ran}

"""What the pages and --help say agrees with the scripts: --help's groups and texts, the flags' pages."""
import re

import pytest

import cli
import config
import train
from conftest import ROOT


def help_text(monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    return config.build_parser("train.py", train.__doc__).format_help()


def test_train_help_fits_80_columns_describes_every_flag_and_shows_what_a_preset_sets(monkeypatch):
    text = help_text(monkeypatch)
    assert max(map(len, text.splitlines())) <= 80
    assert "Read on" not in text  # (a note for code readers)
    parser = config.build_parser()
    undescribed = [a.option_strings[0] for a in parser._actions if a.option_strings and
                   (not a.help or a.help.startswith("(default"))]
    assert undescribed == []
    shown = " ".join(text.split("--preset fast sets:")[1].split())
    assert shown == " ".join(config.preset_flags("fast"))
    assert config.parse_args(shown.split()).__dict__ == config.parse_args(["--preset", "fast"]).__dict__ | {
        "preset": "seed", "warmup_epochs": 2.0}  # the flags shown make the preset's recipe


@pytest.mark.parametrize("script", ["evaluate", "predict", "export", "plot", "bench", "find_lr", "shards"])
def test_every_scripts_help_text_fits_80_columns(script):
    module = __import__(script)
    assert max(map(len, cli.fit_text(module.__doc__).splitlines())) <= 79


def test_the_pages_name_helps_groups_as_config_has_them():
    """docs/flags.md's train.py headings are --help's groups, and each flag's row is under its own group; the
    README's list of the groups names them all."""
    groups = {g.title: [a.option_strings[0] for a in g._group_actions]
              for g in config.build_parser()._action_groups if g.title not in ("positional arguments", "options")}
    flags_md = (ROOT / "docs" / "flags.md").read_text().split("## find_lr.py")[0]
    headings = re.findall(r"^\*\*(.+?)\*\*", flags_md, re.M)
    assert [h.lower() for h in headings] == list(groups)
    for heading, section in zip(headings, re.split(r"^\*\*.+?\*\*.*$", flags_md, flags=re.M)[1:]):
        for flag in re.findall(r"^\| `(--[a-z-]+)", section, re.M):
            if flag != "--preset":
                assert flag in groups[heading.lower()], (flag, heading)
    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"The flags, in the groups `--help` shows: (.+?)\. A preset", readme).group(1)
    named = re.findall(r"([a-z][a-z -]+) \(([^()]*)\)", listed)
    assert [title.removeprefix("and ") for title, _ in named] == list(groups)
    for title, flags in named:
        assert set(re.findall(r"`(--[a-z-]+)`", flags)) <= set(groups[title.removeprefix("and ")]), title


def test_image_size_and_workers_help_describe_the_in_memory_and_the_streamed_path(monkeypatch):
    """--image-size and --workers say what they do on both paths: held in memory (CIFAR, MNIST, a squash folder) and
    streamed from disk (the photo recipe, --workers)."""
    helps = {a.option_strings[0]: " ".join(a.help.split()) for a in config.build_parser()._actions if a.option_strings}
    assert "CIFAR and MNIST are resized to it once, in memory" in helps["--image-size"]
    assert "streamed from disk (the photo recipe, --workers)" in helps["--image-size"]
    assert "for either recipe" in helps["--workers"]
    assert "the photo recipe, --resize-mode crop, streams with one worker per core" in helps["--workers"]
    assert "a squash folder is held in memory when" in helps["--workers"]
    assert max(map(len, help_text(monkeypatch).splitlines())) <= 80

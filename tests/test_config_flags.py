"""Config files and flags: nothing given is dropped or silently without effect, every refusal is one line that
names the real cause, the photo recipe has one rule for the flags and the checkpoint, and a run's own args.json
makes the run that was trained (or says why it cannot)."""
import argparse
import json
import os
import sys
import threading

import pytest
import torch

import cli
import config
import runargs
import train
from checkpoint import CheckpointError, load_checkpoint
from conftest import fails_with
from decode import Prep
from image_files import make_image_folder

CPU = ["--device", "cpu"]


def refusal(argv: list[str]) -> str:
    """The one-line refusal of train.py's flags `argv`, checked before any work."""
    with pytest.raises(cli.UserError) as e:
        runargs.parse_run_args(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def write(path, content: str):
    path.write_text(content)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# --config: read as argparse reads the command line, and never waited on

def test_an_abbreviated_config_is_applied_and_a_second_one_refused_never_dropped(tmp_path):
    """argparse takes --conf and --confi=F for --config (allow_abbrev): the file's flags apply; a second --config,
    however spelled, is refused rather than silently ignored."""
    a, b = write(tmp_path / "a.json", '{"lr": 0.5}'), write(tmp_path / "b.json", '{"lr": 0.25}')
    assert runargs.parse_run_args(["--conf", a])[0].lr == 0.5
    assert runargs.parse_run_args([f"--confi={a}", "--lr", "0.1"])[0].lr == 0.1  # a flag given still wins
    for second in (["--config", b], ["--conf", b], [f"--con={b}"]):
        assert refusal(["--config", a, *second]) == (
            f"--config is given 2 times ({a}, {b}): give one file, and the flags that should differ from it on the "
            f"command line (they win over it)")
    run_argv = runargs.parse_run_args(["--conf", a, "--out-d", str(tmp_path / "x")])[2]
    assert run_argv == ["--lr=0.5", "--out-dir", str(tmp_path / "x")]  # spelled out: no --config, no abbreviation


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """A FIFO is refused at once, not waited on for a writer (open_regular: O_NONBLOCK and fstat)."""
    path = {"fifo": tmp_path / "flags.json", "folder": tmp_path, "device": "/dev/null"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    result = {}

    def parse():
        try:
            runargs.parse_run_args(["--config", str(path)])
        except cli.UserError as e:
            result["error"] = str(e)
    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # (it waits for a writer: give it one, so that the thread ends)
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("--config waited on a FIFO")
    what = {"fifo": "a FIFO", "folder": "a folder", "device": "not a regular file"}[kind]
    assert result["error"] == f"--config {path}: it is {what}; give a regular file"


@pytest.mark.parametrize("content, message", [
    ('{"lr": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a JSON object of flags (nested too deeply); give a file "
                                                      "like a run's args.json"),
    ('{"lr": [[[[1]]]]}', "'lr' takes a number or a string, not [[[[1]]]]"),
    ('{"crop_scale": 0.5}', "'crop_scale' takes two numbers, not 0.5"),
    ('{"widths": {"a": 1}}', "'widths' takes a list of numbers, not {\"a\": 1}"),
    ('{"batch-size": 64}', "'batch-size' is not a flag it may set (did you mean 'batch_size'? the keys are "
                           "train.py's flags as args.json spells them, with _ for -)"),
    ('{"--warmup-epochs": 1}', "'--warmup-epochs' is not a flag it may set (did you mean 'warmup_epochs'?"),
    ('{"learning_rat": 0.1}', "'learning_rat' is not a flag it may set (the keys are train.py's flags"),
    ('{"resume": "x.pth"}', "'resume' is not a flag it may set (where a run goes on, or another file, is given on "
                            "the command line)"),
])
def test_a_config_file_that_cannot_be_taken_says_why_in_one_line(tmp_path, content, message):
    path = write(tmp_path / "flags.json", content)
    assert refusal(["--config", path]).startswith(f"--config {path}: {message}")


def test_a_configs_false_turns_off_a_switch_its_preset_turns_on(tmp_path):
    """{"preset": "fast", "augment": false} is --preset fast --no-augment, not fast's --augment."""
    path = write(tmp_path / "f.json", '{"preset": "fast", "augment": false, "alt_flip": false, "nesterov": false}')
    args = runargs.parse_run_args(["--config", path])[0]
    assert (args.augment, args.alt_flip, args.nesterov, args.crop_pad) == (False, False, False, 2)
    assert runargs.parse_run_args(["--preset", "fast", "--no-augment"])[0].augment is False


# ---------------------------------------------------------------------------------------------------------------
# Flags without effect, and values too small to act

@pytest.mark.parametrize("flags, message", [
    (["--crop-scale", "0.5", "1"], "--crop-scale 0.5 1.0 has no effect here: it is for the photo recipe "
                                   "(--resize-mode crop); cifar10 is held in memory and squashed: leave it out"),
    (["--crop-fraction", "0.9"], "--crop-fraction 0.9 has no effect here: it is for the photo recipe"),
    (["--dataset", "imagefolder", "--interpolation", "bicubic"],
     "--interpolation bicubic has no effect here: it is for the photo recipe (--resize-mode crop); this run squashes "
     "its images (--resize-mode squash, or an image folder of at most 32 px): leave it out, or give --resize-mode "
     "crop"),
    (["--dataset", "imagefolder", "--resize-mode", "squash", "--crop-ratio", "0.5", "2"], "--crop-ratio 0.5 2.0 has "
                                                                                          "no effect here"),
    (["--dataset", "imagefolder", "--image-size", "64", "--augment"],
     "--augment has no effect here: it pads, crops and flips squashed images, and this run takes the photo recipe, "
     "which crops and flips already: leave it out, or give --resize-mode squash"),
    (["--dataset", "imagefolder", "--pretrained", "--model", "resnet18", "--crop-pad", "2"],
     "--crop-pad 2 has no effect here: it shapes --augment's crops of squashed images, and this run takes the photo "
     "recipe: leave it out"),
    (["--alt-flip"], "--alt-flip has no effect here: it shapes --augment's crops of squashed images: give --augment "
                     "too, or leave it out"),
    (["--crop-pad", "2"], "--crop-pad 2 has no effect here"),
    (["--momentum", "0.5"], "--momentum 0.5 has no effect here: it is for sgd and muon; adam has none"),
    (["--optimizer", "sgd", "--muon-momentum", "0.9"], "--muon-momentum 0.9 has no effect here: it is for "
                                                       "--optimizer muon"),
    (["--find-lr-end", "1"], "--find-lr-end 1.0 has no effect here: it is for the lr range test"),
    (["--max-image-pixels", "1000"], "--max-image-pixels 1000 has no effect here: it limits image files (an image "
                                     "folder's, shards'), and cifar10 has none: leave it out"),
])
def test_a_flag_given_that_would_have_no_effect_is_refused(flags, message):
    assert refusal(flags).startswith(message)


@pytest.mark.parametrize("flags", [
    ["--crop-scale", "0.08", "1.0", "--crop-pad", "4"],  # the defaults, given: what the run does anyway
    ["--preset", "fast", "--dataset", "imagefolder", "--image-size", "64"],  # the preset's --augment: not given
    ["--preset", "fast", "--optimizer", "adam"],  # the preset's --momentum and --muon-lr: not given
    ["--augment", "--alt-flip", "--crop-pad", "2", "--optimizer", "sgd", "--momentum", "0.5"],
    ["--dataset", "imagefolder", "--image-size", "64", "--crop-scale", "0.3", "1", "--interpolation", "bicubic"],
])
def test_flags_that_act_and_a_presets_own_values_are_taken(flags):
    runargs.parse_run_args(flags)


FLOATS = sorted(a.option_strings[0] for a in config.build_parser()._actions if a.type is float)


@pytest.fixture(autouse=True)
def denormals_as_in_a_fresh_process():
    """A CPU run earlier in this process (train.py, bench.py) flushed denormals to 0, comparisons included: the
    flags are checked before that, as a fresh process has them."""
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("flag", FLOATS)
def test_a_denormal_value_of_any_real_valued_flag_is_refused(flag):
    """1e-310 is flushed to 0 on the CPU: every real-valued flag refuses it, in a run where the flag acts."""
    acts = ["--dataset", "imagefolder", "--resize-mode", "crop", "--optimizer", "muon", "--find-lr"]
    value = [flag, "1e-310", "1"] if flag in ("--crop-scale", "--crop-ratio") else [flag, "1e-310"]
    assert flag in refusal([*acts, *value])


# ---------------------------------------------------------------------------------------------------------------
# The photo recipe: one rule for the flags and the checkpoint

@pytest.mark.parametrize("flags", [
    ["--crop-ratio", "1", "100"], ["--crop-ratio", "0.001", "1"], ["--crop-scale", "1e-310", "1"],
    ["--crop-scale", "0.5", "1.5"], ["--crop-ratio", "1e-300", "1e-300"], ["--image-size", "1024"],
    ["--image-size", "1024", "--crop-fraction", "0.2"], ["--image-size", "224", "--crop-fraction", "0.05"],
    ["--crop-scale", "0.2", "0.2", "--crop-ratio", "0.5", "0.5"],
])
def test_the_flags_and_the_checkpoint_check_the_photo_recipe_by_the_same_rule(flags):
    """What the flags accept, a checkpoint of it is accepted with; what they refuse, a checkpoint is refused with,
    in the same words."""
    args = config.parse_args(["--dataset", "imagefolder", "--resize-mode", "crop", *flags])
    prep = config.image_prep(argparse.Namespace(**vars(args)))
    flags_say = config.check_args(args)
    try:
        Prep.from_dict(prep.to_dict(), args.image_size or 32)
        checkpoint_says = None
    except ValueError as e:
        checkpoint_says = str(e).removeprefix("prep: ")
    assert flags_say == checkpoint_says


def test_a_checkpoint_whose_recipe_resizes_below_the_image_size_is_refused(tmp_path):
    """Its centre crop would pad every image with black: refused when it is read, in one line."""
    ckpt = {"model": {"w": torch.zeros(1)}, "model_name": "simplecnn", "num_classes": 2, "in_channels": 3,
            "image_size": 32, "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3,
            "prep": Prep("crop", 16, "bilinear").to_dict()}
    torch.save(ckpt, tmp_path / "small.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "small.pth")
    assert str(e.value) == (f"{tmp_path / 'small.pth'} is not a checkpoint of these scripts (prep: the photo recipe "
                            f"resizes the shorter side to 16 px (--image-size / --crop-fraction): it must be from the "
                            f"image size, 32, to 4096 (a larger --crop-fraction, or a smaller --image-size))")
    torch.save({**ckpt, "prep": Prep("crop", 32, "bilinear").to_dict()}, tmp_path / "fits.pth")
    load_checkpoint(tmp_path / "fits.pth")


# ---------------------------------------------------------------------------------------------------------------
# args.json of a resumed run, and resumes given the run's own values

def test_a_resumed_runs_args_json_that_changed_the_lr_is_refused_for_a_new_run_with_a_way_forward(tmp_path,
                                                                                                 cifar_dir):
    """args.json records what a resume changed; --config refuses it for a new run (which would train the last lr
    from the start), takes it with the run's own --resume, and the way forward it names trains the same run."""
    out = tmp_path / "a"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05",
                "--out-dir", str(out)])
    train.main(["--resume", str(out / "last.pth"), "--epochs", "2", "--lr", "0.01"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 0.01 and saved["changed_on_resume"] == [{"epoch": 2, "step": 0, "flags": "--lr 0.05 -> 0.01"}]
    fails_with(["--config", str(out / "args.json"), "--out-dir", str(tmp_path / "b")],
               f"--config {out / 'args.json'}: the run this file records changed --lr 0.05 -> 0.01 from epoch 2, step "
               f"0 when it was resumed, so one run of these flags would train another run: to repeat it, train its "
               f"first part with the earlier values and then --resume it with the later ones (docs/runs.md); to train "
               f"with these flags from the start, delete \"changed_on_resume\" from a copy of the file")
    assert not (tmp_path / "b").exists()
    args, _, run_argv = runargs.parse_run_args(["--resu", str(out / "last.pth"), "--config", str(out / "args.json"),
                                               "--epochs", "3"])
    assert (args.lr, args.epochs) == (0.01, 3) and not any(a.startswith("--resu") for a in run_argv)
    first = {k: v for k, v in saved.items() if k != "changed_on_resume"} | {"lr": 0.05, "epochs": 1}
    train.main(["--config", write(tmp_path / "first.json", json.dumps(first)), "--out-dir", str(tmp_path / "c")])
    train.main(["--resume", str(tmp_path / "c" / "last.pth"), "--epochs", "2", "--lr", "0.01"])
    a, c = load_checkpoint(out / "last.pth")["model"], load_checkpoint(tmp_path / "c" / "last.pth")["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_resume_records_an_epochs_change_that_reshapes_the_schedule():
    """--epochs raised on resume moves a decaying schedule (a run of the new --epochs from the start is another);
    without a schedule it changes nothing that was trained."""
    before = {"args": vars(config.parse_args(["--scheduler", "cosine", "--epochs", "2", "--patience", "3"]))}
    now = config.parse_args(["--scheduler", "cosine", "--epochs", "4", "--patience", "0"])
    assert runargs.changes_on_resume(now, before) == "--epochs 2 -> 4"
    now.patience = 1  # could stop the run sooner than it was stopped
    assert runargs.changes_on_resume(now, before) == "--epochs 2 -> 4; --patience 3 -> 1"
    plain = {"args": vars(config.parse_args(["--epochs", "2"]))}
    assert runargs.changes_on_resume(config.parse_args(["--epochs", "4"]), plain) == ""


def test_a_resume_given_the_runs_own_values_or_args_json_is_taken_and_workers_are_refused_for_their_cause(
        tmp_path):
    """An image folder held in memory (squash, 32 px) and one taken by the photo recipe (40 px): their own recipe
    values, given, and their own args.json go with --resume; --workers on the run held in memory is refused
    before any work, naming why (not as other data)."""
    photos = make_image_folder(tmp_path / "photos")
    base = ["--dataset", "imagefolder", "--data-dir", str(photos), *CPU, "--epochs", "1", "--batch-size", "4",
            "--val-split", "0"]
    train.main([*base, "--out-dir", str(tmp_path / "memory")])
    train.main([*base, "--image-size", "40", "--workers", "0", "--out-dir", str(tmp_path / "crop")])
    memory, crop = str(tmp_path / "memory" / "last.pth"), str(tmp_path / "crop" / "last.pth")
    own = {memory: ["--resize-mode", "squash", "--image-size", "32"],
           crop: ["--resize-mode", "crop", "--image-size", "40", "--crop-fraction", "0.875", "--interpolation",
                  "bilinear", "--workers", "0"]}
    for last, flags in own.items():
        runargs.parse_run_args(["--resume", last, "--epochs", "2", *flags])
        runargs.parse_run_args(["--resume", last, "--epochs", "2", "--config", str(tmp_path / last.split("/")[-2] /
                                                                                   "args.json")])
    assert refusal(["--resume", crop, "--epochs", "2", "--crop-fraction", "0.5"]).startswith(
        "--resume: the run was trained with --crop-fraction 0.875, not 0.5; that would be another run")
    assert refusal(["--resume", memory, "--epochs", "2", "--resize-mode", "crop"]).startswith(
        "--resume: the run was trained with --resize-mode squash, not crop; that would be another run")
    fails_with(["--resume", memory, "--epochs", "2", "--workers", "0"],
               "--resume: the run held its images in memory, and --workers would stream them from disk, where the "
               "check that they are the run's own images (a fingerprint of their pixels) cannot be made: resume "
               "without --workers (streamed or not, the weights are the same)")
    assert runargs.parse_run_args(["--resume", crop, "--epochs", "2"])[0].workers == 0  # streamed: it stays so


def test_the_resume_command_names_the_interpreter_the_run_was_started_with(tmp_path, monkeypatch):
    """By its name where that name on PATH finds this very interpreter (an active virtual environment), else by its
    full path (quoted where it must be): the printed command then runs with the run's own packages."""
    venv, other = tmp_path / "my env" / "bin", tmp_path / "other"
    for folder in (venv, other):
        folder.mkdir(parents=True)
        (folder / "python3.12").write_text("#!/bin/sh\n")
        (folder / "python3.12").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python3.12"))
    last = tmp_path / "run" / "last.pth"
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}{other}")
    assert runargs.resume_command(["--epochs", "3"], last) == f"python3.12 train.py --epochs 3 --resume {last}"
    for path in (f"{other}{os.pathsep}{venv}", str(tmp_path)):  # another python3.12 first on PATH, or none at all
        monkeypatch.setenv("PATH", path)
        assert runargs.resume_command(["--epochs", "3"], last) == \
            f"'{venv / 'python3.12'}' train.py --epochs 3 --resume {last}"

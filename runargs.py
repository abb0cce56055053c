"""A run's flags put together, as train.py and find_lr.py take them (parse_run_args): those given, a --config file
(configfile.py), the preset, and on --resume the run's own flags from its checkpoint, those given now replacing them
where MAY_CHANGE_ON_RESUME and TAKE_EFFECT_ON_RESUME allow; then checked (config.check_args). Also where a run goes
(out_dir_for), what its args.json holds (run_flags) and the command that resumes it (resume_command). The flags
themselves, their presets and checks: config.py.
"""
import argparse
import contextlib
import copy
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch.distributed as dist

import cli
from checkpoint import load_checkpoint, validate_for_resume
from config import PRESETS, build_parser, check_args, given_flags, image_prep, ineffective, parse_args, shown_flag
from configfile import CHANGES, ConfigError, expand_config, spelled_out
from decode import Prep
from folders import is_image_folder
from model import SIZED_BY_IMAGE
from formats import CIFAR10_FOLDER, FILE_SETS
from runtime import print0
from tarshards import is_shard_folder

# What --resume lets change (docs/runs.md: what may change on resume); every other flag given must equal the run's.
MAY_CHANGE_ON_RESUME = {"epochs", "patience", "min_delta", "device", "channels_last", "compile", "tta", "data_dir",
                        "out_dir", "resume", "log_interval", "mlflow", "mlflow_log_checkpoints", "tensorboard",
                        "max_image_pixels", "workers", "eval_batch_size"}
# ...and these take effect from the next optimizer step: the schedule keeps its shape, with the new peak. The
# checkpoint and metrics.csv record each change and the step it took effect at.
TAKE_EFFECT_ON_RESUME = {"lr", "muon_lr", "bias_lr_scale", "momentum", "muon_momentum", "nesterov", "weight_decay",
                         "grad_clip", "label_smoothing"}
NEW_RUN_ONLY = {"model", "widths", "pretrained", "init_from", "freeze_backbone", "preset"}  # --init-from cannot help


def parse_run_args(argv: list[str], prog: str = "train.py",
                   doc: str | None = None) -> tuple[argparse.Namespace, dict | None, list[str]]:
    """train.py's flags, checked: (args, the checkpoint --resume continues or None, the run's flags as a command
    line, --config's file spelled out in it). A resumed run's flags are its checkpoint's, with those given now where
    they may change. `prog`, `doc`: the script's name and --help text."""
    argv = expand_config(argv, build_parser(prog, doc))
    args = parse_args(argv, prog, doc)
    resumed, run_argv, given = None, without_resume(argv), given_flags(argv)
    if args.find_lr and args.resume:
        raise ConfigError("the lr range test cannot --resume a run: give --init-from the checkpoint to start from "
                          "its weights")
    if args.resume:
        resumed = load_checkpoint(args.resume)
        validate_for_resume(resumed, Path(args.resume))  # now, not after the data has loaded
        args, run_argv, changed = resume_args(argv, args, resumed)
    else:
        defaults = vars(parse_args(["--preset", args.preset]))  # (what the run has without them)
        changed = {d for d in given if getattr(args, d) != defaults[d]}
    if not resumed and ("dataset" not in given or args.dataset in FILE_SETS):  # (a resumed run's is its own)
        read_as_found(args, "dataset" in given)
    problem = check_args(args) or ineffective(args, changed)
    if problem:
        raise ConfigError(problem + from_preset(problem, args, argv if not resumed else run_argv))
    check_out_dir_outside_data(args)
    return args, resumed, run_argv


def read_as_found(args: argparse.Namespace, given: bool) -> None:
    """--dataset as --data-dir's files are, with a note when that is not the one given (`given`: imagefolder or
    shards) or defaulted to: a URL or a folder of train-*.tar is shards; without --dataset, a folder of
    train/<class>/ and test/ an image folder (under the default cifar10, a folder of photos was searched for
    CIFAR-10's files and the download offered into it)."""
    where = args.data_dir
    if args.dataset != "shards" and cli.is_url(where):
        note, args.dataset = f"{where} is a URL, which only --dataset shards reads: reading it as tar shards", "shards"
    elif args.dataset != "shards" and is_shard_folder(where):
        note, args.dataset = (f"{where} holds tar shards (train-*.tar), not {args.dataset}'s files: reading them as "
                              f"--dataset shards"), "shards"
    elif not given and is_image_folder(where) and not (Path(where) / CIFAR10_FOLDER).is_dir():
        note, args.dataset = (f"{where} holds an image folder (train/<class>/, test/), not {args.dataset}'s files: "
                              f"reading it as --dataset imagefolder"), "imagefolder"
    else:
        return
    print0(note, file=sys.stderr)


def from_preset(problem: str, args: argparse.Namespace, argv: list[str]) -> str:
    """Where a refused value came from, when it is a preset's and not a flag the user gave."""
    given = given_flags(argv)
    named = [d for d in dict.fromkeys(f.replace("-", "_") for f in re.findall(r"--([a-z][a-z-]*)", problem))
             if d in PRESETS[args.preset] and d not in given]
    return "".join(f" (--{d.replace('_', '-')} {getattr(args, d)} comes from --preset {args.preset}; give "
                   f"--{d.replace('_', '-')} to change it)" for d in named)


def check_out_dir_outside_data(args: argparse.Namespace) -> None:
    """Refuse an --out-dir inside the images the run reads (an image folder's train/, val/ or test/): its
    curves.png would be read as an image by the next run, its folder as a class."""
    if args.dataset != "imagefolder":  # (packed sets and shards: files of known names, nothing else in them is read)
        return
    out = Path(args.out_dir or (Path(args.resume).parent if args.resume else "runs")).resolve()
    for split in ("train", "val", "test"):
        read = Path(args.data_dir) / split
        if out.is_relative_to(read.resolve()):
            raise ConfigError(f"--out-dir {out_dir_for(args)} is inside {read}, which this run reads as images: "
                              f"give --out-dir a folder outside --data-dir's train/, val/ and test/")


def out_dir_for(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if args.resume:
        return Path(args.resume).parent
    name = f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():  # the processes may start in different seconds: take rank 0's name
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    return Path("runs") / name


# ---------------------------------------------------------------------------------------------------------------
# Resuming: the run's own flags, from its checkpoint, and what may change

def resume_args(argv: list[str], args: argparse.Namespace,
                ckpt: dict) -> tuple[argparse.Namespace, list[str], set[str]]:
    """The resumed run's flags: the checkpoint's, then those given now; and the flags given now that change the
    run. A flag given now must equal the run's (as given, or as the run resolved it: its recipe, image size,
    warm-up), unless it is one MAY_CHANGE_ON_RESUME or TAKE_EFFECT_ON_RESUME; --epochs may rise but not fall below
    the epochs already done."""
    saved_argv = ckpt.get("argv")
    if not (isinstance(saved_argv, list) and len(saved_argv) < 10_000 and all(isinstance(a, str) for a in saved_argv)):
        raise ConfigError(f"--resume: {args.resume} holds no command line to resume (written by an older train.py?)")
    try:
        saved = parse_args(saved_argv)
    except SystemExit as e:
        raise ConfigError(f"--resume: the checkpoint's own flags do not parse: {e.code}") from None
    saved_argv, given, own = spelled_out(saved_argv, build_parser()), given_flags(argv), resolved_run(saved, ckpt)
    saved.warmup_epochs = own.warmup_epochs
    for dest in sorted(given - MAY_CHANGE_ON_RESUME - TAKE_EFFECT_ON_RESUME):
        if getattr(args, dest) not in (getattr(saved, dest), getattr(own, dest)):
            now, flag = shown_flag(dest, getattr(args, dest)), f"--{dest.replace('_', '-')} "
            raise ConfigError(f"--resume: the run was trained with {shown_flag(dest, getattr(own, dest))}, not "
                              f"{now.removeprefix(flag)}; that would be another run: "
                              f"{new_run_hint(dest, saved_argv, argv, args.resume, own.model)}")
    check_workers(args, given, saved, own.workers, ckpt)
    done = ckpt["state"]["epoch"]  # (validated by checkpoint.validate_for_resume)
    if isinstance(ckpt["args"].get("data_dir"), str):  # resolved when saved: a resume from any folder finds the data
        saved.data_dir = ckpt["args"]["data_dir"]
    changed = {d for d in given & (MAY_CHANGE_ON_RESUME | TAKE_EFFECT_ON_RESUME) if getattr(args, d) != getattr(own, d)}
    for dest in given & (MAY_CHANGE_ON_RESUME | TAKE_EFFECT_ON_RESUME):
        setattr(saved, dest, getattr(args, dest))
    if saved.epochs < done:
        raise ConfigError(f"--resume: the run has already done {done} epochs; --epochs {saved.epochs} is fewer")
    finished = nothing_left(saved, ckpt["state"], argv)
    if finished:
        raise ConfigError(finished)
    saved.out_dir, saved.resume = args.out_dir, args.resume
    run_argv = without_resume(replace_flags(saved_argv, argv))
    if parse_args(run_argv).warmup_epochs != saved.warmup_epochs:  # a preset's, scaled to the --epochs of its start
        run_argv += ["--warmup-epochs", repr(saved.warmup_epochs)]  # (kept when --epochs changes)
    return saved, run_argv, changed


def resolved_run(saved: argparse.Namespace, ckpt: dict) -> argparse.Namespace:
    """The resumed run's flags as it resolved them (its checkpoint's args): its photo recipe (image_prep), its
    image size, its warm-up, whether it streamed its images (--workers; None: held in memory)."""
    own, run = copy.copy(saved), ckpt["args"]
    with contextlib.suppress(ValueError):  # (--pretrained weights this torchvision no longer has)
        own.resize_mode = image_prep(own).mode
    own.image_size = ckpt["image_size"]  # (validated by load_checkpoint)
    if isinstance(run.get("warmup_epochs"), float) and math.isfinite(run["warmup_epochs"]):
        own.warmup_epochs = run["warmup_epochs"]  # (a preset's, scaled to the --epochs the run started with)
    workers = run.get("workers")
    own.workers = workers if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0 else None
    return own


def check_workers(args: argparse.Namespace, given: set[str], saved: argparse.Namespace, own: int | None,
                  ckpt: dict) -> None:
    """--workers on resume changes how many processes stream the images, not whether they are streamed: a resume
    checks that it trains on the run's own images by the run's fingerprint of them, of the pixels when they were
    held in memory, of the files when streamed (the weights are the same either way). Without --workers, a streamed
    run goes on streaming, with its own count (`own`: None when held in memory)."""
    streamed = own is not None or Prep.from_dict(ckpt.get("prep")).mode == "crop" or saved.dataset != "imagefolder"
    if "workers" in given and args.workers is not None and not streamed:
        raise ConfigError("--resume: the run held its images in memory, and --workers would stream them from disk, "
                          "where the check that they are the run's own images (a fingerprint of their pixels) cannot "
                          "be made: resume without --workers (streamed or not, the weights are the same)")
    if "workers" not in given and saved.workers is None and own is not None:
        saved.workers = own


def replace_flags(saved_argv: list[str], argv: list[str]) -> list[str]:
    """`saved_argv` with the flags given in `argv` replaced by their new values (at the end): a command line that
    is resumed again and again does not pile them up."""
    defaults, given = vars(parse_args([])), given_flags(argv)
    flags = [f"--{d.replace('_', '-')}" for d in given if not isinstance(defaults[d], bool)]
    switches = [f"--{no}{d.replace('_', '-')}" for d in given if isinstance(defaults[d], bool) for no in ("", "no-")]
    return without(saved_argv, *flags, switches=tuple(switches)) + argv


def without(argv: list[str], *flags: str, switches: tuple[str, ...] = ()) -> list[str]:
    """`argv` without the given flags (and their values) and `switches` (flags that take no value)."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):  # (--tta takes its value or none)
            skip = False
            continue
        skip = a in flags
        if not (skip or a in switches or a.startswith(tuple(f + "=" for f in flags))):
            out.append(a)
    return out


def without_resume(argv: list[str]) -> list[str]:
    return without(argv, "--resume")


def nothing_left(args: argparse.Namespace, state: dict, argv: list[str]) -> str | None:
    """Why a resumed run would have nothing left to train (all its --epochs done, or early stopping ended it), and
    the command that trains on; None when it has steps left."""
    def again(flag: str) -> str:
        return cli.command("train.py", "--resume", args.resume, *without(argv, "--resume", flag), flag)
    if state["epoch"] >= args.epochs:
        test = cli.command("evaluate.py", "--checkpoint", str(Path(args.resume).parent / "best.pth"))
        return (f"--resume: the run has done all its {args.epochs} epochs, so nothing is left to train (its test: "
                f"{test}); to train on, give a larger --epochs: {again('--epochs')} {2 * args.epochs}")
    if args.patience and state["bad_epochs"] >= args.patience:
        return (f"--resume: early stopping ended the run after epoch {state['epoch']} ({state['bad_epochs']} epochs "
                f"without improvement, --patience {args.patience}), so nothing is left to train; to train on, give a "
                f"larger --patience (0 = off): {again('--patience')} 0")
    return None


def new_run_hint(dest: str, saved_argv: list[str], argv: list[str], path: str, model: str) -> str:
    """The way forward when a flag that makes another run is given with --resume: a new run with the run's flags
    and those given now, from the resumed checkpoint's weights (`path`) where they fit (--init-from: not another
    model, nor another --image-size for a `model` whose weights follow it)."""
    flags = without(replace_flags(saved_argv, argv), "--resume", "--out-dir", "--init-from",
                    switches=("--pretrained",))
    if dest in NEW_RUN_ONLY or dest == "image_size" and model in SIZED_BY_IMAGE:
        return f"start a new run without --resume: {cli.command('train.py', *flags)}"
    return f"start a new run from its weights: {cli.command('train.py', *flags, '--init-from', path)}"


def changes_on_resume(args: argparse.Namespace, resumed: dict) -> str:
    """What a resume changes in the run from this step on, as "--lr 0.75 -> 0.3; ...": the TAKE_EFFECT_ON_RESUME
    flags that differ from the resumed checkpoint's; the --epochs of a decaying schedule (it jumps to where the
    longer one is), --min-delta (it decides which epoch is best), a --patience that could have stopped the run
    sooner. The checkpoint, metrics.csv and args.json record them: the last values from the start would train
    another run (configfile.changed_run)."""
    saved, before = resumed["args"], resumed["args"].get("patience")
    shapes = {"epochs": args.scheduler != "none", "min_delta": True,
              "patience": isinstance(before, int) and args.patience != 0 and (before == 0 or args.patience < before)}
    dests = sorted(TAKE_EFFECT_ON_RESUME | {d for d, matters in shapes.items() if matters})
    return "; ".join(f"--{d.replace('_', '-')} {saved.get(d)} -> {getattr(args, d)}"
                     for d in dests if saved.get(d) != getattr(args, d))


def resume_command(argv: list[str], path: Path) -> str:
    """The command line that continues this run: its flags, with --resume pointing at `path`, run by the interpreter
    this run was started with (cli.python), or by torchrun."""
    if not dist.is_initialized():
        return cli.command("train.py", *argv, "--resume", str(path))
    launcher = [*cli.torchrun(), f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
    return shlex.join([*launcher, cli.script("train.py"), *argv, "--resume", str(path)])


# ---------------------------------------------------------------------------------------------------------------
# The run's flags in a file: args.json in the run folder, and --config FILE

NOT_IN_CONFIG = ("resume", "out_dir", "config")  # where a run is, not what it is


def run_flags(args: argparse.Namespace, changes: list[dict] = ()) -> dict:
    """The run's resolved flags, as its args.json holds them and --config takes them back: every flag but where
    the run is (--out-dir, --resume), the data folder resolved; and the checkpoint's `changes`, what its resumes
    changed from a step on (changes_on_resume), when there are any: --config refuses such a file for a new run,
    which would train the last values from the start (configfile.changed_run)."""
    flags = {dest: value for dest, value in vars(args).items() if dest not in NOT_IN_CONFIG}
    return {**flags, "data_dir": cli.resolved(args.data_dir), **({CHANGES: list(changes)} if changes else {})}

"""--config FILE: train.py's flags from a JSON object such as a run's args.json (runargs.run_flags writes it),
spelled out as a command line put before the flags given, which win over it. Reading the file only: runargs.py
imports this module and hands it config.py's parser; nothing here imports either.

Nothing in the file is dropped: an unknown key is refused (with the flag it may mean), a value of the wrong kind is
refused, a switch's false turns it off (--no-augment where a preset turns it on), and a second --config, or an
abbreviated one (--conf, as argparse reads it), is caught like --config itself.
"""
import argparse
import difflib
import json

import cli
from decode import open_regular
from formats import DataError

MAX_BYTES = 1_000_000
CHANGES = "changed_on_resume"  # args.json of a resumed run that changed what it trains (runargs.run_flags)


class ConfigError(cli.UserError):
    """Flags that do not fit together, a --config file that cannot be taken, or a resume that would change what
    cannot change."""


def option_named(token: str, parser: argparse.ArgumentParser) -> str | None:
    """The option string a command-line token names as argparse reads it: whole, as --flag=VALUE, or abbreviated
    to the start of one option only (allow_abbrev: --conf is --config); None for a value or an ambiguous start."""
    if not token.startswith("--") or token == "--":
        return None
    name, options = token.partition("=")[0], parser._option_string_actions
    matches = [name] if name in options else [o for o in options if o.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def spelled_out(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with each abbreviated option written whole (--conf F: --config F), as argparse reads it: what is
    looked for in a command line (--config, --resume, a flag replaced on resume) is found however it was typed."""
    def whole(token: str) -> str:
        option = option_named(token, parser)
        return option + token[len(token.partition("=")[0]):] if option else token
    return [whole(a) for a in argv]


def expand_config(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv`, its options spelled out, with --config FILE replaced by the flags FILE holds, put first so that the
    flags given win; a second --config is refused."""
    argv = spelled_out(argv, parser)
    found = [i for i, a in enumerate(argv) if a.partition("=")[0] == "--config"]
    if not found:
        return argv
    if len(found) > 1:
        files = ", ".join(argv[i].partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "?") for i in found)
        raise ConfigError(f"--config is given {len(found)} times ({cli.shorten(files, 200)}): give one file, and "
                          f"the flags that should differ from it on the command line (they win over it)")
    i = found[0]
    inline = "=" in argv[i]
    path = argv[i].partition("=")[2] if inline else argv[i + 1] if i + 1 < len(argv) else ""
    if not path or not inline and option_named(path, parser):
        raise ConfigError("--config needs a file: a JSON object of flags, like a run's args.json")
    resuming = any(a.partition("=")[0] == "--resume" for a in argv)
    return config_flags(path, parser, resuming) + argv[:i] + argv[i + (1 if inline else 2):]


def read_config(path: str) -> dict:
    """The JSON object a --config file holds; a FIFO, a device or a folder is refused at once (never waited on)."""
    try:
        with open_regular(path, "--config") as f:
            raw = f.read(MAX_BYTES + 1)
        flags = json.loads(raw) if len(raw) <= MAX_BYTES else None
    except DataError as e:  # (a FIFO, a folder, no such file: the reason, in one line)
        raise ConfigError(str(e).removeprefix("cannot read ")) from None
    except OSError as e:
        raise ConfigError(f"--config {path}: {cli.describe_os_error(e, filename=False)}") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: not a JSON object of flags (nested too deeply); give a file like a "
                          f"run's args.json") from None
    except ValueError as e:  # (UnicodeDecodeError included)
        raise ConfigError(f"--config {path}: not JSON ({cli.one_line(e, 100)}); give a file like a run's "
                          f"args.json") from None
    if not isinstance(flags, dict):
        raise ConfigError(f"--config {path}: not a JSON object of flags (under 1 MB), like a run's args.json")
    return flags


def config_flags(path: str, parser: argparse.ArgumentParser, resuming: bool = False) -> list[str]:
    """The flags a --config file holds ({"lr": 0.1, "widths": [32, 64, 64], "augment": true, ...}), as a command
    line; checked as `parser` checks its command line. The args.json of a run that a resume changed (CHANGES) is
    refused for a new run, which would train those flags from the start (`resuming`: it is the run's own)."""
    flags = read_config(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "resume")}
    if flags.get(CHANGES) and not resuming:
        raise ConfigError(changed_run(path, flags[CHANGES]))
    argv = []
    for key, value in flags.items():
        if key == CHANGES:
            continue
        if key not in actions:
            raise ConfigError(unknown_key(path, key, actions))
        argv += as_flags(path, actions[key], value)
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        raise ConfigError(f"--config {path}: {str(e.code).partition(': error: ')[2] or e.code}") from None
    return argv


def as_flags(path: str, action: argparse.Action, value: object) -> list[str]:
    """The command-line words of one key of a --config file."""
    flag, key = action.option_strings[0], cli.printable(repr(action.dest))
    scalar = (str, int, float)
    if action.nargs == 0:  # a switch: true or false
        if not isinstance(value, bool):
            raise ConfigError(f"--config {path}: {key} is a switch: give true or false, not {shown(value)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []  # (off: the default of every preset; a preset's switches take --no-)
    if value is None:
        return []
    if isinstance(value, list) and action.nargs == 2 and len(value) == 2 and all(
            isinstance(v, scalar) and not isinstance(v, bool) for v in value):
        return [flag, *map(str, value)]  # --crop-scale LOW HIGH
    if isinstance(value, list) and action.dest == "widths" and all(isinstance(v, int) for v in value):
        return [f"{flag}={','.join(map(str, value))}"]
    if not isinstance(value, scalar) or isinstance(value, bool) or action.nargs == 2:
        kind = "two numbers" if action.nargs == 2 else "a list of numbers" if action.dest == "widths" else \
            "a number or a string"
        raise ConfigError(f"--config {path}: {key} takes {kind}, not {shown(value)}")
    return [f"{flag}={value}"]  # (=: a value that starts with -- is still the value)


def shown(value: object) -> str:
    return cli.printable(cli.shorten(json.dumps(value) if not isinstance(value, (list, dict)) else
                                     type(value).__name__ if len(value) > 8 else json.dumps(value), 60))


def unknown_key(path: str, key: str, actions: dict) -> str:
    """Why a key is refused, with the flag it may mean (batch-size, --batch-size: batch_size)."""
    name = cli.printable(cli.shorten(repr(key), 60))
    guess = key.lstrip("-").replace("-", "_").lower()
    close = [guess] if guess in actions else difflib.get_close_matches(guess, list(actions), n=1, cutoff=0.75)
    if key in ("resume", "config"):
        why = "where a run goes on, or another file, is given on the command line"
    else:
        why = (f"did you mean {close[0]!r}? " if close else "") + "the keys are train.py's flags as args.json " \
              "spells them, with _ for -"
    return f"--config {path}: {name} is not a flag it may set ({why})"


def changed_run(path: str, changes: object) -> str:
    """The refusal of a resumed run's args.json whose resume changed what the run trains, with the ways forward."""
    first = changes[0] if isinstance(changes, list) and changes and isinstance(changes[0], dict) else {}
    what = (f"{cli.shorten(str(first.get('flags')), 200)} from epoch {first.get('epoch')}, step {first.get('step')}"
            if first else "flags")
    return (f"--config {path}: the run this file records changed {what} when it was resumed, so one run of these "
            f"flags would train another run: to repeat it, train its first part with the earlier values and then "
            f"--resume it with the later ones (docs/runs.md); to train with these flags from the start, delete "
            f"\"{CHANGES}\" from a copy of the file")

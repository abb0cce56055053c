"""The command line every script shares: bad input is one `prog: error: ...` line and a non-zero exit, never a
traceback, and Ctrl-C exits quietly with 130. Standard library only, so a script can import it before torch."""
import argparse
import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem the user can fix (bad data, a foreign checkpoint, a busy run folder...). Its message is the whole
    story: the scripts print it as one line. Each module defines its own subclass where it raises it."""


class Interrupted(SystemExit):
    """SIGINT or SIGTERM outside the training loop. A SystemExit with code 128 + the signal number: no
    `except Exception` swallows it, `finally` blocks still run and remove temporary files, and where nothing
    catches it (torch still importing) Python exits with that code and no traceback."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def exit_at_once(signum: int, frame: object) -> None:
    print(f"{Path(sys.argv[0]).name}: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def handle_signals(handler=exit_at_once) -> dict:
    """Let `handler` take Ctrl-C and SIGTERM; by default they end the process at once. Scripts call it first,
    before they import torch: while imports run, the process just exits (an exception raised there can be swallowed by
    C code that clears import errors, as torch 2.4's import does); one_line_errors then installs
    raise_interrupted, so that `finally` blocks clean up. A signal the process was started with ignored (a
    background job of a shell, nohup) stays ignored, as Python itself does. Returns the previous handlers."""
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) is not signal.SIG_IGN}


def restore_signals(handlers: dict) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line (`prog: error: ...`, exit 1), not the usage block."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message: str):
        raise SystemExit(f"{prog}: error: {message}")
    p.error = error
    return p


@contextmanager
def one_line_errors(prog: str, oom_hint: str | None = None) -> Iterator[None]:
    """Turn what a user can cause into `prog: error: <one line>` and a non-zero exit: a UserError, a file the
    system refuses (full disk, name too long, no permission), memory that is not there (followed by `oom_hint`,
    the way forward in this script's own flags), a signal (exit 128 + N). The line is printable() (a file name
    with a newline or a terminal escape in it cannot break or drive the terminal). Ctrl-C and SIGTERM stop the work
    at once inside it (train.py's loop defers them to a step boundary)."""
    def fail(message: str) -> SystemExit:
        return SystemExit(f"{prog}: error: {printable(message)}")
    hint = f"; {oom_hint}" if oom_hint else ""
    previous_handlers = handle_signals(raise_interrupted)
    try:
        yield
    except UserError as e:
        raise fail(str(e)) from None
    except Interrupted as e:
        print(f"{prog}: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except OSError as e:
        raise fail(describe_os_error(e)) from None
    except MemoryError:
        raise fail(f"out of memory{hint}") from None
    except RuntimeError as e:  # torch reports memory it cannot get as a RuntimeError (CUDA: OutOfMemoryError)
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise fail(f"out of memory: {shorten(str(e).splitlines()[0])}{hint}") from None
    finally:
        restore_signals(previous_handlers)


def describe_os_error(e: OSError, filename: bool = True) -> str:
    """The reason of an OSError, after the file it names (filename=False: without it, where the message names the
    file already, or the file is a temporary one the user never sees)."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else shorten(str(e)) or type(e).__name__)
    hint = "; free some space and try again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{e.filename}: {reason}{hint}" if e.filename and filename else f"{reason}{hint}"


def shorten(text: str, limit: int = 200) -> str:
    """What a message echoes from a file or an exception, cut to `limit` characters (an ellipsis marks the cut):
    a crafted file must not turn one error line into 100 KB."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def printable(text: str) -> str:
    """text with every non-printable character (newline, escape, other terminal controls, the surrogates that stand
    for undecodable bytes of a file name) written as Python writes them, \\xNN, \\uNNNN or \\UNNNNNNNN: a class or
    file name printed to a terminal can then neither break a line nor drive it (nor fail to encode)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def refuse_overwriting(output: str | Path, *inputs: str | Path | None) -> None:
    """An output path that names one of the inputs would destroy it: refuse before anything is written."""
    out = Path(output).resolve()
    for given in inputs:
        if given is not None and (Path(given).resolve() == out or out.exists() and Path(given).exists()
                                  and os.path.samefile(out, given)):  # (samefile: hard links too)
            raise UserError(f"the output {output} is also an input ({given}); choose another output path")

"""The command line every script shares: bad input is one `prog: error: ...` line and a non-zero exit, never a
traceback, and Ctrl-C exits quietly with 130. Standard library only, so a script can import it before torch."""
import argparse
import codecs
import importlib
import errno
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
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


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the block runs, then handed to the handler in place before it (once
    each). Whatever starts DataLoader workers runs in it: a worker keeps the handler of the moment it was forked
    until its worker_init_fn ignores the signals, and a signal then would end it (the parent reporting a dead
    worker instead of stopping); forked under this handler, it only takes a note."""
    if threading.current_thread() is not threading.main_thread():  # (only the main thread sets handlers)
        yield
        return
    held = []
    previous = handle_signals(lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        restore_signals(previous)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def is_url(location: str) -> bool:
    """Whether --data-dir (or a shard) names a place on a web server, not a path."""
    return location.startswith(("http://", "https://"))


def resolved(location: str) -> str:
    """A path made absolute, as a run records its --data-dir (a resume or evaluate.py from any folder finds it); a
    URL as it is (Path would make http://host of it http:/host)."""
    return location if is_url(location) else str(Path(location).resolve())


def path_flag(text: str) -> str:
    """argparse type of a path: an empty one (--output '') is refused like any invalid path, never taken for a flag
    not given, nor for the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give the path of a file or folder")
    return text


def python() -> str:
    """This interpreter, as a printed command names it: by its name where that name on PATH is this very file (an
    active virtual environment's `python`, or `python3`), else by its full path (a virtual environment that is not
    active: `python` would find another interpreter, without the run's packages)."""
    if not sys.executable:  # (an embedding interpreter that cannot say)
        return "python"
    name, found = os.path.basename(sys.executable), shutil.which(os.path.basename(sys.executable))
    return name if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


def torchrun() -> list[str]:
    """torchrun as a printed command names it: `torchrun` where that name on PATH is this interpreter's own (beside
    it, in its environment's bin/), else this interpreter running torch's module (`python -m torch.distributed.run`:
    a virtual environment that is not active has no `torchrun` on PATH)."""
    found = shutil.which("torchrun")
    if found and sys.executable and os.path.dirname(os.path.abspath(found)) == os.path.dirname(sys.executable):
        return ["torchrun"]
    return [python(), "-m", "torch.distributed.run"]


def script(name: str) -> str:
    """One of this project's scripts, as a printed command names it: by the path that finds it from the current
    folder (`train.py` in the project's folder, `proj/train.py` above it), else by its full path."""
    path = Path(__file__).resolve().with_name(name)
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):  # (outside the current folder, or the current folder is gone)
        return str(path)


def command(name: str, *args: str) -> str:
    """The shell command that runs this project's script `name` with `args`, as a way forward prints it."""
    return shlex.join([python(), script(name), *args])


def parser(prog: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line (`prog: error: ...`, exit 1), not the usage block, and whose
    description (a script's docstring) and epilog fit 80 columns (fit_text)."""
    p = argparse.ArgumentParser(prog=prog, description=doc and fit_text(doc), epilog=epilog and fit_text(epilog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message: str):
        raise SystemExit(f"{prog}: error: {message}")
    p.error = error
    return p


def fit_text(doc: str, width: int = 79) -> str:
    """A docstring for a terminal of 80 columns: its paragraphs wrapped to `width`, and in a block of indented
    example lines of which one is too wide, each `# comment` moved to a line of its own below its command."""
    out, paragraph, block = [], [], []
    for line in textwrap.dedent(doc).strip().splitlines() + [""]:
        if line.strip() and not line[0].isspace():
            paragraph.append(line)
            continue
        if line.strip():
            block.append(line)
            continue
        out += textwrap.wrap(" ".join(paragraph), width, break_on_hyphens=False) + examples(block, width) + [""]
        paragraph, block = [], []
    return "\n".join(line for i, line in enumerate(out) if line or i and out[i - 1]).strip()


def examples(lines: list[str], width: int) -> list[str]:
    """A block of example command lines, each comment on a line of its own when any line is wider than `width`."""
    if all(len(line) <= width for line in lines):
        return lines
    out = []
    for line in lines:
        command, _, comment = line.partition("  # ")
        indent = " " * (len(command) - len(command.lstrip()) + 4)
        out += [command.rstrip(), *textwrap.wrap("# " + comment.strip(), width, initial_indent=indent,
                                                  subsequent_indent=indent + "  ")] if comment else [line]
    return out


def whole_lines_to_stderr() -> None:
    """Each line printed to stderr written in one piece: Python writes a line and its newline apart, so the lines
    of processes sharing one stderr (torchrun's, DataLoader workers) could run together (a pipe takes a write of
    under 4 KiB whole)."""
    try:
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
    except (AttributeError, ValueError, OSError):  # (a stderr that is no text file, or closed: left as it is)
        pass


@contextmanager
def one_line_errors(prog: str, oom_hint: str | None = None) -> Iterator[None]:
    """Turn what a user can cause into `prog: error: <one line>` and a non-zero exit: a UserError, a file the
    system refuses (full disk, name too long, no permission), memory that is not there (followed by `oom_hint`,
    the way forward in this script's own flags), a signal (exit 128 + N), stdout's reader gone (`| head`) or stdout
    closed (`>&-`): no message, exit 141, as a shell's own commands; stdout full (/dev/full): one line, after the
    work (GuardedStdout). The line is printable() (a file name with a newline or a terminal escape in it cannot
    break or drive the terminal). Ctrl-C and SIGTERM stop the work at once inside it (train.py's loop defers them
    to a step boundary)."""
    def fail(message: str) -> SystemExit:
        return SystemExit(f"{prog}: error: {printable(message)}")
    hint = f"; {oom_hint}" if oom_hint else ""
    previous_handlers = handle_signals(raise_interrupted)
    whole_lines_to_stderr()
    stdout = GuardedStdout.install()
    try:
        yield
        stdout.finish(prog)  # (what print() left in the buffer is written now: a failure is seen here, not at exit)
    except BrokenPipeError:  # a write to stdout past the guard whose reader has gone: quietly, the shell's status
        drop_stdout()
        raise SystemExit(STDOUT_GONE) from None
    except UserError as e:
        raise fail(str(e)) from None
    except Interrupted as e:
        print(f"{prog}: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except SystemExit as e:  # --help (0), or an error line: a failed stdout is told after a clean exit only
        if not e.code:
            stdout.finish(prog)
        raise
    except OSError as e:
        raise fail(describe_os_error(e)) from None
    except MemoryError:
        raise fail(f"out of memory{hint}") from None
    except RuntimeError as e:  # torch reports memory it cannot get as a RuntimeError (CUDA: OutOfMemoryError)
        if "DataLoader worker" in str(e):  # killed (the system's out-of-memory killer?), from anywhere in the loop
            raise fail(f"a worker process reading the images ended ({shorten(str(e).splitlines()[0].rstrip('. '))}"
                       f"); if the system ran out of memory, give fewer --workers") from None
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        raise fail(f"out of memory: {shorten(str(e).splitlines()[0])}{hint}") from None
    finally:
        restore_signals(previous_handlers)
        stdout.uninstall()


STDOUT_GONE = 141  # 128 + SIGPIPE: the status a shell's own commands end with when their reader has gone (| head)
_stdout_gone = False


def say(*values: object) -> None:
    """print() to stdout, whose reader may have gone (`predict.py ... | head`): then stdout is dropped (sent to
    the null device, so that nothing more fails or is reported), the script goes on with what it does besides
    printing (evaluate.py --show still draws its picture), and one_line_errors ends it with status 141."""
    try:
        print(*values, flush=True)
    except BrokenPipeError:
        drop_stdout()


def drop_stdout() -> None:
    global _stdout_gone
    _stdout_gone = True
    to_null(sys.stdout)


def to_null(stream: object) -> None:
    """Send what `stream` writes from now on (what its buffer holds included) to the null device, by its file
    descriptor: a stream without one (a test's capture) is left as it is."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def escape_unencodable(e: UnicodeError) -> tuple[str, int]:
    """The codec error handler "cli.printable": a character an encoding lacks written as printable() writes it,
    the byte of a file name that is not UTF-8 (a lone surrogate) as \\xNN, any other as \\uNNNN."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else ascii(c)[1:-1]
                   for c in e.object[e.start:e.end]), e.end


codecs.register_error("cli.printable", escape_unencodable)


class GuardedStdout:
    """sys.stdout while a script runs (one_line_errors installs it): a stdout that fails never stops the work nor
    prints a traceback. Its reader gone (`| head`: EPIPE) or closed (`>&-`): what is printed from then on is dropped
    (to the null device) and the script ends with status 141, quietly, as a shell's own commands; any other
    failure (a full disk, /dev/full, an I/O error): dropped too, and the script ends with one line naming it. A
    character stdout's encoding lacks (a file name that is not UTF-8, on a UTF-8 terminal) is written as
    printable() writes it. Anything else is the real stdout's (isatty, fileno, encoding)."""

    def __init__(self, target: object):
        self.target, self.error, self.owner, self.nowhere = target, None, True, False

    @classmethod
    def install(cls) -> "GuardedStdout":
        if isinstance(sys.stdout, cls):  # (one command run inside another, in one process: the outer one's)
            inner = cls(sys.stdout.target)
            inner.owner = False
            return inner
        guard = cls(sys.stdout if sys.stdout is not None else open(os.devnull, "w"))
        guard.nowhere = sys.stdout is None  # (no stdout at all, as Python leaves it for a closed one)
        sys.stdout = guard
        return guard

    def uninstall(self) -> None:
        self.flush()  # (now: a stdout that fails at the interpreter's exit prints Python's own lines)
        if self.owner and sys.stdout is self:
            sys.stdout = self.target

    def write(self, text: str) -> int:
        global _stdout_gone
        if _stdout_closed or self.nowhere:  # (>&-: file descriptor 1 is the null device, reserve_standard_fds)
            _stdout_gone = _stdout_gone or bool(text)
            return len(text)
        try:
            try:
                self.target.write(text)
            except UnicodeEncodeError:  # (raised before anything is written: the text again, escaped)
                encoding = getattr(self.target, "encoding", None) or "utf-8"
                self.target.write(text.encode(encoding, "cli.printable").decode(encoding))
        except OSError as e:
            self.failed(e)
        return len(text)

    def flush(self) -> None:
        try:
            self.target.flush()
        except OSError as e:
            self.failed(e)

    def failed(self, e: OSError) -> None:
        global _stdout_gone
        if isinstance(e, BrokenPipeError) or e.errno == errno.EBADF:  # no reader, or no stdout
            _stdout_gone = True
        elif self.error is None:
            self.error = e
        to_null(self.target)

    def finish(self, prog: str) -> None:
        """Flush; raise the exit that a failed stdout calls for (after the work: it was done all the same)."""
        global _stdout_gone
        self.flush()
        error, gone = self.error, _stdout_gone
        self.error, _stdout_gone = None, False  # (for the next command run in this process: its own status)
        if error is not None:
            raise SystemExit(f"{prog}: error: cannot write to stdout: {describe_os_error(error, filename=False)} "
                             f"(the command did its work; what it printed is incomplete)")
        if gone:
            raise SystemExit(STDOUT_GONE)

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)


def stdout_failed() -> bool:
    """Whether this command's stdout has failed (its reader gone, closed, full): a process it starts now should
    get the null device as its stdout rather than fail on it too."""
    return _stdout_gone or _stdout_closed or getattr(sys.stdout, "error", None) is not None


def reserve_standard_fds() -> bool:
    """Open the null device on each of file descriptors 0, 1 and 2 that is closed (`>&-`), before anything else
    opens a file: else the next file opened takes the free number, and what is written to stdout or stderr (by
    C code, a child process) lands in it, a checkpoint say. Python leaves sys.stdout None then: it becomes a
    stream on the null device, and GuardedStdout treats stdout as gone. Returns whether stdout was closed."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.append(fd)
    if 1 in closed and sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if 2 in closed and sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)
    return 1 in closed


_stdout_closed = reserve_standard_fds()  # at import: the scripts import cli first, before any file is opened
if getattr(sys.stderr, "errors", None) == "backslashreplace" and hasattr(sys.stderr, "reconfigure"):
    # Python's own stderr writes a lone surrogate as \udce9: a name's byte as printable() writes it, \xe9
    sys.stderr.reconfigure(errors="cli.printable")


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


def one_line(error: object, limit: int = 200) -> str:
    """An exception's (or any object's) text on one line, whitespace runs as one space, shortened to `limit`:
    what an error line may quote from a library's multi-line message."""
    return shorten(" ".join(str(error).split()), limit)


def require(module: str, needed_by: str, install: str | None = None) -> ModuleType:
    """Import an optional package's `module`, or say in one line what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{needed_by} needs {module.split('.')[0]}, an optional dependency: pip install "
                        f"{install or module.split('.')[0]}") from None


def printable(text: str) -> str:
    """text with every non-printable character (newline, escape, other terminal controls) written as Python writes
    them, \\xNN, \\uNNNN or \\UNNNNNNNN, and the bytes of a file name that is not UTF-8 (which reach Python as lone
    surrogates) as \\xNN: a class or file name printed to a terminal or drawn in a picture can then neither break a
    line nor drive the terminal, nor fail to encode."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that stand for no byte: escaped below
        pass
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def columns(text: str) -> int:
    """The terminal columns `text` takes: two for a wide character (Chinese, Japanese, Korean), none for a
    combining mark, one for any other."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
               for c in text)


def fit(text: str, width: int, right: bool = False) -> str:
    """`text` cut to at most `width` terminal columns, then padded with spaces to exactly `width` (on the left when
    `right`): a column of names lines up whatever their script."""
    used, end = 0, 0
    for end, c in enumerate(text, 1):
        if used + columns(c) > width:
            end -= 1
            break
        used += columns(c)
    pad = " " * (width - used)
    return pad + text[:end] if right else text[:end] + pad


# ---------------------------------------------------------------------------------------------------------------
# Outputs: what a script writes (a picture, an ONNX model) may replace only a file that nothing else needs

# What train.py writes into a run folder and what its scripts read: never replaced by a picture or a model
RUN_FILE_NAMES = ("last.pth", "best.pth", "metrics.csv", "results.json", "args.json")


def check_output(path: str | Path, inputs: tuple = (), what: str = "output", new_folder: bool = False) -> None:
    """Refuse, before any work, an output path whose file must not be replaced: a folder, a device, a FIFO or
    socket (or a symlink to one), one of the inputs (`inputs`: files, or folders whose every file is an input, such
    as the data being read), or a run file (a .pth, metrics.csv, results.json). A regular file that is none of
    those, or a path that does not exist (in a folder that does, unless new_folder: the caller creates it), is
    fine. Raises UserError. A path given as typed (a str) that ends with a slash names a folder, which would
    otherwise be written as a file of that name."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise UserError(f"the {what} {path} ends with {path[-1]}, as a folder does; give the file's name")
    path = Path(path)
    try:
        status = path.stat()  # follows symlinks: what a write to `path` would reach
    except FileNotFoundError:
        status = None
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {describe_os_error(e)}") from None
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise UserError(f"the {what} {path} is a folder; give the path of a file in it")
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise UserError(f"the {what} {path} is {kind_of_file(status.st_mode)}, not a regular file; it is not "
                        f"replaced: give the path of a new file")
    if not new_folder and not path.parent.is_dir():
        raise UserError(f"cannot write the {what} {path}: {path.parent} is not a folder")
    real = path.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        given = Path(given)
        if given.is_dir() and real.is_relative_to(given.resolve()):
            raise UserError(f"the {what} {path} is inside {given}, which this command reads; choose a path "
                            f"outside it")
        if status is not None and os.path.samefile(path, given):  # (samefile: hard links and symlinks too)
            raise UserError(f"the {what} {path} is also an input ({given}); choose another path")
    ours = [p.name for p in (path, real) if p.name in RUN_FILE_NAMES or p.suffix == ".pth"]
    if status is not None and ours:
        raise UserError(f"the {what} {path} would replace {ours[-1]}, a file of a training run; choose another "
                        f"path")


def new_folders(path: Path) -> list[Path]:
    """The folders that creating `path` (mkdir with parents) would make, deepest first: what remove_empty may take
    back."""
    return [p for p in (path, *path.parents) if not os.path.lexists(p)]


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: a command that failed leaves no empty folder it made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): what is above it is not empty either
            return


def kind_of_file(mode: int) -> str:
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A new temporary file next to `path`, to write the output to; renamed over `path` when the block ends
    without an exception, removed otherwise: a full disk, an error or a signal never leaves half a file, nor a
    temporary one. (A fresh name, created exclusively: a leftover or planted `path.tmp` is never followed.)"""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        yield tmp
        check_output(path)  # again: what the path names may have changed while the output was made
        os.replace(tmp, path)
    except OSError as e:  # (a full disk, a quota): about the output the user named, not our temporary name
        if e.filename in (None, str(tmp)) and e.errno is not None:
            e.filename = str(path)
        raise
    except UserError as e:
        if str(tmp) in str(e):
            raise type(e)(str(e).replace(str(tmp), str(path))) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def c_openable(path: str | Path, flags: int = os.O_RDONLY) -> Iterator[str]:
    """A name for `path` that C++ code can open (torch.load's mmap, torch.onnx.export, onnxruntime: they take the
    name encoded as UTF-8): the path itself, or, for a name that is not UTF-8 (Latin-1 bytes reach Python as lone
    surrogates, which that encoding refuses), /proc/self/fd/N of the file opened here with `flags`, for as long
    as the block runs (Linux: opening that name opens the file anew; where names must be UTF-8, as on macOS, the
    question does not arise)."""
    try:
        os.fspath(path).encode("utf-8")
        utf8 = True
    except UnicodeEncodeError:
        utf8 = False
    if utf8 or not os.path.isdir("/proc/self/fd"):
        yield os.fspath(path)
        return
    fd = os.open(path, flags)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def write_output(path: str | Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (atomic_output), flushed to disk."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def env_seconds(name: str, default: float, error: type[Exception]) -> float:
    """The seconds the environment variable `name` gives (`default` when unset), from 1 to 1e6; else an `error`
    saying what it must be."""
    try:
        seconds = float(os.environ.get(name, default))
        if not 1 <= seconds < 1e6:
            raise ValueError
    except ValueError:
        raise error(f"{name}={shorten(os.environ[name])} must be a number of seconds, at least 1") from None
    return seconds

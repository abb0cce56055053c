"""The run folder: one process owns it for the run's life (a lock), and only that run's files are ever written
to it: last.pth, best.pth, metrics.csv, results.json, curves.png."""
import contextlib
import csv
import hashlib
import io
import json
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

import cli
from checkpoint import (METRICS, RUN_FILES, CheckpointError, checkpoint_bytes, is_int, load_checkpoint,
                        for_inference, save_checkpoint, validate_for_resume, write_atomically)


class RunFolderError(cli.UserError):
    """A run folder that belongs to another run or process, or that cannot take the run's files."""


def run_position(ckpt: dict) -> tuple[int, int]:
    """(epochs completed, steps into the next): how far the run of a checkpoint has come."""
    return ckpt["state"]["epoch"], (ckpt["partial_epoch"] or {}).get("step", 0)


class RunFolder:
    """A run's folder: last.pth, best.pth, metrics.csv, results.json (and curves.png). One process owns it for the
    run's life. Where the system has flock (Linux, macOS), by an exclusive lock on the folder itself: unlike a lock
    file, nothing in the folder can be deleted to take it away, and the kernel drops it when the process dies, so a
    lock left by a killed run is never in the way; the .lock file only names the owner's process id, for the message
    to the next run. Elsewhere (Windows), the .lock file is the lock, holding the owner's process id: made whole
    under one name, taken over once that process has gone, and of several runs that start at once, however they
    start, exactly one owns it (claim_lock_file). Processes forked from the owner (DataLoader workers) never hold
    the lock (forget_locks). A folder that holds another run's files is never written to, and every save first
    checks that the path still names the folder locked (check_place): a folder moved or replaced while the run
    trains stops the run, and whatever is now at the old path is never written to."""

    # What a run writes into its folder: a folder that holds any of them (a user's own curves.png too) is not claimed
    FILES = (*RUN_FILES, "curves.png")

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id = path, run_id
        self.lock_fd, self.lock_file, self.identity = None, False, None
        self.created: list[Path] = []  # the folders lock() made (runs/ too, on a first run): release() may remove
        self.copied_from: Path | None = None  # claim(): the run folder this one is a copy of, if it is one

    def claim(self, resumed: dict | None, resumed_from: Path | None) -> None:
        """Lock the folder, then check, under the lock (so that two runs started at once cannot both pass), that
        it is empty of run files, or is the resumed checkpoint's own folder and not further on. Resuming into a
        new folder copies the run's best.pth and the resumed checkpoint (as last.pth) there, so that the folder
        holds the run whole and the final test finds best.pth."""
        self.lock()
        for name in RUN_FILES:  # what a SIGKILL in the middle of a save left behind (no live run holds the lock)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.path / (name + ".tmp")).unlink()
        found = [name for name in self.FILES if os.path.lexists(self.path / name)]
        own_folder = resumed_from is not None and resumed_from.parent.resolve() == self.path.resolve()
        if found and not own_folder:
            hint = (f"resume it with --resume {self.path / 'last.pth'} or " if "last.pth" in found and not resumed
                    else "resume into the checkpoint's own folder or " if resumed else "move them elsewhere or ")
            raise RunFolderError(f"{self.path} already holds run files ({', '.join(found)}); {hint}give --out-dir "
                                 f"a new folder")
        if own_folder and (self.path / "last.pth").exists():
            try:
                theirs = load_checkpoint(self.path / "last.pth")
                validate_for_resume(theirs, self.path / "last.pth")
            except CheckpointError:
                theirs = {}
            if theirs.get("run_id") != self.run_id:
                raise RunFolderError(f"{self.path / 'last.pth'} belongs to another run; resume from it, or give "
                                     f"--out-dir a new folder")
            if run_position(theirs) > run_position(resumed):
                raise RunFolderError(f"resuming here would rewind the run: {self.path / 'last.pth'} is further on "
                                     f"(epoch {run_position(theirs)[0]}); resume from it, or give --out-dir a new "
                                     f"folder")
        if resumed is not None and not own_folder:
            best = resumed_from.parent / "best.pth"
            if not best.is_file() or load_checkpoint(best).get("run_id") != self.run_id:
                raise RunFolderError(f"resuming into a new folder needs the run's best.pth next to "
                                     f"{resumed_from.name}; {best} is missing or belongs to another run")
            write_atomically(self.path / "best.pth", best.read_bytes())
            write_atomically(self.path / "last.pth", resumed_from.read_bytes())
        if resumed is not None:
            self.split_from_original(resumed, resumed_from.parent)

    def split_from_original(self, resumed: dict, source: Path) -> None:
        """A copy of a run folder (`source`, which holds the resumed checkpoint), resumed, becomes a run of its own:
        a new run_id (and so, in train.py, its own MLflow run), said in one line."""
        self.copied_from = self.original_of_copy(resumed, folder_identity(source))
        if self.copied_from is not None:  # its checkpoints name another run: from here on they name its own
            self.run_id = secrets.token_hex(8)
            print(f"note: {source} is a copy of the run in {self.copied_from}: resuming it as a run of its own (run "
                  f"id {self.run_id}; with --mlflow, its own MLflow run), the original left as it is",
                  file=sys.stderr, flush=True)

    def lock(self) -> None:
        self.created = cli.new_folders(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.identity = folder_identity(self.path)
        except OSError as e:
            file = next((p for p in (self.path, *self.path.parents) if p.exists() and not p.is_dir()), None)
            if e.errno in (errno.EEXIST, errno.ENOTDIR) and file is not None:  # (where it, or a parent, would be)
                raise RunFolderError(f"--out-dir {self.path}: {file} is a file, not a folder; give --out-dir a new "
                                     f"folder") from None
            raise RunFolderError(f"cannot write to {self.path}: {cli.describe_os_error(e, filename=False)}") from None
        try:
            import fcntl  # POSIX only: imported here, so that the scripts run where it is missing (Windows)
        except ImportError:
            fcntl = None
        if fcntl is None or not hasattr(os, "O_DIRECTORY"):
            self.lock_with_file()
        else:
            self.lock_with_flock(fcntl)
        _LOCKED.add(self)

    def lock_with_flock(self, fcntl: ModuleType) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise RunFolderError(f"cannot write to {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            found = read_lock_file(self.path / ".lock")
            raise self.busy(found and found[0]) from None
        try:
            read_lock_file(self.path / ".lock")  # whatever is there must be a regular file (a FIFO would block)
        except BaseException:
            os.close(fd)
            raise
        self.lock_fd = fd
        try:
            with os.fdopen(open_lock_file(self.path / ".lock", os.O_CREAT), "w") as f:
                f.truncate()
                f.write(str(os.getpid()))
        except BaseException:
            self.release()
            raise

    def lock_with_file(self) -> None:
        """The lock where there is no flock: .lock itself, naming this process (claim_lock_file)."""
        claim_lock_file(self.path / ".lock", lambda pid: self.busy(pid, lock_file=True))
        self.lock_file = True

    def busy(self, pid: int | None, lock_file: bool = False) -> RunFolderError:
        """The refusal of a folder another process holds. Where .lock is the lock, it names the way out too: the
        process it names may be another program that took a killed run's process id."""
        process = f" (process {pid})" if pid else ""
        stale = f"; if no run is using it, delete {self.path / '.lock'}" if lock_file else ""
        return RunFolderError(f"{self.path} is in use by another run{process}; wait for it to end, or choose "
                              f"another --out-dir{stale}")

    def release(self) -> None:
        """Unlock; a folder this run created and left empty (it failed before writing) is removed. A folder moved
        away is left as it is: what is at its old path now is not this run's."""
        if self.lock_fd is None and not self.lock_file:
            return
        _LOCKED.discard(self)
        in_place = self.in_place()
        if in_place and (self.lock_fd is not None or lock_file_names_me(self.path / ".lock")):
            (self.path / ".lock").unlink(missing_ok=True)  # before unlocking: the next owner writes its own
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        self.lock_fd, self.lock_file = None, False
        if in_place:  # (a folder moved away is not this run's to remove)
            cli.remove_empty(self.created)

    def in_place(self) -> bool:
        """Whether the path still names the folder this run locked (not moved, renamed, deleted or replaced)."""
        try:
            return folder_identity(self.path) == self.identity
        except OSError:
            return False

    def check_place(self) -> None:
        """Before every save: a RunFolderError if the folder is no longer at its path, naming where it is now
        (where the system can tell)."""
        if self.in_place():
            return
        where = self.where_now()
        now = (f"; its files are now in {where}: resume with --resume {Path(where) / 'last.pth'}" if where
               else "; it was deleted" if where == "" else "")
        raise RunFolderError(f"the run folder {self.path} was moved, renamed, deleted or replaced while the run "
                             f"trained; stopped, so that nothing is written to whatever is at that path now{now}")

    def where_now(self) -> str | None:
        """The folder's path now ("" if deleted), from the file descriptor that locks it; None where unknown."""
        if self.lock_fd is None:
            return None
        with contextlib.suppress(OSError, ImportError, AttributeError):
            if sys.platform == "darwin":
                import fcntl
                return os.fsdecode(fcntl.fcntl(self.lock_fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
            target = os.readlink(f"/proc/self/fd/{self.lock_fd}")
            return "" if target.endswith(" (deleted)") else target
        return None

    def save(self, ckpt: dict, *names: str) -> None:
        """save_checkpoint into the folder, after checking it is still in place; the checkpoint records the folder
        (`run_folder`: its path and identity), so that a copy of the folder knows it is one (original_of_copy).
        best.pth is for inference and --init-from: it is written without the optimizer's state (for_inference)."""
        self.check_place()
        device, inode = self.identity
        ckpt["run_folder"] = {"path": str(self.path.resolve()), "device": device, "inode": inode}
        save_checkpoint(ckpt, *(self.path / name for name in names if name != "best.pth"))
        if "best.pth" in names:
            save_checkpoint(for_inference(ckpt), self.path / "best.pth")

    @staticmethod
    def original_of_copy(resumed: dict, source: tuple[int, int]) -> Path | None:
        """The run folder that the folder of identity `source`, which holds the resumed checkpoint, is a copy of,
        or None: the checkpoint was saved in another folder, which is still there. (A folder moved, or copied and
        the original deleted, is the run's one folder: the same run.)"""
        record = resumed.get("run_folder")
        if not (isinstance(record, dict) and isinstance(record.get("path"), str) and is_int(record.get("device"))
                and is_int(record.get("inode"))) or (record["device"], record["inode"]) == source:
            return None
        try:
            original = folder_identity(Path(record["path"])) == (record["device"], record["inode"])
        except (OSError, ValueError):
            return None
        return Path(record["path"]) if original else None

    def check_space(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> None:
        """Room for the checkpoints at their largest: the old best.pth and last.pth, and the new one's temp file."""
        moments = {"SGD": 1, "Muon": 1}.get(type(optimizer).__name__, 2)  # per weight: momentum, or Adam's two
        need = 3 * checkpoint_bytes(model, 1 + moments + (ema is not None))
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise RunFolderError(f"not enough free space in {self.path}: the checkpoints need up to "
                                 f"{need / 2**20:.0f} MiB at once, {free / 2**20:.0f} MiB free")

    def write_metrics(self, history: list[dict], changes: list[dict]) -> None:
        """metrics.csv from the whole history, after every epoch (a few hundred bytes each): never read back, so
        on resume it is rebuilt from the checkpoint, and a run that fails in epoch 1 leaves no run file. Its last
        column, `changed`, says which flags a resume changed in that epoch, from which step."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, [*METRICS, "changed"], lineterminator="\n")
        writer.writeheader()
        for row in history:
            changed = "; ".join(f"{c['flags']} from step {c['step']}" for c in changes if c["epoch"] == row["epoch"])
            writer.writerow({**row, "changed": changed})
        self.check_place()
        write_atomically(self.path / "metrics.csv", text.getvalue().encode())

    def write_args(self, flags: dict) -> None:
        """args.json: the run's resolved flags (runargs.run_flags), what `train.py --config` takes back."""
        write_atomically(self.path / "args.json", (json.dumps(flags, indent=2) + "\n").encode())

    def write_results(self, text: str) -> None:
        self.check_place()
        write_atomically(self.path / "results.json", text.encode())


def folder_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of a folder: what names it, whatever its path (a copy has its own, a move keeps it)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def open_lock_file(path: Path, flags: int) -> int:
    """The .lock file opened for writing without following a symlink or waiting on a FIFO (O_NOFOLLOW, O_NONBLOCK
    where the system has them), and checked to be a regular file."""
    fd = os.open(path, os.O_WRONLY | flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file; delete it and try again")
    return fd


def read_lock_file(path: Path) -> tuple[int | None, str] | None:
    """What a .lock holds, or None where there is none: the process id it names (lock_owner), and a tag of this
    very file (of its content, inode and time: another file at the path has another tag). Never blocks nor follows
    a symlink: a FIFO, a device or a folder there is refused in one line (RunFolderError)."""
    try:
        status = os.lstat(path)
        if not stat.S_ISREG(status.st_mode):
            kind = "a symlink" if stat.S_ISLNK(status.st_mode) else cli.kind_of_file(status.st_mode)
            raise RunFolderError(f"{path} is {kind}, not the run's lock file; delete it and try again")
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)),
                       "rb") as f:
            status, content = os.fstat(f.fileno()), f.read(64)
    except FileNotFoundError:
        return None
    except OSError:  # (unreadable: it names no one)
        return None, "unreadable"
    if not stat.S_ISREG(status.st_mode):  # (replaced meanwhile)
        return read_lock_file(path)
    tag = (content, status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
    return lock_owner(content), hashlib.blake2b(repr(tag).encode(), digest_size=8).hexdigest()


def lock_owner(content: bytes) -> int | None:
    """The process id a .lock's content names: ASCII digits (whitespace around them allowed) of a number a process
    can have. Anything else names no one: empty, garbage, a sign, another script's digits, a number too large."""
    found = re.fullmatch(rb"\s*([0-9]{1,10})\s*", content)
    pid = int(found[1]) if found else 0
    return pid if 0 < pid < 2**31 else None


def lock_file_names_me(path: Path) -> bool:
    with contextlib.suppress(RunFolderError):
        found = read_lock_file(path)
        return found is not None and found[0] == os.getpid()
    return False


TAKEOVERS = 3  # how deep a claim on a stale lock file may itself be taken over (each depth: a taker killed)


def claim_lock_file(path: Path, busy: Callable[[int | None], RunFolderError], depth: int = 0) -> None:
    """Make `path` a lock file naming this process, or raise busy(pid) while a live process holds it. A new one
    comes into being whole (place_claim): of several processes that start at once, exactly one makes it. One that
    names no live process (its run killed, or empty, or garbage) is replaced only by the process that first
    claims path.<its tag> the same way: of all those that find it stale, exactly one, which checks it is still
    that very file (only that claim's holder may replace it) before it replaces it. A taker killed in between
    leaves its claim to be taken over in turn, TAKEOVERS deep; deeper, the way out is named (busy(None))."""
    for _ in range(100):  # (each turn: the file changed meanwhile; bounded, against a pathological file system)
        if place_claim(path, replace=False):
            return
        found = read_lock_file(path)
        if found is None:  # (released meanwhile)
            continue
        if found[0] is not None and process_alive(found[0]):
            raise busy(found[0])
        if depth == TAKEOVERS:
            break
        takeover = path.with_name(f"{path.name}.{found[1]}")
        claim_lock_file(takeover, busy, depth + 1)
        try:
            if read_lock_file(path) == found:
                place_claim(path, replace=True)
                return
        finally:
            with contextlib.suppress(OSError):
                takeover.unlink()
    raise busy(None)


def place_claim(path: Path, replace: bool) -> bool:
    """Give `path` a whole file naming this process, written under a fresh name first (so that no one ever reads
    it half made): True; False where `path` exists and not `replace`. link() gives it the name only if the name is
    free; where the file system has no hard links (FAT), rename() does, which on Windows refuses a name taken."""
    temp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    with os.fdopen(open_lock_file(temp, os.O_CREAT | os.O_EXCL), "w") as f:
        f.write(str(os.getpid()))
    try:
        if replace:
            os.replace(temp, path)
            return True
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError:
            if os.name != "nt":
                raise
            try:
                os.rename(temp, path)
            except FileExistsError:
                return False
        return True
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


_LOCKED: "weakref.WeakSet[RunFolder]" = weakref.WeakSet()  # the run folders this process holds


def forget_locks() -> None:
    """In a child forked from a process that holds a run folder (DataLoader workers: os.register_at_fork): close
    its descriptor of the folder. An flock is held while any process has that descriptor open: closed here, the
    lock is the run's own process's alone, ends with it, and a worker left behind never makes a resume refuse.
    The child never releases the folder, nor removes its .lock."""
    for folder in list(_LOCKED):
        if folder.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(folder.lock_fd)
        folder.lock_fd, folder.lock_file = None, False
    _LOCKED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_locks)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a .lock's owner). Windows: os.kill would end it, so ask the
    system through OpenProcess; it lives while its exit code is STILL_ACTIVE (259)."""
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

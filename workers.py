"""The DataLoader worker processes that stream.py reads image folders with: what they need from the system, how
they start and end, and the one line a run ends with when they cannot go on.

- A worker that stops answering (stopped, or hung on a file system) ends the run within WORKER_TIMEOUT seconds
  (default 300), in one line naming its process id. Ctrl-C and SIGTERM end a wait for a training batch at once,
  at the optimizer step boundary it is (runtime.interruptible).
- Each batch in flight is handed over in shared memory (/dev/shm on Linux), through a file descriptor. Too low a
  limit of descriptors (ulimit -n) is raised up to the hard limit before the workers start, and refused in one
  line beyond it; shared memory that is full, read-only or missing is one line naming the way forward (--workers
  0 reads the images in the main process; a container's /dev/shm is set with docker run --shm-size), and so is a
  TMPDIR too long for the socket the descriptors pass through.
- Workers end with the main process, however it ends (PR_SET_PDEATHSIG), and say nothing then; they never hold
  the run folder's lock (runfolder.forget_locks).
"""
import contextlib
import ctypes
import errno
import multiprocessing
import multiprocessing.queues
import multiprocessing.util
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import DataLoader, get_worker_info

import cli
import runtime
from formats import DataError

TIMEOUT = "WORKER_TIMEOUT"  # the environment variable: seconds the main process waits for a worker's next batch
SHM = "/dev/shm"  # where Linux keeps the shared memory batches are handed over in
IN_THIS_PROCESS = "give --workers 0 to read the images in this process"
PR_SET_PDEATHSIG = 1  # prctl(2)
SOCKET_PATH = 103 if sys.platform == "darwin" else 107  # bytes in an AF_UNIX socket's path (sun_path, less its NUL)
POLL = 1.0  # seconds: how often the main process, waiting for a batch, looks whether its worker was given up


def timeout() -> float:
    """The seconds WORKER_TIMEOUT gives (default 300): how long the main process waits for a worker's next batch
    before it gives the worker up (stopped, or hung on a file system that does not answer). Far longer than any
    one batch takes: decoding a batch of the largest photos takes seconds."""
    return cli.env_seconds(TIMEOUT, 300, DataError)


def make_room_for_descriptors(workers: int, prefetch: int) -> None:
    """Each batch in flight between the workers and this process holds a file descriptor per tensor, and each
    worker a few pipes: raise this process's limit of open files (ulimit -n; the workers inherit it) to what
    `workers` need, as far as its hard limit allows. Beyond it, one line: the workers would fail one by one."""
    try:
        import resource  # (POSIX only: Windows has no such limit)
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_descriptors() + workers * (2 * prefetch + 4) + 16
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    capped = hard != resource.RLIM_INFINITY and hard < need
    room = max(need, 4096) if hard == resource.RLIM_INFINITY else max(need, min(hard, 4096))
    try:
        if capped:
            raise ValueError
        resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
    except (ValueError, OSError):  # (beyond the hard limit, or beyond what the system lets a process open: macOS)
        raise DataError(f"{workers} worker processes (--workers) need about {need} open files, and this process may "
                        f"open only {hard if capped else soft} (ulimit -{'H' if capped else ''}n); raise the limit "
                        f"(as root: ulimit -n {room}; in a container: docker run --ulimit nofile={room}), or give "
                        f"fewer --workers (--workers 0 reads the images in this process)") from None


def check_socket_folder() -> None:
    """Each batch's descriptors are handed over through a Unix socket that multiprocessing makes in its temporary
    folder (TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX), and a socket's path has at most SOCKET_PATH bytes: under a
    longer TMPDIR every handover fails, and the run would end naming a dead worker. One line instead, before the
    workers start."""
    folder = multiprocessing.util.get_temp_dir()
    if len(os.fsencode(folder)) + len("/listener-XXXXXXXX") > SOCKET_PATH:
        raise DataError(f"the worker processes hand batches over through sockets in {folder}, and that path is too "
                        f"long for a socket's ({SOCKET_PATH} bytes at most); set a shorter TMPDIR (such as "
                        f"TMPDIR=/tmp), or {IN_THIS_PROCESS}")


def open_descriptors() -> int:
    """How many files this process has open (where the system lists them)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return 64


def quiet_broken_handovers() -> None:
    """Leave unsaid what the run already says in one line (StreamSet.read): when a worker dies while handing a
    batch over, or its main process dies while fetching one, multiprocessing's resource-sharing thread (which
    passes the batch's shared memory across) loses its peer and prints a traceback of its own, in either process
    (threading.excepthook, or sys.excepthook where that thread catches it itself); and torch's iterator, when its
    workers could not all start, cannot shut down what it never made when it is collected (sys.unraisablehook)."""
    if getattr(threading.excepthook, "quiet_broken_handovers", False):
        return
    previous_thread, previous_sys, previous_unraisable = threading.excepthook, sys.excepthook, sys.unraisablehook

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if not broken_handover(args.exc_type, args.exc_traceback):
            previous_thread(args)

    def sys_hook(exc_type: type, value: BaseException, tb: object) -> None:
        if not broken_handover(exc_type, tb):
            previous_sys(exc_type, value, tb)

    def unraisable_hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not (issubclass(unraisable.exc_type, AttributeError) and
                "_MultiProcessingDataLoaderIter.__del__" in repr(unraisable.object)):
            previous_unraisable(unraisable)
    thread_hook.quiet_broken_handovers = True
    threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, sys_hook, unraisable_hook


def broken_handover(exc_type: type, tb: object) -> bool:
    return issubclass(exc_type, (OSError, EOFError)) and any(
        "resource_sharer" in frame.filename for frame in traceback.extract_tb(tb))


def init_worker(worker_id: int) -> None:
    """What every DataLoader worker of the project starts with (worker_init_fn). Ctrl-C and SIGTERM are the main
    process's to handle: it stops at a step boundary, then ends its workers. The worker ends with the main
    process (end_with_parent) and never speaks for it (quiet_broken_handovers). A batch it cannot hand over
    (shared memory full, no descriptor left) becomes its error in the main process, which says it in one line,
    instead of a traceback here and a batch the main process would wait for in vain (hand_over_failure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Shared memory that fills as a batch is written kills the worker with SIGBUS (older torch: before any
    # error can be raised); torch's handler would print its own lines: the main process says it (failure)
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    end_with_parent()
    quiet_broken_handovers()
    multiprocessing.queues.Queue._on_queue_feeder_error = hand_over_failure  # (this process's copy of the class)


def end_with_parent() -> None:
    """Linux: the kernel kills this worker (SIGKILL) the moment its main process ends, however it ends: a worker
    left behind (its main process killed, or hung up on) would hold its memory, say what it cannot hand over, and
    never end while it is stopped. (DataLoader's own watchdog ends a worker only at its next poll, and a stopped
    one never.) PR_SET_PDEATHSIG follows the thread that forked the worker: StreamSet.read runs in the main one."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # (it ended before the prctl)
        os._exit(0)


def hand_over_failure(queue: multiprocessing.queues.Queue, error: Exception, item: object) -> None:
    """Queue._on_queue_feeder_error in a worker: the batch `item` could not be put into the queue to the main
    process (its shared memory or descriptor could not be made). It is replaced by the error, which the main
    process raises as it does an error in the worker itself (torch's ExceptionWrapper). Anything else that cannot
    be handed over ends the worker, which the main process reports."""
    from torch._utils import ExceptionWrapper
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int)
            and not isinstance(item[1], ExceptionWrapper)):
        os._exit(1)
    info = get_worker_info()
    where = f"in DataLoader worker process {info.id if info else '?'}"
    try:
        queue.put((item[0], ExceptionWrapper((type(error), error, error.__traceback__), where)))
    except Exception:  # (the queue closed meanwhile: nothing to tell, and no one to tell it to)
        os._exit(1)


class Reading:
    """One pass of a DataLoader over its batches, with its workers: started (what the system refuses them is one
    line), asked for each batch in turn (next), watched (Watchdog: a batch that does not come within
    WORKER_TIMEOUT ends the run), and ended however the pass ends (end)."""

    def __init__(self, loader: DataLoader):
        limit = timeout() if loader.num_workers else 0  # (a bad value: one line, before any worker starts)
        self.it = start(loader)
        self.watchdog = Watchdog(self.it, limit) if loader.num_workers else None

    def next(self, training: bool) -> tuple | None:
        """The next batch (None after the last). A wait for a training batch ends at once on Ctrl-C or SIGTERM
        (runtime.interruptible), and any wait once the watchdog has given its worker up; what the workers fail
        at is one line (failure)."""
        try:
            with runtime.interruptible() if training else contextlib.nullcontext(), self.waiting():
                while True:
                    try:
                        return next(self.it, None)
                    except RuntimeError as e:  # torch's own timeout, POLL: nothing is lost, the wait goes on
                        if not str(e).startswith("DataLoader timed out") or self.watchdog is None or \
                                self.watchdog.gave_up:
                            raise
        except (RuntimeError, OSError, EOFError) as e:
            message = self.failure(e)
            if message is None:
                raise
            raise DataError(message) from None

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around one wait for a batch: what the watchdog times."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.lock:
            self.watchdog.waiting, self.watchdog.waited = True, 0.0
        try:
            yield
        finally:
            with self.watchdog.lock:
                self.watchdog.waiting = False

    def failure(self, e: Exception) -> str | None:
        """The one line for `e`, raised while the workers were asked for a batch; None when it is not theirs (the
        caller raises it as it is)."""
        if self.watchdog is not None and self.watchdog.gave_up:
            who = f"the worker process {self.watchdog.gave_up}" if self.watchdog.gave_up > 0 else "a worker process"
            return (f"{who} reading the images did not hand a batch over for {self.watchdog.limit:g} s ({TIMEOUT}; "
                    f"stopped or hung?); the run stops. If reading a batch can take that long, raise {TIMEOUT}")
        refusal = system_refusal(e)
        if refusal:
            return refusal
        dead = ended(getattr(self.it, "_workers", []))
        if "SIGBUS" in dead or "Bus error" in str(e):
            return shared_memory_full()
        if dead or "DataLoader worker" in str(e):
            return (f"a worker process reading the images ended ({dead or cli.one_line(e)}); if the system ran out "
                    f"of memory, give fewer --workers")
        return None

    def end(self, at_once: bool) -> None:
        """End the workers now, not whenever the iterator is collected (end)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        end(self.it, at_once)


class Watchdog:
    """A thread that gives up a worker whose batch does not come. Once the main process has waited WORKER_TIMEOUT
    seconds for one batch, it kills the workers that are stopped (the main process may be waiting for one in the
    middle of a handover, where no timeout reaches it) and the one whose batch is awaited (a worker hung in a
    file system that does not answer, if the kill cannot end it, is still given up: the main process looks every
    POLL seconds), and notes which (gave_up: its process id, -1 where unknown). Time this process spent
    suspended (Ctrl-Z) is not counted: each tick counts for two at most."""
    TICK = 1.0

    def __init__(self, it: Iterator, limit: float):
        self.it, self.limit = it, limit
        self.lock = threading.Lock()
        self.waiting, self.waited, self.gave_up = False, 0.0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="worker-watchdog", daemon=True)
        self.thread.start()

    def watch(self) -> None:
        last = time.monotonic()
        while not self.done.wait(self.TICK):
            now = time.monotonic()
            with self.lock:
                if self.waiting:
                    self.waited += min(now - last, 2 * self.TICK)
                    if self.waited >= self.limit and not self.gave_up:
                        self.gave_up = self.give_up()
            last = now

    def give_up(self) -> int:
        workers = list(getattr(self.it, "_workers", []))
        task = getattr(self.it, "_task_info", {}).get(getattr(self.it, "_rcvd_idx", None), ())
        awaited = [workers[task[0]]] if len(task) == 1 and task[0] < len(workers) else []
        stopped = [w for w in workers if process_state(w.pid) in ("T", "t")]
        forget_workers(self.it)
        for w in stopped + awaited:
            w.kill()
        return (stopped + awaited)[0].pid if stopped + awaited else -1

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def process_state(pid: int) -> str:
    """A process's state letter from /proc (Linux; "" elsewhere): R running, S sleeping, D in I/O, T stopped."""
    with contextlib.suppress(OSError, IndexError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return ""


def forget_workers(it: Iterator) -> None:
    """Tell torch that the workers of `it` are going: its SIGCHLD handler would report each death as a failure."""
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data._utils.signal_handling import _remove_worker_pids
        _remove_worker_pids(id(it))
        it._worker_pids_set = False


def start(loader: DataLoader) -> Iterator:
    """iter(loader), its workers started. What the system refuses them (shared memory, descriptors) is one line,
    and the workers already started end."""
    before = set(multiprocessing.active_children())
    try:
        return iter(loader)
    except OSError as e:
        for w in set(multiprocessing.active_children()) - before:
            w.kill()  # (they ignore SIGTERM)
            w.join(timeout=2)
        raise DataError(system_refusal(e, starting=True) or
                        f"cannot start the worker processes: {cli.describe_os_error(e)}; {IN_THIS_PROCESS}") from None


def ended(workers: list) -> str:
    """Which of `workers` have ended, and how ("" if none). A worker killed (by the out-of-memory killer?) breaks
    its queue before its exit is seen: they are given a moment."""
    deadline = time.monotonic() + 1
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.monotonic()))
    return ", ".join(f"pid {w.pid}: " + (f"killed by {signal.Signals(-w.exitcode).name}" if w.exitcode < 0
                                         else f"exit status {w.exitcode}")
                     for w in workers if w.exitcode not in (None, 0))


def system_refusal(e: Exception, starting: bool = False) -> str | None:
    """The line for `e` when it is the system refusing the workers what they need: file descriptors, or shared
    memory that is full (or, `starting`, read-only or missing), told by its errno or by the worker's own
    traceback, which torch passes on as text. None for anything else."""
    text, code = str(e), getattr(e, "errno", None)
    if code in (errno.EMFILE, errno.ENFILE) or "Too many open files" in text:
        return (f"the worker processes ran out of file descriptors handing batches over; raise the limit (ulimit -n, "
                f"{open_limit()} now), or give fewer --workers (--workers 0 reads the images in this process)")
    if code == errno.ENOSPC or "No space left on device" in text or "unable to allocate shared memory" in text:
        return shared_memory_full()
    if starting and code in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOSYS):
        return (f"the worker processes need shared memory ({SHM}), which this system does not give "
                f"({cli.describe_os_error(e, filename=False)}); {IN_THIS_PROCESS}, or run where {SHM} can be "
                f"written (in a container: docker run --shm-size=1g)")
    return None


def shared_memory_full() -> str:
    return (f"the worker processes cannot hand batches over: shared memory ({shared_memory()}) is full; "
            f"{IN_THIS_PROCESS}, or fewer --workers or a smaller --batch-size, or more shared memory (in a "
            f"container: docker run --shm-size=1g)")


def open_limit() -> str:
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource
        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return "unknown"


def shared_memory() -> str:
    """How large the shared memory is and how much of it is free, where the system says."""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(SHM)
        return f"{SHM}: {size(usage.total)}, {size(usage.free)} free"
    return SHM


def size(n: int) -> str:
    return f"{n / 2**10:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def end(it: Iterator, at_once: bool) -> None:
    """End the workers of `it`. When the reading ends early (an error, a signal, a stalled worker, the consumer
    done), at once: each is killed (SIGKILL: they ignore SIGTERM, and a stopped or hung one would act on nothing
    else). Else torch's own shutdown, and a worker that would not end is killed. One that cannot die yet (in an
    I/O that does not return) is left to the kernel: the run does not wait for it, at exit either."""
    workers = list(getattr(it, "_workers", []))
    if at_once:
        forget_workers(it)
        for w in workers:
            w.kill()
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=2)
        if w.is_alive():  # (multiprocessing would wait for it at exit)
            multiprocessing.process._children.discard(w._popen)

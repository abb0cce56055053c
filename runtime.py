"""Devices and processes: which device runs, mixed precision, the torchrun process group, the stop signal, and
the CPU allocator setting. Every script picks its device here, so `--device auto` means the same everywhere."""
import argparse
import ctypes
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist

import cli

DEVICES = ("auto", "cpu", "cuda", "mps")
T = TypeVar("T")
AMP_MODES = ("off", "bf16", "fp16")


class DeviceError(cli.UserError):
    """A device, precision or process setup this machine cannot give."""


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda, then mps, then cpu (default: auto)")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name} is not available on this machine")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def autocast(amp: str, device: torch.device) -> ContextManager:
    """The forward passes' precision: float32 (off), or autocast to bf16 / fp16 where the device has it."""
    if amp == "fp16" and device.type != "cuda" or amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise DeviceError(f"--amp {amp} is not supported on {device.type}")
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS. By default every block over
    ~32 MB (a batch of activations) is a fresh mmap, returned to the OS when freed, so each training step on the
    CPU page-faults all of its activations in again (docs/performance.md: 14-19% of an AirNet step). True if applied."""
    if GLIBC is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(GLIBC.mallopt(m_mmap_max, 0)        # serve large blocks from the heap too, never from fresh mmaps
                and GLIBC.mallopt(m_trim_threshold, 2**31 - 1))  # give the heap back only above 2 GiB unused


def hand_back_freed_memory() -> None:
    """Give the memory glibc keeps after it was freed back to the system, now: a large image's decoding frames in a
    thread's own arena (folders), and the training process's heap before workers are forked from it (stream: kept,
    its pages are shared with the new workers, and each worker that allocates into them copies them)."""
    if GLIBC is not None:
        GLIBC.malloc_trim(0)


GLIBC = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None  # the C library this process runs on


# ---------------------------------------------------------------------------------------------------------------
# Processes: torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain run is rank 0 of 1.

def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*values: object, **kwargs) -> None:
    """print(), in rank 0 only: under torchrun one process speaks for all."""
    if rank_world()[0] == 0:
        print(*values, **kwargs)


def on_rank0(work: Callable[[], T]) -> T | None:
    """work() in rank 0 only (what one process does for all: claim the run folder, save, start the trackers).
    Under torchrun every process learns whether it failed and leaves with the same one line, instead of waiting
    for a peer that has gone (gloo's "Connection closed by peer"). Returns work()'s result in rank 0, else None."""
    rank, world = rank_world()
    result, error, message = None, None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # (a signal, a SystemExit, is not caught: every process gets its own)
            error = e
            message = str(e) if isinstance(e, cli.UserError) else cli.describe_os_error(e) \
                if isinstance(e, OSError) else f"rank 0 failed ({type(e).__name__})"
    if world > 1:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)  # (a str or None, between our own processes)
        message = shared[0]
    if error is not None:
        raise error
    if message is not None:
        raise cli.UserError(message)
    return result


def start_processes(device_name: str) -> int:
    """Join torchrun's process group when there is one. Returns the local rank (the GPU index)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return 0
        local_rank = int(os.environ["LOCAL_RANK"])
        int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]), os.environ["MASTER_ADDR"]  # (not torchrun)
    except (KeyError, ValueError):
        raise DeviceError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set, but not the rest of torchrun's "
                          f"environment (RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): start with torchrun, or "
                          f"unset WORLD_SIZE") from None
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    join_process_group("nccl" if cuda else "gloo", local_rank if cuda else None)
    return local_rank


JOIN_TIMEOUT = "DIST_JOIN_TIMEOUT"  # the environment variable: seconds to wait for the other processes


def join_timeout() -> float:
    """The seconds DIST_JOIN_TIMEOUT gives (default 60)."""
    try:
        timeout = float(os.environ.get(JOIN_TIMEOUT, "60"))
        if not 0 < timeout < 1e6:
            raise ValueError
    except ValueError:
        raise DeviceError(f"{JOIN_TIMEOUT}={os.environ[JOIN_TIMEOUT]} must be a number of seconds") from None
    return timeout


COLLECTIVE_TIMEOUT = "DIST_TIMEOUT"  # the environment variable: seconds a process waits for the others in a collective


def collective_timeout() -> timedelta:
    """The seconds DIST_TIMEOUT gives (default 300): how long a process waits for the others at an all-reduce or
    broadcast before it gives them up (stopped, hung or gone). Longer than any one step, save or validation."""
    return timedelta(seconds=cli.env_seconds(COLLECTIVE_TIMEOUT, 300, DeviceError))


def lost_peer(e: RuntimeError, resume: str | None) -> None:
    """Raise a one-line DeviceError when `e` is a collective that failed because another process of the group is
    gone (killed, crashed) or did not answer within DIST_TIMEOUT (stopped, hung): gloo's own message is a C++ source
    line and a stack. `resume`: the command that resumes the run (None: nothing saved yet). Any other error
    returns, for the caller to raise."""
    text = str(e)
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text
                                         or "closed by peer" in text or "Timed out waiting" in text):
        return
    rank, world = rank_world()
    what = (f"did not answer for {collective_timeout().total_seconds():g} s ({COLLECTIVE_TIMEOUT}; stopped or hung?)"
            if "Timed out" in text or "timed out" in text else "has ended (killed or failed)")
    then = f"resume from the last completed epoch with: {resume}" if resume else "start the run again"
    raise DeviceError(f"rank {rank} of {world}: another process of the group {what}; this one stops too: "
                      f"{then}") from None


def process_store(world: int, rank: int, timeout: float) -> dist.Store:
    """The store the processes meet at, MASTER_ADDR:MASTER_PORT: served by rank 0, or, where torchrun's agent serves
    it itself (TORCHELASTIC_USE_AGENT_STORE: its static rendezvous, --master_addr/--master_port, in some torch
    versions), by the agent, every process its client under a prefix of its own, as torch's env:// rendezvous
    does."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timedelta(seconds=timeout),
                          wait_for_workers=not agent)
    if agent:
        return dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def join_process_group(backend: str, cuda_device: int | None) -> None:
    """dist.init_process_group, waiting at most DIST_JOIN_TIMEOUT seconds (default 60) for every process of
    WORLD_SIZE to arrive (torch's own wait: 30 minutes, deaf to Ctrl-C). The wait runs in a thread, so that the main
    thread still takes SIGINT and SIGTERM; after 2 s it says what it waits for. What c10d logs meanwhile (a
    retry, with a C++ stack) is kept from the terminal: the outcome is our one line."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout, timeout_collective = join_timeout(), collective_timeout()
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)  # (the current device is the thread's own)
            store = process_store(world, rank, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout_collective)
            store.set_timeout(timedelta(minutes=30))  # torch's default from here on (setting up process groups)
            outcome.append(None)
        except BaseException as e:  # handed to the main thread
            outcome.append(e)

    sys.stderr.flush()
    terminal, log = os.dup(2), tempfile.TemporaryFile()
    os.dup2(log.fileno(), 2)  # c10d's C++ logging: kept, shown only if something unexpected goes wrong
    try:
        thread = threading.Thread(target=join, name="join-process-group", daemon=True)
        thread.start()
        thread.join(2)
        if thread.is_alive():
            os.write(terminal, f"{Path(sys.argv[0]).name}: rank {rank} of WORLD_SIZE={world}: waiting up to "
                               f"{timeout:g} s ({JOIN_TIMEOUT}) for the other processes at {address}...\n".encode())
        while thread.is_alive():
            thread.join(0.2)  # (a signal's handler runs here, in the main thread)
    finally:
        os.dup2(terminal, 2)
        os.close(terminal)
    error = outcome[0]
    if isinstance(error, dist.DistError):
        what = cli.one_line(error)
        raise DeviceError(f"the processes of WORLD_SIZE={world} did not all join at {address} within {timeout:g} s "
                          f"({what}); start every one with torchrun (or raise {JOIN_TIMEOUT})") from None
    if error is not None:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace"))
        raise error


def leave_processes() -> None:
    """End this torchrun process. NCCL: destroy the process group. gloo: do not; exit right away with the code of
    the exception in flight (0 if none): on torch 2.4 destroying a gloo group can deadlock against gloo's own
    threads (they free the last collective's tensors, which needs the GIL that the destroying thread holds).
    A refusal's line reaches stderr whole, beside the other processes' same line (cli.whole_lines_to_stderr)."""
    if dist.get_backend() != "gloo":
        dist.destroy_process_group()
        return
    error = sys.exc_info()[1]
    code = error.code if isinstance(error, SystemExit) else 0 if error is None else 1
    if error is not None and not isinstance(error, SystemExit):
        traceback.print_exception(error)
    if isinstance(code, str):  # sys.exit("message"): print it, as Python would
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


AGAIN_AFTER = 1.0  # seconds after a first signal from which a second one stops the run at once


class StopSignal:
    """SIGINT/SIGTERM during training: noted, not acted on at once, so that the loop can finish its optimizer
    step and save a checkpoint that resumes exactly. Outside `deferred()` they stop the process at once
    (cli.Interrupted). Under torchrun all processes decide together, at the same step, with a CPU all-reduce
    over a gloo group: no GPU sync per step, and a signal to any one process stops them all.
    Nothing can keep a noted signal from stopping the run: one that comes while the loop waits for the DataLoader
    workers' next training batch ends the wait at once, at that step boundary (interruptible, until_interrupted);
    a second one, a second or more after the first, stops the process at once, unsaved (cli.Interrupted). (Two
    at once are one: torchrun, and other launchers, pass the terminal's Ctrl-C on to processes that got it too.)"""

    active: "StopSignal | None" = None  # the one whose deferred() is in force: what interruptible() consults

    def __init__(self):
        self.signum = 0
        self.group = dist.new_group(backend="gloo", timeout=collective_timeout()) if dist.is_initialized() else None
        self.flag = torch.zeros((), dtype=torch.int32)
        self.noted_at: float | None = None  # when this process got its first signal (time.monotonic)
        self.waiting = False  # inside interruptible()

    def note(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.noted_at is None:
            self.noted_at = now
            if not self.signum:
                self.signum = signum
                print(f"\n{signal.Signals(signum).name}: stopping after this optimizer step... (again to stop at "
                      f"once, without saving)", file=sys.stderr, flush=True)
        elif now - self.noted_at >= AGAIN_AFTER:
            raise cli.Interrupted(signum)
        if self.waiting:
            raise cli.Interrupted(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        previous, outer = cli.handle_signals(self.note), StopSignal.active
        StopSignal.active = self
        try:
            yield
        finally:
            StopSignal.active = outer
            cli.restore_signals(previous)

    def until_interrupted(self, steps: Iterator[T]) -> Iterator[T]:
        """`steps` (the optimizer steps' batches), ended by a signal that interrupted the making of the next one
        (the wait for the workers' batches: interruptible): the run stops at this step boundary. Under torchrun
        every process stops at the same one: requested() here is the all-reduce the others meet at this step."""
        try:
            yield from steps
        except cli.Interrupted:
            self.requested()

    def requested(self) -> bool:
        """True once any process got a signal; every process gets the same answer at the same step."""
        if self.group is not None:
            self.flag.fill_(self.signum)
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
            if int(self.flag) == 0:  # decide on the reduced value: a signal may arrive during the reduce
                return False
            self.signum = self.signum or int(self.flag)
        return self.signum != 0


@contextmanager
def interruptible() -> Iterator[None]:
    """Around a wait, at an optimizer step boundary, for what other processes make (the DataLoader workers' next
    training batch: stream.StreamSet.read): a signal noted before it or during it ends the wait at once with
    cli.Interrupted, and StopSignal.until_interrupted stops the run at this step, as requested() would. So a
    worker that has stopped answering cannot keep a run from stopping. Outside StopSignal.deferred(), a signal
    ends any wait already."""
    stop = StopSignal.active
    if stop is None:
        yield
        return
    stop.waiting = True  # (first: a signal from here on raises in note())
    try:
        if stop.signum:
            raise cli.Interrupted(stop.signum)
        yield
    finally:
        stop.waiting = False

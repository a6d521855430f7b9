"""Local workers: the one spawner of the launcher, the tests and the notebooks.

:func:`spawn_workers` starts one process per rank and watches them:

- on Linux the workers fork from multiprocessing's fork server, which
  imported torch, PyG and this package once (their ``import`` costs
  seconds of CPU in every spawned process); workers that use CUDA are
  spawned (see :func:`start_context`);
  each worker takes the environment of the call that starts it, not the
  server's (elsewhere they are spawned);
- every worker dies with the process that started it (a thread waiting on
  that process's pidfd for a forked worker, whose parent is the server;
  ``PR_SET_PDEATHSIG`` for a spawned one on Linux, a thread watching the
  parent's pid elsewhere), so a launcher killed by an OOM killer or a batch
  scheduler leaves no worker behind;
- a worker that fails writes ``<Type>: <message>`` and its traceback to its
  report file and leaves at once, without tearing down its process groups
  (which can block on a peer's unfinished work): its sockets close, so its
  peers fail at once instead of at their time-out;
- from the first failure (a report or a non-zero exit), the others get
  `grace_s` to stop on their own; whatever still runs is killed, and
  :class:`WorkerFailed` names the rank that failed first and the cause.

:func:`run_workers` runs a function in a gloo process group on loopback, for
tests, benchmarks and notebooks that drive the distributed layers directly.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
#: What the fork server imports once, before it forks any worker.
FORK_SERVER_PRELOAD = ["pyg_adaqp.train"]


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message names its rank and the cause.

    Attributes:
        rank (int): The worker that failed first.
    """

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a port in use fails rank 0 at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: int) -> None:
    """Makes this process die (SIGKILL) when `parent_pid`, its parent, exits.

    On Linux the kernel sends the signal (``prctl(PR_SET_PDEATHSIG)``); if
    the parent is already gone when this runs, the process exits at once.
    Elsewhere a daemon thread checks the parent's pid every second.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the prctl
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def die_with(pid: int) -> None:
    """Makes this process die (SIGKILL) when process `pid` exits.

    :func:`die_with_parent` when `pid` is the parent.  Otherwise (a worker
    forked by the fork server, whose parent is the server) a daemon thread
    waits on a pidfd of `pid` (Linux 5.3 and later; on older kernels it
    checks every second that `pid` exists); if `pid` is already gone, the
    process exits at once.
    """
    if pid == os.getppid():
        die_with_parent(pid)
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd_open (Linux before 5.3)
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once `pid` has exited
        else:
            while os.path.exists(f"/proc/{pid}"):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def start_context(start_method: str | None = None):
    """The multiprocessing context workers start from: the fork server on Linux, else spawn.

    The server is one per process, started at the first worker with
    :data:`FORK_SERVER_PRELOAD` imported.  `start_method` (``"spawn"``,
    ``"forkserver"``) overrides the choice: workers that use CUDA are spawned,
    since on a GPU machine (an H200, torch 2.11, PyG 2.8) workers forked
    from the server failed CUDA's initialisation (``CUDA error:
    initialization error``): importing ``torch_geometric`` there already
    initialises the driver (a child forked after ``import torch`` alone
    initialises CUDA, one forked after ``import torch_geometric`` does not),
    and a forked child cannot initialise it again.
    """
    if start_method is not None:
        return mp.get_context(start_method)
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def failure_text(err: BaseException) -> str:
    """``<Type>: <message>``, a blank line and the traceback of `err` (being handled)."""
    return f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"


def report_failure(path: Path, err: BaseException) -> None:
    """Writes :func:`failure_text` to `path` (a worker's report)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(failure_text(err))
    os.replace(tmp, path)  # the watcher never reads half a report


def _child(rank: int, parent_pid: int, environ: dict[str, str], report_dir: str,
           target: Callable, args: tuple) -> None:
    die_with(parent_pid)
    # A forked worker holds the fork server's environment; the caller's is the one meant
    # (e.g. MASTER_PORT, set per launch).
    os.environ.clear()
    os.environ.update(environ)
    report_dir = Path(report_dir)
    try:
        result = target(rank, *args)
        if result is not None:
            torch.save(result, report_dir / f"rank{rank}.pt")
    except BaseException as err:
        try:
            report_failure(report_dir / f"rank{rank}.err", err)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(1)


def spawn_workers(target: Callable, world_size: int, args: Sequence[Any] = (), *,
                  grace_s: float, deadline_s: float | None = None,
                  start_method: str | None = None) -> list[Any]:
    """Runs ``target(rank, *args)`` in `world_size` processes and watches them.

    Args:
        target (Callable): Importable by the children (a module-level function).
        world_size (int): Number of processes.
        args (Sequence): Further arguments, picklable.
        grace_s (float): After the first failure, how long the others have
            to stop on their own before they are killed.
        deadline_s (float, optional): Kill every worker still running this
            long after the start. (default: :obj:`None`, no bound)
        start_method (str, optional): ``"spawn"`` or ``"forkserver"``, see
            :func:`start_context`. (default: :obj:`None`, the fork server on
            Linux)

    Returns:
        What each rank's `target` returned (:obj:`None` results are not sent
        back).

    Raises:
        WorkerFailed: If a worker raised, died or was killed.
    """
    ctx = start_context(start_method)
    with tempfile.TemporaryDirectory(prefix="adaqp-workers-") as report_dir:
        procs = [ctx.Process(target=_child, args=(r, os.getpid(), dict(os.environ), report_dir,
                                                  target, tuple(args)), daemon=False)
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            _watch(procs, Path(report_dir), grace_s, deadline_s)
        finally:
            # Whatever stopped the watch (e.g. Ctrl-C), leave no worker behind.
            for p in procs:
                if p.pid is not None:
                    if p.is_alive():
                        p.kill()
                    p.join()
        results = []
        for r in range(world_size):
            path = Path(report_dir, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if path.exists() else None)
        return results


def _watch(procs: list, report_dir: Path, grace_s: float, deadline_s: float | None) -> None:
    """Waits for the workers; kills them `grace_s` after the first failure or at the deadline."""
    start = time.monotonic()
    failed_at = None
    killed: dict[int, str] = {}
    exited: dict[int, float] = {}  # when each exit was first seen (time.time(), as the reports)
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank not in exited and p.exitcode is not None:
                exited[rank] = time.time()
        if failed_at is None and (any(p.exitcode not in (None, 0) for p in procs)
                                  or any(report_dir.glob("rank*.err"))):
            failed_at = now
        if failed_at is not None and now - failed_at > grace_s:
            reason = f"still running {grace_s:g} s after the first failure, killed"
        elif deadline_s is not None and now - start > deadline_s:
            reason = f"still running {deadline_s:g} s after the start, killed"
        else:
            time.sleep(0.05)
            continue
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                killed[rank] = reason
        for p in procs:
            p.join()
    for rank, p in enumerate(procs):
        p.join()
        exited.setdefault(rank, time.time())
    if any(p.exitcode != 0 for p in procs):
        raise WorkerFailed(*_failure(procs, report_dir, killed, exited))


def _failure(procs: list, report_dir: Path, killed: dict[int, str],
             exited: dict[int, float]) -> tuple[str, int]:
    """What went wrong, starting with the worker that failed first, and its rank."""
    reports = {int(f.stem.removeprefix("rank")): f for f in report_dir.glob("rank*.err")}
    causes = {}
    for rank, p in enumerate(procs):
        if rank in reports:
            causes[rank] = reports[rank].read_text()
        elif rank in killed:
            causes[rank] = killed[rank]
        elif p.exitcode is not None and p.exitcode < 0:
            causes[rank] = f"killed by signal {-p.exitcode} ({signal.Signals(-p.exitcode).name})"
        elif p.exitcode != 0:
            causes[rank] = f"exited with code {p.exitcode} without reporting an error"
    # The first event is the cause: a report, or a death without a word (a
    # signal, the OOM killer), whose peers only report later that it left.
    # Workers the watcher killed come last.
    events = {r: reports[r].stat().st_mtime for r in reports}
    events.update({r: exited[r] for r in causes if r not in reports and r not in killed})
    first = min(events, key=events.get) if events else min(killed)
    message, _, trace = causes[first].partition("\n\n")
    others = [f"rank {r}: {causes[r].splitlines()[0][:300]}" for r in causes if r != first]
    text = f"worker rank {first} failed: {message}"
    if others:
        text += "\nthe other workers stopped too: " + "; ".join(others)
    return text + (f"\n\n{trace}" if trace else ""), first


def _in_process_group(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable,
                      args: tuple) -> Any:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    result = fn(rank, world_size, *args)
    dist.barrier()
    dist.destroy_process_group()
    return result


def run_workers(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` in `world_size` local gloo workers.

    Every worker runs with one intra-op thread in a gloo process group on
    loopback whose collectives time out after `timeout_s`.  `fn` must be
    importable by the children (a module-level function of an importable
    module, or of a script with an ``if __name__ == "__main__":`` guard).

    Returns:
        The workers' results by rank.

    Raises:
        WorkerFailed: With the failing worker's traceback if any fails, or
            if they are not done `timeout_s` (plus 30 s of start-up: ``import
            torch`` costs seconds per process) after the start.
    """
    return spawn_workers(_in_process_group, world_size,
                         (world_size, free_port(), timeout_s, fn, args),
                         grace_s=timeout_s, deadline_s=timeout_s + 30)

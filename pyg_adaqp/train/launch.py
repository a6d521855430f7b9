"""Starting workers: local spawn (``world_size=N``) or ``torchrun``.

All distributed state (ranks, devices, process groups) is set up here and
nowhere else.  Start-up and every collective run under ``trainer.timeout_s``.
The launcher of local workers checks the dataset and the checkpoint to
resume from before it starts them, watches them, and when one raises or
dies, gives the others ``timeout_s`` to stop (they fail at once when a peer
leaves), kills what is left, and raises :class:`WorkerFailed` naming the
rank that failed first and the cause.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyg_adaqp.data import check_dataset, load_dataset
from pyg_adaqp.partition import (
    PartitionError,
    graph_fingerprint,
    load_partition,
    partition_graph,
    read_manifest,
)
from pyg_adaqp.train.checkpoint import load_resume_point
from pyg_adaqp.train.config import Config
from pyg_adaqp.train.workers import free_port

if TYPE_CHECKING:
    from pyg_adaqp.train.trainer import EpochHook


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message names its rank and the cause.

    Attributes:
        rank (int): The worker that failed first.
    """

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def prepare_partitions(cfg: Config, part_dir: Path, num_parts: int) -> None:
    """Checks the dataset and partitions it into `part_dir` unless a matching partition is there.

    Raises:
        DatasetError: If the dataset cannot be trained on (see
            :func:`~pyg_adaqp.data.check_dataset`).
        ValueError: If there are more workers than nodes.
    """
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
    check_dataset(data, d.name)
    if num_parts > data.num_nodes:
        raise ValueError(f"world_size={num_parts} exceeds the {data.num_nodes} nodes of dataset "
                         f"{d.name!r}: every worker must own at least one node")
    fingerprint = graph_fingerprint(data)
    try:
        manifest = read_manifest(part_dir)
    except PartitionError:
        manifest = None  # missing or unreadable: partition anew
    if manifest is not None and (manifest["fingerprint"], manifest["num_parts"],
                                 manifest["seed"]) == (fingerprint, num_parts, cfg.seed):
        return
    partition_graph(data, num_parts, seed=cfg.seed, out_dir=part_dir)


def _devices(cfg: Config, local_rank: int, local_world: int) -> tuple[torch.device, str]:
    """The worker's device and the process-group backend."""
    if cfg.device == "cpu":
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise RuntimeError("config field 'device' is 'cuda', but no CUDA device is available")
    count = torch.cuda.device_count()
    device = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(device)
    # NCCL needs one GPU per worker; workers sharing a GPU talk over gloo.
    return device, "nccl" if count >= local_world else "gloo"


def run_worker(rank: int, world_size: int, cfg: Config, run_dir: Path, part_dir: Path,
               local_rank: int, local_world: int, prepare: bool,
               on_epoch_end: Sequence[EpochHook] = (), error_file: Path | None = None) -> None:
    """One worker: joins the process group, loads its part and trains.

    A failure is written to `error_file` (if given) *before* the worker
    leaves the process group: its peers fail as soon as it leaves, and the
    launcher names the worker that reported first.
    """
    from pyg_adaqp.train.report import RunReport
    from pyg_adaqp.train.trainer import Trainer, WorkerContext

    try:
        torch.set_num_threads(cfg.trainer.num_threads)
        device, backend = _devices(cfg, local_rank, local_world)
        timeout = timedelta(seconds=cfg.trainer.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        if prepare and rank == 0:
            prepare_partitions(cfg, part_dir, world_size)
        # Rank 0 checked (or made) the partition against the dataset; every
        # other rank loads only a part matching that graph, so a stale copy
        # on another machine is rejected instead of silently used.
        box = [read_manifest(part_dir)["fingerprint"] if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        graph = load_partition(part_dir, rank, num_parts=world_size, fingerprint=box[0])
        # The halo exchange gets its own group: its point-to-point traffic and
        # the gradient all-reduce on the default group can never interleave.
        exchange_group = dist.new_group(backend=backend, timeout=timeout)
        report = None
        if rank == 0:
            report = RunReport(cfg, run_dir, world_size, progress=cfg.trainer.progress)
        ctx = WorkerContext(rank, world_size, device, exchange_group)
        Trainer(cfg, graph, ctx, report, checkpoint_dir=run_dir / "checkpoints",
                on_epoch_end=on_epoch_end).fit()
        dist.barrier()
    except BaseException as err:
        if error_file is not None:
            error_file.write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned(rank: int, world_size: int, cfg: Config, run_dir: Path, part_dir: Path,
             error_dir: Path, on_epoch_end: Sequence[EpochHook]) -> None:
    try:
        run_worker(rank, world_size, cfg, run_dir, part_dir, rank, world_size, prepare=False,
                   on_epoch_end=on_epoch_end, error_file=error_dir / f"rank{rank}.err")
    except BaseException:
        raise SystemExit(1)  # the error is in the file; no second traceback on stderr


def launch(cfg: Config, run_dir: Path, on_epoch_end: Sequence[EpochHook] = ()) -> None:
    """Runs the training job described by `cfg`, writing to `run_dir`.

    Args:
        cfg (Config): The run's configuration.
        run_dir (Path): Where metrics, summary, plots and checkpoints go.
        on_epoch_end (Sequence[Callable], optional): Hooks every worker calls
            as ``hook(trainer, epoch)`` after each epoch (see
            :class:`~pyg_adaqp.train.trainer.Trainer`); local workers are
            spawned, so they must be picklable (e.g. module-level functions).
            (default: :obj:`()`)

    Raises:
        WorkerFailed: If a worker raised or died, naming its rank and the
            cause, once every worker has stopped.
        DatasetError: If the dataset cannot be trained on.
        CheckpointError: If ``trainer.resume`` holds no valid checkpoint.
    """
    run_dir = Path(run_dir)
    part_dir = Path(cfg.partition_dir) if cfg.partition_dir else run_dir / "partitions"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        run_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), cfg, run_dir,
                   part_dir, int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", 1)), prepare=True,
                   on_epoch_end=on_epoch_end)
        return
    if cfg.trainer.resume:
        # Fail before starting anything, and resume every worker from the same file.
        source, _ = load_resume_point(cfg.trainer.resume)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                   resume=str(source)))
    prepare_partitions(cfg, part_dir, cfg.world_size)
    with tempfile.TemporaryDirectory(prefix="adaqp-errors-") as errors:
        _spawn_and_watch(cfg, run_dir, part_dir, Path(errors), on_epoch_end)


def _spawn_and_watch(cfg: Config, run_dir: Path, part_dir: Path, error_dir: Path,
                     on_epoch_end: Sequence[EpochHook]) -> None:
    world_size = cfg.world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(r, world_size, cfg, run_dir, part_dir,
                                                error_dir, on_epoch_end), daemon=False)
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        _watch(procs, error_dir, cfg.trainer.timeout_s)
    finally:
        # Whatever stopped the watch (e.g. Ctrl-C), leave no worker behind.
        for p in procs:
            if p.pid is not None:
                if p.is_alive():
                    p.kill()
                p.join()


def _watch(procs: list, error_dir: Path, timeout_s: float) -> None:
    """Waits for the workers; on the first failure, gives the rest `timeout_s` to stop."""
    failed_at = None
    killed: set[int] = set()
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > timeout_s:
            for rank, p in enumerate(procs):
                if p.is_alive():
                    p.kill()
                    killed.add(rank)
        time.sleep(0.05)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise WorkerFailed(*_failure(procs, error_dir, killed, timeout_s))


def _failure(procs: list, error_dir: Path, killed: set[int],
             timeout_s: float) -> tuple[str, int]:
    """What went wrong, starting with the worker that failed first, and its rank."""
    reports = {int(f.stem.removeprefix("rank")): f for f in error_dir.glob("rank*.err")}
    causes = {}
    for rank, p in enumerate(procs):
        if p.exitcode == 0:
            continue
        if rank in reports:
            causes[rank] = reports[rank].read_text()
        elif rank in killed:
            causes[rank] = f"still running {timeout_s:g} s after the first failure, killed"
        elif p.exitcode < 0:
            causes[rank] = f"killed by signal {-p.exitcode} ({signal.Signals(-p.exitcode).name})"
        else:
            causes[rank] = f"exited with code {p.exitcode} without reporting an error"
    # A worker that died without a word (a signal, the OOM killer) is the cause:
    # its peers only report that it left.  Otherwise the first report is.
    silent = [r for r in causes if r not in reports and r not in killed]
    first = silent[0] if silent else min(reports, key=lambda r: reports[r].stat().st_mtime_ns)
    message, _, trace = causes[first].partition("\n\n")
    others = [f"rank {r}: {causes[r].splitlines()[0][:300]}" for r in causes if r != first]
    text = f"worker rank {first} failed: {message}"
    if others:
        text += "\nthe other workers stopped too: " + "; ".join(others)
    return text + (f"\n\n{trace}" if trace else ""), first

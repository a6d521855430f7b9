"""Starting workers: local spawn (``world_size=N``) or ``torchrun``.

All distributed state (ranks, devices, process groups) is set up here and
nowhere else.  Start-up and every collective run under ``trainer.timeout_s``.
The launcher of local workers checks the dataset and the checkpoint to
resume from before it starts them, and runs them with
:func:`~pyg_adaqp.train.workers.spawn_workers`: they die with the launcher,
and when one raises or dies, the others get ``timeout_s`` to stop (they fail
at once when a peer leaves), what is left is killed, and
:class:`~pyg_adaqp.train.workers.WorkerFailed` names the rank that failed
first and the cause.  Under ``torchrun`` a worker dies with its agent, and a
worker whose peer died or became unreachable names that rank (see
:mod:`~pyg_adaqp.train.liveness`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from pyg_adaqp.data import check_dataset, load_dataset
from pyg_adaqp.partition import (
    PartitionError,
    graph_fingerprint,
    load_partition,
    partition_graph,
    read_manifest,
)
from pyg_adaqp.train.checkpoint import load_resume_point
from pyg_adaqp.train.config import Config, ConfigError
from pyg_adaqp.train.liveness import Heartbeat
from pyg_adaqp.train.workers import die_with_parent, failure_text, free_port, spawn_workers

if TYPE_CHECKING:
    from pyg_adaqp.train.trainer import EpochHook


def prepare_partitions(cfg: Config, part_dir: Path, num_parts: int) -> None:
    """Checks the dataset and partitions it into `part_dir` unless a matching partition is there.

    Raises:
        DatasetError: If the dataset cannot be trained on (see
            :func:`~pyg_adaqp.data.check_dataset`).
        ConfigError: If there are more workers than nodes.
    """
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
    check_dataset(data, d.name)
    if num_parts > data.num_nodes:
        raise ConfigError(f"world_size={num_parts} exceeds the {data.num_nodes} nodes of dataset "
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
               on_epoch_end: Sequence[EpochHook] = ()) -> None:
    """One worker: joins the process group, loads its part and trains.

    A communication error (gloo's plain ``RuntimeError``, or a
    ``torch.distributed.DistError``) becomes a :class:`PeerLost` naming the
    ranks whose heartbeat stopped, when some did.  On failure the process
    groups are not torn down: that can block on a peer's unfinished work,
    and the caller leaves the process at once instead.
    """
    from pyg_adaqp.train.report import RunReport
    from pyg_adaqp.train.trainer import Trainer, WorkerContext

    heartbeat = None
    try:
        torch.set_num_threads(cfg.trainer.num_threads)
        device, backend = _devices(cfg, local_rank, local_world)
        timeout = timedelta(seconds=cfg.trainer.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        heartbeat = Heartbeat(rank, world_size).start()
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
    except Exception as err:
        if heartbeat is not None and (type(err) is RuntimeError or isinstance(err, dist.DistError)):
            lost = heartbeat.explain(err)
            if lost is not None:
                raise lost from err
        raise
    heartbeat.stop(wait=False)  # a last beat after this does no harm
    dist.destroy_process_group()


def _spawned(rank: int, world_size: int, cfg: Config, run_dir: Path, part_dir: Path,
             on_epoch_end: Sequence[EpochHook]) -> None:
    run_worker(rank, world_size, cfg, run_dir, part_dir, rank, world_size, prepare=False,
               on_epoch_end=on_epoch_end)


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
        _torchrun_worker(cfg, run_dir, part_dir, on_epoch_end)
        return
    if cfg.trainer.resume:
        # Fail before starting anything, and resume every worker from the same file.
        source, _ = load_resume_point(cfg.trainer.resume)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                   resume=str(source)))
    prepare_partitions(cfg, part_dir, cfg.world_size)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    spawn_workers(_spawned, cfg.world_size, (cfg.world_size, cfg, run_dir, part_dir, on_epoch_end),
                  grace_s=cfg.trainer.timeout_s)


def _torchrun_worker(cfg: Config, run_dir: Path, part_dir: Path,
                     on_epoch_end: Sequence[EpochHook]) -> None:
    """One worker of a ``torchrun`` job: dies with its agent, leaves at once on failure."""
    rank = int(os.environ["RANK"])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent, which is our parent
        die_with_parent(os.getppid())
    try:
        run_worker(rank, int(os.environ["WORLD_SIZE"]), cfg, run_dir, part_dir,
                   int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                   prepare=True, on_epoch_end=on_epoch_end)
    except BaseException as err:
        try:
            print(f"worker rank {rank} failed: {failure_text(err)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(1)

"""Starting workers: local workers (``world_size=N``) or ``torchrun``.

All distributed state (ranks, devices, process groups) is set up here and
nowhere else.  Joining the job and every collective run under
``trainer.timeout_s``; partitioning never runs inside one.  The partition
comes from a cache keyed by the dataset, the number of parts and the seed
(:func:`prepare_partitions`), made on a miss before any worker joins.  The
launcher of local workers finds or makes it, checks the checkpoint to
resume from, then starts the workers with
:func:`~pyg_adaqp.train.workers.spawn_workers`: they die with the launcher,
and when one raises or dies, the others get ``timeout_s`` to stop (they fail
at once when a peer leaves), what is left is killed, and
:class:`~pyg_adaqp.train.workers.WorkerFailed` names the rank that failed
first and the cause.  Under ``torchrun`` rank 0 finds or makes the
partition before joining while the others wait for its manifest (up to
``trainer.startup_timeout_s``), a worker dies with its agent, and a worker
whose peer died or became unreachable names that rank (see
:mod:`~pyg_adaqp.train.liveness`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist
from torch_geometric.data import Data

from pyg_adaqp.data import check_dataset, dataset_key, load_dataset
from pyg_adaqp.data.datasets import cache_dir
from pyg_adaqp.host import usable_cpus
from pyg_adaqp.partition import (
    PartitionError,
    graph_fingerprint,
    load_partition,
    partition_to_disk,
    read_manifest,
)
from pyg_adaqp.train.checkpoint import check_resumable, load_resume_point
from pyg_adaqp.train.config import Config, ConfigError
from pyg_adaqp.train.liveness import Heartbeat
from pyg_adaqp.train.workers import die_with_parent, failure_text, free_port, spawn_workers

if TYPE_CHECKING:
    from pyg_adaqp.train.trainer import EpochHook, Trainer

log = logging.getLogger(__name__)


def _dataset_key(cfg: Config) -> str:
    d = cfg.dataset
    return dataset_key(d.name, d.root, **d.options)


def partition_dir(cfg: Config, num_parts: int, key: str | None = None) -> Path:
    """Where the run's parts are: ``partition_dir``, or the cache entry of its dataset key
    (`key`, computed from `cfg` if not given)."""
    if cfg.partition_dir:
        return Path(cfg.partition_dir)
    key = key or _dataset_key(cfg)
    return cache_dir() / "partitions" / f"{key}-{num_parts}parts-seed{cfg.seed}"


def _mismatch(manifest: dict, key: str, num_parts: int, seed: int) -> str | None:
    """What differs between a partition's manifest and the run, or :obj:`None`.

    A manifest that records no dataset key is compared on parts and seed only.
    """
    for what, have, want in (("parts", manifest["num_parts"], num_parts),
                             ("seed", manifest["seed"], seed),
                             ("dataset key", manifest.get("dataset_key") or key, key)):
        if have != want:
            return f"it has {what} {have!r}, the run needs {want!r}"
    return None


def prepare_partitions(cfg: Config, num_parts: int,
                       on_loaded: Callable[[Data], None] | None = None) -> Path:
    """The run's partition directory, partitioning the dataset into it unless it holds a match.

    By default parts are cached under the dataset's key (see
    :func:`~pyg_adaqp.data.dataset_key`), the number of parts and the seed,
    so a second run of the same graph reuses them without loading the
    graph.  A ``partition_dir`` given in the config must match the run (or
    be empty): a partition made from another graph, or with other parts or
    seed, raises instead of being overwritten.  A manifest that records no
    dataset key (written by ``partition_graph(..., out_dir=...)``) is
    checked against the loaded graph's fingerprint instead.

    Args:
        cfg (Config): The run's configuration.
        num_parts (int): Number of parts (workers).
        on_loaded (callable, optional): Called with the graph once it is
            loaded and checked, before partitioning (e.g. to measure memory).
            (default: :obj:`None`)

    Raises:
        DatasetError: If the dataset cannot be trained on (see
            :func:`~pyg_adaqp.data.check_dataset`).
        ConfigError: If there are more workers than nodes.
        PartitionError: If a given ``partition_dir`` holds a partition that
            does not match the run.
    """
    d = cfg.dataset
    key = _dataset_key(cfg)
    part_dir = partition_dir(cfg, num_parts, key)
    try:
        manifest = read_manifest(part_dir)
    except PartitionError:
        if cfg.partition_dir and (part_dir / "manifest.json").exists():
            raise  # a given directory with a damaged manifest: say so, do not overwrite
        manifest = None  # missing (or a damaged cache entry): partition anew
    if manifest is not None and manifest.get("dataset_key") is not None:
        differs = _mismatch(manifest, key, num_parts, cfg.seed)
        if differs is None:
            log.info("partition: reusing %s (%d parts of %s, seed %d)", part_dir, num_parts,
                     key, cfg.seed)
            return part_dir
        if cfg.partition_dir:
            raise PartitionError(f"partition_dir {part_dir} holds a partition made for another "
                                 f"run ({differs}): pass an empty directory, or leave "
                                 f"partition_dir unset to use the cache")
    t0 = time.perf_counter()
    data = load_dataset(d.name, d.root, **d.options)
    check_dataset(data, d.name)
    if num_parts > data.num_nodes:
        raise ConfigError(f"world_size={num_parts} exceeds the {data.num_nodes} nodes of dataset "
                         f"{d.name!r}: every worker must own at least one node")
    if on_loaded is not None:
        on_loaded(data)
    if manifest is not None:  # recorded no dataset key: compare the graph itself
        fingerprint = graph_fingerprint(data)
        if (manifest["fingerprint"], manifest["num_parts"], manifest["seed"]) == (
                fingerprint, num_parts, cfg.seed):
            log.info("partition: reusing %s (its graph fingerprint matches)", part_dir)
            return part_dir
        if cfg.partition_dir:
            raise PartitionError(f"partition_dir {part_dir} holds a partition of another graph, "
                                 f"or with other parts or seed: pass an empty directory, or "
                                 f"leave partition_dir unset to use the cache")
    partition_to_disk(data, num_parts, part_dir, seed=cfg.seed, dataset_key=key)
    log.info("partition: wrote %d parts of %s to %s in %.1f s", num_parts, key, part_dir,
             time.perf_counter() - t0)
    return part_dir


def wait_for_partition(cfg: Config, num_parts: int) -> Path:
    """Waits, up to ``trainer.startup_timeout_s``, until the run's partition is on disk.

    Under ``torchrun`` rank 0 partitions before it joins the process group,
    so no rank waits for it inside a collective bounded by ``timeout_s``;
    the other ranks wait here for the manifest instead.
    """
    key = _dataset_key(cfg)
    part_dir = partition_dir(cfg, num_parts, key)
    deadline = time.monotonic() + cfg.trainer.startup_timeout_s
    while True:
        try:
            if _mismatch(read_manifest(part_dir), key, num_parts, cfg.seed) is None:
                return part_dir
        except PartitionError:
            pass
        if time.monotonic() > deadline:
            raise PartitionError(
                f"no partition of {key} into {num_parts} parts (seed {cfg.seed}) appeared in "
                f"{part_dir} within trainer.startup_timeout_s={cfg.trainer.startup_timeout_s} s: "
                f"rank 0 writes it there; on machines without a shared filesystem, partition "
                f"beforehand with python -m pyg_adaqp.partition and copy it to that path")
        time.sleep(1.0)


#: Allocations from this size up get pages of their own (see :func:`return_freed_memory`).
MMAP_THRESHOLD_BYTES = 1 << 20
#: From the first epoch's end, freed tensors up to this size stay for the next epoch
#: (see :func:`keep_freed_memory`); glibc's own threshold rises no higher.
KEEP_FREED_BYTES = 32 << 20
#: glibc's trim threshold from the first epoch's end: the largest positive C int,
#: so a free heap top is given back only past 2 GiB (see :func:`keep_freed_memory`).
TRIM_PAST_BYTES = 2**31 - 1

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Applies glibc ``mallopt`` settings, unless the environment sets the threshold."""
    for _, value in settings:
        if not 0 <= value < 2**31:  # mallopt takes a C int
            raise ValueError(f"mallopt value must be in [0, 2**31), got {value}")
    libc = _libc()
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or libc is None:
        return False
    return all(bool(libc.mallopt(param, value)) for param, value in settings)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once (None off glibc): the epoch hook calls :func:`_mallopt`."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Makes glibc's malloc give freed tensors of `threshold` bytes and more back at once.

    glibc serves large allocations with pages of their own (``mmap``), but
    raises that threshold to the size of each such block freed, up to 32
    MiB; tensors below it then come from the heap, whose freed memory stays
    with the process.  A worker's set-up (loading its part, building the
    aggregation matrices, exchanging the input's halo rows block by block)
    allocates and frees many one-off tensors of a few MiB: with glibc's own
    threshold, Reddit-sized workers peaked at 2.48-2.68 GiB, with this one
    at 1.93-1.99 (``python benchmarks/scale.py --sizes reddit``,
    docs/benchmarks.md).  A fixed threshold (``mallopt``) keeps them apart.
    Training then switches to :func:`keep_freed_memory`.  A
    ``MALLOC_MMAP_THRESHOLD_`` in the environment is left to rule.  Returns
    whether the setting took (False off glibc).
    """
    return _mallopt((_M_MMAP_THRESHOLD, threshold))


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Makes glibc's malloc keep freed tensors of up to `limit` bytes for reuse.

    Every epoch allocates and frees the same tensors.  One with pages of its
    own pays a page fault per 4 KiB page each time it is filled: 4 workers
    of 10,000 rows each (uniform 2 bits, loopback, one thread each) ran
    their SAGE epochs in 546-560 ms with this, 869-872 ms without (GCN:
    397-399 against 659-678 ms; docs/benchmarks.md).  Below `limit`, tensors
    come from the heap, whose top is kept (given back only past
    :data:`TRIM_PAST_BYTES`, 2 GiB), so each epoch reuses what the one before
    freed (trimmed past `limit`, as until the twenty-seventh pass, the top
    was given back between epochs in most workers and faulted in again,
    page by page, in every epoch: docs/benchmarks.md, twenty-seventh
    pass).  Tensors of `limit` or more keep pages of their own:
    kept up to 1 GiB, Reddit-sized workers peaked at 2.58-2.80 GiB with no
    faster epoch; up to 32 MiB, at 2.08-2.15 (against 1.93-1.99 giving
    everything back).  Returns whether the setting took; a
    ``MALLOC_MMAP_THRESHOLD_`` in the environment is left to rule.
    """
    return _mallopt((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, TRIM_PAST_BYTES))


def default_threads(local_workers: int) -> int:
    """Torch threads per worker by default: the CPUs this machine lets its
    workers keep busy (:func:`~pyg_adaqp.host.usable_cpus`: their cores, at
    most their container's CPU limit, rounded down: a limit of 1.5 CPUs
    gives 1 thread), shared by them, at least 1."""
    return max(1, int(usable_cpus()) // max(1, local_workers))


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
               local_rank: int, local_world: int, on_epoch_end: Sequence[EpochHook] = ()) -> None:
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
        return_freed_memory()
        torch.set_num_threads(cfg.trainer.num_threads or default_threads(local_world))
        device, backend = _devices(cfg, local_rank, local_world)
        timeout = timedelta(seconds=cfg.trainer.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        heartbeat = Heartbeat(rank, world_size).start()
        # Rank 0 checked (or made) the partition for the dataset; every other
        # rank loads only a part of the same graph, so a stale copy on
        # another machine is rejected instead of silently used.
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
        # Set-up (this worker's first epoch included: it builds the input
        # cache) gives its one-off memory back; training keeps its own.
        Trainer(cfg, graph, ctx, report, checkpoint_dir=run_dir / "checkpoints",
                on_epoch_end=[_keep_freed_memory, *on_epoch_end]).fit()
        dist.barrier()
    except Exception as err:
        if heartbeat is not None and (type(err) is RuntimeError or isinstance(err, dist.DistError)):
            lost = heartbeat.explain(err)
            if lost is not None:
                raise lost from err
        raise
    heartbeat.stop(wait=False)  # a last beat after this does no harm
    dist.destroy_process_group()


def _keep_freed_memory(trainer: "Trainer", epoch: int) -> None:
    """Epoch hook: :func:`keep_freed_memory` from the first epoch's end on (a setting
    of the process: the later calls change nothing)."""
    keep_freed_memory()


def _spawned(rank: int, world_size: int, cfg: Config, run_dir: Path, part_dir: Path,
             on_epoch_end: Sequence[EpochHook]) -> None:
    run_worker(rank, world_size, cfg, run_dir, part_dir, rank, world_size,
               on_epoch_end=on_epoch_end)


def launch(cfg: Config, run_dir: Path, on_epoch_end: Sequence[EpochHook] = ()) -> None:
    """Runs the training job described by `cfg`, writing to `run_dir`.

    Args:
        cfg (Config): The run's configuration.
        run_dir (Path): Where metrics, summary, plots and checkpoints go.
        on_epoch_end (Sequence[Callable], optional): Hooks every worker calls
            as ``hook(trainer, epoch)`` after each epoch (see
            :class:`~pyg_adaqp.train.trainer.Trainer`); local workers get
            them pickled, so they must be picklable (e.g. module-level
            functions).
            (default: :obj:`()`)

    Raises:
        WorkerFailed: If a worker raised or died, naming its rank and the
            cause, once every worker has stopped.
        DatasetError: If the dataset cannot be trained on.
        CheckpointError: If ``trainer.resume`` holds no valid checkpoint, or
            one of another world size or bit-width scheme.
    """
    run_dir = Path(run_dir)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        _torchrun_worker(cfg, run_dir, on_epoch_end)
        return
    if cfg.trainer.resume:
        # Fail before starting anything, and resume every worker from the same file.
        source, state = load_resume_point(cfg.trainer.resume)
        check_resumable(source, state, cfg.world_size, cfg.assign.scheme)
        del state
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                   resume=str(source)))
    part_dir = prepare_partitions(cfg, cfg.world_size)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    spawn_workers(_spawned, cfg.world_size, (cfg.world_size, cfg, run_dir, part_dir, on_epoch_end),
                  grace_s=cfg.trainer.timeout_s,
                  start_method="spawn" if cfg.device == "cuda" else None)


def _torchrun_worker(cfg: Config, run_dir: Path, on_epoch_end: Sequence[EpochHook]) -> None:
    """One worker of a ``torchrun`` job: dies with its agent, leaves at once on failure.

    Rank 0 partitions (or finds the partition) before joining the process
    group; the others wait for it outside any collective, up to
    ``trainer.startup_timeout_s``.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent, which is our parent
        die_with_parent(os.getppid())
    try:
        part_dir = (prepare_partitions(cfg, world_size) if rank == 0
                    else wait_for_partition(cfg, world_size))
        run_worker(rank, world_size, cfg, run_dir, part_dir,
                   int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                   on_epoch_end=on_epoch_end)
    except BaseException as err:
        try:
            print(f"worker rank {rank} failed: {failure_text(err)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(1)

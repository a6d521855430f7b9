"""Starting workers: local spawn (``world_size=N``) or ``torchrun``.

All distributed state (ranks, devices, process groups) is set up here and
nowhere else.  Every collective runs under ``trainer.timeout_s``; the
launcher of local workers watches them and, when one fails, stops the
others and raises an error naming the rank.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyg_adaqp.data import load_dataset
from pyg_adaqp.partition import (
    PartitionError,
    graph_fingerprint,
    load_partition,
    partition_graph,
    read_manifest,
)
from pyg_adaqp.train.config import Config
from pyg_adaqp.train.workers import free_port


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message names its rank and the cause."""


def prepare_partitions(cfg: Config, part_dir: Path, num_parts: int) -> None:
    """Partitions the dataset into `part_dir` unless a matching partition is there."""
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
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
               local_rank: int, local_world: int, prepare: bool) -> None:
    """One worker: joins the process group, loads its part and trains."""
    from pyg_adaqp.train.report import RunReport
    from pyg_adaqp.train.trainer import Trainer, WorkerContext

    torch.set_num_threads(cfg.trainer.num_threads)
    device, backend = _devices(cfg, local_rank, local_world)
    timeout = timedelta(seconds=cfg.trainer.timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
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
        Trainer(cfg, graph, ctx, report, checkpoint_dir=run_dir / "checkpoints").fit()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, cfg: Config, run_dir: Path, part_dir: Path,
             error_dir: Path) -> None:
    try:
        run_worker(rank, world_size, cfg, run_dir, part_dir, rank, world_size, prepare=False)
    except BaseException as err:
        (error_dir / f"rank{rank}.err").write_text(
            f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise SystemExit(1)


def launch(cfg: Config, run_dir: Path) -> None:
    """Runs the training job described by `cfg`, writing to `run_dir`."""
    run_dir = Path(run_dir)
    part_dir = Path(cfg.partition_dir) if cfg.partition_dir else run_dir / "partitions"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        run_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), cfg, run_dir,
                   part_dir, int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", 1)), prepare=True)
        return
    world_size = cfg.world_size
    prepare_partitions(cfg, part_dir, world_size)
    with tempfile.TemporaryDirectory(prefix="adaqp-errors-") as errors:
        _spawn_and_watch(cfg, run_dir, part_dir, Path(errors))


def _spawn_and_watch(cfg: Config, run_dir: Path, part_dir: Path, error_dir: Path) -> None:
    world_size = cfg.world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(r, world_size, cfg, run_dir, part_dir,
                                                error_dir), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    _watch(procs, error_dir, cfg.trainer.timeout_s)


def _watch(procs: list, error_dir: Path, timeout_s: float) -> None:
    """Waits for the workers; on the first failure, gives the rest `timeout_s` to stop."""
    failed_at = None
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > timeout_s:
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        p.join()
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if not bad:
        return
    # The first rank that wrote an error is the cause; the others failed waiting for it.
    reports = sorted(error_dir.glob("rank*.err"), key=lambda f: f.stat().st_mtime)
    if reports:
        first = reports[0]
        rank = first.stem.removeprefix("rank")
        raise WorkerFailed(f"worker rank {rank} failed: {first.read_text()}")
    rank, code = bad[0]
    raise WorkerFailed(f"worker rank {rank} died with exit code {code} (signal "
                       f"{-code if code and code < 0 else 'none'})")

"""Running a function on N local `torch.distributed` workers (gloo on loopback).

For tests, benchmarks and notebooks that drive the distributed layers
directly: every worker runs with one intra-op thread (spawn does not set
``OMP_NUM_THREADS``) and a process-group timeout, and the parent joins them
with a deadline and kills them past it, so a broken exchange fails instead
of hanging.  Results travel back as ``torch.save`` files; a failing worker's
traceback is re-raised in the parent.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a port in use fails rank 0 at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple,
           timeout_s: float) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_workers(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` in `world_size` spawned gloo workers.

    `fn` must be importable by the children (a module-level function of an
    importable module, or of a script with an ``if __name__ == "__main__":``
    guard).  Returns the workers' results by rank; raises with the workers'
    tracebacks if any fails, and kills them all if they are not done
    `timeout_s` (plus start-up slack) after the start.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, out_dir, fn, args,
                                                  timeout_s), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        # `import torch` costs seconds per process, more when oversubscribed.
        deadline = time.monotonic() + timeout_s + 30
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"--- rank {r} ---\n" + f.read())
        if errors or hung:
            raise RuntimeError(f"workers failed (hung: {hung})\n" + "\n".join(errors))
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"workers exited with {[p.exitcode for p in procs]}")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
                for r in range(world_size)]

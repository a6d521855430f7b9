"""Measurement points that mean something on a GPU.

CUDA kernels run asynchronously: a CPU clock read after launching one times
the launch, not the kernel.  :func:`device_clock` therefore waits for the
device's current stream (where the model's kernels run) before reading the
clock.  NCCL's collectives run on streams of their own and are not waited
for, so an owned-row product that overlaps an exchange is timed alone; once
an exchange is waited on (``work.wait()`` makes the current stream wait for
NCCL's), the next measurement point includes its end.  The exchange, the
layers' aggregation and the trainer take every timing through it, so the
wait/quantize/compute breakdown holds on CUDA as on CPU.  Its cost: the CPU
cannot queue work past a measurement point (a few per layer), so a measured
CUDA epoch may run slower than an unmeasured one would.
``PYG_ADAQP_SYNC_TIMINGS=0`` in the environment (read when a clock is made)
drops the waits, to measure what they cost (``benchmarks/gpu_check.py``
does): the breakdown and the arrival times the adaptive allocator refines
its link model with then time kernel launches, not kernels.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch


def device_clock(device: torch.device | str,
                 read: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """`read` (a CPU clock) that, on CUDA, first waits for the work queued on
    `device`'s current stream."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("PYG_ADAQP_SYNC_TIMINGS", "1") == "0":
        return read

    def clock() -> float:
        torch.cuda.current_stream(device).synchronize()
        return read()

    return clock

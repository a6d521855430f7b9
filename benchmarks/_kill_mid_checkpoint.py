"""The trainer, with its process SIGKILLed half-way through writing one checkpoint.

    torchrun ... benchmarks/_kill_mid_checkpoint.py EPOCH [overrides]

For ``benchmarks/faults.py``: the file of the checkpoint taken after `EPOCH`
is opened through a wrapper whose ``write`` stores half the bytes, flushes
them to disk and kills the process, as an OOM kill or a power cut would.
Only rank 0 writes checkpoints, so only rank 0 dies.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys

import pyg_adaqp.train.checkpoint as checkpoint

EPOCH = int(sys.argv.pop(1))
TARGET = checkpoint.checkpoint_path("", EPOCH).name + ".tmp"


class _HalfWrite:
    def __init__(self, f):
        self._f = f

    def write(self, data: bytes) -> None:
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self) -> "_HalfWrite":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _open(path, *args, **kwargs):
    f = open(path, *args, **kwargs)
    return _HalfWrite(f) if os.path.basename(path) == TARGET else f


checkpoint.open = _open  # the module's own name lookup finds this before the builtin

if __name__ == "__main__":
    runpy.run_module("pyg_adaqp.train", run_name="__main__", alter_sys=True)  # as python -m

"""Training checkpoints: atomic, checksummed, loaded without unpickling code.

A checkpoint file is ``MAGIC | sha256(payload) | payload`` where the payload
is a ``torch.save`` of plain containers and tensors, loaded back with
``torch.load(..., weights_only=True)``.  Files are written to a temporary
name and renamed, so a crash mid-write never leaves a truncated checkpoint
under the final name, and a damaged one is rejected by its checksum.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

MAGIC = b"ADAQPCK1"
_NAME = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt."""


def checkpoint_path(directory: str | os.PathLike, epoch: int) -> Path:
    """Where the checkpoint taken after `epoch` lives."""
    return Path(directory) / f"epoch_{epoch:06d}.pt"


def save_checkpoint(directory: str | os.PathLike, epoch: int, state: dict[str, Any]) -> Path:
    """Writes `state` as the checkpoint after `epoch`; returns its path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path = checkpoint_path(directory, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads and verifies a checkpoint file.

    Raises:
        CheckpointError: If the file is missing, not a checkpoint, truncated
            or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    blob = path.read_bytes()
    head = len(MAGIC) + 32
    if len(blob) < head or not blob.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is not a pyg_adaqp checkpoint or is truncated")
    digest, payload = blob[len(MAGIC):head], blob[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match "
                              f"(truncated or modified after it was written)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # a payload that passes the checksum but does not load
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {err}") from err


def load_resume_point(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Loads `path` if it is a file, else the newest *valid* checkpoint in that directory.

    Returns:
        The checkpoint's path and its state.
    """
    path = Path(path)
    if path.is_file():
        return path, load_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"nothing to resume from at {path}: no such file or directory")
    candidates = sorted((int(m.group(1)), p) for p in path.iterdir()
                        if (m := _NAME.match(p.name)))
    rejected = []
    for _, candidate in reversed(candidates):
        try:
            return candidate, load_checkpoint(candidate)
        except CheckpointError as err:
            rejected.append(str(err))
    detail = ("; ".join(rejected)) if rejected else "it holds no epoch_*.pt files"
    raise CheckpointError(f"no valid checkpoint in {path}: {detail}")


def check_resumable(source: str | os.PathLike, state: dict[str, Any], world_size: int,
                    scheme: str) -> None:
    """Raises :class:`CheckpointError`, naming the mismatch, unless the trainer's
    checkpoint `state` (read from `source`) can resume a run of `world_size`
    workers with the bit-width scheme `scheme` (``assign.scheme``)."""
    missing = sorted({"epoch", "model", "optimizer", "workers", "rows"} - state.keys())
    if missing:
        raise CheckpointError(f"checkpoint {source} lacks {', '.join(missing)}: it was not "
                              f"written by this version of the pyg_adaqp trainer")
    if len(state["workers"]) != world_size:
        raise CheckpointError(f"checkpoint {source} was written by {len(state['workers'])} "
                              f"workers, this run has {world_size}")
    if state.get("assign_scheme", scheme) != scheme:  # older checkpoints do not say
        raise CheckpointError(f"checkpoint {source} was written with assign.scheme="
                              f"{state['assign_scheme']}, this run asks for {scheme}: "
                              f"resume with the same scheme")

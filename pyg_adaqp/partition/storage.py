"""Partitions on disk: one file per part plus a manifest.

A multi-machine job partitions once and lets every machine load only its own
part.  The manifest records the format version, ``num_parts``, the METIS
seed, a fingerprint of the graph, the key of the dataset it came from (see
:func:`~pyg_adaqp.data.dataset_key`), and the size and SHA-256 of every part
file, so a stale, mismatched or damaged partition is detected instead of
silently used.  Parts are written and checked one file at a time, streamed
through the hash, so neither side holds more than one part in memory.  Part files hold only tensors, ints and dicts and load with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch_geometric.data import Data

from pyg_adaqp.partition.local_graph import LocalGraph

FORMAT = "pyg_adaqp.partition"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_FINGERPRINT_ATTRS = ("edge_index", "edge_weight", "x", "y", "train_mask", "val_mask", "test_mask")


class PartitionError(RuntimeError):
    """A partition directory is missing, damaged, or made for another graph."""


def graph_fingerprint(data: Data) -> str:
    """A hash of the graph's structure, features, labels and splits."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"num_nodes={int(data.num_nodes)};".encode())
    for name in _FINGERPRINT_ATTRS:
        value = data[name] if name in data else None
        if value is None:
            h.update(f"{name}=None;".encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def save_partition(parts: Iterable[LocalGraph], out_dir: str | os.PathLike, fingerprint: str,
                   seed: int = 0, dataset_key: str | None = None) -> Path:
    """Writes `parts` and their manifest to `out_dir`; returns the manifest's path.

    `parts` may be a generator (e.g. :func:`~pyg_adaqp.partition.local_graphs`):
    each part is written and dropped before the next is made.  Every file is
    written to a temporary name and renamed, and the manifest last, so a
    crash never leaves a manifest that points at partial files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    files, num_nodes = [], 0
    for lg in parts:
        name = f"part_{lg.rank}.pt"
        tmp = out / (name + ".tmp")
        torch.save(lg.to_dict(), tmp)
        size, digest = _file_digest(tmp)
        _sync_and_rename(tmp, out / name)
        files.append({"rank": lg.rank, "file": name, "bytes": size, "sha256": digest})
        num_nodes = lg.num_nodes_global
        del lg
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "num_parts": len(files),
                "seed": seed, "fingerprint": fingerprint, "dataset_key": dataset_key,
                "num_nodes": num_nodes, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    _sync_and_rename(tmp, out / MANIFEST)
    return out / MANIFEST


def read_manifest(part_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks the manifest of a partition directory."""
    path = Path(part_dir) / MANIFEST
    if not path.is_file():
        raise PartitionError(f"no partition manifest at {path}: write one with "
                             f"partition_graph(data, num_parts, out_dir={str(part_dir)!r})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PartitionError(f"partition manifest {path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PartitionError(f"{path} is not a pyg_adaqp partition manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise PartitionError(f"partition {part_dir} has format version {manifest.get('version')}, "
                             f"this pyg_adaqp reads version {FORMAT_VERSION}: partition again")
    return manifest


def load_partition(part_dir: str | os.PathLike, rank: int, *, num_parts: int | None = None,
                   fingerprint: str | None = None) -> LocalGraph:
    """Loads worker `rank`'s :class:`LocalGraph` from a partition directory.

    Args:
        part_dir (str): Directory written by
            :func:`~pyg_adaqp.partition.partition_graph` with ``out_dir``.
        rank (int): The part to load.
        num_parts (int, optional): If set, the partition must have this many
            parts. (default: :obj:`None`)
        fingerprint (str, optional): If set, the partition must have been
            made from a graph with this :func:`graph_fingerprint`.
            (default: :obj:`None`)

    Raises:
        PartitionError: If the directory is missing, damaged, or does not
            match `num_parts` or `fingerprint`.
    """
    manifest = read_manifest(part_dir)
    if num_parts is not None and manifest["num_parts"] != num_parts:
        raise PartitionError(f"partition {part_dir} has {manifest['num_parts']} parts, "
                             f"expected {num_parts} (one per worker): partition the graph "
                             f"again with num_parts={num_parts}, or use another directory")
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        raise PartitionError(f"partition {part_dir} was made from another graph "
                             f"(fingerprint {manifest['fingerprint']}, expected {fingerprint}): "
                             f"partition this graph again, or use another directory")
    entry = next((f for f in manifest["files"] if f["rank"] == rank), None)
    if entry is None:
        raise PartitionError(f"partition {part_dir} has no part for rank {rank} "
                             f"(it has {manifest['num_parts']} parts)")
    path = Path(part_dir) / entry["file"]
    if not path.is_file():
        raise PartitionError(f"part file {path} is missing")
    if _file_digest(path) != (entry["bytes"], entry["sha256"]):
        raise PartitionError(f"part file {path} is corrupt: its size or checksum differs "
                             f"from the manifest's; partition again")
    try:
        lg = LocalGraph.from_dict(torch.load(path, weights_only=True))
    except Exception as err:  # any unpickling or field error means a bad file
        raise PartitionError(f"part file {path} cannot be read: {err}") from err
    if lg.rank != rank or lg.num_parts != manifest["num_parts"]:
        raise PartitionError(f"part file {path} holds rank {lg.rank} of {lg.num_parts}, "
                             f"the manifest says rank {rank} of {manifest['num_parts']}")
    return lg


def _file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _sync_and_rename(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

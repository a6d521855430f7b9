"""Partitions on disk: one file per part plus a manifest.

A multi-machine job partitions once and lets every machine load only its own
part.  The manifest records the format version, ``num_parts``, the METIS
seed, a fingerprint of the graph, and the size and SHA-256 of every part
file, so a stale, mismatched or damaged partition is detected instead of
silently used.  Part files hold only tensors, ints and dicts and load with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

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


def save_partition(parts: list[LocalGraph], out_dir: str | os.PathLike, fingerprint: str,
                   seed: int = 0) -> Path:
    """Writes `parts` and their manifest to `out_dir`; returns the manifest's path.

    Every file is written to a temporary name and renamed, and the manifest
    last, so a crash never leaves a manifest that points at partial files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    files = []
    for lg in parts:
        buf = io.BytesIO()
        torch.save(lg.to_dict(), buf)
        blob = buf.getvalue()
        name = f"part_{lg.rank}.pt"
        _atomic_write(out / name, blob)
        files.append({"rank": lg.rank, "file": name, "bytes": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()})
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "num_parts": len(parts),
                "seed": seed, "fingerprint": fingerprint,
                "num_nodes": parts[0].num_nodes_global if parts else 0, "files": files}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
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
    blob = path.read_bytes()
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise PartitionError(f"part file {path} is corrupt: its size or checksum differs "
                             f"from the manifest's; partition again")
    try:
        lg = LocalGraph.from_dict(torch.load(io.BytesIO(blob), weights_only=True))
    except Exception as err:  # any unpickling or field error means a bad file
        raise PartitionError(f"part file {path} cannot be read: {err}") from err
    if lg.rank != rank or lg.num_parts != manifest["num_parts"]:
        raise PartitionError(f"part file {path} holds rank {lg.rank} of {lg.num_parts}, "
                             f"the manifest says rank {rank} of {manifest['num_parts']}")
    return lg


def _atomic_write(path: Path, blob: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

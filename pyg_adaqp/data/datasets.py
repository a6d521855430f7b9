"""`load_dataset`: one entry point for the synthetic graph, PyG's datasets and OGB.

Every dataset comes back as a plain :class:`torch_geometric.data.Data` with
``x``, ``y``, ``edge_index``, boolean ``train_mask``/``val_mask``/``test_mask``
and ``num_classes``; multi-label datasets have a 2-D float ``y``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch_geometric.data import Data

from pyg_adaqp.data.checks import DatasetError
from pyg_adaqp.data.splits import random_split_masks
from pyg_adaqp.data.synthetic import synthetic_graph


@dataclass(frozen=True)
class _PyGSpec:
    """How to build one of PyG's datasets."""
    cls_name: str                  # class in torch_geometric.datasets
    subdir: str                    # folder under `root` holding raw/
    name_arg: str | None = None    # the `name` argument of the class, if any
    multi_label: bool = False
    has_split: bool = True         # whether the dataset ships masks


_PYG: dict[str, _PyGSpec] = {
    "cora": _PyGSpec("Planetoid", "Cora", "Cora"),
    "citeseer": _PyGSpec("Planetoid", "CiteSeer", "CiteSeer"),
    "pubmed": _PyGSpec("Planetoid", "PubMed", "PubMed"),
    "photo": _PyGSpec("Amazon", "Photo", "Photo", has_split=False),
    "computers": _PyGSpec("Amazon", "Computers", "Computers", has_split=False),
    "cs": _PyGSpec("Coauthor", "CS", "CS", has_split=False),
    "physics": _PyGSpec("Coauthor", "Physics", "Physics", has_split=False),
    "reddit": _PyGSpec("Reddit", "Reddit"),
    "reddit2": _PyGSpec("Reddit2", "Reddit2"),
    "flickr": _PyGSpec("Flickr", "Flickr"),
    "yelp": _PyGSpec("Yelp", "Yelp", multi_label=True),
    "amazon_products": _PyGSpec("AmazonProducts", "AmazonProducts", multi_label=True),
}
_OGB = ("ogbn-arxiv", "ogbn-products")

DATASET_NAMES: tuple[str, ...] = ("synthetic", *_PYG, *_OGB)


class DatasetDownloadError(RuntimeError):
    """Downloading a dataset failed (no internet, say); the message says how to load it offline."""


def _downloading(err: BaseException) -> bool:
    """Whether `err` was raised while a dataset class was downloading its files."""
    return any(frame.name in ("download", "_download")
               for frame in traceback.extract_tb(err.__traceback__))


def _download_failed(key: str, what: str, url: str | None, files: str, layout: str,
                     err: BaseException) -> DatasetDownloadError:
    cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
    source = f" from {url}" if url else ""
    return DatasetDownloadError(
        f"dataset {key!r}: downloading it with {what}{source} into {cache_dir()} failed "
        f"({type(err).__name__}: {cause}). To load it offline, put {files} in {layout} and "
        f"pass dataset.root=<dir>.")


def load_dataset(name: str = "synthetic", root: str | os.PathLike | None = None,
                 **opts: Any) -> Data:
    r"""Loads a node-classification dataset as one :class:`Data` object.

    Args:
        name (str, optional): ``"synthetic"`` (a generated graph, see
            :func:`~pyg_adaqp.data.synthetic.synthetic_graph`), one of PyG's
            datasets by lower-case name (``"cora"``, ``"citeseer"``,
            ``"pubmed"``, ``"photo"``, ``"computers"``, ``"cs"``,
            ``"physics"``, ``"reddit"``, ``"reddit2"``, ``"flickr"``,
            ``"yelp"``, ``"amazon_products"``), or ``"ogbn-arxiv"`` /
            ``"ogbn-products"`` (needs the ``ogb`` extra).
            (default: :obj:`"synthetic"`)
        root (str, optional): Folder holding the dataset in PyG's layout,
            either ``root/<Name>/raw/`` or ``root/raw/``.  When given, the
            dataset loads offline from there and a missing file is an error;
            the folder is never written to: PyG's ``processed/`` files go to the cache
            (:func:`cache_dir`).  When :obj:`None`, PyG downloads into the
            cache. (default: :obj:`None`)
        **opts: For ``"synthetic"``, the arguments of
            :func:`~pyg_adaqp.data.synthetic.synthetic_graph`.  For datasets
            without a split: ``train_ratio`` (default ``0.6``), ``val_ratio``
            (default ``0.2``) and ``split_seed`` (default ``0``).
    """
    key = name.lower()
    if key == "synthetic":
        _check_options(key, synthetic_graph, opts)
        return synthetic_graph(**opts)
    if key in _PYG:
        _check_options(key, _load_pyg, opts, taken=("key", "spec", "root"))
        return _load_pyg(key, _PYG[key], root, **opts)
    if key in _OGB:
        _check_options(key, _load_ogb, opts, taken=("key", "root"))
        return _load_ogb(key, root)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


def _check_options(key: str, loader: Callable[..., Any], opts: dict[str, Any],
                   taken: tuple[str, ...] = ()) -> None:
    """Raises a :class:`DatasetError` naming the options in `opts` that
    `loader` does not take (its parameters but those in `taken`)."""
    names = [p for p in inspect.signature(loader).parameters if p not in taken]
    unknown = sorted(set(opts) - set(names))
    if unknown:
        raise DatasetError(f"dataset {key!r}: unknown option {', '.join(map(repr, unknown))} "
                           f"(dataset.options); it takes "
                           f"{', '.join(names) if names else 'no options'}")


def dataset_key(name: str = "synthetic", root: str | os.PathLike | None = None,
                **opts: Any) -> str:
    """A fingerprint of the graph :func:`load_dataset` would return, without loading it.

    It hashes the dataset's name and options, and, for a dataset read from
    `root`, the path, size and modification time of its raw files; a
    generated graph is a function of its options and of this package's
    version, which the hash includes.  A dataset left to download (no
    `root`) is keyed by its name and options: it comes from its published
    source.  Partitions are cached under this key (see
    :func:`pyg_adaqp.train.launch.prepare_partitions`), so a worker machine never
    has to load the whole graph to find its part.
    """
    import pyg_adaqp

    key = name.lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"name": key, "options": opts, "version": pyg_adaqp.__version__},
                        sort_keys=True, default=str).encode())
    if root is not None and key != "synthetic":
        root = Path(root).expanduser().resolve()
        if key in _PYG:
            raw_dir = root / _PYG[key].subdir / "raw"
            raw_dir = raw_dir if raw_dir.is_dir() else root / "raw"
        else:
            raw_dir = root / key.replace("-", "_") / "raw"
        # No raw files: loading will say which are missing.
        files = sorted(p for p in raw_dir.rglob("*") if p.is_file()) if raw_dir.is_dir() else []
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{key}-{h.hexdigest()}"


def _load_pyg(key: str, spec: _PyGSpec, root: str | os.PathLike | None, *,
              train_ratio: float = 0.6, val_ratio: float = 0.2, split_seed: int = 0) -> Data:
    import torch_geometric.datasets as pyg_datasets

    cls: Callable[..., Any] = getattr(pyg_datasets, spec.cls_name)
    pyg_root = str(cache_dir()) if root is None else _offline_root(key, spec, root, cls)
    args = (pyg_root, spec.name_arg) if spec.name_arg else (os.path.join(pyg_root, spec.subdir),)
    try:
        data = cls(*args)[0]
    except Exception as err:
        if root is not None or not _downloading(err):
            raise
        what = f"torch_geometric.datasets.{spec.cls_name}({spec.name_arg or ''})"
        files = f"its raw files ({', '.join(_raw_file_names(cls, spec))})"
        raise _download_failed(key, what, getattr(cls, "url", None), files,
                               f"<dir>/{spec.subdir}/raw", err) from err

    out = Data(x=data.x.float(), edge_index=data.edge_index, num_nodes=data.num_nodes)
    if spec.multi_label:
        out.y = data.y.float()
        out.num_classes = int(out.y.size(1))
    else:
        out.y = data.y.view(-1).long()
        out.num_classes = int(out.y.max()) + 1
    if spec.has_split:
        out.train_mask, out.val_mask, out.test_mask = data.train_mask, data.val_mask, data.test_mask
    else:
        out.train_mask, out.val_mask, out.test_mask = random_split_masks(
            out.num_nodes, train_ratio, val_ratio, split_seed)
    return out


def cache_dir() -> Path:
    """Where downloads and processed datasets go: ``$PYG_ADAQP_CACHE`` or ``~/.cache/pyg_adaqp``."""
    return Path(os.environ.get("PYG_ADAQP_CACHE", Path.home() / ".cache" / "pyg_adaqp")).expanduser()


def _offline_root(key: str, spec: _PyGSpec, root: str | os.PathLike, cls: Any) -> str:
    """A PyG root for the raw files under `root`, never writing into `root`.

    PyG writes ``processed/`` next to ``raw/``; data folders are often shared
    and read-only, so the raw files are linked into a private folder of the
    cache, named after their path, sizes and modification times: a changed
    raw file gets a fresh folder instead of a stale processed one.
    """
    root = Path(root).expanduser().resolve()
    # Accept both `root/<Name>/raw` (PyG's layout) and `root/raw`.
    raw_dir = root / spec.subdir / "raw"
    if not raw_dir.is_dir() and (root / "raw").is_dir():
        raw_dir = root / "raw"
    names = _raw_file_names(cls, spec)
    missing = [f for f in names if not (raw_dir / f).is_file()]
    if missing:
        also = "" if raw_dir == root / "raw" else f"; also looked in {root / 'raw'}"
        raise FileNotFoundError(
            f"dataset {key!r}: raw files not found in {raw_dir} "
            f"(missing: {', '.join(missing)}{also}). Put the raw files that PyG's "
            f"torch_geometric.datasets.{spec.cls_name}({spec.name_arg or ''}) downloads "
            f"there, or leave root unset (dataset.root=null) to let PyG download them "
            f"into {cache_dir()}.")
    stamp = hashlib.sha1(str(raw_dir).encode())
    for f in names:
        st = (raw_dir / f).stat()
        stamp.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    work = cache_dir() / "offline" / f"{key}-{stamp.hexdigest()[:12]}"
    link_dir = work / spec.subdir / "raw"
    link_dir.mkdir(parents=True, exist_ok=True)
    for f in names:
        link = link_dir / f
        if not link.exists():
            link.symlink_to(raw_dir / f)
    return str(work)


def _raw_file_names(cls: Any, spec: _PyGSpec) -> list[str]:
    """The raw files PyG's class reads, without instantiating it (which would download)."""
    prop = cls.raw_file_names
    if isinstance(prop, property):
        # `raw_file_names` reads `self.name` for named datasets (Planetoid, ...).
        probe = cls.__new__(cls)
        probe.name = spec.name_arg.lower() if spec.cls_name == "Planetoid" else spec.name_arg
        names = prop.fget(probe)
    else:
        names = prop
    return [names] if isinstance(names, str) else list(names)


def _load_ogb(key: str, root: str | os.PathLike | None) -> Data:
    folder = key.replace("-", "_")  # where OGB keeps the dataset under its root
    if root is not None and not (Path(root).expanduser() / folder).is_dir():
        raise FileNotFoundError(
            f"dataset {key!r}: no {folder} folder in {Path(root).expanduser()}. Put the "
            f"folder that ogb's PygNodePropPredDataset({key!r}) downloads there, or leave "
            f"root unset (dataset.root=null) to let ogb download it into {cache_dir()}.")
    try:
        from ogb.nodeproppred import PygNodePropPredDataset
    except ImportError as err:
        raise ImportError(
            f"dataset {key!r} needs the ogb package: pip install 'pyg_adaqp[ogb]'") from err
    given = root
    root = str(Path(root).expanduser()) if root is not None else str(cache_dir())
    try:
        dataset = PygNodePropPredDataset(key, root=root)
    except Exception as err:
        if given is not None or not _downloading(err):
            raise
        raise _download_failed(key, f"ogb's PygNodePropPredDataset({key!r})", None,
                               f"the {folder} folder it downloads", "<dir>", err) from err
    data = dataset[0]
    split = dataset.get_idx_split()
    out = Data(x=data.x.float(), edge_index=data.edge_index, num_nodes=data.num_nodes,
               y=data.y.view(-1).long())
    out.num_classes = int(out.y.max()) + 1
    for mask_name, idx_name in (("train_mask", "train"), ("val_mask", "valid"), ("test_mask", "test")):
        mask = torch.zeros(out.num_nodes, dtype=torch.bool)
        mask[split[idx_name]] = True
        out[mask_name] = mask
    return out

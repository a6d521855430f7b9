"""`check_dataset`: reject a graph that cannot be trained on, before partitioning it.

A NaN in the features or a label outside the classes does not fail where it
is: it turns the loss into NaN some epochs later, or fails inside a worker
with an index error.  The launcher checks the dataset once, in one process,
and names what is wrong and where.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch_geometric.data import Data

#: Rows checked at a time, so that the check needs no copy of a large feature matrix.
_CHUNK_ROWS = 1 << 16


class DatasetError(ValueError):
    """A dataset's features, labels or splits cannot be trained on."""


def check_dataset(data: Data, name: str = "dataset") -> None:
    r"""Checks that `data` is a node-classification graph that can be trained on.

    Checks that ``x`` is a finite float matrix with one row per node, that
    the boolean ``train_mask``/``val_mask``/``test_mask`` have one entry per
    node and select at least one training node, and that the labels of the
    nodes in any split are valid: class ids in :obj:`[0, num_classes)` for a
    1-D ``y``, finite targets in :obj:`[0, 1]` for a 2-D (multi-label) ``y``.
    Labels of nodes outside every split are never read and are not checked
    (some datasets mark unlabelled nodes with :obj:`-1`).

    Args:
        data (torch_geometric.data.Data): The graph, as returned by
            :func:`~pyg_adaqp.data.load_dataset`.
        name (str, optional): The dataset's name in error messages.
            (default: :obj:`"dataset"`)

    Raises:
        DatasetError: Naming the dataset, what is wrong, how many rows it
            concerns and the first of them.
    """
    n = int(data.num_nodes)
    x = data.x if "x" in data else None
    if x is None or x.dim() != 2 or x.size(0) != n or not x.is_floating_point():
        raise DatasetError(f"dataset {name!r}: the features (x) must be a float matrix with "
                           f"one row per node ({n}), got "
                           f"{None if x is None else f'{x.dtype} {list(x.shape)}'}")
    bad = _bad_rows(x, lambda block: ~torch.isfinite(block).all(dim=1))
    if bad.numel():
        raise DatasetError(f"dataset {name!r}: the features (x) hold NaN or Inf in "
                           f"{bad.numel()} of {n} rows (first: node {int(bad[0])}); "
                           f"impute or drop them before training")

    masks = {}
    for split in ("train", "val", "test"):
        mask = data[f"{split}_mask"] if f"{split}_mask" in data else None
        if mask is None or mask.dtype != torch.bool or mask.shape != (n,):
            raise DatasetError(f"dataset {name!r}: {split}_mask must be a boolean vector with "
                               f"one entry per node ({n}), got "
                               f"{None if mask is None else f'{mask.dtype} {list(mask.shape)}'}")
        masks[split] = mask
    if not bool(masks["train"].any()):
        raise DatasetError(f"dataset {name!r} has no training nodes (train_mask is all False)")
    used = masks["train"] | masks["val"] | masks["test"]

    y = data.y if "y" in data else None
    if y is None or y.size(0) != n or y.dim() not in (1, 2):
        raise DatasetError(f"dataset {name!r}: the labels (y) must have one row per node "
                           f"({n}), got {None if y is None else list(y.shape)}")
    if y.dim() == 2:  # multi-label: binary targets of BCE
        if not y.is_floating_point():
            raise DatasetError(f"dataset {name!r}: multi-label targets (2-D y) must be float, "
                               f"got {y.dtype}")
        bad = _bad_rows(y, lambda block: ~((block >= 0) & (block <= 1)).all(dim=1), used)
        if bad.numel():
            raise DatasetError(f"dataset {name!r}: the multi-label targets (y) of {bad.numel()} "
                               f"nodes in the train/val/test splits are not all in [0, 1] "
                               f"(first: node {int(bad[0])})")
        return
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DatasetError(f"dataset {name!r}: 1-D labels (y) must be integer class ids, "
                           f"got {y.dtype}")
    num_classes = data.num_classes if "num_classes" in data else None
    if num_classes is None or int(num_classes) < 1:
        raise DatasetError(f"dataset {name!r}: num_classes must be set to a positive number, "
                           f"got {num_classes}")
    num_classes = int(num_classes)
    labels = y[used]
    out = (labels < 0) | (labels >= num_classes)
    if bool(out.any()):
        first = int(used.nonzero().view(-1)[out.nonzero()[0]])
        raise DatasetError(f"dataset {name!r}: {int(out.sum())} labels of nodes in the "
                           f"train/val/test splits are outside [0, num_classes={num_classes}) "
                           f"(min {int(labels.min())}, max {int(labels.max())}; first: node "
                           f"{first})")


def _bad_rows(t: Tensor, is_bad: Callable[[Tensor], Tensor],
              rows: Tensor | None = None) -> Tensor:
    """Indices of the rows of `t` (among `rows`, if given) where ``is_bad(block)`` holds."""
    found = []
    for start in range(0, t.size(0), _CHUNK_ROWS):
        bad = is_bad(t[start:start + _CHUNK_ROWS])
        if rows is not None:
            bad &= rows[start:start + _CHUNK_ROWS]
        found.append(bad.nonzero().view(-1) + start)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.long)

"""Seeded train/validation/test splits for datasets that ship none."""
from __future__ import annotations

import torch
from torch import Tensor


def random_split_masks(num_nodes: int, train_ratio: float, val_ratio: float,
                       seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns boolean (train, val, test) masks of a seeded random split.

    Args:
        num_nodes (int): Number of nodes.
        train_ratio (float): Fraction of nodes for training.
        val_ratio (float): Fraction of nodes for validation; the remaining
            nodes are the test split.
        seed (int): Seed of the permutation.
    """
    if not (0.0 <= train_ratio and 0.0 <= val_ratio and train_ratio + val_ratio <= 1.0):
        raise ValueError(
            f"split ratios must be non-negative with train_ratio + val_ratio <= 1, "
            f"got train_ratio={train_ratio}, val_ratio={val_ratio}")
    perm = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed))
    num_train = int(round(train_ratio * num_nodes))
    num_val = int(round(val_ratio * num_nodes))
    masks = []
    for lo, hi in ((0, num_train), (num_train, num_train + num_val),
                   (num_train + num_val, num_nodes)):
        mask = torch.zeros(num_nodes, dtype=torch.bool)
        mask[perm[lo:hi]] = True
        masks.append(mask)
    return masks[0], masks[1], masks[2]

"""A generated graph with learnable labels: the default dataset.

The graph is a degree-corrected stochastic block model (DC-SBM): every node
draws a class and a heavy-tailed degree propensity, and every edge joins two
nodes of the same class with probability ``homophily`` and nodes of two
different classes otherwise.  Features are a class centroid plus Gaussian
noise, so both the features and the graph carry signal and a GNN learns
more than an MLP.  Everything is vectorized and drawn from one seeded
generator: the same options give the same graph, bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data

from pyg_adaqp.data.checks import DatasetError
from pyg_adaqp.data.splits import random_split_masks


def synthetic_graph(
    num_nodes: int = 10_000,
    avg_degree: float = 20.0,
    num_classes: int = 8,
    num_features: int = 64,
    homophily: float = 0.7,
    feature_noise: float = 2.0,
    degree_exponent: float = 2.5,
    directed: bool = False,
    multi_label: bool = False,
    train_ratio: float = 0.6,
    val_ratio: float = 0.2,
    seed: int = 0,
    raw_channel_std: float = 0.0,
) -> Data:
    r"""Generates a degree-corrected stochastic block model graph.

    Args:
        num_nodes (int, optional): Number of nodes. (default: :obj:`10000`)
        avg_degree (float, optional): Average in-degree, i.e. the number of
            directed edges divided by the number of nodes.  Duplicate edges
            and self loops are dropped, so the realized degree is slightly
            lower. (default: :obj:`20.0`)
        num_classes (int, optional): Number of classes. (default: :obj:`8`)
        num_features (int, optional): Feature width. (default: :obj:`64`)
        homophily (float, optional): Fraction of edges that join two nodes of
            the same class (edge homophily). (default: :obj:`0.7`)
        feature_noise (float, optional): Standard deviation of the Gaussian
            noise added to the unit-variance class centroids; larger values
            make the features alone less informative. (default: :obj:`2.0`)
        degree_exponent (float, optional): Exponent :math:`\gamma` of the
            power-law degree propensities :math:`P(\theta) \propto
            \theta^{-\gamma}`. (default: :obj:`2.5`)
        directed (bool, optional): If :obj:`False`, every edge is stored in
            both directions. (default: :obj:`False`)
        multi_label (bool, optional): If :obj:`True`, ``y`` is a 2-D float
            tensor ``[num_nodes, num_classes]`` (like Yelp's): every node
            carries its class's label, plus the label of the next class
            with probability 1/2 (learnable from the class) and every other
            label with probability 0.05 (noise). (default: :obj:`False`)
        train_ratio (float, optional): Fraction of nodes in the training
            split. (default: :obj:`0.6`)
        val_ratio (float, optional): Fraction of nodes in the validation
            split; the rest is the test split. (default: :obj:`0.2`)
        seed (int, optional): Seed of every random draw. (default: :obj:`0`)
        raw_channel_std (float, optional): If positive, one more feature
            column, unrelated to the labels, drawn from a Gaussian of this
            standard deviation: an unnormalized column (a count, a year)
            beside the others.  Everything else is the graph drawn without
            it, bit for bit. (default: :obj:`0.0`)
    """
    if num_nodes < 1:
        raise DatasetError(f"synthetic: num_nodes must be >= 1, got {num_nodes}")
    if num_classes < 1 or num_classes > num_nodes:
        raise DatasetError(f"synthetic: num_classes must be in [1, num_nodes={num_nodes}], "
                           f"got {num_classes}")
    if num_features < 1:
        raise DatasetError(f"synthetic: num_features must be >= 1, got {num_features}")
    if avg_degree < 0:
        raise DatasetError(f"synthetic: avg_degree must be >= 0, got {avg_degree}")
    if not 0.0 <= homophily <= 1.0:
        raise DatasetError(f"synthetic: homophily must be in [0, 1], got {homophily}")
    if raw_channel_std < 0:
        raise DatasetError(f"synthetic: raw_channel_std must be >= 0, got {raw_channel_std}")
    if degree_exponent <= 1.0:
        raise DatasetError(f"synthetic: degree_exponent must be > 1, got {degree_exponent}")

    gen = torch.Generator().manual_seed(seed)
    # Every class is non-empty: the first `num_classes` nodes take one class
    # each, the others draw theirs uniformly.
    y = torch.cat([
        torch.arange(num_classes),
        torch.randint(num_classes, (num_nodes - num_classes,), generator=gen),
    ])
    y = y[torch.randperm(num_nodes, generator=gen)]

    # Power-law propensities by inverse transform of a Pareto(gamma - 1) draw,
    # capped so that no single node swallows the edge budget.
    u = torch.rand(num_nodes, generator=gen, dtype=torch.float64)
    theta = (1.0 - u).pow(-1.0 / (degree_exponent - 1.0)).clamp_(max=num_nodes**0.5)

    num_draws = int(round(num_nodes * avg_degree / (1 if directed else 2)))
    edge_index = _draw_edges(y, theta, num_classes, num_draws, homophily, gen)
    if not directed:
        edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    edge_index = _coalesce_without_self_loops(edge_index, num_nodes)

    centroids = torch.randn(num_classes, num_features, generator=gen)
    x = torch.randn(num_nodes, num_features, generator=gen).mul_(feature_noise)
    x += centroids[y]

    train_mask, val_mask, test_mask = random_split_masks(num_nodes, train_ratio, val_ratio, seed)
    if multi_label:
        labels = (torch.rand(num_nodes, num_classes, generator=gen) < 0.05).float()
        labels[torch.arange(num_nodes), y] = 1.0
        nxt = (y + 1) % num_classes
        labels[torch.arange(num_nodes), nxt] = torch.maximum(
            labels[torch.arange(num_nodes), nxt],
            (torch.rand(num_nodes, generator=gen) < 0.5).float())
        y = labels
    if raw_channel_std > 0:  # drawn last: the rest of the graph does not move
        x = torch.cat([x, torch.randn(num_nodes, 1, generator=gen).mul_(raw_channel_std)], dim=1)
    return Data(
        x=x, y=y, edge_index=edge_index, num_nodes=num_nodes, num_classes=num_classes,
        train_mask=train_mask, val_mask=val_mask, test_mask=test_mask,
    )


def _draw_edges(y: Tensor, theta: Tensor, num_classes: int, num_draws: int,
                homophily: float, gen: torch.Generator) -> Tensor:
    """Draws `num_draws` (source, target) pairs of the DC-SBM."""
    # Nodes sorted by class, with cumulative propensities: sampling a node of
    # class c proportionally to theta is an inverse-CDF lookup restricted to
    # that class's segment of the cumulative sum.
    order = torch.argsort(y, stable=True)
    cum = torch.cumsum(theta[order], dim=0)
    counts = torch.bincount(y, minlength=num_classes)
    seg_end = torch.cumsum(counts, dim=0)
    seg_start = seg_end - counts
    cum0 = torch.cat([cum.new_zeros(1), cum])
    lo, hi = cum0[seg_start], cum0[seg_end]

    def sample(cls: Tensor) -> Tensor:
        r = torch.rand(cls.numel(), generator=gen, dtype=torch.float64)
        pos = torch.searchsorted(cum, lo[cls] + r * (hi[cls] - lo[cls]), right=True)
        # Float rounding can push a draw one past its segment.
        pos = torch.minimum(pos, seg_end[cls] - 1)
        return order[pos]

    # Sources over all nodes: the same lookup on the whole cumulative sum
    # (torch.multinomial caps the number of categories at 2^24).
    r = torch.rand(num_draws, generator=gen, dtype=torch.float64) * cum[-1]
    src = order[torch.searchsorted(cum, r, right=True).clamp_(max=cum.numel() - 1)]
    src_cls = y[src]
    same = torch.rand(num_draws, generator=gen) < homophily
    if num_classes > 1:
        shift = torch.randint(1, num_classes, (num_draws,), generator=gen)
        dst_cls = torch.where(same, src_cls, (src_cls + shift) % num_classes)
    else:
        dst_cls = src_cls
    return torch.stack([src, sample(dst_cls)])


def _coalesce_without_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Drops self loops and duplicates and sorts edges by (target, source)."""
    src, dst = edge_index
    keep = src != dst
    key = torch.unique(dst[keep] * num_nodes + src[keep])
    return torch.stack([key % num_nodes, key // num_nodes])

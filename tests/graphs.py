"""Small graphs for tests."""
from __future__ import annotations

import torch
from torch_geometric.data import Data


def random_directed_graph(num_nodes: int = 120, num_edges: int = 600, seed: int = 0,
                          weighted: bool = True) -> Data:
    """Directed multigraph with self loops, duplicate edges and isolated nodes."""
    g = torch.Generator().manual_seed(seed)
    # The last 10 nodes get no edge at all.
    src = torch.randint(num_nodes - 10, (num_edges,), generator=g)
    dst = torch.randint(num_nodes - 10, (num_edges,), generator=g)
    # Exactly one self loop at nodes 0..4 (PyG's gcn_norm keeps an unspecified
    # one of several self loops, so the tests avoid repeating them).
    dst = torch.where(src == dst, (dst + 1) % (num_nodes - 10), dst)
    src[:5] = dst[:5] = torch.arange(5)
    src[5:8], dst[5:8] = src[8:11], dst[8:11]  # a few duplicate edges
    data = Data(edge_index=torch.stack([src, dst]), num_nodes=num_nodes,
                x=torch.randn(num_nodes, 5, generator=g),
                y=torch.randint(3, (num_nodes,), generator=g),
                train_mask=torch.rand(num_nodes, generator=g) < 0.5)
    if weighted:
        data.edge_weight = torch.rand(num_edges, generator=g) + 0.5
    return data

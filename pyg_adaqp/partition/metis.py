"""METIS k-way partitioning through the `pymetis` wheel."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def metis_membership(edge_index: Tensor, num_nodes: int, num_parts: int, seed: int = 0) -> Tensor:
    r"""Assigns every node to one of `num_parts` parts with METIS.

    METIS minimizes the edge cut of an undirected graph under a node-count
    balance constraint, so the (possibly directed) edges are symmetrized and
    self loops dropped first; the training graph itself keeps its direction.

    Args:
        edge_index (LongTensor): Edges, shape :obj:`[2, num_edges]`.
        num_nodes (int): Number of nodes.
        num_parts (int): Number of parts; :obj:`1` returns all zeros without
            calling METIS.
        seed (int, optional): METIS's random seed. (default: :obj:`0`)

    Returns:
        LongTensor: The part of every node, shape :obj:`[num_nodes]`.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_parts > num_nodes:
        raise ValueError(f"num_parts ({num_parts}) exceeds the number of nodes ({num_nodes}): "
                         f"some workers would own nothing")
    if num_parts == 1:
        return torch.zeros(num_nodes, dtype=torch.long)

    import pymetis

    src, dst = edge_index
    keep = src != dst
    src, dst = src[keep], dst[keep]
    # Both directions, deduplicated: METIS rejects repeated neighbours.
    key = torch.unique(torch.cat([src * num_nodes + dst, dst * num_nodes + src]))
    row, col = key // num_nodes, key % num_nodes
    xadj = torch.zeros(num_nodes + 1, dtype=torch.long)
    xadj[1:] = torch.cumsum(torch.bincount(row, minlength=num_nodes), dim=0)
    if col.numel() == 0:
        # METIS cannot cut a graph without edges; any balanced split is optimal.
        return torch.arange(num_nodes) * num_parts // num_nodes
    # int64 is METIS's index type in the wheel: passing it avoids a copy.
    result = pymetis.part_graph(
        num_parts, pymetis.CSRAdjacency(xadj.numpy(), col.numpy()),
        options=pymetis.Options(seed=seed))
    return torch.from_numpy(np.asarray(result.vertex_part, dtype=np.int64))

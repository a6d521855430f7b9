"""`partition_graph`: split a PyG graph into one `LocalGraph` per worker."""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch_geometric.data import Data

from pyg_adaqp.partition.local_graph import LocalGraph
from pyg_adaqp.partition.metis import metis_membership

_NODE_ATTRS = ("x", "y", "train_mask", "val_mask", "test_mask")


def partition_graph(data: Data, num_parts: int, seed: int = 0,
                    out_dir: str | os.PathLike | None = None,
                    membership: Tensor | None = None) -> list[LocalGraph]:
    r"""Partitions `data` with METIS into one :class:`LocalGraph` per worker.

    Worker ``r`` owns the nodes METIS puts in part ``r`` and gets all in-edges
    of its owned nodes (``u -> v`` with ``v`` owned), the halo rows those
    edges need, the global degrees that GCN's normalization needs, and the
    send/receive plan for every peer (see :class:`LocalGraph`).  The graph
    keeps its direction: only METIS sees the symmetrized graph.

    Args:
        data (torch_geometric.data.Data): The graph, with ``edge_index`` and
            optionally ``edge_weight``, ``x``, ``y``, ``train_mask``,
            ``val_mask``, ``test_mask`` and ``num_classes``.
        num_parts (int): Number of parts (workers); :obj:`1` is legal and
            needs no communication.
        seed (int, optional): METIS's random seed. (default: :obj:`0`)
        out_dir (str, optional): If set, also writes one file per part and a
            manifest there (see :func:`~pyg_adaqp.partition.save_partition`).
            (default: :obj:`None`)
        membership (LongTensor, optional): The part of every node, to use
            instead of METIS (e.g. a partition computed elsewhere).
            (default: :obj:`None`)
    """
    num_nodes = int(data.num_nodes)
    edge_index = data.edge_index
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, num_edges], got {list(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index holds node ids outside [0, {num_nodes})")
    edge_weight = data.edge_weight if "edge_weight" in data else None
    if membership is None:
        membership = metis_membership(edge_index, num_nodes, num_parts, seed)
    elif membership.shape != (num_nodes,) or (num_nodes and (
            int(membership.min()) < 0 or int(membership.max()) >= num_parts)):
        raise ValueError(f"membership must give every node a part in [0, {num_parts})")

    parts = _build_local_graphs(edge_index.long(), edge_weight, membership.long(), num_nodes,
                                num_parts)
    num_classes = data.num_classes if "num_classes" in data else None
    for lg in parts:
        owned = lg.owned_ids
        for name in _NODE_ATTRS:
            if name in data and data[name] is not None:
                setattr(lg, name, data[name][owned])
        lg.num_classes = None if num_classes is None else int(num_classes)

    if out_dir is not None:
        from pyg_adaqp.partition.storage import graph_fingerprint, save_partition
        save_partition(parts, out_dir, graph_fingerprint(data), seed=seed)
    return parts


def _build_local_graphs(edge_index: Tensor, edge_weight: Tensor | None, part: Tensor,
                        num_nodes: int, num_parts: int) -> list[LocalGraph]:
    """Vectorized construction of every worker's local graph at once."""
    src, dst = edge_index
    P, N = num_parts, num_nodes

    # Global degrees, self loops kept apart (GCN replaces them, see LocalGraph).
    weight = edge_weight if edge_weight is not None else torch.ones(src.numel())
    weight = weight.float()
    is_loop = src == dst
    in_degree = torch.zeros(N).index_add_(0, dst[~is_loop], weight[~is_loop])
    has_loop = torch.zeros(N, dtype=torch.bool)
    has_loop[dst[is_loop]] = True
    loop_weight = torch.zeros(N).index_add_(0, dst[is_loop], weight[is_loop])
    loop_weight[~has_loop] = float("nan")

    cross = part[src] != part[dst]
    is_marginal = torch.zeros(N, dtype=torch.bool)
    is_marginal[dst[cross]] = True

    # Owned rows: sorted by (part, marginal, global id); `local_pos` is each
    # node's row index inside its own part.
    owned_order = torch.argsort(part * 2 + is_marginal.long(), stable=True)
    owned_count = torch.bincount(part, minlength=P)
    owned_start = torch.cumsum(owned_count, 0) - owned_count
    local_pos = torch.empty(N, dtype=torch.long)
    local_pos[owned_order] = torch.arange(N) - owned_start[part[owned_order]]
    marginal_count = torch.bincount(part[is_marginal], minlength=P)

    # Halo slots: one per (receiver, node) pair along cut edges, sorted by
    # (receiver, owner, owner's local row).  Encoded as one int64 key.
    recv_of_cross = part[dst[cross]]
    src_cross = src[cross]
    cross_key = (recv_of_cross * P + part[src_cross]) * N + local_pos[src_cross]
    halo_key = torch.unique(cross_key)
    halo_pair = halo_key // N                       # receiver * P + owner
    halo_lpos = halo_key % N                        # owner's local row
    halo_recv, halo_owner = halo_pair // P, halo_pair % P
    halo_node = owned_order[owned_start[halo_owner] + halo_lpos]
    halo_count = torch.bincount(halo_recv, minlength=P)
    halo_start = torch.cumsum(halo_count, 0) - halo_count
    pair_count = torch.bincount(halo_pair, minlength=P * P).view(P, P)  # [receiver, owner]

    # Local edge ids: targets are owned rows, sources owned rows or halo slots.
    recv = part[dst]
    local_src = local_pos[src].clone()
    halo_slot = torch.searchsorted(halo_key, cross_key)
    local_src[cross] = owned_count[recv_of_cross] + halo_slot - halo_start[recv_of_cross]
    local_dst = local_pos[dst]
    # Sort by (part, target, source): a node's global owned position is unique
    # across parts, so one int64 key orders all parts at once.
    edge_order = torch.argsort((owned_start[recv] + local_dst) * N + local_src)
    edge_count = torch.bincount(recv, minlength=P)
    edge_start = torch.cumsum(edge_count, 0) - edge_count

    parts: list[LocalGraph] = []
    for r in range(P):
        owned = owned_order[owned_start[r]:owned_start[r] + owned_count[r]]
        h = slice(int(halo_start[r]), int(halo_start[r] + halo_count[r]))
        node_ids = torch.cat([owned, halo_node[h]])
        e = edge_order[edge_start[r]:edge_start[r] + edge_count[r]]
        # What r sends to p is p's halo slice of owner r, in p's slot order.
        send_index, recv_index = {}, {}
        for p in range(P):
            if p == r:
                continue
            if pair_count[p, r] > 0:
                start = int(halo_start[p] + pair_count[p, :r].sum())
                send_index[p] = halo_lpos[start:start + int(pair_count[p, r])].clone()
            if pair_count[r, p] > 0:
                start = int(pair_count[r, :p].sum())
                recv_index[p] = torch.arange(start, start + int(pair_count[r, p]))
        parts.append(LocalGraph(
            rank=r, num_parts=P, num_nodes_global=N,
            num_central=int(owned_count[r] - marginal_count[r]),
            num_marginal=int(marginal_count[r]),
            node_ids=node_ids, halo_owner=halo_owner[h].clone(),
            edge_index=torch.stack([local_src[e], local_dst[e]]),
            edge_weight=None if edge_weight is None else edge_weight[e].clone(),
            in_degree=in_degree[node_ids], loop_weight=loop_weight[node_ids],
            send_index=send_index, recv_index=recv_index,
        ))
    return parts

"""`partition_graph`: split a PyG graph into one `LocalGraph` per worker.

The local graphs are built one at a time (:func:`local_graphs` yields them),
so a partition written to disk never holds more than one part in memory, and
their edges are int32 (half the memory of every worker's edge list).
Besides the graph, building needs one int32 (int64 past 2^31 edges) per
edge, the edges are bucketed by the part that owns their target, and a
few arrays per node; everything else is sized by one part's edges.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch_geometric.data import Data

from pyg_adaqp.partition.local_graph import LocalGraph
from pyg_adaqp.partition.metis import metis_membership

_NODE_ATTRS = ("x", "y", "train_mask", "val_mask", "test_mask")
_CHUNK = 1 << 22


def partition_graph(data: Data, num_parts: int, seed: int = 0,
                    out_dir: str | os.PathLike | None = None,
                    membership: Tensor | None = None) -> list[LocalGraph]:
    r"""Partitions `data` with METIS into one :class:`LocalGraph` per worker.

    Worker ``r`` owns the nodes METIS puts in part ``r`` and gets all in-edges
    of its owned nodes (``u -> v`` with ``v`` owned), the halo rows those
    edges need, the global degrees that GCN's normalization needs, and the
    send/receive plan for every peer (see :class:`LocalGraph`).  The graph
    keeps its direction: only METIS sees the symmetrized graph.

    This holds every part in memory; :func:`partition_to_disk` writes them
    one at a time instead.

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
    parts = list(local_graphs(data, num_parts, seed, membership))
    if out_dir is not None:
        from pyg_adaqp.partition.storage import graph_fingerprint, save_partition
        save_partition(parts, out_dir, graph_fingerprint(data), seed=seed)
    return parts


def partition_to_disk(data: Data, num_parts: int, out_dir: str | os.PathLike, seed: int = 0,
                      dataset_key: str | None = None,
                      metis_max_entries: int | None = None) -> Path:
    """Partitions `data` like :func:`partition_graph`, writing one part at a time to `out_dir`.

    Only one part is in memory at a time.  Returns the manifest's path.

    Args:
        dataset_key (str, optional): The key of the dataset `data` was loaded
            from (:func:`~pyg_adaqp.data.dataset_key`), recorded in the
            manifest so a run can reuse the partition without loading the
            graph. (default: :obj:`None`)
        metis_max_entries (int, optional): As ``max_entries`` in
            :func:`~pyg_adaqp.partition.metis_membership`.
            (default: :obj:`None`)
    """
    from pyg_adaqp.partition.storage import graph_fingerprint, save_partition
    parts = local_graphs(data, num_parts, seed, metis_max_entries=metis_max_entries)
    return save_partition(parts, out_dir, graph_fingerprint(data), seed=seed,
                          dataset_key=dataset_key)


def local_graphs(data: Data, num_parts: int, seed: int = 0, membership: Tensor | None = None,
                 metis_max_entries: int | None = None) -> Iterator[LocalGraph]:
    """Yields the :class:`LocalGraph` of every part in rank order, one at a time.

    Arguments as in :func:`partition_graph`; `metis_max_entries` as
    ``max_entries`` in :func:`~pyg_adaqp.partition.metis_membership`.
    """
    num_nodes = int(data.num_nodes)
    edge_index = data.edge_index
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, num_edges], got {list(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index holds node ids outside [0, {num_nodes})")
    if membership is None:
        membership = metis_membership(edge_index, num_nodes, num_parts, seed, metis_max_entries)
    elif membership.shape != (num_nodes,) or (num_nodes and (
            int(membership.min()) < 0 or int(membership.max()) >= num_parts)):
        raise ValueError(f"membership must give every node a part in [0, {num_parts})")
    edge_weight = data.edge_weight if "edge_weight" in data else None
    num_classes = int(data.num_classes) if "num_classes" in data else None
    builder = _Builder(edge_index.long(), edge_weight, membership.long(), num_nodes, num_parts)
    for r in range(num_parts):
        lg = builder.local_graph(r)
        owned = lg.owned_ids
        for name in _NODE_ATTRS:
            if name in data and data[name] is not None:
                setattr(lg, name, data[name][owned])
        lg.num_classes = num_classes
        yield lg


class _Builder:
    r"""What every part needs from the whole graph, then one part at a time.

    Owned rows of part ``r`` are sorted by (marginal, global id); a node's
    *owned position* ``pos`` is its row in the concatenation of all parts'
    owned rows, so ``pos - owned_start[r]`` is its local row.  A part's halo
    is the sorted set of the owned positions of its cut in-neighbours, which
    orders it by (owner, owner's local row).
    """

    def __init__(self, edge_index: Tensor, edge_weight: Tensor | None, part: Tensor,
                 num_nodes: int, num_parts: int):
        self.src, self.dst = edge_index
        self.weight = edge_weight
        self.part = part.to(torch.int16 if num_parts < 2**15 else torch.int32)
        self.num_parts = num_parts
        N, P, E = num_nodes, num_parts, self.src.numel()

        # Global degrees, self loops kept apart (GCN replaces them, see
        # LocalGraph); marginal nodes; and the edges bucketed by the part of
        # their target, chunk by chunk.
        self.in_degree = torch.zeros(N)
        self.loop_weight = torch.zeros(N)
        has_loop = torch.zeros(N, dtype=torch.bool)
        is_marginal = torch.zeros(N, dtype=torch.bool)
        edge_count = torch.zeros(P, dtype=torch.long)
        for a in range(0, E, _CHUNK):
            s, d = self.src[a:a + _CHUNK], self.dst[a:a + _CHUNK]
            w = (torch.ones(s.numel()) if edge_weight is None
                 else edge_weight[a:a + _CHUNK].float())
            loop = s == d
            self.in_degree.index_add_(0, d[~loop], w[~loop])
            has_loop[d[loop]] = True
            self.loop_weight.index_add_(0, d[loop], w[loop])
            recv = self.part[d]
            is_marginal[d[self.part[s] != recv]] = True
            edge_count += torch.bincount(recv.long(), minlength=P)
        self.loop_weight[~has_loop] = float("nan")
        self.edge_count = edge_count
        self.edge_start = torch.cumsum(edge_count, 0) - edge_count
        self.edges_by_part = torch.empty(E, dtype=torch.int32 if E < 2**31 else torch.long)
        fill = self.edge_start.clone()
        for a in range(0, E, _CHUNK):
            recv = self.part[self.dst[a:a + _CHUNK]].long()
            order = torch.argsort(recv, stable=True)
            counts = torch.bincount(recv, minlength=P)
            ends = torch.cumsum(counts, 0)
            for r in torch.nonzero(counts).view(-1).tolist():
                k = int(counts[r])
                self.edges_by_part[fill[r]:fill[r] + k] = order[ends[r] - k:ends[r]] + a
                fill[r] += k

        self.owned_order = torch.argsort(self.part.long() * 2 + is_marginal.long(), stable=True)
        self.pos = torch.empty(N, dtype=torch.long)
        self.pos[self.owned_order] = torch.arange(N)
        self.owned_count = torch.bincount(self.part.long(), minlength=P)
        self.owned_start = torch.cumsum(self.owned_count, 0) - self.owned_count
        self.marginal_count = torch.bincount(self.part[is_marginal].long(), minlength=P)
        self.halo = [self._halo(r) for r in range(P)]

    def _edges(self, r: int) -> Tensor:
        """Ids of the edges into part `r`'s nodes."""
        start = int(self.edge_start[r])
        return self.edges_by_part[start:start + int(self.edge_count[r])].long()

    def _halo(self, r: int) -> Tensor:
        """Sorted owned positions of part `r`'s halo rows."""
        s = self.src[self._edges(r)]
        return torch.unique(self.pos[s[self.part[s] != r]])

    def _owned_range(self, positions: Tensor, owner: int) -> tuple[int, int]:
        """The slice of sorted `positions` owned by `owner`."""
        bounds = torch.stack([self.owned_start[owner],
                              self.owned_start[owner] + self.owned_count[owner]])
        lo, hi = torch.searchsorted(positions, bounds).tolist()
        return lo, hi

    def local_graph(self, r: int) -> LocalGraph:
        num_owned, start = int(self.owned_count[r]), int(self.owned_start[r])
        halo = self.halo[r]
        num_local = num_owned + halo.numel()
        ids = self._edges(r)
        weight = None if self.weight is None else self.weight[ids]

        # Local ids: targets are owned rows, sources owned rows or halo slots.
        s = self.src[ids]
        local_src = self.pos[s]
        cross = self.part[s] != r
        del s
        local_src[cross] = torch.searchsorted(halo, local_src[cross]) + num_owned
        local_src[~cross] -= start
        # Sorted by (target, source) through one int64 key.
        key = self.pos[self.dst[ids]].sub_(start).mul_(num_local).add_(local_src)
        del ids, local_src, cross
        if weight is None:
            key.numpy().sort()  # in place: no permutation needed
        else:
            key, order = torch.sort(key)
            weight = weight[order]
            del order
        edge_index = torch.empty(2, key.numel(),
                                 dtype=torch.int32 if num_local < 2**31 else torch.long)
        edge_index[0] = key % num_local
        edge_index[1] = key.div_(num_local, rounding_mode="floor")
        del key

        owned = self.owned_order[start:start + num_owned]
        halo_nodes = self.owned_order[halo]
        node_ids = torch.cat([owned, halo_nodes])
        # What r sends to p is p's halo slice of owner r, in p's slot order.
        send_index, recv_index = {}, {}
        for p in range(self.num_parts):
            if p == r:
                continue
            lo, hi = self._owned_range(self.halo[p], r)
            if hi > lo:
                send_index[p] = self.halo[p][lo:hi] - start
            lo, hi = self._owned_range(halo, p)
            if hi > lo:
                recv_index[p] = torch.arange(lo, hi)
        return LocalGraph(
            rank=r, num_parts=self.num_parts, num_nodes_global=self.pos.numel(),
            num_central=num_owned - int(self.marginal_count[r]),
            num_marginal=int(self.marginal_count[r]),
            node_ids=node_ids, halo_owner=self.part[halo_nodes].long(),
            edge_index=edge_index, edge_weight=weight,
            in_degree=self.in_degree[node_ids], loop_weight=self.loop_weight[node_ids],
            send_index=send_index, recv_index=recv_index,
        )

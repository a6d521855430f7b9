"""`DistGCNConv`: PyG's `GCNConv` on a partitioned graph."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torch_geometric.nn import GCNConv
from torch_geometric.typing import Adj, OptTensor

from pyg_adaqp.nn.dist_graph import DistGraph, EdgeWeightFn
from pyg_adaqp.partition import LocalGraph


def dist_gcn_norm(graph: LocalGraph, improved: bool = False, add_self_loops: bool = True,
                  normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    r"""GCN's edge weights for one worker's local edges, from *global* degrees.

    Exactly what :func:`torch_geometric.nn.conv.gcn_conv.gcn_norm` computes
    on the whole graph, restricted to the in-edges of the owned rows: with
    self loops added (the graph's own self loops keep their weight, others
    get ``2`` if `improved` else ``1``),

    .. math::
        a_{vu} = \frac{w_{uv}}{\sqrt{\hat{d}_u \hat{d}_v}}, \qquad
        \hat{d}_v = \sum_{u \to v} w_{uv}.

    The degree of a halo row cannot be counted locally (its in-edges live on
    another worker), so it comes from :attr:`LocalGraph.in_degree`.  A node
    with several self loops counts their summed weight as its one loop
    (PyG keeps an unspecified one of them when it adds self loops).

    Returns:
        ``(src, dst, weight)`` in local ids, targets owned rows.
    """
    src, dst = graph.edge_index
    w = graph.edge_weight if graph.edge_weight is not None else torch.ones(src.numel())
    w = w.float()
    if not normalize:
        return src, dst, w
    loop = graph.loop_weight
    if add_self_loops:
        keep = src != dst
        owned = torch.arange(graph.num_owned, dtype=src.dtype)
        fill = 2.0 if improved else 1.0
        loop = torch.where(loop.isnan(), torch.full_like(loop, fill), loop)
        src = torch.cat([src[keep], owned])
        dst = torch.cat([dst[keep], owned])
        w = torch.cat([w[keep], loop[:graph.num_owned]])
    else:
        loop = loop.nan_to_num(0.0)
    deg_inv_sqrt = (graph.in_degree + loop).pow(-0.5)
    deg_inv_sqrt.masked_fill_(deg_inv_sqrt == float("inf"), 0.0)
    return src, dst, deg_inv_sqrt[src] * w * deg_inv_sqrt[dst]


class DistGCNConv(GCNConv):
    r"""The graph convolutional operator from the `"Semi-supervised
    Classification with Graph Convolutional Networks"
    <https://arxiv.org/abs/1609.02907>`_ paper, distributed over the workers
    of a partitioned graph:

    .. math::
        \mathbf{X}^{\prime} = \mathbf{\hat{D}}^{-1/2} \mathbf{\hat{A}}
        \mathbf{\hat{D}}^{-1/2} \mathbf{X} \mathbf{\Theta}

    A swap-in for :class:`torch_geometric.nn.GCNConv`: the same arguments,
    parameters and maths.  Called with ``(x, edge_index)`` it *is*
    :class:`GCNConv`; called with ``(x, graph)``, where `x` holds this
    worker's owned rows and `graph` is its :class:`DistGraph`, it exchanges
    the halo rows with the other workers (quantized if the graph says so) and
    returns the owned rows of the output.  With full-precision exchanges the
    concatenated outputs of all workers equal :class:`GCNConv` on the whole
    graph.  Normalization uses global degrees, so it is exact.

    Linear maps commute with aggregation, so the layer exchanges the
    narrower of its input and output: it transforms first when
    ``out_channels < in_channels``, unless the input's halo block comes from
    the input cache (then exchanging it is free).

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        improved (bool, optional): If set to :obj:`True`, self loops get
            weight ``2``. (default: :obj:`False`)
        cached (bool, optional): As in :class:`GCNConv`, for whole-graph
            calls; distributed calls always cache their normalization in the
            :class:`DistGraph`. (default: :obj:`False`)
        add_self_loops (bool, optional): If set to :obj:`False`, will not add
            self-loops. (default: same as `normalize`)
        normalize (bool, optional): Whether to add self-loops and compute
            symmetric normalization coefficients. (default: :obj:`True`)
        bias (bool, optional): If set to :obj:`False`, the layer will not
            learn an additive bias. (default: :obj:`True`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}_r|, F_{in})` and a
          :class:`DistGraph`, or :math:`(|\mathcal{V}|, F_{in})` and edge
          indices :math:`(2, |\mathcal{E}|)` with optional edge weights
          :math:`(|\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}_r|, F_{out})` or
          :math:`(|\mathcal{V}|, F_{out})`
    """

    def dist_aggregation(self) -> tuple[tuple, EdgeWeightFn]:
        """The key and edge weights of this layer's aggregation on a :class:`DistGraph`."""
        return (("gcn", self.improved, self.add_self_loops, self.normalize),
                partial(dist_gcn_norm, improved=self.improved,
                        add_self_loops=self.add_self_loops, normalize=self.normalize))

    def forward(self, x: Tensor, edge_index: Adj | DistGraph,
                edge_weight: OptTensor = None) -> Tensor:
        if not isinstance(edge_index, DistGraph):
            return super().forward(x, edge_index, edge_weight)
        if edge_weight is not None:
            raise ValueError(f"{self.__class__.__name__}: with a DistGraph the edge weights "
                             f"come from the partition; do not pass edge_weight")
        graph = edge_index
        key, weights = self.dist_aggregation()
        if self.out_channels < self.in_channels and not graph.caches_input(self, x):
            out = graph.aggregate(self, self.lin(x), key, weights)
        else:
            out = graph.aggregate(self, x, key, weights, linear=self.lin)
        if self.bias is not None:
            out += self.bias  # out is always a fresh product here, never a cached tensor
        return out

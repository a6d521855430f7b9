"""`DistSAGEConv`: PyG's `SAGEConv` on a partitioned graph."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import SAGEConv
from torch_geometric.typing import Adj, Size

from pyg_adaqp.nn.dist_graph import DistGraph, EdgeWeightFn
from pyg_adaqp.partition import LocalGraph

_LINEAR_AGGRS = ("mean", "sum", "add")


def sage_weights(graph: LocalGraph, aggr: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    r"""SAGE's aggregation weights for one worker's local edges.

    ``mean`` weighs edge ``u -> v`` by :math:`1/\deg(v)`; every owned row
    holds all its in-edges, so the in-degree is counted locally.  ``sum``
    weighs every edge by one.

    Returns:
        ``(src, dst, weight)`` in local ids, targets owned rows.
    """
    src, dst = graph.edge_index
    if aggr == "mean":
        deg = torch.bincount(dst, minlength=graph.num_owned).float()
        return src, dst, deg.reciprocal()[dst]
    return src, dst, torch.ones(src.numel())


class DistSAGEConv(SAGEConv):
    r"""The GraphSAGE operator from the `"Inductive Representation Learning
    on Large Graphs" <https://arxiv.org/abs/1706.02216>`_ paper, distributed
    over the workers of a partitioned graph:

    .. math::
        \mathbf{x}^{\prime}_i = \mathbf{W}_1 \mathbf{x}_i + \mathbf{W}_2 \cdot
        \mathrm{mean}_{j \in \mathcal{N}(i)} \mathbf{x}_j

    A swap-in for :class:`torch_geometric.nn.SAGEConv`: the same arguments,
    parameters and maths.  Called with ``(x, edge_index)`` it *is*
    :class:`SAGEConv`; called with ``(x, graph)``, where `x` holds this
    worker's owned rows and `graph` is its :class:`DistGraph`, it exchanges
    the halo rows with the other workers and returns the owned rows of the
    output.  Distributed aggregation supports the linear aggregations
    ``"mean"`` and ``"sum"``/``"add"``; it transforms before aggregating when
    that makes the exchanged rows narrower (see :class:`DistGCNConv`), and
    applies its root weight to the owned rows while the halo rows travel
    (and its gradient while theirs do).

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each output sample.
        aggr (str, optional): The aggregation scheme. (default: :obj:`"mean"`)
        normalize (bool, optional): If set to :obj:`True`, output features
            will be :math:`\ell_2`-normalized. (default: :obj:`False`)
        root_weight (bool, optional): If set to :obj:`False`, the layer will
            not add transformed root node features to the output.
            (default: :obj:`True`)
        project (bool, optional): If set to :obj:`True`, the layer will apply
            a linear transformation followed by an activation function before
            aggregation. (default: :obj:`False`)
        bias (bool, optional): If set to :obj:`False`, the layer will not
            learn an additive bias. (default: :obj:`True`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}_r|, F_{in})` and a
          :class:`DistGraph`, or :math:`(|\mathcal{V}|, F_{in})` and edge
          indices :math:`(2, |\mathcal{E}|)`
        - **output:** node features :math:`(|\mathcal{V}_r|, F_{out})` or
          :math:`(|\mathcal{V}|, F_{out})`
    """

    def dist_aggregation(self) -> tuple[tuple, EdgeWeightFn]:
        """The key and edge weights of this layer's aggregation on a :class:`DistGraph`."""
        if not isinstance(self.aggr, str) or self.aggr not in _LINEAR_AGGRS:
            raise ValueError(f"{self.__class__.__name__}: distributed aggregation supports "
                             f"aggr in {_LINEAR_AGGRS}, got {self.aggr!r}")
        aggr = "sum" if self.aggr == "add" else self.aggr
        return ("sage", aggr), partial(sage_weights, aggr=aggr)

    def forward(self, x: Tensor, edge_index: Adj | DistGraph, size: Size = None) -> Tensor:
        if not isinstance(edge_index, DistGraph):
            return super().forward(x, edge_index, size)
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.__class__.__name__}: with a DistGraph, x is the tensor "
                             f"of this worker's owned rows")
        graph = edge_index
        key, weights = self.dist_aggregation()
        x_src = self.lin(x).relu() if self.project else x
        # The root term needs no halo row: it is computed while they travel.
        root = partial(self.lin_r, x) if self.root_weight else None
        if self.lin_l.out_channels < self.lin_l.in_channels and not graph.caches_input(self, x_src):
            out = graph.aggregate(self, F.linear(x_src, self.lin_l.weight), key, weights,
                                  alongside=root)
            if self.lin_l.bias is not None:
                out = out + self.lin_l.bias
        else:
            out = graph.aggregate(self, x_src, key, weights, linear=self.lin_l, alongside=root)
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return out

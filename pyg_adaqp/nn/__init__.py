"""Distributed swap-ins for PyG's layers and their distributed-graph context."""
from pyg_adaqp.nn.dist_graph import DistGraph
from pyg_adaqp.nn.gcn_conv import DistGCNConv, dist_gcn_norm
from pyg_adaqp.nn.sage_conv import DistSAGEConv, sage_weights
from pyg_adaqp.nn.spmm import SparseAdjacency

__all__ = ["DistGCNConv", "DistGraph", "DistSAGEConv", "SparseAdjacency", "dist_gcn_norm",
           "sage_weights"]

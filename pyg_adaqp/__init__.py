"""pyg_adaqp: distributed full-graph GNN training for PyTorch Geometric.

The package follows the data flow of a training run::

    data -> partition -> comm (codec, exchange) -> nn -> assign -> train
"""

__version__ = "0.1.0"

"""`DistGNN`: the paper's model, a stack of distributed convolutions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyg_adaqp.nn import DistGCNConv, DistGraph, DistSAGEConv

CONVS = {"gcn": DistGCNConv, "sage": DistSAGEConv}


class DistGNN(torch.nn.Module):
    r"""``num_layers`` convolutions with LayerNorm, ReLU and dropout between them.

    Args:
        conv (str): ``"gcn"`` or ``"sage"``.
        in_channels (int): Input feature width.
        hidden_channels (int): Hidden width.
        out_channels (int): Number of outputs (classes).
        num_layers (int, optional): Number of convolutions. (default: :obj:`3`)
        dropout (float, optional): Dropout between layers. (default: :obj:`0.5`)
        layer_norm (bool, optional): LayerNorm before each hidden ReLU.
            (default: :obj:`True`)
    """

    def __init__(self, conv: str, in_channels: int, hidden_channels: int, out_channels: int,
                 num_layers: int = 3, dropout: float = 0.5, layer_norm: bool = True):
        super().__init__()
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        self.convs = torch.nn.ModuleList(
            CONVS[conv](a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = torch.nn.ModuleList(
            torch.nn.LayerNorm(hidden_channels) if layer_norm else torch.nn.Identity()
            for _ in range(num_layers - 1))
        self.dropout = dropout

    def forward(self, x: Tensor, graph: DistGraph) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, graph)
            if i < len(self.norms):
                x = relu_dropout(self.norms[i](x), p=self.dropout, training=self.training)
        return x


def relu_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    r"""``F.dropout(x.relu(), p, training)``, as one multiplication on CPU.

    PyTorch's CPU ``bernoulli_`` is slow (the largest single operation of a
    profiled GCN step); comparing uniform 16-bit integers with a threshold
    is cheaper.  The keep mask, the ReLU's and the scale :math:`1 / (1 - p)`
    then make one factor, so forward and backward are one product each.
    Each element is dropped with probability :math:`p` rounded to a
    multiple of :math:`2^{-16}` (exact for 0.5).  On CUDA, or with nothing
    to drop, it is ``F.dropout(x.relu())``.
    """
    if not training or p == 0.0 or x.is_cuda:
        return F.dropout(x.relu(), p=p, training=training)
    # Uniform 16-bit integers, four per full-range 64-bit draw (the generator
    # makes one 64-bit number per element whatever the element's width).
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
    uniform = words.view(torch.int16)[:x.numel()].view(x.shape)
    keep = uniform >= round(p * 2**16) - 2**15
    keep &= x.detach() > 0
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))

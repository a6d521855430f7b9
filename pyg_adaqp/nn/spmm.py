"""Sparse-matrix products for full-graph aggregation, with cached transposes.

Full-graph training cannot afford one message per edge (an ``E x D``
tensor), so aggregation is a CSR sparse-dense product.  Its backward needs
the transposed matrix; ``torch.sparse.mm`` would rebuild it at every step,
so :class:`SparseAdjacency` builds both once.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd import Function


def _csr(row: Tensor, col: Tensor, value: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix from COO triplets; int32 indices where they fit (half the memory)."""
    index_dtype = torch.int32 if max(size) < 2**31 and row.numel() < 2**31 else torch.long
    crow = torch.zeros(size[0] + 1, dtype=index_dtype, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=size[0]), 0)
    key, perm = torch.sort(row.long() * max(size[1], 1) + col)
    col = key.remainder_(max(size[1], 1)).to(index_dtype)
    del key
    value = value[perm]
    del perm
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": matmul is all we use.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, value, size)


class SparseAdjacency:
    r"""A weighted bipartite adjacency ``A`` of shape ``[num_dst, num_src]``.

    ``A[v, u]`` is the weight of edge ``u -> v``, so ``A @ X`` aggregates the
    source rows ``X`` into the target rows.

    Args:
        src (LongTensor): Source of every edge (column index).
        dst (LongTensor): Target of every edge (row index).
        weight (Tensor): Weight of every edge.
        size (tuple[int, int]): ``(num_dst, num_src)``.
    """

    def __init__(self, src: Tensor, dst: Tensor, weight: Tensor, size: tuple[int, int]):
        self.size = size
        self.nnz = int(src.numel())
        self.matrix = _csr(dst, src, weight, size)
        self.matrix_t = _csr(src, dst, weight, (size[1], size[0]))

    def matmul(self, x: Tensor) -> Tensor:
        """``A @ x``, differentiable with respect to `x`."""
        if x.size(0) != self.size[1]:
            raise ValueError(f"adjacency has {self.size[1]} source rows, got a tensor with "
                             f"{x.size(0)}")
        if self.nnz == 0:
            return x.new_zeros(self.size[0], x.size(1))
        return _SpMM.apply(self.matrix, self.matrix_t, x)


class _SpMM(Function):
    @staticmethod
    def forward(ctx, matrix: Tensor, matrix_t: Tensor, x: Tensor) -> Tensor:
        ctx.matrix_t = matrix_t
        return torch.sparse.mm(matrix, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, None, torch.sparse.mm(ctx.matrix_t, grad.contiguous())

"""`LocalGraph`: what one worker holds of the partitioned graph."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass(eq=False)
class LocalGraph:
    r"""One worker's part of a graph partitioned for full-graph training.

    Worker ``rank`` *owns* the nodes of its part and holds *all in-edges* of
    its owned nodes, so every owned node has its complete in-neighbourhood.
    The sources of those edges that are owned by other workers are its
    *halo* rows.  An owned node with at least one halo in-neighbour is
    *marginal*, every other owned node is *central*.  Local rows are ordered

    .. code-block:: none

        [ central | marginal | halo ]
          0 ... num_central ... num_owned ... num_local

    so each block is a contiguous slice.  Halo rows are grouped by owning
    rank (ascending), and within one owner follow the owner's local order.

    The send/receive plan pairs the two sides of every exchange: the k-th row
    of ``send_index[p]`` on this worker lands in halo position
    ``recv_index[r][k]`` of worker ``p`` (local row ``num_owned +
    recv_index[r][k]`` there), where ``r`` is this worker's rank.

    Attributes:
        rank (int): The worker's rank, i.e. the part index.
        num_parts (int): Number of parts (workers).
        num_nodes_global (int): Number of nodes of the whole graph.
        num_central (int): Owned nodes without a halo in-neighbour.
        num_marginal (int): Owned nodes with at least one halo in-neighbour.
        node_ids (LongTensor): Global id of every local row, shape
            :obj:`[num_local]`.
        halo_owner (LongTensor): Owning rank of every halo row, shape
            :obj:`[num_halo]`.
        edge_index (IntTensor): All in-edges of owned rows in local ids,
            sources in :obj:`[0, num_local)`, targets in
            :obj:`[0, num_owned)`, sorted by (target, source); shape
            :obj:`[2, num_edges]`; int32 (int64 past :math:`2^{31}` local
            rows, and in partitions written before int32).  :obj:`None`
            once :meth:`DistGraph.release_edge_list` freed it.
        edge_weight (Tensor, optional): Weight of every local edge, shape
            :obj:`[num_edges]`, or :obj:`None` for an unweighted graph (or
            a released edge list).
        in_degree (Tensor): *Global* weighted in-degree of every local row,
            self loops excluded, shape :obj:`[num_local]`.  Halo rows'
            in-edges are not local, so this is what makes GCN's
            normalization exact.
        loop_weight (Tensor): Weight of the self loop the whole graph has at
            every local row (the sum, if it has several), :obj:`nan` where it
            has none, shape :obj:`[num_local]`.
        send_index (dict[int, LongTensor]): Owned rows sent to each peer, in
            the order of the peer's halo slots.
        recv_index (dict[int, LongTensor]): Positions inside the halo block
            (0-based) filled by each peer, in the order it sends them.
        x (Tensor, optional): Features of the owned rows.
        y (Tensor, optional): Labels of the owned rows.
        train_mask (Tensor, optional): Training mask of the owned rows.
        val_mask (Tensor, optional): Validation mask of the owned rows.
        test_mask (Tensor, optional): Test mask of the owned rows.
        num_classes (int, optional): Number of classes of the whole graph.
    """
    rank: int
    num_parts: int
    num_nodes_global: int
    num_central: int
    num_marginal: int
    node_ids: Tensor
    halo_owner: Tensor
    edge_index: Tensor | None
    in_degree: Tensor
    loop_weight: Tensor
    send_index: dict[int, Tensor] = field(default_factory=dict)
    recv_index: dict[int, Tensor] = field(default_factory=dict)
    edge_weight: Tensor | None = None
    x: Tensor | None = None
    y: Tensor | None = None
    train_mask: Tensor | None = None
    val_mask: Tensor | None = None
    test_mask: Tensor | None = None
    num_classes: int | None = None

    @property
    def num_owned(self) -> int:
        """Number of owned rows (central + marginal)."""
        return self.num_central + self.num_marginal

    @property
    def num_halo(self) -> int:
        """Number of halo rows."""
        return self.node_ids.numel() - self.num_owned

    @property
    def num_local(self) -> int:
        """Number of local rows (owned + halo)."""
        return self.node_ids.numel()

    @property
    def num_edges(self) -> int:
        """Number of local edges (the in-edges of owned rows)."""
        if self.edge_index is None:
            raise RuntimeError("this local graph's edge list was released "
                               "(DistGraph.release_edge_list)")
        return self.edge_index.size(1)

    @property
    def owned_ids(self) -> Tensor:
        """Global ids of the owned rows, ``[central | marginal]``."""
        return self.node_ids[:self.num_owned]

    @property
    def halo_ids(self) -> Tensor:
        """Global ids of the halo rows."""
        return self.node_ids[self.num_owned:]

    def to_dict(self) -> dict:
        """Plain dict of tensors and ints, loadable with ``torch.load(weights_only=True)``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        # Peers as string keys: the safe loader keeps dicts of tensors, and
        # string keys survive any serializer.
        out["send_index"] = {str(p): t for p, t in self.send_index.items()}
        out["recv_index"] = {str(p): t for p, t in self.recv_index.items()}
        return out

    @classmethod
    def from_dict(cls, state: dict) -> LocalGraph:
        """Inverse of :meth:`to_dict`."""
        state = dict(state)
        state["send_index"] = {int(p): t for p, t in state["send_index"].items()}
        state["recv_index"] = {int(p): t for p, t in state["recv_index"].items()}
        return cls(**state)

    def __eq__(self, other: object) -> bool:
        """Whether two local graphs hold identical values (``nan`` equals ``nan``)."""
        if not isinstance(other, LocalGraph):
            return NotImplemented
        return all(_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(rank={self.rank}/{self.num_parts}, "
                f"central={self.num_central}, marginal={self.num_marginal}, "
                f"halo={self.num_halo}, "
                f"edges={'released' if self.edge_index is None else self.num_edges}, "
                f"peers={sorted(set(self.send_index) | set(self.recv_index))})")


def _equal(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


"""METIS k-way partitioning through the `pymetis` wheel, in bounded memory.

METIS wants the symmetrized graph in CSR form.  It is built here in one
int64 array (what the wheel's 64-bit ``idx_t`` reads without a copy): both
directions of every edge are written chunk by chunk, sorted in place,
deduplicated in place and shrunk, so building it never needs more than
16 bytes per directed edge.  METIS itself then needs about 70-100 bytes per
adjacency entry it is given; on a large graph it is given a uniform sample
of the undirected edges (see :func:`metis_membership`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Adjacency entries (two per undirected edge) METIS always sees in full:
#: about 0.4 GiB of METIS memory.  Above this, see ``max_entries``.
FULL_GRAPH_ENTRIES = 1 << 22
#: By default METIS sees at most this many adjacency entries per directed
#: edge of the input: 30-40 bytes of METIS memory per input edge.
ENTRIES_PER_EDGE = 0.3
_CHUNK = 1 << 22


def metis_membership(edge_index: Tensor, num_nodes: int, num_parts: int, seed: int = 0,
                     max_entries: int | None = None) -> Tensor:
    r"""Assigns every node to one of `num_parts` parts with METIS.

    METIS minimizes the edge cut of an undirected graph under a node-count
    balance constraint, so the (possibly directed) edges are symmetrized and
    self loops dropped first; the training graph itself keeps its direction.

    METIS (64-bit indices in the wheel) takes 70-100 bytes per adjacency
    entry, i.e. per direction of an undirected edge, more than the graph it
    partitions.  So when the symmetrized graph has more than `max_entries`
    entries, METIS partitions a uniform sample of the undirected edges of
    that size (every node kept; which edges is a hash of the edge and
    `seed`).  The denser the graph, the less the sample costs: on the
    synthetic graph with 612,000 nodes into 8 parts (``python
    benchmarks/scale.py --metis``), METIS on the sample cut 30.0% of the
    edges against 28.5% on the whole graph at 50 edges per node (38 instead
    of 110 bytes per edge), but 34.5% against 28.0% at 25 edges per node.

    Args:
        edge_index (LongTensor): Edges, shape :obj:`[2, num_edges]`.
        num_nodes (int): Number of nodes.
        num_parts (int): Number of parts; :obj:`1` returns all zeros without
            calling METIS.
        seed (int, optional): METIS's random seed, and the sample's.
            (default: :obj:`0`)
        max_entries (int, optional): Most adjacency entries METIS sees.
            (default: the larger of :obj:`FULL_GRAPH_ENTRIES` and
            :obj:`ENTRIES_PER_EDGE` times the number of edges, which keeps
            METIS within 40 bytes per input edge past 14M edges)

    Returns:
        LongTensor: The part of every node, shape :obj:`[num_nodes]`.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if num_parts > num_nodes:
        raise ValueError(f"num_parts ({num_parts}) exceeds the number of nodes ({num_nodes}): "
                         f"some workers would own nothing")
    if max_entries is not None and max_entries < 2:
        raise ValueError(f"max_entries must be >= 2 (one undirected edge), got {max_entries}")
    if num_parts == 1:
        return torch.zeros(num_nodes, dtype=torch.long)

    import pymetis

    if max_entries is None:
        max_entries = max(FULL_GRAPH_ENTRIES, int(ENTRIES_PER_EDGE * edge_index.size(1)))
    adjncy = _symmetric_keys(edge_index, num_nodes)
    if adjncy.size > max_entries:
        adjncy = _sample_undirected(adjncy, num_nodes, max_entries / adjncy.size, seed)
    if adjncy.size == 0:
        # METIS cannot cut a graph without edges; any balanced split is optimal.
        return torch.arange(num_nodes) * num_parts // num_nodes
    # Rows are key // num_nodes, sorted: each row starts where its first key would.
    xadj = np.searchsorted(adjncy, np.arange(num_nodes + 1, dtype=np.int64) * num_nodes)
    np.remainder(adjncy, num_nodes, out=adjncy)
    result = pymetis.part_graph(num_parts, pymetis.CSRAdjacency(xadj, adjncy),
                                options=pymetis.Options(seed=seed))
    return torch.from_numpy(np.asarray(result.vertex_part, dtype=np.int64))


def _symmetric_keys(edge_index: Tensor, num_nodes: int) -> np.ndarray:
    """Sorted, unique ``row * num_nodes + col`` of the symmetrized graph without self loops."""
    src, dst = (t.numpy() for t in edge_index.long())
    keys = np.empty(2 * src.size, dtype=np.int64)
    n = 0
    for a in range(0, src.size, _CHUNK):
        s, d = src[a:a + _CHUNK], dst[a:a + _CHUNK]
        keep = s != d
        s, d = s[keep], d[keep]
        m = s.size
        np.multiply(s, num_nodes, out=keys[n:n + m])
        keys[n:n + m] += d
        np.multiply(d, num_nodes, out=keys[n + m:n + 2 * m])
        keys[n + m:n + 2 * m] += s
        n += 2 * m
    keys.resize(n, refcheck=False)
    keys.sort()  # in place: no second copy
    # Deduplicate in place, chunk by chunk: the write position never passes the read one.
    n, chunk, first, kept = 0, None, None, None
    for a in range(0, keys.size, _CHUNK):
        chunk = keys[a:a + _CHUNK]
        first = np.empty(chunk.size, dtype=bool)
        first[0] = n == 0 or chunk[0] != keys[n - 1]
        np.not_equal(chunk[1:], chunk[:-1], out=first[1:])
        kept = chunk[first]
        keys[n:n + kept.size] = kept
        n += kept.size
    del chunk, first, kept  # no view of the buffer outlives the shrink
    keys.resize(n, refcheck=False)
    return keys


def _sample_undirected(keys: np.ndarray, num_nodes: int, fraction: float,
                       seed: int) -> np.ndarray:
    """Keeps both directions of a `fraction` of the undirected edges, in place."""
    threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    salt = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    n = 0
    for a in range(0, keys.size, _CHUNK):
        chunk = keys[a:a + _CHUNK]
        row, col = chunk // num_nodes, chunk % num_nodes
        # The same hash for (u, v) and (v, u): splitmix64 of the ordered pair.
        h = (np.minimum(row, col) * num_nodes + np.maximum(row, col)).astype(np.uint64)
        with np.errstate(over="ignore"):
            h += salt
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        kept = chunk[h < threshold]
        keys[n:n + kept.size] = kept
        n += kept.size
    del chunk, kept
    keys.resize(n, refcheck=False)
    return keys

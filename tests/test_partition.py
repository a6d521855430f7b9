"""Partitioning checked against brute-force recomputation on the whole graph."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from graphs import random_directed_graph

from pyg_adaqp.partition import (
    LocalGraph,
    PartitionError,
    graph_fingerprint,
    load_partition,
    partition_graph,
)


def check_partition(data: Data, parts: list[LocalGraph]) -> None:
    N = data.num_nodes
    src, dst = data.edge_index.tolist()
    w = data.edge_weight.tolist() if "edge_weight" in data else [1.0] * len(src)
    P = len(parts)

    # Every node owned exactly once.
    owned = torch.cat([lg.owned_ids for lg in parts])
    assert torch.equal(owned.sort().values, torch.arange(N))
    owner = {int(v): lg.rank for lg in parts for v in lg.owned_ids}

    for lg in parts:
        r = lg.rank
        assert lg.num_parts == P and lg.num_nodes_global == N
        ids = lg.node_ids.tolist()
        own = set(ids[:lg.num_owned])
        # Edges are exactly the in-edges of owned nodes (as a multiset, with weights).
        expect = Counter((s, d, round(x, 6)) for s, d, x in zip(src, dst, w) if d in own)
        ls, ld = lg.edge_index
        lw = lg.edge_weight.tolist() if lg.edge_weight is not None else [1.0] * lg.num_edges
        got = Counter((ids[s], ids[d], round(x, 6)) for s, d, x in zip(ls.tolist(), ld.tolist(), lw))
        assert got == expect
        # Targets are owned rows; halo rows have no in-edges here.
        assert lg.num_edges == 0 or int(ld.max()) < lg.num_owned
        # Edges sorted by (target, source).
        key = ld * lg.num_local + ls
        assert torch.equal(key, key.sort().values)
        # Halo rows are exactly the non-owned sources, once each, with their owner.
        halo = lg.halo_ids.tolist()
        assert len(set(halo)) == len(halo)
        assert set(halo) == {s for s, d in zip(src, dst) if d in own and s not in own}
        assert lg.halo_owner.tolist() == [owner[h] for h in halo]
        assert lg.halo_owner.tolist() == sorted(lg.halo_owner.tolist())
        # Central rows have no halo in-neighbour, marginal rows have one.
        halo_set = set(halo)
        has_halo_src = {d for s, d in zip(src, dst) if d in own and s in halo_set}
        assert not has_halo_src & set(ids[:lg.num_central])
        assert set(ids[lg.num_central:lg.num_owned]) <= has_halo_src
        # Global degrees, self loops apart.
        for i, v in enumerate(ids):
            deg = sum(x for s, d, x in zip(src, dst, w) if d == v and s != v)
            assert lg.in_degree[i].item() == pytest.approx(deg, rel=1e-5, abs=1e-5)
            loops = [x for s, d, x in zip(src, dst, w) if d == v and s == v]
            if loops:
                assert lg.loop_weight[i].item() == pytest.approx(sum(loops), rel=1e-6)
            else:
                assert torch.isnan(lg.loop_weight[i])
        # Node attributes follow the owned rows.
        assert torch.equal(lg.x, data.x[lg.owned_ids])
        assert torch.equal(lg.y, data.y[lg.owned_ids])

    # The send/receive plan: what r sends to p lands in p's halo slots in order.
    for p_lg in parts:
        filled = []
        for r_lg in parts:
            r, p = r_lg.rank, p_lg.rank
            if r == p:
                assert r not in r_lg.send_index and r not in r_lg.recv_index
                continue
            assert (p in r_lg.send_index) == (r in p_lg.recv_index)
            if p not in r_lg.send_index:
                assert not (p_lg.halo_owner == r).any()
                continue
            sent = r_lg.node_ids[r_lg.send_index[p]]
            assert int(r_lg.send_index[p].max()) < r_lg.num_owned
            slots = p_lg.recv_index[r]
            assert torch.equal(sent, p_lg.node_ids[p_lg.num_owned + slots])
            assert (p_lg.halo_owner[slots] == r).all()
            # Every sent row is marginal-relevant: it has an edge into p.
            filled.append(slots)
        all_slots = torch.cat(filled) if filled else torch.empty(0, dtype=torch.long)
        assert torch.equal(all_slots.sort().values, torch.arange(p_lg.num_halo))


@pytest.mark.parametrize("num_parts", [1, 2, 3, 8])
def test_random_directed_graph(num_parts):
    data = random_directed_graph()
    parts = partition_graph(data, num_parts, seed=1)
    assert len(parts) == num_parts
    check_partition(data, parts)
    if num_parts == 1:
        lg = parts[0]
        assert lg.num_halo == 0 and lg.num_marginal == 0 and not lg.send_index


def test_unweighted_graph_has_no_edge_weight():
    data = random_directed_graph(weighted=False)
    parts = partition_graph(data, 3)
    check_partition(data, parts)
    assert all(lg.edge_weight is None for lg in parts)


@pytest.mark.parametrize("num_parts", [1, 2, 3, 8])
def test_cora(cora, num_parts):
    parts = partition_graph(cora, num_parts)
    check_partition(cora, parts)
    # METIS balances nodes (default imbalance tolerance 3%, plus rounding).
    sizes = torch.tensor([lg.num_owned for lg in parts], dtype=torch.float)
    assert sizes.max() <= 1.04 * cora.num_nodes / num_parts + 1
    if num_parts > 1:
        # METIS cuts far fewer edges than a random assignment would.
        cut = sum(lg.num_edges for lg in parts) - sum(
            int((lg.edge_index[0] < lg.num_owned).sum()) for lg in parts)
        assert cut < 0.25 * cora.num_edges * (1 - 1 / num_parts)


def test_parts_without_boundary():
    # Two disconnected cliques: METIS separates them, so no part has a halo.
    a = torch.combinations(torch.arange(6)).t()
    edge_index = torch.cat([a, a + 6], dim=1)
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    data = Data(edge_index=edge_index, num_nodes=12, x=torch.randn(12, 2), y=torch.zeros(12).long())
    parts = partition_graph(data, 2)
    check_partition(data, parts)
    assert all(lg.num_halo == 0 and not lg.send_index and not lg.recv_index for lg in parts)


def test_more_parts_than_components_and_no_edges():
    data = Data(edge_index=torch.empty(2, 0, dtype=torch.long), num_nodes=9,
                x=torch.randn(9, 2), y=torch.zeros(9).long())
    parts = partition_graph(data, 3)
    check_partition(data, parts)
    assert [lg.num_owned for lg in parts] == [3, 3, 3]


def test_given_membership_is_used():
    data = random_directed_graph()
    membership = torch.arange(data.num_nodes) % 4
    parts = partition_graph(data, 4, membership=membership)
    check_partition(data, parts)
    for lg in parts:
        assert (membership[lg.owned_ids] == lg.rank).all()


def test_bad_arguments():
    data = random_directed_graph(num_nodes=20, num_edges=30)
    with pytest.raises(ValueError, match="exceeds the number of nodes"):
        partition_graph(data, 21)
    with pytest.raises(ValueError, match="num_parts must be >= 1"):
        partition_graph(data, 0)
    bad = Data(edge_index=torch.tensor([[0, 1], [1, 25]]), num_nodes=20)
    with pytest.raises(ValueError, match="outside"):
        partition_graph(bad, 2)


def test_save_load_round_trip(tmp_path, cora):
    parts = partition_graph(cora, 3, out_dir=tmp_path)
    fp = graph_fingerprint(cora)
    for lg in parts:
        loaded = load_partition(tmp_path, lg.rank, num_parts=3, fingerprint=fp)
        assert loaded == lg
        assert loaded is not lg
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_parts"] == 3 and manifest["fingerprint"] == fp


def test_mismatched_or_corrupt_partition_is_rejected(tmp_path):
    data = random_directed_graph()
    partition_graph(data, 2, out_dir=tmp_path)
    with pytest.raises(PartitionError, match="has 2 parts, expected 4"):
        load_partition(tmp_path, 0, num_parts=4)
    other = random_directed_graph(seed=5)
    with pytest.raises(PartitionError, match="made from another graph"):
        load_partition(tmp_path, 0, fingerprint=graph_fingerprint(other))
    with pytest.raises(PartitionError, match="no part for rank 2"):
        load_partition(tmp_path, 2)
    # Flip one byte of part 1: the checksum catches it.
    path = tmp_path / "part_1.pt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(PartitionError, match="part_1.pt is corrupt"):
        load_partition(tmp_path, 1)
    # Truncated file.
    path.write_bytes(bytes(blob[:100]))
    with pytest.raises(PartitionError, match="corrupt"):
        load_partition(tmp_path, 1)
    # Part 0 is untouched and still loads.
    assert load_partition(tmp_path, 0).rank == 0
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PartitionError, match="not valid JSON"):
        load_partition(tmp_path, 0)
    with pytest.raises(PartitionError, match="no partition manifest"):
        load_partition(tmp_path / "missing", 0)


def test_fingerprint_sees_features_and_structure():
    data = random_directed_graph()
    fp = graph_fingerprint(data)
    assert graph_fingerprint(data.clone()) == fp
    changed = data.clone()
    changed.x[3, 1] += 1.0
    assert graph_fingerprint(changed) != fp
    changed = data.clone()
    changed.edge_index = changed.edge_index.flip(0)
    assert graph_fingerprint(changed) != fp


def test_metis_graph_is_the_symmetrized_graph_without_loops():
    from pyg_adaqp.partition.metis import _symmetric_keys
    data = random_directed_graph()
    src, dst = data.edge_index.tolist()
    loops = torch.arange(5)
    edge_index = torch.cat([data.edge_index, torch.stack([loops, loops])], 1)  # self loops
    edge_index = torch.cat([edge_index, edge_index[:, :7]], 1)                # duplicates
    N = data.num_nodes
    expected = sorted({u * N + v for u, v in zip(src, dst) if u != v}
                      | {v * N + u for u, v in zip(src, dst) if u != v})
    assert _symmetric_keys(edge_index, N).tolist() == expected


def _metis_inputs(monkeypatch):
    """Records what METIS is given, then lets it run."""
    import pymetis
    seen = []
    real = pymetis.part_graph

    def record(nparts, adjacency, **kwargs):
        seen.append((np.array(adjacency.adj_starts), np.array(adjacency.adjacent)))
        return real(nparts, adjacency, **kwargs)

    monkeypatch.setattr(pymetis, "part_graph", record)
    return seen


def test_metis_sees_a_symmetric_sample_when_over_its_budget(monkeypatch):
    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import metis_membership
    data = synthetic_graph(num_nodes=3000, avg_degree=20, seed=1)
    N = data.num_nodes
    seen = _metis_inputs(monkeypatch)
    full = metis_membership(data.edge_index, N, 4)
    sampled = metis_membership(data.edge_index, N, 4, max_entries=20_000)
    again = metis_membership(data.edge_index, N, 4, max_entries=20_000)
    (xadj_full, adj_full), (xadj, adj), _ = seen
    assert adj_full.size == data.edge_index.size(1)  # symmetric input: every edge once
    assert 0.8 * 20_000 <= adj.size <= 1.2 * 20_000   # the sample's size is what was asked
    rows = torch.repeat_interleave(torch.arange(N), torch.from_numpy(xadj).diff())
    keys = set((rows * N + torch.from_numpy(adj)).tolist())
    assert keys <= set((data.edge_index[1] * N + data.edge_index[0]).tolist())  # real edges
    assert all((k % N) * N + k // N in keys for k in keys)   # both directions of each
    assert torch.equal(sampled, again)                       # deterministic
    for parts in (full, sampled):                            # balanced, every part used
        counts = torch.bincount(parts, minlength=4)
        assert counts.min() > 0 and counts.max() <= 1.1 * N / 4
    # The sample still finds the communities: far fewer cut edges than chance (3/4).
    cut = lambda p: float((p[data.edge_index[0]] != p[data.edge_index[1]]).float().mean())
    assert cut(sampled) < 0.5 and cut(full) < 0.5


def test_partition_to_disk_writes_what_partition_graph_returns(tmp_path, cora):
    from pyg_adaqp.partition import partition_to_disk, read_manifest
    parts = partition_graph(cora, 3)
    partition_to_disk(cora, 3, tmp_path, dataset_key="cora-test")
    manifest = read_manifest(tmp_path)
    assert manifest["dataset_key"] == "cora-test" and manifest["num_parts"] == 3
    fp = graph_fingerprint(cora)
    for lg in parts:
        assert load_partition(tmp_path, lg.rank, num_parts=3, fingerprint=fp) == lg

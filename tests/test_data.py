"""Datasets: the synthetic generator and offline loading of the shared raw files."""
from __future__ import annotations

import shutil

import pytest
import torch

from pyg_adaqp.data import DatasetError, load_dataset, random_split_masks, synthetic_graph


def test_synthetic_is_deterministic_and_well_formed():
    a = synthetic_graph(num_nodes=2000, avg_degree=10, num_classes=5, num_features=16, seed=3)
    b = load_dataset("synthetic", num_nodes=2000, avg_degree=10, num_classes=5, num_features=16,
                     seed=3)
    for key in ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(a[key], b[key])
    c = synthetic_graph(num_nodes=2000, avg_degree=10, num_classes=5, num_features=16, seed=4)
    assert not torch.equal(a.edge_index, c.edge_index)

    assert a.x.shape == (2000, 16) and a.num_classes == 5
    assert torch.equal(torch.unique(a.y), torch.arange(5))
    src, dst = a.edge_index
    assert (src != dst).all()
    # Undirected, without duplicates.
    key = src * 2000 + dst
    assert torch.unique(key).numel() == key.numel()
    assert torch.equal(torch.sort(key).values, torch.sort(dst * 2000 + src).values)
    # Realized degree close to the request (duplicates are dropped).
    assert 8.5 < a.edge_index.size(1) / 2000 <= 10
    # Splits partition the nodes.
    masks = torch.stack([a.train_mask, a.val_mask, a.test_mask]).long()
    assert torch.equal(masks.sum(0), torch.ones(2000, dtype=torch.long))
    assert a.train_mask.sum() == 1200 and a.val_mask.sum() == 400


@pytest.mark.parametrize("homophily", [0.2, 0.9])
def test_synthetic_homophily(homophily):
    d = synthetic_graph(num_nodes=5000, avg_degree=20, num_classes=4, homophily=homophily)
    src, dst = d.edge_index
    measured = (d.y[src] == d.y[dst]).float().mean().item()
    assert abs(measured - homophily) < 0.03


def test_synthetic_labels_are_learnable():
    # Averaging features over in-neighbours (one GCN hop) must beat the raw
    # features with a nearest-centroid classifier: the graph carries signal.
    d = synthetic_graph(num_nodes=4000, avg_degree=15, num_classes=4, num_features=16,
                        homophily=0.8, feature_noise=3.0)
    src, dst = d.edge_index
    agg = torch.zeros_like(d.x).index_add_(0, dst, d.x[src]) + d.x
    agg /= (torch.bincount(dst, minlength=d.num_nodes) + 1).unsqueeze(1)

    def centroid_accuracy(x):
        tr, te = d.train_mask, d.test_mask
        cent = torch.stack([x[tr & (d.y == c)].mean(0) for c in range(4)])
        return (torch.cdist(x[te], cent).argmin(1) == d.y[te]).float().mean().item()

    raw, smoothed = centroid_accuracy(d.x), centroid_accuracy(agg)
    assert raw > 0.35            # above chance (0.25) from features alone
    assert smoothed > raw + 0.15  # and much better with the graph


@pytest.mark.parametrize("multi_label", [False, True])
def test_synthetic_raw_channel_is_one_more_column(multi_label):
    """`raw_channel_std` appends one label-free column of that scale and
    moves nothing else."""
    opts = dict(num_nodes=3000, avg_degree=8, num_classes=4, num_features=16,
                multi_label=multi_label)
    plain, raw = synthetic_graph(**opts), synthetic_graph(**opts, raw_channel_std=100.0)
    assert raw.x.shape == (3000, 17)
    assert torch.equal(raw.x[:, :16], plain.x)
    for key in ("y", "edge_index", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(raw[key], plain[key])
    column = raw.x[:, 16]
    assert abs(column.std().item() / 100.0 - 1) < 0.05     # 3000 draws: sd of the sd ~1.3%
    # Unrelated to the labels: every class's mean is within 4 standard errors of 0.
    labels = plain.y if not multi_label else plain.y.argmax(1)
    for c in range(4):
        in_class = column[labels == c]
        assert in_class.mean().abs() < 4 * 100.0 / in_class.numel() ** 0.5


def test_synthetic_bad_options():
    """Bad or unknown options are a DatasetError (the command line prints its
    message alone) that names them."""
    with pytest.raises(DatasetError, match="homophily"):
        synthetic_graph(homophily=1.5)
    with pytest.raises(DatasetError, match="raw_channel_std must be >= 0, got -1"):
        synthetic_graph(raw_channel_std=-1)
    with pytest.raises(DatasetError, match=r"num_classes must be in \[1, num_nodes=3\], got 8"):
        synthetic_graph(num_nodes=3)
    with pytest.raises(DatasetError, match=r"^dataset 'synthetic': unknown option 'nodes', 'x' "
                                           r"\(dataset\.options\); it takes num_nodes, "):
        load_dataset("synthetic", nodes=1, x=2)
    with pytest.raises(DatasetError, match=r"^dataset 'cora': unknown option 'num_nodes' "
                                           r"\(dataset\.options\); it takes train_ratio, "
                                           r"val_ratio, split_seed$"):
        load_dataset("cora", root="/nonexistent", num_nodes=1)
    with pytest.raises(DatasetError, match=r"^dataset 'ogbn-arxiv': unknown option 'seed' "
                                           r"\(dataset\.options\); it takes no options$"):
        load_dataset("ogbn-arxiv", seed=1)


def test_random_split_masks_are_seeded():
    a = random_split_masks(100, 0.5, 0.3, seed=1)
    b = random_split_masks(100, 0.5, 0.3, seed=1)
    c = random_split_masks(100, 0.5, 0.3, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert [int(m.sum()) for m in a] == [50, 30, 20]
    with pytest.raises(ValueError, match="train_ratio"):
        random_split_masks(10, 0.8, 0.5, seed=0)


@pytest.mark.parametrize("name,nodes,edges,features,classes,split", [
    ("cora", 2708, 10556, 1433, 7, (140, 500, 1000)),
    ("citeseer", 3327, 9104, 3703, 6, (120, 500, 1000)),
    ("photo", 7650, 238162, 745, 8, (4590, 1530, 1530)),
    ("cs", 18333, 163788, 6805, 15, (11000, 3667, 3666)),
])
def test_shared_datasets_load_offline(shared_data, name, nodes, edges, features, classes, split):
    before = sorted(p.name for p in shared_data.rglob("*"))
    d = load_dataset(name, root=shared_data)
    assert (d.num_nodes, d.edge_index.size(1), d.x.size(1), d.num_classes) == (
        nodes, edges, features, classes)
    assert d.y.dtype == torch.long and d.x.dtype == torch.float
    assert tuple(int(m.sum()) for m in (d.train_mask, d.val_mask, d.test_mask)) == split
    # The shared folder is left exactly as it was (no processed/ folder).
    assert sorted(p.name for p in shared_data.rglob("*")) == before


def test_random_split_is_seeded_for_datasets_without_one(shared_data):
    a = load_dataset("photo", root=shared_data, split_seed=1)
    b = load_dataset("photo", root=shared_data, split_seed=1)
    c = load_dataset("photo", root=shared_data, split_seed=2, train_ratio=0.1, val_ratio=0.1)
    assert torch.equal(a.train_mask, b.train_mask)
    assert int(c.train_mask.sum()) == 765


def test_dataset_folder_itself_as_root(shared_data, tmp_path):
    shutil.copytree(shared_data / "Cora", tmp_path / "my_cora")
    d = load_dataset("cora", root=tmp_path / "my_cora")
    assert d.num_nodes == 2708


def test_missing_raw_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"raw files not found in .*Reddit.*reddit_data\.npz"):
        load_dataset("reddit", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ind\.cora\.x"):
        load_dataset("cora", root=tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*cora.*amazon_products"):
        load_dataset("nope")

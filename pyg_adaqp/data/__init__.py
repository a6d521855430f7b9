"""Datasets: the synthetic default graph, PyG's datasets and OGB, as one `Data`."""
from pyg_adaqp.data.checks import DatasetError, check_dataset
from pyg_adaqp.data.datasets import DATASET_NAMES, DatasetDownloadError, dataset_key, load_dataset
from pyg_adaqp.data.splits import random_split_masks
from pyg_adaqp.data.synthetic import synthetic_graph

__all__ = ["DATASET_NAMES", "DatasetDownloadError", "DatasetError", "check_dataset", "dataset_key",
           "load_dataset",
           "random_split_masks", "synthetic_graph"]

"""Partitioning: METIS parts, per-worker `LocalGraph`s, and their files on disk."""
from pyg_adaqp.partition.build import local_graphs, partition_graph, partition_to_disk
from pyg_adaqp.partition.local_graph import LocalGraph
from pyg_adaqp.partition.metis import metis_membership
from pyg_adaqp.partition.storage import (
    PartitionError,
    graph_fingerprint,
    load_partition,
    read_manifest,
    save_partition,
)

__all__ = [
    "LocalGraph", "PartitionError", "graph_fingerprint", "load_partition", "local_graphs",
    "metis_membership", "partition_graph", "partition_to_disk", "read_manifest", "save_partition",
]

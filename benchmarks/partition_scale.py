"""Time and peak memory of partitioning a large synthetic graph.

    python benchmarks/partition_scale.py --nodes 1000000 --avg-degree 10 --parts 8

Each stage runs in this one process; peak memory is the process's maximum
resident set size (``ru_maxrss``) after the stage, so it includes the graph.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from pyg_adaqp.data import synthetic_graph
from pyg_adaqp.partition import graph_fingerprint, load_partition, metis_membership, partition_graph


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1_000_000)
    ap.add_argument("--avg-degree", type=float, default=10.0)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = []

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t, peak_rss_gib()))
        return out

    data = stage("generate synthetic graph", lambda: synthetic_graph(
        num_nodes=args.nodes, avg_degree=args.avg_degree, num_features=args.features,
        seed=args.seed))
    membership = stage("METIS (pymetis)", lambda: metis_membership(
        data.edge_index, data.num_nodes, args.parts, args.seed))
    parts = stage("build local graphs", lambda: partition_graph(
        data, args.parts, membership=membership))
    with tempfile.TemporaryDirectory() as tmp:
        from pyg_adaqp.partition import save_partition
        fp = stage("fingerprint", lambda: graph_fingerprint(data))
        stage("save parts + manifest", lambda: save_partition(parts, tmp, fp, seed=args.seed))
        stage("load one part (checked)", lambda: load_partition(tmp, 0, fingerprint=fp))

    halo = sum(lg.num_halo for lg in parts)
    marginal = sum(lg.num_marginal for lg in parts)
    print(f"graph: {data.num_nodes:,} nodes, {data.edge_index.size(1):,} directed edges, "
          f"{args.features} features; {args.parts} parts; torch threads: {torch.get_num_threads()}")
    print(f"halo rows (all parts): {halo:,} ({halo / data.num_nodes:.1%} of nodes); "
          f"marginal rows: {marginal:,} ({marginal / data.num_nodes:.1%})")
    print("\n| stage | seconds | peak RSS so far (GiB) |\n|---|---:|---:|")
    for name, sec, rss in rows:
        print(f"| {name} | {sec:.2f} | {rss:.2f} |")
    total = sum(sec for name, sec, _ in rows if name in ("METIS (pymetis)", "build local graphs"))
    print(f"\npartition_graph total (METIS + build): {total:.2f} s")


if __name__ == "__main__":
    main()

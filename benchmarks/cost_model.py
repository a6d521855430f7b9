"""Does the allocator's cost model predict the exchange time on rate-limited links? (root)

    python benchmarks/cost_model.py --hosts 4 --rate 1gbit --widths 8 64 256 --trials 3

Builds the cluster of ``benchmarks/cluster.py`` and runs one ``torchrun``
node per host.  Every worker loads its part of a METIS-partitioned synthetic
graph, so the exchange has the send plan of real training; then, exactly as
the adaptive allocator does at its first re-assignment, it profiles the cost
model (all channels at once, sizes on a log scale from 2-bit rows of the
narrowest ``--widths`` to 8-bit rows of the widest), and compares predicted
and measured exchange time (slowest worker, median of ``--repeats``) for
``--trials`` random 2/4/8-bit assignments at each message width.  Prints
the fit of every worker and the predictions' errors.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    """One host's worker (under torchrun)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from pyg_adaqp.assign.cost_model import (
        check_cost_model,
        profile_cost_model,
        profile_row_bytes,
    )
    from pyg_adaqp.comm.transport import Transport
    from pyg_adaqp.partition import load_partition

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    lg = load_partition(args.part_dir, rank)
    transport = Transport(dist.new_group(backend="gloo"))
    send = {p: int(i.numel()) for p, i in lg.send_index.items()}
    recv = {p: int(i.numel()) for p, i in lg.recv_index.items()}
    model = profile_cost_model(transport, send, recv, profile_row_bytes(args.widths),
                               args.repeats)
    checks = []
    for width in args.widths:
        checks += [(width, *c) for c in check_cost_model(
            model, transport, send, recv, [width] * args.trials, args.repeats, seed=width)]
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, sum(send.values()))
    if rank == 0:
        print(f"rows sent per worker: {rows}")
        print("| worker | alpha (ns/B) | rate (Mbit/s) | beta (ms) | free (KB) |")
        print("|---:|---:|---:|---:|---:|")
        for i in sorted(model.alpha):
            a = model.alpha[i]
            print(f"| {i} | {a * 1e9:.2f} | {8 / a / 1e6 if a else float('inf'):.0f} | "
                  f"{model.beta[i] * 1e3:.3f} | {model.free[i] / 1e3:.1f} |")
        print("\n| message width | predicted ms | measured ms | error |")
        print("|---:|---:|---:|---:|")
        errors = []
        for width, predicted, measured in checks:
            errors.append(abs(predicted - measured) / measured)
            print(f"| {width} | {predicted * 1e3:.2f} | {measured * 1e3:.2f} | "
                  f"{100 * (predicted - measured) / measured:+.0f}% |")
        print(f"\nlargest error {100 * max(errors):.0f}%, "
              f"mean {100 * sum(errors) / len(errors):.0f}%", flush=True)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--nodes", type=int, default=40000)
    ap.add_argument("--avg-degree", type=int, default=10)
    ap.add_argument("--widths", nargs="+", type=int, default=[8, 64, 256])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part-dir", help=argparse.SUPPRESS)   # set for the workers
    args = ap.parse_args()
    if args.part_dir:
        worker(args)
        return 0

    from _workers import print_header
    from cluster import Cluster

    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph

    print_header()
    with tempfile.TemporaryDirectory(prefix="adaqp-cost-") as tmp:
        data = synthetic_graph(num_nodes=args.nodes, avg_degree=args.avg_degree,
                               num_features=8, seed=0)
        partition_graph(data, args.hosts, seed=0, out_dir=Path(tmp))
        with Cluster(args.hosts, args.rate) as cluster:
            print(f"cluster: {args.hosts} hosts, links at {args.rate}", flush=True)
            results = cluster.run(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes={hosts}",
                 "--node-rank={rank}", "--nproc-per-node=1", "--master-addr={master}",
                 "--master-port=29500", os.path.abspath(__file__), "--part-dir", tmp,
                 "--repeats", str(args.repeats), "--trials", str(args.trials),
                 "--widths", *map(str, args.widths)], timeout=600)
        print("".join(line + "\n" for line in results[0].output.splitlines()
                      if "socket.cpp" not in line), end="")
    print("teardown check: no namespace, link or qdisc left")
    return 0


if __name__ == "__main__":
    sys.exit(main())

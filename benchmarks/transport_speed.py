"""gloo exchange speed: concurrent irecv-first isend/irecv vs ``all_to_all_single``.

    python benchmarks/transport_speed.py [--worlds 2,4] [--sizes 64K,1M,16M] [--repeats 15]

SPEC 5 leaves the gloo transport to "``all_to_all_single`` or concurrent
``isend``/``irecv`` (all ``irecv`` posted first), whichever measures faster".
This measures one all-peers exchange of ``uint8`` buffers both ways with real
gloo workers on loopback (spawned, one torch thread each):

- ``p2p``: :class:`pyg_adaqp.comm.Transport` (what the halo exchange uses):
  every ``irecv`` posted, then every ``isend``, then wait; fresh receive
  buffers per call.
- ``a2a``: one ``dist.all_to_all_single`` with uneven splits from a send
  buffer already packed peer after peer, into a fresh output buffer.
- ``a2a+cat``: the same plus the ``torch.cat`` of the per-peer buffers that
  the halo exchange would need (it encodes one buffer per peer).

Per world size, message size per peer and split pattern (``even``: every
ordered pair the same size; ``uneven``: 0x to 2x of it, some pairs empty), the
methods run interleaved (order alternating), each after a barrier on the
default group (the exchange has its own group).  Time of one exchange = the
slowest worker's; the table gives the median (and 10th-90th percentiles),
aggregate throughput (all bytes moved / median time) and mean per-worker
egress.  Every method's received bytes are checked once before timing.  The
last line says how much CPU other processes took during the run.

Loopback is not a rate-limited link: bytes move as memory copies through the
kernel at CPU speed.  SPEC 5/9 measured the half-speed effect of data
arriving before its receive is posted on ``tc``-shaped 1 Gbit/s and
100 Mbit/s links; that effect need not show here, and with more workers than
cores the numbers measure CPU scheduling as much as the transport.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _workers import CpuMonitor, print_header  # noqa: E402

from pyg_adaqp.train.workers import run_workers  # noqa: E402

METHODS = ("p2p", "a2a", "a2a+cat")
# Uneven splits: the size of ordered pair (src, dst) is base * one of these
# (some pairs send nothing, which is legal and must cost nothing).
UNEVEN = (0.25, 1.75, 0.5, 1.5, 0.0, 2.0, 1.0)


def split_sizes(world_size: int, base: int, pattern: str) -> list[list[int]]:
    """Bytes sent by every ordered pair: ``sizes[src][dst]`` (0 on the diagonal)."""
    sizes = [[0] * world_size for _ in range(world_size)]
    for s in range(world_size):
        for d in range(world_size):
            if s != d:
                f = 1.0 if pattern == "even" else UNEVEN[(s * world_size + d) % len(UNEVEN)]
                sizes[s][d] = int(base * f)
    return sizes


def fill_value(src: int, dst: int) -> int:
    return (src * 31 + dst * 7 + 1) % 251


def worker(rank: int, world_size: int, configs: list, opts: dict) -> dict:
    from pyg_adaqp.comm import Transport

    group = dist.new_group(list(range(world_size)))  # the exchange's group; barriers use WORLD
    transport = Transport(group)
    peers = range(world_size)
    results = {}
    for base, pattern, repeats in configs:
        sizes = split_sizes(world_size, base, pattern)
        send = {p: torch.full((sizes[rank][p],), fill_value(rank, p), dtype=torch.uint8)
                for p in peers if p != rank and sizes[rank][p] > 0}
        recv_bytes = {p: sizes[p][rank] for p in peers if p != rank and sizes[p][rank] > 0}
        in_splits = [sizes[rank][p] for p in peers]
        out_splits = [sizes[p][rank] for p in peers]
        packed = torch.cat([send[p] for p in peers if p in send] or
                           [torch.empty(0, dtype=torch.uint8)])
        offsets = torch.tensor([0] + out_splits).cumsum(0).tolist()

        def p2p() -> dict:
            return transport.start(send, recv_bytes, torch.device("cpu")).wait()

        def a2a(cat: bool = False) -> dict:
            inp = torch.cat([send[p] for p in peers if p in send]) if cat and send else packed
            out = torch.empty(sum(out_splits), dtype=torch.uint8)
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
            return {p: out[offsets[p]:offsets[p + 1]] for p in peers if out_splits[p] > 0}

        run = {"p2p": p2p, "a2a": a2a, "a2a+cat": lambda: a2a(cat=True)}
        for method in METHODS:  # correctness, once
            dist.barrier()
            got = run[method]()
            assert sorted(got) == sorted(recv_bytes), (method, sorted(got), sorted(recv_bytes))
            for p, buf in got.items():
                if buf.numel() != sizes[p][rank] or not bool((buf == fill_value(p, rank)).all()):
                    raise AssertionError(f"{method}: wrong bytes from rank {p} on rank {rank}")
        times = {m: [] for m in METHODS}
        for it in range(opts["warmup"] + repeats):
            order = METHODS if it % 2 == 0 else METHODS[::-1]
            for method in order:
                dist.barrier()
                t0 = time.perf_counter()
                run[method]()
                elapsed = time.perf_counter() - t0
                if it >= opts["warmup"]:
                    times[method].append(elapsed)
        results[(base, pattern)] = times
    return results


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def fmt_size(n: int) -> str:
    for unit, m in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= m:
            return f"{n / m:g} {unit}"
    return f"{n} B"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--worlds", default="2,4", help="comma-separated worker counts")
    ap.add_argument("--sizes", default="64K,1M,16M",
                    help="comma-separated message sizes per peer (K/M suffixes: KiB/MiB)")
    ap.add_argument("--patterns", default="even,uneven")
    ap.add_argument("--repeats", type=int, default=15,
                    help="timed exchanges per method above 4 MiB per peer; x2 up to 4 MiB, "
                         "x4 up to 256 KiB")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds before one world's workers are killed")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    patterns = [p.strip() for p in args.patterns.split(",")]
    if any(w < 2 for w in worlds):
        ap.error("world sizes must be >= 2")
    if any(p not in ("even", "uneven") for p in patterns):
        ap.error("patterns: even, uneven")

    monitor = CpuMonitor()
    cores = print_header()
    print("NOTE: loopback (127.0.0.1), NOT a rate-limited link: the transfer is CPU-bound "
          "memory copying, so this does not reproduce SPEC 5/9's tc-shaped measurements "
          "(all_to_all_single ~half speed at 1 Gbit/s and 100 Mbit/s).")
    over = [w for w in worlds if w > cores]
    if over:
        print(f"NOTE: {', '.join(map(str, over))} workers on {cores} cores are OVERSUBSCRIBED: "
              f"those rows measure CPU contention as much as the transport.")

    rows = []
    for world in worlds:
        # More repeats for small messages: their times are short and noisy.
        configs = [(base, pattern, args.repeats * (4 if base <= 2**18 else
                                                   2 if base <= 2**22 else 1))
                   for base in sizes for pattern in patterns]
        t = time.perf_counter()
        res = run_workers(worker, world, configs, {"warmup": args.warmup},
                          timeout_s=args.timeout)
        print(f"world {world}: workers ran {time.perf_counter() - t:.1f} s")
        for base, pattern, repeats in configs:
            split = split_sizes(world, base, pattern)
            total = sum(map(sum, split))
            med = {}
            for method in METHODS:
                per_rank = [r[(base, pattern)][method] for r in res]
                slowest = [max(ts) for ts in zip(*per_rank)]
                med[method] = statistics.median(slowest)
                rows.append(dict(world=world, base=base, pattern=pattern, method=method,
                                 total=total, n=len(slowest), med=med[method],
                                 p10=percentile(slowest, 0.1), p90=percentile(slowest, 0.9),
                                 ratio=med[method] / med["p2p"] if method != "p2p" else None))

    print("\n### One all-peers exchange on gloo loopback\n")
    print("time = slowest worker, median of n exchanges (p10–p90); aggregate = all bytes moved "
          "by all workers / median; egress = mean bytes sent per worker / median; "
          "vs p2p = median time / p2p's median time (> 1: slower than p2p).\n")
    print("| workers | per peer | split | total moved | method | n | median ms | p10–p90 ms | "
          "aggregate MiB/s | egress per worker Gbit/s | vs p2p |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        agg = r["total"] / r["med"]
        egress = r["total"] / r["world"] / r["med"] * 8 / 1e9
        ratio = "1" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        print(f"| {r['world']} | {fmt_size(r['base'])} | {r['pattern']} | "
              f"{fmt_size(r['total'])} | {r['method']} | {r['n']} | {r['med'] * 1e3:.2f} | "
              f"{r['p10'] * 1e3:.2f}–{r['p90'] * 1e3:.2f} | {agg / 2**20:,.0f} | "
              f"{egress:.2f} | {ratio} |")

    # Differences within 10% are inside this benchmark's run-to-run noise.
    verdict = {"p2p faster": 0, "a2a faster": 0, "within 10%": 0}
    for r in rows:
        if r["method"] == "a2a":
            verdict["a2a faster" if r["ratio"] < 0.9 else
                    "p2p faster" if r["ratio"] > 1.1 else "within 10%"] += 1
    print("\np2p vs a2a (pre-packed), by median: " +
          ", ".join(f"{k} in {v}" for k, v in verdict.items()) +
          f" of {sum(verdict.values())} configurations.")
    print("\n" + monitor.report())


if __name__ == "__main__":
    main()

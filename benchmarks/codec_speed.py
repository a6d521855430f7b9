"""Throughput of the message codec against a plain copy of the same tensor.

Prints markdown tables: quantize+pack and unpack+dequantize time at 2, 4 and
8 bits (median of several repeats after warm-up), their GB/s of float32
input and their ratio to ``x.clone()`` timed in the same run; a mixed
assignment against uniform messages of the same bytes; one peer's message
decoded into its halo slots with one group of wider rows; a gradient's
halo rows quantized with one group of wider rows; one worker's forward
messages encoded per peer against each row encoded once (``SharedRows``);
then the bytes on the wire relative to float32.

    python benchmarks/codec_speed.py [--device cpu|cuda] [--rows N] [--width D] [--threads 1]

"into out" rows write into a preallocated buffer / output (as a halo
exchange can with a persistent send buffer and the halo block), so they pay
no first-touch page faults for fresh memory, which ``clone()`` and the
allocating rows do. On CPU those faults dominate a large ``clone()`` unless
PyTorch backs big allocations with huge pages (``THP_MEM_ALLOC_ENABLE=1``),
so compare ratios only within one environment.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from pyg_adaqp.comm import MessageLayout, message_nbytes, worker_generator


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds."""
    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--rows', type=int, default=None,
                        help='rows of the message (default: 100000 on cpu, 1000000 on cuda)')
    parser.add_argument('--width', type=int, default=256, help='features per row')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--plan-nodes', type=int, default=40000,
                        help='nodes of the graph whose send plan the shared-rows rows use')
    args = parser.parse_args()

    device = torch.device(args.device)
    rows = args.rows or (100_000 if device.type == 'cpu' else 1_000_000)
    torch.set_num_threads(args.threads)
    x = torch.randn(rows, args.width, device=device)
    gigabytes = x.numel() * 4 / 1e9
    clone = timeit(x.clone, device, args.repeats, args.warmup)

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"message {rows} x {args.width} float32 ({gigabytes * 1e3:.0f} MB)\n")
    print("| bits | operation | ms | GB/s of fp32 | x clone() |")
    print("|---:|---|---:|---:|---:|")
    print(f"| - | x.clone() | {clone * 1e3:.1f} | {gigabytes / clone:.2f} | 1.00 |")
    for bits in (2, 4, 8):
        layout = MessageLayout(torch.full((rows, ), bits), args.width)
        gen = worker_generator(0, 0, device)
        buf = layout.pack(x, gen)
        out = torch.empty_like(x)
        cases = [
            ('quantize+pack', lambda: layout.pack(x, gen)),
            ('quantize+pack into out', lambda: layout.pack(x, gen, out=buf)),
            ('unpack+dequantize', lambda: layout.unpack(buf)),
            ('unpack+dequantize into out', lambda: layout.unpack(buf, out=out)),
        ]
        for label, fn in cases:
            t = timeit(fn, device, args.repeats, args.warmup)
            print(f"| {bits} | {label} | {t * 1e3:.1f} | {gigabytes / t:.2f} | {t / clone:.2f} |")

    mixed(x, device, args)
    landing(device, args)
    whole_source(device, args)
    shared_rows(device, args)

    widths = (100, 256, 602)
    print("\nBytes on the wire relative to float32 (headers included):\n")
    print("| bits | " + " | ".join(f"D={w}" for w in widths) + " |")
    print("|---:|" + "---:|" * len(widths))
    for bits in (2, 4, 8):
        ratios = [message_nbytes(1, w, bits) / message_nbytes(1, w, 32) for w in widths]
        print(f"| {bits} | " + " | ".join(f"{r:.4f}" for r in ratios) + " |")


def mixed(x: torch.Tensor, device: torch.device, args: argparse.Namespace) -> None:
    """Encode+decode of a mixed assignment (a third of the rows at each width)
    against the same rows sent as three uniform messages, one per width: the
    same bytes.  Rows in random order gather and scatter per width; sorted by
    width (as the halo exchange sends them) every width is one slice."""
    from pyg_adaqp.comm.exchange import travel_order

    gen = worker_generator(0, 0, device)
    rows = x.size(0)
    bits = torch.tensor([2, 4, 8])[torch.randint(3, (rows,), generator=torch.Generator()
                                                 .manual_seed(0))]
    out = torch.empty_like(x)

    def round_trip(layout: MessageLayout, data: torch.Tensor, into: torch.Tensor) -> None:
        buf = layout.pack(data, gen)
        layout.unpack(buf, out=into)

    shuffled = MessageLayout(bits, args.width)
    order = travel_order(bits)
    ordered = MessageLayout(bits[order], args.width)
    x_sorted = x[order]
    parts = [(MessageLayout(torch.full((int((bits == b).sum()),), b), args.width),
              x_sorted[bits[order] == b].contiguous()) for b in (2, 4, 8)]
    outs = [torch.empty_like(part) for _, part in parts]
    equiv = timeit(lambda: [round_trip(lay, part, o) for (lay, part), o in zip(parts, outs)],
                   device, args.repeats, args.warmup)
    t_shuffled = timeit(lambda: round_trip(shuffled, x, out), device, args.repeats, args.warmup)
    t_sorted = timeit(lambda: round_trip(ordered, x_sorted, out), device, args.repeats,
                      args.warmup)
    print(f"\nMixed widths, {rows} rows, a third at each of 2/4/8 bits: encode+decode "
          f"({ordered.nbytes / 1e6:.1f} MB on the wire)\n")
    print("| rows | ms | x uniform messages of the same bytes |")
    print("|---|---:|---:|")
    print(f"| three uniform messages (2, 4, 8 bits) | {equiv * 1e3:.1f} | 1.00 |")
    print(f"| one message, rows sorted by width (the halo exchange) | {t_sorted * 1e3:.1f} | "
          f"{t_sorted / equiv:.2f} |")
    print(f"| one message, rows in random order | {t_shuffled * 1e3:.1f} | "
          f"{t_shuffled / equiv:.2f} |")


def landing(device: torch.device, args: argparse.Namespace) -> None:
    """A peer's forward message decoded into its halo slots (one slice, in
    plan order), 3,000 rows (a channel of one key of the benchmarks' graph):
    uniform 2 bits straight into the slice,
    against one group of 100 rows (``assign.group_size``) at 4 bits, its rows
    in a stable sort by width (decoded apart, then scattered into their slots)
    or in :func:`~pyg_adaqp.comm.exchange.travel_order` (straight into the
    slice, then the rows outside their width's slice moved)."""
    from pyg_adaqp.comm.exchange import travel_order

    rows = 3_000
    x = torch.randn(rows, args.width, device=device)
    gen = worker_generator(0, 0, device)
    halo = torch.empty(3 * rows, args.width, device=device)
    block, slots = halo[rows:2 * rows], torch.arange(rows, 2 * rows, device=device)
    bits = torch.full((rows,), 2)
    bits[torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:100]] = 4
    uniform = MessageLayout(torch.full((rows,), 2), args.width)
    buf = uniform.pack(x, gen)
    sort = torch.sort(bits, stable=True)[1]
    by_sort = MessageLayout(bits[sort], args.width)
    sort_buf, sort_slots = by_sort.pack(x[sort.to(device)], gen), slots[sort.to(device)]
    travel = travel_order(bits)
    by_travel = MessageLayout(bits[travel], args.width)
    travel_buf = by_travel.pack(x[travel.to(device)], gen)
    moved = torch.nonzero(travel != torch.arange(rows)).flatten()
    at, to = moved.to(device), travel[moved].to(device)

    def settled() -> None:
        by_travel.unpack(travel_buf, out=block)
        block.index_copy_(0, to, block[at])

    cases = [("uniform 2 bits, straight into the slice", lambda: uniform.unpack(buf, out=block)),
             ("100 rows at 4 bits, stable sort: decoded apart, scattered",
              lambda: halo.index_copy_(0, sort_slots, by_sort.unpack(sort_buf))),
             (f"100 rows at 4 bits, travel order: into the slice, {moved.numel()} rows moved",
              settled)]
    against_first(f"One peer's message of {rows} rows decoded into its halo slots", cases,
                  device, args)


def whole_source(device: torch.device, args: argparse.Namespace) -> None:
    """A gradient's halo rows, 9,000, all sent back to their owners
    (:class:`~pyg_adaqp.comm.SharedRows`): uniform 2 bits, against one group
    of 100 rows at 4 bits, its 2-bit rows gathered before quantizing, or
    quantized over the whole source (``WHOLE_SOURCE_SLACK``); and the gather
    alone, against quantizing the same rows: what the slack trades."""
    from pyg_adaqp.comm import SharedRows
    from pyg_adaqp.comm.codec import WHOLE_SOURCE_SLACK

    rows = 9_000
    x = torch.randn(rows, args.width, device=device)
    gen = worker_generator(0, 0, device)
    index = {p: torch.arange(p * rows // 3, (p + 1) * rows // 3, device=device)
             for p in range(3)}
    bits = {p: torch.full((i.numel(),), 2) for p, i in index.items()}
    bits[2][torch.randperm(rows // 3, generator=torch.Generator().manual_seed(0))[:100]] = 4

    def shared(widths: dict[int, torch.Tensor], slack: float) -> SharedRows:
        order = {p: torch.sort(b, stable=True)[1] for p, b in widths.items()}
        return SharedRows({p: index[p][order[p].to(device)] for p in index},
                          {p: MessageLayout(widths[p][order[p]], args.width) for p in index},
                          whole_source_slack=slack)

    uniform = shared({p: torch.full((i.numel(),), 2) for p, i in index.items()}, 0.0)
    whole, gathered = shared(bits, WHOLE_SOURCE_SLACK), shared(bits, 0.0)
    some = torch.arange(0, rows, 2, device=device)
    gathered_rows = x.index_select(0, some)
    layout = MessageLayout(torch.full((some.numel(),), 2), args.width)
    cases = [("uniform 2 bits", lambda: uniform.pack(x, gen)),
             ("100 rows at 4 bits, the 2-bit rows gathered", lambda: gathered.pack(x, gen)),
             ("100 rows at 4 bits, the whole source quantized at 2 bits",
              lambda: whole.pack(x, gen)),
             (f"gather of {some.numel()} rows alone", lambda: x.index_select(0, some)),
             (f"quantize+pack of the same {some.numel()} rows at 2 bits alone",
              lambda: layout.pack(gathered_rows, gen))]
    against_first(f"A gradient's {rows} halo rows sent back to 3 owners, quantized", cases,
                  device, args)


def against_first(title: str, cases: list[tuple[str, Callable[[], object]]],
                  device: torch.device, args: argparse.Namespace) -> None:
    """Times every case and prints a table of their times and their ratio
    to the first (the uniform message)."""
    times = [timeit(fn, device, args.repeats, args.warmup) for _, fn in cases]
    print(f"\n{title}\n")
    print("| rows | ms | x uniform |")
    print("|---|---:|---:|")
    for (label, _), t in zip(cases, times):
        print(f"| {label} | {t * 1e3:.1f} | {t / times[0]:.2f} |")


def shared_rows(device: torch.device, args: argparse.Namespace) -> None:
    """One forward key of worker 0 on the benchmarks' graph (``--plan-nodes``
    nodes, degree 10, METIS into 4 parts): each peer's message encoded on its
    own, against :class:`~pyg_adaqp.comm.SharedRows`, which encodes each row
    once however many peers need it.  Both gather the rows from the owned
    block, as the exchange does."""
    from pyg_adaqp.comm import SharedRows
    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph

    data = synthetic_graph(num_nodes=args.plan_nodes, avg_degree=10, num_features=8)
    lg = partition_graph(data, 4)[0]
    index = {p: i.to(device) for p, i in lg.send_index.items()}
    x = torch.randn(lg.num_owned, args.width, device=device)
    gen = worker_generator(0, 0, device)
    sent = sum(i.numel() for i in index.values())
    print(f"\nRows several peers need: worker 0 of {args.plan_nodes} nodes in 4 parts sends "
          f"{sent} rows of {args.width} to 3 peers, {lg.num_owned} owned\n")
    print("| bits | rows encoded | per peer, ms | quantized once, ms | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for bits in (2, 4, 8):
        layouts = {p: MessageLayout(torch.full((i.numel(),), bits), args.width)
                   for p, i in index.items()}
        shared = SharedRows(index, layouts)
        per_peer = timeit(lambda: [lay.pack(x.index_select(0, index[p]), gen)
                                   for p, lay in layouts.items()],
                          device, args.repeats, args.warmup)
        once = timeit(lambda: shared.pack(x, gen), device, args.repeats, args.warmup)
        print(f"| {bits} | {sum(shared.encoded_rows.values())} of {sent} | {per_peer * 1e3:.1f} "
              f"| {once * 1e3:.1f} | {once / per_peer:.2f} |")


if __name__ == '__main__':
    main()

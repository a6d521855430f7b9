"""Per-layer time breakdown of distributed full-graph GCN training, per mode.

    python benchmarks/layer_breakdown.py [--workers 4] [--nodes 80000] [--avg-degree 20]
        [--features 128] [--epochs 20] [--bits 4] [--modes vanilla,adaqp,adaqp_q,adaqp_p]

Trains a 3-layer ``DistGCNConv`` model (hidden 256, ReLU between layers, no
dropout) on a METIS-partitioned synthetic graph with real gloo workers on
loopback (spawned, one torch thread each).  One epoch is: forward, loss =
cross-entropy summed over the worker's train nodes divided by the *global*
train count, backward, all-reduce of the flattened gradients, Adam step.  The
halo exchange and the gradient all-reduce run on two separate process groups
(``dist.new_group``); a barrier on the default group lines the workers up
before every epoch, outside the timed region.

Modes (SPEC 7b): ``vanilla`` (fp32, no overlap), ``adaqp`` (uniform
``--bits`` quantization, overlap), ``adaqp_q`` (quantized, no overlap),
``adaqp_p`` (fp32, overlap).  All modes live in the same workers, start from
the same weights, and run interleaved epoch by epoch (warm-up first), so slow
drifts of the machine hit every mode alike.

Reported, per mode: epoch time (median over the timed epochs of the slowest
worker) and its parts, bytes sent per epoch (all workers), ratios to
``vanilla``; per mode and layer: forward and backward time (backward
hooks on each layer's output mark where its backward starts); per mode and
exchange key (``forward l`` / ``backward l``, from
``HaloExchange.stats``): mean per-epoch quantize, communicate, wait, owned-row
and halo-row aggregation time (mean over workers) and bytes sent.  The last
line says how much CPU other processes took during the run (on a 2-core
machine any other load distorts the times).

The layer-0 input (the features) needs no gradient, so with the input cache
(the default) its halo block is exchanged once, in warm-up, and layer 0 has
no per-epoch exchange; ``--no-input-cache`` resends it every epoch like the
original AdaQP.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _workers import CpuMonitor, print_header  # noqa: E402

from pyg_adaqp.train.workers import run_workers  # noqa: E402

MODES = {  # name: (quantize, overlap)
    "vanilla": (False, False),
    "adaqp": (True, True),
    "adaqp_q": (True, False),
    "adaqp_p": (False, True),
}
STAT_FIELDS = ("bytes_sent", "bytes_recv", "quant_time", "comm_time", "wait_time",
               "owned_agg_time", "halo_agg_time", "calls")
PHASES = ("forward", "backward", "allreduce", "step", "epoch")


class GCN(torch.nn.Module):
    """``num_layers`` DistGCNConv layers with ReLU between them."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, num_layers: int):
        super().__init__()
        from pyg_adaqp.nn import DistGCNConv

        dims = [in_channels] + [hidden] * (num_layers - 1) + [out_channels]
        self.convs = torch.nn.ModuleList(DistGCNConv(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x, graph, fwd: list | None = None, bwd: dict | None = None):
        """`fwd` gets every layer's forward time (conv + ReLU); `bwd[l]` the moment
        the gradient of layer `l`'s output is complete, i.e. its backward starts."""
        for i, conv in enumerate(self.convs):
            t = time.perf_counter()
            x = conv(x, graph)
            if i < len(self.convs) - 1:
                x = x.relu()
            if fwd is not None:
                fwd.append(time.perf_counter() - t)
            if bwd is not None and x.requires_grad:
                x.register_hook(partial(_mark, bwd, i))
        return x


def _mark(marks: dict, layer: int, grad):
    marks[layer] = time.perf_counter()


def worker(rank: int, world_size: int, parts, opts: dict) -> dict:
    from pyg_adaqp.comm import worker_generator
    from pyg_adaqp.nn import DistGraph

    lg = parts[rank]
    # Every rank creates the groups in the same order.
    exchange_group = dist.new_group(list(range(world_size)))
    reduce_group = dist.new_group(list(range(world_size)))

    x, y = lg.x, lg.y
    train = lg.train_mask.nonzero().view(-1)
    y_train = y[train]

    runs = {}
    for name in opts["modes"]:
        quantize, overlap = MODES[name]
        graph = DistGraph(lg, group=exchange_group, quantize=quantize, overlap=overlap,
                          cache_input=opts["input_cache"],
                          generator=worker_generator(opts["seed"], rank))
        graph.exchange.default_bits = opts["bits"]
        torch.manual_seed(opts["seed"])  # the same initial weights on every rank and mode
        model = GCN(x.size(1), opts["hidden"], opts["num_classes"], opts["layers"])
        params = [p for p in model.parameters()]
        runs[name] = {
            "graph": graph, "model": model, "params": params,
            "opt": torch.optim.Adam(params, lr=0.01),
            "times": {k: [] for k in PHASES}, "loss": [],
            "layer_fwd": [[] for _ in range(opts["layers"])],
            "layer_bwd": [[] for _ in range(opts["layers"])], "loss_bwd": [],
        }

    def epoch(run: dict, record: bool) -> None:
        model, params, opt = run["model"], run["params"], run["opt"]
        dist.barrier()  # default group: apart from the exchange and the all-reduce
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fwd, bwd = [], {}
        out = model(x, run["graph"], fwd, bwd)
        loss = F.cross_entropy(out[train], y_train, reduction="sum") / opts["global_train"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=reduce_group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        total_loss = loss.detach().clone()
        dist.all_reduce(total_loss, group=reduce_group)  # untimed: the global loss
        if record:
            for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                run["times"][k].append(v)
            # Layer l's backward runs from its output's gradient to its input's
            # (layer l-1's output; the end of backward for layer 0).
            last = len(fwd) - 1
            for layer in range(last + 1):
                run["layer_fwd"][layer].append(fwd[layer])
                end = bwd[layer - 1] if layer > 0 else t2
                run["layer_bwd"][layer].append(end - bwd[layer])
            run["loss_bwd"].append(bwd[last] - t1)
        run["loss"].append(float(total_loss))

    for _ in range(opts["warmup"]):
        for run in runs.values():
            epoch(run, record=False)
    for run in runs.values():
        run["graph"].exchange.reset_stats()
    for _ in range(opts["epochs"]):
        for run in runs.values():
            epoch(run, record=True)

    result = {}
    for name, run in runs.items():
        stats = run["graph"].exchange.reset_stats()
        result[name] = {
            "times": run["times"], "loss": run["loss"], "layer_fwd": run["layer_fwd"],
            "layer_bwd": run["layer_bwd"], "loss_bwd": run["loss_bwd"],
            "stats": {k: {f: getattr(s, f) for f in STAT_FIELDS} for k, s in stats.items()},
        }
    return result


def key_order(key: str) -> tuple:
    kind, layer = key.rsplit(" ", 1)
    return int(layer), {"input": 0, "forward": 1, "backward": 2}.get(kind, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=80_000)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="timed epochs per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed epochs per mode first")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 4, 8],
                    help="uniform bit width of the quantized modes")
    ap.add_argument("--modes", default="vanilla,adaqp,adaqp_q,adaqp_p",
                    help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--no-input-cache", action="store_true",
                    help="resend the layer-0 input features every epoch (as the original)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds before the workers are killed")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.workers < 2:
        ap.error("--workers must be >= 2 (one worker exchanges nothing)")
    if args.layers < 2:
        ap.error("--layers must be >= 2")

    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph

    monitor = CpuMonitor()
    cores = print_header()
    if args.workers > cores:
        print(f"NOTE: {args.workers} workers on {cores} cores are OVERSUBSCRIBED (one torch "
              f"thread each, plus gloo's I/O threads): workers take turns on the cores, so "
              f"communication and computation compete for CPU and overlap can hide little. "
              f"Compare modes only with each other within this run.")
    print("NOTE: loopback, not a rate-limited link: communication here is memory copies "
          "through the kernel, far cheaper relative to compute than on a real network "
          "(SPEC 9 uses tc-shaped namespaces for that).")

    t = time.perf_counter()
    data = synthetic_graph(num_nodes=args.nodes, avg_degree=args.avg_degree,
                           num_classes=args.classes, num_features=args.features, seed=args.seed)
    parts = partition_graph(data, args.workers, seed=args.seed)
    prep = time.perf_counter() - t
    global_train = int(data.train_mask.sum())
    print(f"\ngraph: synthetic, {data.num_nodes:,} nodes, {data.edge_index.size(1):,} directed "
          f"edges, {args.features} features, {args.classes} classes, {global_train:,} train "
          f"nodes; model: {args.layers}x DistGCNConv, hidden {args.hidden}; {args.workers} "
          f"workers; bits {args.bits}; input cache {'off' if args.no_input_cache else 'on'}; "
          f"{args.warmup} warm-up + {args.epochs} timed epochs per mode "
          f"(generate + partition: {prep:.1f} s)")
    print("\n| part | owned | central | marginal | halo | local edges | rows sent (all peers) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for lg in parts:
        sent = sum(int(i.numel()) for i in lg.send_index.values())
        print(f"| {lg.rank} | {lg.num_owned:,} | {lg.num_central:,} | {lg.num_marginal:,} | "
              f"{lg.num_halo:,} | {lg.num_edges:,} | {sent:,} |")

    opts = dict(modes=modes, bits=args.bits, seed=args.seed, hidden=args.hidden,
                layers=args.layers, num_classes=args.classes, global_train=global_train,
                input_cache=not args.no_input_cache, warmup=args.warmup, epochs=args.epochs)
    t = time.perf_counter()
    results = run_workers(worker, args.workers, parts, opts, timeout_s=args.timeout)
    wall = time.perf_counter() - t
    n_ep = args.epochs

    # --- per mode ---------------------------------------------------------------------------
    print(f"\n### Epoch time per mode ({args.workers} workers, {n_ep} timed epochs; "
          f"workers ran {wall:.1f} s in all)\n")
    print("epoch = median over epochs of the slowest worker's epoch; forward/backward/"
          "all-reduce/step = mean over epochs and workers; MiB = bytes sent per epoch by all "
          "workers together (training exchanges); loss = global loss after the last epoch.\n")
    print("| mode | epoch ms | min–max ms | forward ms | backward ms | all-reduce ms | step ms "
          "| quant ms | wait ms | MiB/epoch | speed-up vs vanilla | bytes vs vanilla "
          "| final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for name in modes:
        per_epoch = [max(r[name]["times"]["epoch"][e] for r in results) for e in range(n_ep)]
        mean = {k: statistics.mean(v for r in results for v in r[name]["times"][k])
                for k in PHASES}
        stats = [r[name]["stats"] for r in results]
        quant = statistics.mean(sum(s["quant_time"] for s in st.values()) for st in stats) / n_ep
        wait = statistics.mean(sum(s["wait_time"] for s in st.values()) for st in stats) / n_ep
        sent = sum(s["bytes_sent"] for st in stats for s in st.values()) / n_ep
        summary[name] = dict(epoch=statistics.median(per_epoch), lo=min(per_epoch),
                             hi=max(per_epoch), sent=sent, loss=results[0][name]["loss"][-1],
                             mean=mean, quant=quant, wait=wait)
    base = summary.get("vanilla")
    for name in modes:
        s = summary[name]
        m = s["mean"]
        speed = f"{base['epoch'] / s['epoch']:.2f}×" if base else "–"
        ratio = f"{s['sent'] / base['sent']:.3f}" if base and base["sent"] else "–"
        print(f"| {name} | {s['epoch'] * 1e3:.1f} | {s['lo'] * 1e3:.0f}–{s['hi'] * 1e3:.0f} | "
              f"{m['forward'] * 1e3:.1f} | {m['backward'] * 1e3:.1f} | "
              f"{m['allreduce'] * 1e3:.1f} | {m['step'] * 1e3:.1f} | {s['quant'] * 1e3:.1f} | "
              f"{s['wait'] * 1e3:.1f} | {s['sent'] / 2**20:.2f} | {speed} | {ratio} | "
              f"{s['loss']:.6f} |")

    # --- per mode and layer -----------------------------------------------------------------
    dims = [args.features] + [args.hidden] * (args.layers - 1) + [args.classes]

    def exchanged(layer: int) -> str:
        d_in, d_out = dims[layer], dims[layer + 1]
        if layer == 0 and not args.no_input_cache:
            return "nothing (input cache)"
        return f"{d_out} cols (after lin)" if d_out < d_in else f"{d_in} cols (before lin)"

    print("\n### Per layer (mean per epoch over epochs and workers)\n")
    print("forward = the conv (exchange + aggregation + linear) and the ReLU after it; "
          "backward = from the gradient of the layer's output to that of its input (a "
          "backward hook on each output), so it includes the backward exchange and its wait; "
          "'loss' = everything in forward/backward outside the layers (loss, indexing).\n")
    print("| mode | layer | in → out | exchanges | forward ms | backward ms | fwd + bwd ms |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in modes:
        def lmean(field: str, layer: int) -> float:
            return statistics.mean(v for r in results for v in r[name][field][layer])

        layer_f = [lmean("layer_fwd", i) for i in range(args.layers)]
        layer_b = [lmean("layer_bwd", i) for i in range(args.layers)]
        for i in range(args.layers):
            print(f"| {name} | {i} | {dims[i]} → {dims[i + 1]} | {exchanged(i)} | "
                  f"{layer_f[i] * 1e3:.1f} | {layer_b[i] * 1e3:.1f} | "
                  f"{(layer_f[i] + layer_b[i]) * 1e3:.1f} |")
        loss_f = summary[name]["mean"]["forward"] - sum(layer_f)
        loss_b = statistics.mean(v for r in results for v in r[name]["loss_bwd"])
        print(f"| {name} | loss | – | – | {loss_f * 1e3:.1f} | {loss_b * 1e3:.1f} | "
              f"{(loss_f + loss_b) * 1e3:.1f} |")

    # --- per mode and exchange key ----------------------------------------------------------
    print("\n### Per layer and exchange key (mean per epoch; times averaged over workers)\n")
    print("quant = encode + decode; comm = post → seen complete; wait = blocked part of comm; "
          "not blocked = 1 − wait/comm (the share of comm spent posting the sends and, with overlap, computing; without overlap only posting); "
          "owned/halo agg = aggregation of the owned rows / halo rows (forward keys only; "
          "without overlap the owned part runs after the exchange); MiB = bytes sent by all "
          "workers; "
          "max wait = the worst worker's mean wait.\n")
    print("| mode | key | calls | quant ms | comm ms | wait ms | max wait ms | not blocked | "
          "owned agg ms | halo agg ms | MiB sent |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in modes:
        keys = sorted({k for r in results for k in r[name]["stats"]}, key=key_order)
        for key in keys:
            per = [r[name]["stats"].get(key) for r in results]
            per = [p for p in per if p is not None]

            def avg(field: str) -> float:
                return statistics.mean(p[field] for p in per) / n_ep

            comm, wait = avg("comm_time"), avg("wait_time")
            hidden = f"{1 - wait / comm:.0%}" if comm > 0 else "–"
            owned = f"{avg('owned_agg_time') * 1e3:.1f}" if key.startswith("forward") else "–"
            halo = f"{avg('halo_agg_time') * 1e3:.1f}" if key.startswith("forward") else "–"
            max_wait = max(p["wait_time"] for p in per) / n_ep
            calls = sum(p["calls"] for p in per) / len(per) / n_ep
            sent = sum(p["bytes_sent"] for p in per) / n_ep
            print(f"| {name} | {key} | {calls:g} | {avg('quant_time') * 1e3:.1f} | "
                  f"{comm * 1e3:.1f} | {wait * 1e3:.1f} | {max_wait * 1e3:.1f} | {hidden} | "
                  f"{owned} | {halo} | {sent / 2**20:.2f} |")

    if "vanilla" in summary and "adaqp_p" in summary:
        same = results[0]["vanilla"]["loss"] == results[0]["adaqp_p"]["loss"]
        print(f"\nvanilla and adaqp_p (both fp32, overlap off/on) losses bit-identical over all "
              f"{args.warmup + n_ep} epochs: {same}")
    print("\n" + monitor.report())


if __name__ == "__main__":
    main()

"""The paper's graph sizes on one machine: partition once, train within memory.

    python benchmarks/scale.py --step               # the README's figures, ~25 min on 2 cores, 24 GiB
    python benchmarks/scale.py --scale 0.004 --epochs 2   # the small form the tests run
    python benchmarks/scale.py --sizes reddit --skip-train

Synthetic graphs (:func:`pyg_adaqp.data.synthetic_graph`) shaped like the
AdaQP paper's datasets, at ``--scale`` times their node count (and the
square root of it times their degree):

- ``reddit``: 232,965 nodes, about 114.6M directed edges, 602 features, 41
  classes, partitioned into 4, then trained for ``--epochs`` epochs by 4
  local workers (3-layer GCN, hidden 256, full precision), once with the
  layer-0 aggregation cached (``mode.cache_input=true``, the default) and
  once without;
- ``products``: 2.45M nodes, about 123.7M edges, 100 features, 47 classes,
  partitioned into 8;
- ``amazon``: 1.6M nodes, about 264M edges, 200 features, 107 labels
  (multi-label), partitioned into 8.

Partitioning is ``python -m pyg_adaqp.partition`` in a process of its own
(into a fresh cache folder), which reports its time and its peak memory
above the loaded graph per directed edge; a second call must reuse the
partition.  Training runs :func:`pyg_adaqp.train.launch.launch` in this
process, which is then the launcher: it finds the partition in the cache
and never loads the graph.  Peak RSS is the kernel's ``VmHWM`` of the
launcher (reset before each run) and of every worker (recorded after each
epoch).  The whole-graph reference is PyG's ``GCNConv`` (same model) on a
CSR adjacency in one process, one training step, its peak RSS likewise.
Everything is written into a temporary folder, removed when the benchmark
ends (at full scale it holds gigabytes of partitions), or into ``--work
DIR``, which is kept.

``--metis`` also partitions a quarter of the products-sized graph's nodes,
at its degree and at half of it, into 8 with METIS on its default edge
sample and on the whole graph, each in a process of its own, and reports
the edge cut and METIS's peak memory per edge.

``--step`` also times one worker's training step against plain PyG on the
whole graph (200k nodes, 4M edges, 2 threads, GCN and SAGE, median of
interleaved steps), which is the layer-0 cache's effect without any
communication.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyg_adaqp.partition.peak_memory import reset_peak, status_gib as vm
from pyg_adaqp.train.report import read_metrics

SIZES = {  # name: (nodes, avg degree asked of the generator, features, classes, multi-label, parts)
    "reddit": (232_965, 608, 602, 41, False, 4),
    "products": (2_449_029, 51.6, 100, 47, False, 8),
    "amazon": (1_569_960, 183.5, 200, 107, True, 8),
}
PAPER_EDGES = {"reddit": 114.6e6, "products": 123.7e6, "amazon": 264.3e6}


def synthetic_options(name: str, scale: float) -> dict:
    nodes, degree, features, classes, multi, _ = SIZES[name]
    return {"num_nodes": max(200, round(nodes * scale)),
            "avg_degree": round(max(8.0, degree * math.sqrt(min(1.0, scale))), 1),
            "num_features": features, "num_classes": classes, "multi_label": multi}


def dataset_overrides(name: str, scale: float) -> list[str]:
    opts = synthetic_options(name, scale)
    return ["dataset=synthetic", *(f"{'+' if k == 'multi_label' else ''}dataset.options.{k}="
                                   f"{str(v).lower() if isinstance(v, bool) else v}"
                                   for k, v in opts.items())]


def partition(name: str, scale: float, env: dict) -> dict:
    """Runs the partitioner twice (the second must reuse); returns the first call's stats."""
    args = [sys.executable, "-m", "pyg_adaqp.partition", f"world_size={SIZES[name][5]}",
            *dataset_overrides(name, scale)]
    t0 = time.perf_counter()
    first = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if first.returncode:
        raise RuntimeError(f"partitioning {name} failed:\n{first.stderr[-3000:]}")
    stats = json.loads(first.stdout.strip().splitlines()[-1])
    second = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    again = json.loads(second.stdout.strip().splitlines()[-1])
    stats.update(wall_s=wall, reused_on_second_call=again["reused"])
    return stats


def record_peak(trainer, epoch: int) -> None:
    """Epoch hook: each worker writes its peak RSS next to the run's checkpoints."""
    path = trainer.checkpoint_dir.parent / "peak_rss" / f"rank{trainer.ctx.rank}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"peak_rss_gib": vm("VmHWM"), "epoch": epoch}))


def train(name: str, scale: float, epochs: int, cache: bool, work: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pyg_adaqp
    from pyg_adaqp.train import register_configs
    from pyg_adaqp.train.launch import default_threads, launch

    register_configs()
    overrides = [*dataset_overrides(name, scale), f"world_size={SIZES[name][5]}",
                 "mode=vanilla", f"mode.cache_input={str(cache).lower()}", "model=gcn",
                 f"trainer.epochs={epochs}", "trainer.progress=false", "trainer.plots=false"]
    conf = Path(pyg_adaqp.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    run_dir = work / f"train-{name}-cache-{'on' if cache else 'off'}"
    run_dir.mkdir(parents=True)
    reset_peak()
    t0 = time.perf_counter()
    launch(cfg, run_dir, on_epoch_end=[record_peak])
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    workers = [json.loads(p.read_text())["peak_rss_gib"]
               for p in sorted((run_dir / "peak_rss").glob("rank*.json"))]
    launcher = vm("VmHWM")
    return {"cache": cache, "wall_s": wall, "threads": cfg.trainer.num_threads or default_threads(SIZES[name][5]),
            "epochs": [{k: r[k] for k in ("epoch", "loss", "epoch_time", "compute_time", "wait_time",
                                          "reduce_time")} for r in rows],
            "launcher_peak_gib": launcher, "worker_peak_gib": workers,
            "summed_peak_gib": launcher + sum(workers)}


def today(name: str, scale: float, epochs: int, rev: str, work: Path, env: dict) -> dict:
    """The trainer at git revision `rev` (the code before the layer-0 cache), same graph.

    Its own defaults (one thread per worker, as this machine's default gives
    4 local workers on 2 cores); it partitions inside its run.  Runs from a
    temporary ``git worktree``, the package imported from there.
    """
    repo = Path(__file__).resolve().parent.parent
    tree, run = work / f"today-{rev}", work / "train-today"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    try:
        env = dict(env, PYTHONPATH=str(tree))
        args = [sys.executable, "-m", "pyg_adaqp.train", *dataset_overrides(name, scale),
                f"world_size={SIZES[name][5]}", "mode=vanilla", "model=gcn",
                f"trainer.epochs={epochs}", "trainer.progress=false", "trainer.plots=false",
                f"hydra.run.dir={run}"]
        where = subprocess.run([sys.executable, "-c", "import pyg_adaqp; print(pyg_adaqp.__file__)"],
                               env=env, cwd=tree, capture_output=True, text=True, check=True)
        if not where.stdout.strip().startswith(str(tree)):
            raise RuntimeError(f"revision {rev}: imported {where.stdout.strip()}, not {tree}")
        out = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"training at {rev} failed:\n{out.stderr[-3000:]}")
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)
    rows = read_metrics(run)
    return {"rev": rev, "epochs": [{k: r[k] for k in ("epoch", "loss", "epoch_time",
                                                      "compute_time", "wait_time")}
                                   for r in rows]}


def compute_per_epoch(epochs: list[dict]) -> float:
    """Mean compute seconds of the epochs after the first (which builds caches)."""
    return statistics.mean(e["compute_time"] for e in epochs[1:] or epochs)


def whole_graph_reference(name: str, scale: float, env: dict) -> dict:
    """PyG's GCN on the whole graph in one process: one training step's time and peak RSS."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from scale import pyg_model, csr_adjacency
from pyg_adaqp.partition.peak_memory import reset_peak, status_gib as vm
from pyg_adaqp.data import synthetic_graph
data = synthetic_graph(**json.loads({json.dumps(synthetic_options(name, scale))!r}))
loaded = vm('VmRSS'); reset_peak()
adj = csr_adjacency(data.edge_index, data.num_nodes)
model = pyg_model('gcn', data.x.size(1), 256, int(data.num_classes))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
times = []
for _ in range(2):
    t = time.perf_counter(); opt.zero_grad()
    out = model(data.x, adj)
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(out, data.y) if data.y.dim() == 2
            else torch.nn.functional.cross_entropy(out[data.train_mask], data.y[data.train_mask]))
    loss.backward(); opt.step(); times.append(time.perf_counter() - t)
print(json.dumps({{"loaded_gib": loaded, "peak_gib": vm('VmHWM'), "step_s": times}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"whole-graph reference failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def csr_adjacency(edge_index, num_nodes: int, gcn: bool = True):
    """The transposed adjacency as a torch CSR tensor, for PyG's layers: GCN's normalized
    one with self loops, or (``gcn=False``) the plain one, which SAGE's mean reads."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm
    if gcn:
        edge_index, w = gcn_norm(edge_index, None, num_nodes, add_self_loops=True)
    else:
        w = torch.ones(edge_index.size(1), device=edge_index.device)
    return torch.sparse_coo_tensor(edge_index.flip(0), w,
                                   (num_nodes, num_nodes)).coalesce().to_sparse_csr()


def pyg_model(kind: str, in_channels: int, hidden: int, out_channels: int, layers: int = 3):
    """The same model as :class:`pyg_adaqp.train.model.DistGNN`, from PyG's own layers."""
    import torch.nn.functional as F
    from torch_geometric.nn import GCNConv, SAGEConv

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            widths = [in_channels] + [hidden] * (layers - 1) + [out_channels]
            conv = (lambda a, b: GCNConv(a, b, normalize=False)) if kind == "gcn" else SAGEConv
            self.convs = torch.nn.ModuleList(conv(a, b) for a, b in zip(widths, widths[1:]))
            self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(layers - 1))

        def forward(self, x, adj):
            for i, c in enumerate(self.convs):
                x = c(x, adj)
                if i < len(self.norms):
                    x = F.dropout(self.norms[i](x).relu(), p=0.5, training=self.training)
            return x

    return Model()


METIS_CODE = """
import json, torch
from pyg_adaqp.partition.peak_memory import reset_peak, status_gib as vm
from pyg_adaqp.data import synthetic_graph
from pyg_adaqp.partition import metis_membership
data = synthetic_graph(**json.loads({opts!r}))
ei = data.edge_index
loaded = vm('VmRSS'); reset_peak()
part = metis_membership(ei, data.num_nodes, 8, max_entries={max_entries})
cut = float((part[ei[0]] != part[ei[1]]).float().mean())
print(json.dumps({{"cut": cut, "bytes_per_edge": (vm('VmHWM') - loaded) * 2**30 / ei.size(1),
                  "edges": ei.size(1)}}))
"""


def metis_sample_check(env: dict) -> list[dict]:
    """Edge cut and METIS memory, default sample against the whole graph (separate processes).

    On a quarter of the products-sized graph's nodes, at its degree and at half of it.
    """
    rows = []
    for degree in (SIZES["products"][1], SIZES["products"][1] / 2):
        opts = dict(synthetic_options("products", 0.25), avg_degree=degree)
        for sees, max_entries in (("sample", None), ("whole graph", 2**62)):
            code = METIS_CODE.format(opts=json.dumps(opts), max_entries=max_entries)
            run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append(dict(json.loads(run.stdout.strip().splitlines()[-1]),
                             nodes=opts["num_nodes"], sees=sees))
    return rows


def step_worker(rank, world_size, kind, steps):
    """One worker (world size 1) against PyG on the whole graph, steps interleaved."""
    import torch.nn.functional as F

    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.nn import DistGraph
    from pyg_adaqp.partition import partition_graph
    from pyg_adaqp.train.model import DistGNN

    torch.set_num_threads(2)
    data = synthetic_graph(num_nodes=200_000, avg_degree=20, num_features=128, num_classes=16)
    lg = partition_graph(data, 1)[0]
    graph = DistGraph(lg)
    ours = DistGNN(kind, 128, 256, 16)
    x = lg.x
    theirs = pyg_model(kind, 128, 256, 16)
    adj = csr_adjacency(data.edge_index, data.num_nodes, gcn=kind == "gcn")
    mask = data.train_mask

    def step(model, inp, a, y, m):
        t = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(inp, a)[m], y[m]).backward()
        return time.perf_counter() - t

    times = {"ours": [], "pyg": []}
    for i in range(steps + 1):  # the first step of each builds caches: not timed
        a = step(ours, x, graph, lg.y, lg.train_mask)
        b = step(theirs, data.x, adj, data.y, mask)
        if i:
            times["ours"].append(a)
            times["pyg"].append(b)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's node counts")
    ap.add_argument("--sizes", default="reddit,products,amazon")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true", help="partition only")
    ap.add_argument("--step", action="store_true", help="also time one worker's step against PyG")
    ap.add_argument("--metis", action="store_true",
                    help="also compare METIS on its edge sample with the whole graph")
    ap.add_argument("--today", metavar="REV",
                    help="also train the reddit-sized graph with the code at this git revision "
                         "(the README's: a39584b, before the layer-0 cache)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--work", type=Path, metavar="DIR",
                    help="keep the partitions and the runs' folders here (default: a temporary "
                         "folder, removed when the benchmark ends)")
    args = ap.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        bench(args, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="pyg_adaqp_scale_") as work:
            bench(args, Path(work))


def bench(args: argparse.Namespace, work: Path) -> None:
    """Runs what `args` asks for, every file in `work`."""
    env = dict(os.environ, PYG_ADAQP_CACHE=str(work / "cache"))
    os.environ["PYG_ADAQP_CACHE"] = env["PYG_ADAQP_CACHE"]  # the in-process launcher too
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB; "
          f"scale {args.scale}; work folder {work}", flush=True)
    result: dict = {"scale": args.scale, "partition": {}, "train": {}}

    print("\n| graph | nodes | directed edges | parts | load s | partition s | "
          "loaded graph GiB | peak GiB | bytes per edge above the graph | reused on 2nd call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for name in args.sizes.split(","):
        s = partition(name, args.scale, env)
        result["partition"][name] = s
        print(f"| {name} | {s['nodes']:,} | {s['edges']:,} | {s['parts']} | {s['load_s']:.0f} | "
              f"{s['partition_s']:.0f} | {s['loaded_rss_gib']:.2f} | {s['peak_rss_gib']:.2f} | "
              f"{s['bytes_per_edge']:.1f} | {s['reused_on_second_call']} |", flush=True)

    if not args.skip_train and "reddit" in args.sizes.split(","):
        runs = [train("reddit", args.scale, args.epochs, cache, work) for cache in (True, False)]
        ref = whole_graph_reference("reddit", args.scale, env)
        result["train"] = {"runs": runs, "whole_graph_pyg": ref}
        if args.today:
            result["train"]["today"] = today("reddit", args.scale, args.epochs, args.today, work,
                                             env)
        print(f"\nreddit-sized, 4 workers, {args.epochs} epochs, GCN hidden 256, vanilla, "
              f"torch threads per worker: {runs[0]['threads']}")
        print("\n| layer-0 cache | epoch | epoch s | compute s | wait s | all-reduce s |")
        print("|---|---:|---:|---:|---:|---:|")
        for run in runs:
            for e in run["epochs"]:
                print(f"| {'on' if run['cache'] else 'off'} | {e['epoch']} | {e['epoch_time']:.1f} | "
                      f"{e['compute_time']:.1f} | {e['wait_time']:.1f} | {e['reduce_time']:.1f} |")
        if args.today:
            for e in result["train"]["today"]["epochs"]:
                print(f"| at {args.today} | {e['epoch']} | {e['epoch_time']:.1f} | "
                      f"{e['compute_time']:.1f} | {e['wait_time']:.1f} | – |")
        on, off = (compute_per_epoch(r["epochs"]) for r in runs)
        print(f"\ncompute per epoch (after the first): {on:.1f} s cached, {off:.1f} s uncached: "
              f"{on / off:.2f}x")
        if args.today:
            old = compute_per_epoch(result["train"]["today"]["epochs"])
            print(f"at {args.today}: {old:.1f} s; cached against it: {on / old:.2f}x")
        print("\n| run | launcher peak GiB | worker peaks GiB | summed GiB |\n|---|---:|---|---:|")
        for run in runs:
            print(f"| cache {'on' if run['cache'] else 'off'} | {run['launcher_peak_gib']:.2f} | "
                  f"{', '.join(f'{w:.2f}' for w in run['worker_peak_gib'])} | "
                  f"{run['summed_peak_gib']:.2f} |")
        print(f"| PyG GCNConv, whole graph, one process | – | {ref['peak_gib']:.2f} "
              f"(graph loaded: {ref['loaded_gib']:.2f}) | {ref['peak_gib']:.2f} |")
        print(f"\nPyG whole-graph training step: {min(ref['step_s']):.1f} s (best of "
              f"{len(ref['step_s'])})")

    if args.metis:
        result["metis"] = metis_sample_check(env)
        print("\nMETIS into 8 parts on a quarter of the products-sized graph's nodes\n")
        print("| nodes | edges | METIS sees | edge cut | METIS peak bytes per edge |\n"
              "|---:|---:|---|---:|---:|")
        for c in result["metis"]:
            print(f"| {c['nodes']:,} | {c['edges']:,} | {c['sees']} | {c['cut']:.1%} | "
                  f"{c['bytes_per_edge']:.1f} |", flush=True)

    if args.step:
        from pyg_adaqp.train.workers import run_workers
        print("\none worker's training step against plain PyG on the whole graph "
              "(200k nodes, 4M edges, 128 features, 2 threads)\n")
        print("| model | ours s | PyG s | ratio |\n|---|---:|---:|---:|")
        result["step"] = {}
        for kind in ("gcn", "sage"):
            t = run_workers(step_worker, 1, kind, args.steps)[0]
            ours, pyg = statistics.median(t["ours"]), statistics.median(t["pyg"])
            result["step"][kind] = t
            print(f"| {kind} | {ours:.3f} | {pyg:.3f} | {ours / pyg:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

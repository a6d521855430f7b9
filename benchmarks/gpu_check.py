"""The GPU path in one command: correctness and speed on one CUDA device.

    python benchmarks/gpu_check.py                       # on a GPU machine: the README's table
    python benchmarks/gpu_check.py --device cpu --scale 0.002 --nodes 800   # the tests' small form

Prints one markdown table (check, measured, target, ok) and, with
``--json``, writes every figure.  Exits 1 if a correctness check fails;
a speed target that is missed is marked ``missed`` without failing.  A group of
checks that raises becomes a failed row (traceback on stderr) and the next
group still runs, so one call on a GPU machine reports every check.

1. **Codec on the device.** Unbiased (the mean of 256 decodes of the same
   rows against the rows, in units of its standard error); decodes
   byte-for-byte like the CPU codec (a buffer encoded on either device
   decodes to identical tensors on both, uniform and mixed widths); speed
   of quantize+pack and of unpack+dequantize of 1M x 256 (times
   ``--scale``) at 2/4/8 bits as a ratio to ``clone()`` of the input, with
   the fused Triton kernels (:mod:`pyg_adaqp.comm.kernels`) and, for
   reference, with the eager ops.
2. **One worker** (``DistGNN``, world size 1) against PyG's ``GCNConv`` on
   the whole graph over a CSR adjacency, on the same device: a
   Reddit-sized synthetic graph (232,965 nodes x ``--scale``, about 114.6M
   directed edges at scale 1, 602 features, 41 classes), 3-layer GCN,
   hidden 256, median epoch (forward, backward, Adam step) and peak memory
   of each.
3. **Two and four workers sharing the device** (gloo, as
   :func:`~pyg_adaqp.train.launch.launch` picks when workers outnumber
   GPUs): full-precision losses against one worker's over 5 epochs
   (dropout off, so the runs are comparable); ``adaqp`` with the adaptive
   scheme through at least two re-assignments.
4. **One worker on NCCL** (world size 1; gloo on CPU) with the adaptive
   scheme, past its re-assignment epochs: the trainer's collectives on
   NCCL, but no halo exchange (one worker has none).  With two or more GPUs,
   also two workers on NCCL through two re-assignments.
5. **What the timing points cost**: the same two-worker run with and
   without their waits for the stream (``PYG_ADAQP_SYNC_TIMINGS=0``).
6. **Checkpoint and resume** (two workers, quantized, dropout on): a run
   resumed from its epoch-3 checkpoint equals an uninterrupted one, which
   also runs twice (repeatable arithmetic), with the eager codec and, on
   CUDA with Triton, with the fused kernels (``PYG_ADAQP_TRITON=1``).

The graph of 3-6 is a synthetic one of ``--nodes`` nodes.  The equality
checks (3 and 6) expect repeatable arithmetic; on CUDA a failure there may
be non-deterministic kernels (sparse products, atomics) rather than a wrong
exchange, which is worth knowing either way.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from codec_speed import timeit  # noqa: E402
from scale import csr_adjacency, pyg_model, synthetic_options  # noqa: E402

ROWS: list[dict] = []
GROUPS = ["codec", "one-worker", "parity", "adaptive", "timing", "resume"]


def record(check: str, measured: str, target: str = "", ok: bool | None = None,
           correctness: bool = True, **figures) -> None:
    ROWS.append({"check": check, "measured": measured, "target": target, "ok": ok,
                 "correctness": correctness, **figures})
    mark = "" if ok is None else ("yes" if ok else ("NO" if correctness else "missed"))
    print(f"| {check} | {measured} | {target} | {mark} |", flush=True)


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Within the block, `name` is `value` in the environment the workers inherit."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def guarded(name: str, check, *args) -> None:
    """Run one group of checks; an exception becomes a failed row and the next group still runs.

    A device call is short and costly, so one broken check must not hide the others' results:
    the traceback goes to stderr and the table says which group raised what.
    """
    t0 = time.perf_counter()
    try:
        check(*args)
    except Exception as exc:  # noqa: BLE001 - reported as a failed row, then exit 1
        traceback.print_exc()
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        record(f"{name}: raised", f"{type(exc).__name__}: {first_line}", "no error", False)
    print(f"|   ({name}: {time.perf_counter() - t0:.0f} s) | | | |", flush=True)


# --- 1. codec -------------------------------------------------------------------------------------

def codec_checks(device: torch.device, scale: float) -> None:
    from pyg_adaqp.comm import MessageLayout, kernels, worker_generator

    gen = worker_generator(0, 0, device)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)).to(device)
    worst = 0.0
    for bits in (2, 4, 8):
        layout = MessageLayout(torch.full((x.size(0),), bits), x.size(1))
        repeats, total = 256, torch.zeros_like(x)
        for _ in range(repeats):
            total += layout.unpack(layout.pack(x, generator=gen))
        # Stochastic rounding: each decode is within one step of x, variance <= step^2 / 4.
        step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (2**bits - 1) * 1.01
        z = float(((total / repeats - x).abs() / (step / 2 / repeats**0.5)).max())
        worst = max(worst, z)
    record("codec unbiased (2/4/8 bits, 32,768 values)", f"max |bias| = {worst:.2f} std. errors",
           "< 6", worst < 6.0, z=worst)

    cpu = torch.device("cpu")
    x = torch.randn(3000, 256, generator=torch.Generator().manual_seed(1))
    mixed = torch.tensor([2, 4, 8]).repeat_interleave(1000)
    same = True
    for bits in (torch.full((3000,), 2), torch.full((3000,), 4), torch.full((3000,), 8), mixed):
        layout = MessageLayout(bits, 256)
        for enc_device in (cpu, device):
            buf = layout.pack(x.to(enc_device), generator=worker_generator(0, 0, enc_device))
            on_cpu = layout.unpack(buf.to(cpu))
            on_device = layout.unpack(buf.to(device)).cpu()
            same &= bool(torch.equal(on_cpu, on_device))
    record(f"codec decodes on {device.type} as on CPU (buffers from both; uniform, mixed)",
           "identical" if same else "DIFFERENT", "identical", same)

    rows = max(1000, round(1_000_000 * scale))
    x = torch.randn(rows, 256, device=device)
    clone = timeit(x.clone, device, repeats=7, warmup=2)
    for bits in (2, 4, 8):
        layout = MessageLayout(torch.full((rows,), bits), 256)
        buf = layout.pack(x, generator=gen)

        def times() -> tuple[float, float]:
            return (timeit(lambda: layout.pack(x, generator=gen), device, repeats=7, warmup=2),
                    timeit(lambda: layout.unpack(buf), device, repeats=7, warmup=2))

        with kernels.codec_path(fused=True):
            enc, dec = times()
            how = "fused Triton kernels" if kernels.usable(x) else "eager ops"  # after a fallback
        with kernels.codec_path(fused=False):
            eager_enc, eager_dec = times()
        record(f"quantize+pack {rows:,} x 256, {bits} bits ({how})",
               f"{enc / clone:.2f}x clone() (eager ops {eager_enc / clone:.2f}x)", "<= 3x",
               enc / clone <= 3.0, correctness=False, seconds=enc, eager_s=eager_enc,
               clone_s=clone)
        record(f"unpack+dequantize {rows:,} x 256, {bits} bits ({how})",
               f"{dec / clone:.2f}x clone() (eager ops {eager_dec / clone:.2f}x)", "<= 2x",
               dec / clone <= 2.0, correctness=False, seconds=dec, eager_s=eager_dec,
               clone_s=clone)
    print(f"|   (clone() of {rows:,} x 256 float32: {clone * 1e3:.2f} ms) | | | |")


# --- 2. one worker against PyG --------------------------------------------------------------------

def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def epoch_times(model: torch.nn.Module, forward, y, mask, device: torch.device,
                epochs: int) -> float:
    """Median seconds of full-graph epochs (forward, backward, Adam step) after two warm-ups."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(forward()[mask], y[mask]).backward()
        opt.step()

    return timeit(step, device, repeats=epochs, warmup=2)


def pyg_epochs(data, device: torch.device, epochs: int
               ) -> tuple[float, float | None, bool]:
    """PyG's GCN on the whole graph over a CSR adjacency: median epoch, peak
    memory, and whether two sparse products of the same operands are equal
    bit for bit (the aggregation's; if not, no run on this device repeats
    itself exactly, whatever the codec)."""
    reset_gpu_peak(device)
    adj = csr_adjacency(data.edge_index.to(device), data.num_nodes)
    x, y, mask = data.x.to(device), data.y.to(device), data.train_mask.to(device)
    repeats = bool(torch.equal(torch.sparse.mm(adj, x), torch.sparse.mm(adj, x)))
    torch.manual_seed(0)
    model = pyg_model("gcn", x.size(1), 256, int(data.num_classes)).to(device)
    return (epoch_times(model, lambda: model(x, adj), y, mask, device, epochs),
            peak_gib(device), repeats)


def our_epochs(lg, device: torch.device, epochs: int) -> tuple[float, float | None]:
    """One worker's ``DistGNN`` on the whole graph (one part): median epoch and peak memory."""
    from pyg_adaqp.nn import DistGraph
    from pyg_adaqp.train.model import DistGNN

    reset_gpu_peak(device)
    graph = DistGraph(lg, device=device)
    torch.manual_seed(0)
    model = DistGNN("gcn", lg.x.size(1), 256, int(lg.num_classes)).to(device)
    graph.build_adjacency(model, torch.float32)
    graph.release_edge_list()
    x, y, mask = lg.x.to(device), lg.y.to(device), lg.train_mask.to(device)
    return (epoch_times(model, lambda: model(x, graph), y, mask, device, epochs),
            peak_gib(device))


def one_worker(device: torch.device, scale: float, epochs: int) -> None:
    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph

    opts = synthetic_options("reddit", scale)
    data = synthetic_graph(**opts)
    b, pyg_peak, repeats = pyg_epochs(data, device, epochs)
    record(f"sparse product (CSR) of {opts['num_nodes']:,} nodes x {opts['num_features']} "
           f"features, twice", "bit-for-bit equal" if repeats else "differs",
           "", None, correctness=False, spmm_repeats=repeats)
    lg = partition_graph(data, 1)[0]
    edges = lg.num_edges   # the edge list is freed once the matrices are built
    del data
    a, our_peak = our_epochs(lg, device, epochs)
    reset_gpu_peak(device)
    record(f"one worker, GCN epoch, {opts['num_nodes']:,} nodes, {edges:,} edges "
           f"(layer-0 cache on; ours waits for the stream at its timing points)",
           f"{a:.3f} s vs PyG {b:.3f} s = {a / b:.2f}x", "<= 1.1x", a / b <= 1.1,
           correctness=False, ours_s=a, pyg_s=b)
    if device.type == "cuda":
        record("one worker, peak GPU memory", f"{our_peak:.1f} GiB vs PyG {pyg_peak:.1f} GiB",
               "", None, correctness=False, ours_gib=our_peak, pyg_gib=pyg_peak)


# --- 3-6. launched runs ---------------------------------------------------------------------------

def run(work: Path, name: str, device: torch.device, nodes: int, *overrides: str
        ) -> tuple[list[dict], dict]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pyg_adaqp
    from pyg_adaqp.train import launch, register_configs
    from pyg_adaqp.train.report import read_metrics

    register_configs()
    conf = Path(pyg_adaqp.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            f"device={device.type}", f"dataset.options.num_nodes={nodes}",
            # Wider than INPUT_BLOCK_COLUMNS: the input's halo rows travel in several blocks.
            "dataset.options.avg_degree=16", "dataset.options.num_features=200",
            "model.hidden_channels=64", "trainer.progress=false", "trainer.plots=false",
            *overrides]))
    launch(cfg, work / name)
    return read_metrics(work / name), json.loads((work / name / "summary.json").read_text())


def backend(device: torch.device, workers: int) -> str:
    """What :func:`pyg_adaqp.train.launch` uses for `workers` local workers."""
    if device.type != "cuda":
        return "gloo"
    return "nccl" if torch.cuda.device_count() >= workers else "gloo"


def parity(device: torch.device, nodes: int, work: Path) -> None:
    losses = {}
    for k in (1, 2, 4):
        rows, _ = run(work, f"vanilla-{k}", device, nodes, f"world_size={k}", "mode=vanilla",
                      "model.dropout=0", "trainer.epochs=5")
        losses[k] = [r["loss"] for r in rows]
    for k in (2, 4):
        diff = max(abs(a - b) for a, b in zip(losses[k], losses[1]))
        record(f"{k} workers on one device ({backend(device, k)}) vs 1 "
               f"({backend(device, 1)}), full precision, 5 epochs",
               f"max loss diff {diff:.1e}", "<= 1e-5", diff <= 1e-5, max_diff=diff)


def adaptive(device: torch.device, nodes: int, work: Path) -> None:
    _, summary = run(work, "adaptive-4", device, nodes, "world_size=4", "mode=adaqp",
                     "assign=adaptive", "assign.cycle=2", "trainer.epochs=6")
    history = summary["assign"].get("history", [])
    record(f"adaqp adaptive, 4 workers on one device ({backend(device, 4)})",
           f"{len(history)} re-assignments, set-up {summary['setup_time']:.2f} s", ">= 2",
           len(history) >= 2, reassignments=len(history))

    # One worker exchanges nothing: this runs the trainer's collectives on the backend only.
    rows, _ = run(work, "adaptive-1", device, nodes, "world_size=1", "mode=adaqp",
                  "assign=adaptive", "assign.cycle=2", "trainer.epochs=5")
    record(f"adaqp adaptive, one worker ({backend(device, 1)} group, no halo exchange), "
           f"past epochs 0, 2, 4", f"{len(rows)} epochs, final loss {rows[-1]['loss']:.3f}",
           "5 epochs", len(rows) == 5)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        _, summary = run(work, "adaptive-nccl-2", device, nodes, "world_size=2", "mode=adaqp",
                         "assign=adaptive", "assign.cycle=2", "trainer.epochs=6")
        history = summary["assign"].get("history", [])
        record("adaqp adaptive, 2 workers on 2 GPUs (nccl)", f"{len(history)} re-assignments",
               ">= 2", len(history) >= 2, reassignments_nccl=len(history))
    else:
        print("|   (NCCL between ranks needs a GPU per rank: not run on this machine) | | | |")


def timing(device: torch.device, nodes: int, work: Path) -> None:
    """What the timing points' waits for the stream cost: the same run with and without.

    Seconds per epoch from the epochs' start times (wall clock), not from the
    epoch times, which the clock without waits would under-read.  Two workers
    share the GPU over gloo, whose staging waits for the stream at every
    exchange anyway: this measures the other waits, not NCCL's case.
    """
    per_epoch = {}  # (on CPU there are no waits: the two runs differ by noise alone)
    for sync in ("1", "0"):
        with environment("PYG_ADAQP_SYNC_TIMINGS", sync):
            rows, _ = run(work, f"timing-{sync}", device, nodes, "world_size=2", "mode=adaqp",
                          "assign=uniform", "assign.bits=4", "trainer.epochs=20",
                          "trainer.eval_every=20")
        starts = [r["started_at"] for r in rows[2:]]   # after two warm-up epochs
        per_epoch[sync] = (starts[-1] - starts[0]) / (len(starts) - 1)
    record(f"timing points' waits for the stream: 2 workers sharing the {device.type} "
           f"(gloo), uniform 4 bits, epochs 2-19", f"{per_epoch['1'] * 1e3:.1f} ms per epoch with, "
           f"{per_epoch['0'] * 1e3:.1f} without = {per_epoch['1'] / per_epoch['0']:.2f}x", "",
           None, correctness=False, with_sync_s=per_epoch["1"], without_sync_s=per_epoch["0"])


def resume(device: torch.device, nodes: int, work: Path) -> None:
    """Resume against an uninterrupted run, with the eager codec and, on CUDA
    (or in Triton's interpreter) with Triton, the fused kernels.

    The uninterrupted run also runs twice: if those two differ, the device's
    arithmetic is not repeatable (e.g. atomics), which is not a resume bug.
    """
    from pyg_adaqp.comm import kernels

    fused = kernels.triton is not None and (device.type == "cuda" or kernels.INTERPRETED)
    for path in ["eager"] + (["fused"] if fused else []):
        with environment("PYG_ADAQP_TRITON", "1" if path == "fused" else "0"):  # the workers'
            resume_with(path, device, nodes, work)


def resume_with(path: str, device: torch.device, nodes: int, work: Path) -> None:
    common = ["world_size=2", "mode=adaqp", "assign=random", "assign.cycle=2",
              "trainer.checkpoint_every=2", "trainer.eval_every=1"]
    full, _ = run(work, f"full-{path}", device, nodes, *common, "trainer.epochs=6")
    again, _ = run(work, f"again-{path}", device, nodes, *common, "trainer.epochs=6")
    run(work, f"first-{path}", device, nodes, *common, "trainer.epochs=4")
    resumed, _ = run(work, f"resumed-{path}", device, nodes, *common, "trainer.epochs=6",
                     f"trainer.resume={work / f'first-{path}' / 'checkpoints'}")
    repeat = [max(abs(a[k] - b[k]) for k in ("loss", "val")) for a, b in zip(full, again)]
    diff = [max(abs(a[k] - b[k]) for k in ("loss", "val")) for a, b in zip(full, resumed)]
    record(f"uninterrupted run repeated on {device.type} ({path} codec)",
           f"max diff {max(repeat):.1e} over 6 epochs", "<= 1e-6", max(repeat) <= 1e-6,
           max_diff=max(repeat), per_epoch=repeat, path=path, final_loss=full[-1]["loss"])
    record(f"resume on {device.type} from epoch 3 vs uninterrupted "
           f"(2 workers, random widths, dropout; {path} codec)",
           f"max diff {max(diff):.1e} over 6 epochs", "<= 1e-6", max(diff) <= 1e-6 and
           len(resumed) == 6, max_diff=max(diff), per_epoch=diff, path=path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the codec's 1M rows and of the Reddit-sized graph's nodes")
    ap.add_argument("--nodes", type=int, default=20_000, help="graph of the launched runs")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs of the one-worker check")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS,
                    help="run these groups of checks only (default: all)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu for the small form)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, scale {args.scale}\n")
    print("| check | measured | target | ok |\n|---|---|---|---|", flush=True)
    t0 = time.perf_counter()
    if "codec" in args.only:
        guarded("codec", codec_checks, device, args.scale)
    if "one-worker" in args.only:
        guarded("one worker", one_worker, device, args.scale, args.epochs)
    with tempfile.TemporaryDirectory(prefix="pyg_adaqp_gpu_check_") as work:
        os.environ.setdefault("PYG_ADAQP_CACHE", str(Path(work) / "cache"))
        for group, check in (("parity", parity), ("adaptive", adaptive), ("timing", timing),
                             ("resume", resume)):
            if group in args.only:
                guarded(group, check, device, args.nodes, Path(work))
    print(f"\n{name}; {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": ROWS}, indent=2))
    if any(r["correctness"] and r["ok"] is False for r in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    main()

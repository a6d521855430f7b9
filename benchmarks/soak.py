"""Memory soak: a long run of the Hydra trainer must not grow its workers' memory.

    python benchmarks/soak.py [--workers 4] [--epochs 200] [--cycle 10] [--nodes 10000]
        [--probes 50 100 150 200] [--max-growth 0.05] [--out DIR]

Trains the default model (3-layer GCN, LayerNorm, dropout) in ``adaqp`` mode
with the adaptive allocator re-assigning bit widths every ``--cycle`` epochs,
a checkpoint every ``--checkpoint-every`` epochs, on a synthetic graph small
enough for a few minutes on 2 cores.  Every worker records, through the
trainer's ``on_epoch_end`` hook, its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) and its current one (``VmRSS`` of
``/proc/self/status``) after each probe epoch.  The table compares every
probe with the first; the script exits 1 if a worker's peak RSS at the last
probe exceeds the first by more than ``--max-growth``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from _workers import CpuMonitor, print_header  # noqa: E402

import pyg_adaqp  # noqa: E402
from pyg_adaqp.train import launch, register_configs  # noqa: E402

CONF = Path(pyg_adaqp.__file__).parent / "conf"


def current_rss_kib() -> int:
    """Resident memory of this process now (``VmRSS``), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line in /proc/self/status")


@dataclass
class MemoryProbe:
    """``on_epoch_end`` hook: appends this worker's memory after each of `epochs` (1-based)."""
    epochs: tuple[int, ...]
    out_dir: str

    def __call__(self, trainer, epoch: int) -> None:
        if epoch + 1 not in self.epochs:
            return
        row = {"epoch": epoch + 1, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "rss_kib": current_rss_kib()}
        with open(Path(self.out_dir) / f"memory_rank{trainer.ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--cycle", type=int, default=10, help="epochs between re-assignments")
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--probes", type=int, nargs="+", default=[50, 100, 150, 200],
                    help="epochs (1-based) after which memory is recorded; the first is "
                         "the baseline")
    ap.add_argument("--max-growth", type=float, default=0.05,
                    help="largest allowed growth of peak RSS from the first to the last probe")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    probes = tuple(sorted(set(args.probes)))
    if len(probes) < 2 or probes[-1] > args.epochs:
        ap.error(f"--probes needs two or more epochs up to --epochs={args.epochs}, got {probes}")

    monitor = CpuMonitor()
    print_header()
    register_configs()
    out = Path(args.out or tempfile.mkdtemp(prefix="adaqp-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("memory_rank*.jsonl"):
        stale.unlink()
    overrides = [f"world_size={args.workers}", f"trainer.epochs={args.epochs}", "mode=adaqp",
                 "assign=adaptive", f"assign.cycle={args.cycle}",
                 f"trainer.checkpoint_every={args.checkpoint_every}",
                 f"dataset.options.num_nodes={args.nodes}",
                 f"dataset.options.avg_degree={args.avg_degree}",
                 f"dataset.options.num_features={args.features}",
                 f"model.hidden_channels={args.hidden}",
                 "trainer.progress=false", "trainer.plots=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    launch(cfg, out, on_epoch_end=[MemoryProbe(probes, str(out))])

    summary = json.loads((out / "summary.json").read_text())
    print(f"\n{args.workers} workers, {args.epochs} epochs, adaptive re-assignment every "
          f"{args.cycle} epochs, checkpoint every {args.checkpoint_every}; synthetic graph "
          f"{args.nodes} nodes, avg degree {args.avg_degree:g}, {args.features} features; "
          f"GCN hidden {args.hidden}; {summary['mean_epoch_time']:.3f} s/epoch; run dir {out}\n")
    base = probes[0]
    print("| rank | " + " | ".join(f"peak RSS @{e} (MiB)" for e in probes)
          + f" | peak {probes[-1]}/{base} | " + " | ".join(f"RSS @{e} (MiB)" for e in probes)
          + f" | RSS {probes[-1]}/{base} |")
    print("|---:|" + "---:|" * (2 * len(probes) + 2))
    growth = []
    for rank in range(args.workers):
        rows = [json.loads(line) for line in
                (out / f"memory_rank{rank}.jsonl").read_text().splitlines()]
        by_epoch = {r["epoch"]: r for r in rows}
        peak = [by_epoch[e]["peak_kib"] / 1024 for e in probes]
        rss = [by_epoch[e]["rss_kib"] / 1024 for e in probes]
        growth.append(peak[-1] / peak[0] - 1)
        print(f"| {rank} | " + " | ".join(f"{v:.1f}" for v in peak)
              + f" | {peak[-1] / peak[0]:.4f} | " + " | ".join(f"{v:.1f}" for v in rss)
              + f" | {rss[-1] / rss[0]:.4f} |")
    worst = max(growth)
    verdict = "PASS" if worst <= args.max_growth else "FAIL"
    print(f"\nlargest peak-RSS growth from epoch {base} to {probes[-1]}: {100 * worst:+.2f}% "
          f"(allowed {100 * args.max_growth:.0f}%): {verdict}")
    print(monitor.report())
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()

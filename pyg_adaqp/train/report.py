"""`RunReport`: what rank 0 writes to the run directory (SPEC 10).

- ``metrics.jsonl``: one JSON object per epoch;
- ``summary.json``: the run's totals;
- ``curves.png``, ``time_breakdown.png``, ``bits.png``: plots.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pyg_adaqp.train.config import Config

#: Per-epoch timings, reduced with MAX over workers: the slowest worker sets
#: the pace.  ``system_time`` is the most kernel CPU time of any worker's
#: process in the epoch (all its threads: faulting in fresh memory, the
#: transport's system calls), counted in clock ticks (``os.times``: 10 ms on
#: Linux by default).
TIMES = ("epoch_time", "comm_time", "quant_time", "wait_time", "owned_agg_time",
         "halo_agg_time", "compute_time", "reduce_time", "assign_time", "system_time")

#: Stacked in the time-breakdown plot; together they make up the epoch time.
BREAKDOWN = ("compute_time", "quant_time", "wait_time", "reduce_time")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows a run wrote to its ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class RunReport:
    """Collects per-epoch rows, writes them as they come, and summarizes at the end.

    Args:
        cfg (Config): The run's configuration.
        run_dir (Path): The run directory.
        world_size (int): Number of workers.
        progress (bool, optional): Show a progress bar. (default: :obj:`True`)
    """

    def __init__(self, cfg: Config, run_dir: Path, world_size: int, progress: bool = True):
        self.cfg, self.run_dir, self.world_size = cfg, Path(run_dir), world_size
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self._metrics = open(self.run_dir / "metrics.jsonl", "w")
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=cfg.trainer.epochs, desc=f"{cfg.mode.name}", unit="epoch")

    def resume(self, rows: list[dict[str, Any]]) -> None:
        """Starts from the rows of a resumed run's earlier epochs."""
        for row in rows:
            self.epoch(row)

    def epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val']:.4f}",
                                  epoch_s=f"{row['epoch_time']:.3f}")
            self._bar.update(1)

    def finish(self, bits_histogram: dict[str, dict[int, int]],
               exchange_widths: dict[str, int] | None = None,
               assign: dict[str, Any] | None = None,
               setup_time: float = 0.0) -> dict[str, Any]:
        """Writes ``summary.json`` (and the plots); returns the summary."""
        if self._bar is not None:
            self._bar.close()
        self._metrics.close()
        summary = summarize(self.rows, self.cfg, self.world_size, bits_histogram,
                            exchange_widths, assign, setup_time)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.cfg.trainer.plots:
            plot_run(self.rows, bits_histogram, self.run_dir)
        return summary


def summarize(rows: list[dict[str, Any]], cfg: Config, world_size: int,
              bits_histogram: dict[str, dict[int, int]],
              exchange_widths: dict[str, int] | None = None,
              assign: dict[str, Any] | None = None,
              setup_time: float = 0.0) -> dict[str, Any]:
    """The run's totals from its per-epoch rows.

    ``setup_time`` is what ran once before epoch 0 (the allocator's cost
    model); the throughput is reported without and with it, and the time to
    the target includes it.
    """
    total_time = sum(r["epoch_time"] for r in rows)
    evaluated = [r for r in rows if not math.isnan(r["val"])]
    best = max(evaluated, key=lambda r: r["val"]) if evaluated else None
    target = cfg.trainer.target_val
    time_to_target = None
    if target is not None:
        elapsed = setup_time
        for r in rows:
            elapsed += r["epoch_time"]
            if r["val"] >= target:
                time_to_target = elapsed
                break
    mean = {k: sum(r[k] for r in rows) / len(rows)
            for k in (*TIMES, "bytes_sent") if k != "system_time"}
    # Epochs resumed from a checkpoint written before it was recorded lack it.
    system = [r["system_time"] for r in rows if "system_time" in r]
    mean["system_time"] = sum(system) / len(system) if system else None
    return {
        "mode": cfg.mode.name,
        "scheme": cfg.assign.scheme if cfg.mode.quantize else "full_precision",
        "bits": cfg.assign.bits if cfg.mode.quantize and cfg.assign.scheme == "uniform" else None,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "world_size": world_size,
        "epochs": len(rows),
        "throughput_epochs_per_s": len(rows) / total_time if total_time > 0 else None,
        "setup_time": setup_time,
        "throughput_with_setup_epochs_per_s": (len(rows) / (total_time + setup_time)
                                               if total_time + setup_time > 0 else None),
        "mean_epoch_time": mean["epoch_time"],
        "best_val": best["val"] if best else None,
        "test_at_best_val": best["test"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train": rows[-1]["train"],
        "final_val": rows[-1]["val"],
        "final_test": rows[-1]["test"],
        "final_loss": rows[-1]["loss"],
        "target_val": target,
        "time_to_target_s": time_to_target,
        "bytes_sent_per_epoch": mean["bytes_sent"],
        "mean_times": {k: v for k, v in mean.items() if k not in ("epoch_time", "bytes_sent")},
        "bits_histogram": {key: {str(b): n for b, n in sorted(counts.items())}
                           for key, counts in sorted(bits_histogram.items())},
        "exchange_widths": dict(sorted((exchange_widths or {}).items())),
        "assign": assign or {},
    }


def plot_run(rows: list[dict[str, Any]], bits_histogram: dict[str, dict[int, int]],
             out_dir: Path) -> None:
    """Training curves, stacked time breakdown per epoch, bit widths per exchange key."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in rows])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    for split in ("train", "val", "test"):
        ax_metric.plot(epochs, [r[split] for r in rows], label=split)
    ax_metric.set(xlabel="epoch", ylabel="accuracy / F1-micro")
    ax_metric.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(rows)
    for key in BREAKDOWN:
        values = [max(r[key], 0.0) for r in rows]
        ax.bar(epochs, values, bottom=bottom, width=1.0, label=key.replace("_time", ""))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="epoch", ylabel="seconds (slowest worker)", title="epoch time breakdown")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "time_breakdown.png", dpi=100)
    plt.close(fig)

    keys = sorted(bits_histogram)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    widths = sorted({b for counts in bits_histogram.values() for b in counts})
    for i, bits in enumerate(widths):
        ax.bar([k + (i - len(widths) / 2) * 0.8 / max(len(widths), 1) for k in range(len(keys))],
               [bits_histogram[key].get(bits, 0) for key in keys],
               width=0.8 / max(len(widths), 1), align="edge", label=f"{bits} bits")
    ax.set_xticks(range(len(keys)), keys, rotation=30)
    ax.set(ylabel="message rows per epoch", title="bit widths per exchange key")
    if widths:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bits.png", dpi=100)
    plt.close(fig)

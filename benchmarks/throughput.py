"""Throughput, bytes and accuracy of every mode on a bandwidth-limited cluster (root).

    python benchmarks/throughput.py --hosts 4 --rate 1gbit --models gcn sage \
        --epochs 40 --out /tmp/throughput
    python benchmarks/throughput.py --hosts 4 --rate 1gbit --dataset photo --seeds 0 1 2 \
        --configs vanilla adaqp --epochs 200 --out /tmp/photo
    python benchmarks/throughput.py --hosts 4 --rate 100mbit --models gcn --cache on \
        --configs vanilla adaqp adaqp-u2 --repeats 3 --epochs 60 --eval-every 5

Every configuration is a real multi-node job: ``benchmarks/cluster.py``
builds ``--hosts`` network namespaces whose links ``tc tbf`` limits to
``--rate``, and each host runs one ``torchrun`` node of ``python -m
pyg_adaqp.train`` (one worker, one torch thread).  All runs of a dataset and
seed use the same partitions, made once before the first run.

Configurations (``--configs``): ``vanilla`` (fp32, no overlap), ``adaqp_p``
(fp32, overlap), ``adaqp_q`` (adaptive bits, no overlap), ``adaqp``
(adaptive bits, overlap), ``adaqp-u4`` / ``adaqp-u2`` (uniform 4 / 2 bits,
overlap), ``adaqp-e2`` (``adaqp`` with its epoch 0 at 2 bits instead of 8:
what the first epoch's width costs) and ``adaqp-random`` (random widths,
overlap).  ``NAME:LABEL``
runs configuration ``NAME`` once more under another label, e.g.
``--configs vanilla adaqp adaqp-u2 adaqp-u2:again``: two identical
configurations in the same rounds show how far this machine alone moves a
ratio (the noise floor of every other comparison in the batch).  ``--cache on off``
runs them with the layer-0 input cache on (ours) and off (the original, which
sends the input features' halo every epoch); ratios compare with ``vanilla``
of the same model, cache setting, seed and repeat.

``--repeats N`` runs every configuration N times per seed, round-robin,
each round starting one configuration later (vanilla, adaqp, uniform 2;
adaqp, uniform 2, vanilla; uniform 2, vanilla, adaqp; ...), so that
configurations compared share the machine's drift and none always runs in
the same slot: back-to-back runs of one configuration on this 2-core
machine can differ in epochs/s by more than the differences between
configurations (see the per-run table).

Reported per configuration (mean over seeds and repeats): epochs/s (training steps and
the set-up before epoch 0, i.e. the allocator's cost model; the evaluation
passes are not timed) and its ratio to ``vanilla``, payload
bytes per epoch and ratio, the epoch's parts (wait for messages, quantize,
aggregation of the owned rows and of the halo rows, gradient all-reduce
(what DDP has not hidden under the backward pass), allocator), best
validation and the test metric at it with the difference to ``vanilla``, and
the training time until validation first reaches 98% of ``vanilla``'s best.
Also reported: each adaptive run's cost-model check (predicted vs measured
exchange time).  Writes ``results.md``, ``results.json`` and
``throughput.png`` into ``--out``; ``benchmarks/time_split.py OUT`` splits
each run's extra seconds over its round's uniform 2-bit run into set-up,
epoch 0, re-assigning epochs and the rest.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _workers import machine_line  # noqa: E402
from cluster import Cluster, ClusterError, Stopped, stop_on_signals  # noqa: E402

CONFIGS = {
    "vanilla": ["mode=vanilla"],
    "adaqp_p": ["mode=adaqp_p"],
    "adaqp_q": ["mode=adaqp_q", "assign=adaptive"],
    "adaqp": ["mode=adaqp", "assign=adaptive"],
    "adaqp-u8": ["mode=adaqp", "assign=uniform", "assign.bits=8"],
    "adaqp-u4": ["mode=adaqp", "assign=uniform", "assign.bits=4"],
    "adaqp-u2": ["mode=adaqp", "assign=uniform", "assign.bits=2"],
    "adaqp-e2": ["mode=adaqp", "assign=adaptive", "assign.bits=2"],
    "adaqp-random": ["mode=adaqp", "assign=random"],
}
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TIME_PARTS = ("wait_time", "quant_time", "owned_agg_time", "halo_agg_time", "reduce_time",
              "assign_time")
#: Disjoint parts of an epoch, for the plot (aggregation is inside compute).
PLOT_PARTS = ("wait_time", "quant_time", "reduce_time", "assign_time", "compute_time")
TARGET_FRACTION = 0.98


def dataset_overrides(args: argparse.Namespace) -> list[str]:
    if args.dataset == "synthetic":
        return ["dataset=synthetic", f"dataset.options.num_nodes={args.nodes}",
                f"dataset.options.avg_degree={args.avg_degree}",
                f"dataset.options.num_features={args.features}"]
    return [f"dataset={args.dataset}", f"dataset.root={DATA.resolve()}"]


def compose(overrides: list[str]):
    """The trainer's config for `overrides` (validated like the command line's)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import pyg_adaqp
    from pyg_adaqp.train import register_configs

    register_configs()
    conf = Path(pyg_adaqp.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def run_config(cluster: Cluster, overrides: list[str], run_dir: Path, port: int,
               timeout: float) -> tuple[dict, list[dict]]:
    """One multi-node training run; returns its summary and per-epoch rows."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes={hosts}",
               "--node-rank={rank}", "--nproc-per-node=1", "--master-addr={master}",
               f"--master-port={port}", "-m", "pyg_adaqp.train", f"hydra.run.dir={run_dir}",
               *overrides]
    cluster.run(command, timeout=timeout, env={"PYTHONUNBUFFERED": "1"})
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def time_to(rows: list[dict], target: float, setup: float = 0.0) -> float | None:
    """Seconds of set-up and training until validation first reaches `target`
    (None: never)."""
    elapsed = setup
    for r in rows:
        elapsed += r["epoch_time"]
        if r["val"] == r["val"] and r["val"] >= target:
            return elapsed
    return None


def codec_bytes(summary: dict) -> int:
    """Bytes the codec's accounting gives for the last epoch's rows at each width."""
    from pyg_adaqp.comm import message_nbytes

    widths = summary["exchange_widths"]
    return sum(message_nbytes(n, widths[key], int(bits))
               for key, counts in summary["bits_histogram"].items()
               for bits, n in counts.items())


def throughput(summary: dict) -> float:
    """Epochs per second counting the set-up before epoch 0 (the cost model)."""
    return summary.get("throughput_with_setup_epochs_per_s") or summary["throughput_epochs_per_s"]


def channel_widths(summaries: list[dict]) -> dict[str, dict[int, int]]:
    """Rows at each width per channel ``i->j``, over every key of the last
    re-assignment (adaptive runs; empty otherwise), summed over `summaries`."""
    out: dict[str, dict[int, int]] = {}
    for s in summaries:
        for info in s.get("assign", {}).get("solve", {}).values():
            for channel, counts in info.get("channels", {}).items():
                for b, n in counts.items():
                    out.setdefault(channel, {}).setdefault(int(b), 0)
                    out[channel][int(b)] += n
    return out


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate", default="1gbit", help="link rate (tc syntax) or 'none'")
    ap.add_argument("--rates", nargs="+", metavar="RATE",
                    help="one link rate per host instead of --rate (uneven links)")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--nodes", type=int, default=40000, help="synthetic: nodes")
    ap.add_argument("--avg-degree", type=int, default=10, help="synthetic: mean degree")
    ap.add_argument("--features", type=int, default=128, help="synthetic: feature width")
    ap.add_argument("--models", nargs="+", default=["gcn", "sage"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="NAME[:LABEL]",
                    help=f"of {', '.join(CONFIGS)}; NAME:LABEL runs NAME again as a control")
    ap.add_argument("--cache", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every configuration per seed, round-robin")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--run-timeout", type=float, default=900, help="bound on one run, s")
    ap.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra trainer overrides for every run, e.g. model.num_layers=4")
    ap.add_argument("--out", default="throughput-runs")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if "vanilla" not in args.configs:
        ap.error("--configs must include vanilla: every ratio is against it")
    for name in args.configs:
        if base_config(name) not in CONFIGS:
            ap.error(f"--configs: unknown configuration {base_config(name)!r} in {name!r} "
                     f"(choose from {', '.join(CONFIGS)})")
    if any(name.endswith(":") for name in args.configs):
        ap.error("--configs: an empty label after ':'; e.g. adaqp-u2:again")
    if len({run_label(name) for name in args.configs}) != len(args.configs):
        ap.error("--configs: a configuration appears twice; label the copy, e.g. adaqp-u2:again")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from pyg_adaqp.train.launch import prepare_partitions

    common = [f"model.hidden_channels={args.hidden}", f"trainer.epochs={args.epochs}",
              f"trainer.eval_every={args.eval_every}", "trainer.progress=false",
              "trainer.plots=false", "trainer.num_threads=1", *dataset_overrides(args),
              *args.override]
    started = time.time()
    results = []
    if args.rates and len(args.rates) != args.hosts:
        ap.error(f"--rates needs one rate per host ({args.hosts})")
    args.rate = " ".join(args.rates) if args.rates else args.rate
    with Cluster(args.hosts, args.rates or args.rate) as cluster:
        port = 29500
        for seed in args.seeds:
            part_dir = out / f"parts-{args.dataset}-{args.hosts}-{seed}"
            base = [*common, f"seed={seed}", f"partition_dir={part_dir}"]
            prepare_partitions(compose(base), args.hosts)
            for model in args.models:
                for cache in args.cache:
                    for repeat, name in rounds(args.configs, args.repeats):
                        overrides = [*base, f"model={model}",
                                     f"mode.cache_input={'true' if cache == 'on' else 'false'}",
                                     *CONFIGS[base_config(name)]]
                        run_dir = out / (f"{args.dataset}-{model}-cache{cache}-"
                                         f"{run_label(name)}-{seed}"
                                         + (f"-r{repeat}" if args.repeats > 1 else ""))
                        port += 1
                        t0 = time.time()
                        summary, rows = run_config(cluster, overrides, run_dir, port,
                                                   args.run_timeout)
                        print(f"{run_dir.name}: {summary['throughput_epochs_per_s']:.2f} "
                              f"epochs/s, {summary['bytes_sent_per_epoch'] / 1e6:.2f} MB/epoch, "
                              f"best val {summary['best_val']:.4f} ({time.time() - t0:.0f} s)",
                              flush=True)
                        results.append({"seed": seed, "repeat": repeat, "model": model,
                                        "cache": cache, "config": name, "summary": summary,
                                        "rows": rows})
    print("teardown check: no namespace, link or qdisc left")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = aggregate(results, args)
    table = report(lines, args, time.time() - started)
    (out / "results.md").write_text(table)
    print(table)
    plot(lines, args, out / "throughput.png")
    return 0


def base_config(name: str) -> str:
    """The configuration that `name` (``NAME`` or ``NAME:LABEL``) runs."""
    return name.split(":", 1)[0]


def run_label(name: str) -> str:
    """The run folders' name of configuration `name` (``adaqp-u2:again``: ``adaqp-u2-again``)."""
    return name.replace(":", "-")


def rounds(configs: list[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, config)`` in run order: round after round, each round starting one
    configuration later, so that with as many repeats as configurations every
    configuration runs once in every position of a round (the machine drifts
    through a batch: a fixed order would give one configuration its late slots)."""
    return [(repeat, configs[(repeat + i) % len(configs)])
            for repeat in range(repeats) for i in range(len(configs))]


def aggregate(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """One line per (model, cache, config): means over runs (seeds and repeats)
    and ratios to the `vanilla` run of the same seed and repeat."""
    lines = []
    for model in args.models:
        for cache in args.cache:
            def runs(name):
                return [r for r in results
                        if (r["model"], r["cache"], r["config"]) == (model, cache, name)]
            base = {(r["seed"], r["repeat"]): r for r in runs("vanilla")}
            for name in args.configs:
                mine = runs(name)
                ratio_t, ratio_b, diff, ttt, ttt_base = [], [], [], [], []
                for r in mine:
                    trial = base[(r["seed"], r["repeat"])]
                    s, b = r["summary"], trial["summary"]
                    ratio_t.append(throughput(s) / throughput(b))
                    ratio_b.append(s["bytes_sent_per_epoch"] / b["bytes_sent_per_epoch"])
                    diff.append(s["test_at_best_val"] - b["test_at_best_val"])
                    target = TARGET_FRACTION * b["best_val"]
                    ttt.append(time_to(r["rows"], target, s.get("setup_time", 0.0)))
                    ttt_base.append(time_to(trial["rows"], target,
                                            b.get("setup_time", 0.0)))
                summaries = [r["summary"] for r in mine]
                # Sent (last epoch) over the codec's count: 1 when the accounting holds.
                sent_vs_codec = [r["rows"][-1]["bytes_sent"] / codec_bytes(r["summary"])
                                 for r in mine]
                lines.append({
                    "model": model, "cache": cache, "config": name,
                    "epochs_per_s": mean([throughput(s) for s in summaries]),
                    "epochs_per_s_by_run": {(r["seed"], r["repeat"]): throughput(r["summary"])
                                            for r in mine},
                    "setup_s": mean([s.get("setup_time", 0.0) for s in summaries]),
                    "throughput_ratio": mean(ratio_t),
                    "mb_per_epoch": mean([s["bytes_sent_per_epoch"] / 1e6 for s in summaries]),
                    "bytes_ratio": mean(ratio_b),
                    "sent_vs_codec": (min(sent_vs_codec), max(sent_vs_codec)),
                    "times_ms": {k: 1e3 * mean([s["mean_times"][k] for s in summaries])
                                 for k in (*TIME_PARTS, "compute_time")},
                    "epoch_ms": 1e3 * mean([s["mean_epoch_time"] for s in summaries]),
                    "best_val": mean([s["best_val"] for s in summaries]),
                    "test": mean([s["test_at_best_val"] for s in summaries]),
                    "test_sd": statistics.stdev([s["test_at_best_val"] for s in summaries])
                    if len(summaries) > 1 else 0.0,
                    "test_diff": mean(diff),
                    "time_to_target": mean(ttt) if all(t is not None for t in ttt) else None,
                    "time_to_target_vanilla": mean(ttt_base),
                    "cost_checks": [c for s in summaries
                                    for c in s.get("assign", {}).get("cost_check", [])],
                    "channels": channel_widths(summaries),
                })
    return lines


def report(lines: list[dict], args: argparse.Namespace, wall_s: float) -> str:
    """The markdown tables of the aggregated `lines`."""
    out = [f"command: python {' '.join(sys.argv)}",
           f"machine: {machine_line()}",
           f"cluster: {args.hosts} hosts (network namespaces, one torchrun node and one "
           f"worker with one torch thread each), links at {args.rate}; "
           f"{args.dataset}, hidden {args.hidden}, {args.epochs} epochs, seeds {args.seeds}, "
           f"{args.repeats} run(s) of each configuration per seed"
           f"{', ' + ' '.join(args.override) if args.override else ''}; "
           f"wall {wall_s / 60:.1f} min",
           "",
           "| model | input cache | config | epochs/s | × vanilla | set-up s | MB/epoch | "
           "× vanilla | sent / codec count | epoch ms | wait | quant | owned agg | halo agg | "
           "all-reduce | allocator | best val | test at best val | Δ test | "
           "time to target s (vanilla) | × vanilla |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
           "---:|---:|---:|---:|"]
    for ln in lines:
        t = ln["times_ms"]
        reached = ln["time_to_target"] is not None
        ttt = (f"{ln['time_to_target']:.1f} ({ln['time_to_target_vanilla']:.1f})" if reached
               else f"not reached ({ln['time_to_target_vanilla']:.1f})")
        ttt_ratio = (f"{ln['time_to_target'] / ln['time_to_target_vanilla']:.2f}×"
                     if reached and ln["time_to_target_vanilla"] else "-")
        sd = f" ± {100 * ln['test_sd']:.2f}" if len(args.seeds) * args.repeats > 1 else ""
        out.append(
            f"| {ln['model']} | {ln['cache']} | {ln['config']} | {ln['epochs_per_s']:.2f} | "
            f"{ln['throughput_ratio']:.2f}× | {ln['setup_s']:.2f} | {ln['mb_per_epoch']:.2f} | "
            f"{ln['bytes_ratio']:.3f}× | "
            f"{_span(ln['sent_vs_codec'])} | "
            f"{ln['epoch_ms']:.0f} | {t['wait_time']:.0f} | {t['quant_time']:.0f} | "
            f"{t['owned_agg_time']:.0f} | {t['halo_agg_time']:.0f} | {t['reduce_time']:.0f} | "
            f"{t['assign_time']:.0f} | {100 * ln['best_val']:.2f} | {100 * ln['test']:.2f}{sd} | "
            f"{100 * ln['test_diff']:+.2f} pt | {ttt} | {ttt_ratio} |")
    checks = [(ln, c) for ln in lines for c in ln["cost_checks"]]
    if checks:
        big = [abs(p - m) / m for _, (_, p, m) in checks if m >= 4e-3]
        out += ["", "Cost model check (adaptive runs): the allocator's predicted time of each "
                "exchange key against the slowest worker's encode + decode + wait in the real "
                "exchanges of the epoch before the next re-assignment",
                "", "| model | cache | config | key | predicted ms | measured ms | error |",
                "|---|---|---|---|---:|---:|---:|"]
        out += [f"| {ln['model']} | {ln['cache']} | {ln['config']} | {key} | {1e3 * p:.2f} | "
                f"{1e3 * m:.2f} | {100 * (p - m) / m:+.0f}% |" for ln, (key, p, m) in checks]
        if big:
            out.append(f"\nexchanges of 4 ms or more: largest error {100 * max(big):.0f}%, "
                       f"mean {100 * mean(big):.0f}%")
    if len(args.seeds) * args.repeats > 1:
        out += ["", "Epochs/s by run (set-up counted): one row's runs ran one after "
                "another, so its configurations compare in the same conditions", "",
                f"| model | cache | seed | repeat | {' | '.join(args.configs)} |",
                "|---|---|---:|---:|" + "---:|" * len(args.configs)]
        for model in args.models:
            for cache in args.cache:
                mine = {ln["config"]: ln["epochs_per_s_by_run"] for ln in lines
                        if (ln["model"], ln["cache"]) == (model, cache)}
                for seed, repeat in itertools.product(args.seeds, range(args.repeats)):
                    out.append(f"| {model} | {cache} | {seed} | {repeat} | " + " | ".join(
                        f"{mine[c][(seed, repeat)]:.3f}" for c in args.configs) + " |")
    channels = [ln for ln in lines if ln["channels"]]
    if channels:
        out += ["", "Widths per channel (adaptive runs; rows at 2/4/8 bits over every exchange "
                "key of the last re-assignment, summed over runs)", "",
                "| model | cache | config | channel | 2 bits | 4 bits | 8 bits | mean bits |",
                "|---|---|---|---|---:|---:|---:|---:|"]
        for ln in channels:
            for ch, c in sorted(ln["channels"].items()):
                n = sum(c.values())
                avg = sum(b * k for b, k in c.items()) / n if n else 0.0
                out.append(f"| {ln['model']} | {ln['cache']} | {ln['config']} | {ch} | "
                           f"{c.get(2, 0)} | {c.get(4, 0)} | {c.get(8, 0)} | {avg:.2f} |")
    return "\n".join(out) + "\n"


def _span(lo_hi: tuple[float, float]) -> str:
    lo, hi = lo_hi
    return f"{lo:.4f}" if lo == hi else f"{lo:.4f}-{hi:.4f}"


def plot(lines: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Throughput ratio and epoch breakdown of the aggregated `lines`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{ln['model']}/{ln['cache']}\n{ln['config']}" for ln in lines]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(lines)), 8), sharex=True)
    ax1.bar(range(len(lines)), [ln["throughput_ratio"] for ln in lines], color="tab:blue")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_ylabel("throughput / vanilla")
    ax1.set_title(f"{args.dataset}, {args.hosts} hosts at {args.rate}")
    bottom = [0.0] * len(lines)
    for part in PLOT_PARTS:
        vals = [ln["times_ms"][part] for ln in lines]
        ax2.bar(range(len(lines)), vals, bottom=bottom, label=part.replace("_time", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("epoch time (ms)")
    ax2.set_xticks(range(len(lines)), labels, rotation=90, fontsize=7)
    ax2.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    stop_on_signals()
    try:
        sys.exit(main())
    except Stopped as sig:
        print(f"stopped by {sig}; the cluster was torn down", file=sys.stderr)
        sys.exit(130)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

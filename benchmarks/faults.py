"""Faults on the test cluster's network and hosts, and what the job does (run as root).

    python benchmarks/faults.py                        # every fault, 4 hosts at 100 Mbit/s
    python benchmarks/faults.py --only slow-link link-down-long
    python benchmarks/faults.py --hosts 2 --epochs 12  # a shorter run

Every job is ``torchrun`` on each host of ``benchmarks/cluster.py`` (one
worker per host) training the synthetic graph; rank 0's ``metrics.jsonl``
tells when to inject a fault.  The faults:

1. ``slow-link``: the last host's link is slowed tenfold mid-run (``tc qdisc
   change ... tbf rate``).  With uniform 4 bits the losses are compared with
   a clean run of the same seed; with the adaptive scheme the mean width of
   that host's channels is shown at the re-assignments before and after,
   under budgets that bind (``assign.variance_budget=0.01
   assign.gradient_budget=0.01``: at the defaults every row of this graph
   fits in 2 bits, and no width could move).
2. ``link-down-short``: host 1's link goes down for 10 s mid-training
   (``ip link set ... down`` at the switch port), then up.
3. ``link-down-long``: host 1's link goes down for good; every host must exit
   non-zero within ``trainer.timeout_s`` + 30 s, naming the rank it lost.
4. ``kill-host``: every process of the last host is SIGKILLed; the others must
   exit within the time-out, naming it.
5. ``kill-mid-checkpoint``: rank 0 is SIGKILLed half-way through writing a
   checkpoint (``benchmarks/_kill_mid_checkpoint.py`` wraps the trainer); the
   job is resumed from the checkpoint directory and its losses compared with
   an uninterrupted run.

This kernel has ``tbf`` but no ``netem``, so packet loss and delay cannot be
injected; they are not tried.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import print_header  # noqa: E402
from cluster import Cluster, ClusterError, HostResult, stop_on_signals  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The adaptive run's budgets: ones that bind on this graph, so widths have room to move.
BINDING_BUDGET = ["assign.variance_budget=0.01", "assign.gradient_budget=0.01"]
FAULTS = ("slow-link", "link-down-short", "link-down-long", "kill-host", "kill-mid-checkpoint")
# One thread per host (4 hosts share 2 cores) and evaluation every epoch, as measured.
JOB = ["trainer.progress=false", "trainer.plots=false", "dataset.options.num_nodes=20000",
       "model.hidden_channels=64", "trainer.num_threads=1", "trainer.eval_every=1"]
LOST = re.compile(r"PeerLost: (lost ranks? [\d, ]+)")


@dataclass
class Outcome:
    """One row of the table."""
    fault: str
    happened: str
    seconds: str
    lost: str
    details: list[str] = field(default_factory=list)


class Job:
    """A training job across the cluster's hosts, with a fault injected at an epoch.

    Args:
        cluster (Cluster): The hosts.
        overrides (list[str]): Hydra overrides of the job.
        run_dir (Path): Its run directory (shared by the hosts).
        port (int): The rendezvous port on host 0.
        entry (list[str], optional): What torchrun runs instead of ``-m
            pyg_adaqp.train`` (a script and its first arguments).
        job (list[str], optional): The overrides every job of this file shares.
    """

    def __init__(self, cluster: Cluster, overrides: list[str], run_dir: Path, port: int,
                 entry: list[str] | None = None, job: list[str] = JOB):
        self.cluster, self.run_dir = cluster, run_dir
        entry = entry or ["-m", "pyg_adaqp.train"]
        self.command = [sys.executable, "-m", "torch.distributed.run", "--nnodes={hosts}",
                        "--node-rank={rank}", "--nproc-per-node=1", "--master-addr={master}",
                        f"--master-port={port}", "--monitor-interval=0.5", *entry,
                        f"hydra.run.dir={run_dir}", *job, *overrides]
        self.fault_at: float | None = None

    def epochs_done(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def run(self, timeout: float, at_epoch: int | None = None,
            fault: Callable[[], None] | None = None, check: bool = True,
            then: Callable[[float], None] | None = None) -> list[HostResult]:
        """Runs the job; calls `fault` once `at_epoch` epochs are logged, and
        after it, at every poll, ``then(seconds since the fault)``."""
        def watch() -> None:
            if self.fault_at is None and at_epoch is not None and \
                    self.epochs_done() >= at_epoch:
                self.fault_at = time.monotonic()
                fault()
            elif self.fault_at is not None and then is not None:
                then(time.monotonic() - self.fault_at)

        return self.cluster.run(self.command, timeout=timeout, watch=watch, keep_going=True,
                                check=check, env={"PYTHONPATH": str(REPO),
                                                  "PYTHONUNBUFFERED": "1"})

    def rows(self) -> list[dict]:
        """Per-epoch rows; a resumed run's rows replace the first run's."""
        by_epoch = {}
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
        return [by_epoch[e] for e in sorted(by_epoch)]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def same_losses(a: list[dict], b: list[dict]) -> float:
    """Largest loss difference of two runs epoch by epoch (inf if the epochs differ)."""
    if [r["epoch"] for r in a] != [r["epoch"] for r in b]:
        return float("inf")
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))


def lost_names(host: HostResult) -> str:
    m = LOST.search(host.output)
    return m.group(1) if m else "names no rank"


def exits(results: list[HostResult], since: float) -> str:
    return ", ".join(f"host {h.rank}: exit {h.returncode} after {h.exited_at - since:.1f} s"
                     for h in results)


def slow_link(cluster: Cluster, work: Path, epochs: int, port: int) -> Outcome:
    slow = cluster.hosts - 1
    at = epochs // 3
    fast, slowed = cluster.rates[slow], f"{cluster.host_bits[slow] / 10 / 1e6:g}mbit"
    uniform = ["assign=uniform", "assign.bits=4", f"trainer.epochs={epochs}"]
    clean = Job(cluster, uniform, work / "slow_clean", port)
    clean.run(timeout=900)
    faulty = Job(cluster, uniform, work / "slow_uniform", port)
    try:
        faulty.run(timeout=900, at_epoch=at, fault=lambda: cluster.set_rate(slow, slowed))
    finally:
        cluster.set_rate(slow, fast)
    diff = same_losses(clean.rows(), faulty.rows())
    before = [r["epoch_time"] for r in faulty.rows()[1:at]]
    after = [r["epoch_time"] for r in faulty.rows()[at + 1:]]

    cycle = max(2, epochs // 6)
    adaptive = Job(cluster, ["assign=adaptive", f"assign.cycle={cycle}", *BINDING_BUDGET,
                             f"trainer.epochs={epochs}"], work / "slow_adaptive", port)
    try:
        adaptive.run(timeout=900, at_epoch=at, fault=lambda: cluster.set_rate(slow, slowed))
    finally:
        cluster.set_rate(slow, fast)
    history = adaptive.summary()["assign"]["history"]
    last_before = [h for h in history if h["epoch"] <= at][-1]
    first_after = [h for h in history if h["epoch"] > at + 1][0]

    def channels(h: dict, via_slow: bool) -> list[str]:
        return [c for c in h["mean_bits"] if (str(slow) in c.split("->")) == via_slow]

    def mean_bits(h: dict, via_slow: bool) -> float:
        chans = channels(h, via_slow)
        return sum(h["mean_bits"][c] for c in chans) / max(1, len(chans))

    def histogram(h: dict, via_slow: bool) -> str:
        rows = {b: sum(h["rows_by_bits"][c][b] for c in channels(h, via_slow))
                for b in ("2", "4", "8")}
        total = max(1, sum(rows.values()))
        return " / ".join(f"{b} bits {100 * n / total:.0f}%" for b, n in rows.items())

    adaptive_after = [r["epoch_time"] for r in adaptive.rows()[first_after["epoch"]:]]
    details = [f"uniform 4 bits: median epoch {median(before):.2f} s before, "
               f"{median(after):.2f} s after the slow-down; losses vs a clean run: max |diff| "
               f"{diff:.1e}",
               f"adaptive: link slow-down seen at epoch {first_after['epoch']}: host {slow} "
               f"up/down {first_after['link_slowdown'][str(slow)][0]:.1f}x / "
               f"{first_after['link_slowdown'][str(slow)][1]:.1f}x; median epoch from then "
               f"{median(adaptive_after):.2f} s (uniform 4 bits {median(after):.2f} s)"]
    for name, via_slow in ((f"host {slow}'s channels", True), ("the other channels", False)):
        details.append(f"{name}: epoch {last_before['epoch']}: {histogram(last_before, via_slow)}"
                       f" (mean {mean_bits(last_before, via_slow):.2f}); epoch "
                       f"{first_after['epoch']}: {histogram(first_after, via_slow)} (mean "
                       f"{mean_bits(first_after, via_slow):.2f})")
    details += ["mean bits per channel before: " + json.dumps(last_before["mean_bits"]),
                "mean bits per channel after:  " + json.dumps(first_after["mean_bits"])]
    moved = mean_bits(first_after, True) < mean_bits(last_before, True)
    return Outcome(f"host {slow}'s link {fast} -> {slowed} at epoch {at}",
                   f"completed; uniform losses {'equal' if diff < 1e-5 else 'DIFFER'} to a clean "
                   f"run; adaptive {'moved' if moved else 'did NOT move'} host {slow}'s channels "
                   f"from {mean_bits(last_before, True):.1f} to "
                   f"{mean_bits(first_after, True):.1f} mean bits (the others "
                   f"{mean_bits(last_before, False):.1f} to {mean_bits(first_after, False):.1f})",
                   f"uniform epochs {median(after) / median(before):.1f}x longer while slow",
                   "nothing" if diff < 1e-5 else "losses differ", details)


def link_down_short(cluster: Cluster, work: Path, epochs: int, port: int,
                    clean_rows: list[dict] | None, down_s: float = 10.0) -> Outcome:
    at = epochs // 3
    job = Job(cluster, ["assign=uniform", "assign.bits=4", f"trainer.epochs={epochs}",
                        "trainer.timeout_s=60"], work / "down_short", port)
    back = []

    def link_up_after(seconds: float) -> None:
        if not back and seconds >= down_s:
            cluster.set_link(1, True)
            back.append(seconds)

    try:
        results = job.run(timeout=900, at_epoch=at, fault=lambda: cluster.set_link(1, False),
                          then=link_up_after, check=False)
    finally:
        if not back:
            cluster.set_link(1, True)
    ok = all(h.returncode == 0 for h in results)
    rows = job.rows()
    stalled = max(r["epoch_time"] for r in rows)
    diff = same_losses(clean_rows, rows) if clean_rows else None
    lost = "nothing" if ok and diff is not None and diff < 1e-5 else \
        "nothing (no clean run to compare)" if ok and diff is None else "the run"
    return Outcome(f"host 1's link down for {down_s:g} s at epoch {at}",
                   "completed" if ok else f"FAILED: {exits(results, job.fault_at)}",
                   f"longest epoch {stalled:.1f} s (link down {down_s:g} s)",
                   lost + (f" (losses vs clean run: max |diff| {diff:.1e})" if diff is not None
                           else ""))


def link_down_long(cluster: Cluster, work: Path, epochs: int, port: int,
                   timeout_s: int = 20) -> Outcome:
    job = Job(cluster, ["assign=uniform", "assign.bits=4", f"trainer.epochs={epochs * 10}",
                        f"trainer.timeout_s={timeout_s}"], work / "down_long", port)
    try:
        results = job.run(timeout=timeout_s + 300, at_epoch=3,
                          fault=lambda: cluster.set_link(1, False), check=False)
    finally:
        cluster.set_link(1, True)
    latest = max(h.exited_at for h in results) - job.fault_at
    bounded = latest <= timeout_s + 30 and all(h.returncode not in (0, None) for h in results)
    return Outcome(f"host 1's link down for good (timeout_s={timeout_s})",
                   ("every host exited non-zero" if bounded else "NOT every host exited in time")
                   + "; " + "; ".join(f"host {h.rank} {lost_names(h)}" for h in results),
                   f"last exit {latest:.1f} s after the fault (bound {timeout_s + 30} s)",
                   "the run (resume from its last checkpoint)",
                   [exits(results, job.fault_at)])


def kill_host(cluster: Cluster, work: Path, epochs: int, port: int,
              timeout_s: int = 20) -> Outcome:
    victim = cluster.hosts - 1
    job = Job(cluster, ["assign=uniform", "assign.bits=4", f"trainer.epochs={epochs * 10}",
                        f"trainer.timeout_s={timeout_s}"], work / "kill_host", port)
    results = job.run(timeout=timeout_s + 300, at_epoch=3,
                      fault=lambda: cluster.kill_host(victim), check=False)
    others = [h for h in results if h.rank != victim]
    latest = max(h.exited_at for h in others) - job.fault_at
    named = all(f"rank {victim}" in lost_names(h) for h in others)
    return Outcome(f"host {victim}'s processes SIGKILLed",
                   ("the others exited non-zero" if all(h.returncode not in (0, None)
                                                        for h in others)
                    else "NOT all others exited") + (f", naming rank {victim}" if named else
                                                     "; " + "; ".join(f"host {h.rank} {lost_names(h)}"
                                                                      for h in others)),
                   f"last exit {latest:.1f} s after the kill (timeout_s={timeout_s})",
                   "the run (resume from its last checkpoint)", [exits(others, job.fault_at)])


def kill_mid_checkpoint(cluster: Cluster, work: Path, epochs: int, port: int) -> Outcome:
    common = ["assign=uniform", "assign.bits=4", f"trainer.epochs={epochs}",
              "trainer.checkpoint_every=2", "trainer.timeout_s=30"]
    clean = Job(cluster, common, work / "ckpt_clean", port)
    clean.run(timeout=900)
    kill_after = 2 * (epochs // 4) + 1   # the epoch whose checkpoint is cut (written after it)
    job = Job(cluster, common, work / "ckpt", port,
              entry=[str(REPO / "benchmarks" / "_kill_mid_checkpoint.py"), str(kill_after)])
    results = job.run(timeout=900, check=False)
    ckpt = job.run_dir / "checkpoints"
    left = sorted(p.name for p in ckpt.iterdir())
    # The kill came right after the half-written file's last write.
    cut = ckpt / f"epoch_{kill_after:06d}.pt.tmp"
    t0 = time.monotonic() - (time.time() - cut.stat().st_mtime) if cut.exists() else float("nan")
    stopped = max(h.exited_at for h in results) - t0
    resumed = Job(cluster, [*common, f"trainer.resume={ckpt}"], job.run_dir, port)
    resumed.run(timeout=900)
    diff = same_losses(clean.rows(), resumed.rows())
    return Outcome(f"rank 0 SIGKILLed while writing the checkpoint of epoch {kill_after}",
                   f"the job stopped ({exits(results, t0)}); left in checkpoints/: "
                   f"{', '.join(left)}; resumed from the directory: completed",
                   f"every host exited {stopped:.1f} s after the kill",
                   "nothing" if diff < 1e-5 else f"losses differ by {diff:.1e}",
                   [f"resumed run vs uninterrupted: max |loss diff| {diff:.1e}"])


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return (values[n // 2] + values[(n - 1) // 2]) / 2 if values else float("nan")


def table(rows: list[Outcome]) -> str:
    lines = ["| fault | what happened | time to exit or recover | lost |",
             "|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.happened} | {r.seconds} | {r.lost} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate", default="100mbit", help="every link's rate (tc syntax)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the runs that complete")
    ap.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS))
    args = ap.parse_args()
    print_header()
    stop_on_signals()
    outcomes = []
    port = 29600
    with tempfile.TemporaryDirectory(prefix="adaqp-faults-") as tmp, \
            Cluster(args.hosts, args.rate) as cluster:
        work = Path(tmp)
        print(f"cluster: {args.hosts} hosts, links at {args.rate}", flush=True)
        clean_rows = None
        for fault in args.only:
            port += 1   # a fresh rendezvous port: the last job's may linger in TIME_WAIT
            t0 = time.monotonic()
            try:
                if fault == "slow-link":
                    outcome = slow_link(cluster, work, args.epochs, port)
                    clean_rows = Job(cluster, [], work / "slow_clean", port).rows()
                elif fault == "link-down-short":
                    outcome = link_down_short(cluster, work, args.epochs, port, clean_rows)
                elif fault == "link-down-long":
                    outcome = link_down_long(cluster, work, args.epochs, port)
                elif fault == "kill-host":
                    outcome = kill_host(cluster, work, args.epochs, port)
                else:
                    outcome = kill_mid_checkpoint(cluster, work, args.epochs, port)
            except ClusterError as err:
                outcome = Outcome(fault, f"ERROR: {str(err)[:3000]}", "", "")
            outcomes.append(outcome)
            print(f"\n{fault} ({time.monotonic() - t0:.0f} s): {outcome.happened}", flush=True)
            for line in outcome.details:
                print(f"  {line}", flush=True)
    print()
    print(table(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the allocator's cost model predict the exchange time on rate-limited links? (root)

    python benchmarks/cost_model.py --hosts 4 --rate 100mbit --widths 16 64 256 --trials 3
    python benchmarks/cost_model.py --hosts 4 --rates 1gbit 1gbit 1gbit 100mbit
    python benchmarks/cost_model.py --hosts 4 --rate 100mbit --trials 2 --runs 5
    python benchmarks/cost_model.py --hosts 4 --rate 1gbit --runs 8 --raw runs.jsonl

Builds the cluster of ``benchmarks/cluster.py`` (even links, or one rate per
host with ``--rates``) and runs one ``torchrun`` node per host.  Every worker
loads its part of a METIS-partitioned synthetic graph, so the exchange has
the send plan of real training; it measures the cost model exactly as the
adaptive allocator does before epoch 0 (``profile_cost_model``, whose round
of every link at once is some columns of the input features' exchange, as
with training's input cache; ``--all-links dummy``: dummy bytes), then runs
``--trials`` exchanges of random 2/4/8-bit assignments at each message width
(each channel's rows in contiguous width buckets, as training sends them)
the way training does (encode each row once per width it travels at,
whatever peers need it; post all channels at once, wait, decode; glibc's
malloc set as in a training worker's set-up and epochs), every worker
starting each exchange at one common time (or, with ``--exchange-start
barrier``, each as it leaves a barrier; the check prints how far apart
they leave it), and compares the model's prediction with the slowest worker's
measured time (median of ``--repeats``, :data:`REPEATS` by default).  Prints
every worker's fitted link and the errors, with the worker the model
predicts slowest, the one measured slowest (its parts, and its encode's
CPU time: on workers that share cores, the encode's wall time over its CPU
time is the contention that the profile's ``core_contention`` stands for),
and the bytes the first one's
link carries each way, and the errors of the same model without its loaded
latency (each run and, with ``--runs``, how many runs pass each way); the
allocator's claim is an error of at most 15% on exchanges of 4 ms or more.

With ``--runs N`` the whole check, set-up included, runs N times on the
same cluster (every check draws the same widths in every run), and a last
table shows how each exchange's measured time and its prediction spread
over the runs, and in how many runs the model was within 15% on every
exchange against a model that knew each exchange's median measured time:
the closest the measurements' own spread lets a prediction come.

With ``--raw FILE`` every run appends one JSON line to FILE, with what
the tables are made of, so that other estimators can be replayed on the
same runs offline: ``setup`` (seconds), ``model`` (the cost model's
``state_dict``), ``profile`` (the set-up's link measurements,
loaded-exchange times and the seconds of each part, ``took_s``; not the
codec's measurements: ``profile_cost_model``'s `record`) and
``checks``, one per check: ``width``, ``rows`` (``{"i,j": {bits:
rows}}`` per channel), ``encode_share`` (per worker,
as ``assignment_seconds`` takes it) and ``workers`` (per worker, the
median exchange's seconds: total, encode, link, decode, and the encode's
CPU time).  JSON turns every integer key (ranks, bit widths) into a
string.  Lines are appended: give each batch a file of its own.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Untimed exchanges before each check's timed ones, so that a check times
#: the steady state that every epoch of training repeats.  They open the
#: connections, and a check's new sizes fault in fresh heap pages for a
#: few exchanges, as training's first epochs do (``keep_freed_memory``).
#: With three, the first check of a width still read 1.2-1.7x the
#: second at 1 Gbit/s; with ten, the two agree (docs/benchmarks.md,
#: thirteenth pass).
WARM_UPS = 10
#: Timed exchanges per check by default (their median counts).  With 3, a
#: check's measured time moved from run to run by up to 28% of its median
#: at 1 Gbit/s, and the checks' medians, as predictions, passed 2 of 5
#: runs; with 9 they passed 5 of 5 at 100 Mbit/s, at 1 Gbit/s and on uneven
#: links (4 of 5 in a second 1 Gbit/s batch), so what the check reports is
#: mostly the model's error, not the measurement's (docs/benchmarks.md,
#: eighteenth pass).
REPEATS = 9
#: The claim: exchanges of at least MIN_TIMED_S seconds are predicted within
#: MAX_ERROR of their measured time.
MIN_TIMED_S, MAX_ERROR = 4e-3, 0.15
#: The claim in words, for the printed tables.
CLAIM = f"within {MAX_ERROR:.0%} on every exchange of {MIN_TIMED_S * 1e3:.0f} ms or more"
#: How far after the last worker left the barrier the common start lies:
#: more than the up to 18 ms by which the workers left a barrier apart
#: (docs/benchmarks.md, fourteenth pass; the check prints it).
START_MARGIN_S = 0.03
#: Marks the line of rank 0's output that carries a run's checks (``--runs``).
CHECKS = "checks: "


class Check(NamedTuple):
    """One check's prediction and measurement (seconds)."""
    width: int
    predicted: float
    measured: float            #: the slowest worker's
    codec: tuple               #: (encode, decode) predicted for the worker predicted slowest
    parts: tuple               #: (encode, link, decode, encode's CPU time) measured on the slowest worker
    slowest: tuple             #: (predicted, measured) slowest worker
    out_in: tuple              #: bytes the predicted slowest worker's link carries each way
    unloaded: float            #: predicted without the loaded latency


def claim_errors(predicted, measured):
    """Relative errors of predictions against measured seconds (arrays of
    any shape); 0 where the exchange is shorter than :data:`MIN_TIMED_S`,
    which the claim does not cover."""
    import numpy as np

    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return np.where(measured >= MIN_TIMED_S, np.abs(predicted - measured) / measured, 0.0)


def start_together(how: str = "common", margin_s: float = START_MARGIN_S,
                   clock=time.perf_counter, sleep=time.sleep) -> tuple[float, float, float]:
    """Starts a timed exchange on every worker (collective).

    ``"barrier"``: each worker starts when it leaves a barrier.  They do
    not leave it together (the check prints how far apart), and the first
    out then times the others' late start as exchange time.  ``"common"``
    (the default): after the barrier, the workers agree on the time the
    last one left it plus `margin_s`, on this machine's monotonic clock,
    which they share, and sleep until then.  `clock` and `sleep` are
    that clock and how to wait.

    Returns:
        (float, float, float): The start, when this worker left the
        barrier, and by how many seconds it missed the start (0 if none).
    """
    import torch
    import torch.distributed as dist

    from pyg_adaqp.assign.cost_model import start_together as common_start

    dist.barrier()
    if how == "barrier":
        left = clock()
        return left, left, 0.0
    # The link profile's own common start (pyg_adaqp.assign.cost_model).
    return common_start(None, torch.device("cpu"), margin_s, clock, sleep)


def random_bits(seed: int, trial: int, sender: int, receiver: int, rows: int):
    """Widths of a channel's rows drawn from {2, 4, 8}; both ends draw the same.

    Sorted, as training sends them: every re-assignment re-orders a channel
    into contiguous width buckets (``HaloExchange.set_bits``)."""
    import torch

    digest = hashlib.blake2b(f"{seed}/{trial}/{sender}/{receiver}".encode(),
                             digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.tensor([2, 4, 8])[torch.randint(3, (rows,), generator=gen)].sort().values


def timed_exchange(transport, shared, num_rows: int, recv_layouts: dict, width: int,
                   repeats: int, start: str = "common"
                   ) -> tuple[tuple[float, ...], list[tuple[float, float]]]:
    """Median seconds of encode, exchange and decode, and the encode's CPU
    time (this process's), as one training exchange:
    `shared` (a :class:`~pyg_adaqp.comm.SharedRows` over the worker's send
    plan) encodes the rows of an ``[num_rows, width]`` tensor once per width;
    :data:`WARM_UPS` exchanges go first, untimed.  Every exchange starts as
    `start` says (:func:`start_together`), and each worker's times count
    from that start; also returns each timed exchange's ``(when this
    worker left the barrier before it, by how much it missed the start)``."""
    import numpy as np
    import torch
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(transport.rank)
    x = torch.randn(num_rows, width, generator=gen)
    out = {p: torch.empty(lay.num_rows, width) for p, lay in recv_layouts.items()}
    times, starts = [], []
    for _ in range(repeats + WARM_UPS):
        t0, left, missed = start_together(start)
        starts.append((left, missed))
        c0 = time.process_time()
        send = shared.pack(x, generator=gen)
        t1, c1 = time.perf_counter(), time.process_time()
        raw = transport.start(send, {p: lay.nbytes for p, lay in recv_layouts.items()},
                              torch.device("cpu")).wait()
        t2 = time.perf_counter()
        for p, lay in recv_layouts.items():
            lay.unpack(raw[p], out=out[p])
        t3 = time.perf_counter()
        times.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2, c1 - c0))
    times = np.array(times[WARM_UPS:])
    return (tuple(float(v) for v in times[np.argsort(times[:, 0])[len(times) // 2]]),
            starts[WARM_UPS:])


def worker(args: argparse.Namespace) -> None:
    """One host's worker (under torchrun)."""
    from datetime import timedelta

    import dataclasses

    import numpy as np
    import torch
    import torch.distributed as dist

    from pyg_adaqp.assign import assignment_seconds, profile_cost_model
    from pyg_adaqp.comm import MessageLayout, SharedRows, message_nbytes
    from pyg_adaqp.nn import DistGraph
    from pyg_adaqp.partition import load_partition
    from pyg_adaqp.train.launch import keep_freed_memory, return_freed_memory

    torch.set_num_threads(1)
    return_freed_memory()   # as a training worker's set-up
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, k = dist.get_rank(), dist.get_world_size()
    lg = load_partition(args.part_dir, rank)
    # The exchange's own group and transport, as a training worker builds them.
    graph = DistGraph(lg, group=dist.new_group(backend="gloo"))
    transport = graph.exchange.transport
    t0 = time.perf_counter()
    record: dict = {}
    # As the allocator's set-up in training: some columns of the input
    # features' exchange (the input cache's) are the round of every link at once.
    load = graph.input_load(lg.x) if args.all_links == "input" else None
    model = profile_cost_model(transport, "cpu", args.profile_repeats, record, load=load)
    setup = time.perf_counter() - t0
    keep_freed_memory()     # as training's epochs
    sizes = [None] * k
    dist.all_gather_object(sizes, {p: int(i.numel()) for p, i in lg.send_index.items()})
    checks, raw, apart, missed = [], [], [], 0.0
    for width in args.widths:
        for trial in range(args.trials):
            bits = {(i, j): random_bits(width, trial, i, j, n)
                    for i in range(k) for j, n in sizes[i].items()}
            send = {j: MessageLayout(bits[(rank, j)], width) for j in sizes[rank]}
            recv = {i: MessageLayout(bits[(i, rank)], width) for i in range(k)
                    if rank in sizes[i]}
            shared = SharedRows({j: lg.send_index[j] for j in send}, send)
            took, starts = timed_exchange(transport, shared, lg.num_owned, recv, width,
                                          args.repeats, args.exchange_start)
            everyone = [None] * k
            dist.all_gather_object(everyone, (took, sum(shared.encoded_rows.values()), starts))
            for repeat in zip(*(s for _, _, s in everyone)):   # every worker's, one exchange
                left = [out for out, _ in repeat]
                apart.append(max(left) - min(left))
                missed = max([missed, *(late for _, late in repeat)])
            everyone, encoded = [t for t, _, _ in everyone], [e for _, e, _ in everyone]
            rows = {ch: {b: int((v == b).sum()) for b in (2, 4, 8)} for ch, v in bits.items()}
            # The rows each worker encodes (a row several peers get at one
            # width once), as a share of the rows it sends.
            share = {i: encoded[i] / max(1, sum(sizes[i].values())) for i in range(k)}
            predicted, per = assignment_seconds(model, width, rows, encode_share=share)
            # The same model as its link rounds measured it, without the loaded latency.
            unloaded = assignment_seconds(dataclasses.replace(model, loaded_latency=0.0),
                                          width, rows, encode_share=share)[0]
            slowest = max(range(k), key=lambda i: everyone[i][0])
            # The predicted parts of the worker predicted slowest, and the
            # measured parts of the worker measured slowest.
            w = max(per, key=per.get)
            enc = sum(model.codec_seconds(w, n, width, b, True, share[w], len(sizes[w]))
                      for (i, _), c in rows.items() if i == w for b, n in c.items())
            dec = sum(model.codec_seconds(w, n, width, b, False)
                      for (_, j), c in rows.items() if j == w for b, n in c.items())
            # What the predicted slowest worker's link carries each way (the model's bytes).
            nbytes = {ch: sum(message_nbytes(n, width, b) for b, n in c.items())
                      for ch, c in rows.items()}
            out_in = (sum(n for (i, _), n in nbytes.items() if i == w),
                      sum(n for (_, j), n in nbytes.items() if j == w))
            raw.append({"width": width, "encode_share": share, "workers": everyone,
                        "rows": {f"{i},{j}": c for (i, j), c in rows.items()}})
            checks.append(Check(width, predicted, everyone[slowest][0], (enc, dec),
                                everyone[slowest][1:], (w, slowest), out_in, unloaded))
    setups = [None] * k
    dist.all_gather_object(setups, setup)
    if rank == 0:
        print(f"rows sent per worker: {[sum(s.values()) for s in sizes]}")
        print(f"set-up (profile_cost_model): {max(setups):.2f} s")
        common = (f"at one common time (the latest worker {missed * 1e3:.1f} ms after it); "
                  if args.exchange_start == "common" else "out of a barrier; ")
        print(f"every timed exchange started {common}the workers left the barrier "
              f"{np.median(apart) * 1e3:.1f} ms apart (median of {len(apart)} exchanges), "
              f"at most {max(apart) * 1e3:.1f} ms")
        print(f"loaded latency (every exchange, beside beta): "
              f"{model.loaded_latency * 1e3:.3f} ms")
        print("| worker | up (Mbit/s) | down (Mbit/s) | beta (ms) | free (KB) | "
              "bucket encode / decode (ms) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for i in sorted(model.up):
            def mbit(a):
                return f"{8 / a / 1e6:.0f}" if a else "inf"
            print(f"| {i} | {mbit(model.up[i])} | {mbit(model.down[i])} | "
                  f"{model.beta[i] * 1e3:.3f} | {model.free[i] / 1e3:.1f} | "
                  f"{model.bucket[i][0] * 1e3:.2f} / {model.bucket[i][1] * 1e3:.2f} |")
        print("\n| message width | predicted ms | measured ms | error | "
              "encode ms pred / meas (its CPU) | link ms pred / meas | decode ms pred / meas | "
              "slowest worker pred / meas | predicted slowest's link KB out / in |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (width, predicted, measured, (enc, dec), (m_enc, m_link, m_dec, m_cpu), (w, slowest),
             (out_b, in_b), _) in checks:       # every field of a Check
            print(f"| {width} | {predicted * 1e3:.2f} | {measured * 1e3:.2f} | "
                  f"{100 * (predicted - measured) / measured:+.0f}% | "
                  f"{enc * 1e3:.1f} / {m_enc * 1e3:.1f} ({m_cpu * 1e3:.1f}) | "
                  f"{(predicted - enc - dec) * 1e3:.1f} / {m_link * 1e3:.1f} | "
                  f"{dec * 1e3:.1f} / {m_dec * 1e3:.1f} | {w} / {slowest} | "
                  f"{out_b / 1e3:.0f} / {in_b / 1e3:.0f} |")
        measured = [c.measured for c in checks]
        timed = [m >= MIN_TIMED_S for m in measured]
        if any(timed):
            errors = claim_errors([c.predicted for c in checks], measured)[timed]
            unloaded = claim_errors([c.unloaded for c in checks], measured)[timed]
            print(f"\nexchanges of {MIN_TIMED_S * 1e3:.0f} ms or more: largest error "
                  f"{errors.max():.0%}, mean {errors.mean():.0%} (without the loaded latency: "
                  f"{unloaded.max():.0%}, {unloaded.mean():.0%})", flush=True)
        if args.raw:
            with open(args.raw, "a") as f:
                f.write(json.dumps({"setup": max(setups), "model": model.state_dict(),
                                    "profile": record, "checks": raw}) + "\n")
        # For --runs: every check of this run, read back by the launcher.
        print(CHECKS + json.dumps({"setup": max(setups), "checks": [
            [c.width, c.predicted, c.measured] for c in checks],
            "unloaded": [c.unloaded for c in checks]}), flush=True)
    dist.destroy_process_group()


def runs_passed(predicted, measured) -> int:
    """How many runs (rows of the ``[runs, checks]`` arrays, seconds) the
    predictions were within 15% on every exchange of 4 ms or more."""
    return int((claim_errors(predicted, measured).max(axis=1) <= MAX_ERROR).sum())


def across_runs(runs: list[dict]) -> tuple[list[dict], int, int]:
    """How each check's measured time and prediction spread over `runs` (each
    run's ``{"setup", "checks": [[width, predicted s, measured s], ...]}``),
    and in how many runs the model, and a model that knew each check's
    median measured time over the runs, was within 15% on every exchange of
    4 ms or more: the second is as close as the measurements' own spread
    lets any prediction come.

    Returns:
        (list[dict], int, int): One row per check (milliseconds), the runs
        the model passed, the runs the medians passed.
    """
    import numpy as np

    measured = np.array([[m for _, _, m in r["checks"]] for r in runs])
    predicted = np.array([[p for _, p, _ in r["checks"]] for r in runs])
    median = np.median(measured, axis=0)
    rows = [{"width": width, "measured": measured[:, c] * 1e3, "median": median[c] * 1e3,
             "predicted": predicted[:, c] * 1e3}
            for c, (width, _, _) in enumerate(runs[0]["checks"])]
    return rows, runs_passed(predicted, measured), runs_passed(
        np.broadcast_to(median, measured.shape), measured)


def print_across_runs(runs: list[dict]) -> None:
    """The table and counts of :func:`across_runs`."""
    import numpy as np

    rows, model, medians = across_runs(runs)
    print(f"\n{len(runs)} runs (set-up {min(r['setup'] for r in runs):.2f}-"
          f"{max(r['setup'] for r in runs):.2f} s). Each check over the runs:")
    print("| check | message width | measured ms: median | min | max | sd | "
          "predicted ms: median | min | max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, row in enumerate(rows):
        m, mid, p = row["measured"], row["median"], row["predicted"]
        print(f"| {c + 1} | {row['width']} | {mid:.1f} | {m.min():.1f} ({m.min() / mid - 1:+.0%}) | "
              f"{m.max():.1f} ({m.max() / mid - 1:+.0%}) | {m.std() / mid:.1%} | "
              f"{np.median(p):.1f} | {p.min():.1f} | {p.max():.1f} |")
    print(f"\nruns {CLAIM}: the model {model} of "
          f"{len(runs)}; each check's median measured time, as a prediction, {medians} of "
          f"{len(runs)}", flush=True)
    if all("unloaded" in r for r in runs):   # the same runs' model without the loaded latency
        measured = np.array([[m for _, _, m in r["checks"]] for r in runs])
        passed = runs_passed(np.array([r["unloaded"] for r in runs]), measured)
        print(f"without the loaded latency (beta as the link rounds measured it): "
              f"{passed} of {len(runs)}", flush=True)


def launch(args: argparse.Namespace) -> None:
    """Runs the check `args.runs` times on one cluster and prints the tables."""
    from cluster import Cluster

    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph

    with tempfile.TemporaryDirectory(prefix="adaqp-cost-") as tmp:
        data = synthetic_graph(num_nodes=args.nodes, avg_degree=args.avg_degree,
                               num_features=args.features, seed=0)
        partition_graph(data, args.hosts, seed=0, out_dir=Path(tmp))
        runs = []
        with Cluster(args.hosts, args.rates or args.rate) as cluster:
            print(f"cluster: {args.hosts} hosts, links at {cluster.rate}", flush=True)
            for run in range(args.runs):
                if args.runs > 1:
                    print(f"\n## run {run + 1} of {args.runs}", flush=True)
                results = cluster.run(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes={hosts}",
                     "--node-rank={rank}", "--nproc-per-node=1", "--master-addr={master}",
                     "--master-port=29500", os.path.abspath(__file__), "--part-dir", tmp,
                     "--repeats", str(args.repeats), "--trials", str(args.trials),
                     "--profile-repeats", str(args.profile_repeats),
                     "--exchange-start", args.exchange_start, "--all-links", args.all_links,
                     *(["--raw", os.path.abspath(args.raw)] if args.raw else []),
                     "--widths", *map(str, args.widths)], timeout=600)
                lines = results[0].output.splitlines()
                runs += [json.loads(line[len(CHECKS):]) for line in lines
                         if line.startswith(CHECKS)]
                print("".join(line + "\n" for line in lines
                              if "socket.cpp" not in line and not line.startswith(CHECKS)),
                      end="", flush=True)
        if len(runs) > 1:
            print_across_runs(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--rates", nargs="+", metavar="RATE", help="one rate per host")
    ap.add_argument("--nodes", type=int, default=40000)
    ap.add_argument("--avg-degree", type=int, default=10)
    ap.add_argument("--features", type=int, default=128,
                    help="the graph's input feature width (throughput.py's default)")
    ap.add_argument("--widths", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help="timed exchanges per check (their median counts)")
    ap.add_argument("--profile-repeats", type=int, default=1,
                    help="timed exchanges per link size in the set-up's profile (their "
                         "median counts), as the allocator's profile_repeats")
    ap.add_argument("--runs", type=int, default=1,
                    help="run the whole check (set-up included) this many times, and "
                         "print how each exchange spreads over the runs")
    ap.add_argument("--exchange-start", choices=["common", "barrier"], default="common",
                    help="how the workers start each timed exchange: at one common time "
                         "after a barrier, or each as it leaves the barrier (before "
                         "commit 6e68ab3)")
    ap.add_argument("--all-links", choices=["input", "dummy"], default="input",
                    help="the set-up's round of every link at once: some columns of the "
                         "input features' exchange, as training's set-up makes it where the "
                         "input cache is on (the default), or dummy bytes, as training's with "
                         "the cache off (and every set-up before this option; with "
                         "--features 8, the check of then)")
    ap.add_argument("--raw", metavar="FILE",
                    help="append each run's set-up measurements, model and checks to FILE "
                         "as one JSON line (see above)")
    ap.add_argument("--part-dir", help=argparse.SUPPRESS)   # set for the workers
    args = ap.parse_args()
    for name in ("trials", "repeats", "profile_repeats", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.part_dir:
        worker(args)
        return 0

    from _workers import print_header
    from cluster import Stopped, stop_on_signals

    print_header()
    # Ctrl-C, SIGTERM, SIGHUP: the cluster is torn down, as throughput.py's is.
    stop_on_signals()
    try:
        launch(args)
    except Stopped as sig:
        print(f"stopped by {sig}; the cluster was torn down", file=sys.stderr)
        return 130
    print("teardown check: no namespace, link or qdisc left")
    return 0


if __name__ == "__main__":
    sys.exit(main())

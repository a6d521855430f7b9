"""Solve time of the adaptive bit allocator on synthetic inputs (SPEC 7).

One re-assignment of an 8-worker, 3-layer job: 56 channels, 6 exchange
keys (forward and backward of 3 layers), every channel carrying between
`--min-rows` and `--max-rows` rows, cut into groups of `--group-size`.
Traces are log-normal, scores gamma-distributed, and the cost model gives
every sender its own link speed, so the MILP has a real bottleneck to trade.

    python benchmarks/allocator_solve.py [--min-rows 10000 --max-rows 100000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pyg_adaqp.assign import (AdaptiveBits, CostModel, KeyProblem, group_messages, objective,
                              solve_key)
from pyg_adaqp.assign.adaptive import (DEFAULT_BUDGET, DEFAULT_GRADIENT_BUDGET,
                                       MAX_GROUPS_PER_CHANNEL)


def synthetic_key(rng: np.random.Generator, workers: int, width: int, min_rows: int,
                  max_rows: int, group_size: int, max_groups: int) -> KeyProblem:
    sender, receiver, rows, coef = [], [], [], []
    for i in range(workers):
        for j in range(workers):
            if i == j:
                continue
            n = int(rng.integers(min_rows, max_rows + 1))
            c = rng.lognormal(0.0, 1.0, n) * rng.gamma(2.0, 1.0, n)
            group_coef, group_rows, _ = group_messages(c, group_size, max_groups)
            sender.append(np.full(group_coef.size, i))
            receiver.append(np.full(group_coef.size, j))
            rows.append(group_rows)
            coef.append(group_coef)
    coef = np.concatenate(coef)
    # A signal for which uniform 2 bits adds 30% noise: the default budgets (3%, 10%) bite.
    return KeyProblem(width, np.concatenate(sender), np.concatenate(receiver),
                      np.concatenate(rows), coef, signal=float(coef.sum() / 9 / 0.3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--min-rows", type=int, default=10_000)
    parser.add_argument("--max-rows", type=int, default=100_000)
    parser.add_argument("--group-size", type=int, default=100)
    parser.add_argument("--max-groups", type=int, default=MAX_GROUPS_PER_CHANNEL,
                        help="most groups per channel (the allocator's default)")
    parser.add_argument("--coe-lambda", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="forward keys' variance budget (negative: the weighted sum "
                             "with --coe-lambda, for every key)")
    parser.add_argument("--gradient-budget", type=float, default=DEFAULT_GRADIENT_BUDGET,
                        help="backward keys' variance budget")
    parser.add_argument("--time-limit", type=float, default=0.3,
                        help="seconds for the MILPs of one re-assignment together")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    # ~1 Gbit/s links, +-30% per sender, 1 ms fixed cost.
    rate = {i: 8e-9 * rng.uniform(0.7, 1.3) for i in range(args.workers)}
    cost = CostModel(rate, dict(rate), {i: 1e-3 for i in range(args.workers)})
    keys = [f"{d} {layer}" for layer in range(args.layers) for d in ("forward", "backward")]
    problems = {k: synthetic_key(rng, args.workers, args.width, args.min_rows, args.max_rows,
                                 args.group_size, args.max_groups) for k in keys}
    channels = args.workers * (args.workers - 1)
    print(f"{args.workers} workers, {channels} channels, {len(keys)} keys, "
          f"{args.min_rows}-{args.max_rows} rows per channel, group_size {args.group_size} "
          f"(at most {args.max_groups} groups per channel), "
          f"budgets {args.budget} (forward), {args.gradient_budget} (backward)"
          if args.budget >= 0 else f"lambda {args.coe_lambda}")
    # Each key's budget as the allocator gives it.
    allocator = AdaptiveBits(variance_budget=args.budget if args.budget >= 0 else None,
                             gradient_budget=args.gradient_budget)
    t0 = time.perf_counter()
    for key, problem in problems.items():
        budget = allocator.budget(key)
        sol = solve_key(problem, cost, args.coe_lambda, args.time_limit / len(keys),
                        budget=budget)
        greedy = solve_key(problem, cost, args.coe_lambda, 0.0, max_milp_groups=0,
                           budget=budget)
        uniform = {b: objective(problem, cost, np.full(problem.num_groups, b), args.coe_lambda,
                                budget) for b in (2, 4, 8)}
        counts = {int(b): int(problem.rows[sol.bits == b].sum()) for b in (2, 4, 8)}
        print(f"{key:>10}: {problem.num_groups:6d} groups, {problem.rows.sum():8d} rows, "
              f"{sol.method:6s} {sol.solve_time:.3f} s, objective {sol.objective:.4f} "
              f"(uniform 2/4/8: {uniform[2]:.3f}/{uniform[4]:.3f}/{uniform[8]:.3f}), "
              f"predicted {1e3 * sol.seconds:.1f} ms (greedy alone {1e3 * greedy.seconds:.1f}), "
              f"rows by bits {counts}")
    print(f"total solve time per re-assignment: {time.perf_counter() - t0:.3f} s")
    # Every sender also sorts and cuts each of its channels' rows, per key, at
    # every re-assignment (group_messages); against it, a stable sort alone.
    c = rng.lognormal(0.0, 1.0, args.max_rows) * rng.gamma(2.0, 1.0, args.max_rows)
    took = {}
    for name, run in (("group_messages", lambda: group_messages(c, args.group_size,
                                                                 args.max_groups)),
                      ("a stable argsort alone", lambda: np.argsort(-c, kind="stable"))):
        times = []
        for _ in range(21):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        took[name] = float(np.median(times))
    print(f"grouping one channel of {args.max_rows} rows: "
          + ", ".join(f"{name} {1e3 * t:.2f} ms" for name, t in took.items())
          + " (median of 21)")


if __name__ == "__main__":
    main()

"""The adaptive bit allocator: the MILP, its fallback, the cost model, end to end."""
from __future__ import annotations

import itertools
import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pyg_adaqp.assign import (
    AdaptiveBits,
    CostModel,
    KeyProblem,
    assignment_seconds,
    group_messages,
    objective,
    solve_key,
)
from pyg_adaqp.assign import cost_model
from pyg_adaqp.assign.cost_model import (BUCKET_REPEATS, CODEC_ELEMENTS, CODEC_WIDTHS,
                                         EVEN_ALL_LINKS, EVEN_WITHIN, FAST_WITHIN_S,
                                         LARGEST_WITHIN_S, LATENCY_REPEATS, PROFILE_BYTES,
                                         SOURCE_ROWS_PER_ROW, WARM_UP_BYTES, WARM_UP_ROUNDS,
                                         all_links_bytes,
                                         WorkerCpus, codec_costs, coding_slowdown,
                                         excess_latency,
                                         fast_links, fit_link, latency_plan, profile_codec,
                                         profile_sizes, slow_links)
from pyg_adaqp.assign.milp import TIE_BREAK, WIDTHS
from pyg_adaqp.comm import message_nbytes
from pyg_adaqp.comm.packing import SUPPORTED_BITS
from pyg_adaqp.host import usable_cpus
from test_train import SMALL, launch, make_config, read_run


def random_problem(seed: int, workers: int = 3, groups: int = 4, width: int = 16,
                   burst: bool = True, signal: float = 0.0, bucket: float = 2e-7):
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i in range(workers) for j in range(workers) if i != j]
    sender = np.repeat([i for i, _ in pairs], groups)
    receiver = np.repeat([j for _, j in pairs], groups)
    rows = rng.integers(1, 50, sender.size)
    coef = rng.lognormal(0, 1.5, sender.size) * rows
    problem = KeyProblem(width, sender, receiver, rows, coef, signal)
    # Some links pass part of the message unmetered (a token bucket's burst).
    free = {i: float(rng.choice([0.0, rng.uniform(0, problem.bytes[sender == i, 1].sum())]))
            if burst else 0.0 for i in range(workers)}
    cost = CostModel({i: float(rng.uniform(1e-9, 1e-8)) for i in range(workers)},
                     {i: float(rng.uniform(1e-9, 1e-8)) for i in range(workers)},
                     {i: float(rng.uniform(0, 1e-5)) for i in range(workers)}, free,
                     # Every used width bucket of a message (by default up
                     # to a row's worth of link time) at each end.
                     bucket={i: (float(rng.uniform(0, bucket)), float(rng.uniform(0, bucket)))
                             for i in range(workers)},
                     # and a loaded latency beside beta
                     loaded_latency=float(rng.uniform(0, 1e-5)))
    return problem, cost


def test_group_messages_sorts_and_cuts():
    coef, rows, order = group_messages(np.array([1.0, 5.0, 3.0, 0.0, 4.0]), 2)
    assert order.tolist() == [1, 4, 2, 0, 3]
    assert coef.tolist() == [9.0, 4.0, 0.0] and rows.tolist() == [2, 2, 1]
    # At most 2 groups: groups of ceil(5 / 2) = 3 messages.
    coef, rows, order = group_messages(np.array([1.0, 5.0, 3.0, 0.0, 4.0]), 1, max_groups=2)
    assert coef.tolist() == [12.0, 1.0] and rows.tolist() == [3, 2]
    # Ties in any order: still every message once, the groups' sums the same.
    c = np.repeat([2.0, 0.0, 7.0], 50)
    coef, rows, order = group_messages(c, 50)
    assert sorted(order.tolist()) == list(range(150))
    assert coef.tolist() == [350.0, 100.0, 0.0] and rows.tolist() == [50, 50, 50]
    assert (np.diff(c[order]) <= 0).all()


def test_cost_model_is_the_critical_path_of_each_worker():
    """T_i = encode + decode + max(0, beta + max(up * out, down * in) - hidden); T = max_i."""
    cost = CostModel(up={0: 1e-9, 1: 2e-9}, down={0: 4e-9, 1: 1e-9}, beta={0: 1e-3, 1: 0.0},
                     encode={0: {4: (1e-6, 0.0)}}, decode={1: {4: (0.0, 1e-8)}})
    # Channel 0 -> 1 carries 1000 rows of width 100 at 4 bits: 54 kB each way.
    nbytes = message_nbytes(1000, 100, 4)
    t, per = assignment_seconds(cost, 100, {(0, 1): {4: 1000}})
    assert per[0] == pytest.approx(1000 * 1e-6 + 1e-3 + 1e-9 * nbytes)   # encode + egress
    assert per[1] == pytest.approx(1000 * 100 * 1e-8 + 1e-9 * nbytes)    # decode + ingress
    assert t == pytest.approx(max(per.values()))
    # The receiver's slow down-link is the critical path when it receives.
    t, per = assignment_seconds(cost, 100, {(1, 0): {4: 1000}})
    assert per[0] == pytest.approx(1e-3 + 4e-9 * nbytes) and t == per[0]
    # What the overlap hides costs nothing; encode and decode always count.
    _, per = assignment_seconds(cost, 100, {(0, 1): {4: 1000}}, hidden={0: 1.0})
    assert per[0] == pytest.approx(1000 * 1e-6)
    assert assignment_seconds(cost, 100, {}) == (0.0, {})
    # Each non-empty width bucket of a message costs its sender and its
    # receiver a fixed time, whatever its rows.
    cost.bucket = {0: (2e-4, 0.0), 1: (0.0, 3e-4)}
    _, one = assignment_seconds(cost, 100, {(0, 1): {4: 1000, 8: 0}})
    assert one[0] == pytest.approx(2e-4 + 1000 * 1e-6 + 1e-3 + 1e-9 * nbytes)
    assert one[1] == pytest.approx(3e-4 + 1000 * 100 * 1e-8 + 1e-9 * nbytes)
    nbytes = message_nbytes(500, 100, 4) + message_nbytes(500, 100, 8)
    _, two = assignment_seconds(cost, 100, {(0, 1): {4: 500, 8: 500}})   # no 8-bit codec cost
    assert two[0] == pytest.approx(2 * 2e-4 + 500 * 1e-6 + 1e-3 + 1e-9 * nbytes)
    assert two[1] == pytest.approx(2 * 3e-4 + 500 * 100 * 1e-8 + 1e-9 * nbytes)


def test_loaded_latency_is_what_the_exchange_took_beyond_the_model():
    """Every worker sends LATENCY_ROWS split over its peers at 2 bits; what the
    slowest worker took beyond the slowest prediction is the loaded latency,
    never below 0."""
    assert latency_plan(3, rows=100) == {(0, 1): {2: 50}, (0, 2): {2: 50}, (1, 0): {2: 50},
                                         (1, 2): {2: 50}, (2, 0): {2: 50}, (2, 1): {2: 50}}
    cost = CostModel(up={0: 1e-8, 1: 2e-8}, down={0: 1e-8, 1: 1e-8}, beta={0: 1e-3, 1: 1e-3},
                     encode={i: {2: (1e-6, 1e-8)} for i in (0, 1)},
                     decode={i: {2: (1e-7, 1e-9)} for i in (0, 1)})
    plan = latency_plan(2, rows=1000)
    nbytes = message_nbytes(1000, CODEC_WIDTHS[0], 2)
    codec = 1000 * (1e-6 + 1e-8 * CODEC_WIDTHS[0]) + 1000 * (1e-7 + 1e-9 * CODEC_WIDTHS[0])
    predicted = {0: codec + 1e-3 + 1e-8 * nbytes, 1: codec + 1e-3 + 2e-8 * nbytes}
    slowest = max(predicted.values())                  # worker 1's: its slower uplink
    assert predicted[1] == slowest
    # Worker 0 waited 4 ms past its own prediction, but only 4 ms past the
    # slowest one counts: its wait for worker 1 is in the maximum already.
    extra = excess_latency(cost, plan, [slowest + 4e-3, predicted[1] + 1e-3])
    assert extra == pytest.approx(4e-3)
    assert excess_latency(cost, plan, [predicted[0], predicted[1] - 1e-3]) == 0.0
    # Measured against the model without a latency of its own, then part of it.
    cost.loaded_latency = extra
    assert excess_latency(cost, plan, [slowest + 4e-3, 0.0]) == pytest.approx(extra)
    assert assignment_seconds(cost, CODEC_WIDTHS[0], plan)[0] == pytest.approx(slowest + 4e-3)


def test_cost_model_encodes_shared_rows_once():
    """A sender encodes the fraction `encode_share` of the rows it sends, and
    a width's fixed cost once for all its channels; receivers decode all."""
    cost = CostModel(up={0: 1e-9}, down={1: 1e-9, 2: 1e-9}, encode={0: {2: (1e-6, 0.0)}},
                     decode={1: {2: (1e-6, 0.0)}, 2: {2: (1e-6, 0.0)}},
                     bucket={0: (3e-4, 0.0), 1: (0.0, 1e-4), 2: (0.0, 1e-4)})
    rows = {(0, 1): {2: 1000}, (0, 2): {2: 600}}
    _, per = assignment_seconds(cost, 64, rows, encode_share={0: 0.75})
    sent = message_nbytes(1600, 64, 2)
    assert per[0] == pytest.approx(3e-4 + 0.75 * 1600 * 1e-6 + 1e-9 * sent)
    assert per[1] == pytest.approx(1e-4 + 1000 * 1e-6 + 1e-9 * message_nbytes(1000, 64, 2))
    # The allocator's vectorized model agrees, group by group.
    problem = KeyProblem(64, [0, 0, 0], [1, 1, 2], [500, 500, 600], [1.0, 1.0, 1.0],
                         encode_share={0: 0.75})
    sol = solve_key(problem, cost, 0.5, budget=1e9)
    assert sol.bits.tolist() == [2, 2, 2]
    assert sol.seconds == pytest.approx(max(per.values()))


def test_cost_model_lets_free_bytes_through():
    cost = CostModel({0: 1e-9}, {0: 1e-9}, {0: 1e-4}, {0: 250e3}, loaded_latency=2e-4)
    assert cost.link_seconds(0, 100e3, 0) == pytest.approx(3e-4)          # within the burst
    assert cost.link_seconds(0, 1.25e6, 0) == pytest.approx(3e-4 + 1e-3)  # 1 MB over it
    assert cost.link_seconds(0, 0, 0) == 0.0                              # nothing to move
    assert CostModel.from_state_dict(cost.state_dict()) == cost
    # Through JSON (summary.json) the keys become strings and come back.
    assert CostModel.from_state_dict(json.loads(json.dumps(cost.state_dict()))) == cost
    # A model saved before the loaded latency was measured has none.
    old = {k: v for k, v in cost.state_dict().items() if k != "loaded_latency"}
    assert CostModel.from_state_dict(old).link_seconds(0, 100e3, 0) == pytest.approx(1e-4)


@pytest.mark.parametrize("free", [0.0, 3e5])
def test_fit_link_recovers_line_and_knot(free):
    sent = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024]) * 5000.0
    took = 2e-4 + 8e-9 * np.maximum(0.0, sent - free)
    took *= 1 + 0.02 * np.random.default_rng(0).standard_normal(sent.size)  # 2% noise
    alpha, beta, knot = fit_link(sent, took)
    assert alpha == pytest.approx(8e-9, rel=0.1)
    assert beta == pytest.approx(2e-4, rel=0.2)
    pred = beta + alpha * np.maximum(0.0, sent - knot)
    assert np.max(np.abs(pred - took) / took) < 0.1


def _fit_link_per_knot(sent, took):
    """fit_link as one weighted least-squares solve per knot (the reference)."""
    w = 1.0 / np.maximum(took, 1e-9)
    best, best_err = (0.0, float(np.median(took)), 0.0), np.inf
    sizes = np.sort(np.unique(sent[sent > 0]))
    knots = np.geomspace(sizes[0], sizes[-2], 64) if sizes.size > 2 else np.zeros(0)
    for free in np.r_[0.0, knots]:
        x = np.maximum(0.0, sent - free)
        design = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
        (alpha, beta), *_ = np.linalg.lstsq(design, took * w, rcond=None)
        if alpha < 0:
            alpha, beta = 0.0, float(np.sum(took * w * w) / np.sum(w * w))
        elif beta < 0:
            alpha, beta = float(np.sum(x * took * w * w) / max(np.sum(x * x * w * w), 1e-30)), 0.0
        err = float(np.sum(((alpha * x + beta - took) * w) ** 2))
        if err < best_err - 1e-12:
            best, best_err = (float(alpha), float(beta), float(free)), err
    return best


@pytest.mark.parametrize("seed", range(40))
def test_fit_link_is_the_least_squares_fit_of_each_knot(seed):
    """The closed form over every knot at once fits what one solve per knot
    fits: the set-up's four sizes and repeats, a burst, noise up to 50%, lines
    sloping down or starting below 0."""
    rng = np.random.default_rng(seed)
    sizes = np.array([512, 128, 32, 8]) * 1024.0
    sent = np.repeat(sizes, rng.integers(1, 3))
    alpha, beta = rng.uniform(-2e-9, 1e-7), rng.uniform(-1e-4, 3e-3)
    took = beta + alpha * np.maximum(0.0, sent - rng.choice([0.0, rng.uniform(0, 2e5)]))
    took = np.abs(took) * (1 + rng.uniform(0, 0.5) * rng.standard_normal(sent.size)) + 1e-6
    np.testing.assert_allclose(fit_link(sent, took), _fit_link_per_knot(sent, took),
                               rtol=1e-6, atol=1e-15)


def test_fit_link_of_one_size_or_no_bytes():
    """One size: the line through the origin; no bytes: the time is all beta."""
    alpha, beta, free = fit_link(np.array([1e5, 1e5]), np.array([1e-3, 1e-3]))
    assert (alpha, beta, free) == (pytest.approx(1e-8), 0.0, 0.0)
    # Weighted by 1 / took^2: (1e-3 * 1e6 + 3e-3 * 1e6 / 9) / (1e6 + 1e6 / 9) = 1.2e-3.
    alpha, beta, free = fit_link(np.array([0.0, 0.0]), np.array([1e-3, 3e-3]))
    assert (alpha, free) == (0.0, 0.0) and beta == pytest.approx(1.2e-3)


def test_fit_link_never_slopes_down():
    alpha, beta, knot = fit_link(np.array([1e3, 1e4, 1e5, 1e6]),
                                 np.array([3e-3, 2e-3, 1e-3, 1e-3]))
    assert alpha >= 0 and beta >= 0 and knot >= 0


@pytest.mark.parametrize("seed", range(3))
def test_lambda_one_keeps_every_group_at_8_bits(seed):
    problem, cost = random_problem(seed)
    sol = solve_key(problem, cost, coe_lambda=1.0)
    assert sol.bits.tolist() == [8] * problem.num_groups
    assert sol.objective == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lambda_zero_minimizes_time(seed):
    # A cost that grows with every byte: only all 2 bits reaches the least time.
    problem, cost = random_problem(seed, burst=False)
    sol = solve_key(problem, cost, coe_lambda=0.0)
    assert sol.bits.tolist() == [2] * problem.num_groups
    assert sol.objective == pytest.approx(0.0, abs=1e-12)
    # With free bytes, wider rows may cost no time; the time is still the least.
    problem, cost = random_problem(seed)
    sol = solve_key(problem, cost, coe_lambda=0.0)
    assert sol.objective == pytest.approx(0.0, abs=1e-12)
    assert objective(problem, cost, sol.bits, 0.0) == pytest.approx(
        objective(problem, cost, np.full(problem.num_groups, 2), 0.0), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_budget_all_8_when_time_is_free_all_2_when_variance_is(seed):
    problem, cost = random_problem(seed, signal=1e3)
    free_time = CostModel({i: 0.0 for i in cost.up}, {i: 0.0 for i in cost.up})
    sol = solve_key(problem, free_time, budget=0.01)
    assert sol.bits.tolist() == [8] * problem.num_groups   # no time to save: least variance
    problem, cost = random_problem(seed, burst=False, signal=1e3)
    sol = solve_key(problem, cost, budget=np.inf)
    all_2 = assignment_time(problem, cost, np.full(problem.num_groups, 2))
    # No variance cost: all 2 bits, also off the critical path (ties in time
    # go to fewer bytes).
    assert sol.bits.tolist() == [2] * problem.num_groups
    assert sol.seconds == pytest.approx(all_2)
    assert sol.seconds < assignment_time(problem, cost, np.full(problem.num_groups, 4))
    # Only time counts (the weighted sum at lambda 0): all 2 bits.
    assert solve_key(problem, cost, coe_lambda=0.0).bits.tolist() == [2] * problem.num_groups


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("coe_lambda", [0.2, 0.5, 0.8])
def test_milp_matches_brute_force_and_beats_uniform(seed, coe_lambda):
    problem, cost = random_problem(seed, workers=2, groups=3)
    sol = solve_key(problem, cost, coe_lambda, time_limit=5.0, mip_rel_gap=1e-9)
    assert sol.bits.shape == (problem.num_groups,)          # one width per group
    assert set(sol.bits.tolist()) <= {2, 4, 8}
    assert sol.objective == pytest.approx(objective(problem, cost, sol.bits, coe_lambda))
    brute = min(objective(problem, cost, np.array(bits), coe_lambda)
                for bits in itertools.product((2, 4, 8), repeat=problem.num_groups))
    assert sol.objective <= brute + TIE_BREAK
    for b in (2, 4, 8):
        uniform = objective(problem, cost, np.full(problem.num_groups, b), coe_lambda)
        assert sol.objective <= uniform + TIE_BREAK
    assert 0.0 < sol.objective < min(coe_lambda, 1 - coe_lambda)  # a real trade-off


def budget_between_2_and_4_bits(problem: KeyProblem) -> float:
    """Sets `problem`'s signal to 1 and returns a budget between the noise
    of all 2 bits and of all 4 bits (their geometric mean)."""
    problem.signal = 1.0
    noise = [problem.variance(np.full(problem.num_groups, k)) for k in (0, 1)]
    return float(np.sqrt(noise[0] * noise[1]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bucket", [2e-7, 2e-5])   # a bucket: a row's link time, or the exchange's
def test_budget_milp_is_the_fastest_within_budget_by_brute_force(seed, bucket):
    problem, cost = random_problem(seed, workers=2, groups=3, bucket=bucket)
    budget = budget_between_2_and_4_bits(problem)
    sol = solve_key(problem, cost, time_limit=5.0, mip_rel_gap=1e-9, budget=budget)
    choice = np.searchsorted(WIDTHS, sol.bits)
    assert problem.variance(choice) <= budget * (1 + 1e-9)
    fastest = min(assignment_time(problem, cost, bits)
                  for bits in itertools.product((2, 4, 8), repeat=problem.num_groups)
                  if problem.variance(np.searchsorted(WIDTHS, bits)) <= budget)
    assert sol.seconds == pytest.approx(assignment_time(problem, cost, sol.bits))
    assert sol.seconds <= fastest * (1 + 1e-6) + 1e-12
    assert 0 < sol.noise <= budget * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_budget_milp_runs_no_longer_than_it_could_save(seed):
    """With `uses`, the MILP's time is capped by what it could save over
    them (the greedy time less all 2 bits'): a solve that cannot pay leaves
    the greedy answer; one that can is the solve without the cap."""
    problem, cost = random_problem(seed, workers=2, groups=3, bucket=2e-5)
    budget = budget_between_2_and_4_bits(problem)
    greedy = solve_key(problem, cost, max_milp_groups=0, budget=budget)
    assert greedy.seconds > assignment_time(problem, cost, np.full(problem.num_groups, 2))
    full = solve_key(problem, cost, time_limit=5.0, mip_rel_gap=1e-9, budget=budget)
    for uses in (0, 1e-12):   # a saving of at most 0 s, or far under MIN_MILP_SECONDS
        capped = solve_key(problem, cost, time_limit=5.0, mip_rel_gap=1e-9, budget=budget,
                           uses=uses)
        assert capped.method == "greedy" and capped.bits.tolist() == greedy.bits.tolist()
    paid = solve_key(problem, cost, time_limit=5.0, mip_rel_gap=1e-9, budget=budget, uses=1e9)
    assert paid.bits.tolist() == full.bits.tolist() and paid.method == full.method
    # Without a budget the weighted sum's MILP runs whatever `uses`.
    lam = solve_key(problem, cost, 0.5, time_limit=5.0, mip_rel_gap=1e-9, uses=0)
    assert lam.bits.tolist() == solve_key(problem, cost, 0.5, time_limit=5.0,
                                          mip_rel_gap=1e-9).bits.tolist()


def assignment_time(problem: KeyProblem, cost: CostModel, bits) -> float:
    """The cost model's time of a per-group assignment, from its channels' row counts."""
    rows: dict = {}
    for s, r, n, b in zip(problem.sender, problem.receiver, problem.rows, bits):
        by_bits = rows.setdefault((int(s), int(r)), {})
        by_bits[int(b)] = by_bits.get(int(b), 0) + int(n)
    return assignment_seconds(cost, problem.width, rows, problem.hidden, problem.encode_share)[0]


def test_widths_follow_the_link_rates():
    """Worker 3's link is 10x slower: its channels, both ways, get the low widths."""
    rng = np.random.default_rng(0)
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    sender = np.repeat([i for i, _ in pairs], 20)
    receiver = np.repeat([j for _, j in pairs], 20)
    coef = rng.lognormal(0, 1.0, sender.size) * 100
    problem = KeyProblem(64, sender, receiver, np.full(sender.size, 100), coef)
    problem.signal = coef.sum() / 225 / 0.5     # a budget met by 4 bits on average... x2
    fast, slow = 8e-9, 80e-9
    rate = {i: slow if i == 3 else fast for i in range(4)}
    sol = solve_key(problem, CostModel(rate, dict(rate)), budget=0.5)
    bits = sol.bits
    slow_channels = (sender == 3) | (receiver == 3)
    assert bits[slow_channels].mean() < bits[~slow_channels].mean()
    # The same problem on even links spreads the widths evenly over the channels.
    even = solve_key(problem, CostModel({i: fast for i in range(4)}, {i: fast for i in range(4)}),
                     budget=0.5).bits
    assert abs(even[slow_channels].mean() - even[~slow_channels].mean()) < \
        bits[~slow_channels].mean() - bits[slow_channels].mean()


def test_large_key_uses_the_milp_near_the_greedy_cut():
    problem, cost = random_problem(0, workers=4, groups=700, width=64)
    sol = solve_key(problem, cost, 0.5, time_limit=1.0)
    greedy = solve_key(problem, cost, 0.5, time_limit=1e-9, max_milp_groups=0)
    assert sol.objective <= greedy.objective + TIE_BREAK
    assert sol.solve_time < 3.0
    for b in (2, 4, 8):
        assert sol.objective < objective(problem, cost, np.full(problem.num_groups, b), 0.5)


def test_degenerate_inputs():
    cost = CostModel({0: 1e-9, 1: 1e-9}, {0: 1e-9, 1: 1e-9})
    empty = KeyProblem(8, [], [], [], [])
    assert solve_key(empty, cost).bits.size == 0
    # All-zero traces: no variance to buy, so every group at 2 bits, objective 0 (not NaN).
    zero = KeyProblem(8, [0, 0, 1], [1, 1, 0], [10, 10, 5], [0.0, 0.0, 0.0])
    sol = solve_key(zero, cost, 0.5)
    assert sol.bits.tolist() == [2, 2, 2] and sol.objective == 0.0
    # A flat cost model (no time to save) and a worker the model never saw.
    flat = KeyProblem(8, [0, 2], [2, 0], [10, 10], [1.0, 2.0])
    sol = solve_key(flat, CostModel({0: 0.0}, {0: 0.0}, {0: 1e-3}), 0.5)
    assert sol.bits.tolist() == [8, 8] and not math.isnan(sol.objective)
    # A budget no width meets: the least variance there is.
    flat.signal = 1.0
    sol = solve_key(flat, cost, budget=1e-9)
    assert sol.bits.tolist() == [8, 8]


def test_allocator_checks_its_arguments():
    with pytest.raises(ValueError, match="coe_lambda"):
        AdaptiveBits(coe_lambda=1.5)
    with pytest.raises(ValueError, match="group_size"):
        AdaptiveBits(group_size=0)
    with pytest.raises(ValueError, match="variance_budget"):
        AdaptiveBits(variance_budget=-0.1)
    with pytest.raises(ValueError, match="gradient_budget must be >= 0 or None, got -0.1"):
        AdaptiveBits(gradient_budget=-0.1)
    with pytest.raises(ValueError, match="first_bits must be one of"):
        AdaptiveBits(first_bits=3)
    with pytest.raises(ValueError, match="time_limit must be >= 0 seconds, got -1"):
        AdaptiveBits(time_limit=-1)
    with pytest.raises(ValueError, match="profile_repeats must be >= 1, got 0"):
        AdaptiveBits(profile_repeats=0)


@pytest.mark.parametrize("override,field", [("assign.coe_lambda=-0.1", "assign.coe_lambda"),
                                            ("assign.group_size=0", "assign.group_size"),
                                            ("assign.variance_budget=-1",
                                             "assign.variance_budget"),
                                            ("assign.gradient_budget=-1",
                                             "assign.gradient_budget")])
def test_bad_allocator_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"config field '{field}'"):
        make_config("assign=adaptive", override)


def test_adaptive_config_composes():
    cfg = make_config("assign=adaptive")
    a = cfg.assign
    assert (a.scheme, a.group_size, a.coe_lambda) == ("adaptive", 100, 0.5)
    # The default objective: a variance budget, one per direction.
    assert (a.variance_budget, a.gradient_budget) == (0.03, 0.1)
    assert make_config("assign=adaptive", "assign.variance_budget=null").assign \
        .variance_budget is None                 # the paper's weighted sum


def test_each_direction_has_its_own_budget():
    """Forward keys get the variance budget, backward keys the gradient budget
    (or the variance budget when it has none); without a variance budget every
    key has the weighted sum."""
    both = AdaptiveBits(variance_budget=0.03, gradient_budget=0.1)
    assert [both.budget(k) for k in ("forward 0", "forward 2", "backward 1")] == [0.03, 0.03, 0.1]
    assert AdaptiveBits(variance_budget=0.05, gradient_budget=None).budget("backward 1") == 0.05
    assert AdaptiveBits(variance_budget=None).budget("backward 1") is None
    assert AdaptiveBits(variance_budget=None).budget("forward 1") is None
    # A checkpoint written when one budget governed both directions resumes as such.
    old = AdaptiveBits(variance_budget=0.05, gradient_budget=None).state_dict()
    del old["gradient_budget"]
    resumed = AdaptiveBits(variance_budget=0.05, gradient_budget=0.1)
    with pytest.warns(UserWarning, match="gradient_budget = 0.1; the checkpoint's run used 0.05"):
        resumed.load_state_dict(old)


@pytest.mark.parametrize("budget", [None, 1e-3])
def test_adaptive_training_end_to_end(tmp_path, budget):
    """Set-up before epoch 0, 8 bits in epoch 0 only, the budgets kept from epoch 1 on
    (the gradients' twice the forward one's)."""
    objective_override = ("assign.variance_budget=null", "assign.coe_lambda=1.0") \
        if budget is None else (f"assign.variance_budget={budget}",
                                f"assign.gradient_budget={2 * budget}")
    cfg = make_config(*SMALL, "assign=adaptive", "assign.cycle=2", "assign.group_size=20",
                      *objective_override, "trainer.epochs=4")
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    assert summary["scheme"] == "adaptive"
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The cost model is measured once, before epoch 0 began, and counted apart.
    assign = summary["assign"]
    assert summary["setup_time"] > 0 and assign["cost_model"] is not None
    assert assign["setup_window"][1] <= rows[0]["started_at"]
    # Its parts, each timed on rank 0, add up to no more than rank 0's whole,
    # which is at most the slowest worker's (all-reduced as float32: 1 us slack).
    parts = assign["setup_parts"]
    assert set(parts) == {"codec", "warm_up", "owner_rounds", "all_links", "loaded_exchange"}
    assert all(t > 0 for t in parts.values())
    assert sum(parts.values()) <= assign["setup_time"] <= summary["setup_time"] + 1e-6
    total = sum(r["epoch_time"] for r in rows)
    assert summary["throughput_with_setup_epochs_per_s"] == pytest.approx(
        len(rows) / (total + summary["setup_time"]))
    hist = summary["bits_histogram"]
    keys = {"forward 1", "backward 1", "forward 2", "backward 2"}
    assert keys <= set(hist)
    if budget is None:
        # Only variance counts (the weighted sum at lambda 1): 8 bits throughout.
        for key in keys:
            assert set(hist[key]) == {"8"}
        # (epoch 0 also sends the input features' halo, once, at full precision)
        assert len({r["bytes_sent"] for r in rows[1:]}) == 1
        # Epoch 2's re-assignment kept 8 bits everywhere: solved, neither told nor installed.
        assert [h["unchanged"] for h in assign["history"]] == [False, True]
    else:
        for key in keys:
            info = assign["solve"][key]
            own = budget if key.startswith("forward") else 2 * budget
            assert info["noise"] <= own * (1 + 1e-6)
            # Uniform 8 bits meets the budget, uniform 2 bits does not here.
            assert info["noise_uniform"]["8"] <= own < info["noise_uniform"]["2"]
        assert (assign["variance_budget"], assign["gradient_budget"]) == (budget, 2 * budget)
        assert {b for key in keys for b in hist[key]} <= {"2", "4", "8"}
    # Each re-assignment after the first checks the last one's predictions
    # against the real exchanges of the epoch before it.
    assert {c[0] for c in assign["cost_check"]} == keys
    assert all(p > 0 and m > 0 for _, p, m in assign["cost_check"])
    # Every re-assignment is recorded with the links' slow-down, timed from
    # the real exchanges' arrivals (both workers' links, both directions).
    assert [h["epoch"] for h in assign["history"]] == [1, 2]
    for h in assign["history"]:
        assert set(h["link_slowdown"]) == {"0", "1"} and set(h["mean_bits"]) == {"0->1", "1->0"}
        assert all(f == 1.0 or f >= 2.0 for fs in h["link_slowdown"].values() for f in fs)


def _schedule(monkeypatch, allocator: AdaptiveBits, epochs: int, revisit: bool = False
              ) -> tuple[list[int], list[int], object]:
    """Runs `allocator`'s epoch starts with `reassign` recorded (and, at epoch 1,
    learning `revisit` as rank 0's reply would tell it); returns the epochs
    that re-assigned, those traced, and the exchange."""
    from types import SimpleNamespace

    allocator.cost = CostModel({0: 1e-9, 1: 1e-9}, {0: 1e-9, 1: 1e-9})
    reassigned, traced = [], []

    def reassign(graph):
        reassigned.append(allocator._epoch)
        if allocator._epoch == 1:
            allocator._revisit = revisit

    monkeypatch.setattr(allocator, "reassign", reassign)
    exchange = SimpleNamespace(transport=object(), tracer=None, default_bits=None)
    for epoch in range(epochs):
        allocator.on_epoch_start(epoch, SimpleNamespace(exchange=exchange))
        if exchange.tracer is not None:
            traced.append(epoch)
            assert exchange.tracer is allocator._tracer
    return reassigned, traced, exchange


@pytest.mark.parametrize("first_bits", [8, 4])
def test_ranges_are_traced_only_in_the_epoch_before_a_reassignment(monkeypatch, first_bits):
    """Epoch 0 and the epoch before every re-assignment carry the tracer; no
    other. Epoch 0 runs at `first_bits`."""
    allocator = AdaptiveBits(cycle=4, first_bits=first_bits)
    reassigned, traced, exchange = _schedule(monkeypatch, allocator, 13)
    assert reassigned == [1, 4, 8, 12]
    assert traced == [0, 3, 7, 11]
    assert exchange.default_bits == first_bits


@pytest.mark.parametrize("first_narrowest", [True, False])
def test_epoch_two_reassigns_where_the_first_assignment_bought_wider_rows(
        monkeypatch, first_narrowest):
    """The first assignment comes from the initial weights' ranges: where it
    put any row above 2 bits, epoch 1 is traced and epoch 2 re-assigns;
    where every row is at 2 bits, the schedule is every cycle's."""
    reassigned, traced, _ = _schedule(monkeypatch, AdaptiveBits(cycle=4), 9,
                                      revisit=not first_narrowest)
    assert reassigned == ([1, 4, 8] if first_narrowest else [1, 2, 4, 8])
    assert traced == ([0, 3, 7] if first_narrowest else [0, 1, 3, 7])


@pytest.mark.parametrize("budget", [1e-3, 1e6])
def test_training_reassigns_at_epoch_two_only_after_wider_first_widths(tmp_path, budget):
    """Spawned workers: a tight budget puts rows above 2 bits at epoch 1, and
    epoch 2 re-assigns from epoch 1's traces; a loose one puts every row at
    2 bits, and nothing re-assigns before the cycle (10)."""
    cfg = make_config(*SMALL, "assign=adaptive", "assign.group_size=20",
                      f"assign.variance_budget={budget}", f"assign.gradient_budget={budget}",
                      "trainer.epochs=3")
    launch(cfg, tmp_path)
    _, summary = read_run(tmp_path)
    history = summary["assign"]["history"]
    first = history[0]["rows_by_bits"]
    wider = any(h["4"] + h["8"] for h in first.values())
    assert wider == (budget < 1)
    assert [h["epoch"] for h in history] == ([1, 2] if wider else [1])


def test_each_solve_runs_no_longer_than_its_widths_serve(monkeypatch):
    """The MILP's `uses` is the epochs until the next re-assignment: one for
    epoch 1's widths, which epoch 2 replaces, then up to a cycle."""
    import pyg_adaqp.assign.adaptive as adaptive

    allocator = AdaptiveBits(cycle=4, group_size=10)
    allocator.cost = CostModel({i: 8e-8 for i in range(2)}, {i: 8e-8 for i in range(2)})
    # Epoch 1's widths count as serving one epoch (epoch 2 replaces them
    # unless every row is at 2 bits, which leaves the MILP nothing to improve).
    assert [allocator.epochs_served(e) for e in (0, 1, 2, 3, 4, 8)] == [1, 1, 2, 1, 4, 4]
    assert [AdaptiveBits(cycle=c).epochs_served(2) for c in (1, 2, 3)] == [1, 2, 1]
    coef, rows, _ = group_messages(np.random.default_rng(0).lognormal(0, 1, 95), 10)
    uses = []
    solve_key = adaptive.solve_key
    monkeypatch.setattr(adaptive, "solve_key",
                        lambda *a, **kw: uses.append(kw["uses"]) or solve_key(*a, **kw))
    for epoch in (1, 2, 4):
        allocator._epoch = epoch
        allocator._solve(_forward_parts(coef, rows))
    assert uses == [1, 2, 4]


def _forward_parts(coef: np.ndarray, rows: np.ndarray) -> list[dict]:
    """What two workers give rank 0 at a re-assignment: one `forward 1`
    channel each way with the groups `coef` / `rows`, nothing observed."""
    return [{"groups": {"forward 1": {1 - i: (coef, rows)}},
             "signal": {"forward 1": 50.0}, "widths": {"forward 1": 32},
             "observed": {}, "arrivals": [], "overlap": True} for i in range(2)]


def test_epoch_zero_runs_at_assign_bits(tmp_path):
    """`assign.bits` reaches the adaptive allocator: epoch 0's rows at that width."""
    cfg = make_config(*SMALL, "assign=adaptive", "assign.bits=2", "trainer.epochs=1")
    launch(cfg, tmp_path)
    _, summary = read_run(tmp_path)
    hist = summary["bits_histogram"]
    # (layer 0's input halo is exchanged once, in epoch 0, at full precision)
    assert {k: set(v) for k, v in hist.items() if not k.startswith("input")} == {
        key: {"2"} for key in ("forward 1", "backward 1", "forward 2", "backward 2")}


@pytest.mark.parametrize("share", [1.7, np.array([2.0, 1.0])])
def test_codec_costs_recover_the_per_row_and_per_element_costs(share):
    """From measurements made of known costs: the fixed bucket cost comes
    off, `share` (one factor, or encode's and decode's) scales the measured
    seconds to the exchange's."""
    fixed = np.array([2e-4, 1e-4])
    truth = {2: ((3e-8, 2e-9), (1e-8, 6e-10)), 8: ((5e-8, 1e-9), (2e-8, 4e-10))}
    per = {bits: {width: np.array([
        (fixed[k] + (CODEC_ELEMENTS // width) * (row + element * width))
        / np.broadcast_to(share, 2)[k] for k, (row, element) in enumerate(costs)])
        for width in (16, 256)} for bits, costs in truth.items()}
    enc, dec = codec_costs(fixed, per, share)
    for bits, (e, d) in truth.items():
        assert enc[bits] == pytest.approx(e, rel=1e-9)
        assert dec[bits] == pytest.approx(d, rel=1e-9)


@pytest.mark.parametrize("by_bits", [
    {2: (3e-4, 1e-4), 4: (3e-4, 1e-4), 8: (3e-4, 1e-4)},
    # the slowest bit width sets each direction's cost, whichever that is
    {2: (3e-4, 1e-4), 4: (5e-4, 0.5e-4), 8: (2e-4, 2e-4)},
])
def test_a_buckets_fixed_cost_is_its_fastest_repetition(monkeypatch, by_bits):
    """A repetition pre-empted for a time slice does not count, even when
    most are (a median would read the slice); of the bit widths, the
    slowest encode and the slowest decode count, each on its own."""
    slice_s = 4e-3
    times = [0.0]
    # The bucket measurement at 2, 4 and 8 bits; at each bit width two of every
    # three encodes and two of every three decodes pre-empted, on repetitions
    # that differ from bit width to bit width and between the two directions.
    for shift, bits in enumerate(SUPPORTED_BITS):
        encode, decode = by_bits[bits]
        for rep in range(BUCKET_REPEATS + 1):   # the first warms up
            encoded = times[-1] + encode + (slice_s if (rep + shift) % 3 else 0.0)
            times += [encoded, encoded + decode + (slice_s if (rep + shift + 1) % 3 else 0.0)]
            times.append(times[-1] + 1e-3)
    ticks = iter(times)
    monkeypatch.setattr(cost_model, "device_clock",
                        lambda device: lambda: next(ticks, times[-1] + 1.0))
    _, _, fixed = profile_codec(torch.device("cpu"), widths=(16, 64), repeats=1)
    assert fixed == pytest.approx((max(e for e, _ in by_bits.values()),
                                   max(d for _, d in by_bits.values())), rel=1e-9)


def test_the_encode_is_slowed_by_the_cores_contention_and_the_decode_is_not(monkeypatch):
    """On the CPU the profile reads CPU time and `contention` turns it into
    the exchange's wall time: the encode's and the decode's factors, and the
    bucket's slow-down on its fixed cost, which comes off the measurements."""
    from types import SimpleNamespace

    def ticking(step: float):
        now = [0.0]

        def clock() -> float:
            now[0] += step
            return now[0]
        return clock

    def profile(contention: float):
        # Every wall and CPU reading advances by a fixed step: each measurement
        # reads alike, whatever the machine does meanwhile.
        monkeypatch.setattr(cost_model, "device_clock", lambda device: ticking(2e-4))
        monkeypatch.setattr(cost_model, "time", SimpleNamespace(process_time=ticking(1e-3)))
        return profile_codec(torch.device("cpu"), widths=(16, 64), repeats=1,
                             contention=contention)

    (enc1, dec1, fixed1) = profile((1.0, 1.0, 1.0))
    (enc3, dec3, fixed3) = profile((2.5, 0.5, 2.0))
    assert fixed3 == pytest.approx((2.0 * fixed1[0], fixed1[1]), rel=1e-12)
    for bits, (row, element) in enc1.items():
        assert element > 0 and dec1[bits][1] > 0
        # (CPU time x factor - the scaled bucket) / rows: every reading is 1e-3
        # CPU seconds and 2e-4 wall seconds for the bucket
        ratio = (2.5 * 1e-3 - 2.0 * 2e-4) / (1e-3 - 2e-4)
        assert enc3[bits] == pytest.approx((ratio * row, ratio * element), rel=1e-9)
        dec_ratio = (0.5 * 1e-3 - 2e-4) / (1e-3 - 2e-4)
        assert dec3[bits] == pytest.approx(tuple(dec_ratio * c for c in dec1[bits]), rel=1e-9)


@pytest.mark.parametrize("everyone, slowdown", [
    # 4 workers of 1 thread on one host of 2 cores (the benchmarks' cluster):
    # each gets half a core while all encode
    ([("a", (0, 1), 1)] * 4, (2.0, 1.0, 2.0)),
    # one worker per host
    ([("a", (0, 1), 1), ("b", (0, 1), 1), ("c", (0, 1), 1)], (1.0, 1.0, 1.0)),
    # cores to spare: 2 threads run on 2 cores, 0.5 s of wall per CPU second
    ([("a", tuple(range(8)), 2)] * 2, (0.5, 0.5, 1.0)),
    # 3 workers of 2 threads on 4 cores: 4/3 cores each while all encode
    ([("a", (0, 1, 2, 3), 2)] * 3, (0.75, 0.5, 1.25)),
    # one worker of 3 threads on 2 cores
    ([("a", (0, 1), 3)], (0.5, 0.5, 1.0)),
    # pinned to cores of their own
    ([("a", (0,), 1), ("a", (1,), 1)], (1.0, 1.0, 1.0)),
    # 4 workers of 1 thread in one container limited to 2 CPUs on 8 cores: as on 2 cores
    ([("a", tuple(range(8)), 1, "pod", 2.0)] * 4, (2.0, 1.0, 2.0)),
    # two containers of 2 CPUs each on 64 cores, one worker of 2 threads in each:
    # 4 CPUs for 4 threads
    ([("a", tuple(range(64)), 2, "pod1", 2.0), ("a", tuple(range(64)), 2, "pod2", 2.0)],
     (0.5, 0.5, 1.0)),
    # one thread limited to half a CPU: twice the wall time, even alone
    ([("a", (0, 1), 1, "pod", 0.5)], (2.0, 2.0, 2.0)),
    # a neighbour without a limit can take every core: the cores count
    ([("a", (0, 1), 1, "pod", 1.0), ("a", (0, 1), 1, "other", None)], (1.0, 1.0, 1.0)),
    # ... but a worker's own limit still holds it back, its kernels too
    ([("a", (0, 1), 1, "pod", 0.5), ("a", (0, 1), 1, "other", None)], (2.0, 2.0, 2.0)),
    # a worker of the group that could not read the limit shares its group's
    ([("a", tuple(range(8)), 1, "pod", 2.0)] * 3 + [("a", tuple(range(8)), 1, "pod", None)],
     (2.0, 1.0, 2.0)),
])
def test_coding_slowdown_shares_the_hosts_cpus_among_its_workers_threads(everyone, slowdown):
    everyone = [WorkerCpus(*e) for e in everyone]
    assert coding_slowdown(everyone[0], everyone) == pytest.approx(slowdown, rel=1e-12)


def _core_contention(rank: int, world_size: int) -> tuple[float, float, float]:
    torch.set_num_threads(3)
    return cost_model.core_contention()


def test_core_contention_of_workers_on_this_machine():
    from pyg_adaqp.train.workers import run_workers

    cpus = usable_cpus()       # the cores, at most a CPU limit (both workers share it)
    factors = run_workers(_core_contention, 2, timeout_s=60)
    # 2 workers of 3 threads on this machine's cores
    expect = (1 / min(3, cpus, cpus * 3 / 6), 1 / min(3, cpus),
              max(1.0, 1 / min(1.0, cpus), 4 / cpus))
    for factor in factors:
        assert factor == pytest.approx(expect, rel=1e-12)


def test_codec_profile_encodes_as_the_exchange_does(monkeypatch):
    """The exchange gathers a message's rows from the layer's output, quantizes them and
    copies them into each peer's buffer (SharedRows): the profile times that, not a
    contiguous tensor's pack."""
    from pyg_adaqp.comm import SharedRows

    packed = []

    class Recording(SharedRows):
        def pack(self, x, *args, **kwargs):
            out = super().pack(x, *args, **kwargs)
            (peer, buf), = out.items()
            packed.append((x.size(0), self.layouts[peer].num_rows, buf.numel(),
                           self.layouts[peer].nbytes))
            return out

    monkeypatch.setattr(cost_model, "SharedRows", Recording)
    profile_codec(torch.device("cpu"), widths=(16, 64), repeats=1)
    # every measurement and its warm-up: a bucket's fixed cost at 3 bit widths
    # (BUCKET_REPEATS each), then 3 bit widths x 2 feature widths (1 repeat each)
    assert len(packed) == 3 * (BUCKET_REPEATS + 1) + 3 * 2 * 2
    assert SOURCE_ROWS_PER_ROW > 1                        # the rows are gathered
    for source_rows, rows, nbytes, expected in packed:
        assert source_rows == SOURCE_ROWS_PER_ROW * rows and nbytes == expected


def test_adaptive_with_one_worker(tmp_path):
    cfg = make_config(*SMALL, "assign=adaptive", "assign.cycle=1", "trainer.epochs=2",
                      "world_size=1")
    launch(cfg, tmp_path)
    rows, _ = read_run(tmp_path)
    assert len(rows) == 2 and rows[0]["bytes_sent"] == 0


def test_forward_scores_are_sums_of_squared_gcn_weights():
    """s(u) = sum of a_vu^2 over u's edges into the receiver, from the whole graph."""
    from functools import partial

    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    from graphs import random_directed_graph
    from pyg_adaqp.assign.adaptive import _forward_scores
    from pyg_adaqp.nn import DistGraph, dist_gcn_norm
    from pyg_adaqp.partition import partition_graph

    data = random_directed_graph(num_nodes=150, num_edges=900, seed=5)
    parts = partition_graph(data, 3)
    edge_index, norm = gcn_norm(data.edge_index, data.edge_weight, data.num_nodes)
    owner = torch.empty(data.num_nodes, dtype=torch.long)
    for lg in parts:
        owner[lg.owned_ids] = lg.rank
    for receiver in parts:
        # The exchange is never used here: scores need only the adjacency.
        graph = DistGraph(receiver, exchange=object())
        graph.layer_adjacency[0] = graph.adjacency(("gcn",), partial(dist_gcn_norm),
                                                   torch.float32)
        scores = _forward_scores(graph)[0]
        for sender in parts:
            if receiver.rank not in sender.send_index:
                continue
            sent = sender.node_ids[sender.send_index[receiver.rank]]
            into = owner[edge_index[1]] == receiver.rank
            expect = torch.zeros(data.num_nodes, dtype=torch.float64).index_add_(
                0, edge_index[0][into], norm[into].double().square())[sent]
            np.testing.assert_allclose(scores[sender.rank], expect.numpy(), rtol=1e-5)


def _by_pair(record: dict[str, float]) -> dict[tuple[int, int], float]:
    """A profile record's ``{"i,j": value}`` keyed by ``(i, j)``."""
    return {tuple(map(int, pair.split(","))): v for pair, v in record.items()}


def _profile(rank: int, world_size: int) -> tuple[dict, dict]:
    from pyg_adaqp.assign import profile_cost_model
    from pyg_adaqp.comm.transport import Transport

    record = {}
    return profile_cost_model(Transport(), "cpu", record=record).state_dict(), record


def _known_codec_and_links(cm, world_size: int) -> None:
    """In a spawned worker: the profile's codec and link parts replaced by
    known figures (worker i's uplink ``1e-8 * (i + 1)`` s/B)."""
    cm.profile_codec = lambda device, barrier, contention: (
        {2: (1e-6, 1e-8)}, {2: (1e-7, 1e-9)}, (1e-4, 5e-5))
    cm.profile_links = lambda transport, device, one_clock, repeats, record, load: {
        i: (1e-8 * (i + 1), 2e-8, 1e-3, 0.0) for i in range(world_size)}


def _profile_of_known_parts(rank: int, world_size: int) -> dict:
    """The profile with its measurements replaced by known ones."""
    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.comm.transport import Transport

    _known_codec_and_links(cm, world_size)
    cm.time_loaded_exchange = lambda transport, device, plan, together: 0.25 + 0.01 * rank
    return cm.profile_cost_model(Transport(), "cpu").state_dict()


def _loaded_exchange_starts(rank: int, world_size: int, one_host: bool) -> tuple[int, int]:
    """How many of the loaded exchange's starts (its warm-up and repetitions)
    were common starts, and how many exchanges it posted, in a profile whose
    codec and link parts are stand-ins; without `one_host`, each worker tells
    a host id of its own."""
    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.comm.transport import Transport

    _known_codec_and_links(cm, world_size)
    if not one_host:
        cm.host_id = lambda: f"host {rank}"
    together, posted = [], []
    start_together = cm.start_together
    cm.start_together = lambda *args: together.append(1) or start_together(*args)
    _record_starts(lambda transport, send, device: posted.append(1))
    cm.profile_cost_model(Transport(), "cpu")
    return len(together), len(posted)


@pytest.mark.parametrize("one_host", [True, False])
def test_the_loaded_exchange_starts_together_where_the_workers_share_a_clock(one_host):
    """As the link rounds: at one common time on one host, else out of a barrier."""
    from pyg_adaqp.train.workers import run_workers

    for together, posted in run_workers(_loaded_exchange_starts, 2, one_host, timeout_s=60):
        assert posted == LATENCY_REPEATS + 1
        assert together == (posted if one_host else 0)


def test_profile_keeps_beta_and_adds_the_slowest_workers_excess_as_the_loaded_latency():
    from pyg_adaqp.train.workers import run_workers

    states = run_workers(_profile_of_known_parts, 2, timeout_s=60)
    assert states[0] == states[1]
    cost = CostModel.from_state_dict(states[0])
    assert cost.beta == {0: 1e-3, 1: 1e-3}                 # the link rounds' own
    unloaded = CostModel.from_state_dict({**states[0], "loaded_latency": 0.0})
    predicted, _ = assignment_seconds(unloaded, CODEC_WIDTHS[0], latency_plan(2))
    assert 0 < predicted < 0.25
    assert cost.loaded_latency == pytest.approx(0.26 - predicted)   # worker 1 took 0.26 s


def test_profile_measures_every_worker_both_ways():
    from pyg_adaqp.assign.cost_model import link_scales
    from pyg_adaqp.train.workers import run_workers

    profiles = run_workers(_profile, 2, timeout_s=60)
    # Every worker holds the whole model and record, and the seconds of its own parts.
    took = [record.pop("took_s") for _, record in profiles]
    assert all(set(t) == {"codec", "warm_up", "owner_rounds", "all_links", "loaded_exchange"}
               and min(t.values()) > 0 for t in took)
    assert profiles[0] == profiles[1]
    state, record = profiles[0]
    cost = CostModel.from_state_dict(state)
    # The record holds every link measurement the model is made of: replayed, it gives the model.
    for i, points in record["points"].items():
        up, down = (fit_link(*map(np.array, zip(*points[d]))) for d in ("up", "down"))
        assert record["fits"][i] == pytest.approx(
            [up[0], down[0], min(up[1], down[1]), min(up[2], down[2])])
    arrived = _by_pair(record["arrived"])
    assert set(arrived) == {(0, 1), (1, 0)}
    assert [len(rounds) for rounds in record["warm_ups_s"]] == [WARM_UP_ROUNDS] * 2
    assert record["warm_up_s"] == max(min(rounds) for rounds in record["warm_ups_s"]) > 0
    carried = _by_pair(record["carried"])
    assert set(carried.values()) == {record["all_links_bytes"]}   # 2 workers: one peer each
    scales = link_scales(record["fits"], arrived, carried)
    for i, (up, down, beta, free) in record["fits"].items():
        assert (cost.up[i], cost.down[i]) == pytest.approx((up * scales[i][0],
                                                            down * scales[i][1]))
        assert (cost.beta[i], cost.free[i]) == (beta, free)
    unloaded = CostModel.from_state_dict({**state, "loaded_latency": 0.0})
    assert cost.loaded_latency == pytest.approx(
        excess_latency(unloaded, latency_plan(2), record["loaded_exchange_s"]))
    # Loopback moves bytes as memory copies, so a rate may come out as
    # unmeasurably fast (0 s/B); what matters is that every piece is there.
    for i in (0, 1):
        assert min(cost.up[i], cost.down[i], cost.beta[i], cost.free[i]) >= 0
        for table, encoding in ((cost.encode, True), (cost.decode, False)):
            assert set(table[i]) == {2, 4, 8}
            assert all(row >= 0 and element >= 0 for row, element in table[i].values())
            assert all(cost.codec_seconds(i, 1000, 256, b, encoding) > 0 for b in (2, 4, 8))
        assert len(cost.bucket[i]) == 2 and min(cost.bucket[i]) > 0   # encode, decode


def _fair_share_finish(flows: dict[tuple[int, int], float], up: list[float],
                       down: list[float]) -> dict[tuple[int, int], float]:
    """Seconds until each flow ``(src, dst): bytes`` is done when every flow
    starts at once and each host's uplink and downlink (bytes per second)
    share max-min fairly (water filling, re-shared as flows finish)."""
    left, done, now = dict(flows), {}, 0.0
    while left:
        # A link is (0, host) up or (1, host) down; a flow (src, dst) uses (0, src) and (1, dst).
        cap = {**{(0, h): c for h, c in enumerate(up)}, **{(1, h): c for h, c in enumerate(down)}}
        rate: dict[tuple[int, int], float] = {}
        while len(rate) < len(left):
            users = {link: [f for f in left if f not in rate and f[link[0]] == link[1]]
                     for link in cap}
            link = min((link for link in cap if users[link]),
                       key=lambda link: cap[link] / len(users[link]))
            share = cap[link] / len(users[link])
            for f in users[link]:
                rate[f] = share
                cap[(0, f[0])] -= share
                cap[(1, f[1])] -= share
        step = min(left[f] / rate[f] for f in left)
        now += step
        for f in list(left):
            left[f] -= rate[f] * step
            if left[f] <= 1e-6 * flows[f]:
                done[f] = now
                del left[f]
    return done


class _FluidLinks:
    """A transport whose exchanges take what :func:`_fair_share_finish` says
    for the flows every worker posts at once (collective), plus `latency_s`,
    on a clock of their own on which every round starts at 0 (the profile's
    ``start_round`` replaced); nothing is sent."""

    def __init__(self, up: list[float], down: list[float], latency_s: float):
        self.rank, self.world_size, self.group = dist.get_rank(), dist.get_world_size(), None
        self.up, self.down, self.latency_s = up, down, latency_s

    def start(self, send, recv_bytes, device):
        posted = [None] * self.world_size
        dist.all_gather_object(posted, {p: b.numel() for p, b in send.items()})
        finish = _fair_share_finish({(i, p): float(n) for i, out in enumerate(posted)
                                     for p, n in out.items()}, self.up, self.down)
        arrived = {p: self.latency_s + finish[(p, self.rank)] for p in recv_bytes}
        return SimpleNamespace(wait=lambda: None, arrived=arrived)


def _links_beside_a_slow_host(rank: int, world_size: int, rates: list[float]) -> tuple:
    from pyg_adaqp.assign import cost_model as cm

    cm.start_round = lambda group, device, together: 0.0     # _FluidLinks' clock
    record = {}
    links = cm.profile_links(_FluidLinks(rates, rates, 1e-4), torch.device("cpu"), True,
                             record=record)
    return links, record


def test_owner_rounds_read_fast_links_at_their_rate_beside_a_slow_host():
    """Three 1 Gbit/s hosts and one 100 Mbit/s host on fair-shared links: the
    slow host sits out the fast hosts' rounds (its third of a fast owner's
    bytes would cross its link alone, and time it: the fast links read ~3x
    too slow), and every link is fitted at its own rate."""
    from pyg_adaqp.assign.cost_model import PROFILE_BYTES
    from pyg_adaqp.train.workers import run_workers

    rates = [1e9 / 8, 1e9 / 8, 1e9 / 8, 1e8 / 8]
    (links, record), *_ = run_workers(_links_beside_a_slow_host, 4, rates, timeout_s=60)
    assert record["held"] == {0: [3], 1: [3], 2: [3], 3: []}
    model = CostModel(*({i: link[f] for i, link in links.items()} for f in range(4)))
    for i, rate in enumerate(rates):
        assert links[i][:2] == pytest.approx((1 / rate, 1 / rate), rel=0.02)
        for size in (64 << 10, 512 << 10):      # the link's time, latency included
            assert model.link_seconds(i, size, size) == pytest.approx(1e-4 + size / rate,
                                                                      rel=0.05)
    # The fast hosts' rounds, among fast links, carry four times the largest
    # size; the slow host's half the largest size.
    assert [b for b, _ in record["points"][0]["down"]][0] == pytest.approx(
        4 * PROFILE_BYTES[0], abs=2)
    assert [b for b, _ in record["points"][3]["down"]][0] == pytest.approx(
        PROFILE_BYTES[0] // 2, abs=3)


def test_peers_whose_own_round_took_much_longer_held_an_owners_round():
    from pyg_adaqp.assign.cost_model import PEER_BOUND, group_warm_up, held_peers

    # Worker 3's link is slow: its round carried all of its bytes (21 ms),
    # the others' a third of theirs through it (7 ms).
    assert held_peers([0.007, 0.007, 0.007, 0.021]) == {0: [3], 1: [3], 2: [3], 3: []}
    # Within the bound (even links with noise): nobody held.
    assert held_peers([0.017, 0.020, PEER_BOUND * 0.017, 0.019]) == {i: [] for i in range(4)}
    # Two slow hosts hold both fast owners' rounds.
    assert held_peers([0.007, 0.021, 0.007, 0.021]) == {0: [1, 3], 1: [], 2: [1, 3], 3: []}
    # Every peer slower: the owner keeps them all, or its link is timed with no one.
    assert held_peers([0.001, 0.020, 0.020]) == {0: [], 1: [], 2: []}
    # The slowest worker's time to hear from the rest of a group, in its
    # fastest round (not each pair's fastest: worker 0 heard 1 early in one
    # round and 2 early in the other, but each round's last at 10 ms).
    pairs = {(i, j): 0.020 if 3 in (i, j) else 0.002 for i in range(4) for j in range(4) if i != j}
    rounds = [{**pairs, (0, 2): 0.010}, {**pairs, (0, 1): 0.010}]
    assert group_warm_up(rounds, [0, 1, 2]) == 0.010
    assert group_warm_up(rounds, [1, 2]) == 0.002
    assert group_warm_up(rounds, [0, 1, 2, 3]) == 0.020


def _record_starts(record) -> None:
    """In a spawned worker: every ``Transport.start`` first calls
    ``record(transport, send, device)`` (which may also hold the start back)."""
    from pyg_adaqp.comm.transport import Transport

    start = Transport.start

    def recording(self, send, recv_bytes, device):
        record(self, send, device)
        return start(self, send, recv_bytes, device)

    Transport.start = recording


def _profile_through_the_exchange(rank: int, world_size: int, parts) -> list:
    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.nn import DistGraph

    cm.FAST_WITHIN_S = 1e9      # fast links: the 4x round too (every round starts together)
    graph = DistGraph(parts[rank], quantize=True)
    ours = graph.exchange.transport
    seen = []
    _record_starts(lambda transport, send, device: seen.append(
        (transport is ours, device, sorted({str(b.device) for b in send.values()}))))
    AdaptiveBits().setup(graph)
    return seen


def _setup_with_the_input(rank: int, world_size: int, parts, round_bytes: int) -> tuple:
    """The allocator's set-up given the input features, with the round of
    dummy bytes sized `round_bytes` each way (a stand-in for
    :func:`all_links_bytes`): the input's columns exchanged in it (0:
    none; as its record and the run's report say), and what the record
    says the round carried."""
    from pyg_adaqp.assign import adaptive
    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.nn import DistGraph

    cm.all_links_bytes = lambda largest, slow, fits: round_bytes
    records = []
    profile = adaptive.profile_cost_model
    adaptive.profile_cost_model = lambda *args, **kw: records.append(kw["record"]) or profile(
        *args, **kw)
    graph = DistGraph(parts[rank], quantize=True)
    allocator = AdaptiveBits()
    allocator.setup(graph, parts[rank].x)
    record, = records
    taken = graph._prefetched[2].size(1) if graph._prefetched is not None else 0
    assert allocator.report()["setup_input_columns"] == record["load_columns"] == taken
    return taken, record["all_links_bytes"], record["carried"]


@pytest.mark.parametrize("round_bytes", [1, 32 << 10, 4 << 20])
def test_the_set_up_times_the_inputs_first_columns_where_they_load_the_links_enough(
        cora, round_bytes):
    """Given the input, the set-up's all-links round exchanges the fewest of
    the input cache's first columns that load every link at least as much
    as the round would (they then wait for layer 0), else dummy bytes
    (more than the first block's 128 columns would take)."""
    from pyg_adaqp.partition import partition_graph
    from pyg_adaqp.train.workers import run_workers

    parts = partition_graph(cora, 2)
    rows = {(i, j): parts[j].send_index[i].numel() for i, j in ((0, 1), (1, 0))}
    columns = -(-round_bytes // (4 * min(rows.values())))    # float32 columns
    assert (columns == 1) == (round_bytes == 1) and (columns <= 128) == (round_bytes < 4 << 20)
    for rank, (taken, dummy, carried) in enumerate(
            run_workers(_setup_with_the_input, 2, parts, round_bytes, timeout_s=60)):
        if columns <= 128:
            assert taken == columns and dummy is None
            assert carried == {f"{i},{j}": 4 * columns * n for (i, j), n in rows.items()}
        else:
            assert taken == 0 and dummy == round_bytes
            assert set(carried.values()) == {round_bytes}


def test_profile_sizes_halve_the_largest_transfer_on_slow_links_and_add_4x_on_fast_ones():
    sizes = (512 << 10, 128 << 10, 32 << 10, 8 << 10)
    # The slowest link's warm-up time at which the largest would take exactly the limit.
    edge = LARGEST_WITHIN_S * WARM_UP_BYTES / sizes[0]
    fast = FAST_WITHIN_S * WARM_UP_BYTES / sizes[0]
    assert not slow_links(sizes[0], edge) and slow_links(sizes[0], 1.01 * edge)
    assert fast_links(sizes[0], 0.99 * fast) and not fast_links(sizes[0], fast)
    assert profile_sizes(sizes, 0.0) == profile_sizes(sizes, 0.99 * fast) == (2 << 20, *sizes)
    # One limit parts slow links from fast ones: at it, neither rule applies.
    assert LARGEST_WITHIN_S == FAST_WITHIN_S and edge == fast
    assert profile_sizes(sizes, edge) == sizes
    assert profile_sizes(sizes, 1.01 * edge) == (256 << 10, 128 << 10, 32 << 10, 8 << 10)
    # Never below the next size, and one size has nothing to halve toward.
    assert profile_sizes((160 << 10, 128 << 10), 1.0) == (128 << 10, 128 << 10)
    assert profile_sizes((512 << 10,), 1.0) == (512 << 10,)


def test_all_links_round_grows_only_on_slow_even_links():
    mbit_100 = 8 / 100e6                      # seconds per byte
    even = {i: [mbit_100, 1.1 * mbit_100, 1e-3, 0.0] for i in range(4)}
    # One host 10x slower than the others (its up and down rate).
    uneven = {**{i: [mbit_100 / 10, mbit_100 / 10, 1e-3, 0.0] for i in range(3)}, 3: even[3]}
    edge = {0: [mbit_100, mbit_100, 0.0, 0.0], 1: [EVEN_WITHIN * mbit_100, mbit_100, 0.0, 0.0]}
    assert all_links_bytes(512 << 10, True, even) == EVEN_ALL_LINKS * (512 << 10) == 2 << 20
    assert all_links_bytes(512 << 10, True, edge) == 2 << 20
    assert all_links_bytes(512 << 10, True, uneven) == 512 << 10
    assert all_links_bytes(512 << 10, False, even) == 512 << 10
    # A rate the fit left at 0 (noise) is not a link 'infinitely fast'; with
    # no rate left the links count as uneven.
    zero = [0.0, 0.0, 0.0, 0.0]
    assert all_links_bytes(512 << 10, True, {**even, 2: zero}) == 2 << 20
    assert all_links_bytes(512 << 10, True, {i: zero for i in range(4)}) == 512 << 10


def _owner_round_sizes(rank: int, world_size: int, slow_rank: int, doubling: set[int],
                       fast: bool, one_host: bool = True) -> tuple[list[int], int]:
    """The per-peer bytes of every link-profile exchange this worker posts,
    with `slow_rank`'s warm-ups sent 0.5 s late (a slow link), and
    :func:`all_links_bytes` replaced by a stand-in that doubles the round
    on slow links for the ranks in `doubling` (what the fits say, and the
    real factor, are tested on their own), and how many
    rounds started together.  The slow limit is raised to 0.5 s, so that
    loopback on a busy machine is not expected to read as slow; with
    `fast`, the fast limit lets loopback read as fast unless a link is slow;
    without `one_host`, each worker tells a host id of its own."""
    import time as clock

    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.assign.cost_model import profile_links
    from pyg_adaqp.comm.transport import Transport

    cm.LARGEST_WITHIN_S = 0.5
    # Fast: any warm-up under 0.45 s (a slow one takes over 0.5), so only the
    # slow link's sleep, not the machine's load, tells the cases apart.
    cm.FAST_WITHIN_S = 0.9 if fast else 0.0
    cm.all_links_bytes = lambda largest, slow, fits: (
        2 * largest if slow and rank in doubling else largest)
    if not one_host:
        cm.host_id = lambda: f"host {rank}"
    together = []
    start_together = cm.start_together
    cm.start_together = lambda *args: together.append(1) or start_together(*args)

    sizes = []

    def record(transport, send, device):
        sizes.append(max(b.numel() for b in send.values()))
        if rank == slow_rank and len(sizes) <= WARM_UP_ROUNDS:
            clock.sleep(0.5)     # its bytes reach the peer 0.5 s late in every warm-up

    _record_starts(record)
    profile_links(Transport(), torch.device("cpu"), cm.shares_one_clock())
    return sizes, len(together)


@pytest.mark.parametrize("slow_rank, doubling, fast, doubled", [
    (None, {0, 1}, False, False), (1, {0, 1}, False, True), (1, set(), False, False),
    (1, {1}, False, True),       # the two disagree: both take the larger
    (None, set(), True, False), (1, set(), True, False)])   # fast, unless a link is slow
def test_one_slow_link_sets_every_workers_round_sizes(slow_rank, doubling, fast, doubled):
    """Every worker learns the slowest warm-up alike, and the largest
    all-links size any worker chose, so all post the same sizes (a worker
    posting a size its peers do not would hang the profile): the owner
    rounds' largest halved on a slow link, the all-links round grown
    where a worker's :func:`all_links_bytes` (a stand-in here that
    doubles it) says so, and on fast links
    a transfer 4x the largest added, which the all-links round carries;
    every round after the warm-ups started together (the workers share a
    host)."""
    from pyg_adaqp.train.workers import run_workers

    seen = run_workers(_owner_round_sizes, 2, slow_rank, doubling, fast, timeout_s=60)
    assert seen[0] == seen[1]
    sizes, together = seen[0]
    fast = fast and slow_rank is None
    owner = ((4 * PROFILE_BYTES[0], *PROFILE_BYTES) if fast else
             (PROFILE_BYTES[0] // 2 if slow_rank is not None else PROFILE_BYTES[0],
              *PROFILE_BYTES[1:]))
    all_links = 2 * PROFILE_BYTES[0] if doubled else owner[0] if fast else PROFILE_BYTES[0]
    # warm-ups, each owner's rounds (2 workers: each peer gets the whole size), all links
    assert sizes == [*[WARM_UP_BYTES] * WARM_UP_ROUNDS, *owner, *owner, all_links]
    assert together == len(sizes) - WARM_UP_ROUNDS


@pytest.mark.parametrize("fast", [False, True])
def test_link_rounds_leave_a_barrier_where_workers_are_on_different_hosts(fast):
    """Workers on different hosts share no clock to start at: every round
    starts as each worker leaves a barrier (the sizes as on one host)."""
    from pyg_adaqp.train.workers import run_workers

    seen = run_workers(_owner_round_sizes, 2, None, set(), fast, False, timeout_s=60)
    assert seen[0] == seen[1]
    sizes, together = seen[0]
    owner = (4 * PROFILE_BYTES[0], *PROFILE_BYTES) if fast else PROFILE_BYTES
    assert sizes == [*[WARM_UP_BYTES] * WARM_UP_ROUNDS, *owner, *owner, owner[0]]
    assert together == 0


def test_clock_domain_tells_time_namespaces_on_one_host_apart(monkeypatch):
    """Containers on one machine share its boot id but may shift their
    monotonic clock (a time namespace): they must not start rounds at one
    reading of it."""
    from pyg_adaqp.assign import cost_model as cm

    monkeypatch.setattr(cm, "host_id", lambda: "boot")
    monkeypatch.setattr(cm.os, "readlink", lambda path: "time:[1]")
    first = cm.clock_domain()
    monkeypatch.setattr(cm.os, "readlink", lambda path: "time:[2]")
    assert cm.clock_domain() != first and first == "boot time:[1]"

    def no_namespace(path):
        raise OSError("no time namespaces")

    monkeypatch.setattr(cm.os, "readlink", no_namespace)
    assert cm.clock_domain() == "boot "


def _start_together(rank: int, world_size: int, readings: list) -> tuple[tuple, list]:
    """`start_together` on a recorded clock: this rank's `readings[rank]`
    are what its clock reads, in turn (when it arrived, then when it
    learnt the start); returns its result and the waits it asked for."""
    from pyg_adaqp.comm.transport import Transport

    clock, waits = iter(readings[rank]), []
    return cost_model.start_together(Transport().group, torch.device("cpu"), 0.5,
                                     clock=lambda: next(clock), sleep=waits.append), waits


def test_workers_on_one_host_start_together_after_the_last_arrives():
    from pyg_adaqp.train.workers import run_workers

    readings = [[10.0, 10.9], [10.3, 10.4]]       # rank 1 arrives last
    got = run_workers(_start_together, 2, readings, timeout_s=60)
    for rank, ((start, arrived, missed), waits) in enumerate(got):
        # the last arrival plus the margin, waited for from when each learnt it
        assert start == pytest.approx(10.8) and arrived == readings[rank][0]
        assert waits == [pytest.approx(max(0.0, 10.8 - readings[rank][1]))]
        # rank 0 learnt it only after it had passed
        assert missed == pytest.approx(max(0.0, readings[rank][1] - 10.8))


def test_profile_goes_through_the_exchanges_own_transport_and_device():
    """On NCCL a CPU tensor handed to the device transport fails: the profile must use
    the exchange's transport (its process group) and its device for every buffer."""
    from pyg_adaqp.data import synthetic_graph
    from pyg_adaqp.partition import partition_graph
    from pyg_adaqp.train.workers import run_workers

    parts = partition_graph(synthetic_graph(num_nodes=300, avg_degree=6, num_features=8), 2)
    for seen in run_workers(_profile_through_the_exchange, 2, parts, timeout_s=60):
        # every link round went through it: the warm-ups, each worker's round at
        # each size (fast links: one more), the all-links round (one timed
        # exchange each by default), then the loaded-latency exchange (a
        # warm-up and its repetitions)
        assert len(seen) == (WARM_UP_ROUNDS + 2 * (len(PROFILE_BYTES) + 1) + 1 + 1
                             + LATENCY_REPEATS)
        assert all(same and device == torch.device("cpu") and buffers in ([], ["cpu"])
                   for same, device, buffers in seen)


def test_device_clock_waits_for_the_current_cuda_stream(monkeypatch):
    """CUDA timings mean something only after the queued kernels ran: the clock is read
    after the wait on the device's current stream (recorded events, no real clock)."""
    from pyg_adaqp.comm.clock import device_clock

    events = []

    class Stream:
        def synchronize(self):
            events.append("wait")

    def current_stream(device):
        events.append(("stream of", device))
        return Stream()

    def read():
        events.append("read")
        return 0.0

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    device_clock("cpu", read)()
    assert events == ["read"]                       # CPU: nothing to wait for
    events.clear()
    device_clock("cuda:0", read)()
    assert events == [("stream of", torch.device("cuda", 0)), "wait", "read"]
    events.clear()
    monkeypatch.setenv("PYG_ADAQP_SYNC_TIMINGS", "0")  # to measure what the waits cost
    device_clock("cuda:0", read)()
    assert events == ["read"]


def test_a_reassignment_that_keeps_every_channels_one_width_is_not_told():
    """Rank 0 flags a solve whose channels all keep the one width they were
    installed with; a mixed channel, or a changed width, is told in full."""
    rng = np.random.default_rng(0)
    allocator = AdaptiveBits(group_size=10, variance_budget=1e6, gradient_budget=1e6,
                             time_limit=10.0)
    allocator.cost = CostModel({i: 8e-8 for i in range(2)}, {i: 8e-8 for i in range(2)})
    coef, rows, _ = group_messages(rng.lognormal(0, 1, 95), 10)

    def solve(budget: float) -> list[bool]:
        allocator.variance_budget = allocator.gradient_budget = budget
        parts = allocator._solve(_forward_parts(coef, rows))
        # Every row at 2 bits (the least budget-bound width) or not, alike for all ranks.
        assert {p[3] for p in parts} == {allocator.histogram["forward 1"][2] == 190}
        return [unchanged for _, _, unchanged, _ in parts]

    assert solve(1e6) == [False, False]      # the first: every row at 2 bits, told
    assert solve(1e6) == [True, True]        # the same one width on every channel
    assert allocator.history[-1]["unchanged"] and allocator.histogram["forward 1"][2] == 190
    assert solve(1e-4) == [False, False]     # mixed widths
    assert set(allocator.histogram["forward 1"].values()) != {0, 190}
    assert None in allocator._installed.values()
    assert solve(1e-4) == [False, False]     # mixed again: always told
    assert solve(1e6) == [False, False]      # back to 2 bits: told once
    assert solve(1e6) == [True, True]


def test_a_resume_or_a_new_exchange_forgets_the_installed_widths():
    """Rank 0's record of each channel's installed width is not trusted after a
    resume or on another exchange: the next re-assignment tells and installs in full."""
    from types import SimpleNamespace

    allocator = AdaptiveBits()
    allocator._installed = {("forward 1", 0, 1): 2}
    allocator.load_state_dict(AdaptiveBits().state_dict())
    assert allocator._installed == {}
    graph = SimpleNamespace(exchange=SimpleNamespace(default_bits=None))
    allocator._attach(graph)
    allocator._installed = {("forward 1", 0, 1): 2}
    allocator._attach(graph)                      # the same exchange: kept
    assert allocator._installed == {("forward 1", 0, 1): 2}
    allocator._attach(SimpleNamespace(exchange=SimpleNamespace(default_bits=None)))
    assert allocator._installed == {}


def test_reassignment_sends_each_sender_one_uint8_per_group_of_its_own():
    """Rank 0 gets group sums only, and returns each sender its own groups' widths,
    each key's within its own direction's budget."""
    rng = np.random.default_rng(0)
    allocator = AdaptiveBits(group_size=10, variance_budget=0.02, gradient_budget=0.08)
    allocator.cost = CostModel({i: 8e-8 for i in range(3)}, {i: 8e-8 for i in range(3)})
    gathered = []
    for i in range(3):
        groups = {}
        for key in ("forward 1", "backward 1"):
            for j in range(3):
                if j != i:
                    coef, rows, _ = group_messages(rng.lognormal(0, 1, 95), 10)
                    groups.setdefault(key, {})[j] = (coef, rows)
        gathered.append({"groups": groups, "signal": {"forward 1": 50.0, "backward 1": 50.0},
                         "widths": {"forward 1": 32, "backward 1": 32}, "observed": {},
                         "arrivals": [], "overlap": True})
    parts = allocator._solve(gathered)
    assert len(parts) == 3
    assert len({part[3] for part in parts}) == 1              # every rank learns alike
    for i, (keys, mine, unchanged, narrowest) in enumerate(parts):
        assert keys == ["backward 1", "forward 1"]
        assert not unchanged                                  # the first assignment
        assert narrowest == all(allocator.histogram[k][4] + allocator.histogram[k][8] == 0
                                for k in keys)
        for key in keys:
            assert sorted(mine[key]) == [j for j in range(3) if j != i]   # its own channels
            for widths in mine[key].values():
                assert widths.dtype == np.uint8 and widths.shape == (10,)  # one per group
                assert set(widths.tolist()) <= {2, 4, 8}
    forward, backward = (allocator.solve_info[key] for key in ("forward 1", "backward 1"))
    # Uniform 2 bits would exceed both budgets: the fastest widths fill each its own.
    assert min(forward["noise_uniform"][2], backward["noise_uniform"][2]) > 0.08
    assert forward["noise"] <= 0.02 * (1 + 1e-6)
    assert 0.02 < backward["noise"] <= 0.08 * (1 + 1e-6)


def _link_parts(groups: list, keys: tuple, epochs: list) -> list[dict]:
    """What 3 workers give rank 0 at a re-assignment: their groups and one epoch's
    arrivals per entry of `epochs`, each the slow host of that epoch (or None).
    Predicted arrival: 8e-8 s/B x 2e5 B each way = 16 ms; measured 20 ms, or
    200 ms on the pairs with the slow host."""
    parts = []
    for i in range(3):
        peers = [j for j in range(3) if j != i]
        arrivals = [{key: {"sent": {j: 1e5 for j in peers}, "recv": {j: 1e5 for j in peers},
                           "arrival": {j: 0.2 if slow in (i, j) else 0.02 for j in peers}}
                     for key in keys} for slow in epochs]
        parts.append({"groups": groups[i], "signal": {key: 50.0 for key in keys},
                      "widths": {key: 32 for key in keys},
                      "observed": {key: {"hidden": 0.0, "measured": 0.02} for key in keys},
                      "arrivals": arrivals, "overlap": True})
    return parts


def _slow_link_allocator() -> tuple[AdaptiveBits, list, tuple]:
    rng = np.random.default_rng(0)
    allocator = AdaptiveBits(group_size=10, variance_budget=0.05, gradient_budget=None)
    allocator.cost = CostModel({i: 8e-8 for i in range(3)}, {i: 8e-8 for i in range(3)})
    keys = ("forward 1", "backward 1")
    groups = [{key: {j: group_messages(rng.lognormal(0, 1, 95), 10)[:2]
                     for j in range(3) if j != i} for key in keys} for i in range(3)]
    return allocator, groups, keys


def test_a_link_that_slows_down_moves_its_channels_to_lower_widths():
    """Arrivals 10x slower on every pair of host 2 in every epoch of a cycle (no
    added traffic): its up- and downlink count 10x slower, its channels get
    fewer bits, and they come back when its link recovers; the others' links
    are not charged."""
    allocator, groups, keys = _slow_link_allocator()
    for epoch, slow_host in enumerate((None, 2, None)):
        allocator._epoch = epoch
        allocator._solve(_link_parts(groups, keys, [slow_host] * 3))
    before, slow, after = allocator.history
    assert before["link_slowdown"] == after["link_slowdown"] == {i: [1.0, 1.0] for i in range(3)}
    assert slow["link_slowdown"][2] == pytest.approx([10.0, 10.0])
    assert slow["link_slowdown"][0] == slow["link_slowdown"][1] == [1.0, 1.0]
    assert after["mean_bits"] == before["mean_bits"]
    via_2 = [c for c in slow["mean_bits"] if "2" in c]
    assert len(via_2) == 4
    for c in via_2:
        assert slow["mean_bits"][c] < before["mean_bits"][c]
    assert max(slow["mean_bits"][c] for c in via_2) < min(
        slow["mean_bits"][c] for c in ("0->1", "1->0"))
    assert [h["epoch"] for h in allocator.history] == [0, 1, 2]


@pytest.mark.parametrize("epochs, slowed", [
    ([None, 2, None, None, None], False),   # one late epoch of five: a pre-empted sender
    ([None, 2, None, 2, None], False),      # two of five
    ([None, 2, 2, None, 2], True),          # most of the cycle: the link is slow
    ([None, 2], False),                     # half of an even count is not most
    ([None, 2, 2, None], False),
    ([2, 2], True),
    ([None, 2, 2, 2], True),
])
def test_a_link_counts_as_slow_only_in_most_epochs_of_the_cycle(epochs, slowed):
    """The slow-down is the median over the cycle's epochs of each pair's
    arrival ratio: a host late in a minority of epochs is not charged (one such
    epoch scaled a whole solve's predictions up to 8x above the exchanges measured)."""
    allocator, groups, keys = _slow_link_allocator()
    allocator._solve(_link_parts(groups, keys, [None] * 5))
    allocator._solve(_link_parts(groups, keys, epochs))
    before, now = allocator.history
    assert before["link_slowdown"] == {i: [1.0, 1.0] for i in range(3)}
    assert now["link_slowdown"][2] == (pytest.approx([10.0, 10.0]) if slowed else [1.0, 1.0])
    assert now["link_slowdown"][0] == now["link_slowdown"][1] == [1.0, 1.0]
    assert (now["mean_bits"] == before["mean_bits"]) is not slowed


def test_observe_keeps_the_arrivals_of_at_most_one_cycle_and_checkpoints_carry_them():
    """The arrivals of every training epoch since the last re-assignment (at
    most a cycle's), without the layer-0 input's; checkpoints carry them."""
    from types import SimpleNamespace

    allocator = AdaptiveBits(cycle=3)
    for epoch in range(5):
        stats = {"forward 1": SimpleNamespace(calls=2, owned_agg_time=0.2, quant_time=0.1,
                                              wait_time=0.1 * epoch, peer_arrival={1: 0.4 * epoch},
                                              peer_sent={1: 100.0}, peer_recv={1: 60.0}),
                 "input 0": SimpleNamespace(calls=1, owned_agg_time=0.0, quant_time=0.0,
                                            wait_time=0.0, peer_arrival={1: 1.0},
                                            peer_sent={1: 1.0}, peer_recv={1: 1.0})}
        allocator.observe(stats)
    assert [a["forward 1"]["arrival"] for a in allocator._arrivals] == [
        {1: pytest.approx(0.2 * e)} for e in (2, 3, 4)]
    assert all(set(a) == {"forward 1"} for a in allocator._arrivals)   # no input key
    assert allocator._arrivals[-1]["forward 1"]["sent"] == {1: 50.0}
    assert allocator._observed == {"forward 1": {"hidden": pytest.approx(0.1),
                                                 "measured": pytest.approx(0.25)}}
    restored = AdaptiveBits(cycle=3)
    restored.load_state_dict(allocator.state_dict())
    assert restored._arrivals == allocator._arrivals


def test_a_resumed_allocator_keeps_its_configured_knobs_and_names_those_that_changed():
    saved = AdaptiveBits(cycle=3, variance_budget=0.05, coe_lambda=0.2, time_limit=1.0)
    saved.assignment = {"forward 0": {"sent": {}}}
    resumed = AdaptiveBits(cycle=7, group_size=50, variance_budget=0.05, coe_lambda=0.9,
                           time_limit=1.0)
    with pytest.warns(UserWarning) as seen:
        resumed.load_state_dict(saved.state_dict())
    assert [str(w.message) for w in seen] == [
        "resuming with the allocator's cycle = 7; the checkpoint's run used 3",
        "resuming with the allocator's group_size = 50; the checkpoint's run used 100",
        "resuming with the allocator's coe_lambda = 0.9; the checkpoint's run used 0.2"]
    assert (resumed.cycle, resumed.group_size, resumed.coe_lambda) == (7, 50, 0.9)
    assert resumed.assignment == saved.assignment   # the state itself is restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # the same knobs: nothing to say
        AdaptiveBits(cycle=3, variance_budget=0.05, coe_lambda=0.2,
                     time_limit=1.0).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="holds no adaptive allocator state .*cycle"):
        AdaptiveBits().load_state_dict({"bits": 4})  # a uniform scheme's


def _even(total: float, fits: dict) -> dict[tuple[int, int], float]:
    """Every pair of `fits`' workers carrying an equal share of `total`, each
    link's bytes each way (as in the round of dummy bytes)."""
    k = len(fits)
    return {(i, j): total / (k - 1) for i in fits for j in fits if i != j}


def test_link_scales_judge_each_direction_by_the_pairs_it_bounds():
    """All links busy: the fast links ran 1.25x slower than fitted, the slow
    host's link as fitted. Each direction of each link keeps its own factor
    (one factor for all would have slowed the fast links by the slow host's
    ratio)."""
    from pyg_adaqp.assign.cost_model import link_scales

    fast, slow, total = 8e-9, 8e-8, 1e6                      # 1 Gbit/s, 100 Mbit/s, bytes
    fits = {i: [fast, fast, 0.0, 0.0] for i in range(3)}
    fits[3] = [slow, slow, 0.0, 0.0]
    seen = {(i, j): (slow if 3 in (i, j) else 1.25 * fast) * total
            for i in range(4) for j in range(4) if i != j}
    scales = link_scales(fits, seen, _even(total, fits))
    assert scales == {i: pytest.approx((1.25, 1.25)) for i in range(3)} | {3: (1.0, 1.0)}
    # A pair bounded by both ends counts for both: (0, 1) for 1's uplink and
    # 0's downlink, (1, 0) for 0's uplink and 1's downlink; faster than
    # fitted never speeds a direction up.
    two = {0: [fast] * 2 + [0.0, 0.0], 1: [fast] * 2 + [0.0, 0.0]}
    seen = {(0, 1): 0.5 * fast * total, (1, 0): 2.0 * fast * total}
    assert link_scales(two, seen, _even(total, two)) == {0: pytest.approx((2.0, 1.0)),
                                             1: pytest.approx((1.0, 2.0))}
    # Worker 0's downlink read 1.5x slow: the pairs into 0 ran faster than
    # that, so it keeps its fit (factor 1), and its uplink gets its own
    # pairs' factor (1.25), not one compounded with the downlink's reading.
    fits = {i: [fast, fast, 0.0, 0.0] for i in range(3)}
    fits[0] = [fast, 1.5 * fast, 0.0, 0.0]
    seen = {(i, j): (1.0 if i == 0 else 1.25) * fast * total
            for i in range(3) for j in range(3) if i != j}
    scales = link_scales(fits, seen, _even(total, fits))
    assert scales[0] == pytest.approx((1.25, 1.0))
    assert scales[1] == scales[2] == pytest.approx((1.25, 1.25))
    # The slowest pair a direction bounds sets its factor: 2's bytes reached 1 late.
    scales = link_scales(fits, {**seen, (1, 2): 2.0 * fast * total}, _even(total, fits))
    assert (scales[2][0], scales[1][1]) == pytest.approx((2.0, 2.0))
    assert (scales[2][1], scales[1][0]) == pytest.approx((1.25, 1.25))
    # A direction no pair is bounded by keeps its fit.
    one_way = {0: [fast, fast, 0.0, 0.0], 1: [slow, slow, 0.0, 0.0]}
    seen = {(0, 1): slow * total, (1, 0): slow * total}
    assert link_scales(one_way, seen, _even(total, one_way)) == {
        0: (1.0, 1.0), 1: pytest.approx((1.0, 1.0))}


def test_link_scales_count_each_links_own_bytes_where_pairs_carry_unequal_ones():
    """A real exchange as the round (:class:`~pyg_adaqp.comm.LinkLoad`):
    each pair carries its own bytes, and a pair is predicted from everything
    its sender's uplink and its receiver's downlink carried (with equal
    pairs, every link's bytes each way are their sum)."""
    from pyg_adaqp.assign.cost_model import link_scales

    rate = 8e-9

    def link(nbytes: float) -> float:       # the fits' time for a link's bytes
        return 1e-4 + rate * nbytes

    fits = {i: [rate, rate, 1e-4, 0.0] for i in range(3)}
    even = {(i, j): 5e5 for i in range(3) for j in range(3) if i != j}
    seen = {pair: 1.5 * link(1e6) for pair in even}
    assert even == _even(1e6, fits) and link_scales(fits, seen, even) == {
        i: pytest.approx((1.5, 1.5)) for i in range(3)}
    # Worker 0 sends 3 MB to 1 and 1 MB to 2; 1 and 2 send 0 and each other
    # 1 MB: 0's uplink carries 4 MB, 1's downlink 4 MB, every other
    # direction 2 MB.  The pairs through a 4 MB direction took twice its
    # time, the rest their links' time.
    carried = {(1, 0): 3e6, (2, 0): 1e6, (0, 1): 1e6, (2, 1): 1e6, (0, 2): 1e6, (1, 2): 1e6}
    took = {(1, 0): 2 * link(4e6), (2, 0): 2 * link(4e6), (1, 2): 2 * link(4e6),
            (0, 1): link(2e6), (2, 1): link(2e6), (0, 2): link(2e6)}
    # (2, 0) is bounded by 0's uplink (4 MB) alone, not by 2's downlink
    # (2 MB): 2 keeps its fit, though that pair took 2x its downlink's time.
    assert link_scales(fits, took, carried) == {0: pytest.approx((2.0, 1.0)),
                                                1: pytest.approx((1.0, 2.0)), 2: (1.0, 1.0)}


def test_an_exchange_is_the_all_links_round_in_the_fewest_columns_that_load_every_link():
    from pyg_adaqp.assign.cost_model import load_columns

    kib = 1 << 10
    even = [({j: kib for j in range(3) if j != i}, 128) for i in range(3)]   # 2 KiB a column
    assert load_columns(even, 2 * kib) == 1
    assert load_columns(even, 200 * kib) == 100
    assert load_columns(even, 2 * kib + 1) == 2     # a part of a column does not go
    assert load_columns(even, 256 * kib) == 128
    assert load_columns(even, 256 * kib + 1) == 0   # more columns than the input has
    # Worker 2 receives a quarter KiB per column from each peer: it sets the count.
    lopsided = [({1: 3 * kib, 2: kib // 4}, 128), ({0: 3 * kib, 2: kib // 4}, 128),
                ({0: kib, 1: kib}, 128)]
    assert load_columns(lopsided, 32 * kib) == 64
    # The fewest columns any worker has bound them; no worker may offer nothing.
    assert load_columns([even[0], (even[1][0], 10), even[2]], 32 * kib) == 0
    assert load_columns([even[0], (even[1][0], 16), even[2]], 32 * kib) == 16
    assert load_columns([even[0], None, even[2]], 1) == 0
    assert load_columns([({}, 128), ({0: kib}, 128)], 1) == 0   # worker 0 sends nothing
    assert load_columns([], 1) == 0


def _links_with_a_load(rank: int, world_size: int, rates: list[float], columns: int,
                       slow_in_load: float) -> tuple:
    """The link profile on :class:`_FluidLinks` with a load of `columns`
    columns of 16 KiB to every peer offered; in the load's exchange every
    link runs `slow_in_load` times slower than in the owner rounds (as with
    every link busy both ways)."""
    from pyg_adaqp.assign import cost_model as cm
    from pyg_adaqp.comm import LinkLoad

    cm.start_round = lambda group, device, together: 0.0     # _FluidLinks' clock
    fluid = _FluidLinks(rates, rates, 1e-4)
    posted, runs = [], []
    start = fluid.start
    fluid.start = lambda send, recv_bytes, device: (
        posted.append(max(b.numel() for b in send.values())) or start(send, recv_bytes, device))
    peers = [p for p in range(world_size) if p != rank]

    column = 16 << 10

    def run(begin, n):
        runs.append((begin(), n))
        slower = [r / slow_in_load for r in rates]
        loaded = _FluidLinks(slower, slower, 1e-4)
        send = {p: torch.empty(n * column, dtype=torch.uint8) for p in peers}
        return loaded.start(send, {p: n * column for p in peers}, None).arrived

    load = LinkLoad({p: column for p in peers}, columns, run)
    record = {}
    links = cm.profile_links(fluid, torch.device("cpu"), True, record=record, load=load)
    return links, record, posted, runs


@pytest.mark.parametrize("columns, slow_in_load", [(128, 1.0), (128, 2.0), (32, 2.0)])
def test_a_load_with_columns_enough_is_the_all_links_round(columns, slow_in_load):
    """Even 1 Gbit/s fluid links (4 workers): a load of 48 KiB a column per
    link each way (16 KiB to each peer) has columns enough for the round's
    2 MiB in 43 of them: those are run once as the all-links round and no
    dummy round is posted; their arrivals scale the links (2x slower in
    them: a factor of 2).  With 32 columns it cannot: the dummy round runs,
    not the load."""
    from pyg_adaqp.train.workers import run_workers

    rates = [1e9 / 8] * 4
    links, record, posted, runs = run_workers(_links_with_a_load, 4, rates, columns,
                                              slow_in_load, timeout_s=60)[0]
    used = columns >= 43
    owner_rounds = WARM_UP_ROUNDS + 4 * 5    # fast links: five sizes per owner
    assert len(posted) == owner_rounds + (0 if used else 1)
    assert runs == ([(0.0, 43)] if used else [])
    carried = _by_pair(record["carried"])
    assert set(carried) == {(i, j) for i in range(4) for j in range(4) if i != j}
    if used:
        assert record["all_links_bytes"] is None
        assert set(carried.values()) == {43 * (16 << 10)} and 3 * 43 * (16 << 10) >= 2 << 20
    else:
        assert record["all_links_bytes"] == 3 * posted[-1] == 3 * set(carried.values()).pop()
    for i in range(4):
        scale = slow_in_load if used else 1.0
        assert links[i][:2] == pytest.approx((8e-9 * scale, 8e-9 * scale), rel=0.03)


def test_fast_links_beside_a_slow_one_are_not_read_faster_than_fitted():
    """Three 1 Gbit/s hosts and one at 100 Mbit/s, every link busy: each fast
    pair carries a third of its links' bytes and is done long before the slow
    peer's bytes (which the slow link bounds) arrive. Those early arrivals
    must not speed the fast links up (a factor of ~1/3 read a 1 Gbit/s link
    at ~3 Gbit/s); the fast pairs that ran slower than fitted still count."""
    from pyg_adaqp.assign.cost_model import link_scales

    fast, slow, total = 8e-9, 8e-8, 1e6
    fits = {i: [fast, fast, 0.0, 0.0] for i in range(3)} | {3: [slow, slow, 0.0, 0.0]}
    seen = {(i, j): (slow * total if 3 in (i, j) else fast * total / 3)
            for i in range(4) for j in range(4) if i != j}
    assert link_scales(fits, seen, _even(total, fits)) == {i: (1.0, 1.0) for i in range(4)}
    seen[(0, 1)] = 1.5 * fast * total          # one fast pair ran slow: its two directions
    scales = link_scales(fits, seen, _even(total, fits))
    assert scales[1][0] == scales[0][1] == pytest.approx(1.5)
    assert scales[1][1] == scales[0][0] == 1.0 and scales[2] == scales[3] == (1.0, 1.0)


def _tell(rank: int, world_size: int) -> tuple[list, dict, dict]:
    from pyg_adaqp.assign.adaptive import _tell_receivers
    from pyg_adaqp.comm.transport import Transport

    peer = 1 - rank
    rows = {"forward 1": 7, "backward 1": 5, "forward 2": 0}
    plan = [(key, {peer: torch.arange(n)}, {peer: torch.arange(n)}) for key, n in rows.items()]
    send = {"forward 1": {peer: torch.full((7,), 2, dtype=torch.uint8)},     # one width
            "backward 1": {peer: torch.tensor([8, 2, 4, 2, 2], dtype=torch.uint8) if rank == 0
                           else torch.full((5,), 4, dtype=torch.uint8)},   # mixed from 0 only
            "forward 2": {peer: torch.zeros(0, dtype=torch.uint8)}}        # an empty channel
    sent = []
    _record_starts(lambda transport, buffers, device: sent.append(
        {p: b.tolist() for p, b in buffers.items()}))
    recv = _tell_receivers(Transport(), torch.device("cpu"), send, plan)
    return sent, send, recv


def test_receivers_get_one_byte_per_channel_of_one_width_and_a_byte_per_row_of_a_mix():
    from pyg_adaqp.assign.adaptive import PER_ROW
    from pyg_adaqp.train.workers import run_workers

    (sent0, send0, recv0), (sent1, send1, recv1) = run_workers(_tell, 2, timeout_s=60)
    for recv, send in ((recv0, send1), (recv1, send0)):   # what each got is what the other sent
        assert {k: {p: b.tolist() for p, b in v.items()} for k, v in recv.items()} == \
            {k: {1 - p: b.tolist() for p, b in v.items()} for k, v in send.items()}
    # A header of one byte per key (plan order), then the rows of the mixed channels only.
    assert sent0 == [{1: [2, PER_ROW, PER_ROW]}, {1: [8, 2, 4, 2, 2]}]
    assert sent1 == [{0: [2, 4, PER_ROW]}, {}]

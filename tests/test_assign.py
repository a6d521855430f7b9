"""The adaptive bit allocator: the MILP, its fallback, the cost model, end to end."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pyg_adaqp.assign import (
    AdaptiveBits,
    CostModel,
    KeyProblem,
    group_messages,
    objective,
    solve_key,
)
from pyg_adaqp.assign.cost_model import fit_link
from pyg_adaqp.assign.milp import TIE_BREAK
from test_train import SMALL, launch, make_config, read_run


def random_problem(seed: int, senders: int = 3, groups: int = 4, width: int = 16,
                   burst: bool = True):
    rng = np.random.default_rng(seed)
    sender = np.repeat(np.arange(senders), groups)
    rows = rng.integers(1, 50, sender.size)
    coef = rng.lognormal(0, 1.5, sender.size) * rows
    problem = KeyProblem(width, sender, rows, coef)
    # Some links pass part of the message unmetered (a token bucket's burst).
    free = {i: float(rng.choice([0.0, rng.uniform(0, problem.bytes[sender == i, 1].sum())]))
            if burst else 0.0 for i in range(senders)}
    cost = CostModel({i: float(rng.uniform(1e-9, 1e-8)) for i in range(senders)},
                     {i: float(rng.uniform(0, 1e-5)) for i in range(senders)}, free)
    return problem, cost


def test_group_messages_sorts_and_cuts():
    coef, order = group_messages(np.array([1.0, 5.0, 3.0, 0.0, 4.0]), 2)
    assert order.tolist() == [1, 4, 2, 0, 3]
    assert coef.tolist() == [9.0, 4.0, 0.0]


def test_cost_model_is_the_slowest_sender():
    cost = CostModel({0: 1e-9, 1: 2e-9}, {0: 1e-3, 1: 0.0})
    assert cost.predict({0: 1e6, 1: 1e6}) == pytest.approx(2e-3)
    assert cost.predict({0: 1e6, 1: 0}) == pytest.approx(2e-3)   # 1 sends nothing
    assert cost.predict({}) == 0.0


def test_cost_model_lets_free_bytes_through():
    cost = CostModel({0: 1e-9}, {0: 1e-4}, {0: 250e3})
    assert cost.predict({0: 100e3}) == pytest.approx(1e-4)          # within the burst
    assert cost.predict({0: 1.25e6}) == pytest.approx(1e-4 + 1e-3)  # 1 MB over it
    assert CostModel.from_state_dict(cost.state_dict()) == cost
    # Checkpoints written before the free bytes existed still load.
    assert CostModel.from_state_dict({"alpha": {0: 1e-9}, "beta": {0: 0.0}}).free == {}


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


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("coe_lambda", [0.2, 0.5, 0.8])
def test_milp_matches_brute_force_and_beats_uniform(seed, coe_lambda):
    problem, cost = random_problem(seed, senders=2, groups=3)
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


def test_large_key_uses_the_milp_near_the_greedy_thresholds():
    problem, cost = random_problem(0, senders=4, groups=2000, width=64)
    sol = solve_key(problem, cost, 0.5, time_limit=1.0)
    greedy = solve_key(problem, cost, 0.5, time_limit=1e-9, max_milp_groups=0)
    assert sol.objective <= greedy.objective + TIE_BREAK
    assert sol.solve_time < 2.0
    for b in (2, 4, 8):
        assert sol.objective < objective(problem, cost, np.full(problem.num_groups, b), 0.5)


def test_degenerate_inputs():
    cost = CostModel({0: 1e-9, 1: 1e-9}, {0: 0.0, 1: 0.0})
    empty = KeyProblem(8, [], [], [])
    assert solve_key(empty, cost).bits.size == 0
    # All-zero traces: no variance to buy, so every group at 2 bits, objective 0 (not NaN).
    zero = KeyProblem(8, [0, 0, 1], [10, 10, 5], [0.0, 0.0, 0.0])
    sol = solve_key(zero, cost, 0.5)
    assert sol.bits.tolist() == [2, 2, 2] and sol.objective == 0.0
    # A flat cost model (no time to save) and a sender the model never saw.
    flat = KeyProblem(8, [0, 2], [10, 10], [1.0, 2.0])
    sol = solve_key(flat, CostModel({0: 0.0}, {0: 1e-3}), 0.5)
    assert sol.bits.tolist() == [8, 8] and not math.isnan(sol.objective)


def test_allocator_checks_its_arguments():
    with pytest.raises(ValueError, match="coe_lambda"):
        AdaptiveBits(coe_lambda=1.5)
    with pytest.raises(ValueError, match="group_size"):
        AdaptiveBits(group_size=0)


@pytest.mark.parametrize("override,field", [("assign.coe_lambda=-0.1", "assign.coe_lambda"),
                                            ("assign.group_size=0", "assign.group_size")])
def test_bad_allocator_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"config field '{field}'"):
        make_config("assign=adaptive", override)


def test_adaptive_config_composes():
    cfg = make_config("assign=adaptive")
    a = cfg.assign
    assert (a.scheme, a.group_size, a.coe_lambda) == ("adaptive", 100, 0.5)


@pytest.mark.parametrize("coe_lambda", [0.0, 0.5])
def test_adaptive_training_end_to_end(tmp_path, coe_lambda):
    cfg = make_config(*SMALL, "assign=adaptive", "assign.cycle=2", "assign.group_size=20",
                      f"assign.coe_lambda={coe_lambda}", "trainer.epochs=4")
    launch(cfg, tmp_path)
    rows, summary = read_run(tmp_path)
    assert summary["scheme"] == "adaptive"
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    hist = summary["bits_histogram"]
    keys = {"forward 1", "backward 1", "forward 2", "backward 2"}
    assert keys <= set(hist)
    if coe_lambda == 0.0:
        # Only time counts: the allocator's widths, not the first cycle's 8 bits.
        for key in keys:
            assert set(hist[key]) == {"2"}
        assert rows[-1]["bytes_sent"] < rows[0]["bytes_sent"] / 2
    else:
        assert {b for key in keys for b in hist[key]} <= {"2", "4", "8"}
        assert len({b for key in keys for b in hist[key]}) >= 2
        # Same rows as the 8-bit first cycle, fewer bytes.
        assert rows[-1]["bytes_sent"] < rows[1]["bytes_sent"]


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


def test_profile_sizes_span_the_allocators_choices():
    from pyg_adaqp.assign.cost_model import profile_row_bytes
    from pyg_adaqp.comm import message_nbytes

    sizes = profile_row_bytes([8, 256])
    assert sizes[0] == message_nbytes(1, 8, 2) and sizes[-1] == message_nbytes(1, 256, 8)
    assert len(sizes) >= 5 and sizes == sorted(set(sizes))
    assert len(profile_row_bytes([1])) >= 3   # one tiny width: still a slope to fit

"""Distributed layers against PyG's layers on the whole graph (real gloo workers)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch_geometric.nn import GCNConv, SAGEConv

from graphs import random_directed_graph

from pyg_adaqp.nn import DistGCNConv, DistGraph, DistSAGEConv
from pyg_adaqp.assign.tracer import RangeTracer
from pyg_adaqp.nn.dist_graph import INPUT_BLOCK_COLUMNS, signal_power
from pyg_adaqp.partition import partition_graph
from pyg_adaqp.train.workers import run_workers

PYG = {"gcn": GCNConv, "sage": SAGEConv}
DIST = {"gcn": DistGCNConv, "sage": DistSAGEConv}


class TwoLayer(torch.nn.Module):
    """conv1 narrows (in > hidden: transform first), conv2 widens (aggregate first)."""

    def __init__(self, conv, in_channels: int, hidden: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv1 = conv(in_channels, hidden, **kwargs)
        self.conv2 = conv(hidden, out_channels, **kwargs)

    def forward(self, x, graph):
        return self.conv2(self.conv1(x, graph).relu(), graph)


def reference(kind: str, data, hidden: int, out_channels: int, seed: int = 0, **kwargs):
    """PyG's model on the whole graph: outputs, parameter and input gradients."""
    torch.manual_seed(seed)
    model = TwoLayer(PYG[kind], data.x.size(1), hidden, out_channels, **kwargs)
    x = data.x.clone().requires_grad_()
    edge_weight = data.edge_weight if kind == "gcn" and "edge_weight" in data else None
    out = model.conv2(model.conv1(x, data.edge_index, edge_weight).relu(), data.edge_index,
                      edge_weight) if kind == "gcn" else model(x, data.edge_index)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, out.detach(), grads, x.grad.clone(), upstream


def dist_worker(rank, world_size, kind, parts, state, x, upstream, hidden, out_channels,
                overlap, quantize, kwargs):
    lg = parts[rank]
    graph = DistGraph(lg, overlap=overlap, quantize=quantize,
                      generator=torch.Generator().manual_seed(100 + rank))
    model = TwoLayer(DIST[kind], x.size(1), hidden, out_channels, **kwargs)
    model.load_state_dict(state)
    x_own = x[lg.owned_ids].clone().requires_grad_()
    out = model(x_own, graph)
    (out * upstream[lg.owned_ids]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if world_size > 1:
        for g in grads.values():
            dist.all_reduce(g)
    return {"out": out.detach(), "grads": grads, "x_grad": x_own.grad, "ids": lg.owned_ids,
            "stats": {k: v.bytes_sent for k, v in graph.exchange.stats.items()}}


def run_distributed(kind, data, num_parts, model, upstream, hidden, out_channels, overlap=True,
                    quantize=False, **kwargs):
    parts = partition_graph(data, num_parts, seed=0)
    args = (kind, parts, model.state_dict(), data.x, upstream, hidden, out_channels, overlap,
            quantize, kwargs)
    if num_parts == 1:
        return [dist_worker(0, 1, *args)]
    return run_workers(dist_worker, num_parts, *args)


def assemble(results, num_nodes, key):
    first = results[0][key]
    out = first.new_zeros(num_nodes, first.size(1))
    for r in results:
        out[r["ids"]] = r[key]
    return out


def assert_matches_reference(kind, data, num_parts, overlap=True, **kwargs):
    hidden, out_channels = 4, 6
    model, out, grads, x_grad, upstream = reference(kind, data, hidden, out_channels, **kwargs)
    results = run_distributed(kind, data, num_parts, model, upstream, hidden, out_channels,
                              overlap=overlap, **kwargs)
    torch.testing.assert_close(assemble(results, data.num_nodes, "out"), out,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(assemble(results, data.num_nodes, "x_grad"), x_grad,
                               atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(results[0]["grads"][name], g, atol=1e-5, rtol=1e-5)
    return results


@pytest.mark.parametrize("kind", ["gcn", "sage"])
@pytest.mark.parametrize("num_parts", [1, 2, 4])
def test_directed_graph_matches_pyg(kind, num_parts):
    data = random_directed_graph(num_nodes=150, num_edges=700, seed=3)
    data.x = torch.randn(data.num_nodes, 7, generator=torch.Generator().manual_seed(2))
    results = assert_matches_reference(kind, data, num_parts)
    if num_parts > 1:
        assert sum(sum(r["stats"].values()) for r in results) > 0


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_cora_matches_pyg_without_overlap(cora, kind):
    assert_matches_reference(kind, cora, 4, overlap=False)


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_cora_matches_pyg_with_overlap(cora, kind):
    assert_matches_reference(kind, cora, 4, overlap=True)


@pytest.mark.parametrize("kwargs", [
    {"improved": True}, {"add_self_loops": False}, {"normalize": False, "bias": False},
])
def test_gcn_options(kwargs):
    data = random_directed_graph(num_nodes=100, num_edges=500, seed=4)
    data.x = torch.randn(data.num_nodes, 7, generator=torch.Generator().manual_seed(2))
    assert_matches_reference("gcn", data, 3, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {"aggr": "sum"}, {"root_weight": False}, {"normalize": True}, {"project": True},
])
def test_sage_options(kwargs):
    data = random_directed_graph(num_nodes=100, num_edges=500, seed=4)
    data.x = torch.randn(data.num_nodes, 7, generator=torch.Generator().manual_seed(2))
    assert_matches_reference("sage", data, 3, **kwargs)


def test_whole_graph_call_is_pyg(cora):
    torch.manual_seed(0)
    ours = DistGCNConv(cora.x.size(1), 8)
    theirs = GCNConv(cora.x.size(1), 8)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(cora.x, cora.edge_index), theirs(cora.x, cora.edge_index))
    assert repr(DistSAGEConv(16, 8)) == "DistSAGEConv(16, 8, aggr=mean)"
    # The same parameters as PyG's layers: a state dict moves both ways.
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert copy.deepcopy(DistSAGEConv(5, 3)).state_dict().keys() == SAGEConv(5, 3).state_dict().keys()


def quantized_worker(rank, world_size, parts, x, weight, bits):
    lg = parts[rank]
    graph = DistGraph(lg, quantize=True, generator=torch.Generator().manual_seed(7 + rank))
    graph.exchange.default_bits = bits
    conv = DistGCNConv(x.size(1), weight.size(0), bias=False)
    conv.lin.weight.data.copy_(weight)
    x_own = x[lg.owned_ids].clone().requires_grad_()  # requires grad: no input cache
    out = conv(x_own, graph)
    return {"out": out.detach(), "ids": lg.owned_ids}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_error_within_variance_bound(cora, bits):
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    x = cora.x + torch.randn(cora.x.shape, generator=torch.Generator().manual_seed(0))
    out_channels = 2000  # wider than the input: the layer exchanges x itself
    weight = torch.randn(out_channels, x.size(1), generator=torch.Generator().manual_seed(1))
    weight /= x.size(1) ** 0.5
    parts = partition_graph(cora, 3)
    results = run_workers(quantized_worker, 3, parts, x, weight, bits)
    out = assemble(results, cora.num_nodes, "out")
    exact = (GCNConv(x.size(1), out_channels, bias=False).requires_grad_(False))
    exact.lin.weight.data.copy_(weight)
    err = (out - exact(x, cora.edge_index)).pow(2).sum()

    # E||err||^2 = sum_v sum_u a_vu^2 sum_j Var(x_uj) ||W_:j||^2 over halo
    # sources u, with Var(x_uj) <= Delta_u^2 / 4 (stochastic rounding); on
    # average Var = Delta^2 / 6, so the realised error sits near 2/3 of it.
    edge_index, norm = gcn_norm(cora.edge_index, None, cora.num_nodes)
    owner = torch.empty(cora.num_nodes, dtype=torch.long)
    for lg in parts:
        owner[lg.owned_ids] = lg.rank
    cut = owner[edge_index[0]] != owner[edge_index[1]]
    delta = (x.max(1).values - x.min(1).values) / (2**bits - 1)
    bound = (norm[cut].pow(2) * delta[edge_index[0][cut]].pow(2)).sum() / 4 * weight.pow(2).sum()
    assert err > 0
    assert err <= 1.2 * bound
    # Not vacuous: the realised error is the same order as the bound.
    assert err >= 0.1 * bound


def test_signal_power_is_the_power_that_passes_the_weight():
    """Unchanged by the weight's scale; an orthogonal (or no, or a zero)
    weight sees the whole power; a weight that drops a column drops its
    power; a product given is used as the aggregation times the weight."""
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(50, 6, generator=gen)
    dropped = out.double()[:, 1:].square().sum() * 6 / 5
    whole = out.double().square().sum()
    # Norms are summed in float32 (squared in float64): float32's rounding.
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=0.0)
    w = torch.randn(9, 6, generator=gen)
    close(signal_power(out, 3.0 * w), signal_power(out, w))
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    for weight in (None, q, torch.zeros(4, 6)):
        close(signal_power(out, weight), whole)
    drop = torch.eye(6)[1:]                  # passes columns 1-5 with gain 1
    close(signal_power(out, drop), dropped)
    # A product given is used, not recomputed: twice the real one, 4x the power.
    close(signal_power(out, drop, 2 * (out @ drop.t())), 4 * dropped)
    assert signal_power(out).dtype == torch.float64


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_budget_signal_is_the_aggregation_as_the_next_weight_sees_it(kind):
    """The power the variance budget is relative to: a layer that aggregates
    before transforming records its aggregation's power through the weight
    it applies next (a raw column that the weight drops is not signal; a
    lazy weight, once its first call has made it); a layer that transforms
    first, its aggregation's own power."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm
    from torch_geometric.utils import scatter

    data = random_directed_graph(num_nodes=120, num_edges=600, seed=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(120, 5, generator=gen)
    x[:, 0] *= 100.0                          # a raw column, on its own scale
    if kind == "gcn":
        edge_index, norm = gcn_norm(data.edge_index, data.edge_weight, 120)
        aggregate = lambda t: scatter(norm[:, None] * t[edge_index[0]], edge_index[1], 0,
                                      dim_size=120, reduce="sum")
    else:
        aggregate = lambda t: scatter(t[data.edge_index[0]], data.edge_index[1], 0,
                                      dim_size=120, reduce="mean")
    lg = partition_graph(data, 1)[0]
    for out_channels in (8, 3):               # aggregates first; transforms first
        conv = DIST[kind](5, out_channels)
        weight = (conv.lin if kind == "gcn" else conv.lin_l).weight
        with torch.no_grad():
            weight[:, 0] = 0.0                # the layer ignores the raw column
        graph = DistGraph(lg, quantize=True)
        graph.exchange.tracer = RangeTracer()
        conv(x[lg.owned_ids].clone().requires_grad_(), graph)
        recorded = graph.exchange.tracer.signal["forward 0"]
        with torch.no_grad():
            if out_channels > 5:
                agg = aggregate(x)[lg.owned_ids]
                expected = (agg @ weight.t()).square().sum() * 5 / weight.square().sum()
                assert recorded < agg.square().sum() / 100   # the raw column's power is gone
            else:
                expected = aggregate(x @ weight.t())[lg.owned_ids].square().sum()
        torch.testing.assert_close(recorded, expected.double(), rtol=1e-5, atol=0)
    lazy = DIST[kind](-1, 8)
    graph = DistGraph(lg, quantize=True)
    graph.exchange.tracer = RangeTracer()
    lazy(x[lg.owned_ids].clone().requires_grad_(), graph)
    weight = (lazy.lin if kind == "gcn" else lazy.lin_l).weight
    with torch.no_grad():
        expected = ((aggregate(x)[lg.owned_ids] @ weight.t()).square().sum()
                    * 5 / weight.square().sum())
    torch.testing.assert_close(graph.exchange.tracer.signal["forward 0"], expected.double(),
                               rtol=1e-5, atol=0)


def cache_worker(rank, world_size, kind, parts, x, state, cache, prefetch=0, stale=False):
    from pyg_adaqp.nn.spmm import SparseAdjacency
    wide = []  # columns of the products wider than the model (layer 0's aggregation of x)
    matmul = SparseAdjacency.matmul
    SparseAdjacency.matmul = lambda self, t: (wide.append(t.size(1)) if t.size(1) > 6
                                              else None) or matmul(self, t)
    lg = parts[rank]
    graph = DistGraph(lg, cache_input=cache)
    model = TwoLayer(DIST[kind], x.size(1), 4, 6)
    model.load_state_dict(state)
    # As the trainer does: every matrix built up front, then the edge list freed.
    graph.build_adjacency(model, x.dtype)
    graph.release_edge_list()
    x_own = x[lg.owned_ids]  # features: no gradient needed
    # What this worker does, in order: the round's start and each exchange
    # it posts (its bytes); events, not times.
    events = []
    post = graph.exchange.transport.start
    graph.exchange.transport.start = lambda send, *rest: (
        events.append(sum(b.numel() for b in send.values())) or post(send, *rest))
    load, arrived = graph.input_load(x_own), None
    if prefetch:  # as the allocator's set-up: some of the input's first columns
        arrived = load.run(lambda: events.append("start") or dist.barrier() or 0.0, prefetch)
    set_up, posts = list(events), events
    posts.clear()
    if stale:   # changed in place since: the columns exchanged ahead are not its own
        x_own.mul_(1.0)
    outs = [model(x_own, graph) for _ in range(3)]
    for out in outs:
        out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        outs.append(model(x_own, graph))
    stats = {k: (v.calls, v.bytes_sent) for k, v in graph.exchange.stats.items()}
    # A normalization not built before the release cannot be built any more.
    other = DIST[kind](4, 6, **({"improved": True} if kind == "gcn" else {"aggr": "sum"}))
    try:
        other(outs[0].detach()[:, :4], graph)
        released = None
    except RuntimeError as err:
        released = str(err)
    return {"outs": [o.detach() for o in outs], "ids": lg.owned_ids, "stats": stats,
            "grads": grads, "wide_columns": sum(wide), "released": released,
            "offered": None if load is None else (load.sent, load.columns),
            "arrived": arrived, "set_up": set_up, "posts": posts}


@pytest.mark.parametrize("kind", ["gcn", "sage"])
@pytest.mark.parametrize("cache, prefetch, stale", [
    (True, 0, False), (True, 50, False), (True, 128, False), (True, 50, True), (False, 0, False)])
def test_layer0_input_cache(cora, kind, cache, prefetch, stale):
    """With `prefetch`, the input's first `prefetch` columns are exchanged
    ahead as the set-up does (:meth:`DistGraph.input_load`) and layer 0
    takes them from there, exchanging the rest by blocks from that column;
    where the input changed since (`stale`), it exchanges every column."""
    torch.manual_seed(0)
    model = TwoLayer(PYG[kind], cora.x.size(1), 4, 6)
    expected = model(cora.x, cora.edge_index)
    expected.sum().backward()
    expected_grads = {n: 3 * p.grad for n, p in model.named_parameters()}  # 3 passes
    parts = partition_graph(cora, 2)
    results = run_workers(cache_worker, 2, kind, parts, cora.x, model.state_dict(), cache,
                          prefetch, stale)
    for i in range(4):
        got = torch.zeros_like(expected)
        for r in results:
            got[r["ids"]] = r["outs"][i]
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    # The workers' gradients sum to the whole graph's, cached or not.
    for name, grad in expected_grads.items():
        torch.testing.assert_close(sum(r["grads"][name] for r in results), grad,
                                   atol=1e-4, rtol=1e-4)
    stats = results[0]["stats"]
    width = cora.x.size(1)
    if cache:
        # Input rows travel once, at full precision (4 bytes per value), in
        # blocks of INPUT_BLOCK_COLUMNS columns, and the features are
        # aggregated once (owned and halo products) for the three training
        # passes and the evaluation.
        # The training passes post the input's blocks, from the first
        # column not exchanged ahead, each once; then layer 1's exchanges.
        # Exchanged ahead or not, the first pass's counters hold every column.
        taken = 0 if stale else prefetch
        starts = range(taken, width, INPUT_BLOCK_COLUMNS)
        assert stats["input 0"][0] == (taken > 0) + len(starts) > 1
        assert stats["input 0"][1] == parts[0].send_index[1].numel() * width * 4
        assert "forward 0" not in stats
        assert [r["wide_columns"] for r in results] == [2 * width, 2 * width]
        for rank, r in enumerate(results):
            peer = 1 - rank
            sends = parts[rank].send_index[peer].numel() * 4   # bytes of a column
            assert r["offered"] == ({peer: sends}, INPUT_BLOCK_COLUMNS)
            input_posts = [sends * min(INPUT_BLOCK_COLUMNS, width - at) for at in starts]
            assert r["posts"][:len(starts)] == input_posts
            assert len(r["posts"]) == len(starts) + 3 * 2 + 1   # + forward and backward 1
            # The set-up's round starts once its columns are packed, then posts them.
            assert r["set_up"] == (["start", sends * prefetch] if prefetch else [])
            if prefetch:
                assert set(r["arrived"]) == {peer}
    else:
        # Without the cache, layer 0 transforms first (4 < 1433 columns)
        # and exchanges every call: 3 training passes and one evaluation.
        assert results[0]["offered"] is None   # nothing cached, nothing to exchange ahead
        assert "input 0" not in stats
        assert stats["forward 0"] == (4, 4 * parts[0].send_index[1].numel() * 4 * 4)
        assert [r["wide_columns"] for r in results] == [0, 0]
    assert stats["forward 1"][0] == 4 and stats["backward 1"][0] == 3
    for r in results:
        assert "edge list was released" in r["released"]


class _Mark(torch.autograd.Function):
    """Identity that logs `forward_label` when it runs forward and `backward_label` backward."""

    @staticmethod
    def forward(ctx, x, log, forward_label, backward_label):
        ctx.log, ctx.label = log, backward_label
        log.append(forward_label)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.label)
        return grad, None, None, None


class _LoggedAdjacency:
    """Logs when the owned-row aggregation (A_own @ x, and its gradient) starts."""

    def __init__(self, adjacency, log):
        self.adjacency, self.log = adjacency, log

    def matmul(self, x):
        x = _Mark.apply(x, self.log, "owned aggregation", "owned gradient done")
        return _Mark.apply(self.adjacency.matmul(x), self.log, "owned aggregation done",
                           "owned gradient")


class _LoggedLinear(torch.nn.Module):
    """Logs when a linear layer (SAGE's root weight, and its gradient) starts and ends."""

    def __init__(self, linear, log):
        super().__init__()
        self.linear, self.log = linear, log

    def forward(self, x):
        x = _Mark.apply(x, self.log, "root", "root gradient done")
        return _Mark.apply(self.linear(x), self.log, "root done", "root gradient")


def overlap_worker(rank, world_size, parts, x, overlap):
    """One GCN and one SAGE layer forward and backward; logs exchange posts,
    wait returns, owned-row work and SAGE's root weight, by layer."""
    from pyg_adaqp.comm.transport import Transport

    log = []

    class LoggedTransport(Transport):
        def start(self, send, recv_bytes, device):
            pending = super().start(send, recv_bytes, device)
            log.append("post")
            wait = pending.wait

            def logged_wait():
                received = wait()
                log.append("wait returned")
                return received

            pending.wait = logged_wait
            return pending

    lg = parts[rank]
    graph = DistGraph(lg, overlap=overlap)
    graph.exchange.transport = LoggedTransport()
    adjacency = graph.adjacency

    def logged_adjacency(key, weights, dtype):
        a_own, a_halo = adjacency(key, weights, dtype)
        return _LoggedAdjacency(a_own, log), a_halo

    graph.adjacency = logged_adjacency
    torch.manual_seed(0)
    results = {}
    for conv in (DistGCNConv(x.size(1), x.size(1), bias=False),
                 DistSAGEConv(x.size(1), x.size(1), bias=False)):
        if isinstance(conv, DistSAGEConv):
            conv.lin_r = _LoggedLinear(conv.lin_r, log)
        x_own = x[lg.owned_ids].clone().requires_grad_()
        out = conv(x_own, graph)
        (out * out).sum().backward()
        results[type(conv).__name__] = {"log": list(log), "out": out.detach(),
                                        "grad": x_own.grad}
        log.clear()
    return results


def test_overlap_is_real(cora):
    """The owned-row work runs while the rows travel, forward and backward: it
    starts before the exchange's wait returns; without overlap, after.  So
    does SAGE's root weight, after the owned rows' aggregation (and, in
    backward, before their gradient).  Either way the results are bitwise
    equal (evidence by order, not by wall clock)."""
    parts = partition_graph(cora, 2)
    seq = run_workers(overlap_worker, 2, parts, cora.x, False)
    ovl = run_workers(overlap_worker, 2, parts, cora.x, True)
    for a, b in zip(seq, ovl):
        for layer in a:
            assert torch.equal(a[layer]["out"], b[layer]["out"])
            assert torch.equal(a[layer]["grad"], b[layer]["grad"])
        # Forward, then backward: each posts once and waits once.
        assert b["DistGCNConv"]["log"] == [
            "post", "owned aggregation", "owned aggregation done", "wait returned",
            "post", "owned gradient", "owned gradient done", "wait returned"]
        assert a["DistGCNConv"]["log"] == [
            "post", "wait returned", "owned aggregation", "owned aggregation done",
            "post", "wait returned", "owned gradient", "owned gradient done"]
        assert b["DistSAGEConv"]["log"] == [
            "post", "owned aggregation", "owned aggregation done", "root", "root done",
            "wait returned", "post", "root gradient", "root gradient done", "owned gradient",
            "owned gradient done", "wait returned"]
        assert a["DistSAGEConv"]["log"] == [
            "post", "wait returned", "owned aggregation", "owned aggregation done", "root",
            "root done", "post", "wait returned", "root gradient", "root gradient done",
            "owned gradient", "owned gradient done"]


def shared_rows_worker(rank, world_size, parts):
    from pyg_adaqp.comm import HaloExchange

    lg = parts[rank]
    ex = HaloExchange(lg, generator=torch.Generator().manual_seed(rank))
    ex.default_bits = 2
    x = torch.randn(lg.num_owned, 6, generator=torch.Generator().manual_seed(10 + rank))
    halo = ex.exchange("forward 0", x, quantize=True)
    index = lg.send_index
    sent = sum(i.numel() for i in index.values())
    return {"halo": halo, "ids": lg.node_ids[lg.num_owned:],
            "share": (ex.encode_share("forward 0"), ex.encode_share("backward 0")),
            "expect": len(set(torch.cat(list(index.values())).tolist())) / sent}


def test_rows_sent_to_several_peers_are_quantized_once():
    """A boundary row two peers hold as a halo row reaches both with the same
    rounding, and each worker's share of rows it encodes is the brute-force
    count of distinct rows over rows sent (1 backward: halo rows have one owner)."""
    data = random_directed_graph(num_nodes=150, num_edges=900, seed=4)
    parts = partition_graph(data, 3)
    results = run_workers(shared_rows_worker, 3, parts)
    seen: dict[int, torch.Tensor] = {}
    shared = 0
    for r in results:
        assert r["share"] == (pytest.approx(r["expect"]), 1.0)
        for node, row in zip(r["ids"].tolist(), r["halo"]):
            if node in seen:
                shared += 1
                assert torch.equal(seen[node], row)
            seen[node] = row
    assert shared > 0 and any(r["expect"] < 1 for r in results)


def sorted_buckets_worker(rank, world_size, parts, seed):
    """Mixed widths on every channel (seed None: 4 bits everywhere): rows
    travel sorted by width, land in their slots.  Constant rows decode
    exactly, so each row carries its node id (forward) or the id of the
    node it is a gradient for (backward)."""
    from pyg_adaqp.comm import HaloExchange

    lg = parts[rank]
    ex = HaloExchange(lg)

    def widths(sender, receiver, n, key):
        if seed is None:
            return torch.full((n,), 4)
        gen = torch.Generator().manual_seed(seed * 1000 + 100 * sender + 10 * receiver + key)
        return torch.tensor([2, 4, 8, 32])[torch.randint(4, (n,), generator=gen)]

    install(ex.set_bits, lg, widths, rank)
    ids = lg.node_ids.double().unsqueeze(1).expand(-1, 5).float()
    x = ids[:lg.num_owned].clone().requires_grad_()
    handle = ex.begin(0, x, quantize=True, overlap=True)
    halo = handle.halo()
    # Gradient of every halo row: its node id; owners add them up per row.
    (halo * ids[lg.num_owned:]).sum().backward()
    layouts, permuted = list(ex._layouts.values()), sorted(ex._order)
    # The same widths again (new tensors) keep every layout and shared-row
    # plan; one row at another width rebuilds that key's.
    plans = {**ex._layouts, **ex._shared_rows}
    install(ex.set_bits, lg, widths, rank)
    kept = {**ex._layouts, **ex._shared_rows}
    send = {p: widths(rank, p, i.numel(), 0) for p, i in lg.send_index.items()}
    peer = next(p for p, b in send.items() if b.numel())
    send[peer][0] = 8 if send[peer][0] != 8 else 2
    ex.set_bits("forward 0", send,
                {p: widths(p, rank, i.numel(), 0) for p, i in lg.recv_index.items()})
    rebuilt = sorted({k[0] for k in plans} - {k[0] for k in {**ex._layouts, **ex._shared_rows}})
    return (halo.detach(), x.grad, all(lay.contiguous for lay in layouts), len(layouts),
            permuted, kept.keys() == plans.keys()
            and all(kept[k] is plans[k] for k in plans), rebuilt)


def install(set_bits, lg, widths, rank):
    """Installs `widths` for the forward and backward key of layer 0."""
    for k, key in enumerate(("forward 0", "backward 0")):
        out, into = (lg.send_index, lg.recv_index) if k == 0 else (lg.recv_index, lg.send_index)
        set_bits(key, {p: widths(rank, p, i.numel(), k) for p, i in out.items()},
                 {p: widths(p, rank, i.numel(), k) for p, i in into.items()})


def assert_ids_land_exactly(lg, halo, grad):
    """The halo block of a worker that sent each owned row's global id, and
    the gradient of ``sum(halo * id)`` over all workers: each owned row gets
    its id once per peer that holds it as a halo row.  Exact at any width:
    every row is constant, which decodes exactly."""
    assert torch.equal(halo, lg.node_ids[lg.num_owned:].float().unsqueeze(1).expand(-1, 5))
    holders = torch.zeros(lg.num_owned)
    for p, i in lg.send_index.items():
        holders[i] += 1
    assert torch.equal(grad, (holders * lg.node_ids[:lg.num_owned].float())
                       .unsqueeze(1).expand(-1, 5))


@pytest.mark.parametrize("seed", [0, None])
def test_mixed_widths_travel_in_contiguous_buckets_and_land_exactly(seed):
    data = random_directed_graph(num_nodes=120, num_edges=700, seed=seed or 0)
    parts = partition_graph(data, 3)
    results = run_workers(sorted_buckets_worker, 3, parts, seed)
    for lg, (halo, grad, contiguous, layouts, permuted, kept, rebuilt) in zip(parts, results):
        assert contiguous and layouts > 0
        assert kept and rebuilt == ["forward 0"]
        # One width everywhere needs no permutation: rows travel in plan order.
        assert permuted == ([] if seed is None else ["backward 0", "forward 0"])
        assert_ids_land_exactly(lg, halo, grad)                # every row in its own slot


def test_travel_order_sorts_by_width_and_moves_only_the_rows_outside_their_slice():
    """Brute force over random widths: a permutation, every width's rows one
    slice in ascending width, the rows inside their own width's slice where
    they were, the others in row order within their width."""
    from pyg_adaqp.comm.exchange import travel_order

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(0, 60, (1,), generator=gen))
        if trial % 2:   # mostly one width with a few wider rows
            bits = torch.full((n,), 2)
            bits[torch.randint(0, max(n, 1), (min(n, 5),), generator=gen)] = 4
        else:
            bits = torch.tensor([2, 4, 8, 32])[torch.randint(4, (n,), generator=gen)]
        perm = travel_order(bits)
        assert sorted(perm.tolist()) == list(range(n))
        slice_width = sorted(bits.tolist())
        assert bits[perm].tolist() == slice_width
        moved = [j for j in range(n) if perm[j] != j]
        assert moved == [j for j in range(n) if slice_width[j] != bits[j]]
        for b in set(bits.tolist()):
            rows = [int(perm[j]) for j in moved if slice_width[j] == b]
            assert rows == sorted(rows)
    # One group of 100 rows at 4 bits among 3,000: at most 200 rows move
    # (a stable sort by width would move every row after the first wider one).
    bits = torch.full((3_000,), 2)
    bits[torch.randperm(3_000, generator=gen)[:100]] = 4
    assert int((travel_order(bits) != torch.arange(3_000)).sum()) <= 200


#: Per rank of `one_mixed_channel_worker`, the keys whose rows travel
#: re-ordered and their peers (sent to, received from): only the mixed
#: channel 0 -> 1's two ends.
MIXED_CHANNEL_ORDER = {0: {"forward 0": ([1], []), "backward 0": ([], [1])},
                       1: {"forward 0": ([], [0]), "backward 0": ([0], [])},
                       2: {}}


def one_mixed_channel_worker(rank, world_size, parts):
    """Every row at 2 bits but for one channel (0 -> 1), where every fifth
    row travels at 4 bits.  Records every decode's `out`: a peer whose halo
    slots are one slice is decoded straight into it."""
    from pyg_adaqp.comm import HaloExchange
    from pyg_adaqp.comm.codec import MessageLayout

    lg = parts[rank]
    ex = HaloExchange(lg)
    decoded_into = []
    unpack = MessageLayout.unpack

    def recording_unpack(layout, buffer, dtype=torch.float32, out=None):
        decoded_into.append(out is not None)
        return unpack(layout, buffer, dtype, out)

    MessageLayout.unpack = recording_unpack

    def widths(sender, receiver, n, key):
        bits = torch.full((n,), 2)
        if (sender, receiver) == ((0, 1) if key == 0 else (1, 0)):
            bits[::5] = 4
        return bits

    install(ex.set_bits, lg, widths, rank)
    ids = lg.node_ids.double().unsqueeze(1).expand(-1, 5).float()
    x = ids[:lg.num_owned].clone().requires_grad_()
    handle = ex.begin(0, x, quantize=True, overlap=True)
    halo = handle.halo()
    forward_decodes = list(decoded_into)
    (halo * ids[lg.num_owned:]).sum().backward()
    MessageLayout.unpack = unpack
    # The peers whose rows travel re-ordered, by key: (sent to, received from).
    order = {key: (sorted(send), sorted(recv)) for key, (send, recv) in ex._order.items()}
    settle = {p: at.numel()
              for p, (at, to) in ex._travel("forward 0", True, True).settle.items()}
    wide = {p: int((widths(p, rank, i.numel(), 0) != 2).sum()) for p, i in lg.recv_index.items()}
    # The tracer reads each row's range in plan order, re-ordered channel or
    # not: node v's row spans [0, v].
    ex.tracer = RangeTracer()
    spans = (lg.node_ids[:lg.num_owned].float().unsqueeze(1)
             / torch.tensor([1., 2, 3, 4, float("inf")]))
    ex.begin(0, spans, quantize=True, overlap=False).halo()
    traces = {p: t.clone() for p, t in ex.tracer.traces["forward 0"].items()}
    return halo.detach(), x.grad, order, settle, wide, forward_decodes, traces


def test_one_mixed_channel_reorders_its_own_rows_only():
    data = random_directed_graph(num_nodes=300, num_edges=2400, seed=3)
    parts = partition_graph(data, 3)
    from pyg_adaqp.comm.exchange import _as_slice
    assert all(_as_slice(i) is not None for lg in parts for i in lg.recv_index.values())
    results = run_workers(one_mixed_channel_worker, 3, parts)
    for rank, (lg, (halo, grad, order, settle, wide, into, traces)) in enumerate(
            zip(parts, results)):
        assert_ids_land_exactly(lg, halo, grad)
        # Only the mixed channel's two ends re-order, and only for that peer.
        assert order == MIXED_CHANNEL_ORDER[rank]
        # Every forward message is decoded straight into the halo block; the
        # receiver of the mixed channel then moves at most twice its wide rows.
        assert into == [True] * len(lg.recv_index)
        assert settle.keys() == ({0} if rank == 1 else set())
        if rank == 1:
            assert 0 < settle[0] <= 2 * wide[0]
        # D/6 (hi - lo)^2 per row, in send_index order (rank 0's channel to 1 re-ordered).
        assert traces.keys() == lg.send_index.keys()
        for p, i in lg.send_index.items():
            assert torch.equal(traces[p], lg.node_ids[i].double().square() * (5 / 6))


def one_wide_gradient_worker(rank, world_size, parts):
    """Every row at 2 bits but one halo gradient of rank 1's (to rank 0) at 4
    bits.  Records which widths each backward pack quantized over its whole
    source (:meth:`SharedRows._plan`, by the source's rows)."""
    from pyg_adaqp.comm import HaloExchange, SharedRows

    lg = parts[rank]
    ex = HaloExchange(lg)
    plans = []
    plan = SharedRows._plan

    def recording_plan(shared, num_rows):
        whole = plan(shared, num_rows)
        plans.append((num_rows, sorted(whole)))
        return whole

    SharedRows._plan = recording_plan

    def widths(sender, receiver, n, key):
        bits = torch.full((n,), 2)
        if key == 1 and (sender, receiver) == (1, 0):
            bits[0] = 4
        return bits

    install(ex.set_bits, lg, widths, rank)
    ids = lg.node_ids.double().unsqueeze(1).expand(-1, 5).float()
    x = ids[:lg.num_owned].clone().requires_grad_()
    halo = ex.begin(0, x, quantize=True, overlap=True).halo()
    forward_plans = len(plans)
    (halo * ids[lg.num_owned:]).sum().backward()
    SharedRows._plan = plan
    return halo.detach(), x.grad, plans[forward_plans:]


def test_a_gradient_with_one_wider_row_is_quantized_over_its_whole_block():
    """Through the exchange: rank 1 sends every halo gradient back, one of
    them at 4 bits; its 2-bit rows are quantized over the whole halo block
    (no gather), and every gradient still lands exactly."""
    from pyg_adaqp.comm.codec import WHOLE_SOURCE_SLACK

    data = random_directed_graph(num_nodes=300, num_edges=2400, seed=3)
    parts = partition_graph(data, 3)
    results = run_workers(one_wide_gradient_worker, 3, parts)
    for rank, (lg, (halo, grad, plans)) in enumerate(zip(parts, results)):
        assert_ids_land_exactly(lg, halo, grad)
        halo_rows = lg.node_ids.numel() - lg.num_owned
        assert 1 <= WHOLE_SOURCE_SLACK * halo_rows  # one row of them is within the slack
        # One backward pack, of the whole halo block; only rank 1's is mixed.
        assert plans == [(halo_rows, [2] if rank == 1 else [])], plans


def test_halo_slots_that_are_no_slice_take_the_mixed_rows_too():
    """Every channel's rows travel in reverse order (the sender's list and the
    receiver's slots reversed together), so no peer's halo slots are one
    slice: the rows are scattered into them, the mixed channel's re-ordered
    rows too, and halo rows, gradients and traces land as in plan order."""
    from pyg_adaqp.comm.exchange import _as_slice

    data = random_directed_graph(num_nodes=300, num_edges=2400, seed=3)
    parts = partition_graph(data, 3)
    for lg in parts:
        lg.send_index = {p: i.flip(0) for p, i in lg.send_index.items()}
        lg.recv_index = {p: i.flip(0) for p, i in lg.recv_index.items()}
    assert all(_as_slice(i) is None for lg in parts for i in lg.recv_index.values())
    results = run_workers(one_mixed_channel_worker, 3, parts)
    for rank, (lg, (halo, grad, order, settle, _, into, traces)) in enumerate(
            zip(parts, results)):
        assert_ids_land_exactly(lg, halo, grad)
        assert order == MIXED_CHANNEL_ORDER[rank]
        # No message is decoded straight into the halo block, so none is settled after.
        assert not any(into) and settle == {}
        for p, i in lg.send_index.items():
            assert torch.equal(traces[p], lg.node_ids[i].double().square() * (5 / 6))

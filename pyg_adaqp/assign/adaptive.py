r"""`AdaptiveBits`: AdaQP's adaptive bit-width allocator as a trainer callback (SPEC 7).

Schedule: the first ``cycle`` epochs exchange at 8 bits while a
:class:`RangeTracer` accumulates every row's range statistic; at every
multiple of ``cycle`` rank 0 gathers traces and scores, solves one MILP per
exchange key (:func:`~pyg_adaqp.assign.milp.solve_key`) and broadcasts the
widths, and every worker installs them with
:meth:`~pyg_adaqp.comm.HaloExchange.set_bits`.

The variance a row :math:`m` adds at :math:`b` bits is modelled as
:math:`c_m / (2^b - 1)^2` with :math:`c_m = s(m) \cdot \mathrm{trace}(m)`.
A forward row :math:`u` sent to worker :math:`j` scores
:math:`s(u) = \sum_v a_{vu}^2` over its edges into :math:`j`'s owned nodes
(the squared weights: independent noise adds in variance), which :math:`j`
reads off the column sums of squares of its halo adjacency; backward rows
are already aggregated gradients and score 1.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pyg_adaqp.assign.cost_model import (
    CostModel,
    check_cost_model,
    profile_cost_model,
    profile_row_bytes,
)
from pyg_adaqp.assign.milp import WIDTHS, KeyProblem, group_messages, solve_key
from pyg_adaqp.assign.tracer import RangeTracer
from pyg_adaqp.nn import DistGraph

log = logging.getLogger(__name__)
#: Channel (sender, receiver) -> width of every row it carries, in send order.
ChannelBits = dict[tuple[int, int], Tensor]


class AdaptiveBits:
    r"""Chooses every message row's width from {2, 4, 8} by a MILP per exchange key.

    Args:
        cycle (int, optional): Epochs between re-assignments; the first
            `cycle` epochs run at 8 bits. (default: :obj:`10`)
        group_size (int, optional): Messages of one channel sharing a width.
            (default: :obj:`100`)
        coe_lambda (float, optional): Weight :math:`\lambda` of the variance
            term against the time term. (default: :obj:`0.5`)
        time_limit (float, optional): Seconds the MILPs of one
            re-assignment may take together. (default: :obj:`1.5`)
        profile_repeats (int, optional): Timed exchanges per size when
            profiling the cost model. (default: :obj:`5`)
    """

    def __init__(self, cycle: int = 10, group_size: int = 100, coe_lambda: float = 0.5,
                 time_limit: float = 1.5, profile_repeats: int = 5):
        if cycle < 1:
            raise ValueError(f"cycle must be >= 1, got {cycle}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 <= coe_lambda <= 1.0:
            raise ValueError(f"coe_lambda must be in [0, 1], got {coe_lambda}")
        self.cycle, self.group_size, self.coe_lambda = cycle, group_size, coe_lambda
        self.time_limit, self.profile_repeats = time_limit, profile_repeats
        self.cost: CostModel | None = None
        #: ``(predicted, measured)`` seconds of the cost model's check exchanges.
        self.cost_check: list[tuple[float, float]] = []
        #: Seconds rank 0 spent solving at the last re-assignment.
        self.last_solve_time: float | None = None
        #: Rows at each width by key, all workers, of the last re-assignment.
        self.histogram: dict[str, dict[int, int]] = {}
        #: How each key was solved at the last re-assignment (groups, method, seconds).
        self.solve_info: dict[str, dict] = {}
        #: This worker's ``set_bits`` arguments by key.
        self.assignment: dict[str, tuple[dict[int, Tensor], dict[int, Tensor]]] = {}
        self._tracer: RangeTracer | None = None

    def on_epoch_start(self, epoch: int, graph: DistGraph) -> None:
        ex = graph.exchange
        if self._tracer is None or ex.tracer is not self._tracer:
            self._tracer = RangeTracer()
            ex.tracer = self._tracer
            ex.default_bits = int(WIDTHS[-1])
            for key, (send, recv) in self.assignment.items():  # restored from a checkpoint
                ex.set_bits(key, send, recv)
        if ex.transport is None:
            return  # one worker: nothing is exchanged, nothing to assign
        if epoch > 0 and epoch % self.cycle == 0:
            self.reassign(graph)

    # --- cost model -----------------------------------------------------------------------------

    def _profile(self, graph: DistGraph, widths: list[int]) -> None:
        """Fits the cost model on the exchange's transport and checks it with
        random assignments of the traced keys' `widths` (collective)."""
        lg, transport = graph.graph, graph.exchange.transport
        send = {p: int(i.numel()) for p, i in lg.send_index.items()}
        recv = {p: int(i.numel()) for p, i in lg.recv_index.items()}
        self.cost = profile_cost_model(transport, send, recv, profile_row_bytes(widths),
                                       self.profile_repeats)
        self.cost_check = check_cost_model(self.cost, transport, send, recv, widths,
                                           repeats=self.profile_repeats)
        if dist.get_rank() == 0:
            log.info("cost model: alpha %s s/B, beta %s s, free %s B; predicted vs measured: %s",
                     {i: f"{a:.3g}" for i, a in self.cost.alpha.items()},
                     {i: f"{b:.3g}" for i, b in self.cost.beta.items()},
                     {i: f"{f:.3g}" for i, f in self.cost.free.items()},
                     ", ".join(f"{p * 1e3:.3f}/{m * 1e3:.3f} ms" for p, m in self.cost_check))

    # --- re-assignment --------------------------------------------------------------------------

    def reassign(self, graph: DistGraph) -> None:
        """Gathers traces and scores on rank 0, solves, installs the widths (collective)."""
        traces = self._tracer.collect() if self._tracer is not None else {}
        if self.cost is None and graph.quantize:
            # A worker without messages traced nothing: every worker checks the union.
            traced = set(self._tracer.widths.values()) if self._tracer is not None else set()
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, traced)
            widths = sorted(set().union(*everyone))
            self._profile(graph, widths or [int(graph.graph.x.size(1))])
        mine = {"traces": {k: {p: t.numpy() for p, t in by_peer.items()}
                           for k, by_peer in traces.items()},
                "widths": dict(self._tracer.widths) if self._tracer is not None else {},
                "scores": _forward_scores(graph)}
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        box = [self._solve(gathered) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        bits, self.histogram, self.solve_info, self.last_solve_time = box[0]
        if not bits:
            return  # nothing was traced (e.g. no quantized exchange): keep the assignment
        lg = graph.graph
        for key, channels in bits.items():
            # Forward rows go out in send_index order; backward rows (halo
            # gradients) in recv_index order.
            out, into = ((lg.send_index, lg.recv_index) if key.startswith("forward")
                         else (lg.recv_index, lg.send_index))
            send = {p: _channel_bits(channels, (rank, p), i.numel()) for p, i in out.items()}
            recv = {p: _channel_bits(channels, (p, rank), i.numel()) for p, i in into.items()}
            graph.exchange.set_bits(key, send, recv)
            self.assignment[key] = (send, recv)
        if rank == 0:
            log.info("adaptive bits: solved %d keys in %.3f s; %s", len(bits),
                     self.last_solve_time,
                     "; ".join(f"{k} {self.solve_info[k]['groups']} groups "
                               f"({self.solve_info[k]['method']}): {self.histogram[k]}"
                               for k in sorted(bits)))

    def _solve(self, gathered: list[dict]) -> tuple[dict[str, ChannelBits], dict, dict, float]:
        """Rank 0: the widths of every row of every channel, by key."""
        t0 = time.perf_counter()
        keys = sorted({k for part in gathered for k in part["traces"]})
        bits, hist, info = {}, {}, {}
        for key in keys:
            width = max(part["widths"].get(key, 0) for part in gathered)
            layer = int(key.split()[-1])
            channels, coef, sender, rows = [], [], [], []
            for i, part in enumerate(gathered):
                for j, trace in sorted(part["traces"].get(key, {}).items()):
                    c = trace
                    if key.startswith("forward"):
                        score = gathered[j]["scores"].get(layer, {}).get(i)
                        c = trace * score if score is not None else trace
                    group_coef, order = group_messages(c, self.group_size)
                    channels.append((i, j, order))
                    coef.append(group_coef)
                    sender.append(np.full(group_coef.size, i))
                    rows.append(np.diff(np.r_[np.arange(0, order.size, self.group_size),
                                              order.size]))
            problem = KeyProblem(width, np.concatenate(sender), np.concatenate(rows),
                                 np.concatenate(coef))
            sol = solve_key(problem, self.cost, self.coe_lambda, self.time_limit / len(keys))
            bits[key], at = {}, 0
            for i, j, order in channels:
                per_row = np.empty(order.size, dtype=np.int64)
                group = np.arange(order.size) // self.group_size
                per_row[order] = sol.bits[at + group]
                at += -(-order.size // self.group_size)
                bits[key][(i, j)] = torch.from_numpy(per_row)
            hist[key] = {int(b): int((problem.rows[sol.bits == b]).sum()) for b in WIDTHS}
            info[key] = {"groups": problem.num_groups, "method": sol.method,
                         "objective": sol.objective, "solve_time": sol.solve_time}
        return bits, hist, info, time.perf_counter() - t0

    def report(self) -> dict:
        """What the run's summary records: the cost model, its check, the last solve."""
        return {"cost_model": self.cost.state_dict() if self.cost is not None else None,
                "cost_check": [list(c) for c in self.cost_check],
                "last_solve_time": self.last_solve_time, "solve": self.solve_info}

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"cycle": self.cycle, "group_size": self.group_size,
                "coe_lambda": self.coe_lambda, "time_limit": self.time_limit,
                "cost": self.cost.state_dict() if self.cost is not None else None,
                "cost_check": list(self.cost_check), "assignment": self.assignment,
                "histogram": self.histogram, "last_solve_time": self.last_solve_time}

    def load_state_dict(self, state: dict) -> None:
        """Restores the allocator; the assignment is installed at the next epoch."""
        self.cycle, self.group_size = state["cycle"], state["group_size"]
        self.coe_lambda, self.time_limit = state["coe_lambda"], state["time_limit"]
        self.cost = CostModel.from_state_dict(state["cost"]) if state["cost"] else None
        self.cost_check = list(state["cost_check"])
        self.assignment = state["assignment"]
        self.histogram, self.last_solve_time = state["histogram"], state["last_solve_time"]
        self._tracer = None  # re-attach and re-install at the next epoch


def _channel_bits(channels: ChannelBits, channel: tuple[int, int], num_rows: int) -> Tensor:
    """A channel's widths; 8 bits for one nobody traced (both ends agree on that)."""
    bits = channels.get(channel)
    return bits if bits is not None else torch.full((num_rows,), int(WIDTHS[-1]))


def _forward_scores(graph: DistGraph) -> dict[int, dict[int, np.ndarray]]:
    r"""Scores of the forward rows this worker receives, by layer and sender,
    in the sender's row order: :math:`\sum_v a_{vu}^2` per halo column."""
    lg = graph.graph
    scores = {}
    for layer, (_, a_halo) in graph.layer_adjacency.items():
        m = a_halo.matrix
        colsq = torch.zeros(lg.num_halo, dtype=torch.float64)
        if a_halo.nnz:
            colsq.index_add_(0, m.col_indices().cpu(), m.values().cpu().double().square())
        scores[layer] = {r: colsq[idx.cpu()].numpy() for r, idx in lg.recv_index.items()}
    return scores

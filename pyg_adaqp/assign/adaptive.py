r"""`AdaptiveBits`: AdaQP's adaptive bit-width allocator as a trainer callback (SPEC 7).

Schedule: :meth:`AdaptiveBits.setup` measures the cost model once, before
epoch 0 and outside every epoch's time.  Epoch 0 exchanges at 8 bits while a
:class:`RangeTracer` records every row's range statistic and power; the
first assignment is made from those traces at the start of epoch 1, and
then re-made every ``cycle`` epochs from the traces of the cycle.  At each,
rank 0 gathers traces and scores, solves one MILP per exchange key
(:func:`~pyg_adaqp.assign.milp.solve_key`) and broadcasts the widths, and
every worker installs them with :meth:`~pyg_adaqp.comm.HaloExchange.set_bits`.

The variance a row :math:`m` adds at :math:`b` bits is modelled as
:math:`c_m / (2^b - 1)^2` with :math:`c_m = s(m) \cdot \mathrm{trace}(m)`.
A forward row :math:`u` sent to worker :math:`j` scores
:math:`s(u) = \sum_v a_{vu}^2` over its edges into :math:`j`'s owned nodes
(the squared weights: independent noise adds in variance), which :math:`j`
reads off the column sums of squares of its halo adjacency; backward rows
are already aggregated gradients and score 1.  The signal of a key is
:math:`S = \sum_m s(m) \lVert x_m \rVert^2`, the power its messages carry
into the aggregation, so ``variance_budget`` is a noise-to-signal ratio.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pyg_adaqp.assign.cost_model import CostModel, profile_cost_model
from pyg_adaqp.assign.milp import _LEVELS, WIDTHS, KeyProblem, group_messages, solve_key
from pyg_adaqp.assign.tracer import RangeTracer
from pyg_adaqp.nn import DistGraph

log = logging.getLogger(__name__)
#: Channel (sender, receiver) -> width of every row it carries, in send order.
ChannelBits = dict[tuple[int, int], Tensor]
#: The default noise-to-signal budget of every exchange key (see the README).
DEFAULT_BUDGET = 0.02


class AdaptiveBits:
    r"""Chooses every message row's width from {2, 4, 8} by a MILP per exchange key.

    Args:
        cycle (int, optional): Epochs between re-assignments; the first is
            made at the start of epoch 1 from epoch 0's traces. (default: :obj:`10`)
        group_size (int, optional): Messages of one channel sharing a width.
            (default: :obj:`100`)
        coe_lambda (float, optional): Weight :math:`\lambda` of the variance
            term against the time term of the paper's objective, used when
            `variance_budget` is :obj:`None`. (default: :obj:`0.5`)
        variance_budget (float, optional): The fastest assignment whose
            quantization noise stays within this fraction of the power of
            the exchanged messages, per exchange key; :obj:`None` uses the
            paper's weighted sum with `coe_lambda`. (default: :obj:`0.02`)
        time_limit (float, optional): Seconds the MILPs of one
            re-assignment may take together. (default: :obj:`1.5`)
        profile_repeats (int, optional): Timed exchanges per size when
            profiling the links. (default: :obj:`2`)
    """

    def __init__(self, cycle: int = 10, group_size: int = 100, coe_lambda: float = 0.5,
                 variance_budget: float | None = DEFAULT_BUDGET, time_limit: float = 1.5,
                 profile_repeats: int = 2):
        if cycle < 1:
            raise ValueError(f"cycle must be >= 1, got {cycle}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 <= coe_lambda <= 1.0:
            raise ValueError(f"coe_lambda must be in [0, 1], got {coe_lambda}")
        if variance_budget is not None and not variance_budget >= 0.0:
            raise ValueError(f"variance_budget must be >= 0 or None, got {variance_budget}")
        self.cycle, self.group_size, self.coe_lambda = cycle, group_size, coe_lambda
        self.variance_budget = variance_budget
        self.time_limit, self.profile_repeats = time_limit, profile_repeats
        self.cost: CostModel | None = None
        #: Seconds :meth:`setup` took on this worker, and when (``time.time()``).
        self.setup_time = 0.0
        self.setup_window: tuple[float, float] | None = None
        #: ``(key, predicted, measured)`` seconds of real exchanges: the
        #: solver's prediction of a key and the slowest worker's encode +
        #: decode + wait in the epoch after it.
        self.cost_check: list[tuple[str, float, float]] = []
        #: Seconds rank 0 spent solving at the last re-assignment.
        self.last_solve_time: float | None = None
        #: Rows at each width by key, all workers, of the last re-assignment.
        self.histogram: dict[str, dict[int, int]] = {}
        #: How each key was solved at the last re-assignment.
        self.solve_info: dict[str, dict] = {}
        #: This worker's ``set_bits`` arguments by key.
        self.assignment: dict[str, tuple[dict[int, Tensor], dict[int, Tensor]]] = {}
        self._tracer: RangeTracer | None = None
        self._observed: dict[str, dict[str, float]] = {}  # this worker's last epoch, by key
        self._predicted: dict[str, float] = {}            # rank 0: the last solve's times

    # --- set-up, before epoch 0 -----------------------------------------------------------------

    def setup(self, graph: DistGraph) -> None:
        """Measures the cost model (collective; before the first epoch).

        Bounded: the codec is timed on ~0.5M synthetic elements per width,
        the links in one round per worker at four sizes up to 768 KiB
        (about a second for 4 hosts at 100 Mbit/s).  Skipped when the model
        came from a checkpoint or nothing is exchanged.
        """
        t0, started = time.perf_counter(), time.time()
        self._attach(graph)
        ex = graph.exchange
        if ex.transport is not None and graph.quantize and self.cost is None:
            self.cost = profile_cost_model(ex.transport, ex.device, self.profile_repeats)
            if dist.get_rank() == 0:
                log.info("cost model: %s", _describe(self.cost))
        self.setup_time = time.perf_counter() - t0
        self.setup_window = (started, time.time())

    def _attach(self, graph: DistGraph) -> None:
        ex = graph.exchange
        if self._tracer is None or ex.tracer is not self._tracer:
            self._tracer = RangeTracer()
            ex.tracer = self._tracer
            ex.default_bits = int(WIDTHS[-1])
            for key, (send, recv) in self.assignment.items():  # restored from a checkpoint
                ex.set_bits(key, send, recv)

    def on_epoch_start(self, epoch: int, graph: DistGraph) -> None:
        self._attach(graph)
        if graph.exchange.transport is None or self.cost is None:
            return  # one worker, or full precision: nothing to assign
        if epoch == 1 or (epoch > 1 and epoch % self.cycle == 0):
            self.reassign(graph)

    def observe(self, stats: dict) -> None:
        """Takes this worker's exchange counters of a training epoch
        (:class:`~pyg_adaqp.comm.exchange.ExchangeStats` by key)."""
        self._observed = {}
        for key, s in stats.items():
            if s.calls and not key.startswith("input"):
                self._observed[key] = {"hidden": s.central_time / s.calls,
                                       "measured": (s.quant_time + s.wait_time) / s.calls}

    # --- re-assignment --------------------------------------------------------------------------

    def reassign(self, graph: DistGraph) -> None:
        """Gathers traces and scores on rank 0, solves, installs the widths (collective)."""
        traces, power = self._tracer.collect() if self._tracer is not None else ({}, {})
        mine = {"traces": {k: {p: t.numpy() for p, t in by_peer.items()}
                           for k, by_peer in traces.items()},
                "power": {k: {p: t.numpy() for p, t in by_peer.items()}
                          for k, by_peer in power.items()},
                "widths": dict(self._tracer.widths) if self._tracer is not None else {},
                "scores": _forward_scores(graph), "observed": self._observed,
                "overlap": graph.overlap}
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        box = [self._solve(gathered) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        bits, self.histogram, self.solve_info, self.last_solve_time, checks = box[0]
        self.cost_check += checks
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

    def _solve(self, gathered: list[dict]) -> tuple:
        """Rank 0: the widths of every row of every channel, by key."""
        t0 = time.perf_counter()
        # The previous solve's predictions against the epoch just measured.
        checks = []
        for key, predicted in self._predicted.items():
            measured = [part["observed"][key]["measured"] for part in gathered
                        if key in part["observed"]]
            if measured:
                checks.append((key, predicted, max(measured)))
        keys = sorted({k for part in gathered for k in part["traces"]})
        bits, hist, info, self._predicted = {}, {}, {}, {}
        for key in keys:
            problem, channels = self._problem(key, gathered)
            sol = solve_key(problem, self.cost, self.coe_lambda, self.time_limit / len(keys),
                            budget=self.variance_budget)
            bits[key], at = {}, 0
            for i, j, order in channels:
                per_row = np.empty(order.size, dtype=np.int64)
                group = np.arange(order.size) // self.group_size
                per_row[order] = sol.bits[at + group]
                at += -(-order.size // self.group_size)
                bits[key][(i, j)] = torch.from_numpy(per_row)
            hist[key] = {int(b): int((problem.rows[sol.bits == b]).sum()) for b in WIDTHS}
            s = problem.signal
            info[key] = {"groups": problem.num_groups, "method": sol.method,
                         "objective": sol.objective, "solve_time": sol.solve_time,
                         "predicted_s": sol.seconds, "noise": sol.noise,
                         "noise_uniform": {int(b): float(problem.coef.sum() / lv / s) if s > 0
                                           else 0.0 for b, lv in zip(WIDTHS, _LEVELS)}}
            self._predicted[key] = sol.seconds
        return bits, hist, info, time.perf_counter() - t0, checks

    def _problem(self, key: str, gathered: list[dict]) -> tuple[KeyProblem, list]:
        """The key's groups over all channels, and each channel's message order."""
        width = max(part["widths"].get(key, 0) for part in gathered)
        layer = int(key.split()[-1])
        forward = key.startswith("forward")
        channels, coef, sender, receiver, rows = [], [], [], [], []
        signal = 0.0
        for i, part in enumerate(gathered):
            for j, trace in sorted(part["traces"].get(key, {}).items()):
                c, power = trace, part["power"][key][j]
                if forward:
                    score = gathered[j]["scores"].get(layer, {}).get(i)
                    if score is not None:
                        c, power = trace * score, power * score
                signal += float(power.sum())
                group_coef, order = group_messages(c, self.group_size)
                channels.append((i, j, order))
                coef.append(group_coef)
                sender.append(np.full(group_coef.size, i))
                receiver.append(np.full(group_coef.size, j))
                rows.append(np.diff(np.r_[np.arange(0, order.size, self.group_size),
                                          order.size]))
        # The owned-row aggregation overlaps the exchange: forward layer l's
        # measured time, and in backward its transpose, which costs the same.
        forward_key = f"forward {layer}"
        hidden = {i: part["observed"].get(forward_key, {}).get("hidden", 0.0)
                  for i, part in enumerate(gathered) if part["overlap"]}
        cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))
        return KeyProblem(width, cat(sender), cat(receiver), cat(rows), cat(coef), signal,
                          hidden), channels

    def report(self) -> dict:
        """What the run's summary records: the cost model, its check, the last solve."""
        return {"cost_model": self.cost.state_dict() if self.cost is not None else None,
                "setup_time": self.setup_time, "setup_window": self.setup_window,
                "variance_budget": self.variance_budget,
                "cost_check": [list(c) for c in self.cost_check],
                "last_solve_time": self.last_solve_time, "solve": self.solve_info}

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"cycle": self.cycle, "group_size": self.group_size,
                "coe_lambda": self.coe_lambda, "variance_budget": self.variance_budget,
                "time_limit": self.time_limit,
                "cost": self.cost.state_dict() if self.cost is not None else None,
                "cost_check": list(self.cost_check), "assignment": self.assignment,
                "histogram": self.histogram, "last_solve_time": self.last_solve_time}

    def load_state_dict(self, state: dict) -> None:
        """Restores the allocator; the assignment is installed at the next epoch."""
        self.cycle, self.group_size = state["cycle"], state["group_size"]
        self.coe_lambda, self.time_limit = state["coe_lambda"], state["time_limit"]
        self.variance_budget = state["variance_budget"]
        self.cost = CostModel.from_state_dict(state["cost"]) if state["cost"] else None
        self.cost_check = list(state["cost_check"])
        self.assignment = state["assignment"]
        self.histogram, self.last_solve_time = state["histogram"], state["last_solve_time"]
        self._tracer = None  # re-attach and re-install at the next epoch


def _describe(cost: CostModel) -> str:
    def mbit(s_per_byte: float) -> str:
        return f"{8e-6 / s_per_byte:.0f}" if s_per_byte > 0 else "inf"

    return "; ".join(f"worker {i}: up {mbit(cost.up[i])} / down {mbit(cost.down[i])} Mbit/s, "
                     f"beta {1e3 * cost.beta[i]:.2f} ms, free {cost.free[i] / 1e3:.0f} KB"
                     for i in sorted(cost.up))


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

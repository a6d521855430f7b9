r"""`AdaptiveBits`: AdaQP's adaptive bit-width allocator as a trainer callback (SPEC 7).

Schedule: :meth:`AdaptiveBits.setup` measures the cost model once, before
epoch 0 and outside every epoch's time.  Epoch 0 exchanges at ``first_bits``
(8 by default) while a
:class:`RangeTracer` records every row's range statistic and each key's signal; the
first assignment is made from those traces at the start of epoch 1, and
then re-made every ``cycle`` epochs from the traces of the epoch before it
(only that epoch is traced: the statistic costs a pass over every message
and output, and the ranges move slowly).  The first update moves them
most: where the first assignment put any row above 2 bits, it is made
again at the start of epoch 2 from epoch 1's traces.  SAGE on the
benchmarks' graph had 8-9% of its first layer's rows at 4 bits from
epoch 0's traces and every row at 2 bits from epoch 1's, as at every
later re-assignment: until epoch 10 it sent rows at widths the budget
no longer asked for (docs/benchmarks.md, twenty-seventh pass).  A first
assignment of every row at 2 bits (GCN there) has nothing to narrow and
waits for the cycle, as does a run resumed at epoch 2 (epoch 1's traces
are not checkpointed).  At each,
every sender groups its rows, rank 0 gathers the groups' sums, solves one
MILP per exchange key (:func:`~pyg_adaqp.assign.milp.solve_key`) and returns
each sender its groups' widths, the senders tell their receivers, and every
worker installs them with :meth:`~pyg_adaqp.comm.HaloExchange.set_bits`.
A re-assignment that leaves every channel at the one width it already
carries (every row at 2 bits, once training settles) stops after rank 0's
reply: nothing is told or installed.

The variance a row :math:`m` adds at :math:`b` bits is modelled as
:math:`c_m / (2^b - 1)^2` with :math:`c_m = s(m) \cdot \mathrm{trace}(m)`.
A forward row :math:`u` sent to worker :math:`j` scores
:math:`s(u) = \sum_v a_{vu}^2` over its edges into :math:`j`'s owned nodes
(the squared weights: independent noise adds in variance), which :math:`j`
reads off the column sums of squares of its halo adjacency; backward rows
are already aggregated gradients and score 1.  The signal of a key is the
power of what its messages are added into, summed over every worker's owned
rows: the layer's aggregated output in forward, the gradient of the rows
sent in backward.  So ``variance_budget`` is a noise-to-signal power ratio
of the layer's output, and ``gradient_budget`` of its input gradient.

The two directions get budgets of their own because their noise does not
cost alike.  Backward noise is zero-mean noise on a gradient, which the
optimizer averages over the epochs as it does any unbiased gradient noise;
forward noise enters the activations that every later layer and the loss
are computed from, through nonlinearities, so it changes what is learned.
Measured (``docs/benchmarks.md``, sixteenth pass): on a graph where uniform
2 bits cost GCN 1.9 pt, one budget of 0.1 left it 0.5 pt below full
precision (3 seeds), and a tighter budget on the gradients alone did not
help; a forward budget of 0.03 held every seed within 0.25 pt, with the
gradients' still at 0.1.

Links change during training (a congested switch port, a host moved to a
slower network). Every exchange times each peer's buffer from posting to
arrival; at each re-assignment rank 0 divides every pair's arrival by the
profiled model's prediction, in every epoch since the last re-assignment,
and compares the (lower) median of those epochs' ratios with the best seen
for that pair. The median over epochs, not the last epoch: an arrival also
counts the time its sender was late to post (a worker pre-empted while it
computed, 4 workers sharing 2 cores), and one late epoch read a link up to
10x slower, which scaled the next solve's predictions up to 8x the
exchanges measured (``benchmarks/throughput.py``, SAGE at 100 Mbit/s); a
link that stays slow is slow in most epochs. A worker's uplink runs ``min``
over its receivers of that slow-down, its downlink ``min`` over its senders
(a slow peer at the other end is not charged to it). The downlink's figure
is a lower bound: a worker behind its peers posts its receives late, when
part of their data has already crossed, and the 10x slower link of
``benchmarks/faults.py`` measured 8.7x up but 4.8x down. So a worker's link
counts as slowed by the larger of the two, both ways; a slow-down of at
least :data:`DRIFT_BAND` scales the profiled rates for this solve, so the
slow host's channels move to lower widths and return when the link
recovers. No traffic is added.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pyg_adaqp.assign.cost_model import CostModel, profile_cost_model
from pyg_adaqp.assign.milp import _LEVELS, WIDTHS, KeyProblem, group_messages, solve_key
from pyg_adaqp.assign.tracer import RangeTracer
from pyg_adaqp.nn import DistGraph

log = logging.getLogger(__name__)
#: The default noise-to-signal budget of the forward keys (about -15 dB; see the README).
DEFAULT_BUDGET = 0.03
#: The default budget of the backward keys (the gradients; -10 dB).
DEFAULT_GRADIENT_BUDGET = 0.1
#: A link's slow-down (measured arrival over predicted, against its best) below
#: this is taken as noise; at or above it, the link's profiled rate is scaled.
DRIFT_BAND = 2.0
#: Pairs whose predicted link time is below this are too short to time.
MIN_PREDICTED_S = 1e-4
#: Most groups of one channel: past it, groups grow beyond ``group_size``.
#: 32 per channel keep one key of a 4-worker job to ~400 groups, which HiGHS
#: solves in ~50 ms (``benchmarks/allocator_solve.py``; ~0.12 s at 2,000).
MAX_GROUPS_PER_CHANNEL = 32


#: The allocator's settings: a checkpoint records them, a resumed run keeps its own.
KNOBS = ("cycle", "group_size", "variance_budget", "gradient_budget", "coe_lambda",
         "time_limit")


class AdaptiveBits:
    r"""Chooses every message row's width from {2, 4, 8} by a MILP per exchange key.

    Args:
        cycle (int, optional): Epochs between re-assignments; the first is
            made at the start of epoch 1 from epoch 0's traces, and made
            again at epoch 2 where it put any row above 2 bits. (default: :obj:`10`)
        group_size (int, optional): Messages of one channel sharing a width;
            more where a channel would have more than
            :data:`MAX_GROUPS_PER_CHANNEL` groups. (default: :obj:`100`)
        coe_lambda (float, optional): Weight :math:`\lambda` of the variance
            term against the time term of the paper's objective, used when
            `variance_budget` is :obj:`None`. (default: :obj:`0.5`)
        variance_budget (float, optional): The fastest assignment whose
            quantization noise stays within this fraction of the power of
            the layer's aggregated output, per forward exchange key;
            :obj:`None` uses the paper's weighted sum with `coe_lambda` for
            every key. (default: :obj:`0.03`)
        time_limit (float, optional): Seconds the MILPs of one
            re-assignment may take together; past it the greedy answer
            stands.  Under a budget a key's MILP also runs no longer than
            it could save over the epochs its widths serve
            (:meth:`epochs_served`; :func:`~pyg_adaqp.assign.milp.solve_key`'s
            `uses`).
            (default: :obj:`0.3`)
        profile_repeats (int, optional): Timed exchanges per size when
            profiling the links (their median counts; the input's columns,
            where they are the round of every link, are exchanged once).
            (default: :obj:`1`)
        first_bits (int, optional): Width of every quantized row in epoch 0,
            before the first assignment. (default: :obj:`8`)
        gradient_budget (float, optional): The same for the backward keys,
            as a fraction of the power of the gradient of the layer's input
            rows; :obj:`None`: `variance_budget`. Unused without a
            `variance_budget`. (default: :obj:`0.1`)
    """

    def __init__(self, cycle: int = 10, group_size: int = 100, coe_lambda: float = 0.5,
                 variance_budget: float | None = DEFAULT_BUDGET, time_limit: float = 0.3,
                 profile_repeats: int = 1, first_bits: int = 8,
                 gradient_budget: float | None = DEFAULT_GRADIENT_BUDGET):
        if cycle < 1:
            raise ValueError(f"cycle must be >= 1, got {cycle}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 <= coe_lambda <= 1.0:
            raise ValueError(f"coe_lambda must be in [0, 1], got {coe_lambda}")
        for name, budget in (("variance_budget", variance_budget),
                             ("gradient_budget", gradient_budget)):
            if budget is not None and not budget >= 0.0:
                raise ValueError(f"{name} must be >= 0 or None, got {budget}")
        if not time_limit >= 0.0:
            raise ValueError(f"time_limit must be >= 0 seconds, got {time_limit}")
        if profile_repeats < 1:
            raise ValueError(f"profile_repeats must be >= 1, got {profile_repeats}")
        if first_bits not in WIDTHS:
            raise ValueError(f"first_bits must be one of {tuple(int(b) for b in WIDTHS)}, "
                             f"got {first_bits}")
        self.cycle, self.group_size, self.coe_lambda = cycle, group_size, coe_lambda
        self.variance_budget, self.gradient_budget = variance_budget, gradient_budget
        self.time_limit, self.profile_repeats = time_limit, profile_repeats
        self.first_bits = int(first_bits)
        self.cost: CostModel | None = None
        #: Seconds :meth:`setup` took on this worker, and when (``time.time()``).
        self.setup_time = 0.0
        self.setup_window: tuple[float, float] | None = None
        #: Seconds of each part of the set-up on this worker (``took_s`` of
        #: :func:`~pyg_adaqp.assign.cost_model.profile_cost_model`'s record).
        self.setup_parts: dict[str, float] = {}
        #: The input's columns that were the set-up's round of every link at
        #: once (0: dummy bytes, or no profile ran; see :meth:`setup`).
        self.setup_input_columns = 0
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
        self._exchange = None  # the exchange the assignment is installed in
        self._observed: dict[str, dict[str, float]] = {}  # this worker's last epoch, by key
        #: This worker's arrivals and bytes per peer by key, one dict per training
        #: epoch since the last re-assignment.
        self._arrivals: list[dict[str, dict[str, dict[int, float]]]] = []
        self._predicted: dict[str, float] = {}            # rank 0: the last solve's times
        #: Scores of the forward rows this worker sends, by layer and receiver (static).
        self._scores: dict[int, dict[int, np.ndarray]] | None = None
        #: Message order and group sizes of the last grouping, by key and receiver.
        self._orders: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        #: Rank 0: each re-assignment's epoch, link slow-downs, and per channel
        #: ``i->j`` the rows at each width (all keys) and their mean width.
        self.history: list[dict] = []
        self._best_ratio: dict[tuple[int, int], float] = {}  # (receiver, sender) -> best
        #: Rank 0: each channel's one width ``(key, sender, receiver) -> bits``
        #: as installed by the last re-assignment (None where it was mixed;
        #: empty before the first, after a resume and on a new exchange).
        self._installed: dict[tuple[str, int, int], int | None] = {}
        self._epoch = 0
        #: Whether epoch 2 re-assigns: the first assignment put a row above 2 bits.
        self._revisit = False

    # --- set-up, before epoch 0 -----------------------------------------------------------------

    def setup(self, graph: DistGraph, x: Tensor | None = None) -> None:
        """Measures the cost model (collective; before the first epoch).

        Where `x` is the input that training will pass to the first layer
        and the graph caches it (:meth:`~pyg_adaqp.nn.DistGraph.input_load`),
        the links' round of every link at once exchanges as many of its
        columns as the round's bytes take, which layer 0 then does not
        exchange again; without `x`, or where its columns are too few, a
        round of dummy bytes.

        Bounded: the codec is timed on ~0.13M synthetic elements per width,
        the links in two warm-ups, one round per worker at four sizes up to
        512 KiB (256 KiB where a link is slow, one more of 2 MiB where the
        links are fast) and one round of all links (2 MiB where the links
        are slow and even or fast, else 512 KiB; at least that where the
        input's columns are the round), then one small exchange
        of every worker at once (its loaded latency).  In all 0.76-0.78 s
        on rank 0 for 4 hosts at 100 Mbit/s in ``benchmarks/cost_model.py``,
        and 0.50-0.56 s at 1 Gbit/s by the slowest worker in training
        (docs/benchmarks.md, twenty-ninth pass); each part in
        :attr:`setup_parts`.  One slow link halves every worker's owner
        rounds; where it held a faster worker's round, that worker's
        rounds run again without it, among faster links (up to 2 MiB: on
        3 x 1 Gbit/s + 1 x 100 Mbit/s the owner rounds took 0.21-0.24 s
        against 0.10-0.12 before, thirtieth pass).  Skipped when the
        model came from a checkpoint or nothing is exchanged.
        """
        t0, started = time.perf_counter(), time.time()
        self._attach(graph)
        ex = graph.exchange
        if ex.transport is not None and graph.quantize and self.cost is None:
            record: dict = {}
            self.cost = profile_cost_model(ex.transport, ex.device, self.profile_repeats,
                                           record=record,
                                           load=None if x is None else graph.input_load(x))
            self.setup_parts = record["took_s"]
            self.setup_input_columns = record["load_columns"]
            if dist.get_rank() == 0:
                log.info("cost model: %s; its round of every link: %s", _describe(self.cost),
                         f"{self.setup_input_columns} input columns" if self.setup_input_columns
                         else "dummy bytes")
        self.setup_time = time.perf_counter() - t0
        self.setup_window = (started, time.time())

    def _attach(self, graph: DistGraph) -> None:
        ex = graph.exchange
        if ex is not self._exchange:
            self._exchange, self._tracer = ex, RangeTracer()
            self._installed = {}   # a new exchange: the next re-assignment installs in full
            ex.default_bits = self.first_bits
            for key, (send, recv) in self.assignment.items():  # restored from a checkpoint
                ex.set_bits(key, send, recv)

    def budget(self, key: str) -> float | None:
        """The variance budget of exchange `key` (None: the weighted sum): the
        gradient budget for a backward key, if set, else the variance budget."""
        if (self.variance_budget is None or not key.startswith("backward")
                or self.gradient_budget is None):
            return self.variance_budget
        return self.gradient_budget

    def reassigns_at(self, epoch: int) -> bool:
        """Whether the widths are re-assigned at the start of `epoch`: 1,
        every multiple of `cycle` after it, and 2 where the first assignment
        put any row above 2 bits."""
        return (epoch == 1 or (epoch > 1 and epoch % self.cycle == 0)
                or (epoch == 2 and self._revisit))

    def epochs_served(self, epoch: int) -> int:
        """Epochs that the widths assigned at the start of `epoch` serve:
        until the next re-assignment (at most `cycle`).  Epoch 1's count as
        one: epoch 2 replaces them unless every row is at 2 bits, which
        leaves the MILP nothing to improve."""
        served = 1
        while not (self.reassigns_at(epoch + served) or epoch + served == 2):
            served += 1
        return served

    def on_epoch_start(self, epoch: int, graph: DistGraph) -> None:
        self._attach(graph)
        self._epoch = epoch
        if graph.exchange.transport is None or self.cost is None:
            return  # one worker, or full precision: nothing to assign
        if self.reassigns_at(epoch):
            self.reassign(graph)
        graph.exchange.tracer = self._tracer if self.reassigns_at(epoch + 1) else None

    def observe(self, stats: dict) -> None:
        """Takes this worker's exchange counters of a training epoch
        (:class:`~pyg_adaqp.comm.exchange.ExchangeStats` by key): the last
        epoch's times, and every epoch's arrivals until the next
        re-assignment hands them to rank 0 (at most a cycle's)."""
        self._observed, arrivals = {}, {}
        for key, s in stats.items():
            if s.calls and not key.startswith("input"):
                self._observed[key] = {"hidden": s.owned_agg_time / s.calls,
                                       "measured": (s.quant_time + s.wait_time) / s.calls}
                arrivals[key] = {"arrival": {p: t / s.calls for p, t in s.peer_arrival.items()},
                                 "sent": {p: b / s.calls for p, b in s.peer_sent.items()},
                                 "recv": {p: b / s.calls for p, b in s.peer_recv.items()}}
        self._arrivals.append(arrivals)
        # Bounded: without a cost model nothing re-assigns, and nothing else clears it.
        del self._arrivals[:-self.cycle]

    # --- re-assignment --------------------------------------------------------------------------

    def reassign(self, graph: DistGraph) -> None:
        r"""Re-assigns every key's widths from the traces so far (collective).

        Traffic: every sender sorts and groups the rows it sends (forward
        rows by :math:`c_m = s(m) \cdot \mathrm{trace}(m)`, with the scores
        its receivers sent once) and gives rank 0 only each group's
        :math:`C_g` and row count; rank 0 solves and returns one uint8 width
        per group to that sender alone; the sender tells each receiver the
        widths of the rows it will send it, point to point: one uint8 per
        channel whose rows share one width, else one per row
        (:func:`_tell_receivers`); when every channel keeps the one width it
        carries, rank 0 says so and nothing is told.  Every worker
        also gives rank 0 its arrivals per peer of the epochs since the last
        re-assignment (the links' slow-down).
        """
        ex = graph.exchange
        if not self._scores:  # none yet (or no layer has run since a resume)
            self._scores = _exchange_scores(graph)
        traces, signal = self._tracer.collect() if self._tracer is not None else ({}, {})
        groups, self._orders = {}, {}
        for key, by_peer in traces.items():
            layer = int(key.split()[-1])
            for peer, trace in by_peer.items():
                c = trace.numpy()
                if key.startswith("forward") and peer in self._scores.get(layer, {}):
                    c = c * self._scores[layer][peer]
                coef, rows, order = group_messages(c, self.group_size, MAX_GROUPS_PER_CHANNEL)
                groups.setdefault(key, {})[peer] = (coef, rows.astype(np.int32))
                self._orders.setdefault(key, {})[peer] = (order, rows)
        mine = {"groups": groups, "signal": signal,
                "widths": dict(self._tracer.widths) if self._tracer is not None else {},
                "observed": self._observed, "arrivals": self._arrivals,
                "encode_share": {key: ex.encode_share(key) for key in groups},
                "overlap": graph.overlap}
        self._arrivals = []
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        parts = self._solve(gathered) if rank == 0 else [None] * world
        box = [None]
        dist.scatter_object_list(box, parts, src=0)
        keys, group_bits, unchanged, narrowest = box[0]
        if not keys:
            return  # nothing was traced (e.g. no quantized exchange): keep the assignment
        if self._epoch == 1:
            self._revisit = not narrowest
        if rank == 0:
            log.info("adaptive bits: solved %d keys in %.3f s%s; %s", len(keys),
                     self.last_solve_time, " (unchanged)" if unchanged else "",
                     "; ".join(f"{k} {self.solve_info[k]['groups']} groups "
                               f"({self.solve_info[k]['method']}): {self.histogram[k]}"
                               for k in keys))
        if unchanged:
            return  # every channel keeps the one width it carries: nothing to tell or install
        lg = graph.graph
        # Forward rows go out in send_index order; backward rows (halo
        # gradients) in recv_index order.
        plan = [(key, *((lg.send_index, lg.recv_index) if key.startswith("forward")
                        else (lg.recv_index, lg.send_index))) for key in keys]
        send = {key: {p: self._row_bits(key, p, group_bits, idx.numel())
                      for p, idx in out.items()} for key, out, _ in plan}
        recv = _tell_receivers(ex.transport, ex.device, send, plan)
        for key, _, _ in plan:
            ex.set_bits(key, send[key], recv[key])
            self.assignment[key] = (send[key], recv[key])

    def _row_bits(self, key: str, peer: int, group_bits: dict, num_rows: int) -> Tensor:
        """Widths of the rows this worker sends `peer` under `key`, in send order."""
        widths = group_bits.get(key, {}).get(peer)
        if widths is None:  # untraced (no rows): as before the first assignment
            return torch.full((num_rows,), self.first_bits, dtype=torch.uint8)
        order, rows = self._orders[key][peer]
        per_row = np.empty(order.size, dtype=np.uint8)
        per_row[order] = np.repeat(widths, rows)
        return torch.from_numpy(per_row)

    def _solve(self, gathered: list[dict]) -> list[tuple]:
        """Rank 0: solves every key; returns what each rank gets: the keys,
        its groups' widths, whether every channel keeps the one width it
        was installed with, and whether every row is at 2 bits (the last two
        the same for every rank)."""
        t0 = time.perf_counter()
        # The previous solve's predictions against the epoch just measured.
        for key, predicted in self._predicted.items():
            measured = [part["observed"][key]["measured"] for part in gathered
                        if key in part["observed"]]
            if measured:
                self.cost_check.append((key, float(predicted), float(max(measured))))
        keys = sorted({k for part in gathered for k in part["groups"]})
        out: list[dict] = [{} for _ in gathered]
        hist, info, self._predicted = {}, {}, {}
        drift = self._link_drift(gathered)
        cost = dataclasses.replace(
            self.cost, up={i: r * drift.get(i, 1.0) for i, r in self.cost.up.items()},
            down={i: r * drift.get(i, 1.0) for i, r in self.cost.down.items()})
        channel_rows: dict[str, dict[int, int]] = defaultdict(lambda: {int(b): 0 for b in WIDTHS})
        for key in keys:
            problem, channels = self._problem(key, gathered)
            # The widths serve one exchange of the key per epoch until the next re-assignment.
            sol = solve_key(problem, cost, self.coe_lambda, self.time_limit / len(keys),
                            budget=self.budget(key), uses=self.epochs_served(self._epoch))
            by_channel, at = {}, 0
            for i, j, ng in channels:
                widths = sol.bits[at:at + ng].astype(np.uint8)
                rows = problem.rows[at:at + ng]
                out[i].setdefault(key, {})[j] = widths
                by_channel[f"{i}->{j}"] = {int(b): int(rows[widths == b].sum()) for b in WIDTHS}
                for b, n in by_channel[f"{i}->{j}"].items():
                    channel_rows[f"{i}->{j}"][b] += n
                at += ng
            hist[key] = {int(b): int((problem.rows[sol.bits == b]).sum()) for b in WIDTHS}
            s = problem.signal
            info[key] = {"groups": problem.num_groups, "method": sol.method,
                         "objective": sol.objective, "solve_time": sol.solve_time,
                         "predicted_s": sol.seconds, "noise": sol.noise,
                         "noise_uniform": {int(b): float(problem.coef.sum() / lv / s) if s > 0
                                           else 0.0 for b, lv in zip(WIDTHS, _LEVELS)},
                         "channels": by_channel}
            self._predicted[key] = sol.seconds
        self.histogram, self.solve_info = hist, info
        installed = {(key, i, j): _one_width(w) for i, mine in enumerate(out)
                     for key, by_peer in mine.items() for j, w in by_peer.items()}
        unchanged = installed == self._installed and None not in installed.values()
        self._installed = installed
        if keys:
            self.history.append({
                "epoch": self._epoch, "unchanged": unchanged,
                # (up, down) in the report; one slow-down counts both ways
                "link_slowdown": {i: [f, f] for i, f in sorted(drift.items())},
                "rows_by_bits": dict(sorted(channel_rows.items())),
                "mean_bits": {c: round(sum(b * n for b, n in h.items()) / sum(h.values()), 3)
                              for c, h in sorted(channel_rows.items()) if sum(h.values())}})
        self.last_solve_time = time.perf_counter() - t0
        narrowest = all(h[int(WIDTHS[0])] == sum(h.values()) for h in hist.values())
        return [(keys, mine, unchanged, narrowest) for mine in out]

    def _link_drift(self, gathered: list[dict]) -> dict[int, float]:
        """Per worker, the slow-down of its link from the arrivals of the epochs
        since the last re-assignment (1.0 within :data:`DRIFT_BAND`): the
        larger of its uplink's and its downlink's estimate, applied both ways
        (see the module)."""
        # The last epochs that every worker observed (they all observe every epoch).
        epochs = min((len(part["arrivals"]) for part in gathered), default=0)
        per_pair: dict[tuple[int, int], list[float]] = defaultdict(list)
        for parts in zip(*(part["arrivals"][len(part["arrivals"]) - epochs:]
                           for part in gathered)):
            for pair, ratio in self._arrival_ratios(list(parts)).items():
                per_pair[pair].append(ratio)
        slow: dict[tuple[int, int], float] = {}
        for pair, values in per_pair.items():
            # The lower median: of an even count, a late half is not yet most epochs.
            now = float(np.sort(values)[(len(values) - 1) // 2])
            best = min(self._best_ratio.get(pair, now), now)
            self._best_ratio[pair] = best
            slow[pair] = now / best
        up: dict[int, list[float]] = defaultdict(list)
        down: dict[int, list[float]] = defaultdict(list)
        for (i, j), f in slow.items():
            up[j].append(f)
            down[i].append(f)

        slowdown = {}
        for w in sorted(set(up) | set(down)):
            f = max(min(up[w], default=1.0), min(down[w], default=1.0))
            slowdown[w] = f if f >= DRIFT_BAND else 1.0
        return slowdown

    def _arrival_ratios(self, parts: list[dict]) -> dict[tuple[int, int], float]:
        """One epoch's arrival over predicted link time per pair ``(receiver,
        sender)``, the median over keys; `parts` holds every worker's arrivals
        and bytes per peer by key of that epoch, by rank."""
        ratios: dict[tuple[int, int], list[float]] = defaultdict(list)
        for key in {k for part in parts for k in part}:
            obs = {i: part[key] for i, part in enumerate(parts) if key in part}
            out = {j: sum(o["sent"].values()) for j, o in obs.items()}
            for i, o in obs.items():
                into = sum(o["recv"].values())
                for j, arrival in o["arrival"].items():
                    # The model's own link time, as the solver sees it.
                    predicted = max(self.cost.link_seconds(j, out.get(j, 0.0), 0.0),
                                    self.cost.link_seconds(i, 0.0, into))
                    if predicted > MIN_PREDICTED_S and arrival > 0:
                        ratios[(i, j)].append(arrival / predicted)
        return {pair: float(np.median(values)) for pair, values in ratios.items()}

    def _problem(self, key: str, gathered: list[dict]) -> tuple[KeyProblem, list]:
        """The key's groups over all channels, and each channel's ``(i, j, groups)``."""
        width = max(part["widths"].get(key, 0) for part in gathered)
        layer = int(key.split()[-1])
        channels, coef, sender, receiver, rows = [], [], [], [], []
        for i, part in enumerate(gathered):
            for j, (group_coef, group_rows) in sorted(part["groups"].get(key, {}).items()):
                channels.append((i, j, group_coef.size))
                coef.append(group_coef)
                rows.append(group_rows)
                sender.append(np.full(group_coef.size, i))
                receiver.append(np.full(group_coef.size, j))
        signal = sum(part["signal"].get(key, 0.0) for part in gathered)
        # The owned-row aggregation overlaps the exchange: forward layer l's
        # measured time, and in backward its transpose, which costs the same.
        forward_key = f"forward {layer}"
        hidden = {i: part["observed"].get(forward_key, {}).get("hidden", 0.0)
                  for i, part in enumerate(gathered) if part["overlap"]}

        def cat(parts: list) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0)

        share = {i: part.get("encode_share", {}).get(key, 1.0) for i, part in enumerate(gathered)}
        return KeyProblem(width, cat(sender), cat(receiver), cat(rows), cat(coef), signal,
                          hidden, share), channels

    def report(self) -> dict:
        """What the run's summary records: the cost model, its check, the last solve."""
        return {"cost_model": self.cost.state_dict() if self.cost is not None else None,
                "setup_time": self.setup_time, "setup_window": self.setup_window,
                "setup_parts": self.setup_parts, "setup_input_columns": self.setup_input_columns,
                "variance_budget": self.variance_budget, "gradient_budget": self.gradient_budget,
                "cost_check": [list(c) for c in self.cost_check],
                "last_solve_time": self.last_solve_time, "solve": self.solve_info,
                "history": self.history}

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**{knob: getattr(self, knob) for knob in KNOBS},
                "cost": self.cost.state_dict() if self.cost is not None else None,
                "cost_check": list(self.cost_check), "assignment": self.assignment,
                "histogram": self.histogram, "last_solve_time": self.last_solve_time,
                "history": list(self.history), "best_ratio": dict(self._best_ratio),
                "arrivals": list(self._arrivals)}

    def load_state_dict(self, state: dict) -> None:
        """Restores the allocator; the assignment is installed at the next epoch.

        The knobs (cycle, group size, the budgets, coe_lambda, time limit)
        stay as this allocator was made, so a resumed run may change them
        (the next re-assignment regroups and solves with them); each that
        differs from the checkpoint's is named in a warning, since the same
        values are what resumes exactly.

        Raises:
            ValueError: If `state` is not an adaptive allocator's.
        """
        # Checkpoints written before the gradients had a budget of their own
        # ran them under the one budget.
        state = {"gradient_budget": state.get("variance_budget"), **state}
        missing = [knob for knob in KNOBS if knob not in state]
        if missing:
            raise ValueError(f"it holds no adaptive allocator state (missing "
                             f"{', '.join(missing)})")
        for knob in KNOBS:
            if state[knob] != getattr(self, knob):
                warnings.warn(f"resuming with the allocator's {knob} = {getattr(self, knob)}; "
                              f"the checkpoint's run used {state[knob]}", stacklevel=2)
        self.cost = CostModel.from_state_dict(state["cost"]) if state["cost"] else None
        self.cost_check = list(state["cost_check"])
        self.assignment = state["assignment"]
        self.histogram, self.last_solve_time = state["histogram"], state["last_solve_time"]
        # (absent from checkpoints written before link slow-downs were followed)
        self.history = list(state.get("history", []))
        self._best_ratio = dict(state.get("best_ratio", {}))
        self._installed = {}   # the next re-assignment tells and installs in full
        self._arrivals = list(state.get("arrivals", []))
        self._exchange = None  # re-attach and re-install at the next epoch


def _one_width(group_bits: np.ndarray) -> int | None:
    """A channel's one width (0 when it has no groups), None when its groups differ."""
    widths = np.unique(group_bits)
    return int(widths[0]) if widths.size == 1 else (0 if widths.size == 0 else None)


def _describe(cost: CostModel) -> str:
    def mbit(s_per_byte: float) -> str:
        return f"{8e-6 / s_per_byte:.0f}" if s_per_byte > 0 else "inf"

    links = [f"worker {i}: up {mbit(cost.up[i])} / down {mbit(cost.down[i])} Mbit/s, "
             f"beta {1e3 * cost.beta[i]:.2f} ms, free {cost.free[i] / 1e3:.0f} KB"
             for i in sorted(cost.up)]
    return "; ".join([*links, f"loaded latency {1e3 * cost.loaded_latency:.2f} ms"])


def _exchange_scores(graph: DistGraph) -> dict[int, dict[int, np.ndarray]]:
    """Every receiver sends each sender the scores of the forward rows it
    receives from it, once (collective); returns this worker's, by layer and
    receiver, in send order."""
    ex, lg = graph.exchange, graph.graph
    mine = _forward_scores(graph)                     # as a receiver: by layer, sender
    layers = sorted(mine)
    if not layers:  # no layer has run yet (every worker alike): nothing to score
        return {}
    send = {p: torch.from_numpy(np.concatenate([mine[layer][p] for layer in layers])
                                .astype(np.float32)).view(torch.uint8)
            for p in lg.recv_index}
    recv_bytes = {p: 4 * len(layers) * int(i.numel()) for p, i in lg.send_index.items()}
    got = ex.transport.start({p: b.to(ex.device) for p, b in send.items()}, recv_bytes,
                             ex.device).wait()
    out: dict[int, dict[int, np.ndarray]] = {layer: {} for layer in layers}
    for p, buf in got.items():
        values = buf.cpu().view(torch.float32).double().numpy().reshape(len(layers), -1)
        for k, layer in enumerate(layers):
            out[layer][p] = values[k]
    return out


#: In :func:`_tell_receivers`' header: the channel's widths follow, one uint8 per row.
PER_ROW = 0


def _tell_receivers(transport, device: torch.device, send: dict[str, dict[int, Tensor]],
                    plan: list) -> dict[str, dict[int, Tensor]]:
    """Sends every receiver the widths of the rows it will get; returns the
    widths received.

    Two exchanges, each one buffer per peer for all keys: a header of one
    uint8 per key, that channel's width when all its rows share it (every
    channel once training settles, e.g. at 2 bits) or :data:`PER_ROW`; then
    one uint8 per row of the channels whose header said so (empty when none
    did: every worker posts it, as a collective transport needs).  Both
    ends count a channel's keys alike because the partition's plans mirror
    each other: a worker sends `p` rows under a key exactly when `p`
    receives rows from it under that key."""
    # Per peer, the keys of its channel in plan order, with the channel's rows.
    outgoing = {p: [(key, send[key][p]) for key, out, _ in plan if p in out]
                for p in {p for _, out, _ in plan for p in out}}
    incoming = {p: [(key, int(into[p].numel())) for key, _, into in plan if p in into]
                for p in {p for _, _, into in plan for p in into}}
    headers = {p: [int(b[0]) if b.numel() and bool((b == b[0]).all()) else PER_ROW
                   for _, b in keys] for p, keys in outgoing.items()}
    got = transport.start({p: torch.tensor(h, dtype=torch.uint8).to(device)
                           for p, h in headers.items()},
                          {p: len(keys) for p, keys in incoming.items()}, device).wait()
    heard = {p: got[p].cpu().tolist() for p in incoming}
    rows_out = {p: [b for (_, b), h in zip(keys, headers[p]) if h == PER_ROW and b.numel()]
                for p, keys in outgoing.items()}
    rows_in = {p: sum(n for (_, n), h in zip(keys, heard[p]) if h == PER_ROW)
               for p, keys in incoming.items()}
    got = transport.start({p: torch.cat(b).to(device) for p, b in rows_out.items() if b},
                          {p: n for p, n in rows_in.items() if n}, device).wait()
    recv: dict[str, dict[int, Tensor]] = {key: {} for key, _, _ in plan}
    for p, keys in incoming.items():
        at = 0
        for (key, n), h in zip(keys, heard[p]):
            if h != PER_ROW:
                recv[key][p] = torch.full((n,), h, dtype=torch.uint8)
            else:
                recv[key][p] = got[p][at:at + n].cpu() if n else torch.zeros(0, dtype=torch.uint8)
                at += n
    return recv


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

r"""The bit-width MILP of one exchange key (SPEC 7) and its greedy fallback.

Every channel (sender, receiver) of the key holds groups of message rows;
group :math:`g` has :math:`n_g` rows and the summed variance coefficient
:math:`C_g = \sum_{m \in g} c_m`.  With binaries :math:`x_{g,b}`,
:math:`b \in \{2, 4, 8\}`, :math:`\sum_b x_{g,b} = 1`, the added variance is
:math:`V = \sum_{g,b} C_g x_{g,b} / (2^b - 1)^2` and the time
:math:`T \ge T_i` for every worker, :math:`T_i` the critical path of
:mod:`~pyg_adaqp.assign.cost_model` (four linear rows per worker).

Two objectives:

- **Variance budget** (the default): minimize :math:`T` subject to
  :math:`V \le \epsilon S`, where :math:`S` is the power of what the
  noise is added into (a layer's aggregated output in forward, summed over
  all owned rows, as the weight the layer applies next sees it, if any
  (:func:`~pyg_adaqp.nn.dist_graph.signal_power`); the gradient of the rows
  sent in backward).  So
  :math:`\epsilon` is a noise-to-signal power ratio: ``0.01`` lets the
  quantization noise reach 1% of the power of the layer's output (-20 dB).
  Ties in time go to fewer bytes: within the budget the noise is taken to
  cost nothing, and the model's slack is not real slack (raising the rows
  of every worker off the critical path until each is as slow as the
  critical one makes the exchange wait for the slowest of all of them;
  measured in ``docs/benchmarks.md``).  When the widths cost no time at
  all, ties go to the lower variance, so every group stays at 8 bits.
- **The paper's weighted sum**: minimize
  :math:`\lambda \frac{V - V_{\min}}{V_{\max} - V_{\min}} + (1 - \lambda)
  \frac{T - T_{\min}}{T_{\max} - T_{\min}}`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from pyg_adaqp.assign.cost_model import CostModel
from pyg_adaqp.comm.codec import message_nbytes

WIDTHS = np.array([2, 4, 8])
_LEVELS = (2.0 ** WIDTHS - 1) ** 2
#: Weight of the tie-break (toward fewer bytes; under a budget toward less
#: variance when the widths cost no time).  Without it, groups whose width changes
#: neither term (zero range, a worker off the critical path) would get
#: arbitrary widths; it is far above HiGHS's default absolute gap (1e-6),
#: yet moves the reported objective by at most this much.
TIE_BREAK = 1e-5
#: Least time limit the MILP is started with (HiGHS's own set-up takes a few
#: milliseconds); below it the greedy answer stands (:func:`solve_key`'s `uses`).
MIN_MILP_SECONDS = 0.005


@dataclass
class KeyProblem:
    """The groups of one exchange key, flattened over its channels.

    Args:
        width (int): Feature width :math:`D` of the key's messages.
        sender (np.ndarray): Sending rank of every group.
        receiver (np.ndarray): Receiving rank of every group.
        rows (np.ndarray): Rows of every group.
        coef (np.ndarray): :math:`C_g` of every group (>= 0).
        signal (float, optional): :math:`S`, the power of what the key's
            messages are added into (the budget's reference). (default: 0)
        hidden (dict[int, float], optional): Seconds of each worker's
            computation that overlap this key's exchange. (default: none)
        encode_share (dict[int, float], optional): Per sender, the fraction
            of the rows it sends that it encodes (a row several peers need
            is encoded once). (default: 1 for every sender)
    """
    width: int
    sender: np.ndarray
    receiver: np.ndarray
    rows: np.ndarray
    coef: np.ndarray
    signal: float = 0.0
    hidden: dict[int, float] = field(default_factory=dict)
    encode_share: dict[int, float] = field(default_factory=dict)
    bytes: np.ndarray = field(init=False)  #: ``[groups, 3]`` bytes of each group at 2/4/8 bits

    def __post_init__(self) -> None:
        self.sender = np.asarray(self.sender, dtype=np.int64)
        self.receiver = np.asarray(self.receiver, dtype=np.int64)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.coef = np.asarray(self.coef, dtype=np.float64)
        # message_nbytes is linear in the rows: n * (ceil(D b / 8) + 4).
        per_row = np.array([message_nbytes(1, self.width, int(b)) for b in WIDTHS])
        self.bytes = self.rows[:, None].astype(np.float64) * per_row[None, :]

    @property
    def num_groups(self) -> int:
        return int(self.rows.size)

    def variance(self, choice: np.ndarray) -> float:
        """:math:`V` of `choice` (index into :data:`WIDTHS` per group)."""
        return float((self.coef / _LEVELS[choice]).sum())


@dataclass
class Solution:
    """A width per group and how it was found."""
    bits: np.ndarray        #: width of every group
    objective: float        #: normalized objective (without the tie-break)
    method: str             #: ``"milp"``, ``"greedy"`` or ``"trivial"``
    solve_time: float       #: seconds
    seconds: float = 0.0    #: predicted exchange time
    noise: float = 0.0      #: :math:`V / S` (0 when :math:`S = 0`)


def group_messages(coef: np.ndarray, group_size: int, max_groups: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorts one channel's messages by :math:`c_m` and cuts them into groups.

    Groups hold `group_size` messages, or more where the channel would
    otherwise have more than `max_groups` groups (the solve's time grows
    with the groups, its gain from finer groups does not).

    Messages of equal :math:`c_m` are in no particular order (they cost the
    same in any group): a stable sort takes several times as long, at every
    re-assignment for every channel and key (``benchmarks/allocator_solve.py``
    prints both).

    Returns:
        (np.ndarray, np.ndarray, np.ndarray): :math:`C_g` and the number of
        messages of every group, and the message order: the groups hold
        consecutive runs of ``order``.
    """
    coef = np.asarray(coef, dtype=np.float64)
    order = np.argsort(-coef)
    if order.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64), order
    if max_groups is not None:
        group_size = max(group_size, -(-order.size // max_groups))
    starts = np.arange(0, order.size, group_size)
    return (np.add.reduceat(coef[order], starts), np.diff(np.r_[starts, order.size]), order)


class _Timing:
    """The cost model evaluated on one problem's groups (vectorized)."""

    def __init__(self, problem: KeyProblem, cost: CostModel):
        self.workers = np.union1d(problem.sender, problem.receiver)
        self.s = np.searchsorted(self.workers, problem.sender)
        self.r = np.searchsorted(self.workers, problem.receiver)

        def per_worker(values: dict, default: float = 0.0) -> np.ndarray:
            return np.array([values.get(int(w), default) for w in self.workers], dtype=float)

        self.up, self.down = per_worker(cost.up), per_worker(cost.down)
        # Each worker's link time whatever its bytes: beta and the loaded latency.
        self.fixed = np.array([cost.fixed_seconds(int(w)) for w in self.workers], dtype=float)
        self.free = per_worker(cost.free)
        self.hidden = per_worker(problem.hidden)
        self.bytes = problem.bytes
        d, n = problem.width, problem.rows[:, None].astype(float)

        def codec(table: dict, who: np.ndarray) -> np.ndarray:
            per = np.array([[sum(np.array(table.get(int(w), {}).get(int(b), (0.0, 0.0)))
                                 * (1.0, d)) for b in WIDTHS] for w in self.workers])
            return n * per[who] if self.workers.size else np.zeros((n.shape[0], 3))

        share = per_worker(problem.encode_share, 1.0)
        self.enc = codec(cost.encode, self.s) * share[self.s][:, None]
        self.dec = codec(cost.decode, self.r)
        # Every channel's non-empty width buckets cost its receiver a fixed
        # time each; a sender encodes each width once for all its channels,
        # so its fixed cost is spread over them (exact when its channels use
        # the same widths).
        self.channels, self.ch = np.unique(self.s * self.workers.size + self.r,
                                           return_inverse=True)
        self.ch_s, self.ch_r = np.divmod(self.channels, max(1, self.workers.size))
        fan_out = np.bincount(self.ch_s, minlength=self.workers.size)
        self.bucket_enc = (per_worker({i: c[0] for i, c in cost.bucket.items()})[self.ch_s]
                           / np.maximum(fan_out[self.ch_s], 1))
        self.bucket_dec = per_worker({i: c[1] for i, c in cost.bucket.items()})[self.ch_r]

    def bucket_seconds(self, choice: np.ndarray) -> np.ndarray:
        """Per worker, the fixed cost of the width buckets `choice` fills."""
        used = np.zeros((self.channels.size, 3))
        used[self.ch, choice] = 1.0
        n = used.sum(axis=1)
        w = self.workers.size
        return (np.bincount(self.ch_s, n * self.bucket_enc, minlength=w)
                + np.bincount(self.ch_r, n * self.bucket_dec, minlength=w))

    def seconds(self, choice: np.ndarray) -> float:
        """:math:`T = \\max_i T_i` of `choice` (index into WIDTHS per group)."""
        if choice.size == 0:
            return 0.0
        g = np.arange(choice.size)
        w = self.workers.size
        out = np.bincount(self.s, self.bytes[g, choice], minlength=w)
        inn = np.bincount(self.r, self.bytes[g, choice], minlength=w)
        cpu = (np.bincount(self.s, self.enc[g, choice], minlength=w)
               + np.bincount(self.r, self.dec[g, choice], minlength=w)
               + self.bucket_seconds(choice))
        link = self.fixed + np.maximum(0.0, np.maximum(self.up * (out - self.free),
                                                      self.down * (inn - self.free)))
        link[(out <= 0) & (inn <= 0)] = 0.0
        return float(np.max(cpu + np.maximum(0.0, link - self.hidden)))


class _Objective:
    """The objective of one problem, normalized, and its constants."""

    def __init__(self, problem: KeyProblem, cost: CostModel, coe_lambda: float,
                 budget: float | None):
        self.problem, self.timing = problem, _Timing(problem, cost)
        self.coe_lambda, self.budget = coe_lambda, budget
        g = problem.num_groups
        c = problem.coef.sum()
        self.v_min, self.v_max = c / _LEVELS[2], c / _LEVELS[0]
        uniform = [self.timing.seconds(np.full(g, k, dtype=np.int64)) for k in range(3)]
        self.t_min, self.t_max = min(uniform), max(uniform)
        self.b_min, self.b_max = problem.bytes[:, 0].sum(), problem.bytes[:, 2].sum()
        #: The variance the budget allows (inf without a budget or a signal).
        self.v_cap = np.inf if budget is None or problem.signal <= 0 else budget * problem.signal

    @staticmethod
    def _scaled(value: float, lo: float, hi: float) -> float:
        # A range of zero (all traces zero, or a flat cost) contributes 0, never NaN.
        return (value - lo) / (hi - lo) if hi > lo else 0.0

    def feasible(self, choice: np.ndarray) -> bool:
        return self.problem.variance(choice) <= self.v_cap * (1 + 1e-9)

    def __call__(self, choice: np.ndarray) -> float:
        t = self._scaled(self.timing.seconds(choice), self.t_min, self.t_max)
        if self.budget is not None:
            return t
        v = self._scaled(self.problem.variance(choice), self.v_min, self.v_max)
        return self.coe_lambda * v + (1 - self.coe_lambda) * t

    def better(self, a: np.ndarray, b: np.ndarray | None) -> bool:
        """Whether `a` beats `b` (feasibility first, then objective, then tie-break)."""
        if b is None:
            return True
        fa, fb = self.feasible(a), self.feasible(b)
        if fa != fb:
            return fa
        if not fa:  # neither meets the budget: the one closer to it
            return self.problem.variance(a) < self.problem.variance(b)
        return self(a) + self.tie(a) < self(b) + self.tie(b) - 1e-12

    @property
    def tie_on_bytes(self) -> bool:
        """Whether ties go to fewer bytes (else to less variance)."""
        return self.budget is None or self.t_max > self.t_min

    @property
    def tie_weight(self) -> float:
        """Weight of the tie-break; none at lambda 1, where the variance is all
        (a tie-break toward fewer bytes would outweigh tiny variances)."""
        if self.budget is not None:
            return TIE_BREAK
        return TIE_BREAK if self.coe_lambda < 1.0 else 0.0

    def tie(self, choice: np.ndarray) -> float:
        """The tie-break term: scaled bytes, or variance (see :attr:`tie_on_bytes`)."""
        if not self.tie_on_bytes:
            return self.tie_weight * self._scaled(self.problem.variance(choice), 0.0,
                                                  self.v_max - self.v_min)
        nbytes = float(self.problem.bytes[np.arange(choice.size), choice].sum())
        return self.tie_weight * self._scaled(nbytes, self.b_min, self.b_max)


def objective(problem: KeyProblem, cost: CostModel, bits: np.ndarray, coe_lambda: float = 0.5,
              budget: float | None = None) -> float:
    """The normalized objective of assigning `bits` (one width per group)."""
    choice = np.searchsorted(WIDTHS, np.asarray(bits))
    return _Objective(problem, cost, coe_lambda, budget)(choice)


def solve_key(problem: KeyProblem, cost: CostModel, coe_lambda: float = 0.5,
              time_limit: float = 0.3, mip_rel_gap: float = 1e-3,
              max_milp_groups: int = 2000, budget: float | None = None,
              uses: float | None = None) -> Solution:
    """Assigns a width to every group of `problem`.

    The greedy solution comes first; the MILP then decides the groups near
    its width boundaries (all groups when there are at most
    `max_milp_groups`), with the others fixed at their greedy width.  HiGHS
    runs under `time_limit` and the better of the two answers is kept, so a
    solver stopped early (or failing) never does worse than the fallback.

    Args:
        problem (KeyProblem): The groups of one exchange key.
        cost (CostModel): Predicts the exchange time.
        coe_lambda (float, optional): Weight :math:`\\lambda` of the variance
            term of the weighted sum (unused with a `budget`). (default: :obj:`0.5`)
        time_limit (float, optional): Seconds HiGHS may run. (default: :obj:`0.3`)
        mip_rel_gap (float, optional): Relative optimality gap at which HiGHS
            stops.  Closing the last 0.1% costs seconds even on a few
            thousand groups (measured), for a negligible gain. (default: :obj:`1e-3`)
        max_milp_groups (int, optional): Most groups the MILP decides.  HiGHS
            takes 0.5-0.8 s just to set up 10k-30k groups (measured), while
            the greedy answer already has the optimum's shape (thresholds
            along the groups sorted by variance bought per second), so only
            groups near its thresholds are worth deciding. (default: :obj:`2000`)
        budget (float, optional): Minimize time with the variance at most
            `budget` times the signal power :math:`S` instead of the
            weighted sum. (default: :obj:`None`)
        uses (float, optional): Exchanges the assignment will serve.  With
            a `budget`, the MILP runs no longer than it could save over
            them: the greedy answer's time less the least time (every group
            at 2 bits), times `uses`; not at all under
            :data:`MIN_MILP_SECONDS`.  Every worker waits for the solve.
            (default: :obj:`None`: `time_limit` alone)
    """
    t0 = time.perf_counter()
    if problem.num_groups == 0:
        return Solution(np.zeros(0, dtype=np.int64), 0.0, "trivial", 0.0)
    obj = _Objective(problem, cost, coe_lambda, budget)
    greedy, steps, cut = _greedy(obj)
    best, method = greedy, "greedy"
    # Every group at 2 bits within the budget is the least time and the
    # fewest bytes: nothing for the MILP to improve.
    greedy_s = obj.timing.seconds(greedy)
    if budget is not None and uses is not None:
        time_limit = min(time_limit, uses * max(0.0, greedy_s - obj.t_min))
    if not (budget is not None and cut == 0 and obj.tie_on_bytes) \
            and time_limit >= MIN_MILP_SECONDS:
        free = _near_cut(problem, steps, cut, max_milp_groups)
        choice = _milp(obj, time_limit, mip_rel_gap, free, greedy)
        if choice is not None and not obj.better(best, choice):
            best, method = choice, "milp"
    v = problem.variance(best)
    return Solution(WIDTHS[best], obj(best), method, time.perf_counter() - t0,
                    greedy_s if best is greedy else obj.timing.seconds(best),
                    v / problem.signal if problem.signal > 0 else 0.0)


def _greedy(obj: _Objective) -> tuple[np.ndarray, np.ndarray, int]:
    """Fallback: upgrades groups (2->4, 4->8) in the order of variance
    removed per second the upgrade costs on its sender's up- and receiver's
    down-link (and in their codecs); takes the shortest prefix that meets
    the budget, or the best prefix of the weighted sum.

    Returns the choice, the ordered steps (group of each) and the prefix length.
    """
    p, tm = obj.problem, obj.timing
    g = p.num_groups
    gain = np.concatenate([p.coef * (1 / _LEVELS[0] - 1 / _LEVELS[1]),
                           p.coef * (1 / _LEVELS[1] - 1 / _LEVELS[2])])
    rate = np.maximum(tm.up[tm.s], tm.down[tm.r])
    cost = np.concatenate([
        (p.bytes[:, k + 1] - p.bytes[:, k]) * rate
        + (tm.enc[:, k + 1] - tm.enc[:, k]) + (tm.dec[:, k + 1] - tm.dec[:, k])
        for k in range(2)])
    ratio = gain / np.maximum(cost, 1e-15)
    # A group's 4->8 step never comes before its 2->4 step.
    ratio[g:] = np.minimum(ratio[g:], ratio[:g])
    order = np.lexsort((np.r_[np.zeros(g), np.ones(g)], -ratio))
    groups = np.r_[np.arange(g), np.arange(g)][order]

    def prefix(k: int) -> np.ndarray:
        choice = np.zeros(g, dtype=np.int64)
        np.add.at(choice, groups[:k], 1)
        return choice

    if obj.budget is not None:
        removed = np.cumsum(gain[order])
        need = p.variance(np.zeros(g, dtype=np.int64)) - obj.v_cap
        cut = 2 * g if need > removed[-1] else int(np.searchsorted(removed, need, side="left")) + 1
        cut = 0 if need <= 0 else min(cut, 2 * g)
        return prefix(cut), groups, cut
    best, best_k = None, 0
    for k in np.unique(np.linspace(0, 2 * g, 65).astype(int)):
        choice = prefix(int(k))
        if obj.better(choice, best):
            best, best_k = choice, int(k)
    return best, groups, best_k


def _near_cut(problem: KeyProblem, steps: np.ndarray, cut: int, max_groups: int) -> np.ndarray:
    """The groups whose steps lie within a window of the greedy's cut (and
    of both ends of the order); all groups if few enough."""
    if problem.num_groups <= max_groups:
        return np.arange(problem.num_groups)
    window = max(1, max_groups // 3)
    ends = window // 4
    near = np.r_[steps[max(0, cut - window):cut + window], steps[:ends],
                 steps[steps.size - ends:]]
    return np.unique(near)[:max_groups]


def _milp(obj: _Objective, time_limit: float, mip_rel_gap: float, free: np.ndarray,
          base: np.ndarray) -> np.ndarray | None:
    """The MILP's choice (index into WIDTHS per group) with the groups not in
    `free` fixed at `base`, or None if it found none.

    Variables: one indicator per free group and width, one per channel and
    width (whether that bucket is used: it costs a fixed time; at least every
    indicator of its channel's groups) and the time ``t``."""
    p, tm = obj.problem, obj.timing
    g, w, nc = free.size, tm.workers.size, tm.channels.size
    if g == 0:
        return None
    # Time in units of T_max - T_min, so the rows' coefficients are of order
    # one whatever the link speed.
    t_scale = obj.t_max - obj.t_min if obj.t_max > obj.t_min else max(obj.t_max, 1e-9)
    v_scale = obj.v_max - obj.v_min if obj.v_max > obj.v_min else 1.0
    coef, nbytes = p.coef[free], p.bytes[free]
    s, r = tm.s[free], tm.r[free]
    fixed = np.ones(p.num_groups, dtype=bool)
    fixed[free] = False
    idx = np.flatnonzero(fixed)
    ch = base[idx]
    out_fixed = np.bincount(tm.s[idx], p.bytes[idx, ch], minlength=w)
    in_fixed = np.bincount(tm.r[idx], p.bytes[idx, ch], minlength=w)
    cpu_fixed = (np.bincount(tm.s[idx], tm.enc[idx, ch], minlength=w)
                 + np.bincount(tm.r[idx], tm.dec[idx, ch], minlength=w))
    v_fixed = float((p.coef[idx] / _LEVELS[ch]).sum())

    c = np.zeros(3 * g + 3 * nc + 1)
    if obj.budget is not None:
        c[-1] = 1.0
    else:
        c[:3 * g] += obj.coe_lambda * (coef[:, None] / _LEVELS[None, :]).ravel() / v_scale
        c[-1] = (1 - obj.coe_lambda) if obj.t_max > obj.t_min else 0.0
    if not obj.tie_on_bytes:
        c[:3 * g] += obj.tie_weight * (coef[:, None] / _LEVELS[None, :]).ravel() / v_scale
    elif obj.b_max > obj.b_min:
        c[:3 * g] += obj.tie_weight * nbytes.ravel() / (obj.b_max - obj.b_min)

    cols, bucket_cols = np.arange(3 * g), 3 * g + np.arange(3 * nc)
    rs, rr = np.repeat(s, 3), np.repeat(r, 3)
    cpu = ([rs, rr, np.repeat(tm.ch_s, 3), np.repeat(tm.ch_r, 3)],
           [tm.enc[free].ravel(), tm.dec[free].ravel(),
            np.repeat(tm.bucket_enc, 3), np.repeat(tm.bucket_dec, 3)],
           [cols, cols, bucket_cols, bucket_cols])

    def rows(extra_rows: np.ndarray | None, extra_vals: np.ndarray | None) -> sp.csr_matrix:
        ri, vi, ci = (list(part) for part in cpu)
        if extra_rows is not None:
            ri, vi, ci = ri + [extra_rows], vi + [extra_vals], ci + [cols]
        m = sp.csr_matrix((np.concatenate(vi) / t_scale, (np.concatenate(ri), np.concatenate(ci))),
                          shape=(w, 3 * g + 3 * nc))
        return sp.hstack([m, sp.csr_matrix(-np.ones((w, 1)))], format="csr")

    base_cost = tm.fixed - tm.hidden
    blocks = [  # t >= cpu; cpu + fixed - h; cpu + fixed - h + u (out - f); ... + d (in - f)
        (rows(None, None), -cpu_fixed),
        (rows(None, None), -(cpu_fixed + base_cost)),
        (rows(rs, (tm.up[s][:, None] * nbytes).ravel()),
         -(cpu_fixed + base_cost + tm.up * (out_fixed - tm.free))),
        (rows(rr, (tm.down[r][:, None] * nbytes).ravel()),
         -(cpu_fixed + base_cost + tm.down * (in_fixed - tm.free))),
    ]
    one_width = sp.hstack([sp.kron(sp.eye(g, format="csr"), np.ones((1, 3)), format="csr"),
                           sp.csr_matrix((g, 3 * nc + 1))], format="csr")
    # A group's width uses its channel's bucket of that width: x - y <= 0.
    uses = sp.csr_matrix((np.r_[np.ones(3 * g), -np.ones(3 * g)],
                          (np.r_[cols, cols], np.r_[cols, 3 * g + (3 * tm.ch[free][:, None]
                                                                 + np.arange(3)).ravel()])),
                         shape=(3 * g, 3 * g + 3 * nc + 1))
    constraints = [LinearConstraint(one_width, 1, 1), LinearConstraint(uses, -np.inf, 0)]
    constraints += [LinearConstraint(m, -np.inf, ub / t_scale) for m, ub in blocks]
    if np.isfinite(obj.v_cap):
        room = obj.v_cap - v_fixed
        if room < (coef / _LEVELS[2]).sum():
            return None  # even all 8 bits misses the budget: the greedy's answer stands
        var_row = np.r_[(coef[:, None] / _LEVELS[None, :]).ravel(), np.zeros(3 * nc + 1)] / v_scale
        constraints.append(LinearConstraint(var_row[None, :], -np.inf, room / v_scale))
    # The fixed groups' buckets are used; the bucket variables need no
    # integrality (they only raise t, so the least that covers x is taken).
    bucket_used = np.zeros(3 * nc)
    bucket_used[3 * tm.ch[idx] + ch] = 1.0
    integrality = np.r_[np.ones(3 * g), np.zeros(3 * nc + 1)]
    bounds = Bounds(np.r_[np.zeros(3 * g), bucket_used, 0.0],
                    np.r_[np.ones(3 * g + 3 * nc), np.inf])
    res = milp(c, constraints=constraints, integrality=integrality, bounds=bounds,
               options={"time_limit": max(time_limit, 1e-3), "mip_rel_gap": mip_rel_gap})
    if res.x is None:
        return None
    choice = base.copy()
    choice[free] = np.argmax(res.x[:3 * g].reshape(g, 3), axis=1)
    return choice

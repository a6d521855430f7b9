r"""The bit-width MILP of one exchange key (SPEC 7) and its greedy fallback.

Every channel (sender, receiver) of the key holds groups of message rows;
group :math:`g` has :math:`n_g` rows and the summed variance coefficient
:math:`C_g = \sum_{m \in g} c_m`.  With binaries :math:`x_{g,b}`,
:math:`b \in \{2, 4, 8\}`:

.. math::
    V = \sum_{g,b} \frac{C_g}{(2^b - 1)^2} x_{g,b}, \qquad
    T \ge \beta_i + \alpha_i \Big(\sum_{g \in i, b} \mathrm{bytes}(n_g, b)\, x_{g,b}
    - f_i\Big), \quad T \ge \beta_i \quad \forall \text{ senders } i, \qquad
    \sum_b x_{g,b} = 1,

minimizing :math:`\lambda \frac{V - V_{\min}}{V_{\max} - V_{\min}} + (1 - \lambda)
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
#: Weight of the tie-break toward fewer bytes.  Without it, groups whose
#: width changes neither term (zero range, a sender that is not the
#: bottleneck) would get arbitrary widths; it is far above HiGHS's default
#: absolute gap (1e-6), yet moves the reported objective by at most this much.
TIE_BREAK = 1e-5


@dataclass
class KeyProblem:
    """The groups of one exchange key, flattened over its channels.

    Args:
        width (int): Feature width :math:`D` of the key's messages.
        sender (np.ndarray): Sending rank of every group.
        rows (np.ndarray): Rows of every group.
        coef (np.ndarray): :math:`C_g` of every group (>= 0).
    """
    width: int
    sender: np.ndarray
    rows: np.ndarray
    coef: np.ndarray
    bytes: np.ndarray = field(init=False)  #: ``[groups, 3]`` bytes of each group at 2/4/8 bits

    def __post_init__(self) -> None:
        self.sender = np.asarray(self.sender, dtype=np.int64)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.coef = np.asarray(self.coef, dtype=np.float64)
        # message_nbytes is linear in the rows: n * (ceil(D b / 8) + 4).
        per_row = np.array([message_nbytes(1, self.width, int(b)) for b in WIDTHS])
        self.bytes = self.rows[:, None].astype(np.float64) * per_row[None, :]

    @property
    def num_groups(self) -> int:
        return int(self.rows.size)


@dataclass
class Solution:
    """A width per group and how it was found."""
    bits: np.ndarray        #: width of every group
    objective: float        #: normalized objective (without the tie-break)
    method: str             #: ``"milp"``, ``"greedy"`` or ``"trivial"``
    solve_time: float       #: seconds


def group_messages(coef: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorts one channel's messages by :math:`c_m` and cuts them into groups.

    Returns:
        (np.ndarray, np.ndarray): :math:`C_g` of every group, and the message
        order: group ``k`` holds messages ``order[k * group_size:(k + 1) * group_size]``.
    """
    coef = np.asarray(coef, dtype=np.float64)
    order = np.argsort(-coef, kind="stable")
    if order.size == 0:
        return np.zeros(0), order
    return np.add.reduceat(coef[order], np.arange(0, order.size, group_size)), order


class _Normalizer:
    """The normalization constants of the objective of one problem."""

    def __init__(self, problem: KeyProblem, cost: CostModel):
        c = problem.coef.sum()
        self.v_min, self.v_max = c / _LEVELS[2], c / _LEVELS[0]
        self.t_min = self.time(problem, cost, np.zeros(problem.num_groups, dtype=np.int64))
        self.t_max = self.time(problem, cost, np.full(problem.num_groups, 2, dtype=np.int64))
        self.b_min, self.b_max = problem.bytes[:, 0].sum(), problem.bytes[:, 2].sum()

    @staticmethod
    def time(problem: KeyProblem, cost: CostModel, choice: np.ndarray) -> float:
        sent = problem.bytes[np.arange(problem.num_groups), choice]
        senders = np.unique(problem.sender)
        per = np.array([sent[problem.sender == s].sum() for s in senders])
        return cost.predict(dict(zip(senders.tolist(), per.tolist())))

    @staticmethod
    def _scaled(value: float, lo: float, hi: float) -> float:
        # A range of zero (all traces zero, or a flat cost) contributes 0, never NaN.
        return (value - lo) / (hi - lo) if hi > lo else 0.0

    def objective(self, problem: KeyProblem, cost: CostModel, choice: np.ndarray,
                  coe_lambda: float) -> float:
        v = float((problem.coef / _LEVELS[choice]).sum())
        t = self.time(problem, cost, choice)
        return (coe_lambda * self._scaled(v, self.v_min, self.v_max)
                + (1 - coe_lambda) * self._scaled(t, self.t_min, self.t_max))


def objective(problem: KeyProblem, cost: CostModel, bits: np.ndarray, coe_lambda: float) -> float:
    """The normalized objective of assigning `bits` (one width per group)."""
    choice = np.searchsorted(WIDTHS, np.asarray(bits))
    return _Normalizer(problem, cost).objective(problem, cost, choice, coe_lambda)


def solve_key(problem: KeyProblem, cost: CostModel, coe_lambda: float = 0.5,
              time_limit: float = 0.3, mip_rel_gap: float = 1e-3,
              max_milp_groups: int = 2000) -> Solution:
    """Assigns a width to every group of `problem`.

    The greedy solution comes first; the MILP then decides the groups near
    each sender's width boundaries in it (all groups when there are at most
    `max_milp_groups`), with the others fixed at their greedy width.  HiGHS
    runs under `time_limit` and the better of the two answers is kept, so a
    solver stopped early (or failing) never does worse than the fallback.

    Args:
        problem (KeyProblem): The groups of one exchange key.
        cost (CostModel): Predicts the exchange time from bytes per sender.
        coe_lambda (float, optional): Weight :math:`\\lambda` of the variance
            term. (default: :obj:`0.5`)
        time_limit (float, optional): Seconds HiGHS may run. (default: :obj:`0.3`)
        mip_rel_gap (float, optional): Relative optimality gap at which HiGHS
            stops.  Closing the last 0.1% costs seconds even on a few
            thousand groups (measured), for a negligible gain. (default: :obj:`1e-3`)
        max_milp_groups (int, optional): Most groups the MILP decides.  HiGHS
            takes 0.5-0.8 s just to set up 10k-30k groups (measured), while
            the greedy answer already has the optimum's shape (a threshold
            per width along each sender's groups sorted by variance per
            byte), so only groups near its thresholds are worth deciding.
            (default: :obj:`2000`)
    """
    t0 = time.perf_counter()
    if problem.num_groups == 0:
        return Solution(np.zeros(0, dtype=np.int64), 0.0, "trivial", 0.0)
    norm = _Normalizer(problem, cost)
    greedy = _greedy(problem, cost, norm, coe_lambda)
    value = norm.objective(problem, cost, greedy, coe_lambda)
    best = Solution(WIDTHS[greedy], value, "greedy", 0.0)
    free = _near_thresholds(problem, greedy, max_milp_groups)
    choice = _milp(problem, cost, norm, coe_lambda, time_limit, mip_rel_gap, free, greedy)
    if choice is not None:
        value = norm.objective(problem, cost, choice, coe_lambda)
        if value <= best.objective + TIE_BREAK:
            best = Solution(WIDTHS[choice], value, "milp", 0.0)
    best.solve_time = time.perf_counter() - t0
    return best


def _near_thresholds(problem: KeyProblem, base: np.ndarray, max_groups: int) -> np.ndarray:
    """Groups within a window of every width change (and of both ends) along
    each sender's groups sorted by variance per byte; all if few enough."""
    if problem.num_groups <= max_groups:
        return np.arange(problem.num_groups)
    senders = np.unique(problem.sender)
    window = max(1, max_groups // (6 * senders.size))
    free = []
    for s in senders:
        idx = np.flatnonzero(problem.sender == s)
        order = idx[np.argsort(-problem.coef[idx] / problem.rows[idx], kind="stable")]
        cuts = np.r_[0, np.flatnonzero(np.diff(base[order])) + 1, order.size]
        near = np.zeros(order.size, dtype=bool)
        for k in cuts:
            near[max(0, k - window):k + window] = True
        free.append(order[near])
    return np.sort(np.concatenate(free))


def _milp(problem: KeyProblem, cost: CostModel, norm: _Normalizer, coe_lambda: float,
          time_limit: float, mip_rel_gap: float, free: np.ndarray,
          base: np.ndarray) -> np.ndarray | None:
    """The MILP's choice (index into WIDTHS per group) with the groups not in
    `free` fixed at `base`, or None if it found none."""
    g = free.size
    senders = np.unique(problem.sender)
    # The time variable is in units of T_max - T_min, so its row coefficients
    # are of order one whatever the link speed.
    t_scale = norm.t_max - norm.t_min if norm.t_max > norm.t_min else 1.0
    v_scale = norm.v_max - norm.v_min
    coef, nbytes, sender = problem.coef[free], problem.bytes[free], problem.sender[free]
    c = np.zeros(3 * g + 1)
    if v_scale > 0:
        c[:3 * g] += coe_lambda * (coef[:, None] / _LEVELS[None, :]).ravel() / v_scale
    if norm.b_max > norm.b_min:
        c[:3 * g] += TIE_BREAK * nbytes.ravel() / (norm.b_max - norm.b_min)
    c[-1] = (1 - coe_lambda) if norm.t_max > norm.t_min else 0.0

    one_width = sp.hstack([sp.kron(sp.eye(g, format="csr"), np.ones((1, 3)), format="csr"),
                           sp.csr_matrix((g, 1))], format="csr")
    # Row s: alpha_s * (bytes_s(x) + fixed bytes_s - free_s) / t_scale - t
    #        <= -beta_s / t_scale, and t >= max beta_s / t_scale (every sender sends).
    alpha = np.array([cost.alpha.get(int(s), 0.0) for s in senders])
    beta = np.array([cost.beta.get(int(s), 0.0) for s in senders])
    free_bytes = np.array([cost.free.get(int(s), 0.0) for s in senders])
    fixed = np.ones(problem.num_groups, dtype=bool)
    fixed[free] = False
    fixed_bytes = np.zeros(senders.size)
    np.add.at(fixed_bytes, np.searchsorted(senders, problem.sender[fixed]),
              problem.bytes[fixed, base[fixed]])
    row_of = np.searchsorted(senders, sender)
    vals = (alpha[row_of][:, None] * nbytes).ravel() / t_scale
    time_rows = sp.hstack([sp.csr_matrix((vals, (np.repeat(row_of, 3), np.arange(3 * g))),
                                         shape=(senders.size, 3 * g)),
                           sp.csr_matrix(-np.ones((senders.size, 1)))], format="csr")
    constraints = [LinearConstraint(one_width, 1, 1),
                   LinearConstraint(time_rows, -np.inf,
                                    -(beta + alpha * (fixed_bytes - free_bytes)) / t_scale)]
    integrality = np.r_[np.ones(3 * g), 0]
    bounds = Bounds(np.r_[np.zeros(3 * g), beta.max() / t_scale], np.r_[np.ones(3 * g), np.inf])
    res = milp(c, constraints=constraints, integrality=integrality, bounds=bounds,
               options={"time_limit": max(time_limit, 1e-3), "mip_rel_gap": mip_rel_gap})
    if res.x is None:
        return None
    choice = base.copy()
    choice[free] = np.argmax(res.x[:3 * g].reshape(g, 3), axis=1)
    return choice


def _greedy(problem: KeyProblem, cost: CostModel, norm: _Normalizer,
            coe_lambda: float) -> np.ndarray:
    """Fallback: sweeps a time cap; under each, every sender buys variance
    reduction in the order of least bytes per unit of variance removed.

    Upgrades 2->4 and 4->8 of one group are ordered by their ratio, and the
    2->4 step always has the larger one, so a prefix of the sorted steps is
    a valid assignment.
    """
    g = problem.num_groups
    best, best_value = np.zeros(g, dtype=np.int64), np.inf
    steps = []
    for s in np.unique(problem.sender):
        idx = np.flatnonzero(problem.sender == s)
        gain = np.concatenate([problem.coef[idx] * (1 / _LEVELS[0] - 1 / _LEVELS[1]),
                               problem.coef[idx] * (1 / _LEVELS[1] - 1 / _LEVELS[2])])
        extra = np.concatenate([problem.bytes[idx, 1] - problem.bytes[idx, 0],
                                problem.bytes[idx, 2] - problem.bytes[idx, 1]])
        ratio = gain / np.maximum(extra, 1e-12)
        order = np.lexsort((np.r_[np.zeros(idx.size), np.ones(idx.size)], -ratio))
        steps.append((s, np.r_[idx, idx][order], np.cumsum(extra[order]),
                      problem.bytes[idx, 0].sum()))
    for cap in np.linspace(norm.t_min, norm.t_max, 41):
        choice = np.zeros(g, dtype=np.int64)
        for s, groups, spent, base in steps:
            a, b = cost.alpha.get(int(s), 0.0), cost.beta.get(int(s), 0.0)
            budget = np.inf if a <= 0 else (cap - b) / a + cost.free.get(int(s), 0.0) - base
            taken = int(np.searchsorted(spent, budget, side="right"))
            np.add.at(choice, groups[:taken], 1)
        value = norm.objective(problem, cost, choice, coe_lambda)
        if value < best_value:
            best, best_value = choice, value
    return best

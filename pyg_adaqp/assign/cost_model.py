r"""The communication cost model of the bit allocator, profiled on the real transport.

The halo exchange posts every channel at once, so its time is set by the
slowest sender's egress, not by a sum of one-pair transfers (the original
fits :math:`\alpha \cdot \mathrm{MB} + \beta` per channel from blocking
one-pair sends):

.. math::
    T = \max_i T_i, \qquad
    T_i = \beta_i + \alpha_i \cdot \max(0, \mathrm{bytes}_i - f_i) .

:math:`f_i` is what a link lets through before its rate applies: a rate
limiter's token bucket (``tc tbf``'s burst, a switch port's buffer) passes
that many bytes at once after the link was idle, as it is between two
exchanges.  On a link without one the fit gives :math:`f_i = 0`, the plain
line.  The model stays convex and piecewise linear, so the MILP keeps it
exactly (two rows per sender).

:func:`profile_cost_model` times exchanges shaped like the real one (every
channel of the send plan, at once) at sizes from 2-bit rows of the narrowest
key to 8-bit rows of the widest, and fits :math:`\alpha_i, \beta_i,
f_i` for every worker from its own exchange times; :func:`check_cost_model`
then compares predicted and measured times of random bit assignments of the
real keys' widths.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from pyg_adaqp.comm.codec import message_nbytes
from pyg_adaqp.comm.transport import Transport

#: Sizes profiled between the smallest and the largest message row.
PROFILE_POINTS = 7


def profile_row_bytes(widths: list[int], points: int = PROFILE_POINTS) -> list[int]:
    """Bytes per row of the profiling exchanges for keys of these feature `widths`.

    A log scale from a 2-bit row of the narrowest key to an 8-bit row of the
    widest, so the fit interpolates over exactly the sizes the allocator
    chooses between, and profiling a slow link costs no more than needed.
    """
    lo = message_nbytes(1, min(widths), 2)
    hi = message_nbytes(1, max(widths), 8)
    return sorted({int(round(b)) for b in np.geomspace(lo, max(hi, 4 * lo), points)})


@dataclass
class CostModel:
    """Exchange time from the bytes each worker sends.

    Args:
        alpha (dict[int, float]): Seconds per byte of every sender.
        beta (dict[int, float]): Fixed seconds of every sender.
        free (dict[int, float], optional): Bytes every sender's link passes
            before its rate applies (0 when missing).
    """
    alpha: dict[int, float] = field(default_factory=dict)
    beta: dict[int, float] = field(default_factory=dict)
    free: dict[int, float] = field(default_factory=dict)

    def sender_time(self, sender: int, nbytes: float) -> float:
        """:math:`T_i` of `sender` sending `nbytes` (> 0)."""
        over = max(0.0, nbytes - self.free.get(sender, 0.0))
        return self.beta.get(sender, 0.0) + self.alpha.get(sender, 0.0) * over

    def predict(self, bytes_by_sender: dict[int, float]) -> float:
        """Predicted exchange time; a worker that sends nothing costs nothing."""
        return max((self.sender_time(i, b) for i, b in bytes_by_sender.items() if b > 0),
                   default=0.0)

    def state_dict(self) -> dict:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "free": dict(self.free)}

    @classmethod
    def from_state_dict(cls, state: dict) -> CostModel:
        return cls(dict(state["alpha"]), dict(state["beta"]), dict(state.get("free", {})))


def fit_link(sent: np.ndarray, took: np.ndarray) -> tuple[float, float, float]:
    """Fits ``took ~ beta + alpha * max(0, sent - free)`` with alpha, beta, free >= 0.

    The knot `free` is searched on a log grid from 0 up to the second
    largest size (at least two points stay on the slope); for each, weighted
    least squares minimizes the *relative* error, the one the check reports
    (times span orders of magnitude).

    Returns:
        (float, float, float): ``alpha`` (s/B), ``beta`` (s) and ``free`` (B).
    """
    sent, took = np.asarray(sent, dtype=np.float64), np.asarray(took, dtype=np.float64)
    w = 1.0 / np.maximum(took, 1e-9)
    best, best_err = (0.0, float(np.median(took)), 0.0), np.inf
    sizes = np.sort(sent[sent > 0])
    knots = np.geomspace(sizes[0], sizes[-2], 64) if sizes.size > 2 else np.zeros(0)
    for free in np.r_[0.0, knots]:
        x = np.maximum(0.0, sent - free)
        design = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
        (alpha, beta), *_ = np.linalg.lstsq(design, took * w, rcond=None)
        # Noise can tilt the line; time never falls with bytes nor goes below 0.
        if alpha < 0:
            alpha, beta = 0.0, float(np.sum(took * w * w) / np.sum(w * w))
        elif beta < 0:
            alpha, beta = float(np.sum(x * took * w * w) / max(np.sum(x * x * w * w), 1e-30)), 0.0
        err = float(np.sum(((alpha * x + beta - took) * w) ** 2))
        if err < best_err - 1e-12:
            best, best_err = (float(alpha), float(beta), float(free)), err
    return best


def _timed_exchange(transport: Transport, send_bytes: dict[int, int],
                    recv_bytes: dict[int, int], repeats: int) -> float:
    """Median seconds of this worker's part of `repeats` exchanges started together."""
    send = {p: torch.empty(n, dtype=torch.uint8) for p, n in send_bytes.items()}
    times = []
    for _ in range(repeats + 1):          # the first one warms up the connections
        dist.barrier()
        t0 = time.perf_counter()
        transport.start(send, recv_bytes, torch.device("cpu")).wait()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _gather(value: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def profile_cost_model(transport: Transport, send_rows: dict[int, int],
                       recv_rows: dict[int, int], row_bytes: list[int],
                       repeats: int = 5) -> CostModel:
    """Fits :math:`\\alpha_i, \\beta_i, f_i` of every worker (collective: all call it).

    Args:
        transport (Transport): The exchange's transport.
        send_rows (dict[int, int]): Rows this worker sends each peer.
        recv_rows (dict[int, int]): Rows it receives from each peer.
        row_bytes (list[int]): Bytes per row of the profiled sizes (see
            :func:`profile_row_bytes`).
        repeats (int, optional): Timed exchanges per size. (default: :obj:`5`)
    """
    sent, took = [], []
    # Largest first: TCP's congestion window opens on the big transfers, as
    # it has in training, instead of slowing the first small ones.
    for per_row in sorted(row_bytes, reverse=True):
        sent.append(per_row * sum(send_rows.values()))
        took.append(_timed_exchange(transport, {p: n * per_row for p, n in send_rows.items()},
                                    {p: n * per_row for p, n in recv_rows.items()}, repeats))
    fit = fit_link(np.array(sent), np.array(took)) if sent[-1] > 0 else (0.0, 0.0, 0.0)
    fits = _gather(fit)
    return CostModel({i: a for i, (a, _, _) in enumerate(fits)},
                     {i: b for i, (_, b, _) in enumerate(fits)},
                     {i: f for i, (_, _, f) in enumerate(fits)})


def _random_bytes(seed: int, trial: int, sender: int, receiver: int, rows: int,
                  width: int) -> int:
    """Bytes of `rows` rows at widths drawn from {2, 4, 8}; both ends draw the same."""
    digest = hashlib.blake2b(f"{seed}/{trial}/{sender}/{receiver}".encode(),
                             digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    bits = torch.tensor([2, 4, 8])[torch.randint(3, (rows,), generator=gen)]
    return sum(message_nbytes(int((bits == b).sum()), width, b) for b in (2, 4, 8))


def check_cost_model(model: CostModel, transport: Transport, send_rows: dict[int, int],
                     recv_rows: dict[int, int], widths: list[int], repeats: int = 5,
                     seed: int = 0) -> list[tuple[float, float]]:
    """Predicted vs measured exchange time of random assignments (collective).

    One trial per entry of `widths` (the feature widths of the real keys):
    every row of every channel gets a width drawn from {2, 4, 8}; the
    measured time is the slowest worker's median.

    Returns:
        list[tuple[float, float]]: ``(predicted, measured)`` seconds per trial.
    """
    rank = transport.rank
    out = []
    for trial, width in enumerate(widths):
        send = {p: _random_bytes(seed, trial, rank, p, n, width) for p, n in send_rows.items()}
        recv = {p: _random_bytes(seed, trial, p, rank, n, width) for p, n in recv_rows.items()}
        took = _timed_exchange(transport, send, recv, repeats)
        everyone = _gather((sum(send.values()), took))
        predicted = model.predict({i: b for i, (b, _) in enumerate(everyone)})
        out.append((predicted, max(t for _, t in everyone)))
    return out

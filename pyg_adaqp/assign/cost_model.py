r"""The communication cost model of the bit allocator, profiled on the real transport.

The halo exchange posts every channel at once, so its time is set by the
slowest sender's egress, not by a sum of one-pair transfers (the original
fits :math:`\alpha \cdot \mathrm{MB} + \beta` per channel from blocking
one-pair sends):

.. math::
    T = \max_i T_i, \qquad T_i = \alpha_i \cdot \mathrm{bytes}_i + \beta_i .

:func:`profile_cost_model` times exchanges shaped like the real one (every
channel of the send plan, at once) at a few sizes and fits
:math:`\alpha_i, \beta_i` for every worker from its own exchange times;
:func:`check_cost_model` then compares predicted and measured times of a few
random bit assignments.
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

#: Bytes per row of the profiling exchanges: they span 2-bit rows of narrow
#: layers up to 8-bit rows of wide ones, so the fit interpolates.
PROFILE_ROW_BYTES = (8, 32, 128, 512)


@dataclass
class CostModel:
    """Exchange time from the bytes each worker sends.

    Args:
        alpha (dict[int, float]): Seconds per byte of every sender.
        beta (dict[int, float]): Fixed seconds of every sender.
    """
    alpha: dict[int, float] = field(default_factory=dict)
    beta: dict[int, float] = field(default_factory=dict)

    def predict(self, bytes_by_sender: dict[int, float]) -> float:
        """Predicted exchange time; a worker that sends nothing costs nothing."""
        return max((self.alpha.get(i, 0.0) * b + self.beta.get(i, 0.0)
                    for i, b in bytes_by_sender.items() if b > 0), default=0.0)

    def state_dict(self) -> dict:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta)}

    @classmethod
    def from_state_dict(cls, state: dict) -> CostModel:
        return cls(dict(state["alpha"]), dict(state["beta"]))


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
                       recv_rows: dict[int, int], repeats: int = 5) -> CostModel:
    """Fits :math:`\\alpha_i, \\beta_i` of every worker (collective: all call it).

    Args:
        transport (Transport): The exchange's transport.
        send_rows (dict[int, int]): Rows this worker sends each peer.
        recv_rows (dict[int, int]): Rows it receives from each peer.
        repeats (int, optional): Timed exchanges per size. (default: :obj:`5`)
    """
    sent, took = [], []
    for per_row in PROFILE_ROW_BYTES:
        sent.append(per_row * sum(send_rows.values()))
        took.append(_timed_exchange(transport, {p: n * per_row for p, n in send_rows.items()},
                                    {p: n * per_row for p, n in recv_rows.items()}, repeats))
    alpha, beta = 0.0, 0.0
    if sent[-1] > 0:
        alpha, beta = np.polyfit(np.array(sent, dtype=np.float64), np.array(took), 1)
        # Noise on a fast link can tilt the line; time never falls with bytes.
        if alpha < 0:
            alpha, beta = 0.0, float(np.mean(took))
        elif beta < 0:
            alpha, beta = float(np.dot(sent, took) / np.dot(sent, sent)), 0.0
    fits = _gather((float(alpha), float(beta)))
    return CostModel({i: a for i, (a, _) in enumerate(fits)},
                     {i: b for i, (_, b) in enumerate(fits)})


def _random_bytes(seed: int, trial: int, sender: int, receiver: int, rows: int,
                  width: int) -> int:
    """Bytes of `rows` rows at widths drawn from {2, 4, 8}; both ends draw the same."""
    digest = hashlib.blake2b(f"{seed}/{trial}/{sender}/{receiver}".encode(),
                             digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    bits = torch.tensor([2, 4, 8])[torch.randint(3, (rows,), generator=gen)]
    return sum(message_nbytes(int((bits == b).sum()), width, b) for b in (2, 4, 8))


def check_cost_model(model: CostModel, transport: Transport, send_rows: dict[int, int],
                     recv_rows: dict[int, int], width: int = 64, trials: int = 3,
                     repeats: int = 5, seed: int = 0) -> list[tuple[float, float]]:
    """Predicted vs measured exchange time of `trials` random assignments (collective).

    Every row of every channel gets a width drawn from {2, 4, 8}; the
    measured time is the slowest worker's median.

    Returns:
        list[tuple[float, float]]: ``(predicted, measured)`` seconds per trial.
    """
    rank = transport.rank
    out = []
    for trial in range(trials):
        send = {p: _random_bytes(seed, trial, rank, p, n, width) for p, n in send_rows.items()}
        recv = {p: _random_bytes(seed, trial, p, rank, n, width) for p, n in recv_rows.items()}
        took = _timed_exchange(transport, send, recv, repeats)
        everyone = _gather((sum(send.values()), took))
        predicted = model.predict({i: b for i, (b, _) in enumerate(everyone)})
        out.append((predicted, max(t for _, t in everyone)))
    return out

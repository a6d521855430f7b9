r"""`RangeTracer`: the per-row range statistic the bit allocator needs (SPEC 7).

Hooked into :class:`~pyg_adaqp.comm.HaloExchange` as its ``tracer``, it
accumulates for every exchange key, peer and message row

.. math::
    \frac{D}{6} (\max_j x_j - \min_j x_j)^2 ,

summed over the calls of a cycle: the variance model of one row at
:math:`b` bits is this divided by :math:`(2^b - 1)^2`.  Beside it, the
power of what the messages are added into (the layer's aggregated output in
forward, through the weight applied next if any:
:func:`~pyg_adaqp.nn.dist_graph.signal_power`; the gradient of the rows sent
in backward), summed over the owned
rows and the same calls: the signal that a variance budget is relative to.

The range is the row's true one, as SPEC 7 says, not the transmitted one:
the codec rounds the bfloat16 ``lo`` down and the scale up, so for rows far from zero the range
actually covered (``B * scale``) can be much wider than ``hi - lo``; that
extra width is a property of the number format, the same at every bit
width, and so does not change which widths are worth buying.
"""
from __future__ import annotations

from torch import Tensor


class RangeTracer:
    """Accumulates :math:`\\frac{D}{6}(hi - lo)^2` per (key, peer, row) and the
    signal power per key, on the device."""

    def __init__(self) -> None:
        self.traces: dict[str, dict[int, Tensor]] = {}
        self.signal: dict[str, Tensor] = {}
        #: Feature width :math:`D` of the messages of every key seen.
        self.widths: dict[str, int] = {}

    def record(self, key: str, peer: int, ranges: Tensor, width: int) -> None:
        """Adds one message's per-row ranges (called by the exchange)."""
        self.widths[key] = width
        stat = ranges.detach().double().square() * (width / 6.0)
        by_peer = self.traces.setdefault(key, {})
        if peer in by_peer:
            by_peer[peer] += stat
        else:
            by_peer[peer] = stat

    def record_signal(self, key: str, power: Tensor) -> None:
        """Adds the squared norm of what `key`'s messages were added into."""
        power = power.detach().double()
        self.signal[key] = self.signal[key] + power if key in self.signal else power

    def collect(self) -> tuple[dict[str, dict[int, Tensor]], dict[str, float]]:
        """The traces (on the CPU, float64) by key and peer, and the signal
        power by key, so far; starts new ones."""
        traces = {k: {p: t.cpu() for p, t in by_peer.items()}
                  for k, by_peer in self.traces.items()}
        signal = {k: float(v) for k, v in self.signal.items()}
        self.traces, self.signal = {}, {}
        return traces, signal

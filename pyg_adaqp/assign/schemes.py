"""Bit-width schemes: which width every quantized message row travels at.

A scheme is a trainer callback: :meth:`on_epoch_start` may change the
exchange's assignment, :meth:`report` gives what the run's summary records
of it, and :meth:`state_dict` what a checkpoint keeps.  Both sides of a message must agree on its layout
without a handshake per step, so every width is a function of values all
workers share (the configuration, the epoch and the send/receive plan).
"""
from __future__ import annotations

import hashlib

import torch

from pyg_adaqp.nn import DistGraph

WIDTHS = (2, 4, 8)


class UniformBits:
    """Every quantized message at `bits` bits."""

    def __init__(self, bits: int = 8):
        if bits not in WIDTHS:
            raise ValueError(f"uniform bits must be one of {WIDTHS}, got {bits}")
        self.bits = bits

    def on_epoch_start(self, epoch: int, graph: DistGraph) -> None:
        graph.exchange.default_bits = self.bits

    def report(self) -> dict:
        """Nothing beyond the configuration to record."""
        return {}

    def state_dict(self) -> dict:
        return {"bits": self.bits}


class RandomBits:
    """Every message row at a width drawn uniformly from {2, 4, 8}, redrawn every `cycle` epochs.

    The draw for the rows one worker sends another under one exchange key is
    seeded by ``(seed, cycle index, key, sender, receiver)``, so the sender
    and the receiver draw the same widths without communicating.
    """

    def __init__(self, num_layers: int, cycle: int = 10, seed: int = 0):
        if cycle < 1:
            raise ValueError(f"cycle must be >= 1, got {cycle}")
        self.num_layers, self.cycle, self.seed = num_layers, cycle, seed
        self._drawn: int | None = None  # the cycle whose widths the exchange holds

    def on_epoch_start(self, epoch: int, graph: DistGraph) -> None:
        redraw = epoch // self.cycle
        if redraw == self._drawn:
            return
        self._drawn = redraw
        lg = graph.graph
        me = lg.rank
        for layer in range(self.num_layers):
            # forward: we send our send_index rows; backward: we send our halo rows back.
            for key, send_rows, recv_rows in (
                    (f"forward {layer}", lg.send_index, lg.recv_index),
                    (f"backward {layer}", lg.recv_index, lg.send_index)):
                send = {p: self._draw(redraw, key, me, p, idx.numel())
                        for p, idx in send_rows.items()}
                recv = {p: self._draw(redraw, key, p, me, idx.numel())
                        for p, idx in recv_rows.items()}
                graph.exchange.set_bits(key, send, recv)

    def _draw(self, redraw: int, key: str, sender: int, receiver: int, n: int) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}/{redraw}/{key}/{sender}/{receiver}".encode(),
                                 digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.tensor(WIDTHS)[torch.randint(len(WIDTHS), (n,), generator=gen)]

    def report(self) -> dict:
        """Nothing beyond the configuration to record."""
        return {}

    def state_dict(self) -> dict:
        return {"num_layers": self.num_layers, "cycle": self.cycle, "seed": self.seed}

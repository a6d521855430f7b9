"""The halo exchange: boundary rows to the peers that need them, gradients back.

Forward of layer ``l`` (exchange key ``"forward l"``): every worker encodes
the rows of ``x`` that its peers hold as halo rows (``send_index``) at the
assigned bit widths, each row once per width however many peers need it
(:class:`~pyg_adaqp.comm.SharedRows`), exchanges, and decodes what arrives
into its halo block (``recv_index``).  Backward (key ``"backward l"``): the
gradient arriving at the halo block is encoded and sent back to the owners,
which add it into the gradient of the rows they sent.  Both directions are
autograd functions, so the exchange is correct for any graph (directed ones
included) and any layer that consumes the halo block.

The exchange is split in two autograd functions so that computation can
overlap communication in both directions (see :meth:`HaloExchange.begin`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from pyg_adaqp.comm.codec import FULL_PRECISION, MessageLayout, SharedRows, message_nbytes
from pyg_adaqp.comm.clock import device_clock
from pyg_adaqp.comm.transport import PendingExchange, Transport
from pyg_adaqp.partition import LocalGraph


@dataclass
class ExchangeStats:
    """Counters of one exchange key, accumulated until :meth:`HaloExchange.reset_stats`.

    Times are in seconds: ``quant_time`` encodes and decodes messages,
    ``comm_time`` runs from posting an exchange until it is seen complete,
    ``wait_time`` is the part of it spent blocked (not overlapped).  For
    forward keys the layer also records its aggregation: ``owned_agg_time``
    for the owned-row part (overlapped with the exchange when overlap is
    on), ``halo_agg_time`` for the halo part.  Per peer, ``peer_sent`` and
    ``peer_recv`` count bytes (``bytes_sent`` and ``bytes_recv`` are their
    sums) and ``peer_arrival`` sums the seconds from posting an exchange to
    the arrival of that peer's buffer.
    """
    quant_time: float = 0.0
    comm_time: float = 0.0
    wait_time: float = 0.0
    owned_agg_time: float = 0.0
    halo_agg_time: float = 0.0
    calls: int = 0
    width: int = 0                   #: feature width of the key's messages
    rows_by_bits: dict[int, int] = field(default_factory=dict)  #: rows sent at each width
    peer_sent: dict[int, int] = field(default_factory=dict)
    peer_recv: dict[int, int] = field(default_factory=dict)
    peer_arrival: dict[int, float] = field(default_factory=dict)

    def add_traffic(self, other: ExchangeStats) -> None:
        """Adds `other`'s calls, bytes per peer and rows per width to these
        counters (not its times)."""
        self.calls += other.calls
        for mine, theirs in ((self.peer_sent, other.peer_sent), (self.peer_recv, other.peer_recv),
                             (self.rows_by_bits, other.rows_by_bits)):
            for at, n in theirs.items():     # a peer, or a width
                mine[at] = mine.get(at, 0) + n

    @property
    def bytes_sent(self) -> int:
        return sum(self.peer_sent.values())

    @property
    def bytes_recv(self) -> int:
        return sum(self.peer_recv.values())


@dataclass
class LinkLoad:
    """An exchange that training makes anyway, offered to the cost model's
    set-up to time as its round of every link at once, in place of dummy
    bytes (:func:`~pyg_adaqp.assign.cost_model.profile_links`; the input
    cache's first columns: :meth:`~pyg_adaqp.nn.DistGraph.input_load`).

    It exchanges up to ``columns`` columns of rows; ``sent[p]`` is the bytes
    one column sends peer ``p`` (what it receives, its peers' offers say).
    ``run(start, n)`` makes the exchange of the first ``n`` columns (once):
    it packs what it sends, calls `start` (collective: the round's start,
    which it returns), posts, waits, and returns when each peer's bytes
    arrived, in seconds after that start.
    """
    sent: dict[int, int]
    columns: int
    run: Callable[[Callable[[], float], int], dict[int, float]]


@dataclass
class _Travel:
    """How one direction's rows travel, per peer: in the plan's order, or in
    the order a key's mixed assignment sends them (built once per
    assignment, by :meth:`HaloExchange._travel`)."""
    #: The source rows each peer's message carries, in the order they travel.
    send: dict[int, Tensor]
    #: Where each peer's received rows go (halo slots, or owned rows to add into).
    recv: dict[int, Tensor]
    #: Per peer decoded into its halo slice in the order its rows travel:
    #: the slice's rows to move after decoding, and where they go.
    settle: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: Peers whose message is a slice of the source (a halo block's gradient
    #: travelling in plan order), sent without a gather.
    slices: dict[int, slice] = field(default_factory=dict)


@dataclass
class _Flight:
    """One exchange in flight and what is needed to finish it."""
    pending: PendingExchange | None
    layouts: dict[int, MessageLayout]
    stats: ExchangeStats
    dtype: torch.dtype
    started: float  #: when the exchange was posted, by the exchange's clock
    travel: _Travel  #: how its rows travel


class HaloExchange:
    r"""Exchanges halo rows and their gradients for one worker.

    Args:
        graph (LocalGraph): This worker's part.
        group (ProcessGroup, optional): Process group of the exchange; use
            one apart from the gradient all-reduce's. Ignored when
            ``graph.num_parts == 1``. (default: the default group)
        device (torch.device, optional): Device of the exchanged tensors.
            (default: :obj:`"cpu"`)
        generator (torch.Generator, optional): Source of the stochastic
            rounding noise. (default: :obj:`None`)
    """

    def __init__(self, graph: LocalGraph, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        self.graph = graph
        self.device = torch.device(device)
        #: Every timing's clock: synchronizes the device first on CUDA.
        self.clock = device_clock(self.device)
        self.generator = generator
        self.transport = Transport(group) if graph.num_parts > 1 else None
        if self.transport is not None and self.transport.world_size != graph.num_parts:
            raise ValueError(f"the exchange's process group has {self.transport.world_size} "
                             f"workers but the graph has {graph.num_parts} parts")
        self.send_index = {p: i.to(self.device) for p, i in graph.send_index.items()}
        self.recv_index = {p: i.to(self.device) for p, i in graph.recv_index.items()}
        # Peers filling one contiguous run of halo slots (what partition_graph
        # makes) are decoded straight into the halo block, without a copy.
        self._recv_slice = {p: _as_slice(i) for p, i in graph.recv_index.items()}
        slices = {p: s for p, s in self._recv_slice.items() if s is not None}
        # Rows in the plan's order, by direction (forward?): owned rows out
        # and halo slots in, or halo gradients out and owned rows in.
        self._plain = {True: _Travel(self.send_index, self.recv_index),
                       False: _Travel(self.recv_index, self.send_index, slices=slices)}
        #: Width of quantized rows of keys without an assignment (:meth:`set_bits`).
        self.default_bits = 8
        #: Optional observer of quantized exchanges: ``tracer.record(key, peer, ranges,
        #: width)`` gets the per-row range ``max - min`` of every quantized message
        #: sent, ``tracer.record_signal(key, power)`` the squared norm of what the
        #: messages are added into (a forward layer's output, the gradient of the
        #: rows sent).
        self.tracer = None
        # Per key: the widths (sorted) by peer, and the order rows travel in
        # for each peer whose rows a mixed assignment re-orders, for what this
        # worker sends and receives.
        self._bits: dict[str, tuple[dict[int, Tensor], dict[int, Tensor]]] = {}
        self._order: dict[str, tuple[dict[int, Tensor], dict[int, Tensor]]] = {}
        # Per key with an order and direction (forward?): how its rows
        # travel (:meth:`_travel`), built from the order once per assignment.
        self._travels: dict[tuple[str, bool], _Travel] = {}
        self._layouts: dict[tuple, MessageLayout] = {}
        self._shared_rows: dict[tuple, SharedRows] = {}
        self._encode_share: dict[bool, float] = {}  # by direction (forward?)
        self.stats: dict[str, ExchangeStats] = defaultdict(ExchangeStats)

    # --- bit assignment -------------------------------------------------------------------------

    def set_bits(self, key: str, send_bits: dict[int, Tensor], recv_bits: dict[int, Tensor]) -> None:
        """Sets the width of every row of exchange `key`.

        Args:
            key (str): Exchange key, e.g. ``"forward 1"`` or ``"backward 1"``.
            send_bits (dict[int, LongTensor]): Width of every row sent to each
                peer, in send order.
            recv_bits (dict[int, LongTensor]): Width of every row received
                from each peer, in receive order (the peer's `send_bits`).

        Widths equal to the installed ones keep the key's message layouts and
        shared-row plans (an allocator re-assigning to the same widths).
        """
        # Each peer's rows travel sorted by width (both ends compute the order
        # alike from the same widths), so every width's rows are one slice of
        # the message: no per-width gather or scatter.  The order moves only
        # the rows outside their width's slice (:func:`travel_order`): a peer
        # whose rows share one width keeps the plan's order, and a row that
        # is not moved is decoded straight into its halo slot.
        order = tuple({p: o for p, o in ((p, travel_order(b.cpu())) for p, b in bits.items())
                       if not torch.equal(o, torch.arange(o.numel()))}
                      for bits in (send_bits, recv_bits))
        bits = tuple({p: b.cpu()[o[p]] if p in o else b.cpu() for p, b in bits.items()}
                     for bits, o in zip((send_bits, recv_bits), order))
        if not any(order):
            order = None  # one width on every channel: rows travel in plan order
        if (key in self._bits and _same_per_peer(self._bits[key], bits)
                and _same_per_peer(self._order.get(key), order)):
            return  # the installed widths: the key's layouts and shared-row plans stay
        self._bits[key] = bits
        if order is None:
            self._order.pop(key, None)
        else:  # kept on the exchange's device: used at every exchange of the key
            self._order[key] = tuple({p: o.to(self.device) for p, o in side.items()}
                                     for side in order)
        self._travels = {k: v for k, v in self._travels.items() if k[0] != key}
        self._layouts = {k: v for k, v in self._layouts.items() if k[0] != key}
        self._shared_rows = {k: v for k, v in self._shared_rows.items() if k[0] != key}

    def _reordered(self, forward: bool, send_perm: dict[int, Tensor],
                   recv_perm: dict[int, Tensor]) -> _Travel:
        """The plan's rows of one direction with the re-ordered peers' in the
        order they travel.  A forward peer whose halo slots are one slice is
        decoded straight into it: its `settle` holds the positions of its
        message whose rows belong in other slots of the slice, and those
        slots (see :func:`travel_order`)."""
        plain = self._plain[forward]
        settle = {}
        for p, o in recv_perm.items():
            if forward and self._recv_slice[p] is not None:
                at = torch.nonzero(o != torch.arange(o.numel(), device=o.device)).flatten()
                settle[p] = (at, o[at])
        return _Travel({**plain.send, **{p: plain.send[p][o] for p, o in send_perm.items()}},
                       {**plain.recv, **{p: plain.recv[p][o] for p, o in recv_perm.items()}},
                       settle, {p: s for p, s in plain.slices.items() if p not in send_perm})

    def _travel(self, key: str, forward: bool, quantize: bool) -> _Travel:
        """How `key`'s rows travel in one direction: re-ordered by its
        assignment (quantized only), or in the plan's order."""
        order = self._order.get(key) if quantize else None
        if order is None:
            return self._plain[forward]
        travel = self._travels.get((key, forward))
        if travel is None:
            travel = self._travels[(key, forward)] = self._reordered(forward, *order)
        return travel

    def _widths(self, key: str, quantize: bool) -> int | str:
        """What `key`'s messages are built for: ``"assigned"`` (its
        :meth:`set_bits` widths), or the one width of all its rows."""
        if not quantize:
            return FULL_PRECISION
        return "assigned" if key in self._bits else self.default_bits

    def _layout(self, key: str, peer: int, sending: bool, num_rows: int, width: int,
                quantize: bool) -> MessageLayout:
        """The layout of one message, built once per (assignment, peer, shape)."""
        widths = self._widths(key, quantize)
        cache_key = (key, widths, peer, sending, num_rows, width)
        layout = self._layouts.get(cache_key)
        if layout is None:
            if widths == "assigned":
                bits = self._bits[key][0 if sending else 1][peer]
                if bits.numel() != num_rows:
                    raise ValueError(f"exchange {key!r}: {bits.numel()} bit widths assigned for "
                                     f"peer {peer}, but {num_rows} rows are exchanged")
            else:
                bits = torch.full((num_rows,), widths, dtype=torch.long)
            layout = self._layouts[cache_key] = MessageLayout(bits, width)
        return layout

    def encode_share(self, key: str) -> float:
        """The fraction of the rows sent under `key` that this worker encodes
        when they all travel at one width: a row that several peers need is
        encoded once (:class:`SharedRows`).  Forward keys send owned rows,
        often to several peers; backward keys send each halo row's gradient
        to its one owner (1.0)."""
        forward = key.startswith("forward")
        if forward not in self._encode_share:  # a property of the plan: counted once
            index = self.send_index if forward else self.recv_index
            sent = sum(i.numel() for i in index.values())
            distinct = torch.unique(torch.cat(list(index.values()))).numel() if sent else 0
            self._encode_share[forward] = distinct / sent if sent else 1.0
        return self._encode_share[forward]

    # --- the exchange ---------------------------------------------------------------------------

    def _shared(self, key: str, index: dict[int, Tensor], layouts: dict[int, MessageLayout],
                width: int) -> SharedRows:
        """The quantize-once plan of `key`'s messages, built once per assignment."""
        cache_key = (key, self._widths(key, True), width)
        shared = self._shared_rows.get(cache_key)
        if shared is None:
            shared = self._shared_rows[cache_key] = SharedRows(index, layouts)
        return shared

    def _start(self, key: str, x: Tensor, travel: _Travel, quantize: bool,
               start: Callable[[], float] | None = None) -> _Flight:
        """Encodes rows ``travel.send[p]`` of `x` (or the slice
        ``travel.slices[p]``) for every peer `p` and posts the exchange,
        receiving ``travel.recv[p]``'s count of rows from each.

        Quantized, every row is encoded once per width it travels at, however
        many peers it goes to (:class:`SharedRows`).  With `start`, posting
        waits for it (a timed round's start: see :class:`LinkLoad`), and
        arrivals count from what it returns.
        """
        stats = self.stats[key]
        stats.calls += 1
        width = stats.width = x.size(1)
        t0 = self.clock()
        index = travel.send
        layouts = {p: self._layout(key, p, True, i.numel(), width, quantize)
                   for p, i in index.items()}
        if quantize:
            tracing = self.tracer is not None
            packed = self._shared(key, index, layouts, width).pack(
                x, generator=self.generator, name=f"exchange {key!r}", return_range=tracing)
            send, ranges = packed if tracing else (packed, {})
            perms = self._order.get(key, ({}, {}))[0]
            for p, r in ranges.items():
                if p in perms:  # back to plan order, the allocator's row identity
                    r = torch.empty_like(r).index_copy_(0, perms[p], r)
                self.tracer.record(key, p, r, width)
        else:
            send = {p: layouts[p].pack(x[travel.slices[p]] if p in travel.slices
                                       else x.index_select(0, i))
                    for p, i in index.items()}
        for p, layout in layouts.items():
            stats.peer_sent[p] = stats.peer_sent.get(p, 0) + int(send[p].numel())
            for bits, count in layout.counts.items():
                if count:
                    stats.rows_by_bits[bits] = stats.rows_by_bits.get(bits, 0) + count
        recv_layouts, recv_bytes = {}, {}
        for p, into in travel.recv.items():
            recv_layouts[p] = self._layout(key, p, False, into.numel(), width, quantize)
            recv_bytes[p] = recv_layouts[p].nbytes
            stats.peer_recv[p] = stats.peer_recv.get(p, 0) + recv_bytes[p]
        t1 = self.clock()       # on CUDA: the encode is done before a round's start
        if start is not None:
            t1 = start()
        pending = self.transport.start(send, recv_bytes, self.device) if self.transport else None
        # Posting counts as encoding: it includes staging CUDA buffers through host memory.
        stats.quant_time += self.clock() - t0
        return _Flight(pending, recv_layouts, stats, x.dtype, started=t1, travel=travel)

    def _finish(self, flight: _Flight, out: dict[int, Tensor] | None = None
                ) -> dict[int, Tensor]:
        """Waits for `flight` and decodes what arrived, by peer (into `out[p]` if given)."""
        t0 = self.clock()
        raw = flight.pending.wait() if flight.pending is not None else {}
        t1 = self.clock()
        stats = flight.stats
        stats.wait_time += t1 - t0
        stats.comm_time += t1 - flight.started
        if flight.pending is not None:
            for p, at in flight.pending.arrived.items():
                stats.peer_arrival[p] = stats.peer_arrival.get(p, 0.0) + at - flight.started
        out = out or {}
        decoded = {p: layout.unpack(raw[p], dtype=flight.dtype, out=out.get(p))
                   for p, layout in flight.layouts.items() if layout.num_rows}
        for p, (at, to) in flight.travel.settle.items():  # the moved rows to their own slots
            if p in decoded:
                decoded[p].index_copy_(0, to, decoded[p][at])
        flight.stats.quant_time += self.clock() - t1
        return decoded

    def start_forward(self, key: str, x: Tensor, quantize: bool) -> _Flight:
        """Posts the rows of `x` (owned rows) that peers hold as halo rows."""
        return self._start(key, x, self._travel(key, True, quantize), quantize)

    def finish_forward(self, flight: _Flight, width: int) -> Tensor:
        """The halo block, ``[num_halo, width]``."""
        # Every halo slot is filled by exactly one peer: no need to zero it.
        halo = torch.empty(self.graph.num_halo, width, dtype=flight.dtype, device=self.device)
        views = {p: halo[s] for p, s in self._recv_slice.items() if s is not None}
        for p, rows in self._finish(flight, views).items():
            if p not in views:
                halo.index_copy_(0, flight.travel.recv[p], rows)
        return halo

    def start_backward(self, key: str, grad_halo: Tensor, quantize: bool) -> _Flight:
        """Posts the gradient of every halo row back to its owner."""
        return self._start(key, grad_halo, self._travel(key, False, quantize), quantize)

    def finish_backward(self, flight: _Flight, grad_x: Tensor | None) -> Tensor | None:
        """`grad_x` plus the gradients the peers sent back for our rows.

        With ``grad_x=None`` returns only what the peers sent (or :obj:`None`).
        """
        received = self._finish(flight)
        if not received:
            return grad_x
        # Sum what the peers sent first, then add it once: the overlapped and
        # the sequential path then round identically.
        some = next(iter(received.values()))
        total = some.new_zeros(self.graph.num_owned, some.size(1))
        for p, rows in received.items():
            total.index_add_(0, flight.travel.recv[p], rows)
        return total if grad_x is None else grad_x + total

    def exchange(self, key: str, x: Tensor, quantize: bool = False) -> Tensor:
        """Blocking forward exchange without autograd: the halo block of `x`."""
        return self.finish_forward(self.start_forward(key, x, quantize), x.size(1))

    def link_load(self, key: str, x: Tensor, keep: Callable[[Tensor, ExchangeStats], None]
                  ) -> LinkLoad:
        """The forward exchange of `x`'s halo rows at full precision, some of
        its columns, as a :class:`LinkLoad`; once run, `keep` receives the
        halo block of those columns and the exchange's counters (taken out
        of :attr:`stats`: the set-up's time is in no epoch's)."""
        sent = {p: message_nbytes(i.numel(), 1, FULL_PRECISION)
                for p, i in self.send_index.items() if i.numel()}

        def run(start: Callable[[], float], columns: int) -> dict[int, float]:
            flight = self._start(key, x[:, :columns], self._plain[True], False, start=start)
            halo = self.finish_forward(flight, columns)
            keep(halo, self.stats.pop(key))
            arrived = flight.pending.arrived if flight.pending is not None else {}
            return {p: at - flight.started for p, at in arrived.items()}

        return LinkLoad(sent, x.size(1), run)

    def exchange_columns(self, key: str, x: Tensor, columns: int, first: int = 0
                         ) -> Iterator[tuple[slice, Tensor]]:
        """Blocking forward exchanges of `x`'s halo rows, `columns` columns at
        a time from column `first`.

        Yields ``(column slice, halo block)``; a caller that drops each block
        before the next holds one at a time.  Every worker must pass the same
        feature width, `columns` and `first` (the same exchanges).  The key's
        counters sum over the blocks; its width is `x`'s.
        """
        for start in range(first, x.size(1), columns):
            cols = slice(start, start + columns)
            yield cols, self.exchange(key, x[:, cols])
        self.stats[key].width = x.size(1)

    def reset_stats(self) -> dict[str, ExchangeStats]:
        """Returns the counters so far and starts new ones."""
        stats, self.stats = dict(self.stats), defaultdict(ExchangeStats)
        return stats

    # --- autograd -------------------------------------------------------------------------------

    def begin(self, layer: int, x: Tensor, quantize: bool, overlap: bool) -> HaloHandle:
        """Starts the exchange of layer `layer` and returns a handle.

        Use it as::

            handle = exchange.begin(layer, x, quantize, overlap)
            out = owned_part(handle.x)      # runs while the rows travel
            halo = handle.halo()            # waits, returns [num_halo, D]
            out = out + halo_part(halo)

        Computation on ``handle.x`` between the two calls overlaps the
        exchange.  In backward, the halo gradient is sent as soon as autograd
        produces it, and the gradient of the owned part is computed while it
        travels; with ``overlap=False`` both directions wait at once.
        """
        state = _LayerState(self, layer, quantize, overlap, x.size(1))
        x_alias, token = _PostHalo.apply(x, state)
        return HaloHandle(x_alias, token, state)


@dataclass
class _LayerState:
    exchange: HaloExchange
    layer: int
    quantize: bool
    overlap: bool
    width: int
    flight: _Flight | None = None
    grad_received: _Flight | None = None


class HaloHandle:
    """An exchange begun by :meth:`HaloExchange.begin`."""

    def __init__(self, x: Tensor, token: Tensor, state: _LayerState):
        self.x = x
        self._token = token
        self._state = state

    def halo(self) -> Tensor:
        """Waits for the exchange and returns the halo block."""
        return _CollectHalo.apply(self._token, self._state)


class _PostHalo(Function):
    """Forward: posts the send rows. Backward: adds the gradients peers sent back."""

    @staticmethod
    def forward(ctx, x: Tensor, state: _LayerState):
        ctx.state = state
        state.flight = state.exchange.start_forward(f"forward {state.layer}", x.detach(),
                                                    state.quantize)
        if not state.overlap:
            state.flight = _Done(state.exchange.finish_forward(state.flight, state.width))
        # The token links this function to _CollectHalo in the autograd graph.
        return x.view_as(x), x.new_empty(0)

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_token: Tensor):
        state = ctx.state
        if state.grad_received is None:
            # Autograd never reached the halo block (nothing consumed it), but
            # the peers still send gradients for our rows and expect ours.
            _CollectHalo.backward(ctx, grad_x.new_zeros(state.exchange.graph.num_halo,
                                                        state.width))
        flight, state.grad_received = state.grad_received, None
        if isinstance(flight, _Done):
            grad = grad_x if flight.value is None else grad_x + flight.value
        else:
            grad = state.exchange.finish_backward(flight, grad_x)
        tracer = state.exchange.tracer
        if state.quantize and tracer is not None:
            tracer.record_signal(f"backward {state.layer}",
                                 torch.linalg.vector_norm(grad.detach()).square())
        return grad, None


class _CollectHalo(Function):
    """Forward: waits for the halo block. Backward: posts its gradient to the owners."""

    @staticmethod
    def forward(ctx, token: Tensor, state: _LayerState):
        ctx.state = state
        flight, state.flight = state.flight, None
        if isinstance(flight, _Done):
            return flight.value
        return state.exchange.finish_forward(flight, state.width)

    @staticmethod
    def backward(ctx, grad_halo: Tensor):
        state = ctx.state
        ex = state.exchange
        flight = ex.start_backward(f"backward {state.layer}", grad_halo.contiguous(),
                                   state.quantize)
        if not state.overlap:
            flight = _Done(ex.finish_backward(flight, None))
        state.grad_received = flight
        return grad_halo.new_zeros(0), None


@dataclass
class _Done:
    """A finished exchange's result, for the sequential path."""
    value: Tensor | None


def travel_order(bits: Tensor) -> Tensor:
    """The order rows with widths `bits` travel in: a permutation ``perm``
    (message position -> row) with ``bits[perm]`` sorted, so every width's
    rows are one contiguous slice of the message, that leaves every row
    whose position lies in its own width's slice where it is.  The others
    fill the free positions of their width's slice in row order.  A
    receiver that decodes the message straight into the rows' slots then
    moves only those rows: with one group of 100 rows at 4 bits among
    3,000 at 2, at most 200 rows (a stable sort by width moves every row
    after the first wider one)."""
    bits = bits.long()
    positions = torch.arange(bits.numel())
    at = torch.sort(bits).values               # the width of each message position
    free = positions[at != bits]
    perm = positions.clone()
    # The free positions hold the free rows' widths, already sorted: the
    # rows sorted by width (stably, so in row order within a width) fill them.
    perm[free] = free[torch.sort(bits[free], stable=True).indices]
    return perm


def _same_per_peer(a: tuple[dict[int, Tensor], dict[int, Tensor]] | None,
                   b: tuple[dict[int, Tensor], dict[int, Tensor]] | None) -> bool:
    """Whether two ``(send, recv)`` pairs of per-peer tensors hold the same
    values (:obj:`None`: no such pair)."""
    if a is None or b is None:
        return a is b
    return all(x.keys() == y.keys() and all(torch.equal(x[p].cpu().long(), y[p].cpu().long())
                                            for p in x) for x, y in zip(a, b))


def _as_slice(index: Tensor) -> slice | None:
    """`index` as a slice if it is a run of consecutive integers, else None."""
    if index.numel() == 0:
        return None
    start = int(index[0])
    if torch.equal(index, torch.arange(start, start + index.numel())):
        return slice(start, start + index.numel())
    return None

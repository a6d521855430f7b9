"""`DistGraph`: what the distributed layers need besides their input rows."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pyg_adaqp.comm.exchange import ExchangeStats, HaloExchange, LinkLoad
from pyg_adaqp.nn.spmm import SparseAdjacency
from pyg_adaqp.partition import LocalGraph

#: Builds ``(src, dst, weight)`` of the layer's aggregation from a local graph.
EdgeWeightFn = Callable[[LocalGraph], "tuple[Tensor, Tensor, Tensor]"]

#: The input cache exchanges the input's halo rows this many columns at a time.
INPUT_BLOCK_COLUMNS = 128


def signal_power(out: Tensor, weight: Tensor | None = None,
                 product: Tensor | None = None) -> Tensor:
    r"""The power of an aggregation `out` that quantization noise is measured
    against: :math:`\|out\|^2`, or, when the layer applies `weight`
    :math:`W` (``[D_out, D]``) to it next, its power as :math:`W` sees it,

    .. math::
        \|out\, W^\top\|^2 \cdot \frac{D}{\|W\|_F^2}.

    Quantization noise is close to isotropic (every element of a row is
    rounded on the same step), so :math:`W` scales its power by its mean
    gain :math:`\|W\|_F^2 / D`; the signal keeps only what :math:`W` passes.
    Their ratio is the noise-to-signal ratio after the weight: a feature
    channel the layer learned to ignore (an unnormalized, uninformative
    column whose range sets every row's step) no longer counts as signal.
    A zero :math:`W` passes everything.  Norms are summed in the tensors'
    own precision, at least float32, and squared in float64 (a float64
    sum first copies the whole block, several times as long on the CPU in
    every traced epoch; float32's rounding is far below what a budget
    tells apart), and nothing waits for the device.

    Args:
        out (Tensor): The aggregation, ``[N, D]``.
        weight (Tensor, optional): :math:`W`. (default: :obj:`None`)
        product (Tensor, optional): :math:`out\, W^\top` (no bias), if
            already computed; only read with `weight`. (default: :obj:`None`)
    """
    whole = _power(out)
    if weight is None:
        return whole
    weight = weight.detach()
    if product is None:
        product = out.detach() @ weight.t()
    gain, seen = _power(weight), _power(product)
    return torch.where(gain > 0, seen * weight.size(1) / gain.clamp_min(1e-300), whole)


def _plus(out: Tensor, alongside: Callable[[], Tensor] | None) -> Tensor:
    """`out` plus what `alongside` returns, if given (:meth:`DistGraph.aggregate`)."""
    return out if alongside is None else out + alongside()


def _power(x: Tensor) -> Tensor:
    r""":math:`\|x\|^2` in float64, the norm summed in `x`'s precision (at least float32)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x.detach(), dtype=dtype).double().square()


class DistGraph:
    r"""One worker's distributed-graph context for :class:`DistGCNConv` and
    :class:`DistSAGEConv`.

    It owns the :class:`~pyg_adaqp.comm.HaloExchange`, the aggregation
    matrices of every normalization the layers ask for (built once), the
    layer-0 input cache (the aggregated input features), and the mode
    switches.  A layer's aggregation is

    .. math::
        \mathbf{Y} = \mathbf{A}_{\text{own}} \mathbf{X}
        + \mathbf{A}_{\text{halo}} \mathbf{H}

    with :math:`\mathbf{X}` the owned rows and :math:`\mathbf{H}` the halo
    block.  Central rows have empty rows in :math:`\mathbf{A}_{\text{halo}}`,
    so with ``overlap=True`` the first product, which completes every central
    row, runs while the halo rows travel.

    Args:
        graph (LocalGraph): This worker's part.
        exchange (HaloExchange, optional): The exchange to use; by default
            one is built over `group`. (default: :obj:`None`)
        group (ProcessGroup, optional): Process group of the exchange, kept
            apart from the gradient all-reduce's. (default: the default group)
        device (torch.device, optional): Device of the layers' tensors.
            (default: :obj:`"cpu"`)
        quantize (bool, optional): Whether training exchanges are quantized,
            at the exchange's bit assignment (by default every row at
            ``exchange.default_bits``, 8). (default: :obj:`False`)
        overlap (bool, optional): Whether the owned part is aggregated while
            the halo rows travel. (default: :obj:`True`)
        cache_input (bool, optional): Whether the aggregation of a layer
            input that needs no gradient (the input features) is computed
            once, its halo rows exchanged once at full precision, and reused
            while the input is the same, unchanged tensor: layer 0 then costs
            one dense transform per epoch.  :obj:`False` exchanges and
            aggregates it at every call, as the original AdaQP does.
            (default: :obj:`True`)
        generator (torch.Generator, optional): Rounding noise of the
            quantizer. (default: :obj:`None`)
    """

    def __init__(self, graph: LocalGraph, exchange: HaloExchange | None = None, *,
                 group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 quantize: bool = False, overlap: bool = True, cache_input: bool = True,
                 generator: torch.Generator | None = None):
        self.graph = graph
        self.device = torch.device(device)
        self.exchange = exchange or HaloExchange(graph, group, self.device, generator)
        self.quantize = quantize
        self.overlap = overlap
        self.cache_input = cache_input
        self._layers: dict[int, int] = {}
        self._adjacency: dict[tuple, tuple[SparseAdjacency, SparseAdjacency]] = {}
        #: Aggregated constant inputs by layer: ``(input ref, its version, key, A @ X)``.
        self._input_aggregate: dict[int, tuple[weakref.ref, int, tuple, Tensor]] = {}
        #: ``(A_own, A_halo)`` each layer aggregated with, by layer index.
        self.layer_adjacency: dict[int, tuple[SparseAdjacency, SparseAdjacency]] = {}
        #: The input's first columns exchanged in the set-up (:meth:`input_load`):
        #: ``(input ref, its version, their halo block, the exchange's counters)``.
        self._prefetched: tuple[weakref.ref, int, Tensor, ExchangeStats] | None = None

    def layer_index(self, module: torch.nn.Module) -> int:
        """A layer's exchange index, given in the order layers are first called."""
        return self._layers.setdefault(id(module), len(self._layers))

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """Exchanges at full precision inside the block (evaluation passes)."""
        quantize, self.quantize = self.quantize, False
        try:
            yield
        finally:
            self.quantize = quantize

    def build_adjacency(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Builds now, not at their first call, the matrices of every distributed layer in
        `model` (every module with a ``dist_aggregation()``), for inputs of `dtype`."""
        for module in model.modules():
            if callable(getattr(module, "dist_aggregation", None)):
                self.adjacency(*module.dist_aggregation(), dtype)

    def release_edge_list(self) -> None:
        """Frees the local graph's edge list and edge weights (sets them to :obj:`None`).

        Once the layers' matrices are built (:meth:`build_adjacency`) they
        hold everything aggregation needs; on a large part the edge list is
        a fifth of a worker's memory.  A layer with a normalization not built
        before then raises instead of aggregating.
        """
        self.graph.edge_index = None
        self.graph.edge_weight = None

    def adjacency(self, key: tuple, weights: EdgeWeightFn, dtype: torch.dtype
                  ) -> tuple[SparseAdjacency, SparseAdjacency]:
        """``(A_own, A_halo)`` for the normalization `key`, built once by `weights`."""
        cache_key = (*key, dtype)
        if cache_key not in self._adjacency:
            g = self.graph
            if g.edge_index is None:
                raise RuntimeError(
                    f"no aggregation matrix for {cache_key} was built before the local graph's "
                    f"edge list was released (DistGraph.release_edge_list): call "
                    f"build_adjacency with every distributed layer's model first")
            src, dst, w = weights(g)
            own = src < g.num_owned
            # Split, then drop the whole edge list before building: on a large
            # part the triplets, not the matrices, set the peak memory.
            own_block = (src[own], dst[own], w[own], g.num_owned)
            halo_block = (src[~own].sub_(g.num_owned), dst[~own], w[~own], g.num_halo)
            del src, dst, w, own
            a_own = self._matrix(*own_block, dtype)
            del own_block
            a_halo = self._matrix(*halo_block, dtype)
            del halo_block
            self._adjacency[cache_key] = (a_own, a_halo)
        return self._adjacency[cache_key]

    def _matrix(self, src: Tensor, dst: Tensor, w: Tensor, num_src: int,
                 dtype: torch.dtype) -> SparseAdjacency:
        return SparseAdjacency(src.to(self.device), dst.to(self.device), w.to(self.device, dtype),
                               (self.graph.num_owned, num_src))

    def caches_input(self, module: torch.nn.Module, x: Tensor) -> bool:
        """Whether :meth:`aggregate` will take `x`'s aggregation from the input cache.

        Layers aggregate such an input before transforming it: after the
        first call its aggregation costs nothing.
        """
        if not self.cache_input or x.requires_grad:
            return False
        if torch.is_grad_enabled():
            return True
        return self._cached_aggregate(self.layer_index(module), x) is not None

    def aggregate(self, module: torch.nn.Module, x: Tensor, key: tuple,
                  weights: EdgeWeightFn, linear: torch.nn.Module | None = None,
                  alongside: Callable[[], Tensor] | None = None) -> Tensor:
        """Aggregates over all in-edges of the owned rows, exchanging halo rows.

        Args:
            module (torch.nn.Module): The calling layer (names its exchange).
            x (Tensor): Owned rows, ``[num_owned, D]``.
            key (tuple): Names the normalization built by `weights`.
            weights (callable): Builds ``(src, dst, weight)`` in local ids.
            linear (torch.nn.Module, optional): The linear layer (a
                ``weight`` and an optional ``bias``) that the calling layer
                applies to the aggregation next, if it aggregates before
                transforming: returns its output instead, and the
                allocator's budget weighs the aggregation as its weight
                sees it (:func:`signal_power`) at no extra product.
                (default: :obj:`None`)
            alongside (callable, optional): Work of the calling layer that
                needs no halo row (SAGE's root weight on the owned rows),
                returning a tensor added to the output.  It runs while the
                halo rows travel, after the owned rows' aggregation; its
                backward, created between the exchange's two halves, runs
                while the halo gradient travels. (default: :obj:`None`)

        Returns:
            Tensor: ``[num_owned, D]``, or `linear`'s output, plus
            `alongside`'s.
        """
        if x.size(0) != self.graph.num_owned:
            raise ValueError(f"{type(module).__name__} got {x.size(0)} rows, but this worker "
                             f"owns {self.graph.num_owned} nodes")
        layer = self.layer_index(module)
        a_own, a_halo = self.layer_adjacency[layer] = self.adjacency(key, weights, x.dtype)
        if self.caches_input(module, x):
            out = self._aggregate_input(layer, x, key, a_own, a_halo)
            return _plus(out if linear is None else linear(out), alongside)
        handle = self.exchange.begin(layer, x, quantize=self.quantize, overlap=self.overlap)
        stats = self.exchange.stats[f"forward {layer}"]
        clock = self.exchange.clock
        t0 = clock()
        out = a_own.matmul(handle.x)       # overlaps the exchange
        t1 = clock()
        extra = alongside() if alongside is not None else None  # so does this
        halo = handle.halo()
        t2 = clock()
        if a_halo.nnz:  # a worker without halo rows adds nothing
            out = out + a_halo.matmul(halo)
        stats.owned_agg_time += t1 - t0
        stats.halo_agg_time += clock() - t2
        tracer = self.exchange.tracer
        transformed = out if linear is None else linear(out)
        if self.quantize and tracer is not None:
            # What the quantization noise is added into: the allocator's budget
            # is relative to this power.
            if linear is None:
                power = signal_power(out)
            else:
                bias = getattr(linear, "bias", None)
                product = transformed if bias is None else transformed.detach() - bias.detach()
                power = signal_power(out, linear.weight, product)
            tracer.record_signal(f"forward {layer}", power)
        return transformed if extra is None else transformed + extra

    def input_load(self, x: Tensor) -> LinkLoad | None:
        """The input cache's exchange of `x` (its halo rows at full
        precision, up to :data:`INPUT_BLOCK_COLUMNS` columns) as a
        :class:`~pyg_adaqp.comm.exchange.LinkLoad`, for the cost model's
        set-up to time some of its columns as its round of every link at
        once.  The columns exchanged there are held until the next cached
        aggregation of an input (:meth:`_input_blocks`), which takes them as
        exchanged where that input is `x`, unchanged, and else drops them.
        :obj:`None` where no layer would cache `x` (the cache off, `x`
        needing gradient, one worker).  Collective once run, as the
        exchange is."""
        if not self.cache_input or x.requires_grad or self.exchange.transport is None:
            return None

        def keep(halo: Tensor, stats: ExchangeStats) -> None:
            self._prefetched = (weakref.ref(x), x._version, halo, stats)

        return self.exchange.link_load("input", x[:, :INPUT_BLOCK_COLUMNS], keep)

    def _input_blocks(self, layer: int, x: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """`x`'s halo rows by blocks of columns: the columns
        :meth:`input_load` exchanged, where they were `x`'s as it is now
        (the set-up's exchange then counts in this epoch's counters, bytes
        and calls, its time stays the set-up's), then the rest exchanged
        here, :data:`INPUT_BLOCK_COLUMNS` at a time."""
        key, offset = f"input {layer}", 0
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0]() is x and prefetched[1] == x._version:
            _, _, halo, set_up_stats = prefetched
            del prefetched
            self.exchange.stats[key].add_traffic(set_up_stats)
            offset = halo.size(1)
            yield slice(0, offset), halo
            del halo
        else:
            del prefetched      # another input's, or x changed: one block held at a time
        yield from self.exchange.exchange_columns(key, x, INPUT_BLOCK_COLUMNS, offset)

    def _cached_aggregate(self, layer: int, x: Tensor, key: tuple | None = None) -> Tensor | None:
        """The cached aggregation of `x` at `layer`, if `x` is the cached, unchanged tensor."""
        cached = self._input_aggregate.get(layer)
        if (cached is None or cached[0]() is not x or cached[1] != x._version
                or (key is not None and cached[2] != key)):
            return None
        return cached[3]

    def _aggregate_input(self, layer: int, x: Tensor, key: tuple, a_own: SparseAdjacency,
                         a_halo: SparseAdjacency) -> Tensor:
        """``A @ X`` for an input needing no gradient, computed once per tensor.

        Its halo rows are exchanged once, at full precision,
        :data:`INPUT_BLOCK_COLUMNS` columns at a time (the first columns
        perhaps in the set-up: :meth:`input_load`), each block dropped once
        aggregated.  Under ``torch.no_grad()`` every activation needs no
        gradient, so there only a tensor already cached is reused (see
        :meth:`caches_input`).  Every worker makes the same choice, because
        it depends only on what the training loop passes to all of them.
        """
        out = self._cached_aggregate(layer, x, (*key, x.dtype))
        if out is None:
            out = a_own.matmul(x)
            # One block of halo rows held at a time: on a large part the halo
            # rows outnumber the owned ones.
            for cols, halo in self._input_blocks(layer, x):
                if a_halo.nnz:
                    out[:, cols] += a_halo.matmul(halo)
                del halo
            self._input_aggregate[layer] = (weakref.ref(x), x._version, (*key, x.dtype), out)
        return out

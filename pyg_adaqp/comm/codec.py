r"""The message codec: stochastic integer quantization of message rows
(AdaQP, `Wan et al., MLSys 2023 <https://arxiv.org/abs/2306.01381>`_) and the
mixed-width byte buffers exchanged with one peer.

Every row (one node's embedding or embedding gradient) is quantized on its
own range; see :mod:`pyg_adaqp.comm.packing` for the wire format, the choice
of bfloat16 headers and the dither's bias bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from pyg_adaqp.comm.packing import (SUPPORTED_BITS, decode_headers, decode_rows,
                                    encode_rows, row_bytes, row_headers, row_range)

FULL_PRECISION = 32
LAYOUT_BITS = SUPPORTED_BITS + (FULL_PRECISION, )


class NonFiniteMessageError(ValueError):
    """Raised when a message to quantize holds NaN or infinity."""


def message_nbytes(num_rows: int, width: int, bits: int) -> int:
    r"""Bytes on the wire of ``num_rows`` rows of ``width`` features at
    ``bits`` bits: :math:`n (\lceil D b / 8 \rceil + 4)` for :math:`b \in
    \{2, 4, 8\}` (codes plus the two bfloat16 header fields) and :math:`4 n D`
    for raw float32 (:obj:`bits=32`).

    Args:
        num_rows (int): Number of rows :math:`n`.
        width (int): Feature width :math:`D`.
        bits (int): Bit width, one of 2, 4, 8 or 32.
    """
    _check_bits(bits, LAYOUT_BITS)
    if num_rows < 0 or width < 0:
        raise ValueError(f"num_rows and width must be non-negative, got {num_rows} and {width}")
    if bits == FULL_PRECISION:
        return num_rows * width * 4
    return num_rows * (row_bytes(width, bits) + 4)


def worker_generator(seed: int, rank: int,
                     device: Union[str, torch.device] = 'cpu') -> torch.Generator:
    r"""Returns the quantization noise generator of worker ``rank``.

    The seed is a SplitMix64 hash of ``(seed, rank)``: a run is reproducible
    and neighbouring ranks or seeds get unrelated streams.

    Args:
        seed (int): Seed of the run.
        rank (int): Rank of the worker (:obj:`>= 0`).
        device (str or torch.device, optional): Device of the generator; it
            must match the device of the messages. (default: :obj:`"cpu"`)
    """
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    mask = (1 << 64) - 1

    def splitmix64(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return torch.Generator(device).manual_seed(splitmix64(splitmix64(seed & mask) ^ rank))


@dataclass
class QuantizedMessage:
    r"""A message of :math:`n` rows quantized at ``bits`` bits.

    Args:
        payload (torch.Tensor): Packed codes, uint8 ``[n, ceil(D b / 8)]``,
            little-endian: code :math:`j` sits in byte :math:`\lfloor jb/8
            \rfloor` at bit :math:`jb \bmod 8`.
        lo (torch.Tensor): Per-row offset, bfloat16 ``[n]``.
        scale (torch.Tensor): Per-row step :math:`\Delta`, bfloat16 ``[n]``;
            a set sign bit marks a constant row, whose float32 value the
            header carries (see :mod:`pyg_adaqp.comm.packing`).
        shape (tuple[int, int]): Shape :math:`(n, D)` of the message.
        bits (int): Bit width, one of 2, 4 or 8.
    """
    payload: Tensor
    lo: Tensor
    scale: Tensor
    shape: tuple[int, int]
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes on the wire, :func:`message_nbytes` of the message."""
        return message_nbytes(self.shape[0], self.shape[1], self.bits)

    def to(self, device: Union[str, torch.device]) -> QuantizedMessage:
        """Returns the message with its tensors on ``device``."""
        return QuantizedMessage(self.payload.to(device), self.lo.to(device),
                                self.scale.to(device), self.shape, self.bits)


@torch.no_grad()
def quantize(x: Tensor, bits: int, generator: Optional[torch.Generator] = None,
             name: str = 'message', dither: Optional[Tensor] = None) -> QuantizedMessage:
    r"""Quantizes every row of ``x`` to ``bits`` bits with unbiased stochastic
    rounding on its own range (see :mod:`pyg_adaqp.comm.packing`).

    Args:
        x (torch.Tensor): Float message ``[n, D]`` on any device.
        bits (int): Bit width, one of 2, 4 or 8.
        generator (torch.Generator, optional): Generator of the dither, on
            ``x``'s device, e.g. from :func:`worker_generator`.
            (default: :obj:`None`: the device's default generator)
        name (str, optional): Name of the message in error messages, e.g.
            :obj:`"layer 1 forward"`. (default: :obj:`"message"`)
        dither (torch.Tensor, optional): Uniform :math:`[0, 1)` float32 noise
            ``[n, D]`` to round with instead of drawing it; with it the codes
            are a deterministic function of the input on every device.
            (default: :obj:`None`)

    Raises:
        NonFiniteMessageError: If ``x`` holds NaN or infinity.
        ValueError: If a row's range exceeds the float32 range.
    """
    _check_bits(bits, SUPPORTED_BITS)
    _check_message(x, generator)
    if dither is not None and (dither.shape != x.shape or dither.dtype != torch.float32
                               or dither.device != x.device):
        raise ValueError(f"dither must be float32 {tuple(x.shape)} on {x.device}, got "
                         f"{dither.dtype} {tuple(dither.shape)} on {dither.device}")
    lo, hi = row_range(x)
    _check_finite(lo, hi, name)
    headers = row_headers(lo, hi, bits, name)
    payload = torch.empty(x.size(0), row_bytes(x.size(1), bits), dtype=torch.uint8,
                          device=x.device)
    encode_rows(x, headers, bits, payload, generator=generator, dither=dither)
    return QuantizedMessage(payload, headers.lo, headers.scale, (x.size(0), x.size(1)), bits)


@torch.no_grad()
def dequantize(msg: QuantizedMessage, dtype: torch.dtype = torch.float32,
               out: Optional[Tensor] = None) -> Tensor:
    r"""Decodes a :class:`QuantizedMessage`: :math:`\hat{x}_{ij} = l_i +
    \Delta_i q_{ij}`, exactly :math:`v` for a constant row of :math:`v`.

    Args:
        msg (QuantizedMessage): The message.
        dtype (torch.dtype, optional): Float dtype of the result.
            (default: :obj:`torch.float32`)
        out (torch.Tensor, optional): Tensor ``[n, D]`` to write into, e.g.
            the halo block; its dtype overrides ``dtype``. (default: :obj:`None`)
    """
    n, width = msg.shape
    if msg.payload.shape != (n, row_bytes(width, msg.bits)):
        raise ValueError(f"payload of shape {tuple(msg.payload.shape)} does not hold "
                         f"{n} x {width} codes at {msg.bits} bits")
    out = _output(out, n, width, dtype, msg.payload.device)
    lo, scale = decode_headers(msg.lo, msg.scale, msg.payload[:, 0])
    decode_rows(msg.payload, lo, scale, msg.bits, out)
    return out


class MessageLayout:
    r"""The byte layout of a mixed-width message to one peer.

    Rows are bucketed by bit width; the buffer holds the raw float32 rows,
    then the bfloat16 ``lo`` and ``scale`` fields of the 2-, 4- and 8-bit
    buckets, then their packed codes (this order keeps every typed segment
    aligned). Sender and receiver build the same layout from the same
    ``bits_per_row``, exchanged once per bit assignment, so a step exchanges
    nothing but the buffer.

    Args:
        bits_per_row (torch.LongTensor): Bit width of every row ``[n]``, each
            one of 2, 4, 8 or 32 (raw float32).
        width (int): Feature width :math:`D`.
    """
    def __init__(self, bits_per_row: Tensor, width: int):
        if bits_per_row.dim() != 1 or bits_per_row.is_floating_point():
            raise ValueError(f"bits_per_row must be a 1-D integer tensor, got "
                             f"{bits_per_row.dtype} of shape {tuple(bits_per_row.shape)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        bits_per_row = bits_per_row.long().cpu()
        bad = ~torch.isin(bits_per_row, torch.tensor(LAYOUT_BITS))
        if bool(bad.any()):
            raise ValueError(f"bits_per_row must take values in {LAYOUT_BITS}, got "
                             f"{sorted(set(bits_per_row[bad].tolist()))}")
        self.bits_per_row, self.width, self.num_rows = bits_per_row, width, bits_per_row.numel()
        self.counts = {b: int((bits_per_row == b).sum()) for b in LAYOUT_BITS}
        # Index tensors, kept on CPU and copied once to each device used; a
        # bucket whose rows are consecutive is a slice instead (no gather, no
        # scatter: rows sorted by width cost what a uniform message does).
        self._index: dict[Union[int, str], Tensor] = {}
        self._slices: dict[int, slice] = {}
        for b in LAYOUT_BITS:
            if 0 < self.counts[b] < self.num_rows:
                index = (bits_per_row == b).nonzero().view(-1)
                start = int(index[0])
                if int(index[-1]) - start + 1 == index.numel():
                    self._slices[b] = slice(start, start + index.numel())
                else:
                    self._index[b] = index
        self._index['quantized'] = bits_per_row != FULL_PRECISION
        self._index_on: dict[tuple[Union[int, str], torch.device], Tensor] = {}
        # Byte offsets: raw float32 rows, then lo/scale fields, then codes.
        self._header_at, self._payload_at = {}, {}
        at = self.counts[FULL_PRECISION] * width * 4
        for b in SUPPORTED_BITS:
            self._header_at[b] = at
            at += 4 * self.counts[b]
        for b in SUPPORTED_BITS:
            self._payload_at[b] = at
            at += self.counts[b] * row_bytes(width, b)
        self.nbytes = at

    def __repr__(self) -> str:
        counts = {b: c for b, c in self.counts.items() if c}
        return (f"{self.__class__.__name__}(rows={self.num_rows}, width={self.width}, "
                f"bits={counts}, nbytes={self.nbytes})")

    def rows(self, bits: int, device: Union[str, torch.device] = 'cpu') -> Optional[Tensor]:
        """Rows at ``bits`` bits in order, on ``device``; :obj:`None` when the
        bucket is empty, the whole message or a slice (no gather needed)."""
        return self._on(bits, torch.device(device)) if bits in self._index else None

    @property
    def contiguous(self) -> bool:
        """Whether every width's rows are consecutive (no gather or scatter)."""
        return not any(isinstance(b, int) for b in self._index)

    def bucket(self, bits: int) -> slice:
        """The rows at ``bits`` bits, as a slice of the message.

        Raises:
            ValueError: If those rows are not consecutive.
        """
        if bits in self._index:
            raise ValueError(f"the {bits}-bit rows of {self!r} are not consecutive")
        if not self.counts.get(bits):
            return slice(0, 0)
        return self._slices.get(bits, slice(None))

    def _copy_bucket(self, buf: Tensor, bits: int, source: MessageLayout, source_buf: Tensor,
                     index: Tensor) -> None:
        """Copies rows `index` of the ``bits`` bucket of `source`'s packed
        `source_buf` into this layout's ``bits`` bucket of `buf`, bytes only."""
        n, m = source.counts[bits], self.counts[bits]
        for field_at in (0, 2):  # the lo fields, then the scale fields: 2 bytes per row
            src = source._header_at[bits] + field_at * n
            dst = self._header_at[bits] + field_at * m
            torch.index_select(source_buf[src:src + 2 * n].view(n, 2), 0, index,
                               out=buf[dst:dst + 2 * m].view(m, 2))
        torch.index_select(source._segment(source_buf, source._payload_at[bits], bits), 0, index,
                           out=self._segment(buf, self._payload_at[bits], bits))

    def _on(self, key: Union[int, str], device: torch.device) -> Tensor:
        if (key, device) not in self._index_on:
            self._index_on[(key, device)] = self._index[key].to(device)
        return self._index_on[(key, device)]

    @torch.no_grad()
    def pack(self, x: Tensor, generator: Optional[torch.Generator] = None, name: str = 'message',
             out: Optional[Tensor] = None,
             return_range: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        r"""Quantizes and packs ``x`` into one uint8 buffer of :attr:`nbytes`.

        Args:
            x (torch.Tensor): Float message ``[n, D]``, rows in layout order.
            generator (torch.Generator, optional): Generator of the dither;
                the 2-, 4- and 8-bit buckets draw from it in that order.
                (default: :obj:`None`: the device's default generator)
            name (str, optional): Name of the message in error messages.
                (default: :obj:`"message"`)
            out (torch.Tensor, optional): uint8 buffer ``[nbytes]`` to write
                into, e.g. a slice of a persistent send buffer.
                (default: :obj:`None`)
            return_range (bool, optional): If set, also returns the float32
                per-row range :math:`\max_j x_j - \min_j x_j` ``[n]`` that
                the bit allocator traces. (default: :obj:`False`)

        Raises:
            NonFiniteMessageError: If a row to quantize (any row, with
                ``return_range``) holds NaN or infinity.
        """
        _check_message(x, generator)
        if tuple(x.shape) != (self.num_rows, self.width):
            raise ValueError(f"{name!r}: expected a message of shape "
                             f"{(self.num_rows, self.width)}, got {tuple(x.shape)}")
        buf = _buffer(out, self.nbytes, x.device, 'out')
        quantized = [b for b in SUPPORTED_BITS if self.counts[b]]
        lo = hi = None
        if quantized or return_range:
            lo, hi = row_range(x)
            _check_finite(lo, hi, name, None if return_range else self._on('quantized', x.device))

        if self.counts[FULL_PRECISION]:
            rows = self.rows(FULL_PRECISION, x.device)
            raw = x[self._slices.get(FULL_PRECISION, slice(None))] if rows is None \
                else x.index_select(0, rows)
            _write(self._segment(buf, 0, FULL_PRECISION), raw.float())
        for b in quantized:
            rows = self.rows(b, x.device)
            sl = self._slices.get(b, slice(None))
            n = self.counts[b]
            headers = row_headers(_take(lo[sl], rows), _take(hi[sl], rows), b, name)
            _write(buf[self._header_at[b]:self._header_at[b] + 2 * n], headers.lo)
            _write(buf[self._header_at[b] + 2 * n:self._header_at[b] + 4 * n], headers.scale)
            encode_rows(x[sl], headers, b, self._segment(buf, self._payload_at[b], b),
                        rows=rows, generator=generator)
        return (buf, hi - lo) if return_range else buf

    @torch.no_grad()
    def unpack(self, buffer: Tensor, dtype: torch.dtype = torch.float32,
               out: Optional[Tensor] = None) -> Tensor:
        r"""Decodes a buffer made by :meth:`pack` into ``[n, D]``, original
        row order.

        Args:
            buffer (torch.Tensor): uint8 buffer ``[nbytes]``.
            dtype (torch.dtype, optional): Float dtype of the result.
                (default: :obj:`torch.float32`)
            out (torch.Tensor, optional): Tensor ``[n, D]`` to write into, e.g.
                the halo block; its dtype overrides ``dtype``. (default: :obj:`None`)
        """
        buffer = _buffer(buffer, self.nbytes, buffer.device, 'buffer')
        out = _output(out, self.num_rows, self.width, dtype, buffer.device)
        if self.counts[FULL_PRECISION]:
            raw = _read(self._segment(buffer, 0, FULL_PRECISION), torch.float32)
            raw = raw.view(-1, self.width)
            rows = self.rows(FULL_PRECISION, buffer.device)
            if rows is None:
                out[self._slices.get(FULL_PRECISION, slice(None))].copy_(raw)
            else:
                out.index_copy_(0, rows, raw.to(out.dtype))
        for b in SUPPORTED_BITS:
            n = self.counts[b]
            if n == 0:
                continue
            lo = _read(buffer[self._header_at[b]:self._header_at[b] + 2 * n], torch.bfloat16)
            scale = _read(buffer[self._header_at[b] + 2 * n:self._header_at[b] + 4 * n],
                          torch.bfloat16)
            payload = self._segment(buffer, self._payload_at[b], b)
            lo, scale = decode_headers(lo, scale, payload[:, 0])
            decode_rows(payload, lo, scale, b, out[self._slices.get(b, slice(None))],
                        rows=self.rows(b, buffer.device))
        return out

    def _segment(self, buf: Tensor, at: int, bits: int) -> Tensor:
        """The bytes of the ``bits`` bucket's rows, as ``[rows, bytes per row]``."""
        per_row = self.width * 4 if bits == FULL_PRECISION else row_bytes(self.width, bits)
        return buf[at:at + self.counts[bits] * per_row].view(-1, per_row)


#: The share of a source's rows that :class:`SharedRows` quantizes without
#: sending at a width rather than gather the rows it sends: on this 2-core
#: CPU quantizing a row at 2 bits cost 6-16 times gathering it in two runs
#: of ``benchmarks/codec_speed.py``, so the two break even between 1/7 and
#: 1/17 of the rows; at 1/32 the extra quantizing costs at most about half
#: the gather it saves.
WHOLE_SOURCE_SLACK = 1 / 32


class SharedRows:
    r"""Messages to several peers built from one quantization of each row.

    A boundary row that several peers hold as a halo row travels to each of
    them.  Quantizing it once per bit width it travels at and copying its
    bytes into every message costs one encode instead of one per peer (on a
    4-worker METIS partition of the benchmarks' graph, about half of the
    rows sent go to two or more peers).  Every receiver gets the same
    rounding of the row: its noise has the unbiasedness and variance of a
    row quantized for it alone (what the bit allocator models); the noises
    of two receivers are no longer independent of each other, as the noise
    a row adds to the several nodes of one receiver that aggregate it never
    was.

    Args:
        rows (dict[int, torch.Tensor]): Per peer, the rows of the source
            tensor that its message carries, in layout order.
        layouts (dict[int, MessageLayout]): Per peer, its message's layout;
            every width's rows must be consecutive (:attr:`MessageLayout.contiguous`).
        whole_source_slack (float, optional): Where every row of the source
            is quantized at some width, a width whose rows leave out at most
            this share of the source's rows is quantized over the whole
            source instead of gathering its rows first.
            (default: :data:`WHOLE_SOURCE_SLACK`)
    """
    def __init__(self, rows: dict[int, Tensor], layouts: dict[int, MessageLayout],
                 whole_source_slack: float = WHOLE_SOURCE_SLACK):
        if rows.keys() != layouts.keys():
            raise ValueError(f"rows are given for peers {sorted(rows)}, layouts for "
                             f"{sorted(layouts)}")
        self.layouts = layouts
        widths = {layout.width for layout in layouts.values()}
        if len(widths) > 1:
            raise ValueError(f"the messages' layouts differ in width: {sorted(widths)}")
        #: Per peer, the source rows it gets at full precision.
        self._raw: dict[int, Tensor] = {}
        #: Per width, the source rows quantized at it (sorted) and, per peer,
        #: where its bucket's rows are among them.
        self._unique: dict[int, Tensor] = {}
        self._at: dict[int, dict[int, Tensor]] = {}
        for bits in LAYOUT_BITS:
            parts = {p: rows[p][layout.bucket(bits)] for p, layout in layouts.items()
                     if layout.counts[bits]}
            if not parts:
                continue
            if bits == FULL_PRECISION:
                self._raw = parts
                continue
            unique, inverse = torch.unique(torch.cat(list(parts.values())), return_inverse=True)
            self._unique[bits] = unique
            self._at[bits] = dict(zip(parts, inverse.split([t.numel() for t in parts.values()])))
        self._width = widths.pop() if widths else 1
        self._coders = {bits: MessageLayout(torch.full((ids.numel(),), bits), self._width)
                        for bits, ids in self._unique.items()}
        #: Per source size, the widths quantized over the whole source: their
        #: coder and, per peer, where its bucket's rows are in the source.
        self._whole: dict[int, dict[int, tuple[MessageLayout, dict[int, Tensor]]]] = {}
        self._slack = whole_source_slack

    def _plan(self, num_rows: int) -> dict[int, tuple[MessageLayout, dict[int, Tensor]]]:
        """The widths best quantized over the whole source of `num_rows` rows
        instead of gathering their rows first: those that leave out at most
        `whole_source_slack` of its rows, where every row of the source
        is quantized at some width (so no row is checked that is not sent).
        A gradient's halo rows all travel back; with one group of them at 4
        bits, gathering the others to quantize them at 2 copied nearly the
        whole block."""
        if num_rows not in self._whole:
            plan = {}
            quantized = torch.unique(torch.cat(list(self._unique.values()))).numel() \
                if self._unique else 0  # every row quantized at some width
            if not self._raw and quantized == num_rows:
                for bits, ids in self._unique.items():
                    if 0 < num_rows - ids.numel() <= self._slack * num_rows:
                        coder = MessageLayout(torch.full((num_rows,), bits), self._width)
                        plan[bits] = (coder, {p: ids[at] for p, at in self._at[bits].items()})
            self._whole[num_rows] = plan
        return self._whole[num_rows]

    @property
    def encoded_rows(self) -> dict[int, int]:
        """Distinct rows the messages carry, by bit width: each is quantized
        once per pack (with at most `whole_source_slack` more of the
        source's rows where that spares a gather)."""
        return {bits: ids.numel() for bits, ids in self._unique.items()}

    @torch.no_grad()
    def pack(self, x: Tensor, generator: Optional[torch.Generator] = None,
             name: str = 'message', return_range: bool = False
             ) -> Union[dict[int, Tensor], tuple[dict[int, Tensor], dict[int, Tensor]]]:
        r"""Quantizes the rows of ``x`` the messages carry, each once per
        width, and returns every peer's buffer.

        Args:
            x (torch.Tensor): The source ``[N, D]``.
            generator (torch.Generator, optional): Generator of the dither;
                the 2-, 4- and 8-bit rows draw from it in that order.
                (default: :obj:`None`: the device's default generator)
            name (str, optional): Name of the message in error messages.
                (default: :obj:`"message"`)
            return_range (bool, optional): If set, also returns every peer's
                per-row range :math:`\max_j x_j - \min_j x_j` in layout order.
                (default: :obj:`False`)

        Raises:
            NonFiniteMessageError: If a row to quantize (any row, with
                ``return_range``) holds NaN or infinity.
        """
        _check_message(x, generator)
        whole = self._plan(x.size(0))
        packed, ranges, coders, places = {}, {}, {}, {}
        for bits, ids in self._unique.items():
            if bits in whole:
                coders[bits], places[bits] = whole[bits]
                source = x
            else:
                coders[bits], places[bits] = self._coders[bits], self._at[bits]
                source = x if ids.numel() == x.size(0) else x.index_select(0, ids)
            packed[bits] = coders[bits].pack(source, generator=generator, name=name,
                                             return_range=return_range)
            if return_range:
                packed[bits], ranges[bits] = packed[bits]
        out, out_ranges = {}, {}
        for p, layout in self.layouts.items():
            buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=x.device)
            rng = torch.empty(layout.num_rows, device=x.device) if return_range else None
            if p in self._raw:
                raw = x.index_select(0, self._raw[p]).float()
                if return_range:
                    lo, hi = row_range(raw)
                    _check_finite(lo, hi, name)
                    rng[layout.bucket(FULL_PRECISION)] = hi - lo
                _write(layout._segment(buf, 0, FULL_PRECISION), raw)
            for bits, at in places.items():
                if p in at:
                    layout._copy_bucket(buf, bits, coders[bits], packed[bits], at[p])
                    if return_range:
                        rng[layout.bucket(bits)] = ranges[bits][at[p]]
            out[p], out_ranges[p] = buf, rng
        return (out, out_ranges) if return_range else out


def _check_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def _check_message(x: Tensor, generator: Optional[torch.Generator]) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"a message must be a 2-D tensor [rows, features], got "
                         f"{getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"a message must have a floating-point dtype, got {x.dtype}")
    if x.size(1) == 0:
        raise ValueError("a message must have at least one feature column")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator on {generator.device} cannot draw noise for a "
                         f"message on {x.device}")


def _check_finite(lo: Tensor, hi: Tensor, name: str, rows: Optional[Tensor] = None) -> None:
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if rows is not None:
        bad &= rows
    if bool(bad.any()):
        index = bad.nonzero().view(-1)
        i = int(index[0])
        raise NonFiniteMessageError(
            f"message {name!r} holds non-finite values in {index.numel()} of {lo.numel()} "
            f"rows (first: row {i}, min {float(lo[i])}, max {float(hi[i])})")


def _take(v: Tensor, rows: Optional[Tensor]) -> Tensor:
    return v if rows is None else v[rows]


def _output(out: Optional[Tensor], n: int, width: int, dtype: torch.dtype,
            device: torch.device) -> Tensor:
    if out is None:
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point type, got {dtype}")
        return torch.empty(n, width, dtype=dtype, device=device)
    if tuple(out.shape) != (n, width) or not out.is_floating_point() or out.device != device:
        raise ValueError(f"out must be a float tensor of shape {(n, width)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _buffer(buf: Optional[Tensor], nbytes: int, device: torch.device, what: str) -> Tensor:
    if buf is None:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != nbytes \
            or not buf.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D uint8 tensor of {nbytes} bytes, "
                         f"got {buf.dtype} of shape {tuple(buf.shape)}")
    if buf.device != device:
        raise ValueError(f"{what} is on {buf.device}, the message on {device}")
    return buf


def _aligned(seg: Tensor, dtype: torch.dtype) -> bool:
    return seg.storage_offset() % dtype.itemsize == 0


def _write(seg: Tensor, values: Tensor) -> None:
    """Writes ``values`` into uint8 ``seg`` as raw bytes."""
    if _aligned(seg, values.dtype):
        seg.view(values.dtype).view(values.shape).copy_(values)
    else:  # a slice of a larger buffer at an odd offset: copy the bytes
        seg.view(-1).copy_(values.contiguous().view(-1).view(torch.uint8))


def _read(seg: Tensor, dtype: torch.dtype) -> Tensor:
    """Reads uint8 ``seg`` as a flat tensor of ``dtype``."""
    seg = seg.reshape(-1)
    return (seg if _aligned(seg, dtype) else seg.clone()).view(dtype)

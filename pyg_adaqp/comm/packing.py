r"""Row-level wire format of quantized messages: 16-bit headers, stochastic
rounding and bit packing, with plain PyTorch ops on any device.

A row :math:`\mathbf{x} \in \mathbb{R}^D` quantized at :math:`b` bits
(:math:`B = 2^b - 1`) travels as a bfloat16 pair :math:`(l, \Delta)` and
:math:`\lceil Db/8 \rceil` bytes of codes

.. math::
    q_j = \min\left(B, \left\lfloor \frac{x_j - l}{\Delta} + u_j
    \right\rfloor\right), \qquad \hat{x}_j = l + \Delta q_j,

where :math:`l \le \min_j x_j` is rounded *down* to bfloat16 and
:math:`\Delta \ge (\max_j x_j - l)/B` is rounded *up*, so the encoder uses
exactly the values the decoder receives and :math:`\mathbb{E}[\hat{x}_j] =
x_j` up to the dither's resolution (below).

Why bfloat16 and not float16: backward messages are gradients of a loss
divided by the global number of training nodes, routinely :math:`10^{-6}` to
:math:`10^{-9}`, where float16 is subnormal or zero (its smallest step is
:math:`6 \cdot 10^{-8}`) and a rounded-up :math:`\Delta` would exceed the row's
whole range by orders of magnitude; float16 also overflows at 65504.
bfloat16 keeps float32's exponent range, so its 8-bit relative resolution
holds at every magnitude. The price is rows with a large offset
(:math:`|l| \gg \max_j x_j - l`, e.g. :math:`10^4` plus small noise): rounding
:math:`l` down widens the range by up to :math:`|l| \cdot 2^{-7}`, which
raises the noise of such rows but never biases them.

Dither: on CPU, :math:`u_j = (r_j + 1/2)/2^{16}` with :math:`r_j` the
:math:`j`-th unsigned 16-bit lane of the generator's 64-bit stream (a 64-bit
draw yields four lanes; per element that is about 6x cheaper than
:func:`torch.rand`). Then :math:`P(q_j = \lfloor t_j \rfloor + 1)`, with
:math:`t_j = (x_j - l)/\Delta`, is the fraction :math:`p_j` of :math:`t_j`
rounded to the nearest multiple of :math:`2^{-16}`, so the dither's bias is
at most :math:`\Delta/2^{17}` per element: the order of float32's own
rounding of :math:`t_j \in [128, 256)` at 8 bits, and :math:`2^{-16}` of the
noise's standard deviation :math:`\Delta/2` at :math:`p_j = 1/2`. With the
float32 rounding of :math:`t_j` (at most :math:`B \cdot 2^{-23}` steps, where
the clamp to :math:`B` acts) and of :math:`l + \Delta q_j` (an ulp) that is
the whole bias. On CUDA, :math:`u_j` comes from
:meth:`torch.Tensor.uniform_` (float32 uniforms, cheap there), or with
the fused Triton kernels switched on (``PYG_ADAQP_TRITON=1``,
:mod:`pyg_adaqp.comm.kernels`) from Triton's Philox in the kernel.

A constant row (:math:`\max = \min = v`) has no range to quantize; it is sent
as the float32 bits of :math:`v` split over the two header fields and the
lowest payload bit, with the sign bit of :math:`\Delta` set as its marker (a
real :math:`\Delta` is positive), so it decodes to exactly :math:`v`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyg_adaqp.comm import kernels

SUPPORTED_BITS = (2, 4, 8)

# Rows per chunk on CPU are chosen so one chunk's working set (~14 bytes per
# element) stays in cache: every pass after the first reads cache instead of
# DRAM, and no large temporary is ever page-faulted in (2^18 measured best of
# 2^16..2^19).
_CHUNK_ELEMENTS = 1 << 18
# Elsewhere blocks only bound the temporaries (~14 bytes per element).
_DEVICE_CHUNK_ELEMENTS = 1 << 25
_DITHER_OFFSET = 0.5 + 2.0**-17  # (r + 32768 + 1/2) / 2^16 for signed lanes r
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Integer holding the 8/b codes of one packed byte, one code per byte.
_LANES = {2: torch.int32, 4: torch.int16}


class RowHeaders(NamedTuple):
    """Per-row header of a quantized message and the values to encode with."""
    lo: Tensor  # bfloat16 [n], as transmitted
    scale: Tensor  # bfloat16 [n], as transmitted (sign bit set: constant row)
    enc_lo: Tensor  # float32 [n], subtracted before dividing
    enc_scale: Tensor  # float32 [n], divisor (1 for constant rows)
    lsb: Tensor  # uint8 [n], lowest bit of a constant row's float32 value


def row_bytes(width: int, bits: int) -> int:
    r"""Bytes of packed codes per row: :math:`\lceil D b / 8 \rceil`."""
    return (width * bits + 7) // 8


def _cpu_path(device: torch.device) -> bool:
    """Whether to use the CPU variant of each step: cache-sized chunks, four
    dither lanes per 64-bit draw, separate min/max reductions and an unfused
    decode. Each is faster on one CPU thread (measured, torch 2.13) and
    slower or pointless on GPUs, where fewer, larger kernels win."""
    return device.type == 'cpu'


def row_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Returns the float32 per-row minimum and maximum of a 2-D tensor.

    NaN propagates into both, and so does infinity into one of them, which
    makes them the cheap place to detect non-finite messages.
    """
    if _cpu_path(x.device):  # 6x faster than torch.aminmax(dim=1) on CPU
        lo, hi = x.amin(dim=1), x.amax(dim=1)
    else:
        lo, hi = torch.aminmax(x, dim=1)
    return lo.float(), hi.float()


def _bf16_round(v: Tensor, down: bool) -> Tensor:
    """Rounds float32/float64 values to bfloat16 toward -inf (``down``) or +inf."""
    b = v.to(torch.bfloat16)
    wrong = b.to(v.dtype) > v if down else b.to(v.dtype) < v
    toward = torch.full_like(b, float('-inf') if down else float('inf'))
    return torch.where(wrong, torch.nextafter(b, toward), b)


def row_headers(lo: Tensor, hi: Tensor, bits: int, name: str) -> RowHeaders:
    r"""Computes the transmitted headers of rows with float32 range ``[lo, hi]``.

    Args:
        lo (torch.Tensor): Finite per-row minimum, float32 ``[n]``.
        hi (torch.Tensor): Finite per-row maximum, float32 ``[n]``.
        bits (int): Bit width :math:`b \in \{2, 4, 8\}`.
        name (str): Name of the message, for error messages.
    """
    levels = 2**bits - 1
    const = hi == lo
    lo16 = _bf16_round(lo, down=True)
    span = hi.double() - lo16.double()
    scale16 = _bf16_round(span / levels, down=False)
    top = lo16.double() + levels * scale16.double()
    too_wide = ~const & ((span > _FLOAT32_MAX) | (top > _FLOAT32_MAX)
                         | ~torch.isfinite(scale16))
    if bool(too_wide.any()):
        i = int(too_wide.nonzero()[0])
        raise ValueError(
            f"message {name!r}: row {i} spans [{float(lo[i])}, {float(hi[i])}], "
            f"too wide to quantize within the float32 range")

    # Constant rows: float32 bits of v = [lo field | scale field << 1 | lsb],
    # the sign bit of the scale field marking the row.
    v = lo.view(torch.int32)
    const_lo = (v >> 16).to(torch.int16)
    const_scale = (((v & 0xFFFF) >> 1) | 0x8000).to(torch.int16)
    lo_bits = torch.where(const, const_lo, lo16.view(torch.int16))
    scale_bits = torch.where(const, const_scale, scale16.view(torch.int16))
    return RowHeaders(
        lo=lo_bits.view(torch.bfloat16),
        scale=scale_bits.view(torch.bfloat16),
        enc_lo=torch.where(const, lo, lo16.float()),
        enc_scale=torch.where(const, 1.0, scale16.float()),
        lsb=(const & (v & 1).bool()).to(torch.uint8),
    )


def decode_headers(lo: Tensor, scale: Tensor, first_byte: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`row_headers`: float32 ``(lo, scale)`` to decode with.

    Args:
        lo (torch.Tensor): Transmitted bfloat16 ``lo`` field ``[n]``.
        scale (torch.Tensor): Transmitted bfloat16 ``scale`` field ``[n]``.
        first_byte (torch.Tensor): First payload byte of every row ``[n]``.
    """
    lo_bits, scale_bits = lo.view(torch.int16), scale.view(torch.int16)
    const = scale_bits < 0
    v = ((lo_bits.int() << 16) | ((scale_bits.int() & 0x7FFF) << 1)
         | (first_byte.int() & 1))
    dec_lo = torch.where(const, v.view(torch.float32), lo.float())
    dec_scale = torch.where(const, 0.0, scale.float())
    return dec_lo, dec_scale


def chunk_rows(num_rows: int, width: int, device: torch.device) -> int:
    """Rows processed per step: cache-sized blocks on CPU; on other devices
    blocks large enough that kernel launches do not dominate, small enough to
    bound the temporaries. A block is a multiple of 4 rows, so every block
    but the last draws whole 64-bit words and the CPU dither stream does not
    depend on the block size."""
    elements = _CHUNK_ELEMENTS if _cpu_path(device) else _DEVICE_CHUNK_ELEMENTS
    return min(max(num_rows, 1), max(4, elements // width // 4 * 4))


def _pack(codes: Tensor, bits: int, out: Tensor, lanes: Tensor, tmp: Tensor) -> None:
    r"""Packs int16 codes ``[r, bytes * 8/b]`` into ``out`` ``[r, bytes]``.

    The ``k = 8/b`` codes of one output byte are narrowed to adjacent bytes
    of one k-byte integer; multiplying it by :math:`\sum_j 2^{8(k-1) - j(8-b)}`
    moves code :math:`j` from bit :math:`8j` to bit :math:`8(k-1) + jb` of the
    top byte, and every cross term lands below that byte without overlap or
    carry (checked for all byte values by the tests), so a shift and a
    narrowing copy leave the packed byte. ``codes`` is left untouched so its
    zero padding lives on.
    """
    per_byte = 8 // bits
    lanes.copy_(codes)
    top = 8 * (per_byte - 1)
    factor = sum(1 << (top - j * (8 - bits)) for j in range(per_byte))
    torch.mul(lanes.view(tmp.dtype), factor, out=tmp).bitwise_right_shift_(top)
    out.copy_(tmp)


def encode_rows(x: Tensor, headers: RowHeaders, bits: int, payload: Tensor,
                rows: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                dither: Optional[Tensor] = None) -> None:
    r"""Quantizes ``x[rows]`` and writes the packed codes into ``payload``.

    Args:
        x (torch.Tensor): Finite float input ``[N, D]``.
        headers (RowHeaders): Headers of the ``n`` encoded rows.
        bits (int): Bit width :math:`b \in \{2, 4, 8\}`.
        payload (torch.Tensor): uint8 output ``[n, ceil(D b / 8)]``.
        rows (torch.Tensor, optional): Rows of ``x`` to encode, in order;
            all rows when :obj:`None`. (default: :obj:`None`)
        generator (torch.Generator, optional): Source of the dither.
            (default: :obj:`None`: the device's default generator)
        dither (torch.Tensor, optional): Uniform ``[0, 1)`` noise ``[n, D]``
            to use instead of drawing it. (default: :obj:`None`)
    """
    n, width = payload.size(0), x.size(1)
    if n == 0:
        return
    if dither is None and kernels.usable(x) and kernels.encode_rows(
            x, headers.enc_lo, headers.enc_scale, bits, payload, rows, generator):
        payload[:, 0].bitwise_or_(headers.lsb)
        return
    dev, levels, per_byte = x.device, 2**bits - 1, 8 // bits
    step = chunk_rows(n, width, dev)
    nbytes = payload.size(1)
    work = torch.empty(step, width, device=dev)
    noise = torch.empty(step, width, device=dev)
    # Zeroed once: columns past D stay zero and pad the last byte of a row.
    codes = torch.zeros(step, nbytes * per_byte, dtype=torch.int16, device=dev)
    lanes = tmp = None
    if bits < 8:
        lanes = torch.empty(step, nbytes * per_byte, dtype=torch.uint8, device=dev)
        tmp = torch.empty(step, nbytes, dtype=_LANES[bits], device=dev)
    draw_lanes = dither is None and _cpu_path(dev)
    if draw_lanes:
        words = torch.empty((step * width + 3) // 4, dtype=torch.int64, device=dev)
        offset = torch.tensor(_DITHER_OFFSET, device=dev)
    lo, scale = headers.enc_lo.unsqueeze(1), headers.enc_scale.unsqueeze(1)

    for start in range(0, n, step):
        stop = min(start + step, n)
        r = stop - start
        w = work[:r]
        if rows is None:
            torch.sub(x[start:stop], lo[start:stop], out=w)
        elif x.dtype == torch.float32:  # gather straight into the work block
            torch.index_select(x, 0, rows[start:stop], out=w).sub_(lo[start:stop])
        else:
            torch.sub(x.index_select(0, rows[start:stop]), lo[start:stop], out=w)

        if dither is not None:
            u = dither[start:stop]
        elif draw_lanes:
            draws = words[:(r * width + 3) // 4].random_(-2**63, None, generator=generator)
            u = noise[:r].copy_(draws.view(torch.int16)[:r * width].view(r, width))
            torch.add(offset, u, alpha=2.0**-16, out=u)
        else:
            u = noise[:r].uniform_(generator=generator)

        # t + u with t = (x - lo) / scale >= 0; float -> int truncates, i.e.
        # floors. The clamp only catches float32 rounding of t above B.
        torch.addcdiv(u, w, scale[start:stop], out=w)
        c = codes[:r]
        c[:, :width].copy_(w)
        c.clamp_(max=levels)
        if bits == 8:
            payload[start:stop].copy_(c)
        else:
            _pack(c, bits, payload[start:stop], lanes[:r], tmp[:r])
    payload[:, 0].bitwise_or_(headers.lsb)


def _unpack(payload: Tensor, bits: int, lanes: Tensor, tmp: Tensor) -> None:
    r"""Spreads packed bytes ``[r, bytes]`` into one code per byte of
    ``lanes`` (``[r, bytes]`` integers of ``8/b`` bytes).

    Each byte :math:`p` is widened; adding :math:`(p \gg 4)(2^{8k/2} - 2^4)`
    moves its high nibble up by half the integer, and at 2 bits the same
    step within each half, :math:`((v \gg 2) \mathbin{\&} \mathtt{0x00030003})
    (2^8 - 2^2)`, splits the nibbles into codes.
    """
    lanes.copy_(payload)
    half = 4 * (8 // bits)
    torch.bitwise_right_shift(lanes, 4, out=tmp)
    lanes.add_(tmp, alpha=(1 << half) - (1 << 4))
    if bits == 2:
        torch.bitwise_right_shift(lanes, 2, out=tmp).bitwise_and_(0x00030003)
        lanes.add_(tmp, alpha=(1 << 8) - (1 << 2))


def decode_rows(payload: Tensor, lo: Tensor, scale: Tensor, bits: int, out: Tensor,
                rows: Optional[Tensor] = None) -> None:
    r"""Dequantizes ``payload`` into ``out[rows]`` as ``lo + scale * code``.

    Args:
        payload (torch.Tensor): uint8 codes ``[n, ceil(D b / 8)]``.
        lo (torch.Tensor): float32 offsets ``[n]`` from :func:`decode_headers`.
        scale (torch.Tensor): float32 steps ``[n]`` from :func:`decode_headers`.
        bits (int): Bit width :math:`b \in \{2, 4, 8\}`.
        out (torch.Tensor): Float output ``[N, D]``.
        rows (torch.Tensor, optional): Rows of ``out`` to fill, in order; all
            rows when :obj:`None`. (default: :obj:`None`)
    """
    n, width = payload.size(0), out.size(1)
    if n == 0:
        return
    if kernels.usable(out) and kernels.decode_rows(payload, lo, scale, bits, out, rows):
        return
    dev, per_byte, nbytes = out.device, 8 // bits, payload.size(1)
    step = chunk_rows(n, width, dev)
    direct = rows is None and out.dtype == torch.float32
    fused = not _cpu_path(dev)
    work = None if direct else torch.empty(step, width, device=dev)
    if bits < 8:
        codes = torch.empty(step, nbytes * per_byte, dtype=torch.uint8, device=dev)
        tmp = torch.empty(step, nbytes, dtype=_LANES[bits], device=dev)
    lo, scale = lo.unsqueeze(1), scale.unsqueeze(1)

    for start in range(0, n, step):
        stop = min(start + step, n)
        r = stop - start
        if bits == 8:
            c = payload[start:stop]
        else:
            _unpack(payload[start:stop], bits, codes[:r].view(tmp.dtype), tmp[:r])
            c = codes[:r, :width]
        w = out[start:stop] if direct else work[:r]
        if fused:  # one kernel reading the codes once
            torch.addcmul(lo[start:stop], c, scale[start:stop], out=w)
        else:  # addcmul with a broadcast [r, 1] input is 4x slower on CPU
            w.copy_(c).mul_(scale[start:stop]).add_(lo[start:stop])
        if rows is not None:
            out.index_copy_(0, rows[start:stop], w.to(out.dtype))
        elif not direct:
            out[start:stop].copy_(w)

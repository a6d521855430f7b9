r"""The codec's row encode and decode as one Triton kernel each, for CUDA tensors.

Eager PyTorch runs each step of :func:`~pyg_adaqp.comm.packing.encode_rows`
(subtract, draw the dither, divide and add, truncate, clamp, pack) as a
kernel of its own, every one a pass over the message: on an H200 that cost
11x a :meth:`~torch.Tensor.clone` of the message to quantize and pack, and
3-5x to unpack and dequantize (``benchmarks/gpu_check.py``).  Here each row
block is read once and written once:

- :func:`encode_rows` draws the dither in the kernel: one Philox-4x32
  draw (:func:`triton.language.randint4x`, keyed by one 64-bit seed drawn
  from the worker's generator per call, counter = the index of a group of
  four columns in the bucket) gives a group's four dithers, each the top 24
  bits of its word over :math:`2^{24}` (one draw per element, as
  :func:`triton.language.rand` makes, would spend most of the kernel's
  arithmetic on the generator).  A resumed run, whose generator state the
  checkpoint restores, draws the same dither.  It writes the same codes,
  byte order and zero padding as the eager path (:math:`q_j = \min(B,
  \lfloor (x_j - l)/\Delta + u_j \rfloor)` with the same float32
  operations, code :math:`j` of a byte at bit :math:`jb`): given the same
  dither, the same bytes (the tests check this).  Only the dither stream
  differs; its :math:`2^{-24}` steps bias a code by at most
  :math:`\Delta / 2^{24}`, below the float32 rounding of :math:`t_j + u_j`
  that both paths share (:mod:`pyg_adaqp.comm.packing`);
- :func:`decode_rows` writes :math:`l + \Delta q` into a float32 output (other
  dtypes take the eager ops): the same values as the eager decode, since
  :math:`\Delta q` is exact in float32 (an 8-bit bfloat16 mantissa times a
  code below :math:`2^8`), with or without a fused multiply-add.

:func:`usable` says whether a tensor goes through these kernels: Triton
importable, the kernels switched on, no earlier launch failed (the first
failure warns once and the eager ops take over for the rest of the
process), and a CUDA tensor.  They are off by default, on with
``PYG_ADAQP_TRITON=1`` in the environment (read at each call, so workers
started with it use them) or :func:`codec_path` around a block: on an H200 a
run resumed from its checkpoint with them differed from the uninterrupted
run by 3e-5 in its loss where the eager ops matched exactly, and until that
is understood the exact path is the default.  With ``TRITON_INTERPRET=1``
set before this module is imported, the kernels also take CPU tensors and
run in Triton's interpreter: that is how the tests check them, a resume
included, on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager ops do everything
    triton = None

# Elements per program: enough to keep a multiprocessor's loads in flight.
_BLOCK_ELEMENTS = 4096
#: Whether Triton's interpreter runs the kernels (decided, as by Triton, at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_failed = False                  # a launch failed: the eager ops from then on
_forced: Optional[bool] = None   # :func:`codec_path`'s choice inside its block


def enabled() -> bool:
    """Whether the fused kernels are switched on (and none has failed)."""
    if triton is None or _failed:
        return False
    if _forced is not None:
        return _forced
    return os.environ.get("PYG_ADAQP_TRITON", "0") == "1"


def usable(t: Tensor) -> bool:
    """Whether `t`'s rows are encoded and decoded by the fused kernels."""
    return enabled() and (t.is_cuda or INTERPRETED)


@contextlib.contextmanager
def codec_path(fused: bool) -> Iterator[None]:
    """Within the block, the fused kernels (where Triton is importable) or the
    eager ops, whatever the environment says, e.g. to compare both."""
    global _forced
    before, _forced = _forced, fused
    try:
        yield
    finally:
        _forced = before


def _fall_back(err: Exception) -> None:
    global _failed
    _failed = True
    warnings.warn(f"pyg_adaqp: the fused Triton codec failed ({type(err).__name__}: {err}); "
                  f"the eager PyTorch codec runs from now on", RuntimeWarning, stacklevel=3)


def _blocks(width: int, per_byte: int) -> tuple[int, int]:
    """Rows per program and the padded width: a power of two, a multiple of `per_byte`."""
    block_d = triton.next_power_of_2(-(-width // per_byte) * per_byte)
    return max(1, _BLOCK_ELEMENTS // block_d), block_d


if triton is not None:
    @triton.jit
    def _dither(seed_ptr, r, groups, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
        """Uniform ``[0, 1)`` dither of rows `r` ``[BLOCK_R, BLOCK_D]``: one
        Philox-4x32 draw per group of four columns gives their four dithers,
        each the top 24 bits of its word over 2^24 (exact in float32)."""
        g = tl.arange(0, BLOCK_D // 4)
        if WIDE:  # more than 2^31 groups: 64-bit Philox counters
            counter = r.to(tl.int64)[:, None] * groups + g[None, :]
        else:
            counter = r[:, None] * groups + g[None, :]
        d0, d1, d2, d3 = tl.randint4x(tl.load(seed_ptr), counter)
        draws = tl.reshape(tl.join(tl.join(d0, d1), tl.join(d2, d3)), (BLOCK_R, BLOCK_D))
        return (draws.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _row_block(n, width, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's rows and padded columns, and which of them are real."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_D)
        in_rows = r < n
        return r, c, in_rows, in_rows[:, None] & (c < width)[None, :]

    @triton.jit
    def _indexed(rows_ptr, r, in_rows, HAS_ROWS: tl.constexpr):
        """Where rows `r` of the block are in the full tensor: ``rows[r]``, or `r`."""
        if HAS_ROWS:
            at = tl.load(rows_ptr + r, mask=in_rows, other=0).to(tl.int64)
        else:
            at = r.to(tl.int64)
        return at

    @triton.jit
    def _encode_kernel(x_ptr, x_stride, rows_ptr, lo_ptr, scale_ptr, seed_ptr, out_ptr,
                       n, width, nbytes, groups, BITS: tl.constexpr, HAS_ROWS: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        PER_BYTE: tl.constexpr = 8 // BITS
        LEVELS: tl.constexpr = (1 << BITS) - 1
        r, c, in_rows, inside = _row_block(n, width, BLOCK_R, BLOCK_D)
        src = _indexed(rows_ptr, r, in_rows, HAS_ROWS)
        x = tl.load(x_ptr + src[:, None] * x_stride + c[None, :], mask=inside,
                    other=0.0).to(tl.float32)
        lo = tl.load(lo_ptr + r, mask=in_rows, other=0.0)
        scale = tl.load(scale_ptr + r, mask=in_rows, other=1.0)
        u = _dither(seed_ptr, r, groups, WIDE, BLOCK_R, BLOCK_D)
        # t + u >= 0 with t = (x - lo) / scale, divided with IEEE rounding as the
        # eager ops do (Triton's "/" is approximate): truncation floors; the
        # minimum only catches float32 rounding of t above B.
        t = tl.math.div_rn(x - lo[:, None], scale[:, None])
        code = tl.minimum((t + u).to(tl.int32), LEVELS)
        code = tl.where(inside, code, 0)  # columns past D pad the last byte with zeros
        if PER_BYTE == 1:
            packed = code
        else:  # code j of a byte at bit j * BITS
            grouped = tl.reshape(code, (BLOCK_R, BLOCK_D // PER_BYTE, PER_BYTE))
            shift = tl.arange(0, PER_BYTE) * BITS
            packed = tl.sum(grouped << shift[None, None, :], axis=2)
        b = tl.arange(0, BLOCK_D // PER_BYTE)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * nbytes + b[None, :], packed.to(tl.uint8),
                 mask=in_rows[:, None] & (b < nbytes)[None, :])

    @triton.jit
    def _decode_kernel(payload_ptr, lo_ptr, scale_ptr, rows_ptr, out_ptr, out_stride,
                       n, width, nbytes, BITS: tl.constexpr, HAS_ROWS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        PER_BYTE: tl.constexpr = 8 // BITS
        LEVELS: tl.constexpr = (1 << BITS) - 1
        r, c, in_rows, inside = _row_block(n, width, BLOCK_R, BLOCK_D)
        # The row block's bytes in one contiguous load, then each byte's codes
        # (code j at bit j * BITS) spread into its PER_BYTE columns.
        b = tl.arange(0, BLOCK_D // PER_BYTE)
        byte = tl.load(payload_ptr + r.to(tl.int64)[:, None] * nbytes + b[None, :],
                       mask=in_rows[:, None] & (b < nbytes)[None, :], other=0).to(tl.int32)
        if PER_BYTE == 1:
            code = byte
        else:
            shift = tl.arange(0, PER_BYTE) * BITS
            code = tl.reshape((byte[:, :, None] >> shift[None, None, :]) & LEVELS,
                              (BLOCK_R, BLOCK_D))
        lo = tl.load(lo_ptr + r, mask=in_rows, other=0.0)
        scale = tl.load(scale_ptr + r, mask=in_rows, other=0.0)
        value = lo[:, None] + scale[:, None] * code.to(tl.float32)
        dst = _indexed(rows_ptr, r, in_rows, HAS_ROWS)
        tl.store(out_ptr + dst[:, None] * out_stride + c[None, :], value, mask=inside)


def _launch(kernel, n: int, block_r: int, on: Tensor, *args, **constants) -> bool:
    """Launches `kernel` over `n` rows, `block_r` per program, on `on`'s device
    (Triton launches on the current one).  :obj:`False` where the rows of `on`
    are not of unit column stride (the kernels index ``row * stride +
    column``) or the launch failed (then the eager ops run from now on)."""
    if on.stride(1) != 1 and on.size(1) > 1:
        return False
    try:
        with torch.cuda.device(on.device) if on.is_cuda else contextlib.nullcontext():
            kernel[(triton.cdiv(n, block_r),)](*args, **constants)
    except Exception as err:  # noqa: BLE001 - any compile or launch failure: eager from now on
        _fall_back(err)
        return False
    return True


def encode_rows(x: Tensor, lo: Tensor, scale: Tensor, bits: int, payload: Tensor,
                rows: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> bool:
    """Fused :func:`~pyg_adaqp.comm.packing.encode_rows` (codes only; the caller
    sets the constant rows' low bit).  Returns :obj:`False`, having written
    nothing that matters, where the eager ops must run instead."""
    n, width = payload.size(0), x.size(1)
    if not payload.is_contiguous():  # the kernel writes rows of `nbytes` back to back
        return False
    seed = torch.empty(1, dtype=torch.int64, device=x.device).random_(generator=generator)
    groups = -(-width // 4)
    block_r, block_d = _blocks(width, 4)  # whole groups of four columns, whole bytes
    return _launch(_encode_kernel, n, block_r, x,
                   x, x.stride(0), rows.contiguous() if rows is not None else x,
                   lo.contiguous(), scale.contiguous(), seed, payload, n, width,
                   payload.size(1), groups, BITS=bits, HAS_ROWS=rows is not None,
                   WIDE=n * groups >= 2**31, BLOCK_R=block_r, BLOCK_D=block_d)


def decode_rows(payload: Tensor, lo: Tensor, scale: Tensor, bits: int, out: Tensor,
                rows: Optional[Tensor] = None) -> bool:
    """Fused :func:`~pyg_adaqp.comm.packing.decode_rows`.  Returns :obj:`False`,
    having written nothing that matters, where the eager ops must run instead."""
    n, width = payload.size(0), out.size(1)
    if out.dtype != torch.float32:  # a narrower output: torch's own cast, as the eager path
        return False
    block_r, block_d = _blocks(width, 8 // bits)
    return _launch(_decode_kernel, n, block_r, out,
                   payload.contiguous(), lo.contiguous(), scale.contiguous(),
                   rows.contiguous() if rows is not None else payload, out, out.stride(0), n,
                   width, payload.size(1), BITS=bits, HAS_ROWS=rows is not None,
                   BLOCK_R=block_r, BLOCK_D=block_d)

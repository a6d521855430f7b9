"""The fused Triton codec kernels, run by Triton's interpreter on CPU tensors.

Not collected by the suite itself (no ``test_`` prefix): ``test_kernels.py``
runs this file in a fresh interpreter with ``TRITON_INTERPRET=1``, which must
be set before :mod:`pyg_adaqp.comm.kernels` is imported; the kernels then
take CPU tensors, so the whole codec pipeline (headers, buckets, constant
rows, gathers) runs through them.
"""
import os
import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from test_codec import check_unbiased, offset_rows, read_codes

from pyg_adaqp.comm import MessageLayout, dequantize, kernels, packing, quantize, worker_generator
from pyg_adaqp.comm.kernels import _dither

assert os.environ.get("TRITON_INTERPRET") == "1", "run by test_kernels.py with TRITON_INTERPRET=1"
BITS = (2, 4, 8)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("PYG_ADAQP_TRITON", "1")
    monkeypatch.setattr(kernels, "_failed", False)  # restored after each test
    assert kernels.usable(torch.zeros(1))  # CPU tensors too, in the interpreter


@triton.jit
def write_dither(seed_ptr, out_ptr, n, width, groups, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    u = _dither(seed_ptr, r, groups, False, BLOCK_R, BLOCK_D)
    tl.store(out_ptr + r[:, None] * width + c[None, :], u,
             mask=(r < n)[:, None] & (c < width)[None, :])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("width", [5, 37, 256])
def test_encode_writes_the_eager_bytes_of_its_own_dither(bits, width):
    # Given the kernel's dither (rebuilt here from the same seed), the eager
    # encode writes the same bytes: codes, byte order, padding, constant rows.
    x = offset_rows(width).repeat(5, 1)
    rows = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(9))[:30]
    headers = packing.row_headers(*packing.row_range(x[rows]), bits, "x")
    gen = worker_generator(3, 1)
    state = gen.get_state()
    fused = torch.empty(30, packing.row_bytes(width, bits), dtype=torch.uint8)
    packing.encode_rows(x, headers, bits, fused, rows=rows, generator=gen)
    gen.set_state(state)
    seed = torch.empty(1, dtype=torch.int64).random_(generator=gen)  # as the kernel's caller
    u = torch.empty(30, width)
    write_dither[(30,)](seed, u, 30, width, -(-width // 4), BLOCK_R=1,
                        BLOCK_D=triton.next_power_of_2(-(-width // 4) * 4))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and len(u.unique()) > 0.9 * u.numel()
    eager = torch.empty_like(fused)
    packing.encode_rows(x, headers, bits, eager, rows=rows, dither=u)
    assert torch.equal(fused, eager)


def eager(fn, *args, **kwargs):
    with kernels.codec_path(fused=False):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("width", [5, 37, 256])
def test_decode_equals_the_eager_decode(bits, width):
    x = torch.randn(41, width, generator=torch.Generator().manual_seed(width))
    x[3] = 2.5  # a constant row
    msg = eager(quantize, x, bits, worker_generator(1, 0))
    lo, scale = packing.decode_headers(msg.lo, msg.scale, msg.payload[:, 0])
    rows = torch.randperm(60, generator=torch.Generator().manual_seed(1))[:41]
    fused, ref = torch.zeros(60, width), torch.zeros(60, width)
    assert kernels.decode_rows(msg.payload, lo, scale, bits, fused, rows)
    eager(packing.decode_rows, msg.payload, lo, scale, bits, ref, rows)
    assert torch.equal(fused, ref)
    # A bfloat16 output takes the eager ops (torch's rounding, not the kernel's).
    assert not kernels.decode_rows(msg.payload, lo, scale, bits, fused.bfloat16(), rows)
    assert torch.equal(dequantize(msg, torch.bfloat16), eager(dequantize, msg, torch.bfloat16))
    assert torch.equal(dequantize(msg), eager(dequantize, msg))
    assert torch.equal(dequantize(msg)[3], x[3])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("width", [5, 37, 256])  # 5 and 37 pad the last byte at 2 and 4 bits
def test_codes_round_down_or_up_and_padding_is_zero(bits, width):
    x = offset_rows(width)
    msg = quantize(x, bits, worker_generator(2, 0))
    const = torch.signbit(msg.scale)
    codes = read_codes(msg.payload, width, bits)
    lo, scale = msg.lo.double()[:, None], msg.scale.double()[:, None]
    t = ((x.double() - lo) / scale)[~const]
    step = codes[~const] - t.floor()
    assert ((step == 0) | (step == 1) | (codes[~const] == 2**bits - 1)).all()
    assert codes[~const].max() <= 2**bits - 1
    bits_used = width * bits
    pad = np.unpackbits(msg.payload.numpy(), axis=1, bitorder="little")[:, bits_used:]
    assert not pad[~const.numpy()].any()


@pytest.mark.parametrize("bits", BITS)
def test_unbiased(bits):
    check_unbiased(offset_rows(37), bits, 400, worker_generator(11, 0))


def test_the_generator_keys_the_dither_and_a_gather_encodes_like_its_rows():
    x = torch.randn(50, 37, generator=torch.Generator().manual_seed(3))
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(4))[:30]
    headers = packing.row_headers(*packing.row_range(x[rows]), 4, "x")
    gen = worker_generator(5, 1)
    state = gen.get_state()
    outs = []
    for source, index in ((x, rows), (x[rows].contiguous(), None), (x, rows)):
        gen.set_state(state)
        payload = torch.empty(30, packing.row_bytes(37, 4), dtype=torch.uint8)
        packing.encode_rows(source, headers, 4, payload, rows=index, generator=gen)
        outs.append(payload)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    payload = torch.empty_like(outs[0])
    packing.encode_rows(x, headers, 4, payload, rows=rows, generator=gen)  # the stream moved on
    assert not torch.equal(payload, outs[0])


@pytest.mark.parametrize("contiguous", [True, False])
def test_mixed_layout_round_trip(contiguous):
    x = offset_rows(37).repeat(3, 1)
    bits = torch.tensor([2, 32, 4, 8, 2, 8, 4, 32] * 3)
    if contiguous:
        bits = bits.sort().values
    layout = MessageLayout(bits, 37)
    assert layout.contiguous == contiguous
    out = layout.unpack(layout.pack(x, worker_generator(6, 0)))
    assert torch.equal(out[bits == 32], x[bits == 32])
    for b in BITS:
        ref = quantize(x[bits == b], b, dither=torch.zeros(int((bits == b).sum()), 37))
        err = (out[bits == b] - x[bits == b]).abs()
        assert (err <= ref.scale.float()[:, None] * (1 + 1e-5)).all()


def test_a_failed_launch_warns_once_and_the_eager_codec_takes_over(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no kernel today")

    monkeypatch.setattr(kernels, "_encode_kernel", Broken())
    x = torch.randn(20, 37, generator=torch.Generator().manual_seed(7))
    with pytest.warns(RuntimeWarning, match="fused Triton codec failed .*no kernel today"):
        first = dequantize(quantize(x, 4, worker_generator(8, 0)))
    assert not kernels.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = dequantize(quantize(x, 4, worker_generator(8, 0)))
    ref = quantize(x, 4, dither=torch.zeros(20, 37))
    for out in (first, second):
        assert ((out - x).abs() <= ref.scale.float()[:, None] * (1 + 1e-5)).all()

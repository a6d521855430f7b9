"""Tests of the message codec against plain reference implementations."""
import math

import numpy as np
import pytest
import torch

from pyg_adaqp.comm import (MessageLayout, NonFiniteMessageError, QuantizedMessage, SharedRows,
                            dequantize, message_nbytes, quantize, worker_generator)
from pyg_adaqp.comm import packing

BITS = (2, 4, 8)
WIDTHS = (1, 3, 5, 7, 13, 100, 602, 1001)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(12345)


def read_codes(payload: torch.Tensor, width: int, bits: int) -> torch.Tensor:
    """Brute-force little-endian bit reader: code j is bits [j*b, (j+1)*b)."""
    raw = np.unpackbits(payload.numpy(), axis=1, bitorder='little').astype(np.int64)
    chunks = raw[:, :width * bits].reshape(payload.shape[0], width, bits)
    return torch.from_numpy((chunks << np.arange(bits)).sum(-1))


def reference_dither(seed: int, rank: int, n: int, width: int) -> torch.Tensor:
    """The documented CPU dither: (r + 1/2) / 2^16 with r the unsigned 16-bit
    lanes of the generator's 64-bit stream."""
    words = torch.empty((n * width + 3) // 4, dtype=torch.int64)
    words.random_(-2**63, None, generator=worker_generator(seed, rank))
    lanes = words.view(torch.int16)[:n * width].view(n, width).double() + 32768
    return ((lanes + 0.5) / 2**16).float()


def reference_codes(x: torch.Tensor, msg: QuantizedMessage, u: torch.Tensor) -> torch.Tensor:
    """floor((x - lo) / scale + u) clamped to [0, B], with the transmitted lo
    and scale, in the same float32 arithmetic."""
    lo, scale = msg.lo.float()[:, None], msg.scale.float()[:, None]
    t = torch.floor(u + (x - lo) / scale)
    return t.clamp(0, 2**msg.bits - 1).long()


def transmitted(msg: QuantizedMessage) -> tuple[torch.Tensor, torch.Tensor]:
    return msg.lo.double()[:, None], msg.scale.double()[:, None]


def test_message_nbytes():
    assert message_nbytes(10, 100, 2) == 10 * (25 + 4)
    assert message_nbytes(10, 100, 4) == 10 * (50 + 4)
    assert message_nbytes(3, 7, 8) == 3 * (7 + 4)
    assert message_nbytes(3, 7, 4) == 3 * (4 + 4)
    assert message_nbytes(3, 7, 32) == 3 * 7 * 4
    assert message_nbytes(0, 7, 2) == 0
    with pytest.raises(ValueError, match='bits'):
        message_nbytes(3, 7, 16)


@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('width', WIDTHS)
def test_codes_match_reference_formula(bits, width):
    x = torch.randn(9, width) * torch.logspace(-3, 3, 9)[:, None]
    msg = quantize(x, bits, worker_generator(7, 1))
    assert msg.payload.shape == (9, math.ceil(width * bits / 8))
    assert msg.payload.dtype == torch.uint8 and msg.lo.dtype == torch.bfloat16
    u = reference_dither(7, 1, 9, width)
    codes = read_codes(msg.payload, width, bits)
    expected = reference_codes(x, msg, u)
    if width == 1:  # single-column rows are constant rows
        expected = torch.zeros_like(expected)
        expected[:, 0] = x.view(torch.int32)[:, 0] & 1
    assert torch.equal(codes, expected)
    # Padding bits after the last code are zero.
    bits_per_row = np.unpackbits(msg.payload.numpy(), axis=1, bitorder='little')
    assert not bits_per_row[:, width * bits:].any()
    # Decoding is lo + scale * q with the transmitted values.
    lo, scale = msg.lo.float()[:, None], msg.scale.float()[:, None]
    ref = x if width == 1 else lo + scale * expected.float()
    assert torch.equal(dequantize(msg), ref)


@pytest.mark.parametrize('bits', (2, 4))
def test_every_byte_value_round_trips(bits):
    # Rows spell out every byte value; the trailing 0 and B fix lo = 0 and
    # scale = 1 and a zero dither makes the codes exact.
    per_byte, levels = 8 // bits, 2**bits - 1
    byte = torch.arange(256)
    codes = torch.stack([(byte >> (bits * j)) & levels for j in range(per_byte)], dim=1)
    x = torch.cat([codes, torch.tensor([[0, levels]]).expand(256, 2)], dim=1).float()
    msg = quantize(x, bits, dither=torch.zeros_like(x))
    assert torch.equal(msg.payload[:, 0], byte.to(torch.uint8))
    assert torch.equal(dequantize(msg), x)


def test_dither_stream_does_not_depend_on_chunking(monkeypatch):
    x = torch.randn(203, 37)
    whole = quantize(x, 4, worker_generator(3, 0))
    monkeypatch.setattr(packing, '_CHUNK_ELEMENTS', 64)
    assert packing.chunk_rows(203, 37, torch.device('cpu')) == 4
    chunked = quantize(x, 4, worker_generator(3, 0))
    assert torch.equal(whole.payload, chunked.payload)
    assert torch.equal(dequantize(whole), dequantize(chunked))


def offset_rows(width: int) -> torch.Tensor:
    """Rows of very different shapes: plain, offsets where bfloat16 rounding of
    lo matters (the original AdaQP's biased case), gradient-sized and huge."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, width, generator=g)
    return torch.stack([
        torch.randn(width, generator=g),
        noise[0] * 3 - 1,
        1e4 + 0.01 * noise[1],
        -1e4 + 0.3 * noise[2],
        123.456 + noise[3],
        1e-9 * torch.randn(width, generator=g),
        -2e-30 + 1e-31 * noise[4],
        5e30 * noise[5],
    ])


def roundtrip_draws(x: torch.Tensor, bits: int, draws: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, QuantizedMessage]:
    msg = quantize(x.repeat(draws, 1), bits, gen)
    return dequantize(msg).double().view(draws, *x.shape).cpu(), msg.to('cpu')


def bias_bound(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The dither's 2^-17 step, float32 rounding of t (<= B 2^-23 steps) and
    of lo + scale q (an ulp of the result)."""
    ulp = torch.finfo(torch.float32).eps * (x.abs() + (2**bits - 1) * scale)
    return scale * (2.0**-17 + (2**bits - 1) * 2.0**-23) + 2 * ulp


def check_unbiased(x: torch.Tensor, bits: int, draws: int, gen: torch.Generator) -> None:
    xhat, msg = roundtrip_draws(x, bits, draws, gen)
    x = x.double().cpu()
    lo, scale = transmitted(msg)
    const = torch.signbit(msg.scale[:x.size(0)])
    assert torch.equal(xhat[:, const], x[const].expand(draws, -1, -1))
    lo, scale = lo[:x.size(0)][~const], scale[:x.size(0)][~const]
    x, xhat = x[~const], xhat[:, ~const]
    t = (x - lo) / scale
    var = scale**2 * (t - t.floor()) * (1 - (t - t.floor()))
    err = xhat.mean(0) - x
    assert (err.abs() <= 6 * (var / draws).sqrt() + bias_bound(x, lo, scale, bits)).all()
    # Aggregated over all elements the standardized error is N(0, 1/M).
    z = err[var > 0] / (var[var > 0] / draws).sqrt()
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert 0.8 < float(z.std()) < 1.2


@pytest.mark.parametrize('bits', BITS)
def test_unbiased(bits):
    check_unbiased(offset_rows(64), bits, 3000, worker_generator(11, 0))


def test_dither_bias_bound_over_all_dither_values():
    # Averaging over all 2^16 values of the dither (r + 1/2) / 2^16 gives
    # E[q] exactly: t rounded to a multiple of 2^-16, off by at most 2^-17.
    p = torch.tensor([2**-18, 2**-17 + 2**-20, 1 / 3, 0.5, 1 - 2**-18, 0.99999, 0.0])
    x = torch.cat([torch.tensor([0.0, 3.0]), 1 + p])[None]  # lo = 0, scale = 1 at 2 bits
    u = ((torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16).float()
    msg = quantize(x.expand(2**16, -1), 2, dither=u[:, None].expand(-1, x.size(1)).contiguous())
    assert float(msg.lo[0]) == 0 and float(msg.scale[0]) == 1
    mean = read_codes(msg.payload, x.size(1), 2).double().mean(0)
    err = (mean - x[0].double()).abs()
    assert (err <= 2**-17).all() and float(err.max()) > 2**-19


def original_adaqp_roundtrip(x: torch.Tensor, bits: int, gen: torch.Generator) -> torch.Tensor:
    """The original scheme: quantize with float32 lo/scale, send them as
    bfloat16 rounded to nearest."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    q = torch.floor((x - lo) / scale + torch.rand(x.shape, generator=gen))
    return lo.bfloat16().float() + scale.bfloat16().float() * q


def test_bias_check_detects_the_original_scheme():
    x, draws = offset_rows(64), 3000
    xhat = original_adaqp_roundtrip(x.repeat(draws, 1), 8, torch.Generator().manual_seed(0))
    err = xhat.double().view(draws, *x.shape).mean(0) - x.double()
    scale = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)).double() / 255
    # Far outside the 6-sigma band (sigma <= scale / 2 / sqrt(draws)) of the test above.
    assert float((err.abs() / (scale / 2 / math.sqrt(draws))).max()) > 100


@pytest.mark.parametrize('bits', BITS)
def test_error_variance_matches_formula(bits):
    x, draws = offset_rows(128), 2000
    xhat, msg = roundtrip_draws(x, bits, draws, worker_generator(12, 0))
    lo, scale = transmitted(msg)
    lo, scale = lo[:x.size(0)], scale[:x.size(0)]
    t = (x.double() - lo) / scale
    p = t - t.floor()
    expected = (scale**2 * p * (1 - p)).sum(1)  # sum_j Delta^2 p (1 - p)
    measured = ((xhat - x.double())**2).mean(0).sum(1)
    assert torch.allclose(measured, expected, rtol=0.1)
    assert (expected <= x.size(1) * scale.view(-1)**2 / 4).all()


@pytest.mark.parametrize('bits', BITS)
def test_variance_model_is_the_average_case(bits):
    # The allocator's model D (hi - lo)^2 / (6 B^2) is the expectation of
    # sum_j Delta^2 p(1 - p) for fractions p uniform on [0, 1), exact up to
    # the transmitted Delta >= (hi - lo) / B.
    width, levels = 4096, 2**bits - 1
    x = torch.rand(6, width, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [1.0, 3.0, 1e-6, 7e3, 0.25, 40.0])[:, None]
    msg = quantize(x, bits)
    lo, scale = transmitted(msg)
    t = (x.double() - lo) / scale
    p = t - t.floor()
    exact = (scale**2 * p * (1 - p)).sum(1)
    span = (x.amax(1) - x.amin(1)).double()
    model = width * span**2 / (6 * levels**2)
    assert torch.allclose(exact, width * scale.view(-1)**2 / 6, rtol=0.05)
    assert ((levels * scale.view(-1) / span - 1).abs() < 2**-6).all()  # transmitted range is tight
    assert torch.allclose(exact, model, rtol=0.06)


@pytest.mark.parametrize('bits', BITS)
def test_constant_rows_decode_exactly(bits):
    values = torch.tensor([0.0, -0.0, 1.0, 0.1, -3.3e-39, 1e30, -65504.5, math.pi, 1e-45])
    x = values[:, None].repeat(1, 11)
    x = torch.cat([x, torch.randn(3, 11)])
    msg = quantize(x, bits, worker_generator(0, 0))
    out, k = dequantize(msg), len(values)
    assert torch.equal(out[:k], x[:k])
    nonzero = (values != 0).nonzero().view(-1)  # bit-exact, even subnormals
    assert torch.equal(out[nonzero].view(torch.int32), x[nonzero].view(torch.int32))
    assert torch.signbit(msg.scale[:k]).all() and (msg.scale[k:] > 0).all()


@pytest.mark.parametrize('bits', BITS)
def test_one_column_and_empty(bits):
    x = torch.randn(17, 1) * 1e3
    assert torch.equal(dequantize(quantize(x, bits)), x)
    empty = quantize(torch.empty(0, 5), bits)
    assert empty.payload.shape == (0, math.ceil(5 * bits / 8)) and empty.nbytes == 0
    assert dequantize(empty).shape == (0, 5)


@pytest.mark.parametrize('bits', BITS)
def test_error_within_one_step_at_any_magnitude(bits):
    for magnitude in (1e-38, 1e-20, 1e-9, 1.0, 1e9, 1e20, 1e37):
        x = torch.randn(5, 33) * magnitude
        msg = quantize(x, bits)
        lo, scale = msg.lo.float()[:, None], msg.scale.float()[:, None]
        xhat = dequantize(msg)
        assert ((xhat - x).abs() <= scale * (1 + 1e-5)).all()
        assert (xhat >= lo).all() and (xhat <= lo + (2**bits - 1) * scale * (1 + 1e-6)).all()
        if magnitude >= 1e-37:  # bfloat16 keeps 8 significant bits above its subnormals
            span = x.amax(1) - x.amin(1)
            assert ((2**bits - 1) * scale.view(-1) <= span * (1 + 2**-6)).all()


def test_strided_and_autograd_inputs():
    base = torch.randn(40, 30, requires_grad=True)
    x = base[::2, 1::3]  # non-contiguous, part of an autograd graph
    msg = quantize(x, 4, worker_generator(0, 0))
    ref = quantize(x.detach().contiguous(), 4, worker_generator(0, 0))
    assert torch.equal(msg.payload, ref.payload)
    assert not dequantize(msg).requires_grad
    layout = MessageLayout(torch.tensor([2, 32] * 10), 10)
    assert torch.equal(layout.pack(x, worker_generator(0, 0)),
                       layout.pack(x.detach().contiguous(), worker_generator(0, 0)))


@pytest.mark.parametrize('dtype', (torch.float16, torch.bfloat16, torch.float64))
def test_input_and_output_dtypes(dtype):
    x = torch.randn(20, 9).to(dtype)
    msg = quantize(x, 8, worker_generator(0, 0))
    ref = quantize(x.float(), 8, worker_generator(0, 0))
    if dtype != torch.float64:  # float64 subtracts before rounding to float32
        assert torch.equal(msg.payload, ref.payload)
    out = dequantize(msg, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize(msg).to(dtype))


@pytest.mark.parametrize('bad', (float('nan'), float('inf'), float('-inf')))
def test_non_finite_raises_with_name(bad):
    x = torch.randn(6, 4)
    x[3, 2] = bad
    with pytest.raises(NonFiniteMessageError, match=r"'layer 1 forward'.*row 3"):
        quantize(x, 4, name='layer 1 forward')
    layout = MessageLayout(torch.tensor([8, 8, 32, 2, 4, 32]), 4)
    with pytest.raises(ValueError, match='layer 2 backward'):
        layout.pack(x, name='layer 2 backward')
    # A raw float32 row is sent as is, unless its range is requested.
    layout = MessageLayout(torch.tensor([8, 8, 32, 32, 4, 32]), 4)
    sent = layout.unpack(layout.pack(x))[3]
    assert torch.equal(sent.view(torch.int32), x[3].view(torch.int32))
    with pytest.raises(NonFiniteMessageError):
        layout.pack(x, return_range=True)


def test_bad_inputs():
    x = torch.randn(4, 3)
    for bits in (1, 3, 16, 32):
        with pytest.raises(ValueError, match='bits'):
            quantize(x, bits)
    with pytest.raises(ValueError, match='2-D'):
        quantize(torch.randn(5), 4)
    with pytest.raises(TypeError, match='floating'):
        quantize(torch.ones(4, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match='feature'):
        quantize(torch.empty(4, 0), 4)
    with pytest.raises(ValueError, match='too wide'):
        quantize(torch.tensor([[-3e38, 3e38]]), 8, name='wide')
    with pytest.raises(ValueError, match='dither'):
        quantize(x, 4, dither=torch.rand(4, 4))
    with pytest.raises(ValueError, match='bits_per_row'):
        MessageLayout(torch.tensor([2, 3]), 3)
    layout = MessageLayout(torch.tensor([2, 32, 8, 4]), 3)
    with pytest.raises(ValueError, match='shape'):
        layout.pack(torch.randn(4, 5))
    buf = layout.pack(x)
    with pytest.raises(ValueError, match=f'{layout.nbytes} bytes'):
        layout.unpack(buf[:-1])
    with pytest.raises(ValueError, match='out'):
        layout.unpack(buf, out=torch.empty(3, 3))


def test_layout_mixed_widths_round_trip():
    width = 13
    bits = torch.tensor([2, 32, 8, 8, 2, 32, 8, 2, 2, 8, 32])  # no 4-bit rows
    x = torch.randn(bits.numel(), width) * 10
    x[4] = 2.5  # a constant row
    layout = MessageLayout(bits, width)
    buf, span = layout.pack(x, worker_generator(5, 2), return_range=True)
    assert buf.dtype == torch.uint8 and buf.numel() == layout.nbytes
    assert layout.nbytes == sum(message_nbytes(int((bits == b).sum()), width, b)
                                for b in (2, 4, 8, 32))
    assert torch.equal(span, x.amax(1) - x.amin(1))
    out = layout.unpack(buf)
    # Buckets draw from the generator in the order 2, 4, 8 bits: the same as
    # quantizing each bucket on its own.
    gen = worker_generator(5, 2)
    for b in (2, 8):
        rows = (bits == b).nonzero().view(-1)
        assert torch.equal(out[rows], dequantize(quantize(x[rows], b, gen)))
    raw = (bits == 32).nonzero().view(-1)
    assert torch.equal(out[raw], x[raw])
    # Writing into and reading from a slice at an odd offset of a larger buffer.
    big = torch.zeros(layout.nbytes + 7, dtype=torch.uint8)
    layout.pack(x, worker_generator(5, 2), out=big[3:3 + layout.nbytes])
    assert torch.equal(big[3:3 + layout.nbytes], buf)
    assert torch.equal(layout.unpack(big[3:3 + layout.nbytes]), out)
    halo = torch.empty(bits.numel(), width, dtype=torch.bfloat16)
    assert layout.unpack(buf, out=halo) is halo and torch.equal(halo, out.bfloat16())


def test_layout_single_width_and_empty():
    x = torch.randn(50, 7)
    layout = MessageLayout(torch.full((50, ), 4), 7)
    assert torch.equal(layout.unpack(layout.pack(x, worker_generator(1, 0))),
                       dequantize(quantize(x, 4, worker_generator(1, 0))))
    full = MessageLayout(torch.full((50, ), 32), 7)
    assert full.nbytes == 50 * 7 * 4 and torch.equal(full.unpack(full.pack(x)), x)
    empty = MessageLayout(torch.empty(0, dtype=torch.long), 7)
    assert empty.nbytes == 0 and empty.unpack(empty.pack(torch.empty(0, 7))).shape == (0, 7)


def test_shared_rows_quantize_each_row_once_per_width():
    """Three peers' messages share rows; every row is quantized once per width
    it travels at, each peer's buffer decodes to those roundings, and a row
    sent to two peers at one width arrives identically in both."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 9, generator=gen) * 5
    x[7] = -1.25  # a constant row
    rows, layouts = {}, {}
    for p, n in ((0, 25), (1, 30), (2, 0), (3, 12)):
        ids = torch.randperm(40, generator=gen)[:n]
        bits = torch.tensor([2, 4, 8, 32])[torch.randint(4, (n,), generator=gen)]
        bits = torch.sort(bits, stable=True).values  # consecutive buckets, as the exchange sends
        rows[p], layouts[p] = ids, MessageLayout(bits, 9)
    shared = SharedRows(rows, layouts)
    # Brute-force count: one encode per distinct (row, width) pair.
    pairs = {(int(r), int(b)) for p in rows for r, b in zip(rows[p], layouts[p].bits_per_row)
             if b != 32}
    assert shared.encoded_rows == {b: sum(1 for _, w in pairs if w == b)
                                   for b in (2, 4, 8) if any(w == b for _, w in pairs)}
    buffers, ranges = shared.pack(x, worker_generator(4, 1), return_range=True)
    assert {p: buf.numel() for p, buf in buffers.items()} == \
        {p: layout.nbytes for p, layout in layouts.items()}
    # Reference: each width's distinct rows, ascending, quantized in the order 2, 4, 8.
    ref_gen, reference = worker_generator(4, 1), {}
    for b in (2, 4, 8):
        ids = sorted(r for r, w in pairs if w == b)
        decoded = dequantize(quantize(x[ids], b, ref_gen))
        reference.update({(r, b): decoded[k] for k, r in enumerate(ids)})
    for p, layout in layouts.items():
        out = layout.unpack(buffers[p])
        for k, (r, b) in enumerate(zip(rows[p].tolist(), layout.bits_per_row.tolist())):
            assert torch.equal(out[k], x[r] if b == 32 else reference[(r, b)])
        assert torch.equal(ranges[p], (x.amax(1) - x.amin(1))[rows[p]])
    assert torch.equal(shared.pack(x, worker_generator(4, 1))[1], buffers[1])
    with pytest.raises(NonFiniteMessageError, match="'layer 2'"):
        bad = x.clone()
        bad[int(rows[0][0])] = float('nan')
        shared.pack(bad, worker_generator(4, 1), name='layer 2')
    with pytest.raises(ValueError, match="not consecutive"):
        SharedRows({0: torch.arange(3)}, {0: MessageLayout(torch.tensor([2, 4, 2]), 9)})


def test_shared_rows_quantize_a_whole_source_rather_than_gather_most_of_it():
    """Every row of the source travels (a gradient's halo rows): 2 of 80 at
    4 bits, the rest at 2.  The 2-bit rows are quantized over the whole
    source, without a gather (78 of 80 rows: within the slack); each peer's
    buffer holds exactly the bytes of the whole source quantized at 2 bits
    then the 2 rows at 4, drawn from the generator in that order."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(80, 9, generator=gen) * 3
    wide = [4, 70]
    rows, layouts = {}, {}
    for p, ids in ((0, torch.arange(0, 40)), (1, torch.arange(40, 80))):
        bits = torch.tensor([4 if int(r) in wide else 2 for r in ids])
        order = torch.sort(bits, stable=True)[1]
        rows[p], layouts[p] = ids[order], MessageLayout(bits[order], 9)
    shared = SharedRows(rows, layouts)
    assert sorted(shared._plan(80)) == [2] and shared._plan(81) == {}
    assert shared.encoded_rows == {2: 78, 4: 2}
    buffers, ranges = shared.pack(x, worker_generator(6, 0), return_range=True)
    ref_gen = worker_generator(6, 0)
    whole = dequantize(quantize(x, 2, ref_gen))
    four = dequantize(quantize(x[wide], 4, ref_gen))
    for p, layout in layouts.items():
        out = layout.unpack(buffers[p])
        for k, (r, b) in enumerate(zip(rows[p].tolist(), layout.bits_per_row.tolist())):
            assert torch.equal(out[k], whole[r] if b == 2 else four[wide.index(r)])
        assert torch.equal(ranges[p], (x.amax(1) - x.amin(1))[rows[p]])
    # Past the slack (3 of 80 rows at 4 bits, or a slack of 0), the 2-bit
    # rows are gathered.
    assert SharedRows(rows, layouts, whole_source_slack=0)._plan(80) == {}
    rows = {0: torch.arange(80)}
    bits = torch.tensor([2] * 77 + [4] * 3)
    assert SharedRows(rows, {0: MessageLayout(bits, 9)})._plan(80) == {}
    # A source row that no message quantizes is never read: no whole plan.
    assert SharedRows({0: torch.arange(79)}, {0: MessageLayout(bits[:79], 9)})._plan(80) == {}


def test_layout_rows_scattered_across_chunks(monkeypatch):
    monkeypatch.setattr(packing, '_CHUNK_ELEMENTS', 64)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(0))
    bits = torch.tensor([2, 4, 8, 32] * 40)[order]
    x = torch.randn(160, 11)
    layout = MessageLayout(bits, 11)
    out = layout.unpack(layout.pack(x, worker_generator(2, 0)))
    gen = worker_generator(2, 0)
    for b in (2, 4, 8):
        rows = (bits == b).nonzero().view(-1)
        assert torch.equal(out[rows], dequantize(quantize(x[rows], b, gen)))


def test_reproducible_per_worker():
    x = torch.randn(64, 32)
    layout = MessageLayout(torch.tensor([2, 4, 8, 32] * 16), 32)
    a = layout.pack(x, worker_generator(0, 1))
    assert torch.equal(a, layout.pack(x, worker_generator(0, 1)))
    assert not torch.equal(a, layout.pack(x, worker_generator(0, 2)))
    assert not torch.equal(a, layout.pack(x, worker_generator(1, 1)))
    with pytest.raises(ValueError, match='rank'):
        worker_generator(0, -1)


def decode_tolerance(msg: QuantizedMessage) -> torch.Tensor:
    """One float32 ulp of |lo| + B scale: a fused multiply-add may round
    lo + scale q once instead of twice."""
    lo, scale = msg.lo.float().abs()[:, None], msg.scale.float().abs()[:, None]
    return 2.0**-23 * (lo + (2**msg.bits - 1) * scale)


@pytest.mark.parametrize('bits', BITS)
def test_device_path_on_cpu(bits, monkeypatch):
    # The GPU variant of every step (one block, aminmax, uniform_ dither,
    # fused decode) run on CPU: same codes for the same dither, decoding
    # within an ulp, unbiased with its own dither.
    x = offset_rows(37)
    x[3] = 1.5
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    cpu = quantize(x, bits, dither=u)
    monkeypatch.setattr(packing, '_cpu_path', lambda device: False)
    dev = quantize(x, bits, dither=u)
    for field in ('payload', 'lo', 'scale'):
        assert torch.equal(getattr(dev, field), getattr(cpu, field))
    assert ((dequantize(dev) - dequantize(cpu)).abs() <= decode_tolerance(cpu)).all()
    assert torch.equal(dequantize(dev)[3], x[3])
    check_unbiased(x, bits, 2000, worker_generator(4, 0))
    bits_per_row = torch.tensor([bits, 32, 2, 4, 8, 32, bits, 2])
    layout = MessageLayout(bits_per_row, 37)
    out = layout.unpack(layout.pack(x, worker_generator(4, 0)), dtype=torch.float64)
    assert torch.equal(out[[1, 5]], x[[1, 5]].double())
    for b in (2, 4, 8):
        rows = (bits_per_row == b).nonzero().view(-1)
        ref = quantize(x[rows], b, dither=torch.zeros(len(rows), 37))
        assert ((out[rows] - x[rows]).abs() <= ref.scale.double()[:, None] * (1 + 1e-5)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('bits', BITS)
def test_cuda_matches_cpu(bits):
    # The generators differ across devices, so both sides round with the
    # same explicit dither: then every byte must agree.
    x = offset_rows(301)
    x[2] = 7.25
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    cpu = quantize(x, bits, dither=u)
    gpu = quantize(x.cuda(), bits, dither=u.cuda())
    for field in ('payload', 'lo', 'scale'):
        assert torch.equal(getattr(gpu, field).cpu(), getattr(cpu, field))
    assert ((dequantize(gpu).cpu() - dequantize(cpu)).abs() <= decode_tolerance(cpu)).all()
    assert torch.equal(dequantize(gpu)[2].cpu(), x[2])
    assert torch.equal(dequantize(gpu.to('cpu')), dequantize(cpu))
    layout = MessageLayout(torch.tensor([bits, 32, bits, 8, 2, 4, 32, bits]), 301)
    buf = layout.pack(x.cuda(), worker_generator(0, 0, 'cuda'))
    out = layout.unpack(buf).cpu()
    assert torch.equal(out[[1, 6]], x[[1, 6]])
    assert torch.equal(layout.unpack(buf.cpu())[[1, 6]], out[[1, 6]])
    check_unbiased(x.cuda(), bits, 2000, worker_generator(0, 0, 'cuda'))

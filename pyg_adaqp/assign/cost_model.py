r"""The cost model of the bit allocator: the critical path of one exchange, per worker.

The halo exchange posts every channel at once.  Worker :math:`i` encodes
what it sends, waits for its link to carry its egress *and* its ingress
(each direction at that link's own rate), and decodes what arrived; the part
of the wait that its owned-row aggregation covers (the overlap) costs
nothing:

.. math::
    T_i = E_i + D_i + \max\big(0,\; C_i - h_i\big), \qquad
    C_i = \beta_i + \lambda + \max\big(u_i (\mathrm{out}_i - f_i),\;
                             d_i (\mathrm{in}_i - f_i),\; 0\big),

and the exchange takes :math:`T = \max_i T_i`, since the slowest worker
sets the pace.  :math:`u_i, d_i` are seconds per byte leaving and entering
worker :math:`i`'s link, :math:`f_i` what the link passes before its rate
applies (a token bucket's burst, a switch buffer; 0 on a plain link),
:math:`E_i, D_i` the encode and decode time of the rows it sends and
receives at their widths (measured per row and per element on that worker's
device, plus a fixed cost per non-empty width bucket of every message: a
bucket's few kernels cost ~0.1-0.6 ms on one CPU thread whatever its rows;
on the CPU the encode is slowed by the workers that share the host's cores
and encode at the same time, and all of it by a container's CPU limit,
:func:`core_contention`),
and :math:`h_i` the aggregation time that overlaps the exchange.  Every
piece is linear in the widths' indicator variables (and in one variable per
channel and width that says whether the bucket is used), so the MILP keeps
the model exactly (four rows per worker).  A worker's egress finishing last
is also what delays its receivers: the maximum over workers covers it.

(The original fits :math:`\alpha \cdot \mathrm{MB} + \beta` per channel from
blocking one-pair sends while the exchange runs all channels at once, and
counts only senders.)

:func:`profile_cost_model` measures all of it once, before training, in
bounded time: the codec on synthetic rows, and the links: a warm-up of
every link at once (twice), whose slowest link sizes the rest (:func:`profile_sizes`),
then one round per worker in which that worker sends to and receives from
every peer at once, at a few sizes, so each end of every link is timed in
both directions (again without the peers whose own, slower link held the
round: :func:`held_peers`), and one round of every link at once: some
columns of the input cache's exchange, which training makes anyway, where
they can load every link as much as the round would (a
:class:`~pyg_adaqp.comm.LinkLoad`), else dummy bytes.
Last, one small exchange that every worker codes and sends at once, as
training does, against the model's prediction for it: what its slowest
worker took beyond the slowest prediction is the loaded latency
:math:`\lambda` (the transport's threads waking up behind the other
workers' coding, where workers share a host's cores; the link rounds time
:math:`\beta_i` with the other workers idle), at least 0.  One figure for
the exchange, not per worker: a worker's own time also holds its wait for
slower peers, which the maximum over workers already counts.  It sits in
:math:`C_i`, where the overlap may hide it, as it hides the link's wait.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from pyg_adaqp.comm.clock import device_clock
from pyg_adaqp.comm.codec import MessageLayout, SharedRows, message_nbytes
from pyg_adaqp.comm.exchange import LinkLoad
from pyg_adaqp.comm.packing import SUPPORTED_BITS
from pyg_adaqp.comm.transport import Transport
from pyg_adaqp.host import cpu_group, usable_cores

#: Bytes every profiled round moves through the timed link, largest first:
#: TCP's congestion window opens on the big transfer, as it has in training.
#: The smallest fits in a token bucket (it measures beta).  The largest is
#: also what every link carries each way in the all-links round; on slow
#: links the owner rounds carry half of it (:func:`profile_sizes`), on slow
#: and even links the all-links round :data:`EVEN_ALL_LINKS` times as much
#: (:func:`all_links_bytes`).
PROFILE_BYTES = (512 << 10, 128 << 10, 32 << 10, 8 << 10)
#: Bytes every link carries each way in the warm-up, all links at once
#: (~20 ms at 100 Mbit/s): it opens every connection and times the slowest
#: link.  At 128 KiB a 100 Mbit/s link (whose token bucket passes its first
#: bytes free) and a busy 1 Gbit/s one (4 workers sharing 2 cores) took
#: about as long (docs/benchmarks.md, twenty-first pass).
WARM_UP_BYTES = 256 << 10
#: Warm-up rounds; each worker's fastest counts.  The first also pays for a
#: first transfer (every connection's congestion window opening, fresh
#: buffers).  A margin against misreading fast links as slow: at 1 Gbit/s on
#: 4 workers sharing 2 cores the first round read up to 11.8 ms against the
#: 14 ms limit, the faster of two up to 7.3 (docs/benchmarks.md,
#: twenty-eighth pass; the twenty-fifth pass saw set-ups miss the fast-links
#: rule under the limit of then).
WARM_UP_ROUNDS = 2
#: A link is slow where the slowest would take longer than this to carry
#: the largest size.  There the owner rounds' largest transfer is halved:
#: at 100 Mbit/s the full 512 KiB (~42 ms, 680 KiB per owner round in all)
#: made the set-up ~0.2 s longer and its checks no closer; at 1 Gbit/s
#: (~4 ms) half of it fitted some links far off (docs/benchmarks.md,
#: twenty-first pass).  :data:`FAST_WITHIN_S` is the same limit: the two
#: rules part the links at one warm-up time (0.025 before the twenty-sixth
#: pass).
LARGEST_WITHIN_S = 0.028
#: Where the links are slow (:func:`slow_links`) and even, every fitted
#: rate of the owner rounds within this factor of every other, the
#: all-links round carries :data:`EVEN_ALL_LINKS` times the largest size
#: (:func:`all_links_bytes`).
#: At 100 Mbit/s one all-links round of 512 KiB left the links' fitted
#: rates anywhere from 62 to 127 Mbit/s over ten set-ups, and its scale
#: moved every prediction with it: ``benchmarks/cost_model.py`` passed 2
#: of 10 runs (6 of 20 over the twenty-first and twenty-second passes'
#: batches), the widest check predicted at a median 258 ms against 225
#: measured.  At 1 MiB (set-up 0.49-0.60 s against 0.44-0.54) 17 of 30 runs
#: passed in three batches, that check's median prediction 4-12% over the
#: measurement.  On uneven links (one
#: 100 Mbit/s host among 1 Gbit/s ones) 1 MiB showed no gain: the slow
#: link read slower (median 94 against 99 Mbit/s), 5 of 10 runs passed
#: against 8 of 10, so there the round keeps the largest size
#: (docs/benchmarks.md, twenty-second pass).
EVEN_WITHIN = 2.0
#: How many times the largest size the all-links round carries on slow,
#: even links.  At 2 (1 MiB at 100 Mbit/s) the workers' rates read
#: 70-101 Mbit/s over eight set-ups at 8bf1619, against about 85 in the
#: exchanges themselves, and the exchange, which waits for the slowest
#: worker, was predicted from the lowest: the widest check at 250 ms by
#: median against 223-232 measured.  What a round costs beyond its bytes
#: (likely its slowest pair's ramp-up) weighs half as much in 2 MiB; with
#: it and the common starts (:func:`start_together`) the set-up there
#: took ~0.1 s longer (docs/benchmarks.md, twenty-sixth pass).
EVEN_ALL_LINKS = 4
#: A link is fast where the slowest would carry the largest size within this.
#: There the owner rounds add a transfer four times the largest, which also
#: sizes the all-links round.  At 1 Gbit/s a 512 KiB transfer
#: takes ~4 ms, half of it a token bucket's burst (the owner rounds' knot
#: search stops at their second largest size, so the fit read the rate
#: high; docs/benchmarks.md, twenty-fifth pass).  At 16 ms a 1 Gbit/s
#: set-up on 4 workers sharing 2 cores could miss the rule (its warm-up
#: slowed by the workers' scheduling): one of eight did at 196e864,
#: judging by the set-ups (0.35 s against 0.46-0.49 where it fired); at
#: 28 ms none of eight did (0.41-0.47 s, 802a283), while where the
#: slowest link is 100 Mbit/s the warm-up alone takes longer than half of
#: it (docs/benchmarks.md, twenty-sixth pass).
FAST_WITHIN_S = LARGEST_WITHIN_S
#: How long after the last worker reached it a common start lies: more than
#: the workers' usual spread leaving a collective (0.3 ms median on 4 workers
#: sharing 2 cores; a worker later than this starts late).
START_MARGIN_S = 0.002
#: A peer whose own round took more than this many times as long as an
#: owner's held the owner's round (:func:`held_peers`); the owner's rounds
#: run again without it.  Where one 100 Mbit/s host sits among 1 Gbit/s
#: ones, a fast owner's round takes about a third of the slow host's
#: (2.3-6.9 times less in 24 set-ups), and timed so, the fast links read
#: at 152-1363 Mbit/s.  The fast owners' rounds lay up to 2.4x apart, so
#: no bound parts them all: a fast peer may be held too (2 of the 24), and
#: its owner's re-run then leaves it out while its own rounds time its
#: link.  On even links the owners' rounds lay within 1.26x of each other
#: in eight set-ups (docs/benchmarks.md, twenty-ninth and thirtieth
#: passes).  With 3 workers a fast owner's round is half the slow host's,
#: at the bound itself: there the re-runs are not to be counted on.
PEER_BOUND = 2.0
#: Feature widths of the codec profile (per-row and per-element costs).
CODEC_WIDTHS = (16, 256)
#: Elements encoded per codec measurement (a fraction of a millisecond on one
#: CPU thread; 4x as many bought no accuracy in ``benchmarks/cost_model.py``'s
#: check and lengthened the set-up: docs/benchmarks.md, eleventh pass).
CODEC_ELEMENTS = 1 << 17
#: The codec profile's source holds this many rows per row of its message:
#: the exchange gathers a message's rows from the layer's whole output.
SOURCE_ROWS_PER_ROW = 2
#: Rows of the message that measures a bucket's fixed cost (of width CODEC_WIDTHS[0]).
BUCKET_ROWS = 8
#: Repetitions of that message: its fixed cost is their fastest.
BUCKET_REPEATS = 9
#: The loaded-latency exchange: rows each worker sends (split over its peers),
#: of CODEC_WIDTHS[0] at LATENCY_BITS, and timed repetitions (their median counts).
#: A few milliseconds each; on 4 workers sharing 2 cores at 1 Gbit/s the
#: exchange took 2.5-3.8 ms beyond the idle model's prediction
#: (docs/benchmarks.md, seventeenth pass).
LATENCY_ROWS = 8192
LATENCY_BITS = 2
LATENCY_REPEATS = 5


@dataclass
class CostModel:
    """Predicts one exchange key's time from what each worker moves and codes.

    Args:
        up (dict[int, float]): Seconds per byte leaving each worker.
        down (dict[int, float]): Seconds per byte entering each worker.
        beta (dict[int, float], optional): Fixed seconds of each worker's exchange.
        free (dict[int, float], optional): Bytes each worker's link passes
            before its rate applies (0 when missing).
        encode (dict[int, dict[int, tuple[float, float]]], optional): Per
            worker and width, encode seconds ``(per row, per element)``.
        decode (dict[int, dict[int, tuple[float, float]]], optional): The
            same for decoding.
        bucket (dict[int, tuple[float, float]], optional): Per worker, the
            encode and decode seconds of every non-empty width bucket of a
            message, whatever its rows.
        loaded_latency (float, optional): Fixed seconds every worker's
            exchange takes beyond `beta` when every worker codes and sends
            at once (:func:`excess_latency`). (default: :obj:`0.0`)
    """
    up: dict[int, float] = field(default_factory=dict)
    down: dict[int, float] = field(default_factory=dict)
    beta: dict[int, float] = field(default_factory=dict)
    free: dict[int, float] = field(default_factory=dict)
    encode: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    decode: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    bucket: dict[int, tuple[float, float]] = field(default_factory=dict)
    loaded_latency: float = 0.0

    def codec_seconds(self, worker: int, rows: float, width: int, bits: int,
                      encoding: bool, share: float = 1.0, fan_out: int = 1) -> float:
        """Seconds `worker` takes to encode (or decode) one message's bucket
        of `rows` rows of `width` at `bits`: of those rows it codes a
        fraction `share` (a row several peers need is encoded once), and
        the bucket's fixed cost is split between the `fan_out` messages
        whose rows are encoded together."""
        if rows <= 0:
            return 0.0
        per_row, per_element = (self.encode if encoding else self.decode).get(
            worker, {}).get(bits, (0.0, 0.0))
        fixed = self.bucket.get(worker, (0.0, 0.0))[0 if encoding else 1]
        return fixed / max(fan_out, 1) + share * rows * (per_row + per_element * width)

    def link_seconds(self, worker: int, out_bytes: float, in_bytes: float) -> float:
        """:math:`C_i`: seconds until `worker`'s link has carried both directions."""
        if out_bytes <= 0 and in_bytes <= 0:
            return 0.0
        f = self.free.get(worker, 0.0)
        return self.fixed_seconds(worker) + max(
            0.0, self.up.get(worker, 0.0) * (out_bytes - f),
            self.down.get(worker, 0.0) * (in_bytes - f))

    def fixed_seconds(self, worker: int) -> float:
        r""":math:`\beta_i + \lambda`: what `worker`'s link time costs whatever its bytes."""
        return self.beta.get(worker, 0.0) + self.loaded_latency

    def worker_seconds(self, worker: int, out_bytes: float, in_bytes: float,
                       codec_s: float, hidden_s: float = 0.0) -> float:
        """:math:`T_i`, given the worker's encode+decode seconds and the
        seconds of computation that overlap its exchange."""
        return codec_s + max(0.0, self.link_seconds(worker, out_bytes, in_bytes) - hidden_s)

    def state_dict(self) -> dict:
        """Plain ints and floats (checkpoints load with ``weights_only=True``)."""
        def floats(d: dict) -> dict:
            return {int(i): float(v) for i, v in d.items()}

        def codec(d: dict) -> dict:
            return {int(i): {int(b): [float(x) for x in c] for b, c in v.items()}
                    for i, v in d.items()}

        return {"up": floats(self.up), "down": floats(self.down), "beta": floats(self.beta),
                "free": floats(self.free), "encode": codec(self.encode),
                "decode": codec(self.decode),
                "bucket": {int(i): [float(x) for x in c] for i, c in self.bucket.items()},
                "loaded_latency": float(self.loaded_latency)}

    @classmethod
    def from_state_dict(cls, state: dict) -> CostModel:
        def codec(d: dict) -> dict[int, dict[int, tuple[float, float]]]:
            return {int(i): {int(b): tuple(c) for b, c in v.items()} for i, v in d.items()}

        def floats(d: dict) -> dict[int, float]:
            return {int(i): float(v) for i, v in d.items()}

        # Checkpoints written before the bucket cost or the loaded latency
        # was measured lack it.
        bucket = {int(i): tuple(c) for i, c in state.get("bucket", {}).items()}
        return cls(floats(state["up"]), floats(state["down"]), floats(state["beta"]),
                   floats(state["free"]), codec(state["encode"]), codec(state["decode"]),
                   bucket, float(state.get("loaded_latency", 0.0)))


def fit_link(sent: np.ndarray, took: np.ndarray) -> tuple[float, float, float]:
    """Fits ``took ~ beta + alpha * max(0, sent - free)`` with alpha, beta, free >= 0.

    The knot `free` is searched on a log grid from 0 up to the second
    largest size (at least two points stay on the slope); for each, weighted
    least squares minimizes the *relative* error, the one the check reports
    (times span orders of magnitude).  The first knot whose error is the
    least (by more than 1e-12) wins.  Every knot is solved at once, in
    closed form: every worker fits every link in the set-up, and one
    ``lstsq`` per knot took several times as long.

    Returns:
        (float, float, float): ``alpha`` (s/B), ``beta`` (s) and ``free`` (B).
    """
    sent, took = np.asarray(sent, dtype=np.float64), np.asarray(took, dtype=np.float64)
    w2 = 1.0 / np.maximum(took, 1e-9) ** 2           # weights of the squared relative error
    sizes = np.sort(np.unique(sent[sent > 0]))
    knots = np.geomspace(sizes[0], sizes[-2], 64) if sizes.size > 2 else np.zeros(0)
    free = np.r_[0.0, knots]
    x = np.maximum(0.0, sent[None, :] - free[:, None])                # [knots, points]
    s1, st = w2.sum(), w2 @ took
    sx, sxx, sxt = x @ w2, (x * x) @ w2, x @ (w2 * took)
    det = sxx * s1 - sx * sx
    flat = st / s1                                   # alpha 0: the weighted mean
    origin = sxt / np.maximum(sxx, 1e-300)           # beta 0: the line through the origin
    # Without two distinct x (one size), through the origin; without bytes, flat.
    line = det > 1e-9 * sxx * s1
    safe = np.where(line, det, 1.0)
    alpha = np.where(line, (sxt * s1 - sx * st) / safe, origin)
    beta = np.where(line, (sxx * st - sx * sxt) / safe, np.where(sxx > 0, 0.0, flat))
    # Noise can tilt the line; time never falls with bytes nor goes below 0.
    down = alpha < 0
    below = ~down & (beta < 0)
    alpha = np.where(down, 0.0, np.where(below, origin, alpha))
    beta = np.where(down, flat, np.where(below, 0.0, beta))
    err = ((alpha[:, None] * x + beta[:, None] - took) ** 2) @ w2
    best, best_err = (0.0, float(np.median(took)), 0.0), np.inf
    for k in range(free.size):
        if err[k] < best_err - 1e-12:
            best, best_err = (float(alpha[k]), float(beta[k]), float(free[k])), float(err[k])
    return best


def profile_codec(device: torch.device, widths: tuple[int, ...] = CODEC_WIDTHS,
                  repeats: int = 3, barrier: Callable[[], object] = lambda: None,
                  contention: tuple[float, float, float] = (1.0, 1.0, 1.0)
                  ) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]],
                             tuple[float, float]]:
    """Encode and decode seconds ``(per row, per element)`` of each width on
    `device`, and ``(encode, decode)`` seconds of one bucket whatever its rows.

    Times :class:`~pyg_adaqp.comm.SharedRows`' pack and
    :class:`~pyg_adaqp.comm.MessageLayout`'s unpack (what the exchange runs:
    a message's rows gathered from the layer's output, quantized and copied
    into the peer's buffer; the buffer decoded into place), median of
    `repeats`, every worker starting each
    measurement after `barrier` (in an exchange every worker codes at once:
    workers that share cores slow each other down, which timings taken one
    worker at a time under-read by 2-3x on 4 workers sharing 2 cores; one
    barrier per measurement, not per repetition: each costs a few ms on a
    100 Mbit/s link, and the workers repeat the same work in step): of
    :data:`BUCKET_ROWS` rows at each bit width (the bucket's fixed cost:
    the fastest of :data:`BUCKET_REPEATS`, the largest over the bit
    widths), and of :data:`CODEC_ELEMENTS` random
    elements at two feature widths, whose times less the fixed cost give the
    per-row and per-element costs.

    On CUDA, timed with the exchange's own clock
    (:func:`~pyg_adaqp.comm.clock.device_clock`).  On the CPU, one
    measurement's wall time depends on which workers held the cores while it
    ran (4 workers on 2 cores), its CPU time much less: so there each
    measurement of :data:`CODEC_ELEMENTS` is its median CPU time (the
    process's, which counts torch's intra-op threads), turned into the
    exchange's wall time by `contention` (:func:`coding_slowdown`): the
    encode, which every worker of a host runs at once when an exchange
    starts, shares the cores with the others', its bucket's fixed cost
    too; the decode does not (a worker decodes once its last peer's
    bytes are in, which in training comes at another time on each worker;
    replayed on the check's runs, the decode at its CPU time passed more
    of them).  The wall time over the CPU time of these
    measurements, the factor used before, read anywhere from 1 to 2 from
    run to run on 4 workers sharing 2 cores: each lasts less than a time
    slice, so it is either not pre-empted or pre-empted whole
    (docs/benchmarks.md, twenty-fifth pass).
    """
    gen = torch.Generator(device).manual_seed(0)
    clock = device_clock(device)

    def timed(bits: int, rows: int, width: int, repeats: int = repeats) -> np.ndarray:
        """Every repetition's encode and decode seconds, wall then CPU: ``[repeats, 4]``.

        Encodes as the exchange does (:class:`~pyg_adaqp.comm.SharedRows`):
        the message's rows gathered from a source twice as tall, quantized,
        and copied into the peer's buffer."""
        x = torch.randn(SOURCE_ROWS_PER_ROW * rows, width, generator=gen, device=device)
        sent = torch.randperm(x.size(0), generator=gen, device=device)[:rows].sort().values
        layout = MessageLayout(torch.full((rows,), bits), width)
        message = SharedRows({1: sent}, {1: layout})
        out = torch.empty(rows, width, device=device)
        took = []
        barrier()
        for _ in range(repeats + 1):          # the first one warms up
            t0, c0 = clock(), time.process_time()
            buf = message.pack(x, generator=gen)[1]
            t1, c1 = clock(), time.process_time()
            layout.unpack(buf, out=out)
            t2, c2 = clock(), time.process_time()
            took.append((t1 - t0, t2 - t1, c1 - c0, c2 - c1))
        return np.array(took[1:])

    wall, cpu = slice(0, 2), slice(2, 4)
    # A bucket's few kernels take well under a time slice, so a repetition
    # is either not pre-empted or pre-empted for a whole slice: the fastest
    # is their cost (a median of 3 read 2-5x that on a worker pre-empted
    # twice, and over-predicted narrow messages by up to 67%).
    fixed = np.max([timed(bits, BUCKET_ROWS, widths[0], BUCKET_REPEATS)[:, wall].min(axis=0)
                    for bits in SUPPORTED_BITS], axis=0)
    runs = {bits: {width: timed(bits, codec_rows(width), width) for width in widths}
            for bits in SUPPORTED_BITS}
    cols, share, bucket = ((cpu, np.array(contention[:2]), np.array([contention[2], 1.0]))
                           if device.type == "cpu" else (wall, 1.0, 1.0))
    per = {bits: {width: np.median(r[:, cols], axis=0) for width, r in by_width.items()}
           for bits, by_width in runs.items()}
    fixed = fixed * bucket
    enc, dec = codec_costs(fixed, per, share)
    return enc, dec, (float(fixed[0]), float(fixed[1]))


def host_id() -> str:
    """What tells this machine from others: the kernel's boot id (network
    namespaces and containers on one machine share it), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def clock_domain() -> str:
    """What workers must share to read one monotonic clock: the host
    (:func:`host_id`) and the time namespace (containers on one machine may
    shift their monotonic clock; "" where the kernel has none)."""
    try:
        namespace = os.readlink("/proc/self/ns/time")
    except OSError:
        namespace = ""
    return f"{host_id()} {namespace}"


def shares_one_clock() -> bool:
    """Whether every worker reads one monotonic clock, one
    :func:`clock_domain` for all (collective)."""
    return len(set(_gather(clock_domain()))) == 1


class WorkerCpus(NamedTuple):
    """What a worker's coding runs on: its host (:func:`host_id`), the cores it
    may run on, its intra-op threads, and its CPU cgroup and that cgroup's
    CPU limit (:func:`~pyg_adaqp.host.cpu_group`; None: none)."""
    host: str
    cores: tuple[int, ...]
    threads: int
    group: str = ""
    limit: float | None = None


def coding_slowdown(mine: WorkerCpus, everyone: list[WorkerCpus]) -> tuple[float, float, float]:
    """What a worker's coding takes in an exchange, from what it measures alone.

    `everyone` includes `mine`.  The workers on `mine`'s host whose cores
    overlap its own share the cores of all of them, or as many CPUs as
    their cgroups' limits add up to where every one of those cgroups has
    one (a container's ``--cpus``).  When all of them encode at once, this
    worker's threads get at most their own number of cores, its own cores
    (its own limit), and its threads' share of the shared CPUs; it decodes
    alone (once its last peer's bytes are in, at another time on each
    worker), within its limit.
    The share is by threads: a neighbour held below its share by its own
    limit is not counted as leaving the rest to the others.

    Returns:
        (float, float, float): Wall seconds per CPU second of the encode and
        of the decode, and how much slower one of its single-threaded
        kernels runs while every other worker encodes (that thread and
        theirs over the shared CPUs, at least 1): a bucket's fixed cost,
        timed alone, scaled to the exchange.
    """
    near = [e for e in everyone if e.host == mine.host and set(e.cores) & set(mine.cores)]
    shared = float(len(set().union(*(set(e.cores) for e in near))))   # mine among them
    limits: dict[str, list[float]] = {}
    for e in near:                       # a group's workers read one limit (or failed to)
        limits.setdefault(e.group, []).extend([] if e.limit is None else [e.limit])
    if all(limits.values()):
        shared = min(shared, sum(min(group) for group in limits.values()))
    demand = sum(e.threads for e in near)
    own = float(len(mine.cores)) if mine.limit is None else min(len(mine.cores), mine.limit)
    alone = min(float(mine.threads), own)
    encoding = min(alone, shared * mine.threads / demand)
    kernel = max(1.0, 1.0 / min(1.0, own), (demand - mine.threads + 1) / shared)
    return 1.0 / encoding, 1.0 / alone, kernel


def core_contention() -> tuple[float, float, float]:
    """This worker's :func:`coding_slowdown` among all workers (collective)."""
    mine = WorkerCpus(host_id(), usable_cores(), torch.get_num_threads(), *cpu_group())
    return coding_slowdown(mine, _gather(mine))


def codec_rows(width: int) -> int:
    """Rows of `width` in one codec measurement: :data:`CODEC_ELEMENTS` elements."""
    return max(1, CODEC_ELEMENTS // width)


def codec_costs(fixed: np.ndarray, per: dict[int, dict[int, np.ndarray]],
                share: float | np.ndarray = 1.0
                ) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    """Encode and decode seconds ``(per row, per element)`` of each bit width
    from :func:`profile_codec`'s measurements: `fixed`, one bucket's
    ``(encode, decode)`` seconds in the exchange, and ``per[bits][width]``,
    the ``(encode, decode)`` seconds of :func:`codec_rows` rows of `width`,
    which `share` (one factor, or one per direction) scales to the
    exchange's time; a line through the narrowest and widest width."""
    enc, dec = {}, {}
    for bits, by_width in per.items():
        cost = {width: np.maximum(0.0, np.asarray(took) * share - fixed) / codec_rows(width)
                for width, took in by_width.items()}
        (w0, (e0, d0)), (w1, (e1, d1)) = sorted(cost.items())[0], sorted(cost.items())[-1]
        for out_map, s0, s1 in ((enc, e0, e1), (dec, d0, d1)):
            slope = max(0.0, (s1 - s0) / (w1 - w0)) if w1 > w0 else s1 / w1
            out_map[bits] = (float(max(0.0, s1 - slope * w1)), float(slope))
    return enc, dec


def _gather(value: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def largest_seconds(largest: int, warm_up_s: float, warm_up_bytes: int = WARM_UP_BYTES) -> float:
    """Seconds the slowest link, which carried `warm_up_bytes` each way in
    `warm_up_s` seconds, would take to carry `largest` bytes."""
    return warm_up_s * largest / warm_up_bytes


def slow_links(largest: int, warm_up_s: float, warm_up_bytes: int = WARM_UP_BYTES) -> bool:
    """Whether the slowest link would take longer than
    :data:`LARGEST_WITHIN_S` to carry `largest` bytes (:func:`largest_seconds`)."""
    return largest_seconds(largest, warm_up_s, warm_up_bytes) > LARGEST_WITHIN_S


def fast_links(largest: int, warm_up_s: float, warm_up_bytes: int = WARM_UP_BYTES) -> bool:
    """Whether the slowest link would carry `largest` bytes within
    :data:`FAST_WITHIN_S` (:func:`largest_seconds`)."""
    return largest_seconds(largest, warm_up_s, warm_up_bytes) < FAST_WITHIN_S


def profile_sizes(sizes: tuple[int, ...], warm_up_s: float,
                  warm_up_bytes: int = WARM_UP_BYTES) -> tuple[int, ...]:
    """The owner rounds' sizes: `sizes` (largest first), the largest halved
    (never below the next) where the links are slow (:func:`slow_links`),
    and four times the largest added first where they are fast
    (:func:`fast_links`)."""
    if len(sizes) >= 2 and fast_links(sizes[0], warm_up_s, warm_up_bytes):
        return (4 * sizes[0], *sizes)
    if len(sizes) < 2 or not slow_links(sizes[0], warm_up_s, warm_up_bytes):
        return tuple(sizes)
    return (max(sizes[0] // 2, sizes[1]), *sizes[1:])


def start_together(group: object, device: torch.device, margin_s: float = START_MARGIN_S,
                   clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], object] = time.sleep
                   ) -> tuple[float, float, float]:
    """Starts a timed round on every worker of `group` at one time
    (collective; for workers that share a host and its monotonic clock,
    which `clock` reads: not across time namespaces): the latest worker's
    arrival plus `margin_s`, waited for with `sleep`.

    Returns:
        (float, float, float): The start, when this worker arrived, and by
        how many seconds it missed the start (0 if none).
    """
    arrived = clock()
    latest = torch.tensor([arrived], dtype=torch.float64, device=device)
    dist.all_reduce(latest, op=dist.ReduceOp.MAX, group=group)
    start = float(latest) + margin_s
    early = start - clock()
    sleep(max(0.0, early))
    return start, arrived, max(0.0, -early)


def start_round(group: object, device: torch.device, together: bool,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """When a timed round starts on this worker (collective): at one common
    time where the workers share a clock (`together`: :func:`start_together`),
    else as it leaves a barrier (`clock` read then)."""
    if together:
        return start_together(group, device)[0]
    dist.barrier(group=group)
    return clock()


def held_peers(round_times: list[float]) -> dict[int, list[int]]:
    """Per owner, the peers that held its round: those whose own round
    took more than :data:`PEER_BOUND` times as long (`round_times`, each
    owner's round's slowest worker), unless that is every peer (the owner's
    link would have no one to be timed with).  An owner whose round a slow
    peer held took about a ``k - 1``-th of that peer's own round: the
    peer's link carried its share alone, and all of it in its own round."""
    held = {i: [j for j, t in enumerate(round_times) if j != i and t > PEER_BOUND * round_times[i]]
            for i in range(len(round_times))}
    return {i: h if len(h) < len(round_times) - 1 else [] for i, h in held.items()}


def group_warm_up(pairs: list[dict[tuple[int, int], float]], group: list[int]) -> float:
    """What the warm-up says of `group`'s slowest link: the slowest worker's
    time to hear from the rest of `group`, in its fastest round (`pairs`:
    per round, ``{(i, j): seconds}``, when ``j``'s bytes reached ``i``)."""
    return max(min(max(by_pair[(i, j)] for j in group if j != i) for by_pair in pairs)
               for i in group)


def all_links_bytes(largest: int, slow: bool, fits: dict[int, list[float]]) -> int:
    """Bytes every link carries each way in the all-links round: `largest`,
    or :data:`EVEN_ALL_LINKS` times as much where the links are `slow` and
    even: every rate of `fits` (``(up s/B, down s/B, ...)`` per worker)
    within :data:`EVEN_WITHIN` of every other, rates the fit left at 0 (no
    measurable time per byte) aside; with none left, the links count as
    uneven."""
    rates = [a for f in fits.values() for a in f[:2] if a > 0]
    even = bool(rates) and max(rates) <= EVEN_WITHIN * min(rates)
    return EVEN_ALL_LINKS * largest if slow and even else largest


def profile_links(transport: Transport, device: torch.device, one_clock: bool,
                  sizes: tuple[int, ...] = PROFILE_BYTES, repeats: int = 1,
                  record: dict | None = None, load: LinkLoad | None = None
                  ) -> dict[int, tuple[float, float, float, float]]:
    """Up and down rate, beta (the latency, with the other workers idle) and
    free bytes of every worker's link (collective).

    A warm-up loads every link at once with :data:`WARM_UP_BYTES` each
    way, :data:`WARM_UP_ROUNDS` times; how long the slowest link took (in
    each worker's fastest round) sets the sizes of the owner rounds
    (:func:`profile_sizes`).  Where every worker reads one clock
    (`one_clock`: one host, one time namespace, :func:`shares_one_clock`),
    every later round starts at
    one time (:func:`start_together`), else out of a barrier: workers leave
    a barrier up to several ms apart (4 workers on 2 cores), which a round
    would time as link time.  Then one round per worker ``i``: ``i`` sends
    ``size / (k - 1)`` bytes to every peer and every peer sends it as much,
    all at once, so ``i``'s link
    carries ``size`` bytes in each direction while every other link carries
    a ``k - 1``-th of that.  Each peer times the arrival of ``i``'s bytes
    (``i``'s egress) and ``i`` the arrival of all of theirs (its ingress).
    Where a peer's own round at the largest size took much longer than
    ``i``'s (:func:`held_peers`), that peer's share of ``i``'s bytes
    crossed its own link alone and timed it, not ``i``'s, so ``i``'s rounds
    run again without it once every owner's have run (its link is timed
    in its own rounds), sized by the warm-up of the links that take part
    (:func:`group_warm_up`).  A last round loads every link at once, as
    training does (the largest of `sizes` and of the sizes every owner's
    rounds took with every peer, or :data:`EVEN_ALL_LINKS` times it where
    the owner rounds' fits say so: :func:`all_links_bytes`);
    each direction of each link is scaled to what the pairs it bounds took
    then (:func:`link_scales`).  Where every worker offers a `load` (an
    exchange that training makes anyway: the input cache's first columns,
    :meth:`~pyg_adaqp.nn.DistGraph.input_load`) with columns enough to load
    every link that much each way, the fewest such columns are the round,
    exchanged once (whatever `repeats`), instead of dummy bytes: training
    would have exchanged those columns anyway.  The least-loaded link then
    carries the round's size and the others somewhat more (2.04-2.11 MiB
    for 2 MiB on the benchmarks' graph).

    `record`, where given, receives every link measurement the result is
    made of, the same on every worker, so that other estimators can be
    replayed on them offline (``benchmarks/cost_model.py --raw``):
    ``warm_up_s`` (the slowest link's warm-up), ``warm_ups_s`` (each
    worker's time in each warm-up round, by rank), ``warm_up_pairs`` (per
    warm-up round, ``{"i,j": seconds}``: when ``j``'s bytes reached ``i``),
    ``round_times_s`` (each owner's first round's slowest worker),
    ``held`` (:func:`held_peers` of them, by owner), ``points`` (per worker,
    ``[bytes, seconds]`` of its egress and its ingress in the owner
    rounds), ``fits`` (:func:`fit_link` of those points, ``(up, down,
    beta, free)`` before the scale), ``all_links_bytes`` (what every link
    carried each way in the all-links round of dummy bytes; :obj:`None`
    where the `load` was the round), ``load_columns`` (the `load`'s columns
    that were the round; 0: dummy bytes), ``carried`` (``{"i,j": bytes}``: what
    ``j`` sent ``i`` in the round; what a replay gives :func:`link_scales`,
    keyed by ``(i, j)``) and ``arrived`` (``{"i,j":
    seconds}``: when ``j``'s bytes reached ``i`` in it); and, this
    worker's own, the seconds of each part in ``took_s``: ``warm_up``
    (with its gather), ``owner_rounds`` (the rounds, the all-reduce of
    their first times and the held owners' rounds again) and
    ``all_links`` (the owner rounds' gather and fits, the gather that
    agrees on the round's size, the round and its gather).

    Returns:
        dict[int, tuple]: ``(up s/B, down s/B, beta s, free B)`` per worker.
    """
    k, rank = transport.world_size, transport.rank
    peers = [p for p in range(k) if p != rank]
    up_t: dict[int, list] = {i: [] for i in range(k)}     # (bytes, seconds) per round owner
    down_t: dict[int, list] = {i: [] for i in range(k)}
    together = False        # the warm-ups out of a barrier

    def arrivals(talk: list[int], per_peer: int) -> dict[int, float]:
        """Seconds until each of `talk`'s `per_peer` bytes arrived, while this
        worker sends each of them as much (none where `talk` is empty: the
        round's start and the transport's call are collective all the same)."""
        send = {p: torch.empty(per_peer, dtype=torch.uint8, device=device) for p in talk}
        t0 = start_round(transport.group, device, together)
        pending = transport.start(send, {p: per_peer for p in talk}, device)
        pending.wait()
        return {p: at - t0 for p, at in pending.arrived.items()}

    def exchange(talk: list[int], per_peer: int) -> float:
        """This worker's time to send and receive `per_peer` bytes with `talk`."""
        return max(arrivals(talk, per_peer).values(), default=0.0)

    def per_peer_of(size: int, fan_out: int = k - 1) -> int:
        """Bytes to each of `fan_out` peers so that a worker moves `size` each way."""
        return max(1, size // max(1, fan_out))

    # Opens every connection; the slowest link's time (each worker's faster
    # round), which every worker learns alike, sizes the owner rounds.
    marks = [time.perf_counter()]
    heard = _gather([arrivals(peers, per_peer_of(WARM_UP_BYTES)) for _ in range(WARM_UP_ROUNDS)])
    pairs = [{(i, j): t for i, by_round in enumerate(heard) for j, t in by_round[r].items()}
             for r in range(WARM_UP_ROUNDS)]
    warm = group_warm_up(pairs, list(range(k)))
    owner_sizes = profile_sizes(sizes, warm)
    together = one_clock
    marks.append(time.perf_counter())

    def owner_round(owner: int, talks: list[int], size: int) -> float:
        """One round of `owner` with `talks`, its link carrying `size` each
        way: this worker's time, kept as a point of `owner`'s link."""
        per_peer = per_peer_of(size, len(talks))
        talk = talks if rank == owner else [owner] if rank in talks else []
        took = float(np.median([exchange(talk, per_peer) for _ in range(repeats)]))
        if rank == owner:
            down_t[owner].append((per_peer * len(talks), took))
        elif talk:
            up_t[owner].append((per_peer * len(talks), took))
        return took

    everyone = {i: [j for j in range(k) if j != i] for i in range(k)}
    largest = []            # this worker's time in each owner's largest round
    for owner in range(k):
        times = [owner_round(owner, everyone[owner], size) for size in owner_sizes]
        largest.append(times[0])
    # Each owner's largest round's slowest worker says which peers held it.
    slowest = torch.tensor(largest, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=transport.group)
    round_times = slowest.tolist()
    held = held_peers(round_times)
    for owner in range(k):
        if not held[owner]:
            continue
        # Timed by its held peers' links: the rounds again without them,
        # sized by the links that take part, after every owner's rounds,
        # which so run as they did before any peer was held.  Orders that
        # moved them moved the slow host's points (its 128 KiB round's
        # median 6.6-7.2 ms against 8.5-8.9), its fit and the check's
        # errors with them; why was not found (docs/benchmarks.md,
        # thirtieth pass).
        up_t[owner].clear()
        down_t[owner].clear()
        talks = [j for j in everyone[owner] if j not in held[owner]]
        for size in profile_sizes(sizes, group_warm_up(pairs, [owner, *talks])):
            owner_round(owner, talks, size)
    marks.append(time.perf_counter())
    # The owner's egress is timed by all its peers: the slowest arrival counts.
    gathered = _gather((up_t, down_t))
    fits, points = {}, {}
    for i in range(k):
        ups = [ts[i] for ts, _ in gathered if ts[i]]
        up_pts = [(b, max(run[j][1] for run in ups)) for j, (b, _) in enumerate(ups[0])] \
            if ups else []
        down_pts = gathered[i][1][i]
        points[i] = {"up": up_pts, "down": down_pts}
        a_up, b_up, f_up = fit_link(*map(np.array, zip(*up_pts))) if up_pts else (0, 0, 0)
        a_dn, b_dn, f_dn = fit_link(*map(np.array, zip(*down_pts))) if down_pts else (0, 0, 0)
        fits[i] = [float(a_up), float(a_dn), float(min(b_up, b_dn)), float(min(f_up, f_dn))]
    # Every link busy at once, both ways, as in training: TCP shares each
    # link with the acknowledgements of the other direction, which the
    # one-link rounds do not see.  Every worker fits the same points, but a
    # least-squares solve on another CPU or BLAS could land on the other
    # side of EVEN_WITHIN: all take the largest size any worker chose, so
    # none posts a size its peers do not expect.
    planned = _gather((all_links_bytes(max(sizes[0], owner_sizes[0]),
                                       slow_links(sizes[0], warm), fits),
                       None if load is None else (load.sent, load.columns)))
    size = max(b for b, _ in planned)
    offered = [o for _, o in planned]
    columns = load_columns(offered, size)
    if columns:
        all_seen = load.run(lambda: start_round(transport.group, device, together), columns)
        carried = {(i, j): columns * sent[i] for j, (sent, _) in enumerate(offered)
                   for i in sent}
        per_link = None
    else:
        per_peer = per_peer_of(size)
        rounds = [arrivals(peers, per_peer) for _ in range(repeats)]
        all_seen = {p: float(np.median([r[p] for r in rounds])) for p in peers}
        per_link = per_peer * (k - 1)
        carried = {(i, j): per_peer for i in range(k) for j in range(k) if i != j}
    seen = {(i, j): t for i, by_peer in enumerate(_gather(all_seen)) for j, t in by_peer.items()}
    marks.append(time.perf_counter())
    if record is not None:
        record.setdefault("took_s", {}).update(
            zip(("warm_up", "owner_rounds", "all_links"), np.diff(marks).tolist()))
        record.update(warm_up_s=warm,
                      warm_ups_s=[[max(r.values(), default=0.0) for r in by_round]
                                  for by_round in heard],
                      warm_up_pairs=[{f"{i},{j}": t for (i, j), t in p.items()} for p in pairs],
                      round_times_s=round_times, held=held, points=points,
                      fits={i: list(f) for i, f in fits.items()},
                      all_links_bytes=per_link, load_columns=columns,
                      carried={f"{i},{j}": b for (i, j), b in carried.items()},
                      arrived={f"{i},{j}": t for (i, j), t in seen.items()})
    for i, (up, down) in link_scales(fits, seen, carried).items():
        fits[i][0] *= up
        fits[i][1] *= down
    return {i: tuple(f) for i, f in fits.items()}


def load_columns(offered: list[tuple[dict[int, int], int] | None], size: int) -> int:
    """How many columns of the exchange every worker offered as the
    all-links round (`offered`: by rank, the bytes one column sends each
    peer and how many columns it has; :obj:`None` where it offered none)
    load every link with at least `size` bytes each way, as the round of
    dummy bytes would: the fewest that do, 0 where none do (or a worker
    offered nothing)."""
    if not offered or any(o is None for o in offered):
        return 0
    out = [sum(sent.values()) for sent, _ in offered]
    into = [sum(sent.get(i, 0) for sent, _ in offered) for i in range(len(offered))]
    if min(out + into) <= 0:
        return 0
    columns = max(-(-size // n) for n in out + into)
    return columns if columns <= min(c for _, c in offered) else 0


def link_scales(fits: dict[int, list[float]], seen: dict[tuple[int, int], float],
                carried: dict[tuple[int, int], float]) -> dict[int, tuple[float, float]]:
    """Per worker, how much slower each direction of its link ran with every
    link busy than its fit says: ``(up, down)`` factors.

    `seen[(i, j)]` is when ``j``'s bytes reached ``i`` in the all-links
    round, where ``j`` sent ``i`` `carried[(i, j)]` bytes; its prediction is
    the slower of ``j``'s uplink carrying all that ``j`` sent and ``i``'s
    downlink carrying all that ``i`` received (``(up, down, beta,
    free)`` in `fits`).  A pair's ratio of seen to predicted counts only for
    the direction (or both, within 10%) that bounds it, and a direction's
    factor is the largest ratio counted for it (it is done when its last
    pair is), never below 1: a fast link beside a slow one is judged by its
    pairs with fast peers (one factor for all links read a 1 Gbit/s link
    beside a 100 Mbit/s one at ~270 Mbit/s), and those pairs, which carry
    part of the link's bytes, finish before the link's last byte (the slow
    peer's) does, so a factor below 1 would read the fast link faster than
    it is (up to ~3 Gbit/s for a 1 Gbit/s link).  Each direction apart: one
    factor per worker compounded a direction that the owner rounds read slow
    with its other direction's factor (a 100 Mbit/s downlink fitted at
    74 Mbit/s came out at 51; docs/benchmarks.md, twenty-eighth pass).
    """
    out = dict.fromkeys(fits, 0.0)      # each link's bytes up, and down
    into = dict.fromkeys(fits, 0.0)
    for (i, j), b in carried.items():
        out[j] += b
        into[i] += b

    def link(worker: int, direction: int, total: float) -> float:
        u_d, beta, free = fits[worker][direction], fits[worker][2], fits[worker][3]
        return beta + u_d * max(0.0, total - free)

    ratios: dict[tuple[int, int], list[float]] = {(i, d): [] for i in fits for d in (0, 1)}
    for (i, j), took in seen.items():
        up, down = link(j, 0, out[j]), link(i, 1, into[i])
        predicted = max(up, down)
        if predicted <= 0:
            continue
        if up >= 0.9 * predicted:
            ratios[(j, 0)].append(took / predicted)
        if down >= 0.9 * predicted:
            ratios[(i, 1)].append(took / predicted)
    return {i: tuple(max([1.0, *ratios[(i, d)]]) for d in (0, 1)) for i in fits}


def profile_cost_model(transport: Transport, device: torch.device | str = "cpu",
                       repeats: int = 1, record: dict | None = None,
                       load: LinkLoad | None = None) -> CostModel:
    """Measures the whole cost model (collective: every worker calls it), on
    the exchange's own `transport` and `device`: the codec
    (:func:`profile_codec`), the links (:func:`profile_links`, each size
    timed `repeats` times, `load` perhaps its all-links round; its link
    measurements into `record`, as there),
    then the loaded latency
    (:func:`time_loaded_exchange` of :func:`latency_plan`,
    :func:`excess_latency`; into `record` too, where given, every
    worker's time as ``loaded_exchange_s``).  `record`'s ``took_s`` holds
    the seconds this worker spent in each part: ``codec`` (the cores'
    contention, the codec and the clocks' check), ``warm_up``,
    ``owner_rounds`` and ``all_links`` (as :func:`profile_links` says)
    and ``loaded_exchange`` (with the gather of every worker's codec
    profile, which shares its collective, and building the model)."""
    device = torch.device(device)
    began = time.perf_counter()
    codec = profile_codec(device, barrier=lambda: dist.barrier(group=transport.group),
                          contention=core_contention())
    one_clock = shares_one_clock()
    coded = time.perf_counter()
    links = profile_links(transport, device, one_clock, repeats=repeats, record=record,
                          load=load)
    linked = time.perf_counter()
    plan = latency_plan(transport.world_size)
    # Every worker's codec profile and loaded-exchange time, in one collective.
    mine = _gather((codec, time_loaded_exchange(transport, device, plan, together=one_clock)))
    codecs = [c for c, _ in mine]
    model = CostModel({i: f[0] for i, f in links.items()}, {i: f[1] for i, f in links.items()},
                      {i: f[2] for i, f in links.items()}, {i: f[3] for i, f in links.items()},
                      {i: c[0] for i, c in enumerate(codecs)},
                      {i: c[1] for i, c in enumerate(codecs)},
                      {i: c[2] for i, c in enumerate(codecs)})
    model.loaded_latency = excess_latency(model, plan, [took for _, took in mine])
    if record is not None:
        record["loaded_exchange_s"] = [took for _, took in mine]
        record.setdefault("took_s", {}).update(codec=coded - began,
                                               loaded_exchange=time.perf_counter() - linked)
    return model


def latency_plan(world_size: int, rows: int = LATENCY_ROWS
                 ) -> dict[tuple[int, int], dict[int, int]]:
    """The loaded-latency exchange's rows per channel ``(i, j)`` and width:
    every worker sends `rows` at :data:`LATENCY_BITS`, split evenly over its peers."""
    per_peer = max(1, rows // max(1, world_size - 1))
    return {(i, j): {LATENCY_BITS: per_peer} for i in range(world_size)
            for j in range(world_size) if i != j}


def time_loaded_exchange(transport: Transport, device: torch.device,
                         plan: dict[tuple[int, int], dict[int, int]],
                         repeats: int = LATENCY_REPEATS, together: bool = False) -> float:
    """Times the exchange `plan` (:func:`latency_plan`) as training runs one
    (collective): every worker starts, encodes its rows (gathered from a
    source twice as tall), posts every channel, waits and decodes; returns
    this worker's median seconds over `repeats` such exchanges (after one
    untimed warm-up).  With `together` (every worker reads one clock:
    :func:`shares_one_clock`), every exchange starts at one time
    (:func:`start_together`), as the link rounds do; else each worker
    starts as it leaves a barrier, and one that leaves it first times its
    peers' late start as exchange time (4 workers sharing 2 cores leave a
    barrier up to several ms apart), which the loaded latency then adds
    to every exchange."""
    rank, width = transport.rank, CODEC_WIDTHS[0]
    gen = torch.Generator(device).manual_seed(rank)
    mine = {j: n[LATENCY_BITS] for (i, j), n in plan.items() if i == rank}
    x = torch.randn(SOURCE_ROWS_PER_ROW * sum(mine.values()), width, generator=gen,
                    device=device)
    perm = torch.randperm(x.size(0), generator=gen, device=device)
    index, at = {}, 0
    for j, n in sorted(mine.items()):
        index[j] = perm[at:at + n].sort().values
        at += n
    send = {j: MessageLayout(torch.full((n,), LATENCY_BITS), width) for j, n in mine.items()}
    message = SharedRows(index, send)
    recv = {i: MessageLayout(torch.full((n[LATENCY_BITS],), LATENCY_BITS), width)
            for (i, j), n in plan.items() if j == rank}
    out = {i: torch.empty(layout.num_rows, width, device=device) for i, layout in recv.items()}
    clock = device_clock(device)
    took = []
    for _ in range(repeats + 1):              # the first one warms up
        t0 = start_round(transport.group, device, together, clock)
        raw = transport.start(message.pack(x, generator=gen),
                              {i: layout.nbytes for i, layout in recv.items()}, device).wait()
        for i, layout in recv.items():
            layout.unpack(raw[i], out=out[i])
        took.append(clock() - t0)
    return float(np.median(took[1:]))


def excess_latency(model: CostModel, plan: dict[tuple[int, int], dict[int, int]],
                   took: list[float]) -> float:
    """The seconds the exchange `plan` took (`took`: each worker's, by rank;
    the slowest sets the pace) beyond the prediction of `model` without its
    :attr:`~CostModel.loaded_latency` (the slowest worker's), at least 0."""
    predicted, _ = assignment_seconds(replace(model, loaded_latency=0.0), CODEC_WIDTHS[0], plan)
    return max(0.0, max(took, default=0.0) - predicted)


def assignment_seconds(model: CostModel, width: int, rows: dict[tuple[int, int], dict[int, int]],
                       hidden: dict[int, float] | None = None,
                       encode_share: dict[int, float] | None = None
                       ) -> tuple[float, dict[int, float]]:
    """Predicted time of one key whose channel ``(i, j)`` carries
    ``rows[(i, j)][b]`` rows at ``b`` bits; returns ``(T, T_i by worker)``.

    Every sender encodes each width once for all its channels
    (:class:`~pyg_adaqp.comm.SharedRows`): it codes the fraction
    ``encode_share[i]`` (default 1) of the rows it sends, and a width's
    fixed cost is spread over its channels."""
    hidden, encode_share = hidden or {}, encode_share or {}
    fan_out: dict[int, int] = {}
    for i, _ in rows:
        fan_out[i] = fan_out.get(i, 0) + 1
    out: dict[int, float] = {}
    inn: dict[int, float] = {}
    codec: dict[int, float] = {}
    for (i, j), by_bits in rows.items():
        for b, n in by_bits.items():
            nbytes = message_nbytes(n, width, b)
            out[i] = out.get(i, 0.0) + nbytes
            inn[j] = inn.get(j, 0.0) + nbytes
            codec[i] = codec.get(i, 0.0) + model.codec_seconds(
                i, n, width, b, True, encode_share.get(i, 1.0), fan_out[i])
            codec[j] = codec.get(j, 0.0) + model.codec_seconds(j, n, width, b, False)
    per = {w: model.worker_seconds(w, out.get(w, 0.0), inn.get(w, 0.0), codec.get(w, 0.0),
                                   hidden.get(w, 0.0)) for w in set(out) | set(inn)}
    return max(per.values(), default=0.0), per

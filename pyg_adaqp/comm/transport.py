"""Moving byte buffers between workers: asynchronous all-peers exchange.

One exchange sends one buffer to every peer that expects rows from this
worker and receives one buffer from every peer that sends rows to it; sizes
are known on both sides in advance (they follow from the send/receive plan
and the bit assignment), so no size handshake travels with the data.

- gloo (CPU tensors): every ``irecv`` is posted first, then every ``isend``.
  Measured on rate-limited links, gloo runs at about half speed when data
  arrives before its receive is posted, which is what ``all_to_all_single``
  does.  gloo crashes on CUDA tensors in send/recv, so CUDA buffers are
  staged through pinned CPU memory, asynchronously both ways: the sends'
  device-to-host copies are queued together and waited on once, the
  receives land in pinned buffers copied to the device without blocking.
- NCCL (CUDA tensors): one ``all_to_all_single`` with uneven splits.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pyg_adaqp.comm.clock import device_clock


class _ReceiveWaiters:
    """Daemon threads that wait on gloo receives and time when each arrived.

    A gloo receive completes only inside ``work.wait()`` (``is_completed()``
    stays False until then), so waiting on the peers one after another sees
    a buffer that arrived early only when the earlier waits return.  Each
    receive waits in a thread of its own (``wait`` releases the GIL); the
    time and any failure come back through a future.  Daemon threads: a
    process that leaves after a failure does not wait for a receive that
    never completes.
    """

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._run, name=f"adaqp-recv-{i}", daemon=True).start()

    def _run(self) -> None:
        while True:
            work, future = self._queue.get()
            try:
                work.wait()   # a gloo work must be waited on once: a second wait hangs
            except BaseException as err:
                future.set_exception(err)
            else:
                future.set_result(time.perf_counter())

    def submit(self, work) -> Future:
        future: Future = Future()
        self._queue.put((work, future))
        return future


@dataclass
class PendingExchange:
    """An exchange in flight; :meth:`wait` returns the received buffers by peer."""
    works: list
    recv: dict[int, Tensor]
    stage_to: torch.device | None = None   # copy received CPU buffers there (gloo + CUDA)
    sending: list[Tensor] = field(default_factory=list)  # alive until the sends complete
    #: Every peer's receive, timed in a thread of its own (point-to-point).
    arrivals: dict[int, Future] = field(default_factory=dict)
    #: When each peer's buffer arrived (``perf_counter`` seconds), filled by
    #: :meth:`wait`.  With one collective for all peers (NCCL) every peer
    #: gets the collective's end.
    arrived: dict[int, float] = field(default_factory=dict)
    #: Reads the time once the exchange is waited on (see :func:`device_clock`).
    clock: Callable[[], float] = time.perf_counter

    def wait(self) -> dict[int, Tensor]:
        for p, future in self.arrivals.items():
            self.arrived[p] = future.result()   # re-raises a failed receive
        for work in self.works:
            work.wait()
        done = self.clock()
        for p in self.recv:
            self.arrived.setdefault(p, done)
        self.arrivals, self.works = {}, []
        self.sending.clear()
        if self.stage_to is not None:
            return {p: b.to(self.stage_to, non_blocking=True) for p, b in self.recv.items()}
        return self.recv


def _to_pinned_host(buffers: dict[int, Tensor]) -> dict[int, Tensor]:
    """CUDA buffers copied into pinned host memory, asynchronously, for gloo to send.

    Every copy is queued on the current stream without blocking (pinned
    memory makes them truly asynchronous), behind the kernels that encoded
    the buffers; one wait on that stream then guarantees gloo reads what the
    copies wrote, instead of a blocking copy per peer.  Pinned
    blocks come from PyTorch's caching host allocator, so repeated
    exchanges of the same sizes reuse them.
    """
    staged, streams = {}, set()
    for p, buf in buffers.items():
        if buf.device.type != "cuda":
            staged[p] = buf
            continue
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)
        staged[p] = host
        streams.add(torch.cuda.current_stream(buf.device))
    for stream in streams:
        stream.synchronize()
    return staged


class Transport:
    """Asynchronous exchange of byte buffers with peers over a process group.

    Args:
        group (ProcessGroup, optional): The process group of the exchange.
            Keep it apart from the group that all-reduces gradients so the
            two streams of collectives can never interleave.
            (default: the default group)
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.backend = dist.get_backend(group)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._waiters: _ReceiveWaiters | None = None  # started at the first point-to-point exchange

    def start(self, send: dict[int, Tensor], recv_bytes: dict[int, int],
              device: torch.device) -> PendingExchange:
        """Posts the exchange and returns at once.

        Args:
            send (dict[int, Tensor]): 1-D ``uint8`` buffer for every peer that
                expects one (a peer missing here gets nothing).
            recv_bytes (dict[int, int]): Size of the buffer expected from
                every peer that sends one.
            device (torch.device): Where the received buffers should live.
        """
        if self.backend == "nccl":
            return self._start_nccl(send, recv_bytes, device)
        return self._start_p2p(send, recv_bytes, device)

    def _start_p2p(self, send: dict[int, Tensor], recv_bytes: dict[int, int],
                   device: torch.device) -> PendingExchange:
        pin = device.type == "cuda"
        recv = {p: torch.empty(n, dtype=torch.uint8, pin_memory=pin)
                for p, n in recv_bytes.items() if n > 0}
        if self._waiters is None:
            # Two per peer: an exchange may be posted before the previous one is waited on.
            self._waiters = _ReceiveWaiters(2 * max(1, self.world_size - 1))
        arrivals = {p: self._waiters.submit(dist.irecv(buf, src=self._global(p), group=self.group))
                    for p, buf in recv.items()}
        sending = {p: buf for p, buf in send.items() if buf.numel() > 0}
        if any(buf.device.type == "cuda" for buf in sending.values()):
            sending = _to_pinned_host(sending)
        works = [dist.isend(buf, dst=self._global(p), group=self.group)
                 for p, buf in sending.items()]
        return PendingExchange(works, recv, device if pin else None,
                               sending=list(sending.values()), arrivals=arrivals)

    def _start_nccl(self, send: dict[int, Tensor], recv_bytes: dict[int, int],
                    device: torch.device) -> PendingExchange:
        peers = range(self.world_size)
        in_splits = [int(send[p].numel()) if p in send else 0 for p in peers]
        out_splits = [int(recv_bytes.get(p, 0)) for p in peers]
        chunks = [send[p].reshape(-1) for p in peers if in_splits[p] > 0]
        inp = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
        out = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group,
                                      async_op=True)
        offsets = torch.tensor([0] + out_splits).cumsum(0).tolist()
        recv = {p: out[offsets[p]:offsets[p + 1]] for p in peers if out_splits[p] > 0}
        return PendingExchange([work], recv, sending=[inp], clock=device_clock(device))

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

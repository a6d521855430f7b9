"""`Trainer`: one worker's training loop (SPEC 8)."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from pyg_adaqp.assign import AdaptiveBits, RandomBits, UniformBits
from pyg_adaqp.comm import NonFiniteMessageError, worker_generator
from pyg_adaqp.nn import DistGraph
from pyg_adaqp.partition import LocalGraph
from pyg_adaqp.train.checkpoint import (CheckpointError, check_resumable, load_resume_point,
                                        save_checkpoint)
from pyg_adaqp.train.config import Config
from pyg_adaqp.train.model import DistGNN
from pyg_adaqp.train.report import TIMES, RunReport

SPLITS = ("train", "val", "test")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or message; the message names the epoch."""


@dataclass
class WorkerContext:
    """Where a worker runs: its rank, device and process groups."""
    rank: int
    world_size: int
    device: torch.device
    exchange_group: dist.ProcessGroup | None   # halo exchange, apart from the all-reduce


#: Called on every worker after each epoch as ``hook(trainer, epoch)``.
EpochHook = Callable[["Trainer", int], None]


class Trainer:
    """Trains :class:`DistGNN` on one worker's part of the graph.

    Every worker runs the same loop.  The loss is the sum over the worker's
    training nodes divided by the *global* number of training nodes, so the
    all-reduced gradient equals the gradient of the whole graph's mean loss;
    evaluation passes exchange at full precision.

    Training stops with a :class:`DivergenceError` naming the epoch as soon
    as the all-reduced gradient or loss is not finite (every worker sees the
    same reduced values, so all stop together), or a quantized message is
    (naming its exchange key, i.e. the layer), before the optimizer step or
    the checkpoint of that epoch: the last checkpoint on disk stays a good
    one.

    Args:
        cfg (Config): The run's configuration.
        graph (LocalGraph): This worker's part.
        ctx (WorkerContext): Rank, device and process groups.
        report (RunReport, optional): Where rank 0 writes metrics.
            (default: :obj:`None`)
        checkpoint_dir (Path, optional): Where rank 0 writes checkpoints
            every ``trainer.checkpoint_every`` epochs. (default: :obj:`None`)
        on_epoch_end (Sequence[Callable], optional): Hooks called as
            ``hook(trainer, epoch)`` after each epoch, once its metrics are
            reported and its checkpoint is written, e.g. to record memory
            use. (default: :obj:`()`)

    Raises:
        ValueError: On a worker that owns no training nodes.
    """

    def __init__(self, cfg: Config, graph: LocalGraph, ctx: WorkerContext,
                 report: RunReport | None = None, checkpoint_dir: Path | None = None,
                 on_epoch_end: Sequence[EpochHook] = ()):
        self.cfg, self.ctx, self.report = cfg, ctx, report
        self.checkpoint_dir = checkpoint_dir
        self.on_epoch_end = list(on_epoch_end)
        dev = ctx.device
        self.x = graph.x.to(dev)
        self.multi_label = graph.y.dim() == 2
        self.y = graph.y.to(dev).float() if self.multi_label else graph.y.to(dev)
        self.masks = {s: getattr(graph, f"{s}_mask").to(dev) for s in SPLITS}
        num_classes = graph.y.size(1) if self.multi_label else int(graph.num_classes)

        torch.manual_seed(cfg.seed)  # the same initial model on every worker
        m = cfg.model
        self.model = DistGNN(m.name, self.x.size(1), m.hidden_channels, num_classes,
                             m.num_layers, m.dropout, m.layer_norm).to(dev)
        torch.manual_seed(cfg.seed * 7919 + ctx.rank + 1)  # independent dropout per worker
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.trainer.lr,
                                          weight_decay=cfg.trainer.weight_decay)
        self.graph = DistGraph(graph, group=ctx.exchange_group, device=dev,
                               quantize=cfg.mode.quantize, overlap=cfg.mode.overlap,
                               cache_input=cfg.mode.cache_input,
                               generator=worker_generator(cfg.seed, ctx.rank, dev))
        # The matrices hold the edges from here on: the edge list is freed.
        self.graph.build_adjacency(self.model, self.x.dtype)
        self.graph.release_edge_list()
        a = cfg.assign
        self.scheme = (UniformBits(a.bits) if a.scheme == "uniform"
                       else RandomBits(m.num_layers, a.cycle, cfg.seed) if a.scheme == "random"
                       else AdaptiveBits(a.cycle, a.group_size, a.coe_lambda,
                                         a.variance_budget, first_bits=a.bits,
                                         gradient_budget=a.gradient_budget))
        self.rows_by_bits: dict[str, dict[int, int]] = {}
        self.exchange_widths: dict[str, int] = {}  #: feature width of every exchange key
        counts = torch.zeros(ctx.world_size)
        counts[ctx.rank] = float(self.masks["train"].sum())
        counts = self._all_reduce(counts)
        if counts[ctx.rank] == 0:
            # Only the workers concerned raise; the others fail when they leave.
            raise ValueError(
                f"worker rank {ctx.rank} owns no training nodes ({int(counts.sum())} in total "
                f"over {ctx.world_size} workers): every worker needs some; use fewer workers "
                f"(world_size) or a split with more training nodes")
        self.num_train = counts.sum()
        # Gradients are all-reduced bucket by bucket while the backward pass
        # goes on (DDP on the default group; the halo exchange has its own).
        # Built after the checks above, so a worker that fails them holds no
        # DDP state that could keep its peers waiting.
        self.ddp = (DistributedDataParallel(self.model, gradient_as_bucket_view=True)
                    if ctx.world_size > 1 else None)
        if self.ddp is not None:
            self.ddp.register_comm_hook(None, _sum_gradients)

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        t = t.to(self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.cpu()

    def _loss(self, out: Tensor) -> Tensor:
        mask = self.masks["train"]
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(out[mask], self.y[mask], reduction="sum")
            loss = loss / self.y.size(1)
        else:
            loss = F.cross_entropy(out[mask], self.y[mask], reduction="sum")
        return loss / self.num_train

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One training step; returns this worker's counters."""
        clock = self.graph.exchange.clock   # on CUDA, waits for the queued kernels
        t0, kernel0 = clock(), os.times().system
        self.scheme.on_epoch_start(epoch, self.graph)
        t_assign = clock() - t0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        try:
            loss = self._loss((self.ddp or self.model)(self.x, self.graph))
            loss.backward()   # with DDP, returns once every bucket is all-reduced
        except NonFiniteMessageError as err:  # names the exchange key, i.e. the layer
            raise DivergenceError(f"training diverged at epoch {epoch}: {err}") from err
        t1 = clock()
        grads = [p.grad for p in self.model.parameters()]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one sync
            raise DivergenceError(self._divergence(epoch, float(loss.detach())))
        t_reduce = clock() - t1
        self.optimizer.step()
        epoch_time = clock() - t0
        system_time = os.times().system - kernel0

        by_key = self.graph.exchange.reset_stats()
        if hasattr(self.scheme, "observe"):
            self.scheme.observe(by_key)
        self.rows_by_bits = {k: dict(s.rows_by_bits) for k, s in by_key.items() if s.rows_by_bits}
        self.exchange_widths.update({k: s.width for k, s in by_key.items() if s.calls})
        stats = by_key.values()
        row = {"loss": float(loss.detach()), "epoch_time": epoch_time, "reduce_time": t_reduce,
               "assign_time": t_assign, "system_time": system_time,
               "bytes_sent": float(sum(s.bytes_sent for s in stats))}
        for name in ("comm_time", "quant_time", "wait_time", "owned_agg_time", "halo_agg_time"):
            row[name] = sum(getattr(s, name) for s in stats)
        row["compute_time"] = epoch_time - row["quant_time"] - row["wait_time"] - t_reduce
        return row

    def _divergence(self, epoch: int, loss: float) -> str:
        """Names the parameters whose all-reduced gradient is not finite."""
        named = list(self.model.named_parameters())
        bad = [name for name, p in named if not bool(torch.isfinite(p.grad).all())]
        return (f"training diverged at epoch {epoch}: the all-reduced gradient is not finite "
                f"in {len(bad)} of {len(named)} parameters ({', '.join(bad)}); this worker's "
                f"loss was {loss}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Full-precision metrics on every split (accuracy or F1-micro)."""
        self.model.eval()
        with self.graph.full_precision():
            out = self.model(self.x, self.graph)
        self.graph.exchange.reset_stats()  # evaluation traffic is not training traffic
        counts = []
        for split in SPLITS:
            mask = self.masks[split]
            if self.multi_label:
                pred, true = out[mask] > 0, self.y[mask] > 0.5
                counts += [float((pred & true).sum()), float((pred & ~true).sum()),
                           float((~pred & true).sum())]
            else:
                counts += [float((out[mask].argmax(1) == self.y[mask]).sum()), float(mask.sum()),
                           0.0]
        c = self._all_reduce(torch.tensor(counts)).view(3, 3)
        if self.multi_label:  # F1-micro = 2TP / (2TP + FP + FN)
            metric = 2 * c[:, 0] / (2 * c[:, 0] + c[:, 1] + c[:, 2]).clamp(min=1)
        else:
            metric = c[:, 0] / c[:, 1].clamp(min=1)
        return dict(zip(SPLITS, metric.tolist()))

    def _state(self, epoch: int) -> dict | None:
        """The checkpoint after `epoch` (on rank 0), with every worker's own state in it.

        Besides the shared model and optimizer, each worker has its random
        states, its part of the bit-width scheme (e.g. the widths of the
        rows *it* sends) and its last epoch's row counts per width.
        """
        dev = self.ctx.device
        mine = {"torch_rng": torch.get_rng_state(),
                # Dropout on CUDA draws from the device's generator.
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "quant_rng": self.graph.exchange.generator.get_state(),
                "scheme": self.scheme.state_dict(), "rows_by_bits": self.rows_by_bits}
        workers: list = [mine]
        if self.ctx.world_size > 1:
            workers = [None] * self.ctx.world_size
            dist.all_gather_object(workers, mine)
        if self.report is None:
            return None
        return {"epoch": epoch, "assign_scheme": self.cfg.assign.scheme,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "workers": workers,
                "rows": self.report.rows}

    def _resume(self, path: str) -> int:
        """Restores a checkpoint; returns the first epoch still to run."""
        source, state = load_resume_point(path)
        check_resumable(source, state, self.ctx.world_size, self.cfg.assign.scheme)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        mine = state["workers"][self.ctx.rank]
        if hasattr(self.scheme, "load_state_dict"):
            try:
                self.scheme.load_state_dict(mine["scheme"])
            except ValueError as err:  # e.g. another scheme's state, in an older checkpoint
                raise CheckpointError(f"checkpoint {source}: {err}") from err
        torch.set_rng_state(mine["torch_rng"])
        dev = self.ctx.device
        if dev.type == "cuda":
            if mine.get("cuda_rng") is None:
                warnings.warn(f"checkpoint {source} holds no CUDA random state (it was written "
                              f"on CPU): dropout after the resume differs from an uninterrupted "
                              f"run")
            else:
                torch.cuda.set_rng_state(mine["cuda_rng"], dev)
        self.graph.exchange.generator.set_state(mine["quant_rng"])
        self.rows_by_bits = mine["rows_by_bits"]
        if self.report is not None:
            self.report.resume(state["rows"])
        return state["epoch"] + 1

    def fit(self) -> None:
        """Trains for ``trainer.epochs`` epochs; rank 0 reports every epoch."""
        tc = self.cfg.trainer
        last_eval = {s: float("nan") for s in SPLITS}
        start = self._resume(tc.resume) if tc.resume else 0
        if self.report is not None and self.report.rows:
            last_eval = {s: self.report.rows[-1][s] for s in SPLITS}
        # The scheme's one-off measurements run here, in no epoch's time.
        clock = self.graph.exchange.clock
        t0 = clock()
        if hasattr(self.scheme, "setup"):
            self.scheme.setup(self.graph, self.x)
        setup_time = float(self._all_reduce(torch.tensor([clock() - t0]),
                                            dist.ReduceOp.MAX)[0])
        for epoch in range(start, tc.epochs):
            started_at = time.time()
            row = self.train_epoch(epoch)
            sums = self._all_reduce(torch.tensor([row["loss"], row["bytes_sent"]]))
            if not math.isfinite(float(sums[0])):
                raise DivergenceError(f"training diverged at epoch {epoch}: the loss summed "
                                      f"over the workers is {float(sums[0])}")
            times = self._all_reduce(torch.tensor([row[k] for k in TIMES]), dist.ReduceOp.MAX)
            if epoch % tc.eval_every == 0 or epoch == tc.epochs - 1:
                last_eval = self.evaluate()
            if self.report is not None:
                self.report.epoch({"epoch": epoch, "started_at": started_at,
                                   "loss": float(sums[0]), **last_eval,
                                   **dict(zip(TIMES, times.tolist())),
                                   "bytes_sent": int(sums[1])})
            if tc.checkpoint_every and (epoch + 1) % tc.checkpoint_every == 0:
                state = self._state(epoch)
                if state is not None:
                    save_checkpoint(self.checkpoint_dir, epoch, state)
            for hook in self.on_epoch_end:
                hook(self, epoch)
        hist = self._bits_histogram()
        if self.report is not None:
            self.report.finish(hist, self.exchange_widths, self.scheme.report(), setup_time)

    def _bits_histogram(self) -> dict[str, dict[int, int]]:
        """Rows per width of the last training epoch's exchanges, all workers."""
        mine = self.rows_by_bits
        if self.ctx.world_size == 1:
            return mine
        gathered: list = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, mine)
        total: dict[str, dict[int, int]] = {}
        for part in gathered:
            for key, counts in part.items():
                for bits, n in counts.items():
                    total.setdefault(key, {}).setdefault(bits, 0)
                    total[key][bits] += n
        return total


def _sum_gradients(state, bucket):
    """DDP communication hook: sums a bucket (a ``dist.GradBucket``) over the workers.

    DDP's own hook averages; the loss here is already divided by the
    *global* number of training nodes, so the sum is the whole graph's gradient.
    (No annotations: DDP checks the bucket's, and this module's are strings.)
    """
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])

"""`Trainer`: one worker's training loop (SPEC 8)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyg_adaqp.assign import AdaptiveBits, RandomBits, UniformBits
from pyg_adaqp.comm import worker_generator
from pyg_adaqp.nn import DistGraph
from pyg_adaqp.partition import LocalGraph
from pyg_adaqp.train.checkpoint import CheckpointError, load_resume_point, save_checkpoint
from pyg_adaqp.train.config import Config
from pyg_adaqp.train.model import DistGNN
from pyg_adaqp.train.report import RunReport

SPLITS = ("train", "val", "test")
# Per-epoch timings reduced with MAX over workers (the slowest one sets the pace).
TIMES = ("epoch_time", "comm_time", "quant_time", "wait_time", "central_time", "marginal_time",
         "compute_time", "reduce_time", "assign_time")


@dataclass
class WorkerContext:
    """Where a worker runs: its rank, device and process groups."""
    rank: int
    world_size: int
    device: torch.device
    exchange_group: dist.ProcessGroup | None   # halo exchange, apart from the all-reduce


class Trainer:
    """Trains :class:`DistGNN` on one worker's part of the graph.

    Every worker runs the same loop.  The loss is the sum over the worker's
    training nodes divided by the *global* number of training nodes, so the
    all-reduced gradient equals the gradient of the whole graph's mean loss;
    evaluation passes exchange at full precision.

    Args:
        cfg (Config): The run's configuration.
        graph (LocalGraph): This worker's part.
        ctx (WorkerContext): Rank, device and process groups.
        report (RunReport, optional): Where rank 0 writes metrics.
    """

    def __init__(self, cfg: Config, graph: LocalGraph, ctx: WorkerContext,
                 report: RunReport | None = None, checkpoint_dir: Path | None = None):
        self.cfg, self.ctx, self.report = cfg, ctx, report
        self.checkpoint_dir = checkpoint_dir
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
                               cache_input_halo=cfg.mode.cache_input,
                               generator=worker_generator(cfg.seed, ctx.rank, dev))
        a = cfg.assign
        self.scheme = (UniformBits(a.bits) if a.scheme == "uniform"
                       else RandomBits(m.num_layers, a.cycle, cfg.seed) if a.scheme == "random"
                       else AdaptiveBits(a.cycle, a.group_size, a.coe_lambda))
        self.rows_by_bits: dict[str, dict[int, int]] = {}
        self.num_train = self._all_reduce(torch.tensor([float(self.masks["train"].sum())]))[0]
        if self.num_train == 0:
            raise ValueError("the dataset has no training nodes (train_mask is all False)")

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
        t0 = time.perf_counter()
        self.scheme.on_epoch_start(epoch, self.graph)
        t_assign = time.perf_counter() - t0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss = self._loss(self.model(self.x, self.graph))
        loss.backward()
        t1 = time.perf_counter()
        grads = [p.grad for p in self.model.parameters()]
        flat = _flatten_dense_tensors(grads)
        if self.ctx.world_size > 1:
            dist.all_reduce(flat)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
        t_reduce = time.perf_counter() - t1
        self.optimizer.step()
        epoch_time = time.perf_counter() - t0

        by_key = self.graph.exchange.reset_stats()
        self.rows_by_bits = {k: dict(s.rows_by_bits) for k, s in by_key.items() if s.rows_by_bits}
        stats = by_key.values()
        row = {"loss": float(loss.detach()), "epoch_time": epoch_time, "reduce_time": t_reduce,
               "assign_time": t_assign,
               "bytes_sent": float(sum(s.bytes_sent for s in stats))}
        for name in ("comm_time", "quant_time", "wait_time", "central_time", "marginal_time"):
            row[name] = sum(getattr(s, name) for s in stats)
        row["compute_time"] = epoch_time - row["quant_time"] - row["wait_time"] - t_reduce
        return row

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
        """The checkpoint after `epoch` (on rank 0; every rank's random state in it)."""
        rng = {"torch": torch.get_rng_state(),
               "quant": self.graph.exchange.generator.get_state()}
        states: list = [rng]
        if self.ctx.world_size > 1:
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, rng)
        if self.report is None:
            return None
        return {"epoch": epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheme": self.scheme.state_dict(),
                "rng": states, "rows": self.report.rows, "rows_by_bits": self.rows_by_bits}

    def _resume(self, path: str) -> int:
        """Restores a checkpoint; returns the first epoch still to run."""
        source, state = load_resume_point(path)
        if len(state["rng"]) != self.ctx.world_size:
            raise CheckpointError(f"checkpoint {source} was written by {len(state['rng'])} "
                                  f"workers, this run has {self.ctx.world_size}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if hasattr(self.scheme, "load_state_dict"):
            self.scheme.load_state_dict(state["scheme"])
        rng = state["rng"][self.ctx.rank]
        torch.set_rng_state(rng["torch"])
        self.graph.exchange.generator.set_state(rng["quant"])
        self.rows_by_bits = state["rows_by_bits"]
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
        for epoch in range(start, tc.epochs):
            row = self.train_epoch(epoch)
            sums = self._all_reduce(torch.tensor([row["loss"], row["bytes_sent"]]))
            times = self._all_reduce(torch.tensor([row[k] for k in TIMES]), dist.ReduceOp.MAX)
            if epoch % tc.eval_every == 0 or epoch == tc.epochs - 1:
                last_eval = self.evaluate()
            if self.report is not None:
                self.report.epoch({"epoch": epoch, "loss": float(sums[0]), **last_eval,
                                   **dict(zip(TIMES, times.tolist())),
                                   "bytes_sent": int(sums[1])})
            if tc.checkpoint_every and (epoch + 1) % tc.checkpoint_every == 0:
                state = self._state(epoch)
                if state is not None:
                    save_checkpoint(self.checkpoint_dir, epoch, state)
        hist = self._bits_histogram()
        if self.report is not None:
            self.report.finish(hist)

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
